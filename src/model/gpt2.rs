//! GPT-2 (and KoGPT2), numerically the same as transformers' `GPT2LMHeadModel`.
//!
//! `h = wte[ids] + wpe[pos]`; per block `h += attn(ln_1(h))`, `h += mlp(ln_2(h))`;
//! logits = `ln_f(h) @ wteᵀ` (tied head). Attention and MLP weights are HF `Conv1D`, stored
//! (in, out). Activation `gelu_new` (tanh approximation).
//! Field names and VarBuilder paths equal the HF module names, so `target_modules` strings
//! (`c_attn`, `c_proj`, `c_fc`) and PEFT keys match directly.
//! Reference: transformers `models/gpt2/modeling_gpt2.py`, nanoGPT `model.py`.
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::norm::LayerNorm;
use super::{attend, LayerCache};
use crate::lora::{AdapterSet, Linear, WeightLayout};
use crate::ops;

/// The `config.json` fields GPT-2 uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_act() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            bail!("n_embd = {} is not divisible by n_head = {}", self.n_embd, self.n_head)
        }
        if !matches!(self.activation_function.as_str(), "gelu_new" | "gelu_pytorch_tanh" | "gelu") {
            bail!("activation_function {:?} is not supported (gelu_new, gelu_pytorch_tanh, gelu)", self.activation_function)
        }
        if self.scale_attn_by_inverse_layer_idx {
            bail!("scale_attn_by_inverse_layer_idx = true is not supported")
        }
        Ok(())
    }

    pub fn n_inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    scale: f64,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let c = cfg.n_embd;
        let head_dim = c / cfg.n_head;
        Ok(Self {
            c_attn: Linear::load(&vb.pp("c_attn"), adapters, c, 3 * c, true, WeightLayout::Conv1D)?,
            c_proj: Linear::load(&vb.pp("c_proj"), adapters, c, c, true, WeightLayout::Conv1D)?,
            n_head: cfg.n_head,
            scale: if cfg.scale_attn_weights { 1.0 / (head_dim as f64).sqrt() } else { 1.0 },
        })
    }

    /// attn(ln_1(x)) for x: (B, T, C), mask: (B, 1, T, Tk) additive; ln_1 runs inside c_attn's node.
    fn forward(&self, x: &Tensor, ln_1: &LayerNorm, mask: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hd = c / self.n_head;
        let qkv = self.c_attn.forward_pre(x, Some(&ln_1.op))?; // (B, T, 3C)
        let Some(cache) = cache else {
            // Training and full-sequence passes: one fused node (ops/attention.rs).
            let y = ops::attention::packed_self_attention(&qkv, self.n_head, mask, self.scale)?; // (B, T, C)
            return self.c_proj.forward(&y);
        };
        let split = |i: usize| -> Result<Tensor> {
            // (B, T, C) -> (B, H, T, D)
            Ok(qkv.narrow(D::Minus1, i * c, c)?.reshape((b, t, self.n_head, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let y = attend(&q, k, v, mask, self.scale, None, cache, None)?; // (B, H, T, D)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        self.c_proj.forward(&y)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    /// `gelu_new` / `gelu_pytorch_tanh` (tanh approximation) or `gelu` (exact, erf).
    act: ops::Pre,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, f) = (cfg.n_embd, cfg.n_inner());
        Ok(Self {
            c_fc: Linear::load(&vb.pp("c_fc"), adapters, c, f, true, WeightLayout::Conv1D)?,
            c_proj: Linear::load(&vb.pp("c_proj"), adapters, f, c, true, WeightLayout::Conv1D)?,
            act: if cfg.activation_function == "gelu" { ops::family::gelu_erf_pre() } else { ops::act::gelu_pre() },
        })
    }

    /// mlp(ln_2(x)): ln_2 runs inside c_fc's node and GELU (the tanh approximation, HF's
    /// gelu_new, `ops/act.rs`) inside c_proj's, so neither output is kept for the backward.
    fn forward(&self, x: &Tensor, ln_2: &LayerNorm) -> Result<Tensor> {
        let h = self.c_fc.forward_pre(x, Some(&ln_2.op))?; // (B, T, F)
        self.c_proj.forward_pre(&h, Some(&self.act))
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), cfg.n_embd, eps)?,
            attn: Attention::load(vb.pp("attn"), cfg, adapters)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), cfg.n_embd, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, adapters)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let x = (x + self.attn.forward(x, &self.ln_1, mask, cache)?)?;
        Ok((&x + self.mlp.forward(&x, &self.ln_2)?)?)
    }
}

/// `GPT2LMHeadModel`.
pub struct Gpt2 {
    /// Token embeddings, (V, C); also the tied LM head.
    wte: Tensor,
    /// Learned position embeddings, (P, C).
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    pub cfg: Config,
}

impl Gpt2 {
    /// `vb` is rooted at the checkpoint's top level. Checkpoints with and without the
    /// `transformer.` key prefix both load; module paths always carry it (as PEFT's keys do).
    pub fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("transformer.wte.weight") {
            vb
        } else if vb.contains_tensor("wte.weight") {
            vb.rename_f(|name: &str| name.strip_prefix("transformer.").unwrap_or(name).to_string())
        } else {
            bail!("no tensor transformer.wte.weight (nor wte.weight): this is not a GPT-2 checkpoint")
        };
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        let tvb = vb.pp("transformer");
        let wte = tvb.get((v, c), "wte.weight").context("loading transformer.wte.weight")?;
        let wpe = tvb.get((cfg.n_positions, c), "wpe.weight").context("loading transformer.wpe.weight")?;
        let h = (0..cfg.n_layer)
            .map(|i| Block::load(tvb.pp("h").pp(i), cfg, adapters))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(tvb.pp("ln_f"), c, cfg.layer_norm_epsilon)?;
        let head_w = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            wte.clone() // tied: the same storage, no copy
        } else {
            vb.get((v, c), "lm_head.weight").context("loading lm_head.weight")?
        };
        let lm_head = Linear::from_weight("lm_head".into(), head_w, None, WeightLayout::Linear, adapters)?;
        Ok(Self { wte, wpe, h, ln_f, lm_head, cfg: cfg.clone() })
    }

    /// ids, pos: (B, T) u32 -> token + position embeddings (B, T, C).
    pub fn embed(&self, ids: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if let Ok(max) = pos.flatten_all()?.max(0)?.to_scalar::<u32>() {
            if max as usize >= self.cfg.n_positions {
                bail!("position {max} is beyond the model's context (n_positions = {})", self.cfg.n_positions)
            }
        }
        let tok = self.wte.index_select(&ids.flatten_all()?, 0)?; // (B*T, C)
        let p = self.wpe.index_select(&pos.flatten_all()?, 0)?;
        Ok((tok + p)?.reshape((b, t, self.cfg.n_embd))?) // (B, T, C)
    }

    /// Block `i`: x (B, T, C) -> (B, T, C); mask (B, 1, T, Tk).
    pub fn block(&self, i: usize, x: &Tensor, mask: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        self.h[i].forward(x, mask, cache)
    }

    /// The final LayerNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.ln_f.forward(x)
    }

    /// The LM head layer (tied to `wte`).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
}
