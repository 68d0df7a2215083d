#!/usr/bin/env bash
# The fleet benchmark (scripts/fleet_bench.py) on a machine with several GPUs; needs .kit/device-kit for Ray.
# Usage there: bash scripts/gpu_multi.sh WORKERS [more fleet_bench args]   e.g. bash scripts/gpu_multi.sh 1
#              then: bash scripts/gpu_multi.sh 2,4 --fault --merge bench/results/fleet-x4/fleet_bench.json
# Ray (19 MB), pycoder-22m (44 MB in bfloat16) and the tracked tree (18 MB) exceed what one device call carries
# (64 MiB), so the model goes first, into the git-ignored .store/ that a warm machine keeps between calls:
#   call 1, carrying .kit = {pycoder-22m, code-prompts.parquet}: mkdir -p .store && cp -r .kit/* .store/
#   call 2 at once (the machine is given back after ~30 s idle), carrying .kit = {device-kit, commit}: this script.
set -uo pipefail
source .kit/device-kit/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 ADARUN_GIT_COMMIT=$(cat .kit/commit)
nvidia-smi -L
KIT=.kit; [ -d .store/pycoder-22m ] && KIT=.store
python3 scripts/fleet_bench.py --prompts $KIT/code-prompts.parquet --target $KIT/pycoder-22m \
  --draft heads/pycoder-22m-eagle --method eagle2 --new-tokens 256 --batch-size 64 --seconds 200 \
  --workers "$1" "${@:2}" --work /tmp/adarun-fleet --out $OUT/fleet 2>&1 | grep -v "Token authentication" | tee $OUT/fleet.log
cp -r /tmp/adarun-fleet/*.log $OUT/fleet/ 2>/dev/null || true
