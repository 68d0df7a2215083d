#!/usr/bin/env bash
# The measurements the open issues' targets still need, on one GPU (H100 or H200), each a section that fits one
# device call (10 minutes). Setup here (git-ignored, carried): mkdir .kit; cp ../shared/data/code-prompts.parquet
# .kit/; cp -r ../shared/models/pycoder-22m .kit/ (bfloat16, 44 MB); git rev-parse HEAD > .kit/commit.
# Usage on the device: bash scripts/gpu_open_targets.sh natural|adaptive-b16|adaptive-b1|profile [seconds]
#   natural       #17: continuous batching on the natural workload, 64 slots, `none` and `eagle:k=4` (the fastest
#                 fixed method at 64 slots on the fixed workload), T=0 and 0.7: refill on/off, occupancy
#   adaptive-b16  #12: every adaptive method against `none` and the best fixed settings at batch 16 and 64, T=0
#   adaptive-b1   #12: the same at batch 1, T=0 and 0.7 (16 prompts)
#   profile       #11: CUDA kernels per round by name, `none` and `eagle2` d4/t30 at batch 1, T=0
# Each bench cell warms its engine up first (decode/warmup.py): its timed calls replay graphs from their first round.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ADARUN_GIT_COMMIT=$(cat .kit/commit 2>/dev/null || git rev-parse HEAD)
nvidia-smi -L
LIMIT=${2:-540}
COMMON="--target .kit/pycoder-22m --draft heads/pycoder-22m-eagle --ldlp heads/pycoder-22m-ldlp --prompts .kit/code-prompts.parquet --baselines="
ADAPTIVE="none,eagle2:depth=4:total_tokens=30,eagle:k=4,opt-tree,ddd,ldlp-tree,adaeagle"
case "$1" in
  natural) ARGS="--workload natural --batch-sizes 64 --temperatures 0,0.7 --new-tokens 256 --n-prompts 244 --repeats 3 --methods eagle:k=4" ;;
  adaptive-b16) ARGS="--methods $ADAPTIVE --batch-sizes 16,64 --temperatures 0 --new-tokens 128 --n-prompts 64 --repeats 4 --cost-model" ;;
  profile) ARGS="--methods none,eagle2:depth=4:total_tokens=30 --batch-sizes 1 --temperatures 0 --new-tokens 128 --n-prompts 16 --repeats 2 --profile" ;;
  adaptive-b1) ARGS="--methods $ADAPTIVE --batch-sizes 1 --temperatures 0,0.7 --new-tokens 128 --n-prompts 16 --repeats 4 --cost-model" ;;
  *) echo "usage: $0 natural|adaptive-b16|adaptive-b1|profile [seconds]" >&2; exit 2 ;;
esac
timeout "$LIMIT" python3 scripts/gpu_fast_bench.py $COMMON $ARGS --out "$OUT/$1" 2>&1 | grep -E "B=|Error|error"
if [ "$1" = profile ]; then  # the per-round kernels by name, the most frequent first
  python3 -c "import json,sys; [print(c['label'], c.get('kernels_per_round'), *[f'{v:6.2f} {k}' for k, v in list(c.get('kernels_by_name', {}).items())[:40]], sep='\n') for c in json.load(open(sys.argv[1]))['cells']]" "$OUT/$1/bench.json"
fi
rm -f "$OUT/$1"/*.png "$OUT/$1"/*.md  # the device returns at most 8 files: the JSON carries everything
