//! GPT-2 self-attention from the packed `c_attn` output as ONE graph node, with its backward
//! written out.
//!
//! Forward (per batch row and head, s = 1/√D, M the additive mask):
//!   `P = softmax(s Q Kᵀ + M)`, `Y = P V`
//! Backward (G = dL/dY):
//!   `dV = Pᵀ G`, `dP = G Vᵀ`, `dS = s P ⊙ (dP - rowsum(dP ⊙ P))`, `dQ = dS K`, `dK = dSᵀ Q`
//! (the softmax backward of `ops::masked_softmax`, the matmul backwards of torch's SDPA math path).
//!
//! Why: composed from candle ops, attention is a dozen graph nodes (three narrows, their
//! transposes and copies, two matmuls, a scale, the softmax, the merge of heads), and candle's
//! backward allocates a zero tensor and an add per node (`GradStore::or_insert`), the narrows'
//! backward a full (B, T, 3C) zero tensor each. Here it is one node that keeps the packed input
//! and P, and the backward writes dQKV in one concatenation.
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, D};

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
            let dt = qkv.dtype();
            let (q, k, v) = split_heads(qkv, n_head)?;
            let s = (q.matmul(&k.t()?)? * scale)?; // (B, H, T, T)
            let p = candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?.broadcast_add(&mask)?)?.to_dtype(dt)?;
            let y = merge_heads(&p.matmul(&v)?)?; // (B, T, C)
            *saved.lock().unwrap() = Some(p);
            Ok(y)
        },
        move |qkv, _y, g| {
            let dt = qkv.dtype();
            let p = saved_b.lock().unwrap().take().ok_or_else(|| candle_core::Error::Msg("self_attention: backward run twice".into()))?;
            let (q, k, v) = split_heads(qkv, n_head)?;
            let (b, h, t, d) = q.dims4()?;
            let g = g.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
            let dv = p.t()?.matmul(&g)?;
            let dp = g.matmul(&v.t()?)?.to_dtype(DType::F32)?; // (B, H, T, T)
            let p32 = p.to_dtype(DType::F32)?;
            let dot = (&dp * &p32)?.sum_keepdim(D::Minus1)?;
            let ds = ((p32 * dp.broadcast_sub(&dot)?)? * scale)?.to_dtype(dt)?;
            let dq = ds.matmul(&k)?;
            let dk = ds.t()?.matmul(&q)?;
            Tensor::cat(&[merge_heads(&dq)?, merge_heads(&dk)?, merge_heads(&dv)?], D::Minus1) // (B, T, 3C)
        },
    )
}
