//! GRPO's arithmetic, as TRL 1.16 computes it (`GRPOTrainer._generate_and_score_completions`
//! and `_compute_loss`), each piece testable on its own (tests/grpo.rs checks values and
//! gradients against TRL on fixture numbers):
//!
//! - Group-relative advantage (Shao et al. 2024, DeepSeekMath): `A_i = (r_i - mean_g) / (std_g + 1e-4)`
//!   over the `G` completions of one prompt, `std` with Bessel's correction (TRL's `nanstd`);
//!   without scaling (Dr. GRPO, Liu et al. 2025) `A_i = r_i - mean_g`.
//! - Per-token loss with ratio `ρ = exp(log π - log π_old)`:
//!   `-min(ρ A, clip(ρ, 1 - ε, 1 + ε_high) A) + β k3`, `k3 = exp(log π_ref - log π) - (log π_ref - log π) - 1`
//!   (DAPO's asymmetric clipping when `ε_high > ε`; `β = 0` drops the KL term and its reference pass).
//! - Normalisation (`loss_type`): `grpo` = mean over sequences of each sequence's token mean;
//!   `dr_grpo` = token sum / (B · max_completion_length); `dapo` = token sum / all completion
//!   tokens of the generation batch. Each is a weighted token sum, so [`token_weights`] gives the
//!   weight of every token and micro-batches of one generation batch add up to the whole loss.
use anyhow::{bail, Result};
use candle_core::Tensor;

/// TRL's epsilon under the group std.
pub const STD_EPS: f64 = 1e-4;

/// Advantages of `rewards` (prompt-major: the `group` completions of prompt 0, then of prompt 1, ...).
pub fn group_advantages(rewards: &[f32], group: usize, scale: bool) -> Result<Vec<f32>> {
    if group < 2 {
        bail!("grpo.group_size = {group}: a group of one has advantage 0 (its own mean): use at least 2")
    }
    if rewards.len() % group != 0 {
        bail!("{} rewards are not whole groups of {group}", rewards.len())
    }
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let n = g.len() as f64;
        let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
        let std = (g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        out.extend(g.iter().map(|&r| {
            let a = r as f64 - mean;
            (if scale { a / (std + STD_EPS) } else { a }) as f32
        }));
    }
    Ok(out)
}

/// The weight of each completion token in the loss (the loss is `Σ per_token_loss · weight`):
/// `lens` are the completion lengths of the whole generation batch, in order.
pub fn token_weights(lens: &[usize], loss_type: &str, max_completion_len: usize) -> Result<Vec<f32>> {
    let b = lens.len().max(1) as f64;
    let total = lens.iter().sum::<usize>().max(1) as f64;
    let mut w = Vec::with_capacity(total as usize);
    for &n in lens {
        let x = match loss_type {
            "grpo" => 1.0 / (b * n.max(1) as f64),
            "dr_grpo" => 1.0 / (b * max_completion_len as f64),
            "dapo" => 1.0 / total,
            other => bail!("grpo.loss_type = {other:?}: expected grpo, dr_grpo or dapo"),
        };
        w.extend(std::iter::repeat_n(x as f32, n));
    }
    Ok(w)
}

/// The clip settings and KL coefficient of the loss.
#[derive(Clone, Copy, Debug)]
pub struct LossParams {
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub beta: f64,
}

/// What one loss evaluation saw (sums over its tokens, for means over the whole batch).
#[derive(Clone, Copy, Debug, Default)]
pub struct LossStats {
    pub tokens: usize,
    /// Tokens whose ratio was clipped where it matters: below `1 - ε` with A < 0, or above
    /// `1 + ε_high` with A > 0 (TRL's `clip_ratio/region_mean`).
    pub clipped: usize,
    /// Σ k3 over the tokens (0 without a reference).
    pub kl_sum: f64,
}

/// The weighted GRPO loss of flat per-token tensors (N,): the policy's log-probs `logp` (with
/// graph), the sampler's `old`, the reference's `reference` (when β > 0), each token's
/// advantage `adv` (its sequence's) and weight `w` ([`token_weights`]).
pub fn grpo_loss(logp: &Tensor, old: &Tensor, reference: Option<&Tensor>, adv: &Tensor, w: &Tensor, p: LossParams) -> Result<(Tensor, LossStats)> {
    let ratio = (logp - old)?.exp()?;
    let clipped = ratio.clamp(1.0 - p.epsilon, 1.0 + p.epsilon_high)?;
    // -min(ρ A, clip(ρ) A) = max(-ρ A, -clip(ρ) A)
    let neg_adv = adv.neg()?;
    let mut per_token = (&neg_adv * &ratio)?.maximum(&(&neg_adv * &clipped)?)?;
    let mut kl_sum = 0.0;
    if let (Some(r), true) = (reference, p.beta != 0.0) {
        let d = (r - logp)?;
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        kl_sum = k3.detach().sum_all()?.to_scalar::<f32>()? as f64;
        per_token = (per_token + (k3 * p.beta)?)?;
    }
    let loss = (per_token * w)?.sum_all()?;
    let (r, a): (Vec<f32>, Vec<f32>) = (ratio.detach().to_vec1()?, adv.to_vec1()?);
    let clipped = r
        .iter()
        .zip(&a)
        .filter(|(&r, &a)| ((r as f64) < 1.0 - p.epsilon && a < 0.0) || ((r as f64) > 1.0 + p.epsilon_high && a > 0.0))
        .count();
    Ok((loss, LossStats { tokens: r.len(), clipped, kl_sum }))
}

/// Mean and (population) std of `xs`.
pub fn mean_std(xs: &[f32]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_relative_to_the_group() {
        let a = group_advantages(&[1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0], 4, true).unwrap();
        let s = (1.0f64 / 3.0).sqrt(); // Bessel std of [1, 0, 1, 0]
        assert!((a[0] as f64 - 0.5 / (s + 1e-4)).abs() < 1e-5);
        assert!(a[4..].iter().all(|&x| x == 0.0), "a group of equal rewards learns nothing");
        assert_eq!(group_advantages(&[1.0, 0.0], 2, false).unwrap(), vec![0.5, -0.5]);
        assert!(group_advantages(&[1.0], 1, true).is_err());
    }

    #[test]
    fn weights_sum_to_the_normaliser() {
        let lens = [2, 3];
        let sum = |t: &str| token_weights(&lens, t, 4).unwrap().iter().map(|&x| x as f64).sum::<f64>();
        assert!((sum("grpo") - 1.0).abs() < 1e-6);
        assert!((sum("dapo") - 1.0).abs() < 1e-6);
        assert!((sum("dr_grpo") - 5.0 / 8.0).abs() < 1e-6);
    }
}
