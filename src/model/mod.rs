//! The model: a frozen base (GPT-2 or LLaMA) with LoRA adapters attached at construction.
//!
//! [`Model::load`] reads `config.json`, picks the architecture from `model_type`, and builds
//! it over one VarBuilder of the checkpoint's weights (plain tensors: no gradients, no
//! optimizer state). [`Model::hidden`] is the shared entry point for training (labels pick
//! positions before the LM head, so no (B, T, V) logits are built for unlabelled tokens) and
//! for generation (with a [`KvCache`]).
pub mod gpt2;
pub mod llama;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::lora::{AdapterSet, Linear};
use crate::ops;
use crate::weights::ModelFiles;

/// Deserializes a config, naming the offending field: serde_json's type errors do not say
/// which field they are in, so on failure each field is dropped in turn to find the one at fault.
fn parse_config<T: serde::de::DeserializeOwned>(v: &serde_json::Value, path: &Path, model_type: &str) -> Result<T> {
    let err = match serde_json::from_value::<T>(v.clone()) {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let culprit = v.as_object().filter(|_| !err.to_string().starts_with("missing field")).and_then(|o| {
        o.keys().find(|k| {
            let mut rest = o.clone();
            rest.remove(*k);
            match serde_json::from_value::<T>(serde_json::Value::Object(rest)) {
                Ok(_) => true,
                Err(e) => e.to_string() == format!("missing field `{k}`"),
            }
        })
    });
    match culprit {
        Some(k) => Err(err).with_context(|| format!("{}: invalid {model_type} config: field \"{k}\" = {}", path.display(), v[k])),
        None => Err(err).with_context(|| format!("{}: invalid {model_type} config", path.display())),
    }
}

/// Architecture and its parsed config.
#[derive(Clone, Debug)]
pub enum Arch {
    Gpt2(gpt2::Config),
    Llama(llama::Config),
}

impl Arch {
    /// Parses `config.json`, with errors naming the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).with_context(|| {
            format!("{} has no \"model_type\" field (a Hugging Face config.json has one)", path.display())
        })?;
        let arch = match model_type {
            "gpt2" => Arch::Gpt2(parse_config(&v, path, model_type)?),
            "llama" => Arch::Llama(parse_config(&v, path, model_type)?),
            other => bail!(
                "{}: model_type {other:?} is not supported; lorafit supports \"gpt2\" (GPT-2, KoGPT2) and \"llama\"",
                path.display()
            ),
        };
        match &arch {
            Arch::Gpt2(c) => c.validate(),
            Arch::Llama(c) => c.validate(),
        }
        .with_context(|| format!("{}: cannot use this {model_type} config", path.display()))?;
        Ok(arch)
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            Arch::Gpt2(_) => "gpt2",
            Arch::Llama(_) => "llama",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Arch::Gpt2(c) => c.vocab_size,
            Arch::Llama(c) => c.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Arch::Gpt2(c) => c.n_embd,
            Arch::Llama(c) => c.hidden_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Arch::Gpt2(c) => c.n_layer,
            Arch::Llama(c) => c.num_hidden_layers,
        }
    }

    /// Longest sequence the model accepts.
    pub fn max_positions(&self) -> usize {
        match self {
            Arch::Gpt2(c) => c.n_positions,
            Arch::Llama(c) => c.max_position_embeddings,
        }
    }
}

enum Net {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
}

/// A loaded model: frozen base + adapters.
pub struct Model {
    net: Net,
    pub arch: Arch,
    pub adapters: AdapterSet,
    pub dtype: DType,
    pub device: Device,
}

/// What every block of one pass needs besides its input.
pub struct BlockCtx {
    /// Additive attention mask (B, 1, T, T_past + T), f32.
    pub mask: Tensor,
    /// LLaMA's rotary cos/sin at the pass's positions, (B, T, D/2) each.
    pub rope: Option<(Tensor, Tensor)>,
}

/// Per-layer key/value cache for generation: each entry (B, H_kv, T_past, D).
pub struct KvCache {
    pub layers: Vec<(Option<Tensor>, Option<Tensor>)>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| (None, None)).collect() }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|(k, _)| k.as_ref()).map(|k| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Scaled dot-product attention with an additive mask and grouped-query heads.
/// q: (B, H, Tq, D); k, v: (B, H_kv, Tk_new, D), appended to `cache` if given;
/// mask: (B, 1, Tq, Tk) -> (B, H, Tq, D).
pub(crate) fn attend(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    mask: &Tensor,
    scale: f64,
    cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
) -> Result<Tensor> {
    let (k, v) = match cache {
        Some((ck, cv)) => {
            let k = match ck.take() {
                Some(p) => Tensor::cat(&[&p, &k], 2)?,
                None => k,
            };
            let v = match cv.take() {
                Some(p) => Tensor::cat(&[&p, &v], 2)?,
                None => v,
            };
            *ck = Some(k.clone());
            *cv = Some(v.clone());
            (k, v)
        }
        None => (k, v),
    };
    let (b, h, tq, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let tk = k.dim(2)?;
    let rep = h / h_kv;
    // GQA: query heads h*rep..(h+1)*rep share kv head h. Reshape q instead of repeating k/v:
    // (B, H, Tq, D) -> (B, H_kv, rep*Tq, D), so no copy of the cache is made.
    let q = q.reshape((b, h_kv, rep * tq, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?; // (B, H_kv, rep*Tq, Tk)
    let scores = scores.reshape((b, h, tq, tk))?;
    let p = ops::masked_softmax(&scores, mask)?; // (B, H, Tq, Tk)
    let p = p.reshape((b, h_kv, rep * tq, tk))?;
    Ok(p.matmul(&v)?.reshape((b, h, tq, d))?)
}

/// Additive attention mask (B, 1, Tq, Tk) f32 for queries at absolute index `past + i`:
/// 0 where key `j <= past + i` and `key_valid[b][j]`, f32::MIN elsewhere (as transformers
/// does, so a fully-masked padding row gives a uniform softmax, not NaN).
pub fn causal_mask(key_valid: &[Vec<bool>], tq: usize, past: usize, dev: &Device) -> Result<Tensor> {
    let b = key_valid.len();
    let tk = past + tq;
    let mut m = vec![f32::MIN; b * tq * tk];
    for (bi, valid) in key_valid.iter().enumerate() {
        if valid.len() != tk {
            bail!("attention mask row {bi} has {} keys, expected {tk}", valid.len())
        }
        for i in 0..tq {
            for j in 0..=past + i {
                if valid[j] {
                    m[(bi * tq + i) * tk + j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, tq, tk), dev)?)
}

impl Model {
    /// Loads the base from `files` in `dtype` on `device`, attaching `adapters`.
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device, adapters: AdapterSet) -> Result<Self> {
        let arch = Arch::from_file(&files.config)?;
        let vb = files.var_builder(dtype, device)?;
        let net = match &arch {
            Arch::Gpt2(c) => Net::Gpt2(gpt2::Gpt2::load(vb, c, &adapters).with_context(|| files.describe())?),
            Arch::Llama(c) => Net::Llama(llama::Llama::load(vb, c, &adapters).with_context(|| files.describe())?),
        };
        adapters.check_complete()?;
        Ok(Self { net, arch, adapters, dtype, device: device.clone() })
    }

    pub fn num_layers(&self) -> usize {
        self.arch.num_layers()
    }

    /// Embeds ids at positions pos, both (B, T) u32, for a pass with additive attention mask
    /// (B, 1, T, T_past + T). Returns the block input (B, T, C) and what every block needs.
    pub fn embed(&self, ids: &Tensor, pos: &Tensor, mask: Tensor) -> Result<(Tensor, BlockCtx)> {
        Ok(match &self.net {
            Net::Gpt2(m) => (m.embed(ids, pos)?, BlockCtx { mask, rope: None }),
            Net::Llama(m) => {
                let (x, rope) = m.embed(ids, pos)?;
                (x, BlockCtx { mask, rope: Some(rope) })
            }
        })
    }

    /// Transformer block `i`: x (B, T, C) -> (B, T, C).
    pub fn block(&self, i: usize, x: &Tensor, ctx: &BlockCtx, cache: Option<&mut KvCache>) -> Result<Tensor> {
        match (&self.net, &ctx.rope) {
            (Net::Gpt2(m), _) => m.block(i, x, &ctx.mask, cache),
            (Net::Llama(m), Some(rope)) => m.block(i, x, rope, &ctx.mask, cache),
            (Net::Llama(_), None) => bail!("internal: LLaMA block called without rotary tables"),
        }
    }

    /// The final norm before the LM head.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        match &self.net {
            Net::Gpt2(m) => m.final_norm(x),
            Net::Llama(m) => m.final_norm(x),
        }
    }

    /// ids, pos: (B, T) u32; mask: (B, 1, T, T_past + T) -> final hidden states (B, T, C).
    pub fn hidden(&self, ids: &Tensor, pos: &Tensor, mask: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (mut x, ctx) = self.embed(ids, pos, mask.clone())?;
        for i in 0..self.num_layers() {
            x = self.block(i, &x, &ctx, cache.as_deref_mut())?;
        }
        self.final_norm(&x)
    }

    /// The LM head layer (a frozen [`Linear`], possibly with LoRA).
    pub fn lm_head_layer(&self) -> &Linear {
        match &self.net {
            Net::Gpt2(m) => m.lm_head(),
            Net::Llama(m) => m.lm_head(),
        }
    }

    /// hidden (..., C) -> logits (..., V), in the base dtype.
    pub fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_head_layer().forward(h)
    }

    /// Plain causal forward over unpadded rows of equal length: ids (B, T) -> logits (B, T, V).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, &self.device)?.unsqueeze(0)?.repeat((b, 1))?;
        let mask = causal_mask(&vec![vec![true; t]; b], t, 0, &self.device)?;
        self.lm_head(&self.hidden(ids, &pos, &mask, None)?)
    }

    /// Mean next-token NLL of one unpadded sequence and its per-token values (f32).
    /// `ids` must hold at least 2 tokens. The loss tensor keeps its graph when adapters train.
    pub fn sequence_nll(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.len() < 2 {
            bail!("a sequence needs at least 2 tokens for a next-token loss, got {}", ids.len())
        }
        let t = ids.len();
        let x = Tensor::new(ids, &self.device)?.unsqueeze(0)?; // (1, T)
        let pos = Tensor::arange(0u32, t as u32, &self.device)?.unsqueeze(0)?;
        let mask = causal_mask(&[vec![true; t]], t, 0, &self.device)?;
        let h = self.hidden(&x, &pos, &mask, None)?.squeeze(0)?.narrow(0, 0, t - 1)?; // (T-1, C)
        let logits = self.lm_head(&h)?; // (T-1, V)
        let targets = Tensor::new(&ids[1..], &self.device)?;
        Ok(ops::cross_entropy(&logits, &targets)?.mean_all()?)
    }
}
