#!/usr/bin/env python3
"""Where a PyTorch + PEFT SFT step's time goes: the counterpart of `lorafit bench sft --profile`
(docs/BENCHMARKS.md, "Where a step's time goes, side by side"; scripts/bench/profile_sft.sh runs both).

The step is peft_sft.py's (GPT-2 / KoGPT2: peft_common.peft_train, fan_in_fan_out) or, for another
model_type, peft_sft_family.py's: forward(input_ids, labels=input_ids) + backward + AdamW step +
zero_grad, model.train() (LoRA dropout 0.05 on), torch.set_num_threads(--threads). 1 warm-up +
--steps timed steps (median reported, no profiler), then the GEMM peak of this run
(torch_gemm.measure at 2048x768x3072, nn and nt, 10 calls each: the fastest call, as lorafit's), then ONE step under
torch.profiler (CPU activity, record_shapes, with_flops).

Grouping, into lorafit's kinds (src/prof.rs):
- phases: record_function ranges around forward (+ loss), backward, optimizer (step + zero_grad);
  each phase's wall and process CPU time (getrusage utime + stime) and minor page faults are
  measured around it in the profiled step (profiler overhead included, as lorafit's scopes are).
- forward ops: by the innermost module whose forward they run in (forward hooks open a
  record_function range per module): PEFT's LoRA layer -> lora (its base layer -> frozen_gemm),
  Conv1D / nn.Linear -> frozen_gemm, the output embedding (LM head) -> loss_head, *Attention ->
  attention, LayerNorm / RMSNorm / activation modules -> norm_act; ops outside modules by name
  (cross_entropy, log_softmax, nll_loss -> loss_head).
- backward ops: `autograd::engine::evaluate_function: XBackward0` carries the sequence number of
  the forward op that made the node: it (and everything under it) takes that forward op's kind.
  So aten::mm / addmm / bmm fall into frozen vs LoRA vs head vs attention by role, forward or backward.
- optimizer phase: Optimizer.step (AdamW) -> optimizer.
- time = the events' self CPU time (exclusive); "other" = phase wall - the kinds claimed
  (candle's counterpart: element-wise ops, autograd bookkeeping, AccumulateGrad, zero_grad).
- FLOPs: the profiler's, for aten::mm / addmm / bmm / baddbmm only (GEMMs). The fused CPU SDPA
  kernel reports none; its FLOPs are then the algorithmic 4·B·T²·C forward / 8·B·T²·C backward
  per layer (as lorafit counts its own attention; marked "sdpa_flops_analytic").

Prints the table (the layout of lorafit's) and, with --json, one JSON line whose "profile" has
the schema of `lorafit bench sft --profile --json`'s.

Usage: torch_profile_sft.py --model DIR --batch 4 --seq 128 [--targets c_attn] [--steps 2]
                            [--threads 2] [--json] [--trace FILE.json]
"""
import json
import resource
import sys
import time

from peft_common import add_train_args, lm_step, maxrss_bytes, parser, peft_family_train, peft_train, setup_torch, timed_steps, versions
from torch_gemm import measure

CATS = ["frozen_gemm", "lora", "attention", "norm_act", "loss_head", "optimizer", "other"]
LABELS = {
    "frozen_gemm": "frozen linear GEMMs",
    "lora": "LoRA path",
    "attention": "attention",
    "norm_act": "norms / activations",
    "loss_head": "loss head (LM head + cross-entropy)",
    "optimizer": "optimizer (AdamW)",
    "other": "other (element-wise / autograd)",
}
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
LOSS_OPS = ("aten::cross_entropy_loss", "aten::log_softmax", "aten::_log_softmax", "aten::nll_loss")
PEAK_SHAPE = (2048, 768, 3072)
CAT_PREFIX = "lf.cat::"
PHASE_PREFIX = "lf.phase::"


def usage():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt


def module_kind(name: str, mod, lm_head) -> str | None:
    """lorafit's kind of a module's own forward (None: its children decide)."""
    import torch
    from peft.tuners.lora import LoraLayer

    cls = type(mod).__name__
    if mod is lm_head:
        return "loss_head"
    if isinstance(mod, LoraLayer) or any(p in name.split(".") for p in ("lora_A", "lora_B", "lora_dropout")):
        return "lora"  # PEFT's LoRA layer and its lora_A / lora_B (nn.Linear) / dropout
    if cls == "Conv1D" or isinstance(mod, torch.nn.Linear):
        return "frozen_gemm"  # a base layer inside a LoRA layer too (the innermost range wins)
    if cls.endswith("Attention"):
        return "attention"
    if "LayerNorm" in cls or "RMSNorm" in cls or isinstance(mod, torch.nn.LayerNorm):
        return "norm_act"
    if type(mod).__module__ in ("transformers.activations", "torch.nn.modules.activation"):
        return "norm_act"
    return None


def hook_modules(model):
    """Forward pre/post hooks opening a record_function range `lf.cat::KIND` per classified module."""
    import torch

    lm_head = model.get_output_embeddings()
    for name, mod in model.named_modules():
        kind = module_kind(name, mod, lm_head)
        if kind is None:
            continue

        def pre(m, args, kind=kind):
            rf = torch.autograd.profiler.record_function(CAT_PREFIX + kind)
            rf.__enter__()
            m.__dict__.setdefault("_lf_ranges", []).append(rf)

        def post(m, args, out):
            m.__dict__["_lf_ranges"].pop().__exit__(None, None, None)

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)


def attn_shape(model):
    cfg = model.config
    c = getattr(cfg, "n_embd", None) or cfg.hidden_size
    layers = getattr(cfg, "n_layer", None) or cfg.num_hidden_layers
    return c, layers


def classify(events):
    """Returns {phase: {"wall_us": .., cats: {kind: [us, calls, flops]}}} from the profiler's events."""
    # Parents first: events sorted by start; kind and phase inherited down the tree.
    by_id = {}
    kind_of, phase_of = {}, {}
    seq_kind = {}
    evs = sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end))

    def own_kind(e, parent_kind, phase):
        n = e.name
        if n.startswith(CAT_PREFIX):
            return n[len(CAT_PREFIX):]
        if n.startswith("autograd::engine::evaluate_function:"):
            return seq_kind.get(e.sequence_nr, "other")
        if n.startswith("Optimizer.step") or n.startswith("Optimizer.zero_grad"):
            return "optimizer" if n.startswith("Optimizer.step") else "other"
        if parent_kind is None and phase == "forward" and n in LOSS_OPS:
            return "loss_head"
        return parent_kind

    for e in evs:
        parent = e.cpu_parent
        pk = kind_of.get(id(parent)) if parent is not None else None
        pp = phase_of.get(id(parent)) if parent is not None else None
        phase = e.name[len(PHASE_PREFIX):] if e.name.startswith(PHASE_PREFIX) else pp
        k = own_kind(e, pk, phase)
        kind_of[id(e)], phase_of[id(e)] = k, phase
        if phase == "forward" and k is not None and getattr(e, "sequence_nr", -1) >= 0:
            seq_kind.setdefault(e.sequence_nr, k)
    out = {p: {"wall_us": 0.0, "cats": {c: [0.0, 0, 0] for c in CATS}} for p in ("forward", "backward", "optimizer")}
    for e in evs:
        phase = phase_of[id(e)]
        if phase not in out:
            continue
        if e.name.startswith(PHASE_PREFIX):
            out[phase]["wall_us"] += e.time_range.end - e.time_range.start
            continue
        k = kind_of[id(e)] or "other"
        acc = out[phase]["cats"][k]
        acc[0] += e.self_cpu_time_total
        if e.name in GEMM_OPS:
            acc[2] += int(e.flops or 0)
        if e.name.startswith(CAT_PREFIX) or e.name.startswith("autograd::engine::evaluate_function:") or e.name.startswith("Optimizer.step"):
            acc[1] += 1
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace", help="also write the profiler's Chrome trace here")
    add_train_args(ap)
    ap.set_defaults(steps=2)
    a = ap.parse_args()

    torch, rss_import = setup_torch(a)
    from transformers import AutoConfig, AutoModelForCausalLM

    if AutoConfig.from_pretrained(a.model).model_type == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
        model, targets, trainable, opt = peft_train(model, a, "CAUSAL_LM")  # peft_sft.py's set-up
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
        model, targets, trainable, opt = peft_family_train(model, a)  # peft_sft_family.py's set-up
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g)
    step = lm_step(model, opt, ids)

    times, med = timed_steps(a.steps, step)
    gemm = measure(*PEAK_SHAPE, 10, a.threads)
    peak = max(r["gflops_best"] for r in gemm)  # the fastest call, as lorafit's (a median can hit a busy moment)

    hook_modules(model)
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    phases = {}

    def timed_phase(name, fn):
        t0, (c0, f0) = time.perf_counter(), usage()
        with record_function(PHASE_PREFIX + name):
            r = fn()
        c1, f1 = usage()
        phases[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": c1 - c0, "minflt": f1 - f0}
        return r

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        loss = timed_phase("forward", lambda: model(input_ids=ids, labels=ids).loss)
        timed_phase("backward", loss.backward)
        timed_phase("optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    if a.trace:
        prof.export_chrome_trace(a.trace)
    acc = classify(prof.events())

    # The fused CPU SDPA kernel reports no FLOPs: count attention's algorithmically, as lorafit does.
    c, layers = attn_shape(model)
    sdpa_analytic = False
    for ph, mult in (("forward", 4), ("backward", 8)):
        at = acc[ph]["cats"]["attention"]
        if at[2] == 0 and at[0] > 0:
            at[2] = layers * mult * a.batch * a.seq * a.seq * c
            sdpa_analytic = True

    out_phases = []
    for ph in ("forward", "backward", "optimizer"):
        wall_ms = phases[ph]["wall_s"] * 1e3
        cats = acc[ph]["cats"]
        claimed = sum(v[0] for k, v in cats.items() if k != "other") / 1e3
        rows = []
        for k in CATS:
            us, calls, flops = cats[k]
            ms = max(0.0, wall_ms - claimed) if k == "other" else us / 1e3
            rows.append({"cat": k, "ms": ms, "calls": calls, "flops": flops})
        out_phases.append({"phase": ph, "wall_ms": wall_ms, "cpu_ms": phases[ph]["cpu_s"] * 1e3,
                           "minor_faults": phases[ph]["minflt"], "cats": rows})
    step_ms = sum(p["wall_ms"] for p in out_phases)
    profile_out = {"step_ms": step_ms, "gemm_peak_gflops": peak, "gemm": gemm, "phases": out_phases,
                   "sdpa_flops_analytic": sdpa_analytic}
    result = {"tool": "peft", "model": a.model, "batch": a.batch, "seq": a.seq, "targets": targets, "r": a.r,
              "trainable_params": trainable, "step_s_median": med, "step_s_all": times,
              "peak_rss_bytes": maxrss_bytes(), "peak_rss_before_load_bytes": rss_import,
              "threads": a.threads, "attn": a.attn, "profile": profile_out, **versions()}
    print(table(profile_out, med), file=sys.stderr if a.json else sys.stdout)
    if a.json:
        print(json.dumps(result))


def table(p: dict, med: float) -> str:
    s = (f"peft step {med:.3f} s (median, no profiler); profiled step {p['step_ms']:.1f} ms; "
         f"GEMM peak {p['gemm_peak_gflops']:.1f} GFLOP/s ({'x'.join(map(str, PEAK_SHAPE))}, this run)\n\n")
    s += "| phase | wall ms | CPU ms | CPU/wall | minor faults |\n|---|---:|---:|---:|---:|\n"
    for ph in p["phases"]:
        s += f"| {ph['phase']} | {ph['wall_ms']:.1f} | {ph['cpu_ms']:.1f} | {ph['cpu_ms'] / max(ph['wall_ms'], 1e-9):.2f} | {ph['minor_faults']} |\n"
    s += "\n| phase | kind | ms | % of step | GFLOP | GFLOP/s | % of GEMM peak |\n|---|---|---:|---:|---:|---:|---:|\n"
    for ph in p["phases"]:
        for c in ph["cats"]:
            if c["ms"] < 0.05 and c["flops"] == 0:
                continue
            if c["flops"]:
                rate = c["flops"] / (max(c["ms"], 1e-9) * 1e6)
                gf, r, share = f"{c['flops'] / 1e9:.2f}", f"{rate:.1f}", f"{100 * rate / p['gemm_peak_gflops']:.0f}%"
            else:
                gf = r = share = "-"
            s += f"| {ph['phase']} | {LABELS[c['cat']]} | {c['ms']:.1f} | {100 * c['ms'] / p['step_ms']:.1f}% | {gf} | {r} | {share} |\n"
    return s


if __name__ == "__main__":
    main()
