#!/usr/bin/env python3
"""Turns merge.sh's raw JSON lines into the Markdown of docs/BENCHMARKS.md's "Merge" section.

Raw lines: {"round", "tool": "lorafit"|"peft", "rc", "loadavg_before", "wall_s", "maxrss_bytes"
(/usr/bin/time), "result" (lorafit merge's JSON report / peft_merge.py's line, null if failed)};
{"round", "tool": "lorafit-version", "maxrss_bytes"}; {"tool": "check", "adapter", "result"}
(merge_check.py). Cells: median over rounds [min-max]; ratio lorafit / PEFT of the medians.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import add_run_args, cell, machine, mib, ratio  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    add_run_args(ap, "scripts/bench/merge.sh")
    a = ap.parse_args()

    rows = [json.loads(l) for l in open(a.raw) if l.strip()]
    runs = [r for r in rows if r["tool"] in ("lorafit", "peft")]
    ok = [r for r in runs if r["result"]]
    failed = [r for r in runs if not r["result"]]
    rounds = max((r["round"] for r in runs), default=0)
    check = next((r for r in rows if r["tool"] == "check"), None)
    versions = "torch ?, transformers ?, peft ?"
    for r in ok:
        if r["tool"] == "peft":
            res = r["result"]
            versions = f"torch {res['torch']}, transformers {res['transformers']}, peft {res['peft']}"

    def vals(tool, f):
        return [f(r) for r in ok if r["tool"] == tool]

    secs = lambda x: f"{x:.2f}"
    lines = []
    p = lines.append
    p(f"Command: `{a.command}` ({rounds} rounds, each tool in a fresh process per round, interleaved; "
      f"{a.threads} threads each; {a.elapsed_s / 60:.1f} min in all)  ")
    p(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    p(f"Machine: {machine()}  ")
    p(f"Software: {a.lorafit_version} (git {a.git}), {a.rustc}, candle-core {a.candle}; {versions}, "
      f"Python {platform.python_version()}  ")
    loads = [r["loadavg_before"] for r in runs]
    if loads:
        p(f"Background load (1-min load average before each run): median {statistics.median(loads):.2f}, "
          f"max {max(loads):.2f}")
    p("")
    p("| measurement | lorafit | PEFT | lorafit / PEFT |")
    p("|---|---|---|---|")

    def row(name, lv, pv, fmt, bold=False):
        rt = ratio(lv, pv)
        p(f"| {name} | {cell(lv, fmt)} | {cell(pv, fmt)} | {f'**{rt}**' if bold else rt} |")

    row("merge time, whole process (wall), s", vals("lorafit", lambda r: r["wall_s"]), vals("peft", lambda r: r["wall_s"]), secs, True)
    row("merge time, in process (load to written + fsync'ed; imports excluded), s",
        vals("lorafit", lambda r: r["result"]["seconds"]), vals("peft", lambda r: r["result"]["seconds"]), secs)
    row("peak RSS, whole process, MiB", vals("lorafit", lambda r: r["maxrss_bytes"]), vals("peft", lambda r: r["maxrss_bytes"]), mib, True)
    before_l = [r["maxrss_bytes"] for r in rows if r["tool"] == "lorafit-version"]
    before_p = vals("peft", lambda r: r["result"]["peak_rss_before_load_bytes"])
    row("peak RSS before loading (runtime + libraries), MiB", before_l, before_p, mib)
    bl = statistics.median(before_l) if before_l else 0
    row("peak RSS added by the merge, MiB", vals("lorafit", lambda r: r["maxrss_bytes"] - bl),
        vals("peft", lambda r: r["maxrss_bytes"] - r["result"]["peak_rss_before_load_bytes"]), mib)
    p("")
    ph = ["import_s", "load_s", "adapter_s", "merge_s", "cast_s", "save_s", "fsync_s"]
    pv = {k: vals("peft", lambda r, k=k: r["result"][k]) for k in ph}
    if all(pv.values()):
        p("PEFT's phases (medians, s): " + ", ".join(f"{k.removesuffix('_s')} {statistics.median(v):.2f}" for k, v in pv.items())
          + f"; peak RSS after loading base + adapter {mib(statistics.median(vals('peft', lambda r: r['result']['peak_rss_after_load_bytes'])))} MiB.")
    lr = next((r["result"] for r in ok if r["tool"] == "lorafit"), None)
    if lr:
        p(f"Output of either tool: {lr['tensors']} tensors ({lr['merged_tensors']} merged), "
          f"{lr['bytes'] / 2**20:,.0f} MiB of {lr['dtype']} in {', '.join(lr['files'])}. "
          "Peak RSS: the process's high-water mark (`/usr/bin/time` %M); lorafit's before-loading row is "
          "`lorafit --version` (the binary and its runtime), PEFT's is ru_maxrss after `import torch, transformers, peft`.")
    if check and check["result"]:
        c, ad = check["result"], check.get("adapter") or {}
        L, P = c["lorafit"], c["peft"]
        p("")
        p(f"Agreement (`merge_check.py compare`, last round's outputs; adapter r {ad.get('r', '?')}, alpha "
          f"{ad.get('lora_alpha', '?')}, {c['adapter_modules']} modules, max |scale * B A| = {c['max_delta_abs']:.2e}): "
          f"{c['common_tensors']} tensors in common (lorafit {L['tensors']} {'/'.join(L['dtypes'])}, PEFT {P['tensors']} "
          f"{'/'.join(P['dtypes'])}{'; missing in PEFT: ' + ', '.join(P['missing']) if P['missing'] else ''}); "
          f"max |lorafit - PEFT| = {c['lorafit_vs_peft_max_abs_merged']:.3g} over the merged tensors, "
          f"{c['lorafit_vs_peft_max_abs_all']:.3g} over all; {c['lorafit_vs_peft_elems_differing']:,} of "
          f"{c['elems']:,} values differ. Against a float64 merge: max error lorafit {L['merged_max_abs_vs_f64']:.3g}, "
          f"PEFT {P['merged_max_abs_vs_f64']:.3g} (merged tensors); values not equal to the float64 merge rounded once "
          f"to f16: lorafit {L['merged_elems_not_f64_rounded_once']:,}, PEFT {P['merged_elems_not_f64_rounded_once']:,} "
          f"of {L['merged_elems']:,}; copied tensors: lorafit {L['copied_elems_not_f64_rounded_once']:,}, "
          f"PEFT {P['copied_elems_not_f64_rounded_once']:,} differ.")
    if failed:
        p("")
        p("Failed runs: " + "; ".join(f"round {r['round']} {r['tool']} (exit {r['rc']})" for r in failed))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
