//! The model: a frozen base (GPT-2, GPT-NeoX, or one of the LLaMA-like families of
//! `family.rs`) with LoRA adapters attached at construction.
//!
//! [`Model::load`] reads `config.json`, picks the architecture from `model_type`, and builds
//! it over one VarBuilder of the checkpoint's weights (plain tensors: no gradients, no
//! optimizer state). [`Model::hidden`] is the shared entry point for training (labels pick
//! positions before the LM head, so no (B, T, V) logits are built for unlabelled tokens) and
//! for generation (with a [`KvCache`], bounded by the window on sliding-window layers).
pub mod decoder;
pub mod family;
pub mod gpt2;
pub mod gpt_neox;
pub mod norm;
pub mod rope;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Kind, KindExt};
use crate::lora::{AdapterSet, Linear, WeightLayout};
use crate::ops;
use crate::weights::ModelFiles;

pub use family::SUPPORTED;

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

/// Refuses config sizes past any real model (the largest have a hidden size of a few 10^4, about
/// 10^2 layers, head_dim 256 and a vocabulary of a few 10^5) before anything is sized by them:
/// `at` prefixes the key (gemma3's `text_config.`). The bounds leave every real model far inside.
pub(crate) fn check_sizes(at: &str, sizes: &[(&str, usize)]) -> Result<()> {
    for &(key, v) in sizes {
        let max: usize = match key {
            "hidden_size" | "n_embd" | "intermediate_size" | "n_inner" => 1 << 20,
            "vocab_size" => 1 << 24,
            _ => 1 << 14, // layers, heads, head_dim
        };
        if v > max {
            bail!("{at}{key} = {v} is more than any machine holds (lorafit accepts at most {max})")
        }
    }
    Ok(())
}

/// Architecture and its parsed config.
#[derive(Clone, Debug)]
pub enum Arch {
    Gpt2(gpt2::Config),
    /// The LLaMA-like families (llama, mistral, qwen2, qwen3, gemma2/3, exaone, exaone4, phi3).
    Decoder(family::Config),
    GptNeox(gpt_neox::Config),
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
        let cannot = || format!("{}: cannot use this {model_type} config", path.display());
        let arch = match model_type {
            "gpt2" => {
                let c: gpt2::Config = parse_config(&v, path, model_type)?;
                c.validate().with_context(cannot)?;
                Arch::Gpt2(c)
            }
            "gpt_neox" => {
                let mut c: gpt_neox::Config = parse_config(&v, path, model_type)?;
                c.validate().kind(Kind::UnsupportedModel, cannot())?;
                Arch::GptNeox(c)
            }
            t if family::Family::from_model_type(t).is_some() => {
                Arch::Decoder(family::Config::from_json(&v, t).kind(Kind::UnsupportedModel, cannot())?)
            }
            other => crate::bail_kind!(
                Kind::UnsupportedModel,
                "{}: model_type {other:?} is not supported; lorafit supports {SUPPORTED}",
                path.display()
            ),
        };
        Ok(arch)
    }

    pub fn model_type(&self) -> &str {
        match self {
            Arch::Gpt2(_) => "gpt2",
            Arch::Decoder(c) => &c.model_type,
            Arch::GptNeox(_) => "gpt_neox",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Arch::Gpt2(c) => c.vocab_size,
            Arch::Decoder(c) => c.vocab_size,
            Arch::GptNeox(c) => c.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Arch::Gpt2(c) => c.n_embd,
            Arch::Decoder(c) => c.hidden_size,
            Arch::GptNeox(c) => c.hidden_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Arch::Gpt2(c) => c.n_layer,
            Arch::Decoder(c) => c.num_hidden_layers,
            Arch::GptNeox(c) => c.num_hidden_layers,
        }
    }

    /// Longest sequence the model accepts.
    pub fn max_positions(&self) -> usize {
        match self {
            Arch::Gpt2(c) => c.n_positions,
            Arch::Decoder(c) => c.max_position_embeddings,
            Arch::GptNeox(c) => c.max_position_embeddings,
        }
    }

    /// Phi-3's longrope original context: keys cached before a sequence passes it were rotated
    /// with the short factors, so generation re-reads the whole sequence once it does, as
    /// transformers' `Phi3ForCausalLM.prepare_inputs_for_generation` drops its cache.
    pub fn longrope_original(&self) -> Option<usize> {
        match self {
            Arch::Decoder(c) => c.rope.long_context_start(),
            _ => None,
        }
    }

    /// The LM head's module path (`lm_head`, GPT-NeoX's `embed_out`) and checkpoint key.
    pub fn lm_head_name(&self) -> &'static str {
        match self {
            Arch::GptNeox(_) => "embed_out",
            _ => "lm_head",
        }
    }

    /// PEFT's default `target_modules` for the architecture (peft `utils/constants.py`).
    pub fn default_lora_targets(&self) -> Vec<String> {
        let t: &[&str] = match self {
            Arch::Gpt2(_) => &["c_attn"],
            Arch::GptNeox(_) => &["query_key_value"],
            Arch::Decoder(c) if c.fused => &["qkv_proj"],
            Arch::Decoder(_) => &["q_proj", "v_proj"],
        };
        t.iter().map(|s| s.to_string()).collect()
    }

    /// transformers' sequence-classification class of the architecture (a merged reward model).
    pub fn seq_cls_architecture(&self) -> String {
        match self {
            Arch::Gpt2(_) => "GPT2ForSequenceClassification".into(),
            Arch::GptNeox(_) => "GPTNeoXForSequenceClassification".into(),
            Arch::Decoder(c) if c.model_type == "gemma3_text" => "Gemma3TextForSequenceClassification".into(),
            Arch::Decoder(c) => format!("{}ForSequenceClassification", c.family.class_prefix()),
        }
    }

    /// The checkpoint key of the tensor at module path `name` (`has`: what the checkpoint holds).
    pub fn checkpoint_name(&self, name: &str, has: &dyn Fn(&str) -> bool) -> String {
        match self {
            Arch::Decoder(c) => decoder::checkpoint_name(c.family, name, has),
            _ => name.to_string(),
        }
    }

    /// The model's final soft-capping of the logits (Gemma), if any.
    pub fn final_softcap(&self) -> Option<f64> {
        match self {
            Arch::Decoder(c) => c.final_softcap,
            _ => None,
        }
    }
}

enum Net {
    Gpt2(gpt2::Gpt2),
    Decoder(decoder::Decoder),
    GptNeox(gpt_neox::GptNeox),
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
    /// The same with keys outside the sliding window masked too, for sliding-window layers.
    pub sliding_mask: Option<Tensor>,
    /// Rotary cos/sin at the pass's positions, (B, T, R/2) each (none for GPT-2).
    pub rope: Option<(Tensor, Tensor)>,
    /// Gemma 3's local rope (its sliding layers' base frequency).
    pub rope_local: Option<(Tensor, Tensor)>,
}

/// One layer's key/value cache, each (B, H_kv, T_kept, D). A sliding-window layer keeps the
/// last `window` positions only (older keys are masked anyway): its memory stays bounded.
#[derive(Default)]
pub struct LayerCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
    /// Positions dropped from the front.
    pub dropped: usize,
}

impl LayerCache {
    /// Positions held.
    pub fn cached(&self) -> usize {
        self.k.as_ref().map(|k| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }

    /// Appends k, v (B, H_kv, T_new, D) and returns all keys and values this step attends to;
    /// then trims the cache to the last `window` positions if given.
    pub fn append(&mut self, k: Tensor, v: Tensor, window: Option<usize>) -> Result<(Tensor, Tensor)> {
        let cat = |old: Option<Tensor>, new: Tensor| -> Result<Tensor> {
            Ok(match old {
                Some(p) => Tensor::cat(&[&p, &new], 2)?,
                None => new,
            })
        };
        let (k, v) = (cat(self.k.take(), k)?, cat(self.v.take(), v)?);
        let n = k.dim(2)?;
        match window {
            Some(w) if n > w => {
                self.k = Some(k.narrow(2, n - w, w)?.contiguous()?);
                self.v = Some(v.narrow(2, n - w, w)?.contiguous()?);
                self.dropped += n - w;
            }
            _ => (self.k, self.v) = (Some(k.clone()), Some(v.clone())),
        }
        Ok((k, v))
    }
}

/// Per-layer key/value cache for generation.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| LayerCache::default()).collect() }
    }

    /// Number of positions seen (held or dropped by a sliding window).
    pub fn len(&self) -> usize {
        self.layers.first().map(|l| l.cached() + l.dropped).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Scaled dot-product attention with an additive mask and grouped-query heads, for cached
/// (generation) passes. q: (B, H, Tq, D); k, v: (B, H_kv, Tk_new, D), appended to `cache`;
/// mask: (B, 1, Tq, Tk) over the keys the cache returns -> (B, H, Tq, D). `softcap`: Gemma 2's
/// `c · tanh(s / c)` on the scores; `window`: the layer's sliding window (bounds the cache).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(q: &Tensor, k: Tensor, v: Tensor, mask: &Tensor, scale: f64, softcap: Option<f64>, cache: &mut LayerCache, window: Option<usize>) -> Result<Tensor> {
    let (k, v) = cache.append(k, v, window)?;
    let (b, h, tq, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let tk = k.dim(2)?;
    let rep = h / h_kv;
    // GQA: query heads h*rep..(h+1)*rep share kv head h. Reshape q instead of repeating k/v:
    // (B, H, Tq, D) -> (B, H_kv, rep*Tq, D), so no copy of the cache is made.
    let q = q.reshape((b, h_kv, rep * tq, d))?;
    let mut scores = (q.matmul(&k.t()?)? * scale)?; // (B, H_kv, rep*Tq, Tk)
    if let Some(c) = softcap {
        scores = ((scores / c)?.tanh()? * c)?;
    }
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

/// `mask` (B, 1, Tq, Tk) with keys `window` or more slots before the query masked too
/// (transformers' `sliding_window_overlay`: key j is seen from query slot i iff i - j < window;
/// slots, not positions, so a left-padded row sees what it sees alone).
pub fn window_mask(mask: &Tensor, window: usize) -> Result<Tensor> {
    let (tq, tk) = (mask.dim(2)?, mask.dim(3)?);
    let past = tk - tq;
    let band: Vec<f32> = (0..tq).flat_map(|i| (0..tk).map(move |j| if past + i >= j + window { f32::MIN } else { 0.0 })).collect();
    let band = Tensor::from_vec(band, (1, 1, tq, tk), mask.device())?;
    Ok(mask.broadcast_minimum(&band)?)
}

/// Fails when the checkpoint has `vb.<tensor>` and config.json says it has not, or the reverse
/// (`key` names the config switch in the message).
pub(crate) fn check_present(vb: &VarBuilder, tensor: &str, expected: bool, key: &str) -> Result<()> {
    let has = vb.contains_tensor(tensor);
    if has != expected {
        crate::bail_kind!(
            Kind::CheckpointConfigMismatch,
            "{}.{tensor} is {} in the checkpoint, but config.json ({key}) says it {}",
            vb.prefix(),
            if has { "present" } else { "absent" },
            if expected { "exists" } else { "does not" }
        )
    }
    Ok(())
}

/// A block linear stored as nn.Linear, its bias as config.json says (checked against the checkpoint).
pub(crate) fn linear(vb: &VarBuilder, adapters: &AdapterSet, name: &str, (i, o): (usize, usize), bias: bool, key: &str) -> Result<Linear> {
    let vb = vb.pp(name);
    check_present(&vb, "bias", bias, key)?;
    Linear::load(&vb, adapters, i, o, bias, WeightLayout::Linear)
}

impl Model {
    /// Loads the base from `files` in `dtype` on `device`, attaching `adapters`.
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device, adapters: AdapterSet) -> Result<Self> {
        let arch = Arch::from_file(&files.config)?;
        let vb = files.var_builder(dtype, device)?;
        let net = Net::load(vb, &arch, &adapters).with_context(|| files.describe())?;
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
            Net::Gpt2(m) => (m.embed(ids, pos)?, BlockCtx { mask, sliding_mask: None, rope: None, rope_local: None }),
            Net::Decoder(m) => m.embed(ids, pos, mask)?,
            Net::GptNeox(m) => m.embed(ids, pos, mask)?,
        })
    }

    /// Transformer block `i`: x (B, T, C) -> (B, T, C).
    pub fn block(&self, i: usize, x: &Tensor, ctx: &BlockCtx, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let cache = cache.map(|c| &mut c.layers[i]);
        match &self.net {
            Net::Gpt2(m) => m.block(i, x, &ctx.mask, cache),
            Net::Decoder(m) => m.block(i, x, ctx, cache),
            Net::GptNeox(m) => m.block(i, x, ctx, cache),
        }
    }

    /// The final norm before the LM head.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        match &self.net {
            Net::Gpt2(m) => m.final_norm(x),
            Net::Decoder(m) => m.final_norm(x),
            Net::GptNeox(m) => m.final_norm(x),
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
            Net::Decoder(m) => m.lm_head(),
            Net::GptNeox(m) => m.lm_head(),
        }
    }

    /// hidden (..., C) -> logits (..., V), in the base dtype, soft-capped where the family does (Gemma).
    pub fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        let z = self.lm_head_layer().forward(h)?;
        Ok(match self.arch.final_softcap() {
            Some(c) => ops::family::softcap(&z, c)?,
            None => z,
        })
    }

    /// Logits at `temperature` (logits / t) from hidden states (..., C).
    pub fn logits_at(&self, h: &Tensor, temperature: f64) -> Result<Tensor> {
        if self.arch.final_softcap().is_some() {
            return Ok((self.lm_head(h)? / temperature)?);
        }
        self.lm_head(&(h / temperature)?)
    }

    /// Per-row NLL (N,) f32 of `targets` (N,) under `softmax(logits / temperature)`, from final
    /// hidden states h (N, C): the LM head and the loss as one node (`ops::lm_head_cross_entropy`,
    /// `chunk` rows of logits at a time), or through the head's LoRA when it has one.
    pub fn token_nll(&self, h: &Tensor, targets: &Tensor, chunk: usize, temperature: f64) -> Result<Tensor> {
        let head = self.lm_head_layer();
        let scaled = || -> Result<Tensor> { Ok(if temperature == 1.0 { h.clone() } else { (h / temperature)? }) };
        Ok(match self.arch.final_softcap() {
            None if head.has_lora() => ops::cross_entropy(&head.forward(&scaled()?)?, targets)?,
            None => ops::lm_head_cross_entropy(&scaled()?, &head.w_in_out()?, targets, chunk)?,
            Some(_) if head.has_lora() => ops::cross_entropy(&self.logits_at(h, temperature)?, targets)?,
            Some(c) => ops::lm_head_cross_entropy_capped(h, &head.w_in_out()?, targets, chunk, Some(c), 1.0 / temperature)?,
        })
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

impl Net {
    /// Builds the architecture's network over `vb` (also over merge's shape-only view).
    fn load(vb: VarBuilder<'static>, arch: &Arch, adapters: &AdapterSet) -> Result<Self> {
        Ok(match arch {
            Arch::Gpt2(c) => Net::Gpt2(gpt2::Gpt2::load(vb, c, adapters)?),
            Arch::Decoder(c) => Net::Decoder(decoder::Decoder::load(vb, c, adapters)?),
            Arch::GptNeox(c) => Net::GptNeox(gpt_neox::GptNeox::load(vb, c, adapters)?),
        })
    }
}

/// Builds `arch` over `vb` and drops it: attaches adapters and runs every check of the loaders
/// (merge runs it over a shape-only view of the checkpoint).
pub fn build_check(vb: VarBuilder<'static>, arch: &Arch, adapters: &AdapterSet) -> Result<()> {
    Net::load(vb, arch, adapters).map(drop)
}

