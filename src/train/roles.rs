//! PPO's pieces: the four roles over one base (which adapters each activates, and the
//! quantities read from a pass: response log-probs at the sampling temperature, entropy,
//! values), and the advantage math (GAE, whitening). The loop is in `ppo.rs`.
use anyhow::Result;
use candle_core::{DType, Tensor};

use super::config::TrainConfig;
use super::sft::{Batch, SftExample};
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
        let hs = h.reshape((bs * t, c))?.index_select(&b.select, 0)?;
        Ok(self.model.token_nll(&hs, &b.targets, self.cfg.train.loss_chunk, self.cfg.ppo.temperature)?.neg()?)
    }

    /// Mean entropy of the next-token distributions at the selected positions.
    pub fn entropy(&self, h: &Tensor, b: &Batch) -> Result<Tensor> {
        let (bs, t, c) = h.dims3()?;
        let hs = h.reshape((bs * t, c))?.index_select(&b.select, 0)?;
        let logits = self.model.logits_at(&hs, self.cfg.ppo.temperature)?.to_dtype(DType::F32)?;
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
            let n = e.ids.len() - e.prompt_len;
            out.push(flat[at..at + n].to_vec());
            at += n;
        }
        out
    }
}

/// GAE over one response: returns (advantages, returns).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lam: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut last = 0f64;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] as f64 } else { 0.0 };
        let delta = rewards[t] as f64 + gamma * next - values[t] as f64;
        last = delta + gamma * lam * last;
        adv[t] = last as f32;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

pub fn whiten(xs: &mut [Vec<f32>]) {
    let all: Vec<f32> = xs.iter().flatten().copied().collect();
    let n = all.len().max(1) as f64;
    let mean = all.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = all.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt() + 1e-8;
    xs.iter_mut().flatten().for_each(|x| *x = ((*x as f64 - mean) / std) as f32);
}

/// The hidden states at the positions that predict each response token, f32, detached:
/// h: (B, T', C) of sequences that start with `exs` (and may be longer) -> (N, C).
fn response_features(h: &Tensor, exs: &[SftExample]) -> Result<Tensor> {
    let (b, t, c) = h.dims3()?;
    let idx: Vec<u32> = exs
        .iter()
        .enumerate()
        .flat_map(|(r, e)| (e.prompt_len.max(1)..e.ids.len()).map(move |j| (r * t + j - 1) as u32))
        .collect();
    let idx = Tensor::new(idx.as_slice(), h.device())?;
    Ok(h.reshape((b * t, c))?.index_select(&idx, 0)?.to_dtype(DType::F32)?.detach())
}
