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
use candle_core::Tensor;

use crate::error::Kind;
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
/// reward model's `score` head saved through `modules_to_save`). The file's layout is validated
/// before anything is allocated, and every float value must be finite: a NaN or Inf adapter
/// (a diverged run, a damaged download) is an error naming the tensor, never silently used.
pub fn read_tensors(dir: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>)> {
    let st = dir.join(WEIGHTS_FILE);
    let bin = dir.join("adapter_model.bin");
    let (file, raw): (std::path::PathBuf, Vec<(String, Tensor)>) = if st.is_file() {
        let r = crate::stream_load::StreamingSafetensors::open(std::slice::from_ref(&st))?;
        let raw = r.names().into_iter().map(|n| Ok((n.clone(), r.load_stored(&n)?))).collect::<Result<_>>();
        (st.clone(), raw.with_context(|| format!("cannot read {}", st.display()))?)
    } else if bin.is_file() {
        (bin.clone(), crate::pth::PthFile::open(&bin)?.read_all().with_context(|| format!("cannot read {}", bin.display()))?)
    } else {
        bail!("{}: no {WEIGHTS_FILE} (nor adapter_model.bin)", dir.display())
    };
    let (mut lora, mut other) = (HashMap::new(), HashMap::new());
    for (k, t) in raw {
        check_finite(&t).map_err(|e| crate::error::tagged(Kind::NonFiniteAdapter, format!("{}: tensor {k} {e}", file.display())))?;
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

/// Ok when every value of a float tensor is finite; else says which value is not.
fn check_finite(t: &Tensor) -> std::result::Result<(), String> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(());
    }
    let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_dtype(candle_core::DType::F32)).and_then(|t| t.to_vec1()).map_err(|e| e.to_string())?;
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(format!(
            "has a non-finite value ({} at flat index {i} of shape {:?}; {} of its {} values are not finite)",
            v[i],
            t.dims(),
            v.iter().filter(|x| !x.is_finite()).count(),
            v.len()
        )),
    }
}

/// An adapter folder written by PEFT or lorafit, ready to attach. `weight` scales it when stacking.
pub fn load_adapter(dir: &Path, name: &str, weight: f64, trainable: bool) -> Result<Arc<Adapter>> {
    let config = read_config(dir)?;
    let (lora, other) = read_tensors(dir)?;
    if let Some(k) = other.keys().find(|k| crate::reward::is_score_key(k)) {
        crate::bail_kind!(
            Kind::RewardModelAsAdapter,
            "{} is a reward model (its {WEIGHTS_FILE} holds the score head {k}), not a plain LoRA adapter: \
             it scores text, it does not change what the model generates",
            dir.display()
        )
    }
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
///
/// An adapter folder is self-contained: the adapters of its stack travel inside it, as
/// `stack/sft/` (then `stack/sft-2/`, ...), each an `adapter_config.json` and its weights, and
/// `lorafit.json` lists them relative to the folder: `{"stack": ["stack/sft"], "copied_from":
/// [...]}` (`copied_from` is only shown by `inspect`). Paths in an adapter's metadata are never
/// followed outside its folder: a downloaded adapter cannot point lorafit at other files.
pub const STACK_FILE: &str = "lorafit.json";
/// The folder inside an adapter folder that holds its stack.
pub const STACK_DIR: &str = "stack";
/// The most adapters a stack may hold.
const MAX_STACK: usize = 8;

/// Copies the adapters `below` (bottom first) into `dir/stack/` and records them in
/// `dir/lorafit.json`. Only each adapter's own files are copied (its config and weights), as
/// that is what was applied under `dir`'s adapter. The new `stack/` replaces an older one whole.
pub fn write_stack(dir: &Path, below: &[std::path::PathBuf]) -> Result<()> {
    let pid = std::process::id();
    let tmp = dir.join(format!(".{STACK_DIR}.tmp-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut names = vec![];
    let copied = (|| -> Result<()> {
        for (i, src) in below.iter().enumerate() {
            let name = if i == 0 { "sft".to_string() } else { format!("sft-{}", i + 1) };
            let to = tmp.join(&name);
            std::fs::create_dir_all(&to).with_context(|| format!("cannot create {}", to.display()))?;
            let weights = [WEIGHTS_FILE, "adapter_model.bin"].into_iter().find(|f| src.join(f).is_file());
            let weights = weights.with_context(|| format!("{}: no {WEIGHTS_FILE} to copy into {}", src.display(), dir.display()))?;
            for f in [CONFIG_FILE, weights] {
                std::fs::copy(src.join(f), to.join(f)).with_context(|| format!("cannot copy {} into {}", src.join(f).display(), to.display()))?;
                std::fs::File::open(to.join(f))?.sync_all()?;
            }
            names.push(format!("{STACK_DIR}/{name}"));
        }
        Ok(())
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Swap in: an older stack/ is moved aside, then removed.
    let live = dir.join(STACK_DIR);
    let old = dir.join(format!(".{STACK_DIR}-old.tmp-{pid}"));
    if live.symlink_metadata().is_ok() {
        std::fs::rename(&live, &old).with_context(|| format!("cannot move the old {} aside", live.display()))?;
    }
    std::fs::rename(&tmp, &live).with_context(|| format!("cannot rename {} to {}", tmp.display(), live.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    let from: Vec<String> = below.iter().map(|p| p.display().to_string()).collect();
    let v = serde_json::json!({ "stack": names, "copied_from": from });
    atomic_write(&dir.join(STACK_FILE), serde_json::to_string_pretty(&v)?.as_bytes())
}

/// The adapter folders `dir` was stacked on, bottom first (empty when it stands alone). Each
/// lies inside `dir` (symlinks resolved); an entry that leads outside is an error. Folders from
/// older lorafit versions (`"stacked_on"`: paths relative to where `rm` ran) are read when the
/// path still lies inside `dir`, else the error says how to make the folder self-contained.
pub fn read_stack(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let p = dir.join(STACK_FILE);
    if !p.is_file() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))?;
    let (key, old_style) = if v.get("stack").is_some() { ("stack", false) } else { ("stacked_on", true) };
    let entries = match v.get(key) {
        None => return Ok(vec![]),
        Some(serde_json::Value::Array(a)) => a,
        Some(other) => bail!("{}: \"{key}\" must be a list of folder names, found {}", p.display(), crate::data::kind_of(other)),
    };
    if entries.len() > MAX_STACK {
        bail!("{}: \"{key}\" lists {} adapters; lorafit stacks at most {MAX_STACK}", p.display(), entries.len())
    }
    let root = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
    let mut out = vec![];
    for e in entries {
        let s = e.as_str().with_context(|| format!("{}: \"{key}\" holds {}, not a folder name", p.display(), crate::data::kind_of(e)))?;
        let rel = Path::new(s);
        // New style: a plain relative path. Old style: as written (absolute, or relative to
        // where `rm` ran), else relative to the folder.
        let plain = !s.is_empty() && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        let candidates: Vec<std::path::PathBuf> = match (old_style, plain) {
            (false, true) => vec![dir.join(rel)],
            (false, false) => vec![],
            (true, _) => vec![rel.to_path_buf(), dir.join(rel)],
        };
        let inside = candidates.iter().filter_map(|c| c.canonicalize().ok()).find(|c| c.starts_with(&root) && c != &root);
        match inside {
            Some(c) => out.push(c),
            None if old_style => bail!(
                "{}: \"stacked_on\" points at {s}, outside the adapter folder {} (or missing). lorafit no longer follows \
                 paths out of an adapter folder (a downloaded adapter could point anywhere). Make the folder \
                 self-contained: copy that SFT adapter's adapter_config.json and adapter_model.safetensors into \
                 {}/{STACK_DIR}/sft and replace {STACK_FILE} with {{\"stack\": [\"{STACK_DIR}/sft\"]}}",
                p.display(),
                dir.display(),
                dir.display()
            ),
            None => bail!(
                "{}: \"stack\" entry {s:?} is not a folder inside {} (stacked adapters travel inside the adapter folder, e.g. {STACK_DIR}/sft)",
                p.display(),
                dir.display()
            ),
        }
    }
    Ok(out)
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
