"""Quick eager-mode probe: tau and ms/token per method on a few benchmark prompts (greedy).

    python scripts/probe_tau.py TARGET HEAD PROMPTS.parquet [N] [NEW_TOKENS]
Prints one JSON line per method. `adarun bench` is the full benchmark; this is a smoke check.
"""
import json
import sys
import time

import pyarrow.parquet as pq
import torch

from adaspec_worker.train.corpus import load_tokenizer
from adaspec_worker.decode.engine import Engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams

target_dir, head, prompts = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 16
new = int(sys.argv[5]) if len(sys.argv) > 5 else 64
tok = load_tokenizer(target_dir)
tgt = load_target(target_dir)
rows = pq.read_table(prompts).column("prompt").to_pylist()[:n]
ids = [tok(r, add_special_tokens=False)["input_ids"][-400:] for r in rows]
sp = SamplingParams(max_new_tokens=new)
for method, params in [("none", {}), ("eagle", {"k": 4}), ("eagle-tree", {}), ("eagle2", {}), ("eagle2", {"depth": 8, "total_tokens": 40, "top_k": 8})]:
    eng = Engine.load(tgt, method, params, head)
    eng.generate(ids[:1], sp)  # warm-up
    if tgt.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    emitted, st_all = 0, None
    for p in ids:
        outs, st = eng.generate([p], sp)
        emitted += len(outs[0].tokens)
        st_all = st if st_all is None else (st_all.merge(st) or st_all)
    if tgt.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(json.dumps({"method": method, "params": params, "tau": round(st_all.seq.tau, 3), "ms_per_token": round(dt / emitted * 1e3, 3),
                      "draft_s": round(st_all.draft_s, 2), "verify_s": round(st_all.verify_s, 2), "other_s": round(st_all.other_s, 2),
                      "device": str(tgt.device)}), flush=True)
