//! `lorafit sft`: supervised fine-tuning of a LoRA adapter on prompt/completion pairs.
//!
//! Each row becomes `template(prompt) ++ completion ++ eos`; the loss is the mean over the
//! learned tokens (completion and eos; the prompt is masked) of `-log p(token | prefix)`,
//! normalised by the learned-token count of the whole optimizer step (all accumulated
//! micro-batches), so accumulation gives the same gradient as one big batch.
//! Only positions that carry a label reach the LM head, through the fused chunked
//! head + cross-entropy (`ops::lm_head_cross_entropy`).
//! References: KoChatGPT `train_sft.py` (what it does), TRL `SFTTrainer` (completion-only loss),
//! nanoGPT `train.py` (the loop).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::Serialize;
use serde_json::{Map, Value};

use super::config::TrainConfig;
use super::looper::{train_loop, Method, MicroOut, RunDir};
use super::{forward_backward, GradAccum, Setup, Start};
use crate::data::{read_sft, SftRow};
use crate::lora::{Adapter, LoraConfig, TargetModules};
use crate::model::{causal_mask, Arch, Model};
use crate::runtime::fmt_bytes;
use crate::template::Template;
use crate::tokenizer::Tokenizer;

/// One tokenized row: `ids[..prompt_len]` is the prompt, the rest is learned.
#[derive(Clone, Debug)]
pub struct SftExample {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

/// What happened to the rows on the way to examples.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrepStats {
    pub rows: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub skipped_bad: usize,
}

/// Tokenizes rows into examples. Too-long rows lose prompt tokens from the left first (the
/// prompt keeps at least half the window if it has that many), then completion tokens from
/// the right (the eos goes with them: a cut answer must not teach stopping). A row with no
/// completion token left is dropped and counted.
pub fn prepare(rows: &[SftRow], tok: &Tokenizer, template: &Template, max_len: usize, strip_quote: bool) -> Result<(Vec<SftExample>, PrepStats)> {
    let eos = tok.eos_id.context("the tokenizer has no end-of-sequence token: set eos_token_id in config.json")?;
    let mut stats = PrepStats { rows: rows.len(), ..Default::default() };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let completion = if strip_quote { row.completion.strip_prefix('\'').unwrap_or(&row.completion) } else { &row.completion };
        let mut p = tok.encode(&template.render(&row.prompt))?;
        let mut c = tok.encode_plain(completion)?;
        if c.is_empty() {
            stats.dropped += 1;
            continue;
        }
        c.push(eos);
        if p.len() + c.len() > max_len {
            stats.truncated += 1;
            let keep_p = p.len().min(max_len.saturating_sub(c.len()).max(max_len / 2)).max(1);
            p.drain(..p.len() - keep_p);
            c.truncate(max_len - keep_p);
        }
        if c.is_empty() {
            stats.dropped += 1;
            continue;
        }
        let prompt_len = p.len();
        p.extend(c);
        out.push(SftExample { ids: p, prompt_len });
    }
    Ok((out, stats))
}

/// A right-padded micro-batch and where its labels are.
pub struct Batch {
    /// (B, T) u32 ids and positions; (B, 1, T, T) additive mask.
    pub ids: Tensor,
    pub pos: Tensor,
    pub mask: Tensor,
    /// (N,) flat indices b*T + t of the positions that predict a learned token, and those tokens.
    pub select: Tensor,
    pub targets: Tensor,
    /// Non-pad tokens in the batch.
    pub tokens: usize,
}

pub fn make_batch(exs: &[&SftExample], pad: u32, dev: &Device) -> Result<Batch> {
    let (b, t) = (exs.len(), exs.iter().map(|e| e.ids.len()).max().unwrap_or(1));
    let (mut ids, mut valid, mut select, mut targets) = (Vec::with_capacity(b * t), vec![], vec![], vec![]);
    for (r, e) in exs.iter().enumerate() {
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(pad, t - e.ids.len())));
        valid.push((0..t).map(|j| j < e.ids.len()).collect::<Vec<_>>());
        for j in e.prompt_len.max(1)..e.ids.len() {
            select.push((r * t + j - 1) as u32);
            targets.push(e.ids[j]);
        }
    }
    let pos = Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?.repeat((b, 1))?;
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), dev)?,
        pos,
        mask: causal_mask(&valid, t, 0, dev)?,
        select: Tensor::new(select.as_slice(), dev)?,
        targets: Tensor::new(targets.as_slice(), dev)?,
        tokens: exs.iter().map(|e| e.ids.len()).sum(),
    })
}

/// Sum of the NLL of the batch's learned tokens, from final hidden states h (B, T, C).
pub fn label_nll_sum(model: &Model, h: &Tensor, batch: &Batch, chunk: usize) -> Result<Tensor> {
    let (b, t, c) = h.dims3()?;
    let h = h.reshape((b * t, c))?.index_select(&batch.select, 0)?; // (N, C)
    Ok(model.token_nll(&h, &batch.targets, chunk, 1.0)?.sum_all()?)
}

/// Mean NLL over the learned tokens of `exs` (no update), and the token count.
pub fn eval_loss(model: &Model, exs: &[SftExample], batch_size: usize, pad: u32, chunk: usize) -> Result<(f64, usize)> {
    let (mut sum, mut n) = (0.0, 0);
    for group in exs.chunks(batch_size) {
        let refs: Vec<&SftExample> = group.iter().collect();
        let batch = make_batch(&refs, pad, &model.device)?;
        let h = model.hidden(&batch.ids, &batch.pos, &batch.mask, None)?;
        sum += label_nll_sum(model, &h, &batch, chunk)?.detach().to_scalar::<f32>()? as f64;
        n += batch.targets.dim(0)?;
    }
    Ok((sum / n.max(1) as f64, n))
}

/// The LoRA config of a new adapter from the `[lora]` section (PEFT's default targets if none).
pub fn lora_config(cfg: &TrainConfig, arch: &Arch) -> LoraConfig {
    let l = &cfg.lora;
    let targets = if l.target_modules.is_empty() {
        arch.default_lora_targets()
    } else {
        l.target_modules.clone()
    };
    LoraConfig {
        r: l.r,
        lora_alpha: l.lora_alpha,
        lora_dropout: l.lora_dropout,
        // PEFT's keyword: one string, expanded to every linear of the blocks.
        target_modules: if targets.len() == 1 && targets[0].eq_ignore_ascii_case("all-linear") {
            TargetModules::Regex("all-linear".into())
        } else {
            TargetModules::List(targets)
        },
        use_rslora: l.use_rslora,
        base_model_name_or_path: Some(cfg.model.name.clone()),
        ..Default::default()
    }
}

/// What a finished run reports.
#[derive(Debug, Serialize)]
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

/// SFT as a [`Method`] of the shared loop.
struct Sft<'a> {
    model: &'a Model,
    train: &'a [SftExample],
    eval: &'a [SftExample],
    pad: u32,
    cfg: &'a TrainConfig,
}

impl Method for Sft<'_> {
    fn lens(&self) -> Vec<usize> {
        self.train.iter().map(|e| e.ids.len()).collect()
    }

    fn weight(&self, items: &[usize]) -> f64 {
        items.iter().map(|&i| self.train[i].ids.len() - self.train[i].prompt_len.max(1)).sum::<usize>() as f64
    }

    fn micro_step(&self, items: &[usize], denom: f64, vars: &[(String, Var)], acc: &mut GradAccum) -> Result<MicroOut> {
        let exs: Vec<&SftExample> = items.iter().map(|&i| &self.train[i]).collect();
        let b = make_batch(&exs, self.pad, &self.model.device)?;
        let t = &self.cfg.train;
        let loss_fn = |h: &Tensor| -> Result<Tensor> { Ok((label_nll_sum(self.model, h, &b, t.loss_chunk)? / denom)?) };
        let loss = forward_backward(self.model, &b.ids, &b.pos, b.mask.clone(), t.grad_checkpointing, &loss_fn, vars, acc)?;
        Ok(MicroOut { loss, tokens: b.tokens, sums: vec![] })
    }

    fn step_metrics(&self, _: &[(&'static str, f64)], _: f64) -> Map<String, Value> {
        Map::new()
    }

    fn evaluate(&self) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        if !self.eval.is_empty() {
            let (l, _) = eval_loss(self.model, self.eval, self.cfg.train.batch_size, self.pad, self.cfg.train.loss_chunk)?;
            m.insert("eval_loss".into(), l.into());
            m.insert("eval_ppl".into(), l.exp().into());
        }
        Ok(m)
    }

    fn extra_tensors(&self) -> Vec<(String, Tensor)> {
        vec![]
    }
}

/// Reads, tokenizes and splits the SFT data (train, eval), with the row statistics.
fn load_data(cfg: &TrainConfig, tok: &Tokenizer, max_len: usize) -> Result<(Vec<SftExample>, Vec<SftExample>, PrepStats)> {
    let template = Template::or_default(&cfg.data.template)?;
    let (rows, format, skipped) = read_sft(Path::new(&cfg.data.path), cfg.data.skip_bad_rows)?;
    let (mut train, mut prep) = prepare(&rows, tok, &template, max_len, cfg.data.strip_leading_quote)?;
    prep.skipped_bad = skipped;
    let mut eval = if !cfg.data.eval_path.is_empty() {
        let (erows, _, _) = read_sft(Path::new(&cfg.data.eval_path), cfg.data.skip_bad_rows)?;
        prepare(&erows, tok, &template, max_len, cfg.data.strip_leading_quote)?.0
    } else {
        let held = super::held_out(train.len(), cfg.data.eval_fraction, cfg.train.seed);
        let (mut tr, mut ev) = (vec![], vec![]);
        for (i, e) in train.drain(..).enumerate() {
            if held.contains(&i) { ev.push(e) } else { tr.push(e) }
        }
        train = tr;
        ev
    };
    if train.is_empty() {
        bail!("{}: no training examples left ({} rows, {} dropped)", cfg.data.path, prep.rows, prep.dropped)
    }
    eval.sort_by_key(|e| e.ids.len());
    tracing::info!(
        "data: {} rows ({format:?} format) -> {} train / {} eval examples; {} truncated, {} dropped, {} bad rows skipped",
        prep.rows, train.len(), eval.len(), prep.truncated, prep.dropped, prep.skipped_bad
    );
    Ok((train, eval, prep))
}

/// Runs (or resumes) SFT as configured.
pub fn run(cfg: &TrainConfig, start: Start) -> Result<SftSummary> {
    // 1. Check everything that can be wrong before anything is written.
    let cfg = &cfg.for_stage("sft");
    let run = RunDir::open(cfg, start)?;
    let setup = Setup::new(cfg)?;
    let (arch, tok) = (&setup.arch, &setup.tok);

    // 2. Data: rows -> tokenized examples (prompt masked, eos learned); a held-out split.
    let (train, eval, prep) = load_data(cfg, &tok, cfg.data.max_len.min(arch.max_positions()))?;

    // 3. The model with the adapter attached at construction: new, or the checkpoint's.
    let adapter = match run.resume_dir() {
        Some(dir) => crate::peft::load_adapter(dir, "sft", 1.0, true)?,
        None => Adapter::fresh("sft", lora_config(cfg, arch), cfg.train.seed)?,
    };
    let model = setup.load_model(vec![adapter.clone()])?;
    model.adapters.set_training(true);

    // 4. The shared loop: accumulation, AdamW, schedule, eval, metrics, checkpoints, export.
    let method = Sft { model: &model, train: &train, eval: &eval, pad: tok.padding_id(), cfg };
    let s = train_loop(cfg, &run, &model, &adapter, adapter.vars(), &method)?;

    // 5. The run's record.
    let eval_loss = s.final_eval.get("eval_loss").and_then(Value::as_f64);
    let summary = SftSummary {
        out_dir: run.out.clone(),
        steps: s.steps,
        first_loss: s.first_loss,
        final_loss: s.final_loss,
        eval_loss,
        eval_perplexity: eval_loss.map(f64::exp),
        prep,
        peak_rss_bytes: s.peak_rss_bytes,
    };
    crate::io::atomic_write(&run.out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    tracing::info!(
        "done: {} steps, loss {:.4} -> {:.4}, eval loss {}, peak memory {} (process RSS); adapter in {}",
        s.steps,
        s.first_loss.unwrap_or(f64::NAN),
        s.final_loss.unwrap_or(f64::NAN),
        eval_loss.map(|e| format!("{e:.4} (ppl {:.2})", e.exp())).unwrap_or("-".into()),
        s.peak_rss_bytes.map(fmt_bytes).unwrap_or("n/a".into()),
        run.out.display()
    );
    Ok(summary)
}
