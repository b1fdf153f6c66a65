//! `lorafit grpo`: group-relative policy optimisation (Shao et al. 2024, DeepSeekMath; TRL's
//! `GRPOTrainer`) on ONE frozen base: no critic, no value head, no second model.
//!
//! The roles differ only by which adapters are active: policy = a trainable copy of the SFT
//! adapter (or a new adapter); reference = the SFT adapter, frozen (or the bare base, adapters
//! off), and only when `beta` > 0; reward models = `lorafit rm` folders (adapter + head), frozen.
//!
//! One iteration, in steps:
//! 1. rollout: each of `train.batch_size` prompts is sampled `group_size` times (one batch,
//!    KV-cached); the old log-probs and the logged entropy come from the sampler's own logits;
//! 2. reward: each `[[grpo.rewards]]` scores every completion (rule, command or reward model);
//!    the total is their weighted sum; advantage = (r - group mean) / (group std + 1e-4)
//!    (`scale_rewards = false`: Dr. GRPO, no division);
//! 3. reference log-probs (β > 0 only), no graph;
//! 4. update: `num_iterations` passes over the completions, one group per forward/backward, one
//!    optimizer update per pass: clipped ratio loss (ε, ε_high) + β k3, normalised by `loss_type`;
//! 5. log: rewards (total and each), KL, clip ratio, length, entropy, per-phase time and memory.
//! LoRA dropout is off (old and new log-probs must agree) and log-probs use the sampling
//! temperature, as TRL does. The formulas are in `grpo_math.rs`, the rewards in `grpo_rewards.rs`;
//! output folder, data cursor, checkpoints, optimizer and export are the session's.
use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};

use super::batch::{lora_config, make_batch, Batch, SftExample};
use super::config::TrainConfig;
use super::grpo_math::{group_advantages, grpo_loss, mean_std, token_weights, LossParams, LossStats};
use super::grpo_rewards::{Rewards, Scored};
use super::plot::PanelSpec;
use super::prompts::{load_prompts, PromptLimits, PromptRow};
use super::roles::{self, Roles, POLICY, REFERENCE};
use super::session::{Method, PhaseTimes, Session, StepOut, Trainer};
use super::{forward_backward, GradAccum, Setup, Start};
use crate::generate::{generate_with_logprobs, SamplingConfig};
use crate::lora::Adapter;
use crate::model::Model;
use crate::reward::RewardHead;
use crate::runtime::fmt_bytes;
use crate::tokenizer::Tokenizer;

/// What the update passes of one iteration did.
struct UpdateStats {
    /// Mean loss over the passes.
    loss: f64,
    /// The first pass's stats (its KL is the sampling policy's).
    first: LossStats,
    /// Clipped tokens and tokens over all passes.
    clipped: usize,
    tokens: usize,
    grad_norm: f64,
}

/// One iteration's completions (prompt-major: the group of prompt 0, then of prompt 1, ...).
struct Rollout {
    rows: Vec<usize>,
    ex: Vec<SftExample>,
    texts: Vec<String>,
    old_logp: Vec<Vec<f32>>,
    ref_logp: Option<Vec<Vec<f32>>>,
    per_reward: Vec<Vec<f32>>,
    total: Vec<f32>,
    adv: Vec<f32>,
    entropy: f64,
}

/// summary.json: reward and KL of the first and last iterations, peak memory.
pub type GrpoSummary = super::session::RewardSummary;

/// GRPO as a [`Method`] of the training session.
struct Grpo<'a> {
    cfg: &'a TrainConfig,
    model: &'a Model,
    tok: &'a Tokenizer,
    prompts: Vec<PromptRow>,
    rewards: Rewards,
    /// Per model reward: the adapters it activates and its head.
    reward_models: Vec<(Vec<String>, RewardHead)>,
    has_reference: bool,
    stop: Vec<u32>,
    /// The token a reward model reads a cut completion at (eos, or the end-of-turn for chats).
    end: u32,
    pad: u32,
    device: Device,
    out: PathBuf,
    laps: PhaseTimes,
}

/// Per-token log-probs (N,) of the batch's learned tokens at `temperature`, from hidden states h.
fn token_logp(model: &Model, h: &Tensor, b: &Batch, chunk: usize, temperature: f64) -> Result<Tensor> {
    let (bs, t, c) = h.dims3()?;
    let hs = h.reshape((bs * t, c))?.index_select(&b.select, 0)?; // (N, C)
    Ok(model.token_nll(&hs, &b.targets, chunk, temperature)?.neg()?)
}

impl Grpo<'_> {
    fn activate(&self, names: &[&str]) {
        self.model.adapters.activate(names);
    }

    /// Steps 1-3: sample the groups, reward them, advantages, reference log-probs.
    fn rollout(&mut self, rows: &[usize], step: usize) -> Result<Rollout> {
        let (g, t, model) = (&self.cfg.grpo, &self.cfg.train, self.model);
        // 1. Sample every prompt group_size times, in one batch (seeded per iteration, so a
        //    resumed run samples the same).
        let rows: Vec<usize> = rows.iter().flat_map(|&r| std::iter::repeat_n(r, g.group_size)).collect();
        let prompts: Vec<Vec<u32>> = rows.iter().map(|&r| self.prompts[r].ids.clone()).collect();
        let sampling = SamplingConfig {
            max_new_tokens: g.max_new_tokens,
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            repetition_penalty: 1.0,
            seed: roles::rollout_seed(t.seed, step),
            stop_tokens: self.stop.clone(),
        };
        self.activate(&[POLICY]);
        let s = generate_with_logprobs(model, &prompts, self.pad, &sampling)?;
        let n_tok: usize = s.entropy.iter().map(Vec::len).sum();
        let entropy = s.entropy.iter().flatten().map(|&h| h as f64).sum::<f64>() / n_tok.max(1) as f64;
        let ex: Vec<SftExample> = prompts.iter().zip(&s.tokens).map(|(p, c)| SftExample::completion(p.iter().chain(c).copied().collect(), p.len())).collect();
        let texts: Vec<String> = s
            .tokens
            .iter()
            .map(|c| match c.last() {
                Some(l) if self.stop.contains(l) => self.tok.decode(&c[..c.len() - 1]),
                _ => self.tok.decode(c),
            })
            .collect::<Result<_>>()?;
        self.laps.lap("generate");

        // 2. Rewards: reward models on `prompt + completion (+ the end token if cut: eos, or the
        //    chat template's end-of-turn for conversations, where `lorafit rm` reads), then the rules and
        //    commands; the weighted total; advantages within each group.
        let _no_grad = model.adapters.no_grad();
        let mut model_scores = vec![];
        for (names, head) in &self.reward_models {
            self.activate(&names.iter().map(String::as_str).collect::<Vec<_>>());
            let seqs: Vec<Vec<u32>> = ex
                .iter()
                .map(|e| {
                    let mut s = e.ids.clone();
                    if s.last() != Some(&self.end) && s.len() < model.arch.max_positions() {
                        s.push(self.end);
                    }
                    s
                })
                .collect();
            model_scores.push(crate::reward::score(model, head, &seqs, self.pad, g.group_size)?);
        }
        let items: Vec<Scored> = rows
            .iter()
            .zip(&texts)
            .map(|(&r, c)| { let p = &self.prompts[r]; Scored { prompt: &p.prompt, completion: c, row: &p.row, loc: &p.loc } })
            .collect();
        let per_reward = self.rewards.score(&items, &model_scores)?;
        let total = self.rewards.total(&per_reward);
        let adv = group_advantages(&total, g.group_size, g.scale_rewards)?;
        self.laps.lap("reward");

        // 3. Reference log-probs (β > 0): the SFT adapter, or the base with adapters off.
        let ref_logp = if g.beta > 0.0 {
            let _off = (!self.has_reference).then(|| model.adapters.disabled());
            if self.has_reference {
                self.activate(&[REFERENCE]);
            }
            let mut out = vec![];
            for group in ex.chunks(g.group_size) {
                let refs: Vec<&SftExample> = group.iter().collect();
                let b = make_batch(&refs, self.pad, &self.device)?;
                let h = model.hidden(&b.ids, &b.pos, &b.mask, None)?;
                let flat = token_logp(model, &h, &b, t.loss_chunk, g.temperature)?.to_vec1::<f32>()?;
                out.extend(Roles::split(flat, &refs));
            }
            Some(out)
        } else {
            None
        };
        drop(_no_grad);
        self.laps.lap("reference");
        Ok(Rollout { rows, ex, texts, old_logp: s.logp, ref_logp, per_reward, total, adv, entropy })
    }

    /// Step 4: `num_iterations` passes, one optimizer update each.
    fn update(&mut self, ro: &Rollout, tr: &mut Trainer) -> Result<UpdateStats> {
        let (g, t, model) = (&self.cfg.grpo, &self.cfg.train, self.model);
        let lens: Vec<usize> = ro.ex.iter().map(|e| e.ids.len() - e.prompt_len()).collect();
        let weights = token_weights(&lens, &g.loss_type, g.max_new_tokens)?;
        let params = LossParams { epsilon: g.epsilon, epsilon_high: g.epsilon_high, beta: g.beta };
        let (mut loss_sum, mut first, mut clipped, mut seen, mut grad_norm) = (0.0, LossStats::default(), 0, 0, 0.0);
        self.activate(&[POLICY]);
        for pass in 0..g.num_iterations {
            let mut acc = GradAccum::new(tr.vars().len());
            let (mut pass_loss, mut pass_stats) = (0.0, LossStats::default());
            let mut at = 0; // first token of the group in the flat weights
            for (k, group) in ro.ex.chunks(g.group_size).enumerate() {
                let idx: Vec<usize> = (k * g.group_size..k * g.group_size + group.len()).collect();
                let n: usize = idx.iter().map(|&i| lens[i]).sum();
                let flat = |x: &Vec<Vec<f32>>| -> Vec<f32> { idx.iter().flat_map(|&i| x[i].clone()).collect() };
                let dev = &self.device;
                let old = Tensor::new(flat(&ro.old_logp).as_slice(), dev)?;
                let reference = ro.ref_logp.as_ref().map(|r| Tensor::new(flat(r).as_slice(), dev)).transpose()?;
                let adv: Vec<f32> = idx.iter().flat_map(|&i| std::iter::repeat_n(ro.adv[i], lens[i])).collect();
                let adv = Tensor::new(adv.as_slice(), dev)?;
                let w = Tensor::new(&weights[at..at + n], dev)?;
                at += n;
                let refs: Vec<&SftExample> = group.iter().collect();
                let b = make_batch(&refs, self.pad, dev)?;
                let stats = Cell::new(LossStats::default());
                let loss_fn = |h: &Tensor| -> Result<Tensor> {
                    let logp = token_logp(model, h, &b, t.loss_chunk, g.temperature)?;
                    let (loss, s) = grpo_loss(&logp, &old, reference.as_ref(), &adv, &w, params)?;
                    stats.set(s);
                    tr.scaled(loss)
                };
                pass_loss += forward_backward(model, &b.ids, &b.pos, b.mask.clone(), t.grad_checkpointing, &loss_fn, tr.vars(), &mut acc)? / tr.loss_scale();
                let s = stats.get();
                (pass_stats.tokens, pass_stats.clipped, pass_stats.kl_sum) = (pass_stats.tokens + s.tokens, pass_stats.clipped + s.clipped, pass_stats.kl_sum + s.kl_sum);
            }
            grad_norm = tr.apply(acc)?.grad_norm;
            loss_sum += pass_loss;
            clipped += pass_stats.clipped;
            seen += pass_stats.tokens;
            if pass == 0 {
                first = pass_stats;
            }
        }
        self.laps.lap("update");
        Ok(UpdateStats { loss: loss_sum / g.num_iterations as f64, first, clipped, tokens: seen, grad_norm })
    }

    /// Step 5: the iteration's metrics line, and a sample completion now and then.
    fn log(&mut self, ro: &Rollout, up: UpdateStats, step: usize) -> Result<Map<String, Value>> {
        let g = &self.cfg.grpo;
        let UpdateStats { loss, first, clipped, tokens: seen, grad_norm } = up;
        let (reward_mean, reward_std) = mean_std(&ro.total);
        let lens: Vec<f32> = ro.ex.iter().map(|e| (e.ids.len() - e.prompt_len()) as f32).collect();
        let zero_std = ro.total.chunks(g.group_size).filter(|c| c.iter().all(|&r| r == c[0])).count() as f64 / (ro.total.len() / g.group_size) as f64;
        let mut line = Map::new();
        line.insert("reward_mean".into(), reward_mean.into());
        line.insert("reward_std".into(), reward_std.into());
        for (name, col) in self.rewards.names.iter().zip(&ro.per_reward) {
            line.insert(format!("reward_{name}"), mean_std(col).0.into());
        }
        if ro.ref_logp.is_some() {
            line.insert("kl_mean".into(), (first.kl_sum / first.tokens.max(1) as f64).into());
        }
        line.insert("loss".into(), loss.into());
        line.insert("grad_norm".into(), grad_norm.into());
        line.insert("clip_ratio".into(), (clipped as f64 / seen.max(1) as f64).into());
        line.insert("completion_len".into(), mean_std(&lens).0.into());
        line.insert("entropy".into(), ro.entropy.into());
        line.insert("frac_reward_zero_std".into(), zero_std.into());
        line.extend(std::mem::take(&mut self.laps.fields));
        if g.sample_every > 0 && (step % g.sample_every == 0 || step == 1) {
            let p = &self.prompts[ro.rows[0]];
            tracing::info!("iteration {step}: sample completion (reward {:.3}): {:?}", ro.total[0], ro.texts[0]);
            let sample = json!({"step": step, "row": p.loc.to_string(), "prompt": p.prompt, "completion": ro.texts[0], "reward": ro.total[0]});
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.out.join("samples.jsonl"))?;
            writeln!(f, "{sample}")?;
        }
        Ok(line)
    }
}

impl Method for Grpo<'_> {
    fn lens(&self) -> Vec<usize> {
        self.prompts.iter().map(|p| p.ids.len()).collect()
    }

    fn batches_per_step(&self) -> usize {
        1
    }

    fn group_by_length(&self) -> bool {
        false
    }

    fn step(&mut self, tr: &mut Trainer, batches: &[Vec<usize>]) -> Result<StepOut> {
        self.laps = PhaseTimes::start();
        let ro = self.rollout(&batches[0], tr.step)?;
        let up = self.update(&ro, tr)?;
        let metrics = self.log(&ro, up, tr.step + 1)?;
        let kl = metrics.get("kl_mean").and_then(Value::as_f64).map(|k| format!("  kl {k:.4}")).unwrap_or_default();
        let show = format!("reward {:.3}{kl}", metrics["reward_mean"].as_f64().unwrap_or(f64::NAN));
        let tokens = ro.ex.iter().map(|e| e.ids.len() - e.prompt_len()).sum();
        Ok(StepOut { metrics, show, tokens })
    }

    fn logs_throughput(&self) -> bool {
        false
    }

    fn plot(&self) -> (&'static str, Vec<PanelSpec>) {
        ("reward.png", vec![
            PanelSpec { y_label: "reward", line: ("reward_mean", "reward (weighted total)"), dots: None },
            PanelSpec { y_label: "KL", line: ("kl_mean", "KL to the reference"), dots: None },
        ])
    }
}

/// Runs (or resumes) GRPO as configured.
pub fn run(cfg: &TrainConfig, start: Start) -> Result<GrpoSummary> {
    let _span = tracing::info_span!("grpo").entered();
    // 1. Claim the output folder and check everything before any rollout or output.
    let cfg = &cfg.for_stage("grpo");
    let g = &cfg.grpo;
    let mut inputs = vec![("--model", cfg.model.name.as_str()), ("--data", cfg.data.path.as_str()), ("--sft-adapter", g.sft_adapter.as_str())];
    inputs.extend(g.rewards.iter().filter(|r| r.kind == "model").map(|r| ("--reward-adapter", r.adapter.as_str())));
    let mut session = Session::open(cfg, "grpo", start, &inputs)?;
    if let Some(done) = session.finished()? {
        return Ok(done);
    }
    let setup = Setup::new(cfg)?;
    let (device, tok) = (setup.device.clone(), &setup.tok);

    // 2. Data and rewards: every row has the fields the rewards read; each command answers.
    let limits = PromptLimits { section: "grpo", max_prompt_len: g.max_prompt_len, max_new_tokens: g.max_new_tokens, stop: &g.stop };
    let super::prompts::Prompts { rows: prompts, stop, end, record, .. } = load_prompts(cfg, &setup, &limits)?;
    let mut rewards = Rewards::new(&g.rewards)?;
    rewards.check_rows(&prompts.iter().map(|p| (&p.loc, &p.row)).collect::<Vec<_>>())?;
    let p0 = &prompts[0];
    rewards.check_commands(&Scored { prompt: &p0.prompt, completion: "", row: &p0.row, loc: &p0.loc })?;

    // 3. One base with every role's adapters: [reference], policy, reward models; on --resume
    //    the policy is the checkpoint's.
    let has_reference = !g.sft_adapter.is_empty();
    let mut adapters: Vec<std::sync::Arc<Adapter>> = vec![];
    if has_reference && g.beta > 0.0 {
        adapters.push(crate::peft::load_adapter(Path::new(&g.sft_adapter), REFERENCE, 1.0, false)?);
    }
    let policy = match (session.resume_dir(), has_reference) {
        (Some(dir), _) => crate::peft::load_adapter(dir, POLICY, 1.0, true)?,
        (None, true) => crate::peft::load_adapter(Path::new(&g.sft_adapter), POLICY, 1.0, true)?,
        (None, false) => Adapter::fresh(POLICY, lora_config(cfg, &setup.arch), cfg.train.seed)?,
    };
    adapters.push(policy.clone());
    let mut heads = vec![];
    for (i, dir) in rewards.model_adapters.iter().enumerate() {
        let (a, head) = crate::reward::load_reward_adapter(Path::new(dir), &format!("reward{i}"), false).with_context(|| format!("reward adapter {dir}"))?;
        heads.push((a.iter().map(|a| a.name.clone()).collect::<Vec<_>>(), head));
        adapters.extend(a);
    }
    let model = setup.load_model(adapters)?;
    let reward_models = heads
        .into_iter()
        .map(|(names, h)| Ok((names, RewardHead::from_tensor(h, false, setup.arch.hidden_size(), &device)?)))
        .collect::<Result<Vec<_>>>()?;
    model.adapters.set_training(false); // no LoRA dropout: old and new log-probs must agree
    let vars = policy.vars();

    // 4. The session's loop: rollout, reward, update and log per iteration; checkpoints; export.
    let out = session.out().to_path_buf();
    let mut method = Grpo {
        cfg, model: &model, tok, prompts, rewards, reward_models, has_reference: has_reference && g.beta > 0.0,
        stop, end, pad: tok.padding_id(), device, out, laps: PhaseTimes::start(),
    };
    let s = session.train(&model, &policy, vars, &mut method)?;
    record.write(session.out())?; // the templates the prompts went through (chat / generate / merge use them)

    // 5. The run's record, and what to do with the policy.
    let summary = GrpoSummary::new(session.out(), &s);
    let headline = format!(
        "{} iterations, reward {:.3} -> {:.3}, peak memory {}",
        s.steps,
        summary.first_reward_mean.unwrap_or(f64::NAN),
        summary.last_reward_mean.unwrap_or(f64::NAN),
        s.peak_rss_bytes.map(fmt_bytes).unwrap_or("n/a".into()),
    );
    session.finish(&summary, &headline, &session.try_adapter())?;
    Ok(summary)
}
