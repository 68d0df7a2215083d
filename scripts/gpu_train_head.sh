#!/usr/bin/env bash
# Retrain pycoder-22m's EAGLE head on the GPU machine (one device call), then measure it against the head it would
# replace in one bench call. Setup here (git-ignored, carried): .kit/pycoder-22m, .kit/code-prompts.parquet,
# .kit/commit (see gpu_open_targets.sh).
#   TRAIN_SECONDS (default 400)  the training's time budget (the cosine schedule ends with it)
#   UNROLLS (default 3)          train-draft --unroll values, one head each, trained side by side: drafting steps each
#                                position trains on its own predictions
#   BENCH_SECONDS (default 0)    then bench `none` and eagle2 d4/t30 and d6/t60 at batch 1, T=0, with the first new head
#                                and with heads/pycoder-22m-eagle, for at most this long (0: no bench)
# Each head comes back in $OUT/eagle-uN (config.json, model.safetensors, train_report.json); checkpoints are dropped.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ADARUN_GIT_COMMIT=$(cat .kit/commit 2>/dev/null || git rev-parse HEAD)
nvidia-smi -L
CORPUS="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/**/*.py"
for u in ${UNROLLS:-3}; do  # several recipes train side by side on the one GPU (a 22M target leaves it mostly idle)
  echo "== train-draft --unroll $u (${TRAIN_SECONDS:-400} s) on $CORPUS"
  python3 scripts/model_command.py train-draft --target .kit/pycoder-22m --corpus "$CORPUS" --out "$OUT/eagle-u$u" \
    --steps 20000 --max-seconds "${TRAIN_SECONDS:-400}" --unroll "$u" --exclude-heldout --max-files 16000 \
    --quiet > "/tmp/train-u$u.log" 2>&1 &
done
wait
for u in ${UNROLLS:-3}; do tail -2 "/tmp/train-u$u.log"; rm -rf "$OUT/eagle-u$u/checkpoint"; done
if [ "${BENCH_SECONDS:-0}" != 0 ]; then
  for head in new old; do
    [ $head = new ] && draft="$OUT/eagle-u${UNROLLS%% *}" || draft=heads/pycoder-22m-eagle
    echo "== bench, $head head"
    timeout "${BENCH_SECONDS}" python3 scripts/gpu_fast_bench.py --target .kit/pycoder-22m --draft "$draft" \
      --prompts .kit/code-prompts.parquet --baselines= --methods none,eagle2:depth=4:total_tokens=30,eagle2:depth=6:total_tokens=60 \
      --batch-sizes 1 --temperatures 0 --new-tokens 128 --n-prompts 16 --repeats 2 --out "$OUT/bench-$head" > "/tmp/bench-$head.log" 2>&1
    grep -E "B=|Error" "/tmp/bench-$head.log" | tail -8
    rm -f "$OUT/bench-$head"/*.png "$OUT/bench-$head"/*.md
  done
fi
