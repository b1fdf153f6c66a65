//! `lorafit pipeline`: the InstructGPT / KoChatGPT recipe in one command — SFT, then the
//! reward model, then PPO — from one config.
//!
//! The config is a training config (shared by all stages) plus `[stages.sft]`, `[stages.rm]`,
//! `[stages.ppo]` tables that override it per stage (e.g. `[stages.rm.data] path = ...`).
//! Stage outputs go to `<out.dir>/<stage>`; unless set, the reward model is stacked on the
//! SFT adapter (InstructGPT starts the RM from the SFT model), PPO starts its policy and
//! reference from the SFT adapter and scores with the reward model.
//! The root folder is locked while the pipeline runs; each stage claims its own folder
//! through its training session. With a `[stages.grpo]` table the pipeline is SFT -> GRPO
//! instead (see the block at the end).
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::config::{apply_sets, merge, read_table, TrainConfig};
use super::Start;
use crate::outdir::OutDir;

#[derive(Debug, Serialize)]
pub struct PipelineSummary {
    pub sft: Option<super::sft::SftSummary>,
    // A pipeline runs sft -> rm -> ppo, sft -> dpo or sft -> grpo: stages it has no table for
    // are left out of the printed summary rather than shown as null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rm: Option<super::rm::RmSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppo: Option<super::ppo::PpoSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpo: Option<super::grpo::GrpoSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<super::dpo::DpoSummary>,
}

/// The config of each stage, resolved.
pub fn stage_configs(file: &Path, sets: &[String]) -> Result<[TrainConfig; 3]> {
    Ok(resolve(file, sets)?.1)
}

/// The pipeline's root folder and the config of each stage.
fn resolve(file: &Path, sets: &[String]) -> Result<(String, [TrainConfig; 3])> {
    let mut table = read_table(Some(file))?;
    apply_sets(&mut table, sets)?;
    let stages = match table.remove("stages") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => anyhow::bail!("{}: `stages` must be a table ([stages.sft], [stages.rm], [stages.ppo])", file.display()),
        None => toml::Table::new(),
    };
    if let Some(k) = stages.keys().find(|k| !["sft", "rm", "ppo", "grpo"].contains(&k.as_str())) {
        anyhow::bail!("{}: unknown stage [stages.{k}] (stages: sft, rm, ppo, grpo)", file.display())
    }
    let root = table.get("out").and_then(|o| o.get("dir")).and_then(|d| d.as_str()).unwrap_or("adapters/pipeline").to_string();
    let mut out = vec![];
    for stage in ["sft", "rm", "ppo"] {
        let mut t = table.clone();
        let mut defaults = toml::Table::new();
        apply_sets(&mut defaults, &[format!("out.dir={}", toml::Value::String(format!("{root}/{stage}")))])?;
        let sft_dir = toml::Value::String(format!("{root}/sft")).to_string();
        let rm_dir = toml::Value::String(format!("{root}/rm")).to_string();
        match stage {
            "rm" => apply_sets(&mut defaults, &[format!("rm.sft_adapter={sft_dir}")])?,
            "ppo" => apply_sets(&mut defaults, &[format!("ppo.sft_adapter={sft_dir}"), format!("ppo.reward_adapter={rm_dir}")])?,
            _ => {}
        }
        merge(&mut t, &defaults);
        if let Some(toml::Value::Table(o)) = stages.get(stage) {
            merge(&mut t, o);
        }
        out.push(TrainConfig::from_table(t, &format!("{} [stages.{stage}]", file.display()))?.for_stage(stage));
    }
    Ok((root, out.try_into().map_err(|_| anyhow::anyhow!("three stages"))?))
}

/// A stage's summary.json (a finished stage that `--resume` skips).
fn read_summary<S: serde::de::DeserializeOwned>(cfg: &TrainConfig) -> Result<S> {
    let p = Path::new(&cfg.out.dir).join("summary.json");
    serde_json::from_str(&std::fs::read_to_string(&p)?).with_context(|| format!("{}: cannot read the stage's summary", p.display()))
}

/// Checks that no stage reads from `root`, locks it (a second pipeline into it fails at once)
/// and marks it as lorafit's.
fn lock_root(root: &str, stages: &[&TrainConfig]) -> Result<OutDir> {
    let inputs: Vec<(&str, &Path)> = stages
        .iter()
        .flat_map(|c| [("model.name", Path::new(&c.model.name)), ("data.path", Path::new(&c.data.path)), ("data.eval_path", Path::new(&c.data.eval_path))])
        .collect();
    crate::outdir::check_not_input(Path::new(root), "out.dir", &inputs)?;
    let dir = OutDir::lock(Path::new(root))?;
    if dir.contents()?.is_empty() || dir.marker().is_some() {
        dir.write_marker("pipeline", &[])?;
    }
    Ok(dir)
}

/// Whether `--resume` skips the stage: it has a summary.json.
fn finished(cfg: &TrainConfig, start: Start) -> bool {
    start == Start::Resume && Path::new(&cfg.out.dir).join("summary.json").is_file()
}

/// How an unfinished stage starts: `--resume` resumes its last checkpoint, restarts one that
/// stopped before its first checkpoint (lorafit's own partial output), or starts it fresh.
fn stage_start(cfg: &TrainConfig, start: Start) -> Start {
    let out = Path::new(&cfg.out.dir);
    match start {
        Start::Resume if super::checkpoint::list(out).map(|l| !l.is_empty()).unwrap_or(false) => Start::Resume,
        Start::Resume if super::session::RUN_FILES.iter().any(|f| out.join(f).exists()) => Start::Force,
        Start::Resume => Start::Fresh,
        s => s,
    }
}

/// A stage's summary: read when `--resume` skips it, else from running it.
fn stage<S: serde::de::DeserializeOwned>(cfg: &TrainConfig, start: Start, name: &str, what: &str, run_stage: fn(&TrainConfig, Start) -> Result<S>) -> Result<S> {
    if finished(cfg, start) {
        return read_summary(cfg);
    }
    tracing::info!("{what} -> {}", cfg.out.dir);
    run_stage(cfg, stage_start(cfg, start)).with_context(|| format!("pipeline stage {name}"))
}

/// SFT, then a second stage that starts from its adapter (DPO, GRPO), each skipped when
/// finished and resuming, as [`run`] does for the three stages.
fn run_sft_then<S: serde::de::DeserializeOwned>(
    root: &str,
    sft: &TrainConfig,
    second: &TrainConfig,
    start: Start,
    name: &str,
    what: &str,
    run_second: fn(&TrainConfig, Start) -> Result<S>,
) -> Result<(super::sft::SftSummary, S)> {
    let dir = lock_root(root, &[sft, second])?;
    let sft_s = stage(sft, start, "sft", "1/2: SFT", super::sft::run)?;
    let second_s = stage(second, start, name, &format!("2/2: {what}"), run_second)?;
    tracing::info!("done: sft and {name} in {root}");
    let (m, policy) = (super::session::shell_word(&second.model.name), super::session::shell_word(&second.out.dir));
    tracing::info!("next: lorafit generate --model {m} --adapter {policy} --prompt \"...\"");
    drop(dir);
    Ok((sft_s, second_s))
}

/// Runs the three stages in order. `Start::Resume` skips finished stages (those with a
/// summary.json), resumes the interrupted one, and restarts one that stopped before its first
/// checkpoint.
pub fn run(file: &Path, sets: &[String], start: Start) -> Result<PipelineSummary> {
    let _span = tracing::info_span!("pipeline").entered();
    if let Some((root, sft, grpo)) = grpo_stages(file, sets)? {
        return run_sft_grpo(&root, sft, grpo, start);
    }
    if let Some((root, cfgs)) = resolve_sft_dpo(file, sets)? {
        return run_sft_dpo(&root, cfgs, start);
    }
    let (root, [sft, rm, ppo]) = resolve(file, sets)?;
    let dir = lock_root(&root, &[&sft, &rm, &ppo])?;
    let all_done = [&sft, &rm, &ppo].iter().all(|c| finished(c, start));
    let summary = PipelineSummary {
        sft: Some(stage(&sft, start, "sft", "1/3: SFT", super::sft::run)?),
        rm: Some(stage(&rm, start, "rm", "2/3: reward model", super::rm::run)?),
        ppo: Some(stage(&ppo, start, "ppo", "3/3: PPO", super::ppo::run)?),
        grpo: None,
        dpo: None,
    };
    if all_done {
        tracing::info!("{root} holds a finished pipeline (sft, rm and ppo are done): nothing to resume");
    } else {
        tracing::info!("done: sft, rm and ppo in {root}");
    }
    let (m, policy) = (super::session::shell_word(&ppo.model.name), super::session::shell_word(&ppo.out.dir));
    tracing::info!("next: lorafit generate --model {m} --adapter {policy} --prompt \"...\"");
    drop(dir);
    Ok(summary)
}

// ---- sft -> dpo ----------------------------------------------------------------------------
// A pipeline config with `[stages.dpo]` runs SFT, then DPO with the policy starting from the
// SFT adapter and the reference being it, frozen (`dpo.sft_adapter` = `<out.dir>/sft` unless
// set). Its stages are `[stages.sft]` and `[stages.dpo]` only.

/// The root folder and the (sft, dpo) configs of a pipeline config with `[stages.dpo]`;
/// None for the sft -> rm -> ppo recipe.
pub fn resolve_sft_dpo(file: &Path, sets: &[String]) -> Result<Option<(String, [TrainConfig; 2])>> {
    let mut table = read_table(Some(file))?;
    apply_sets(&mut table, sets)?;
    let stages = match table.remove("stages") {
        Some(toml::Value::Table(t)) if t.contains_key("dpo") => t,
        _ => return Ok(None),
    };
    // `--device`/`--dtype`/`--quantize` set `stages.{sft,rm,ppo}.model.*`: only those are allowed there.
    let only_model_flags = |v: &toml::Value| v.as_table().is_some_and(|t| t.keys().all(|k| k == "model"));
    if let Some(k) = stages.iter().find(|(k, v)| !["sft", "dpo"].contains(&k.as_str()) && !(["rm", "ppo"].contains(&k.as_str()) && only_model_flags(v))).map(|(k, _)| k) {
        anyhow::bail!("{}: [stages.dpo] makes this an sft -> dpo pipeline; [stages.{k}] does not belong to it (stages: sft, dpo)", file.display())
    }
    let root = table.get("out").and_then(|o| o.get("dir")).and_then(|d| d.as_str()).unwrap_or("adapters/pipeline").to_string();
    let mut out = vec![];
    for stage in ["sft", "dpo"] {
        let mut t = table.clone();
        let mut defaults = toml::Table::new();
        apply_sets(&mut defaults, &[format!("out.dir={}", toml::Value::String(format!("{root}/{stage}")))])?;
        if stage == "dpo" {
            apply_sets(&mut defaults, &[format!("dpo.sft_adapter={}", toml::Value::String(format!("{root}/sft")))])?;
        }
        merge(&mut t, &defaults);
        if let Some(toml::Value::Table(o)) = stages.get(stage) {
            merge(&mut t, o);
        }
        // The pipeline's `--device`/`--dtype`/`--quantize` (written for sft, rm, ppo) win here too.
        if let (true, Some(toml::Value::Table(o))) = (stage == "dpo", stages.get("ppo")) {
            merge(&mut t, o);
        }
        out.push(TrainConfig::from_table(t, &format!("{} [stages.{stage}]", file.display()))?.for_stage(stage));
    }
    let [sft, dpo]: [TrainConfig; 2] = out.try_into().map_err(|_| anyhow::anyhow!("two stages"))?;
    Ok(Some((root, [sft, dpo])))
}

/// Runs SFT, then DPO from its adapter; `Start::Resume` as in [`run`].
fn run_sft_dpo(root: &str, [sft, dpo]: [TrainConfig; 2], start: Start) -> Result<PipelineSummary> {
    let (sft_s, dpo_s) = run_sft_then(root, &sft, &dpo, start, "dpo", &format!("DPO ({})", dpo.dpo.loss), super::dpo::run)?;
    Ok(PipelineSummary { sft: Some(sft_s), rm: None, ppo: None, dpo: Some(dpo_s), grpo: None })
}

// ---- sft -> grpo ---------------------------------------------------------------------------
// A config with a `[stages.grpo]` table runs SFT, then GRPO from the SFT adapter (its policy's
// start and, frozen, its reference); `[stages.rm]` / `[stages.ppo]` are not run then.

/// The root, SFT and GRPO configs when the pipeline config has `[stages.grpo]`.
pub fn grpo_stages(file: &Path, sets: &[String]) -> Result<Option<(String, TrainConfig, TrainConfig)>> {
    let mut table = read_table(Some(file))?;
    apply_sets(&mut table, sets)?;
    let Some(toml::Value::Table(stages)) = table.remove("stages") else { return Ok(None) };
    if !stages.contains_key("grpo") {
        return Ok(None);
    }
    let root = table.get("out").and_then(|o| o.get("dir")).and_then(|d| d.as_str()).unwrap_or("adapters/pipeline").to_string();
    let mut out = vec![];
    for stage in ["sft", "grpo"] {
        let mut t = table.clone();
        let mut defaults = toml::Table::new();
        apply_sets(&mut defaults, &[format!("out.dir={}", toml::Value::String(format!("{root}/{stage}")))])?;
        if stage == "grpo" {
            apply_sets(&mut defaults, &[format!("grpo.sft_adapter={}", toml::Value::String(format!("{root}/sft")))])?;
        }
        merge(&mut t, &defaults);
        if let Some(toml::Value::Table(o)) = stages.get(stage) {
            merge(&mut t, o);
        }
        out.push(TrainConfig::from_table(t, &format!("{} [stages.{stage}]", file.display()))?.for_stage(stage));
    }
    let [sft, grpo]: [TrainConfig; 2] = out.try_into().map_err(|_| anyhow::anyhow!("two stages"))?;
    Ok(Some((root, sft, grpo)))
}

/// SFT then GRPO, each skipped when finished and resuming, as [`run`] does for the three stages.
fn run_sft_grpo(root: &str, sft: TrainConfig, grpo: TrainConfig, start: Start) -> Result<PipelineSummary> {
    let (sft_s, grpo_s) = run_sft_then(root, &sft, &grpo, start, "grpo", "GRPO", super::grpo::run)?;
    Ok(PipelineSummary { sft: Some(sft_s), rm: None, ppo: None, dpo: None, grpo: Some(grpo_s) })
}
