//! `lorafit inspect PATH`: what an adapter folder or a merged model folder holds and what it
//! was made from, read from the metadata the stages and `merge` write: `adapter_config.json`
//! (base model, targets, rank), `lorafit.json` (adapters stacked underneath), the run's
//! `config.toml` and `summary.json`, and a merged folder's `config.json` (`lorafit_merge`).
use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// A human-readable description of `dir`.
pub fn describe(dir: &Path) -> Result<String> {
    if dir.join(crate::peft::CONFIG_FILE).is_file() {
        return describe_adapter(dir);
    }
    if dir.join("config.json").is_file() {
        return describe_model(dir);
    }
    bail!("{}: neither an adapter folder (adapter_config.json) nor a model folder (config.json)", dir.display())
}

fn describe_adapter(dir: &Path) -> Result<String> {
    let mut s = crate::peft::describe(dir)?;
    for below in crate::peft::read_stack(dir)? {
        writeln!(s, "stacked on:     {} (apply it under this adapter)", below.display())?;
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("config.toml")) {
        if let Ok(cfg) = toml::from_str::<crate::train::config::TrainConfig>(&text) {
            writeln!(s, "trained with:   model {} ({}), data {}", cfg.model.name, cfg.model.dtype, cfg.data.path)?;
            writeln!(s, "                lr {}, batch {} x {}, seed {}", cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)?;
        }
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("summary.json")) {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let mut parts = vec![];
        for k in ["steps", "iterations", "final_loss", "eval_loss", "eval_accuracy", "last_reward_mean", "last_kl_mean"] {
            if let Some(x) = v.get(k).filter(|x| !x.is_null()) {
                parts.push(format!("{k} {x}"));
            }
        }
        if let Some(p) = v.get("peak_rss_bytes").and_then(|p| p.as_u64()) {
            parts.push(format!("peak memory {}", crate::runtime::fmt_bytes(p)));
        }
        writeln!(s, "run summary:    {}", parts.join(", "))?;
    }
    Ok(s)
}

fn describe_model(dir: &Path) -> Result<String> {
    let p = dir.join("config.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p)?).with_context(|| format!("{} is not valid JSON", p.display()))?;
    let arch = crate::model::Arch::from_file(&p)?;
    let mut s = String::new();
    writeln!(s, "model folder:   {}", dir.display())?;
    writeln!(s, "architecture:   {} ({})", v["architectures"][0].as_str().unwrap_or(arch.model_type()), arch.model_type())?;
    writeln!(s, "shape:          {} layers, hidden {}, vocab {}, context {}", arch.num_layers(), arch.hidden_size(), arch.vocab_size(), arch.max_positions())?;
    writeln!(s, "lorafit loads:  {}", crate::model::SUPPORTED)?;
    let dtype = v.get("torch_dtype").or_else(|| v.get("dtype")).and_then(|d| d.as_str()).unwrap_or("(not recorded)");
    writeln!(s, "dtype:          {dtype}")?;
    match v.get("lorafit_merge") {
        Some(m) => {
            writeln!(s, "merged by:      lorafit {}", m["lorafit_version"].as_str().unwrap_or("?"))?;
            writeln!(s, "base model:     {}", m["base_model"].as_str().unwrap_or("?"))?;
            for a in m["adapters"].as_array().into_iter().flatten() {
                let mut note = String::new();
                if a.get("reward_head").and_then(|x| x.as_bool()) == Some(true) {
                    note.push_str(", with its reward head");
                }
                if let Some(u) = a.get("stacked_under").and_then(|x| x.as_str()) {
                    note.push_str(&format!(", stacked under {u}"));
                }
                writeln!(s, "adapter:        {} (weight {}{note})", a["path"].as_str().unwrap_or("?"), a["weight"])?;
            }
        }
        None => writeln!(s, "merged by:      (not a lorafit merge)")?,
    }
    Ok(s)
}
