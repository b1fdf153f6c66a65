//! Seeded randomness. candle's CPU `rand`/`randn` cannot be seeded (`Device::set_seed` errors
//! on CPU), so every random tensor in lorafit (LoRA init, dropout masks, sampling, the builtin
//! model) comes from a ChaCha8 stream here and is uploaded with `Tensor::from_vec`.
use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded, reproducible random stream.
#[derive(Clone)]
pub struct SeededRng(ChaCha8Rng);

/// A stream's exact position, for checkpoints (hex seed, stream, word position).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub seed: String,
    pub stream: u64,
    pub word_pos: String,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A new stream derived from this seed and a label, so that adding a tensor somewhere does
    /// not shift every later random number.
    pub fn derive(seed: u64, label: &str) -> Self {
        // FNV-1a of the label, mixed into the seed.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in label.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        Self::new(seed ^ h.rotate_left(17))
    }

    pub fn uniform_f32(&mut self) -> f32 {
        self.0.random::<f32>()
    }

    /// Standard normal sample (Box-Muller).
    pub fn normal_f32(&mut self) -> f32 {
        let u1 = self.0.random::<f64>().max(1e-300);
        let u2 = self.0.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// (shape) tensor of U(lo, hi), f32.
    pub fn uniform(&mut self, shape: &[usize], lo: f32, hi: f32, dev: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| lo + (hi - lo) * self.uniform_f32()).collect();
        Tensor::from_vec(v, shape, dev)
    }

    /// (shape) tensor of N(0, std²), f32.
    pub fn normal(&mut self, shape: &[usize], std: f32, dev: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| std * self.normal_f32()).collect();
        Tensor::from_vec(v, shape, dev)
    }

    /// A dropout keep mask: u8, 1 = keep (probability 1 - p), 0 = drop; one uniform draw per
    /// value. A byte per value, since the mask is held until the backward (`ops/linear.rs`).
    pub fn dropout_keep(&mut self, shape: &[usize], p: f32, dev: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<u8> = (0..n).map(|_| u8::from(self.uniform_f32() >= p)).collect();
        Tensor::from_vec(v, shape, dev)
    }

    /// Where the stream is, to be restored with [`SeededRng::from_state`].
    pub fn state(&self) -> RngState {
        let seed = self.0.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        RngState { seed, stream: self.0.get_stream(), word_pos: self.0.get_word_pos().to_string() }
    }

    pub fn from_state(s: &RngState) -> anyhow::Result<Self> {
        anyhow::ensure!(s.seed.len() == 64, "rng state: seed must be 64 hex digits");
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s.seed[2 * i..2 * i + 2], 16)?;
        }
        let mut r = ChaCha8Rng::from_seed(seed);
        r.set_stream(s.stream);
        r.set_word_pos(s.word_pos.parse()?);
        Ok(Self(r))
    }

    /// The underlying generator, for sampling code.
    pub fn inner(&mut self) -> &mut ChaCha8Rng {
        &mut self.0
    }
}
