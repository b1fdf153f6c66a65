#!/usr/bin/env python3
"""Turns the raw JSON lines of scripts/bench/families_sft.sh into the Markdown of
docs/BENCHMARKS.md, "Model families" (stdlib only): per shape, step time and peak RSS of
lorafit and PyTorch + PEFT, and their ratios (lorafit / PEFT of the medians)."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import add_run_args, cell, mib, ratio  # noqa: E402
from summarize_train import failed_line, header  # noqa: E402

TARGETS = {"step": 0.8, "memory": 0.5}  # the targets: lorafit / PEFT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    add_run_args(ap)
    ap.add_argument("--attn", default="sdpa")
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.raw) if l.strip()]
    n = next((len(r["result"]["step_s_all"]) for r in rows if r["result"]), "?")
    out = header(a, rows, f"1 warm-up + {n} timed steps per process")
    out += ["", "| shape | tool | step s | peak RSS MiB | step ratio | memory ratio |", "|---|---|---:|---:|---:|---:|"]
    keys = dict.fromkeys((r["config"]["shape"], r["config"].get("grad_checkpointing", False)) for r in rows)
    for shape, ck in keys:
        got = {}
        for tool in ("lorafit", "peft"):
            ok = [r["result"] for r in rows if (r["config"]["shape"], r["config"].get("grad_checkpointing", False)) == (shape, ck)
                  and r["tool"] == tool and r["result"]]
            got[tool] = ([s for x in ok for s in x["step_s_all"]], [x["peak_rss_bytes"] for x in ok if x.get("peak_rss_bytes")])
        (ls, lm), (ps, pm) = got["lorafit"], got["peft"]
        cfg = next(r["config"] for r in rows if r["config"]["shape"] == shape)
        what = f"{shape} ({cfg['batch']} x {cfg['seq']}, LoRA r{cfg['r']} {cfg['targets']}{', both with checkpointing' if ck else ''})"
        out.append(f"| {what} | lorafit | {cell(ls, lambda x: f'{x:.2f}')} | {cell(lm, mib)} | {ratio(ls, ps)} (target <= {TARGETS['step']}) | {ratio(lm, pm)} (target <= {TARGETS['memory']}) |")
        out.append(f"| | PyTorch + PEFT | {cell(ps, lambda x: f'{x:.2f}')} | {cell(pm, mib)} | | |")
        if ck:
            plain_p = [r["result"] for r in rows if r["config"]["shape"] == shape and not r["config"].get("grad_checkpointing", False)
                       and r["tool"] == "peft" and r["result"]]
            if plain_p:
                ppm = [x["peak_rss_bytes"] for x in plain_p if x.get("peak_rss_bytes")]
                out.append(f"| {shape}: lorafit **with** checkpointing vs PEFT **without** (not like with like) | | | "
                           f"{cell(lm, mib)} vs {cell(ppm, mib)} | | {ratio(lm, ppm)} |")
    out += ["", "Step = forward + backward + AdamW update, f32, CPU. Step cells: median of all timed steps [min-max]; "
            "memory: median peak RSS over processes [min-max]; ratio = lorafit / PEFT of the medians."]
    out += failed_line(rows)
    print("\n".join(out))


if __name__ == "__main__":
    main()
