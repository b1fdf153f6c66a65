#!/usr/bin/env python3
"""The PyTorch + PEFT side of `lorafit bench sft` (see docs/BENCHMARKS.md, "SFT").

One configuration per process (so the peak RSS is that configuration's). A plain torch loop:
  model = GPT2LMHeadModel.from_pretrained(dir) (f32)
  model = get_peft_model(model, LoraConfig(r, lora_alpha=2r, target_modules, fan_in_fan_out=True,
                                           lora_dropout=0.05, task_type="CAUSAL_LM"))
  AdamW over the trainable (LoRA) parameters, lr 1e-4
  a step = forward(input_ids, labels=input_ids) + backward + optimizer.step() + zero_grad()
on one seeded random token batch (B x T, every token but the first labelled, as lorafit's bench),
model.train() (so LoRA dropout is on, as in lorafit's bench), torch.set_num_threads(--threads).
1 warm-up step + --steps timed steps; the median is reported.

With --grad-checkpointing: model.gradient_checkpointing_enable(use_reentrant=False) on the base
model and enable_input_require_grads() (transformers' recipe for checkpointing under PEFT).

Prints one JSON line with the keys of `lorafit bench sft --json` plus peak_rss_before_load_bytes
(ru_maxrss after importing torch / transformers / peft, before reading any weight), threads and
the library versions.

Usage: peft_sft.py --model DIR --batch 4 --seq 128 [--steps 3] [--targets c_attn,c_proj,c_fc]
                   [--r 8] [--grad-checkpointing] [--threads 2] [--attn sdpa|eager]
"""
import argparse
import json
import resource
import statistics
import time


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face GPT-2 folder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--targets", default="c_attn")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rss_import = maxrss_bytes()

    model = GPT2LMHeadModel.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    cfg = LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=targets, fan_in_fan_out=True,
                     lora_dropout=0.05, task_type="CAUSAL_LM")
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, cfg)
    model.train()
    rss_load = maxrss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)

    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        del out
        if i > 0:
            times.append(dt)
    med = statistics.median(times)
    import peft
    import transformers
    print(json.dumps({
        "tool": "peft", "model": a.model, "batch": a.batch, "seq": a.seq, "targets": targets, "r": a.r,
        "grad_checkpointing": a.grad_checkpointing, "trainable_params": trainable,
        "step_s_median": med, "step_s_all": times, "tokens_per_s": a.batch * a.seq / med,
        "peak_rss_bytes": maxrss_bytes(), "rss_after_load_bytes": rss_load,
        "peak_rss_before_load_bytes": rss_import, "threads": a.threads, "attn": a.attn,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
