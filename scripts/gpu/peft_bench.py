#!/usr/bin/env python3
"""The PyTorch + PEFT side of scripts/gpu-bench.sh: LoRA SFT steps on one GPU.

What `lorafit bench sft` does, the way a PEFT user writes it:
  model = AutoModelForCausalLM.from_pretrained(dir, dtype=bf16|f16|f32, attn_implementation="sdpa")
  on the GPU; optional gradient_checkpointing_enable(use_reentrant=False) + enable_input_require_grads();
  get_peft_model(LoraConfig(r, lora_alpha=2r, lora_dropout=0.05, target_modules)) (PEFT keeps the
  adapter weights in f32 over a half-precision base, as lorafit does); AdamW (lr 1e-4) over them;
  a step = forward(input_ids, labels=input_ids) + backward + step + zero_grad on one seeded random
  batch (B x T), then torch.cuda.synchronize(). 1 warm-up step + --steps timed; the median is reported.

Prints one JSON line (the keys of `lorafit bench sft --json`, plus torch's GPU memory counters:
max_memory_allocated / max_memory_reserved, i.e. tensors / the caching allocator's hold; the
process's whole GPU use, CUDA context included, is measured from outside by gpu-bench.sh).
"""
import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--targets", default="c_attn")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to test this script)")
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(a.seed)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn,
                                                 device_map={"": 0 if cuda else "cpu"}, low_cpu_mem_usage=True)
    sync()
    load_s = time.perf_counter() - t0
    targets = "all-linear" if a.targets == "all-linear" else [t.strip() for t in a.targets.split(",") if t.strip()]
    is_gpt2 = model.config.model_type == "gpt2"
    cfg = LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=targets, lora_dropout=0.05,
                     fan_in_fan_out=is_gpt2, task_type="CAUSAL_LM")
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    adapter_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    opt = torch.optim.AdamW(params, lr=1e-4)
    mem_after_load = torch.cuda.max_memory_allocated() if cuda else None

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(dev)

    times, losses = [], []
    for i in range(a.steps + 1):
        sync()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t
        losses.append(float(out.loss.detach()))
        del out
        if i > 0:
            times.append(dt)
    med = statistics.median(times)
    import peft
    import transformers
    print(json.dumps({
        "tool": "peft", "model": a.model, "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "targets": targets,
        "r": a.r, "grad_checkpointing": a.grad_checkpointing, "trainable_params": trainable,
        "adapter_dtypes": adapter_dtypes, "load_s": load_s,
        "step_s_median": med, "step_s_all": times, "tokens_per_s": a.batch * a.seq / med, "losses": losses,
        "torch_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "torch_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "torch_allocated_after_load_bytes": mem_after_load, "attn": a.attn,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
