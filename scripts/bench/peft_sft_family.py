#!/usr/bin/env python3
"""The PyTorch + PEFT side of scripts/bench/families_sft.sh (docs/BENCHMARKS.md, "Model families").

As scripts/bench/peft_sft.py, for any model_type: a plain torch loop
  model = AutoModelForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation=--attn)
  model = get_peft_model(model, LoraConfig(r, lora_alpha=2r, target_modules ("all-linear" or a
                                           comma list), lora_dropout=0.05, task_type="CAUSAL_LM"))
  AdamW over the LoRA parameters, lr 1e-4
  a step = forward(input_ids, labels=input_ids) + backward + optimizer.step() + zero_grad()
on one seeded random batch (B x T), model.train(), torch.set_num_threads(--threads); with
--grad-checkpointing, transformers' recipe under PEFT (gradient_checkpointing_enable(use_reentrant=False)
+ enable_input_require_grads() on the base before get_peft_model); 1 warm-up
step + --steps timed steps, the median reported. Prints one JSON line with the keys of
`lorafit bench sft --json`.

Usage: peft_sft_family.py --model DIR --batch 1 --seq 512 [--steps 3] [--targets all-linear] [--r 16] [--grad-checkpointing]
"""
import json

from peft_common import lm_step, maxrss_bytes, parser, peft_family_train, setup_torch, timed_steps, versions


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--grad-checkpointing", action="store_true")
    a = ap.parse_args()

    torch, rss_import = setup_torch(a)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model, targets, trainable, opt = peft_family_train(model, a)
    rss_load = maxrss_bytes()
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g)
    step = lm_step(model, opt, ids)

    times, med = timed_steps(a.steps, step)
    print(json.dumps({
        "tool": "peft", "model": a.model, "batch": a.batch, "seq": a.seq, "targets": [a.targets], "r": a.r,
        "grad_checkpointing": a.grad_checkpointing, "trainable_params": trainable,
        "step_s_median": med, "step_s_all": times, "tokens_per_s": a.batch * a.seq / med,
        "peak_rss_bytes": maxrss_bytes(), "rss_after_load_bytes": rss_load,
        "peak_rss_before_load_bytes": rss_import, "threads": a.threads, "attn": a.attn, **versions(),
    }))


if __name__ == "__main__":
    main()
