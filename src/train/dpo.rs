//! `lorafit dpo`: preference optimisation of a LoRA policy on chosen/rejected pairs — DPO
//! (`sigmoid`, with cDPO label smoothing), `ipo`, `hinge`, and the reference-free `orpo` and
//! `simpo` (the formulas are in `dpo_math.rs`, the pairs in `pairs.rs`).
//!
//! The policy and the reference share ONE frozen base: the reference is the base with the
//! adapters switched off by a scoped guard, or, with `--sft-adapter`, that adapter (frozen)
//! while the policy starts as a trainable copy of it (as in `ppo`). A step is two phases:
//! 1. `reference`: the reference log-prob sum of each pair's chosen and rejected completion
//!    (no graph, no dropout); with `dpo.precompute_ref` computed once for the whole data before
//!    the first step and kept in the checkpoints (a resumed run does not recompute them);
//!    orpo and simpo skip it;
//! 2. `update`: chosen and rejected of each pair in ONE batch through the policy (one pair per
//!    forward/backward, the gradients accumulated: the peak keeps one pair's activations), the
//!    summed log-prob of each completion's tokens, the pair losses, their mean over the step's
//!    pairs (ORPO adds the mean NLL of the chosen completions' tokens), one AdamW update.
//! Every pair counts once, as in TRL (a K-way ranking's C(K,2) pairs are K(K-1)/2 items; `rm`'s
//! 1/(pairs of the prompt) weighting is not applied), and the held-out split is by row.
//! With a fresh adapter the policy equals the reference, so the first `sigmoid` loss is ln 2.
//! Metrics use TRL's quantities: `rewards_chosen` = β(log π - log π_ref) of the chosen, ...
//! The output folder, data cursor, checkpoints, optimizer (f16 loss scaler) and export are the
//! session's (`session.rs`). References: TRL 1.16 `DPOTrainer`, `CPOTrainer`, `ORPOTrainer`.
use std::cell::{Cell, RefCell};
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::batch::{evaluating, lora_config, make_batch, Batch, SftExample};
use super::config::TrainConfig;
use super::dpo_math::{pair_losses, LossParams, LossType, PairLogps};
use super::pairs::{load_pairs, sequence_logps, sequence_sums, Pair, PairStats};
use super::plot::PanelSpec;
use super::session::{Method, MicroOut, PhaseTimes, Session, StepOut, Trainer};
use super::{forward_backward, GradAccum, Setup, Start};
use crate::lora::Adapter;
use crate::model::Model;
use crate::render::{RenderConfig, Renderer};
use crate::runtime::fmt_bytes;

pub const POLICY: &str = "policy";
pub const REFERENCE: &str = "reference";

/// Reference log-prob sums (chosen, rejected) of each pair.
type RefLogps = Vec<[f32; 2]>;

/// Sums of one batch's pair statistics (the step's metrics are these over its pair count).
const SUMS: [&str; 7] = ["rewards_chosen", "rewards_rejected", "accuracy", "margin", "logps_chosen", "logps_rejected", "pairs"];

/// DPO as a [`Method`] of the training session.
struct Dpo<'a> {
    model: &'a Model,
    train: &'a [Pair],
    eval: &'a [Pair],
    pad: u32,
    cfg: &'a TrainConfig,
    p: LossParams,
    /// `dpo.precompute_ref`: the reference log-probs of every train / eval pair.
    ref_train: Option<RefLogps>,
    ref_eval: RefCell<Option<RefLogps>>,
    /// (pairs, chosen tokens) of the current step: the normalisers of ORPO's NLL term.
    step_size: Cell<(f64, f64)>,
}

/// One batch of pairs: chosen sequences first, then the rejected ones, (2P, T).
struct PairBatch {
    b: Batch,
    /// (2P, N) sums of per-token values into sequences.
    sums: Tensor,
    /// (P,) completion token counts.
    len_c: Tensor,
    len_r: Tensor,
    n: usize,
}

impl Dpo<'_> {
    fn batch(&self, pairs: &[&Pair]) -> Result<PairBatch> {
        let exs: Vec<&SftExample> = pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect();
        let dev = &self.model.device;
        let lens = |f: fn(&Pair) -> &SftExample| -> Result<Tensor> {
            Ok(Tensor::new(pairs.iter().map(|p| f(p).n_targets() as f32).collect::<Vec<_>>(), dev)?)
        };
        Ok(PairBatch { b: make_batch(&exs, self.pad, dev)?, sums: sequence_sums(&exs, dev)?, len_c: lens(|p| &p.chosen)?, len_r: lens(|p| &p.rejected)?, n: pairs.len() })
    }

    /// Log-prob sums (2P,) under the reference: no graph, no dropout, the policy active after.
    fn reference_pass(&self, pb: &PairBatch) -> Result<Tensor> {
        let m = self.model;
        let _no_grad = m.adapters.no_grad();
        let run = || -> Result<Tensor> {
            let h = m.hidden(&pb.b.ids, &pb.b.pos, &pb.b.mask, None)?;
            sequence_logps(m, &h, &pb.b, &pb.sums, self.cfg.train.loss_chunk)
        };
        match m.adapters.get(REFERENCE) {
            Some(r) => {
                r.set_training(false);
                m.adapters.activate(&[REFERENCE]);
                let out = run();
                m.adapters.activate(&[POLICY]);
                out
            }
            None => {
                let _off = m.adapters.disabled();
                run()
            }
        }
    }

    /// Reference log-probs of `items` of `pairs`: from `cache`, or a pass per `per` pairs (the
    /// policy's batching: training passes one pair at a time, so that with a fresh adapter the
    /// policy's log-probs equal the reference's bit for bit).
    fn reference(&self, pairs: &[Pair], items: &[usize], cache: Option<&RefLogps>, per: usize) -> Result<RefLogps> {
        if let Some(c) = cache {
            return Ok(items.iter().map(|&i| c[i]).collect());
        }
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(per) {
            let pb = self.batch(&chunk.iter().map(|&i| &pairs[i]).collect::<Vec<_>>())?;
            let v: Vec<f32> = self.reference_pass(&pb)?.to_vec1()?;
            out.extend((0..pb.n).map(|k| [v[k], v[pb.n + k]]));
        }
        Ok(out)
    }

    /// The pair losses of a batch from the policy's log-probs `lp` (2P,): (Σ pair losses,
    /// Σ chosen NLL, the batch's [`SUMS`]).
    fn losses(&self, lp: &Tensor, pb: &PairBatch, refs: &[[f32; 2]]) -> Result<(Tensor, Tensor, Vec<(&'static str, f64)>)> {
        let n = pb.n;
        let (c, r) = (lp.narrow(0, 0, n)?, lp.narrow(0, n, n)?);
        let dev = lp.device();
        let (rc, rr) = (Tensor::new(refs.iter().map(|x| x[0]).collect::<Vec<_>>(), dev)?, Tensor::new(refs.iter().map(|x| x[1]).collect::<Vec<_>>(), dev)?);
        let with_ref = self.p.loss.needs_reference();
        let x = PairLogps {
            chosen: &c,
            rejected: &r,
            ref_chosen: with_ref.then_some(&rc),
            ref_rejected: with_ref.then_some(&rr),
            len_chosen: &pb.len_c,
            len_rejected: &pb.len_r,
        };
        let out = pair_losses(&self.p, &x)?;
        let (wc, wr): (Vec<f64>, Vec<f64>) = (out.rewards_chosen.to_vec1()?, out.rewards_rejected.to_vec1()?);
        let (mut logc, mut logr): (Vec<f64>, Vec<f64>) = (c.detach().to_dtype(DType::F64)?.to_vec1()?, r.detach().to_dtype(DType::F64)?.to_vec1()?);
        if self.p.loss.length_normalised() {
            let (nc, nr): (Vec<f32>, Vec<f32>) = (pb.len_c.to_vec1()?, pb.len_r.to_vec1()?);
            logc.iter_mut().zip(nc).for_each(|(l, k)| *l /= k as f64);
            logr.iter_mut().zip(nr).for_each(|(l, k)| *l /= k as f64);
        }
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        let correct = wc.iter().zip(&wr).filter(|(a, b)| a > b).count() as f64;
        let vals = [sum(&wc), sum(&wr), correct, sum(&wc) - sum(&wr), sum(&logc), sum(&logr), n as f64];
        let nll = c.sum_all()?.neg()?.to_dtype(DType::F64)?;
        Ok((out.loss.sum_all()?, nll, SUMS.iter().copied().zip(vals).collect()))
    }

    /// Forward and backward of one batch of pairs; its loss is its share of the step's mean.
    fn micro_step(&self, items: &[usize], refs: &[[f32; 2]], denom: f64, vars: &[(String, Var)], acc: &mut GradAccum) -> Result<MicroOut> {
        let pb = self.batch(&items.iter().map(|&i| &self.train[i]).collect::<Vec<_>>())?;
        let stats = RefCell::new(vec![]);
        let (pairs, tokens) = self.step_size.get();
        let loss_fn = |h: &Tensor| -> Result<Tensor> {
            let lp = sequence_logps(self.model, h, &pb.b, &pb.sums, self.cfg.train.loss_chunk)?;
            let (sum, nll, s) = self.losses(&lp, &pb, refs)?;
            *stats.borrow_mut() = s;
            let mut loss = (sum / denom)?;
            if self.p.loss == LossType::Orpo {
                // The NLL's mean over the step's chosen tokens, scaled as the pair term is.
                loss = (loss + (nll / (tokens * denom / pairs))?)?;
            }
            Ok(loss.to_dtype(DType::F32)?)
        };
        let loss = forward_backward(self.model, &pb.b.ids, &pb.b.pos, pb.b.mask.clone(), self.cfg.train.grad_checkpointing, &loss_fn, vars, acc)?;
        Ok(MicroOut { loss, tokens: pb.b.tokens, sums: stats.into_inner() })
    }

    /// `dpo.precompute_ref`: the reference log-probs of every train pair, once; its seconds.
    fn precompute(&mut self) -> Result<Option<f64>> {
        if !(self.cfg.dpo.precompute_ref && self.p.loss.needs_reference() && self.ref_train.is_none()) {
            return Ok(None);
        }
        let t0 = std::time::Instant::now();
        let all: Vec<usize> = (0..self.train.len()).collect();
        self.ref_train = Some(self.reference(self.train, &all, None, 1)?);
        let s = t0.elapsed().as_secs_f64();
        tracing::info!("reference log-probs of {} pairs precomputed in {s:.1} s", self.train.len());
        Ok(Some(s))
    }

    /// Loss, accuracy, margin, rewards and log-probs on the held-out pairs.
    fn eval_metrics(&self) -> Result<Map<String, Value>> {
        let all: Vec<usize> = (0..self.eval.len()).collect();
        let with_ref = self.p.loss.needs_reference();
        if with_ref && self.cfg.dpo.precompute_ref && self.ref_eval.borrow().is_none() {
            *self.ref_eval.borrow_mut() = Some(self.reference(self.eval, &all, None, self.cfg.train.batch_size)?);
        }
        let (mut loss, mut nll, mut tokens, mut sums) = (0.0, 0.0, 0.0, vec![0.0; SUMS.len()]);
        for chunk in all.chunks(self.cfg.train.batch_size) {
            let refs = if with_ref { self.reference(self.eval, chunk, self.ref_eval.borrow().as_ref(), self.cfg.train.batch_size)? } else { vec![[0.0; 2]; chunk.len()] };
            let pb = self.batch(&chunk.iter().map(|&i| &self.eval[i]).collect::<Vec<_>>())?;
            let h = self.model.hidden(&pb.b.ids, &pb.b.pos, &pb.b.mask, None)?;
            let lp = sequence_logps(self.model, &h, &pb.b, &pb.sums, self.cfg.train.loss_chunk)?;
            let (l, n, s) = self.losses(&lp, &pb, &refs)?;
            loss += l.to_scalar::<f64>()?;
            nll += n.to_scalar::<f64>()?;
            tokens += pb.len_c.sum_all()?.to_scalar::<f32>()? as f64;
            sums.iter_mut().zip(&s).for_each(|(a, (_, v))| *a += v);
        }
        let pairs = sums[SUMS.len() - 1].max(1.0);
        let mut m = Map::new();
        let orpo_nll = if self.p.loss == LossType::Orpo { nll / tokens.max(1.0) } else { 0.0 };
        m.insert("eval_loss".into(), (loss / pairs + orpo_nll).into());
        for (k, v) in SUMS.iter().zip(&sums).take(SUMS.len() - 1) {
            m.insert(format!("eval_{k}"), (v / pairs).into());
        }
        Ok(m)
    }
}

impl Method for Dpo<'_> {
    fn lens(&self) -> Vec<usize> {
        self.train.iter().map(Pair::len).collect()
    }

    fn batches_per_step(&self) -> usize {
        self.cfg.train.grad_accum
    }

    fn group_by_length(&self) -> bool {
        self.cfg.train.group_by_length
    }

    fn step(&mut self, tr: &mut Trainer, batches: &[Vec<usize>]) -> Result<StepOut> {
        // 1. Reference log-probs of the step's pairs (precomputed, or one pass per pair).
        let precomputed = self.precompute()?;
        let mut phases = PhaseTimes::start();
        let refs: Vec<RefLogps> = if self.p.loss.needs_reference() {
            batches.iter().map(|b| self.reference(self.train, b, self.ref_train.as_ref(), 1)).collect::<Result<_>>()?
        } else {
            batches.iter().map(|b| vec![[0.0; 2]; b.len()]).collect()
        };
        phases.lap("reference");

        // 2. Policy forward/backward of each pair (its chosen and rejected together), the
        //    gradients accumulated, one update; the loss is the mean over the step's pairs. One
        //    pair at a time: the pair losses are independent, so the gradient is the batch's (up
        //    to summation order) while only one pair's activations are kept (docs/BENCHMARKS.md, DPO).
        let items = batches.iter().flatten();
        let chosen_tokens: usize = items.clone().map(|&i| self.train[i].chosen.n_targets()).sum();
        self.step_size.set((items.count() as f64, chosen_tokens as f64));
        let pairs: Vec<Vec<usize>> = batches.iter().flatten().map(|&i| vec![i]).collect();
        let pair_refs: Vec<[f32; 2]> = refs.into_iter().flatten().collect();
        let mut k = 0;
        let a = tr.accumulate(&pairs, |b| b.len() as f64, |b, denom, vars, acc| {
            k += 1;
            self.micro_step(b, &pair_refs[k - 1..k], denom, vars, acc)
        })?;
        phases.lap("update");

        // 3. The metrics line: TRL's quantities, means over the step's pairs.
        let pairs = a.sum("pairs").max(1.0);
        let mut m = a.metrics();
        for k in SUMS.iter().take(SUMS.len() - 1) {
            m.insert(k.to_string(), (a.sum(k) / pairs).into());
        }
        m.extend(phases.fields);
        if let Some(s) = precomputed {
            m.insert("time_precompute_ref_s".into(), s.into());
        }
        let show = format!("loss {:.4}  acc {:.2}  margin {:.3}", a.loss, a.sum("accuracy") / pairs, a.sum("margin") / pairs);
        Ok(StepOut { metrics: m, show, tokens: a.tokens })
    }

    fn evaluate(&self) -> Result<Map<String, Value>> {
        if self.eval.is_empty() {
            return Ok(Map::new());
        }
        evaluating(self.model, || self.eval_metrics())
    }

    fn state(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if let Some(r) = &self.ref_train {
            m.insert("ref_logps".into(), serde_json::to_value(r).unwrap_or(Value::Null));
        }
        if let Some(r) = self.ref_eval.borrow().as_ref() {
            m.insert("ref_logps_eval".into(), serde_json::to_value(r).unwrap_or(Value::Null));
        }
        m
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        let read = |k: &str, n: usize| -> Result<Option<RefLogps>> {
            match state.get(k) {
                Some(v) if !v.is_null() => {
                    let r: RefLogps = serde_json::from_value(v.clone())?;
                    anyhow::ensure!(r.len() == n, "the checkpoint's {k} holds {} pairs, the data {n}", r.len());
                    Ok(Some(r))
                }
                _ => Ok(None),
            }
        };
        self.ref_train = read("ref_logps", self.train.len())?;
        *self.ref_eval.borrow_mut() = read("ref_logps_eval", self.eval.len())?;
        Ok(())
    }

    fn plot(&self) -> (&'static str, Vec<PanelSpec>) {
        ("loss.png", vec![
            PanelSpec { y_label: "loss", line: ("loss", "train loss"), dots: Some(("eval_loss", "eval loss")) },
            PanelSpec { y_label: "reward margin", line: ("margin", "train margin"), dots: Some(("eval_margin", "eval margin")) },
        ])
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DpoSummary {
    pub out_dir: PathBuf,
    pub loss_type: String,
    pub steps: usize,
    pub data: PairStats,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub final_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_margin: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

/// Runs (or resumes) DPO as configured.
pub fn run(cfg: &TrainConfig, start: Start) -> Result<DpoSummary> {
    let _span = tracing::info_span!("dpo").entered();
    // 1. Claim the output folder and check everything before anything is written.
    let cfg = &cfg.for_stage("dpo");
    let d = &cfg.dpo;
    let loss = LossType::parse(&d.loss)?;
    if d.label_smoothing > 0.0 && !matches!(loss, LossType::Sigmoid | LossType::Simpo) {
        tracing::warn!("dpo.label_smoothing = {} has no effect with dpo.loss = {:?} (only sigmoid and simpo use it)", d.label_smoothing, d.loss);
    }
    let inputs = [("--model", cfg.model.name.as_str()), ("--data", &cfg.data.path), ("data.eval_path", &cfg.data.eval_path), ("--sft-adapter", &d.sft_adapter)];
    let mut session = Session::open(cfg, "dpo", start, &inputs)?;
    if let Some(done) = session.finished()? {
        return Ok(done);
    }
    let setup = Setup::new(cfg)?;
    let (arch, tok) = (&setup.arch, &setup.tok);

    // 2. Data: rows -> pairs of rendered sequences; a held-out split.
    let mut rc = RenderConfig::from_data(&cfg.data)?;
    rc.max_len = cfg.data.max_len.min(arch.max_positions());
    let renderer = Renderer::new(tok, &setup.files.dir, rc)?;
    let (train, eval, stats) = load_pairs(&cfg.data, cfg.train.seed, &renderer)?;
    tracing::info!(
        "data: {} rows -> {} pairs -> {} train / {} eval; {} identical skipped, {} prompts longer than max_len, {} truncated ({} rows cut on the prompt side), {} bad rows skipped",
        stats.rows, stats.pairs, train.len(), eval.len(), stats.identical, stats.prompt_too_long, stats.truncated, stats.prompt_cut, stats.skipped_bad
    );

    // 3. The model: [reference = the SFT adapter, frozen] + the policy (a trainable copy of the
    //    SFT adapter, a new adapter, or the checkpoint's); no reference adapter = base alone.
    let sft = (!d.sft_adapter.is_empty()).then(|| PathBuf::from(&d.sft_adapter));
    let mut adapters = vec![];
    if let (Some(p), true) = (&sft, loss.needs_reference()) {
        adapters.push(crate::peft::load_adapter(p, REFERENCE, 1.0, false)?);
    }
    let policy = match (session.resume_dir(), &sft) {
        (Some(dir), _) => crate::peft::load_adapter(dir, POLICY, 1.0, true)?,
        (None, Some(p)) => crate::peft::load_adapter(p, POLICY, 1.0, true)?,
        (None, None) => Adapter::fresh(POLICY, lora_config(cfg, arch), cfg.train.seed)?,
    };
    adapters.push(policy.clone());
    let model = setup.load_model(adapters)?;
    model.adapters.activate(&[POLICY]);
    model.adapters.set_training(true);

    // 4. The session's loop, with the precomputed reference (if any) kept in its checkpoints.
    let p = LossParams { loss, beta: d.beta, label_smoothing: d.label_smoothing, lambda: d.lambda, gamma: d.gamma };
    let mut method = Dpo { model: &model, train: &train, eval: &eval, pad: tok.padding_id(), cfg, p, ref_train: None, ref_eval: RefCell::new(None), step_size: Cell::new((1.0, 1.0)) };
    let s = session.train(&model, &policy, policy.vars(), &mut method)?;

    // 5. The run's record (eval_* of the exported adapter), and what to do with it.
    let summary = DpoSummary {
        out_dir: session.out().to_path_buf(),
        loss_type: d.loss.clone(),
        steps: s.steps,
        data: stats,
        train_pairs: train.len(),
        eval_pairs: eval.len(),
        first_loss: s.first("loss"),
        final_loss: s.last("loss"),
        final_accuracy: s.last("accuracy"),
        eval_loss: s.last("eval_loss"),
        eval_accuracy: s.last("eval_accuracy"),
        eval_margin: s.last("eval_margin"),
        peak_rss_bytes: s.peak_rss_bytes,
    };
    let f3 = |x: Option<f64>| x.map(|a| format!("{a:.3}")).unwrap_or("-".into());
    let headline = format!(
        "{} {} steps, loss {:.4} -> {:.4}, held-out accuracy {}, margin {}, peak memory {}",
        d.loss, s.steps, summary.first_loss.unwrap_or(f64::NAN), summary.final_loss.unwrap_or(f64::NAN),
        f3(summary.eval_accuracy), f3(summary.eval_margin), s.peak_rss_bytes.map(fmt_bytes).unwrap_or("n/a".into()),
    );
    session.finish(&summary, &headline, &session.try_adapter())?;
    Ok(summary)
}
