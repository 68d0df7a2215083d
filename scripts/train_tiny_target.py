"""Train the small target the repo ships (models/pycoder-tiny) from scratch on local Python sources.

A 4-layer Llama (hidden 192, GQA 6/2 heads, MLP 512) with the pycoder tokenizer (8192 tokens), so
the quickstart runs with no network and no ../shared. Held-out files (shared README's rule) are
left out. Meant for one GPU; it runs on CPU too, slowly.

    python scripts/train_tiny_target.py --tokenizer ../shared/models/pycoder-22m \
        --corpus '/usr/lib/python3*/**/*.py' --out models/pycoder-tiny --max-seconds 150
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaspec_worker.train.corpus import load_tokenizer, read_texts, split, token_blocks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="directory holding tokenizer.json / tokenizer_config.json")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-seconds", type=float, default=150)
    ap.add_argument("--max-files", type=int, default=12000)
    args = ap.parse_args()

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tok = load_tokenizer(args.tokenizer)
    t0 = time.time()
    texts, info = read_texts(args.corpus, max_files=args.max_files)
    blocks = token_blocks(texts, tok, args.seq_len + 1)
    train, val = split(blocks)
    info.update(tokens=int(blocks.numel()), prepare_seconds=round(time.time() - t0, 1))
    print(json.dumps(info), flush=True)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    t_train, step, losses = time.time(), 0, []
    while step < args.steps and time.time() - t_train < args.max_seconds:
        frac = max(step / args.steps, (time.time() - t_train) / args.max_seconds)  # steps or time budget
        lr = args.lr * min(1, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        ids = train[torch.randint(0, train.shape[0], (args.batch_size,), generator=g)].to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            losses.append(round(loss.item(), 3))
            print(f"step {step} loss {losses[-1]} {time.time() - t_train:.0f}s", flush=True)
    model.eval()
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        vl = sum(
            model(input_ids=val[i : i + 32].to(dev), labels=val[i : i + 32].to(dev)).loss.item()
            for i in range(0, min(len(val), 256), 32)
        ) / len(range(0, min(len(val), 256), 32))
    model.to(torch.bfloat16).save_pretrained(args.out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.tokenizer, f), args.out)
    report = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "train_seconds": round(time.time() - t_train, 1),
        "tokens_seen": step * args.batch_size * args.seq_len,
        "loss_curve": losses,
        "holdout_loss": round(vl, 4),
        "corpus": info,
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "args": vars(args),
    }
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
