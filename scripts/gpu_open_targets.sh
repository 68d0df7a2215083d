#!/usr/bin/env bash
# The measurements the open issues' targets still need, on one GPU (H100 or H200), as sections run one after another
# in one device call (10 minutes). Setup here (git-ignored, carried): mkdir .kit; cp ../shared/data/code-prompts.parquet
# .kit/; cp -r ../shared/models/pycoder-22m .kit/ (bfloat16, 44 MB); git rev-parse HEAD > .kit/commit.
# Usage on the device: bash scripts/gpu_open_targets.sh SECTION[:seconds] ...   e.g. profile:150 natural:380
#   profile       #11: CUDA kernels per round by name, `none` and `eagle2` d4/t30 at batch 1, T=0. If it fails, the
#                 later sections run with compiled rounds off (ADARUN_COMPILE_ROUND=0) and say so
#   profile-plain the same with compiled rounds off: the comparison for the compiled propose/settle
#   profile-kernel the same with the Triton tree-attention and RoPE kernels (ADARUN_TREE_KERNEL=1, the default on CUDA
#                 since h100-kernel-default; ADARUN_TREE_KERNEL=0 runs SDPA), and transformers'
#                 generate at batch 1 (the 20x baseline) in the same JSON
#   profile-b16   the same at batch 16 (PROFILE_BATCHES overrides) for `none`, `eagle:k=4` and `eagle2` d4/t30, with
#                 each kernel name's GPU time per round (`kernel_us_by_name`): where a batch's rounds grow
#   profile-split profile-kernel's cells at batch 1 and 16 with each row's live slots split over several programs
#                 (ADARUN_ATTN_SPLITS=auto, flash-decoding: the default since h100-split) whatever ADARUN_ATTN_SPLITS
#                 says; the other sections take ADARUN_ATTN_SPLITS as given (1: the single pass, for comparison)
#   fixed-b64     `none` and `eagle2` d4/t30 at batch 64, T=0 (the batch where the kernels once lost 3.4x)
#   fixed-b64-kernel the same with ADARUN_TREE_KERNEL=1
#   natural       #17: continuous batching on the natural workload, 64 slots, `none`, `eagle:k=4` (the fastest fixed
#                 method at 64 slots on the fixed workload) and `eagle2` d4/t30 (NATURAL_METHODS overrides), T=0 and 0.7:
#                 refill on/off, occupancy (the default prefill chunk, 512 positions: these prompts, cut to 384
#                 tokens, prefill whole)
#   natural-whole the same at T=0 with refills' prompts prefilled at once (--prefill-chunk 0), for comparison
#                 (NATURAL_BATCHES: the slot counts, 64 by default, for natural and natural-whole)
#   natural-chunk the same at T=0 with prompts prefilled in chunks of 128 positions: chunked prefill on the GPU
#   fixed-grid    #11 at batch 16 and 64, T=0: `none` against the fixed settings that suit a batch (EAGLE-2 trees of
#                 30 and 12 nodes, a chain of 4); FIXED_METHODS overrides
#   fixed-t07     #11 at batch 1, T=0.7: `none`, `eagle2` d4/t30 and d6/t60, `eagle:k=4`
#   adaptive-b16  #12: every adaptive method against `none` and the best fixed settings at batch 16 and 64, T=0
#   adaptive-b1   #12: the same at batch 1, T=0 (ADAPTIVE_TEMPERATURES=0,0.7 adds T=0.7; 16 prompts). The adaptive
#                 methods' propose compiles once per menu shape at warm-up: each cell's warm_seconds says what it cost
#   adaptive-b1-kernel the same with ADARUN_TREE_KERNEL=1
#   (ADARUN_DEPTH_POLICY=0 keeps each call's first shape for all its rounds: the adaptive methods without the
#   per-round depth of decode/depth_policy.py, for comparison in the same call)
# Each bench cell warms its engine up first (decode/warmup.py): its timed calls replay graphs from their first round.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ADARUN_GIT_COMMIT=$(cat .kit/commit 2>/dev/null || git rev-parse HEAD)
nvidia-smi -L
COMMON="--target .kit/pycoder-22m --draft heads/pycoder-22m-eagle --ldlp heads/pycoder-22m-ldlp --prompts .kit/code-prompts.parquet --baselines="
ADAPTIVE=${ADAPTIVE_METHODS:-none,eagle2:depth=4:total_tokens=30,eagle:k=4,opt-tree,ddd,ldlp-tree,adaeagle}
PROFILE="--methods none,eagle2:depth=4:total_tokens=30 --batch-sizes 1 --temperatures 0 --new-tokens 128 --n-prompts 16 --repeats 2 --profile"
for arg in "$@"; do
  name=${arg%%:*}; limit=${arg#*:}; [ "$limit" = "$arg" ] && limit=540
  case "$name" in
    natural) ARGS="--workload natural --batch-sizes ${NATURAL_BATCHES:-64} --temperatures 0,0.7 --new-tokens 256 --n-prompts 244 --repeats 3 --methods ${NATURAL_METHODS:-eagle:k=4,eagle2:depth=4:total_tokens=30}" ;;
    natural-chunk) ARGS="--workload natural --batch-sizes 64 --temperatures 0 --new-tokens 256 --n-prompts 244 --repeats 3 --prefill-chunk 128 --methods ${NATURAL_METHODS:-eagle:k=4,eagle2:depth=4:total_tokens=30}" ;;
    natural-whole) ARGS="--workload natural --batch-sizes ${NATURAL_BATCHES:-64} --temperatures 0 --new-tokens 256 --n-prompts 244 --repeats 3 --prefill-chunk 0 --methods ${NATURAL_METHODS:-eagle:k=4,eagle2:depth=4:total_tokens=30}" ;;
    fixed-grid) ARGS="--methods ${FIXED_METHODS:-none,eagle2:depth=4:total_tokens=30,eagle2:top_k=4:depth=4:total_tokens=12,eagle:k=4} --batch-sizes ${FIXED_BATCHES:-16,64} --temperatures 0 --new-tokens 128 --n-prompts 64 --repeats 3" ;;
    fixed-t07) ARGS="--methods none,eagle2:depth=4:total_tokens=30,eagle2:depth=6:total_tokens=60,eagle:k=4 --batch-sizes 1 --temperatures 0.7 --new-tokens 128 --n-prompts 16 --repeats 2" ;;
    adaptive-b16) ARGS="--methods $ADAPTIVE --batch-sizes 16,64 --temperatures 0 --new-tokens 128 --n-prompts 64 --repeats 4 --cost-model" ;;
    profile|profile-plain) ARGS=$PROFILE ;;
    profile-kernel) ARGS="$PROFILE --baselines hf --hf-prompts 2" ;;
    profile-split) ARGS="--methods none,eagle2:depth=4:total_tokens=30 --batch-sizes 1,16 --temperatures 0 --new-tokens 128 --n-prompts 32 --repeats 2 --profile" ;;
    profile-b16) ARGS="--methods none,eagle:k=4,eagle2:depth=4:total_tokens=30 --batch-sizes ${PROFILE_BATCHES:-16} --temperatures 0 --new-tokens 128 --n-prompts 32 --repeats 2 --profile" ;;
    fixed-b64|fixed-b64-kernel) ARGS="--methods none,eagle2:depth=4:total_tokens=30 --batch-sizes 64 --temperatures 0 --new-tokens 128 --n-prompts 64 --repeats 3" ;;
    adaptive-b1|adaptive-b1-kernel) ARGS="--methods $ADAPTIVE --batch-sizes 1 --temperatures ${ADAPTIVE_TEMPERATURES:-0} --new-tokens 128 --n-prompts 16 --repeats 3 --cost-model" ;;
    *) echo "usage: $0 natural|natural-whole|natural-chunk|fixed-grid|fixed-t07|profile-b16|profile-split|adaptive-b16|adaptive-b1[-kernel]|profile|profile-plain|profile-kernel|fixed-b64|fixed-b64-kernel[:seconds] ..." >&2; exit 2 ;;
  esac
  echo "== $name (${limit} s, ADARUN_COMPILE_ROUND=${ADARUN_COMPILE_ROUND:-1})"
  if [ "$name" = profile-plain ]; then plain=0; else plain=${ADARUN_COMPILE_ROUND:-1}; fi
  if [ "${name%-kernel}" != "$name" ]; then kernel=1; else kernel=${ADARUN_TREE_KERNEL:-1}; fi
  if [ "$name" = profile-split ]; then splits=auto; else splits=${ADARUN_ATTN_SPLITS:-auto}; fi
  ADARUN_ATTN_SPLITS=$splits ADARUN_COMPILE_ROUND=$plain ADARUN_TREE_KERNEL=$kernel timeout "$limit" python3 scripts/gpu_fast_bench.py $COMMON $ARGS \
    --out "$OUT/$name" > "/tmp/$name.log" 2>&1
  rc=$?
  grep -E "B=|Error|error" "/tmp/$name.log" | tail -40
  if [ "$rc" != 0 ]; then
    echo "$name: exit $rc"; tail -5 "/tmp/$name.log"
    if [ "$name" = profile ] && grep -q Traceback "/tmp/$name.log"; then
      export ADARUN_COMPILE_ROUND=0; echo "compiled rounds off from here on"
    fi
    if [ "$name" = profile-kernel ] && grep -q Traceback "/tmp/$name.log"; then
      grep -E "Error" "/tmp/$name.log" | tail -3
      export ADARUN_TREE_KERNEL=0 ADARUN_TOPK_KERNEL=0; echo "Triton attention and top-k kernels off from here on"
    fi
  fi
  if [ -f "$OUT/$name/bench.json" ] && [ "${name#profile}" != "$name" ]; then  # kernels per round by name
    python3 -c "import json,sys; [print(c['label'], c.get('kernels_per_round'), c.get('gpu_kernel_ms_per_round'), *[f'{v:7.2f} us {k[:70]}' for k, v in list(c.get('kernel_us_by_name', {}).items())[:12]], sep='\n') for c in json.load(open(sys.argv[1]))['cells']]" "$OUT/$name/bench.json"
  fi
  rm -f "$OUT/$name"/*.png "$OUT/$name"/*.md  # the device returns at most 8 files: the JSON carries everything
done
