#!/usr/bin/env python3
"""scripts/gpu-bench.sh's `training-correctness` stage: does lorafit *train* the same on the device?

For every fixture of scripts/gpu/training-correctness.tsv, the chain of its rows (SFT 20 steps,
RM 10, PPO 2 iterations, ...) runs seeded on the CPU in f32: the reference. Then each row runs on
the device in f32, bf16 and f16 (f16 trains with lorafit's dynamic loss scaler), fed the
reference chain's earlier outputs ({sft}, {rm}), so each check measures that method alone; plus
one SFT step on an NF4 base on both sides. Compared with the reference, per row:
  - every metric the table names, step by step: |a - b| <= rtol * max(|a|, |b|) + atol;
  - the final adapter (every tensor of the output folder's *.safetensors): max |a - b| (f32,
    NF4) or the worst tensor's ||a - b|| / ||ref|| (bf16, f16).
Tolerances: TOL below, explained in docs/CUDA.md. The CPU chains run in parallel (--jobs); the
device runs one at a time (all in parallel when the "device" is the CPU). Only the Python
standard library is used (CI runs this through `DRY_RUN=1 bash scripts/gpu-bench.sh`, no torch).

  train_check.py --bin LORAFIT --device cuda --work DIR [--results results.jsonl] [--jobs N]
                 [--dtypes "f32 bf16 f16"] [--no-nf4] [--device-env K=V ...] [--ld-path P]
--device-env: extra environment for the device runs only (the CPU dry run sets
LORAFIT_GENERIC_OPS=1 there, so it compares the CPU fast paths with the generic ones CUDA runs).
Exit status 1 when a check fails or a run errs.
"""
import argparse
import concurrent.futures as cf
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLE = os.path.join(ROOT, "scripts", "gpu", "training-correctness.tsv")

# Flags every run gets before the table's args (which may override them with a later --set).
COMMON = ["--force", "--set", "train.seed=1234", "--set", "train.lr=1e-2", "--set", "train.log_every=1",
          "--set", "train.eval_every=0", "--set", "train.save_every=0", "--set", "data.eval_fraction=0",
          "--set", "data.max_len=64"]

# (dtype, kind) -> (metric rtol, metric atol, adapter tolerance, adapter measure). Adapter
# measures: "abs" = max |a - b| over every element; "rel" = the worst tensor's ||a - b|| / ||ref||.
# kind (the table's column): "exact" methods see the same tokens on both sides; "sampled" ones
# (PPO, GRPO) generate their training data, and a sampled token flips where two probabilities
# are closer than the dtype's rounding, after which the runs see different data.
# f32 (and NF4, dequantized to f32): the bounds, both kinds (the same seeded host RNG
# over probabilities equal to ~1e-6 picks the same tokens).
# bf16 keeps 8 mantissa bits (relative step 3.9e-3), f16 11 (4.9e-4): the frozen base runs in
# that dtype while adapters, their gradients and AdamW stay f32. The half-precision bounds are
# a few times the worst seen on the CPU (candle's CPU bf16/f16 kernels, both fixtures, every
# method; docs/CUDA.md). For "sampled" methods in half precision only a broken run is caught:
# rtol None = "bounded": finite and |run| <= 10 max(|ref|, atol) per metric, and the adapter
# within twice its own size (||diff|| <= 2 ||ref||).
TOL = {
    ("f32", "exact"): (1e-4, 1e-6, 1e-4, "abs"),
    ("f32", "sampled"): (1e-4, 1e-6, 1e-4, "abs"),
    ("nf4", "exact"): (1e-4, 1e-6, 1e-4, "abs"),
    ("nf4", "sampled"): (1e-4, 1e-6, 1e-4, "abs"),
    ("bf16", "exact"): (2e-2, 1e-2, 0.5, "rel"),
    ("f16", "exact"): (5e-3, 2e-3, 0.25, "rel"),
    ("bf16", "sampled"): (None, 5e-2, 2.0, "rel"),
    ("f16", "sampled"): (None, 5e-2, 2.0, "rel"),
    # "logratio" (DPO): same tokens on both sides, but the loss is a sigmoid of beta times a
    # difference of log-probs SUMMED over each completion, so a half-precision base's rounding
    # enters it in proportion to sum |logp| (~70 nats here), not to the loss (~0.3): f16's 4.9e-4
    # on 70 nats is ~0.03 nats per sequence, beta 0.1 -> ~5e-3 on the margin per step, compounded
    # by AdamW over 10 steps at lr 1e-2 (worst seen on the CPU: 1.65e-2 relative on llama-a at
    # step 10, margin 1.07 vs 1.05). The f32 bounds are the exact ones; half precision gets
    # bf16's metric bound. The adapters are held to the exact kind's bounds.
    ("f32", "logratio"): (1e-4, 1e-6, 1e-4, "abs"),
    ("nf4", "logratio"): (1e-4, 1e-6, 1e-4, "abs"),
    ("bf16", "logratio"): (2e-2, 1e-2, 0.5, "rel"),
    ("f16", "logratio"): (2e-2, 1e-2, 0.25, "rel"),
}


def read_table(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 5)
            if len(parts) < 5 or parts[3] not in ("exact", "sampled", "logratio") or not parts[2].isdigit():
                sys.exit(f"{path}:{n}: expected: fixture method steps exact|sampled|logratio metrics [args]")
            fixture, method, steps, kind, metrics = parts[:5]
            rows.append({"fixture": fixture, "method": method, "steps": int(steps), "kind": kind, "metrics": metrics.split(","),
                         "args": shlex.split(parts[5]) if len(parts) > 5 else [], "line": n})
    return rows


def chains(rows):
    """fixture -> its rows in table order."""
    out = {}
    for r in rows:
        out.setdefault(r["fixture"], []).append(r)
    return out


def read_safetensors(path):
    """{name: [floats]} with the standard library (F32, F16, BF16)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        dt = info["dtype"]
        if dt == "F32":
            vals = struct.unpack(f"<{len(raw) // 4}f", raw)
        elif dt == "F16":
            vals = struct.unpack(f"<{len(raw) // 2}e", raw)
        elif dt == "BF16":
            vals = [struct.unpack("<f", b"\0\0" + raw[i:i + 2])[0] for i in range(0, len(raw), 2)]
        else:
            continue
        out[name] = vals
    return out


def adapters(folder):
    """Every tensor of the folder's top-level *.safetensors, keyed file:name."""
    out = {}
    if not os.path.isdir(folder):
        return out
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            for k, v in read_safetensors(os.path.join(folder, fn)).items():
                out[f"{fn}:{k}"] = v
    return out


def metrics(folder):
    rows = []
    try:
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    rows.append(json.loads(line))
    except OSError:
        pass
    return [r for r in rows if "step" in r]


class Runner:
    def __init__(self, a):
        self.a = a
        self.bin = a.bin
        self.ld = a.ld_path

    def env(self, device_side, threads):
        e = dict(os.environ)
        if self.ld:
            e["LD_LIBRARY_PATH"] = self.ld + (":" + e["LD_LIBRARY_PATH"] if e.get("LD_LIBRARY_PATH") else "")
        if threads:
            e["RAYON_NUM_THREADS"] = str(threads)
        if device_side:
            for kv in self.a.device_env or []:
                k, _, v = kv.partition("=")
                e[k] = v
        return e

    def chain(self, fixture, rows, cfg, inputs=None):
        """Runs the rows of one fixture for one config, in order. Returns {method: run record}.
        {method} in args is this chain's own output of that row, or with `inputs` (the
        reference chain's records) the reference's."""
        label, device, dtype, quant, device_side = cfg
        base = os.path.join(self.a.work, os.path.basename(fixture.rstrip("/")), label)
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base, exist_ok=True)
        done, out = {}, {}
        for r in rows:
            folder = os.path.join(base, r["method"])
            rec = {"fixture": fixture, "method": r["method"], "config": label, "dir": folder}
            given = {m: v["dir"] for m, v in (inputs or {}).items() if v.get("rc") == 0} if inputs is not None else done
            try:
                args = [x.format(**given) for x in r["args"]]
            except KeyError as e:
                rec.update(rc=None, error=f"needs {{{e.args[0]}}}, which no earlier (successful) row of this chain made")
                out[r["method"]] = rec
                continue
            steps = 1 if quant == "nf4" else r["steps"]
            cmd = [self.bin, r["method"], "--model", fixture, "--out", folder, *COMMON,
                   "--set", f"model.device={device}", "--set", f"model.dtype={dtype}",
                   "--set", f"model.quantize={quant}", "--set", f"train.max_steps={steps}", *args]
            t0 = time.time()
            with open(folder + ".out", "w") as so, open(folder + ".err", "w") as se:
                try:
                    rc = subprocess.run(cmd, cwd=ROOT, stdout=so, stderr=se, timeout=self.a.run_timeout,
                                        env=self.env(device_side, None if device_side else self.a.cpu_threads)).returncode
                except subprocess.TimeoutExpired:
                    rc = 124
            rec.update(rc=rc, wall_s=round(time.time() - t0, 2), cmd=" ".join(shlex.quote(c) for c in cmd))
            if rc != 0:
                try:
                    with open(folder + ".err", errors="replace") as f:
                        rec["error"] = " | ".join(l.strip() for l in f.read().strip().splitlines()[-4:])[-600:]
                except OSError:
                    pass
            else:
                done[r["method"]] = folder
            out[r["method"]] = rec
        return out


def close(a, b, rtol, atol):
    if rtol is None:  # bounded: not blown up
        return abs(b) <= 10 * max(abs(a), atol)
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


def compare(ref, run, row, dtype):
    """One check: run vs ref for one row. Returns a result dict."""
    rtol, atol, ad_tol, ad_kind = TOL[(dtype, row["kind"])]
    res = {"fixture": row["fixture"], "method": row["method"], "config": run["config"], "ok": False}
    if ref.get("rc") != 0 or run.get("rc") != 0:
        res["error"] = f"run failed: ref rc {ref.get('rc')}, {run['config']} rc {run.get('rc')}: {run.get('error') or ref.get('error') or ''}"
        return res
    mr, mx = metrics(ref["dir"]), metrics(run["dir"])
    worst, where, bad = 0.0, "", []
    if len(mr) != len(mx) or not mr:
        bad.append(f"{len(mx)} metric rows vs {len(mr)} on the reference")
    for x, y in zip(mr, mx):
        for k in row["metrics"]:
            if k not in x or k not in y or x[k] is None or y[k] is None:
                bad.append(f"step {x.get('step')}: no {k}")
                continue
            a, b = float(x[k]), float(y[k])
            if not (math.isfinite(a) and math.isfinite(b)):
                bad.append(f"step {x.get('step')}: {k} not finite ({a}, {b})")
                continue
            rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
            if max(abs(a), abs(b)) > 1e-6 and rel > worst:
                worst, where = rel, f"{k}@{x.get('step')}"
            if not close(a, b, rtol, atol):
                bad.append(f"step {x.get('step')} {k}: {a:.6g} vs {b:.6g}")
    ar, ax = adapters(ref["dir"]), adapters(run["dir"])
    if not ar or set(ar) != set(ax):
        bad.append(f"adapter tensors differ: {len(ar)} on the reference, {len(ax)} here")
    # max |a - b| (abs) and the worst tensor's ||a - b|| / ||ref|| (rel), both reported.
    d_abs, d_rel, w_abs, w_rel = 0.0, 0.0, "", ""
    for k in ar:
        if k not in ax or len(ar[k]) != len(ax[k]):
            continue
        if not all(math.isfinite(q) for q in ax[k]):
            bad.append(f"{k}: non-finite values")
            continue
        diffs = [p - q for p, q in zip(ar[k], ax[k])]
        m = max((abs(d) for d in diffs), default=0.0)
        r = math.sqrt(sum(d * d for d in diffs)) / max(math.sqrt(sum(p * p for p in ar[k])), 1e-30)
        if m > d_abs:
            d_abs, w_abs = m, k.split(":", 1)[1]
        if r > d_rel:
            d_rel, w_rel = r, k.split(":", 1)[1]
    ad, ad_where = (d_abs, w_abs) if ad_kind == "abs" else (d_rel, w_rel)
    if ad > ad_tol:
        bad.append(f"adapter {ad_where}: {'max |diff|' if ad_kind == 'abs' else '||diff|| / ||ref||'} {ad:.3g} > {ad_tol:g}")
    last = mx[-1] if mx else {}
    res.update(steps=len(mx), max_rel_metric=worst, worst_metric=where, adapter_max_abs=d_abs, adapter_rel_l2=d_rel,
               adapter_worst=ad_where,
               tol=("metrics bounded (10x)" if rtol is None else f"metrics {rtol:g} rel + {atol:g}") + f"; adapter {ad_kind} {ad_tol:g}",
               wall_s=run.get("wall_s"), ref_wall_s=ref.get("wall_s"), ok=not bad)
    for k in ("skipped_steps", "loss_scale"):
        if k in last:
            res[k] = last[k]
    if bad:
        res["problems"] = bad[:6]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", required=True)
    ap.add_argument("--table", default=TABLE)
    ap.add_argument("--results", help="append the stage's JSON line here (scripts/gpu/report.py reads it)")
    ap.add_argument("--dtypes", default="f32 bf16 f16")
    ap.add_argument("--no-nf4", action="store_true")
    ap.add_argument("--device-env", action="append")
    ap.add_argument("--ld-path", default="")
    ap.add_argument("--jobs", type=int, default=max(1, min(6, (os.cpu_count() or 2) // 3)))
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--run-timeout", type=int, default=120)
    a = ap.parse_args()
    t0 = time.time()
    os.makedirs(a.work, exist_ok=True)
    by_fixture = chains(read_table(a.table))
    dev_tag = a.device.replace(":", "") + ("-generic" if a.device_env else "")
    ref_cfg = ("cpu-f32", "cpu", "f32", "none", False)
    dev_cfgs = [(f"{dev_tag}-{d}", a.device, d, "none", True) for d in a.dtypes.split()]
    nf4 = [] if a.no_nf4 else [("cpu-nf4", "cpu", "f32", "nf4", False), (f"{dev_tag}-nf4", a.device, "f32", "nf4", True)]
    runner = Runner(a)
    jobs = []  # (fixture, cfg, rows)
    for fx, rows in by_fixture.items():
        jobs.append((fx, ref_cfg, rows))
        for c in dev_cfgs:
            jobs.append((fx, c, rows))
        for c in nf4:
            jobs.append((fx, c, rows[:1]))  # one step of the first row (SFT)
    results = {}
    # Phase 1: the CPU f32 (and NF4) reference chains, in parallel.
    with cf.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futs = {pool.submit(runner.chain, fx, rows, cfg): (fx, cfg) for fx, cfg, rows in jobs if not cfg[4]}
        for f in cf.as_completed(futs):
            fx, cfg = futs[f]
            results[(fx, cfg[0])] = f.result()
    # Phase 2: every device row with the reference chain's earlier outputs as its inputs ({sft},
    # {rm}), so each check measures that method alone. One at a time on a GPU; in parallel when
    # the "device" is the CPU (dry run).
    dev_jobs = [(fx, cfg, rows) for fx, cfg, rows in jobs if cfg[4]]
    run_dev = lambda j: runner.chain(j[0], j[2], j[1], inputs=results[(j[0], "cpu-nf4" if j[1][3] == "nf4" else "cpu-f32")])
    with cf.ThreadPoolExecutor(max_workers=a.jobs if a.device == "cpu" else 1) as pool:
        for j, r in zip(dev_jobs, pool.map(run_dev, dev_jobs)):
            results[(j[0], j[1][0])] = r
    checks = []
    for fx, rows in by_fixture.items():
        for cfg in dev_cfgs + nf4[1:]:
            ref_label = "cpu-nf4" if cfg[3] == "nf4" else "cpu-f32"
            key = "nf4" if cfg[3] == "nf4" else cfg[2]
            for r in (rows[:1] if cfg[3] == "nf4" else rows):
                ref = results[(fx, ref_label)].get(r["method"], {})
                run = results[(fx, cfg[0])].get(r["method"], {"config": cfg[0]})
                run.setdefault("config", cfg[0])
                if (key, r["kind"]) not in TOL:
                    checks.append({"fixture": fx, "method": r["method"], "config": cfg[0], "ok": False, "error": f"no tolerance for {key}"})
                    continue
                checks.append(compare(ref, run, r, key))
    n_bad = sum(1 for c in checks if not c["ok"])
    wall = round(time.time() - t0, 1)
    note = f"{len(checks)} checks vs CPU f32 ({len(by_fixture)} fixtures x {', '.join(c[0] for c in dev_cfgs + nf4[1:])}): {len(checks) - n_bad} pass, {n_bad} FAIL"
    print(f"training-correctness: {note} in {wall} s")
    print(f"{'fixture':<24} {'method':<6} {'config':<18} {'ok':<4} {'steps':>5} {'max rel metric':>15} {'adapter max':>12} {'adapter rel':>12}  worst")
    for c in checks:
        print(f"{c['fixture']:<24} {c['method']:<6} {c['config']:<18} {'ok' if c['ok'] else 'FAIL':<4} {c.get('steps', '-')!s:>5} "
              f"{c.get('max_rel_metric', float('nan')):>15.3g} {c.get('adapter_max_abs', float('nan')):>12.3g} {c.get('adapter_rel_l2', float('nan')):>12.3g}  "
              f"{c.get('worst_metric', '')} {c.get('adapter_worst', '')} {'; '.join(c.get('problems', [])) or c.get('error', '')}")
    if a.results:
        with open(a.results, "a") as f:
            f.write(json.dumps({"stage": "training-correctness", "rc": 1 if n_bad else 0, "wall_s": wall, "note": note,
                                "tolerances": {f"{d} {k}": list(v) for (d, k), v in TOL.items()}, "checks": checks}) + "\n")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
