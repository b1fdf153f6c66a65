#!/usr/bin/env python3
"""Runs `lorafit dpo` once (a fresh process) and prints one JSON line in the shape of
scripts/bench/trl_dpo.py's: the step times of its metrics.jsonl (`time_reference_s` +
`time_update_s` of each step; the first is the warm-up, the median of the others is reported),
`peak_rss_bytes` of its summary.json, and the child's ru_maxrss as a cross-check (stdlib only).

Usage: lorafit_dpo.py LORAFIT_BIN OUT_DIR -- <lorafit dpo arguments, without --out>
"""
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> None:
    lorafit, out = sys.argv[1], Path(sys.argv[2])
    assert sys.argv[3] == "--", __doc__
    cmd = [lorafit, "dpo", *sys.argv[4:], "--out", str(out), "--force"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    summary = json.loads((out / "summary.json").read_text())
    times = [s["time_reference_s"] + s["time_update_s"] for s in steps]
    timed = times[1:]
    print(json.dumps({
        "tool": "lorafit", "step_s_median": statistics.median(timed), "step_s_all": times,
        "reference_s_median": statistics.median(s["time_reference_s"] for s in steps[1:]),
        "update_s_median": statistics.median(s["time_update_s"] for s in steps[1:]),
        "losses": [s["loss"] for s in steps], "peak_rss_bytes": summary["peak_rss_bytes"],
        "child_maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "command": " ".join(cmd[1:]),
    }))


if __name__ == "__main__":
    main()
