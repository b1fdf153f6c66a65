"""Random models for scripts/bench/export.sh, in Hugging Face layout, with GPT-2's real tokenizer
(../shared/assets/gpt2/tokenizer.json; the vocabulary is padded to the model's rows).

  kogpt2-shape: GPT-2, 12 x 768, 12 heads, vocab 51,200, context 1024, f32 (as KoGPT2's checkpoint)
  llama-1b-shape: LLaMA, Llama-3.2-1B's shape: 16 x 2048, 32 heads / 8 kv heads, FFN 8192,
                  vocab 128,256, tied embeddings, rope theta 500000 (plain RoPE), bf16

    python scripts/bench/export_models.py --out DIR [--only kogpt2-shape]
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]


def gpt2(d: Path):
    c = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 51200, "n_positions": 1024, "n_ctx": 1024,
         "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
         "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True, "torch_dtype": "float32"}
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).contiguous()  # noqa: E731
    t = {"transformer.wte.weight": r(51200, 768), "transformer.wpe.weight": r(1024, 768),
         "transformer.ln_f.weight": torch.ones(768), "transformer.ln_f.bias": torch.zeros(768)}
    for i in range(12):
        p = f"transformer.h.{i}."
        t |= {p + "ln_1.weight": torch.ones(768), p + "ln_1.bias": torch.zeros(768), p + "ln_2.weight": torch.ones(768),
              p + "ln_2.bias": torch.zeros(768), p + "attn.c_attn.weight": r(768, 2304), p + "attn.c_attn.bias": torch.zeros(2304),
              p + "attn.c_proj.weight": r(768, 768), p + "attn.c_proj.bias": torch.zeros(768),
              p + "mlp.c_fc.weight": r(768, 3072), p + "mlp.c_fc.bias": torch.zeros(3072),
              p + "mlp.c_proj.weight": r(3072, 768), p + "mlp.c_proj.bias": torch.zeros(768)}
    return c, t


def llama(d: Path):
    H, L, F, V, NH, KV = 2048, 16, 8192, 128256, 32, 8
    c = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": H, "intermediate_size": F,
         "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": KV, "head_dim": 64,
         "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
         "hidden_act": "silu", "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": "bfloat16"}
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16).contiguous()  # noqa: E731
    one = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
    t = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": one(H)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": one(H), p + "post_attention_layernorm.weight": one(H),
              p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.k_proj.weight": r(KV * 64, H),
              p + "self_attn.v_proj.weight": r(KV * 64, H), p + "self_attn.o_proj.weight": r(H, H),
              p + "mlp.gate_proj.weight": r(F, H), p + "mlp.up_proj.weight": r(F, H), p + "mlp.down_proj.weight": r(H, F)}
    return c, t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    tok = ROOT.parent / "shared/assets/gpt2/tokenizer.json"
    for name, make in [("kogpt2-shape", gpt2), ("llama-1b-shape", llama)]:
        if a.only and name != a.only:
            continue
        d = a.out / name
        d.mkdir(parents=True, exist_ok=True)
        # The asset is the old tokenizer.json format (no "type" in the model); transformers writes
        # "type": "BPE", which llama.cpp's converter expects.
        tj = json.loads(tok.read_text(encoding="utf-8"))
        tj["model"] = {"type": "BPE", **tj["model"]}
        (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        if (d / "model.safetensors").is_file():
            continue
        c, t = make(d)
        (d / "config.json").write_text(json.dumps(c, indent=2))
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        print(name, sum(v.numel() for v in t.values()), "parameters")


if __name__ == "__main__":
    main()
