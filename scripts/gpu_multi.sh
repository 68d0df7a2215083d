#!/usr/bin/env bash
# Multi-GPU run of `adarun submit` (scripts/multi_gpu.py) on a machine with several GPUs.
# Usage there: bash scripts/gpu_multi.sh WORKERS  (e.g. 1,2 or 1,2,4); needs .kit/device-kit for Ray.
set -uo pipefail
source .kit/device-kit/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 ADARUN_GIT_COMMIT=$(cat .kit/commit)
nvidia-smi -L
python3 scripts/multi_gpu.py --prompts .kit/code-prompts.parquet --rows 2000 --workers "$1" --rows-per-shard 32 \
  --batch-size 32 --new-tokens 128 ${2:-} --out $OUT/mg 2>&1 | grep -v "Token authentication\|Writing model" | tee $OUT/mg.log
