"""`adarun train-draft | fit-ldlp | bench ...` without the job runner's imports (the GPU machine lacks some of
the runner's packages, e.g. tenacity): the same click commands, the same arguments, the same provenance.

    python3 scripts/model_command.py train-draft --target .kit/pycoder-22m --corpus '...' --out /tmp/head
"""
import sys

from jobs.model_commands import bench, fit_ldlp, train_draft

COMMANDS = {"train-draft": train_draft, "fit-ldlp": fit_ldlp, "bench": bench}

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in COMMANDS:
        sys.exit(f"usage: model_command.py {{{'|'.join(COMMANDS)}}} [OPTIONS]")
    COMMANDS[name](args=sys.argv[2:], prog_name=f"adarun {name}")
