//! LLaMA, numerically the same as transformers' `LlamaForCausalLM`.
//!
//! Per layer `h += o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))` with
//! `n = input_layernorm(h)` (RMSNorm), grouped-query attention (k/v heads repeated), then
//! `h += down_proj(silu(gate_proj(n)) * up_proj(n))` with `n = post_attention_layernorm(h)`.
//! RoPE is HF's rotate-half form, `θ_i = rope_theta^(-2i/head_dim)`, with `rope_theta` read from
//! the top level (transformers 4) or from `rope_parameters` (transformers 5).
//! Reference: transformers `models/llama/modeling_llama.py`.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{attend, KvCache};
use crate::lora::{AdapterSet, Linear, WeightLayout};
use crate::ops;

/// The `config.json` fields LLaMA uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        let kv = self.num_kv_heads();
        if self.num_attention_heads == 0 || kv == 0 || self.num_attention_heads % kv != 0 {
            bail!("num_attention_heads = {} is not a multiple of num_key_value_heads = {kv}", self.num_attention_heads)
        }
        if self.head_dim() % 2 != 0 {
            bail!("head_dim = {} must be even for rotary embeddings", self.head_dim())
        }
        if self.hidden_act != "silu" {
            bail!("hidden_act {:?} is not supported (silu)", self.hidden_act)
        }
        for (name, v) in [("rope_scaling", &self.rope_scaling), ("rope_parameters", &self.rope_parameters)] {
            let kind = v.as_ref().and_then(|v| v.get("rope_type").or_else(|| v.get("type"))).and_then(|t| t.as_str());
            if let Some(kind) = kind {
                if kind != "default" {
                    bail!("{name}.rope_type = {kind:?} is not supported (only plain RoPE)")
                }
            }
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `rope_theta` from the top level or from `rope_parameters`; 10000 if neither.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10000.0)
    }
}

/// RMSNorm with a frozen weight, (C,).
/// A frozen RMSNorm: a node of its own (`model.norm`) or the `pre` op of the linears after it.
struct RmsNorm {
    op: ops::Pre,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(dim, "weight").with_context(|| format!("loading {}.weight", vb.prefix()))?;
        Ok(Self { op: ops::rms_norm_pre(&weight, eps)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.op.apply("rms_norm", x)?)
    }
}

/// cos/sin tables for every position, (max_pos, head_dim/2) f32.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &Config, dev: &Device) -> Result<Self> {
        let d = cfg.head_dim();
        let theta = cfg.rope_theta() as f32;
        let inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, d / 2), dev)?;
        let t = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?.to_dtype(DType::F32)?;
        let freqs = t.unsqueeze(1)?.broadcast_mul(&inv_freq)?; // (P, D/2)
        Ok(Self { cos: freqs.cos()?, sin: freqs.sin()? })
    }

    /// pos: (B, T) -> cos, sin: (B, T, D/2) in `dtype`.
    fn at(&self, pos: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = pos.dims2()?;
        let flat = pos.flatten_all()?;
        let gather = |x: &Tensor| -> Result<Tensor> { Ok(x.index_select(&flat, 0)?.reshape((b, t, ()))?.to_dtype(dtype)?) };
        Ok((gather(&self.cos)?, gather(&self.sin)?))
    }
}

struct SelfAttn {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

impl SelfAttn {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, hd, nh, nkv, bias) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.num_kv_heads(), cfg.attention_bias);
        let lin = |name: &str, i: usize, o: usize| Linear::load(&vb.pp(name), adapters, i, o, bias, WeightLayout::Linear);
        Ok(Self {
            q_proj: lin("q_proj", c, nh * hd)?,
            k_proj: lin("k_proj", c, nkv * hd)?,
            v_proj: lin("v_proj", c, nkv * hd)?,
            o_proj: lin("o_proj", nh * hd, c)?,
            n_head: nh,
            n_kv: nkv,
            head_dim: hd,
        })
    }

    /// attn(norm(x)) for x: (B, T, C); cos/sin: (B, T, D/2); mask: (B, 1, T, Tk). The norm runs
    /// inside the q/k/v projections' nodes (recomputed there, its output never kept).
    fn forward(
        &self,
        x: &Tensor,
        norm: &RmsNorm,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) // (B, n, T, D)
        };
        let pre = Some(&norm.op);
        let q = ops::rope(&heads(self.q_proj.forward_pre(x, pre)?, self.n_head)?, cos, sin)?;
        let k = ops::rope(&heads(self.k_proj.forward_pre(x, pre)?, self.n_kv)?, cos, sin)?;
        let v = heads(self.v_proj.forward_pre(x, pre)?, self.n_kv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        if cache.is_none() {
            // Training and full-sequence passes: one fused node (ops/attention.rs).
            let y = ops::attention::self_attention(&q, &k, &v, mask, scale)?; // (B, T, H·D)
            return self.o_proj.forward(&y);
        }
        let y = attend(&q, k, v, mask, scale, cache)?; // (B, H, T, D)
        let y = y.transpose(1, 2)?.reshape((b, t, self.n_head * hd))?;
        self.o_proj.forward(&y)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let lin = |name: &str, i: usize, o: usize| Linear::load(&vb.pp(name), adapters, i, o, bias, WeightLayout::Linear);
        Ok(Self { gate_proj: lin("gate_proj", c, f)?, up_proj: lin("up_proj", c, f)?, down_proj: lin("down_proj", f, c)? })
    }

    /// mlp(norm(x)); the norm runs inside gate_proj's and up_proj's nodes.
    fn forward(&self, x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        let pre = Some(&norm.op);
        let h = (ops::act::silu(&self.gate_proj.forward_pre(x, pre)?)? * self.up_proj.forward_pre(x, pre)?)?;
        self.down_proj.forward(&h)
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttn,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), c, eps)?,
            self_attn: SelfAttn::load(vb.pp("self_attn"), cfg, adapters)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), c, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, adapters)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
    ) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(x, &self.input_layernorm, cos, sin, mask, cache)?)?;
        Ok((&x + self.mlp.forward(&x, &self.post_attention_layernorm)?)?)
    }
}

/// `LlamaForCausalLM`.
pub struct Llama {
    /// Token embeddings, (V, C).
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    pub cfg: Config,
}

impl Llama {
    pub fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        cfg.validate()?;
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let mvb = vb.pp("model");
        let embed_tokens = mvb.get((v, c), "embed_tokens.weight").context("loading model.embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(mvb.pp("layers").pp(i), cfg, adapters))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(mvb.pp("norm"), c, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            Linear::from_weight("lm_head".into(), embed_tokens.clone(), None, WeightLayout::Linear, adapters)?
        } else if cfg.tie_word_embeddings {
            // Some tied checkpoints also store the head; it must equal the embedding, so share it.
            Linear::from_weight("lm_head".into(), embed_tokens.clone(), None, WeightLayout::Linear, adapters)?
        } else {
            Linear::load(&vb.pp("lm_head"), adapters, c, v, false, WeightLayout::Linear)?
        };
        let rotary = Rotary::new(cfg, vb.device())?;
        Ok(Self { embed_tokens, layers, norm, lm_head, rotary, cfg: cfg.clone() })
    }

    /// ids, pos: (B, T) u32 -> token embeddings (B, T, C), and the rotary cos/sin (B, T, D/2) at `pos`.
    pub fn embed(&self, ids: &Tensor, pos: &Tensor) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t) = ids.dims2()?;
        if let Ok(max) = pos.flatten_all()?.max(0)?.to_scalar::<u32>() {
            if max as usize >= self.cfg.max_position_embeddings {
                bail!("position {max} is beyond the model's context (max_position_embeddings = {})", self.cfg.max_position_embeddings)
            }
        }
        let x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        let rope = self.rotary.at(pos, x.dtype())?;
        Ok((x, rope))
    }

    /// Layer `i`: x (B, T, C) -> (B, T, C).
    pub fn block(&self, i: usize, x: &Tensor, rope: &(Tensor, Tensor), mask: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.layers[i].forward(x, &rope.0, &rope.1, mask, cache.map(|c| &mut c.layers[i]))
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// The LM head layer (`lm_head`, or tied to `embed_tokens`).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
}
