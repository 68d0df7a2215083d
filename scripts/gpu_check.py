"""GPU sanity check: the CUDA-graph fast path gives the eager path's tokens (greedy and sampled), per method.

python scripts/gpu_check.py TARGET HEAD LDLP PROMPTS.parquet
"""

import sys

import pyarrow.parquet as pq

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.train.corpus import load_tokenizer
from jobs.specs import parse_spec

target, head, ldlp, prompts_path = sys.argv[1:5]
tok = load_tokenizer(target)
tgt = load_target(target, dtype="float32")
texts = pq.read_table(prompts_path).column("prompt").to_pylist()[:6]
prompts = [tok(t, add_special_tokens=False)["input_ids"][-300:] for t in texts]
for method in ("none", "eagle2", "adaeagle", "adaedl", "ldlp-tree"):
    for sampling in (SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40, temperature=0.7)):
        res = []
        for fast in (False, True):
            eng = build_engine(tgt, parse_spec(method, {}), draft=head, ldlp=ldlp, fast=fast)
            outs = None
            for _ in range(3):  # third call replays graphs captured earlier
                outs, _ = eng.generate(prompts, sampling, seeds=list(range(6)))
            res.append([o.tokens for o in outs])
        same = sum(a == b for a, b in zip(*res))
        print(
            f"{method:10s} T={sampling.temperature}: fast==eager for {same}/6 rows, "
            f"graphs captured: {len(eng.workspace.graphs)}",
            flush=True,
        )
