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
                crate::bail_kind!(crate::error::Kind::NoCuda, "--device {s}: this lorafit was built without CUDA; rebuild with `cargo build --release --features cuda` (see README) or use --device cpu")
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

/// Makes glibc's malloc keep freed memory for reuse instead of returning it to the kernel.
///
/// Why: every candle CPU op returns a fresh buffer. By default glibc `mmap`s each buffer above a
/// (dynamic, at most 32 MiB) threshold and `munmap`s it on free, so every training step faults
/// in and zeroes its activations' worth of new pages: 26% of a step's CPU time in a profile
/// (docs/BENCHMARKS.md). With buffers up to 32 MiB (glibc's maximum) served from the heap and the heap never
/// trimmed, a step reuses the pages of the previous one. Environment variables
/// (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) still override this. No-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str, param: libc::c_int, value: libc::c_int| {
            if std::env::var_os(var).is_none() {
                // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
                unsafe { libc::mallopt(param, value) };
            }
        };
        set("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 32 << 20);
        set("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
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
