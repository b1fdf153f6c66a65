//! `lorafit bench sft|rm|gemm`: the speed and memory of SFT and reward-model steps on random
//! tokens, and the CPU GEMM throughput, for docs/BENCHMARKS.md (compared there with PyTorch +
//! PEFT doing the same work, scripts/bench/peft_{sft,rm}.py).
//! An SFT step is forward, backward and the AdamW update of one batch (B x T, every token but
//! the first learned); an RM step is the same for `pairs` chosen + `pairs` rejected sequences in
//! one batch, rewards at the last token, pairwise loss. The first step is a warm-up, the median
//! of the others is reported. LoRA: alpha = 2r, dropout 0.05 (the training defaults).
//! The flags are checked before anything is loaded, as a training config is ([`StepBench::check`],
//! [`check_generate`], [`check_gemm`]): sizes of at least 1, sequences within the model's
//! context, and a predicted peak (`lorafit plan`'s formulas) that this machine can hold.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Serialize;

use super::optim::AdamW;
use super::batch::{label_nll_sum, make_batch, SftExample};
use super::{forward_backward, GradAccum};
use crate::reward::{pad_batch, RewardHead, SCORE_KEY};
use crate::lora::{Adapter, AdapterSet, LoraConfig, TargetModules};
use crate::model::{Arch, Model};
use crate::runtime::fmt_bytes;
use crate::rng::SeededRng;
use crate::runtime::{parse_device, parse_dtype, peak_rss_bytes};
use crate::weights::ModelFiles;

/// What `bench sft` / `bench rm` run: the model, its dtype, device and storage, and the sizes.
#[derive(Clone, Debug)]
pub struct StepBench {
    pub model: String,
    pub dtype: String,
    pub device: String,
    pub quantize: String,
    /// sft: sequences per step; rm: pairs (chosen + rejected) per step.
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub r: usize,
    /// Empty until [`StepBench::check`] fills in the flag or PEFT's default for the architecture.
    pub targets: Vec<String>,
    pub grad_checkpointing: bool,
    /// sft: after the timed steps, measure the GEMM peak and profile one more step ([`StepProfile`]).
    pub profile: bool,
}

/// `MemAvailable` + `SwapFree` (Linux): what a process can still allocate without being killed.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| -> Option<u64> { info.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok() };
    Some((kb("MemAvailable:")? + kb("SwapFree:").unwrap_or(0)) * 1024)
}

/// Refuses a bench whose predicted peak exceeds what this machine can allocate (CPU runs only:
/// GPU memory is not queried), instead of letting the allocation abort the process.
fn check_memory(device: &str, what: &str, predicted: f64, fix: &str) -> Result<()> {
    if device != "cpu" {
        return Ok(());
    }
    if let Some(avail) = available_memory() {
        if predicted > avail as f64 {
            bail!(
                "{what} needs about {} (predicted), more than the {} this machine has available: {fix}",
                fmt_bytes(predicted.min(u64::MAX as f64) as u64),
                fmt_bytes(avail)
            )
        }
    }
    Ok(())
}

/// The model's architecture from its config.json alone (nothing else is read yet).
fn arch_of(model: &str) -> Result<Arch> {
    Arch::from_file(&ModelFiles::config_only(model)?)
}

impl StepBench {
    /// Checks the flags of `bench {what}` (sft or rm) before anything is loaded, as a training
    /// config is checked: sizes of at least 1, `--seq` within the model's context, `--targets`
    /// (default: PEFT's for the architecture), and a predicted peak this machine can hold.
    pub fn check(&mut self, what: &str, targets: Option<&str>) -> Result<()> {
        for (flag, v) in [("--batch", self.batch), ("--steps", self.steps), ("--r", self.r)] {
            if v == 0 {
                bail!("bench {what} {flag} 0: {flag} must be at least 1")
            }
        }
        if self.seq < 2 {
            bail!("bench {what} --seq {}: a sequence needs at least 2 tokens (one predicts the next)", self.seq)
        }
        crate::quant::BaseQuant::parse(&self.quantize).context("--quantize")?;
        let arch = arch_of(&self.model)?;
        let ctx = arch.max_positions();
        if self.seq > ctx {
            bail!("bench {what} --seq {}: longer than the model's context of {ctx} tokens (n_positions / max_position_embeddings in config.json)", self.seq)
        }
        self.targets = match targets {
            Some(t) => t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            None => crate::lora::peft_default_targets(arch.model_type())
                .with_context(|| format!("bench {what}: no default --targets for model_type {:?}; pass --targets", arch.model_type()))?
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        if self.targets.is_empty() {
            bail!("bench {what} --targets: no module name given (e.g. --targets c_attn or --targets q_proj,v_proj)")
        }
        let mut sets = model_sets(&self.model, &self.dtype, &self.device, &self.quantize);
        sets.extend([
            format!("train.batch_size={}", self.batch),
            format!("data.max_len={}", self.seq),
            format!("lora.target_modules={}", toml::Value::Array(self.targets.iter().map(|t| toml::Value::String(t.clone())).collect())),
            format!("lora.r={}", self.r),
            format!("lora.lora_alpha={}", 2 * self.r),
            format!("lora.lora_dropout={BENCH_DROPOUT}"),
            format!("train.grad_checkpointing={}", self.grad_checkpointing),
        ]);
        let cfg = super::config::TrainConfig::load(None, &sets)?;
        let flags = format!("bench {what} --batch {} --seq {}", self.batch, self.seq);
        let fix = if self.grad_checkpointing { "lower --seq or --batch" } else { "lower --seq or --batch, or add --grad-checkpointing" };
        let peak = crate::plan::plan_stage(&cfg, what, None, "").with_context(|| format!("{flags}: {fix}"))?.peak_bytes as f64;
        check_memory(&self.device, &flags, peak, fix)
    }
}

/// The config of a bench's model: its name, dtype, device and storage, as `--set`s.
fn model_sets(model: &str, dtype: &str, device: &str, quantize: &str) -> Vec<String> {
    let q = |v: &str| toml::Value::String(v.to_string()).to_string();
    vec![format!("model.name={}", q(model)), format!("model.dtype={}", q(dtype)), format!("model.device={}", q(device)), format!("model.quantize={}", q(quantize))]
}

/// Checks `bench generate`'s flags before anything is loaded: sizes of at least 1, prompt and
/// new tokens within the model's context, and memory for the KV cache.
#[allow(clippy::too_many_arguments)]
pub fn check_generate(model: &str, dtype: &str, device: &str, quantize: &str, batch: usize, prompt_len: usize, new_tokens: usize, repeats: usize) -> Result<()> {
    for (flag, v) in [("--batch", batch), ("--prompt-len", prompt_len), ("--new-tokens", new_tokens), ("--repeats", repeats)] {
        if v == 0 {
            bail!("bench generate {flag} 0: {flag} must be at least 1")
        }
    }
    let ctx = arch_of(model)?.max_positions();
    if prompt_len.saturating_add(new_tokens) > ctx {
        bail!("bench generate --prompt-len {prompt_len} --new-tokens {new_tokens}: together longer than the model's context of {ctx} tokens")
    }
    let cfg = super::config::TrainConfig::load(None, &model_sets(model, dtype, device, quantize))?;
    let peak = crate::plan::generation_bytes(&cfg, batch, prompt_len, new_tokens)?;
    check_memory(device, &format!("bench generate --batch {batch} --prompt-len {prompt_len} --new-tokens {new_tokens}"), peak, "lower --batch, --prompt-len or --new-tokens")
}

/// Checks `bench gemm`'s shape: each side at least 1, and the matrices within this machine's memory.
pub fn check_gemm(device: &str, m: usize, k: usize, n: usize, repeats: usize) -> Result<()> {
    if m == 0 || k == 0 || n == 0 || repeats == 0 {
        bail!("bench gemm --gemm {m}x{k}x{n} --repeats {repeats}: every size must be at least 1")
    }
    // A (M,K), B (K,N), Bᵀ (N,K) and the product (M,N), f32.
    let (m, k, n) = (m as f64, k as f64, n as f64);
    check_memory(device, &format!("bench gemm --gemm {m}x{k}x{n}"), 4.0 * (m * k + 2.0 * k * n + m * n), "use a smaller --gemm shape")
}

#[derive(Debug, Serialize)]
pub struct SftBench {
    pub tool: &'static str,
    pub model: String,
    pub dtype: String,
    pub quantize: String,
    pub lora_dropout: f64,
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
    /// rayon's threads (GEMM and lorafit's parallel ops; see `runtime::tune_threads`).
    pub threads: usize,
    /// The parts candle's GEMM is split into (`candle_core::utils::get_num_threads`).
    pub gemm_threads: usize,
    /// Threads of candle's element-wise barrier pool, the caller included.
    pub elementwise_threads: usize,
    /// `--profile`: where one more step's time goes (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
    /// The loss of every step run (warm-up, timed, profiled), for tests/bench_profile.rs.
    #[serde(skip)]
    pub losses: Vec<f64>,
    /// The adapter's trainable values after the last step, in the optimizer's order.
    #[serde(skip)]
    pub adapter_after: Vec<Vec<f32>>,
}

/// SFT steps as `b` describes ([`StepBench::check`]ed first).
pub fn bench_sft(b: &StepBench) -> Result<SftBench> {
    let (batch, seq, steps, targets, r, grad_checkpointing) = (b.batch, b.seq, b.steps, &b.targets, b.r, b.grad_checkpointing);
    let rss_start = peak_rss_bytes();
    let quant = crate::quant::BaseQuant::parse(&b.quantize)?;
    let device = parse_device(&b.device)?;
    let dtype = parse_dtype(&b.dtype, &device)?;
    let files = ModelFiles::resolve(&b.model)?;
    let adapter = Adapter::fresh("bench", bench_lora(targets, r), 0)?;
    let model = Model::load(&files, dtype, &device, AdapterSet::new(vec![adapter.clone()]).with_base_quant(quant))?;
    let rss_after_load = peak_rss_bytes();
    model.adapters.set_training(true);
    let train = super::config::TrainSection::default();
    let mut opt = AdamW::new(adapter.vars(), &train)?;
    let vocab = model.arch.vocab_size();
    let mut rng = SeededRng::new(1);
    let ex: Vec<SftExample> = (0..batch)
        .map(|_| SftExample::completion(random_ids(&mut rng, seq, vocab), 1))
        .collect();
    let mb = make_batch(&ex.iter().collect::<Vec<_>>(), 0, &device)?;
    let denom = mb.targets.dim(0)? as f64;
    let f = |h: &Tensor| -> Result<Tensor> { Ok((label_nll_sum(&model, h, &mb, train.loss_chunk)? / denom)?) };
    let (all, median, mut losses) = timed_steps(&model, (&mb.ids, &mb.pos, &mb.mask), grad_checkpointing, &f, &mut opt, steps)?;
    let profile = if b.profile {
        let (p, loss) = profile_step(&model, (&mb.ids, &mb.pos, &mb.mask), grad_checkpointing, &f, &mut opt, &b.device)?;
        losses.push(loss);
        Some(p)
    } else {
        None
    };
    let adapter_after = opt.vars.iter().map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect::<Result<Vec<_>>>()?;
    Ok(SftBench {
        tool: "lorafit",
        model: b.model.clone(),
        dtype: format!("{dtype:?}").to_lowercase(),
        quantize: b.quantize.clone(),
        lora_dropout: BENCH_DROPOUT,
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
        threads: rayon::current_num_threads(),
        gemm_threads: candle_core::utils::get_num_threads(),
        elementwise_threads: candle_core::utils::barrier_pool().n_workers() + 1,
        profile,
        losses,
        adapter_after,
    })
}

/// The benches' LoRA dropout, as the training default and the PEFT scripts.
const BENCH_DROPOUT: f64 = 0.05;

/// The benches' LoRA: alpha = 2r and dropout 0.05, as the training defaults and the PEFT scripts.
/// `--targets all-linear` is PEFT's keyword (every linear of the blocks, not the LM head).
fn bench_lora(targets: &[String], r: usize) -> LoraConfig {
    let target_modules = match targets {
        [one] if one == "all-linear" => TargetModules::Regex(one.clone()),
        _ => TargetModules::List(targets.to_vec()),
    };
    LoraConfig { r, lora_alpha: 2.0 * r as f64, lora_dropout: BENCH_DROPOUT, target_modules, ..Default::default() }
}

/// `n` seeded random token ids below `vocab`.
fn random_ids(rng: &mut SeededRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.uniform_f32() * vocab as f32) as u32 % vocab as u32).collect()
}

/// `steps + 1` optimizer steps of `loss` on one batch (ids, pos, mask), each timed: returns the
/// times after the warm-up (first) step, their median, and every step's loss.
fn timed_steps(
    model: &Model,
    (ids, pos, mask): (&Tensor, &Tensor, &Tensor),
    checkpointing: bool,
    loss: &dyn Fn(&Tensor) -> Result<Tensor>,
    opt: &mut AdamW,
    steps: usize,
) -> Result<(Vec<f64>, f64, Vec<f64>)> {
    anyhow::ensure!(steps >= 1, "at least one timed step is needed (after the warm-up)");
    let (mut times, mut losses) = (vec![], vec![]);
    for _ in 0..steps + 1 {
        let t0 = Instant::now();
        let mut acc = GradAccum::new(opt.vars.len());
        losses.push(forward_backward(model, ids, pos, mask.clone(), checkpointing, loss, &opt.vars, &mut acc)?);
        let grads = acc.finish(&opt.vars)?;
        opt.step(&grads, 1e-4)?;
        model.device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let (all, median) = median_after_warmup(&times);
    Ok((all, median, losses))
}

/// `bench sft --profile`: one step, cut into phases and op kinds (`crate::prof`), beside the GEMM
/// peak measured in the same run ([`PEAK_SHAPE`], both layouts, 10 calls each; the fastest is the peak).
#[derive(Debug, Serialize)]
pub struct StepProfile {
    /// Wall time of the profiled step (its phases together).
    pub step_ms: f64,
    /// GFLOP/s: the fastest of `bench gemm`'s calls at [`PEAK_SHAPE`] (nn and nt, 10 each), just before the step.
    pub gemm_peak_gflops: f64,
    pub gemm: Vec<GemmBench>,
    pub phases: Vec<crate::prof::PhaseReport>,
}

/// The GEMM peak's shape (M, K, N): a c_fc forward of KoGPT2 over 2,048 tokens, as `bench gemm`'s
/// default and scripts/bench/torch_gemm.py's.
pub const PEAK_SHAPE: (usize, usize, usize) = (2048, 768, 3072);

/// Measures the GEMM peak, then runs one step as [`timed_steps`] does with the profiler on.
/// Returns the profile and the step's loss.
fn profile_step(
    model: &Model,
    (ids, pos, mask): (&Tensor, &Tensor, &Tensor),
    checkpointing: bool,
    loss: &dyn Fn(&Tensor) -> Result<Tensor>,
    opt: &mut AdamW,
    device: &str,
) -> Result<(StepProfile, f64)> {
    let (m, k, n) = PEAK_SHAPE;
    let gemm = bench_gemm(device, m, k, n, 10)?;
    // The fastest call of either layout: on a shared machine a median can land in a busy moment
    // and fall below what the step's own GEMMs reach.
    let gemm_peak_gflops = gemm.iter().map(|g| g.gflops_best).fold(0.0, f64::max);
    use crate::prof::{phase, Phase};
    crate::prof::start();
    let step = (|| -> Result<f64> {
        phase(Phase::Forward);
        let mut acc = GradAccum::new(opt.vars.len());
        // forward_backward switches to the backward phase itself, before `loss.backward()`.
        let l = forward_backward(model, ids, pos, mask.clone(), checkpointing, loss, &opt.vars, &mut acc)?;
        phase(Phase::Optimizer);
        let grads = acc.finish(&opt.vars)?;
        opt.step(&grads, 1e-4)?;
        model.device.synchronize()?;
        Ok(l)
    })();
    let report = crate::prof::stop(); // off again, whatever happened
    let l = step?;
    let step_ms = report.phases.iter().map(|p| p.wall_ms).sum();
    Ok((StepProfile { step_ms, gemm_peak_gflops, gemm, phases: report.phases }, l))
}

/// Human names of the profile's kinds (`prof::Cat::key`), as in docs/BENCHMARKS.md.
pub fn cat_label(key: &str) -> &'static str {
    match key {
        "frozen_gemm" => "frozen linear GEMMs",
        "lora" => "LoRA path",
        "attention" => "attention",
        "norm_act" => "norms / activations",
        "loss_head" => "loss head (LM head + cross-entropy)",
        "optimizer" => "optimizer (AdamW)",
        _ => "other (candle element-wise / autograd)",
    }
}

/// The profile as two Markdown tables: the phases (wall, CPU, CPU/wall, minor faults), then
/// every (phase, kind) with time, share of the step, GEMM GFLOP, GFLOP/s and % of the GEMM peak.
pub fn profile_table(p: &StepProfile) -> String {
    let mut s = format!("profiled step {:.1} ms; GEMM peak {:.1} GFLOP/s ({}x{}x{}, this run)

", p.step_ms, p.gemm_peak_gflops, PEAK_SHAPE.0, PEAK_SHAPE.1, PEAK_SHAPE.2);
    s += "| phase | wall ms | CPU ms | CPU/wall | minor faults |
|---|---:|---:|---:|---:|
";
    for ph in &p.phases {
        s += &format!("| {} | {:.1} | {:.1} | {:.2} | {} |
", ph.phase, ph.wall_ms, ph.cpu_ms, ph.cpu_ms / ph.wall_ms.max(1e-9), ph.minor_faults);
    }
    s += "
| phase | kind | ms | % of step | GFLOP | GFLOP/s | % of GEMM peak |
|---|---|---:|---:|---:|---:|---:|
";
    for ph in &p.phases {
        for c in &ph.cats {
            if c.ms < 0.05 && c.flops == 0 {
                continue;
            }
            let (gf, rate, share) = if c.flops > 0 {
                let rate = c.flops as f64 / (c.ms.max(1e-9) * 1e6);
                (format!("{:.2}", c.flops as f64 / 1e9), format!("{rate:.1}"), format!("{:.0}%", 100.0 * rate / p.gemm_peak_gflops))
            } else {
                ("-".into(), "-".into(), "-".into())
            };
            s += &format!("| {} | {} | {:.1} | {:.1}% | {gf} | {rate} | {share} |
", ph.phase, cat_label(c.cat), c.ms, 100.0 * c.ms / p.step_ms.max(1e-9));
        }
    }
    s
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
    pub dtype: String,
    pub quantize: String,
    pub lora_dropout: f64,
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
/// `b.batch` is the number of pairs ([`StepBench::check`]ed first).
pub fn bench_rm(b: &StepBench) -> Result<RmBench> {
    let (pairs, seq, steps, targets, r, grad_checkpointing) = (b.batch, b.seq, b.steps, &b.targets, b.r, b.grad_checkpointing);
    let rss_start = peak_rss_bytes();
    let quant = crate::quant::BaseQuant::parse(&b.quantize)?;
    let device = parse_device(&b.device)?;
    let dtype = parse_dtype(&b.dtype, &device)?;
    let files = ModelFiles::resolve(&b.model)?;
    let mut cfg = bench_lora(targets, r);
    cfg.task_type = Some("SEQ_CLS".into());
    cfg.modules_to_save = Some(vec!["score".into()]);
    let adapter = Adapter::fresh("bench-rm", cfg, 0)?;
    let model = Model::load(&files, dtype, &device, AdapterSet::new(vec![adapter.clone()]).with_base_quant(quant))?;
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
    let (all, median, _) = timed_steps(&model, (&ids, &pos, &mask), grad_checkpointing, &f, &mut opt, steps)?;
    Ok(RmBench {
        tool: "lorafit",
        model: b.model.clone(),
        dtype: format!("{dtype:?}").to_lowercase(),
        quantize: b.quantize.clone(),
        lora_dropout: BENCH_DROPOUT,
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
