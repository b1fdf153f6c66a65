#!/usr/bin/env python3
"""Runs `lorafit ppo` once (a fresh process) and prints one JSON line with what
scripts/bench/summarize_train.py reads, in the shape of scripts/bench/peft_ppo.py's output:
the per-iteration phase times and response lengths of its metrics.jsonl (`time_generate_s`,
`time_score_s`, `time_logprobs_s`, `time_update_s`, `response_len`), `peak_rss_bytes` of its
summary.json, and the child's ru_maxrss as a cross-check (stdlib only).

Usage: lorafit_ppo.py LORAFIT_BIN OUT_DIR -- <lorafit ppo arguments, without --out>
"""
import json
import resource
import subprocess
import sys
from pathlib import Path


def main() -> None:
    lorafit, out = sys.argv[1], Path(sys.argv[2])
    assert sys.argv[3] == "--", __doc__
    cmd = [lorafit, "ppo", *sys.argv[4:], "--out", str(out), "--force"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    iters = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    summary = json.loads((out / "summary.json").read_text())
    keep = ("time_generate_s", "time_score_s", "time_logprobs_s", "time_update_s", "response_len",
            "policy_loss", "value_loss", "entropy", "kl_mean")
    print(json.dumps({
        "tool": "lorafit", "iterations": [{k: it.get(k) for k in keep} for it in iters],
        "peak_rss_bytes": summary["peak_rss_bytes"],
        "child_maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "command": " ".join(cmd[1:]),
    }))


if __name__ == "__main__":
    main()
