//! Ops the newer model families add, each with its backward written out (input gradient only):
//!
//! | op         | forward                                  | backward (g = dL/dy)                          |
//! |------------|------------------------------------------|-----------------------------------------------|
//! | `softcap`  | `y = c · tanh(x / c)` (Gemma's logits)   | `dx = g (1 - tanh²(x / c))`                   |
//! | `gelu_erf` | `y = x Φ(x)`, Φ the normal CDF (GPT-NeoX's `gelu`) | `dx = g (Φ(x) + x φ(x))`, φ the normal density |
//!
//! Both run as tensor ops on any device and dtype (computed in f32, returned in x's dtype).
//! `tests/family_ops.rs` checks them against candle's composed ops.
//! Reference: transformers `Gemma2ForCausalLM.forward` (final_logit_softcapping),
//! `activations.GELUActivation` (`nn.functional.gelu`, erf form).
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::{input_grad_op, Pre};

/// `c · tanh(x / c)`, any shape.
pub fn softcap(x: &Tensor, c: f64) -> candle_core::Result<Tensor> {
    input_grad_op(
        "softcap",
        x,
        move |x| {
            let dt = x.dtype();
            ((x.to_dtype(DType::F32)? / c)?.tanh()? * c)?.to_dtype(dt)
        },
        move |x, _y, g| {
            let dt = x.dtype();
            let t = (x.to_dtype(DType::F32)? / c)?.tanh()?;
            ((t.sqr()?.neg()? + 1.0)? * g.to_dtype(DType::F32)?)?.to_dtype(dt)
        },
    )
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn gelu_erf_fwd(x: &Tensor) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    x.to_dtype(DType::F32)?.gelu_erf()?.to_dtype(dt)
}

/// `g (Φ(x) + x φ(x))`, Φ(x) = ½ (1 + erf(x / √2)), φ(x) = e^(-x²/2) / √(2π).
fn gelu_erf_bwd(x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let cdf = (((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    let pdf = ((x.sqr()? * -0.5)?.exp()? * FRAC_1_SQRT_2PI)?;
    ((cdf + (x * pdf)?)? * g.to_dtype(DType::F32)?)?.to_dtype(dt)
}

/// The exact (erf) GELU, any shape.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    gelu_erf_pre().apply("gelu_erf", x)
}

/// [`gelu_erf`] as a [`Pre`] of the linear that consumes it (its output is then not kept).
pub fn gelu_erf_pre() -> Pre {
    Pre { fwd: Arc::new(gelu_erf_fwd), bwd: Arc::new(gelu_erf_bwd) }
}
