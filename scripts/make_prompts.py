"""Build manifests/prompts.parquet: prefixes of this machine's standard-library Python files, each ending
right after a `def`/`class` header line (the shape of the benchmark prompts), with an `id` column.

    python scripts/make_prompts.py --out manifests/prompts.parquet --n 64
"""

import argparse
import glob
import hashlib
import random
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--n", type=int, default=64)
ap.add_argument("--max-chars", type=int, default=900)
args = ap.parse_args()
files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
random.Random(0).shuffle(files)
rows = []
for f in files:
    text = open(f, encoding="utf-8", errors="replace").read()
    lines = text.splitlines(keepends=True)
    heads = [
        i for i, ln in enumerate(lines) if ln.lstrip().startswith(("def ", "class ")) and ln.rstrip().endswith(":")
    ]
    if not heads:
        continue
    i = heads[len(heads) // 2]
    prompt = "".join(lines[: i + 1])[-args.max_chars :]
    rows.append({"id": hashlib.sha1(f"{f.rsplit('/', 1)[-1]}:{i}".encode()).hexdigest()[:12], "prompt": prompt})
    if len(rows) == args.n:
        break
pq.write_table(pa.Table.from_pylist(rows), args.out)
print(f"{len(rows)} prompts -> {args.out}")
