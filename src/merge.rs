//! `lorafit merge`: folds LoRA adapters into the base and writes a plain Hugging Face model folder.
//!
//! For every weight that adapters target, in f32, with one cast to the output dtype at the end:
//!
//! ```text
//! nn.Linear    (stored [out, in]):  W += Σ_a  w_a · s_a · (B_a @ A_a)
//! GPT-2 Conv1D (stored [in, out]):  W += Σ_a  w_a · s_a · (B_a @ A_a)ᵀ
//! ```
//!
//! A: [r, in], B: [out, r], `s_a` the adapter's scaling for that module (`lora_alpha / r`, or
//! `/ √r` with rsLoRA, after `rank_pattern` / `alpha_pattern`: [`LoraConfig::rank_and_scaling`]),
//! `w_a` the `--adapter DIR:W` weight. Per adapter this is PEFT's `merge_and_unload`
//! (`tuners/lora/layer.py`: `get_delta_weight`, `transpose(.., fan_in_fan_out)`); the sum is
//! what lorafit computes unmerged when adapters are stacked (`lora::Linear::forward`).
//!
//! The adapters are checked by building the model through the same loaders as `Model::load`
//! (`model::build_check`), over a shape-only view of the checkpoint: no weight is read,
//! and every check of the loader applies (targets that match nothing, unmatched tensors, wrong
//! shapes). Tensors are then processed one at a time (read, merge, cast, write), so the peak
//! memory is about twice the largest tensor (its raw bytes and the tensor briefly coexist), not the model. The output keeps the base's own key
//! names; a reward adapter (`lorafit rm`) gives a sequence-classification checkpoint
//! (`score.weight`, as transformers' `*ForSequenceClassification`). Everything is written in a
//! temporary folder next to `--out`, fsync'ed, then renamed. References: transformers
//! `modeling_utils.save_pretrained` (shards, index), safetensors' file format.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, VarBuilder};
use serde_json::json;

use crate::lora::{Adapter, AdapterSet};
use crate::model::Arch;
use crate::stream_load::StreamingSafetensors;
use crate::weights::{ModelFiles, WeightFiles};

/// What `lorafit merge` was asked to do.
pub struct MergeOptions {
    pub model: String,
    /// Adapter folders with their weights, in order.
    pub adapters: Vec<(PathBuf, f64)>,
    pub out: PathBuf,
    /// Output dtype of the float tensors; None = the base checkpoint's.
    pub dtype: Option<DType>,
    pub force: bool,
    /// Bytes of tensor data per safetensors file (transformers' `max_shard_size`).
    pub max_shard_size: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct MergeReport {
    pub out: String,
    pub files: Vec<String>,
    pub tensors: usize,
    pub merged_tensors: usize,
    pub bytes: u64,
    pub dtype: String,
    pub sequence_classification: bool,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Files copied from the base folder when present.
const EXTRA_FILES: [&str; 8] = [
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
];

fn hf_name(dt: DType) -> &'static str {
    match dt {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// The base checkpoint, read one tensor at a time: safetensors by positioned reads
/// ([`StreamingSafetensors`]), a PyTorch pickle lazily by candle.
enum Source {
    St(StreamingSafetensors),
    Pth(candle_core::pickle::PthTensors),
}

impl Source {
    fn open(w: &WeightFiles) -> Result<Self> {
        Ok(match w {
            WeightFiles::Safetensors(files) => Source::St(StreamingSafetensors::open(files)?),
            WeightFiles::Pth(p) => Source::Pth(candle_core::pickle::PthTensors::new(p, None).with_context(|| format!("cannot read {}", p.display()))?),
        })
    }

    /// name -> (dtype, shape) of every tensor, from the headers.
    fn shapes(&self) -> Result<BTreeMap<String, (DType, Vec<usize>)>> {
        Ok(match self {
            Source::St(s) => s.infos()?.into_iter().map(|(k, d, s)| (k, (d, s))).collect(),
            Source::Pth(p) => p.tensor_infos().iter().map(|(k, i)| (k.clone(), (i.dtype, i.layout.dims().to_vec()))).collect(),
        })
    }

    /// The tensor `name` in its stored `dtype`.
    fn load(&self, name: &str, dtype: DType) -> Result<Tensor> {
        match self {
            Source::St(s) => Ok(s.get_unchecked(name, dtype, &Device::Cpu)?),
            Source::Pth(p) => Ok(p.get(name)?.with_context(|| format!("no tensor {name}"))?.contiguous()?),
        }
    }
}

/// A VarBuilder backend with the checkpoint's shapes and no data (stride-0 views of one zero):
/// the model loaders run their checks, and we learn which keys each layer reads.
struct ShapeOnly {
    shapes: HashMap<String, Vec<usize>>,
    asked: Arc<Mutex<HashSet<String>>>,
}

impl SimpleBackend for ShapeOnly {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            let msg = format!("shape mismatch for {name}");
            return Err(candle_core::Error::UnexpectedShape { msg, expected: s, got: t.shape().clone() }.bt());
        }
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = self.shapes.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() }.bt())?;
        self.asked.lock().unwrap().insert(name.to_string());
        Tensor::zeros((), dtype, dev)?.broadcast_as(dims.as_slice())
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// One adapter's contribution to one weight.
struct Delta {
    adapter: Arc<Adapter>,
    a: Tensor,
    b: Tensor,
    /// `w_a · s_a`.
    scale: f64,
    conv1d: bool,
}

/// Loads the adapters (a reward folder brings the stack in its lorafit.json, at weight 1),
/// its score head if any, and the record written into config.json.
type Loaded = (Vec<Arc<Adapter>>, Option<Tensor>, Vec<serde_json::Value>);

fn load_adapters(list: &[(PathBuf, f64)]) -> Result<Loaded> {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let explicit: HashSet<PathBuf> = list.iter().map(|(d, _)| canon(d)).collect();
    let (mut adapters, mut head, mut record) = (vec![], None, vec![]);
    for (dir, w) in list {
        let name = dir.display().to_string();
        let stack = crate::peft::read_stack(dir)?;
        if let Some(b) = stack.iter().find(|b| explicit.contains(&canon(b))) {
            bail!("--adapter {}: it is also stacked under {name} (see its {}), so it would be merged twice; drop that --adapter", b.display(), crate::peft::STACK_FILE)
        }
        for b in &stack {
            record.push(json!({"path": b.display().to_string(), "weight": 1.0, "stacked_under": name}));
        }
        let (_, other) = crate::peft::read_tensors(dir)?;
        if other.contains_key(crate::reward::SCORE_KEY) || other.contains_key("base_model.model.score.modules_to_save.default.weight") {
            ensure!(head.is_none(), "--adapter {name}: a second reward model; a merged checkpoint has one score head");
            ensure!(*w == 1.0, "--adapter {name}:{w}: a reward model merges at weight 1 (its score head was trained with the LoRA at full strength)");
            let (a, h) = crate::reward::load_reward_adapter(dir, &name, false)?;
            adapters.extend(a);
            head = Some(h);
            record.push(json!({"path": name, "weight": w, "reward_head": true}));
        } else {
            for (i, b) in stack.iter().enumerate() {
                adapters.push(crate::peft::load_adapter(b, &format!("{name}-base{i}"), 1.0, false)?);
            }
            adapters.push(crate::peft::load_adapter(dir, &name, *w, false)?);
            record.push(json!({"path": name, "weight": w}));
        }
    }
    ensure!(!adapters.is_empty(), "nothing to merge: pass at least one --adapter");
    Ok((adapters, head, record))
}

/// Fails when the filesystem holding `dir` has less than `need` bytes free (statvfs).
pub fn check_disk_space(dir: &Path, need: u64) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot read the free space of {}", dir.display()));
    }
    let free = s.f_bavail as u64 * s.f_frsize as u64;
    ensure!(
        free >= need,
        "not enough disk space in {}: the merged model needs {}, {} are free; nothing was written",
        dir.display(), crate::runtime::fmt_bytes(need), crate::runtime::fmt_bytes(free)
    );
    Ok(())
}

/// `2GB`, `500MB`, `200KB` (powers of 1000, as transformers), `1GiB`, `64MiB`, or bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let units = [("GIB", 1u64 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1000), ("B", 1)];
    let (num, mult) = units.iter().find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim(), *m))).unwrap_or((t.as_str(), 1));
    let n: f64 = num.parse().with_context(|| format!("--max-shard-size {s}: expected e.g. 2GB, 500MB or a number of bytes"))?;
    ensure!(n > 0.0, "--max-shard-size {s} must be positive");
    Ok((n * mult as f64) as u64)
}

/// Writes one safetensors file, computing each tensor only when its bytes are due (and
/// checking it is finite).
fn write_shard(path: &Path, items: &[&Item], get: impl Fn(&Item) -> Result<Tensor>) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0;
    for it in items {
        header.insert(it.out.clone(), json!({"dtype": safetensors::Dtype::from(it.dtype), "shape": it.shape, "data_offsets": [off, off + it.bytes()]}));
        off += it.bytes();
    }
    let mut h = serde_json::to_vec(&header)?;
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for it in items {
        let t = get(it)?;
        ensure!(t.dims() == it.shape && t.dtype() == it.dtype, "internal: {} is {:?} {:?}", it.out, t.dtype(), t.dims());
        check_and_write(&t, &it.out, &mut f)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// One output tensor: its name, where it comes from (None = the score head), dtype, shape.
struct Item {
    out: String,
    src: Option<String>,
    dtype: DType,
    shape: Vec<usize>,
}

impl Item {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// Checks that `t` is finite and streams its little-endian bytes to `f` (`io::sink()` to only
/// check), straight from the CPU storage: no copy of the tensor.
fn check_and_write(t: &Tensor, name: &str, f: &mut impl Write) -> Result<()> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { bail!("internal: {name} is not on the CPU") };
    let range = layout.start_offset()..layout.start_offset() + t.elem_count();
    macro_rules! go {
        ($ty:ty, $finite:expr) => {{
            let v = &cpu.as_slice::<$ty>()?[range];
            if let Some(i) = v.iter().position(|x| !$finite(x)) {
                bail!("merged tensor {name} has a non-finite value ({} at flat index {i}) in {:?}; nothing was written", v[i], t.dtype())
            }
            v.iter().try_for_each(|x| f.write_all(&x.to_le_bytes()))?
        }};
    }
    match t.dtype() {
        DType::F32 => go!(f32, |x: &f32| x.is_finite()),
        DType::F16 => go!(half::f16, |x: &half::f16| x.is_finite()),
        DType::BF16 => go!(half::bf16, |x: &half::bf16| x.is_finite()),
        DType::F64 => go!(f64, |x: &f64| x.is_finite()),
        DType::I64 => go!(i64, |_: &i64| true),
        DType::U32 => go!(u32, |_: &u32| true),
        DType::U8 => go!(u8, |_: &u8| true),
        dt => bail!("cannot write {name}: dtype {dt:?}"),
    }
    Ok(())
}

pub fn merge(o: &MergeOptions) -> Result<MergeReport> {
    let t0 = std::time::Instant::now();
    if o.out.exists() && !o.force {
        bail!("--out {}: already exists; pass --force to replace it", o.out.display())
    }
    let files = ModelFiles::resolve(&o.model)?;
    let arch = Arch::from_file(&files.config)?;
    let src = Source::open(&files.weights)?;
    let shapes = src.shapes()?;
    let (adapters, head, record) = load_adapters(&o.adapters)?;

    // Attach the adapters through the model loaders, over shapes only.
    let asked = Arc::new(Mutex::new(HashSet::new()));
    let backend = ShapeOnly { shapes: shapes.iter().map(|(k, (_, s))| (k.clone(), s.clone())).collect(), asked: asked.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let set = AdapterSet::new(adapters.clone());
    crate::model::build_check(vb, &arch, &set).with_context(|| files.describe())?;
    set.check_complete()?;
    let asked = asked.lock().unwrap().clone();

    // Each adapter module -> the checkpoint key its layer read (none: the weight is shared).
    let gpt2 = matches!(arch, Arch::Gpt2(_));
    let mut deltas: BTreeMap<String, Vec<Delta>> = BTreeMap::new();
    for a in &adapters {
        for m in a.modules() {
            let bare = m.path.strip_prefix("transformer.").unwrap_or(&m.path);
            let renamed = arch.checkpoint_name(&format!("{}.weight", m.path), &|k| shapes.contains_key(k));
            let Some(key) = [format!("{}.weight", m.path), format!("{bare}.weight"), renamed].into_iter().find(|k| asked.contains(k)) else {
                bail!(
                    "adapter {:?} has a LoRA on {}, whose weight is tied to the input embeddings (tie_word_embeddings): \
                     merging it would change the embeddings too, i.e. another model than base + adapter. Merge adapters \
                     without {0} (target_modules without it), or use the adapter unmerged",
                    a.name, m.path
                )
            };
            let conv1d = gpt2 && m.path != "lm_head"; // GPT-2's blocks are Conv1D; every other family's nn.Linear
            deltas.entry(key).or_default().push(Delta { adapter: a.clone(), a: m.a, b: m.b, scale: m.scaling * a.weight, conv1d });
        }
    }
    // Stacking: PEFT saves fan_in_fan_out to match the layer it wrapped (true for GPT-2's Conv1D,
    // [in, out]; false for nn.Linear, [out, in]). Adapters on one weight must all agree with it.
    for (key, ds) in &deltas {
        if let Some(d) = ds.iter().find(|d| d.adapter.config.fan_in_fan_out != d.conv1d) {
            let others: Vec<&str> = ds.iter().filter(|e| e.adapter.config.fan_in_fan_out == d.conv1d).map(|e| e.adapter.name.as_str()).collect();
            bail!(
                "adapter {:?} has fan_in_fan_out = {}, but {key} is {}: it was made for a model whose layer is stored the \
                 other way, and cannot be merged{}",
                d.adapter.name, d.adapter.config.fan_in_fan_out,
                if d.conv1d { "a GPT-2 Conv1D weight stored [in, out] (fan_in_fan_out = true)" } else { "an nn.Linear weight stored [out, in] (fan_in_fan_out = false)" },
                if others.is_empty() { String::new() } else { format!(" nor stacked with {} on this layer", others.join(", ")) }
            )
        }
    }

    // The output tensors: the base's keys (a seq-cls model: no lm_head, GPT-2 keys under
    // `transformer.`, plus score.weight).
    let base_dtype = shapes.values().map(|(d, _)| *d).find(|d| d.is_float());
    let dtype = o.dtype.or(base_dtype.filter(|d| matches!(d, DType::F16 | DType::BF16))).unwrap_or(DType::F32);
    let seq_cls = head.is_some();
    let prefixless = gpt2 && !shapes.contains_key("transformer.wte.weight");
    let mut items = vec![];
    for (name, (dt, shape)) in &shapes {
        if seq_cls && *name == format!("{}.weight", arch.lm_head_name()) {
            ensure!(!deltas.contains_key(name), "an adapter targets lm_head, which a sequence-classification checkpoint does not have");
            continue;
        }
        let out = if seq_cls && prefixless { format!("transformer.{name}") } else { name.clone() };
        items.push(Item { out, src: Some(name.clone()), dtype: if dt.is_float() { dtype } else { *dt }, shape: shape.clone() });
    }
    let head = head.map(|h| crate::reward::RewardHead::from_tensor(h, false, arch.hidden_size(), &Device::Cpu)).transpose()?.map(|h| h.weight);
    if let Some(h) = &head {
        items.push(Item { out: "score.weight".into(), src: None, dtype, shape: h.dims().to_vec() });
    }
    items.sort_by(|a, b| a.out.cmp(&b.out));
    let tensor = |it: &Item| -> Result<Tensor> {
        let t = match &it.src {
            None => head.clone().context("internal: no head")?,
            Some(name) => {
                let t = src.load(name, shapes[name].0)?;
                match deltas.get(name) {
                    None => t,
                    Some(ds) => ds.iter().try_fold(t.to_dtype(DType::F32)?, |w, d| -> Result<Tensor> {
                        let delta = (d.b.matmul(&d.a)? * d.scale)?; // [out, in]
                        Ok((w + if d.conv1d { delta.t()? } else { delta })?)
                    })?,
                }
            }
        };
        Ok(t.to_dtype(it.dtype)?)
    };

    // Shards as transformers cuts them: a new file when the next tensor would pass the limit.
    let mut shards: Vec<Vec<&Item>> = vec![vec![]];
    let mut size = 0;
    for it in &items {
        if size + it.bytes() > o.max_shard_size && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap().push(it);
        size += it.bytes();
    }
    let n = shards.len();
    let names: Vec<String> =
        (1..=n).map(|i| if n == 1 { "model.safetensors".into() } else { format!("model-{i:05}-of-{n:05}.safetensors") }).collect();
    let total: u64 = items.iter().map(Item::bytes).sum();

    // Checks before anything is written: free space, then every merged tensor is finite.
    let parent = o.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let leaf = o.out.file_name().with_context(|| format!("--out {}: must name a folder", o.out.display()))?.to_string_lossy().to_string();
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let extra: u64 = EXTRA_FILES.iter().filter_map(|f| std::fs::metadata(files.dir.join(f)).ok()).map(|m| m.len()).sum();
    check_disk_space(&parent, total + extra + 1024 * (items.len() as u64 + 16))?;
    for it in items.iter().filter(|it| it.src.as_ref().is_none_or(|s| deltas.contains_key(s))) {
        check_and_write(&tensor(it)?, &it.out, &mut std::io::sink())?;
    }

    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files.config)?)?;
    let obj = cfg.as_object_mut().context("config.json is not a JSON object")?;
    let present: Vec<&str> = ["torch_dtype", "dtype"].into_iter().filter(|k| obj.contains_key(*k)).collect();
    for k in if present.is_empty() { vec!["torch_dtype"] } else { present } {
        obj.insert(k.into(), json!(hf_name(dtype)));
    }
    if seq_cls {
        obj.insert("architectures".into(), json!([arch.seq_cls_architecture()]));
        obj.insert("num_labels".into(), json!(1));
        obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
        obj.insert("label2id".into(), json!({"LABEL_0": 0}));
    }
    obj.insert("lorafit_merge".into(), json!({"base_model": files.name, "adapters": record, "dtype": hf_name(dtype), "lorafit_version": env!("CARGO_PKG_VERSION")}));

    let tmp = parent.join(format!(".{leaf}.merge-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        for (shard, name) in shards.iter().zip(&names) {
            write_shard(&tmp.join(name), shard, tensor)?;
        }
        if n > 1 {
            let map: BTreeMap<&str, &str> = shards.iter().zip(&names).flat_map(|(s, f)| s.iter().map(move |it| (it.out.as_str(), f.as_str()))).collect();
            let index = json!({"metadata": {"total_size": total}, "weight_map": map});
            crate::io::atomic_write(&tmp.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
        }
        crate::io::atomic_write(&tmp.join("config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        for f in EXTRA_FILES.iter().filter(|f| files.dir.join(f).is_file()) {
            std::fs::copy(files.dir.join(f), tmp.join(f)).with_context(|| format!("cannot copy {f}"))?;
            std::fs::File::open(tmp.join(f))?.sync_all()?;
        }
        std::fs::File::open(&tmp)?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing the merged model (nothing was written at {})", o.out.display())));
    }
    // Swap in: the old --out (with --force) is moved aside, the new folder renamed, the old removed.
    let old = parent.join(format!(".{leaf}.merge-old-{}", std::process::id()));
    if o.out.symlink_metadata().is_ok() {
        std::fs::rename(&o.out, &old).with_context(|| format!("cannot move the old {} aside", o.out.display()))?;
    }
    std::fs::rename(&tmp, &o.out).with_context(|| format!("cannot rename {} to {}", tmp.display(), o.out.display()))?;
    let _ = std::fs::remove_dir_all(&old).or_else(|_| std::fs::remove_file(&old));
    std::fs::File::open(&parent)?.sync_all()?;
    Ok(MergeReport {
        out: o.out.display().to_string(),
        files: names,
        tensors: items.len(),
        merged_tensors: deltas.len(),
        bytes: total,
        dtype: hf_name(dtype).into(),
        sequence_classification: seq_cls,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::runtime::peak_rss_bytes(),
    })
}
