#!/usr/bin/env bash
# The benchmark committed under bench/results/: pycoder-22m + its trained head and LDLP on one GPU.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 scripts/model_command.py bench --target .kit/pycoder-22m --draft heads/pycoder-22m-eagle \
  --ldlp heads/pycoder-22m-ldlp --draft-model models/pycoder-tiny --prompts .kit/code-prompts.parquet \
  --methods "eagle:k=4,eagle-tree,eagle2,eagle2:depth=4:total_tokens=30,eagle2:depth=8:total_tokens=80,draft-model:k=4,adaeagle,adaeagle-ddd,adaedl,ldlp-tree,ddd,opt-tree,oracle" \
  --batch-sizes 1,4,16,64 --temperatures 0,0.7 --new-tokens 128 --n-prompts 4 --repeats 3 --hf-prompts 1 \
  --out $OUT/bench 2>&1 | grep -v "Loading weights" | tee $OUT/bench.log
