#!/usr/bin/env bash
# Bench pycoder-22m's EAGLE heads against each other and `none` in one device call (after gpu_train_head.sh).
# A head is found by name in out/heads/ (left there by gpu_train_head.sh on a still-warm machine), else .kit/heads/
# (carried); "shipped" is heads/pycoder-22m-eagle. Sections run one after another, each under its own time limit:
#   bash scripts/gpu_head_bench.sh HEAD:SECTION[:seconds] ...
#   b1     none, eagle2 d4/t30 and d6/t60 at batch 1, T=0 and 0.7 (16 prompts x 128 new tokens)
#   b1-t0  the same at T=0 only
#   b16    none and eagle2 d4/t30 at batch 16, T=0 (32 prompts): the ratio, and peak memory against none's
# Each bench JSON records its command, commit and device; it comes back as $OUT/HEAD-SECTION/bench.json.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ADARUN_GIT_COMMIT=$(cat .kit/commit 2>/dev/null || git rev-parse HEAD)
nvidia-smi -L
TWO="none,eagle2:depth=4:total_tokens=30,eagle2:depth=6:total_tokens=60"
for arg in "$@"; do
  IFS=: read -r head name limit <<< "$arg"; limit=${limit:-300}
  if [ "$head" = shipped ]; then draft=heads/pycoder-22m-eagle
  elif [ -f "out/heads/$head/model.safetensors" ]; then draft=out/heads/$head
  else draft=.kit/heads/$head; fi
  case "$name" in
    b1) ARGS="--methods $TWO --batch-sizes 1 --temperatures 0,0.7 --n-prompts 16" ;;
    b1-t0) ARGS="--methods $TWO --batch-sizes 1 --temperatures 0 --n-prompts 16" ;;
    b16) ARGS="--methods none,eagle2:depth=4:total_tokens=30 --batch-sizes 16 --temperatures 0 --n-prompts 32" ;;
    *) echo "usage: $0 HEAD:b1|b1-t0|b16[:seconds] ..." >&2; exit 2 ;;
  esac
  echo "== $head $name ($draft, ${limit} s)"
  timeout "$limit" python3 scripts/gpu_fast_bench.py --target .kit/pycoder-22m --draft "$draft" \
    --prompts .kit/code-prompts.parquet --baselines= $ARGS --new-tokens 128 --repeats 2 \
    --out "$OUT/$head-$name" > "/tmp/$head-$name.log" 2>&1 || echo "$head $name: exit $?"
  grep -E "B=|Error" "/tmp/$head-$name.log" | tail -8
  rm -f "$OUT/$head-$name"/*.png "$OUT/$head-$name"/*.md
done
