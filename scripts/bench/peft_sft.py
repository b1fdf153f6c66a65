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
import json

from peft_common import add_train_args, maxrss_bytes, parser, peft_train, setup_torch, timed_steps, versions


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    add_train_args(ap)
    a = ap.parse_args()

    torch, rss_import = setup_torch(a)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    model, targets, trainable, opt = peft_train(model, a, "CAUSAL_LM")
    rss_load = maxrss_bytes()

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, med = timed_steps(a.steps, step)
    print(json.dumps({
        "tool": "peft", "model": a.model, "batch": a.batch, "seq": a.seq, "targets": targets, "r": a.r,
        "grad_checkpointing": a.grad_checkpointing, "trainable_params": trainable,
        "step_s_median": med, "step_s_all": times, "tokens_per_s": a.batch * a.seq / med,
        "peak_rss_bytes": maxrss_bytes(), "rss_after_load_bytes": rss_load,
        "peak_rss_before_load_bytes": rss_import, "threads": a.threads, "attn": a.attn, **versions(),
    }))


if __name__ == "__main__":
    main()
