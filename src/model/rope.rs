//! Rotary position embeddings of every family: the inverse frequencies of each `rope_type`
//! transformers implements, the attention scaling some of them apply to cos/sin, and partial
//! rotation (only the first `dim` of each head's `head_dim` values rotate).
//!
//! | rope_type | inverse frequency `f_i`, i < dim/2 (`b_i = θ^(-2i/dim)`)                                  |
//! |-----------|---------------------------------------------------------------------------------------------|
//! | default   | `b_i`                                                                                       |
//! | linear    | `b_i / factor`                                                                              |
//! | dynamic   | `b_i` (NTK rescaling starts past `max_position_embeddings`, which lorafit never reaches)    |
//! | llama3    | `b_i` for short wavelengths, `b_i / factor` for long ones, smoothed in between             |
//! | yarn      | a ramp between `b_i` and `b_i / factor` over the correction range; cos/sin × attention_factor |
//! | longrope  | `b_i / short_factor_i` (or `long_factor_i` once a pass reaches the original context); × attention_factor |
//!
//! cos/sin are computed for the positions a pass uses, never tabled per position, so a
//! `max_position_embeddings` of 10⁹ costs nothing. Everything is f32, as transformers computes it.
//! Reference: transformers `modeling_rope_utils.py` (`ROPE_INIT_FUNCTIONS`, `standardize_rope_params`).
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{Map, Value};

/// The rope of one kind of layer.
#[derive(Clone, Debug)]
pub struct Rope {
    /// `rope_type`, after transformers' renames (phi3's "su"/"yarn" are "longrope").
    pub kind: String,
    pub theta: f64,
    /// Rotated values per head: `head_dim × partial_rotary_factor` (even).
    pub dim: usize,
    /// (dim/2,) f32.
    inv_freq: Vec<f32>,
    /// longrope: the long-context frequencies and the original context they start past.
    long: Option<(Vec<f32>, usize)>,
    /// Multiplies cos and sin (yarn, longrope; 1 otherwise).
    pub attention_scaling: f32,
}

/// The keys a rope dict may hold; any other key changes the math in a way lorafit does not know.
const KNOWN: [&str; 16] = [
    "rope_type", "type", "rope_theta", "factor", "partial_rotary_factor", "original_max_position_embeddings",
    "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "truncate", "short_factor", "long_factor",
];

/// What a rope dict needs from the rest of config.json.
pub struct RopeInputs<'a> {
    /// Where the dict came from, for messages (`rope_parameters`, `rope_scaling`, `rope_parameters.full_attention`).
    pub key: &'a str,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// `rope_theta` when the dict has none (top-level `rope_theta`, or the family's default).
    pub theta: f64,
    /// Top-level `partial_rotary_factor` (or GPT-NeoX's `rotary_pct`), if any.
    pub partial_rotary_factor: Option<f64>,
    /// Top-level `original_max_position_embeddings` (phi3 writes it there): it wins over the dict's.
    pub original_max_position_embeddings: Option<usize>,
}

fn num(d: &Map<String, Value>, key: &str, k: &str) -> Result<Option<f64>> {
    match d.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).with_context(|| format!("{key}.{k} = {v} is not a number")),
    }
}

fn req(d: &Map<String, Value>, key: &str, k: &str, kind: &str) -> Result<f64> {
    num(d, key, k)?.with_context(|| format!("{key}.{k} is missing (rope_type {kind:?} needs it)"))
}

fn factors(d: &Map<String, Value>, key: &str, k: &str, n: usize) -> Result<Vec<f32>> {
    let v = d.get(k).and_then(Value::as_array).with_context(|| format!("{key}.{k} is missing (longrope needs a list of {n} numbers)"))?;
    let f: Vec<f32> = v.iter().filter_map(|x| x.as_f64().map(|x| x as f32)).collect();
    if f.len() != n || f.len() != v.len() {
        bail!("{key}.{k} has {} entries, the rotary dimension needs {n} numbers", v.len())
    }
    Ok(f)
}

impl Rope {
    /// Parses one rope dict (`rope_parameters`, `rope_scaling`, or a per-layer-type entry).
    pub fn from_dict(d: &Map<String, Value>, inp: &RopeInputs) -> Result<Self> {
        let key = inp.key;
        if let Some(k) = d.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            bail!("{key}.{k} is not a rope setting lorafit knows (it may change the math); known: {}", KNOWN.join(", "))
        }
        let kind = d.get("rope_type").or_else(|| d.get("type")).and_then(Value::as_str).unwrap_or("default");
        let kind = match kind {
            "su" | "longrope" => "longrope",
            k => k,
        };
        let theta = num(d, key, "rope_theta")?.unwrap_or(inp.theta);
        let prf = num(d, key, "partial_rotary_factor")?.or(inp.partial_rotary_factor).unwrap_or(1.0);
        let dim = (inp.head_dim as f64 * prf) as usize;
        if !(prf > 0.0 && prf <= 1.0) || dim == 0 || dim % 2 != 0 {
            bail!("{key}.partial_rotary_factor = {prf} gives {dim} rotary dimensions of head_dim {}: it must be even and > 0", inp.head_dim)
        }
        if !(theta > 0.0 && theta.is_finite()) {
            bail!("{key}.rope_theta = {theta} must be a positive number")
        }
        let orig = || -> Result<usize> {
            Ok(match inp.original_max_position_embeddings {
                Some(o) => o,
                None => num(d, key, "original_max_position_embeddings")?.map(|o| o as usize).unwrap_or(inp.max_position_embeddings),
            })
        };
        // b_i = 1 / θ^(2i/dim), in f32 as torch computes it.
        let half = dim / 2;
        let base: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32)).collect();
        let (mut inv_freq, mut long, mut attention_scaling) = (base.clone(), None, 1.0f32);
        match kind {
            "default" | "dynamic" => {}
            "linear" => {
                let factor = req(d, key, "factor", kind)? as f32;
                inv_freq.iter_mut().for_each(|f| *f /= factor);
            }
            "llama3" => {
                let factor = req(d, key, "factor", kind)? as f32;
                let low = req(d, key, "low_freq_factor", kind)? as f32;
                let high = req(d, key, "high_freq_factor", kind)? as f32;
                let old = orig()? as f32;
                let (low_wl, high_wl) = (old / low, old / high);
                for f in inv_freq.iter_mut() {
                    let wl = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wl > low_wl { *f / factor } else { *f };
                    *f = if wl < high_wl || wl > low_wl {
                        scaled
                    } else {
                        let s = (old / wl - low) / (high - low);
                        (1.0 - s) * scaled / factor + s * scaled
                    };
                }
            }
            "yarn" => {
                let factor = match num(d, key, "factor")? {
                    Some(f) => f,
                    None => inp.max_position_embeddings as f64 / orig()? as f64,
                };
                let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                attention_scaling = match (num(d, key, "attention_factor")?, num(d, key, "mscale")?, num(d, key, "mscale_all_dim")?) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => mscale(factor, m) / mscale(factor, ma),
                    _ => mscale(factor, 1.0),
                } as f32;
                let beta_fast = num(d, key, "beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0);
                let beta_slow = num(d, key, "beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0);
                let truncate = d.get("truncate").and_then(Value::as_bool).unwrap_or(true);
                let o = orig()? as f64;
                let corr = |rot: f64| dim as f64 * (o / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
                let (mut lo, mut hi) = (corr(beta_fast), corr(beta_slow));
                if truncate {
                    (lo, hi) = (lo.floor(), hi.ceil());
                }
                let (lo, mut hi) = (lo.max(0.0) as f32, hi.min(dim as f64 - 1.0) as f32);
                if lo == hi {
                    hi += 0.001;
                }
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let pos_freq = (theta as f32).powf((2 * i) as f32 / dim as f32);
                    let (extra, inter) = (1.0 / pos_freq, 1.0 / (factor as f32 * pos_freq));
                    let ramp = ((i as f32 - lo) / (hi - lo)).clamp(0.0, 1.0);
                    let e = 1.0 - ramp;
                    *f = inter * (1.0 - e) + extra * e;
                }
            }
            "longrope" => {
                let o = orig()?;
                let factor = num(d, key, "factor")?.unwrap_or(inp.max_position_embeddings as f64 / o as f64);
                attention_scaling = match num(d, key, "attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (o as f64).ln()).sqrt(),
                } as f32;
                let with = |ext: &[f32]| -> Vec<f32> {
                    (0..half).map(|i| 1.0 / (ext[i] * (theta as f32).powf((2 * i) as f32 / dim as f32))).collect()
                };
                inv_freq = with(&factors(d, key, "short_factor", half)?);
                long = Some((with(&factors(d, key, "long_factor", half)?), o));
            }
            other => bail!(
                "{key}.rope_type = {other:?} is not supported (lorafit knows default, linear, dynamic, llama3, yarn, longrope)"
            ),
        }
        Ok(Self { kind: kind.to_string(), theta, dim, inv_freq, long, attention_scaling })
    }

    /// cos, sin at `pos`: (B, T) u32 -> (B, T, dim/2) each, in `dtype` (computed in f32).
    pub fn at(&self, pos: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let dev = pos.device();
        // longrope: one set of frequencies per pass, the long one once the pass reaches past the
        // original context (transformers' `longrope_frequency_update`).
        let inv = match &self.long {
            Some((long, orig)) => {
                let max = pos.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
                if max + 1 > *orig { long } else { &self.inv_freq }
            }
            None => &self.inv_freq,
        };
        let inv = Tensor::new(inv.as_slice(), dev)?.reshape((1, 1, inv.len()))?;
        let freqs = pos.to_dtype(DType::F32)?.unsqueeze(2)?.broadcast_mul(&inv)?; // (B, T, dim/2)
        let (mut cos, mut sin) = (freqs.cos()?, freqs.sin()?);
        if self.attention_scaling != 1.0 {
            (cos, sin) = ((cos * self.attention_scaling as f64)?, (sin * self.attention_scaling as f64)?);
        }
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }

    /// longrope: the original context, past which a pass uses the long frequencies.
    pub fn long_context_start(&self) -> Option<usize> {
        self.long.as_ref().map(|(_, orig)| *orig)
    }

    /// The inverse frequencies (for tests and `inspect`).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }
}

/// The rope dict of a config in either spelling, as transformers standardises it: `rope_scaling`
/// (transformers 4, with a top-level `rope_theta`) wins over `rope_parameters` (transformers 5);
/// absent both, the default rope. Returns the dict and the key it came from.
pub fn rope_dict(v: &Value) -> Result<(Map<String, Value>, &'static str)> {
    for key in ["rope_scaling", "rope_parameters"] {
        match v.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if !m.is_empty() => return Ok((m.clone(), key)),
            Some(Value::Object(_)) => {}
            Some(other) => bail!("{key} = {other} must be an object"),
        }
    }
    Ok((Map::new(), "rope_parameters"))
}
