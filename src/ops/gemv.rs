//! `y = x W` for ONE row x: (1, k) against a frozen f32 weight on an x86 CPU: batch-1 decoding.
//!
//! Why: for a single row, gemm's AVX-512 (x86-v4) code streams the weights ~10% slower than its
//! AVX2 code (batch-1 generation fell from 50.5 to 44.7 tokens/s when lorafit enabled the
//! feature for its training GEMMs). Here each thread streams a contiguous block of the weight's
//! rows once with AVX2 + FMA: W row-major (k, n) (GPT-2's Conv1D): `y = Σ_i x_i W[i, :]`, one
//! partial y per thread, summed; W the transpose of a row-major (n, k) (nn.Linear, the tied LM
//! head): `y_j = W[j, :] · x`. Taken only where `ops::fast_cpu` says so (not under
//! `LORAFIT_GENERIC_OPS=1`, nor on a GPU): otherwise `matmul_rows` uses the GEMM.
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

struct Gemv;

#[cfg(target_arch = "x86_64")]
mod kernels {
    /// acc[j] += a * row[j]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(acc: &mut [f32], a: f32, row: &[f32]) {
        for (o, &w) in acc.iter_mut().zip(row) {
            *o = w.mul_add(a, *o);
        }
    }

    /// a · b with 32 independent partial sums (so the loop vectorises).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 32];
        let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..32 {
                acc[l] = x[l].mul_add(y[l], acc[l]);
            }
        }
        let mut s = 0f32;
        for v in acc {
            s += v;
        }
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        s
    }
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gemv"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (s1, s2) else { candle_core::bail!("gemv: expected f32") };
        let Some((x0, x1)) = l1.contiguous_offsets() else { candle_core::bail!("gemv: x must be contiguous") };
        let x = &xs[x0..x1];
        let (k, n) = l2.shape().dims2()?;
        let (st, off) = (l2.stride(), l2.start_offset());
        let w = &ws[off..off + k * n];
        let threads = rayon::current_num_threads().max(1);
        let y = if st == [n, 1] {
            // Row blocks of W, one partial y per block, then their sum.
            let rows = k.div_ceil(threads);
            let parts: Vec<Vec<f32>> = (0..k.div_ceil(rows))
                .into_par_iter()
                .map(|p| {
                    let mut acc = vec![0f32; n];
                    for i in p * rows..((p + 1) * rows).min(k) {
                        // SAFETY: gemv() checked avx2 and fma.
                        unsafe { kernels::axpy(&mut acc, x[i], &w[i * n..(i + 1) * n]) };
                    }
                    acc
                })
                .collect();
            let mut y = parts[0].clone();
            for p in &parts[1..] {
                for (a, b) in y.iter_mut().zip(p) {
                    *a += b;
                }
            }
            y
        } else {
            // One dot product per output, in contiguous blocks of W's rows.
            let mut y = vec![0f32; n];
            let per = n.div_ceil(threads);
            y.par_chunks_mut(per).enumerate().for_each(|(c, out)| {
                for (jj, o) in out.iter_mut().enumerate() {
                    let j = c * per + jj;
                    // SAFETY: gemv() checked avx2 and fma.
                    *o = unsafe { kernels::dot(&w[j * k..(j + 1) * k], x) };
                }
            });
            y
        };
        Ok((CpuStorage::F32(y), Shape::from((1, n))))
    }
}

/// x: (1, k), w: (k, n) row-major or a transposed row-major (n, k); f32 on an AVX2 + FMA CPU,
/// no graph. None when this path does not apply (the caller uses gemm).
pub fn gemv(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            return Ok(None);
        }
        let ok = super::fast_cpu(x.device())
            && x.dtype() == candle_core::DType::F32
            && w.dtype() == candle_core::DType::F32
            && w.rank() == 2
            && x.dims() == [1, w.dim(0)?]
            && x.is_contiguous()
            && !x.track_op()
            && !w.track_op();
        if !ok {
            return Ok(None);
        }
        let (k, n) = w.dims2()?;
        if !(w.stride() == [n, 1] || w.stride() == [1, k]) {
            return Ok(None);
        }
        Ok(Some(x.apply_op2_no_bwd(w, &Gemv)?))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, w);
        Ok(None)
    }
}
