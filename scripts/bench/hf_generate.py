#!/usr/bin/env python3
"""The transformers side of `lorafit bench generate` (see docs/BENCHMARKS.md).

Measures, for one configuration per process (so the peak RSS is that configuration's):
  load_s                     time of `GPT2LMHeadModel.from_pretrained(dir, dtype=...)` alone
                             (imports excluded, as lorafit's load_s excludes process start)
  peak_rss_after_load_bytes  ru_maxrss right after loading (includes the torch/transformers import)
  gen_s                      median over --repeats of one greedy `generate` call, after one warmup
  tokens_per_s               batch * new_tokens / gen_s
  peak_rss_bytes             ru_maxrss at the end
and prints one JSON line with the same keys as `lorafit bench generate --json`, plus
`peak_rss_before_load_bytes` (the process before any weight is read), `attn` and `threads`.

Generation: greedy (do_sample=False), use_cache=True, min_new_tokens = max_new_tokens (no early
stop), prompts of --prompt-len random token ids (seeded, uniform over the vocabulary), all rows the
same length (attention_mask all ones), under torch.inference_mode(), torch.set_num_threads(--threads).

Usage: hf_generate.py --model DIR --dtype f32|bf16 --batch 8 [--prompt-len 16] [--new-tokens 64]
                      [--repeats 3] [--attn sdpa|eager] [--threads 2]
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
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    rss_import = maxrss_bytes()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]

    t0 = time.perf_counter()
    model = GPT2LMHeadModel.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn)
    model.eval()
    load_s = time.perf_counter() - t0
    rss_load = maxrss_bytes()
    assert next(model.parameters()).dtype == dtype

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab, (a.batch, a.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    kw = dict(
        attention_mask=mask,
        max_new_tokens=a.new_tokens,
        min_new_tokens=a.new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=model.config.eos_token_id,
    )

    times = []
    with torch.inference_mode():
        out = model.generate(ids, **kw)  # warmup
        assert out.shape == (a.batch, a.prompt_len + a.new_tokens), out.shape
        for _ in range(max(1, a.repeats)):
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            times.append(time.perf_counter() - t)
            assert out.shape == (a.batch, a.prompt_len + a.new_tokens), out.shape
    gen_s = statistics.median(times)
    print(json.dumps({
        "tool": "transformers", "model": a.model, "dtype": a.dtype, "batch": a.batch,
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "load_s": load_s,
        "peak_rss_after_load_bytes": rss_load, "gen_s": gen_s,
        "tokens_per_s": a.batch * a.new_tokens / gen_s, "peak_rss_bytes": maxrss_bytes(),
        "peak_rss_before_load_bytes": rss_import, "attn": a.attn, "threads": a.threads,
        "gen_s_all": times, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }))


if __name__ == "__main__":
    main()
