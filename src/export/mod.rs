//! `lorafit export`: the base with its adapters folded in, as one GGUF file that llama.cpp,
//! Ollama and LM Studio load (`--format gguf`), or the adapters alone as llama.cpp's LoRA GGUF
//! (`--format gguf-lora`, for `llama-cli --lora` and Ollama's `ADAPTER`).
//!
//! The merge is `merge`'s ([`crate::merge::Folded`]: `W += Σ w_a·s_a·B_a@A_a` in f32); then per
//! tensor, in llama-quantize's order (global tensors, then layer by layer):
//!
//! ```text
//! checkpoint rows --fold adapters--> f32 --permute q/k rows (LLaMA) | transpose (GPT-2 Conv1D)
//!   | regroup qkv rows (GPT-NeoX) | 1 + w (Gemma norms)--> --type of llama.cpp's mix (quant.rs)-->
//!   GGML blocks --> the file          (+ tensors computed from config.json: rope_freqs, ...)
//! ```
//!
//! Metadata keys, tensor names and types are those llama.cpp's `convert_hf_to_gguf.py` (and
//! `llama-quantize` for the k-quant mixes) writes for the same folder ([`arch`], [`vocab`],
//! [`quant`]); lorafit adds `lorafit.*` keys recording what the file was built from. Large tensors
//! are processed in slices of rows, so the peak memory is a few slices, not the model.
//!
//! Output safety: the file is written to `.NAME.tmp-PID` beside it (free space checked first),
//! fsync'ed and renamed; an existing file is replaced only with `--force` and only if lorafit
//! wrote it (its `lorafit.version` key); concurrent exports to one path are serialised by an
//! advisory lock (`.NAME.lock`, flock).
pub mod arch;
pub mod blocks;
pub mod gguf;
pub mod hparams;
pub mod ollama;
pub mod pre_hashes;
pub mod quant;
pub mod vocab;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use serde_json::Value as Json;

use crate::bail_kind;
use crate::error::Kind;
use crate::merge::Folded;
use arch::Transform;
use gguf::Value;
use quant::{GgmlType, Quant};

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The merged model.
    Gguf,
    /// The adapters alone.
    GgufLora,
}

impl Format {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gguf" => Ok(Format::Gguf),
            "gguf-lora" => Ok(Format::GgufLora),
            other => bail!("--format {other}: expected gguf (the merged model) or gguf-lora (the adapters alone)"),
        }
    }
}

/// What `lorafit export` was asked to do.
pub struct ExportOptions {
    pub model: String,
    /// Adapter folders with their weights, in order.
    pub adapters: Vec<(PathBuf, f64)>,
    pub format: Format,
    pub out: PathBuf,
    pub quant: Quant,
    pub force: bool,
    /// Also write an Ollama Modelfile beside the file.
    pub ollama: bool,
    /// Values per slice of rows when a large tensor is processed in pieces ([`SLICE`]).
    pub slice_values: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct ExportReport {
    pub out: String,
    pub format: String,
    pub quant: String,
    pub architecture: String,
    pub bytes: u64,
    pub tensors: usize,
    pub merged_tensors: usize,
    /// GGML type -> number of tensors.
    pub types: BTreeMap<String, usize>,
    /// Tensors whose rows do not fit the wanted block, and the type they got.
    pub fallbacks: Vec<String>,
    pub notes: Vec<String>,
    pub modelfile: Option<String>,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Values per slice when a tensor is processed in pieces (16 MiB of f32): the peak memory is a
/// few slices, whatever the model.
pub const SLICE: usize = 4 << 20;

/// One tensor to write.
struct Item {
    /// Checkpoint name.
    src: String,
    /// GGUF name, type and shape (PyTorch order).
    name: String,
    ty: GgmlType,
    shape: Vec<usize>,
    transform: Transform,
    /// Heads of the q/k permutation (or of GPT-NeoX's qkv split).
    heads: usize,
    /// Values the converter generates (rope_freqs, ...), instead of a checkpoint tensor.
    data: Option<Vec<f32>>,
}

/// The `lorafit.*` keys: what the file was built from.
fn provenance(folded: &Folded, quant: Quant) -> Vec<(String, Value)> {
    let paths: Vec<String> = folded.record.iter().map(|r| r["path"].as_str().unwrap_or("?").to_string()).collect();
    let weights: Vec<Value> = folded.record.iter().map(|r| Value::F32(r["weight"].as_f64().unwrap_or(1.0) as f32)).collect();
    vec![
        ("lorafit.version".into(), Value::Str(env!("CARGO_PKG_VERSION").into())),
        ("lorafit.base_model".into(), Value::Str(folded.files.name.clone())),
        ("lorafit.adapters".into(), Value::strs(paths)),
        ("lorafit.adapter_weights".into(), Value::Arr(weights)),
        ("lorafit.record".into(), Value::Str(serde_json::to_string(&folded.record).unwrap_or_default())),
        ("lorafit.quant".into(), Value::Str(quant.name().into())),
    ]
}

/// The block index of a GGUF name (`blk.N.`), for llama-quantize's order.
fn layer_of(name: &str) -> i64 {
    name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok()).unwrap_or(-1)
}

/// gguf-py's `size_label`-like short count: 124M, 1.2B, 49K.
fn size_label(n: u64) -> String {
    let (v, u) = if n >= 1_000_000_000 { (n as f64 / 1e9, "B") } else if n >= 1_000_000 { (n as f64 / 1e6, "M") } else { (n as f64 / 1e3, "K") };
    if v >= 10.0 { format!("{v:.0}{u}") } else { format!("{v:.1}{u}") }
}

/// A claimed output file: its advisory lock is held until this value is dropped.
struct Claim {
    lock_path: PathBuf,
    _lock: std::fs::File,
}

impl Claim {
    /// Locks `.NAME.lock` beside `out` (a second export to the same path fails at once) and
    /// removes temp files that killed exports left.
    fn take(out: &Path) -> Result<Self> {
        let parent = parent_of(out);
        let leaf = out.file_name().context("--out must name a file")?.to_string_lossy().to_string();
        let lock_path = parent.join(format!(".{leaf}.lock"));
        loop {
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock_path)
                .with_context(|| format!("cannot create the lock file {}", lock_path.display()))?;
            match f.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(&lock_path).unwrap_or_default().trim().replace('\n', ", ");
                    let who = if holder.is_empty() { "another lorafit process".to_string() } else { holder };
                    bail_kind!(Kind::OutputLocked, "{} is being written by {who} (lock {} is held)", out.display(), lock_path.display())
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", lock_path.display())),
            }
            // The previous holder may have removed the lock file between our open and lock:
            // retry until the locked file is the one at the path.
            use std::os::unix::fs::MetadataExt;
            let same = std::fs::metadata(&lock_path).map(|m| m.ino() == f.metadata().map(|n| n.ino()).unwrap_or(0)).unwrap_or(false);
            if !same {
                continue;
            }
            let mut g = &f;
            let _ = f.set_len(0);
            let _ = write!(g, "pid {}\ncommand {}\n", std::process::id(), std::env::args().collect::<Vec<_>>().join(" "));
            crate::outdir::remove_stale_siblings(&parent, &leaf);
            return Ok(Self { lock_path, _lock: f });
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

fn parent_of(p: &Path) -> PathBuf {
    p.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// An existing `path` may be replaced only with --force, and only if lorafit wrote it.
fn check_replaceable(path: &Path, force: bool, what: &str, flag: &str) -> Result<()> {
    let Ok(meta) = path.symlink_metadata() else { return Ok(()) };
    if meta.is_dir() {
        bail!("{flag} {}: is a folder; --out names the {what} file to write, e.g. {}/model.gguf", path.display(), path.display())
    }
    if !force {
        bail_kind!(Kind::OutputExists, "{flag} {} already exists", path.display())
    }
    if !written_by_lorafit(path) {
        bail_kind!(Kind::NotLorafitFile, "{flag} {} was not written by lorafit (no lorafit metadata): refusing to replace it", path.display())
    }
    Ok(())
}

/// The GGUF and the Modelfile may be written (absent, or lorafit's own with --force).
fn check_outputs(o: &ExportOptions, modelfile: Option<&Path>) -> Result<()> {
    check_replaceable(&o.out, o.force, "GGUF", "--out")?;
    if let Some(m) = modelfile {
        check_replaceable(m, o.force, "Modelfile", "--ollama: the Modelfile")?;
    }
    Ok(())
}

/// A GGUF with `lorafit.*` metadata, or a Modelfile whose first line is lorafit's.
fn written_by_lorafit(path: &Path) -> bool {
    if let Ok(h) = gguf::Header::read_file(path) {
        return h.get("lorafit.version").is_some();
    }
    std::fs::read_to_string(path).map(|t| t.starts_with(ollama::MARK)).unwrap_or(false)
}

pub fn export(o: &ExportOptions) -> Result<ExportReport> {
    let t0 = std::time::Instant::now();
    let out = &o.out;
    if out.as_os_str().is_empty() || out.file_name().is_none() {
        bail!("--out must name a file, e.g. --out model.gguf")
    }
    // Checks that need nothing loaded.
    if o.format == Format::GgufLora {
        ensure!(!o.adapters.is_empty(), "--format gguf-lora writes the adapters: pass at least one --adapter");
        ensure!(
            matches!(o.quant, Quant::F32 | Quant::F16 | Quant::Bf16 | Quant::Q8_0),
            "--quant {}: a LoRA GGUF is written as f32, f16, bf16 or q8_0 (the k-quant mixes are for --format gguf)",
            o.quant.name()
        );
    }
    let modelfile = o.ollama.then(|| parent_of(out).join("Modelfile"));
    let model_dir = Path::new(&o.model);
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", model_dir)];
    inputs.extend(o.adapters.iter().map(|(p, _)| ("--adapter", p.as_path())));
    crate::outdir::check_not_input(out, "--out", &inputs)?;
    check_outputs(o, modelfile.as_deref())?;
    let parent = parent_of(out);
    let created = !parent.exists();
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let r = write(o, &parent, modelfile.as_deref(), t0);
    if r.is_err() && created {
        let _ = std::fs::remove_dir(&parent); // only if still empty
    }
    r
}

/// Everything after the checks: claim, plan, write, rename, Modelfile.
fn write(o: &ExportOptions, parent: &Path, modelfile: Option<&Path>, t0: std::time::Instant) -> Result<ExportReport> {
    let out = &o.out;
    let _claim = Claim::take(out)?;
    check_outputs(o, modelfile)?; // again, now that no other export can write them

    let folded = Folded::open(&o.model, &o.adapters)?;
    if folded.head.is_some() {
        bail!("an --adapter is a reward model (it has a score head): a GGUF model is for generation; export the policy's (SFT or PPO) adapter")
    }
    let config: Json = serde_json::from_str(&std::fs::read_to_string(&folded.files.config)?)
        .with_context(|| format!("{} is not valid JSON", folded.files.config.display()))?;
    let family = arch::family(&config).with_context(|| format!("{}: cannot export this model to GGUF", folded.files.config.display()))?;
    let vocab_size = config.get("vocab_size").and_then(Json::as_u64).context("config.json has no vocab_size")? as usize;

    let Plan { kvs, items, vocab, fallbacks, mut notes } = match o.format {
        Format::Gguf => {
            // The chat template an adapter was trained with (its lorafit.json) replaces the
            // model's, as `merge` writes it into tokenizer_config.json.
            let trained = o.adapters.iter().find_map(|(d, _)| crate::render::TemplateRecord::read(d).ok().flatten().and_then(|r| r.chat_template));
            plan_model(&folded, &config, family, o.quant, vocab_size, trained)?
        }
        Format::GgufLora => plan_lora(&folded, &config, family, o.quant)?,
    };
    let shapes: Vec<(String, GgmlType, Vec<usize>)> = items.iter().map(|it| (it.name.clone(), it.ty, it.shape.clone())).collect();
    let size = gguf::file_size(&kvs, &shapes);
    crate::merge::check_disk_space(parent, size + (64 << 10)).context("checked before writing the GGUF")?;

    // Write: temp file, fsync, rename.
    let leaf = out.file_name().unwrap().to_string_lossy().to_string();
    let tmp = parent.join(format!(".{leaf}.tmp-{}", std::process::id()));
    let written = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = gguf::Writer::new(std::io::BufWriter::with_capacity(1 << 20, f), &kvs, shapes.clone())?;
        match o.format {
            Format::Gguf => items.iter().try_for_each(|it| write_model_tensor(&folded, it, o.slice_values.max(1), &mut w))?,
            Format::GgufLora => write_lora_tensors(&folded, &items, &mut w)?,
        }
        let f = w.finish()?.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        ensure!(f.metadata()?.len() == size, "internal: wrote {} bytes, planned {size}", f.metadata()?.len());
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {} (nothing was written there)", out.display())));
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
    let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());

    let modelfile = match modelfile {
        Some(path) => {
            let text = ollama::modelfile(out, o.format, &folded, vocab.as_ref(), &mut notes)?;
            crate::io::atomic_write(path, text.as_bytes())?;
            Some(path.display().to_string())
        }
        None => None,
    };
    let mut types = BTreeMap::new();
    for it in &items {
        *types.entry(it.ty.name().to_string()).or_insert(0) += 1;
    }
    Ok(ExportReport {
        out: out.display().to_string(),
        format: if o.format == Format::Gguf { "gguf".into() } else { "gguf-lora".into() },
        quant: o.quant.name().into(),
        architecture: family.arch.into(),
        bytes: size,
        tensors: items.len(),
        merged_tensors: folded.merged_count(),
        types,
        fallbacks,
        notes,
        modelfile,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::runtime::peak_rss_bytes(),
    })
}

/// Heads of the q/k permutation: query heads for q, key/value heads for k.
fn perm_heads(config: &Json, t: Transform) -> usize {
    let heads = config.get("num_attention_heads").and_then(Json::as_u64).unwrap_or(1) as usize;
    match t {
        Transform::PermuteK => config.get("num_key_value_heads").and_then(Json::as_u64).map_or(heads, |k| k as usize),
        _ => heads,
    }
}

/// What will be written.
struct Plan {
    kvs: Vec<(String, Value)>,
    items: Vec<Item>,
    vocab: Option<vocab::Vocab>,
    /// Tensors that got another type than the mix wanted, and why.
    fallbacks: Vec<String>,
    notes: Vec<String>,
}

/// Metadata and tensors of the merged model.
fn plan_model(folded: &Folded, config: &Json, family: &arch::Family, quant: Quant, vocab_size: usize, trained_template: Option<String>) -> Result<Plan> {
    let mut items = vec![];
    for (name, (dt, shape)) in &folded.shapes {
        let Some((gname, transform)) = family.map(name)? else { continue };
        ensure!(dt.is_float(), "tensor {name} is {dt:?}; a GGUF model holds float weights");
        let shape = if transform == Transform::Transpose {
            ensure!(shape.len() == 2, "tensor {name}: a Conv1D weight of shape {shape:?}");
            vec![shape[1], shape[0]]
        } else {
            shape.clone()
        };
        items.push(Item { src: name.clone(), name: gname, ty: GgmlType::F32, shape, transform, heads: perm_heads(config, transform), data: None });
    }
    for (gname, v) in (family.extra)(config).with_context(|| format!("{}: reading the model's settings", folded.files.config.display()))? {
        items.push(Item { src: format!("(computed from config.json: {gname})"), name: gname, ty: GgmlType::F32, shape: vec![v.len()], transform: Transform::None, heads: 1, data: Some(v) });
    }
    // llama-quantize's order: tensors outside the layers, then layer by layer, names sorted.
    items.sort_by(|a, b| (layer_of(&a.name), &a.name).cmp(&(layer_of(&b.name), &b.name)));
    if let Some(d) = items.windows(2).find(|w| w[0].name == w[1].name) {
        bail!("two checkpoint tensors ({} and {}) map to {}", d[0].src, d[1].src, d[0].name)
    }
    let names: Vec<&str> = items.iter().map(|it| it.name.as_str()).collect();
    let n_layer = items.iter().map(|it| layer_of(&it.name) + 1).max().unwrap_or(0).max(0) as usize;
    let mut mix = quant::Mix::new(quant, &names, n_layer);
    for it in &mut items {
        it.ty = mix.type_of(&it.name, &it.shape);
    }
    let fallbacks = mix
        .fallbacks
        .iter()
        .map(|f| format!("{} has rows of {} values, not a multiple of {}'s block of {}: written as {} (as llama.cpp does)", f.tensor, f.row, f.wanted.name(), f.wanted.block(), f.got.name()))
        .collect();

    let mut vocab = vocab::build(&folded.files.dir, &folded.files.tokenizer, config, vocab_size)
        .with_context(|| format!("the tokenizer of {} cannot be written to GGUF", folded.files.name))?;
    if let Some(t) = trained_template {
        vocab.kvs.retain(|(k, _)| k != "tokenizer.chat_template");
        vocab.kvs.push(("tokenizer.chat_template".into(), Value::Str(t.clone())));
        vocab.chat_template = Some(t);
    }
    check_phi3_tokens(&model_name(folded), &vocab.kvs)?;
    let mut notes = vocab.notes.clone();
    notes.extend(arch::notes(config, family.arch));
    let params: u64 = items.iter().map(|it| it.shape.iter().product::<usize>() as u64).sum();
    let mut kvs = vec![
        ("general.architecture".to_string(), Value::Str(family.arch.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(model_name(folded))),
        ("general.size_label".into(), Value::Str(size_label(params))),
    ];
    kvs.extend((family.hparams)(config).with_context(|| format!("{}: reading the model's settings", folded.files.config.display()))?);
    kvs.push(("general.file_type".into(), Value::U32(quant.file_type())));
    kvs.push(("general.quantization_version".into(), Value::U32(2)));
    kvs.extend(vocab.kvs.iter().cloned());
    kvs.extend(provenance(folded, quant));
    Ok(Plan { kvs, items, vocab: Some(vocab), fallbacks, notes })
}

/// llama.cpp gives a model whose `general.name` contains "phi3" / "phi-3" Phi-3's token
/// attributes, looking up `</s>`, `<unk>`, `<s>` and `<|endoftext|>`; without them the file
/// does not load ("error loading model vocabulary: unordered_map::at").
fn check_phi3_tokens(name: &str, kvs: &[(String, Value)]) -> Result<()> {
    let lower = name.to_lowercase();
    if !(lower.contains("phi3") || lower.contains("phi-3")) {
        return Ok(());
    }
    let Some((_, Value::Arr(tokens))) = kvs.iter().find(|(k, _)| k == "tokenizer.ggml.tokens") else { return Ok(()) };
    let missing: Vec<&str> = ["</s>", "<unk>", "<s>", "<|endoftext|>"].into_iter().filter(|t| !tokens.iter().any(|x| x.as_str() == Some(*t))).collect();
    if !missing.is_empty() {
        bail!(
            "the model is named {name:?}: llama.cpp treats a model whose name contains \"phi3\" as Phi-3 and fails to load it unless its vocabulary has {} (this one lacks {}); \
             rename the model folder",
            "</s>, <unk>, <s> and <|endoftext|>",
            missing.join(", ")
        )
    }
    Ok(())
}

fn model_name(folded: &Folded) -> String {
    let n = folded.files.name.trim_end_matches('/');
    n.rsplit('/').next().unwrap_or(n).to_string()
}

/// One tensor of the merged model: read (in slices of rows when it is large), fold, transform,
/// check finite, quantize, write.
fn write_model_tensor<W: Write>(folded: &Folded, it: &Item, slice: usize, w: &mut gguf::Writer<W>) -> Result<()> {
    let rows = it.shape.first().copied().unwrap_or(1);
    let row = it.shape.iter().skip(1).product::<usize>().max(1);
    let n = rows * row;
    let f32_of = |t: candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    if let Some(v) = &it.data {
        check_finite(v, &it.name, 0)?;
        return w.tensor(&quant::quantize(it.ty, v, row).with_context(|| format!("tensor {}", it.name))?);
    }
    if matches!(it.transform, Transform::Transpose | Transform::NeoxQkv) || n <= slice || it.shape.len() < 2 {
        let mut t = folded.tensor(&it.src)?;
        if it.transform == Transform::Transpose {
            t = t.t()?.contiguous()?;
        }
        let mut v = f32_of(t)?;
        match it.transform {
            Transform::PermuteQ | Transform::PermuteK => v = arch::permute(&v, rows, it.heads).with_context(|| format!("tensor {}", it.src))?,
            Transform::NeoxQkv => v = arch::neox_qkv(&v, rows, it.heads).with_context(|| format!("tensor {}", it.src))?,
            Transform::AddOne => v.iter_mut().for_each(|x| *x += 1.0),
            Transform::None | Transform::Transpose => {}
        }
        check_finite(&v, &it.src, 0)?;
        return w.tensor(&quant::quantize(it.ty, &v, row).with_context(|| format!("tensor {}", it.name))?);
    }
    // Slices of whole rows, written as they are made; for q/k, of whole heads (the permutation
    // stays within a head).
    let group = if matches!(it.transform, Transform::PermuteQ | Transform::PermuteK) { rows / it.heads } else { 1 };
    let step = ((slice / row).max(1) / group).max(1) * group;
    let mut start = 0;
    while start < rows {
        let k = step.min(rows - start);
        let mut v = f32_of(folded.rows(&it.src, start, k)?)?;
        if it.transform == Transform::AddOne {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        if group > 1 {
            v = arch::permute(&v, k, k / group).with_context(|| format!("tensor {}", it.src))?;
        }
        check_finite(&v, &it.src, start * row)?;
        w.part_of_tensor(&quant::quantize(it.ty, &v, row).with_context(|| format!("tensor {}", it.name))?)?;
        start += k;
    }
    w.end_tensor()
}

fn check_finite(v: &[f32], name: &str, offset: usize) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!("merged tensor {name} has a non-finite value ({} at flat index {}); nothing was written", v[i], offset + i)
    }
    Ok(())
}

/// Metadata and tensor list of the LoRA GGUF: `<tensor>.lora_a` [r, in] and `.lora_b` [out, r]
/// per adapted weight. One adapter as trained (plain alpha / r scaling, weight 1) keeps
/// `adapter.lora.alpha` as convert_lora_to_gguf writes it; otherwise each term's scaling is
/// folded into B, stacked terms are concatenated along r, and alpha is 0 (llama.cpp then
/// applies the user's scale alone).
fn plan_lora(folded: &Folded, config: &Json, family: &arch::Family, quant: Quant) -> Result<Plan> {
    let alpha = plain_alpha(folded);
    let mut items = vec![];
    for (key, terms) in folded.lora_terms() {
        let Some((gname, transform)) = family.map(key)? else {
            bail!("an adapter targets {key}, which llama.cpp's {} model does not have", family.arch)
        };
        ensure!(transform != Transform::AddOne, "an adapter targets the norm {key}: llama.cpp's LoRA applies to matrices only; export the merged model (--format gguf)");
        let r: usize = terms.iter().map(|(_, a, _, _)| a.dim(0).unwrap_or(0)).sum();
        let (_, a0, b0, _) = terms[0];
        let (inp, outp) = (a0.dim(1)?, b0.dim(0)?);
        let heads = perm_heads(config, transform);
        let lora_ty = |row: usize| {
            let t = quant.default_type();
            if t.is_quantized() && row % t.block() != 0 { GgmlType::F16 } else { t }
        };
        items.push(Item { src: key.to_string(), name: format!("{gname}.lora_a"), ty: lora_ty(inp), shape: vec![r, inp], transform, heads, data: None });
        items.push(Item { src: key.to_string(), name: format!("{gname}.lora_b"), ty: lora_ty(r), shape: vec![outp, r], transform, heads, data: None });
    }
    items.sort_by(|a, b| (layer_of(&a.name), &a.name).cmp(&(layer_of(&b.name), &b.name)));
    let kvs = vec![
        ("general.architecture".to_string(), Value::Str(family.arch.into())),
        ("general.type".into(), Value::Str("adapter".into())),
        ("adapter.type".into(), Value::Str("lora".into())),
        ("general.name".into(), Value::Str(folded.record.first().and_then(|r| r["path"].as_str()).unwrap_or("adapter").rsplit('/').next().unwrap_or("adapter").into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha.unwrap_or(0.0) as f32)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let mut kvs = kvs;
    kvs.extend(provenance(folded, quant));
    let mut fallbacks = vec![];
    for it in items.iter().filter(|it| it.ty != quant.default_type()) {
        fallbacks.push(format!("{} has rows of {} values, not a multiple of 32: written as {}", it.name, it.shape[1], it.ty.name()));
    }
    let notes = if alpha.is_none() {
        vec!["adapter.lora.alpha = 0: each tensor's scaling (and stacking weight) is folded into lora_b, so llama.cpp applies it at --lora scale 1".into()]
    } else {
        vec![]
    };
    Ok(Plan { kvs, items, vocab: None, fallbacks, notes })
}

/// `lora_alpha` when the adapters are one adapter applied as trained with alpha / r scaling
/// everywhere (so llama.cpp's alpha / rank gives each tensor's scaling); else None.
fn plain_alpha(folded: &Folded) -> Option<f64> {
    let mut alpha = None;
    for (_, terms) in folded.lora_terms() {
        if terms.len() != 1 {
            return None;
        }
        let (ad, a, _, scale) = terms[0];
        let c = &ad.config;
        if c.use_rslora || ad.weight != 1.0 || folded.record.len() != 1 {
            return None;
        }
        let r = a.dim(0).ok()? as f64;
        if (c.lora_alpha / r - scale).abs() > 1e-12 * scale.abs().max(1.0) {
            return None;
        }
        if alpha.is_some_and(|x| x != c.lora_alpha) {
            return None;
        }
        alpha = Some(c.lora_alpha);
    }
    alpha
}

/// The LoRA tensors, in the planned order (each adapted weight's `lora_a` then `lora_b`).
fn write_lora_tensors<W: Write>(folded: &Folded, items: &[Item], w: &mut gguf::Writer<W>) -> Result<()> {
    let plain = plain_alpha(folded).is_some();
    let terms: BTreeMap<&str, _> = folded.lora_terms().collect();
    for it in items {
        let ts = terms.get(it.src.as_str()).context("internal: LoRA terms")?;
        let is_a = it.name.ends_with(".lora_a");
        // A: [Σr, in], the terms' A stacked; B: [out, Σr], the terms' B (times their scale
        // unless alpha carries it) side by side.
        let parts: Vec<candle_core::Tensor> = ts
            .iter()
            .map(|(_, a, b, s)| -> Result<candle_core::Tensor> {
                Ok(if is_a { (*a).clone() } else if plain { (*b).clone() } else { ((*b).to_dtype(DType::F32)? * *s)? })
            })
            .collect::<Result<_>>()?;
        let t = candle_core::Tensor::cat(&parts, if is_a { 0 } else { 1 })?;
        let mut v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // q/k: the permutation acts on the weight's output rows, i.e. on B's rows.
        if !is_a && matches!(it.transform, Transform::PermuteQ | Transform::PermuteK) {
            v = arch::permute(&v, it.shape[0], it.heads)?;
        }
        if !is_a && it.transform == Transform::NeoxQkv {
            v = arch::neox_qkv(&v, it.shape[0], it.heads)?;
        }
        check_finite(&v, &it.name, 0)?;
        let row = it.shape[1];
        w.tensor(&quant::quantize(it.ty, &v, row)?)?;
    }
    Ok(())
}
