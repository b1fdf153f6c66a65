//! One-pass CPU kernels for the element-wise work around the LoRA path and the norms' backwards.
//!
//! | function            | computes                                   | replaces (candle ops, one pass + one buffer each) |
//! |---------------------|--------------------------------------------|----------------------------------------------------|
//! | [`drop_mul`]        | `u = x ⊙ m · keep` (m: u8 keep mask)        | `mask.to_dtype(f32)`, `* keep`, `x * _`            |
//! | [`add_matmul`]      | `y += s · (a @ b)` in y's buffer            | `* s`, `y + _` after the GEMM                      |
//! | [`add_dropped`]     | `y += d ⊙ m · keep` in y's buffer           | [`drop_mul`] + `y + _`                             |
//! | [`norm_backward`]   | LayerNorm / RMSNorm `dx` row by row         | ~12 full-size tensor ops (`ops::layer_norm_pre`)   |
//! | [`scaled_masked_softmax_`] | attention's `P = softmax(s · S + M)` in S's buffer | `* s`, `+ mask` (two buffers), then candle's softmax (`ops::attention`) |
//! | [`softmax_backward_`] | attention's `dS = s · P ⊙ (dP - rowsum(dP ⊙ P))` in dP's buffer | four full-size tensor ops |
//! | [`softmax_xent`]    | per row of logits z: `nll = lse(z) - z_t`, and `s (softmax(z) - onehot(t))` in one buffer | max, sub, exp, sum, log, gather, div, scatter_add, `* s` (`ops::lm_head_cross_entropy`) |
//!
//! Norm backwards, per row of C values (ĝ = g γ, σ⁻¹ = 1/√(var + eps), x̂ = (x - μ) σ⁻¹):
//!   LayerNorm `dx = (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)) σ⁻¹`;  RMSNorm `dx = r ĝ - x r³ mean(ĝ x)`, r = 1/√(mean(x²) + eps).
//!
//! Why: with the GEMMs at their peak, these passes were what a step spent beyond them (the
//! LoRA path ran at 5-9% of the GEMM peak for its FLOPs, the norm backwards at 4x the norm
//! forwards: `lorafit bench sft --profile`, docs/BENCHMARKS.md). Each kernel does the same f32
//! operations in the same order as the formula it replaces (sums through candle's own row
//! reduction), so results are bit-identical and the recorded training hashes still hold
//! (tests/session_identity.rs). Every function here is CPU + f32 + [`super::fast_cpu`] only; callers
//! keep the tensor-op formula as the generic twin (ops/mod.rs header table), and
//! `tests/fused_cpu.rs` checks each against it.
use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, CustomOp2, DType, InplaceOp2, InplaceOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// The f32 values of a contiguous CPU tensor (`name` for the error).
pub(crate) fn f32s<'a>(name: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{name}: expected f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{name}: expected a contiguous tensor"),
    }
}

fn u8s<'a>(name: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u8]> {
    let CpuStorage::U8(v) = s else { candle_core::bail!("{name}: expected a u8 mask") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{name}: expected a contiguous mask"),
    }
}

fn f32s_mut<'a>(name: &str, s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{name}: expected f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{name}: expected a contiguous tensor"),
    }
}

fn same_len(name: &str, a: usize, b: usize) -> candle_core::Result<()> {
    if a != b {
        candle_core::bail!("{name}: operands of {a} and {b} values")
    }
    Ok(())
}

/// Whether the fast kernels here may take these tensors: f32 (the first ones) on the CPU, fast paths on.
pub fn usable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| super::fast_cpu(t.device()) && t.dtype() == DType::F32)
}

/// `x ⊙ m · keep`: x (..., n) f32, m the same shape u8 (1 = keep).
struct DropMul(f32);

impl CustomOp2 for DropMul {
    fn name(&self) -> &'static str {
        "drop_mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, m) = (f32s("drop_mul", s1, l1)?, u8s("drop_mul", s2, l2)?);
        same_len("drop_mul", x.len(), m.len())?;
        let keep = self.0;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(m.par_chunks(CHUNK))).for_each(|(o, (x, m))| {
            for ((o, &x), &m) in o.iter_mut().zip(x).zip(m) {
                *o = x * (m as f32 * keep + 0.0); // candle: x * (mask.to_dtype(f32) * keep)
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x ⊙ m · keep` in one pass (x f32 on the CPU; see [`usable`]). No graph.
pub fn drop_mul(x: &Tensor, mask: &Tensor, keep: f32) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&mask.contiguous()?, &DropMul(keep))
}

/// `y += d ⊙ m · keep` in y's buffer.
struct AddDropped(f32);

impl InplaceOp3 for AddDropped {
    fn name(&self) -> &'static str {
        "add_dropped"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<()> {
        let (d, m) = (f32s("add_dropped", s2, l2)?, u8s("add_dropped", s3, l3)?);
        let y = f32s_mut("add_dropped", s1, l1)?;
        same_len("add_dropped", y.len(), d.len())?;
        same_len("add_dropped", y.len(), m.len())?;
        let keep = self.0;
        y.par_chunks_mut(CHUNK).zip(d.par_chunks(CHUNK).zip(m.par_chunks(CHUNK))).for_each(|(y, (d, m))| {
            for ((y, &d), &m) in y.iter_mut().zip(d).zip(m) {
                *y += d * (m as f32 * keep + 0.0);
            }
        });
        Ok(())
    }
}

/// `y + d ⊙ m · keep`, written into y's buffer: y must be a contiguous tensor this caller owns
/// alone (a fresh GEMM output), f32 on the CPU like d.
pub fn add_dropped(y: Tensor, d: &Tensor, mask: &Tensor, keep: f32) -> candle_core::Result<Tensor> {
    y.inplace_op3(&d.contiguous()?, &mask.contiguous()?, &AddDropped(keep))?;
    Ok(y)
}

/// `y += d · s` in y's buffer.
struct AddScaled(f32);

impl InplaceOp2 for AddScaled {
    fn name(&self) -> &'static str {
        "add_scaled"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let d = f32s("add_scaled", s2, l2)?;
        let y = f32s_mut("add_scaled", s1, l1)?;
        same_len("add_scaled", y.len(), d.len())?;
        let s = self.0;
        y.par_chunks_mut(CHUNK).zip(d.par_chunks(CHUNK)).for_each(|(y, d)| {
            for (y, &d) in y.iter_mut().zip(d) {
                *y += d * s + 0.0; // candle's `d * s` is its affine `d · s + 0`
            }
        });
        Ok(())
    }
}

/// `y + s · (a @ b)` for y: (..., n) contiguous and owned by the caller alone (a fresh GEMM
/// output), a: (..., k), b: (k, n) any strides; all f32 on the CPU ([`usable`]). The product
/// is candle's GEMM as before; its scaling and the sum are one pass into y's buffer (the same
/// roundings as `y + (a b) * s`).
pub fn add_matmul(y: Tensor, a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let d = super::matmul_rows(a, b)?;
    if d.shape() != y.shape() {
        candle_core::bail!("add_matmul: y {:?} += a {:?} b {:?}: the product is {:?}", y.shape(), a.shape(), b.shape(), d.shape())
    }
    y.inplace_op2(&d, &AddScaled(scale as f32))?;
    Ok(y)
}

#[derive(Clone, Copy)]
pub enum Norm {
    Layer,
    Rms,
}

/// dx of a LayerNorm / RMSNorm over the last dim: (x, g) -> dx, with γ and eps.
struct NormBackward {
    kind: Norm,
    gamma: Vec<f32>,
    eps: f64,
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "norm_backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s("norm_backward", s1, l1)?, f32s("norm_backward", s2, l2)?);
        same_len("norm_backward", x.len(), g.len())?;
        let c = self.gamma.len();
        if c == 0 || x.len() % c != 0 {
            candle_core::bail!("norm_backward: {} values are not rows of {c}", x.len())
        }
        let (gamma, eps, kind) = (&self.gamma, self.eps, self.kind);
        let mut dx = vec![0f32; x.len()];
        let rows_per_chunk = (CHUNK / c).max(1);
        dx.par_chunks_mut(rows_per_chunk * c).zip(x.par_chunks(rows_per_chunk * c).zip(g.par_chunks(rows_per_chunk * c))).for_each(
            |(dx, (x, g))| {
                let (mut t1, mut t2) = (vec![0f32; c], vec![0f32; c]);
                for ((dx, x), g) in dx.chunks_mut(c).zip(x.chunks(c)).zip(g.chunks(c)) {
                    norm_row(kind, x, g, gamma, eps as f32, dx, &mut t1, &mut t2);
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// candle's sum of a contiguous f32 row (its vectorised reduction: the same order, the same bits).
fn vsum(v: &[f32]) -> f32 {
    let mut r = 0f32;
    // SAFETY: reads v.len() values from v and writes one f32 to r.
    unsafe { <f32 as VecOps>::vec_reduce_sum(v.as_ptr(), &mut r, v.len()) };
    r
}

/// `x.exp()`, with the masked entries (x far below -104, where expf underflows to +0) set to
/// +0 directly: libm's underflow path (`__math_uflowf`, errno) cost 5% of an SFT step's CPU
/// time in attention's causal softmax. Same bits as `exp` for every x.
#[inline(always)]
fn exp_or_zero(x: f32) -> f32 {
    if x < -104.0 {
        0.0
    } else {
        x.exp()
    }
}

/// A softmax row's numerator in place, `x ← exp(x - max)`, with candle's max and sum of the
/// row (the same bits as its `softmax_last_dim` / `max_keepdim`, `exp`, `sum_keepdim`):
/// returns (max, Σ exp).
fn exp_shifted(row: &mut [f32]) -> (f32, f32) {
    let mut max = f32::NEG_INFINITY;
    // SAFETY: reads row.len() values of row, writes one f32.
    unsafe { <f32 as VecOps>::vec_reduce_max(row.as_ptr(), &mut max, row.len()) };
    for x in row.iter_mut() {
        *x = exp_or_zero(*x - max);
    }
    (max, vsum(row))
}

/// One row's dx, with the operations and roundings of the composed tensor formulas in
/// `ops::layer_norm_pre` / `ops::rms_norm_pre` (candle's mean is `sum · (1/n) + 0`, a scalar add
/// is `v · 1 + eps`), so both give the same bits. `t1`, `t2`: scratch rows.
fn norm_row(kind: Norm, x: &[f32], g: &[f32], gamma: &[f32], eps: f32, dx: &mut [f32], t1: &mut [f32], t2: &mut [f32]) {
    let s = (1f64 / x.len() as f64) as f32;
    let mean = |v: &[f32]| vsum(v) * s + 0.0;
    for ((gh, &g), &w) in t1.iter_mut().zip(g).zip(gamma) {
        *gh = g * w; // ĝ
    }
    match kind {
        Norm::Layer => {
            let mu = mean(x);
            for (t, &x) in t2.iter_mut().zip(x) {
                *t = (x - mu) * (x - mu);
            }
            let rstd = ((mean(t2) * 1.0 + eps).sqrt()).recip();
            for (t, (&x, &gh)) in t2.iter_mut().zip(x.iter().zip(t1.iter())) {
                *t = gh * ((x - mu) * rstd); // ĝ x̂
            }
            let (m1, m2) = (mean(t1), mean(t2));
            for (d, (&x, &gh)) in dx.iter_mut().zip(x.iter().zip(t1.iter())) {
                let xhat = (x - mu) * rstd;
                *d = ((gh - m1) - xhat * m2) * rstd;
            }
        }
        Norm::Rms => {
            for (t, &x) in t2.iter_mut().zip(x) {
                *t = x * x;
            }
            let r = ((mean(t2) * 1.0 + eps).sqrt()).recip();
            for (t, (&x, &gh)) in t2.iter_mut().zip(x.iter().zip(t1.iter())) {
                *t = gh * x;
            }
            let m = mean(t2);
            let r3m = r.powf(3.0) * m;
            for (d, (&x, &gh)) in dx.iter_mut().zip(x.iter().zip(t1.iter())) {
                *d = gh * r - x * r3m;
            }
        }
    }
}

/// The norm's dx in one pass over (x, g), both f32 on the CPU ([`usable`]); γ: (C,).
pub fn norm_backward(kind: Norm, x: &Tensor, g: &Tensor, gamma: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let gamma = gamma.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &NormBackward { kind, gamma, eps })
}

/// Per row of logits z (n, V) f32 and targets t (n,) u32, with the logits scaled by s first:
/// the row's `nll = log Σ e + max - (s z)_t` (kept in `nll`) and, when `grad`, the output
/// `s · (e / Σ e - onehot(t))` with `e = exp(s z - max)`.
struct SoftmaxXent {
    scale: f32,
    grad: bool,
    nll: std::sync::Mutex<Vec<f32>>,
}

impl CustomOp2 for SoftmaxXent {
    fn name(&self) -> &'static str {
        "softmax_xent"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = f32s("softmax_xent", s1, l1)?;
        let CpuStorage::U32(t) = s2 else { candle_core::bail!("softmax_xent: expected u32 targets") };
        let Some((t0, t1)) = l2.contiguous_offsets() else { candle_core::bail!("softmax_xent: expected contiguous targets") };
        let t = &t[t0..t1];
        let (n, v) = l1.shape().dims2()?;
        if t.len() != n || v == 0 {
            candle_core::bail!("softmax_xent: {n} rows of {v} logits for {} targets", t.len())
        }
        if let Some(&bad) = t.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("softmax_xent: target {bad} is outside the vocabulary of {v}")
        }
        let (scale, grad) = (self.scale, self.grad);
        let mut out = if grad { vec![0f32; n * v] } else { vec![] };
        let mut nll = vec![0f32; n];
        let row = |z: &[f32], t: usize, e: &mut [f32]| -> f32 {
            // z · s (candle's affine `z · s + 0`) when the logits are scaled (1 / temperature).
            for (e, &z) in e.iter_mut().zip(z) {
                *e = if scale != 1.0 { z * scale + 0.0 } else { z };
            }
            let zt = e[t];
            let (max, sum) = exp_shifted(e);
            let nll = (sum.ln() + max) - zt;
            if grad {
                for e in e.iter_mut() {
                    *e /= sum;
                }
                e[t] += -1.0;
                if scale != 1.0 {
                    for e in e.iter_mut() {
                        *e = *e * scale + 0.0;
                    }
                }
            }
            nll
        };
        if grad {
            out.par_chunks_mut(v).zip(z.par_chunks(v).zip(t.par_iter())).zip(nll.par_iter_mut()).for_each(|((e, (z, &t)), l)| {
                *l = row(z, t as usize, e);
            });
        } else {
            z.par_chunks(v).zip(t.par_iter()).zip(nll.par_iter_mut()).for_each_init(|| vec![0f32; v], |e, ((z, &t), l)| {
                *l = row(z, t as usize, e);
            });
        }
        *self.nll.lock().map_err(|_| candle_core::Error::Msg("softmax_xent: a kernel thread panicked".into()))? = nll;
        let shape = if grad { l1.shape().clone() } else { Shape::from_dims(&[0]) };
        Ok((CpuStorage::F32(out), shape))
    }
}

/// For logits z: (n, V) f32 and targets (n,) u32 on the CPU ([`usable`]): the per-row NLL (n,)
/// and, with `grad`, `scale · (softmax(z) - onehot(t))` (n, V), in one pass per row with the
/// roundings of the tensor ops in `ops::lm_head_cross_entropy_capped` (no soft-capping).
pub fn softmax_xent(z: &Tensor, targets: &Tensor, scale: f64, grad: bool) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let op = SoftmaxXent { scale: scale as f32, grad, nll: std::sync::Mutex::new(vec![]) };
    let p = z.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &op)?;
    let nll = std::mem::take(&mut *op.nll.lock().map_err(|_| candle_core::Error::Msg("softmax_xent: a kernel thread panicked".into()))?);
    let n = nll.len();
    Ok((Tensor::from_vec(nll, n, z.device())?, grad.then_some(p)))
}

/// `S ← softmax(S · s + M)` row by row: S (B, H, T, Tk) in place, M (B or 1, 1, T, Tk).
struct ScaledMaskedSoftmax {
    scale: f32,
    /// (B, H, T, Tk) of S; M's batch size.
    dims: (usize, usize, usize, usize),
    mask_b: usize,
}

impl InplaceOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "scaled_masked_softmax"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let m = f32s("scaled_masked_softmax", s2, l2)?;
        let sc = f32s_mut("scaled_masked_softmax", s1, l1)?;
        let (b, h, t, tk) = self.dims;
        same_len("scaled_masked_softmax", sc.len(), b * h * t * tk)?;
        same_len("scaled_masked_softmax (mask)", m.len(), self.mask_b * t * tk)?;
        let (scale, per_b) = (self.scale, self.mask_b == b);
        sc.par_chunks_mut(tk).enumerate().for_each(|(r, row)| {
            let (bi, i) = (r / (h * t), r % t);
            let mrow = &m[((if per_b { bi } else { 0 }) * t + i) * tk..][..tk];
            // candle: (S · s) is the affine `S · s + 0`, then `+ mask`, then softmax_last_dim.
            for (x, &mk) in row.iter_mut().zip(mrow) {
                *x = (*x * scale + 0.0) + mk;
            }
            let (_, sum) = exp_shifted(row);
            for x in row.iter_mut() {
                *x /= sum;
            }
        });
        Ok(())
    }
}

/// Attention probabilities from raw scores S = Q Kᵀ: (B, H, T, Tk) f32 contiguous and owned by
/// the caller alone (a fresh GEMM output), `softmax(S · scale + mask)` written into S's buffer;
/// mask: (B or 1, 1, T, Tk) f32 additive. Bit-identical to `ops::attention`'s tensor ops.
pub fn scaled_masked_softmax_(s: Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, h, t, tk) = s.dims4()?;
    let (mb, one, mt, mtk) = mask.dims4()?;
    if one != 1 || mt != t || mtk != tk || (mb != b && mb != 1) || !s.is_contiguous() {
        candle_core::bail!("scaled_masked_softmax: scores {:?} with mask {:?}", s.shape(), mask.shape())
    }
    s.inplace_op2(&mask.contiguous()?, &ScaledMaskedSoftmax { scale: scale as f32, dims: (b, h, t, tk), mask_b: mb })?;
    Ok(s)
}

/// `dP ← s · P ⊙ (dP - rowsum(dP ⊙ P))` row by row, in dP's buffer.
struct SoftmaxBackward {
    scale: f32,
    cols: usize,
}

impl InplaceOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax_backward"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let p = f32s("softmax_backward", s2, l2)?;
        let dp = f32s_mut("softmax_backward", s1, l1)?;
        same_len("softmax_backward", dp.len(), p.len())?;
        let (scale, c) = (self.scale, self.cols);
        if c == 0 || dp.len() % c != 0 {
            candle_core::bail!("softmax_backward: {} values are not rows of {c}", dp.len())
        }
        dp.par_chunks_mut(c).zip(p.par_chunks(c)).for_each_init(
            || vec![0f32; c],
            |tmp, (dp, p)| {
                for ((t, &d), &p) in tmp.iter_mut().zip(dp.iter()).zip(p) {
                    *t = d * p;
                }
                let dot = vsum(tmp);
                for (d, &p) in dp.iter_mut().zip(p) {
                    *d = (p * (*d - dot)) * scale + 0.0;
                }
            },
        );
        Ok(())
    }
}

/// The softmax backward of attention scaled by `scale`: dp (..., Tk) f32 contiguous and owned by
/// the caller alone (a fresh GEMM output) becomes `scale · p ⊙ (dp - rowsum(dp ⊙ p))`.
/// Bit-identical to `ops::attention`'s tensor ops.
pub fn softmax_backward_(dp: Tensor, p: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if dp.shape() != p.shape() || !dp.is_contiguous() {
        candle_core::bail!("softmax_backward: dP {:?} and P {:?}", dp.shape(), p.shape())
    }
    let cols = dp.dim(candle_core::D::Minus1)?;
    dp.inplace_op2(&p.contiguous()?, &SoftmaxBackward { scale: scale as f32, cols })?;
    Ok(dp)
}

/// The transpose of a contiguous (r, c) f32 matrix, written in 32 x 32 tiles.
struct Transpose2;

impl candle_core::CustomOp1 for Transpose2 {
    fn name(&self) -> &'static str {
        "transpose2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32s("transpose2", s, l)?;
        let (r, c) = l.shape().dims2()?;
        let mut dst = vec![0f32; r * c];
        const T: usize = 32;
        // Each task writes T rows of the (c, r) result: columns j0.. of the source.
        dst.par_chunks_mut(T * r).enumerate().for_each(|(bj, out)| {
            let j0 = bj * T;
            let jn = (j0 + T).min(c) - j0;
            for i in 0..r {
                for (dj, &v) in src[i * c + j0..i * c + j0 + jn].iter().enumerate() {
                    out[dj * r + i] = v;
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from_dims(&[c, r])))
    }
}

/// A contiguous copy of a 2-D f32 CPU tensor's transpose (one pass, no intermediate copy: a
/// weight of a few million values in milliseconds).
pub fn transpose2(w: &Tensor) -> candle_core::Result<Tensor> {
    w.contiguous()?.apply_op1_no_bwd(&Transpose2)
}
