//! `lorafit ppo`: PPO against the reward model, with all four roles on ONE frozen base.
//!
//! The base is loaded once; the roles differ only by which adapters are active:
//! policy = a trainable copy of the SFT adapter; reference = the SFT adapter, frozen (or the
//! bare base, adapters off, when there is no SFT adapter); reward = the RM adapter (+ the
//! adapters it was stacked on) and its head, frozen; critic = a trainable value head (and
//! optionally a trainable copy of the RM adapter), initialised from the reward model.
//!
//! One iteration (Ouyang et al. 2022; Ziegler et al. 2019; TRL's `PPOTrainer`):
//! 1. sample prompts, generate responses (KV-cached, batched, left-padded); the old log-probs
//!    (and the logged entropy) come from the sampler's own logits, not a second policy forward;
//! 2. score `template(prompt) + response (+ eos)` at its last token; clip / whiten; without a
//!    critic adapter the critic's features (the reward model's hidden states) are kept from
//!    this pass, so values and the value-head update need no forward of their own;
//! 3. log-probs of the response tokens under the reference, and values;
//! 4. per-token reward `-β (log π - log π_ref)`, plus the score at the last token;
//! 5. GAE (γ, λ) and whitened advantages;
//! 6. `ppo_epochs` passes over minibatches: clipped policy loss, clipped value loss, optional
//!    entropy bonus; a minibatch whose mean ratio explodes is skipped.
//! Log-probs use the sampling temperature and LoRA dropout is off throughout; the old
//! log-probs are those of the distribution sampled from: the logged KL (the k3
//! estimator, `r - 1 - log r` with `r = π_ref/π`) cannot go negative by construction.
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Serialize;
use serde_json::{json, Value};

use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::looper::RunDir;
use super::optim::{clip_grad_norm, lr_at, AdamW};
use super::roles::{gae, whiten, Roles, CRITIC, POLICY, REFERENCE, REWARD, V_HEAD_KEY};
use super::sft::{lora_config, make_batch, SftExample};
use super::{epoch_batches, forward_backward, progress_bar, remove_run_files, GradAccum, MetricsLog, Setup, Start};
use crate::generate::{generate_with_logprobs, SamplingConfig};
use crate::lora::Adapter;
use crate::reward::{load_reward_adapter, RewardHead};
use crate::runtime::{fmt_bytes, peak_rss_bytes};

/// One rollout: sequences (prompt ++ response) and per-response-token quantities.
struct Rollout {
    ex: Vec<SftExample>,
    scores: Vec<f32>,
    old_logp: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    adv: Vec<Vec<f32>>,
    returns: Vec<Vec<f32>>,
}

#[derive(Debug, Serialize)]
pub struct PpoSummary {
    pub out_dir: PathBuf,
    pub iterations: usize,
    pub first_reward_mean: Option<f64>,
    pub last_reward_mean: Option<f64>,
    pub last_kl_mean: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

/// Runs (or resumes) PPO as configured.
pub fn run(cfg: &TrainConfig, start: Start) -> Result<PpoSummary> {
    // 0. Check everything before any rollout or output.
    let cfg = &cfg.for_stage("ppo");
    let p = &cfg.ppo;
    let t = &cfg.train;
    let run = RunDir::open(cfg, start)?;
    if p.reward_adapter.is_empty() {
        bail!("ppo.reward_adapter is not set: pass --reward-adapter DIR (a folder written by `lorafit rm`)")
    }
    if !matches!(p.reward_normalize.as_str(), "none" | "batch") {
        bail!("ppo.reward_normalize = {:?}: expected none or batch", p.reward_normalize)
    }
    if p.minibatch_size == 0 || p.ppo_epochs == 0 || p.max_new_tokens == 0 {
        bail!("ppo.minibatch_size, ppo.ppo_epochs and ppo.max_new_tokens must be at least 1")
    }
    let setup = Setup::new(cfg)?;
    let (template, device, arch, tok) = (&setup.template, setup.device.clone(), &setup.arch, &setup.tok);
    let eos = tok.eos_id.context("the tokenizer has no end-of-sequence token")?;
    if p.max_prompt_len + p.max_new_tokens > arch.max_positions() {
        bail!(
            "ppo.max_prompt_len ({}) + ppo.max_new_tokens ({}) exceed the model's context of {} tokens",
            p.max_prompt_len, p.max_new_tokens, arch.max_positions()
        )
    }
    let (prompts, skipped) = crate::data::read_prompts(Path::new(&cfg.data.path), cfg.data.skip_bad_rows)?;
    let mut cut = 0;
    let prompt_ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|pr| {
            let mut ids = tok.encode(&template.render(pr))?;
            if ids.len() > p.max_prompt_len {
                cut += 1;
                ids.drain(..ids.len() - p.max_prompt_len);
            }
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let mut stop = vec![eos];
    for s in &p.stop {
        match tok.encode_plain(s)?.as_slice() {
            [id] => stop.push(*id),
            other => bail!("ppo.stop {s:?} is {} tokens; a stop text must be a single token", other.len()),
        }
    }
    tracing::info!("data: {} prompts ({cut} cut to {} tokens, {skipped} bad rows skipped)", prompts.len(), p.max_prompt_len);

    // 1. The roles: adapters over the one base, loaded once.
    let mut adapters: Vec<std::sync::Arc<Adapter>> = vec![];
    let resume = run.resume_dir().map(Path::to_path_buf);
    let has_reference = !p.sft_adapter.is_empty();
    if has_reference {
        adapters.push(crate::peft::load_adapter(Path::new(&p.sft_adapter), REFERENCE, 1.0, false)?);
    }
    let policy = match (&resume, has_reference) {
        (Some(dir), _) => crate::peft::load_adapter(dir, POLICY, 1.0, true)?,
        (None, true) => crate::peft::load_adapter(Path::new(&p.sft_adapter), POLICY, 1.0, true)?,
        (None, false) => Adapter::fresh(POLICY, lora_config(cfg, arch), t.seed)?,
    };
    adapters.push(policy.clone());
    let rm_dir = Path::new(&p.reward_adapter);
    let (rm_adapters, rm_head) = load_reward_adapter(rm_dir, REWARD, false)
        .with_context(|| format!("ppo.reward_adapter {}", rm_dir.display()))?;
    let reward_names: Vec<String> = rm_adapters.iter().map(|a| a.name.clone()).collect();
    adapters.extend(rm_adapters);
    let aux = resume.as_ref().map(|d| candle_core::safetensors::load(d.join(checkpoint::AUX_FILE), &candle_core::Device::Cpu)).transpose()?;
    let mut critic_names = reward_names.clone();
    if p.critic_adapter {
        let (mut c, _) = load_reward_adapter(rm_dir, CRITIC, true)?;
        let critic = c.pop().unwrap();
        critic_names.pop();
        critic_names.push(CRITIC.into());
        adapters.push(critic);
    }
    let model = setup.load_model(adapters)?;
    let hidden = arch.hidden_size();
    let v_head_init = match &aux {
        Some(a) => a.get(V_HEAD_KEY).context("checkpoint has no value head")?.clone(),
        None => rm_head.clone(),
    };
    let roles = Roles {
        model: &model,
        reward_head: RewardHead::from_tensor(rm_head, false, hidden, &device)?,
        v_head: RewardHead::from_tensor(v_head_init, true, hidden, &device)?,
        reward_names,
        critic_names: critic_names.clone(),
        has_reference,
        cfg,
    };
    if let (Some(a), Some(critic)) = (&aux, model.adapters.get(CRITIC)) {
        for (k, v) in critic.vars() {
            v.set(&a.get(&format!("critic.{k}")).with_context(|| format!("checkpoint has no critic tensor {k}"))?.to_device(&device)?)?;
        }
    }
    model.adapters.set_training(false); // no LoRA dropout in PPO: old and new log-probs must agree
    let mut vars = policy.vars();
    if let Some(c) = model.adapters.get(CRITIC) {
        vars.extend(c.vars().into_iter().map(|(k, v)| (format!("critic.{k}"), v)));
    }
    vars.push((V_HEAD_KEY.into(), roles.v_head.var.clone().unwrap()));
    let mut opt = AdamW::new(vars, t)?;

    // Output folder, metrics and the resumable state.
    let total = if t.max_steps > 0 { t.max_steps } else { t.epochs * prompts.len().div_ceil(t.batch_size) };
    let (mut step, mut epoch, mut cursor, mut kl_coef) = (0, 0, 0, p.kl_coef);
    if let Some((dir, state)) = &run.ckpt {
        checkpoint::load_optimizer(dir, &mut opt)?;
        (step, epoch, cursor) = (state.step, state.epoch, state.batch_in_epoch);
        kl_coef = state.extra["kl_coef"].as_f64().unwrap_or(kl_coef);
    }
    if run.start == Start::Force {
        remove_run_files(&run.out)?;
    }
    std::fs::create_dir_all(&run.out).with_context(|| format!("cannot create {}", run.out.display()))?;
    crate::io::atomic_write(&run.out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let metrics = MetricsLog::open(&run.out, run.ckpt.as_ref().map(|(_, s)| s.step))?;
    let lens: Vec<usize> = prompt_ids.iter().map(Vec::len).collect();
    let mut order = epoch_batches(&lens, t.batch_size, t.seed, epoch, false);
    let pad = tok.padding_id();
    let pb = progress_bar(total, step);
    let (mut first_reward, mut last_reward, mut last_kl) = (None, None, None);

    while step < total {
        if cursor == order.len() {
            (epoch, cursor) = (epoch + 1, 0);
            order = epoch_batches(&lens, t.batch_size, t.seed, epoch, false);
        }
        let batch_prompts: Vec<Vec<u32>> = order[cursor].iter().map(|&i| prompt_ids[i].clone()).collect();
        cursor += 1;
        let mut timing = serde_json::Map::new();
        let mut clock = Instant::now();
        let mut lap = |name: &str, timing: &mut serde_json::Map<String, Value>| {
            timing.insert(format!("time_{name}_s"), clock.elapsed().as_secs_f64().into());
            // The process's peak so far: which phase sets the run's peak memory.
            if let Some(b) = peak_rss_bytes() {
                timing.insert(format!("peak_rss_after_{name}_mib"), (b as f64 / 1048576.0).round().into());
            }
            clock = Instant::now();
        };

        // 1. Generate with the policy (seeded per iteration, so a resumed run samples the same).
        let sampling = SamplingConfig {
            max_new_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: 1.0,
            seed: t.seed ^ (step as u64).wrapping_mul(0x9E3779B97F4A7C15),
            stop_tokens: stop.clone(),
        };
        roles.activate(&[POLICY.into()]);
        let samples = generate_with_logprobs(&model, &batch_prompts, pad, &sampling)?;
        let (responses, old_logp) = (samples.tokens, samples.logp);
        // The policy's entropy at the sampled positions, from the sampler's logits (as TRL logs
        // it); recomputed in the update only when it is part of the loss (ent_coef > 0).
        let n_resp: usize = samples.entropy.iter().map(Vec::len).sum();
        let rollout_entropy = samples.entropy.iter().flatten().map(|&h| h as f64).sum::<f64>() / n_resp.max(1) as f64;
        let ex: Vec<SftExample> = batch_prompts
            .iter()
            .zip(&responses)
            .map(|(pr, r)| SftExample { ids: pr.iter().chain(r).copied().collect(), prompt_len: pr.len() })
            .collect();
        let refs: Vec<&SftExample> = ex.iter().collect();
        lap("generate", &mut timing);

        // 2. Score with the reward model at the last token (eos appended if the response was cut).
        //    Without a critic adapter the critic reads the reward model's hidden states, so its
        //    features at the response positions are taken from this pass (the appended eos cannot
        //    change earlier positions under the causal mask) and kept for values and the update.
        let _no_grad = model.adapters.no_grad();
        roles.activate(&roles.reward_names);
        let (raw, critic_feats) = roles.score(&ex, eos, pad, t.batch_size, !p.critic_adapter)?;
        let mut scores = raw.clone();
        if p.reward_clip > 0.0 {
            scores.iter_mut().for_each(|s| *s = s.clamp(-p.reward_clip as f32, p.reward_clip as f32));
        }
        if p.reward_normalize == "batch" && scores.len() > 1 {
            let mut v = vec![scores.clone()];
            whiten(&mut v);
            scores = v.pop().unwrap();
        }
        lap("score", &mut timing);

        // 3. Reference log-probs and values (the old log-probs came with the samples); no graph.
        let b = make_batch(&refs, pad, &device)?;
        let reference = if roles.has_reference {
            roles.activate(&[REFERENCE.into()]);
            roles.logp(&model.hidden(&b.ids, &b.pos, &b.mask, None)?, &b)?
        } else {
            let _off = model.adapters.disabled();
            roles.logp(&model.hidden(&b.ids, &b.pos, &b.mask, None)?, &b)?
        }
        .to_vec1::<f32>()?;
        let values = match &critic_feats {
            Some(f) => f.matmul(&roles.v_head.weight.t()?)?.squeeze(1)?,
            None => {
                roles.activate(&roles.critic_names);
                roles.values(&model.hidden(&b.ids, &b.pos, &b.mask, None)?, &b)?
            }
        }
        .to_vec1::<f32>()?;
        drop(_no_grad);
        lap("logprobs", &mut timing);

        // 4. Per-token rewards: -β·(log π - log π_ref), plus the score on the last token.
        let (ref_logp, values) = (Roles::split(reference, &refs), Roles::split(values, &refs));
        let mut kl_seq = vec![];
        let mut kl1_seq = vec![];
        let mut rewards = vec![];
        for (i, (lp, lr)) in old_logp.iter().zip(&ref_logp).enumerate() {
            let k1: Vec<f32> = lp.iter().zip(lr).map(|(a, b)| a - b).collect();
            // k3 = r - 1 - log r with r = π_ref / π: >= 0 for every token.
            kl_seq.push(k1.iter().map(|&d| ((-d).exp() - 1.0 + d) as f64).sum::<f64>());
            kl1_seq.push(k1.iter().map(|&d| d as f64).sum::<f64>());
            let mut r: Vec<f32> = k1.iter().map(|d| (-kl_coef * *d as f64) as f32).collect();
            *r.last_mut().unwrap() += scores[i];
            rewards.push(r);
        }

        // 5. GAE and whitened advantages.
        let (mut adv, mut returns) = (vec![], vec![]);
        for (r, v) in rewards.iter().zip(&values) {
            let (a, ret) = gae(r, v, p.gamma, p.lam);
            adv.push(a);
            returns.push(ret);
        }
        whiten(&mut adv);
        let ro = Rollout { ex, scores: raw, old_logp, values, adv, returns };

        // 6. PPO epochs over minibatches. offsets[i]: the first response token of example i.
        let offsets: Vec<usize> = std::iter::once(0).chain(ro.ex.iter().scan(0, |a, e| { *a += e.ids.len() - e.prompt_len; Some(*a) })).collect();
        let (mut pl_sum, mut vl_sum, mut cf_sum, mut ent_sum, mut n_mb, mut skipped_mb) = (0.0, 0.0, 0.0, 0.0, 0usize, 0usize);
        for e in 0..p.ppo_epochs {
            let mb_order = epoch_batches(&vec![1; ro.ex.len()], p.minibatch_size, t.seed ^ step as u64, e, false);
            for mb in mb_order {
                let mex: Vec<&SftExample> = mb.iter().map(|&i| &ro.ex[i]).collect();
                let flat = |x: &Vec<Vec<f32>>| -> Vec<f32> { mb.iter().flat_map(|&i| x[i].clone()).collect() };
                let dev = &device;
                let (old_t, adv_t, ret_t, val_t) = (
                    Tensor::new(flat(&ro.old_logp).as_slice(), dev)?,
                    Tensor::new(flat(&ro.adv).as_slice(), dev)?,
                    Tensor::new(flat(&ro.returns).as_slice(), dev)?,
                    Tensor::new(flat(&ro.values).as_slice(), dev)?,
                );
                let mbb = make_batch(&mex, pad, dev)?;
                let mut acc = GradAccum::new(opt.vars.len());
                let stats = RefCell::new((0.0, 0.0, 1.0, 0.0));
                // 6a. Policy: clipped surrogate (+ entropy bonus).
                roles.activate(&[POLICY.into()]);
                let policy_loss = |h: &Tensor| -> Result<Tensor> {
                    let logp = roles.logp(h, &mbb)?;
                    let ratio = (&logp - &old_t)?.exp()?;
                    let pg1 = (adv_t.neg()? * &ratio)?;
                    let pg2 = (adv_t.neg()? * ratio.clamp(1.0 - p.clip_range, 1.0 + p.clip_range)?)?;
                    let mut loss = pg1.maximum(&pg2)?.mean_all()?;
                    let r: Vec<f32> = ratio.detach().to_vec1()?;
                    let clipfrac = r.iter().filter(|&&x| (x as f64 - 1.0).abs() > p.clip_range).count() as f64 / r.len() as f64;
                    let mean_ratio = r.iter().map(|&x| x as f64).sum::<f64>() / r.len() as f64;
                    let ent = if p.ent_coef > 0.0 {
                        let ent = roles.entropy(h, &mbb)?;
                        loss = (loss - (&ent * p.ent_coef)?)?;
                        ent.detach().to_scalar::<f32>()? as f64
                    } else {
                        rollout_entropy
                    };
                    let pl = loss.detach().to_scalar::<f32>()? as f64;
                    *stats.borrow_mut() = (pl, clipfrac, mean_ratio, ent);
                    Ok(loss)
                };
                forward_backward(&model, &mbb.ids, &mbb.pos, mbb.mask.clone(), t.grad_checkpointing, &policy_loss, &opt.vars, &mut acc)?;
                let (pl, clipfrac, mean_ratio, ent) = stats.into_inner();
                if !(mean_ratio < p.ratio_threshold && mean_ratio > 1.0 / p.ratio_threshold) {
                    tracing::warn!("iteration {}: skipping a minibatch whose mean ratio is {mean_ratio:.3}", step + 1);
                    skipped_mb += 1;
                    continue;
                }
                // 6b. Critic: clipped value loss (on the kept features when the critic has no
                //     adapter of its own: its value head is then all that trains).
                roles.activate(&roles.critic_names);
                let vl_cell = RefCell::new(0.0);
                let value_loss = |v: &Tensor| -> Result<Tensor> {
                    let vc = (&val_t + (v - &val_t)?.clamp(-p.value_clip, p.value_clip)?)?;
                    let l1 = (v - &ret_t)?.sqr()?;
                    let l2 = (&vc - &ret_t)?.sqr()?;
                    let loss = (l1.maximum(&l2)?.mean_all()? * 0.5)?;
                    *vl_cell.borrow_mut() = loss.detach().to_scalar::<f32>()? as f64;
                    Ok((loss * p.vf_coef)?)
                };
                match &critic_feats {
                    Some(f) => {
                        let rows: Vec<Tensor> = mb.iter().map(|&i| f.narrow(0, offsets[i], offsets[i + 1] - offsets[i])).collect::<candle_core::Result<_>>()?;
                        let v = Tensor::cat(&rows, 0)?.matmul(&roles.v_head.weight.t()?)?.squeeze(1)?; // (n,)
                        acc.add(&value_loss(&v)?.backward()?, &opt.vars)?;
                    }
                    None => {
                        let critic_loss = |h: &Tensor| value_loss(&roles.values(h, &mbb)?);
                        forward_backward(&model, &mbb.ids, &mbb.pos, mbb.mask.clone(), t.grad_checkpointing, &critic_loss, &opt.vars, &mut acc)?;
                    }
                }
                let mut grads = acc.finish(&opt.vars)?;
                clip_grad_norm(&mut grads, t.max_grad_norm)?;
                opt.step(&grads, lr_at(t, step, total))?;
                (pl_sum, vl_sum, cf_sum, ent_sum, n_mb) = (pl_sum + pl, vl_sum + vl_cell.into_inner(), cf_sum + clipfrac, ent_sum + ent, n_mb + 1);
            }
        }
        lap("update", &mut timing);
        step += 1;

        // 7. Adaptive KL, metrics, samples, checkpoint.
        let n = ro.scores.len() as f64;
        let reward_mean = ro.scores.iter().map(|&s| s as f64).sum::<f64>() / n;
        let reward_std = (ro.scores.iter().map(|&s| (s as f64 - reward_mean).powi(2)).sum::<f64>() / n).sqrt();
        let kl_mean = kl_seq.iter().sum::<f64>() / n;
        if p.target_kl > 0.0 {
            let err = (kl_mean / p.target_kl - 1.0).clamp(-0.2, 0.2);
            kl_coef *= 1.0 + err * (ro.ex.len() as f64) / p.kl_horizon;
        }
        let resp_len = ro.ex.iter().map(|e| (e.ids.len() - e.prompt_len) as f64).sum::<f64>() / n;
        let nmb = n_mb.max(1) as f64;
        let mut line = json!({"step": step, "epoch": epoch, "reward_mean": reward_mean, "reward_std": reward_std,
            "score_mean": ro.scores.iter().map(|&s| s as f64).sum::<f64>() / n,
            "kl_mean": kl_mean, "kl_k1_mean": kl1_seq.iter().sum::<f64>() / n, "kl_coef": kl_coef,
            "policy_loss": pl_sum / nmb, "value_loss": vl_sum / nmb, "clipfrac": cf_sum / nmb, "entropy": ent_sum / nmb,
            "response_len": resp_len, "skipped_minibatches": skipped_mb});
        line.as_object_mut().unwrap().extend(timing);
        metrics.log(&line)?;
        first_reward.get_or_insert(reward_mean);
        (last_reward, last_kl) = (Some(reward_mean), Some(kl_mean));
        if p.sample_every > 0 && (step % p.sample_every == 0 || step == 1) {
            let e = &ro.ex[0];
            let text = tok.decode(&e.ids[e.prompt_len..])?;
            tracing::info!("iteration {step}: sample response (score {:.3}): {text:?}", ro.scores[0]);
            let sample = json!({"step": step, "prompt": tok.decode(&e.ids[..e.prompt_len])?, "response": text, "score": ro.scores[0]});
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(run.out.join("samples.jsonl"))?;
            use std::io::Write;
            writeln!(f, "{sample}")?;
        }
        pb.set_message(format!("reward {reward_mean:.3}  kl {kl_mean:.4}"));
        pb.set_position(step as u64);
        if (t.save_every > 0 && step % t.save_every == 0) || step == total {
            let state = TrainState {
                step,
                epoch,
                batch_in_epoch: cursor,
                dropout_rng: model.adapters.adapters.iter().map(|a| a.dropout_rng().state()).collect(),
                tokens_seen: 0,
                config: cfg.to_toml()?,
                extra: json!({"kl_coef": kl_coef}),
            };
            let mut aux = vec![(V_HEAD_KEY.to_string(), roles.v_head.weight.clone())];
            if let Some(c) = model.adapters.get(CRITIC) {
                aux.extend(c.vars().into_iter().map(|(k, v)| (format!("critic.{k}"), v.as_tensor().clone())));
            }
            checkpoint::save(&run.out, &policy, &cfg.model.name, &opt, &state, t.keep_last, &[], &aux)?;
        }
    }
    pb.finish_and_clear();

    // 8. The policy adapter, in PEFT causal-LM format.
    crate::peft::save_adapter(&policy, &run.out, &cfg.model.name, &[])?;
    let summary = PpoSummary {
        out_dir: run.out.clone(),
        iterations: step,
        first_reward_mean: first_reward,
        last_reward_mean: last_reward,
        last_kl_mean: last_kl,
        peak_rss_bytes: peak_rss_bytes(),
    };
    crate::io::atomic_write(&run.out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    tracing::info!(
        "done: {step} iterations, reward {:.3} -> {:.3}, KL {:.4}, peak memory {}; policy adapter in {}",
        first_reward.unwrap_or(f64::NAN),
        last_reward.unwrap_or(f64::NAN),
        last_kl.unwrap_or(f64::NAN),
        summary.peak_rss_bytes.map(fmt_bytes).unwrap_or("n/a".into()),
        run.out.display()
    );
    Ok(summary)
}
