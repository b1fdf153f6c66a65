//! `lorafit inspect PATH`: what an adapter folder or a merged model folder holds and what it
//! was made from, read from the metadata the stages and `merge` write: `adapter_config.json`
//! (base model, targets, rank), `lorafit.json` (adapters stacked underneath, kept inside the folder), the run's
//! `config.toml` and `summary.json`, a merged folder's `config.json` (`lorafit_merge`), and a
//! `.gguf` file's header (`lorafit export`'s `lorafit.*` keys).
use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// A human-readable description of `dir`.
pub fn describe(dir: &Path) -> Result<String> {
    if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return describe_gguf(dir);
    }
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
    let root = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let from: Vec<String> = std::fs::read_to_string(dir.join(crate::peft::STACK_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| serde_json::from_value(v["copied_from"].clone()).ok())
        .unwrap_or_default();
    let stack = match crate::peft::read_stack(dir) {
        Ok(s) => s,
        Err(e) => {
            writeln!(s, "stacked on:     cannot be used: {e:#}")?;
            vec![]
        }
    };
    for (i, below) in stack.iter().enumerate() {
        let shown = below.strip_prefix(&root).unwrap_or(below).display().to_string();
        let origin = from.get(i).map(|f| format!(", copied from {f}")).unwrap_or_default();
        writeln!(s, "stacked on:     {shown} (inside this folder{origin}; applied under this adapter)")?;
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

/// A GGUF file: architecture, sizes, the tensor types, tokenizer, chat template and, for files
/// `lorafit export` wrote, what it was built from (`lorafit.*`).
fn describe_gguf(path: &Path) -> Result<String> {
    use crate::export::gguf::{Header, Value};
    let h = Header::read_file(path)?;
    let arch = h.str("general.architecture").unwrap_or("?").to_string();
    let num = |k: &str| h.get(&format!("{arch}.{k}")).and_then(Value::as_u64).map_or("?".to_string(), |v| v.to_string());
    let bytes = std::fs::metadata(path)?.len();
    let params: u64 = h.tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    let mut s = String::new();
    writeln!(s, "GGUF file:      {} (v{}, {})", path.display(), h.version, crate::runtime::fmt_bytes(bytes))?;
    match h.str("general.type") {
        Some("adapter") => {
            let alpha = h.get("adapter.lora.alpha").and_then(Value::as_f64).unwrap_or(0.0);
            writeln!(s, "kind:           LoRA adapter ({} tensors) for a {arch} model, alpha {alpha}", h.tensors.len())?;
        }
        _ => {
            writeln!(s, "architecture:   {arch}")?;
            writeln!(s, "shape:          {} layers, hidden {}, heads {}, context {}, {params} parameters",
                num("block_count"), num("embedding_length"), num("attention.head_count"), num("context_length"))?;
        }
    }
    let mut types: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in &h.tensors {
        let e = types.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.bytes();
    }
    let mix: Vec<String> = types.iter().map(|(n, (c, b))| format!("{n} x{c} ({})", crate::runtime::fmt_bytes(*b))).collect();
    let ftype = h.get("general.file_type").and_then(Value::as_u64).map_or(String::new(), |f| format!("file type {f}: "));
    writeln!(s, "tensor types:   {ftype}{}", mix.join(", "))?;
    if let Some(m) = h.str("tokenizer.ggml.model") {
        let n = match h.get("tokenizer.ggml.tokens") { Some(Value::Arr(v)) => v.len(), _ => 0 };
        let id = |k: &str| h.get(&format!("tokenizer.ggml.{k}_token_id")).and_then(Value::as_u64).map_or("-".into(), |v| v.to_string());
        writeln!(s, "tokenizer:      {m} (pre {}), {n} tokens, bos {} eos {} pad {}",
            h.str("tokenizer.ggml.pre").unwrap_or("-"), id("bos"), id("eos"), id("padding"))?;
    }
    match h.str("tokenizer.chat_template") {
        Some(t) => writeln!(s, "chat template:  {} chars: {:?}", t.chars().count(), t.chars().take(80).collect::<String>())?,
        None if h.str("general.type") != Some("adapter") => writeln!(s, "chat template:  (none)")?,
        None => {}
    }
    match h.str("lorafit.version") {
        Some(v) => {
            writeln!(s, "exported by:    lorafit {v} ({})", h.str("lorafit.quant").unwrap_or("?"))?;
            writeln!(s, "base model:     {}", h.str("lorafit.base_model").unwrap_or("?"))?;
            let record: serde_json::Value = serde_json::from_str(h.str("lorafit.record").unwrap_or("[]")).unwrap_or_default();
            for a in record.as_array().into_iter().flatten() {
                let under = a.get("stacked_under").and_then(|x| x.as_str()).map(|u| format!(", stacked under {u}")).unwrap_or_default();
                writeln!(s, "adapter:        {} (weight {}{under})", a["path"].as_str().unwrap_or("?"), a["weight"])?;
            }
            if record.as_array().is_none_or(|a| a.is_empty()) {
                writeln!(s, "adapter:        (none: the base model)")?;
            }
        }
        None => writeln!(s, "exported by:    (not lorafit)")?,
    }
    Ok(s)
}
