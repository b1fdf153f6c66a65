#!/usr/bin/env python3
"""The TRL side of the GRPO benchmark (docs/BENCHMARKS.md, "GRPO"): TRL's `GRPOTrainer` with a
PEFT model, no vLLM, doing the work of a `lorafit grpo` iteration:

  model     GPT2LMHeadModel.from_pretrained(dir), f32, CPU; TRL wraps it with `peft_config`
            (LoRA r, alpha 2r, --targets, fan_in_fan_out, dropout 0.05); the reference is the
            same model with the adapter disabled (TRL's PEFT path: no second model)
  data      --prompts distinct prompts of --prompt-len tokens; per_device_train_batch_size =
            prompts x group (one optimizer step per generation: gradient_accumulation_steps 1,
            steps_per_generation 1, num_iterations 1)
  generate  num_generations = --group, max_completion_length = min_new_tokens = --new-tokens
            (every completion has exactly that many tokens), temperature 1, top_k 0, top_p 1
  reward    one regex reward function (a Python function, as lorafit's `regex` rule)
  loss      loss_type --loss-type, beta --beta (0.04: a reference pass), epsilon 0.2, AdamW lr 1e-5
--iterations steps (default 2; the table reads the last: the first includes warm-up), each timed
by a TrainerCallback from on_step_begin to on_step_end (generation, reward, reference log-probs,
forward, backward, optimizer step), with TRL's `_generate` and `_generate_and_score_completions`
timed inside it (generate; reward + reference = rollout - generate; update = step - rollout).

torch.set_num_threads(--threads). Prints one JSON line: per-step seconds, completion lengths,
peak_rss_bytes (ru_maxrss at the end), peak_rss_before_load_bytes (after the imports), versions.

Usage: trl_grpo.py --model DIR [--prompts 2] [--group 4] [--prompt-len 64] [--new-tokens 64]
                   [--iterations 2] [--threads 2] [--attn sdpa|eager] [--targets c_attn,c_proj,c_fc]
"""
import json
import re
import time

from peft_common import maxrss_bytes, parser, setup_torch, versions


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--targets", default="c_attn,c_proj,c_fc")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--loss-type", default="grpo")
    ap.add_argument("--prompts-file", help="JSON Lines {\"prompt\"} (default: generated text)")
    a = ap.parse_args()
    torch, rss_imports = setup_torch(a)
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if a.prompts_file:
        prompts = [json.loads(l)["prompt"] for l in open(a.prompts_file) if l.strip()][: a.prompts]
    else:
        text = "The quick brown fox jumps over the lazy dog while the benchmark counts tokens. " * 8
        prompts = [tok.decode(tok(f"{i} {text}")["input_ids"][: a.prompt_len]) for i in range(a.prompts)]
    plens = [len(tok(p)["input_ids"]) for p in prompts]
    ds = Dataset.from_list([{"prompt": p} for p in prompts])

    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation=a.attn)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=a.r, lora_alpha=2 * a.r, target_modules=targets,
                             fan_in_fan_out=True, lora_dropout=0.05)

    def regex_reward(completions, **_):
        return [1.0 if re.search(r"#### -?[0-9]+", c) else 0.0 for c in completions]

    args = GRPOConfig(
        output_dir="/tmp/trl-grpo-bench", use_cpu=True, bf16=False, fp16=False, report_to="none",
        save_strategy="no", logging_steps=1, max_steps=a.iterations, seed=a.seed, learning_rate=1e-5,
        per_device_train_batch_size=a.prompts * a.group, gradient_accumulation_steps=1,
        num_generations=a.group, max_completion_length=a.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        generation_kwargs={"min_new_tokens": a.new_tokens}, beta=a.beta, loss_type=a.loss_type,
        epsilon=0.2, num_iterations=1, use_vllm=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    steps, lens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lens.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=model, reward_funcs=regex_reward, args=args, train_dataset=ds,
                          processing_class=tok, peft_config=peft_config, callbacks=[Timer()])
    # Phase times: TRL's own methods wrapped (generation; generation + rewards + reference
    # log-probs); the update is the rest of the step (forward, backward, optimizer).
    phases = {"generate": [], "rollout": []}

    def timed(name, f):
        def g(*args, **kw):
            t0 = time.perf_counter()
            out = f(*args, **kw)
            phases[name].append(time.perf_counter() - t0)
            return out
        return g

    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)
    rss_load = maxrss_bytes()
    trainer.train()
    print(json.dumps({
        "tool": "trl", "step_s": steps, "generate_s": phases["generate"], "rollout_s": phases["rollout"], "completion_len": lens, "prompt_lens": plens,
        "peak_rss_bytes": maxrss_bytes(), "peak_rss_before_load_bytes": rss_imports, "rss_after_setup_bytes": rss_load,
        "versions": {**versions(), "trl": trl.__version__, "transformers": transformers.__version__},
    }))


if __name__ == "__main__":
    main()
