//! `lorafit rm`: a reward model from ranked answers — a new LoRA adapter and a scalar head on
//! the shared base, trained with the pairwise loss `-log σ(r_chosen - r_rejected - margin)`.
//!
//! A prompt with K ranked completions gives its C(K,2) ordered pairs (ties give none). All the
//! completions of a prompt go into the same micro-batch (each scored once, at the last real
//! token of `template(prompt) + completion + eos`, the SFT template; for conversational rows,
//! at the end-of-turn token after the answer, both rendered by `render::Renderer::encode_reward`), and each pair weighs
//! 1/(pairs of its prompt), so one prompt counts once (InstructGPT §3.5's remedy for
//! overfitting; KoChatGPT shuffled the pairs of a prompt apart). The step loss is the mean
//! over the step's prompts.
//!
//! With `rm.sft_adapter`, the SFT adapter is *stacked* (frozen) under the new one rather than
//! merged: merging would need a modified copy of every adapted weight, while stacking keeps
//! the one frozen base that PPO's four roles share. `lorafit.json` records the stack.
//! The output folder, checkpoints, the optimizer and the export are the session's.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::batch::{evaluating, lora_config, split_held_out};
use super::config::TrainConfig;
use super::session::{shell_word, Method, MicroOut, Session, StepOut, Trainer};
use super::{forward_backward, GradAccum, Setup, Start};
use crate::data::{read_stage, Completion, Example, Loc, Prompt, RankedRow, Stage};
use crate::lora::Adapter;
use crate::model::Model;
use crate::render::{RenderConfig, Renderer};
use crate::reward::{pad_batch, RewardHead, SCORE_KEY};
use crate::runtime::fmt_bytes;
use crate::template::Template;
use crate::tokenizer::Tokenizer;

/// A prompt's completions, tokenized (`template(prompt) ++ completion ++ eos`), and its pairs.
pub struct RankedExample {
    pub seqs: Vec<Vec<u32>>,
    pub pairs: Vec<(usize, usize)>,
}

/// Tokenizes ranked rows through the `{prompt}` template (see [`prepare_examples`]).
pub fn prepare(rows: &[RankedRow], tok: &Tokenizer, template: &Template, max_len: usize) -> Result<(Vec<RankedExample>, usize)> {
    let cfg = RenderConfig { max_len, ..Default::default() };
    let r = Renderer::with_prompt_template(tok, template.clone(), cfg)?;
    let exs: Vec<Example> = rows
        .iter()
        .map(|row| Example::Ranked { prompt: Prompt::Text(row.prompt.clone()), completions: row.completions.iter().cloned().map(Completion::Text).collect(), pairs: row.pairs.clone() })
        .collect();
    prepare_examples(exs.iter().map(|e| (None, e)), &r)
}

/// Ranked rows through the one renderer every stage uses ([`Renderer::encode_reward`], what
/// `lorafit render --stage rm` shows): each completion's sequence ends where its reward is
/// read (eos, or the chat template's end-of-turn); a too-long one keeps its end. Returns the
/// examples and the number of sequences cut.
pub fn prepare_examples<'e>(exs: impl Iterator<Item = (Option<&'e Loc>, &'e Example)>, r: &Renderer) -> Result<(Vec<RankedExample>, usize)> {
    let mut truncated = 0;
    let mut out = vec![];
    for (loc, ex) in exs {
        let seqs = r.encode_reward(ex).with_context(|| loc.map(|l| l.to_string()).unwrap_or_default())?;
        truncated += seqs.iter().filter(|e| e.truncated()).count();
        let Example::Ranked { pairs, .. } = ex else { anyhow::bail!("{}: not a ranked/pair row", loc.map(|l| l.to_string()).unwrap_or_default()) };
        out.push(RankedExample { seqs: seqs.into_iter().map(|e| e.ids).collect(), pairs: pairs.clone() });
    }
    Ok((out, truncated))
}

/// Pairwise loss and statistics of one group of prompts from their rewards.
/// Returns (Σ_prompts Σ_pairs w·loss as a tensor, correct pairs, pairs, Σ margins).
fn pair_loss(r: &Tensor, exs: &[&RankedExample], margin: f64) -> Result<(Tensor, f64, f64, f64)> {
    let (mut ci, mut ri, mut w) = (vec![], vec![], vec![]);
    let mut offset = 0u32;
    for e in exs {
        for &(c, j) in &e.pairs {
            ci.push(offset + c as u32);
            ri.push(offset + j as u32);
            w.push(1.0 / e.pairs.len() as f32);
        }
        offset += e.seqs.len() as u32;
    }
    let dev = r.device();
    let (ci, ri) = (Tensor::new(ci.as_slice(), dev)?, Tensor::new(ri.as_slice(), dev)?);
    let diff = (r.index_select(&ci, 0)? - r.index_select(&ri, 0)?)?; // (P,)
    // -log σ(d - m) = softplus(m - d).
    let loss = (crate::ops::softplus(&(diff.neg()? + margin)?)? * Tensor::new(w.as_slice(), dev)?)?.sum_all()?;
    let d: Vec<f32> = diff.detach().to_vec1()?;
    let correct = d.iter().filter(|&&x| x > 0.0).count() as f64;
    Ok((loss, correct, d.len() as f64, d.iter().map(|&x| x as f64).sum()))
}

/// The reward model as a [`Method`] of the training session.
struct Rm<'a> {
    model: &'a Model,
    head: &'a RewardHead,
    train: &'a [RankedExample],
    eval: &'a [RankedExample],
    pad: u32,
    cfg: &'a TrainConfig,
}

impl Rm<'_> {
    /// The padded batch of every completion of `exs`, where each ends, and its token count.
    fn batch(&self, exs: &[&RankedExample]) -> Result<(Tensor, Tensor, Tensor, Vec<usize>, usize)> {
        let seqs: Vec<Vec<u32>> = exs.iter().flat_map(|e| e.seqs.iter().cloned()).collect();
        let tokens = seqs.iter().map(Vec::len).sum();
        let (ids, pos, mask, last) = pad_batch(&seqs, self.pad, &self.model.device)?;
        Ok((ids, pos, mask, last, tokens))
    }

    /// Forward and backward of the prompts `items`: all their completions in one batch.
    fn micro_step(&self, items: &[usize], denom: f64, vars: &[(String, Var)], acc: &mut GradAccum) -> Result<MicroOut> {
        let exs: Vec<&RankedExample> = items.iter().map(|&i| &self.train[i]).collect();
        let (ids, pos, mask, last, tokens) = self.batch(&exs)?;
        let stats = RefCell::new((0.0, 0.0, 0.0));
        let loss_fn = |h: &Tensor| -> Result<Tensor> {
            let r = self.head.rewards(h, &last)?;
            let (loss, correct, n, margin) = pair_loss(&r, &exs, self.cfg.rm.margin)?;
            *stats.borrow_mut() = (correct, n, margin);
            Ok((loss / denom)?)
        };
        let loss = forward_backward(self.model, &ids, &pos, mask, self.cfg.train.grad_checkpointing, &loss_fn, vars, acc)?;
        let (correct, n, margin) = stats.into_inner();
        Ok(MicroOut { loss, tokens, sums: vec![("correct", correct), ("pairs", n), ("margin", margin)] })
    }

    /// Pairwise loss, accuracy and margin on the held-out prompts.
    fn eval_metrics(&self) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        let (mut loss, mut correct, mut n, mut margin) = (0.0, 0.0, 0.0, 0.0);
        for group in self.eval.chunks(self.cfg.train.batch_size) {
            let exs: Vec<&RankedExample> = group.iter().collect();
            let (ids, pos, mask, last, _) = self.batch(&exs)?;
            let h = self.model.hidden(&ids, &pos, &mask, None)?;
            let r = self.head.rewards(&h, &last)?.detach();
            let (l, c, k, mg) = pair_loss(&r, &exs, self.cfg.rm.margin)?;
            loss += l.to_scalar::<f32>()? as f64;
            (correct, n, margin) = (correct + c, n + k, margin + mg);
        }
        m.insert("eval_accuracy".into(), (correct / n.max(1.0)).into());
        m.insert("eval_loss".into(), (loss / self.eval.len() as f64).into());
        m.insert("eval_margin".into(), (margin / n.max(1.0)).into());
        Ok(m)
    }
}

impl Method for Rm<'_> {
    fn lens(&self) -> Vec<usize> {
        self.train.iter().map(|e| e.seqs.iter().map(Vec::len).max().unwrap_or(0)).collect()
    }

    fn batches_per_step(&self) -> usize {
        self.cfg.train.grad_accum
    }

    fn group_by_length(&self) -> bool {
        self.cfg.train.group_by_length
    }

    fn step(&mut self, tr: &mut Trainer, batches: &[Vec<usize>]) -> Result<StepOut> {
        // Normalised by the prompts of the whole step: each prompt counts once.
        let a = tr.accumulate(batches, |items| items.len() as f64, |items, denom, vars, acc| self.micro_step(items, denom, vars, acc))?;
        let n = a.sum("pairs").max(1.0);
        let mut m = a.metrics();
        m.insert("accuracy".into(), (a.sum("correct") / n).into());
        m.insert("margin".into(), (a.sum("margin") / n).into());
        Ok(StepOut { metrics: m, show: format!("loss {:.4}", a.loss), tokens: a.tokens })
    }

    fn evaluate(&self) -> Result<Map<String, Value>> {
        if self.eval.is_empty() {
            return Ok(Map::new());
        }
        evaluating(self.model, || self.eval_metrics())
    }

    fn extra_tensors(&self) -> Vec<(String, Tensor)> {
        vec![(SCORE_KEY.to_string(), self.head.weight.clone())]
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RmSummary {
    pub out_dir: PathBuf,
    pub steps: usize,
    pub prompts: usize,
    pub pairs: usize,
    pub truncated: usize,
    pub skipped_bad: usize,
    pub final_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_margin: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

/// Runs (or resumes) reward-model training as configured.
pub fn run(cfg: &TrainConfig, start: Start) -> Result<RmSummary> {
    let _span = tracing::info_span!("rm").entered();
    // 1. Claim the output folder and check everything before anything is written.
    let cfg = &cfg.for_stage("rm");
    let inputs = [
        ("--model", cfg.model.name.as_str()),
        ("--data", &cfg.data.path),
        ("data.eval_path", &cfg.data.eval_path),
        ("--sft-adapter", &cfg.rm.sft_adapter),
    ];
    let mut session = Session::open(cfg, "rm", start, &inputs)?;
    if let Some(done) = session.finished()? {
        return Ok(done);
    }
    let setup = Setup::new(cfg)?;
    let (device, arch, tok) = (&setup.device, &setup.arch, &setup.tok);

    // 2. Data: ranked rows -> rendered completions + pairs; held-out prompts for eval.
    let mut rc = RenderConfig::from_data(&cfg.data)?;
    rc.max_len = cfg.data.max_len.min(arch.max_positions());
    let r = Renderer::new(tok, &setup.files.dir, rc)?;
    let read = read_stage(Path::new(&cfg.data.path), Stage::Preference, cfg.data.skip_bad_rows)?;
    let (rows, skipped) = (&read.rows, read.skipped_bad);
    let mut used = (rows.iter().any(|(_, e)| !r.uses_chat(e)), rows.iter().any(|(_, e)| r.uses_chat(e)));
    let (all, truncated) = prepare_examples(rows.iter().map(|(l, e)| (Some(l), e)), &r)?;
    let pairs: usize = all.iter().map(|e| e.pairs.len()).sum();
    let (train, eval) = if !cfg.data.eval_path.is_empty() {
        let eread = read_stage(Path::new(&cfg.data.eval_path), Stage::Preference, cfg.data.skip_bad_rows)?;
        used.0 |= eread.rows.iter().any(|(_, e)| !r.uses_chat(e));
        used.1 |= eread.rows.iter().any(|(_, e)| r.uses_chat(e));
        (all, prepare_examples(eread.rows.iter().map(|(l, e)| (Some(l), e)), &r)?.0)
    } else {
        split_held_out(all, cfg.data.eval_fraction, cfg.train.seed)
    };
    if train.is_empty() {
        bail!("{}: no training prompts left after the eval split", cfg.data.path)
    }
    tracing::info!(
        "data: {} prompts ({}), {pairs} pairs -> {} train / {} eval prompts; {truncated} sequences truncated, {skipped} bad rows skipped",
        rows.len(),
        r.describe(),
        train.len(),
        eval.len()
    );

    // 3. The model: [SFT adapter, frozen] + new reward adapter + head.
    let mut adapters = vec![];
    let mut stack: Vec<PathBuf> = vec![];
    if !cfg.rm.sft_adapter.is_empty() {
        let p = PathBuf::from(&cfg.rm.sft_adapter);
        adapters.push(crate::peft::load_adapter(&p, "sft", 1.0, false)?);
        stack.push(p);
    }
    let (adapter, head) = match session.resume_dir() {
        Some(dir) => {
            let (mut a, h) = crate::reward::load_reward_adapter(dir, "rm", true)?;
            let rm = a.pop().unwrap();
            (rm, RewardHead::from_tensor(h, true, arch.hidden_size(), device)?)
        }
        None => {
            let mut lc = lora_config(cfg, arch);
            lc.task_type = Some("SEQ_CLS".into());
            lc.modules_to_save = Some(vec!["score".into()]);
            (Adapter::fresh("rm", lc, cfg.train.seed)?, RewardHead::fresh(arch.hidden_size(), cfg.train.seed, device)?)
        }
    };
    adapters.push(adapter.clone());
    let model = setup.load_model(adapters)?;
    model.adapters.set_training(true);
    let mut vars = adapter.vars();
    vars.push((SCORE_KEY.to_string(), head.var.clone().expect("a trainable head")));

    // 4. The session's loop, then the stack the adapter sits on.
    let mut method = Rm { model: &model, head: &head, train: &train, eval: &eval, pad: tok.padding_id(), cfg };
    let s = session.train(&model, &adapter, vars, &mut method)?;
    if !stack.is_empty() {
        crate::peft::write_stack(session.out(), &stack)?;
    }
    r.record(used.0, used.1).write(session.out())?;

    // 5. The run's record, and what to do with the reward model.
    let summary = RmSummary {
        out_dir: session.out().to_path_buf(),
        steps: s.steps,
        prompts: rows.len(),
        pairs,
        truncated,
        skipped_bad: skipped,
        final_loss: s.last("loss"),
        eval_accuracy: s.last("eval_accuracy"),
        eval_margin: s.last("eval_margin"),
        peak_rss_bytes: s.peak_rss_bytes,
    };
    let headline = format!(
        "{} steps, held-out accuracy {}, margin {}, peak memory {}",
        s.steps,
        summary.eval_accuracy.map(|a| format!("{a:.3}")).unwrap_or("-".into()),
        summary.eval_margin.map(|a| format!("{a:.3}")).unwrap_or("-".into()),
        s.peak_rss_bytes.map(fmt_bytes).unwrap_or("n/a".into()),
    );
    let (m, o) = (shell_word(&cfg.model.name), shell_word(&session.out().display().to_string()));
    let sft = if cfg.rm.sft_adapter.is_empty() { "SFT_ADAPTER".to_string() } else { shell_word(&cfg.rm.sft_adapter) };
    let next = [
        format!("lorafit score --model {m} --adapter {o} --data ANSWERS.jsonl"),
        format!("lorafit ppo --model {m} --sft-adapter {sft} --reward-adapter {o} --data PROMPTS.jsonl"),
    ];
    session.finish(&summary, &headline, &next)?;
    Ok(summary)
}
