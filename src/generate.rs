//! Batched generation with a KV cache: the rollout engine of PPO and the `generate` command.
//!
//! Prompts are LEFT-padded to one length so every row's next token sits in the last column;
//! pad keys are masked out and positions count only real tokens (`pos = cumsum(mask) - 1`),
//! so a padded row computes exactly what it computes alone. The prompt is run once (prefill),
//! then one token per step against the cache.
//! Logit processing follows transformers: repetition penalty, temperature, top-k, top-p.
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::Rng;

use crate::model::{causal_mask, KvCache, Model};
use crate::rng::SeededRng;

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Clone, Debug)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0 = off).
    pub top_p: f64,
    /// transformers' CTRL-style penalty on tokens already in the row (1.0 = off).
    pub repetition_penalty: f64,
    pub seed: u64,
    /// Generation of a row stops after it emits one of these (it is kept in the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0, stop_tokens: vec![] }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be >= 0 (0 = greedy), got {}", self.temperature)
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p)
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!("repetition_penalty must be > 0, got {}", self.repetition_penalty)
        }
        Ok(())
    }
}

/// Sampling defaults from a model's `generation_config.json` (what transformers' `generate`
/// uses when no argument overrides them): `do_sample` false means greedy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    /// Reads `dir/generation_config.json` (absent: all unset).
    pub fn read(dir: &std::path::Path) -> Result<Self> {
        let p = dir.join("generation_config.json");
        let Ok(text) = std::fs::read_to_string(&p) else { return Ok(Self::default()) };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", p.display()))?;
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
        Ok(Self {
            do_sample: v.get("do_sample").and_then(|x| x.as_bool()).unwrap_or(false),
            temperature: f("temperature"),
            top_k: v.get("top_k").and_then(|x| x.as_u64()).map(|x| x as usize),
            top_p: f("top_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: v.get("max_new_tokens").and_then(|x| x.as_u64()).map(|x| x as usize),
        })
    }

    /// The sampling settings: each flag that was given, else this file's value (sampling
    /// settings only when `do_sample`; transformers' top_k default is 50), else lorafit's default.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(&self, temperature: Option<f64>, top_k: Option<usize>, top_p: Option<f64>, repetition_penalty: Option<f64>, max_new_tokens: Option<usize>, seed: u64, stop_tokens: Vec<u32>) -> SamplingConfig {
        let d = SamplingConfig::default();
        let sample = self.do_sample;
        SamplingConfig {
            max_new_tokens: max_new_tokens.or(self.max_new_tokens).unwrap_or(d.max_new_tokens),
            temperature: temperature.unwrap_or(if sample { self.temperature.unwrap_or(1.0) } else { d.temperature }),
            top_k: top_k.unwrap_or(if sample { self.top_k.unwrap_or(50) } else { d.top_k }),
            top_p: top_p.unwrap_or(if sample { self.top_p.unwrap_or(1.0) } else { d.top_p }),
            repetition_penalty: repetition_penalty.or(self.repetition_penalty).unwrap_or(d.repetition_penalty),
            seed,
            stop_tokens,
        }
    }
}

/// Picks the next token of one row from its logits (f32, length V), given the row's tokens so far.
pub fn pick(logits: &mut [f32], seen: &[u32], cfg: &SamplingConfig, rng: &mut SeededRng) -> u32 {
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        let mut done = std::collections::HashSet::new();
        for &t in seen {
            if done.insert(t) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 { *l * p } else { *l / p };
                }
            }
        }
    }
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    let t = cfg.temperature as f32;
    if cfg.top_k == 0 && cfg.top_p >= 1.0 {
        // Plain sampling from softmax(logits / t): no candidate list, no sort of the vocabulary.
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) / t;
        let e: Vec<f32> = logits.iter().map(|&l| (l / t - max).exp()).collect();
        let u = rng.inner().random::<f32>() * e.iter().sum::<f32>();
        let mut acc = 0.0;
        for (i, &p) in e.iter().enumerate() {
            acc += p;
            if u < acc {
                return i as u32;
            }
        }
        return argmax(logits);
    }
    // Candidates sorted by logit, descending, then cut by top-k and top-p.
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let by_logit = |&a: &usize, &b: &usize| logits[b].total_cmp(&logits[a]);
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        idx.select_nth_unstable_by(cfg.top_k - 1, by_logit);
        idx.truncate(cfg.top_k);
    }
    idx.sort_unstable_by(by_logit);
    let max = logits[idx[0]] / t;
    let mut probs: Vec<f32> = idx.iter().map(|&i| (logits[i] / t - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if acc as f64 >= cfg.top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let u: f32 = rng.inner().random::<f32>();
    let mut acc = 0.0;
    for (n, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[n] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// Generates continuations of `prompts` (token ids, each non-empty) in one batch.
/// Returns the new tokens of each row (a stop token, when hit, is the last one).
pub fn generate(model: &Model, prompts: &[Vec<u32>], pad_id: u32, cfg: &SamplingConfig) -> Result<Vec<Vec<u32>>> {
    generate_streaming(model, prompts, pad_id, cfg, &mut |_, _| Ok(()))
}

/// For one picked token: `log softmax(logits / t)[token]` and the entropy of `softmax(logits / t)`
/// over the whole vocabulary (t = 1 for greedy decoding), in one pass.
fn logprob_entropy(logits: &[f32], token: u32, temperature: f64) -> (f32, f32) {
    let t = if temperature > 0.0 { temperature as f32 } else { 1.0 };
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) / t;
    // z = Σ e^(l/t - max), s = Σ e^(l/t - max) (l/t - max): H = ln z - s / z.
    let (z, s) = logits.iter().fold((0f64, 0f64), |(z, s), &l| {
        let d = l / t - max;
        let e = d.exp() as f64;
        (z + e, s + e * d as f64)
    });
    let lnz = z.ln();
    ((logits[token as usize] / t - max) - lnz as f32, (lnz - s / z) as f32)
}

/// What [`generate_with_logprobs`] returns: per row, the new tokens and, per new token, its
/// log-prob and the entropy of the distribution it was drawn from.
pub struct Samples {
    pub tokens: Vec<Vec<u32>>,
    pub logp: Vec<Vec<f32>>,
    pub entropy: Vec<Vec<f32>>,
}

/// [`generate`], also returning the log-prob of each new token under the distribution it was
/// sampled from, `log softmax(logits / temperature)` before top-k / top-p, and that
/// distribution's entropy (PPO's old log-probs: the sampler's own logits, so no second forward
/// of the policy is needed).
pub fn generate_with_logprobs(model: &Model, prompts: &[Vec<u32>], pad_id: u32, cfg: &SamplingConfig) -> Result<Samples> {
    let mut stats = (vec![vec![]; prompts.len()], vec![vec![]; prompts.len()]);
    let tokens = decode(model, prompts, pad_id, cfg, &mut |_, _| Ok(()), Some(&mut stats))?;
    Ok(Samples { tokens, logp: stats.0, entropy: stats.1 })
}

/// [`generate`], calling `on_token(row, token)` as each token is picked (for streaming output).
pub fn generate_streaming(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    decode(model, prompts, pad_id, cfg, on_token, None)
}

fn decode(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    cfg: &SamplingConfig,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    mut stats: Option<&mut (Vec<Vec<f32>>, Vec<Vec<f32>>)>,
) -> Result<Vec<Vec<u32>>> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {} is empty: generation needs at least one token", i + 1)
    }
    let b = prompts.len();
    let len = prompts.iter().map(Vec::len).max().unwrap();
    let ctx = model.arch.max_positions();
    if len + cfg.max_new_tokens > ctx {
        bail!(
            "prompt of {len} tokens + {} new tokens exceeds the model's context of {ctx} tokens",
            cfg.max_new_tokens
        )
    }
    let dev = &model.device;
    let _no_grad = model.adapters.no_grad();
    let mut rng = SeededRng::new(cfg.seed);

    // 1. Left-pad: row b = [pad]*(len - n_b) ++ prompt_b; positions count real tokens only.
    let mut ids: Vec<u32> = Vec::with_capacity(b * len);
    let mut pos: Vec<u32> = Vec::with_capacity(b * len);
    let mut valid: Vec<Vec<bool>> = Vec::with_capacity(b);
    for p in prompts {
        let pad = len - p.len();
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(p.iter().copied()));
        pos.extend(std::iter::repeat_n(0u32, pad).chain(0..p.len() as u32));
        valid.push(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())).collect());
    }
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut seen: Vec<Vec<u32>> = prompts.to_vec();
    let longrope = model.arch.longrope_original();

    // 2. Prefill: one pass over the prompts fills the cache; logits at the last column.
    let mut cache = KvCache::new(model.num_layers());
    let x = Tensor::from_vec(ids.clone(), (b, len), dev)?;
    let p = Tensor::from_vec(pos.clone(), (b, len), dev)?;
    let mask = causal_mask(&valid, len, 0, dev)?;
    let h = model.hidden(&x, &p, &mask, Some(&mut cache))?.narrow(1, len - 1, 1)?.contiguous()?; // (B, 1, C)
    let mut logits = model.lm_head(&h)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?; // (B, V)

    // 3. Decode: pick, append, feed back one token per row.
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        let mut next = vec![pad_id; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let t = pick(&mut logits[r], &seen[r], cfg, &mut rng);
            if let Some((lp, ent)) = stats.as_deref_mut() {
                let (l, h) = logprob_entropy(&logits[r], t, cfg.temperature);
                lp[r].push(l);
                ent[r].push(h);
            }
            next[r] = t;
            out[r].push(t);
            on_token(r, t)?;
            seen[r].push(t);
            if cfg.stop_tokens.contains(&t) {
                done[r] = true;
            }
        }
        if step + 1 == cfg.max_new_tokens || done.iter().all(|&d| d) {
            break;
        }
        let past = cache.len();
        // Rows that are done keep being fed (their outputs are dropped): one batch shape throughout.
        valid.iter_mut().for_each(|v| v.push(true));
        if longrope.is_some() {
            (ids, pos) = (append_column(&ids, &next, b), append_column(&pos, &next_pos, b));
        }
        let total = valid[0].len();
        if longrope.is_some_and(|orig| total > orig && past <= orig) {
            // Phi-3 longrope crossing its original context: the cached keys carry the short
            // factors; re-read the whole sequence (pass max position >= orig: long factors).
            cache = KvCache::new(model.num_layers());
            next_pos.iter_mut().for_each(|p| *p += 1);
            let x = Tensor::from_vec(ids.clone(), (b, total), dev)?;
            let p = Tensor::from_vec(pos.clone(), (b, total), dev)?;
            let mask = causal_mask(&valid, total, 0, dev)?;
            let h = model.hidden(&x, &p, &mask, Some(&mut cache))?.narrow(1, total - 1, 1)?.contiguous()?; // (B, 1, C)
            logits = model.lm_head(&h)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            continue;
        }
        let x = Tensor::from_vec(next, (b, 1), dev)?;
        let p = Tensor::from_vec(next_pos.clone(), (b, 1), dev)?;
        next_pos.iter_mut().for_each(|p| *p += 1);
        let mask = causal_mask(&valid, 1, past, dev)?;
        let h = model.hidden(&x, &p, &mask, Some(&mut cache))?; // (B, 1, C)
        logits = model.lm_head(&h)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    }
    Ok(out)
}

/// A (B, T) row-major matrix with one more column: (B, T + 1).
fn append_column(m: &[u32], col: &[u32], b: usize) -> Vec<u32> {
    let t = m.len() / b;
    m.chunks(t).zip(col).flat_map(|(row, &c)| row.iter().copied().chain(std::iter::once(c))).collect()
}
