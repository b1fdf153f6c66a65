//! PPO's roles: the four roles over one base, loaded once ([`load`]): policy = a trainable
//! copy of the SFT adapter (or a new adapter); reference = the SFT adapter, frozen (or the bare
//! base, adapters off); reward = the RM adapter (+ the adapters it was stacked on) and its
//! head, frozen; critic = a trainable value head (and optionally a trainable copy of the RM
//! adapter), initialised from the reward model. [`Roles`] says which adapters each activates
//! and reads the quantities of a pass: response log-probs at the sampling temperature,
//! entropy, values, reward-model scores. The formulas are in `ppo_math.rs`, the loop in `ppo.rs`.
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::batch::{lora_config, Batch, SftExample};
use super::config::TrainConfig;
use super::Setup;
use crate::lora::Adapter;
use crate::model::Model;
use crate::reward::{load_reward_adapter, RewardHead};

pub const POLICY: &str = "policy";
pub const REFERENCE: &str = "reference";
pub const REWARD: &str = "reward";
pub const CRITIC: &str = "critic";
pub const V_HEAD_KEY: &str = "v_head.weight";

/// The sampling seed of rollout `step` (a resumed run samples what the uninterrupted one did).
pub fn rollout_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64).wrapping_mul(0x9E3779B97F4A7C15)
}

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

/// What [`load`] builds besides the model: the heads and which adapters each role activates.
pub struct RoleParts {
    reward_head: RewardHead,
    v_head: RewardHead,
    reward_names: Vec<String>,
    critic_names: Vec<String>,
    has_reference: bool,
}

/// The base, loaded once, with every role's adapters attached: [reference], policy, reward
/// (and its stack), [critic]; the policy, critic and value head from `resume` (a checkpoint)
/// when given. Returns the model, the policy adapter and the rest of the roles.
pub fn load(setup: &Setup, cfg: &TrainConfig, resume: Option<&Path>) -> Result<(Model, Arc<Adapter>, RoleParts)> {
    let p = &cfg.ppo;
    let mut adapters: Vec<Arc<Adapter>> = vec![];
    let has_reference = !p.sft_adapter.is_empty();
    if has_reference {
        adapters.push(crate::peft::load_adapter(Path::new(&p.sft_adapter), REFERENCE, 1.0, false)?);
    }
    let policy = match (resume, has_reference) {
        (Some(dir), _) => crate::peft::load_adapter(dir, POLICY, 1.0, true)?,
        (None, true) => crate::peft::load_adapter(Path::new(&p.sft_adapter), POLICY, 1.0, true)?,
        (None, false) => Adapter::fresh(POLICY, lora_config(cfg, &setup.arch), cfg.train.seed)?,
    };
    adapters.push(policy.clone());
    let rm_dir = Path::new(&p.reward_adapter);
    let (rm_adapters, rm_head) = load_reward_adapter(rm_dir, REWARD, false).with_context(|| format!("ppo.reward_adapter {}", rm_dir.display()))?;
    let reward_names: Vec<String> = rm_adapters.iter().map(|a| a.name.clone()).collect();
    adapters.extend(rm_adapters);
    let aux = resume
        .map(|d| -> Result<_> {
            let p = d.join(super::checkpoint::AUX_FILE);
            crate::weights::check_safetensors_header(&p)?;
            Ok(candle_core::safetensors::load(&p, &Device::Cpu)?)
        })
        .transpose()?;
    let mut critic_names = reward_names.clone();
    if p.critic_adapter {
        let (mut c, _) = load_reward_adapter(rm_dir, CRITIC, true)?;
        critic_names.pop();
        critic_names.push(CRITIC.into());
        adapters.push(c.pop().unwrap());
    }
    let model = setup.load_model(adapters)?;
    let (hidden, device) = (setup.arch.hidden_size(), &setup.device);
    let v_head_init = match &aux {
        Some(a) => a.get(V_HEAD_KEY).context("checkpoint has no value head")?.clone(),
        None => rm_head.clone(),
    };
    if let (Some(a), Some(critic)) = (&aux, model.adapters.get(CRITIC)) {
        for (k, v) in critic.vars() {
            v.set(&a.get(&format!("critic.{k}")).with_context(|| format!("checkpoint has no critic tensor {k}"))?.to_device(device)?)?;
        }
    }
    let parts = RoleParts {
        reward_head: RewardHead::from_tensor(rm_head, false, hidden, device)?,
        v_head: RewardHead::from_tensor(v_head_init, true, hidden, device)?,
        reward_names,
        critic_names,
        has_reference,
    };
    Ok((model, policy, parts))
}

impl<'a> Roles<'a> {
    pub fn new(model: &'a Model, parts: RoleParts, cfg: &'a TrainConfig) -> Self {
        let RoleParts { reward_head, v_head, reward_names, critic_names, has_reference } = parts;
        Self { model, reward_head, v_head, reward_names, critic_names, has_reference, cfg }
    }

    /// What PPO trains, in a fixed order: the policy's LoRA tensors, the critic's (if it has
    /// an adapter), the value head.
    pub fn trainables(&self, policy: &Adapter) -> Vec<(String, Var)> {
        let mut vars = policy.vars();
        if let Some(c) = self.model.adapters.get(CRITIC) {
            vars.extend(c.vars().into_iter().map(|(k, v)| (format!("critic.{k}"), v)));
        }
        vars.push((V_HEAD_KEY.into(), self.v_head.var.clone().expect("a trainable value head")));
        vars
    }

    /// The critic's trainables as checkpoints keep them (value head, critic adapter).
    pub fn critic_tensors(&self) -> Vec<(String, Tensor)> {
        let mut aux = vec![(V_HEAD_KEY.to_string(), self.v_head.weight.clone())];
        if let Some(c) = self.model.adapters.get(CRITIC) {
            aux.extend(c.vars().into_iter().map(|(k, v)| (format!("critic.{k}"), v.as_tensor().clone())));
        }
        aux
    }
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

    /// Log-probs (N,) of the batch's learned tokens under the reference: the SFT adapter, or
    /// the bare base (adapters off) when there is none.
    pub fn reference_logp(&self, b: &Batch) -> Result<Tensor> {
        if self.has_reference {
            self.activate(&[REFERENCE.into()]);
            self.logp(&self.model.hidden(&b.ids, &b.pos, &b.mask, None)?, b)
        } else {
            let _off = self.model.adapters.disabled();
            self.logp(&self.model.hidden(&b.ids, &b.pos, &b.mask, None)?, b)
        }
    }

    /// Values (N,) at the batch's learned positions: from the critic's features kept by the
    /// scoring pass, or from a pass of the critic's own adapter.
    pub fn rollout_values(&self, b: &Batch, feats: Option<&Tensor>) -> Result<Tensor> {
        match feats {
            Some(f) => Ok(f.matmul(&self.v_head.weight.t()?)?.squeeze(1)?),
            None => {
                self.activate(&self.critic_names);
                self.values(&self.model.hidden(&b.ids, &b.pos, &b.mask, None)?, b)
            }
        }
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
