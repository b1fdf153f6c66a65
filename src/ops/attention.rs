//! Self-attention as ONE graph node, with its backward written out: GPT-2's from the packed
//! `c_attn` output, LLaMA's from q, k, v (grouped-query heads share a kv head).
//!
//! Forward (per batch row and head, s = 1/√D, M the additive mask):
//!   `P = softmax(s Q Kᵀ + M)`, `Y = P V`
//! Backward (G = dL/dY):
//!   `dV = Pᵀ G`, `dP = G Vᵀ`, `dS = s P ⊙ (dP - rowsum(dP ⊙ P))`, `dQ = dS K`, `dK = dSᵀ Q`
//! (the softmax backward of `ops::masked_softmax`, the matmul backwards of torch's SDPA math path).
//! With Gemma 2's soft-capping, `S = c · tanh(s Q Kᵀ / c)` and `dS` gains the factor `1 - tanh²`
//! (recomputed from Q and K in the backward, not kept). Sliding windows are in the mask.
//!
//! Why: composed from candle ops, attention is a dozen graph nodes (three narrows, their
//! transposes and copies, two matmuls, a scale, the softmax, the merge of heads), and candle's
//! backward allocates a zero tensor and an add per node (`GradStore::or_insert`), the narrows'
//! backward a full (B, T, 3C) zero tensor each. Here it is one node that keeps the packed input
//! and P, and the backward writes dQKV in one concatenation.
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, D};

use super::matmul;

/// (B, T, 3C) packed `[q | k | v]` -> q, k, v as (B, H, T, D), contiguous.
fn split_heads(qkv: &Tensor, n_head: usize) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let split = |i: usize| qkv.narrow(D::Minus1, i * c, c)?.reshape((b, t, n_head, c / n_head))?.transpose(1, 2)?.contiguous();
    Ok((split(0)?, split(1)?, split(2)?))
}

/// (B, H, T, D) -> (B, T, H·D).
fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}

/// Forward on detached, contiguous q: (B, H, T, D), k, v: (B, H_kv, Tk, D), mask (B, 1, T, Tk):
/// returns y: (B, H, T, D) and P: (B, H_kv, rep·T, Tk) (rep = H / H_kv query heads per kv head,
/// reshaped rather than repeating k and v). `cap`: Gemma 2's soft-capping of the scores,
/// `c · tanh(s / c)` before the mask.
fn sdpa_fwd(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64, cap: Option<f64>) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, h, t, d) = q.dims4()?;
    let (h_kv, tk) = (k.dim(1)?, k.dim(2)?);
    let rep = h / h_kv;
    let q2 = q.reshape((b, h_kv, rep * t, d))?;
    let raw = matmul(&q2, &k.t()?)?.reshape((b, h, t, tk))?; // (B, H, T, Tk)
    if cap.is_none() && super::fused_cpu::usable(&[&raw, mask]) {
        // scale, mask and softmax in one pass in the scores' buffer (ops/fused_cpu.rs)
        let p = super::fused_cpu::scaled_masked_softmax_(raw, mask, scale)?.reshape((b, h_kv, rep * t, tk))?;
        let y = matmul(&p, v)?.reshape((b, h, t, d))?;
        return Ok((y, p));
    }
    let mut s = (raw * scale)?;
    if let Some(c) = cap {
        s = ((s / c)?.tanh()? * c)?;
    }
    let p = candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?.broadcast_add(mask)?)?.to_dtype(q.dtype())?;
    let p = p.reshape((b, h_kv, rep * t, tk))?;
    let y = matmul(&p, v)?.reshape((b, h, t, d))?;
    Ok((y, p))
}

/// The backward of [`sdpa_fwd`] for g = dL/dy: (B, H, T, D) -> (dq, dk, dv) shaped as q, k, v.
/// With `cap`, tanh(s / c) is recomputed from q and k for the factor `1 - tanh²` (not kept).
fn sdpa_bwd(q: &Tensor, k: &Tensor, v: &Tensor, p: &Tensor, g: &Tensor, scale: f64, cap: Option<f64>) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let dt = q.dtype();
    let (b, h, t, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let rep = h / h_kv;
    let g = g.contiguous()?.reshape((b, h_kv, rep * t, d))?;
    let dv = matmul(&p.t()?, &g)?; // (B, H_kv, Tk, D)
    let dp = matmul(&g, &v.t()?)?.to_dtype(DType::F32)?; // (B, H_kv, rep·T, Tk)
    if cap.is_none() && super::fused_cpu::usable(&[&dp, p]) {
        let ds = super::fused_cpu::softmax_backward_(dp, p, scale)?; // one pass in dP's buffer
        let dq = matmul(&ds, k)?.reshape((b, h, t, d))?;
        let dk = matmul(&ds.t()?, &q.reshape((b, h_kv, rep * t, d))?)?;
        return Ok((dq, dk, dv));
    }
    let p32 = p.to_dtype(DType::F32)?;
    let dot = (&dp * &p32)?.sum_keepdim(D::Minus1)?;
    let mut ds = (p32 * dp.broadcast_sub(&dot)?)?; // dL/d(capped scores)
    if let Some(c) = cap {
        let th = ((matmul(&q.reshape((b, h_kv, rep * t, d))?, &k.t()?)? * (scale / c))?.tanh()?).to_dtype(DType::F32)?;
        ds = (ds * (th.sqr()?.neg()? + 1.0)?)?;
    }
    let ds = (ds * scale)?.to_dtype(dt)?;
    let dq = matmul(&ds, k)?.reshape((b, h, t, d))?;
    let dk = matmul(&ds.t()?, &q.reshape((b, h_kv, rep * t, d))?)?;
    Ok((dq, dk, dv))
}

/// Causal self-attention on separate heads (LLaMA, after RoPE).
/// q: (B, H, T, D); k, v: (B, H_kv, T, D); mask: (B, 1, T, T) additive f32 -> (B, T, H·D).
pub fn self_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    self_attention_capped(q, k, v, mask, scale, None)
}

/// [`self_attention`] with the scores soft-capped, `c · tanh(s / c)` (Gemma 2), when `cap` is set.
pub fn self_attention_capped(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64, cap: Option<f64>) -> candle_core::Result<Tensor> {
    let (h, h_kv) = (q.dim(1)?, k.dim(1)?);
    if h_kv == 0 || h % h_kv != 0 {
        candle_core::bail!("attention: {h} query heads are not a multiple of {h_kv} kv heads")
    }
    let attn = crate::prof::scope(crate::prof::Cat::Attention);
    let (qd, kd, vd) = (q.detach().contiguous()?, k.detach().contiguous()?, v.detach().contiguous()?);
    let (y, p) = sdpa_fwd(&qd, &kd, &vd, mask, scale, cap)?;
    let y = merge_heads(&y)?;
    drop(attn);
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(y);
    }
    let need = [q.track_op(), k.track_op(), v.track_op()];
    let p = Mutex::new(Some(p));
    super::grad3_op("self_attention", (q, k, v), y, move |q, k, v, g| {
        let _p = crate::prof::scope(crate::prof::Cat::Attention);
        let p = p.lock().unwrap().take().ok_or_else(|| candle_core::Error::Msg("self_attention: backward run twice".into()))?;
        let (b, t, _) = g.dims3()?;
        let (h, d) = (q.dim(1)?, q.dim(3)?);
        let g = g.reshape((b, t, h, d))?.transpose(1, 2)?; // (B, H, T, D)
        let (dq, dk, dv) = sdpa_bwd(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, &p, &g, scale, cap)?;
        Ok((need[0].then_some(dq), need[1].then_some(dk), need[2].then_some(dv)))
    })
}

/// Causal self-attention of GPT-2 on the packed projection.
/// qkv: (B, T, 3C); mask: (B, 1, T, T) additive f32 -> (B, T, C).
pub fn packed_self_attention(qkv: &Tensor, n_head: usize, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (_, _, c3) = qkv.dims3()?;
    if c3 % (3 * n_head) != 0 {
        candle_core::bail!("attention: packed qkv width {c3} is not 3 x n_head ({n_head}) x head_dim")
    }
    // P from the forward, for the backward (freed with the graph).
    let saved: Arc<Mutex<Option<Tensor>>> = Arc::new(Mutex::new(None));
    let saved_b = saved.clone();
    let mask = mask.clone();
    super::input_grad_op(
        "self_attention",
        qkv,
        move |qkv| {
            let _p = crate::prof::scope(crate::prof::Cat::Attention);
            let (q, k, v) = split_heads(qkv, n_head)?;
            let (y, p) = sdpa_fwd(&q, &k, &v, &mask, scale, None)?;
            *saved.lock().unwrap() = Some(p);
            merge_heads(&y) // (B, T, C)
        },
        move |qkv, _y, g| {
            let _p = crate::prof::scope(crate::prof::Cat::Attention);
            let p = saved_b.lock().unwrap().take().ok_or_else(|| candle_core::Error::Msg("self_attention: backward run twice".into()))?;
            let (q, k, v) = split_heads(qkv, n_head)?;
            let (b, h, t, d) = q.dims4()?;
            let g = g.reshape((b, t, h, d))?.transpose(1, 2)?; // (B, H, T, D)
            let (dq, dk, dv) = sdpa_bwd(&q, &k, &v, &p, &g, scale, None)?;
            Tensor::cat(&[merge_heads(&dq)?, merge_heads(&dk)?, merge_heads(&dv)?], D::Minus1) // (B, T, 3C)
        },
    )
}
