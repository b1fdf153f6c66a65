//! The binary sizes its thread pools from the cores the process may use (`runtime::tune_threads`,
//! docs/BENCHMARKS.md "Steady under load"): rayon's pool and candle's GEMM split follow the CPU
//! affinity mask, candle's spinning element-wise pool is off, and a user's `RAYON_NUM_THREADS` /
//! `CANDLE_NUM_THREADS` win. Read from `lorafit bench sft --json` (`threads`, `gemm_threads`,
//! `elementwise_threads`).
use std::process::Command;

/// (rayon's threads, candle's GEMM parts, candle's element-wise threads) in a `lorafit bench sft`
/// process on builtin:tiny-gpt2, with `env` set and, when `one_cpu`, the process pinned to one
/// CPU of this test's affinity mask.
fn bench_threads(env: &[(&str, &str)], one_cpu: bool) -> (usize, usize, usize) {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorafit"));
    cmd.args(["bench", "sft", "--model", "builtin:tiny-gpt2", "--batch", "1", "--seq", "16", "--steps", "1", "--targets", "c_attn", "--json"])
        .env_remove("RAYON_NUM_THREADS")
        .env_remove("CANDLE_NUM_THREADS")
        .env("RUST_LOG", "warn")
        .env("LORAFIT_CACHE", cache.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    #[cfg(target_os = "linux")]
    if one_cpu {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let first = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set)).unwrap_or(0);
                libc::CPU_ZERO(&mut set);
                libc::CPU_SET(first, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("cannot run lorafit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lorafit bench sft failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().rfind(|l| l.starts_with('{')).expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let get = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in the JSON: {line}")) as usize;
    (get("threads"), get("gemm_threads"), get("elementwise_threads"))
}

#[test]
fn threads_default_to_the_cores_this_process_may_use() {
    let (n, gemm, elementwise) = bench_threads(&[], false);
    assert_eq!(n, lorafit::runtime::default_threads(), "default thread count");
    let avail = std::thread::available_parallelism().unwrap().get();
    assert!((1..=avail).contains(&n), "{n} threads with {avail} CPUs available");
    assert_eq!(gemm, n, "candle's GEMM split matches rayon's pool");
    assert_eq!(elementwise, 1, "candle's element-wise ops run on the calling thread");
}

#[cfg(target_os = "linux")]
#[test]
fn one_allowed_cpu_means_one_thread() {
    assert_eq!(bench_threads(&[], true), (1, 1, 1), "pinned to one CPU (taskset -c N)");
}

#[test]
fn the_users_thread_settings_win() {
    assert_eq!(bench_threads(&[("RAYON_NUM_THREADS", "3"), ("CANDLE_NUM_THREADS", "2")], false), (3, 3, 2));
}
