#!/usr/bin/env python3
"""Write a LLaMA-shaped Hugging Face model folder with random f16 weights, generated on the GPU.

For scripts/gpu-bench.sh: lorafit and PyTorch + PEFT then load the same folder. Default shape is
LLaMA-7B (32 x 4096, MLP 11008, 32 heads, vocab 32000; 6.74B parameters, 13.5 GB in f16), weights
N(0, 0.02) (HF's LLaMA init), norms 1, in 2 GB safetensors shards with an index. The tokenizer
is copied from --tokenizer (lorafit's byte-level builtin one): only `lorafit sft` reads it.

Usage: make_llama.py --out DIR --tokenizer tokenizer.json [--layers 32 --hidden 4096 ...]
Prints one JSON line: the folder, parameter count, bytes, seconds.
"""
import argparse
import json
import os
import shutil
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer.json to copy")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-bytes", type=int, default=2 << 30)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(a.seed)
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": a.hidden, "intermediate_size": a.intermediate, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.heads, "vocab_size": a.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float16", "lorafit_note": "random weights N(0, 0.02) for benchmarks (scripts/gpu/make_llama.py)",
    }
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copy(a.tokenizer, os.path.join(tmp, "tokenizer.json"))

    h, m = a.hidden, a.intermediate
    shapes = [("model.embed_tokens.weight", (a.vocab, h))]
    for i in range(a.layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.{n}.weight", (h, h)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shapes += [(f"{p}.mlp.gate_proj.weight", (m, h)), (f"{p}.mlp.up_proj.weight", (m, h)),
                   (f"{p}.mlp.down_proj.weight", (h, m))]
        shapes += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (a.vocab, h))]

    # Shard names need the shard count up front: plan the shards first, then fill them one by one.
    plan, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        nb = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        if cur and cur_bytes + nb > a.shard_bytes:
            plan.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nb
    if cur:
        plan.append(cur)
    weight_map, total_bytes, nparams = {}, 0, 0
    for k, names in enumerate(plan):
        fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, shape in names:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.float16)
            else:
                t = (torch.randn(shape, generator=g, device=dev, dtype=torch.float16) * 0.02).cpu()
            shard[name] = t
            total_bytes += t.numel() * 2
            nparams += t.numel()
            weight_map[name] = fname
        save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
        del shard
    shards = plan
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f)
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    print(json.dumps({"stage": "make-llama", "dir": a.out, "params": nparams, "bytes": total_bytes,
                      "shards": len(shards), "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
