//! `lorafit bench sft|rm|gemm`: the speed and memory of SFT and reward-model steps on random
//! tokens, and the CPU GEMM throughput, for docs/BENCHMARKS.md (compared there with PyTorch +
//! PEFT doing the same work, scripts/bench/peft_{sft,rm}.py).
//! An SFT step is forward, backward and the AdamW update of one batch (B x T, every token but
//! the first learned); an RM step is the same for `pairs` chosen + `pairs` rejected sequences in
//! one batch, rewards at the last token, pairwise loss. The first step is a warm-up, the median
//! of the others is reported. LoRA: alpha = 2r, dropout 0.05 (the training defaults).
use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

use super::optim::AdamW;
use super::sft::{label_nll_sum, make_batch, SftExample};
use super::{forward_backward, GradAccum};
use crate::reward::{pad_batch, RewardHead, SCORE_KEY};
use crate::lora::{Adapter, AdapterSet, LoraConfig, TargetModules};
use crate::model::Model;
use crate::rng::SeededRng;
use crate::runtime::{parse_device, parse_dtype, peak_rss_bytes};
use crate::weights::ModelFiles;

#[derive(Debug, Serialize)]
pub struct SftBench {
    pub tool: &'static str,
    pub model: String,
    pub batch: usize,
    pub seq: usize,
    pub targets: Vec<String>,
    pub r: usize,
    pub grad_checkpointing: bool,
    pub trainable_params: usize,
    pub step_s_median: f64,
    pub step_s_all: Vec<f64>,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
    pub rss_after_load_bytes: Option<u64>,
    /// The process before any weight is read (runtime + libraries).
    pub peak_rss_before_load_bytes: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
pub fn bench_sft(
    model_name: &str,
    dtype: &str,
    device: &str,
    batch: usize,
    seq: usize,
    steps: usize,
    targets: &[String],
    r: usize,
    grad_checkpointing: bool,
    quantize: &str,
) -> Result<SftBench> {
    let rss_start = peak_rss_bytes();
    let quant = crate::quant::BaseQuant::parse(quantize)?;
    let device = parse_device(device)?;
    let dtype = parse_dtype(dtype, &device)?;
    let files = ModelFiles::resolve(model_name)?;
    let adapter = Adapter::fresh("bench", bench_lora(targets, r), 0)?;
    let model = Model::load(&files, dtype, &device, AdapterSet::new(vec![adapter.clone()]).with_base_quant(quant))?;
    let rss_after_load = peak_rss_bytes();
    model.adapters.set_training(true);
    let train = super::config::TrainSection::default();
    let mut opt = AdamW::new(adapter.vars(), &train)?;
    let vocab = model.arch.vocab_size();
    let mut rng = SeededRng::new(1);
    let ex: Vec<SftExample> = (0..batch)
        .map(|_| SftExample { ids: random_ids(&mut rng, seq, vocab), prompt_len: 1 })
        .collect();
    let b = make_batch(&ex.iter().collect::<Vec<_>>(), 0, &device)?;
    let denom = b.targets.dim(0)? as f64;
    let f = |h: &Tensor| -> Result<Tensor> { Ok((label_nll_sum(&model, h, &b, train.loss_chunk)? / denom)?) };
    let (all, median) = timed_steps(&model, (&b.ids, &b.pos, &b.mask), grad_checkpointing, &f, &mut opt, steps)?;
    Ok(SftBench {
        tool: "lorafit",
        model: model_name.into(),
        batch,
        seq,
        targets: targets.to_vec(),
        r,
        grad_checkpointing,
        trainable_params: adapter.num_params(),
        step_s_median: median,
        step_s_all: all,
        tokens_per_s: (batch * seq) as f64 / median,
        peak_rss_bytes: peak_rss_bytes(),
        rss_after_load_bytes: rss_after_load,
        peak_rss_before_load_bytes: rss_start,
    })
}

/// The benches' LoRA: alpha = 2r and dropout 0.05, as the training defaults and the PEFT scripts.
/// `--targets all-linear` is PEFT's keyword (every linear of the blocks, not the LM head).
fn bench_lora(targets: &[String], r: usize) -> LoraConfig {
    let target_modules = match targets {
        [one] if one == "all-linear" => TargetModules::Regex(one.clone()),
        _ => TargetModules::List(targets.to_vec()),
    };
    LoraConfig { r, lora_alpha: 2.0 * r as f64, lora_dropout: 0.05, target_modules, ..Default::default() }
}

/// `n` seeded random token ids below `vocab`.
fn random_ids(rng: &mut SeededRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.uniform_f32() * vocab as f32) as u32 % vocab as u32).collect()
}

/// `steps + 1` optimizer steps of `loss` on one batch (ids, pos, mask), each timed: returns the
/// times after the warm-up (first) step and their median.
fn timed_steps(
    model: &Model,
    (ids, pos, mask): (&Tensor, &Tensor, &Tensor),
    checkpointing: bool,
    loss: &dyn Fn(&Tensor) -> Result<Tensor>,
    opt: &mut AdamW,
    steps: usize,
) -> Result<(Vec<f64>, f64)> {
    let mut times = vec![];
    for _ in 0..steps + 1 {
        let t0 = Instant::now();
        let mut acc = GradAccum::new(opt.vars.len());
        forward_backward(model, ids, pos, mask.clone(), checkpointing, loss, &opt.vars, &mut acc)?;
        let grads = acc.finish(&opt.vars)?;
        opt.step(&grads, 1e-4)?;
        model.device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median_after_warmup(&times))
}

/// Drops the warm-up (first) time; returns the others and their median (upper middle).
fn median_after_warmup(times: &[f64]) -> (Vec<f64>, f64) {
    let all = times[1..].to_vec();
    let mut sorted = all.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    (all, median)
}

#[derive(Debug, Serialize)]
pub struct RmBench {
    pub tool: &'static str,
    pub model: String,
    pub pairs: usize,
    pub seq: usize,
    pub targets: Vec<String>,
    pub r: usize,
    pub grad_checkpointing: bool,
    pub trainable_params: usize,
    pub step_s_median: f64,
    pub step_s_all: Vec<f64>,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
    pub rss_after_load_bytes: Option<u64>,
    pub peak_rss_before_load_bytes: Option<u64>,
}

/// Reward-model steps: `pairs` chosen and `pairs` rejected random sequences of `seq` tokens in
/// one (2·pairs, seq) batch, rewards at the last token (the `lorafit rm` head), loss
/// mean softplus(r_rejected - r_chosen), backward, AdamW over the LoRA adapter + the head.
#[allow(clippy::too_many_arguments)]
pub fn bench_rm(
    model_name: &str,
    dtype: &str,
    device: &str,
    pairs: usize,
    seq: usize,
    steps: usize,
    targets: &[String],
    r: usize,
    grad_checkpointing: bool,
) -> Result<RmBench> {
    let rss_start = peak_rss_bytes();
    let device = parse_device(device)?;
    let dtype = parse_dtype(dtype, &device)?;
    let files = ModelFiles::resolve(model_name)?;
    let mut cfg = bench_lora(targets, r);
    cfg.task_type = Some("SEQ_CLS".into());
    cfg.modules_to_save = Some(vec!["score".into()]);
    let adapter = Adapter::fresh("bench-rm", cfg, 0)?;
    let model = Model::load(&files, dtype, &device, AdapterSet::new(vec![adapter.clone()]))?;
    let rss_after_load = peak_rss_bytes();
    model.adapters.set_training(true);
    let head = RewardHead::fresh(model.arch.hidden_size(), 0, &device)?;
    let mut vars = adapter.vars();
    vars.push((SCORE_KEY.to_string(), head.var.clone().expect("a fresh head is trainable")));
    let trainable = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(vars, &super::config::TrainSection::default())?;
    let vocab = model.arch.vocab_size();
    let mut rng = SeededRng::new(1);
    // Rows 0..pairs are the chosen answers, rows pairs..2·pairs the rejected ones.
    let seqs: Vec<Vec<u32>> = (0..2 * pairs)
        .map(|_| random_ids(&mut rng, seq, vocab))
        .collect();
    let (ids, pos, mask, last) = pad_batch(&seqs, 0, &device)?;
    let f = |h: &Tensor| -> Result<Tensor> {
        let rw = head.rewards(h, &last)?;
        let diff = (rw.narrow(0, 0, pairs)? - rw.narrow(0, pairs, pairs)?)?;
        // -log σ(d) = softplus(-d), as `lorafit rm`.
        Ok(crate::ops::softplus(&diff.neg()?)?.mean_all()?)
    };
    let (all, median) = timed_steps(&model, (&ids, &pos, &mask), grad_checkpointing, &f, &mut opt, steps)?;
    Ok(RmBench {
        tool: "lorafit",
        model: model_name.into(),
        pairs,
        seq,
        targets: targets.to_vec(),
        r,
        grad_checkpointing,
        trainable_params: trainable,
        step_s_median: median,
        step_s_all: all,
        tokens_per_s: (2 * pairs * seq) as f64 / median,
        peak_rss_bytes: peak_rss_bytes(),
        rss_after_load_bytes: rss_after_load,
        peak_rss_before_load_bytes: rss_start,
    })
}

#[derive(Debug, Serialize)]
pub struct GemmBench {
    pub tool: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// `nn`: (M,K)·(K,N), both contiguous; `nt`: (M,K)·(N,K)ᵀ, a transposed view (the tied LM head).
    pub layout: &'static str,
    pub s_median: f64,
    pub s_min: f64,
    pub gflops_median: f64,
    pub gflops_best: f64,
}

/// candle's f32 matmul throughput on `device` for one (M,K)·(K,N) shape, both layouts:
/// 2 warm-up calls, then `repeats` timed ones.
pub fn bench_gemm(device: &str, m: usize, k: usize, n: usize, repeats: usize) -> Result<Vec<GemmBench>> {
    let device = parse_device(device)?;
    let mut rng = SeededRng::new(3);
    let a = rng.normal(&[m, k], 1.0, &device)?;
    let b = rng.normal(&[k, n], 1.0, &device)?;
    let bt = rng.normal(&[n, k], 1.0, &device)?;
    let mut out = vec![];
    for (layout, rhs) in [("nn", b), ("nt", bt.t()?)] {
        let mut times = vec![];
        for i in 0..repeats.max(1) + 2 {
            let t0 = Instant::now();
            let c = a.matmul(&rhs)?;
            device.synchronize()?;
            let dt = t0.elapsed().as_secs_f64();
            drop(c);
            if i >= 2 {
                times.push(dt);
            }
        }
        times.sort_by(f64::total_cmp);
        let flop = 2.0 * (m * k * n) as f64;
        let (med, min) = (times[times.len() / 2], times[0]);
        out.push(GemmBench { tool: "candle", m, k, n, layout, s_median: med, s_min: min, gflops_median: flop / med / 1e9, gflops_best: flop / min / 1e9 });
    }
    Ok(out)
}
