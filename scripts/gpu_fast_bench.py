"""`adarun bench` without the job runner's imports (the GPU machine lacks some of the runner's packages):
the same click command, the same arguments, the same provenance."""
import sys

from jobs.model_commands import bench

if __name__ == "__main__":
    sys.argv = ["adarun", "bench", *sys.argv[1:]]
    bench(args=sys.argv[2:], prog_name="adarun bench")
