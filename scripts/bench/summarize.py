#!/usr/bin/env python3
"""Turns foundation.sh's raw JSON lines into the Markdown of docs/BENCHMARKS.md (stdlib only).

Each raw line: {"round", "tool", "dtype", "batch", "rc", "loadavg_before", "wall_s", "result"},
`result` being the JSON line of `lorafit bench generate --json` or scripts/bench/hf_generate.py
(null when the run failed). Figures are medians over the runs of a configuration, with [min-max];
ratios are lorafit / transformers of those medians.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess

TOOLS = ("lorafit", "transformers")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
    return f"{model}, {os.cpu_count()} cores, {mem}, Linux {platform.release()}"


def add_run_args(ap, command_default=None) -> None:
    """What every summary's header says about the run (passed by the bench scripts)."""
    if command_default is None:
        ap.add_argument("--command", required=True)
    else:
        ap.add_argument("--command", default=command_default)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--elapsed-s", type=int, default=0)
    ap.add_argument("--lorafit-version", default="lorafit ?")
    ap.add_argument("--git", default="?")
    ap.add_argument("--rustc", default="?")
    ap.add_argument("--candle", default="?")


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def cell(vals, fmt) -> str:
    if not vals:
        return "failed"
    m = statistics.median(vals)
    if len(vals) == 1 or min(vals) == max(vals):
        return fmt(m)
    return f"{fmt(m)} [{fmt(min(vals))}-{fmt(max(vals))}]"


def ratio(a, b) -> str:
    if not a or not b:
        return "-"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    add_run_args(ap, "scripts/bench/foundation.sh")
    ap.add_argument("--attn", default="sdpa")
    a = ap.parse_args()

    rows = [json.loads(l) for l in open(a.raw) if l.strip()]
    ok = [r for r in rows if r["result"]]
    failed = [r for r in rows if not r["result"]]
    rounds = max((r["round"] for r in rows), default=0)
    versions = "torch ?, transformers ?"
    for r in ok:
        if r["tool"] == "transformers":
            versions = f"torch {r['result']['torch']}, transformers {r['result']['transformers']}"

    def vals(tool, key, dtype=None, batch=None, f=None):
        out = []
        for r in ok:
            if r["tool"] == tool and (dtype is None or r["dtype"] == dtype) and (batch is None or r["batch"] == batch):
                try:
                    out.append(f(r["result"]) if f else r["result"][key])
                except KeyError:  # an older lorafit without this key
                    pass
        return out

    secs = lambda x: f"{x:.2f}"
    tps = lambda x: f"{x:.1f}"
    lines = []
    p = lines.append
    p(f"Command: `{a.command}` ({rounds} rounds, each tool in a fresh process per configuration, interleaved; "
      f"{a.threads} threads each; {a.elapsed_s / 60:.1f} min in all)  ")
    p(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    p(f"Machine: {machine()}  ")
    p(f"Software: {a.lorafit_version} (git {a.git}), {a.rustc}, candle-core {a.candle}; "
      f"{versions} ({a.attn} attention), Python {platform.python_version()}  ")
    loads = [r["loadavg_before"] for r in rows]
    if loads:
        p(f"Background load (1-min load average before each run): median {statistics.median(loads):.2f}, "
          f"max {max(loads):.2f}")
    p("")
    p("| measurement | configuration | lorafit | transformers | lorafit / transformers |")
    p("|---|---|---|---|---|")
    for dt in ("f32", "bf16"):
        p(f"| load time, s | {dt} weights | {cell(vals('lorafit', 'load_s', dt), secs)} | "
          f"{cell(vals('transformers', 'load_s', dt), secs)} | {ratio(vals('lorafit', 'load_s', dt), vals('transformers', 'load_s', dt))} |")
    for dt in ("f32", "bf16"):
        k = "peak_rss_after_load_bytes"
        p(f"| peak RSS after load, whole process, MiB | {dt} weights | {cell(vals('lorafit', k, dt), mib)} | "
          f"{cell(vals('transformers', k, dt), mib)} | {ratio(vals('lorafit', k, dt), vals('transformers', k, dt))} |")
    k = "peak_rss_before_load_bytes"
    p(f"| peak RSS before loading (runtime + libraries), MiB | - | {cell(vals('lorafit', k), mib)} | "
      f"{cell(vals('transformers', k), mib)} | {ratio(vals('lorafit', k), vals('transformers', k))} |")
    for dt in ("f32", "bf16"):
        f = lambda r: r["peak_rss_after_load_bytes"] - r["peak_rss_before_load_bytes"]
        lv, tv = vals("lorafit", None, dt, f=f), vals("transformers", None, dt, f=f)
        p(f"| peak RSS added by loading, MiB | {dt} weights | {cell(lv, mib)} | {cell(tv, mib)} | {ratio(lv, tv)} |")
    for dt in ("f32", "bf16"):
        for b in (1, 8):
            lv, tv = vals("lorafit", "tokens_per_s", dt, b), vals("transformers", "tokens_per_s", dt, b)
            p(f"| generation tokens/s | {dt}, batch {b} | {cell(lv, tps)} | {cell(tv, tps)} | "
              f"**{ratio(lv, tv)}** |")
    for dt in ("f32", "bf16"):
        for b in (1, 8):
            k = "peak_rss_bytes"
            lv, tv = vals("lorafit", k, dt, b), vals("transformers", k, dt, b)
            p(f"| peak RSS, load + generation, whole process, MiB | {dt}, batch {b} | {cell(lv, mib)} | {cell(tv, mib)} | {ratio(lv, tv)} |")
    for dt in ("f32", "bf16"):
        for b in (1, 8):
            f = lambda r: r["peak_rss_bytes"] - r["peak_rss_before_load_bytes"]
            lv, tv = vals("lorafit", None, dt, b, f=f), vals("transformers", None, dt, b, f=f)
            p(f"| peak RSS added by load + generation, MiB | {dt}, batch {b} | {cell(lv, mib)} | {cell(tv, mib)} | {ratio(lv, tv)} |")
    p("")
    p("Prompt: 16 random token ids per row; 64 new tokens, greedy, no early stop; tokens/s = batch x 64 / "
      "(median time of one generate call, prefill included). Cells: median over runs [min-max]; load rows pool "
      "both batch sizes. Ratio = lorafit / transformers of the medians: below 1 is better for times and memory, "
      "above 1 is better for tokens/s.")
    if failed:
        p("")
        p("Failed runs: " + "; ".join(f"round {r['round']} {r['tool']} {r['dtype']} batch {r['batch']} (exit {r['rc']})"
                                       for r in failed))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
