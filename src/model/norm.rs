//! The frozen norms of every model file: LayerNorm with bias (GPT-2, GPT-NeoX) and RMSNorm
//! (the LLaMA-like decoder; Gemma's `x̂ · (1 + w)` form is the same op with `1 + w` as its weight).
//! Each is an `ops::Pre`: it runs inside the next linear's fused node (recomputed in the
//! backward, its output never kept) or, applied with `forward`, as a node of its own.
//! Reference: transformers `LlamaRMSNorm`, `Gemma3RMSNorm`, `nn.LayerNorm`.
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::ops;

/// A frozen LayerNorm, weight and bias (C,).
pub struct LayerNorm {
    pub op: ops::Pre,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(dim, "weight").with_context(|| format!("loading {}.weight", vb.prefix()))?;
        let bias = vb.get(dim, "bias").with_context(|| format!("loading {}.bias", vb.prefix()))?;
        Ok(Self { op: ops::layer_norm_pre(&weight, &bias, eps)? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.op.apply("layer_norm", x)?)
    }
}

/// A frozen RMSNorm over the last dimension, weight (dim,).
pub struct RmsNorm {
    pub op: ops::Pre,
}

impl RmsNorm {
    /// `plus_one`: Gemma's norm, which scales by `1 + w` (computed in f32, as transformers does).
    pub fn load(vb: VarBuilder, dim: usize, eps: f64, plus_one: bool) -> Result<Self> {
        let weight = vb.get(dim, "weight").with_context(|| format!("loading {}.weight", vb.prefix()))?;
        let weight = if plus_one { (weight.to_dtype(DType::F32)? + 1.0)? } else { weight };
        Ok(Self { op: ops::rms_norm_pre(&weight, eps)? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.op.apply("rms_norm", x)?)
    }
}
