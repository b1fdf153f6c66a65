//! Finding a model's files: a local Hugging Face folder, a hub id (downloaded into the standard
//! Hugging Face cache with hf-hub, or read from it offline), or `builtin:<name>` (a model that
//! lorafit writes itself, for offline smoke runs; see `builtin.rs`).
//!
//! Weights may be `model.safetensors`, sharded `model.safetensors.index.json` + shards, or
//! `pytorch_model.bin` (read by our bounded pickle reader, `pth.rs`, which executes no code).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Kind, KindExt};

/// How the weights are stored.
#[derive(Clone, Debug)]
pub enum WeightFiles {
    Safetensors(Vec<PathBuf>),
    Pth(PathBuf),
}

/// The files of one model.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// What the user asked for (folder, hub id or builtin name), for messages and metadata.
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: WeightFiles,
}

/// The message of a hub id that cannot be had: where the cache is, and how to download elsewhere.
fn hub_hint(id: &str) -> String {
    let cache_dir = hf_hub::Cache::from_env().path().join(hf_hub::Repo::model(id.to_string()).folder_name());
    format!(
        "cannot get {id:?} from the Hugging Face hub or its local cache ({}). If this machine is offline, \
         download the model elsewhere (`huggingface-cli download {id}`), copy the folder here and pass \
         `--model /path/to/folder`; or set HF_HOME to a cache that holds it.",
        cache_dir.display()
    )
}

impl ModelFiles {
    /// Resolves `--model`: an existing folder, `builtin:<name>`, or a hub id.
    pub fn resolve(model: &str) -> Result<Self> {
        if let Some(name) = model.strip_prefix("builtin:") {
            let dir = crate::builtin::materialize(name)?;
            return Self::from_dir(&dir, model);
        }
        let path = Path::new(model);
        if path.is_dir() {
            return Self::from_dir(path, model);
        }
        if path.exists() {
            bail!("--model {model}: is a file; pass the model's folder (with config.json and the weights)")
        }
        if model.starts_with('.') || model.starts_with('/') || model.matches('/').count() > 1 {
            bail!("--model {model}: no such folder")
        }
        Self::from_hub(model)
    }

    /// Only the `config.json` of `--model` (for `lorafit plan`: no tokenizer, no weights needed):
    /// a folder holding it, `builtin:<name>` (written as usual), or a hub id (the cached file, or
    /// that one file downloaded unless HF_HUB_OFFLINE is set).
    pub fn config_only(model: &str) -> Result<PathBuf> {
        let dir = match model.strip_prefix("builtin:") {
            Some(name) => crate::builtin::materialize(name)?,
            None => PathBuf::from(model),
        };
        if dir.is_dir() {
            let config = dir.join("config.json");
            anyhow::ensure!(config.is_file(), "{}: no config.json", dir.display());
            return Ok(config);
        }
        if model.starts_with('.') || model.starts_with('/') || model.matches('/').count() > 1 {
            bail!("--model {model}: no such folder")
        }
        if let Some(p) = hf_hub::Cache::from_env().model(model.to_string()).get("config.json") {
            return Ok(p);
        }
        let fetch = || -> Result<PathBuf> {
            if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true") {
                bail!("config.json is not in the local cache and HF_HUB_OFFLINE is set")
            }
            let api = hf_hub::api::sync::ApiBuilder::from_env().build()?;
            Ok(api.model(model.to_string()).get("config.json")?)
        };
        fetch().kind(Kind::Offline, hub_hint(model))
    }

    /// A local folder in Hugging Face layout.
    pub fn from_dir(dir: &Path, name: &str) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            bail!("{}: no config.json (a Hugging Face model folder has config.json, tokenizer.json and the weights)", dir.display())
        }
        let tokenizer = dir.join("tokenizer.json");
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let pth = dir.join("pytorch_model.bin");
        let weights = if single.is_file() {
            WeightFiles::Safetensors(vec![single])
        } else if index.is_file() {
            WeightFiles::Safetensors(shards_from_index(&index)?)
        } else if pth.is_file() {
            WeightFiles::Pth(pth)
        } else {
            bail!(
                "{}: no weights found (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin)",
                dir.display()
            )
        };
        Ok(Self { name: name.to_string(), dir: dir.to_path_buf(), config, tokenizer, weights })
    }

    /// A hub id: use the Hugging Face cache if it holds the files, else download them.
    pub fn from_hub(id: &str) -> Result<Self> {
        let hint = hub_hint(id);
        let cache = hf_hub::Cache::from_env().model(id.to_string());
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
        let fetch = |file: &str| -> Result<PathBuf> {
            if let Some(p) = cache.get(file) {
                return Ok(p);
            }
            if offline {
                bail!("{file} is not in the local cache and HF_HUB_OFFLINE is set")
            }
            let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build()?;
            Ok(api.model(id.to_string()).get(file)?)
        };
        let config = fetch("config.json").kind(Kind::Offline, hint.clone())?;
        let tokenizer = fetch("tokenizer.json").kind(Kind::Offline, hint.clone())?;
        let weights = if let Ok(p) = fetch("model.safetensors") {
            WeightFiles::Safetensors(vec![p])
        } else if let Ok(index) = fetch("model.safetensors.index.json") {
            let names = shard_names(&index)?;
            WeightFiles::Safetensors(names.iter().map(|n| fetch(n)).collect::<Result<_>>().kind(Kind::Offline, hint.clone())?)
        } else {
            WeightFiles::Pth(fetch("pytorch_model.bin").kind(Kind::Offline, hint)?)
        };
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self { name: id.to_string(), dir, config, tokenizer, weights })
    }

    /// One VarBuilder over all weight files (memory-mapped safetensors, or the pickle file).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        Ok(match &self.weights {
            WeightFiles::Safetensors(files) => {
                let backend = crate::stream_load::StreamingSafetensors::open(files)
                    .with_context(|| format!("cannot read the weights in {}", self.dir.display()))?;
                VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
            }
            WeightFiles::Pth(p) => {
                let backend = crate::pth::PthFile::open(p).with_context(|| format!("cannot read {} (a PyTorch checkpoint)", p.display()))?;
                VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
            }
        })
    }

    /// "model folder X (weights: a, b)" for error messages.
    pub fn describe(&self) -> String {
        let w: Vec<String> = match &self.weights {
            WeightFiles::Safetensors(f) => f.iter().map(|p| p.display().to_string()).collect(),
            WeightFiles::Pth(p) => vec![p.display().to_string()],
        };
        format!("loading model {} (weights: {})", self.name, w.join(", "))
    }
}

/// Shard file names listed in `model.safetensors.index.json`'s `weight_map`, in order, unique.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
    let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    shard_names(index)?
        .into_iter()
        .map(|n| {
            let p = dir.join(&n);
            if p.is_file() { Ok(p) } else { bail!("{}: lists shard {n}, which is missing", index.display()) }
        })
        .collect()
}

/// The largest safetensors header lorafit reads (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor of a safetensors file, as its validated header describes it.
#[derive(Clone, Debug)]
pub struct SafetensorsEntry {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range of the tensor's data in the file.
    pub start: u64,
    pub end: u64,
}

/// Validates the whole header of a safetensors file before anything else is read or allocated,
/// and returns its tensors. The format (safetensors' README): 8 bytes little-endian `N`, then
/// `N` bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
/// {str: str}}`, then the data. Checked: `N` is sane and inside the file; the JSON is an object;
/// every tensor has a known dtype, a shape, and exactly two offsets `begin <= end` whose span is
/// shape x dtype size (checked arithmetic); sorted by offset the tensors tile the data exactly
/// (from 0, contiguous, no overlap, no hole, up to the end of the file). Any allocation a reader
/// makes afterwards is then bounded by the file's size.
pub fn check_safetensors_header(path: &Path) -> Result<Vec<SafetensorsEntry>> {
    use std::io::Read;
    let file = path.display();
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {file}"))?;
    let len = f.metadata().with_context(|| format!("cannot read {file}"))?.len();
    let mut n = [0u8; 8];
    if len < 8 || f.read_exact(&mut n).is_err() {
        bail!("{file} is not a safetensors file (too short: {len} bytes)")
    }
    let header = u64::from_le_bytes(n);
    if header > len - 8 {
        bail!("{file} is truncated or not a safetensors file (header of {header} bytes, file of {len}); if it was downloaded, download it again")
    }
    if !(2..=MAX_HEADER).contains(&header) {
        bail!("{file} is not a safetensors file (a header of {header} bytes; a valid one has 2 to {MAX_HEADER})")
    }
    let mut text = vec![0u8; header as usize];
    f.read_exact(&mut text).with_context(|| format!("cannot read {file}"))?;
    let meta: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .with_context(|| format!("{file} is not a safetensors file (its header is not a JSON object)"))?;
    let data = len - 8 - header;
    let base = 8 + header;
    let mut entries = Vec::with_capacity(meta.len());
    for (name, v) in meta {
        if name == "__metadata__" {
            let ok = v.as_object().is_some_and(|m| m.values().all(|x| x.is_string()));
            anyhow::ensure!(ok, "{file}: __metadata__ must be an object of strings, found {}", crate::data::kind_of(&v));
            continue;
        }
        let field = |k: &str| v.get(k).with_context(|| format!("{file}: tensor {name}: no \"{k}\" in the header"));
        let dtype: safetensors::Dtype = serde_json::from_value(field("dtype")?.clone())
            .map_err(|e| anyhow::anyhow!("{file}: tensor {name}: field \"dtype\": {e}"))?;
        let shape: Vec<usize> = serde_json::from_value(field("shape")?.clone())
            .map_err(|e| anyhow::anyhow!("{file}: tensor {name}: field \"shape\" must be a list of sizes: {e}"))?;
        let offsets: Vec<u64> = serde_json::from_value(field("data_offsets")?.clone())
            .map_err(|e| anyhow::anyhow!("{file}: tensor {name}: field \"data_offsets\" must be [begin, end]: {e}"))?;
        let [begin, end] = offsets[..] else {
            bail!("{file}: tensor {name}: field \"data_offsets\" has {} numbers; it must be [begin, end]", offsets.len())
        };
        if begin > end {
            bail!("{file}: tensor {name}: data_offsets [{begin}, {end}] are reversed (begin > end)")
        }
        if end > data {
            bail!("{file} is truncated: tensor {name} needs bytes up to {end} of the data, the file holds {data}; if it was downloaded, download it again")
        }
        let bits = shape.iter().try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d as u64));
        let bytes = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
        if bytes != Some(end - begin) {
            bail!(
                "{file}: tensor {name}: shape {shape:?} of {dtype:?} needs {} bytes, its data_offsets [{begin}, {end}] span {}",
                bytes.map_or("more than 2^64".into(), |b| b.to_string()),
                end - begin
            )
        }
        entries.push(SafetensorsEntry { name, dtype, shape, start: base + begin, end: base + end });
    }
    // The tensors must tile the data: sorted by offset, each starts where the previous ended.
    entries.sort_by_key(|e| (e.start, e.end));
    let mut at = base;
    let mut prev: Option<&str> = None;
    for e in &entries {
        if e.start != at {
            let what = match prev {
                Some(p) if e.start < at => format!("overlaps tensor {p}"),
                Some(p) => format!("leaves {} unused bytes after tensor {p}", e.start - at),
                None => format!("starts at byte {} of the data, not 0", e.start - base),
            };
            bail!("{file}: tensor {}: {what} (data_offsets must tile the data without holes or overlaps)", e.name)
        }
        at = e.end;
        prev = Some(&e.name);
    }
    if at != len {
        bail!("{file}: {} bytes after the last tensor belong to no tensor; this is not a valid safetensors file", len - at)
    }
    Ok(entries)
}
