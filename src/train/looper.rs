//! The training loop every method shares: output folder and resume, the data stream over
//! epochs, accumulation, clipping, AdamW and the schedule, eval, metrics, progress,
//! checkpoints, the final adapter and the run's record. A method (`sft.rs`, `rm.rs`) supplies
//! what differs: how a micro-batch is built and scored, and what eval measures.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::optim::{clip_grad_norm, lr_at, AdamW, LossScaler};
use super::{epoch_batches, Start};
use super::{plot, progress_bar, remove_run_files, GradAccum, MetricsLog};
use crate::lora::Adapter;
use crate::model::Model;
use crate::rng::SeededRng;
use crate::runtime::peak_rss_bytes;

/// The output folder, checked before any data is read; on `--resume`, the checkpoint.
pub struct RunDir {
    pub out: PathBuf,
    pub start: Start,
    pub ckpt: Option<(PathBuf, TrainState)>,
}

impl RunDir {
    pub fn open(cfg: &TrainConfig, start: Start) -> Result<Self> {
        let out = PathBuf::from(&cfg.out.dir);
        let ckpt = if start == Start::Resume {
            let last = checkpoint::list(&out)?
                .pop()
                .with_context(|| format!("--resume: no checkpoint in {}", checkpoint::checkpoints_dir(&out).display()))?;
            let state = checkpoint::read_state(&last)?;
            if state.config != cfg.to_toml()? {
                bail!("--resume: the config differs from the one {} was started with (see {}/config.toml)", out.display(), out.display())
            }
            Some((last, state))
        } else {
            if start == Start::Fresh && (out.join("adapter_model.safetensors").exists() || out.join("checkpoints").exists()) {
                bail!("output folder {} already holds a run: pass --resume to continue it, --force to replace it, or choose another --out", out.display())
            }
            None
        };
        Ok(Self { out, start, ckpt })
    }

    /// The checkpoint folder to load the adapter from, when resuming.
    pub fn resume_dir(&self) -> Option<&std::path::Path> {
        self.ckpt.as_ref().map(|(d, _)| d.as_path())
    }
}

/// What one micro-batch reports back.
pub struct MicroOut {
    /// This micro-batch's share of the step loss (already divided by the step's normaliser).
    pub loss: f64,
    /// Tokens processed (for tokens/s).
    pub tokens: usize,
    /// Extra per-step metrics, summed over micro-batches (e.g. correct pairs).
    pub sums: Vec<(&'static str, f64)>,
}

/// What a method plugs into the loop.
pub trait Method {
    /// Size of each item (for length-grouped batching).
    fn lens(&self) -> Vec<usize>;
    /// The normaliser contribution of a micro-batch (learned tokens, prompts, ...).
    fn weight(&self, items: &[usize]) -> f64;
    /// Forward and backward of the micro-batch `items`, gradients added to `acc`.
    fn micro_step(&self, items: &[usize], denom: f64, vars: &[(String, Var)], acc: &mut GradAccum) -> Result<MicroOut>;
    /// Turns the summed extras of a step into metrics (e.g. accuracy = correct / pairs).
    fn step_metrics(&self, sums: &[(&'static str, f64)], denom: f64) -> Map<String, Value>;
    /// Held-out metrics (keys start with `eval_`; the first in key order is shown in the
    /// progress bar, and `eval_loss` is plotted).
    fn evaluate(&self) -> Result<Map<String, Value>>;
    /// Tensors saved next to the LoRA ones (a reward head).
    fn extra_tensors(&self) -> Vec<(String, Tensor)>;
}

/// How a run went.
pub struct LoopSummary {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub final_eval: Map<String, Value>,
    pub peak_rss_bytes: Option<u64>,
}

/// Trains `vars` (the adapter's, plus any head) with `method` until the configured step count.
pub fn train_loop(
    cfg: &TrainConfig,
    run: &RunDir,
    model: &Model,
    adapter: &Arc<Adapter>,
    vars: Vec<(String, Var)>,
    method: &dyn Method,
) -> Result<LoopSummary> {
    let t = &cfg.train;
    let lens = method.lens();
    let batches_per_epoch = lens.len().div_ceil(t.batch_size);
    let total = if t.max_steps > 0 { t.max_steps } else { t.epochs * batches_per_epoch.div_ceil(t.grad_accum) };
    let mut opt = AdamW::new(vars, t)?;
    let (mut step, mut epoch, mut cursor, mut tokens_seen) = (0, 0, 0, 0u64);
    let mut scaler = LossScaler::new(model.dtype == candle_core::DType::F16);
    let mut skipped_steps = 0usize;
    if let Some((dir, state)) = &run.ckpt {
        if let Ok(s) = serde_json::from_value::<LossScaler>(state.extra["loss_scaler"].clone()) {
            scaler = s;
        }
        checkpoint::load_optimizer(dir, &mut opt)?;
        for (a, r) in model.adapters.adapters.iter().zip(&state.dropout_rng) {
            a.set_dropout_rng(SeededRng::from_state(r)?);
        }
        (step, epoch, cursor, tokens_seen) = (state.step, state.epoch, state.batch_in_epoch, state.tokens_seen);
        tracing::info!("resuming from {} (step {step})", dir.display());
    }
    let out = &run.out;
    if run.start == Start::Force {
        remove_run_files(out)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::io::atomic_write(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let metrics = MetricsLog::open(out, run.ckpt.as_ref().map(|(_, s)| s.step))?;
    let mut order = epoch_batches(&lens, t.batch_size, t.seed, epoch, t.group_by_length);
    let save = |step: usize, epoch: usize, cursor: usize, tokens_seen: u64, opt: &AdamW, scaler: &LossScaler| -> Result<()> {
        let state = TrainState {
            step,
            epoch,
            batch_in_epoch: cursor,
            dropout_rng: model.adapters.adapters.iter().map(|a| a.dropout_rng().state()).collect(),
            tokens_seen,
            config: cfg.to_toml()?,
            extra: serde_json::json!({ "loss_scaler": scaler }),
        };
        checkpoint::save(out, adapter, &cfg.model.name, opt, &state, t.keep_last, &method.extra_tensors(), &[])?;
        Ok(())
    };

    let pb = progress_bar(total, step);
    let started = Instant::now();
    let (mut first_loss, mut last_loss, mut last_eval) = (None, None, Map::new());
    while step < total {
        let t0 = Instant::now();
        // 1. The step's micro-batches, from the data stream (crossing epochs if needed).
        let mut micro: Vec<Vec<usize>> = vec![];
        for _ in 0..t.grad_accum {
            if cursor == order.len() {
                (epoch, cursor) = (epoch + 1, 0);
                order = epoch_batches(&lens, t.batch_size, t.seed, epoch, t.group_by_length);
            }
            micro.push(order[cursor].clone());
            cursor += 1;
        }
        // 2. Forward/backward each, normalised over the whole step (and scaled for f16).
        let denom = micro.iter().map(|m| method.weight(m)).sum::<f64>().max(1e-12);
        let mut acc = GradAccum::new(opt.vars.len());
        let (mut loss, mut tokens, mut sums) = (0.0, 0, Vec::<(&'static str, f64)>::new());
        for m in &micro {
            let o = method.micro_step(m, denom / scaler.scale, &opt.vars, &mut acc)?;
            loss += o.loss / scaler.scale;
            tokens += o.tokens;
            for (k, v) in o.sums {
                match sums.iter_mut().find(|(k2, _)| *k2 == k) {
                    Some(e) => e.1 += v,
                    None => sums.push((k, v)),
                }
            }
        }
        // 3. Unscale, clip, update (unless the gradients are not finite), schedule.
        let mut grads = acc.finish(&opt.vars)?;
        if scaler.scale != 1.0 {
            grads = grads.iter().map(|g| g / scaler.scale).collect::<candle_core::Result<_>>()?;
        }
        let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
        let lr = lr_at(t, step, total);
        let finite = scaler.update(grad_norm);
        if finite {
            opt.step(&grads, lr)?;
        } else {
            skipped_steps += 1;
            tracing::warn!("step {}: gradients are not finite: update skipped (loss scale now {})", step + 1, scaler.scale);
        }
        step += 1;
        tokens_seen += tokens as u64;
        let tps = tokens as f64 / t0.elapsed().as_secs_f64();
        first_loss.get_or_insert(loss);
        last_loss = Some(loss);
        // 4. Evaluate, log, checkpoint.
        let mut line = Map::new();
        for (k, v) in [("step", Value::from(step)), ("epoch", epoch.into()), ("loss", loss.into()), ("lr", lr.into()),
            ("grad_norm", grad_norm.into()), ("tokens_per_s", tps.into()), ("elapsed_s", started.elapsed().as_secs_f64().into())] {
            line.insert(k.into(), v);
        }
        line.extend(method.step_metrics(&sums, denom));
        if scaler.enabled || !finite {
            line.insert("loss_scale".into(), scaler.scale.into());
            line.insert("skipped_steps".into(), skipped_steps.into());
        }
        let do_eval = (t.eval_every > 0 && step % t.eval_every == 0) || step == total;
        let mut shown = String::new();
        if do_eval {
            model.adapters.set_training(false);
            let ev = {
                let _no_grad = model.adapters.no_grad();
                method.evaluate()?
            };
            model.adapters.set_training(true);
            if let Some((k, v)) = ev.iter().next() {
                shown = format!("  {k} {:.4}", v.as_f64().unwrap_or(f64::NAN));
            }
            line.extend(ev.clone());
            last_eval = ev;
        }
        if do_eval || step % t.log_every.max(1) == 0 || step == total {
            metrics.log(&Value::Object(line))?;
        }
        pb.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {tps:.0} tok/s{shown}"));
        pb.set_position(step as u64);
        if (t.save_every > 0 && step % t.save_every == 0) || step == total {
            save(step, epoch, cursor, tokens_seen, &opt, &scaler)?;
        }
    }
    pb.finish_and_clear();

    // 5. The adapter (PEFT format) and the loss plot.
    crate::peft::save_adapter(adapter, out, &cfg.model.name, &method.extra_tensors())?;
    let logged = metrics.read()?;
    let pts = |k: &str| -> Vec<(f64, f64)> { logged.iter().filter_map(|v| Some((v["step"].as_f64()?, v.get(k)?.as_f64()?))).collect() };
    plot::write_loss_png(&out.join("loss.png"), &pts("loss"), &pts("eval_loss"))?;
    Ok(LoopSummary { steps: step, first_loss, final_loss: last_loss, final_eval: last_eval, peak_rss_bytes: peak_rss_bytes() })
}
