//! A frozen linear layer plus its active LoRA adapters (none for a plain frozen layer) as ONE
//! graph node: `ops::frozen_linear`, `quant::nf4_linear` and `lora::Linear` all run through it.
//!
//! Forward (x: (..., in) after the optional `pre` op (LayerNorm, GELU), W: (in, out) frozen, per adapter i: A_i (r, in), B_i (out, r),
//! s_i = scaling × stacking weight, m_i a dropout keep mask scaled by 1/(1-p)):
//!   `u_i = m_i ⊙ x`, `z_i = u_i A_iᵀ`, `y = x W + b + Σ_i s_i z_i B_iᵀ`
//! Backward (g = dL/dy; only the trainable adapter's A, B get gradients):
//!   `gz_i = s_i g B_i`, `dx = g Wᵀ + Σ_i m_i ⊙ (gz_i A_i)`, `dA = gzᵀ u`, `dB = s gᵀ z`
//! Reference: PEFT `tuners/lora/layer.py` `Linear.forward` (the math) and its autograd.
//!
//! Why one node: composed from candle ops, an adapted layer keeps the f32 dropout mask, the
//! dropped input, `B A x`, its scaled copy and the frozen output until the backward, and
//! candle's backward also computes (and keeps to the end) the gradient of the constant mask
//! (docs/BENCHMARKS.md). This node keeps x (the previous node's output anyway), a u8 mask, the
//! rank-r `z` and its output, and its backward is five small GEMMs and one large one.
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use super::{fused_cpu, grad3_op, input_grad_op, matmul, matmul_rows, Pre};
use crate::prof::{self, Cat};

/// The frozen weight as (in, out) in a given dtype: a view for a dense layer, a dequantized
/// copy for NF4 (made per pass, never kept).
pub type FrozenWeight = Arc<dyn Fn(DType) -> candle_core::Result<Tensor> + Send + Sync>;

/// One active adapter's contribution.
pub struct Term {
    /// A: (r, in), f32, detached.
    pub a: Tensor,
    /// B: (out, r), f32, detached.
    pub b: Tensor,
    /// `lora_alpha / r` (or rsLoRA's) times the stacking weight.
    pub scale: f64,
    /// Dropout: keep mask (..., in) u8 (1 = keep) and the keep scale `1/(1-p)` (as f32).
    pub dropout: Option<(Tensor, f32)>,
}

impl Term {
    /// `m ⊙ h` for h: (..., in) f32.
    pub fn drop(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        match &self.dropout {
            Some((mask, keep)) if fused_cpu::usable(&[h]) && mask.dtype() == DType::U8 => fused_cpu::drop_mul(h, mask, *keep),
            Some((mask, keep)) => h * (mask.to_dtype(DType::F32)? * *keep as f64)?,
            None => Ok(h.clone()),
        }
    }
}

struct Fused {
    /// An op on the input, recomputed in the backward (LayerNorm, GELU): its output is not kept.
    pre: Option<Pre>,
    w: FrozenWeight,
    /// (out,)
    bias: Option<Tensor>,
    terms: Vec<Term>,
    /// Index of the term whose A and B get gradients.
    trainable: Option<usize>,
    /// The trainable term's `z = u Aᵀ`, (..., r), kept from the forward for `dB`.
    z: Mutex<Option<Tensor>>,
}

impl Fused {
    /// x: (..., in) in the base dtype -> (..., out). The LoRA path runs in f32.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.pre_of(x)?;
        let x = &a;
        let frozen = prof::scope(Cat::FrozenGemm);
        let mut y = matmul_rows(x, &(self.w)(x.dtype())?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        drop(frozen);
        if self.terms.is_empty() {
            return Ok(y);
        }
        let _lora = prof::scope(Cat::Lora);
        let h = x.to_dtype(DType::F32)?; // the LoRA path runs in f32
        for (i, t) in self.terms.iter().enumerate() {
            let z = matmul_rows(&t.drop(&h)?, &t.a.t()?)?; // (..., in) -> (..., r)
            y = if fused_cpu::usable(&[&y, &z, &t.b]) {
                fused_cpu::add_matmul(y, &z, &t.b.t()?, t.scale)? // y += s z Bᵀ inside the GEMM
            } else {
                let delta = (matmul_rows(&z, &t.b.t()?)? * t.scale)?; // (..., out)
                let dt = y.dtype();
                (y + delta.to_dtype(dt)?)?
            };
            if Some(i) == self.trainable {
                *self.z.lock().unwrap() = Some(z);
            }
        }
        Ok(y)
    }

    fn pre_of(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.pre {
            Some(p) => (p.fwd)(x),
            None => Ok(x.clone()),
        }
    }

    /// Gradients of x (when `need_dx`) and of the trainable term's A and B.
    fn backward(&self, x: &Tensor, g: &Tensor, need_dx: bool) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let a = if self.trainable.is_some() && self.pre.is_some() { self.pre_of(x)? } else { x.clone() };
        // d_in: the gradient of the linear's input a = pre(x).
        let (d_in, d_a, d_b) = self.backward_linear(&a, g, need_dx)?;
        let dx = match (&self.pre, d_in) {
            (Some(p), Some(d)) => Some((p.bwd)(x, &d)?),
            (_, d) => d,
        };
        Ok((dx, d_a, d_b))
    }

    /// The linear part's gradients, with `x` the linear's own input (after `pre`).
    fn backward_linear(&self, x: &Tensor, g: &Tensor, need_dx: bool) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _lora = prof::scope(Cat::Lora);
        let g32 = g.to_dtype(DType::F32)?;
        let mut dx_lora: Option<Tensor> = None;
        let (mut da, mut db) = (None, None);
        // One adapter on the CPU in f32: its m ⊙ (gz A) is added straight into the buffer of
        // g Wᵀ (ops/fused_cpu.rs: the same roundings as the sum below).
        let frozen = || -> candle_core::Result<Tensor> {
            let _frozen = prof::scope(Cat::FrozenGemm);
            matmul_rows(g, &(self.w)(g.dtype())?.t()?)
        };
        let mut dx_fused = None;
        for (i, t) in self.terms.iter().enumerate() {
            let gz = (matmul_rows(&g32, &t.b)? * t.scale)?; // (..., out) -> (..., r)
            if need_dx && self.terms.len() == 1 && fused_cpu::usable(&[g, &gz, &t.a]) {
                dx_fused = Some(match &t.dropout {
                    None => fused_cpu::add_matmul(frozen()?, &gz, &t.a, 1.0)?,
                    Some((mask, keep)) if mask.dtype() == DType::U8 => fused_cpu::add_dropped(frozen()?, &matmul_rows(&gz, &t.a)?, mask, *keep)?,
                    Some(_) => candle_core::bail!("lora_linear: the dropout mask is not u8"),
                });
            } else if need_dx {
                let d = t.drop(&matmul_rows(&gz, &t.a)?)?; // (..., in)
                dx_lora = Some(match dx_lora {
                    Some(acc) => (acc + d)?,
                    None => d,
                });
            }
            if Some(i) == self.trainable {
                let z = self.z.lock().unwrap().take().ok_or_else(|| candle_core::Error::Msg("lora_linear: backward run twice".into()))?;
                let r = t.a.dim(0)?;
                let rows = gz.elem_count() / r;
                let u = t.drop(&x.to_dtype(DType::F32)?)?;
                let u = u.reshape((rows, u.elem_count() / rows))?; // (N, in)
                da = Some(matmul(&gz.reshape((rows, r))?.t()?, &u)?); // (r, N) @ (N, in)
                let g2 = g32.reshape((rows, g32.elem_count() / rows))?; // (N, out)
                db = Some((matmul(&g2.t()?, &z.reshape((rows, r))?)? * t.scale)?); // (out, N) @ (N, r)
            }
        }
        if dx_fused.is_some() {
            return Ok((dx_fused, da, db));
        }
        let dx = if need_dx {
            let dx = frozen()?;
            Some(match dx_lora {
                Some(d) => (dx + d.to_dtype(g.dtype())?)?,
                None => dx,
            })
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// `a W + b + Σ s_i B_i A_i drop(a)` with `a = pre(x)` (or x) as one node. `trainable`: index into `terms` of the
/// adapter that gets gradients, with its A and B as graph tensors (Vars).
pub fn lora_linear(
    x: &Tensor,
    pre: Option<Pre>,
    w: FrozenWeight,
    bias: Option<Tensor>,
    terms: Vec<Term>,
    trainable: Option<(usize, Tensor, Tensor)>,
) -> candle_core::Result<Tensor> {
    let fused = Arc::new(Fused { pre, w, bias, terms, trainable: trainable.as_ref().map(|t| t.0), z: Mutex::new(None) });
    let x_tracks = x.track_op();
    match trainable {
        Some((_, a, b)) => {
            let y = fused.forward(&x.detach())?;
            grad3_op("lora_linear", (x, &a, &b), y, move |x, _a, _b, g| fused.backward(x, g, x_tracks))
        }
        None => {
            let f = fused.clone();
            input_grad_op("lora_linear", x, move |x| f.forward(x), move |x, _y, g| {
                fused.backward(x, g, true)?.0.ok_or_else(|| candle_core::Error::Msg("lora_linear: no input gradient".into()))
            })
        }
    }
}
