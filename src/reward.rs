//! The reward model: a base (+ adapters) with a scalar head `score = Linear(hidden, 1, bias=False)`
//! read at the last real token of each sequence — never averaged over padding (KoChatGPT's
//! flaw 2). The head is saved and restored with the adapter, as PEFT's `modules_to_save`
//! (`base_model.model.score.weight`, [1, hidden]); an RM folder without it is an error.
//! Reference: transformers `GPT2ForSequenceClassification` / `LlamaForSequenceClassification`.
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use crate::lora::Adapter;
use crate::model::{causal_mask, Model};

/// PEFT's key for the trained head.
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// Whether `key` is a reward head's tensor (PEFT's `modules_to_save` key, or its older form).
pub fn is_score_key(key: &str) -> bool {
    key == SCORE_KEY || key == "base_model.model.score.modules_to_save.default.weight"
}

/// The scalar head, (1, C) f32.
#[derive(Clone)]
pub struct RewardHead {
    pub weight: Tensor,
    /// Set when the head is trained.
    pub var: Option<Var>,
}

impl RewardHead {
    /// A new head, N(0, 0.02) as transformers initialises `score`, seeded.
    pub fn fresh(hidden: usize, seed: u64, dev: &Device) -> Result<Self> {
        let w = crate::rng::SeededRng::derive(seed, "score").normal(&[1, hidden], 0.02, dev)?;
        let var = Var::from_tensor(&w)?;
        Ok(Self { weight: var.as_tensor().clone(), var: Some(var) })
    }

    pub fn from_tensor(w: Tensor, trainable: bool, hidden: usize, dev: &Device) -> Result<Self> {
        if w.dims() != [1, hidden] {
            bail!("{SCORE_KEY} has shape {:?}, the model needs [1, {hidden}] (was the reward model trained on another base?)", w.dims())
        }
        let w = w.to_dtype(DType::F32)?.to_device(dev)?;
        if trainable {
            let var = Var::from_tensor(&w)?;
            Ok(Self { weight: var.as_tensor().clone(), var: Some(var) })
        } else {
            Ok(Self { weight: w, var: None })
        }
    }

    /// Rewards (B,) f32 from final hidden states h (B, T, C) at positions `last[b]`.
    pub fn rewards(&self, h: &Tensor, last: &[usize]) -> Result<Tensor> {
        let (b, t, c) = h.dims3()?;
        let idx: Vec<u32> = last.iter().enumerate().map(|(r, &l)| (r * t + l) as u32).collect();
        let idx = Tensor::new(idx.as_slice(), h.device())?;
        let pooled = h.reshape((b * t, c))?.index_select(&idx, 0)?.to_dtype(DType::F32)?; // (B, C)
        Ok(pooled.matmul(&self.weight.t()?)?.squeeze(1)?) // (B,)
    }
}

/// Right-pads sequences into (ids, positions, mask) and returns each one's last index.
pub fn pad_batch(seqs: &[Vec<u32>], pad: u32, dev: &Device) -> Result<(Tensor, Tensor, Tensor, Vec<usize>)> {
    let (b, t) = (seqs.len(), seqs.iter().map(Vec::len).max().unwrap_or(1));
    let mut ids = Vec::with_capacity(b * t);
    let mut valid = Vec::with_capacity(b);
    for s in seqs {
        if s.is_empty() {
            bail!("cannot score an empty sequence")
        }
        ids.extend(s.iter().copied().chain(std::iter::repeat_n(pad, t - s.len())));
        valid.push((0..t).map(|j| j < s.len()).collect::<Vec<_>>());
    }
    let pos = Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?.repeat((b, 1))?;
    let last = seqs.iter().map(|s| s.len() - 1).collect();
    Ok((Tensor::from_vec(ids, (b, t), dev)?, pos, causal_mask(&valid, t, 0, dev)?, last))
}

/// Rewards of token sequences, in batches of `batch` (no update).
pub fn score(model: &Model, head: &RewardHead, seqs: &[Vec<u32>], pad: u32, batch: usize) -> Result<Vec<f32>> {
    score_with(model, head, seqs, pad, batch, |_, _| Ok(()))
}

/// [`score`], also handing each batch's final hidden states (B, T, C) and the index of its
/// first sequence to `each` (PPO keeps the critic's features from them).
pub fn score_with(
    model: &Model,
    head: &RewardHead,
    seqs: &[Vec<u32>],
    pad: u32,
    batch: usize,
    mut each: impl FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Vec<f32>> {
    let _no_grad = model.adapters.no_grad();
    let mut out = Vec::with_capacity(seqs.len());
    for (i, chunk) in seqs.chunks(batch.max(1)).enumerate() {
        let (ids, pos, mask, last) = pad_batch(chunk, pad, &model.device)?;
        let h = model.hidden(&ids, &pos, &mask, None)?;
        out.extend(head.rewards(&h, &last)?.detach().to_vec1::<f32>()?);
        each(i * batch.max(1), &h)?;
    }
    Ok(out)
}

/// Loads a reward-model folder: its LoRA adapter and its head (required), and the adapters it
/// was stacked on (inside the folder, see [`crate::peft::read_stack`]), all frozen unless
/// `trainable`.
pub fn load_reward_adapter(dir: &Path, name: &str, trainable: bool) -> Result<(Vec<Arc<Adapter>>, Tensor)> {
    let config = crate::peft::read_config(dir)?;
    let (lora, mut other) = crate::peft::read_tensors(dir)?;
    let key = other.keys().find(|k| is_score_key(k)).cloned();
    let head = key.and_then(|k| other.remove(&k));
    let head = head.with_context(|| {
        format!(
            "{}: no reward head ({SCORE_KEY}): this is not a reward-model adapter (an SFT adapter has no head; train one with `lorafit rm`)",
            dir.join(crate::peft::WEIGHTS_FILE).display()
        )
    })?;
    if let Some(k) = other.keys().next() {
        bail!("{}: unexpected tensor {k}", dir.join(crate::peft::WEIGHTS_FILE).display())
    }
    let mut adapters = vec![];
    for (i, below) in crate::peft::read_stack(dir)?.iter().enumerate() {
        adapters.push(crate::peft::load_adapter(below, &format!("{name}-base{i}"), 1.0, false)?);
    }
    adapters.push(Adapter::from_tensors(name, config, lora, 1.0, trainable).with_context(|| format!("adapter {}", dir.display()))?);
    Ok((adapters, head))
}
