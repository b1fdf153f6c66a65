//! How each Hugging Face architecture becomes llama.cpp's: one [`Family`] entry per
//! `model_type`, with the GGUF architecture name, the metadata keys and the tensor names exactly
//! as llama.cpp's `convert_hf_to_gguf.py` writes them (`conversion/llama.py`, `conversion/gpt2.py`,
//! gguf-py `tensor_mapping.py`), and what must be done to a tensor on the way (the LLaMA q/k
//! row permutation, GPT-2's Conv1D transpose).
//!
//! Adding a family is one entry in [`FAMILIES`]: its block tensors, its global tensors, a
//! metadata function (most reuse [`base_hparams`], the converter's `TextModel.set_gguf_parameters`,
//! and add their keys) and the tensors the converter generates (Llama 3's `rope_freqs`, Phi-3's
//! long/short rope factors). A setting llama.cpp's model would silently run differently from
//! transformers is refused by the metadata function, with the reason.
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::gguf::Value;
pub use super::hparams::*;

/// What is done to a checkpoint tensor before it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    None,
    /// GPT-2 Conv1D weights are stored [in, out]; GGUF wants [out, in].
    Transpose,
    /// LLaMA's q_proj / k_proj rows, reordered from HF's rotate-half RoPE to llama.cpp's
    /// interleaved pairs (`LlamaModel.permute`), over the query heads ...
    PermuteQ,
    /// ... or the key/value heads.
    PermuteK,
    /// Gemma's RMSNorm multiplies by `1 + w`; llama.cpp's by `w`: the converter writes `w + 1`.
    AddOne,
    /// GPT-NeoX's fused query_key_value rows, (heads, 3, head_dim) -> (3, heads, head_dim)
    /// (`GPTNeoXModel.modify_tensors`), over the attention heads.
    NeoxQkv,
}

/// One architecture llama.cpp runs.
pub struct Family {
    /// `model_type` values of config.json.
    pub model_types: &'static [&'static str],
    /// `general.architecture`, and the prefix of the family's metadata keys.
    pub arch: &'static str,
    /// Prefixes of per-layer checkpoint names, before the layer index.
    pub block_prefixes: &'static [&'static str],
    /// Per-layer tensors: checkpoint suffix (after `<prefix><i>.`) -> GGUF suffix (after `blk.<i>.`).
    pub block: &'static [(&'static str, &'static str, Transform)],
    /// Tensors outside the layers: checkpoint name (any `strip` prefix removed) -> GGUF name.
    pub global: &'static [(&'static str, &'static str, Transform)],
    /// Prefixes removed from global names (`transformer.` for GPT-2 checkpoints that have it).
    pub strip: &'static [&'static str],
    /// Checkpoint tensors that are not weights (buffers): skipped.
    pub skip_suffixes: &'static [&'static str],
    /// `<arch>.*` metadata from config.json, in the converter's order; Err: a setting llama.cpp
    /// cannot run, with the reason.
    pub hparams: fn(&Json) -> Result<Vec<(String, Value)>>,
    /// Tensors the converter computes from config.json (`generate_extra_tensors`): name, values.
    pub extra: fn(&Json) -> Result<Vec<(String, Vec<f32>)>>,
}

const LLAMA_BLOCK: &[(&str, &str, Transform)] = &[
    ("input_layernorm.weight", "attn_norm.weight", Transform::None),
    ("self_attn.q_proj.weight", "attn_q.weight", Transform::PermuteQ),
    ("self_attn.k_proj.weight", "attn_k.weight", Transform::PermuteK),
    ("self_attn.v_proj.weight", "attn_v.weight", Transform::None),
    ("self_attn.o_proj.weight", "attn_output.weight", Transform::None),
    ("self_attn.q_proj.bias", "attn_q.bias", Transform::PermuteQ),
    ("self_attn.k_proj.bias", "attn_k.bias", Transform::PermuteK),
    ("self_attn.v_proj.bias", "attn_v.bias", Transform::None),
    ("self_attn.o_proj.bias", "attn_output.bias", Transform::None),
    ("post_attention_layernorm.weight", "ffn_norm.weight", Transform::None),
    ("mlp.gate_proj.weight", "ffn_gate.weight", Transform::None),
    ("mlp.up_proj.weight", "ffn_up.weight", Transform::None),
    ("mlp.down_proj.weight", "ffn_down.weight", Transform::None),
    ("mlp.gate_proj.bias", "ffn_gate.bias", Transform::None),
    ("mlp.up_proj.bias", "ffn_up.bias", Transform::None),
    ("mlp.down_proj.bias", "ffn_down.bias", Transform::None),
];

const LLAMA_GLOBAL: &[(&str, &str, Transform)] = &[
    ("model.embed_tokens.weight", "token_embd.weight", Transform::None),
    ("model.norm.weight", "output_norm.weight", Transform::None),
    ("lm_head.weight", "output.weight", Transform::None),
];

const GPT2_BLOCK: &[(&str, &str, Transform)] = &[
    ("ln_1.weight", "attn_norm.weight", Transform::None),
    ("ln_1.bias", "attn_norm.bias", Transform::None),
    ("attn.c_attn.weight", "attn_qkv.weight", Transform::Transpose),
    ("attn.c_attn.bias", "attn_qkv.bias", Transform::None),
    ("attn.c_proj.weight", "attn_output.weight", Transform::Transpose),
    ("attn.c_proj.bias", "attn_output.bias", Transform::None),
    ("ln_2.weight", "ffn_norm.weight", Transform::None),
    ("ln_2.bias", "ffn_norm.bias", Transform::None),
    ("mlp.c_fc.weight", "ffn_up.weight", Transform::Transpose),
    ("mlp.c_fc.bias", "ffn_up.bias", Transform::None),
    ("mlp.c_proj.weight", "ffn_down.weight", Transform::Transpose),
    ("mlp.c_proj.bias", "ffn_down.bias", Transform::None),
];

const GPT2_GLOBAL: &[(&str, &str, Transform)] = &[
    ("wte.weight", "token_embd.weight", Transform::None),
    ("wpe.weight", "position_embd.weight", Transform::None),
    ("ln_f.weight", "output_norm.weight", Transform::None),
    ("ln_f.bias", "output_norm.bias", Transform::None),
    ("lm_head.weight", "output.weight", Transform::None),
];

/// Qwen2, EXAONE 4, ...: LLaMA's names, no permutation (llama.cpp runs them with NEOX rope, the
/// checkpoint's own rotate-half layout).
const NEOX_BLOCK: &[(&str, &str, Transform)] = &[
    ("input_layernorm.weight", "attn_norm.weight", Transform::None),
    ("self_attn.q_proj.weight", "attn_q.weight", Transform::None),
    ("self_attn.k_proj.weight", "attn_k.weight", Transform::None),
    ("self_attn.v_proj.weight", "attn_v.weight", Transform::None),
    ("self_attn.o_proj.weight", "attn_output.weight", Transform::None),
    ("self_attn.q_proj.bias", "attn_q.bias", Transform::None),
    ("self_attn.k_proj.bias", "attn_k.bias", Transform::None),
    ("self_attn.v_proj.bias", "attn_v.bias", Transform::None),
    ("self_attn.o_proj.bias", "attn_output.bias", Transform::None),
    ("self_attn.q_norm.weight", "attn_q_norm.weight", Transform::None),
    ("self_attn.k_norm.weight", "attn_k_norm.weight", Transform::None),
    ("post_attention_layernorm.weight", "ffn_norm.weight", Transform::None),
    ("mlp.gate_proj.weight", "ffn_gate.weight", Transform::None),
    ("mlp.up_proj.weight", "ffn_up.weight", Transform::None),
    ("mlp.down_proj.weight", "ffn_down.weight", Transform::None),
];

/// EXAONE 4: norms after attention and MLP only (`post_attention_layernorm` is a post norm).
const EXAONE4_BLOCK: &[(&str, &str, Transform)] = &[
    ("self_attn.q_proj.weight", "attn_q.weight", Transform::None),
    ("self_attn.k_proj.weight", "attn_k.weight", Transform::None),
    ("self_attn.v_proj.weight", "attn_v.weight", Transform::None),
    ("self_attn.o_proj.weight", "attn_output.weight", Transform::None),
    ("self_attn.q_norm.weight", "attn_q_norm.weight", Transform::None),
    ("self_attn.k_norm.weight", "attn_k_norm.weight", Transform::None),
    ("post_attention_layernorm.weight", "post_attention_norm.weight", Transform::None),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight", Transform::None),
    ("mlp.gate_proj.weight", "ffn_gate.weight", Transform::None),
    ("mlp.up_proj.weight", "ffn_up.weight", Transform::None),
    ("mlp.down_proj.weight", "ffn_down.weight", Transform::None),
];

/// Gemma 2 / 3: four norms per layer, each written as `1 + w`.
const GEMMA_BLOCK: &[(&str, &str, Transform)] = &[
    ("input_layernorm.weight", "attn_norm.weight", Transform::AddOne),
    ("self_attn.q_proj.weight", "attn_q.weight", Transform::None),
    ("self_attn.k_proj.weight", "attn_k.weight", Transform::None),
    ("self_attn.v_proj.weight", "attn_v.weight", Transform::None),
    ("self_attn.o_proj.weight", "attn_output.weight", Transform::None),
    ("self_attn.q_norm.weight", "attn_q_norm.weight", Transform::AddOne),
    ("self_attn.k_norm.weight", "attn_k_norm.weight", Transform::AddOne),
    ("post_attention_layernorm.weight", "post_attention_norm.weight", Transform::AddOne),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight", Transform::AddOne),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight", Transform::AddOne),
    ("mlp.gate_proj.weight", "ffn_gate.weight", Transform::None),
    ("mlp.up_proj.weight", "ffn_up.weight", Transform::None),
    ("mlp.down_proj.weight", "ffn_down.weight", Transform::None),
];

const GEMMA_GLOBAL: &[(&str, &str, Transform)] = &[
    ("model.embed_tokens.weight", "token_embd.weight", Transform::None),
    ("model.norm.weight", "output_norm.weight", Transform::AddOne),
];

/// Phi-3: fused qkv and gate_up, as llama.cpp keeps them.
const PHI3_BLOCK: &[(&str, &str, Transform)] = &[
    ("input_layernorm.weight", "attn_norm.weight", Transform::None),
    ("self_attn.qkv_proj.weight", "attn_qkv.weight", Transform::None),
    ("self_attn.o_proj.weight", "attn_output.weight", Transform::None),
    ("post_attention_layernorm.weight", "ffn_norm.weight", Transform::None),
    ("mlp.gate_up_proj.weight", "ffn_up.weight", Transform::None),
    ("mlp.down_proj.weight", "ffn_down.weight", Transform::None),
];

/// EXAONE 3.5 (`transformer.h.N`).
const EXAONE_BLOCK: &[(&str, &str, Transform)] = &[
    ("ln_1.weight", "attn_norm.weight", Transform::None),
    ("attn.attention.q_proj.weight", "attn_q.weight", Transform::None),
    ("attn.attention.k_proj.weight", "attn_k.weight", Transform::None),
    ("attn.attention.v_proj.weight", "attn_v.weight", Transform::None),
    ("attn.attention.out_proj.weight", "attn_output.weight", Transform::None),
    ("ln_2.weight", "ffn_norm.weight", Transform::None),
    ("mlp.c_fc_0.weight", "ffn_gate.weight", Transform::None),
    ("mlp.c_fc_1.weight", "ffn_up.weight", Transform::None),
    ("mlp.c_proj.weight", "ffn_down.weight", Transform::None),
];

const EXAONE_GLOBAL: &[(&str, &str, Transform)] = &[
    ("wte.weight", "token_embd.weight", Transform::None),
    ("ln_f.weight", "output_norm.weight", Transform::None),
    ("lm_head.weight", "output.weight", Transform::None),
];

const NEOX_BLOCK_GPT: &[(&str, &str, Transform)] = &[
    ("input_layernorm.weight", "attn_norm.weight", Transform::None),
    ("input_layernorm.bias", "attn_norm.bias", Transform::None),
    ("attention.query_key_value.weight", "attn_qkv.weight", Transform::NeoxQkv),
    ("attention.query_key_value.bias", "attn_qkv.bias", Transform::NeoxQkv),
    ("attention.dense.weight", "attn_output.weight", Transform::None),
    ("attention.dense.bias", "attn_output.bias", Transform::None),
    ("post_attention_layernorm.weight", "ffn_norm.weight", Transform::None),
    ("post_attention_layernorm.bias", "ffn_norm.bias", Transform::None),
    ("mlp.dense_h_to_4h.weight", "ffn_up.weight", Transform::None),
    ("mlp.dense_h_to_4h.bias", "ffn_up.bias", Transform::None),
    ("mlp.dense_4h_to_h.weight", "ffn_down.weight", Transform::None),
    ("mlp.dense_4h_to_h.bias", "ffn_down.bias", Transform::None),
];

const NEOX_GLOBAL: &[(&str, &str, Transform)] = &[
    ("gpt_neox.embed_in.weight", "token_embd.weight", Transform::None),
    ("gpt_neox.final_layer_norm.weight", "output_norm.weight", Transform::None),
    ("gpt_neox.final_layer_norm.bias", "output_norm.bias", Transform::None),
    ("embed_out.weight", "output.weight", Transform::None),
];

const ROTARY: &[&str] = &[".rotary_emb.inv_freq"];

fn no_extra(_: &Json) -> Result<Vec<(String, Vec<f32>)>> {
    Ok(vec![])
}

/// The families lorafit exports.
pub const FAMILIES: &[Family] = &[
    Family { model_types: &["llama", "mistral"], arch: "llama", block_prefixes: &["model.layers."], block: LLAMA_BLOCK, global: LLAMA_GLOBAL, strip: &[], skip_suffixes: ROTARY, hparams: llama_hparams, extra: llama3_rope_freqs },
    Family {
        model_types: &["gpt2"],
        arch: "gpt2",
        block_prefixes: &["transformer.h.", "h."],
        block: GPT2_BLOCK,
        global: GPT2_GLOBAL,
        strip: &["transformer."],
        skip_suffixes: &[".attn.bias", ".attn.masked_bias"],
        hparams: gpt2_hparams,
        extra: no_extra,
    },
    Family { model_types: &["qwen2"], arch: "qwen2", block_prefixes: &["model.layers."], block: NEOX_BLOCK, global: LLAMA_GLOBAL, strip: &[], skip_suffixes: ROTARY, hparams: qwen2_hparams, extra: no_extra },
    Family { model_types: &["qwen3"], arch: "qwen3", block_prefixes: &["model.layers."], block: NEOX_BLOCK, global: LLAMA_GLOBAL, strip: &[], skip_suffixes: ROTARY, hparams: qwen3_hparams, extra: no_extra },
    Family { model_types: &["gemma3_text"], arch: "gemma3", block_prefixes: &["model.layers."], block: GEMMA_BLOCK, global: GEMMA_GLOBAL, strip: &[], skip_suffixes: &["lm_head.weight"], hparams: gemma3_hparams, extra: no_extra },
    Family { model_types: &["gemma2"], arch: "gemma2", block_prefixes: &["model.layers."], block: GEMMA_BLOCK, global: GEMMA_GLOBAL, strip: &[], skip_suffixes: &["lm_head.weight"], hparams: gemma2_hparams, extra: no_extra },
    Family { model_types: &["exaone4"], arch: "exaone4", block_prefixes: &["model.layers."], block: EXAONE4_BLOCK, global: LLAMA_GLOBAL, strip: &[], skip_suffixes: ROTARY, hparams: exaone4_hparams, extra: llama3_rope_freqs },
    Family { model_types: &["exaone"], arch: "exaone", block_prefixes: &["transformer.h."], block: EXAONE_BLOCK, global: EXAONE_GLOBAL, strip: &["transformer."], skip_suffixes: ROTARY, hparams: exaone_hparams, extra: llama3_rope_freqs },
    Family { model_types: &["phi3"], arch: "phi3", block_prefixes: &["model.layers."], block: PHI3_BLOCK, global: LLAMA_GLOBAL, strip: &[], skip_suffixes: ROTARY, hparams: phi3_hparams, extra: phi3_rope_factors },
    Family { model_types: &["gpt_neox"], arch: "gptneox", block_prefixes: &["gpt_neox.layers."], block: NEOX_BLOCK_GPT, global: NEOX_GLOBAL, strip: &[], skip_suffixes: &[".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias"], hparams: gptneox_hparams, extra: no_extra },
];

/// model_types lorafit loads that llama.cpp cannot run from lorafit's file: the reason.
const REFUSED: &[(&str, &str)] = &[(
    "gemma3",
    "this is Gemma 3 with its vision tower: llama.cpp runs the text model from one GGUF and the vision tower from a separate mmproj GGUF, which lorafit does not write; \
     `lorafit merge` it and run llama.cpp's convert_hf_to_gguf.py (with --mmproj for the vision part)",
)];

/// The family of `config.json`, or why it cannot be exported.
pub fn family(config: &Json) -> Result<&'static Family> {
    let mt = config.get("model_type").and_then(Json::as_str).context("config.json has no model_type")?;
    if let Some(f) = FAMILIES.iter().find(|f| f.model_types.contains(&mt)) {
        return Ok(f);
    }
    if let Some((_, why)) = REFUSED.iter().find(|(m, _)| *m == mt) {
        bail!("model_type {mt:?}: {why}")
    }
    bail!("model_type {mt:?}: lorafit's GGUF export knows {}", FAMILIES.iter().flat_map(|f| f.model_types).copied().collect::<Vec<_>>().join(", "))
}

impl Family {
    /// The GGUF name of checkpoint tensor `name` and its transform; None: not written (a
    /// buffer). Err: a tensor llama.cpp's model has no place for. A checkpoint that stores a tied
    /// `lm_head.weight` gets `output.weight`, as the converter writes it.
    pub fn map(&self, name: &str) -> Result<Option<(String, Transform)>> {
        if self.skip_suffixes.iter().any(|s| name.ends_with(s)) {
            return Ok(None);
        }
        for p in self.block_prefixes {
            if let Some(rest) = name.strip_prefix(p) {
                let (i, suffix) = rest.split_once('.').with_context(|| format!("tensor {name}: no layer index"))?;
                let i: usize = i.parse().with_context(|| format!("tensor {name}: layer index {i:?}"))?;
                let (_, g, t) = self.block.iter().find(|(hf, _, _)| *hf == suffix).with_context(|| {
                    format!("tensor {name}: llama.cpp's {} model has no place for {suffix:?}, so it cannot be exported", self.arch)
                })?;
                return Ok(Some((format!("blk.{i}.{g}"), *t)));
            }
        }
        let bare = self.strip.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        match self.global.iter().find(|(hf, _, _)| *hf == bare) {
            Some((_, g, t)) => Ok(Some((g.to_string(), *t))),
            None => bail!("tensor {name}: llama.cpp's {} model has no place for it, so it cannot be exported", self.arch),
        }
    }
}

/// llama.cpp's q/k permutation of a [rows, cols] (or [rows]) tensor with `heads` heads:
/// rows `(h, 2, d/2)` -> `(h, d/2, 2)`. Its inverse is [`unpermute`].
pub fn permute(data: &[f32], rows: usize, heads: usize) -> Result<Vec<f32>> {
    reorder(data, rows, heads, false)
}

/// The inverse of [`permute`]: GGUF rows back to the checkpoint's.
pub fn unpermute(data: &[f32], rows: usize, heads: usize) -> Result<Vec<f32>> {
    reorder(data, rows, heads, true)
}

fn reorder(data: &[f32], rows: usize, heads: usize, inverse: bool) -> Result<Vec<f32>> {
    anyhow::ensure!(heads > 0 && rows % (2 * heads) == 0 && data.len() % rows == 0, "cannot permute {rows} rows over {heads} heads");
    let cols = data.len() / rows;
    let half = rows / heads / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                // source row (h, i, j) goes to row (h, j, i)
                let src = (h * 2 + i) * half + j;
                let dst = (h * half + j) * 2 + i;
                let (from, to) = if inverse { (dst, src) } else { (src, dst) };
                out[to * cols..(to + 1) * cols].copy_from_slice(&data[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// GPT-NeoX's fused qkv rows (heads, 3, head_dim) -> (3, heads, head_dim), on a [rows, cols]
/// (or [rows]) tensor.
pub fn neox_qkv(data: &[f32], rows: usize, heads: usize) -> Result<Vec<f32>> {
    anyhow::ensure!(heads > 0 && rows % (3 * heads) == 0 && data.len() % rows == 0, "cannot split {rows} qkv rows over {heads} heads");
    let cols = data.len() / rows;
    let d = rows / heads / 3;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..3 {
            for i in 0..d {
                let src = (h * 3 + j) * d + i;
                let dst = (j * heads + h) * d + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_as_llama_cpp() {
        let f = family(&serde_json::json!({"model_type": "llama"})).unwrap();
        assert_eq!(f.map("model.layers.3.self_attn.k_proj.weight").unwrap(), Some(("blk.3.attn_k.weight".into(), Transform::PermuteK)));
        assert_eq!(f.map("lm_head.weight").unwrap(), Some(("output.weight".into(), Transform::None)));
        assert!(f.map("model.layers.0.self_attn.q_norm.weight").is_err());
        let g = family(&serde_json::json!({"model_type": "gpt2"})).unwrap();
        assert_eq!(g.map("transformer.h.1.mlp.c_fc.weight").unwrap(), Some(("blk.1.ffn_up.weight".into(), Transform::Transpose)));
        assert_eq!(g.map("wpe.weight").unwrap(), Some(("position_embd.weight".into(), Transform::None)));
        assert_eq!(g.map("h.0.attn.bias").unwrap(), None);
        let e = family(&serde_json::json!({"model_type": "gemma3"})).err().unwrap().to_string();
        assert!(e.contains("mmproj") && e.contains("convert_hf_to_gguf"), "{e}");
        let n = family(&serde_json::json!({"model_type": "gpt_neox"})).unwrap();
        assert_eq!(n.map("gpt_neox.layers.1.attention.query_key_value.bias").unwrap(), Some(("blk.1.attn_qkv.bias".into(), Transform::NeoxQkv)));
        let g = family(&serde_json::json!({"model_type": "gemma3_text"})).unwrap();
        assert_eq!(g.map("model.norm.weight").unwrap(), Some(("output_norm.weight".into(), Transform::AddOne)));
        assert_eq!(g.map("lm_head.weight").unwrap(), None);
    }

    #[test]
    fn permutation_matches_the_converters_and_inverts() {
        // LlamaModel.permute with 2 heads, head_dim 4, one column: rows [0..8] -> [0,2,1,3, 4,6,5,7].
        let x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(permute(&x, 8, 2).unwrap(), [0., 2., 1., 3., 4., 6., 5., 7.]);
        let y: Vec<f32> = (0..48).map(|v| v as f32).collect();
        assert_eq!(unpermute(&permute(&y, 16, 2).unwrap(), 16, 2).unwrap(), y);
    }

    #[test]
    fn neox_qkv_matches_the_converter() {
        // 2 heads, head_dim 2: rows (h, qkv, d) = [q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1] -> q0 q1 k0 k1 v0 v1.
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(neox_qkv(&x, 12, 2).unwrap(), [0., 1., 6., 7., 2., 3., 8., 9., 4., 5., 10., 11.]);
    }

    #[test]
    fn llama3_rope_freqs_follow_the_converter() {
        // head_dim 12, theta 500000, factor 8, original context 16 (tests/fixtures/families/llama3).
        let c = serde_json::json!({"hidden_size": 32, "num_attention_heads": 4, "head_dim": 12, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 16, "rope_type": "llama3"}});
        let f = &llama3_rope_freqs(&c).unwrap()[0];
        assert_eq!(f.0, "rope_freqs.weight");
        assert_eq!(f.1.len(), 6);
        // wavelength 2*pi, between 16/4 and 16: smooth = (16/(2*pi) - 1)/3, 1/((1 - smooth)/8 + smooth)
        assert!((f.1[0] - 1.7359413).abs() < 1e-6, "{}", f.1[0]);
        assert_eq!(f.1[5], 8.0); // the lowest frequency: wavelength beyond 16
    }
}
