#!/usr/bin/env python3
"""The Markdown section of docs/BENCHMARKS.md "GRPO" from scripts/bench/grpo.sh's raw JSON
Lines: per round, lorafit's last iteration (sum of its phases) and TRL's last step, medians
over rounds, the ratios against the targets (time <= 0.5x, peak memory <= 0.4x), the machine.

Usage: summarize_grpo.py RAW.jsonl --command CMD --lorafit-version V --git G
"""
import argparse
import json
import platform
import statistics
import subprocess

PHASES = ("time_generate_s", "time_reward_s", "time_reference_s", "time_update_s")


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--command", required=True)
    ap.add_argument("--lorafit-version", default="")
    ap.add_argument("--git", default="")
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.raw) if l.strip()]
    lf, trl, loads = [], [], []
    for r in rows:
        loads.append(r["loadavg_before"])
        res = r.get("result")
        if not res:
            continue
        if r["tool"] == "lorafit":
            it = res["iterations"][-1]
            lf.append({"round": r["round"], "s": sum(it[k] for k in PHASES), **{k: it[k] for k in PHASES},
                       "len": it["completion_len"], "rss": res["peak_rss_bytes"], "load": r["loadavg_before"]})
        else:
            g, ro = (res.get("generate_s") or [None])[-1], (res.get("rollout_s") or [None])[-1]
            trl.append({"round": r["round"], "s": res["step_s"][-1], "gen": g, "ro": ro, "len": res["completion_len"][-1] if res["completion_len"] else None,
                        "rss": res["peak_rss_bytes"], "rss0": res["peak_rss_before_load_bytes"], "load": r["loadavg_before"],
                        "versions": res["versions"]})
    mib = lambda b: b / 2**20
    w = print
    cpu = sh("lscpu | grep -E 'Model name|CPU family' | sed 's/  */ /g' | tr '\\n' ';'")
    w(f"Command: `{a.command}`  ")
    w(f"Machine: {cpu} {platform.system()} {platform.release()}; load averages before each process: "
      f"{', '.join(f'{x:.2f}' for x in loads)} (median {statistics.median(loads):.2f}); `uptime` at the end: {sh('uptime')}  ")
    if trl:
        w(f"lorafit {a.lorafit_version} ({a.git}); {json.dumps(trl[0]['versions'])}\n")
    w("| round | tool | iteration s | generate | reward | reference | update | completion len | peak RSS MiB | load before |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for x in sorted(lf + trl, key=lambda x: (x["round"], "rss0" in x)):
        if "rss0" in x:
            ph = f"{x['gen']:.2f} | {x['ro'] - x['gen']:.2f} (reward + reference) | - | {x['s'] - x['ro']:.2f}" if x["gen"] is not None else "- | - | - | -"
            w(f"| {x['round']} | TRL | {x['s']:.2f} | {ph} | {x['len']} | {mib(x['rss']):.0f} (after imports {mib(x['rss0']):.0f}) | {x['load']:.2f} |")
        else:
            w(f"| {x['round']} | lorafit | {x['s']:.2f} | " + " | ".join(f"{x[k]:.2f}" for k in PHASES) + f" | {x['len']:.0f} | {mib(x['rss']):.0f} | {x['load']:.2f} |")
    if lf and trl:
        t = statistics.median(x["s"] for x in lf) / statistics.median(x["s"] for x in trl)
        m = statistics.median(x["rss"] for x in lf) / statistics.median(x["rss"] for x in trl)
        m0 = statistics.median(x["rss"] for x in lf) / statistics.median(x["rss"] - x["rss0"] for x in trl)
        w(f"\nMedian ratios lorafit / TRL: iteration time **{t:.2f}x** (target <= 0.5x: {'met' if t <= 0.5 else 'missed'}), "
          f"peak RSS **{m:.2f}x** (target <= 0.4x: {'met' if m <= 0.4 else 'missed'}); lorafit's whole peak against TRL's "
          f"peak above its imports: {m0:.2f}x.")


if __name__ == "__main__":
    main()
