//! Device and dtype selection, and peak-memory readings.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("--device {s}: expected cuda:N with N a number"))?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                bail!("--device {s}: this lorafit was built without CUDA; rebuild with `cargo build --release --features cuda` (see README) or use --device cpu")
            }
            Device::new_cuda(ordinal).with_context(|| format!("--device {s}: cannot open the GPU (is the NVIDIA driver installed?)"))
        }
        _ => bail!("--device {s}: expected cpu, cuda or cuda:N"),
    }
}

/// `f32`, `f16`, `bf16`, or `auto` (f32 on CPU, where candle has no half-precision GEMM; bf16 on GPU).
pub fn parse_dtype(s: &str, device: &Device) -> Result<DType> {
    Ok(match s {
        "auto" => {
            if device.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            }
        }
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        _ => bail!("--dtype {s}: expected f32, f16, bf16 or auto"),
    })
}

/// Peak resident memory of this process so far, in bytes (Linux `VmHWM`; None elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Human-readable bytes.
pub fn fmt_bytes(b: u64) -> String {
    let gib = b as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}
