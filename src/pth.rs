//! `pytorch_model.bin` (and PEFT's `adapter_model.bin`): a zip archive written by `torch.save`,
//! holding `<name>/data.pkl` (a pickle of the state dict) and one stored entry per storage
//! (`<name>/data/<key>`). Reference: `torch/serialization.py` (`_save`, `_load`),
//! `torch/_utils.py` (`_rebuild_tensor_v2`), CPython's `Lib/pickletools.py` (the opcodes).
//!
//! Our own small unpickler, because a checkpoint is untrusted input: it executes nothing (a
//! GLOBAL is a name, a REDUCE a record), and it is bounded everywhere a crafted file could make a
//! reader allocate or recurse without limit: the pickle's size, its nesting depth
//! ([`MAX_DEPTH`]), the work of memo copies (a budget proportional to its size), string
//! lengths (checked against the bytes left). Every tensor's shape, strides and offset are
//! checked against its storage, and every storage against its zip entry and the file's size,
//! before any tensor memory is allocated: a reader then never allocates more than the file holds.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};

/// Deepest nesting of containers accepted in a pickle (a state dict needs about 5).
pub const MAX_DEPTH: usize = 100;
/// Largest `data.pkl` read (a state dict's pickle is ~100 bytes per tensor).
const MAX_PICKLE: u64 = 64 << 20;

/// A pickled value. Calls are records, never executed.
#[derive(Clone, Debug)]
enum Obj {
    Mark,
    /// None, a bool, a float or bytes: values a state dict's tensors never need.
    Other(&'static str),
    Int(i64),
    Str(String),
    Global(String, String),
    Tuple(Vec<Obj>),
    List(Vec<Obj>),
    Dict(Vec<(Obj, Obj)>),
    PersId(Box<Obj>),
    /// REDUCE / NEWOBJ: `callable(*args)`.
    Call(Box<Obj>, Box<Obj>),
}

/// A stack slot: the value with its nesting depth and node count (so that depth and the cost of
/// copies are known without walking the value).
#[derive(Clone)]
struct Slot {
    obj: Obj,
    depth: usize,
    size: usize,
}

fn leaf(obj: Obj) -> Slot {
    Slot { obj, depth: 1, size: 1 }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Slot>,
    /// Nodes created or copied so far, against `budget`.
    work: usize,
    budget: usize,
    what: &'a str,
}

impl<'a> Unpickler<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: byte {} of the pickle: {msg}", self.what, self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(self.err(format!("needs {n} more bytes, the pickle has {} left (truncated?)", self.data.len() - self.pos)));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err("unterminated GLOBAL name"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<Obj> {
        let bytes = self.take(n)?;
        Ok(Obj::Str(std::str::from_utf8(bytes).map_err(|e| self.err(format!("a string is not UTF-8: {e}")))?.to_string()))
    }

    fn charge(&mut self, n: usize) -> Result<()> {
        self.work += n;
        if self.work > self.budget {
            return Err(self.err(format!("the pickle expands to more than {} objects (a crafted file?)", self.budget)));
        }
        Ok(())
    }

    fn push(&mut self, s: Slot) -> Result<()> {
        if s.depth > MAX_DEPTH {
            return Err(self.err(format!("containers nested more than {MAX_DEPTH} deep (a state dict needs about 5)")));
        }
        self.charge(1)?;
        self.stack.push(s);
        Ok(())
    }

    fn pop(&mut self) -> Result<Slot> {
        self.stack.pop().ok_or_else(|| self.err("pops an empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Slot>> {
        let i = self.stack.iter().rposition(|s| matches!(s.obj, Obj::Mark)).ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        Ok(items)
    }

    fn last(&mut self) -> Result<&Slot> {
        self.stack.last().ok_or_else(|| self.err("an empty stack"))
    }

    /// A container of `items`.
    fn container(items: Vec<Slot>, make: impl FnOnce(Vec<Obj>) -> Obj) -> Slot {
        let depth = 1 + items.iter().map(|s| s.depth).max().unwrap_or(0);
        let size = 1 + items.iter().map(|s| s.size).sum::<usize>();
        Slot { obj: make(items.into_iter().map(|s| s.obj).collect()), depth, size }
    }

    /// Adds `items` to the list or dict on top of the stack (APPEND(S), SETITEM(S)).
    fn extend_last(&mut self, items: Vec<Slot>, dict: bool) -> Result<()> {
        let depth = 1 + items.iter().map(|s| s.depth).max().unwrap_or(0);
        let size: usize = items.iter().map(|s| s.size).sum();
        if depth > MAX_DEPTH {
            return Err(self.err(format!("containers nested more than {MAX_DEPTH} deep (a state dict needs about 5)")));
        }
        if dict && !items.len().is_multiple_of(2) {
            return Err(self.err(format!("SETITEMS with an odd number ({}) of keys and values", items.len())));
        }
        let (pos, what) = (self.pos, self.what);
        let last = self.stack.last_mut().ok_or_else(|| anyhow::anyhow!("{what}: byte {pos} of the pickle: an empty stack"))?;
        match (&mut last.obj, dict) {
            (Obj::List(v), false) => v.extend(items.into_iter().map(|s| s.obj)),
            (Obj::Dict(v), true) => {
                let mut it = items.into_iter().map(|s| s.obj);
                while let (Some(k), Some(x)) = (it.next(), it.next()) {
                    v.push((k, x));
                }
            }
            (other, _) => bail!("{what}: byte {pos} of the pickle: adds items to a {}", kind(other)),
        }
        last.depth = last.depth.max(depth);
        last.size += size;
        Ok(())
    }

    /// Runs the pickle to its STOP; returns the value left on the stack.
    fn run(mut self) -> Result<Obj> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => _ = self.u8()?,                // PROTO
                0x95 => _ = self.take(8)?,             // FRAME (protocol 4): only a size hint
                b'.' => break,                         // STOP
                b'(' => self.push(leaf(Obj::Mark))?,   // MARK
                b'N' => self.push(leaf(Obj::Other("None")))?,
                0x88 | 0x89 => self.push(leaf(Obj::Other("bool")))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.push(leaf(Obj::Int(v as i64)))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(leaf(Obj::Int(v as i64)))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.push(leaf(Obj::Int(v as i64)))?
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(self.err(format!("an integer of {n} bytes (more than 64 bits)")));
                    }
                    let mut v: i64 = 0;
                    for (i, x) in b.iter().enumerate() {
                        v |= (*x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // negative
                    }
                    self.push(leaf(Obj::Int(v)))?
                }
                b'G' => {
                    self.take(8)?;
                    self.push(leaf(Obj::Other("float")))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(leaf(s))?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(leaf(s))?
                }
                b'C' | b'B' => {
                    // SHORT_BINBYTES / BINBYTES
                    let n = if op == b'C' { self.u8()? as usize } else { self.u32()? as usize };
                    self.take(n)?;
                    self.push(leaf(Obj::Other("bytes")))?
                }
                b'c' => {
                    let (m, n) = (self.line()?, self.line()?);
                    self.push(leaf(Obj::Global(m, n)))?
                }
                0x93 => {
                    // STACK_GLOBAL
                    let (n, m) = (self.pop()?, self.pop()?);
                    match (m.obj, n.obj) {
                        (Obj::Str(m), Obj::Str(n)) => self.push(leaf(Obj::Global(m, n)))?,
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b')' => self.push(leaf(Obj::Tuple(vec![])))?,
                b']' => self.push(leaf(Obj::List(vec![])))?,
                b'}' => self.push(leaf(Obj::Dict(vec![])))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Self::container(items, Obj::Tuple))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Self::container(items, Obj::List))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err(format!("TUPLE{n} on a stack of {}", self.stack.len())));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Self::container(items, Obj::Tuple))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(leaf(Obj::Dict(vec![])))?;
                    self.extend_last(items, true)?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_last(vec![v], false)?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_last(items, false)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_last(vec![k, v], true)?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_last(items, true)?
                }
                b'q' | b'r' | 0x94 => {
                    // BINPUT / LONG_BINPUT / MEMOIZE: the memo keeps a copy.
                    let id = match op {
                        b'q' => self.u8()? as u32,
                        b'r' => self.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let s = self.last()?.clone();
                    self.charge(s.size)?;
                    self.memo.insert(id, s);
                }
                b'h' | b'j' => {
                    let id = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let s = self.memo.get(&id).cloned().ok_or_else(|| self.err(format!("memo {id} was never stored")))?;
                    self.charge(s.size)?;
                    self.push(s)?
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push(Slot { depth: id.depth + 1, size: id.size + 1, obj: Obj::PersId(Box::new(id.obj)) })?
                }
                b'R' | 0x81 => {
                    // REDUCE / NEWOBJ: recorded; an OrderedDict() becomes a dict to fill.
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let s = match &f.obj {
                        Obj::Global(m, n) if m == "collections" && (n == "OrderedDict" || n == "defaultdict") => leaf(Obj::Dict(vec![])),
                        Obj::Global(m, n) if m == "builtins" && n == "dict" => leaf(Obj::Dict(vec![])),
                        _ => Slot {
                            depth: 1 + f.depth.max(args.depth),
                            size: 1 + f.size + args.size,
                            obj: Obj::Call(Box::new(f.obj), Box::new(args.obj)),
                        },
                    };
                    self.push(s)?
                }
                b'b' => {
                    // BUILD: object state (an OrderedDict's `_metadata`): not needed, dropped.
                    self.pop()?;
                    self.last()?;
                }
                b'0' => _ = self.pop()?, // POP
                b'2' => {
                    // DUP
                    let s = self.last()?.clone();
                    self.charge(s.size)?;
                    self.push(s)?
                }
                other => return Err(self.err(format!("unsupported pickle opcode 0x{other:02x} (lorafit reads torch.save state dicts)"))),
            }
        }
        Ok(self.pop()?.obj)
    }
}

fn kind(o: &Obj) -> &'static str {
    match o {
        Obj::Mark => "mark",
        Obj::Other(k) => k,
        Obj::Int(_) => "int",
        Obj::Str(_) => "str",
        Obj::Global(..) => "global name",
        Obj::Tuple(_) => "tuple",
        Obj::List(_) => "list",
        Obj::Dict(_) => "dict",
        Obj::PersId(_) => "persistent id",
        Obj::Call(..) => "call",
    }
}

/// One tensor of the checkpoint, checked against its storage.
#[derive(Clone, Debug)]
pub struct PthEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Element strides and offset inside the storage.
    stride: Vec<usize>,
    offset: usize,
    /// The storage's data: absolute byte offset in the file, and its length in bytes.
    at: u64,
    storage_bytes: u64,
    /// Whether the elements are laid out row-major from `offset` (one read, no gather).
    contiguous: bool,
}

/// The tensors of a `torch.save` zip, readable one at a time by positioned reads.
pub struct PthFile {
    pub path: PathBuf,
    file: File,
    entries: HashMap<String, PthEntry>,
}

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        _ => return None,
    })
}

fn int(o: &Obj, what: &str) -> Result<usize> {
    match o {
        Obj::Int(v) if *v >= 0 => Ok(*v as usize),
        other => bail!("{what} must be a non-negative int, found {}", match other { Obj::Int(v) => v.to_string(), o => kind(o).into() }),
    }
}

fn ints(o: &Obj, what: &str) -> Result<Vec<usize>> {
    match o {
        Obj::Tuple(v) | Obj::List(v) => v.iter().map(|x| int(x, what)).collect(),
        other => bail!("{what} must be a tuple of ints, found {}", kind(other)),
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)` -> (storage key, dtype or the
/// storage class, storage numel, offset, size, stride). None: not a tensor.
type Rebuild = (String, std::result::Result<DType, String>, usize, usize, Vec<usize>, Vec<usize>);

fn rebuild(v: &Obj) -> Option<Result<Rebuild>> {
    let Obj::Call(f, args) = v else { return None };
    let Obj::Global(m, n) = &**f else { return None };
    match (m.as_str(), n.as_str()) {
        ("torch._utils", "_rebuild_parameter") => match &**args {
            Obj::Tuple(a) if !a.is_empty() => return rebuild(&a[0]),
            _ => return Some(Err(anyhow::anyhow!("_rebuild_parameter without its tensor"))),
        },
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {}
        _ => return None,
    }
    Some((|| {
        let Obj::Tuple(a) = &**args else { bail!("_rebuild_tensor_v2's arguments are a {}, not a tuple", kind(args)) };
        if a.len() < 4 {
            bail!("_rebuild_tensor_v2 has {} arguments, expected at least 4 (storage, offset, size, stride)", a.len())
        }
        let Obj::PersId(p) = &a[0] else { bail!("the storage is a {}, not a persistent id", kind(&a[0])) };
        let Obj::Tuple(p) = &**p else { bail!("the storage id is a {}, not a tuple", kind(p)) };
        let [Obj::Str(tag), Obj::Global(_, class), Obj::Str(key), _, numel, ..] = &p[..] else {
            bail!("the storage id is not ('storage', <class>, key, location, numel)")
        };
        if tag != "storage" {
            bail!("the storage id starts with {tag:?}, not 'storage'")
        }
        let dtype = storage_dtype(class).ok_or_else(|| class.clone());
        let (numel, offset) = (int(numel, "the storage size")?, int(&a[1], "the storage offset")?);
        let (size, stride) = (ints(&a[2], "the size")?, ints(&a[3], "the stride")?);
        if size.len() != stride.len() {
            bail!("size {size:?} and stride {stride:?} have different lengths")
        }
        Ok((key.clone(), dtype, numel, offset, size, stride))
    })())
}

impl PthFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file_name = path.display().to_string();
        let file = File::open(path).with_context(|| format!("cannot open {file_name}"))?;
        let len = file.metadata()?.len();
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file.try_clone()?)).map_err(|e| {
            anyhow::anyhow!("{file_name} is not a torch.save zip archive ({e}); lorafit reads checkpoints of torch >= 1.6 (or safetensors)")
        })?;
        let names: Vec<String> = zip.file_names_raw().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        let pkls: Vec<&String> = names.iter().filter(|n| n.ends_with("data.pkl")).collect();
        let [pkl] = pkls[..] else {
            bail!("{file_name}: expected one data.pkl in the archive, found {}", pkls.len())
        };
        let prefix = pkl.strip_suffix("data.pkl").unwrap().to_string();
        let bytes = {
            let mut e = zip.by_name(pkl).with_context(|| format!("{file_name}: cannot read {pkl}"))?;
            if e.size() > MAX_PICKLE.min(len) {
                bail!("{file_name}: {pkl} claims {} bytes (the file has {len}; lorafit reads pickles up to {MAX_PICKLE})", e.size())
            }
            let mut b = Vec::with_capacity(e.size() as usize);
            std::io::Read::read_to_end(&mut std::io::Read::take(&mut e, MAX_PICKLE), &mut b).with_context(|| format!("{file_name}: cannot read {pkl}"))?;
            b
        };
        let what = format!("{file_name}: {pkl}");
        let up = Unpickler { data: &bytes, pos: 0, stack: vec![], memo: HashMap::new(), work: 0, budget: 8 * bytes.len() + 4096, what: &what };
        let top = up.run()?;
        let Obj::Dict(items) = top else {
            bail!("{what}: holds a {}, not a state dict (a dict of tensors)", kind(&top))
        };

        let mut entries = HashMap::new();
        let mut storages: HashMap<String, (u64, u64)> = HashMap::new();
        for (k, v) in &items {
            let Obj::Str(name) = k else { continue };
            let Some(r) = rebuild(v) else { continue }; // not a tensor (e.g. an int buffer)
            let (key, dtype, numel, offset, shape, stride) = r.with_context(|| format!("{what}: tensor {name}"))?;
            let dtype = match dtype {
                Ok(d) => d,
                Err(class) => {
                    tracing::debug!("{file_name}: tensor {name} has storage type {class}, skipped");
                    continue;
                }
            };
            let elem = dtype.size_in_bytes() as u64;
            // The storage: a stored (uncompressed) zip entry inside the file, holding numel elements.
            let (at, size) = match storages.get(&key) {
                Some(s) => *s,
                None => {
                    let entry = format!("{prefix}data/{key}");
                    let e = zip.by_name(&entry).with_context(|| format!("{what}: tensor {name}: its storage {entry} is missing"))?;
                    if e.compression() != zip::CompressionMethod::Stored {
                        bail!("{file_name}: {entry} is compressed; torch.save stores storages uncompressed")
                    }
                    let at = e.data_start().with_context(|| format!("{file_name}: {entry}: no data offset"))?;
                    let size = e.size();
                    if at.checked_add(size).is_none_or(|end| end > len) {
                        bail!("{file_name} is truncated or damaged: storage {entry} claims bytes {at}..{} of a {len}-byte file", at.saturating_add(size))
                    }
                    storages.insert(key.clone(), (at, size));
                    (at, size)
                }
            };
            let storage_bytes = (numel as u64).checked_mul(elem).filter(|b| *b <= size).with_context(|| {
                format!("{what}: tensor {name}: its storage claims {numel} elements of {dtype:?}, the file holds {size} bytes for it")
            })?;
            // The last element the view reaches must lie inside the storage.
            let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let reach = shape.iter().zip(&stride).try_fold(offset, |a, (&d, &s)| a.checked_add(d.saturating_sub(1).checked_mul(s)?));
            match (n, reach) {
                (Some(0), _) => {}
                (Some(_), Some(last)) if (last as u64) < numel as u64 => {}
                _ => bail!(
                    "{what}: tensor {name}: shape {shape:?} with stride {stride:?} at offset {offset} reaches past its storage of {numel} elements"
                ),
            }
            let row_major: Vec<usize> = (0..shape.len()).map(|i| shape[i + 1..].iter().product()).collect();
            let contiguous = shape.iter().zip(&stride).zip(&row_major).all(|((&d, &s), &r)| d <= 1 || s == r);
            entries.insert(name.clone(), PthEntry { dtype, shape, stride, offset, at, storage_bytes, contiguous });
        }
        Ok(Self { path: path.to_path_buf(), file, entries })
    }

    /// name -> (dtype, shape) of every tensor.
    pub fn infos(&self) -> impl Iterator<Item = (&String, &PthEntry)> {
        self.entries.iter()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name` in its stored dtype, on the CPU.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        let elem = e.dtype.size_in_bytes();
        let n: usize = e.shape.iter().product();
        let read = |from: usize, count: usize| -> Result<Vec<u8>> {
            let mut b = vec![0u8; count * elem];
            self.file.read_exact_at(&mut b, e.at + (from * elem) as u64).with_context(|| format!("{}: reading tensor {name}", self.path.display()))?;
            Ok(b)
        };
        let bytes = if n == 0 {
            vec![]
        } else if e.contiguous {
            read(e.offset, n)?
        } else {
            // Strided (e.g. a transposed view): read the storage span it covers, gather the elements.
            let span = e.storage_bytes as usize / elem - e.offset;
            let src = read(e.offset, span)?;
            let mut out = Vec::with_capacity(n * elem);
            let mut idx = vec![0usize; e.shape.len()];
            for _ in 0..n {
                let at: usize = idx.iter().zip(&e.stride).map(|(i, s)| i * s).sum();
                out.extend_from_slice(&src[at * elem..(at + 1) * elem]);
                for d in (0..idx.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < e.shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            out
        };
        Ok(Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, &Device::Cpu)?)
    }

    /// Every tensor, in its stored dtype.
    pub fn read_all(&self) -> Result<Vec<(String, Tensor)>> {
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        names.into_iter().map(|n| Ok((n.clone(), self.load(n)?))).collect()
    }
}

impl candle_nn::var_builder::SimpleBackend for PthFile {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(e) = self.entries.get(name) {
            if e.shape != s.dims() {
                return Err(candle_core::Error::Msg(format!(
                    "shape mismatch for {name}: the checkpoint has {:?}, the model expects {:?}",
                    e.shape,
                    s.dims()
                )));
            }
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.entries.contains_key(name) {
            return Err(candle_core::Error::CannotFindTensor { path: name.to_string() }.bt());
        }
        let t = self.load(name).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(p: &[u8]) -> Result<Obj> {
        Unpickler { data: p, pos: 0, stack: vec![], memo: HashMap::new(), work: 0, budget: 8 * p.len() + 4096, what: "test" }.run()
    }

    #[test]
    fn deep_nesting_and_memo_bombs_are_errors() {
        // 200,000 nested lists: ']' then ']' 'a' ... would recurse on drop; refused at depth 100.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 200_000));
        p.extend(std::iter::repeat_n(b'a', 199_999));
        p.push(b'.');
        let e = format!("{:#}", parse(&p).unwrap_err());
        assert!(e.contains("nested more than 100"), "{e}");
        // A list doubled 40 times through the memo: refused by the work budget.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..40 {
            p.extend([b'(', b'h', 0, b'h', 0, b'l', b'q', 0]);
        }
        p.push(b'.');
        let e = format!("{:#}", parse(&p).unwrap_err());
        assert!(e.contains("expands to more than"), "{e}");
        // A string longer than the pickle.
        let e = format!("{:#}", parse(&[0x80, 2, b'X', 0xff, 0xff, 0xff, 0x7f, b'a']).unwrap_err());
        assert!(e.contains("truncated"), "{e}");
    }
}
