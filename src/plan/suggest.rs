//! Over budget: the smallest set of changes that fits, each set re-planned.
//!
//! The changes are ordered by what they cost the user: activation checkpointing (slower steps,
//! same result), then a 16-bit base (a little precision; slower on the CPU), then a smaller
//! micro-batch with more accumulation (same sequences per optimizer step, slower), then NF4
//! quantization (a 4-bit base: more precision lost). Sets are tried smallest first; among sets of
//! one size, the one whose costliest change is cheapest comes first. Every set of the smallest
//! size that fits is returned, cheapest first. The sequence length is never shortened: with the
//! data read the plan already sizes its longest rows (shorter would cut them), and without it
//! the plan says it assumed rows of `data.max_len`. On the CPU, when no set fits, moving to a
//! GPU is offered.
use anyhow::Result;

use super::{data::Measured, plan_config, with_sets, Base, Plan, Suggestion};
use crate::train::config::TrainConfig;

/// A change to the config; `MicroBatch` halves the micro-batch until the set fits.
#[derive(Clone, Copy, PartialEq)]
enum Knob {
    Checkpointing,
    Bf16,
    MicroBatch,
    Nf4,
}

/// Suggestions for `p`, the over-budget plan of `cfg`. `prefix` goes before the shown `--set`s.
pub(super) fn smallest_changes(base: &Base, cfg: &TrainConfig, data: &Measured, p: &Plan, budget: u64, prefix: &str) -> Result<Vec<Suggestion>> {
    let stage = p.stage.as_str();
    // The batch knob: sequences per micro-batch (same per optimizer step via grad_accum); for PPO
    // the minibatch of the update, or the prompts per rollout when the rollout peaks.
    let (key, bs, acc) = match (stage, p.phase.as_str()) {
        ("ppo", "rollout") => ("train.batch_size", cfg.train.batch_size, 0),
        ("ppo", _) => ("ppo.minibatch_size", cfg.ppo.minibatch_size, 0),
        _ => ("train.batch_size", cfg.train.batch_size, cfg.train.grad_accum),
    };
    let mut knobs = vec![];
    if !cfg.train.grad_checkpointing {
        knobs.push(Knob::Checkpointing);
    }
    if p.dtype == "f32" {
        knobs.push(Knob::Bf16);
    }
    if bs > 1 {
        knobs.push(Knob::MicroBatch);
    }
    if cfg.model.quantize != "nf4" {
        knobs.push(Knob::Nf4);
    }
    let cpu = p.device == "cpu";
    // (what, --sets) of a fixed knob.
    let fixed = |k: Knob| -> (String, Vec<String>) {
        match k {
            Knob::Checkpointing => ("activation checkpointing".into(), vec!["train.grad_checkpointing=true".into()]),
            Knob::Bf16 => (format!("a bf16 base{}", if cpu { " (slower on CPU)" } else { "" }), vec!["model.dtype=bf16".into()]),
            Knob::Nf4 => ("a 4-bit base (QLoRA's NF4)".into(), vec!["model.quantize=nf4".into()]),
            Knob::MicroBatch => unreachable!("sized by the search"),
        }
    };
    let micro = |k: u32| -> (String, Vec<String>) {
        let (b, a) = (bs >> k, acc << k);
        if acc > 0 {
            (format!("{key} {bs} -> {b} with train.grad_accum {acc} -> {a}"), vec![format!("{key}={b}"), format!("train.grad_accum={a}")])
        } else {
            (format!("{key} {bs} -> {b}"), vec![format!("{key}={b}")])
        }
    };
    let replan = |change: Vec<String>, sets: Vec<String>| -> Result<Suggestion> {
        let peak = plan_config(base, &with_sets(cfg, &sets)?, stage, data)?.peak_bytes;
        let sets = sets.into_iter().map(|s| format!("{prefix}{s}")).collect();
        Ok(Suggestion { change: change.join(" + "), sets, peak_bytes: peak, fits: peak <= budget })
    };
    // A set of knobs (indices into `knobs`), re-planned; the micro-batch is the largest that fits.
    let try_set = |set: &[usize]| -> Result<Option<Suggestion>> {
        let (mut change, mut sets) = (vec![], vec![]);
        for &i in set.iter().filter(|&&i| knobs[i] != Knob::MicroBatch) {
            let (c, s) = fixed(knobs[i]);
            change.push(c);
            sets.extend(s);
        }
        if !set.iter().any(|&i| knobs[i] == Knob::MicroBatch) {
            let s = replan(change, sets)?;
            return Ok(s.fits.then_some(s));
        }
        for k in (1..usize::BITS).take_while(|&k| bs >> k > 0) {
            let (c, s) = micro(k);
            let s = replan(change.iter().cloned().chain([c]).collect(), sets.iter().cloned().chain(s).collect())?;
            if s.fits {
                return Ok(Some(s));
            }
        }
        Ok(None)
    };
    // Every non-empty set, smallest first, then by its costliest change, then the next ...
    let n = knobs.len();
    let mut sets: Vec<Vec<usize>> = (1..1u32 << n).map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect()).collect();
    sets.sort_by_key(|s| (s.len(), s.iter().rev().copied().collect::<Vec<_>>()));
    let (mut found, mut size) = (vec![], usize::MAX);
    for set in &sets {
        if set.len() > size {
            break;
        }
        if let Some(s) = try_set(set)? {
            size = set.len();
            found.push(s);
        }
    }
    if found.is_empty() && cpu {
        let s = replan(vec!["on a GPU in bf16 (the budget is then GPU memory)".into()], vec!["model.device=\"cuda\"".into(), "model.dtype=bf16".into()])?;
        found.extend(s.fits.then_some(s));
    }
    Ok(found)
}
