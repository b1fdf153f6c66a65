//! Loading safetensors weights tensor by tensor with positioned reads, instead of memory-
//! mapping whole files: the process then holds the loaded weights plus one tensor in flight,
//! not the weights plus every mapped page of the file (which doubled the load peak: 957 MiB
//! for KoGPT2's 477 MiB, docs/BENCHMARKS.md). The page cache still serves repeated loads.
//! A tensor stored in the wanted dtype is read straight into its own buffer (one copy); others
//! go through a byte buffer and a conversion.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};

struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// A candle VarBuilder backend over one or more safetensors files.
pub struct StreamingSafetensors {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

impl StreamingSafetensors {
    /// Opens the files; each header is validated whole first
    /// ([`crate::weights::check_safetensors_header`]), so every later read lies inside its file.
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let mut files = vec![];
        let mut entries = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            for e in crate::weights::check_safetensors_header(p)? {
                if entries.contains_key(&e.name) {
                    anyhow::bail!("{}: tensor {} is also in {}", p.display(), e.name, files.iter().map(|(f, _): &(PathBuf, File)| f.display().to_string()).collect::<Vec<_>>().join(", "));
                }
                entries.insert(e.name, Entry { file: i, dtype: e.dtype, shape: e.shape, start: e.start, end: e.end });
            }
            let f = File::open(p).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", p.display()))?;
            files.push((p.clone(), f));
        }
        Ok(Self { files, entries })
    }

    /// The tensors' names and where they are, for readers that need every tensor.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    /// The tensor `name` in the dtype it is stored in (for readers that keep it as is).
    pub fn load_stored(&self, name: &str) -> candle_core::Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let dtype = DType::try_from(e.dtype).map_err(|_| {
            candle_core::Error::Msg(format!("{}: tensor {name} has dtype {:?}, which lorafit cannot read", self.files[e.file].0.display(), e.dtype))
        })?;
        self.load(name, dtype, &Device::Cpu)
    }

    /// Every tensor's name, dtype and shape, from the headers (no data is read).
    pub fn infos(&self) -> candle_core::Result<Vec<(String, DType, Vec<usize>)>> {
        self.entries.iter().map(|(k, e)| Ok((k.clone(), DType::try_from(e.dtype)?, e.shape.clone()))).collect()
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let (path, f) = &self.files[e.file];
        let read_err = |err: std::io::Error| candle_core::Error::Msg(format!("{}: reading tensor {name}: {err} (is the file truncated?)", path.display()));
        // Stored as wanted: read straight into the tensor's own buffer (one copy, no staging).
        if cfg!(target_endian = "little") && DType::try_from(e.dtype).ok() == Some(dtype) {
            let n: usize = e.shape.iter().product();
            if (e.end - e.start) as usize == n * dtype.size_in_bytes() {
                let at = e.start;
                match dtype {
                    DType::F32 => return read_direct::<f32>(f, at, &e.shape, dev).map_err(read_err)?,
                    DType::F16 => return read_direct::<half::f16>(f, at, &e.shape, dev).map_err(read_err)?,
                    DType::BF16 => return read_direct::<half::bf16>(f, at, &e.shape, dev).map_err(read_err)?,
                    _ => {}
                }
            }
        }
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        f.read_exact_at(&mut bytes, e.start).map_err(read_err)?;
        let view = safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), &bytes)
            .map_err(|err| candle_core::Error::Msg(format!("{}: tensor {name}: {err}", path.display())))?;
        let t = view.load(&Device::Cpu)?;
        drop(bytes);
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl candle_nn::var_builder::SimpleBackend for StreamingSafetensors {
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
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// A tensor of `shape` whose little-endian T values are at byte offset `at`, read straight into
/// the tensor's own buffer.
fn read_direct<T: candle_core::WithDType>(f: &std::fs::File, at: u64, shape: &[usize], dev: &Device) -> std::io::Result<candle_core::Result<Tensor>> {
    let n: usize = shape.iter().product();
    let mut v = vec![T::zero(); n];
    // SAFETY: T is a plain number type (f32, f16, bf16) for which every bit pattern is a value,
    // and the slice covers exactly v's n elements.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>()) };
    f.read_exact_at(bytes, at)?;
    Ok(Tensor::from_vec(v, shape, dev))
}
