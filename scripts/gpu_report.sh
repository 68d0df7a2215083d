#!/usr/bin/env bash
# One GPU job over the benchmark prompts, then its cost report (issue: cost and speedup report).
set -uo pipefail
source .kit/device-kit/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
python3 -m adarun submit manifests/job.yaml --set input.path=.kit/code-prompts.parquet --set output.path=/tmp/gpu-job \
  --set name=benchmark-prompts-gpu --set resources.workers=1 --set resources.gpus_per_worker=1 --set resources.batch_size=16 \
  --set model.dtype=auto --set decoding.max_new_tokens=128 --set 'decoding.stop=[]' --set sharding.rows_per_shard=32 \
  --set baseline.sample_fraction=0.05 2>&1 | grep -v "Token auth"
python3 -m adarun status /tmp/gpu-job
python3 -m adarun report /tmp/gpu-job > /dev/null && cp /tmp/gpu-job/report/report.md /tmp/gpu-job/report/report.json /tmp/gpu-job/report/report.html $OUT/
cat $OUT/report.md
