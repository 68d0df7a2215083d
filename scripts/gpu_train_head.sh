#!/usr/bin/env bash
# Retrain pycoder-22m's EAGLE head on the GPU machine (one device call); gpu_head_bench.sh then measures the heads
# against the shipped one. Setup here (git-ignored, carried): .kit/pycoder-22m, .kit/code-prompts.parquet,
# .kit/commit (see gpu_open_targets.sh).
#   TRAIN_SECONDS (default 400)  the training's time budget (the cosine schedule ends with it)
#   UNROLLS (default 3)          train-draft --unroll values, one head each, trained side by side: drafting steps each
#                                position trains on its own predictions
# The heads go to out/heads/eagle-uN (config.json, model.safetensors, train_report.json; no checkpoint), where
# gpu_head_bench.sh finds them on the same machine, and come back together as $OUT/heads.tar.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ADARUN_GIT_COMMIT=$(cat .kit/commit 2>/dev/null || git rev-parse HEAD)
nvidia-smi -L
rm -rf out/heads; mkdir -p out/heads
CORPUS="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/**/*.py"
for u in ${UNROLLS:-3}; do  # several recipes train side by side on the one GPU (a 22M target leaves it mostly idle)
  echo "== train-draft --unroll $u (${TRAIN_SECONDS:-400} s) on $CORPUS"
  python3 scripts/model_command.py train-draft --target .kit/pycoder-22m --corpus "$CORPUS" --out "out/heads/eagle-u$u" \
    --steps 20000 --max-seconds "${TRAIN_SECONDS:-400}" --unroll "$u" --exclude-heldout --max-files 16000 \
    --quiet > "/tmp/train-u$u.log" 2>&1 &
done
wait
for u in ${UNROLLS:-3}; do tail -2 "/tmp/train-u$u.log"; rm -rf "out/heads/eagle-u$u/checkpoint"; done
tar -C out -cf "$OUT/heads.tar" heads  # one file back (the device returns at most 8)
