#!/usr/bin/env bash
# GPU call 2: fit pycoder-22m's LDLP with `adarun fit-ldlp`, check the graph path, time a small grid.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
W=/tmp/work; mkdir -p $W
if [ ! -d heads/pycoder-22m-ldlp ]; then
python3 scripts/model_command.py fit-ldlp --target .kit/pycoder-22m --draft heads/pycoder-22m-eagle \
  --corpus "$SITE/**/*.py" --out $W/pycoder-22m-ldlp --prompts 400 --new-tokens 96 --batch-size 32 2>&1 | tail -4 | tee $OUT/fit_ldlp_22m.log
tar czf $OUT/ldlp.tgz -C $W pycoder-22m-ldlp
else cp -r heads/pycoder-22m-ldlp $W/; fi
python3 scripts/gpu_check.py .kit/pycoder-22m heads/pycoder-22m-eagle $W/pycoder-22m-ldlp .kit/code-prompts.parquet 2>&1 | tee $OUT/check.log
python3 scripts/model_command.py bench --target .kit/pycoder-22m --draft heads/pycoder-22m-eagle \
  --ldlp $W/pycoder-22m-ldlp --draft-model models/pycoder-tiny --prompts .kit/code-prompts.parquet \
  --methods eagle2,adaeagle,ldlp-tree,adaedl,ddd --batch-sizes 1,16 --temperatures 0 --new-tokens 64 --n-prompts 4 \
  --repeats 3 --baselines hf --hf-prompts 1 --out $OUT/quick 2>&1 | grep -v Loading | tee $OUT/quick.log
