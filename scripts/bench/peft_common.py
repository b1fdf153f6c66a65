"""What the PyTorch + PEFT benchmark scripts share (peft_sft.py, peft_rm.py, peft_ppo.py):
the common flags, torch's set-up, the LoRA training set-up, the timed step loop, peak RSS and
the library versions. Imported from the scripts' own folder."""
import argparse
import resource
import statistics
import time


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def parser(doc: str) -> argparse.ArgumentParser:
    """--model, --threads, --attn, --seed (every script), with the script's docstring as help."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face GPT-2 folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=1)
    return ap


def add_train_args(ap: argparse.ArgumentParser) -> None:
    """The training benches' flags: --steps, --targets, --r, --grad-checkpointing."""
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--targets", default="c_attn")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--grad-checkpointing", action="store_true")


def setup_torch(a):
    """Imports torch, quiets transformers, sets threads and seed; returns (torch, RSS after imports)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    return torch, maxrss_bytes()


def peft_train(model, a, task_type: str):
    """LoRA (r, alpha 2r, --targets, fan_in_fan_out, dropout 0.05, task_type) on `model` in train
    mode, with transformers' checkpointing recipe under --grad-checkpointing; returns
    (model, targets, trainable count, AdamW lr 1e-4 over the trainable parameters)."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    cfg = LoraConfig(task_type=task_type, r=a.r, lora_alpha=2 * a.r, target_modules=targets,
                     fan_in_fan_out=True, lora_dropout=0.05)
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, targets, sum(p.numel() for p in params), torch.optim.AdamW(params, lr=1e-4)


def peft_family_train(model, a):
    """LoRA for any model_type (r, alpha 2r, --targets: "all-linear" or a comma list, dropout
    0.05, CAUSAL_LM) on `model` in train mode; returns (model, targets, trainable count, AdamW lr 1e-4),
    as peft_train."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = a.targets if a.targets == "all-linear" else [t for t in a.targets.split(",") if t]
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=a.r, lora_alpha=2 * a.r, target_modules=targets, lora_dropout=0.05))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, targets, sum(p.numel() for p in params), torch.optim.AdamW(params, lr=1e-4)


def lm_step(model, opt, ids):
    """One training step on `ids` labelled by themselves: forward, backward, AdamW, zero_grad."""
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed_steps(steps: int, step) -> tuple:
    """1 warm-up + `steps` timed calls of step(); returns (the timed seconds, their median)."""
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
    return times, statistics.median(times)


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
