//! The preference losses of `lorafit dpo`, on per-pair log-probs (the loop is in `dpo.rs`).
//!
//! With `c`, `r` the policy's summed log-probs of the chosen and rejected completion, `c₀`,
//! `r₀` the reference's, `n_c`, `n_r` their token counts, `Δ = (c - c₀) - (r - r₀)`:
//! - `sigmoid` (DPO, Rafailov et al. 2023; cDPO with label smoothing ε):
//!   `-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`; ε = 0 is TRL 1.16 `DPOTrainer`'s `sigmoid`, the ε
//!   form is TRL's (`CPOTrainer` `sigmoid`, the cDPO note of the DPO paper);
//! - `hinge` (SLiC): `relu(1 - βΔ)`;
//! - `ipo` (Azar et al. 2023, Eq. 17, length-normalised as TRL does):
//!   `((c - c₀)/n_c - (r - r₀)/n_r - 1/(2β))²`;
//! - `simpo` (Meng et al. 2024; TRL `CPOTrainer` `simpo`, no reference):
//!   with `a = c/n_c - r/n_r - γ/β`: `-(1-ε) log σ(βa) - ε log σ(-βa)`;
//! - `orpo` (Hong et al. 2024; TRL `ORPOTrainer.odds_ratio_loss`, no reference): with the
//!   mean log-probs `ā_c = c/n_c`, `ā_r = r/n_r`, `log odds = (ā_c - ā_r) - (log(1-e^ā_c) -
//!   log(1-e^ā_r))`, the pair term is `-λ log σ(log odds)`; the step adds the SFT NLL of the
//!   chosen completions (mean over their tokens; see `dpo.rs`).
//! Implicit rewards (logged): `β(c - c₀)`, `β(r - r₀)`; for simpo `β c/n_c`, for orpo `λ c/n_c`
//! (TRL's). The math runs in f64 on (P,) tensors with ops that have a backward, so the
//! gradient wrt each log-prob is exact (checked against TRL's autograd in `tests/dpo.rs`).
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::ops::softplus;

/// Which preference loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossType {
    Sigmoid,
    Ipo,
    Hinge,
    Orpo,
    Simpo,
}

impl LossType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "sigmoid" => Self::Sigmoid,
            "ipo" => Self::Ipo,
            "hinge" => Self::Hinge,
            "orpo" => Self::Orpo,
            "simpo" => Self::Simpo,
            other => bail!("dpo.loss = {other:?}: expected sigmoid, ipo, hinge, orpo or simpo"),
        })
    }

    /// Whether the loss compares against a reference model (orpo and simpo do not).
    pub fn needs_reference(self) -> bool {
        !matches!(self, Self::Orpo | Self::Simpo)
    }

    /// Whether the logged log-probs are per-token means (orpo, simpo) rather than sums.
    pub fn length_normalised(self) -> bool {
        !self.needs_reference()
    }
}

/// The loss settings (`[dpo]`).
#[derive(Clone, Copy, Debug)]
pub struct LossParams {
    pub loss: LossType,
    pub beta: f64,
    pub label_smoothing: f64,
    /// ORPO's λ (the weight of the odds-ratio term).
    pub lambda: f64,
    /// SimPO's γ (the target reward margin).
    pub gamma: f64,
}

/// Per-pair inputs, each (P,): policy log-prob sums, reference ones (None for orpo/simpo),
/// completion token counts.
pub struct PairLogps<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    pub ref_chosen: Option<&'a Tensor>,
    pub ref_rejected: Option<&'a Tensor>,
    pub len_chosen: &'a Tensor,
    pub len_rejected: &'a Tensor,
}

/// What [`pair_losses`] returns, each (P,) f64: the loss of each pair (with a graph back to the
/// log-probs; ORPO's without its NLL term) and the implicit rewards (detached).
pub struct PairLosses {
    pub loss: Tensor,
    pub rewards_chosen: Tensor,
    pub rewards_rejected: Tensor,
}

fn f64_(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?)
}

/// `-(1-ε) log σ(x) - ε log σ(-x)` = `(1-ε) softplus(-x) + ε softplus(x)`.
fn smoothed_logistic(x: &Tensor, eps: f64) -> Result<Tensor> {
    let main = softplus(&x.neg()?)?;
    Ok(if eps == 0.0 { main } else { ((main * (1.0 - eps))? + (softplus(x)? * eps)?)? })
}

/// `log(1 - e^x)` for x < 0 (f64: no cancellation worth a branch at the log-probs we see).
fn log1mexp(x: &Tensor) -> Result<Tensor> {
    Ok((x.exp()?.neg()? + 1.0)?.log()?)
}

/// Each pair's loss and implicit rewards (see the module doc).
pub fn pair_losses(p: &LossParams, x: &PairLogps) -> Result<PairLosses> {
    let (c, r) = (f64_(x.chosen)?, f64_(x.rejected)?);
    let (nc, nr) = (f64_(x.len_chosen)?, f64_(x.len_rejected)?);
    let beta = p.beta;
    let reference = || -> Result<(Tensor, Tensor)> {
        match (x.ref_chosen, x.ref_rejected) {
            (Some(rc), Some(rr)) => Ok(((&c - f64_(rc)?)?, (&r - f64_(rr)?)?)),
            _ => bail!("dpo.loss = {:?} needs the reference log-probs", p.loss),
        }
    };
    let (loss, rc, rr) = match p.loss {
        LossType::Sigmoid | LossType::Hinge | LossType::Ipo => {
            let (lc, lr) = reference()?; // log-ratios to the reference, (P,)
            let loss = match p.loss {
                LossType::Sigmoid => smoothed_logistic(&((&lc - &lr)? * beta)?, p.label_smoothing)?,
                LossType::Hinge => ((&lc - &lr)? * -beta)?.affine(1.0, 1.0)?.relu()?,
                _ => {
                    let d = ((&lc / &nc)? - (&lr / &nr)?)?;
                    (d - 1.0 / (2.0 * beta))?.sqr()?
                }
            };
            (loss, (lc * beta)?, (lr * beta)?)
        }
        LossType::Simpo => {
            let (ac, ar) = ((&c / &nc)?, (&r / &nr)?);
            let logits = ((&ac - &ar)? - p.gamma / beta)?;
            (smoothed_logistic(&(logits * beta)?, p.label_smoothing)?, (ac * beta)?, (ar * beta)?)
        }
        LossType::Orpo => {
            let (ac, ar) = ((&c / &nc)?, (&r / &nr)?);
            let log_odds = ((&ac - &ar)? - (log1mexp(&ac)? - log1mexp(&ar)?)?)?;
            (softplus(&log_odds.neg()?)?.affine(p.lambda, 0.0)?, (ac * p.lambda)?, (ar * p.lambda)?)
        }
    };
    Ok(PairLosses { loss, rewards_chosen: rc.detach(), rewards_rejected: rr.detach() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equal_policy_and_reference_give_ln2() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let (c, r, n) = (t(&[-12.5, -3.0]), t(&[-7.25, -40.0]), t(&[3.0, 9.0]));
        let p = LossParams { loss: LossType::Sigmoid, beta: 0.1, label_smoothing: 0.0, lambda: 0.1, gamma: 0.5 };
        let x = PairLogps { chosen: &c, rejected: &r, ref_chosen: Some(&c), ref_rejected: Some(&r), len_chosen: &n, len_rejected: &n };
        let l: Vec<f64> = pair_losses(&p, &x).unwrap().loss.to_vec1().unwrap();
        assert_eq!(l, vec![std::f64::consts::LN_2; 2]);
    }
}
