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
//! (`score.weight`, as transformers' `*ForSequenceClassification`). One exception: transformers
//! has no sequence classifier for EXAONE 3.5 (`model_type: "exaone"` is LLaMA under other names,
//! and `AutoModelForSequenceClassification` refuses its config), so an EXAONE 3.5 reward model is
//! written as the LLaMA checkpoint it is: LLaMA's key and config names ([`exaone_as_llama`]),
//! loaded by `AutoModelForSequenceClassification` as `LlamaForSequenceClassification`
//! (scripts/fixtures/family_rm_checks.py measures it against PEFT, tests/families_rm.rs).
//!
//! `--out` is claimed first ([`crate::outdir`]): it must not be, or hold, an input; it is locked
//! for the whole merge (a second merge into it fails at once, naming the first); a folder without
//! lorafit's marker is never written, and `--force` replaces only an earlier merge's files (listed
//! in the marker). Everything is written in a temp folder inside `--out`, fsync'ed, then moved
//! in. References: transformers
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
use crate::outdir::OutDir;
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
/// ([`StreamingSafetensors`]), a PyTorch checkpoint likewise ([`crate::pth::PthFile`]); both
/// validate the whole file's layout when opened.
enum Source {
    St(StreamingSafetensors),
    Pth(crate::pth::PthFile),
}

impl Source {
    fn open(w: &WeightFiles) -> Result<Self> {
        Ok(match w {
            WeightFiles::Safetensors(files) => Source::St(StreamingSafetensors::open(files)?),
            WeightFiles::Pth(p) => Source::Pth(crate::pth::PthFile::open(p).with_context(|| format!("cannot read {}", p.display()))?),
        })
    }

    /// name -> (dtype, shape) of every tensor, from the headers.
    fn shapes(&self) -> Result<BTreeMap<String, (DType, Vec<usize>)>> {
        Ok(match self {
            Source::St(s) => s.infos()?.into_iter().map(|(k, d, s)| (k, (d, s))).collect(),
            Source::Pth(p) => p.infos().map(|(k, e)| (k.clone(), (e.dtype, e.shape.clone()))).collect(),
        })
    }

    /// The tensor `name` in its stored `dtype`.
    fn load(&self, name: &str, dtype: DType) -> Result<Tensor> {
        match self {
            Source::St(s) => Ok(s.get_unchecked(name, dtype, &Device::Cpu)?),
            Source::Pth(p) => p.load(name),
        }
    }

    /// Rows `start..start + n` (first dimension) of tensor `name`, in its stored `dtype`.
    fn load_rows(&self, name: &str, start: usize, n: usize, dtype: DType) -> Result<Tensor> {
        match self {
            Source::St(s) => Ok(s.load_rows(name, start, n)?),
            Source::Pth(_) => Ok(self.load(name, dtype)?.narrow(0, start, n)?.contiguous()?),
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

/// Loads the adapters (a reward folder brings the stack it holds, at weight 1), its score head
/// if any, and the record written into config.json. `stacks[i]` is `list[i]`'s stack.
type Loaded = (Vec<Arc<Adapter>>, Option<Tensor>, Vec<serde_json::Value>);

fn load_adapters(list: &[(PathBuf, f64)], stacks: &[Vec<PathBuf>]) -> Result<Loaded> {
    let (mut adapters, mut head, mut record) = (vec![], None, vec![]);
    let mut reward: Option<String> = None;
    for ((dir, w), stack) in list.iter().zip(stacks) {
        let name = dir.display().to_string();
        // A stacked adapter is a copy inside `dir`: the same adapter passed explicitly too is
        // found by its content.
        if let Some((other, _)) = list.iter().find(|(d, _)| stack.iter().any(|b| same_adapter(d, b))) {
            bail!("--adapter {}: it is also stacked under {name} (a copy in its {}/), so it would be merged twice; drop that --adapter", other.display(), crate::peft::STACK_DIR)
        }
        let root = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        for b in stack {
            let shown = Path::new(&name).join(b.strip_prefix(&root).unwrap_or(b));
            record.push(json!({"path": shown.display().to_string(), "weight": 1.0, "stacked_under": name}));
        }
        let (_, other) = crate::peft::read_tensors(dir)?;
        if other.keys().any(|k| crate::reward::is_score_key(k)) {
            ensure!(head.is_none(), "--adapter {name}: a second reward model; a merged checkpoint has one score head");
            ensure!(*w == 1.0, "--adapter {name}:{w}: a reward model merges at weight 1 (its score head was trained with the LoRA at full strength)");
            let (a, h) = crate::reward::load_reward_adapter(dir, &name, false)?;
            adapters.extend(a);
            head = Some(h);
            reward = Some(name.clone());
            record.push(json!({"path": name, "weight": w, "reward_head": true}));
        } else {
            for (i, b) in stack.iter().enumerate() {
                adapters.push(crate::peft::load_adapter(b, &format!("{name}-base{i}"), 1.0, false)?);
            }
            adapters.push(crate::peft::load_adapter(dir, &name, *w, false)?);
            record.push(json!({"path": name, "weight": w}));
        }
    }
    // A reward head reads the hidden states of exactly the model it was trained on: base +
    // the reward model's own stack + its LoRA. Another adapter changes those states.
    if let Some(rm) = &reward {
        if let Some((d, _)) = list.iter().find(|(d, _)| d.display().to_string() != *rm) {
            bail!(
                "--adapter {}: merged together with the reward model {rm}. Its score head was trained on the base + \
                 {rm}'s own stack + its LoRA only; another adapter changes the features the head reads, so the merged \
                 checkpoint would score differently from the reward model. Merge the reward model alone (the adapters \
                 it was trained on come with it, from its {}/ folder)",
                d.display(),
                crate::peft::STACK_DIR
            )
        }
    }
    ensure!(!adapters.is_empty(), "nothing to merge: pass at least one --adapter");
    Ok((adapters, head, record))
}

/// Whether adapter folders `a` and `b` are the same adapter: the same folder, or the same
/// weights file byte for byte (a stacked copy).
fn same_adapter(a: &Path, b: &Path) -> bool {
    if a.canonicalize().ok().is_some_and(|x| Some(x) == b.canonicalize().ok()) {
        return true;
    }
    let w = |d: &Path| std::fs::read(d.join(crate::peft::WEIGHTS_FILE)).ok();
    let size = |d: &Path| std::fs::metadata(d.join(crate::peft::WEIGHTS_FILE)).map(|m| m.len()).ok();
    size(a).is_some() && size(a) == size(b) && w(a) == w(b)
}

/// Bytes available to this user and the block size of the filesystem holding `dir` (statvfs).
fn fs_space(dir: &Path) -> Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot read the free space of {}", dir.display()));
    }
    Ok((s.f_bavail as u64 * s.f_frsize as u64, (s.f_frsize as u64).max(1)))
}

/// Fails when the filesystem holding `dir` has less than `need` bytes free.
pub fn check_disk_space(dir: &Path, need: u64) -> Result<()> {
    let (free, _) = fs_space(dir)?;
    let exact = |b: u64| format!("{} ({b} bytes)", crate::runtime::fmt_bytes(b));
    ensure!(
        free >= need,
        "not enough disk space in {}: the merged model needs {}, {} are free ({} short); nothing was written",
        dir.display(), exact(need), exact(free), exact(need - free)
    );
    Ok(())
}

/// Bytes the files of `sizes` take on a filesystem of blocks of `block` bytes (each file is
/// rounded up to whole blocks), plus one block for the folder's entries.
fn on_disk(sizes: impl IntoIterator<Item = u64>, block: u64) -> u64 {
    sizes.into_iter().map(|s| s.div_ceil(block) * block).sum::<u64>() + block
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
    let h = shard_header(items)?;
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

/// The safetensors header of a shard of `items` (JSON padded to 8 bytes, as safetensors writes it).
fn shard_header(items: &[&Item]) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0;
    for it in items {
        header.insert(it.out.clone(), json!({"dtype": safetensors::Dtype::from(it.dtype), "shape": it.shape, "data_offsets": [off, off + it.bytes()]}));
        off += it.bytes();
    }
    let mut h = serde_json::to_vec(&header)?;
    h.resize(h.len().div_ceil(8) * 8, b' ');
    Ok(h)
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

/// The base checkpoint with the adapters folded in, read one tensor at a time: what `merge` and
/// `export` (GGUF) share. The adapters are attached through the model loaders over shapes only
/// (every check of the loader applies), then [`Folded::tensor`] computes one weight on demand.
pub struct Folded {
    pub files: ModelFiles,
    pub arch: Arch,
    src: Source,
    /// Every checkpoint tensor: name -> (stored dtype, shape).
    pub shapes: BTreeMap<String, (DType, Vec<usize>)>,
    /// Checkpoint key -> the adapters' contributions to it.
    deltas: BTreeMap<String, Vec<Delta>>,
    /// A reward model's score head (`lorafit rm`), as stored in its adapter file.
    pub head: Option<Tensor>,
    /// What was folded in, for the output's provenance: `{"path", "weight", ...}` per adapter.
    pub record: Vec<serde_json::Value>,
}

impl Folded {
    /// Resolves `model`, reads the headers of its weights and loads `adapters` (none: the base as is).
    pub fn open(model: &str, adapters: &[(PathBuf, f64)]) -> Result<Self> {
        let files = ModelFiles::resolve(model)?;
        let arch = Arch::from_file(&files.config)?;
        let src = Source::open(&files.weights)?;
        let shapes = src.shapes()?;
        let stacks = adapters.iter().map(|(d, _)| crate::peft::read_stack(d)).collect::<Result<Vec<_>>>()?;
        let (adapters, head, record) = if adapters.is_empty() { (vec![], None, vec![]) } else { load_adapters(adapters, &stacks)? };

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
        Ok(Self { files, arch, src, shapes, deltas, head, record })
    }

    /// Whether an adapter changes the checkpoint tensor `name`.
    pub fn is_merged(&self, name: &str) -> bool {
        self.deltas.contains_key(name)
    }

    /// How many checkpoint tensors the adapters change.
    pub fn merged_count(&self) -> usize {
        self.deltas.len()
    }

    /// The LoRA terms on each checkpoint tensor an adapter changes: (adapter, A [r, in],
    /// B [out, r], `w_a · s_a`), for writing the adapters unmerged (GGUF LoRA).
    pub fn lora_terms(&self) -> impl Iterator<Item = (&str, Vec<(&Adapter, &Tensor, &Tensor, f64)>)> {
        self.deltas.iter().map(|(k, ds)| (k.as_str(), ds.iter().map(|d| (d.adapter.as_ref(), &d.a, &d.b, d.scale)).collect()))
    }

    /// The checkpoint tensor `name` with every adapter folded in: f32 when an adapter changes
    /// it (the merge is f32), else in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.src.load(name, self.shapes.get(name).with_context(|| format!("no tensor {name}"))?.0)?;
        match self.deltas.get(name) {
            None => Ok(t),
            Some(ds) => ds.iter().try_fold(t.to_dtype(DType::F32)?, |w, d| -> Result<Tensor> {
                let delta = (d.b.matmul(&d.a)? * d.scale)?; // [out, in]
                Ok((w + if d.conv1d { delta.t()? } else { delta })?)
            }),
        }
    }

    /// Rows `start..start + n` (first dimension) of [`Folded::tensor`], reading only those rows
    /// (a large tensor is then processed in pieces). Not for GPT-2 Conv1D weights with adapters,
    /// whose rows are the delta's columns.
    pub fn rows(&self, name: &str, start: usize, n: usize) -> Result<Tensor> {
        let t = self.src.load_rows(name, start, n, self.shapes.get(name).with_context(|| format!("no tensor {name}"))?.0)?;
        match self.deltas.get(name) {
            None => Ok(t),
            Some(ds) => ds.iter().try_fold(t.to_dtype(DType::F32)?, |w, d| -> Result<Tensor> {
                ensure!(!d.conv1d, "internal: rows of the Conv1D weight {name}");
                let delta = (d.b.narrow(0, start, n)?.matmul(&d.a)? * d.scale)?; // [n, in]
                Ok((w + delta)?)
            }),
        }
    }
}

pub fn merge(o: &MergeOptions) -> Result<MergeReport> {
    let t0 = std::time::Instant::now();
    // 1. The inputs; --out must be none of them (nor hold one), whatever the flags.
    let files = ModelFiles::resolve(&o.model)?;
    let stacks = o.adapters.iter().map(|(d, _)| crate::peft::read_stack(d)).collect::<Result<Vec<_>>>()?;
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", &files.dir)];
    for ((d, _), stack) in o.adapters.iter().zip(&stacks) {
        inputs.push(("--adapter", d));
        inputs.extend(stack.iter().map(|b| ("a stacked adapter", b.as_path())));
    }
    crate::outdir::check_not_input(&o.out, "--out", &inputs)?;
    // 2. Claim --out: locked until this merge ends; only lorafit's own earlier merge is replaced.
    let out = claim(&o.out, o.force)?;

    let folded = Folded::open(&o.model, &o.adapters)?;
    let (arch, shapes, deltas, record) = (&folded.arch, &folded.shapes, &folded.deltas, &folded.record);
    let gpt2 = matches!(arch, Arch::Gpt2(_));
    let head = folded.head.clone();

    // The output tensors: the base's keys (a seq-cls model: no lm_head, GPT-2 keys under
    // `transformer.`, plus score.weight).
    let base_dtype = shapes.values().map(|(d, _)| *d).find(|d| d.is_float());
    let dtype = o.dtype.or(base_dtype.filter(|d| matches!(d, DType::F16 | DType::BF16))).unwrap_or(DType::F32);
    let seq_cls = head.is_some();
    let prefixless = gpt2 && !shapes.contains_key("transformer.wte.weight");
    let exaone = matches!(arch, Arch::Decoder(c) if c.family == crate::model::family::Family::Exaone);
    let mut items = vec![];
    for (name, (dt, shape)) in shapes {
        if seq_cls && *name == format!("{}.weight", arch.lm_head_name()) {
            ensure!(!deltas.contains_key(name), "an adapter targets lm_head, which a sequence-classification checkpoint does not have");
            continue;
        }
        let out = if seq_cls && prefixless {
            format!("transformer.{name}")
        } else if seq_cls && exaone {
            exaone_llama_key(name)
        } else {
            name.clone()
        };
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
            Some(name) => folded.tensor(name)?,
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

    // The small files, serialised now so that every size is known.
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
        if let Arch::Decoder(c) = arch {
            if exaone {
                exaone_as_llama(obj, c);
            }
        }
    }
    obj.insert("lorafit_merge".into(), json!({"base_model": files.name, "adapters": record, "dtype": hf_name(dtype), "lorafit_version": env!("CARGO_PKG_VERSION")}));
    let cfg = serde_json::to_string_pretty(&cfg)?;
    let index = (n > 1).then(|| {
        let map: BTreeMap<&str, &str> = shards.iter().zip(&names).flat_map(|(s, f)| s.iter().map(move |it| (it.out.as_str(), f.as_str()))).collect();
        serde_json::to_string_pretty(&json!({"metadata": {"total_size": total}, "weight_map": map}))
    });
    let index = index.transpose()?;
    let extras: Vec<&str> = EXTRA_FILES.iter().copied().filter(|f| files.dir.join(f).is_file()).collect();
    let mut sizes: Vec<(String, u64)> = vec![];
    for (shard, name) in shards.iter().zip(&names) {
        sizes.push((name.clone(), 8 + shard_header(shard)?.len() as u64 + shard.iter().map(|it| it.bytes()).sum::<u64>()));
    }
    if let Some(i) = &index {
        sizes.push(("model.safetensors.index.json".into(), i.len() as u64));
    }
    sizes.push(("config.json".into(), cfg.len() as u64));
    for f in &extras {
        sizes.push((f.to_string(), std::fs::metadata(files.dir.join(f))?.len()));
    }
    let written: Vec<String> = sizes.iter().map(|(n, _)| n.clone()).collect();

    // Checks before anything is written: lorafit's names are free in --out, the disk holds the
    // files, every merged tensor is finite.
    let previous = previous_files(&out);
    if let Some(f) = written.iter().find(|f| out.path.join(f).symlink_metadata().is_ok() && !previous.contains(*f)) {
        crate::bail_kind!(
            crate::error::Kind::NotLorafitOutput,
            "{} holds {f}, which lorafit's merge did not write there: refusing to replace it",
            out.path.display()
        )
    }
    let (_, block) = fs_space(&out.path)?;
    check_disk_space(&out.path, on_disk(sizes.iter().map(|(_, s)| *s), block))?;
    for it in items.iter().filter(|it| it.src.as_ref().is_none_or(|s| deltas.contains_key(s))) {
        check_and_write(&tensor(it)?, &it.out, &mut std::io::sink())?;
    }

    // 3. Write everything into a temp folder inside --out (removed on any error; a killed
    //    merge's is removed by the next claim), then move the files in.
    let tmp = TempDir::create(out.path.join(format!(".{}.merge-tmp-{}", leaf_name(&out.path), std::process::id())))?;
    (|| -> Result<()> {
        for (shard, name) in shards.iter().zip(&names) {
            write_shard(&tmp.0.join(name), shard, tensor)?;
        }
        if let Some(i) = &index {
            crate::io::atomic_write(&tmp.0.join("model.safetensors.index.json"), i.as_bytes())?;
        }
        crate::io::atomic_write(&tmp.0.join("config.json"), cfg.as_bytes())?;
        for f in &extras {
            std::fs::copy(files.dir.join(f), tmp.0.join(f)).with_context(|| format!("cannot copy {f}"))?;
            std::fs::File::open(tmp.0.join(f))?.sync_all()?;
        }
        // The chat template the adapters were trained with (their lorafit.json), else the base's.
        let trained = o.adapters.iter().find_map(|(d, _)| crate::render::TemplateRecord::read(d).ok().flatten().and_then(|r| r.chat_template));
        crate::chat_template::install_chat_template(&files.dir, &tmp.0, trained.as_deref())?;
        Ok(())
    })()
    .with_context(|| format!("writing the merged model (nothing was changed in {})", o.out.display()))?;
    install(&out, &tmp.0, &previous, &written)?;
    drop(tmp);
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

/// Claims `--out` for a merge and returns it locked. A folder lorafit did not write (no
/// `.lorafit` marker, something in it) is refused before anything touches it, not even a lock
/// file; a marked folder of another kind (a training run) too; an earlier merge needs `--force`.
/// Merge temp folders left beside `--out` by killed merges of older versions are removed.
fn claim(out: &Path, force: bool) -> Result<OutDir> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let leaf = out.file_name().with_context(|| format!("--out {}: must name a folder", out.display()))?.to_string_lossy().to_string();
    crate::outdir::remove_stale_siblings(parent, &leaf);
    check_out(out, force)?;
    let dir = OutDir::lock(out)?;
    check_out(out, force)?; // again under the lock: another merge may have finished meanwhile
    if dir.marker().is_none() {
        dir.write_marker("merge", &[])?; // a killed merge's folder is then known as lorafit's
    }
    Ok(dir)
}

/// Whether a merge may write into `out` (see [`claim`]).
fn check_out(out: &Path, force: bool) -> Result<()> {
    use crate::error::Kind;
    use crate::outdir::{read_marker, temp_owner, LOCK, MARKER};
    let Ok(meta) = out.symlink_metadata() else { return Ok(()) };
    if !meta.is_dir() {
        bail!("--out {} exists and is not a folder", out.display())
    }
    let mut contents = vec![];
    for e in std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let name = e?.file_name().to_string_lossy().to_string();
        if name != LOCK && name != MARKER && temp_owner(&name).is_none() {
            contents.push(name);
        }
    }
    contents.sort();
    match read_marker(out) {
        None if contents.is_empty() => Ok(()),
        None => {
            let shown: Vec<&str> = contents.iter().take(3).map(String::as_str).collect();
            let more = if contents.len() > 3 { format!(" and {} more", contents.len() - 3) } else { String::new() };
            crate::bail_kind!(
                Kind::NotLorafitOutput,
                "--out {} already exists and was not written by lorafit (it has no {MARKER} marker and holds {}{more}): merge never replaces it, with --force or without",
                out.display(),
                shown.join(", ")
            )
        }
        Some(m) if m.kind != "merge" => crate::bail_kind!(
            Kind::NotLorafitOutput,
            "--out {} holds lorafit {} output, not a merged model: merge never replaces it, with --force or without",
            out.display(),
            m.kind
        ),
        Some(_) if contents.is_empty() || force => Ok(()),
        Some(_) => bail!("--out {}: already exists (an earlier lorafit merge); pass --force to replace it", out.display()),
    }
}

/// The files an earlier merge recorded in `out`'s marker: plain names only (a marker naming
/// `../x` or `a/b` is not lorafit's, and nothing outside the folder is ever removed).
fn previous_files(out: &OutDir) -> Vec<String> {
    let plain = |f: &String| !f.starts_with('.') && !f.contains('/') && !f.contains('\\') && !f.is_empty();
    out.marker().map(|m| m.files.into_iter().filter(plain).collect()).unwrap_or_default()
}

/// Moves the files `new` from `tmp` into `out`, replacing an earlier merge's files `old`. The
/// marker lists every file that may be lorafit's at each moment, so a merge killed half way
/// leaves a folder the next `--force` can still clean up; files lorafit did not write stay.
fn install(out: &OutDir, tmp: &Path, old: &[String], new: &[String]) -> Result<()> {
    let mut both: Vec<String> = old.iter().chain(new).cloned().collect();
    both.sort();
    both.dedup();
    out.write_marker("merge", &both)?;
    for f in old.iter().filter(|f| !new.contains(f)) {
        match std::fs::remove_file(out.path.join(f)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {} (from the earlier merge)", out.path.join(f).display()))
            }
            _ => {}
        }
    }
    for f in new {
        std::fs::rename(tmp.join(f), out.path.join(f)).with_context(|| format!("cannot move {f} into {}", out.path.display()))?;
    }
    out.write_marker("merge", new)?;
    std::fs::File::open(&out.path)?.sync_all()?;
    Ok(())
}

fn leaf_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into())
}

/// A temp folder removed when dropped (on success, on any error, on a panic).
struct TempDir(PathBuf);

impl TempDir {
    fn create(p: PathBuf) -> Result<Self> {
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A merged EXAONE 3.5 reward model's key: LLaMA's name (`transformer.h.0.attn.attention.q_proj.weight`
/// -> `model.layers.0.self_attn.q_proj.weight`); a key already in LLaMA's names stays.
fn exaone_llama_key(name: &str) -> String {
    crate::model::decoder::EXAONE_NAMES.iter().fold(name.to_string(), |n, (llama, exaone)| n.replacen(exaone, llama, 1))
}

/// An EXAONE 3.5 config.json rewritten as the LLaMA config it is, for a merged reward model:
/// transformers 5.24 maps `exaone` to `LlamaForCausalLM` (models/auto `"exaone": "LlamaModel"`,
/// key renames in conversion_mapping.py) but has no `exaone` sequence classifier, so
/// `AutoModelForSequenceClassification` refuses an `exaone` config; as `model_type: "llama"`
/// it loads `LlamaForSequenceClassification`, the same math. EXAONE's aliases
/// (`num_layers`, `layer_norm_epsilon`, `activation_function`) become LLaMA's names, and every
/// value whose default differs between ExaoneConfig and LlamaConfig (rope base, epsilon, context,
/// kv heads, token ids) is written out as lorafit read it. `auto_map` (EXAONE's remote code,
/// made for the original names) is dropped.
fn exaone_as_llama(obj: &mut serde_json::Map<String, serde_json::Value>, c: &crate::model::family::Config) {
    for k in ["num_layers", "layer_norm_epsilon", "activation_function", "auto_map"] {
        obj.remove(k);
    }
    obj.insert("model_type".into(), json!("llama"));
    obj.insert("num_hidden_layers".into(), json!(c.num_hidden_layers));
    obj.insert("num_key_value_heads".into(), json!(c.num_key_value_heads));
    obj.insert("head_dim".into(), json!(c.head_dim));
    obj.insert("rms_norm_eps".into(), json!(c.rms_norm_eps));
    obj.insert("hidden_act".into(), json!("silu"));
    obj.insert("max_position_embeddings".into(), json!(c.max_position_embeddings));
    obj.insert("tie_word_embeddings".into(), json!(c.tie_word_embeddings));
    // ExaoneConfig's token defaults (pad 0 decides where transformers pools a padded batch).
    for (k, v) in [("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 361)] {
        obj.entry(k).or_insert(json!(v));
    }
    // The rope base: inside `rope_parameters` (transformers 5 configs), else top-level.
    match obj.get_mut("rope_parameters").and_then(|p| p.as_object_mut()) {
        Some(p) => {
            p.entry("rope_theta").or_insert(json!(c.rope.theta));
        }
        None => {
            obj.insert("rope_theta".into(), json!(c.rope.theta));
        }
    }
}
