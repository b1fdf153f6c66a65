#!/usr/bin/env python3
"""Results of scripts/gpu-bench.sh: `record` appends one JSON line per stage, `table` writes Markdown.

record --out results.jsonl --stage NAME --rc N --wall S [--baseline-mib M --samples FILE]
       [--stdout FILE] [--sft-metrics DIR --batch B --seq T] [--ppo-metrics DIR] [--set key=value ...]
  The stage's own JSON is the last stdout line that parses as a JSON object. GPU memory: the
  device's memory.used sampled by nvidia-smi every 100 ms while the stage ran; gpu_peak_mib is
  the highest sample minus the reading just before the process started (so: that process's whole
  GPU footprint, CUDA context included, as nvidia-smi sees it; short spikes between samples can be missed).
table --in results.jsonl --out results.md
"""
import argparse
import json
import statistics
import sys

GIB = 1024.0


def last_json(path):
    obj = None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{") and line.endswith("}"):
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        pass
    except OSError:
        pass
    return obj


def read_jsonl(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return rows


def record(a):
    r = {"stage": a.stage, "rc": a.rc, "wall_s": round(a.wall, 1)}
    for kv in a.set or []:
        k, _, v = kv.partition("=")
        try:
            r[k] = json.loads(v)
        except ValueError:
            r[k] = v
    if a.samples:
        vals = []
        try:
            with open(a.samples) as f:
                for line in f:
                    try:
                        vals.append(float(line.strip().split(",")[0]))
                    except ValueError:
                        pass
        except OSError:
            pass
        if vals:
            r["gpu_samples"] = len(vals)
            r["gpu_peak_total_mib"] = max(vals)
            if a.baseline_mib is not None:
                r["gpu_baseline_mib"] = a.baseline_mib
                r["gpu_peak_mib"] = max(vals) - a.baseline_mib
    if a.stdout:
        j = last_json(a.stdout)
        if j is not None:
            r["result"] = j
    if a.sft_metrics:
        m = read_jsonl(a.sft_metrics + "/metrics.jsonl")
        el = [x["elapsed_s"] for x in m if "elapsed_s" in x and "loss" in x]
        steps = [b - c for b, c in zip(el[1:], el[:-1])]  # drops the first (warm-up) step
        if steps:
            med = statistics.median(steps)
            r["result"] = {"tool": "lorafit", "method": "lorafit sft (metrics.jsonl elapsed_s deltas)",
                           "batch": a.batch, "seq": a.seq, "step_s_median": med, "step_s_all": steps,
                           "tokens_per_s": a.batch * a.seq / med, "losses": [x.get("loss") for x in m],
                           **(r.get("result") or {})}
    if a.ppo_metrics:
        m = read_jsonl(a.ppo_metrics + "/metrics.jsonl")
        its = []
        for x in m:
            parts = {k: x[k] for k in x if k.startswith("time_") and k.endswith("_s")}
            if parts:
                its.append({"step": x.get("step"), "total_s": sum(parts.values()), **parts,
                            "response_len": x.get("response_len")})
        if its:
            r["ppo_iterations"] = its
    with open(a.out, "a") as f:
        f.write(json.dumps(r) + "\n")
    print(json.dumps({k: v for k, v in r.items() if k not in ("result",)}))


def fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def gib(mib):
    return None if mib is None else mib / GIB


def table(a):
    rows = read_jsonl(a.inp)
    by = {r["stage"]: r for r in rows}
    out = []
    w = out.append
    setup = by.get("setup", {})
    w("# lorafit vs PyTorch + PEFT on one GPU (scripts/gpu-bench.sh)\n")
    for k in ("date", "gpu", "driver", "lorafit_build", "torch", "transformers", "peft"):
        if k in setup:
            w(f"- {k}: {setup[k]}")
    w("")
    w("GPU peak = the highest `nvidia-smi` memory.used sample (every 100 ms) while that process ran, minus the "
      "reading before it started: the process's whole footprint, CUDA context included, for both tools. "
      "torch's own counters (max reserved / max allocated) are given for PEFT as well. Steps: 1 warm-up, "
      "then the median of the timed steps.\n")

    w("## Stages\n")
    w("| stage | rc | wall s | GPU peak GiB | note |")
    w("|---|---|---|---|---|")
    for r in rows:
        note = r.get("note", "")
        w(f"| {r['stage']} | {r.get('rc')} | {fmt(r.get('wall_s'), 1)} | {fmt(gib(r.get('gpu_peak_mib')))} | {note} |")
    w("")

    def res(stage):
        return (by.get(stage) or {}).get("result") or {}

    def ok(stage):
        return stage in by and by[stage].get("rc") == 0 and res(stage)

    w("## SFT step: lorafit vs PEFT\n")
    w("| model | config | tool | step s | tokens/s | GPU peak GiB | torch max reserved / allocated GiB |")
    w("|---|---|---|---|---|---|---|")
    pairs = [("kogpt2", "KoGPT2 shape (125M)", "bf16, batch 8 x 512, LoRA r8 c_attn,c_proj,c_fc"),
             ("llama7b-f16", "LLaMA-7B shape (6.7B)", "f16 base, batch 1 x 512, checkpointing, LoRA r16 all 7 projections"),
             ("llama7b-nf4", "LLaMA-7B shape (6.7B)", "NF4 base, batch 1 x 512, checkpointing, LoRA r16 all 7 projections"),
             ("llama-3.2-1b", "Llama-3.2-1B shape (1.24B)", "bf16, batch 1 x 512, LoRA r16 all-linear"),
             ("qwen3-0.6b", "Qwen3-0.6B shape (0.60B)", "bf16, batch 1 x 512, LoRA r16 all-linear")]
    for key, name, cfg in pairs:
        for tool in ("lorafit", "peft"):
            st = f"{tool}-{key}"
            if st not in by:
                continue
            r, x = by[st], res(st)
            tr = x.get("torch_max_reserved_bytes")
            ta = x.get("torch_max_allocated_bytes")
            tt = "-" if tr is None else f"{tr / 2**30:.2f} / {ta / 2**30:.2f}"
            w(f"| {name} | {cfg} | {tool}{' (rc ' + str(r.get('rc')) + ')' if r.get('rc') else ''} | "
              f"{fmt(x.get('step_s_median'), 3)} | {fmt(x.get('tokens_per_s'), 0)} | {fmt(gib(r.get('gpu_peak_mib')))} | {tt} |")
    w("")

    w("## Targets\n")
    w("| target | measured | verdict |")
    w("|---|---|---|")
    if ok("lorafit-kogpt2") and ok("peft-kogpt2"):
        sp = res("lorafit-kogpt2")["tokens_per_s"] / res("peft-kogpt2")["tokens_per_s"]
        w(f"| KoGPT2 SFT tokens/s >= 1.3x PEFT | {sp:.2f}x | {'PASS' if sp >= 1.3 else 'FAIL'} |")
        lm, pm = by["lorafit-kogpt2"].get("gpu_peak_mib"), by["peft-kogpt2"].get("gpu_peak_mib")
        if lm and pm:
            mr = lm / pm
            w(f"| KoGPT2 SFT GPU peak <= 0.6x PEFT | {mr:.2f}x ({lm / GIB:.2f} vs {pm / GIB:.2f} GiB) | {'PASS' if mr <= 0.6 else 'FAIL'} |")
    else:
        w("| KoGPT2 SFT vs PEFT | a run failed or was skipped | - |")
    for st, lim in (("lorafit-llama7b-f16", 15.0), ("lorafit-llama7b-nf4", 6.0)):
        if ok(st) and by[st].get("gpu_peak_mib") is not None:
            g = by[st]["gpu_peak_mib"] / GIB
            w(f"| {st}: GPU peak < {lim:g} GiB | {g:.2f} GiB | {'PASS' if g < lim else 'FAIL'} |")
        else:
            w(f"| {st}: GPU peak < {lim:g} GiB | not measured (failed or skipped) | - |")
    w("")

    if "lorafit-grpo" in by:
        r = by["lorafit-grpo"]
        w("## GRPO on the KoGPT2 shape (lorafit)\n")
        w(f"GPU peak {fmt(gib(r.get('gpu_peak_mib')))} GiB (rc {r.get('rc')}). Per iteration (2 prompts x group 4, up to 64 new tokens):\n")
        its = r.get("ppo_iterations") or []
        if its:
            keys = [k for k in its[0] if k.startswith("time_")]
            w("| iteration | total s | " + " | ".join(keys) + " |")
            w("|---" * (len(keys) + 2) + "|")
            for it in its:
                w(f"| {it['step']} | {it['total_s']:.2f} | " + " | ".join(f"{it[k]:.2f}" for k in keys) + " |")
        w("")

    if "lorafit-ppo" in by:
        r = by["lorafit-ppo"]
        w("## PPO on the KoGPT2 shape (lorafit)\n")
        w(f"GPU peak {fmt(gib(r.get('gpu_peak_mib')))} GiB (rc {r.get('rc')}). Per iteration (8 prompts, up to 32 new tokens):\n")
        its = r.get("ppo_iterations") or []
        if its:
            keys = [k for k in its[0] if k.startswith("time_")]
            w("| iteration | total s | " + " | ".join(keys) + " | response len |")
            w("|---" * (len(keys) + 3) + "|")
            for it in its:
                w(f"| {it['step']} | {it['total_s']:.2f} | " + " | ".join(f"{it[k]:.2f}" for k in keys)
                  + f" | {fmt(it.get('response_len'), 1)} |")
        w("")

    if "correctness" in by:
        r = by["correctness"]
        w("## CPU vs CUDA (tiny GPT-2, eval NLL per line)\n")
        w(f"{r.get('note', '')}\n")

    if "training-correctness" in by:
        r = by["training-correctness"]
        w("## Training: CPU f32 vs the device (scripts/gpu/train_check.py)\n")
        w(f"{r.get('note', '')}. Metric: the largest relative difference of a compared per-step metric; "
          "adapter: max |diff| (f32, NF4) and the worst tensor's ||diff|| / ||ref|| (bf16, f16).\n")
        w("| fixture | method | config | verdict | steps | max rel metric (where) | adapter max abs | adapter rel L2 | f16 skipped steps | tolerance | s (device / CPU) |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for c in r.get("checks") or []:
            verdict = "ok" if c.get("ok") else "FAIL: " + "; ".join(c.get("problems") or [c.get("error", "")])
            w(f"| {c['fixture']} | {c['method']} | {c['config']} | {verdict} | {c.get('steps', '-')} | "
              f"{fmt(c.get('max_rel_metric'), 7) if c.get('max_rel_metric') is None else format(c['max_rel_metric'], '.2e')} ({c.get('worst_metric', '')}) | "
              f"{'-' if c.get('adapter_max_abs') is None else format(c['adapter_max_abs'], '.2e')} | "
              f"{'-' if c.get('adapter_rel_l2') is None else format(c['adapter_rel_l2'], '.2e')} | {c.get('skipped_steps', '-')} | "
              f"{c.get('tol', '')} | {c.get('wall_s', '-')} / {c.get('ref_wall_s', '-')} |")
        w("")

    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")
    sys.stdout.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    r.add_argument("--stage", required=True)
    r.add_argument("--rc", type=int, default=0)
    r.add_argument("--wall", type=float, default=0.0)
    r.add_argument("--baseline-mib", type=float)
    r.add_argument("--samples")
    r.add_argument("--stdout")
    r.add_argument("--sft-metrics")
    r.add_argument("--ppo-metrics")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--seq", type=int, default=512)
    r.add_argument("--set", action="append")
    t = sub.add_parser("table")
    t.add_argument("--in", dest="inp", required=True)
    t.add_argument("--out", required=True)
    a = ap.parse_args()
    record(a) if a.cmd == "record" else table(a)


if __name__ == "__main__":
    main()
