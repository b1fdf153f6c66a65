//! Resumable checkpoints: `<out>/checkpoints/step-00000100/` holds the adapter (PEFT format),
//! the optimizer moments (`optimizer.safetensors`) and `state.json` (step, data position, RNG
//! streams). The folder is written under a temporary name, fsync'ed, then renamed, so a
//! checkpoint either exists whole or not at all; the newest K are kept.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use crate::io::{atomic_write, write_safetensors};
use crate::lora::Adapter;
use crate::rng::RngState;

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Data position: epoch, and micro-batches of that epoch consumed.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// LoRA dropout stream of each adapter, in order.
    pub dropout_rng: Vec<RngState>,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// The resolved config of the run (a resumed run must match it).
    pub config: String,
    /// Method-specific state (PPO: the adaptive KL coefficient).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// Further trainable tensors of a method (PPO's critic), next to the adapter.
pub const AUX_FILE: &str = "aux.safetensors";

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Writes checkpoint `state.step` and prunes all but the newest `keep_last`.
/// `extra` are tensors saved in the adapter file besides the LoRA ones (a reward head).
pub fn save(
    out: &Path,
    adapter: &Adapter,
    base_model: &str,
    opt: &AdamW,
    state: &TrainState,
    keep_last: usize,
    extra: &[(String, Tensor)],
    aux: &[(String, Tensor)],
) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let dest = root.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        crate::peft::save_adapter(adapter, &tmp, base_model, extra)?;
        let mut moments = vec![];
        for (i, (key, _)) in opt.vars.iter().enumerate() {
            moments.push((format!("m.{key}"), opt.m[i].clone()));
            moments.push((format!("v.{key}"), opt.v[i].clone()));
        }
        write_safetensors(&tmp.join("optimizer.safetensors"), &moments, HashMap::from([("adam_t".into(), opt.t.to_string())]))?;
        if !aux.is_empty() {
            write_safetensors(&tmp.join(AUX_FILE), aux, HashMap::new())?;
        }
        atomic_write(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::rename(&tmp, &dest)?;
        Ok(())
    })();
    if let Err(e) = written {
        // A failed checkpoint (disk full, ...) leaves no temp folder behind.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot write checkpoint {}", dest.display())));
    }
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    let all = list(out)?;
    for old in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dest)
}

/// Complete checkpoints, oldest first.
pub fn list(out: &Path) -> Result<Vec<PathBuf>> {
    let root = checkpoints_dir(out);
    if !root.is_dir() {
        return Ok(vec![]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")) && p.join("state.json").is_file())
        .collect();
    v.sort();
    Ok(v)
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid checkpoint state", p.display()))
}

/// Restores the optimizer moments into `opt` (whose vars already hold the checkpoint's adapter).
pub fn load_optimizer(dir: &Path, opt: &mut AdamW) -> Result<()> {
    let p = dir.join("optimizer.safetensors");
    crate::weights::check_safetensors_header(&p)?;
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let t: usize = meta.metadata().as_ref().and_then(|m| m.get("adam_t")).context("optimizer.safetensors: no adam_t")?.parse()?;
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    for (i, (key, var)) in opt.vars.iter().enumerate() {
        let get = |k: String| -> Result<Tensor> {
            let x = tensors.get(&k).with_context(|| format!("{}: no tensor {k}", p.display()))?;
            if x.dims() != var.dims() {
                bail!("{}: {k} has shape {:?}, the adapter needs {:?}", p.display(), x.dims(), var.dims())
            }
            Ok(x.to_device(var.device())?)
        };
        opt.m[i] = get(format!("m.{key}"))?;
        opt.v[i] = get(format!("v.{key}"))?;
    }
    opt.t = t;
    Ok(())
}

/// The first of `tensors` that holds a NaN or an infinity, if any.
pub fn first_non_finite(tensors: &[(String, Tensor)]) -> Result<Option<String>> {
    for (k, t) in tensors {
        // x - x is 0 for a finite x and NaN for ±inf or NaN: the sum is 0 iff all are finite.
        let t = t.detach();
        let s = (&t - &t)?.sum_all()?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        if s != 0.0 {
            return Ok(Some(k.clone()));
        }
    }
    Ok(None)
}
