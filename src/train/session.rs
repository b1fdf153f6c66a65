//! The training session: everything a run does that is not its method. A method (`sft.rs`,
//! `rm.rs`, `ppo.rs`) reads its data, builds its model and trainables, and implements
//! [`Method`]: what one step does. The session does the rest, the same way for every method:
//!
//! 1. [`Session::open`] claims the output folder before any data is read: the lock (a second
//!    run into the same folder fails at once), `--out` never one of the inputs, `--force` only
//!    over lorafit's own output, `--resume` only from a checkpoint of the same config.
//! 2. [`Session::train`] writes the marker, `config.toml` and `metrics.jsonl`, walks the data
//!    cursor (epoch, batch in epoch) over the steps, gives each step a [`Trainer`] (AdamW, the
//!    schedule, clipping, the f16 dynamic loss scaler, the non-finite guard), evaluates, logs,
//!    shows progress, checkpoints, and at the end exports the adapter and the plot.
//! 3. [`Session::finish`] writes `summary.json` and says where the output is and what to run next.
//!
//! Resuming restores the optimizer, the loss scaler, the dropout streams, the data cursor, the
//! first step's metrics and the method's own state, so a resumed run ends where an
//! uninterrupted one does, bit for bit.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::optim::{lr_at, AdamW, LossScaler};
pub use super::trainer::{Accumulated, MicroOut, Trainer, Update};
use super::plot::{self, PanelSpec};
use super::{epoch_batches, Start};
use crate::bail_kind;
use crate::error::Kind;
use crate::lora::Adapter;
use crate::model::Model;
use crate::outdir::OutDir;
use crate::progress::Progress;
use crate::rng::SeededRng;
use crate::runtime::peak_rss_bytes;

/// The files a training run writes into its output folder (and nothing else there, besides
/// the `.lorafit` marker and lock); `--force` removes exactly these.
pub const RUN_FILES: &[&str] = &[
    "adapter_model.safetensors",
    "adapter_config.json",
    "config.toml",
    "metrics.jsonl",
    "loss.png",
    "reward.png",
    "summary.json",
    "lorafit.json",
    "stack",
    "samples.jsonl",
    "checkpoints",
];

/// Removes a previous run's files from `out` (`--force`), leaving anything else in place.
pub fn remove_run_files(out: &Path) -> Result<()> {
    for f in RUN_FILES {
        let p = out.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        } else if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    Ok(())
}

/// `metrics.jsonl`: one JSON object per logged step, appended and flushed as it goes.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log in `dir`. When resuming from `step`, lines logged after it (by the run
    /// that was interrupted) are dropped so the log reads as one uninterrupted run.
    pub fn open(dir: &Path, resume_from: Option<usize>) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        match resume_from {
            Some(step) if path.is_file() => {
                let kept: Vec<String> = std::fs::read_to_string(&path)?
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                crate::io::atomic_write(&path, kept.concat().as_bytes())?;
            }
            _ => crate::io::atomic_write(&path, b"")?,
        }
        Ok(Self { path })
    }

    pub fn log(&self, v: &Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&self.path)?;
        writeln!(f, "{v}")?;
        Ok(())
    }

    /// Every logged line, parsed.
    pub fn read(&self) -> Result<Vec<Value>> {
        Ok(std::fs::read_to_string(&self.path)?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }
}

/// Per-phase wall time and the process's peak memory after each phase (which phase sets a
/// run's peak), as metrics fields `time_<phase>_s` and `peak_rss_after_<phase>_mib`.
pub struct PhaseTimes {
    clock: Instant,
    pub fields: Map<String, Value>,
}

impl PhaseTimes {
    pub fn start() -> Self {
        Self { clock: Instant::now(), fields: Map::new() }
    }

    /// Ends phase `name` and starts the next.
    pub fn lap(&mut self, name: &str) {
        self.fields.insert(format!("time_{name}_s"), self.clock.elapsed().as_secs_f64().into());
        if let Some(b) = peak_rss_bytes() {
            self.fields.insert(format!("peak_rss_after_{name}_mib"), (b as f64 / 1048576.0).round().into());
        }
        self.clock = Instant::now();
    }
}

/// The data stream: batches of one epoch (a function of seed and epoch), then the next epoch.
pub struct Cursor {
    lens: Vec<usize>,
    batch_size: usize,
    seed: u64,
    group_by_length: bool,
    pub epoch: usize,
    /// Batches of this epoch consumed.
    pub pos: usize,
    order: Vec<Vec<usize>>,
}

impl Cursor {
    pub fn new(lens: Vec<usize>, batch_size: usize, seed: u64, group_by_length: bool, epoch: usize, pos: usize) -> Self {
        let order = epoch_batches(&lens, batch_size, seed, epoch, group_by_length);
        Self { lens, batch_size, seed, group_by_length, epoch, pos, order }
    }

    /// The next `n` batches (indices into the items), crossing into the next epoch if needed.
    pub fn take(&mut self, n: usize) -> Vec<Vec<usize>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if self.pos == self.order.len() {
                (self.epoch, self.pos) = (self.epoch + 1, 0);
                self.order = epoch_batches(&self.lens, self.batch_size, self.seed, self.epoch, self.group_by_length);
            }
            out.push(self.order[self.pos].clone());
            self.pos += 1;
        }
        out
    }
}

/// What one step of a method reports.
pub struct StepOut {
    /// The method's fields of this step's metrics line.
    pub metrics: Map<String, Value>,
    /// The method's figures for the progress display (`loss 1.2345`, `reward 0.12  kl 0.004`).
    pub show: String,
    /// Tokens processed (tokens/s).
    pub tokens: usize,
}

/// A training method: what one step does. The session runs everything around it.
pub trait Method {
    /// Size of each item the data cursor walks (examples, ranked prompts, PPO prompts).
    fn lens(&self) -> Vec<usize>;
    /// Batches of `train.batch_size` items one step takes (SFT / RM: `train.grad_accum`).
    fn batches_per_step(&self) -> usize;
    /// Batch items of similar length together (`train.group_by_length`).
    fn group_by_length(&self) -> bool;
    /// One step over `batches`: forward, backward and update(s) through `tr`.
    fn step(&mut self, tr: &mut Trainer, batches: &[Vec<usize>]) -> Result<StepOut>;
    /// Held-out metrics (keys start with `eval_`; the first in key order is shown in progress).
    fn evaluate(&self) -> Result<Map<String, Value>> {
        Ok(Map::new())
    }
    /// Tensors saved next to the LoRA ones in the adapter file (a reward head).
    fn extra_tensors(&self) -> Vec<(String, Tensor)> {
        vec![]
    }
    /// Further trainable tensors kept in checkpoints only (PPO's value head and critic).
    fn aux_tensors(&self) -> Vec<(String, Tensor)> {
        vec![]
    }
    /// The method's own resumable state (PPO: the KL coefficient), kept in checkpoints.
    fn state(&self) -> Map<String, Value> {
        Map::new()
    }
    /// Restores [`Method::state`] from a checkpoint's state.
    fn restore(&mut self, _state: &Value) -> Result<()> {
        Ok(())
    }
    /// Whether the metrics lines get `tokens_per_s` and `elapsed_s` (PPO logs its per-phase
    /// times `time_*_s` instead).
    fn logs_throughput(&self) -> bool {
        true
    }
    /// The plot written at the end: file name and panels.
    fn plot(&self) -> (&'static str, Vec<PanelSpec>) {
        ("loss.png", vec![PanelSpec { y_label: "loss", line: ("loss", "train loss"), dots: Some(("eval_loss", "eval loss")) }])
    }
}

/// How a run went: steps, and the metrics of its first and last steps.
pub struct Record {
    pub steps: usize,
    pub first: Map<String, Value>,
    pub last: Map<String, Value>,
    pub peak_rss_bytes: Option<u64>,
}

impl Record {
    pub fn first(&self, key: &str) -> Option<f64> {
        self.first.get(key).and_then(Value::as_f64)
    }
    pub fn last(&self, key: &str) -> Option<f64> {
        self.last.get(key).and_then(Value::as_f64)
    }
}

/// The summary.json of a method that generates and is rewarded (PPO, GRPO).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct RewardSummary {
    pub out_dir: PathBuf,
    pub iterations: usize,
    pub first_reward_mean: Option<f64>,
    pub last_reward_mean: Option<f64>,
    pub last_kl_mean: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

impl RewardSummary {
    /// From the run's record (`reward_mean` and `kl_mean` of its metrics lines).
    pub fn new(out_dir: &Path, s: &Record) -> Self {
        Self {
            out_dir: out_dir.to_path_buf(),
            iterations: s.steps,
            first_reward_mean: s.first("reward_mean"),
            last_reward_mean: s.last("reward_mean"),
            last_kl_mean: s.last("kl_mean"),
            peak_rss_bytes: s.peak_rss_bytes,
        }
    }
}

/// A training run's claim on its output folder, and its loop.
pub struct Session<'c> {
    pub cfg: &'c TrainConfig,
    pub stage: &'static str,
    dir: OutDir,
    start: Start,
    ckpt: Option<(PathBuf, TrainState)>,
    finished: bool,
}

impl<'c> Session<'c> {
    /// Claims `out.dir` for a `stage` run (see the module doc). `inputs` are the run's input
    /// paths, each named by its flag or key: `--out` may neither be nor contain one.
    pub fn open(cfg: &'c TrainConfig, stage: &'static str, start: Start, inputs: &[(&str, &str)]) -> Result<Self> {
        let out = PathBuf::from(&cfg.out.dir);
        let inputs: Vec<(&str, &Path)> = inputs.iter().map(|(k, v)| (*k, Path::new(*v))).collect();
        crate::outdir::check_not_input(&out, "--out", &inputs)?;
        let dir = OutDir::lock(&out)?;
        let ckpts = checkpoint::list(&out)?;
        let has_run = RUN_FILES.iter().any(|f| out.join(f).exists());
        let shown = out.display();
        let (mut ckpt, mut finished) = (None, false);
        match start {
            Start::Resume => {
                let Some(last) = ckpts.last() else {
                    if has_run {
                        bail_kind!(Kind::NoCheckpoint, "--resume: {shown} holds a run that stopped before its first checkpoint: there is nothing to resume")
                    }
                    bail!("--resume: {shown} holds no run to resume (start one without --resume)")
                };
                let state = checkpoint::read_state(last)?;
                // Finished: summary and adapter written, and the last checkpoint is the final step.
                finished = out.join("summary.json").is_file()
                    && out.join(crate::peft::WEIGHTS_FILE).is_file()
                    && state.extra["total_steps"].as_u64().is_some_and(|t| state.step as u64 >= t);
                let diffs = super::config::differences(&state.config, cfg)?;
                if !diffs.is_empty() {
                    bail_kind!(
                        Kind::ConfigDiffers,
                        "--resume: the config differs from the one {shown} was started with ({}):\n  {}",
                        out.join("config.toml").display(),
                        diffs.join("\n  ")
                    )
                }
                ckpt = Some((last.clone(), state));
            }
            Start::Fresh => {
                if let Some(m) = dir.marker() {
                    if crate::outdir::family(&m.kind) != crate::outdir::family(stage) {
                        bail_kind!(Kind::NotLorafitOutput, "{shown} holds lorafit {} output, not a training run", m.kind)
                    }
                }
                if out.join("summary.json").is_file() {
                    bail_kind!(Kind::RunFinished, "output folder {shown} already holds a finished run")
                } else if let Some(last) = ckpts.last() {
                    bail_kind!(Kind::OutputHasRun, "output folder {shown} already holds an unfinished run (last checkpoint {})", last.display())
                } else if has_run {
                    bail_kind!(Kind::NoCheckpoint, "output folder {shown} holds a run that stopped before its first checkpoint")
                }
            }
            Start::Force => dir.check_replaceable(stage)?,
        }
        Ok(Self { cfg, stage, dir, start, ckpt, finished })
    }

    /// The output folder.
    pub fn out(&self) -> &Path {
        &self.dir.path
    }

    /// The checkpoint folder to load trainables from, when resuming.
    pub fn resume_dir(&self) -> Option<&Path> {
        self.ckpt.as_ref().map(|(d, _)| d.as_path())
    }

    /// On `--resume` of a run that already finished: its summary (nothing is run or written).
    pub fn finished<S: DeserializeOwned>(&self) -> Result<Option<S>> {
        if !self.finished {
            return Ok(None);
        }
        let p = self.out().join("summary.json");
        let s = serde_json::from_str(&std::fs::read_to_string(&p)?).with_context(|| format!("{}: cannot read the run's summary", p.display()))?;
        let steps = self.ckpt.as_ref().map(|(_, s)| s.step).unwrap_or(0);
        tracing::info!("{} holds a finished run ({steps} steps): nothing to resume; its summary is {}", self.out().display(), p.display());
        Ok(Some(s))
    }

    /// Trains `vars` (the adapter's, plus any head) with `method` to the configured step count,
    /// then exports `adapter` and the plot.
    pub fn train(&mut self, model: &Model, adapter: &Arc<Adapter>, vars: Vec<(String, Var)>, method: &mut dyn Method) -> Result<Record> {
        let (cfg, t) = (self.cfg, &self.cfg.train);
        let lens = method.lens();
        let per_step = method.batches_per_step();
        let total = if t.max_steps > 0 { t.max_steps } else { t.epochs * lens.len().div_ceil(t.batch_size).div_ceil(per_step) };

        // 1. The optimizer and the data cursor; on --resume, as the checkpoint left them.
        let mut tr = Trainer::new(AdamW::new(vars, t)?, LossScaler::new(model.dtype == candle_core::DType::F16), t, total);
        let (mut epoch, mut pos, mut tokens_seen) = (0, 0, 0u64);
        let (mut first, mut last) = (None::<Map<String, Value>>, None::<Map<String, Value>>);
        if let Some((dir, state)) = &self.ckpt {
            let extra = &state.extra;
            if let Ok(s) = serde_json::from_value::<LossScaler>(extra["loss_scaler"].clone()) {
                tr.scaler = s;
            }
            checkpoint::load_optimizer(dir, &mut tr.opt)?;
            for (a, r) in model.adapters.adapters.iter().zip(&state.dropout_rng) {
                a.set_dropout_rng(SeededRng::from_state(r)?);
            }
            (tr.step, epoch, pos, tokens_seen) = (state.step, state.epoch, state.batch_in_epoch, state.tokens_seen);
            tr.skipped = extra["skipped_steps"].as_u64().unwrap_or(0) as usize;
            first = extra["first"].as_object().cloned();
            last = extra["last"].as_object().cloned();
            method.restore(extra)?;
            tracing::info!("resuming from {} (step {})", dir.display(), state.step);
        }
        let mut cursor = Cursor::new(lens, t.batch_size, t.seed, method.group_by_length(), epoch, pos);

        // 2. From here on the folder is written: marker, config, metrics log.
        let out = self.dir.path.clone();
        if self.start == Start::Force {
            remove_run_files(&out)?;
        }
        self.dir.write_marker(self.stage, &[])?;
        crate::io::atomic_write(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        let metrics = MetricsLog::open(&out, self.ckpt.as_ref().map(|(_, s)| s.step))?;

        let progress = Progress::new(total, tr.step, t.log_every);
        let started = Instant::now();
        while tr.step < total {
            let t0 = Instant::now();
            // 3. The method's step over the next batches of the data stream.
            let batches = cursor.take(per_step);
            tr.begin_step();
            let lr = lr_at(t, tr.step, total);
            let s = method.step(&mut tr, &batches).map_err(|e| self.diverged(e))?;
            tr.step += 1;
            let step = tr.step;
            tokens_seen += s.tokens as u64;
            let tps = s.tokens as f64 / t0.elapsed().as_secs_f64();

            // 4. The metrics line; evaluation when due.
            let mut line = Map::new();
            line.insert("step".into(), step.into());
            line.insert("epoch".into(), cursor.epoch.into());
            line.extend(s.metrics);
            if method.logs_throughput() {
                line.insert("tokens_per_s".into(), tps.into());
                line.insert("elapsed_s".into(), started.elapsed().as_secs_f64().into());
            }
            if tr.scaler.enabled || tr.skipped_this_step() > 0 {
                line.insert("loss_scale".into(), tr.scaler.scale.into());
                line.insert("skipped_steps".into(), tr.skipped.into());
            }
            let do_eval = (t.eval_every > 0 && step % t.eval_every == 0) || step == total;
            let mut shown = format!("{}  lr {lr:.2e}  {tps:.0} tok/s", s.show);
            if do_eval {
                let ev = method.evaluate()?;
                if let Some((k, v)) = ev.iter().next() {
                    shown.push_str(&format!("  {k} {:.4}", v.as_f64().unwrap_or(f64::NAN)));
                }
                line.extend(ev);
            }
            if do_eval || step % t.log_every.max(1) == 0 || step == total {
                metrics.log(&Value::Object(line.clone()))?;
            }
            first.get_or_insert_with(|| line.clone());
            last = Some(line);
            progress.update(step, &shown);

            // 5. A checkpoint when due (and at the end).
            if (t.save_every > 0 && step % t.save_every == 0) || step == total {
                let mut extra = method.state();
                extra.insert("loss_scaler".into(), serde_json::to_value(&tr.scaler)?);
                extra.insert("skipped_steps".into(), tr.skipped.into());
                extra.insert("total_steps".into(), total.into());
                extra.insert("first".into(), first.clone().map(Value::Object).unwrap_or(Value::Null));
                extra.insert("last".into(), last.clone().map(Value::Object).unwrap_or(Value::Null));
                let state = TrainState {
                    step,
                    epoch: cursor.epoch,
                    batch_in_epoch: cursor.pos,
                    dropout_rng: model.adapters.adapters.iter().map(|a| a.dropout_rng().state()).collect(),
                    tokens_seen,
                    config: cfg.to_toml()?,
                    extra: Value::Object(extra),
                };
                tr.check_finite("before its checkpoint").map_err(|e| self.diverged(e))?;
                let aux = method.aux_tensors();
                checkpoint::save(&out, adapter, &cfg.model.name, &tr.opt, &state, t.keep_last, &method.extra_tensors(), &aux)?;
            }
        }
        drop(progress);

        // 6. The adapter (PEFT format) and the plot.
        tr.check_finite("before the export").map_err(|e| self.diverged(e))?;
        crate::peft::save_adapter(adapter, &out, &cfg.model.name, &method.extra_tensors())?;
        let (file, panels) = method.plot();
        let title = format!("{} {}  ({})", self.stage, out.display(), cfg.model.name);
        plot::write_metrics_png(&out.join(file), &title, &panels, &metrics.read()?)?;
        Ok(Record { steps: tr.step, first: first.unwrap_or_default(), last: last.unwrap_or_default(), peak_rss_bytes: peak_rss_bytes() })
    }

    /// A diverged run's error, with where its last finite checkpoint is.
    fn diverged(&self, e: anyhow::Error) -> anyhow::Error {
        if crate::error::kind_of(&e) != Some(Kind::Diverged) {
            return e;
        }
        let kept = match checkpoint::list(self.out()).ok().and_then(|mut l| l.pop()) {
            Some(c) => format!("the last finite checkpoint is {}", c.display()),
            None => "there is no checkpoint yet".into(),
        };
        e.context(format!("{} stopped: no adapter was written; {kept}", self.stage))
    }

    /// The commands that try an adapter run's output: generate with it, merge it.
    pub fn try_adapter(&self) -> Vec<String> {
        let (m, o) = (shell_word(&self.cfg.model.name), shell_word(&self.out().display().to_string()));
        vec![
            format!("lorafit generate --model {m} --adapter {o} --prompt \"...\""),
            format!("lorafit merge --model {m} --adapter {o} --out {}", shell_word(&format!("{}-merged", self.out().display()))),
        ]
    }

    /// Writes `summary.json` and says where the output is and what to run next.
    pub fn finish<S: Serialize>(&self, summary: &S, headline: &str, next: &[String]) -> Result<()> {
        crate::io::atomic_write(&self.out().join("summary.json"), serde_json::to_string_pretty(summary)?.as_bytes())?;
        tracing::info!("done: {headline}");
        tracing::info!("output in {}", self.out().display());
        for n in next {
            tracing::info!("next: {n}");
        }
        Ok(())
    }
}

/// `s` as one shell word (quoted when it holds anything but plain path characters).
pub fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_./:=@+-".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
