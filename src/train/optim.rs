//! AdamW over the adapter tensors, the learning-rate schedule and gradient-norm clipping.
//!
//! AdamW as PyTorch's `torch.optim.AdamW` (decoupled decay):
//! `m = β1 m + (1-β1) g`, `v = β2 v + (1-β2) g²`, `θ -= lr (wd θ + m̂ / (√v̂ + ε))` with
//! `m̂ = m / (1-β1^t)`, `v̂ = v / (1-β2^t)`. Moments are f32 like the adapters, and are part of
//! the checkpoint (candle's own AdamW keeps them private).
use anyhow::Result;
use candle_core::{Tensor, Var};

use super::config::TrainSection;

pub struct AdamW {
    /// (PEFT key, trainable tensor) in a fixed order.
    pub vars: Vec<(String, Var)>,
    /// First and second moments, same shapes as `vars`.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Steps taken (t in the bias corrections).
    pub t: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: &TrainSection) -> Result<Self> {
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, m, v, t: 0, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_eps, weight_decay: cfg.weight_decay })
    }

    /// One update with `grads[i]` the gradient of `vars[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let _p = crate::prof::scope(crate::prof::Cat::Optimizer);
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            let theta = self.vars[i].1.as_tensor();
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let decayed = (theta * (1.0 - lr * self.weight_decay))?;
            self.vars[i].1.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup, then
/// constant, linear decay to 0, or cosine decay to 0 (as transformers' schedulers).
pub fn lr_at(cfg: &TrainSection, step: usize, total: usize) -> f64 {
    let w = cfg.warmup_steps;
    if step < w {
        return cfg.lr * (step + 1) as f64 / w as f64;
    }
    let span = total.saturating_sub(w).max(1) as f64;
    let progress = ((step - w) as f64 / span).min(1.0);
    match cfg.schedule.as_str() {
        "linear" => cfg.lr * (1.0 - progress),
        "cosine" => cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        _ => cfg.lr,
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (0 = off). Returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// Dynamic loss scaling for an f16 base (as PyTorch's `GradScaler`): the loss is multiplied by
/// `scale` before backward so that small f16 gradients do not flush to zero, the gradients are
/// divided by it afterwards; a step whose gradients hold inf/NaN is skipped and the scale
/// halves; after `growth_interval` good steps in a row it doubles. Disabled (scale 1) for
/// f32 / bf16, where a non-finite gradient still skips the step rather than corrupt the adapter.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f64,
    pub good_steps: usize,
    pub growth_interval: usize,
}

impl LossScaler {
    pub fn new(enabled: bool) -> Self {
        Self { enabled, scale: if enabled { 65536.0 } else { 1.0 }, good_steps: 0, growth_interval: 200 }
    }

    /// Records a step whose unscaled gradients had global norm `norm`; false = skip the update.
    pub fn update(&mut self, norm: f64) -> bool {
        if !norm.is_finite() {
            if self.enabled {
                self.scale = (self.scale / 2.0).max(1.0);
            }
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.enabled && self.good_steps % self.growth_interval == 0 {
            self.scale = (self.scale * 2.0).min(2f64.powi(24));
        }
        true
    }
}
