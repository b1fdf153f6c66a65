//! GGUF v3 files, as llama.cpp reads them: a streaming writer and a header reader.
//!
//! ```text
//! "GGUF" u32 version=3  u64 n_tensors  u64 n_kv
//! n_kv ×      key (u64 len + utf-8) · u32 value type · value (arrays: u32 elem type · u64 n · elems)
//! n_tensors × name · u32 n_dims · u64 ne[n_dims] (innermost first) · u32 ggml type · u64 offset
//! padding to `general.alignment` (32), then each tensor's bytes, each padded to 32
//! ```
//!
//! The writer learns every tensor's name, type and shape up front (sizes follow from them), writes
//! the header, then takes the tensors' bytes one at a time in the same order, so a model is never
//! in memory as a whole. Reference: ggml `docs/gguf.md`, gguf-py `gguf_writer.py` / `gguf_reader.py`.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::quant::GgmlType;

pub const ALIGNMENT: u64 = 32;
const MAGIC: &[u8; 4] = b"GGUF";

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Elements of one type (an empty array is written as an array of u8... see [`Value::type_id`]).
    Arr(Vec<Value>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Arr(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The type's name as gguf-py spells it (for listings compared with llama.cpp's).
    pub fn type_name(&self) -> String {
        const NAMES: [&str; 13] =
            ["UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64"];
        match self {
            Value::Arr(v) => format!("ARRAY[{}]", v.first().map_or("UINT8", |e| NAMES[e.type_id() as usize])),
            v => NAMES[v.type_id() as usize].to_string(),
        }
    }

    pub fn strs(v: impl IntoIterator<Item = impl Into<String>>) -> Value {
        Value::Arr(v.into_iter().map(|s| Value::Str(s.into())).collect())
    }

    pub fn as_str(&self) -> Option<&str> {
        if let Value::Str(s) = self {
            Some(s)
        } else {
            None
        }
    }

    /// An integer value of any width.
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(x) => x as u64,
            Value::U16(x) => x as u64,
            Value::U32(x) => x as u64,
            Value::U64(x) => x,
            Value::I8(x) if x >= 0 => x as u64,
            Value::I16(x) if x >= 0 => x as u64,
            Value::I32(x) if x >= 0 => x as u64,
            Value::I64(x) if x >= 0 => x as u64,
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    /// Short text for listings: arrays as their length and first elements.
    pub fn brief(&self) -> String {
        match self {
            Value::Str(s) if s.chars().count() > 60 => format!("{:?}... ({} chars)", s.chars().take(60).collect::<String>(), s.chars().count()),
            Value::Str(s) => format!("{s:?}"),
            Value::Arr(v) => {
                let head: Vec<String> = v.iter().take(4).map(Value::brief).collect();
                format!("[{}{}] ({} items)", head.join(", "), if v.len() > 4 { ", ..." } else { "" }, v.len())
            }
            Value::F32(x) => format!("{x}"),
            Value::F64(x) => format!("{x}"),
            Value::Bool(b) => format!("{b}"),
            v => v.as_u64().map_or_else(|| format!("{v:?}"), |x| x.to_string()),
        }
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Value::U8(x) => w.write_all(&[*x]),
            Value::I8(x) => w.write_all(&x.to_le_bytes()),
            Value::U16(x) => w.write_all(&x.to_le_bytes()),
            Value::I16(x) => w.write_all(&x.to_le_bytes()),
            Value::U32(x) => w.write_all(&x.to_le_bytes()),
            Value::I32(x) => w.write_all(&x.to_le_bytes()),
            Value::F32(x) => w.write_all(&x.to_le_bytes()),
            Value::Bool(x) => w.write_all(&[*x as u8]),
            Value::Str(s) => write_str(w, s),
            Value::U64(x) => w.write_all(&x.to_le_bytes()),
            Value::I64(x) => w.write_all(&x.to_le_bytes()),
            Value::F64(x) => w.write_all(&x.to_le_bytes()),
            Value::Arr(v) => {
                let t = v.first().map_or(0, Value::type_id);
                w.write_all(&t.to_le_bytes())?;
                w.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|e| e.write(w))
            }
        }
    }

    fn read(r: &mut impl Read, t: u32, depth: usize) -> Result<Value> {
        ensure!(depth < 4, "nested arrays deeper than 4");
        Ok(match t {
            0 => Value::U8(rd::<1>(r)?[0]),
            1 => Value::I8(i8::from_le_bytes(rd(r)?)),
            2 => Value::U16(u16::from_le_bytes(rd(r)?)),
            3 => Value::I16(i16::from_le_bytes(rd(r)?)),
            4 => Value::U32(u32::from_le_bytes(rd(r)?)),
            5 => Value::I32(i32::from_le_bytes(rd(r)?)),
            6 => Value::F32(f32::from_le_bytes(rd(r)?)),
            7 => Value::Bool(rd::<1>(r)?[0] != 0),
            8 => Value::Str(read_str(r)?),
            9 => {
                let et = u32::from_le_bytes(rd(r)?);
                let n = u64::from_le_bytes(rd(r)?);
                ensure!(n < 1 << 28, "an array of {n} elements");
                let mut v = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    v.push(Value::read(r, et, depth + 1)?);
                }
                Value::Arr(v)
            }
            10 => Value::U64(u64::from_le_bytes(rd(r)?)),
            11 => Value::I64(i64::from_le_bytes(rd(r)?)),
            12 => Value::F64(f64::from_le_bytes(rd(r)?)),
            t => bail!("unknown metadata value type {t}"),
        })
    }
}

fn rd<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn read_str(r: &mut impl Read) -> Result<String> {
    let n = u64::from_le_bytes(rd(r)?);
    ensure!(n < 1 << 30, "a string of {n} bytes");
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// A tensor of the file: its name, type and shape in PyTorch order (outermost first; GGUF stores
/// the reverse), and its data offset (from the start of the data section).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    pub offset: u64,
}

impl TensorInfo {
    pub fn bytes(&self) -> u64 {
        self.ty.bytes(self.shape.iter().product::<usize>()) as u64
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT - n
}

/// The size of a GGUF file with these metadata and tensors, computed without writing it.
pub fn file_size(kvs: &[(String, Value)], tensors: &[(String, GgmlType, Vec<usize>)]) -> u64 {
    let mut counter = CountingSink(0);
    let header = write_header(&mut counter, kvs, tensors).map(|_| counter.0).unwrap_or(0);
    let data: u64 = tensors.iter().map(|(_, t, s)| {
        let b = t.bytes(s.iter().product()) as u64;
        b + pad(b)
    }).sum();
    header + pad(header) + data
}

struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Header and tensor infos; returns the data offset of each tensor.
fn write_header(w: &mut impl Write, kvs: &[(String, Value)], tensors: &[(String, GgmlType, Vec<usize>)]) -> std::io::Result<Vec<u64>> {
    w.write_all(MAGIC)?;
    w.write_all(&3u32.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(kvs.len() as u64).to_le_bytes())?;
    for (k, v) in kvs {
        write_str(w, k)?;
        w.write_all(&v.type_id().to_le_bytes())?;
        v.write(w)?;
    }
    let mut offsets = vec![];
    let mut off = 0u64;
    for (name, ty, shape) in tensors {
        write_str(w, name)?;
        w.write_all(&(shape.len() as u32).to_le_bytes())?;
        for d in shape.iter().rev() {
            w.write_all(&(*d as u64).to_le_bytes())?;
        }
        w.write_all(&ty.id().to_le_bytes())?;
        w.write_all(&off.to_le_bytes())?;
        offsets.push(off);
        let b = ty.bytes(shape.iter().product()) as u64;
        off += b + pad(b);
    }
    Ok(offsets)
}

/// Writes a GGUF file tensor by tensor: [`Writer::new`] writes the header, then
/// [`Writer::tensor`] takes each tensor's bytes in the declared order.
pub struct Writer<W: Write> {
    w: W,
    tensors: Vec<(String, GgmlType, Vec<usize>)>,
    next: usize,
    /// Bytes of the current tensor written so far.
    part: usize,
}

impl<W: Write> Writer<W> {
    pub fn new(mut w: W, kvs: &[(String, Value)], tensors: Vec<(String, GgmlType, Vec<usize>)>) -> Result<Self> {
        let mut counter = CountingSink(0);
        write_header(&mut counter, kvs, &tensors)?;
        let header = counter.0;
        write_header(&mut w, kvs, &tensors)?;
        w.write_all(&vec![0u8; pad(header) as usize])?;
        Ok(Self { w, tensors, next: 0, part: 0 })
    }

    /// The bytes of the next tensor (its size must match its type and shape).
    pub fn tensor(&mut self, bytes: &[u8]) -> Result<()> {
        self.part_of_tensor(bytes)?;
        self.end_tensor()
    }

    /// Some bytes of the next tensor (a slice of its rows); [`Writer::end_tensor`] closes it.
    pub fn part_of_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        let (name, ty, shape) = self.tensors.get(self.next).context("internal: more tensors than declared")?;
        let want = ty.bytes(shape.iter().product());
        ensure!(self.part + bytes.len() <= want, "internal: tensor {name} gets more than the {want} bytes of {ty:?} {shape:?}");
        self.w.write_all(bytes)?;
        self.part += bytes.len();
        Ok(())
    }

    /// Checks the current tensor got all its bytes and pads it.
    pub fn end_tensor(&mut self) -> Result<()> {
        let (name, ty, shape) = self.tensors.get(self.next).context("internal: more tensors than declared")?;
        let want = ty.bytes(shape.iter().product());
        ensure!(self.part == want, "internal: tensor {name} has {} bytes, {ty:?} {shape:?} needs {want}", self.part);
        self.w.write_all(&vec![0u8; pad(want as u64) as usize])?;
        self.part = 0;
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written and returns the writer.
    pub fn finish(self) -> Result<W> {
        ensure!(self.next == self.tensors.len(), "internal: {} of {} tensors written", self.next, self.tensors.len());
        Ok(self.w)
    }
}

/// A GGUF file's header: metadata in file order, tensor infos, and where the data starts.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
}

impl Header {
    pub fn read_file(path: &Path) -> Result<Self> {
        let mut f = std::io::BufReader::new(std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?);
        Self::read(&mut f).with_context(|| format!("{} is not a readable GGUF file", path.display()))
    }

    pub fn read<R: Read + Seek>(r: &mut R) -> Result<Self> {
        ensure!(&rd::<4>(r)? == MAGIC, "no GGUF magic");
        let version = u32::from_le_bytes(rd(r)?);
        ensure!(version == 2 || version == 3, "GGUF version {version} (2 and 3 are read)");
        let n_tensors = u64::from_le_bytes(rd(r)?);
        let n_kv = u64::from_le_bytes(rd(r)?);
        ensure!(n_tensors < 1 << 24 && n_kv < 1 << 24, "implausible counts ({n_tensors} tensors, {n_kv} keys)");
        let mut kvs = vec![];
        for _ in 0..n_kv {
            let k = read_str(r)?;
            let t = u32::from_le_bytes(rd(r)?);
            let v = Value::read(r, t, 0).with_context(|| format!("metadata {k}"))?;
            kvs.push((k, v));
        }
        let mut tensors = vec![];
        for _ in 0..n_tensors {
            let name = read_str(r)?;
            let nd = u32::from_le_bytes(rd(r)?);
            ensure!(nd <= 4, "tensor {name} has {nd} dimensions");
            let mut shape = vec![];
            for _ in 0..nd {
                shape.push(u64::from_le_bytes(rd(r)?) as usize);
            }
            shape.reverse();
            let id = u32::from_le_bytes(rd(r)?);
            let ty = GgmlType::from_id(id).with_context(|| format!("tensor {name}"))?;
            let offset = u64::from_le_bytes(rd(r)?);
            tensors.push(TensorInfo { name, ty, shape, offset });
        }
        let pos = r.stream_position()?;
        let align = kvs.iter().find(|(k, _)| k == "general.alignment").and_then(|(_, v)| v.as_u64()).unwrap_or(ALIGNMENT);
        Ok(Self { version, kvs, tensors, data_offset: pos.div_ceil(align) * align })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The raw bytes of tensor `name`.
    pub fn tensor_bytes<R: Read + Seek>(&self, r: &mut R, name: &str) -> Result<Vec<u8>> {
        let t = self.tensors.iter().find(|t| t.name == name).with_context(|| format!("no tensor {name}"))?;
        r.seek(SeekFrom::Start(self.data_offset + t.offset))?;
        let mut b = vec![0u8; t.bytes() as usize];
        r.read_exact(&mut b).with_context(|| format!("tensor {name}: the file is truncated"))?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let kvs = vec![
            ("general.architecture".to_string(), Value::Str("llama".into())),
            ("a.u32".into(), Value::U32(7)),
            ("a.f32".into(), Value::F32(1.5)),
            ("a.arr".into(), Value::strs(["x", "yz"])),
            ("a.ints".into(), Value::Arr(vec![Value::I32(1), Value::I32(-2)])),
            ("a.bool".into(), Value::Bool(true)),
        ];
        let tensors = vec![("t0".to_string(), GgmlType::F32, vec![2, 3]), ("t1".into(), GgmlType::F16, vec![5])];
        let mut buf = std::io::Cursor::new(vec![]);
        let mut w = Writer::new(&mut buf, &kvs, tensors.clone()).unwrap();
        w.tensor(&[1u8; 24]).unwrap();
        w.tensor(&[2u8; 10]).unwrap();
        w.finish().unwrap();
        assert_eq!(buf.get_ref().len() as u64, file_size(&kvs, &tensors));
        buf.set_position(0);
        let h = Header::read(&mut buf).unwrap();
        assert_eq!(h.kvs, kvs);
        assert_eq!(h.tensors[1].shape, vec![5]);
        assert_eq!(h.tensor_bytes(&mut buf, "t1").unwrap(), vec![2u8; 10]);
        assert_eq!(h.data_offset % 32, 0);
        assert_eq!(h.tensors[1].offset, 32);
    }
}
