#!/usr/bin/env python3
"""Turns the raw JSON lines of scripts/bench/{sft,rm,ppo}.sh into the Markdown of
docs/BENCHMARKS.md (stdlib only).

Each raw line: {"round", "tool", "config", "rc", "loadavg_before", "wall_s", "result"}; `result`
is the JSON line of `lorafit bench sft|rm|gemm --json`, scripts/bench/lorafit_ppo.py or the
matching scripts/bench/peft_*.py / torch_gemm.py (null when the run failed).

Step times pool every timed step of every round of a configuration: the cell is their median
[min-max]. Memory cells are the median [min-max] over the processes. Ratios are
lorafit / PEFT of the medians. FLOPs are counted as described in docs/BENCHMARKS.md (`flops_*`).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import add_run_args, machine, mib  # noqa: E402

# KoGPT2's shape (builtin:kogpt2-shape).
L, C, V = 12, 768, 51200
LIN = L * 12 * C * C  # frozen linear weights per token: c_attn 3C², attn c_proj C², c_fc 4C², mlp c_proj 4C²
HEAD = V * C
# LoRA (in + out) per block for each target name (PEFT suffix match: c_proj = attn.c_proj + mlp.c_proj).
LORA_IO = {"c_attn": C + 3 * C, "c_proj": (C + C) + (4 * C + C), "c_fc": C + 4 * C}


def lora_fwd(targets, tokens, r=8):
    return sum(2 * tokens * r * LORA_IO[t] * L for t in targets)


def attn_fwd(batch, seq):
    return L * 4 * batch * seq * seq * C  # QKᵀ and AV over the full square


def flops_sft(targets, batch, seq):
    """Useful FLOPs of one SFT step: forward + input-gradient backward of the frozen GEMMs
    (no weight gradients), the LM head on the B·(T-1) labelled positions, attention (backward
    2x forward), LoRA (backward 2x forward). Recomputation under checkpointing is not counted."""
    tokens, labelled = batch * seq, batch * (seq - 1)
    dense = 2 * tokens * LIN + 2 * labelled * HEAD
    return 2 * dense + 3 * attn_fwd(batch, seq) + 3 * lora_fwd(targets, tokens)


def flops_rm(targets, pairs, seq):
    tokens = 2 * pairs * seq
    return 2 * (2 * tokens * LIN) + 3 * attn_fwd(2 * pairs, seq) + 3 * lora_fwd(targets, tokens)


def secs(x):
    return f"{x:.2f}"


def gf(x):
    return f"{x:.0f}"


def cell(vals, fmt):
    if not vals:
        return "failed"
    m = statistics.median(vals)
    if len(vals) == 1 or min(vals) == max(vals):
        return fmt(m)
    return f"{fmt(m)} [{fmt(min(vals))}-{fmt(max(vals))}]"


def ratio(a, b, bold=False):
    if not a or not b:
        return "-"
    s = f"{statistics.median(a) / statistics.median(b):.2f}"
    return f"**{s}**" if bold else s


def header(a, rows, what):
    ok = [r for r in rows if r["result"]]
    rounds = max((r["round"] for r in rows), default=0)
    versions = "torch ?, transformers ?, peft ?"
    for r in ok:
        if r["tool"] == "peft":
            versions = f"torch {r['result']['torch']}, transformers {r['result']['transformers']}, peft {r['result']['peft']}"
    out = [
        f"Command: `{a.command}` ({rounds} rounds, {what}, each tool in a fresh process per configuration, "
        f"interleaved; {a.threads} threads each; {a.elapsed_s / 60:.1f} min in all)  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Machine: {machine()}  ",
        f"Software: {a.lorafit_version} (git {a.git}), {a.rustc}, candle-core {a.candle}; "
        f"{versions} ({a.attn} attention), Python {platform.python_version()}  ",
    ]
    loads = [r["loadavg_before"] for r in rows]
    if loads:
        out.append(f"Background load (1-min load average before each process): median {statistics.median(loads):.2f}, "
                   f"max {max(loads):.2f}")
    return out


def failed_line(rows):
    failed = [r for r in rows if not r["result"]]
    if not failed:
        return []
    return ["", "Failed runs: " + "; ".join(f"round {r['round']} {r['tool']} {json.dumps(r['config'])} (exit {r['rc']})" for r in failed)]


def gemm_table(rows):
    g = [r for r in rows if r["config"].get("kind") == "gemm" and r["result"]]
    if not g:
        return [], {}, {}
    out = ["| GEMM 2048 x 768 x 3072, f32 | layout | GFLOP/s, median of 30 calls [min-max over rounds] | best single call, GFLOP/s |",
           "|---|---|---|---|"]
    ceil, top = {}, {}
    for tool, name in (("lorafit", "candle (`lorafit bench gemm`)"), ("torch", "torch (`scripts/bench/torch_gemm.py`)")):
        for layout in ("nn", "nt"):
            med = [r["result"]["gflops_median"] for r in g if r["tool"] == tool and r["result"]["layout"] == layout]
            best = [r["result"]["gflops_best"] for r in g if r["tool"] == tool and r["result"]["layout"] == layout]
            if med:
                out.append(f"| {name} | {layout} | {cell(med, gf)} | {max(best):.0f} |")
                ceil.setdefault(tool, []).extend(med)
                top[tool] = max(top.get(tool, 0), max(best))
    return out, {k: statistics.median(v) for k, v in ceil.items()}, top


def steps_of(rows, tool, pred):
    out = []
    for r in rows:
        if r["tool"] == tool and r["result"] and pred(r["config"]):
            out.extend(r["result"]["step_s_all"])
    return out


def vals_of(rows, tool, pred, f):
    return [f(r["result"]) for r in rows if r["tool"] == tool and r["result"] and pred(r["config"])]


def train_tables(a, rows, kind):
    """SFT and RM: step time, memory, FLOP rates."""
    cfgs = []
    for r in rows:
        c = r["config"]
        if c.get("kind") == kind and c not in cfgs:
            cfgs.append(c)
    plain = [c for c in cfgs if not c["gc"]]
    gc = [c for c in cfgs if c["gc"]]

    def label(c):
        t = "all linear (c_attn, c_proj, c_fc)" if "," in c["targets"] else c["targets"]
        shape = f"{c['batch']} x {c['seq']}" if kind == "sft" else f"{c['pairs']} pairs x {c['seq']}"
        return f"r=8 on {t}, {shape}"

    def same(c):
        return lambda x: x == c

    lines = ["| measurement | configuration | lorafit | PEFT | lorafit / PEFT |", "|---|---|---|---|---|"]
    p = lines.append
    for title, group in (("step time, s", plain), ("step time, s, **both with checkpointing**", gc)):
        for c in group:
            lv, tv = steps_of(rows, "lorafit", same(c)), steps_of(rows, "peft", same(c))
            p(f"| {title} | {label(c)} | {cell(lv, secs)} | {cell(tv, secs)} | {ratio(lv, tv, True)} |")
    # The least-disturbed step of each tool: on a shared box, the closest to what each does alone.
    for title, group in (("fastest step, s", plain), ("fastest step, s, both with checkpointing", gc)):
        for c in group:
            lv, tv = steps_of(rows, "lorafit", same(c)), steps_of(rows, "peft", same(c))
            if lv and tv:
                p(f"| {title} | {label(c)} | {min(lv):.2f} | {min(tv):.2f} | {min(lv) / min(tv):.2f} |")
    k = "peak_rss_bytes"
    for title, group in (("peak RSS, whole process, MiB", plain), ("peak RSS, whole process, MiB, **both with checkpointing**", gc)):
        for c in group:
            lv, tv = vals_of(rows, "lorafit", same(c), lambda x: x[k]), vals_of(rows, "peft", same(c), lambda x: x[k])
            p(f"| {title} | {label(c)} | {cell(lv, mib)} | {cell(tv, mib)} | {ratio(lv, tv, True)} |")
    f_added = lambda x: x["peak_rss_bytes"] - x["peak_rss_before_load_bytes"]
    for title, group in (("peak RSS added by load + training, MiB", plain), ("peak RSS added by load + training, MiB, both with checkpointing", gc)):
        for c in group:
            lv, tv = vals_of(rows, "lorafit", same(c), f_added), vals_of(rows, "peft", same(c), f_added)
            p(f"| {title} | {label(c)} | {cell(lv, mib)} | {cell(tv, mib)} | {ratio(lv, tv)} |")
    anyc = lambda c: c.get("kind") == kind
    for title, key in (("peak RSS before loading (runtime + libraries), MiB", "peak_rss_before_load_bytes"),
                       ("peak RSS after loading (+ adapter), MiB", "rss_after_load_bytes")):
        lv, tv = vals_of(rows, "lorafit", anyc, lambda x: x[key]), vals_of(rows, "peft", anyc, lambda x: x[key])
        p(f"| {title} | all | {cell(lv, mib)} | {cell(tv, mib)} | {ratio(lv, tv)} |")
    if gc:
        # Not like with like, labelled as such: what checkpointing buys lorafit against PEFT's default.
        for c in gc:
            cp = dict(c, gc=False)
            lv = vals_of(rows, "lorafit", same(c), lambda x: x[k])
            tv = vals_of(rows, "peft", same(cp), lambda x: x[k])
            p(f"| peak RSS, MiB: lorafit **with** checkpointing vs PEFT **without** (not like with like) | {label(c)} | "
              f"{cell(lv, mib)} | {cell(tv, mib)} | {ratio(lv, tv)} |")
    # FLOP rates
    gemm_lines, ceil, best = gemm_table(rows)
    fl = []
    if kind in ("sft", "rm"):
        fl = ["| configuration | GFLOP per step (counted) | lorafit GFLOP/s at the median step (of candle's median GEMM) "
              "| lorafit GFLOP/s at its fastest step (of candle's best GEMM) | PEFT GFLOP/s at the median step (of torch's "
              "median GEMM) | PEFT GFLOP/s at its fastest step (of torch's best GEMM) |",
              "|---|---|---|---|---|---|"]
        for c in plain + gc:
            targets = c["targets"].split(",")
            n = flops_sft(targets, c["batch"], c["seq"]) if kind == "sft" else flops_rm(targets, c["pairs"], c["seq"])
            lv, tv = steps_of(rows, "lorafit", same(c)), steps_of(rows, "peft", same(c))
            if not (lv and tv):
                continue
            lr, tr = n / statistics.median(lv) / 1e9, n / statistics.median(tv) / 1e9
            lb, tb = n / min(lv) / 1e9, n / min(tv) / 1e9
            pct = lambda x, t: f"{100 * x / ceil[t]:.0f}%" if t in ceil else "-"
            pctb = lambda x, t: f"{100 * x / best[t]:.0f}%" if t in best else "-"
            lab = label(c) + (", both with checkpointing (recompute not counted)" if c["gc"] else "")
            fl.append(f"| {lab} | {n / 1e9:.0f} | {lr:.0f} ({pct(lr, 'lorafit')}) | {lb:.0f} ({pctb(lb, 'lorafit')}) "
                      f"| {tr:.0f} ({pct(tr, 'torch')}) | {tb:.0f} ({pctb(tb, 'torch')}) |")
    return lines, gemm_lines, fl


def ppo_tables(rows):
    ok = [r for r in rows if r["result"] and r["config"].get("kind") == "ppo"]
    lines = ["| measurement (second iteration of each process) | lorafit | PEFT | lorafit / PEFT |", "|---|---|---|---|"]
    p = lines.append
    phases = ("generate", "score", "logprobs", "update")
    last = lambda r: r["result"]["iterations"][-1]
    for ph in phases:
        lv = [last(r)[f"time_{ph}_s"] for r in ok if r["tool"] == "lorafit"]
        tv = [last(r)[f"time_{ph}_s"] for r in ok if r["tool"] == "peft"]
        p(f"| {ph}, s | {cell(lv, secs)} | {cell(tv, secs)} | {ratio(lv, tv)} |")
    tot = lambda r: sum(last(r)[f"time_{ph}_s"] for ph in phases)
    lv = [tot(r) for r in ok if r["tool"] == "lorafit"]
    tv = [tot(r) for r in ok if r["tool"] == "peft"]
    p(f"| **total (one iteration)**, s | {cell(lv, secs)} | {cell(tv, secs)} | {ratio(lv, tv, True)} |")
    first = lambda r: sum(r["result"]["iterations"][0][f"time_{ph}_s"] for ph in phases)
    lv1 = [first(r) for r in ok if r["tool"] == "lorafit"]
    tv1 = [first(r) for r in ok if r["tool"] == "peft"]
    p(f"| total of the first iteration (with warm-up), s | {cell(lv1, secs)} | {cell(tv1, secs)} | {ratio(lv1, tv1)} |")
    lv = [r["result"]["peak_rss_bytes"] for r in ok if r["tool"] == "lorafit"]
    tv = [r["result"]["peak_rss_bytes"] for r in ok if r["tool"] == "peft"]
    p(f"| **peak RSS, whole process**, MiB | {cell(lv, mib)} | {cell(tv, mib)} | {ratio(lv, tv, True)} |")
    tvb = [r["result"]["peak_rss_bytes"] - r["result"]["peak_rss_before_load_bytes"] for r in ok if r["tool"] == "peft"]
    tb = [r["result"]["peak_rss_before_load_bytes"] for r in ok if r["tool"] == "peft"]
    p(f"| peak RSS before loading (runtime + libraries), MiB | see note | {cell(tb, mib)} | - |")
    p(f"| peak RSS added by load + PPO, MiB | see note | {cell(tvb, mib)} | - |")
    pss = [r["result"].get("end_pss_bytes") for r in ok if r["tool"] == "peft" and r["result"].get("end_pss_bytes")]
    if pss:
        p(f"| PEFT process at the end: Pss (shared file pages split), MiB | - | {cell(pss, mib)} | - |")
    rl = [last(r)["response_len"] for r in ok if r["tool"] == "lorafit"]
    rt = [last(r)["response_len"] for r in ok if r["tool"] == "peft"]
    p(f"| response length, tokens | {cell(rl, lambda x: f'{x:.0f}')} | {cell(rt, lambda x: f'{x:.0f}')} | - |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["sft", "rm", "ppo"])
    ap.add_argument("raw")
    add_run_args(ap)
    ap.add_argument("--attn", default="sdpa")
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.raw) if l.strip()]
    n = next((len(r["result"]["step_s_all"]) for r in rows if r["result"] and "step_s_all" in r["result"]), "?")
    it = next((len(r["result"]["iterations"]) for r in rows if r["result"] and "iterations" in r["result"]), "?")
    what = f"{it} iterations per process" if a.kind == "ppo" else f"1 warm-up + {n} timed steps per process"
    out = header(a, [r for r in rows if r["config"].get("kind") != "gemm"], what)
    out.append("")
    if a.kind == "ppo":
        out += ppo_tables(rows)
        out.append("")
        out.append("Cells: median over processes [min-max]; ratio = lorafit / PEFT of the medians (below 1: lorafit "
                   "faster / smaller).")
    else:
        lines, gemm_lines, fl = train_tables(a, rows, a.kind)
        out += lines
        out.append("")
        out.append("Step = forward + backward + AdamW update. Step-time cells: median of all timed steps of all rounds "
                   "[min-max]; memory cells: median over processes [min-max]; ratio = lorafit / PEFT of the medians "
                   "(below 1: lorafit faster / smaller).")
        if gemm_lines:
            out += ["", *gemm_lines]
        if fl:
            out += ["", *fl]
    out += failed_line(rows)
    print("\n".join(out))


if __name__ == "__main__":
    main()
