//! The LLaMA-like decoder of every family in `family.rs`, numerically the same as transformers'
//! `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2/3ForCausalLM`, `Gemma2/3ForCausalLM`,
//! `Exaone4ForCausalLM` and `Phi3ForCausalLM`. One file: what differs is a switch of the config.
//!
//! Per layer, with the norms where `NormPlacement` puts them (`pre`/`post` may be absent):
//!   `h += post_attn(attn(pre_attn(h)))`, then `h += post_mlp(mlp(pre_mlp(h)))`
//! - attn: q, k, v from `q_proj`/`k_proj`/`v_proj` (Phi-3: `qkv_proj` split in three); per-head
//!   RMSNorm `q_norm`/`k_norm` (Qwen3, Gemma 3, EXAONE 4); the layer's rope (global, Gemma 3's
//!   local one, or none: EXAONE 4's global layers); grouped-query attention with the layer's mask
//!   (causal, or causal within its sliding window), scaled by `head_dim^-½` (Gemma:
//!   `query_pre_attn_scalar^-½`), scores soft-capped (Gemma 2); `o_proj`.
//! - mlp: `down_proj(act(gate) · up)`, gate and up from `gate_proj`/`up_proj` (Phi-3: the halves
//!   of `gate_up_proj`); act SiLU or GELU-tanh (Gemma).
//!
//! Embeddings × √C (Gemma), final RMSNorm (`1 + w` for Gemma), LM head tied or not; the final
//! soft-capping (Gemma) is applied by `Model::lm_head`. Module paths and field names are
//! transformers' (`model.layers.0.self_attn.q_proj`), so `target_modules` and PEFT keys match.
//! EXAONE 3.5 (`transformer.h.0.attn.attention.q_proj`) and gemma3 (`language_model.model.…`)
//! checkpoints store other names: reads are renamed (`checkpoint_names`), paths are not.
//! Reference: transformers `models/{llama,mistral,qwen2,qwen3,gemma2,gemma3,exaone4,phi3}/modeling_*.py`.
use anyhow::{Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::family::{Act, Config, Family, LayerRope, NormPlacement};
use super::norm::RmsNorm;
use super::{attend, check_present, linear, BlockCtx, LayerCache};
use crate::error::Kind;
use crate::lora::{AdapterSet, Linear, WeightLayout};

use crate::ops;

/// q/k/v: three linears, or Phi-3's one fused `[q | k | v]`.
enum Qkv {
    Split { q_proj: Linear, k_proj: Linear, v_proj: Linear },
    Fused { qkv_proj: Linear },
}

struct SelfAttn {
    qkv: Qkv,
    o_proj: Linear,
    /// Per-head RMSNorms (head_dim,) before rope.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl SelfAttn {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, q, kv) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let bias_key = if cfg.family == Family::Qwen2 { "qwen2 has q/k/v biases" } else { "attention_bias" };
        let qkv = if cfg.fused {
            Qkv::Fused { qkv_proj: linear(&vb, adapters, "qkv_proj", (c, q + 2 * kv), cfg.qkv_bias, bias_key)? }
        } else {
            Qkv::Split {
                q_proj: linear(&vb, adapters, "q_proj", (c, q), cfg.qkv_bias, bias_key)?,
                k_proj: linear(&vb, adapters, "k_proj", (c, kv), cfg.qkv_bias, bias_key)?,
                v_proj: linear(&vb, adapters, "v_proj", (c, kv), cfg.qkv_bias, bias_key)?,
            }
        };
        let o_key = if cfg.family == Family::Qwen2 { "qwen2's o_proj has no bias" } else { "attention_bias" };
        let o_proj = linear(&vb, adapters, "o_proj", (q, c), cfg.o_bias, o_key)?;
        let qk_key = format!("model_type {}: q_norm/k_norm {}", cfg.model_type, if cfg.qk_norm { "expected" } else { "not expected" });
        check_present(&vb.pp("q_norm"), "weight", cfg.qk_norm, &qk_key)?;
        let norm = |n: &str| RmsNorm::load(vb.pp(n), cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one);
        let (q_norm, k_norm) = if cfg.qk_norm { (Some(norm("q_norm")?), Some(norm("k_norm")?)) } else { (None, None) };
        let (n_head, n_kv, head_dim) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        Ok(Self { qkv, o_proj, q_norm, k_norm, n_head, n_kv, head_dim, scale: cfg.attn_scale, softcap: cfg.attn_softcap })
    }

    /// attn(pre(x)) for x: (B, T, C); rope: cos/sin (B, T, R/2) or none; mask: (B, 1, T, Tk)
    /// (the layer's: sliding layers get the windowed one). The norm runs inside the projections.
    fn forward(&self, x: &Tensor, pre: Option<&RmsNorm>, rope: Option<&(Tensor, Tensor)>, mask: &Tensor, cache: Option<(&mut LayerCache, Option<usize>)>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (hd, pre) = (self.head_dim, pre.map(|n| &n.op));
        let (q, k, v) = match &self.qkv {
            Qkv::Split { q_proj, k_proj, v_proj } => (q_proj.forward_pre(x, pre)?, k_proj.forward_pre(x, pre)?, v_proj.forward_pre(x, pre)?),
            Qkv::Fused { qkv_proj } => {
                let y = qkv_proj.forward_pre(x, pre)?; // (B, T, (H + 2 H_kv) D)
                let (nq, nk) = (self.n_head * hd, self.n_kv * hd);
                (y.narrow(2, 0, nq)?, y.narrow(2, nq, nk)?, y.narrow(2, nq + nk, nk)?)
            }
        };
        // (B, T, n·D) -> (B, n, T, D): per-head norm, transpose and rope as one node (ops/family.rs).
        let heads = |y: Tensor, n: usize, norm: Option<&RmsNorm>, rope: Option<&(Tensor, Tensor)>| -> Result<Tensor> {
            Ok(ops::family::heads(&y.reshape((b, t, n, hd))?, norm.map(|nm| &nm.op), rope)?)
        };
        let q = heads(q, self.n_head, self.q_norm.as_ref(), rope)?;
        let k = heads(k, self.n_kv, self.k_norm.as_ref(), rope)?;
        let v = heads(v, self.n_kv, None, None)?;
        let y = match cache {
            // Training and full-sequence passes: one fused node (ops/attention.rs).
            None => ops::attention::self_attention_capped(&q, &k, &v, mask, self.scale, self.softcap)?, // (B, T, H·D)
            Some((c, window)) => {
                let y = attend(&q, k, v, mask, self.scale, self.softcap, c, window)?; // (B, H, T, D)
                y.transpose(1, 2)?.reshape((b, t, self.n_head * hd))?
            }
        };
        self.o_proj.forward(&y)
    }
}

/// gate/up: two linears, or Phi-3's one fused `[gate | up]`.
enum GateUp {
    Split { gate_proj: Linear, up_proj: Linear },
    Fused { gate_up_proj: Linear },
}

struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
    act: Act,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let (c, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let gate_up = if cfg.fused {
            GateUp::Fused { gate_up_proj: linear(&vb, adapters, "gate_up_proj", (c, 2 * f), bias, "mlp_bias")? }
        } else {
            GateUp::Split {
                gate_proj: linear(&vb, adapters, "gate_proj", (c, f), bias, "mlp_bias")?,
                up_proj: linear(&vb, adapters, "up_proj", (c, f), bias, "mlp_bias")?,
            }
        };
        Ok(Self { gate_up, down_proj: linear(&vb, adapters, "down_proj", (f, c), bias, "mlp_bias")?, act: cfg.act })
    }

    /// mlp(pre(x)); the norm runs inside the gate/up projections' nodes.
    fn forward(&self, x: &Tensor, pre: Option<&RmsNorm>) -> Result<Tensor> {
        let pre = pre.map(|n| &n.op);
        let (gate, up) = match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => (gate_proj.forward_pre(x, pre)?, up_proj.forward_pre(x, pre)?),
            GateUp::Fused { gate_up_proj } => {
                let y = gate_up_proj.forward_pre(x, pre)?; // (B, T, 2F)
                let f = y.dim(2)? / 2;
                (y.narrow(2, 0, f)?, y.narrow(2, f, f)?)
            }
        };
        let act = match self.act {
            Act::Silu => ops::act::silu_pre(),
            Act::GeluTanh => ops::act::gelu_pre(),
        };
        self.down_proj.forward(&ops::family::gated(&gate, &up, &act)?) // act(gate) · up, one node
    }
}

/// One layer. The norms keep their transformers names; which of them run before or after
/// attention and MLP depends on the family (`NormPlacement`).
struct Layer {
    input_layernorm: Option<RmsNorm>,
    self_attn: SelfAttn,
    /// Llama: before the MLP; Gemma and EXAONE 4: after attention.
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: Option<RmsNorm>,
    post_feedforward_layernorm: Option<RmsNorm>,
    mlp: Mlp,
    placement: NormPlacement,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let norm = |name: &str, want: bool| -> Result<Option<RmsNorm>> {
            let key = format!("model_type {}: {name} {}", cfg.model_type, if want { "expected" } else { "not expected" });
            check_present(&vb.pp(name), "weight", want, &key)?;
            want.then(|| RmsNorm::load(vb.pp(name), cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)).transpose()
        };
        let p = cfg.norms;
        Ok(Self {
            input_layernorm: norm("input_layernorm", p != NormPlacement::Post)?,
            self_attn: SelfAttn::load(vb.pp("self_attn"), cfg, adapters)?,
            post_attention_layernorm: norm("post_attention_layernorm", true)?.context("internal: no post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm", p == NormPlacement::Sandwich)?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm", p != NormPlacement::Pre)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, adapters)?,
            placement: p,
        })
    }

    fn forward(&self, x: &Tensor, rope: Option<&(Tensor, Tensor)>, mask: &Tensor, cache: Option<(&mut LayerCache, Option<usize>)>) -> Result<Tensor> {
        let (pa, post_a, pm, post_m) = match self.placement {
            NormPlacement::Pre => (self.input_layernorm.as_ref(), None, Some(&self.post_attention_layernorm), None),
            NormPlacement::Sandwich => (
                self.input_layernorm.as_ref(),
                Some(&self.post_attention_layernorm),
                self.pre_feedforward_layernorm.as_ref(),
                self.post_feedforward_layernorm.as_ref(),
            ),
            NormPlacement::Post => (None, Some(&self.post_attention_layernorm), None, self.post_feedforward_layernorm.as_ref()),
        };
        let post = |n: Option<&RmsNorm>, y: Tensor| -> Result<Tensor> {
            match n {
                Some(n) => n.forward(&y),
                None => Ok(y),
            }
        };
        let x = (x + post(post_a, self.self_attn.forward(x, pa, rope, mask, cache)?)?)?;
        Ok((&x + post(post_m, self.mlp.forward(&x, pm)?)?)?)
    }
}

/// EXAONE 3.5's original key names: (LLaMA's, EXAONE's) parts, each replaced once, in this
/// order (either way round: `merge` writes an EXAONE 3.5 reward model with LLaMA's names).
/// transformers `conversion_mapping.py` ("exaone").
pub const EXAONE_NAMES: [(&str, &str); 10] = [
    ("model.embed_tokens.", "transformer.wte."),
    ("model.layers.", "transformer.h."),
    ("model.norm.", "transformer.ln_f."),
    (".self_attn.o_proj.", ".attn.attention.out_proj."),
    (".self_attn.", ".attn.attention."),
    (".input_layernorm.", ".ln_1."),
    (".post_attention_layernorm.", ".ln_2."),
    (".mlp.gate_proj.", ".mlp.c_fc_0."),
    (".mlp.up_proj.", ".mlp.c_fc_1."),
    (".mlp.down_proj.", ".mlp.c_proj."),
];

/// The name a checkpoint stores the tensor `name` (a module path + `.weight`/`.bias`) under,
/// when it is not the module path (`has` says what the checkpoint holds): EXAONE 3.5's original
/// names, and gemma3's `language_model.model.` (as transformers 5 saves it).
pub fn checkpoint_name(family: Family, name: &str, has: &dyn Fn(&str) -> bool) -> String {
    if has(name) {
        return name.to_string();
    }
    match family {
        Family::Exaone => EXAONE_NAMES.iter().fold(name.to_string(), |n, (llama, exaone)| n.replacen(llama, exaone, 1)),
        Family::Gemma3 if name.starts_with("model.language_model.") => name.replacen("model.language_model.", "language_model.model.", 1),
        Family::Gemma3 if name.starts_with("lm_head.") => format!("language_model.{name}"),
        _ => name.to_string(),
    }
}

/// `vb` with reads renamed by [`checkpoint_name`].
fn checkpoint_names(vb: VarBuilder<'static>, cfg: &Config) -> VarBuilder<'static> {
    let orig = vb.clone();
    let family = cfg.family;
    vb.rename_f(move |name: &str| checkpoint_name(family, name, &|n| orig.contains_tensor(n)))
}

/// The decoder with its LM head (`*ForCausalLM`).
pub struct Decoder {
    /// Token embeddings, (V, C).
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    pub cfg: Config,
}

impl Decoder {
    pub fn load(vb: VarBuilder<'static>, cfg: &Config, adapters: &AdapterSet) -> Result<Self> {
        let vb = checkpoint_names(vb, cfg);
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let mvb = vb.pp(cfg.prefix);
        let embed = format!("{}.embed_tokens.weight", cfg.prefix);
        let embed_tokens = mvb.get((v, c), "embed_tokens.weight").with_context(|| format!("loading {embed}"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(mvb.pp("layers").pp(i), cfg, adapters))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(mvb.pp("norm"), c, cfg.rms_norm_eps, cfg.norm_plus_one)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Tied: the embedding's storage (some tied checkpoints also store an equal lm_head).
            Linear::from_weight("lm_head".into(), embed_tokens.clone(), None, WeightLayout::Linear, adapters)?
        } else {
            if !vb.contains_tensor("lm_head.weight") {
                crate::bail_kind!(
                    Kind::CheckpointConfigMismatch,
                    "the checkpoint has no lm_head.weight, but config.json says tie_word_embeddings = false; \
                     if the head is tied to {embed}, set tie_word_embeddings to true"
                )
            }
            Linear::load(&vb.pp("lm_head"), adapters, c, v, false, WeightLayout::Linear)?
        };
        Ok(Self { embed_tokens, layers, norm, lm_head, cfg: cfg.clone() })
    }

    /// ids, pos: (B, T) u32; mask: (B, 1, T, T_past + T) -> the block input (B, T, C) and what
    /// every layer needs: the masks (with the sliding window's when a layer has one) and rope.
    pub fn embed(&self, ids: &Tensor, pos: &Tensor, mask: Tensor) -> Result<(Tensor, BlockCtx)> {
        let (b, t) = ids.dims2()?;
        let max = pos.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.max_position_embeddings {
            anyhow::bail!("position {max} is beyond the model's context (max_position_embeddings = {})", self.cfg.max_position_embeddings)
        }
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        if let Some(s) = self.cfg.embed_scale {
            // transformers multiplies by the scale cast to the weights' dtype.
            let s = Tensor::new(s as f32, x.device())?.to_dtype(x.dtype())?;
            x = x.broadcast_mul(&s)?;
        }
        let dt = x.dtype();
        let uses = |r: LayerRope| self.cfg.layers.iter().any(|l| l.rope == r);
        let rope = if uses(LayerRope::Global) { Some(self.cfg.rope.at(pos, dt)?) } else { None };
        let rope_local = match (&self.cfg.rope_local, uses(LayerRope::Local)) {
            (Some(r), true) => Some(r.at(pos, dt)?),
            _ => None,
        };
        let sliding_mask = match self.cfg.layers.iter().find_map(|l| l.window) {
            Some(w) => Some(super::window_mask(&mask, w)?),
            None => None,
        };
        Ok((x, BlockCtx { mask, sliding_mask, rope, rope_local }))
    }

    /// Layer `i`: x (B, T, C) -> (B, T, C).
    pub fn block(&self, i: usize, x: &Tensor, ctx: &BlockCtx, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let a = self.cfg.layers[i];
        let rope = match a.rope {
            LayerRope::Global => ctx.rope.as_ref(),
            LayerRope::Local => ctx.rope_local.as_ref(),
            LayerRope::None => None,
        };
        let mask = match (a.window, &ctx.sliding_mask) {
            (Some(_), Some(m)) => m,
            _ => &ctx.mask,
        };
        // A sliding layer's cache keeps the last `window` keys only: its mask's last columns.
        let mask = match &cache {
            Some(c) if a.window.is_some() => {
                let (tq, tk) = (x.dim(1)?, mask.dim(3)?);
                let keys = c.cached() + tq;
                if keys < tk { mask.narrow(3, tk - keys, keys)? } else { mask.clone() }
            }
            _ => mask.clone(),
        };
        self.layers[i].forward(x, rope, &mask, cache.map(|c| (c, a.window)))
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

