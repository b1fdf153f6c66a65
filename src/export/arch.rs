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
use anyhow::{bail, ensure, Context, Result};
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

fn num(c: &Json, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| c.get(*k).and_then(Json::as_f64))
}

fn int(c: &Json, keys: &[&str]) -> Result<u32> {
    num(c, keys).map(|x| x as u32).with_context(|| format!("config.json has no {}", keys.join(" / ")))
}

/// The rope parameters as the converter normalises them (`ModelBase.__init__`):
/// `rope_parameters` (transformers 5) or `rope_scaling`, with the top-level `rope_theta`,
/// `type`, `partial_rotary_factor` and `original_max_position_embeddings` mirrored in unless
/// the parameters are per attention kind (`full_attention` / `sliding_attention`).
fn rope_params(c: &Json) -> Json {
    let mut p = c.get("rope_parameters").or_else(|| c.get("rope_scaling")).filter(|v| v.is_object()).cloned().unwrap_or(serde_json::json!({}));
    let o = p.as_object_mut().expect("an object");
    if !o.contains_key("full_attention") && !o.contains_key("sliding_attention") {
        if let Some(t) = ["rope_local_base_freq", "local_rope_theta"].iter().find_map(|k| c.get(*k).filter(|v| v.is_number())) {
            o.insert("sliding_attention".into(), serde_json::json!({"rope_theta": t}));
        }
        if !o.contains_key("rope_theta") {
            if let Some(t) = ["rope_theta", "rotary_emb_base"].iter().find_map(|k| c.get(*k).filter(|v| v.is_number())) {
                o.insert("rope_theta".into(), t.clone());
            }
        }
        if !o.contains_key("rope_type") {
            if let Some(t) = o.get("type").cloned() {
                o.insert("rope_type".into(), t);
            }
        }
        for k in ["partial_rotary_factor", "original_max_position_embeddings"] {
            if !o.contains_key(k) {
                if let Some(v) = c.get(k).filter(|v| v.is_number()) {
                    o.insert(k.into(), v.clone());
                }
            }
        }
    }
    p
}

/// The parameters of the full-attention layers (the whole object when not split by kind).
fn full_rope(p: &Json) -> &Json {
    p.get("full_attention").unwrap_or(p)
}

fn f32v(x: f64) -> Value {
    Value::F32(x as f32)
}

/// `head_dim` when config.json states it (not null).
fn head_dim(c: &Json) -> Option<u32> {
    num(c, &["head_dim"]).map(|x| x as u32)
}

/// `TextModel.set_gguf_parameters`: the keys every text family gets (unprefixed), in its order.
pub fn base_hparams(c: &Json) -> Result<Vec<(&'static str, Value)>> {
    let mut v = vec![("block_count", Value::U32(int(c, &["n_layers", "num_hidden_layers", "n_layer", "num_layers"])?))];
    if let Some(x) = num(c, &["max_position_embeddings", "n_ctx", "n_positions"]) {
        v.push(("context_length", Value::U32(x as u32)));
    }
    if let Some(x) = num(c, &["hidden_size", "n_embd"]) {
        v.push(("embedding_length", Value::U32(x as u32)));
    }
    if let Some(x) = num(c, &["intermediate_size", "n_inner"]) {
        v.push(("feed_forward_length", Value::U32(x as u32)));
    }
    if let Some(x) = num(c, &["num_attention_heads", "n_head"]) {
        v.push(("attention.head_count", Value::U32(x as u32)));
    }
    if let Some(x) = num(c, &["num_key_value_heads"]) {
        v.push(("attention.head_count_kv", Value::U32(x as u32)));
    }
    let p = rope_params(c);
    let fr = full_rope(&p);
    let factor = fr.get("factor").and_then(Json::as_f64);
    match fr.get("rope_type").and_then(Json::as_str) {
        Some("linear") if factor.is_some() => {
            v.push(("rope.scaling.type", Value::Str("linear".into())));
            v.push(("rope.scaling.factor", f32v(factor.unwrap())));
        }
        Some("yarn") if factor.is_some() => {
            v.push(("rope.scaling.type", Value::Str("yarn".into())));
            v.push(("rope.scaling.factor", f32v(factor.unwrap())));
            let orig = fr.get("original_max_position_embeddings").and_then(Json::as_f64).context("yarn rope_parameters without original_max_position_embeddings")?;
            v.push(("rope.scaling.original_context_length", Value::U32(orig as u32)));
            for (k, keys) in [
                ("rope.scaling.yarn_ext_factor", &["extrapolation_factor"][..]),
                ("rope.scaling.yarn_attn_factor", &["attention_factor", "attn_factor"][..]),
                ("rope.scaling.yarn_beta_fast", &["beta_fast"][..]),
                ("rope.scaling.yarn_beta_slow", &["beta_slow"][..]),
            ] {
                if let Some(x) = keys.iter().find_map(|key| fr.get(*key).and_then(Json::as_f64)) {
                    v.push((k, f32v(x)));
                }
            }
        }
        Some("su" | "longrope") => v.push(("rope.scaling.type", Value::Str("longrope".into()))),
        // default: nothing; llama3: the rope_freqs tensor; dynamic: llama.cpp has no NTK scaling.
        Some("dynamic") => bail!("rope_type \"dynamic\" (NTK-aware scaling): llama.cpp has no such RoPE, so it would compute other logits than transformers"),
        _ => {}
    }
    if let Some(t) = fr.get("rope_theta").and_then(Json::as_f64) {
        v.push(("rope.freq_base", f32v(t)));
    }
    if let Some(t) = p.get("sliding_attention").and_then(|s| s.get("rope_theta")).and_then(Json::as_f64) {
        v.push(("rope.freq_base_swa", f32v(t)));
    }
    if let Some(e) = num(c, &["rms_norm_eps", "norm_eps"]) {
        v.push(("attention.layer_norm_rms_epsilon", f32v(e)));
    }
    if let Some(e) = num(c, &["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"]) {
        v.push(("attention.layer_norm_epsilon", f32v(e)));
    }
    if let Some(d) = head_dim(c) {
        v.push(("attention.key_length", Value::U32(d)));
        v.push(("attention.value_length", Value::U32(d)));
    }
    Ok(v)
}

fn prefixed(arch: &str, v: Vec<(&str, Value)>) -> Vec<(String, Value)> {
    v.into_iter().map(|(k, x)| (format!("{arch}.{k}"), x)).collect()
}

/// Replaces the value of `k` in place (the converter's writer keeps a key's first position
/// when a subclass writes it again) or appends it.
fn set(v: &mut Vec<(&'static str, Value)>, k: &'static str, x: Value) {
    match v.iter_mut().find(|(key, _)| *key == k) {
        Some(e) => e.1 = x,
        None => v.push((k, x)),
    }
}

/// The attention head size: `head_dim`, else hidden / heads.
fn head_size(c: &Json) -> Result<u32> {
    Ok(head_dim(c).unwrap_or(int(c, &["hidden_size"])? / int(c, &["num_attention_heads"])?.max(1)))
}

/// `llama.*` (Llama, Llama 3.x, Mistral): TextModel's keys + LlamaModel's (vocab size, rope
/// dimensions). transformers' LlamaConfig always has a head_dim; Mistral's only when stated.
pub fn llama_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let mut v = base_hparams(c)?;
    if head_dim(c).is_none() && c.get("model_type").and_then(Json::as_str) == Some("llama") {
        let d = head_size(c)?;
        v.push(("attention.key_length", Value::U32(d)));
        v.push(("attention.value_length", Value::U32(d)));
    }
    v.push(("vocab_size", Value::U32(int(c, &["vocab_size"])?)));
    v.push(("rope.dimension_count", Value::U32(head_size(c)?)));
    Ok(prefixed("llama", v))
}

/// Notes for settings llama.cpp's model ignores but that leave the logits unchanged up to a
/// context length (Mistral's / Qwen2's / Phi-3's sliding window: llama.cpp's llama and qwen2
/// attend to the whole context, and its phi3 disables the window it reads).
pub fn notes(c: &Json, arch: &str) -> Vec<String> {
    let sw = num(c, &["sliding_window"]);
    let used = match arch {
        "llama" | "phi3" => sw.is_some(),
        "qwen2" => sw.is_some() && c.get("use_sliding_window").and_then(Json::as_bool) == Some(true),
        _ => false,
    };
    match (used, sw) {
        (true, Some(w)) => vec![format!(
            "config.json's sliding_window = {w}: llama.cpp's {arch} model has no sliding-window attention, so it matches transformers for contexts up to {w} tokens and attends to the whole context beyond"
        )],
        _ => vec![],
    }
}

/// `qwen2.*`: TextModel's keys.
pub fn qwen2_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    Ok(prefixed("qwen2", base_hparams(c)?))
}

/// `qwen3.*`: TextModel's keys (Qwen3Config always has a head_dim).
pub fn qwen3_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let mut v = base_hparams(c)?;
    if head_dim(c).is_none() {
        let d = head_size(c)?;
        v.push(("attention.key_length", Value::U32(d)));
        v.push(("attention.value_length", Value::U32(d)));
    }
    Ok(prefixed("qwen3", v))
}

/// What llama.cpp's Gemma 2 / 3 cannot represent, checked for both.
fn gemma_checks(c: &Json, arch: &str, n_layer_27b: u32) -> Result<()> {
    if c.get("tie_word_embeddings").and_then(Json::as_bool) == Some(false) {
        bail!("tie_word_embeddings is false: llama.cpp's {arch} always uses the token embedding as the output layer (its converter drops lm_head.weight), so a separate lm_head would be lost")
    }
    // llama.cpp's query scale: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B size
    // (told by the layer count); query_pre_attn_scalar is not in the file.
    let layers = int(c, &["num_hidden_layers"])?;
    let want = if layers == n_layer_27b { int(c, &["hidden_size"])? / int(c, &["num_attention_heads"])?.max(1) } else { head_size(c)? };
    if let Some(q) = num(c, &["query_pre_attn_scalar"]) {
        if (q - want as f64).abs() > 1e-9 {
            bail!("query_pre_attn_scalar = {q}: llama.cpp's {arch} scales queries by 1/sqrt({want}) for a model of {layers} layers, so it would compute other logits than transformers")
        }
    }
    Ok(())
}

/// `gemma3.*`: TextModel's keys, then Gemma3Model's (defaults of Gemma3TextConfig).
pub fn gemma3_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    gemma_checks(c, "gemma3", 62)?;
    if num(c, &["attn_logit_softcapping"]).is_some() {
        bail!("attn_logit_softcapping is set: llama.cpp's gemma3 has no attention soft-capping (its converter refuses such a model)")
    }
    let layers = int(c, &["num_hidden_layers"])?;
    let window = num(c, &["sliding_window"]);
    let pattern = num(c, &["sliding_window_pattern"]);
    // llama.cpp reads no layer pattern from a gemma3 file: every 6th layer is global.
    if window.is_some() && pattern != Some(1.0) {
        let want: Vec<bool> = (0..layers).map(|i| (i + 1) % 6 != 0).collect();
        let got: Option<Vec<bool>> = c.get("layer_types").and_then(Json::as_array).map(|a| a.iter().map(|t| t.as_str() == Some("sliding_attention")).collect());
        let got = got.unwrap_or_else(|| (0..layers).map(|i| (i + 1) % pattern.unwrap_or(6.0) as u32 != 0).collect());
        if got != want {
            bail!("layer_types {got:?} (true = sliding): llama.cpp's gemma3 makes every 6th layer global ({want:?}), so it would compute other logits than transformers")
        }
    }
    let mut v = base_hparams(c)?;
    set(&mut v, "context_length", Value::U32(num(c, &["max_position_embeddings"]).map_or(131072, |x| x as u32)));
    set(&mut v, "attention.head_count", Value::U32(num(c, &["num_attention_heads"]).map_or(8, |x| x as u32)));
    set(&mut v, "attention.layer_norm_rms_epsilon", f32v(num(c, &["rms_norm_eps"]).unwrap_or(1e-6)));
    set(&mut v, "attention.key_length", Value::U32(head_dim(c).unwrap_or(256)));
    set(&mut v, "attention.value_length", Value::U32(head_dim(c).unwrap_or(256)));
    let p = rope_params(c);
    set(&mut v, "rope.freq_base", f32v(full_rope(&p).get("rope_theta").and_then(Json::as_f64).unwrap_or(1_000_000.0)));
    if let Some(cap) = num(c, &["final_logit_softcapping"]).filter(|x| *x != 0.0) {
        set(&mut v, "final_logit_softcapping", f32v(cap));
    }
    if pattern != Some(1.0) {
        set(&mut v, "attention.sliding_window", Value::U32(window.context("config.json has no sliding_window")? as u32));
    }
    set(&mut v, "attention.head_count_kv", Value::U32(num(c, &["num_key_value_heads"]).map_or(4, |x| x as u32)));
    Ok(prefixed("gemma3", v))
}

/// `gemma2.*`: Gemma2Model's own list (it does not call TextModel's).
pub fn gemma2_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    gemma_checks(c, "gemma2", 46)?;
    // llama.cpp reads no layer pattern from a gemma2 file: even layers sliding, odd global.
    if let Some(a) = c.get("layer_types").and_then(Json::as_array) {
        let got: Vec<bool> = a.iter().map(|t| t.as_str() == Some("sliding_attention")).collect();
        let want: Vec<bool> = (0..got.len()).map(|i| i % 2 == 0).collect();
        if got != want {
            bail!("layer_types {got:?} (true = sliding): llama.cpp's gemma2 alternates sliding and global layers ({want:?}), so it would compute other logits than transformers")
        }
    }
    let heads = int(c, &["num_attention_heads"])?;
    let v = vec![
        ("context_length", Value::U32(int(c, &["max_position_embeddings"])?)),
        ("embedding_length", Value::U32(int(c, &["hidden_size"])?)),
        ("block_count", Value::U32(int(c, &["num_hidden_layers"])?)),
        ("feed_forward_length", Value::U32(int(c, &["intermediate_size"])?)),
        ("attention.head_count", Value::U32(heads)),
        ("attention.head_count_kv", Value::U32(num(c, &["num_key_value_heads"]).map_or(heads, |x| x as u32))),
        ("attention.layer_norm_rms_epsilon", f32v(num(c, &["rms_norm_eps"]).context("config.json has no rms_norm_eps")?)),
        ("attention.key_length", Value::U32(head_size(c)?)),
        ("attention.value_length", Value::U32(head_size(c)?)),
        ("attn_logit_softcapping", f32v(num(c, &["attn_logit_softcapping"]).context("config.json has no attn_logit_softcapping")?)),
        ("final_logit_softcapping", f32v(num(c, &["final_logit_softcapping"]).context("config.json has no final_logit_softcapping")?)),
        ("attention.sliding_window", Value::U32(int(c, &["sliding_window"])?)),
    ];
    Ok(prefixed("gemma2", v))
}

/// `exaone4.*`: TextModel's keys, the vocabulary size and the sliding-window layer pattern.
pub fn exaone4_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let mut v = base_hparams(c)?;
    v.push(("vocab_size", Value::U32(int(c, &["vocab_size"])?)));
    let layers_n = int(c, &["num_hidden_layers"])?;
    let any_sliding = c.get("layer_types").and_then(Json::as_array).map_or(num(c, &["sliding_window_pattern"]).is_some() || c.get("sliding_window_pattern").is_some_and(Json::is_string), |a| {
        a.iter().any(|t| t.as_str() == Some("sliding_attention"))
    });
    if num(c, &["sliding_window"]).is_some() && any_sliding && layers_n != 64 {
        bail!("sliding-window layers in a model of {layers_n} layers: llama.cpp's exaone4 applies the sliding window (and the global layers' missing RoPE) only to the 64-layer model, so it would compute other logits than transformers")
    }
    if let Some(w) = num(c, &["sliding_window"]) {
        v.push(("attention.sliding_window", Value::U32(w as u32)));
        let layers = int(c, &["num_hidden_layers"])? as usize;
        let pattern: Option<Vec<bool>> = if let Some(a) = c.get("layer_types").and_then(Json::as_array) {
            Some(a.iter().map(|t| t.as_str() == Some("sliding_attention")).collect())
        } else if let Some(s) = c.get("sliding_window_pattern").and_then(Json::as_str) {
            Some((0..layers).map(|i| s.as_bytes().get(i % s.len().max(1)) == Some(&b'L')).collect())
        } else {
            num(c, &["sliding_window_pattern"]).map(|n| (0..layers).map(|i| (i + 1) % (n as usize).max(1) != 0).collect())
        };
        if let Some(p) = pattern.filter(|p| p.len() == layers) {
            v.push(("attention.sliding_window_pattern", Value::Arr(p.into_iter().map(Value::Bool).collect())));
        }
    }
    Ok(prefixed("exaone4", v))
}

/// `exaone.*` (EXAONE 3.5): TextModel's keys and the rope dimensions.
pub fn exaone_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    if let Some(a) = c.get("activation_function").and_then(Json::as_str).filter(|a| *a != "silu") {
        bail!("activation_function {a:?}: llama.cpp's exaone runs SiLU only")
    }
    let mut v = base_hparams(c)?;
    // transformers' ExaoneConfig reads layer_norm_epsilon as rms_norm_eps, as the converter writes it.
    if let Some(i) = v.iter().position(|(k, _)| *k == "attention.layer_norm_epsilon") {
        v[i].0 = "attention.layer_norm_rms_epsilon";
    }
    let p = rope_params(c);
    let f = p.get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
    let hs = int(c, &["hidden_size"])? / int(c, &["num_attention_heads"])?.max(1);
    v.push(("rope.dimension_count", Value::U32((f * hs as f64) as u32)));
    Ok(prefixed("exaone", v))
}

/// `phi3.*`: Phi3MiniModel's own list.
pub fn phi3_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let p = rope_params(c);
    let embd = int(c, &["hidden_size"])?;
    let heads = int(c, &["num_attention_heads"])?;
    let rot = p.get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
    let orig = p.get("original_max_position_embeddings").and_then(Json::as_f64).context("config.json has no original_max_position_embeddings")?;
    let fr = full_rope(&p);
    let v = vec![
        ("context_length", Value::U32(int(c, &["n_positions", "max_position_embeddings"])?)),
        ("rope.scaling.original_context_length", Value::U32(orig as u32)),
        ("embedding_length", Value::U32(embd)),
        ("feed_forward_length", Value::U32(int(c, &["intermediate_size"])?)),
        ("block_count", Value::U32(int(c, &["num_hidden_layers"])?)),
        ("attention.head_count", Value::U32(heads)),
        ("attention.head_count_kv", Value::U32(int(c, &["num_key_value_heads"])?)),
        ("attention.layer_norm_rms_epsilon", f32v(num(c, &["rms_norm_eps"]).context("config.json has no rms_norm_eps")?)),
        ("rope.dimension_count", Value::U32(((rot * embd as f64) as u32) / heads.max(1))),
        ("rope.freq_base", f32v(fr.get("rope_theta").and_then(Json::as_f64).context("config.json has no rope_theta")?)),
        ("attention.sliding_window", Value::U32(num(c, &["sliding_window"]).map_or(0, |x| x as u32))),
    ];
    let mut v = v;
    if let Some(a) = phi3_attn_factor(c, &p)? {
        v.push(("rope.scaling.attn_factor", f32v(a)));
    }
    Ok(prefixed("phi3", v))
}

/// Phi-3 long-context: the attention factor the converter writes with the factor tensors.
fn phi3_attn_factor(c: &Json, p: &Json) -> Result<Option<f64>> {
    if p.get("long_factor").and_then(Json::as_array).is_none_or(|a| a.is_empty()) {
        return Ok(None);
    }
    let max = num(c, &["n_positions", "max_position_embeddings"]).context("config.json has no max_position_embeddings")?;
    let orig = p.get("original_max_position_embeddings").and_then(Json::as_f64).context("no original_max_position_embeddings")?;
    let scale = max / orig;
    let t = p.get("rope_type").or_else(|| p.get("type")).and_then(Json::as_str).unwrap_or("").to_lowercase();
    Ok(Some(match t.as_str() {
        "su" | "longrope" => if scale > 1.0 { (1.0 + scale.ln() / orig.ln()).sqrt() } else { 1.0 },
        "yarn" => if scale > 1.0 { 0.1 * scale.ln() + 1.0 } else { 1.0 },
        other => bail!("Phi-3 rope_type {other:?} with long/short factors: the converter knows longrope and yarn"),
    }))
}

/// `rope_factors_long` / `rope_factors_short` of a long-context Phi-3.
pub fn phi3_rope_factors(c: &Json) -> Result<Vec<(String, Vec<f32>)>> {
    let p = rope_params(c);
    let get = |k: &str| p.get(k).and_then(Json::as_array).map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect::<Vec<f32>>());
    match (get("long_factor"), get("short_factor")) {
        (Some(l), Some(s)) if !l.is_empty() => {
            let embd = int(c, &["hidden_size"])?;
            let rot = p.get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
            let dims = ((rot * embd as f64) as u32 / int(c, &["num_attention_heads"])?.max(1)) as usize;
            ensure!(l.len() == s.len() && 2 * l.len() == dims, "rope long/short factors of {} and {} values; {dims} rope dimensions need {}", l.len(), s.len(), dims / 2);
            Ok(vec![("rope_factors_long.weight".into(), l), ("rope_factors_short.weight".into(), s)])
        }
        _ => Ok(vec![]),
    }
}

/// `gptneox.*`: GPTNeoXModel's own list (no rope base: llama.cpp's default 10000 is the
/// checkpoints'; another base is written as `rope.freq_base`, which llama.cpp reads).
pub fn gptneox_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let p = rope_params(c);
    let embd = int(c, &["hidden_size"])?;
    let heads = int(c, &["num_attention_heads"])?;
    let pct = num(c, &["rotary_pct"]).or_else(|| p.get("partial_rotary_factor").and_then(Json::as_f64)).unwrap_or(1.0);
    let mut v = vec![
        ("context_length", Value::U32(int(c, &["max_position_embeddings"])?)),
        ("embedding_length", Value::U32(embd)),
        ("block_count", Value::U32(int(c, &["num_hidden_layers"])?)),
        ("feed_forward_length", Value::U32(int(c, &["intermediate_size"])?)),
        ("rope.dimension_count", Value::U32((pct * (embd / heads.max(1)) as f64) as u32)),
        ("attention.head_count", Value::U32(heads)),
        ("use_parallel_residual", Value::Bool(c.get("use_parallel_residual").and_then(Json::as_bool).unwrap_or(true))),
        ("attention.layer_norm_epsilon", f32v(num(c, &["layer_norm_eps"]).context("config.json has no layer_norm_eps")?)),
    ];
    if let Some(t) = full_rope(&p).get("rope_theta").and_then(Json::as_f64).filter(|t| *t != 10000.0) {
        v.push(("rope.freq_base", f32v(t)));
    }
    if let Some(t) = full_rope(&p).get("rope_type").and_then(Json::as_str).filter(|t| *t != "default") {
        bail!("rope_type {t:?}: llama.cpp's gptneox runs plain RoPE only")
    }
    Ok(prefixed("gptneox", v))
}

/// Llama 3's rope scaling as the `rope_freqs` tensor (`LlamaModel.generate_extra_tensors`):
/// one factor per rotated pair, computed in f32 as torch does.
pub fn llama3_rope_freqs(c: &Json) -> Result<Vec<(String, Vec<f32>)>> {
    let p = rope_params(c);
    let fr = full_rope(&p);
    if !fr.get("rope_type").and_then(Json::as_str).is_some_and(|t| t.eq_ignore_ascii_case("llama3")) {
        return Ok(vec![]);
    }
    let g = |k: &str, d: f64| fr.get(k).and_then(Json::as_f64).unwrap_or(d);
    let base = g("rope_theta", 10000.0) as f32;
    let dim = head_size(c)? as usize;
    let (factor, low, high, old) = (g("factor", 8.0), g("low_freq_factor", 1.0), g("high_freq_factor", 4.0), g("original_max_position_embeddings", 8192.0));
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    let f = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / base.powf(i as f32 / dim as f32);
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / freq;
            if (wavelen as f64) < high_wavelen {
                1.0
            } else if wavelen as f64 > low_wavelen {
                factor as f32
            } else {
                let smooth = (old as f32 / wavelen - low as f32) / (high as f32 - low as f32);
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect();
    Ok(vec![("rope_freqs.weight".into(), f)])
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
