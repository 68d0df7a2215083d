#!/usr/bin/env bash
# Kernel settings and fixed drafting settings compared in one device call: each section is one `adarun bench`
# process with its own `none` (ratios within a process), under its own time limit, its environment in the name:
#   bash scripts/gpu_sweep.sh NAME:SECTION:seconds[:VAR=value,VAR=value] ...
#   b16      `none` and `eagle2` d4/t30 at batch 16, T=0 (32 prompts)
#   b1       `none`, `eagle2` d4/t30 and d6/t60 at batch 1, T=0 and 0.7 (16 prompts)
#   t07      `none` and the `eagle2` settings in SWEEP_METHODS at batch 1, T=0.7 (16 prompts)
#   t0       the same at T=0
# Each JSON records its command, commit and device; it comes back as $OUT/NAME.json (tar them if more than 8).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ADARUN_GIT_COMMIT=$(cat .kit/commit 2>/dev/null || git rev-parse HEAD)
nvidia-smi -L
TWO="none,eagle2:depth=4:total_tokens=30,eagle2:depth=6:total_tokens=60"
SWEEP=${SWEEP_METHODS:-none,eagle2:depth=3:total_tokens=20,eagle2:depth=4:total_tokens=20,eagle2:depth=5:total_tokens=40,eagle2:top_k=8:depth=4:total_tokens=30}
mkdir -p "$OUT"
for arg in "$@"; do
  IFS=: read -r name section limit envs <<< "$arg"
  case "$section" in
    b16) ARGS="--methods none,eagle2:depth=4:total_tokens=30 --batch-sizes 16 --temperatures 0 --n-prompts 32" ;;
    b1) ARGS="--methods $TWO --batch-sizes 1 --temperatures 0,0.7 --n-prompts 16" ;;
    t07) ARGS="--methods $SWEEP --batch-sizes 1 --temperatures 0.7 --n-prompts 16" ;;
    t0) ARGS="--methods $SWEEP --batch-sizes 1 --temperatures 0 --n-prompts 16" ;;
    *) echo "usage: $0 NAME:b16|b1|t07|t0:seconds[:VAR=value,...] ..." >&2; exit 2 ;;
  esac
  echo "== $name $section ${limit}s ${envs}"
  ( IFS=, read -ra pairs <<< "$envs"; for e in "${pairs[@]}"; do export "$e"; done
    timeout "$limit" python3 scripts/gpu_fast_bench.py --target .kit/pycoder-22m --draft heads/pycoder-22m-eagle \
      --prompts .kit/code-prompts.parquet --baselines= $ARGS --new-tokens 128 --repeats 2 --out "/tmp/sweep-$name" \
      > "/tmp/sweep-$name.log" 2>&1 || echo "$name: exit $?" )
  grep -E "B=|Error" "/tmp/sweep-$name.log" | tail -8
  cp "/tmp/sweep-$name/bench.json" "$OUT/$name.json" 2>/dev/null
done
