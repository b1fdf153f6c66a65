//! GPT-NeoX (Polyglot-ko, the base of KoAlpaca; Pythia), numerically the same as transformers'
//! `GPTNeoXForCausalLM`. It shares GPT-2's side of the code: LayerNorms with biases running
//! inside the next linear (`norm.rs`), a fused qkv projection, GELU inside the MLP's second linear.
//!
//! `h = embed_in[ids]`; per layer, `a = dense(attn(query_key_value(input_layernorm(h))))` and
//! - parallel residual (`use_parallel_residual`, the default): `h = h + a + mlp(post_attention_layernorm(h))`
//! - sequential: `h = h + a`, then `h = h + mlp(post_attention_layernorm(h))`
//!
//! with `mlp(x) = dense_4h_to_h(gelu(dense_h_to_4h(x)))` (`gelu` is the exact erf form) and
//! logits `= embed_out(final_layer_norm(h))`. `query_key_value`'s output (B, T, 3C) is
//! head-interleaved: viewed as (B, T, H, 3D), head h holds `[q_h | k_h | v_h]`. Rope rotates the
//! first `rotary_pct · D` values of each head (partial rotary, `ops::rope`).
//! Reference: transformers `models/gpt_neox/modeling_gpt_neox.py`.
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::norm::LayerNorm;
use super::rope::{rope_dict, Rope, RopeInputs};
use super::{attend, linear, BlockCtx, LayerCache};
use crate::lora::{AdapterSet, Linear, WeightLayout};
use crate::ops;

/// The `config.json` fields GPT-NeoX uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "yes")]
    pub use_parallel_residual: bool,
    #[serde(default = "yes")]
    pub attention_bias: bool,
    /// transformers 4 spellings of the rope settings.
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Parsed from the above by `validate`.
    #[serde(skip)]
    pub rope: Option<Rope>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl Config {
    /// Checks the config and parses its rope (call once after deserializing).
    pub fn validate(&mut self) -> Result<()> {
        let (c, h) = (self.hidden_size, self.num_attention_heads);
        if h == 0 || c % h != 0 {
            bail!("hidden_size = {c} is not divisible by num_attention_heads = {h}")
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh") {
            bail!("hidden_act = {:?} is not supported for gpt_neox (gelu, gelu_new, gelu_fast, gelu_pytorch_tanh)", self.hidden_act)
        }
        if self.max_position_embeddings == 0 || self.max_position_embeddings > u32::MAX as usize {
            bail!("max_position_embeddings = {}: positions are 32-bit, it must be between 1 and {}", self.max_position_embeddings, u32::MAX)
        }
        let raw = serde_json::json!({"rope_parameters": self.rope_parameters, "rope_scaling": self.rope_scaling});
        let (d, key) = rope_dict(&raw)?;
        let inputs = RopeInputs {
            key,
            head_dim: c / h,
            max_position_embeddings: self.max_position_embeddings,
            theta: self.rotary_emb_base.unwrap_or(10_000.0),
            partial_rotary_factor: Some(self.rotary_pct.unwrap_or(0.25)),
            original_max_position_embeddings: None,
        };
        self.rope = Some(Rope::from_dict(&d, &inputs)?);
        Ok(())
    }

    pub fn rope(&self) -> Result<&Rope> {
        self.rope.as_ref().context("internal: gpt_neox config not validated")
    }

    /// The exact GELU (`gelu`) or its tanh approximation.
    fn act(&self) -> ops::Pre {
        match self.hidden_act.as_str() {
            "gelu" => ops::family::gelu_erf_pre(),
            _ => ops::act::gelu_pre(),
        }
    }
}

struct Attention {
    query_key_value: Linear,
    dense: Linear,
    n_head: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, b) = (cfg.hidden_size, cfg.attention_bias);
        Ok(Self {
            query_key_value: linear(&vb, adapters, "query_key_value", (c, 3 * c), b, "attention_bias")?,
            dense: linear(&vb, adapters, "dense", (c, c), b, "attention_bias")?,
            n_head: cfg.num_attention_heads,
        })
    }

    /// attn(ln(x)) for x: (B, T, C); ln runs inside query_key_value's node.
    fn forward(&self, x: &Tensor, ln: &LayerNorm, rope: &(Tensor, Tensor), mask: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, d) = (self.n_head, c / self.n_head);
        let qkv = self.query_key_value.forward_pre(x, Some(&ln.op))?.reshape((b, t, h, 3 * d))?; // (B, T, H, 3D)
        // Head h's [q | k | v] (B, T, H, D) views -> (B, H, T, D), rotated (q, k): one node each.
        let part = |i: usize, r: Option<&(Tensor, Tensor)>| -> Result<Tensor> { Ok(ops::family::heads(&qkv.narrow(3, i * d, d)?, None, r)?) };
        let (q, k, v) = (part(0, Some(rope))?, part(1, Some(rope))?, part(2, None)?);
        let scale = 1.0 / (d as f64).sqrt();
        let y = match cache {
            None => ops::attention::self_attention(&q, &k, &v, mask, scale)?, // (B, T, C)
            Some(cache) => attend(&q, k, v, mask, scale, None, cache, None)?.transpose(1, 2)?.reshape((b, t, c))?,
        };
        self.dense.forward(&y)
    }
}

struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    act: ops::Pre,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, f, key) = (cfg.hidden_size, cfg.intermediate_size, "gpt_neox's MLP always has biases");
        Ok(Self {
            dense_h_to_4h: linear(&vb, adapters, "dense_h_to_4h", (c, f), true, key)?,
            dense_4h_to_h: linear(&vb, adapters, "dense_4h_to_h", (f, c), true, key)?,
            act: cfg.act(),
        })
    }

    /// mlp(ln(x)): ln runs inside dense_h_to_4h's node and GELU inside dense_4h_to_h's.
    fn forward(&self, x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
        let h = self.dense_h_to_4h.forward_pre(x, Some(&ln.op))?; // (B, T, F)
        self.dense_4h_to_h.forward_pre(&h, Some(&self.act))
    }
}

struct Layer {
    input_layernorm: LayerNorm,
    attention: Attention,
    post_attention_layernorm: LayerNorm,
    mlp: Mlp,
    parallel: bool,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            input_layernorm: LayerNorm::load(vb.pp("input_layernorm"), c, eps)?,
            attention: Attention::load(vb.pp("attention"), cfg, adapters)?,
            post_attention_layernorm: LayerNorm::load(vb.pp("post_attention_layernorm"), c, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, adapters)?,
            parallel: cfg.use_parallel_residual,
        })
    }

    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), mask: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let a = self.attention.forward(x, &self.input_layernorm, rope, mask, cache)?;
        if self.parallel {
            let m = self.mlp.forward(x, &self.post_attention_layernorm)?;
            return Ok(((x + a)? + m)?);
        }
        let x = (x + a)?;
        Ok((&x + self.mlp.forward(&x, &self.post_attention_layernorm)?)?)
    }
}

/// `GPTNeoXForCausalLM`.
pub struct GptNeox {
    /// Token embeddings, (V, C).
    embed_in: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    /// The LM head: `embed_out` (dense even with `--quantize nf4`, like every LM head).
    embed_out: Linear,
    pub cfg: Config,
}

impl GptNeox {
    pub fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let g = vb.pp("gpt_neox");
        let embed_in = g.get((v, c), "embed_in.weight").context("loading gpt_neox.embed_in.weight")?;
        let layers = (0..cfg.num_hidden_layers).map(|i| Layer::load(g.pp("layers").pp(i), cfg, adapters)).collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(g.pp("final_layer_norm"), c, cfg.layer_norm_eps)?;
        let head = if cfg.tie_word_embeddings { embed_in.clone() } else { vb.get((v, c), "embed_out.weight").context("loading embed_out.weight")? };
        let embed_out = Linear::from_weight("embed_out".into(), head, None, WeightLayout::Linear, adapters)?;
        Ok(Self { embed_in, layers, final_layer_norm, embed_out, cfg: cfg.clone() })
    }

    /// ids, pos: (B, T) u32 -> token embeddings (B, T, C) and the block context (mask, rope at pos).
    pub fn embed(&self, ids: &Tensor, pos: &Tensor, mask: Tensor) -> Result<(Tensor, BlockCtx)> {
        let (b, t) = ids.dims2()?;
        let max = pos.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.max_position_embeddings {
            bail!("position {max} is beyond the model's context (max_position_embeddings = {})", self.cfg.max_position_embeddings)
        }
        let x = self.embed_in.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        let rope = self.cfg.rope()?.at(pos, x.dtype())?;
        Ok((x, BlockCtx { mask, sliding_mask: None, rope: Some(rope), rope_local: None }))
    }

    /// Layer `i`: x (B, T, C) -> (B, T, C).
    pub fn block(&self, i: usize, x: &Tensor, ctx: &BlockCtx, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let rope = ctx.rope.as_ref().context("internal: gpt_neox block without rope")?;
        self.layers[i].forward(x, rope, &ctx.mask, cache)
    }

    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    pub fn lm_head(&self) -> &Linear {
        &self.embed_out
    }
}
