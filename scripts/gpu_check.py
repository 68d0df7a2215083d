"""GPU sanity check: the CUDA-graph fast path gives the eager path's tokens (greedy and sampled), per method."""
import sys

from adaspec_worker.train.corpus import load_tokenizer
from adaspec_worker.decode.engine import Engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams

target, head, ldlp, prompts_path = sys.argv[1:5]
import pyarrow.parquet as pq

tok = load_tokenizer(target)
tgt = load_target(target, dtype="float32")
prompts = [tok(t, add_special_tokens=False)["input_ids"][-300:] for t in pq.read_table(prompts_path).column("prompt").to_pylist()[:6]]
for method in ("none", "eagle2", "adaeagle", "adaedl", "ldlp-tree"):
    for sp in (SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40, temperature=0.7)):
        res = []
        for fast in (False, True):
            eng = Engine.load(tgt, method, {}, head, ldlp, fast=fast)
            outs = None
            for _ in range(3):  # third call replays graphs captured earlier
                outs, _ = eng.generate(prompts, sp, seeds=list(range(6)))
            res.append([o.tokens for o in outs])
        same = sum(a == b for a, b in zip(*res))
        print(f"{method:10s} T={sp.temperature}: fast==eager for {same}/6 rows, graphs captured: {len(eng.ws.graphs)}", flush=True)
