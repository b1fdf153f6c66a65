#!/usr/bin/env python3
"""The TRL side of scripts/bench/dpo.sh (docs/BENCHMARKS.md, "DPO"): DPO steps of TRL 1.16's
`DPOTrainer` with a PEFT model, the reference by disabling the adapter (TRL's own PEFT path:
`ref_model=None`), on the same pairs file lorafit reads.

One configuration per process (so the peak RSS is that configuration's):
  model = AutoModelForCausalLM.from_pretrained(dir) (f32), get_peft_model(LoraConfig(r, alpha 2r,
          --targets, fan_in_fan_out, dropout 0 as TRL's disable_dropout leaves it))
  DPOTrainer(model, ref_model=None, DPOConfig(loss_type sigmoid, beta 0.1, batch --pairs,
             max_steps 1 + --steps, lr 1e-4, use_cpu, no saving/eval/reporting, max_length None,
             precompute_ref_log_probs --precompute), train_dataset = the --data pairs)
  step times from a TrainerCallback (on_step_begin .. on_step_end): the first step is the
  warm-up, the median of the others is reported; torch.set_num_threads(--threads).
Prints one JSON line: step_s_median, step_s_all, tokens_per_s, peak_rss_bytes, versions.

Usage: trl_dpo.py --model DIR --data PAIRS.jsonl [--pairs 2] [--steps 3] [--targets c_attn,c_proj,c_fc]
                  [--r 8] [--precompute] [--threads 2]
"""
import json
import statistics
import time

from peft_common import maxrss_bytes, parser, setup_torch, versions


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--targets", default="c_attn,c_proj,c_fc")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--precompute", action="store_true")
    a = ap.parse_args()

    torch, rss_import = setup_torch(a)
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.model}/tokenizer.json", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    targets = [t for t in a.targets.split(",") if t]
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=a.r, lora_alpha=2 * a.r, target_modules=targets,
                                             fan_in_fan_out=True, lora_dropout=0.0))
    rss_load = maxrss_bytes()
    ds = load_dataset("json", data_files=a.data, split="train")

    times, t0 = [], [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            t0[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - t0[0])

    cfg = DPOConfig(output_dir="/tmp/trl-dpo-bench", per_device_train_batch_size=a.pairs, gradient_accumulation_steps=1,
                    max_steps=1 + a.steps, learning_rate=1e-4, lr_scheduler_type="constant", loss_type=["sigmoid"], beta=0.1,
                    use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1,
                    max_length=None, precompute_ref_log_probs=a.precompute, dataloader_num_workers=0,
                    seed=a.seed, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    timed = times[1:]
    med = statistics.median(timed)
    row = trainer.train_dataset[0]
    seq = len(row["prompt_ids"]) + len(row["chosen_ids"]) if "prompt_ids" in row else None
    print(json.dumps({
        "tool": "trl", "model": a.model, "pairs": a.pairs, "targets": targets, "r": a.r, "precompute_ref": a.precompute,
        "seq_tokens": seq, "step_s_median": med, "step_s_all": times, "tokens_per_s": 2 * a.pairs * (seq or 0) / med,
        "peak_rss_bytes": maxrss_bytes(), "rss_after_load_bytes": rss_load, "peak_rss_before_load_bytes": rss_import,
        "threads": a.threads, "attn": a.attn, **versions(),
    }))


if __name__ == "__main__":
    main()
