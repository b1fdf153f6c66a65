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

/// Sizes the thread pools from the cores this process may actually use, and keeps them from
/// spinning against each other or against other programs. Call first in `main`, before any thread.
///
/// Why (docs/BENCHMARKS.md, "Steady under load"): besides rayon's pool (GEMM, lorafit's fused
/// ops), candle 0.11 runs its large element-wise ops on a second pool, a barrier pool whose
/// caller *spins* until every worker has checked in, and whose workers spin before parking.
/// On an idle machine that rendezvous is cheap; with one other busy process on a 2-core box the
/// worker waits for a time slice while the caller burns its own, once per op: 40% of a step's
/// samples were these spins, and the step slowed 1.87x where PyTorch's slowed 1.70x (two busy
/// cores: 3.5x against 2.1x). So, unless the user set them:
/// - `CANDLE_NUM_THREADS=1`: candle's element-wise ops run on the calling thread (no barrier
///   pool workers, nothing spins); the parallel work (GEMM, attention, the fused linear and
///   activation ops) stays on rayon, whose idle workers yield briefly and then sleep, and whose
///   caller blocks instead of spinning.
/// - `RAYON_NUM_THREADS` = the cores this process may use: `available_parallelism` (CPU affinity
///   mask, cgroup CPU quota), at most the physical cores (candle's own default, which ignores
///   the affinity mask and the quota). candle sizes its GEMM partition from the same variable,
///   so the partition and rayon's pool agree.
/// Both only change how work is split, never the arithmetic: results are bit-identical.
/// The variables are lorafit's own settings, so [`restore_env`] keeps them from the programs it starts.
pub fn tune_threads() {
    let mut set = Vec::new();
    // Called at the top of `main`, before any other thread exists (set_var is not thread-safe).
    for (var, value) in [("CANDLE_NUM_THREADS", 1), ("RAYON_NUM_THREADS", default_threads())] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, value.to_string());
            set.push(var);
        }
    }
    let _ = SET_BY_TUNE_THREADS.set(set);
}

static SET_BY_TUNE_THREADS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();

/// Removes from `cmd`'s environment the variables [`tune_threads`] set, so that a program lorafit
/// starts (a GRPO reward command) sees the user's environment, not lorafit's thread settings.
pub fn restore_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for var in SET_BY_TUNE_THREADS.get().map_or(&[][..], |v| &v[..]) {
        cmd.env_remove(var);
    }
    cmd
}

/// The threads lorafit uses by default: the cores available to this process (affinity mask and
/// cgroup quota), at most the machine's physical cores (SMT siblings add little to a GEMM).
pub fn default_threads() -> usize {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    available.min(num_cpus::get_physical().max(1)).max(1)
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
