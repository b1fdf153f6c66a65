//! PPO's roles: the four roles over one base (which adapters each activates, and the
//! quantities read from a pass: response log-probs at the sampling temperature, entropy,
//! values, reward-model scores). The advantage math is in `ppo_math.rs`, the loop in `ppo.rs`.
use anyhow::Result;
use candle_core::{DType, Tensor};

use super::config::TrainConfig;
use super::batch::{Batch, SftExample};
use crate::model::Model;
use crate::reward::RewardHead;

pub const POLICY: &str = "policy";
pub const REFERENCE: &str = "reference";
pub const REWARD: &str = "reward";
pub const CRITIC: &str = "critic";
pub const V_HEAD_KEY: &str = "v_head.weight";

/// The roles, the value head and the settings of a run.
pub struct Roles<'a> {
    pub model: &'a Model,
    pub reward_head: RewardHead,
    pub v_head: RewardHead,
    pub reward_names: Vec<String>,
    pub critic_names: Vec<String>,
    pub has_reference: bool,
    pub cfg: &'a TrainConfig,
}

impl Roles<'_> {
    pub fn activate(&self, names: &[String]) {
        self.model.adapters.activate(&names.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// Per-token log-probs (N,) of the batch's learned tokens under the active adapters, at the
    /// sampling temperature, from final hidden states h.
    pub fn logp(&self, h: &Tensor, b: &Batch) -> Result<Tensor> {
        let (bs, t, c) = h.dims3()?;
        let hs = (h.reshape((bs * t, c))?.index_select(&b.select, 0)? / self.cfg.ppo.temperature)?;
        let head = self.model.lm_head_layer();
        let nll = if head.has_lora() {
            crate::ops::cross_entropy(&head.forward(&hs)?, &b.targets)?
        } else {
            crate::ops::lm_head_cross_entropy(&hs, &head.w_in_out()?, &b.targets, self.cfg.train.loss_chunk)?
        };
        Ok(nll.neg()?)
    }

    /// Mean entropy of the next-token distributions at the selected positions.
    pub fn entropy(&self, h: &Tensor, b: &Batch) -> Result<Tensor> {
        let (bs, t, c) = h.dims3()?;
        let hs = (h.reshape((bs * t, c))?.index_select(&b.select, 0)? / self.cfg.ppo.temperature)?;
        let logits = self.model.lm_head(&hs)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        Ok((logp.exp()? * &logp)?.sum(candle_core::D::Minus1)?.neg()?.mean_all()?)
    }

    /// Values (N,) at the selected positions from the critic's hidden states.
    pub fn values(&self, h: &Tensor, b: &Batch) -> Result<Tensor> {
        let (bs, t, c) = h.dims3()?;
        let hs = h.reshape((bs * t, c))?.index_select(&b.select, 0)?.to_dtype(DType::F32)?;
        Ok(hs.matmul(&self.v_head.weight.t()?)?.squeeze(1)?)
    }

    /// Reward-model scores of `prompt + response (+ eos if the response was cut)` at the last
    /// token, in batches of `bs`, under the active (reward) adapters; with `keep_features`, also
    /// the hidden states at the positions predicting each response token, (N, C) f32 in `ex`
    /// order: the critic's features when it has no adapter of its own (the appended eos cannot
    /// change earlier positions under the causal mask).
    pub fn score(&self, ex: &[SftExample], eos: u32, pad: u32, bs: usize, keep_features: bool) -> Result<(Vec<f32>, Option<Tensor>)> {
        let max = self.model.arch.max_positions();
        let scored: Vec<Vec<u32>> = ex
            .iter()
            .map(|e| {
                let mut s = e.ids.clone();
                if s.last() != Some(&eos) && s.len() < max {
                    s.push(eos);
                }
                s
            })
            .collect();
        let mut feats = vec![];
        let raw = crate::reward::score_with(self.model, &self.reward_head, &scored, pad, bs, |first, h| {
            if keep_features {
                feats.push(response_features(h, &ex[first..(first + h.dim(0)?)])?);
            }
            Ok(())
        })?;
        Ok((raw, if keep_features { Some(Tensor::cat(&feats, 0)?) } else { None }))
    }

    /// Splits a flat (N,) vector of a batch into per-sequence response vectors.
    pub fn split(flat: Vec<f32>, ex: &[&SftExample]) -> Vec<Vec<f32>> {
        let mut out = vec![];
        let mut at = 0;
        for e in ex {
            let n = e.ids.len() - e.prompt_len();
            out.push(flat[at..at + n].to_vec());
            at += n;
        }
        out
    }
}

/// The hidden states at the positions that predict each response token, f32, detached:
/// h: (B, T', C) of sequences that start with `exs` (and may be longer) -> (N, C).
fn response_features(h: &Tensor, exs: &[SftExample]) -> Result<Tensor> {
    let (b, t, c) = h.dims3()?;
    let idx: Vec<u32> = exs
        .iter()
        .enumerate()
        .flat_map(|(r, e)| e.targets().map(move |j| (r * t + j - 1) as u32))
        .collect();
    let idx = Tensor::new(idx.as_slice(), h.device())?;
    Ok(h.reshape((b * t, c))?.index_select(&idx, 0)?.to_dtype(DType::F32)?.detach())
}
