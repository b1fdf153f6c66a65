//! GGML tensor types, the `--quant` choices (llama.cpp's file types), which type each tensor gets
//! (llama.cpp's mix), and quantization of f32 rows into GGML blocks.
//!
//! Types per tensor follow what llama.cpp itself produces from the same model:
//! - f32 / f16 / bf16 / q8_0: `convert_hf_to_gguf.py --outtype X` (`ModelBase.prepare_tensors`):
//!   1-D tensors, norms and position embeddings stay f32; a q8_0 tensor whose rows are not a
//!   multiple of 32 falls back to f16.
//! - q4_0 / q4_k_m / q5_k_m / q6_k: that f16 file through `llama-quantize`
//!   (`src/llama-quant.cpp`: `tensor_allows_quantization`, `llama_tensor_get_type_impl`,
//!   `tensor_type_fallback`): `output` (and a tied `token_embd`) in q6_k, `attn_v` / `attn_qkv`
//!   and `ffn_down` of the layers `use_more_bits` picks in q6_k for the `_m` mixes, and a tensor
//!   whose row length is not a multiple of the block falls back (q4_k -> q5_0, q5_k -> q5_1,
//!   q6_k -> q8_0, then f16).
//!
//! The blocks themselves are made in [`super::blocks`] (re-exported here: [`quantize`],
//! [`dequantize`]).
use anyhow::{bail, ensure, Result};

pub use super::blocks::{dequantize, quantize};

/// A GGML tensor type, by its id in ggml.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// (id, name, block size, bytes per block) of ggml's types.
const TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20), (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 36), (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98), (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110), (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1), (25, "I16", 1, 2), (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56), (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66), (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q5_0: Self = Self(6);
    pub const Q5_1: Self = Self(7);
    pub const Q8_0: Self = Self(8);
    pub const Q4_K: Self = Self(12);
    pub const Q5_K: Self = Self(13);
    pub const Q6_K: Self = Self(14);
    pub const BF16: Self = Self(30);

    pub fn from_id(id: u32) -> Result<Self> {
        ensure!(TYPES.iter().any(|t| t.0 == id), "unknown GGML type {id}");
        Ok(Self(id))
    }

    fn row(self) -> (u32, &'static str, usize, usize) {
        *TYPES.iter().find(|t| t.0 == self.0).expect("GgmlType holds a known id")
    }

    pub fn id(self) -> u32 {
        self.0
    }

    /// ggml's name: `Q4_K`, `F16`, ...
    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// Values per block (1 for plain floats).
    pub fn block(self) -> usize {
        self.row().2
    }

    /// Bytes of `n` values (`n` a multiple of the block).
    pub fn bytes(self, n: usize) -> usize {
        n / self.block() * self.row().3
    }

    pub fn is_quantized(self) -> bool {
        self.block() > 1
    }
}

/// llama-quantize's other file types (known to llama.cpp, not written by lorafit).
const LLAMA_CPP_ONLY: &[&str] = &[
    "q4_1", "q5_0", "q5_1", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q5_k_s", "iq2_xxs", "iq2_xs", "iq2_s",
    "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq1_s", "iq1_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "mxfp4_moe",
];

/// `--quant`: a llama.cpp file type (`general.file_type`, `llama_ftype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4KM,
    Q5KM,
    Q6K,
}

impl Quant {
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k";

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Quant::F32,
            "f16" => Quant::F16,
            "bf16" => Quant::Bf16,
            "q8_0" => Quant::Q8_0,
            "q4_0" => Quant::Q4_0,
            "q4_k_m" => Quant::Q4KM,
            "q5_k_m" => Quant::Q5KM,
            "q6_k" => Quant::Q6K,
            other if LLAMA_CPP_ONLY.contains(&other) => bail!(
                "--quant {other}: a llama.cpp type lorafit does not write; choose one of {} (or export f16 and run llama-quantize)",
                Self::NAMES
            ),
            other => bail!("--quant {other}: llama.cpp has no such type; choose one of {}", Self::NAMES),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Bf16 => "bf16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
            Quant::Q4KM => "q4_k_m",
            Quant::Q5KM => "q5_k_m",
            Quant::Q6K => "q6_k",
        }
    }

    /// `general.file_type` (llama.h `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
            Quant::Q5KM => 17,
            Quant::Q6K => 18,
            Quant::Bf16 => 32,
        }
    }

    /// The type most tensors get.
    pub fn default_type(self) -> GgmlType {
        match self {
            Quant::F32 => GgmlType::F32,
            Quant::F16 => GgmlType::F16,
            Quant::Bf16 => GgmlType::BF16,
            Quant::Q8_0 => GgmlType::Q8_0,
            Quant::Q4_0 => GgmlType::Q4_0,
            Quant::Q4KM => GgmlType::Q4_K,
            Quant::Q5KM => GgmlType::Q5_K,
            Quant::Q6K => GgmlType::Q6_K,
        }
    }

    /// Written by llama.cpp's converter itself (else: its f16 output through llama-quantize).
    fn by_converter(self) -> bool {
        matches!(self, Quant::F32 | Quant::F16 | Quant::Bf16 | Quant::Q8_0)
    }
}

/// A tensor type that differs from what was asked, and why (printed as a note).
#[derive(Clone, Debug, PartialEq)]
pub struct Fallback {
    pub tensor: String,
    pub wanted: GgmlType,
    pub got: GgmlType,
    pub row: usize,
}

/// The type of every tensor of one export, in the order the tensors are written: llama.cpp's
/// choice for the same model and file type (see the module docs).
pub struct Mix {
    quant: Quant,
    /// The model has no separate `output.weight` (the head is `token_embd`).
    tied: bool,
    n_layer: usize,
    n_attn_v: usize,
    i_attn_v: usize,
    i_ffn_down: usize,
    pub fallbacks: Vec<Fallback>,
}

/// llama-quantize's `use_more_bits`: the first and last eighth of the layers and every third between.
fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

impl Mix {
    /// `names`: every tensor name of the file (for llama-quantize's counts).
    pub fn new(quant: Quant, names: &[&str], n_layer: usize) -> Self {
        let tied = !names.contains(&"output.weight");
        let n_attn_v = names.iter().filter(|n| n.contains("attn_v.weight") || n.contains("attn_qkv.weight")).count();
        Self { quant, tied, n_layer, n_attn_v, i_attn_v: 0, i_ffn_down: 0, fallbacks: vec![] }
    }

    /// The type of tensor `name` of `shape` (PyTorch order: the row length is the last dim).
    /// Call in the file's tensor order (counters as llama-quantize's).
    pub fn type_of(&mut self, name: &str, shape: &[usize]) -> GgmlType {
        let row = *shape.last().unwrap_or(&1);
        // The converter: 1-D tensors, norms, biases and position embeddings in f32.
        let forced_f32 = shape.len() <= 1 || name.ends_with("_norm.weight") || name == "position_embd.weight" || !name.ends_with(".weight");
        if forced_f32 {
            return GgmlType::F32;
        }
        if self.quant.by_converter() {
            let t = self.quant.default_type();
            if t.is_quantized() && row % t.block() != 0 {
                self.fallbacks.push(Fallback { tensor: name.into(), wanted: t, got: GgmlType::F16, row });
                return GgmlType::F16;
            }
            return t;
        }
        // llama-quantize on the converter's f16 file.
        if name == "position_embd.weight" || name == "token_types.weight" {
            return GgmlType::F16;
        }
        let default = self.quant.default_type();
        let mut t = default;
        let is_attn_v = name.contains("attn_v.weight") || name.contains("attn_qkv.weight");
        if name == "output.weight" || (self.tied && name == "token_embd.weight") {
            if row % default.block() != 0 {
                t = GgmlType::Q8_0;
            } else if t != GgmlType::Q8_0 {
                t = GgmlType::Q6_K;
            }
        } else if name == "token_embd.weight" {
            // the default type
        } else if is_attn_v {
            if matches!(self.quant, Quant::Q4KM | Quant::Q5KM) && use_more_bits(self.i_attn_v, self.n_attn_v) {
                t = GgmlType::Q6_K;
            }
            self.i_attn_v += 1;
        } else if name.contains("ffn_down") {
            if matches!(self.quant, Quant::Q4KM | Quant::Q5KM) && use_more_bits(self.i_ffn_down, self.n_layer) {
                t = GgmlType::Q6_K;
            }
            self.i_ffn_down += 1;
        }
        // tensor_type_fallback: rows not a multiple of the block.
        if row % t.block() != 0 {
            let wanted = t;
            t = match t {
                GgmlType::Q4_K => GgmlType::Q5_0,
                GgmlType::Q5_K => GgmlType::Q5_1,
                GgmlType::Q6_K => GgmlType::Q8_0,
                other => other,
            };
            if row % t.block() != 0 {
                t = GgmlType::F16;
            }
            self.fallbacks.push(Fallback { tensor: name.into(), wanted, got: t, row });
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_follows_llama_quantize() {
        // 8 layers, hidden 512: attn_v / ffn_down of layers 0, 3, 6, 7 in q6_k (use_more_bits: i < n/8,
        // i >= 7n/8, or (i - n/8) % 3 == 2).
        let mut names = vec!["output.weight".to_string(), "token_embd.weight".into()];
        for i in 0..8 {
            names.push(format!("blk.{i}.attn_v.weight"));
            names.push(format!("blk.{i}.ffn_down.weight"));
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut mix = Mix::new(Quant::Q4KM, &refs, 8);
        let types: Vec<&str> = names.iter().map(|n| mix.type_of(n, &[512, 512]).name()).collect();
        assert_eq!(types[..2], ["Q6_K", "Q4_K"]);
        let v: Vec<usize> = (0..8).filter(|i| types[2 + 2 * i] == "Q6_K").collect();
        assert_eq!(v, [0, 3, 6, 7]);
        // Rows of 96: q4_k -> q5_0, q6_k -> q8_0; rows of 88: f16.
        let mut mix = Mix::new(Quant::Q4KM, &["blk.0.attn_q.weight", "blk.0.ffn_down.weight"], 1);
        assert_eq!(mix.type_of("blk.0.attn_q.weight", &[96, 96]), GgmlType::Q5_0);
        assert_eq!(mix.type_of("blk.0.ffn_down.weight", &[96, 88]), GgmlType::F16);
        assert_eq!(mix.fallbacks.len(), 2);
        // Tied embeddings take the output's type; norms stay f32.
        let mut mix = Mix::new(Quant::Q4_0, &["token_embd.weight"], 1);
        assert_eq!(mix.type_of("token_embd.weight", &[100, 256]), GgmlType::Q6_K);
        assert_eq!(mix.type_of("blk.0.attn_norm.weight", &[256]), GgmlType::F32);
    }
}
