#!/usr/bin/env python3
"""Write a Hugging Face model folder of a real model's shape with random f32 weights, for the
family SFT benchmark (scripts/bench/families_sft.sh; docs/BENCHMARKS.md, "Model families").

Shapes (config.json as the hub has it, weights N(0, 0.02), norms 1; written tensor by tensor in
2 GB safetensors shards with an index, so the script never holds the whole model):
  llama-3.2-1b   meta-llama/Llama-3.2-1B: vocab 128,256, hidden 2,048, 16 layers, 32 / 8 heads,
                 head_dim 64, MLP 8,192, tied embeddings, llama3 rope (1.24B parameters, 4.9 GB)
  qwen3-0.6b     Qwen/Qwen3-0.6B: vocab 151,936, hidden 1,024, 28 layers, 16 / 8 heads, head_dim
                 128, MLP 3,072, q/k norms, tied embeddings (0.60B parameters, 2.4 GB)

Usage: make_family_model.py --shape llama-3.2-1b --out DIR   (does nothing if DIR/config.json exists)
"""
import argparse
import json
import os
import shutil

SHAPES = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
                         "rope_type": "llama3"},
        "torch_dtype": "float32",
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936, "torch_dtype": "float32",
    },
}


def tensors(c):
    """(name, shape) in checkpoint order."""
    h, f, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        for n, s in [("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))]:
            yield f"{p}.self_attn.{n}.weight", s
        if c["model_type"] == "qwen3":
            yield f"{p}.self_attn.q_norm.weight", (hd,)
            yield f"{p}.self_attn.k_norm.weight", (hd,)
        for n, s in [("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))]:
            yield f"{p}.mlp.{n}.weight", s
    yield "model.norm.weight", (h,)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-bytes", type=int, default=2 << 30)
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.out, "config.json")):
        return
    import torch
    from safetensors.torch import save_file

    cfg = dict(SHAPES[a.shape], lorafit_note=f"random weights N(0, 0.02), the shape of {a.shape} (scripts/bench/make_family_model.py)")
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    g = torch.Generator().manual_seed(0)
    shards, cur, size, total = [], {}, 0, 0  # shards: the tensor names of each file written

    def flush():
        shards.append(sorted(cur))
        save_file(cur, os.path.join(tmp, f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})

    for name, shape in tensors(cfg):
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        if cur and size + t.numel() * 4 > a.shard_bytes:
            flush()
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 4
        total += t.numel() * 4
    flush()
    del cur
    n, weight_map = len(shards), {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(tmp, f"shard-{i}.tmp"), os.path.join(tmp, fname))
        weight_map.update({k: fname for k in names})
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(os.path.join(tmp, "model.safetensors.index.json"), "w"), indent=1)
    json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"), indent=1)
    os.rename(tmp, a.out)
    print(json.dumps({"out": a.out, "shape": a.shape, "bytes": total}))


if __name__ == "__main__":
    main()
