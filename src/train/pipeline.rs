//! `lorafit pipeline`: the InstructGPT / KoChatGPT recipe in one command — SFT, then the
//! reward model, then PPO — from one config.
//!
//! The config is a training config (shared by all stages) plus `[stages.sft]`, `[stages.rm]`,
//! `[stages.ppo]` tables that override it per stage (e.g. `[stages.rm.data] path = ...`).
//! Stage outputs go to `<out.dir>/<stage>`; unless set, the reward model is stacked on the
//! SFT adapter (InstructGPT starts the RM from the SFT model), PPO starts its policy and
//! reference from the SFT adapter and scores with the reward model.
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::config::{apply_sets, merge, read_table, TrainConfig};
use super::Start;

#[derive(Debug, Serialize)]
pub struct PipelineSummary {
    pub sft: Option<super::sft::SftSummary>,
    pub rm: Option<super::rm::RmSummary>,
    pub ppo: Option<super::ppo::PpoSummary>,
}

/// The config of each stage, resolved.
pub fn stage_configs(file: &Path, sets: &[String]) -> Result<[TrainConfig; 3]> {
    let mut table = read_table(Some(file))?;
    apply_sets(&mut table, sets)?;
    let stages = match table.remove("stages") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => anyhow::bail!("{}: `stages` must be a table ([stages.sft], [stages.rm], [stages.ppo])", file.display()),
        None => toml::Table::new(),
    };
    if let Some(k) = stages.keys().find(|k| !["sft", "rm", "ppo"].contains(&k.as_str())) {
        anyhow::bail!("{}: unknown stage [stages.{k}] (stages: sft, rm, ppo)", file.display())
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
    Ok(out.try_into().map_err(|_| anyhow::anyhow!("three stages")).unwrap())
}

/// Runs the three stages in order. `Start::Resume` skips finished stages (those with a
/// summary.json) and resumes the interrupted one.
pub fn run(file: &Path, sets: &[String], start: Start) -> Result<PipelineSummary> {
    let [sft, rm, ppo] = stage_configs(file, sets)?;
    let how = |cfg: &TrainConfig| -> Option<Start> {
        let out = Path::new(&cfg.out.dir);
        match start {
            Start::Resume if out.join("summary.json").is_file() => None,
            Start::Resume if super::checkpoint::list(out).map(|l| !l.is_empty()).unwrap_or(false) => Some(Start::Resume),
            Start::Resume => Some(Start::Fresh),
            s => Some(s),
        }
    };
    let mut summary = PipelineSummary { sft: None, rm: None, ppo: None };
    if let Some(s) = how(&sft) {
        tracing::info!("pipeline 1/3: SFT -> {}", sft.out.dir);
        summary.sft = Some(super::sft::run(&sft, s).context("pipeline stage sft")?);
    }
    if let Some(s) = how(&rm) {
        tracing::info!("pipeline 2/3: reward model -> {}", rm.out.dir);
        summary.rm = Some(super::rm::run(&rm, s).context("pipeline stage rm")?);
    }
    if let Some(s) = how(&ppo) {
        tracing::info!("pipeline 3/3: PPO -> {}", ppo.out.dir);
        summary.ppo = Some(super::ppo::run(&ppo, s).context("pipeline stage ppo")?);
    }
    Ok(summary)
}
