//! PPO's arithmetic, each function a formula from the papers, testable on its own: on plain
//! vectors, one response at a time, the KL penalty and per-token rewards, GAE, whitening and
//! the adaptive KL controller; on tensors, the clipped policy and value losses.
//!
//! - Per-token reward (Ziegler et al. 2019, InstructGPT): `r_t = -β (log π(y_t) - log π_ref(y_t))`,
//!   plus the reward model's score on the last token.
//! - KL estimators per sequence (Schulman's note "Approximating KL divergence"): k1 = Σ (log π -
//!   log π_ref), k3 = Σ (ρ - 1 - log ρ) with ρ = π_ref / π, which is >= 0 for every token.
//! - GAE (Schulman et al. 2016): `δ_t = r_t + γ V_{t+1} - V_t`, `A_t = δ_t + γ λ A_{t+1}`,
//!   returns `A_t + V_t`, with V after the last token = 0.
//! - Adaptive KL (Ziegler et al. 2019 §2.2): `β <- β (1 + clip(KL / target - 1, ±0.2) n / horizon)`.
//! - Clipped surrogate (Schulman et al. 2017): `mean max(-A ρ, -A clip(ρ, 1 ± ε))`, ρ = π / π_old;
//!   clipped value loss `0.5 mean max((V - R)², (V_old + clip(V - V_old, ±c) - R)²)`.
use anyhow::Result;
use candle_core::Tensor;

/// The KL of one response against the reference, and its per-token rewards.
pub struct KlRewards {
    /// k3 estimator summed over the response (>= 0).
    pub kl: f64,
    /// k1 estimator summed over the response (may be negative).
    pub kl_k1: f64,
    /// `-β (log π - log π_ref)` per token, plus `score` on the last token.
    pub rewards: Vec<f32>,
}

/// Per-token rewards of one response from its log-probs under the sampling policy and the
/// reference, the KL coefficient and the reward model's score.
pub fn kl_rewards(logp: &[f32], ref_logp: &[f32], kl_coef: f64, score: f32) -> KlRewards {
    let k1: Vec<f32> = logp.iter().zip(ref_logp).map(|(a, b)| a - b).collect();
    // k3 = r - 1 - log r with r = π_ref / π: >= 0 for every token.
    let kl = k1.iter().map(|&d| ((-d).exp() - 1.0 + d) as f64).sum::<f64>();
    let kl_k1 = k1.iter().map(|&d| d as f64).sum::<f64>();
    let mut rewards: Vec<f32> = k1.iter().map(|d| (-kl_coef * *d as f64) as f32).collect();
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    KlRewards { kl, kl_k1, rewards }
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

/// Whitens all values of `xs` together: zero mean, unit variance (population).
pub fn whiten(xs: &mut [Vec<f32>]) {
    let all: Vec<f32> = xs.iter().flatten().copied().collect();
    let n = all.len().max(1) as f64;
    let mean = all.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = all.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt() + 1e-8;
    xs.iter_mut().flatten().for_each(|x| *x = ((*x as f64 - mean) / std) as f32);
}

/// The scores as the rewards use them: clipped to ±`clip` (0 = off), whitened over the batch
/// when `normalize` is "batch".
pub fn shape_scores(raw: &[f32], clip: f64, normalize: &str) -> Vec<f32> {
    let mut scores = raw.to_vec();
    if clip > 0.0 {
        scores.iter_mut().for_each(|s| *s = s.clamp(-clip as f32, clip as f32));
    }
    if normalize == "batch" && scores.len() > 1 {
        let mut v = vec![scores];
        whiten(&mut v);
        scores = v.pop().unwrap();
    }
    scores
}

/// The adaptive KL coefficient after a rollout of `n` sequences whose mean KL was `kl_mean`
/// (unchanged when `target` is 0).
pub fn adapt_kl_coef(kl_coef: f64, kl_mean: f64, target: f64, n: usize, horizon: f64) -> f64 {
    if target <= 0.0 {
        return kl_coef;
    }
    let err = (kl_mean / target - 1.0).clamp(-0.2, 0.2);
    kl_coef * (1.0 + err * n as f64 / horizon)
}

/// The clipped surrogate loss of log-probs `logp` (N,) against `old` (N,) with advantages `adv`
/// (N,); also the share of ratios outside the clip range and the mean ratio.
pub fn clipped_policy_loss(logp: &Tensor, old: &Tensor, adv: &Tensor, clip: f64) -> Result<(Tensor, f64, f64)> {
    let ratio = (logp - old)?.exp()?;
    let pg1 = (adv.neg()? * &ratio)?;
    let pg2 = (adv.neg()? * ratio.clamp(1.0 - clip, 1.0 + clip)?)?;
    let loss = pg1.maximum(&pg2)?.mean_all()?;
    let r: Vec<f32> = ratio.detach().to_vec1()?;
    let clipfrac = r.iter().filter(|&&x| (x as f64 - 1.0).abs() > clip).count() as f64 / r.len() as f64;
    let mean_ratio = r.iter().map(|&x| x as f64).sum::<f64>() / r.len() as f64;
    Ok((loss, clipfrac, mean_ratio))
}

/// The clipped value loss of values `v` (N,) against the rollout's values `old` and returns `ret`.
pub fn clipped_value_loss(v: &Tensor, old: &Tensor, ret: &Tensor, clip: f64) -> Result<Tensor> {
    let vc = (old + (v - old)?.clamp(-clip, clip)?)?;
    let l1 = (v - ret)?.sqr()?;
    let l2 = (&vc - ret)?.sqr()?;
    Ok((l1.maximum(&l2)?.mean_all()? * 0.5)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_and_rewards() {
        let r = kl_rewards(&[-1.0, -2.0], &[-1.5, -1.0], 0.1, 3.0);
        assert!((r.kl_k1 - (0.5 - 1.0)).abs() < 1e-6);
        let k3 = |d: f64| (-d).exp() - 1.0 + d;
        assert!((r.kl - (k3(0.5) + k3(-1.0))).abs() < 1e-6 && r.kl >= 0.0);
        assert!((r.rewards[0] + 0.05).abs() < 1e-6 && (r.rewards[1] - (0.1 + 3.0)).abs() < 1e-6);
    }

    #[test]
    fn gae_with_lambda_one_is_the_return_minus_the_value() {
        let (adv, ret) = gae(&[1.0, 0.0, 2.0], &[0.5, 0.25, 1.0], 1.0, 1.0);
        assert_eq!(ret, vec![3.0, 2.0, 2.0]);
        assert_eq!(adv, vec![2.5, 1.75, 1.0]);
    }

    #[test]
    fn adaptive_kl_moves_toward_the_target() {
        assert_eq!(adapt_kl_coef(0.1, 1.0, 0.0, 8, 100.0), 0.1);
        assert!(adapt_kl_coef(0.1, 1.0, 0.5, 8, 100.0) > 0.1);
        assert!(adapt_kl_coef(0.1, 0.1, 0.5, 8, 100.0) < 0.1);
    }
}
