#!/usr/bin/env python3
"""The PyTorch + PEFT side of `lorafit bench rm` (see docs/BENCHMARKS.md, "Reward model").

One configuration per process (so the peak RSS is that configuration's). A plain torch loop:
  model = AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1) (f32; a
          GPT2ForSequenceClassification: the reward is `score` at the last non-pad token)
  model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r, lora_alpha=2r, target_modules,
                                           fan_in_fan_out=True, lora_dropout=0.05))
          (SEQ_CLS puts `score` in modules_to_save: the head trains with the adapter)
  AdamW over the trainable parameters (LoRA + score), lr 1e-4
  a step = one forward of the (2·pairs, seq) batch [chosen rows; rejected rows], loss
           mean(-logsigmoid(r_chosen - r_rejected)), backward, optimizer.step(), zero_grad()
on seeded random tokens (never the pad id, so every row's reward is read at its last position),
model.train() (LoRA dropout on, as lorafit's bench), torch.set_num_threads(--threads).
1 warm-up step + --steps timed steps; the median is reported.

Prints one JSON line with the keys of `lorafit bench rm --json` plus threads and versions.

Usage: peft_rm.py --model DIR [--pairs 4] [--seq 128] [--steps 3] [--targets c_attn] [--r 8]
                  [--grad-checkpointing] [--threads 2] [--attn sdpa|eager]
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
    ap.add_argument("--pairs", type=int, default=4)
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
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rss_import = maxrss_bytes()

    model = AutoModelForSequenceClassification.from_pretrained(
        a.model, num_labels=1, dtype=torch.float32, attn_implementation=a.attn)
    vocab = model.config.vocab_size
    pad = vocab - 1  # the random rows below never contain it
    model.config.pad_token_id = pad
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    cfg = LoraConfig(task_type="SEQ_CLS", r=a.r, lora_alpha=2 * a.r, target_modules=targets,
                     fan_in_fan_out=True, lora_dropout=0.05)
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, cfg)
    model.train()
    rss_load = maxrss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)

    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab - 1, (2 * a.pairs, a.seq), generator=g)

    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        r = model(input_ids=ids).logits.squeeze(-1)  # (2·pairs,)
        loss = -F.logsigmoid(r[: a.pairs] - r[a.pairs:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        del r, loss
        if i > 0:
            times.append(dt)
    med = statistics.median(times)
    import peft
    import transformers
    print(json.dumps({
        "tool": "peft", "model": a.model, "pairs": a.pairs, "seq": a.seq, "targets": targets, "r": a.r,
        "grad_checkpointing": a.grad_checkpointing, "trainable_params": trainable,
        "step_s_median": med, "step_s_all": times, "tokens_per_s": 2 * a.pairs * a.seq / med,
        "peak_rss_bytes": maxrss_bytes(), "rss_after_load_bytes": rss_load,
        "peak_rss_before_load_bytes": rss_import, "threads": a.threads, "attn": a.attn,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
