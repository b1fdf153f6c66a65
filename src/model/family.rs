//! The LLaMA-like families as named switches of ONE decoder config, read from `config.json`
//! (transformers' modular files derive Mistral, Qwen2/3, Gemma, EXAONE and Phi-3 from Llama by
//! small diffs; `decoder.rs` runs them all). Every switch and where each family sets it:
//!
//! | family (`model_type`)   | biases          | q/k norm | norms           | act  | other                                                  |
//! |-------------------------|-----------------|----------|-----------------|------|--------------------------------------------------------|
//! | `llama`                 | attention_bias, mlp_bias | -  | pre             | silu | rope types llama3/linear/dynamic/yarn; head_dim       |
//! | `exaone` (3.5)          | as llama        | -        | pre             | silu | llama's math, its own tensor names (`decoder.rs`)      |
//! | `mistral`               | -               | -        | pre             | silu | `sliding_window` on every layer                        |
//! | `qwen2`                 | q, k, v         | -        | pre             | silu | `layer_types`, or `use_sliding_window` + `max_window_layers` |
//! | `qwen3`                 | attention_bias  | yes      | pre             | silu | as qwen2; heads·head_dim may differ from hidden        |
//! | `gemma2`                | attention_bias  | -        | pre + post, 1+w | gelu-tanh | embeddings × √C, query_pre_attn_scalar, attention and final soft-capping, alternating local layers |
//! | `gemma3_text`, `gemma3` | attention_bias  | yes, 1+w | pre + post, 1+w | gelu-tanh | as gemma2 without attention capping (and, in `gemma3` image-text checkpoints, without final capping: transformers applies none there); local layers use `rope_local_base_freq` |
//! | `exaone4`               | -               | yes      | post only       | silu | `sliding_window_pattern`; global layers have no rope when local ones exist |
//! | `phi3`                  | -               | -        | pre             | silu | fused `qkv_proj`, `gate_up_proj`; partial rotary; `sliding_window` |
//!
//! A key that changes the math on a family whose transformers code does not read it
//! ([`MATH_KEYS`]), an unsupported rope type or activation, or an unknown `layer_types` entry is
//! an error naming the key. References: transformers `models/<family>/configuration_*.py`.
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::rope::{rope_dict, Rope, RopeInputs};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Exaone,
    Exaone4,
    Phi3,
}
use Family::*;

/// Every `model_type` lorafit loads (for "not supported" messages and `inspect`).
pub const SUPPORTED: &str =
    "gpt2, gpt_neox, llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3 (its text part), exaone, exaone4, phi3";

impl Family {
    pub fn from_model_type(t: &str) -> Option<Self> {
        Some(match t {
            "llama" => Llama,
            "mistral" => Mistral,
            "qwen2" => Qwen2,
            "qwen3" => Qwen3,
            "gemma2" => Gemma2,
            "gemma3_text" | "gemma3" => Gemma3,
            "exaone" => Exaone,
            "exaone4" => Exaone4,
            "phi3" => Phi3,
            _ => return None,
        })
    }

    /// transformers' class prefix (`<prefix>ForCausalLM`, `<prefix>ForSequenceClassification`).
    pub fn class_prefix(self) -> &'static str {
        match self {
            Llama | Exaone => "Llama",
            Mistral => "Mistral",
            Qwen2 => "Qwen2",
            Qwen3 => "Qwen3",
            Gemma2 => "Gemma2",
            Gemma3 => "Gemma3",
            Exaone4 => "Exaone4",
            Phi3 => "Phi3",
        }
    }
}

/// Keys of config.json that change the math, and the families whose transformers code reads
/// them. Set (not null, not false) on any other family, they are an error naming the key.
/// (`max_window_layers` is not here: it only matters with `use_sliding_window`, which is.)
pub const MATH_KEYS: &[(&str, &[Family])] = &[
    ("sliding_window", &[Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Exaone4, Phi3]),
    ("use_sliding_window", &[Qwen2, Qwen3]),
    ("layer_types", &[Qwen2, Qwen3, Gemma2, Gemma3, Exaone4]),
    ("sliding_window_pattern", &[Gemma3, Exaone4]),
    ("query_pre_attn_scalar", &[Gemma2, Gemma3]),
    ("attn_logit_softcapping", &[Gemma2]),
    ("final_logit_softcapping", &[Gemma2, Gemma3]),
    ("rope_local_base_freq", &[Gemma3]),
    ("attention_bias", &[Llama, Exaone, Qwen3, Gemma2, Gemma3]),
    ("mlp_bias", &[Llama, Exaone]),
    ("partial_rotary_factor", &[Phi3]),
    ("use_bidirectional_attention", &[]),
    ("use_qk_norm", &[]),
    ("qk_layernorm", &[]),
    ("clip_qkv", &[]),
    ("embedding_multiplier", &[]),
    ("residual_multiplier", &[]),
    ("attention_multiplier", &[]),
    ("logits_scaling", &[]),
    ("num_experts", &[]),
    ("no_rope_layers", &[]),
];

/// Where the norms sit in a block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormPlacement {
    /// `h += attn(input_layernorm(h))`, `h += mlp(post_attention_layernorm(h))` (Llama).
    Pre,
    /// Gemma: `h += post_attention_layernorm(attn(input_layernorm(h)))`,
    /// `h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`.
    Sandwich,
    /// EXAONE 4: `h += post_attention_layernorm(attn(h))`, `h += post_feedforward_layernorm(mlp(h))`.
    Post,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
}

/// Which rope a layer applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LayerRope {
    Global,
    /// Gemma 3's sliding layers: `rope_local_base_freq`.
    Local,
    /// EXAONE 4's global layers when the model also has sliding ones (no positions, NoPE).
    None,
}

/// One layer's attention: its sliding window (None = full attention) and rope.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerAttn {
    pub window: Option<usize>,
    pub rope: LayerRope,
}

/// The decoder config: sizes and the family's switches.
#[derive(Clone, Debug)]
pub struct Config {
    pub family: Family,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases of q/k/v (or the fused qkv), of o_proj, and of the MLP.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before rope (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    pub norms: NormPlacement,
    /// Gemma's RMSNorm scales by `1 + w`.
    pub norm_plus_one: bool,
    pub act: Act,
    /// Gemma: embeddings × √hidden_size.
    pub embed_scale: Option<f64>,
    /// Scale of q·k: `head_dim^-½`, or Gemma's `query_pre_attn_scalar^-½`.
    pub attn_scale: f64,
    /// `c · tanh(x / c)` on attention scores (Gemma 2) and on the final logits (Gemma 2 and 3).
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Phi-3: `qkv_proj` and `gate_up_proj` instead of q/k/v and gate/up.
    pub fused: bool,
    pub rope: Rope,
    pub rope_local: Option<Rope>,
    pub layers: Vec<LayerAttn>,
    /// Module path of the decoder stack: `model`, or `model.language_model` inside a gemma3 checkpoint.
    pub prefix: &'static str,
    /// `eos_token_id`, a number or a list (Llama 3 lists several).
    pub eos_token_ids: Vec<u32>,
}

/// A config object, read with errors naming the key (prefixed `text_config.` where nested).
struct Keys<'a> {
    m: &'a Map<String, Value>,
    at: &'static str,
}

impl Keys<'_> {
    fn get(&self, names: &[&str]) -> Option<(String, &Value)> {
        names.iter().find_map(|k| self.m.get(*k).filter(|v| !v.is_null()).map(|v| (format!("{}{k}", self.at), v)))
    }
    fn usize(&self, names: &[&str]) -> Result<Option<usize>> {
        match self.get(names) {
            None => Ok(None),
            Some((k, v)) => v.as_u64().map(|n| Some(n as usize)).with_context(|| format!("{k} = {v} must be a non-negative integer")),
        }
    }
    fn req(&self, names: &[&str]) -> Result<usize> {
        self.usize(names)?.with_context(|| format!("{}{} is missing", self.at, names[0]))
    }
    fn f64(&self, names: &[&str]) -> Result<Option<f64>> {
        match self.get(names) {
            None => Ok(None),
            Some((k, v)) => v.as_f64().map(Some).with_context(|| format!("{k} = {v} must be a number")),
        }
    }
    fn bool(&self, name: &str) -> Result<Option<bool>> {
        match self.get(&[name]) {
            None => Ok(None),
            Some((k, v)) => v.as_bool().map(Some).with_context(|| format!("{k} = {v} must be true or false")),
        }
    }
    fn str(&self, names: &[&str]) -> Result<Option<(String, String)>> {
        match self.get(names) {
            None => Ok(None),
            Some((k, v)) => Ok(Some((k.clone(), v.as_str().with_context(|| format!("{k} = {v} must be a string"))?.to_string()))),
        }
    }
}

/// Token ids of a key that may hold a number or a list of numbers.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|n| n as u32)).collect(),
        _ => vec![],
    }
}

/// Whether a math key is set: not null, not false (and `layer_types` not all full attention).
fn is_set(key: &str, v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) if key == "layer_types" => a.iter().any(|t| t != "full_attention"),
        _ => true,
    }
}

impl Config {
    /// Reads the decoder config of `model_type` from config.json's object `root`.
    pub fn from_json(root: &Value, model_type: &str) -> Result<Self> {
        let family = Family::from_model_type(model_type).with_context(|| format!("model_type {model_type:?} is not a decoder family"))?;
        let (m, at, prefix) = if model_type == "gemma3" {
            let t = root.get("text_config").and_then(Value::as_object).context("a gemma3 config.json needs its \"text_config\" object")?;
            if let Some(inner) = t.get("model_type").and_then(Value::as_str).filter(|t| *t != "gemma3_text") {
                bail!("text_config.model_type = {inner:?}: expected \"gemma3_text\"")
            }
            (t, "text_config.", "model.language_model")
        } else {
            (root.as_object().context("config.json is not a JSON object")?, "", "model")
        };
        let k = Keys { m, at };
        for (key, families) in MATH_KEYS {
            if let Some((name, v)) = k.get(&[key]).filter(|(_, v)| is_set(key, v)) {
                if !families.contains(&family) {
                    bail!(
                        "{name} = {v}: model_type {model_type:?} does not have this in transformers, so its math would be \
                         ambiguous; remove the key, or set the model_type of the family that has it"
                    )
                }
            }
        }
        let gemma = matches!(family, Gemma2 | Gemma3);
        let (hidden, heads) = (k.req(&["hidden_size"])?, k.req(&["num_attention_heads"])?);
        let layers_n = k.req(&["num_hidden_layers", "num_layers"])?;
        if heads == 0 || hidden == 0 || layers_n == 0 {
            bail!("{at}hidden_size, num_attention_heads and num_hidden_layers must be positive")
        }
        // Absent, transformers' per-family default (its config classes' keyword defaults), not
        // always the number of heads.
        let kv = k.usize(&["num_key_value_heads"])?.unwrap_or(match family {
            Mistral | Exaone => 8,
            Qwen2 | Qwen3 | Exaone4 => 32,
            Gemma2 | Gemma3 => 4,
            Llama | Phi3 => heads,
        });
        if kv == 0 || heads % kv != 0 {
            bail!("{at}num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv}")
        }
        let head_dim = k.usize(&["head_dim"])?.unwrap_or(match family {
            Qwen3 => 128,
            Gemma2 | Gemma3 => 256,
            _ => hidden / heads,
        });
        let (vocab, inter) = (k.req(&["vocab_size"])?, k.req(&["intermediate_size"])?);
        super::check_sizes(at, &[("hidden_size", hidden), ("num_attention_heads", heads), ("num_hidden_layers", layers_n),
            ("num_key_value_heads", kv), ("head_dim", head_dim), ("vocab_size", vocab), ("intermediate_size", inter)])?;
        let max_pos = k.usize(&["max_position_embeddings"])?.unwrap_or(match family {
            Llama => 2048,
            Mistral | Gemma3 => 131072,
            Qwen2 | Qwen3 => 32768,
            Gemma2 => 8192,
            Exaone | Phi3 => 4096,
            Exaone4 => 2048,
        });
        if max_pos == 0 || max_pos > u32::MAX as usize {
            bail!("{at}max_position_embeddings = {max_pos}: positions are 32-bit, it must be between 1 and {}", u32::MAX)
        }
        let eps = k.f64(&["rms_norm_eps", "layer_norm_epsilon"])?.unwrap_or(match family {
            Exaone | Exaone4 | Phi3 => 1e-5,
            _ => 1e-6,
        });
        // The activation: silu everywhere but Gemma (gelu, tanh approximation).
        let (act_key, act_default) = if gemma { (["hidden_activation", "hidden_act"], "gelu_pytorch_tanh") } else { (["hidden_act", "activation_function"], "silu") };
        let (act_name, act) = k.str(&act_key)?.unwrap_or((format!("{at}{}", act_key[0]), act_default.into()));
        let act = match (gemma, act.as_str()) {
            (false, "silu" | "swish") => Act::Silu,
            (true, "gelu_pytorch_tanh" | "gelu_new") => Act::GeluTanh,
            (_, other) => bail!("{act_name} = {other:?} is not supported for {model_type} (expected {act_default})"),
        };
        let attention_bias = k.bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Qwen2 => (true, false),
            Mistral | Exaone4 | Phi3 => (false, false),
            _ => (attention_bias, attention_bias),
        };

        // Rope: one dict, or Gemma 3's per layer type (full_attention / sliding_attention).
        let theta = k.f64(&["rope_theta"])?.unwrap_or(match family {
            Exaone => 500_000.0,
            Gemma3 => 1_000_000.0,
            _ => 10_000.0,
        });
        let inputs = |key: &'static str, theta: f64| RopeInputs {
            key,
            head_dim,
            max_position_embeddings: max_pos,
            theta,
            partial_rotary_factor: if family == Phi3 { k.f64(&["partial_rotary_factor"]).ok().flatten() } else { None },
            original_max_position_embeddings: k.usize(&["original_max_position_embeddings"]).ok().flatten(),
        };
        let (rope, rope_local) = if family == Gemma3 {
            let local_theta = k.f64(&["rope_local_base_freq"])?.unwrap_or(10_000.0);
            let nested = m.get("rope_parameters").and_then(Value::as_object).filter(|p| p.contains_key("full_attention") || p.contains_key("sliding_attention"));
            match nested {
                Some(p) => {
                    let part = |t: &str| p.get(t).and_then(Value::as_object).cloned().unwrap_or_default();
                    let global = Rope::from_dict(&part("full_attention"), &inputs("rope_parameters.full_attention", theta))?;
                    let local = Rope::from_dict(&part("sliding_attention"), &inputs("rope_parameters.sliding_attention", local_theta))?;
                    (global, Some(local))
                }
                None => {
                    // transformers 4: rope_scaling (+ rope_theta) is the global rope, rope_local_base_freq the local one.
                    let (d, key) = rope_dict(&Value::Object(m.clone()))?;
                    (Rope::from_dict(&d, &inputs(key, theta))?, Some(Rope::from_dict(&Map::new(), &inputs("rope_local_base_freq", local_theta))?))
                }
            }
        } else {
            let (d, key) = rope_dict(&Value::Object(m.clone()))?;
            (Rope::from_dict(&d, &inputs(key, theta))?, None)
        };
        if rope.dim != head_dim && family != Phi3 {
            bail!("{at}rope partial_rotary_factor gives {} rotary dimensions of head_dim {head_dim}: {model_type} rotates whole heads", rope.dim)
        }

        // Layers: full or sliding-window attention, and which rope.
        let window = match k.usize(&["sliding_window"])? {
            Some(0) => bail!("{at}sliding_window = 0 must be positive (or null for full attention)"),
            w => w,
        };
        let types: Option<Vec<bool>> = match k.get(&["layer_types"]) {
            None => None,
            Some((key, v)) => {
                let a = v.as_array().with_context(|| format!("{key} = {v} must be a list"))?;
                if a.len() != layers_n {
                    bail!("{key} has {} entries for {layers_n} layers", a.len())
                }
                Some(a.iter().enumerate().map(|(i, t)| match t.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    _ => bail!("{key}[{i}] = {t}: lorafit knows \"full_attention\" and \"sliding_attention\""),
                }).collect::<Result<_>>()?)
            }
        };
        let pattern = |default: usize| -> Result<Vec<bool>> {
            // sliding_window_pattern: every n-th layer is global (an integer), or "LLLG" (EXAONE 4).
            Ok(match k.get(&["sliding_window_pattern"]) {
                Some((_, Value::String(s))) if !s.is_empty() && s.chars().all(|c| c == 'L' || c == 'G') => {
                    (0..layers_n).map(|i| s.as_bytes()[i % s.len()] == b'L').collect()
                }
                Some((key, v)) => {
                    let n = v.as_u64().filter(|n| *n > 0).with_context(|| format!("{key} = {v} must be a positive integer or a string of L and G"))? as usize;
                    (0..layers_n).map(|i| (i + 1) % n != 0).collect()
                }
                None => (0..layers_n).map(|i| (i + 1) % default != 0).collect(),
            })
        };
        let sliding: Vec<bool> = match family {
            Llama | Exaone => vec![false; layers_n],
            Mistral | Phi3 => vec![window.is_some(); layers_n],
            Qwen2 | Qwen3 => {
                let on = k.bool("use_sliding_window")?.unwrap_or(false);
                match types {
                    Some(t) => t,
                    None => {
                        let from = k.usize(&["max_window_layers"])?.unwrap_or(28);
                        (0..layers_n).map(|i| on && window.is_some() && i >= from).collect()
                    }
                }
            }
            Gemma2 => types.unwrap_or_else(|| (0..layers_n).map(|i| (i + 1) % 2 != 0).collect()),
            Gemma3 => match types {
                Some(t) => t,
                None => pattern(6)?,
            },
            Exaone4 => match (types, window) {
                (Some(t), _) => t,
                (None, None) => vec![false; layers_n],
                (None, Some(_)) => pattern(4)?,
            },
        };
        // Qwen2/3 without use_sliding_window have no window, whatever layer_types says.
        let window = if matches!(family, Qwen2 | Qwen3) && !k.bool("use_sliding_window")?.unwrap_or(false) { None } else { window };
        if sliding.iter().any(|s| *s) && window.is_none() {
            bail!("{at}layer_types has sliding_attention layers but no sliding_window is set")
        }
        let layers = sliding
            .iter()
            .map(|&s| LayerAttn {
                window: if s { window } else { None },
                rope: match family {
                    Gemma3 if s => LayerRope::Local,
                    Exaone4 if !s && window.is_some() => LayerRope::None,
                    _ => LayerRope::Global,
                },
            })
            .collect();

        let softcap = |key: &str| -> Result<Option<f64>> {
            Ok(match k.f64(&[key])? {
                Some(c) if c > 0.0 => Some(c),
                Some(c) => bail!("{at}{key} = {c} must be positive (or null)"),
                None => None,
            })
        };
        Ok(Self {
            family,
            model_type: model_type.to_string(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers_n,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: eps,
            max_position_embeddings: max_pos,
            tie_word_embeddings: k.bool("tie_word_embeddings")?.or(root.get("tie_word_embeddings").and_then(Value::as_bool)).unwrap_or(gemma),
            qkv_bias,
            o_bias,
            mlp_bias: k.bool("mlp_bias")?.unwrap_or(false),
            qk_norm: matches!(family, Qwen3 | Gemma3 | Exaone4),
            norms: match family {
                Gemma2 | Gemma3 => NormPlacement::Sandwich,
                Exaone4 => NormPlacement::Post,
                _ => NormPlacement::Pre,
            },
            norm_plus_one: gemma,
            act,
            embed_scale: gemma.then(|| (hidden as f64).sqrt()),
            attn_scale: match gemma {
                true => k.f64(&["query_pre_attn_scalar"])?.unwrap_or(256.0).powf(-0.5),
                false => (head_dim as f64).powf(-0.5),
            },
            attn_softcap: if family == Gemma2 { softcap("attn_logit_softcapping")? } else { None },
            // Gemma3ForConditionalGeneration (model_type gemma3) does not cap its logits; Gemma3ForCausalLM does.
            final_softcap: if gemma && model_type != "gemma3" { softcap("final_logit_softcapping")? } else { None },
            fused: family == Phi3,
            rope,
            rope_local,
            layers,
            prefix,
            eos_token_ids: token_ids(m.get("eos_token_id").or_else(|| root.get("eos_token_id"))),
        })
    }

    /// Query width H·head_dim and key/value width H_kv·head_dim.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The linears of layer 0 as (module path, in, out, has bias): what LoRA can target.
    pub fn linears(&self) -> Vec<(String, usize, usize, bool)> {
        let (c, f, q, kv) = (self.hidden_size, self.intermediate_size, self.q_dim(), self.kv_dim());
        let p = format!("{}.layers.0.", self.prefix);
        let mut v = vec![];
        if self.fused {
            v.push((format!("{p}self_attn.qkv_proj"), c, q + 2 * kv, self.qkv_bias));
        } else {
            v.push((format!("{p}self_attn.q_proj"), c, q, self.qkv_bias));
            v.push((format!("{p}self_attn.k_proj"), c, kv, self.qkv_bias));
            v.push((format!("{p}self_attn.v_proj"), c, kv, self.qkv_bias));
        }
        v.push((format!("{p}self_attn.o_proj"), q, c, self.o_bias));
        if self.fused {
            v.push((format!("{p}mlp.gate_up_proj"), c, 2 * f, self.mlp_bias));
        } else {
            v.push((format!("{p}mlp.gate_proj"), c, f, self.mlp_bias));
            v.push((format!("{p}mlp.up_proj"), c, f, self.mlp_bias));
        }
        v.push((format!("{p}mlp.down_proj"), f, c, self.mlp_bias));
        v
    }

    /// Number of RMSNorm weights per layer (C wide) and whether q/k norms (head_dim wide) exist.
    pub fn norms_per_layer(&self) -> usize {
        match self.norms {
            NormPlacement::Pre | NormPlacement::Post => 2,
            NormPlacement::Sandwich => 4,
        }
    }
}
