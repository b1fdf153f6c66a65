#!/usr/bin/env python3
"""The adapter and the agreement check of scripts/bench/merge.sh (see docs/BENCHMARKS.md).

  merge_check.py adapter --model DIR --out ADAPTER [--r 8] [--alpha 16] [--seed 0]
      A PEFT LoRA adapter for the GPT-2 folder DIR, as PEFT writes it (get_peft_model +
      save_pretrained): r 8, lora_alpha 16, target_modules c_attn, c_proj, c_fc (PEFT's suffix
      match: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj of every block), fan_in_fan_out
      (GPT-2's Conv1D). lora_A keeps PEFT's init (Kaiming-uniform, under torch.manual_seed(seed));
      lora_B, zero at init, is drawn N(0, 0.02) from the same seed, so the merge changes the
      weights (max |delta| about 0.015, next to base weights drawn N(0, 0.02)).

  merge_check.py compare --model DIR --adapter ADAPTER --lorafit OUT1 --peft OUT2
      Reads the base, the adapter and both merged folders (safetensors, key names with and
      without `transformer.`) and prints one JSON line: the tensors each holds, their dtypes,
      and max |difference| between the two outputs, and of each output against a float64
      reference merge W + (alpha/r) (B @ A)^T (per tensor kind: merged, copied), and how many
      elements of each output differ from the float64 reference rounded once to float16.
"""
import argparse
import json


def strip(k: str) -> str:
    return k[len("transformer."):] if k.startswith("transformer.") else k


def adapter(a) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(a.seed)
    model = GPT2LMHeadModel.from_pretrained(a.model, dtype=torch.float32)
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                     fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(a.seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                n += 1
    model.save_pretrained(a.out)
    print(json.dumps({"adapter": a.out, "lora_B_randomised": n, "r": a.r, "lora_alpha": a.alpha, "seed": a.seed}))


def load_folder(d: str) -> dict:
    import glob
    import os
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        for k, v in load_file(f).items():
            out[strip(k)] = v
    return out


def compare(a) -> None:
    import torch
    from safetensors.torch import load_file

    base = load_folder(a.model)
    ad = load_file(f"{a.adapter}/adapter_model.safetensors")
    cfg = json.load(open(f"{a.adapter}/adapter_config.json"))
    scale = cfg["lora_alpha"] / cfg["r"]
    # base_model.model.transformer.h.0.attn.c_attn.lora_A.weight -> h.0.attn.c_attn.weight
    mods = {}
    for k, v in ad.items():
        m = strip(k.removeprefix("base_model.model."))
        for which in ("lora_A", "lora_B"):
            if f".{which}." in m:
                mods.setdefault(m.split(f".{which}.")[0] + ".weight", {})[which] = v
    ref = {}
    for k, w in base.items():
        r = w.double()
        if k in mods:  # Conv1D, stored [in, out]: W += s (B @ A)^T
            r = r + scale * (mods[k]["lora_B"].double() @ mods[k]["lora_A"].double()).T
        ref[k] = r
    lf, pf = load_folder(a.lorafit), load_folder(a.peft)

    def stats(out: dict) -> dict:
        s = {"tensors": len(out), "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in out.values()}),
             "missing": sorted(set(ref) - set(out)), "extra": sorted(set(out) - set(ref))}
        for kind, keys in (("merged", [k for k in ref if k in mods]), ("copied", [k for k in ref if k not in mods])):
            keys = [k for k in keys if k in out]
            s[f"{kind}_max_abs_vs_f64"] = max((out[k].double() - ref[k]).abs().max().item() for k in keys)
            s[f"{kind}_elems_not_f64_rounded_once"] = sum(int((out[k] != ref[k].to(out[k].dtype)).sum()) for k in keys)
            s[f"{kind}_elems"] = sum(out[k].numel() for k in keys)
        return s

    common = sorted(set(lf) & set(pf))
    merged = [k for k in common if k in mods]
    diff = lambda keys: max((lf[k].double() - pf[k].double()).abs().max().item() for k in keys)
    print(json.dumps({
        "adapter_modules": len(mods), "scale": scale,
        "max_delta_abs": max((scale * (m["lora_B"] @ m["lora_A"])).abs().max().item() for m in mods.values()),
        "lorafit": stats(lf), "peft": stats(pf),
        "common_tensors": len(common),
        "lorafit_vs_peft_max_abs_merged": diff(merged),
        "lorafit_vs_peft_max_abs_all": diff(common),
        "lorafit_vs_peft_elems_differing": sum(int((lf[k] != pf[k]).sum()) for k in common),
        "elems": sum(lf[k].numel() for k in common),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("adapter")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("compare")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--lorafit", required=True)
    p.add_argument("--peft", required=True)
    a = ap.parse_args()
    {"adapter": adapter, "compare": compare}[a.cmd](a)


if __name__ == "__main__":
    main()
