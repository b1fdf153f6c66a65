//! Ops the newer model families add, each with its backward written out (input gradient only):
//!
//! | op         | forward                                  | backward (g = dL/dy)                          |
//! |------------|------------------------------------------|-----------------------------------------------|
//! | `softcap`  | `y = c · tanh(x / c)` (Gemma's logits)   | `dx = g (1 - tanh²(x / c))`                   |
//! | `gelu_erf` | `y = x Φ(x)`, Φ the normal CDF (GPT-NeoX's `gelu`) | `dx = g (Φ(x) + x φ(x))`, φ the normal density |
//! | `heads`    | (B, T, n, D) -> norm per head (opt.), -> (B, n, T, D), rope (opt.) | rope by -θ, transpose back, norm's backward |
//! | `gated`    | `y = act(gate) · up` (SwiGLU, GeGLU) | `d gate = g · up · act'(gate)`, `d up = g · act(gate)` |
//!
//! `heads` and `gated` are memory fusions: composed, q's projection, its norm, its transposed
//! copy and its rotation would each be kept for the backward (4-5 copies of q per layer), and the
//! MLP's activation output besides gate, up and their product. As one node each they keep their
//! inputs only (the activation and the rotation are recomputed in the backward).
//!
//! Both run as tensor ops on any device and dtype (computed in f32, returned in x's dtype).
//! `tests/family_ops.rs` checks them against candle's composed ops.
//! Reference: transformers `Gemma2ForCausalLM.forward` (final_logit_softcapping),
//! `activations.GELUActivation` (`nn.functional.gelu`, erf form).
use std::sync::Arc;

use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::{input_grad_op, rope_rotate, Pre, Precomputed};

/// `c · tanh(x / c)`, any shape.
pub fn softcap(x: &Tensor, c: f64) -> candle_core::Result<Tensor> {
    input_grad_op(
        "softcap",
        x,
        move |x| {
            let _p = crate::prof::scope(crate::prof::Cat::NormAct);
            let dt = x.dtype();
            ((x.to_dtype(DType::F32)? / c)?.tanh()? * c)?.to_dtype(dt)
        },
        move |x, _y, g| {
            let _p = crate::prof::scope(crate::prof::Cat::NormAct);
            let dt = x.dtype();
            let t = (x.to_dtype(DType::F32)? / c)?.tanh()?;
            ((t.sqr()?.neg()? + 1.0)? * g.to_dtype(DType::F32)?)?.to_dtype(dt)
        },
    )
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn gelu_erf_fwd(x: &Tensor) -> candle_core::Result<Tensor> {
    let _p = crate::prof::scope(crate::prof::Cat::NormAct);
    let dt = x.dtype();
    x.to_dtype(DType::F32)?.gelu_erf()?.to_dtype(dt)
}

/// `g (Φ(x) + x φ(x))`, Φ(x) = ½ (1 + erf(x / √2)), φ(x) = e^(-x²/2) / √(2π).
fn gelu_erf_bwd(x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let _p = crate::prof::scope(crate::prof::Cat::NormAct);
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

/// Split heads as one node: x (B, T, n, D) (a view is fine) -> `norm` over D if given (Qwen3's,
/// Gemma's, EXAONE 4's q/k norms) -> (B, n, T, D) contiguous -> rope at (cos, sin) (B, T, R/2) if given.
pub fn heads(x: &Tensor, norm: Option<&Pre>, rope: Option<&(Tensor, Tensor)>) -> candle_core::Result<Tensor> {
    let norm = norm.cloned();
    let rope = match rope {
        Some((c, s)) => Some((c.contiguous()?, s.contiguous()?, s.neg()?.contiguous()?)),
        None => None,
    };
    let (norm_b, rope_b) = (norm.clone(), rope.clone());
    input_grad_op(
        "heads",
        x,
        move |x| {
            let _p = crate::prof::scope(crate::prof::Cat::Attention);
            let x = match &norm {
                Some(n) => (n.fwd)(&x.contiguous()?)?,
                None => x.clone(),
            };
            let h = x.transpose(1, 2)?.contiguous()?; // (B, n, T, D)
            match &rope {
                Some((c, s, _)) => rope_rotate(&h, c, s),
                None => Ok(h),
            }
        },
        move |x, _y, g| {
            let _p = crate::prof::scope(crate::prof::Cat::Attention);
            let g = match &rope_b {
                Some((c, _, neg_s)) => rope_rotate(g, c, neg_s)?, // the transpose of a rotation by θ
                None => g.clone(),
            };
            let g = g.transpose(1, 2)?.contiguous()?; // (B, T, n, D)
            match &norm_b {
                Some(n) => (n.bwd)(&x.contiguous()?, &g),
                None => Ok(g),
            }
        },
    )
}

/// `act(gate) · up` as one node whose backward recomputes act(gate).
struct Gated {
    y: Precomputed,
    act: Pre,
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::prof::scope(crate::prof::Cat::NormAct);
        let (gate, up) = (gate.detach(), up.detach());
        let d_up = (g * (self.act.fwd)(&gate.contiguous()?)?)?;
        let d_gate = (self.act.bwd)(&gate.contiguous()?, &(g * &up)?)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// The gated MLP's `act(gate) · up` (Llama's SwiGLU with `ops::act::silu_pre`, Gemma's GeGLU
/// with `ops::act::gelu_pre`); gate and up: same shape (views are fine).
pub fn gated(gate: &Tensor, up: &Tensor, act: &Pre) -> candle_core::Result<Tensor> {
    let scope = crate::prof::scope(crate::prof::Cat::NormAct);
    let y = ((act.fwd)(&gate.detach().contiguous()?)? * up.detach())?;
    drop(scope);
    if !(gate.track_op() || up.track_op()) {
        return Ok(y);
    }
    let op = Gated { y: Precomputed::new("gated", y), act: act.clone() };
    gate.apply_op2_arc(up, std::sync::Arc::new(Box::new(op)))
}
