//! Activations with an analytic backward: GPT-2's `gelu_new` and LLaMA's SiLU.
//!
//! | op     | forward                                        | backward (g = dL/dy)                                  |
//! |--------|------------------------------------------------|-------------------------------------------------------|
//! | `gelu` | `y = x/2 (1 + t)`, `t = tanh(k (x + c x³))`     | `dx = g (½(1 + t) + ½ x (1 - t²) k (1 + 3c x²))`      |
//! | `silu` | `y = x σ(x)`                                   | `dx = g σ(x) (1 + x (1 - σ(x)))`                      |
//!
//! `k = √(2/π)`, `c = 0.044715` (HF `NewGELUActivation`).
//!
//! Why: candle's `gelu()` backward is a dozen full-size graph temporaries built with `powf`/`tanh`
//! (14% of a GPT-2 step's CPU time in libm, docs/BENCHMARKS.md). Here forward and backward are one
//! pass each over contiguous f32 on the CPU, split over rayon's threads, with a rational tanh
//! (Eigen's `ptanh_float`, a few ulp from libm's and branch-free, so it vectorises). Other
//! devices and dtypes use candle's ops and the same formula as tensor ops (the CPU too under
//! `LORAFIT_GENERIC_OPS=1`: `ops::fast_cpu`).
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

const K: f32 = 0.797_884_6; // sqrt(2/pi)
const C: f32 = 0.044_715;

/// tanh as Eigen's 13/6 rational approximation, clamped where it saturates in f32.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = x2 * -2.760_768_5e-16 + 2.000_187_9e-13;
    p = x2 * p + -8.604_671_5e-11;
    p = x2 * p + 5.122_297e-8;
    p = x2 * p + 1.485_722_4e-5;
    p = x2 * p + 6.372_619_3e-4;
    p = x2 * p + 4.893_524_6e-3;
    p *= x;
    let mut q = x2 * 1.198_258_4e-6 + 1.185_347_1e-4;
    q = x2 * q + 2.268_434_6e-3;
    q = x2 * q + 4.893_525e-3;
    p / q
}

#[inline(always)]
fn gelu_f(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(K * (x + C * x * x * x)))
}

#[inline(always)]
fn gelu_df(x: f32) -> f32 {
    let t = tanh(K * (x + C * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K * (1.0 + 3.0 * C * x * x)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline(always)]
fn silu_f(x: f32) -> f32 {
    x * sigmoid(x)
}

#[inline(always)]
fn silu_df(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

const CHUNK: usize = 1 << 14;

use super::fused_cpu::f32s as slice;

/// `out[i] = f(x[i])`, in chunks over rayon's threads (generic, so `f` inlines and vectorises).
fn map1<F: Fn(f32) -> f32 + Sync>(x: &[f32], f: F) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = f(x);
        }
    });
    out
}

/// `out[i] = g[i] f'(x[i])`.
fn map2<F: Fn(f32) -> f32 + Sync>(x: &[f32], g: &[f32], df: F) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|(o, (x, g))| {
        for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
            *o = g * df(x);
        }
    });
    out
}

#[derive(Clone, Copy)]
enum Kind {
    Gelu,
    Silu,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gelu => "gelu",
            Kind::Silu => "silu",
        }
    }
}

/// The forward op on contiguous f32 CPU input; its backward is [`ActGrad`] on (x, g).
struct Act(Kind);

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::prof::scope(crate::prof::Cat::NormAct);
        let x = slice(self.0.name(), s, l)?;
        let y = match self.0 {
            Kind::Gelu => map1(x, gelu_f),
            Kind::Silu => map1(x, silu_f),
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &ActGrad(self.0))?))
    }
}

/// dx = g · f'(x).
struct ActGrad(Kind);

impl CustomOp2 for ActGrad {
    fn name(&self) -> &'static str {
        "act_grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _p = crate::prof::scope(crate::prof::Cat::NormAct);
        let (x, g) = (slice(self.0.name(), s1, l1)?, slice(self.0.name(), s2, l2)?);
        if x.len() != g.len() {
            candle_core::bail!("{} backward: x has {} values, its gradient {}", self.0.name(), x.len(), g.len())
        }
        let dx = match self.0 {
            Kind::Gelu => map2(x, g, gelu_df),
            Kind::Silu => map2(x, g, silu_df),
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// f(x) without a graph.
fn act_fwd(x: &Tensor, kind: Kind) -> candle_core::Result<Tensor> {
    let _p = crate::prof::scope(crate::prof::Cat::NormAct);
    if super::fast_cpu(x.device()) && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&Act(kind));
    }
    match kind {
        Kind::Gelu => x.gelu(),
        Kind::Silu => x.silu(),
    }
}

/// dx = g f'(x) without a graph.
fn act_bwd(x: &Tensor, g: &Tensor, kind: Kind) -> candle_core::Result<Tensor> {
    let _p = crate::prof::scope(crate::prof::Cat::NormAct);
    if super::fast_cpu(x.device()) && x.dtype() == DType::F32 && g.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &ActGrad(kind));
    }
    // Other devices / dtypes: the same formula as tensor ops in f32.
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let d = match kind {
        Kind::Gelu => {
            let x2 = x.sqr()?;
            let t = ((&x * ((&x2 * C as f64)? + 1.0)?)? * K as f64)?.tanh()?;
            let a = ((&t + 1.0)? * 0.5)?;
            let b = ((&x * 0.5)? * (t.sqr()?.neg()? + 1.0)?)?;
            (a + (b * ((x2 * (3.0 * C as f64 * K as f64))? + K as f64)?)?)?
        }
        Kind::Silu => {
            let s = candle_nn::ops::sigmoid(&x)?;
            (&s * ((x * (s.neg()? + 1.0)?)? + 1.0)?)?
        }
    };
    (d * g.to_dtype(DType::F32)?)?.to_dtype(dt)
}

fn act(x: &Tensor, kind: Kind) -> candle_core::Result<Tensor> {
    if super::fast_cpu(x.device()) && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Act(kind));
    }
    pre(kind).apply(kind.name(), x)
}

fn pre(kind: Kind) -> super::Pre {
    super::Pre { fwd: std::sync::Arc::new(move |x| act_fwd(x, kind)), bwd: std::sync::Arc::new(move |x, g| act_bwd(x, g, kind)) }
}

/// GPT-2's `gelu_new` (tanh approximation). x: any shape.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    act(x, Kind::Gelu)
}

/// [`gelu`] as a [`super::Pre`] of the layer that consumes it.
pub fn gelu_pre() -> super::Pre {
    pre(Kind::Gelu)
}

/// SiLU `x σ(x)`. x: any shape.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    act(x, Kind::Silu)
}

/// [`silu`] as a [`super::Pre`] (the gated MLP's activation, `ops::family::gated`).
pub fn silu_pre() -> super::Pre {
    pre(Kind::Silu)
}
