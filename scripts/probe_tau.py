"""Quick eager-mode probe: tau and ms/token per method on a few benchmark prompts (greedy).

    python scripts/probe_tau.py TARGET HEAD PROMPTS.parquet [N] [NEW_TOKENS]
Prints one JSON line per method. `adarun bench` is the full benchmark; this is a smoke check.
"""

import json
import sys

import pyarrow.parquet as pq

from adaspec_worker.decode.build import build_engine
from adaspec_worker.decode.model import load_target
from adaspec_worker.decode.sampling import SamplingParams
from adaspec_worker.decode.stats import EngineStats
from adaspec_worker.timing import time_call
from adaspec_worker.train.corpus import load_tokenizer
from jobs.specs import parse_spec

target_dir, head, prompts = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 16
new = int(sys.argv[5]) if len(sys.argv) > 5 else 64
tok = load_tokenizer(target_dir)
tgt = load_target(target_dir)
rows = pq.read_table(prompts).column("prompt").to_pylist()[:n]
ids = [tok(r, add_special_tokens=False)["input_ids"][-400:] for r in rows]
sampling = SamplingParams(max_new_tokens=new)
METHODS = [
    ("none", {}),
    ("eagle", {"k": 4}),
    ("eagle-tree", {}),
    ("eagle2", {}),
    ("eagle2", {"depth": 8, "total_tokens": 40, "top_k": 8}),
]


def decode_all(eng):
    emitted, total = 0, EngineStats()
    for p in ids:
        outs, stats = eng.generate([p], sampling)
        emitted += len(outs[0].tokens)
        total = total + stats
    return emitted, total


for method, params in METHODS:
    eng = build_engine(tgt, parse_spec(method, params), draft=head)
    eng.generate(ids[:1], sampling)  # warm-up
    (emitted, total), seconds = time_call(lambda eng=eng: decode_all(eng), tgt.device)
    print(
        json.dumps(
            {
                "method": method,
                "params": params,
                "tau": round(total.rows.tau, 3),
                "ms_per_token": round(seconds / emitted * 1e3, 3),
                "draft_seconds": round(total.draft_seconds, 2),
                "verify_seconds": round(total.verify_seconds, 2),
                "other_seconds": round(total.other_seconds, 2),
                "device": str(tgt.device),
            }
        ),
        flush=True,
    )
