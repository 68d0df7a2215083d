"""`adarun bench --workload natural`: outputs of real, varied length, decoded with and without continuous
batching.

The fixed workload (`bench.py`) decodes exactly `new_tokens` per row with EOS ignored, so every row of
a batch finishes in the same round and idle batch slots never show. Here rows stop as a job's rows do:
at EOS, at a stop string (`NATURAL_STOPS`, those of `manifests/job.yaml`) or at `new_tokens`. Every
prompt of the cell decodes through `batch` slots in one engine call, once with refill on (a finished
row's slot takes the next prompt at once; a refill's prompts longer than `--prefill-chunk` prefill that many
positions per round, the slots they take frozen until then) and once with it off (the next `batch` prompts
start when the whole batch is done). Per cell: tokens/s, slot occupancy (share of slot-rounds doing useful work),
target passes, chunked-prefill passes, tau, the output length distribution, and refill on over off.

Knows nothing of the runner: prompts are token lists, stop strings go through the job's `RowCodec`.
"""
from __future__ import annotations

import statistics

from .decode.sampling import SamplingParams
from .decode.warmup import warm

NATURAL_STOPS = ("\ndef ", "\nclass ")  # manifests/job.yaml's stop strings: one function per completion


def length_summary(lengths: list[int], limit: int) -> dict:
    """The output length distribution of a cell: percentiles, and the share of rows that stopped early."""
    q = statistics.quantiles(lengths, n=10, method="inclusive") if len(lengths) > 1 else [lengths[0]] * 9
    return {"len_mean": statistics.fmean(lengths), "len_p10": q[0], "len_p50": q[4], "len_p90": q[8],
            "len_max": max(lengths), "stopped_early": sum(n < limit for n in lengths) / len(lengths)}


def natural_cells(cfg, engine, name: str, label: str, prompts: list[list[int]], tok, eos: tuple[int, ...], dev,
                  record, timed, cells: list[dict]) -> None:
    """One method's engine (`name`, its `label` with parameters) over every slot count and temperature, refill
    on and off; each cell goes to `record` (which appends it to `cells`)."""
    from .rows import RowCodec

    target = engine.target
    stop_fn = RowCodec(tok, list(NATURAL_STOPS), cfg.new_tokens, target.cfg.max_position_embeddings).stop_fn()
    seeds = list(range(len(prompts)))
    for T in cfg.temperatures:
        sampling = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=T, eos_token_ids=eos)
        for B in cfg.batch_sizes:
            tokens_by_refill = {}
            warmed = warm(engine, B, sampling, max(map(len, prompts)))  # every round shape compiled, captured, timed
            for refill in (True, False):
                calls: list[dict] = []

                def run(B=B, refill=refill, sampling=sampling, calls=calls):
                    outs, stats = engine.generate(prompts, sampling, seeds, stop_fn, slots=B, refill=refill,
                                                 prefill_chunk=cfg.prefill_chunk)
                    calls.append({"tokens": sum(len(o.tokens) for o in outs), "lengths": [len(o.tokens) for o in outs],
                                  "outputs": [o.tokens for o in outs], "stats": stats})
                    return calls[-1]

                res = timed(run, dev, cfg.repeats)
                stats, outputs = res.pop("stats"), res.pop("outputs")
                tokens_by_refill[refill] = outputs
                res["seconds"] -= stats.reference_seconds  # the oracle's reference verification is not charged
                res.update(length_summary(res.pop("lengths"), cfg.new_tokens), refill=refill, warm_seconds=warmed,
                           occupancy=stats.occupancy, rounds=stats.target_passes,
                           tau=stats.rows.tau if stats.rows.rounds else None, draft_seconds=stats.draft_seconds,
                           verify_seconds=stats.verify_seconds, other_seconds=stats.other_seconds,
                           prefill_seconds=stats.prefill_seconds, warmup_run_seconds=calls[0]["stats"].warmup_seconds,
                           prefill_chunk=cfg.prefill_chunk, prefill_chunks=stats.prefill_chunks)
                record(name, label, B, T, res, "natural")
            same = tokens_by_refill[True] == tokens_by_refill[False]
            for c in cells[-2:]:
                c["outputs_equal_on_off"] = same


def add_refill_ratios(cells: list[dict]) -> None:
    """Refill on over refill off, per natural cell (same method, slots and temperature)."""
    for c in cells:
        if c["kind"] != "natural":
            continue
        off = next((x for x in cells if x["kind"] == "natural" and not x["refill"] and x["label"] == c["label"]
                    and x["batch"] == c["batch"] and x["temperature"] == c["temperature"]), None)
        c["refill_speedup"] = c["tokens_per_s"] / off["tokens_per_s"] if off and c["refill"] else None


def natural_markdown(cells: list[dict]) -> list[str]:
    """The natural workload's table rows (empty when the run had none)."""
    nat = sorted((c for c in cells if c["kind"] == "natural"),
                 key=lambda c: (c["temperature"], c["batch"], c["label"], not c["refill"]))
    if not nat:
        return []
    lines = ["", "## Natural workload (EOS and stop strings on; one engine call per cell through `batch` slots)", "",
             "| method | slots | temp | refill | tok/s | refill on/off | occupancy | passes | prefill chunks | tau "
             "| out len p10/p50/p90/max | stopped early | same outputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in nat:
        ratio = "" if c.get("refill_speedup") is None else f"{c['refill_speedup']:.2f}"
        tau = "" if c["tau"] is None else f"{c['tau']:.2f}"
        lines.append(f"| {c['label']} | {c['batch']} | {c['temperature']} | {'on' if c['refill'] else 'off'} | "
                     f"{c['tokens_per_s']:.1f} | {ratio} | {c['occupancy']:.3f} | {c['rounds']} | "
                     f"{c.get('prefill_chunks', '')} | {tau} | "
                     f"{c['len_p10']:.0f}/{c['len_p50']:.0f}/{c['len_p90']:.0f}/{c['len_max']} | "
                     f"{c['stopped_early']:.2f} | {c['outputs_equal_on_off']} |")
    return lines
