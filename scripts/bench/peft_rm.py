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
import json

from peft_common import add_train_args, maxrss_bytes, parser, peft_train, setup_torch, timed_steps, versions


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    add_train_args(ap)
    a = ap.parse_args()

    torch, rss_import = setup_torch(a)
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        a.model, num_labels=1, dtype=torch.float32, attn_implementation=a.attn)
    vocab = model.config.vocab_size
    model.config.pad_token_id = vocab - 1  # the random rows below never contain it
    model, targets, trainable, opt = peft_train(model, a, "SEQ_CLS")
    rss_load = maxrss_bytes()

    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab - 1, (2 * a.pairs, a.seq), generator=g)

    def step():
        r = model(input_ids=ids).logits.squeeze(-1)  # (2·pairs,)
        (-F.logsigmoid(r[: a.pairs] - r[a.pairs:]).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, med = timed_steps(a.steps, step)
    print(json.dumps({
        "tool": "peft", "model": a.model, "pairs": a.pairs, "seq": a.seq, "targets": targets, "r": a.r,
        "grad_checkpointing": a.grad_checkpointing, "trainable_params": trainable,
        "step_s_median": med, "step_s_all": times, "tokens_per_s": 2 * a.pairs * a.seq / med,
        "peak_rss_bytes": maxrss_bytes(), "rss_after_load_bytes": rss_load,
        "peak_rss_before_load_bytes": rss_import, "threads": a.threads, "attn": a.attn, **versions(),
    }))


if __name__ == "__main__":
    main()
