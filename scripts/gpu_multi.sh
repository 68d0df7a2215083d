#!/usr/bin/env bash
# The fleet benchmark (scripts/fleet_bench.py) on a machine with several GPUs; needs .kit/device-kit for Ray.
# Usage there: bash scripts/gpu_multi.sh WORKERS [more fleet_bench args]   e.g. bash scripts/gpu_multi.sh 1
#              then: bash scripts/gpu_multi.sh 2,4 --fault --merge bench/results/fleet-x4/fleet_bench.json
set -uo pipefail
source .kit/device-kit/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 ADARUN_GIT_COMMIT=$(cat .kit/commit)
nvidia-smi -L
python3 scripts/fleet_bench.py --prompts .kit/code-prompts.parquet --target .kit/pycoder-22m \
  --draft heads/pycoder-22m-eagle --method eagle2 --new-tokens 256 --batch-size 64 --seconds 200 \
  --workers "$1" "${@:2}" --work /tmp/adarun-fleet --out $OUT/fleet 2>&1 | grep -v "Token authentication" | tee $OUT/fleet.log
cp -r /tmp/adarun-fleet/*.log $OUT/fleet/ 2>/dev/null || true
