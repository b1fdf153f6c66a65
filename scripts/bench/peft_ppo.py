#!/usr/bin/env python3
"""The PyTorch + PEFT side of one `lorafit ppo` iteration (see docs/BENCHMARKS.md, "PPO").

The same work as a `lorafit ppo` iteration with batch_size = minibatch_size = --prompts,
ppo_epochs 1, top_k 0, no stop texts, written the way a transformers + PEFT user would:

  policy    GPT2LMHeadModel.from_pretrained(dir) + get_peft_model(LoRA r, alpha 2r, c_attn,
            fan_in_fan_out, dropout 0.05); eval mode throughout (no LoRA dropout, as lorafit)
  reference the same model under `with policy.disable_adapter():` (no second policy copy)
  reward    a separate AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1) +
            its own SEQ_CLS LoRA (a second full model), frozen
  critic    a value head Linear(768, 1, bias=False), initialised from the reward model's `score`,
            on the frozen reward model's final hidden states: lorafit's default critic
            (ppo.critic_adapter = false). Only the head trains.

One iteration, each phase timed (time.perf_counter):
  generate  policy.generate(prompts, do_sample=True, top_k=0, top_p=1, temperature 1,
            min_new_tokens = max_new_tokens = --new-tokens, KV cache) on --prompts random
            prompts of --prompt-len tokens (all the same length: no padding)
  score     the reward model on prompt + response + eos, reward at the last token (no grad)
  logprobs  policy log-probs of the response tokens, reference log-probs (adapter disabled),
            critic values (all no grad; logits only for the response positions: logits_to_keep)
  update    per-token rewards (-kl_coef·(logp - ref) + clipped score on the last token), GAE
            (gamma 1, lambda 0.95), whitened advantages; then one minibatch of all the rollouts:
            clipped policy loss + (detached) entropy, backward; clipped value loss (vf_coef 0.5),
            backward; clip_grad_norm_(1.0); AdamW (policy LoRA + value head)
--iterations iterations (default 2; lorafit's first includes warm-up, so the table reads the last).

torch.set_num_threads(--threads). Prints one JSON line: per-iteration phase times, response
lengths, peak_rss_bytes (ru_maxrss at the end), peak_rss_before_load_bytes (after the imports),
rss_after_load_bytes, and the process's Pss / Rss at the end (/proc/self/smaps_rollup: whether
the two models' memory-mapped weights are shared pages).

Usage: peft_ppo.py --model DIR [--prompts 4] [--prompt-len 64] [--new-tokens 32]
                   [--iterations 2] [--threads 2] [--attn sdpa|eager]
"""
import json
import time

from peft_common import maxrss_bytes, parser, setup_torch, versions


def smaps_rollup() -> dict:
    out = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("Rss:", "Pss:", "Pss_File:", "Pss_Anon:"):
                    out[parts[0].rstrip(":").lower() + "_bytes"] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    a = ap.parse_args()

    torch, rss_import = setup_torch(a)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel

    kl_coef, clip_range, value_clip, vf_coef, gamma, lam, reward_clip, temp = 0.1, 0.2, 0.4, 0.5, 1.0, 0.95, 10.0, 1.0

    lora = dict(r=a.r, lora_alpha=2 * a.r, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.05)
    policy = GPT2LMHeadModel.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **lora))
    policy.eval()
    rm = AutoModelForSequenceClassification.from_pretrained(
        a.model, num_labels=1, dtype=torch.float32, attn_implementation=a.attn)
    vocab, eos = rm.config.vocab_size, rm.config.eos_token_id
    pad = vocab - 1
    rm.config.pad_token_id = pad
    rm = get_peft_model(rm, LoraConfig(task_type="SEQ_CLS", **lora))
    rm.eval()
    rm.requires_grad_(False)
    backbone = rm.base_model.model.transformer  # the reward model's GPT2Model, its LoRA inside
    score_w = [p for n, p in rm.named_parameters() if "score" in n and "modules_to_save" in n][0]
    v_head = torch.nn.Linear(score_w.shape[1], 1, bias=False)
    with torch.no_grad():
        v_head.weight.copy_(score_w)
    rss_load = maxrss_bytes()

    params = [p for p in policy.parameters() if p.requires_grad] + list(v_head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(0, vocab - 1, (a.prompts, a.prompt_len), generator=g)
    P, N = a.prompt_len, a.new_tokens

    def logp_of(seqs, grad=False):
        """(B, N) log-probs of the response tokens and the detached logits' mean entropy."""
        logits = policy(input_ids=seqs, logits_to_keep=N + 1).logits[:, :-1] / temp
        lp_all = torch.log_softmax(logits.float(), -1)
        lp = lp_all.gather(-1, seqs[:, P:].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            d = lp_all.detach()
            ent = -(d.exp() * d).sum(-1).mean()
        return lp, ent

    def values_of(seqs):
        with torch.no_grad():
            h = backbone(input_ids=seqs).last_hidden_state[:, P - 1 : P + N - 1]
        return v_head(h).squeeze(-1)

    iters = []
    for it in range(a.iterations):
        t = {}
        clock = time.perf_counter()

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            t[f"time_{name}_s"] = now - clock
            clock = now

        # 1. generate
        with torch.no_grad():
            seqs = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                   top_k=0, top_p=1.0, temperature=temp, max_new_tokens=N, min_new_tokens=N,
                                   use_cache=True, pad_token_id=pad)
        assert seqs.shape == (a.prompts, P + N), seqs.shape
        lap("generate")
        # 2. score (eos appended)
        with torch.no_grad():
            scored = torch.cat([seqs, torch.full((a.prompts, 1), eos)], 1)
            scores = rm(input_ids=scored).logits.squeeze(-1).clamp(-reward_clip, reward_clip)
        lap("score")
        # 3. old log-probs, reference log-probs, values
        with torch.no_grad():
            old, _ = logp_of(seqs)
            with policy.disable_adapter():
                ref, _ = logp_of(seqs)
            old_v = values_of(seqs)
        lap("logprobs")
        # 4-6. rewards, GAE, one PPO minibatch
        rewards = -kl_coef * (old - ref)
        rewards[:, -1] += scores
        adv = torch.zeros_like(rewards)
        last = torch.zeros(a.prompts)
        for j in reversed(range(N)):
            nxt = old_v[:, j + 1] if j + 1 < N else torch.zeros(a.prompts)
            delta = rewards[:, j] + gamma * nxt - old_v[:, j]
            last = delta + gamma * lam * last
            adv[:, j] = last
        ret = adv + old_v
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
        lp, ent = logp_of(seqs, grad=True)
        ratio = (lp - old).exp()
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
        pg.backward()
        v = values_of(seqs)
        vc = old_v + (v - old_v).clamp(-value_clip, value_clip)
        vl = 0.5 * torch.maximum((v - ret) ** 2, (vc - ret) ** 2).mean()
        (vf_coef * vl).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lap("update")
        t["response_len"] = float(seqs.shape[1] - P)
        t["policy_loss"] = pg.item()
        t["value_loss"] = vl.item()
        t["entropy"] = ent.item()
        iters.append(t)

    print(json.dumps({
        "tool": "peft", "model": a.model, "prompts": a.prompts, "prompt_len": P, "new_tokens": N,
        "iterations": iters, "peak_rss_bytes": maxrss_bytes(), "rss_after_load_bytes": rss_load,
        "peak_rss_before_load_bytes": rss_import, **{"end_" + k: v for k, v in smaps_rollup().items()},
        "critic": "value head on the frozen reward model's hidden states", "threads": a.threads, "attn": a.attn,
        **versions(),
    }))


if __name__ == "__main__":
    main()
