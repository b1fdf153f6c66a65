//! PEFT's adapter folder, both ways: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.<HF module path>.lora_{A,B}.weight` (see [`lora::peft_key`]),
//! A: (r, in), B: (out, r), f32, file metadata `{"format": "pt"}`; the config is PEFT's
//! `LoraConfig` as JSON (sorted keys, `inference_mode: true`). GPT-2 adapters carry
//! `fan_in_fan_out: true` (Conv1D weights) but the LoRA tensors keep the same layout.
//! Reference: PEFT `utils/save_and_load.py`, `config.py`.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::io::{atomic_write, write_safetensors};
use crate::lora::{parse_peft_key, peft_key, Adapter, LoraConfig};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Reads and validates `adapter_config.json` in `dir`.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    if !dir.is_dir() {
        bail!("adapter folder {} does not exist", dir.display())
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (a PEFT adapter folder holds adapter_config.json)", path.display()))?;
    let cfg: LoraConfig = serde_json::from_str(&text).with_context(|| format!("{}: not a valid PEFT LoRA config", path.display()))?;
    cfg.check_values("").with_context(|| format!("{}: invalid value", path.display()))?;
    cfg.validate().with_context(|| format!("{}: unsupported adapter configuration", path.display()))?;
    Ok(cfg)
}

/// Reads `adapter_model.safetensors` (or PEFT's older `adapter_model.bin`), keys normalised to
/// [`peft_key`] form. Tensors that are not LoRA matrices are returned separately (e.g. the
/// reward model's `score` head saved through `modules_to_save`).
pub fn read_tensors(dir: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>)> {
    let st = dir.join(WEIGHTS_FILE);
    let bin = dir.join("adapter_model.bin");
    let raw: Vec<(String, Tensor)> = if st.is_file() {
        crate::weights::check_safetensors_header(&st)?;
        candle_core::safetensors::load(&st, &Device::Cpu)
            .with_context(|| format!("cannot read {}", st.display()))?
            .into_iter()
            .collect()
    } else if bin.is_file() {
        candle_core::pickle::read_all(&bin).with_context(|| format!("cannot read {}", bin.display()))?
    } else {
        bail!("{}: no {WEIGHTS_FILE} (nor adapter_model.bin)", dir.display())
    };
    let (mut lora, mut other) = (HashMap::new(), HashMap::new());
    for (k, t) in raw {
        match parse_peft_key(&k) {
            Some((path, which)) => {
                lora.insert(peft_key(&path, which), t);
            }
            None => {
                other.insert(k, t);
            }
        }
    }
    Ok((lora, other))
}

/// An adapter folder written by PEFT or lorafit, ready to attach. `weight` scales it when stacking.
pub fn load_adapter(dir: &Path, name: &str, weight: f64, trainable: bool) -> Result<Arc<Adapter>> {
    let config = read_config(dir)?;
    let (lora, other) = read_tensors(dir)?;
    if let Some(k) = other.keys().next() {
        bail!(
            "{}: tensor {k} is not a LoRA matrix (expected keys like base_model.model.<module>.lora_A.weight)",
            dir.join(WEIGHTS_FILE).display()
        )
    }
    if lora.is_empty() {
        bail!("{}: holds no LoRA tensors", dir.join(WEIGHTS_FILE).display())
    }
    Adapter::from_tensors(name, config, lora, weight, trainable).with_context(|| format!("adapter {}", dir.display()))
}

/// Writes `adapter` as a PEFT folder. `base_model` is recorded as `base_model_name_or_path`.
/// Each file is replaced atomically.
pub fn save_adapter(adapter: &Adapter, dir: &Path, base_model: &str, extra: &[(String, Tensor)]) -> Result<()> {
    let mut config = adapter.config.clone();
    config.base_model_name_or_path = Some(base_model.to_string());
    config.inference_mode = true;
    config.fan_in_fan_out = adapter.on_conv1d();
    let mut tensors = adapter.tensors();
    if tensors.is_empty() {
        bail!("adapter {:?} has no tensors to save (was it attached to a model?)", adapter.name)
    }
    tensors.extend(extra.iter().cloned());
    // PEFT writes tensors contiguous; order does not matter in safetensors (sorted on write).
    let tensors = tensors.into_iter().map(|(k, t)| Ok((k, t.contiguous()?))).collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, metadata)?;
    // PEFT writes `json.dumps(config, indent=2, sort_keys=True)`: go through a BTreeMap.
    let value: BTreeMap<String, serde_json::Value> = serde_json::from_value(serde_json::to_value(&config)?)?;
    atomic_write(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&value)?.as_bytes())
}

/// lorafit's own note next to an adapter: the adapters it was trained on top of (stacked,
/// frozen), which must be applied under it. PEFT ignores this file.
pub const STACK_FILE: &str = "lorafit.json";

pub fn write_stack(dir: &Path, below: &[std::path::PathBuf]) -> Result<()> {
    let v = serde_json::json!({ "stacked_on": below.iter().map(|p| p.display().to_string()).collect::<Vec<_>>() });
    atomic_write(&dir.join(STACK_FILE), serde_json::to_string_pretty(&v)?.as_bytes())
}

/// The adapters `dir` was stacked on (empty when it stands alone).
pub fn read_stack(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let p = dir.join(STACK_FILE);
    if !p.is_file() {
        return Ok(vec![]);
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?).with_context(|| format!("{} is not valid JSON", p.display()))?;
    Ok(v["stacked_on"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(Into::into)).collect()).unwrap_or_default())
}

/// Parses `--adapter PATH[:WEIGHT]`.
pub fn parse_adapter_arg(arg: &str) -> Result<(std::path::PathBuf, f64)> {
    if let Some((path, w)) = arg.rsplit_once(':') {
        if let Ok(w) = w.parse::<f64>() {
            if !w.is_finite() {
                bail!("--adapter {arg}: weight {w} is not finite")
            }
            return Ok((path.into(), w));
        }
    }
    Ok((arg.into(), 1.0))
}

/// What an adapter folder holds, for `lorafit inspect`.
pub fn describe(dir: &Path) -> Result<String> {
    let cfg = read_config(dir)?;
    let (lora, other) = read_tensors(dir)?;
    let params: usize = lora.values().map(|t| t.elem_count()).sum();
    let mut modules: Vec<String> = lora.keys().filter_map(|k| parse_peft_key(k).map(|(p, _)| p)).collect();
    modules.sort();
    modules.dedup();
    let dtypes: std::collections::BTreeSet<String> = lora.values().map(|t| format!("{:?}", t.dtype()).to_lowercase()).collect();
    let mut s = String::new();
    use std::fmt::Write;
    writeln!(s, "adapter:        {}", dir.display())?;
    writeln!(s, "base model:     {}", cfg.base_model_name_or_path.as_deref().unwrap_or("(not recorded)"))?;
    writeln!(s, "task type:      {}", cfg.task_type.as_deref().unwrap_or("(none)"))?;
    writeln!(s, "target modules: {}", serde_json::to_string(&cfg.target_modules)?)?;
    writeln!(s, "rank r:         {}{}", cfg.r, if cfg.rank_pattern.is_empty() { String::new() } else { format!(" (rank_pattern {:?})", cfg.rank_pattern) })?;
    writeln!(s, "lora_alpha:     {} (scaling {:.4}{})", cfg.lora_alpha, cfg.rank_and_scaling("").1, if cfg.use_rslora { ", rsLoRA" } else { "" })?;
    writeln!(s, "lora_dropout:   {}", cfg.lora_dropout)?;
    writeln!(s, "layers wrapped: {}", modules.len())?;
    writeln!(s, "parameters:     {params} ({} tensors, {})", lora.len(), dtypes.into_iter().collect::<Vec<_>>().join(", "))?;
    if !other.is_empty() {
        let mut names: Vec<&String> = other.keys().collect();
        names.sort();
        writeln!(s, "other tensors:  {}", names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))?;
    }
    Ok(s)
}
