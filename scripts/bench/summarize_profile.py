#!/usr/bin/env python3
"""The side-by-side Markdown of scripts/bench/profile_sft.sh: `lorafit bench sft --profile --json`
beside scripts/bench/torch_profile_sft.py --json (the same "profile" schema), per phase and per
op kind: ms each, the lorafit/PEFT ratio, and each kind's GEMM GFLOP/s as a share of its own
tool's GEMM peak (candle's for lorafit, torch's for PEFT, both measured in the same run).

Usage: summarize_profile.py LORAFIT.json PEFT.json --command CMD --config TEXT [--machine TEXT]
                            [--load-lorafit X] [--load-peft X]
"""
import argparse
import json

LABELS = {
    "frozen_gemm": "frozen linear GEMMs",
    "lora": "LoRA path",
    "attention": "attention",
    "norm_act": "norms / activations",
    "loss_head": "loss head (LM head + CE)",
    "optimizer": "optimizer (AdamW)",
    "other": "other (element-wise / autograd)",
}
CATS = list(LABELS)


def last_json(path: str) -> dict:
    lines = [l for l in open(path) if l.startswith("{")]
    if not lines:
        raise SystemExit(f"{path}: no JSON line (did the run fail? see its .stderr)")
    return json.loads(lines[-1])


def share(c: dict, peak: float) -> str:
    if not c or not c["flops"] or c["ms"] <= 0:
        return "-"
    rate = c["flops"] / (c["ms"] * 1e6)
    return f"{rate:.0f} ({100 * rate / peak:.0f}%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lorafit")
    ap.add_argument("peft")
    ap.add_argument("--command", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--machine", default="")
    ap.add_argument("--load-lorafit", default="?")
    ap.add_argument("--load-peft", default="?")
    a = ap.parse_args()
    lf, pt = last_json(a.lorafit), last_json(a.peft)
    P, Q = lf["profile"], pt["profile"]
    ppk, qpk = P["gemm_peak_gflops"], Q["gemm_peak_gflops"]
    out = [f"#### {a.config}", ""]
    if a.machine:
        out += [a.machine, ""]
    out += [
        f"Command: `{a.command}`. Load average (1 min) before lorafit {a.load_lorafit}, before PEFT {a.load_peft}.",
        f"GEMM peak (2048x768x3072 f32, fastest of 10 calls per layout nn / nt, measured inside each run): candle {ppk:.1f} GFLOP/s, torch {qpk:.1f} GFLOP/s.",
        f"Unprofiled median step: lorafit {lf['step_s_median'] * 1e3:.0f} ms, PEFT {pt['step_s_median'] * 1e3:.0f} ms "
        f"(ratio {lf['step_s_median'] / pt['step_s_median']:.2f}); profiled step: lorafit {P['step_ms']:.0f} ms, PEFT {Q['step_ms']:.0f} ms "
        f"(ratio {P['step_ms'] / Q['step_ms']:.2f}).",
        "",
        "| phase | lorafit wall ms | PEFT wall ms | ratio | lorafit CPU/wall | PEFT CPU/wall | lorafit minor faults | PEFT minor faults |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    qph = {p["phase"]: p for p in Q["phases"]}
    for p in P["phases"]:
        q = qph[p["phase"]]
        out.append(f"| {p['phase']} | {p['wall_ms']:.1f} | {q['wall_ms']:.1f} | {p['wall_ms'] / max(q['wall_ms'], 1e-9):.2f} | "
                   f"{p['cpu_ms'] / max(p['wall_ms'], 1e-9):.2f} | {q['cpu_ms'] / max(q['wall_ms'], 1e-9):.2f} | {p['minor_faults']} | {q['minor_faults']} |")
    out += [
        "",
        "| phase | kind | lorafit ms | PEFT ms | ratio | GFLOP lorafit / PEFT | lorafit GFLOP/s (% of candle peak) | PEFT GFLOP/s (% of torch peak) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in P["phases"]:
        q = qph[p["phase"]]
        pc = {c["cat"]: c for c in p["cats"]}
        qc = {c["cat"]: c for c in q["cats"]}
        for k in CATS:
            x, y = pc.get(k), qc.get(k)
            xm, ym = (x or {}).get("ms", 0.0), (y or {}).get("ms", 0.0)
            if xm < 0.05 and ym < 0.05:
                continue
            ratio = f"{xm / ym:.2f}" if ym >= 0.05 else "-"
            gf = "-" if not ((x or {}).get("flops") or (y or {}).get("flops")) else f"{(x or {}).get('flops', 0) / 1e9:.1f} / {(y or {}).get('flops', 0) / 1e9:.1f}"
            out.append(f"| {p['phase']} | {LABELS[k]} | {xm:.1f} | {ym:.1f} | {ratio} | {gf} | {share(x, ppk)} | {share(y, qpk)} |")
    # The whole step's GEMM work against each peak.
    fl = sum(c["flops"] for p in P["phases"] for c in p["cats"])
    fq = sum(c["flops"] for p in Q["phases"] for c in p["cats"])
    out += ["", f"Whole step: lorafit {fl / 1e9:.1f} GFLOP of GEMMs in {P['step_ms']:.0f} ms = {fl / P['step_ms'] / 1e6:.0f} GFLOP/s "
            f"({100 * fl / P['step_ms'] / 1e6 / ppk:.0f}% of candle's peak); PEFT {fq / 1e9:.1f} GFLOP in {Q['step_ms']:.0f} ms = "
            f"{fq / Q['step_ms'] / 1e6:.0f} GFLOP/s ({100 * fq / Q['step_ms'] / 1e6 / qpk:.0f}% of torch's peak)."]
    if Q.get("sdpa_flops_analytic"):
        out.append("(PEFT's attention FLOPs are the algorithmic count: the fused CPU SDPA kernel reports none to the profiler.)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
