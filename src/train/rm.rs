//! `lorafit rm`: a reward model from ranked answers — a new LoRA adapter and a scalar head on
//! the shared base, trained with the pairwise loss `-log σ(r_chosen - r_rejected - margin)`.
//!
//! A prompt with K ranked completions gives its C(K,2) ordered pairs (ties give none). All the
//! completions of a prompt go into the same micro-batch (each scored once, at the last real
//! token of `template(prompt) + completion + eos`, the SFT template), and each pair weighs
//! 1/(pairs of its prompt), so one prompt counts once (InstructGPT §3.5's remedy for
//! overfitting; KoChatGPT shuffled the pairs of a prompt apart). The step loss is the mean
//! over the step's prompts.
//!
//! With `rm.sft_adapter`, the SFT adapter is *stacked* (frozen) under the new one rather than
//! merged: merging would need a modified copy of every adapted weight, while stacking keeps
//! the one frozen base that PPO's four roles share. `lorafit.json` records the stack.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::Serialize;
use serde_json::{Map, Value};

use super::config::TrainConfig;
use super::looper::{train_loop, Method, MicroOut, RunDir};
use super::sft::lora_config;
use super::{forward_backward, GradAccum, Setup, Start};
use crate::data::{read_ranked, RankedRow};
use crate::lora::Adapter;
use crate::model::Model;
use crate::reward::{pad_batch, RewardHead, SCORE_KEY};
use crate::runtime::fmt_bytes;
use crate::template::Template;
use crate::tokenizer::Tokenizer;

/// A prompt's completions, tokenized (`template(prompt) ++ completion ++ eos`), and its pairs.
pub struct RankedExample {
    pub seqs: Vec<Vec<u32>>,
    pub pairs: Vec<(usize, usize)>,
}

/// Tokenizes ranked rows; sequences longer than `max_len` keep their end (the completion and
/// eos, where the reward is read) and lose prompt tokens from the left. Returns the count cut.
pub fn prepare(rows: &[RankedRow], tok: &Tokenizer, template: &Template, max_len: usize) -> Result<(Vec<RankedExample>, usize)> {
    let eos = tok.eos_id.ok_or_else(|| anyhow::anyhow!("the tokenizer has no end-of-sequence token: set eos_token_id in config.json"))?;
    let mut truncated = 0;
    let mut out = vec![];
    for row in rows {
        let p = tok.encode(&template.render(&row.prompt))?;
        let mut seqs = vec![];
        for c in &row.completions {
            let mut s = p.clone();
            s.extend(tok.encode_plain(c)?);
            s.push(eos);
            if s.len() > max_len {
                truncated += 1;
                s.drain(..s.len() - max_len);
            }
            seqs.push(s);
        }
        out.push(RankedExample { seqs, pairs: row.pairs.clone() });
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

/// The reward model as a [`Method`] of the shared loop.
struct Rm<'a> {
    model: &'a Model,
    head: &'a RewardHead,
    train: &'a [RankedExample],
    eval: &'a [RankedExample],
    pad: u32,
    cfg: &'a TrainConfig,
}

impl Rm<'_> {
    /// Rewards of every completion of `exs` (one forward), through `f` for the graph.
    fn batch(&self, exs: &[&RankedExample]) -> Result<(Tensor, Tensor, Tensor, Vec<usize>, usize)> {
        let seqs: Vec<Vec<u32>> = exs.iter().flat_map(|e| e.seqs.iter().cloned()).collect();
        let tokens = seqs.iter().map(Vec::len).sum();
        let (ids, pos, mask, last) = pad_batch(&seqs, self.pad, &self.model.device)?;
        Ok((ids, pos, mask, last, tokens))
    }
}

impl Method for Rm<'_> {
    fn lens(&self) -> Vec<usize> {
        self.train.iter().map(|e| e.seqs.iter().map(Vec::len).max().unwrap_or(0)).collect()
    }

    fn weight(&self, items: &[usize]) -> f64 {
        items.len() as f64
    }

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

    fn step_metrics(&self, sums: &[(&'static str, f64)], _: f64) -> Map<String, Value> {
        let get = |k: &str| sums.iter().find(|(n, _)| *n == k).map(|(_, v)| *v).unwrap_or(0.0);
        let n = get("pairs").max(1.0);
        let mut m = Map::new();
        m.insert("accuracy".into(), (get("correct") / n).into());
        m.insert("margin".into(), (get("margin") / n).into());
        m
    }

    fn evaluate(&self) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        if self.eval.is_empty() {
            return Ok(m);
        }
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

    fn extra_tensors(&self) -> Vec<(String, Tensor)> {
        vec![(SCORE_KEY.to_string(), self.head.weight.clone())]
    }
}

#[derive(Debug, Serialize)]
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
    // 1. Check everything before anything is written.
    let cfg = &cfg.for_stage("rm");
    let run = RunDir::open(cfg, start)?;
    let setup = Setup::new(cfg)?;
    let (template, device, arch, tok) = (&setup.template, &setup.device, &setup.arch, &setup.tok);

    // 2. Data: ranked rows -> tokenized completions + pairs; held-out prompts for eval.
    let (rows, skipped) = read_ranked(Path::new(&cfg.data.path), cfg.data.skip_bad_rows)?;
    let max_len = cfg.data.max_len.min(arch.max_positions());
    let (mut all, truncated) = prepare(&rows, tok, template, max_len)?;
    let pairs: usize = all.iter().map(|e| e.pairs.len()).sum();
    let eval = if !cfg.data.eval_path.is_empty() {
        let (erows, _) = read_ranked(Path::new(&cfg.data.eval_path), cfg.data.skip_bad_rows)?;
        prepare(&erows, tok, template, max_len)?.0
    } else {
        let held = super::held_out(all.len(), cfg.data.eval_fraction, cfg.train.seed);
        let (mut tr, mut ev) = (vec![], vec![]);
        for (i, e) in all.drain(..).enumerate() {
            if held.contains(&i) { ev.push(e) } else { tr.push(e) }
        }
        all = tr;
        ev
    };
    if all.is_empty() {
        bail!("{}: no training prompts left after the eval split", cfg.data.path)
    }
    tracing::info!("data: {} prompts, {pairs} pairs -> {} train / {} eval prompts; {truncated} sequences truncated, {skipped} bad rows skipped", rows.len(), all.len(), eval.len());

    // 3. The model: [SFT adapter, frozen] + new reward adapter + head.
    let mut adapters = vec![];
    let mut stack: Vec<PathBuf> = vec![];
    if !cfg.rm.sft_adapter.is_empty() {
        let p = PathBuf::from(&cfg.rm.sft_adapter);
        adapters.push(crate::peft::load_adapter(&p, "sft", 1.0, false)?);
        stack.push(p);
    }
    let (adapter, head) = match run.resume_dir() {
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

    // 4. The shared loop.
    let method = Rm { model: &model, head: &head, train: &all, eval: &eval, pad: tok.padding_id(), cfg };
    let s = train_loop(cfg, &run, &model, &adapter, vars, &method)?;
    if !stack.is_empty() {
        crate::peft::write_stack(&run.out, &stack)?;
    }

    // 5. The run's record.
    let ev = |k: &str| s.final_eval.get(k).and_then(Value::as_f64);
    let summary = RmSummary {
        out_dir: run.out.clone(),
        steps: s.steps,
        prompts: rows.len(),
        pairs,
        truncated,
        skipped_bad: skipped,
        final_loss: s.final_loss,
        eval_accuracy: ev("eval_accuracy"),
        eval_margin: ev("eval_margin"),
        peak_rss_bytes: s.peak_rss_bytes,
    };
    crate::io::atomic_write(&run.out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    tracing::info!(
        "done: {} steps, held-out accuracy {}, margin {}, peak memory {}; reward model in {}",
        s.steps,
        summary.eval_accuracy.map(|a| format!("{a:.3}")).unwrap_or("-".into()),
        summary.eval_margin.map(|a| format!("{a:.3}")).unwrap_or("-".into()),
        s.peak_rss_bytes.map(fmt_bytes).unwrap_or("n/a".into()),
        run.out.display()
    );
    Ok(summary)
}
