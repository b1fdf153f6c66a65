//! `lorafit ppo`: PPO against the reward model, with all four roles on ONE frozen base.
//!
//! The base is loaded once; the roles differ only by which adapters are active:
//! policy = a trainable copy of the SFT adapter; reference = the SFT adapter, frozen (or the
//! bare base, adapters off, when there is no SFT adapter); reward = the RM adapter (+ the
//! adapters it was stacked on) and its head, frozen; critic = a trainable value head (and
//! optionally a trainable copy of the RM adapter), initialised from the reward model.
//!
//! One iteration (Ouyang et al. 2022; Ziegler et al. 2019; TRL's `PPOTrainer`) is three steps,
//! as in torchtune's PPO recipe:
//! - `rollout`: generate responses (KV-cached, batched; the old log-probs and the logged
//!   entropy come from the sampler's own logits; prompts rendered by `render::Renderer`, as
//!   messages through the chat template with the generation prompt, stopping at its
//!   end-of-turn); score `template(prompt) + response (+ eos, or the end-of-turn)`
//!   with the reward model (without a critic adapter, the critic's features are kept from this
//!   pass); reference log-probs and values; per-token rewards `-β (log π - log π_ref)` plus the
//!   score on the last token; GAE and whitened advantages;
//! - `update`: `ppo_epochs` passes over minibatches: clipped policy loss (+ entropy bonus),
//!   clipped value loss, one update each; a minibatch whose mean ratio explodes is skipped;
//! - `log`: the adaptive KL coefficient, the metrics line, sample responses.
//! Log-probs use the sampling temperature and LoRA dropout is off throughout, so the logged KL
//! (k3, `r - 1 - log r` with `r = π_ref/π`) cannot go negative. The roles are built in
//! `roles.rs`, the formulas are in `ppo_math.rs`; the output folder, data cursor, checkpoints,
//! optimizer (with the f16 loss scaler) and export are the session's (`session.rs`).
use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};

use super::batch::{make_batch, SftExample};
use super::config::TrainConfig;
use super::plot::PanelSpec;
use super::ppo_math::{adapt_kl_coef, clipped_policy_loss, clipped_value_loss, gae, kl_rewards, shape_scores, whiten};
use super::prompts::{load_prompts, PromptLimits};
use super::roles::{self, Roles, POLICY};
use super::session::{Method, PhaseTimes, Session, StepOut, Trainer};
use super::{epoch_batches, forward_backward, GradAccum, Setup, Start};
use crate::generate::{generate_with_logprobs, SamplingConfig};
use crate::runtime::fmt_bytes;
use crate::tokenizer::Tokenizer;

/// One rollout: sequences (prompt ++ response) and per-response-token quantities.
struct Rollout {
    ex: Vec<SftExample>,
    /// The reward model's scores, as scored (before clipping / whitening).
    scores: Vec<f32>,
    old_logp: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    adv: Vec<Vec<f32>>,
    returns: Vec<Vec<f32>>,
    /// KL to the reference per sequence: k3 and k1 estimators.
    kl: Vec<f64>,
    kl_k1: Vec<f64>,
    /// The sampler's mean entropy at the sampled positions.
    entropy: f64,
    /// The critic's features at the response positions (N, C), when it has no adapter.
    critic_feats: Option<Tensor>,
}

/// Means over the minibatch updates of one iteration.
#[derive(Default)]
struct UpdateStats {
    policy_loss: f64,
    value_loss: f64,
    clipfrac: f64,
    entropy: f64,
    minibatches: usize,
    skipped: usize,
}

/// summary.json: reward and KL of the first and last iterations, peak memory.
pub type PpoSummary = super::session::RewardSummary;

/// PPO as a [`Method`] of the training session.
struct Ppo<'a> {
    cfg: &'a TrainConfig,
    roles: Roles<'a>,
    tok: &'a Tokenizer,
    prompts: Vec<Vec<u32>>,
    stop: Vec<u32>,
    eos: u32,
    pad: u32,
    device: Device,
    /// The KL coefficient β (adaptive when `ppo.target_kl` > 0; resumable state).
    kl_coef: f64,
    out: PathBuf,
    laps: PhaseTimes,
}

impl Ppo<'_> {
    /// Generate, score, reference log-probs and values, rewards, advantages.
    fn rollout(&mut self, prompts: &[Vec<u32>], step: usize) -> Result<Rollout> {
        let (p, t, roles, model) = (&self.cfg.ppo, &self.cfg.train, &self.roles, self.roles.model);
        // 1. Generate with the policy (seeded per iteration, so a resumed run samples the same).
        let sampling = SamplingConfig {
            max_new_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: 1.0,
            seed: roles::rollout_seed(t.seed, step),
            stop_tokens: self.stop.clone(),
        };
        roles.activate(&[POLICY.into()]);
        let samples = generate_with_logprobs(model, prompts, self.pad, &sampling)?;
        // The policy's entropy at the sampled positions, from the sampler's logits (as TRL logs
        // it); recomputed in the update only when it is part of the loss (ent_coef > 0).
        let n_resp: usize = samples.entropy.iter().map(Vec::len).sum();
        let entropy = samples.entropy.iter().flatten().map(|&h| h as f64).sum::<f64>() / n_resp.max(1) as f64;
        let ex: Vec<SftExample> =
            prompts.iter().zip(&samples.tokens).map(|(pr, r)| SftExample::completion(pr.iter().chain(r).copied().collect(), pr.len())).collect();
        let refs: Vec<&SftExample> = ex.iter().collect();
        self.laps.lap("generate");

        // 2. Score with the reward model at the last token (eos appended if the response was cut).
        //    Without a critic adapter the critic reads the reward model's hidden states, so its
        //    features at the response positions are taken from this pass (the appended eos cannot
        //    change earlier positions under the causal mask) and kept for values and the update.
        let _no_grad = model.adapters.no_grad();
        roles.activate(&roles.reward_names);
        let (raw, critic_feats) = roles.score(&ex, self.eos, self.pad, t.batch_size, !p.critic_adapter)?;
        let scores = shape_scores(&raw, p.reward_clip, &p.reward_normalize);
        self.laps.lap("score");

        // 3. Reference log-probs and values (the old log-probs came with the samples); no graph.
        let b = make_batch(&refs, self.pad, &self.device)?;
        let reference = roles.reference_logp(&b)?.to_vec1::<f32>()?;
        let values = roles.rollout_values(&b, critic_feats.as_ref())?.to_vec1::<f32>()?;
        drop(_no_grad);
        self.laps.lap("logprobs");

        // 4. Per-token rewards (KL penalty + score on the last token), GAE, whitened advantages.
        let (ref_logp, values) = (Roles::split(reference, &refs), Roles::split(values, &refs));
        let (mut kl, mut kl_k1, mut adv, mut returns) = (vec![], vec![], vec![], vec![]);
        for (i, (lp, lr)) in samples.logp.iter().zip(&ref_logp).enumerate() {
            let k = kl_rewards(lp, lr, self.kl_coef, scores[i]);
            let (a, ret) = gae(&k.rewards, &values[i], p.gamma, p.lam);
            kl.push(k.kl);
            kl_k1.push(k.kl_k1);
            adv.push(a);
            returns.push(ret);
        }
        whiten(&mut adv);
        Ok(Rollout { ex, scores: raw, old_logp: samples.logp, values, adv, returns, kl, kl_k1, entropy, critic_feats })
    }

    /// `ppo_epochs` passes over shuffled minibatches of the rollout, one update each.
    fn update(&mut self, ro: &Rollout, tr: &mut Trainer) -> Result<UpdateStats> {
        let (p, t, roles, model) = (&self.cfg.ppo, &self.cfg.train, &self.roles, self.roles.model);
        // offsets[i]: the first response token of example i in the flat rollout vectors.
        let offsets: Vec<usize> = std::iter::once(0).chain(ro.ex.iter().scan(0, |a, e| { *a += e.ids.len() - e.prompt_len(); Some(*a) })).collect();
        let mut st = UpdateStats::default();
        let scale = tr.loss_scale();
        let scaled = |loss: Tensor| -> Result<Tensor> { Ok(if scale != 1.0 { (loss * scale)? } else { loss }) };
        for e in 0..p.ppo_epochs {
            let mb_order = epoch_batches(&vec![1; ro.ex.len()], p.minibatch_size, t.seed ^ tr.step as u64, e, false);
            for mb in mb_order {
                let mex: Vec<&SftExample> = mb.iter().map(|&i| &ro.ex[i]).collect();
                let flat = |x: &Vec<Vec<f32>>| -> Vec<f32> { mb.iter().flat_map(|&i| x[i].clone()).collect() };
                let dev = &self.device;
                let (old_t, adv_t, ret_t, val_t) = (
                    Tensor::new(flat(&ro.old_logp).as_slice(), dev)?,
                    Tensor::new(flat(&ro.adv).as_slice(), dev)?,
                    Tensor::new(flat(&ro.returns).as_slice(), dev)?,
                    Tensor::new(flat(&ro.values).as_slice(), dev)?,
                );
                let mbb = make_batch(&mex, self.pad, dev)?;
                let mut acc = GradAccum::new(tr.vars().len());
                let stats = RefCell::new((0.0, 0.0, 1.0, 0.0));
                // a. Policy: clipped surrogate (+ entropy bonus).
                roles.activate(&[POLICY.into()]);
                let policy_loss = |h: &Tensor| -> Result<Tensor> {
                    let (mut loss, clipfrac, mean_ratio) = clipped_policy_loss(&roles.logp(h, &mbb)?, &old_t, &adv_t, p.clip_range)?;
                    let ent = if p.ent_coef > 0.0 {
                        let ent = roles.entropy(h, &mbb)?;
                        loss = (loss - (&ent * p.ent_coef)?)?;
                        ent.detach().to_scalar::<f32>()? as f64
                    } else {
                        ro.entropy
                    };
                    *stats.borrow_mut() = (loss.detach().to_scalar::<f32>()? as f64, clipfrac, mean_ratio, ent);
                    scaled(loss)
                };
                forward_backward(model, &mbb.ids, &mbb.pos, mbb.mask.clone(), t.grad_checkpointing, &policy_loss, tr.vars(), &mut acc)?;
                let (pl, clipfrac, mean_ratio, ent) = stats.into_inner();
                if !(mean_ratio < p.ratio_threshold && mean_ratio > 1.0 / p.ratio_threshold) {
                    tracing::warn!("iteration {}: skipping a minibatch whose mean ratio is {mean_ratio:.3}", tr.step + 1);
                    st.skipped += 1;
                    continue;
                }
                // b. Critic: clipped value loss (on the kept features when the critic has no
                //    adapter of its own: its value head is then all that trains).
                roles.activate(&roles.critic_names);
                let vl_cell = RefCell::new(0.0);
                let value_loss = |v: &Tensor| -> Result<Tensor> {
                    let loss = clipped_value_loss(v, &val_t, &ret_t, p.value_clip)?;
                    *vl_cell.borrow_mut() = loss.detach().to_scalar::<f32>()? as f64;
                    scaled((loss * p.vf_coef)?)
                };
                match &ro.critic_feats {
                    Some(f) => {
                        let rows: Vec<Tensor> = mb.iter().map(|&i| f.narrow(0, offsets[i], offsets[i + 1] - offsets[i])).collect::<candle_core::Result<_>>()?;
                        let v = Tensor::cat(&rows, 0)?.matmul(&roles.v_head.weight.t()?)?.squeeze(1)?; // (n,)
                        acc.add(&value_loss(&v)?.backward()?, tr.vars())?;
                    }
                    None => {
                        let critic_loss = |h: &Tensor| value_loss(&roles.values(h, &mbb)?);
                        forward_backward(model, &mbb.ids, &mbb.pos, mbb.mask.clone(), t.grad_checkpointing, &critic_loss, tr.vars(), &mut acc)?;
                    }
                }
                // c. One update of policy and critic.
                tr.apply(acc)?;
                st.policy_loss += pl;
                st.value_loss += vl_cell.into_inner();
                st.clipfrac += clipfrac;
                st.entropy += ent;
                st.minibatches += 1;
            }
        }
        self.laps.lap("update");
        Ok(st)
    }

    /// The adaptive KL coefficient, the iteration's metrics, and a sample response.
    fn log(&mut self, ro: &Rollout, st: &UpdateStats, step: usize) -> Result<Map<String, Value>> {
        let p = &self.cfg.ppo;
        let n = ro.scores.len() as f64;
        let reward_mean = ro.scores.iter().map(|&s| s as f64).sum::<f64>() / n;
        let reward_std = (ro.scores.iter().map(|&s| (s as f64 - reward_mean).powi(2)).sum::<f64>() / n).sqrt();
        let kl_mean = ro.kl.iter().sum::<f64>() / n;
        self.kl_coef = adapt_kl_coef(self.kl_coef, kl_mean, p.target_kl, ro.ex.len(), p.kl_horizon);
        let resp_len = ro.ex.iter().map(|e| (e.ids.len() - e.prompt_len()) as f64).sum::<f64>() / n;
        let nmb = st.minibatches.max(1) as f64;
        let mut line = json!({"reward_mean": reward_mean, "reward_std": reward_std,
            "score_mean": ro.scores.iter().map(|&s| s as f64).sum::<f64>() / n,
            "kl_mean": kl_mean, "kl_k1_mean": ro.kl_k1.iter().sum::<f64>() / n, "kl_coef": self.kl_coef,
            "policy_loss": st.policy_loss / nmb, "value_loss": st.value_loss / nmb, "clipfrac": st.clipfrac / nmb,
            "entropy": st.entropy / nmb, "response_len": resp_len, "skipped_minibatches": st.skipped});
        let mut line = std::mem::take(line.as_object_mut().unwrap());
        line.extend(std::mem::take(&mut self.laps.fields));
        if p.sample_every > 0 && (step % p.sample_every == 0 || step == 1) {
            let e = &ro.ex[0];
            let text = self.tok.decode(&e.ids[e.prompt_len()..])?;
            tracing::info!("iteration {step}: sample response (score {:.3}): {text:?}", ro.scores[0]);
            let sample = json!({"step": step, "prompt": self.tok.decode(&e.ids[..e.prompt_len()])?, "response": text, "score": ro.scores[0]});
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.out.join("samples.jsonl"))?;
            writeln!(f, "{sample}")?;
        }
        Ok(line)
    }
}

impl Method for Ppo<'_> {
    fn lens(&self) -> Vec<usize> {
        self.prompts.iter().map(Vec::len).collect()
    }

    fn batches_per_step(&self) -> usize {
        1
    }

    fn group_by_length(&self) -> bool {
        false
    }

    fn step(&mut self, tr: &mut Trainer, batches: &[Vec<usize>]) -> Result<StepOut> {
        self.laps = PhaseTimes::start();
        let prompts: Vec<Vec<u32>> = batches[0].iter().map(|&i| self.prompts[i].clone()).collect();
        let ro = self.rollout(&prompts, tr.step)?;
        let st = self.update(&ro, tr)?;
        let metrics = self.log(&ro, &st, tr.step + 1)?;
        let show = format!("reward {:.3}  kl {:.4}", metrics["reward_mean"].as_f64().unwrap_or(f64::NAN), metrics["kl_mean"].as_f64().unwrap_or(f64::NAN));
        let tokens = ro.ex.iter().map(|e| e.ids.len() - e.prompt_len()).sum();
        Ok(StepOut { metrics, show, tokens })
    }

    fn logs_throughput(&self) -> bool {
        false
    }

    fn aux_tensors(&self) -> Vec<(String, Tensor)> {
        self.roles.critic_tensors()
    }

    fn state(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("kl_coef".into(), self.kl_coef.into());
        m
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        self.kl_coef = state["kl_coef"].as_f64().unwrap_or(self.kl_coef);
        Ok(())
    }

    fn plot(&self) -> (&'static str, Vec<PanelSpec>) {
        ("reward.png", vec![
            PanelSpec { y_label: "reward", line: ("reward_mean", "reward (mean score)"), dots: None },
            PanelSpec { y_label: "KL", line: ("kl_mean", "KL to the reference"), dots: None },
        ])
    }
}

/// Runs (or resumes) PPO as configured.
pub fn run(cfg: &TrainConfig, start: Start) -> Result<PpoSummary> {
    let _span = tracing::info_span!("ppo").entered();
    // 1. Claim the output folder and check everything before any rollout or output.
    let cfg = &cfg.for_stage("ppo");
    let p = &cfg.ppo;
    let inputs = [
        ("--model", cfg.model.name.as_str()),
        ("--data", &cfg.data.path),
        ("--sft-adapter", &p.sft_adapter),
        ("--reward-adapter", &p.reward_adapter),
    ];
    let mut session = Session::open(cfg, "ppo", start, &inputs)?;
    if let Some(done) = session.finished()? {
        return Ok(done);
    }
    if p.reward_adapter.is_empty() {
        bail!("ppo.reward_adapter is not set: pass --reward-adapter DIR (a folder written by `lorafit rm`)")
    }
    let setup = Setup::new(cfg)?;
    let (device, tok) = (setup.device.clone(), &setup.tok);

    // 2. Data: the prompts through the template, cut to max_prompt_len; the stop tokens; the
    //    token the reward model reads a cut response at (eos, or the chat end-of-turn).
    let limits = PromptLimits { section: "ppo", max_prompt_len: p.max_prompt_len, max_new_tokens: p.max_new_tokens, stop: &p.stop };
    let data = load_prompts(cfg, &setup, &limits)?;
    let (prompts, stop, eos, record) = (data.rows.into_iter().map(|r| r.ids).collect(), data.stop, data.end, data.record);

    // 3. The roles: adapters over the one base, loaded once; on --resume, the checkpoint's.
    let (model, policy, parts) = roles::load(&setup, cfg, session.resume_dir())?;
    let roles = Roles::new(&model, parts, cfg);
    model.adapters.set_training(false); // no LoRA dropout in PPO: old and new log-probs must agree
    let vars = roles.trainables(&policy);

    // 4. The session's loop: rollout, update and log per iteration; checkpoints; the export.
    let out = session.out().to_path_buf();
    let mut method =
        Ppo { cfg, roles, tok, prompts, stop, eos, pad: tok.padding_id(), device, kl_coef: p.kl_coef, out, laps: PhaseTimes::start() };
    let s = session.train(&model, &policy, vars, &mut method)?;
    record.write(session.out())?;

    // 5. The run's record, and what to do with the policy.
    let summary = PpoSummary::new(session.out(), &s);
    let headline = format!(
        "{} iterations, reward {:.3} -> {:.3}, KL {:.4}, peak memory {}",
        s.steps,
        summary.first_reward_mean.unwrap_or(f64::NAN),
        summary.last_reward_mean.unwrap_or(f64::NAN),
        summary.last_kl_mean.unwrap_or(f64::NAN),
        s.peak_rss_bytes.map(fmt_bytes).unwrap_or("n/a".into()),
    );
    session.finish(&summary, &headline, &session.try_adapter())?;
    Ok(summary)
}
