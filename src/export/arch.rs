//! How each Hugging Face architecture becomes llama.cpp's: one [`Family`] entry per
//! `model_type`, with the GGUF architecture name, the metadata keys and the tensor names exactly
//! as llama.cpp's `convert_hf_to_gguf.py` writes them (`conversion/llama.py`, `conversion/gpt2.py`,
//! gguf-py `tensor_mapping.py`), and what must be done to a tensor on the way (the LLaMA q/k
//! row permutation, GPT-2's Conv1D transpose).
//!
//! Adding a family is one entry in [`FAMILIES`]: its block tensors, its global tensors and a
//! metadata function (most LLaMA-like families reuse [`llama_hparams`] and add their keys).
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::gguf::Value;

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
    /// `<arch>.*` metadata from config.json, in the converter's order.
    pub hparams: fn(&Json) -> Result<Vec<(String, Value)>>,
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

/// The families lorafit exports.
pub const FAMILIES: &[Family] = &[
    Family {
        model_types: &["llama"],
        arch: "llama",
        block_prefixes: &["model.layers."],
        block: LLAMA_BLOCK,
        global: LLAMA_GLOBAL,
        strip: &[],
        skip_suffixes: &[".rotary_emb.inv_freq"],
        hparams: llama_hparams,
    },
    Family {
        model_types: &["gpt2"],
        arch: "gpt2",
        block_prefixes: &["transformer.h.", "h."],
        block: GPT2_BLOCK,
        global: GPT2_GLOBAL,
        strip: &["transformer."],
        skip_suffixes: &[".attn.bias", ".attn.masked_bias"],
        hparams: gpt2_hparams,
    },
];

/// Families llama.cpp runs that lorafit loads or will load, not exported yet: the reason given.
const NOT_YET: &[(&str, &str)] = &[
    ("mistral", "llama"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gemma3_text", "gemma3"),
    ("gemma3", "gemma3"),
    ("exaone4", "exaone4"),
    ("gpt_neox", "gptneox"),
    ("phi3", "phi3"),
];

/// The family of `config.json`, or why it cannot be exported.
pub fn family(config: &Json) -> Result<&'static Family> {
    let mt = config.get("model_type").and_then(Json::as_str).context("config.json has no model_type")?;
    if let Some(f) = FAMILIES.iter().find(|f| f.model_types.contains(&mt)) {
        return Ok(f);
    }
    if let Some((_, arch)) = NOT_YET.iter().find(|(m, _)| *m == mt) {
        bail!(
            "model_type {mt:?}: llama.cpp runs it (as {arch:?}), but lorafit's GGUF export does not map its tensors yet; \
             `lorafit merge` it and run llama.cpp's convert_hf_to_gguf.py on the merged folder"
        )
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

fn num(c: &Json, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| c.get(*k).and_then(Json::as_f64))
}

fn int(c: &Json, keys: &[&str]) -> Result<u32> {
    num(c, keys).map(|x| x as u32).with_context(|| format!("config.json has no {}", keys.join(" / ")))
}

/// The rope parameters: `rope_parameters` (transformers 5) or `rope_scaling` + top-level `rope_theta`.
fn rope(c: &Json) -> (Option<f64>, Json) {
    let p = c.get("rope_parameters").or_else(|| c.get("rope_scaling")).filter(|v| v.is_object()).cloned().unwrap_or(Json::Null);
    let theta = p.get("rope_theta").and_then(Json::as_f64).or_else(|| num(c, &["rope_theta"]));
    (theta, p)
}

/// `llama.*`: TextModel.set_gguf_parameters + LlamaModel's, with transformers' config defaults
/// (the converter reads the config through AutoConfig, so defaults are always written).
pub fn llama_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let heads = int(c, &["num_attention_heads"])?;
    let hidden = int(c, &["hidden_size"])?;
    let head_dim = num(c, &["head_dim"]).map(|x| x as u32).unwrap_or(hidden / heads.max(1));
    let (theta, rp) = rope(c);
    let mut v = vec![
        ("block_count", Value::U32(int(c, &["num_hidden_layers"])?)),
        ("context_length", Value::U32(num(c, &["max_position_embeddings"]).map_or(2048, |x| x as u32))),
        ("embedding_length", Value::U32(hidden)),
        ("feed_forward_length", Value::U32(int(c, &["intermediate_size"])?)),
        ("attention.head_count", Value::U32(heads)),
        ("attention.head_count_kv", Value::U32(num(c, &["num_key_value_heads"]).map_or(heads, |x| x as u32))),
    ];
    match rp.get("rope_type").or_else(|| rp.get("type")).and_then(Json::as_str) {
        None | Some("default") => {}
        Some("linear") => {
            let f = rp.get("factor").and_then(Json::as_f64).context("rope linear scaling without a factor")?;
            v.push(("rope.scaling.type", Value::Str("linear".into())));
            v.push(("rope.scaling.factor", Value::F32(f as f32)));
        }
        Some(other) => bail!("rope_type {other:?} is not exported yet (lorafit exports plain and linear-scaled RoPE)"),
    }
    v.push(("rope.freq_base", Value::F32(theta.unwrap_or(10000.0) as f32)));
    v.push(("attention.layer_norm_rms_epsilon", Value::F32(num(c, &["rms_norm_eps"]).unwrap_or(1e-6) as f32)));
    v.push(("attention.key_length", Value::U32(head_dim)));
    v.push(("attention.value_length", Value::U32(head_dim)));
    v.push(("vocab_size", Value::U32(int(c, &["vocab_size"])?)));
    v.push(("rope.dimension_count", Value::U32(head_dim)));
    Ok(v.into_iter().map(|(k, x)| (format!("llama.{k}"), x)).collect())
}

/// `gpt2.*`: GPT2Model.set_gguf_parameters (context from n_ctx, else n_positions; the MLP
/// width from n_inner, which the converter writes as 4 * n_embd whatever n_inner says).
pub fn gpt2_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let embd = int(c, &["n_embd"])?;
    let v = vec![
        ("block_count", Value::U32(int(c, &["n_layer"])?)),
        ("context_length", Value::U32(int(c, &["n_ctx", "n_positions"])?)),
        ("embedding_length", Value::U32(embd)),
        ("feed_forward_length", Value::U32(num(c, &["n_inner"]).map_or(4 * embd, |x| x as u32))),
        ("attention.head_count", Value::U32(int(c, &["n_head"])?)),
        ("attention.layer_norm_epsilon", Value::F32(num(c, &["layer_norm_epsilon"]).unwrap_or(1e-5) as f32)),
    ];
    Ok(v.into_iter().map(|(k, x)| (format!("gpt2.{k}"), x)).collect())
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
        let e = family(&serde_json::json!({"model_type": "qwen3"})).err().unwrap().to_string();
        assert!(e.contains("qwen3") && e.contains("convert_hf_to_gguf"), "{e}");
    }

    #[test]
    fn permutation_matches_the_converters_and_inverts() {
        // LlamaModel.permute with 2 heads, head_dim 4, one column: rows [0..8] -> [0,2,1,3, 4,6,5,7].
        let x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(permute(&x, 8, 2).unwrap(), [0., 2., 1., 3., 4., 6., 5., 7.]);
        let y: Vec<f32> = (0..48).map(|v| v as f32).collect();
        assert_eq!(unpermute(&permute(&y, 16, 2).unwrap(), 16, 2).unwrap(), y);
    }
}
