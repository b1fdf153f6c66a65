#!/usr/bin/env python3
"""Runs `lorafit grpo` once (a fresh process) and prints one JSON line for
scripts/bench/summarize_grpo.py: the per-iteration phase times of its metrics.jsonl
(`time_generate_s`, `time_reward_s`, `time_reference_s`, `time_update_s`), completion lengths,
`peak_rss_bytes` of its summary.json, and the child's ru_maxrss as a cross-check (stdlib only).

Usage: lorafit_grpo.py LORAFIT_BIN OUT_DIR -- <lorafit grpo arguments, without --out>
"""
import json
import resource
import subprocess
import sys
from pathlib import Path


def main() -> None:
    lorafit, out = sys.argv[1], Path(sys.argv[2])
    assert sys.argv[3] == "--", __doc__
    cmd = [lorafit, "grpo", *sys.argv[4:], "--out", str(out), "--force"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    iters = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    summary = json.loads((out / "summary.json").read_text())
    keep = ("time_generate_s", "time_reward_s", "time_reference_s", "time_update_s", "completion_len",
            "loss", "kl_mean", "entropy", "peak_rss_after_generate_mib", "peak_rss_after_update_mib")
    print(json.dumps({
        "tool": "lorafit", "iterations": [{k: it.get(k) for k in keep} for it in iters],
        "peak_rss_bytes": summary["peak_rss_bytes"],
        "child_maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "command": " ".join(cmd[1:]),
    }))


if __name__ == "__main__":
    main()
