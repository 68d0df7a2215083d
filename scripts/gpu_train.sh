#!/usr/bin/env bash
# One GPU call: train the shipped tiny target, its EAGLE head, and pycoder-22m's EAGLE head, then probe tau.
# Expects ../shared material copied to .kit/ (pycoder-22m, code-prompts.parquet). Results go to $OUT.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CORPUS="$SITE/**/*.py"
W=/tmp/work; mkdir -p $W
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 scripts/train_tiny_target.py --tokenizer .kit/pycoder-22m --corpus "$CORPUS" --out $W/pycoder-tiny \
  --max-seconds ${TINY_S:-150} --steps 6000 2>&1 | grep -v Writing | tee $OUT/train_tiny.log | tail -3
TD="python3 scripts/model_command.py train-draft"  # no tenacity on the GPU machine
eval $TD --target $W/pycoder-tiny --corpus "'$CORPUS'" --out $W/pycoder-tiny-eagle --steps 4000 --max-seconds ${HEAD_TINY_S:-70} --max-files 12000 --quiet 2>&1 | tail -2 | tee $OUT/train_head_tiny.log
eval $TD --target .kit/pycoder-22m --corpus "'$CORPUS'" --out $W/pycoder-22m-eagle --steps 6000 --max-seconds ${HEAD_22M_S:-170} --max-files 16000 --quiet 2>&1 | tail -2 | tee $OUT/train_head_22m.log
rm -rf $W/*/checkpoint
tar czf $OUT/models.tgz -C $W pycoder-tiny pycoder-tiny-eagle pycoder-22m-eagle
python3 scripts/probe_tau.py .kit/pycoder-22m $W/pycoder-22m-eagle .kit/code-prompts.parquet 12 64 2>&1 | tee $OUT/probe_22m.jsonl
