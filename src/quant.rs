//! A 4-bit frozen base (QLoRA's NF4): linear weights quantized at load, LoRA trained on top.
//!
//! NF4 (Dettmers et al. 2023): each block of 64 consecutive weights stores its absmax `s`
//! (f32) and, per weight, the index of the nearest of 16 "normal float" levels `q_k` (the
//! quantiles of N(0, 1) scaled to [-1, 1]); `w ≈ s · q_code`. 4.5 bits per weight (the f32
//! scale adds 0.5; QLoRA's double quantization of the scales is not done here).
//! Why NF4 and not candle's k-quants: NF4 is what QLoRA/PEFT users know and compare with, its
//! levels fit normally distributed weights, and candle's `QMatMul` has no backward (so no
//! input gradient) and quantizes activations too. Here the codes are unpacked and dequantized
//! with ordinary tensor ops (any device), one layer at a time, inside an op whose backward is
//! `dx = g · dequant(W)ᵀ`: no weight gradient, no dequantized copy kept between passes.
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// The 16 NF4 levels (bitsandbytes' table).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

pub const BLOCK: usize = 64;

/// A weight quantized to NF4.
#[derive(Clone)]
pub struct Nf4 {
    /// Two codes per byte (low nibble first), (ceil(N/2),) u8.
    pub packed: Tensor,
    /// Per-block absmax, (N/64,) f32.
    pub scales: Tensor,
    /// The original shape and dtype.
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Index of the level nearest to `x` in [-1, 1]: the number of midpoints between adjacent
/// levels that lie below `x` (a binary search over the 15 midpoints).
fn nearest_level(x: f32) -> u8 {
    let mids: [f32; 15] = std::array::from_fn(|i| 0.5 * (NF4_LEVELS[i] + NF4_LEVELS[i + 1]));
    mids.partition_point(|&m| m < x) as u8
}

impl Nf4 {
    /// Quantizes `w` (any shape) block by block.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let shape = w.dims().to_vec();
        let mut v: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let n = v.len();
        if v.iter().any(|x| !x.is_finite()) {
            bail!("cannot quantize a weight with non-finite values")
        }
        v.resize(n.div_ceil(BLOCK) * BLOCK, 0.0);
        // Blocks are independent: quantize them on all cores (a 7B base has 100M blocks).
        use rayon::prelude::*;
        let (scales, packed): (Vec<f32>, Vec<Vec<u8>>) = v
            .par_chunks(BLOCK)
            .map(|block| {
                let s = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                let packed = block.chunks(2).map(|c| nearest_level(c[0] * inv) | (nearest_level(c[1] * inv) << 4)).collect();
                (s, packed)
            })
            .unzip();
        let packed: Vec<u8> = packed.concat();
        let dev = w.device();
        Ok(Self {
            packed: Tensor::from_vec(packed.clone(), packed.len(), dev)?,
            scales: Tensor::from_vec(scales.clone(), scales.len(), dev)?,
            shape,
            dtype: w.dtype(),
        })
    }

    /// The weight back in `dtype`, built with tensor ops on the weight's device.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let dev = self.packed.device();
        let p = self.packed.to_dtype(DType::F32)?;
        let hi = (&p / 16.0)?.floor()?;
        let lo = (&p - (&hi * 16.0)?)?;
        let codes = Tensor::stack(&[&lo, &hi], 1)?.flatten_all()?.to_dtype(DType::U32)?; // (2 * bytes,)
        let table = Tensor::new(&NF4_LEVELS, dev)?;
        let nb = self.scales.dim(0)?;
        let vals = table.index_select(&codes.narrow(0, 0, nb * BLOCK)?, 0)?.reshape((nb, BLOCK))?;
        let w = vals.broadcast_mul(&self.scales.unsqueeze(1)?)?.flatten_all()?;
        let n: usize = self.shape.iter().product();
        w.narrow(0, 0, n)?.reshape(self.shape.as_slice())?.to_dtype(dtype)
    }

    /// The weight as (in, out) for `ops::linear`, dequantized per use (never kept).
    /// `transpose`: the stored weight is (out, in) (nn.Linear) rather than (in, out) (Conv1D).
    pub fn frozen_weight(&self, transpose: bool) -> crate::ops::linear::FrozenWeight {
        let q = self.clone();
        std::sync::Arc::new(move |dt| {
            let d = q.dequantize(dt)?;
            if transpose { d.t() } else { Ok(d) }
        })
    }

    /// Bytes held (codes + scales).
    pub fn nbytes(&self) -> usize {
        self.packed.elem_count() + 4 * self.scales.elem_count()
    }
}

/// `y = x @ W_in_out + b` with W stored as NF4 in the checkpoint's layout; the weight is
/// dequantized for the product and again in backward, which gives the input gradient only.
/// `transpose`: the stored weight is (out, in) (nn.Linear) rather than (in, out) (Conv1D).
pub fn nf4_linear(x: &Tensor, w: &Nf4, transpose: bool, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    crate::ops::linear::lora_linear(x, None, w.frozen_weight(transpose), bias.cloned(), vec![], None)
}

/// Which base quantization a model is built with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BaseQuant {
    None,
    Nf4,
}

impl BaseQuant {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "" | "none" => Self::None,
            "nf4" => Self::Nf4,
            other => bail!("quantize = {other:?}: expected none or nf4"),
        })
    }
}

/// For tests and reports: max |w - dequant(quant(w))| relative to max |w|.
pub fn roundtrip_error(w: &Tensor) -> Result<f32> {
    let q = Nf4::quantize(w)?;
    let d = q.dequantize(DType::F32)?;
    let err = (w.to_dtype(DType::F32)? - d)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let m = w.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(err / m.max(1e-12))
}

