//! `lorafit sft`: supervised fine-tuning of a LoRA adapter on prompt/completion pairs and conversations.
//!
//! Each row is rendered by `render::Renderer` (what `lorafit render` shows): a prompt/completion
//! row on a model without a chat template becomes `template(prompt) ++ completion ++ eos`, a
//! conversation (`messages`, ShareGPT) goes through the chat template with its assistant turns
//! learned (`data.train_on`). The loss is the mean over the learned tokens (completion and
//! eos, or assistant turns and their end-of-turn; the rest is masked) of `-log p(token | prefix)`,
//! normalised by the learned-token count of the whole optimizer step (all accumulated
//! micro-batches), so accumulation gives the same gradient as one big batch.
//! Only positions that carry a label reach the LM head, through the fused chunked
//! head + cross-entropy (`ops::lm_head_cross_entropy`).
//! The output folder, checkpoints, the optimizer and the export are the session's
//! (`session.rs`); this file is the data and the step.
//! References: KoChatGPT `train_sft.py` (what it does), TRL `SFTTrainer` (completion-only loss),
//! nanoGPT `train.py` (the loop).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use super::batch::{eval_loss, label_nll_sum, lora_config, make_batch, Batch, SftExample};
use super::batch::{evaluating, split_held_out};
use super::config::TrainConfig;
use super::session::{shell_word, Method, MicroOut, Session, StepOut, Trainer};
use super::{forward_backward, GradAccum, Setup, Start};
use crate::data::{read_stage, Example, Loc, SftRow, Stage};
use crate::lora::Adapter;
use crate::model::Model;
use crate::render::{RenderConfig, Renderer, TemplateRecord};
use crate::runtime::fmt_bytes;
use crate::template::Template;
use crate::tokenizer::Tokenizer;

/// What happened to the rows on the way to examples.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrepStats {
    pub rows: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub skipped_bad: usize,
}

/// Tokenizes prompt/completion rows through the `{prompt}` template (see [`prepare_examples`]).
/// Too-long rows lose prompt tokens from the left first (the prompt keeps at least half the
/// window if it has that many), then completion tokens from the right (the eos goes with them:
/// a cut answer must not teach stopping). A row with no completion token left is dropped.
pub fn prepare(rows: &[SftRow], tok: &Tokenizer, template: &Template, max_len: usize, strip_quote: bool) -> Result<(Vec<SftExample>, PrepStats)> {
    let cfg = RenderConfig { max_len, strip_leading_quote: strip_quote, ..Default::default() };
    let r = Renderer::with_prompt_template(tok, template.clone(), cfg)?;
    let exs: Vec<Example> = rows.iter().map(|row| Example::Completion { prompt: row.prompt.clone(), completion: row.completion.clone() }).collect();
    let (out, mut stats) = prepare_examples(exs.iter().map(|e| (None, e)), &r)?;
    stats.rows = rows.len();
    Ok((out, stats))
}

/// Examples through the one renderer every stage uses (`render.rs`, what `lorafit render`
/// shows): prompt/completion rows as `template(prompt) ++ completion ++ eos` on a model
/// without a chat template, conversations through the chat template with the assistant turns
/// of `data.train_on` learned. A sequence left with no learned token is dropped and counted.
pub fn prepare_examples<'e>(exs: impl Iterator<Item = (Option<&'e Loc>, &'e Example)>, r: &Renderer) -> Result<(Vec<SftExample>, PrepStats)> {
    let mut stats = PrepStats::default();
    let mut out = vec![];
    for (loc, ex) in exs {
        stats.rows += 1;
        let mut seqs = r.encode_example(ex).with_context(|| loc.map(|l| l.to_string()).unwrap_or_default())?;
        let e = seqs.pop().context("a training row gave no sequence")?;
        stats.truncated += usize::from(e.truncated());
        if e.learned() == 0 {
            stats.dropped += 1;
            continue;
        }
        let learned = e.learned_spans();
        out.push(SftExample { ids: e.ids, learned });
    }
    Ok((out, stats))
}

/// What a finished run reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct SftSummary {
    pub out_dir: PathBuf,
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_perplexity: Option<f64>,
    pub prep: PrepStats,
    pub peak_rss_bytes: Option<u64>,
}

/// SFT as a [`Method`] of the training session.
struct Sft<'a> {
    model: &'a Model,
    train: &'a [SftExample],
    eval: &'a [SftExample],
    pad: u32,
    cfg: &'a TrainConfig,
}

impl Sft<'_> {
    /// Forward and backward of one micro-batch; its loss is the NLL sum over `denom`.
    fn micro_step(&self, items: &[usize], denom: f64, vars: &[(String, Var)], acc: &mut GradAccum) -> Result<MicroOut> {
        let exs: Vec<&SftExample> = items.iter().map(|&i| &self.train[i]).collect();
        let b = make_batch(&exs, self.pad, &self.model.device)?;
        let t = &self.cfg.train;
        let loss_fn = |h: &Tensor| -> Result<Tensor> { Ok((label_nll_sum(self.model, h, &b, t.loss_chunk)? / denom)?) };
        let loss = forward_backward(self.model, &b.ids, &b.pos, b.mask.clone(), t.grad_checkpointing, &loss_fn, vars, acc)?;
        Ok(MicroOut { loss, tokens: b.tokens, sums: vec![] })
    }
}

impl Method for Sft<'_> {
    fn lens(&self) -> Vec<usize> {
        self.train.iter().map(|e| e.ids.len()).collect()
    }

    fn batches_per_step(&self) -> usize {
        self.cfg.train.grad_accum
    }

    fn group_by_length(&self) -> bool {
        self.cfg.train.group_by_length
    }

    fn step(&mut self, tr: &mut Trainer, batches: &[Vec<usize>]) -> Result<StepOut> {
        // Normalised by the learned tokens of the whole step.
        let weight = |items: &[usize]| items.iter().map(|&i| self.train[i].n_targets()).sum::<usize>() as f64;
        let a = tr.accumulate(batches, weight, |items, denom, vars, acc| self.micro_step(items, denom, vars, acc))?;
        Ok(StepOut { metrics: a.metrics(), show: format!("loss {:.4}", a.loss), tokens: a.tokens })
    }

    fn evaluate(&self) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        if !self.eval.is_empty() {
            let t = &self.cfg.train;
            let (l, _) = evaluating(self.model, || eval_loss(self.model, self.eval, t.batch_size, self.pad, t.loss_chunk))?;
            m.insert("eval_loss".into(), l.into());
            m.insert("eval_ppl".into(), l.exp().into());
        }
        Ok(m)
    }
}

/// Reads, renders and splits the SFT data (train, eval), with the row statistics and the
/// template record of what rendered them.
fn load_data(cfg: &TrainConfig, setup: &Setup, max_len: usize) -> Result<(Vec<SftExample>, Vec<SftExample>, PrepStats, TemplateRecord)> {
    let mut rc = RenderConfig::from_data(&cfg.data)?;
    rc.max_len = max_len;
    let r = Renderer::new(&setup.tok, &setup.files.dir, rc)?;
    let read = read_stage(Path::new(&cfg.data.path), Stage::Sft, cfg.data.skip_bad_rows)?;
    let (all, mut prep) = prepare_examples(read.rows.iter().map(|(l, e)| (Some(l), e)), &r)?;
    prep.skipped_bad = read.skipped_bad;
    let mut used = (read.rows.iter().any(|(_, e)| !r.uses_chat(e)), read.rows.iter().any(|(_, e)| r.uses_chat(e)));
    let (train, mut eval) = if !cfg.data.eval_path.is_empty() {
        let eread = read_stage(Path::new(&cfg.data.eval_path), Stage::Sft, cfg.data.skip_bad_rows)?;
        used.0 |= eread.rows.iter().any(|(_, e)| !r.uses_chat(e));
        used.1 |= eread.rows.iter().any(|(_, e)| r.uses_chat(e));
        (all, prepare_examples(eread.rows.iter().map(|(l, e)| (Some(l), e)), &r)?.0)
    } else {
        split_held_out(all, cfg.data.eval_fraction, cfg.train.seed)
    };
    if train.is_empty() {
        bail!("{}: no training examples left ({} rows, {} dropped)", cfg.data.path, prep.rows, prep.dropped)
    }
    eval.sort_by_key(|e| e.ids.len());
    let format = match (read.sft_format, read.conversations) {
        (Some(f), 0) => format!("{f:?}"),
        (Some(f), n) => format!("{f:?} + {n} conversations"),
        (None, _) => "conversations".into(),
    };
    tracing::info!(
        "data: {} rows ({format} format; {}) -> {} train / {} eval examples; {} truncated, {} dropped, {} bad rows skipped",
        prep.rows, r.describe(), train.len(), eval.len(), prep.truncated, prep.dropped, prep.skipped_bad
    );
    Ok((train, eval, prep, r.record(used.0, used.1)))
}

/// Runs (or resumes) SFT as configured.
pub fn run(cfg: &TrainConfig, start: Start) -> Result<SftSummary> {
    let _span = tracing::info_span!("sft").entered();
    // 1. Claim the output folder and check everything before anything is written.
    let cfg = &cfg.for_stage("sft");
    let inputs = [("--model", cfg.model.name.as_str()), ("--data", &cfg.data.path), ("data.eval_path", &cfg.data.eval_path)];
    let mut session = Session::open(cfg, "sft", start, &inputs)?;
    if let Some(done) = session.finished()? {
        return Ok(done);
    }
    let setup = Setup::new(cfg)?;
    let (arch, tok) = (&setup.arch, &setup.tok);

    // 2. Data: rows -> tokenized examples (prompt masked, eos learned); a held-out split.
    let (train, eval, prep, record) = load_data(cfg, &setup, cfg.data.max_len.min(arch.max_positions()))?;

    // 3. The model with the adapter attached at construction: new, or the checkpoint's.
    let adapter = match session.resume_dir() {
        Some(dir) => crate::peft::load_adapter(dir, "sft", 1.0, true)?,
        None => Adapter::fresh("sft", lora_config(cfg, arch), cfg.train.seed)?,
    };
    let model = setup.load_model(vec![adapter.clone()])?;
    model.adapters.set_training(true);

    // 4. The session's loop: accumulation, AdamW, schedule, eval, metrics, checkpoints, export.
    let mut method = Sft { model: &model, train: &train, eval: &eval, pad: tok.padding_id(), cfg };
    let s = session.train(&model, &adapter, adapter.vars(), &mut method)?;
    record.write(session.out())?;

    // 5. The run's record, and what to do with the adapter.
    let eval_loss = s.last("eval_loss");
    let summary = SftSummary {
        out_dir: session.out().to_path_buf(),
        steps: s.steps,
        first_loss: s.first("loss"),
        final_loss: s.last("loss"),
        eval_loss,
        eval_perplexity: eval_loss.map(f64::exp),
        prep,
        peak_rss_bytes: s.peak_rss_bytes,
    };
    let headline = format!(
        "{} steps, loss {:.4} -> {:.4}, eval loss {}, peak memory {} (process RSS)",
        s.steps,
        summary.first_loss.unwrap_or(f64::NAN),
        summary.final_loss.unwrap_or(f64::NAN),
        eval_loss.map(|e| format!("{e:.4} (ppl {:.2})", e.exp())).unwrap_or("-".into()),
        s.peak_rss_bytes.map(fmt_bytes).unwrap_or("n/a".into()),
    );
    let mut next = session.try_adapter();
    let (m, o) = (shell_word(&cfg.model.name), shell_word(&session.out().display().to_string()));
    next.push(format!("lorafit rm --model {m} --sft-adapter {o} --data RANKINGS.jsonl   (a reward model on top)"));
    session.finish(&summary, &headline, &next)?;
    Ok(summary)
}
