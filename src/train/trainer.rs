//! What a method's step uses to change the trainables ([`Trainer`]): AdamW over them at the
//! scheduled learning rate, gradient clipping, the f16 dynamic loss scaler (losses scaled
//! before backward, gradients unscaled, a step with inf/NaN gradients skipped) and the
//! non-finite guard (trainables that are not finite after an update stop the run, kind
//! [`Kind::Diverged`]); and the supervised step every loss-on-batches method shares
//! ([`Trainer::accumulate`]: micro-batches normalised over the whole step, one update).
use anyhow::Result;
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

use super::checkpoint;
use super::config::TrainSection;
use super::optim::{clip_grad_norm, lr_at, AdamW, LossScaler};
use super::GradAccum;
use crate::bail_kind;
use crate::error::Kind;

/// What one micro-batch of a supervised step reports back.
pub struct MicroOut {
    /// This micro-batch's share of the step loss (already divided by the step's normaliser).
    pub loss: f64,
    /// Tokens processed (for tokens/s).
    pub tokens: usize,
    /// Extra per-step figures, summed over micro-batches (e.g. correct pairs).
    pub sums: Vec<(&'static str, f64)>,
}

/// What a supervised step (micro-batches accumulated into one update) did.
pub struct Accumulated {
    pub loss: f64,
    pub tokens: usize,
    pub sums: Vec<(&'static str, f64)>,
    /// The step's normaliser (learned tokens, prompts, ...).
    pub denom: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

impl Accumulated {
    /// A summed figure of the step (0 when no micro-batch reported it).
    pub fn sum(&self, key: &str) -> f64 {
        self.sums.iter().find(|(k, _)| *k == key).map(|(_, v)| *v).unwrap_or(0.0)
    }

    /// The metrics every supervised step logs: loss, lr, grad_norm.
    pub fn metrics(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("loss".into(), self.loss.into());
        m.insert("lr".into(), self.lr.into());
        m.insert("grad_norm".into(), self.grad_norm.into());
        m
    }
}

/// What one applied (or skipped) optimizer update did.
pub struct Update {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// False when the gradients were not finite and the update was skipped.
    pub applied: bool,
}

/// What a method's step uses to change the trainables: AdamW over them, the learning-rate
/// schedule, clipping, the f16 dynamic loss scaler and the non-finite guard.
pub struct Trainer {
    pub opt: AdamW,
    pub scaler: LossScaler,
    train: TrainSection,
    /// Steps done before the current one (the current step's 0-based index).
    pub step: usize,
    pub total: usize,
    /// Updates skipped for non-finite gradients: in the whole run, and in the current step.
    pub skipped: usize,
    skipped_now: usize,
}

impl Trainer {
    pub fn new(opt: AdamW, scaler: LossScaler, train: &TrainSection, total: usize) -> Self {
        Self { opt, scaler, train: train.clone(), step: 0, total, skipped: 0, skipped_now: 0 }
    }

    /// A new step begins (its count of skipped updates starts at 0).
    pub fn begin_step(&mut self) {
        self.skipped_now = 0;
    }

    /// Updates skipped in the current step.
    pub fn skipped_this_step(&self) -> usize {
        self.skipped_now
    }

    /// The trainable tensors, with their keys.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.opt.vars
    }

    /// The factor losses are multiplied by before backward (1 unless the base is f16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.scale
    }

    /// `loss` times the loss scale (itself when the scale is 1).
    pub fn scaled(&self, loss: Tensor) -> Result<Tensor> {
        Ok(if self.scaler.scale != 1.0 { (loss * self.scaler.scale)? } else { loss })
    }

    /// Applies the gradients in `acc` (of scaled losses): unscale, clip, and an AdamW update at
    /// this step's learning rate, unless they are not finite (then the update is skipped and
    /// the loss scale backs off). Trainables that are not finite after the update stop the run.
    pub fn apply(&mut self, acc: GradAccum) -> Result<Update> {
        let mut grads = acc.finish(&self.opt.vars)?;
        if self.scaler.scale != 1.0 {
            grads = grads.iter().map(|g| g / self.scaler.scale).collect::<candle_core::Result<_>>()?;
        }
        let grad_norm = clip_grad_norm(&mut grads, self.train.max_grad_norm)?;
        let lr = lr_at(&self.train, self.step, self.total);
        let applied = self.scaler.update(grad_norm);
        if applied {
            self.opt.step(&grads, lr)?;
            self.check_finite("after its update")?;
        } else {
            self.skipped += 1;
            self.skipped_now += 1;
            tracing::warn!("step {}: gradients are not finite: update skipped (loss scale now {})", self.step + 1, self.scaler.scale);
        }
        Ok(Update { grad_norm, lr, applied })
    }

    /// Fails (kind [`Kind::Diverged`]) when a trainable tensor holds NaN or infinity.
    pub fn check_finite(&self, when: &str) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self.opt.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        if let Some(k) = checkpoint::first_non_finite(&tensors)? {
            bail_kind!(
                Kind::Diverged,
                "training diverged at step {} of {}: {k} holds NaN or infinite values {when} (lr {:.3e})",
                self.step + 1,
                self.total,
                lr_at(&self.train, self.step, self.total)
            )
        }
        Ok(())
    }

    /// One supervised step: forward/backward of each micro-batch with the loss normalised over
    /// the whole step (`weight` of each micro-batch summed) and scaled for f16, then one update.
    /// Accumulating k micro-batches gives the gradient of one batch k times as big.
    pub fn accumulate(
        &mut self,
        micro: &[Vec<usize>],
        weight: impl Fn(&[usize]) -> f64,
        mut micro_step: impl FnMut(&[usize], f64, &[(String, Var)], &mut GradAccum) -> Result<MicroOut>,
    ) -> Result<Accumulated> {
        let denom = micro.iter().map(|m| weight(m)).sum::<f64>().max(1e-12);
        let mut acc = GradAccum::new(self.opt.vars.len());
        let (mut loss, mut tokens, mut sums) = (0.0, 0, Vec::<(&'static str, f64)>::new());
        for m in micro {
            let o = micro_step(m, denom / self.scaler.scale, &self.opt.vars, &mut acc)?;
            loss += o.loss / self.scaler.scale;
            tokens += o.tokens;
            for (k, v) in o.sums {
                match sums.iter_mut().find(|(k2, _)| *k2 == k) {
                    Some(e) => e.1 += v,
                    None => sums.push((k, v)),
                }
            }
        }
        let u = self.apply(acc)?;
        Ok(Accumulated { loss, tokens, sums, denom, grad_norm: u.grad_norm, lr: u.lr })
    }
}

