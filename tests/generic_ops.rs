//! The `LORAFIT_GENERIC_OPS` test knob (src/ops/mod.rs): every device-specific branch in `src/`
//! is listed in one table, the knob really switches the CPU fast paths off, and in that mode
//! `ops::matmul` refuses the layouts cuBLAS refuses. `.ci/run` runs the op, reference and
//! training tests a second time with the knob on.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lorafit::ops;

fn knob_in_env() -> bool {
    let v = std::env::var(ops::GENERIC_OPS_ENV).unwrap_or_default();
    !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no" | "off")
}

#[test]
fn the_knob_switches_the_cpu_fast_paths_off() {
    let on = knob_in_env();
    assert_eq!(ops::generic_ops(), on, "{} in the environment and ops::generic_ops() disagree", ops::GENERIC_OPS_ENV);
    assert_eq!(ops::fast_cpu(&Device::Cpu), !on, "fast_cpu(cpu) must be the opposite of the knob");
}

/// A column slice of a row-major matrix: CPU GEMM reads it, cuBLAS does not.
#[test]
fn generic_matmul_refuses_layouts_cublas_refuses() {
    let a = Tensor::arange(0f32, 24., &Device::Cpu).unwrap().reshape((4, 6)).unwrap();
    let b = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
    let sliced = a.narrow(1, 0, 3).unwrap(); // (4, 3), strides (6, 1)
    let plain = ops::matmul(&sliced.contiguous().unwrap(), &b).unwrap();
    // Row-major, transposed and batched operands are fine on both devices.
    let bt = b.t().unwrap().contiguous().unwrap().t().unwrap(); // (3, 4) read as a transpose
    let d = (ops::matmul(&sliced.contiguous().unwrap(), &bt).unwrap() - &plain).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    let batched = Tensor::arange(0f32, 48., &Device::Cpu).unwrap().reshape((2, 4, 6)).unwrap();
    ops::matmul(&batched, &batched.transpose(1, 2).unwrap()).unwrap();
    let r = ops::matmul(&sliced, &b);
    if ops::generic_ops() {
        let e = r.expect_err("generic mode must refuse a column-sliced operand, as cuBLAS does").to_string();
        assert!(e.contains("cuBLAS") && e.contains("[4, 3]"), "{e}");
    } else {
        let d = (r.unwrap() - &plain).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "the CPU GEMM reads any strides");
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A raw device test: code that takes a branch because of the device it runs on.
fn is_raw_device_test(code: &str) -> bool {
    let c: String = code.split_whitespace().collect();
    [".is_cpu()", ".is_cuda()", ".is_metal()", "Storage::Cpu", "Storage::Cuda", "Storage::Metal", "Device::Cuda", "Device::Metal", "DeviceLocation", "Device::Cpu=>", "==Device::Cpu", "==&Device::Cpu"]
        .iter()
        .any(|p| c.contains(p))
        || (c.contains("matches!(") && c.contains("Device::Cpu"))
}

/// Every device-specific branch in `src/` is in the table of `src/ops/mod.rs`'s header: raw
/// device tests only in `ops/mod.rs` (the `fast_cpu` helper and candle's backend dispatch) or in
/// a row `(raw N)` with their exact count; every `fast_cpu` caller in a row `(fast_cpu)`.
#[test]
fn every_device_branch_is_in_the_ops_table() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header: Vec<String> = std::fs::read_to_string(root.join("src/ops/mod.rs"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("//! | `src/"))
        .map(String::from)
        .collect();
    assert!(header.len() >= 4, "the device table in src/ops/mod.rs's header is missing");
    let row = |file: &str| header.iter().filter(|l| l.starts_with(&format!("//! | `{file}`"))).cloned().collect::<Vec<_>>();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let mut problems = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(path).unwrap();
        let code_lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
            .filter(|(_, l)| !l.trim().is_empty())
            .collect();
        let raw: Vec<usize> = code_lines.iter().filter(|(_, l)| is_raw_device_test(l)).map(|(i, _)| *i).collect();
        let calls_fast_cpu = code_lines.iter().any(|(_, l)| l.contains("fast_cpu("));
        if rel == "src/ops/mod.rs" {
            continue; // the helper's home
        }
        let rows = row(&rel);
        if !raw.is_empty() {
            let want = format!("(raw {})", raw.len());
            if !rows.iter().any(|r| r.contains(&want)) {
                problems.push(format!(
                    "{rel}: {} raw device test(s) at line(s) {raw:?}: call ops::fast_cpu(device) for a fast path (and keep its generic twin), or list the file in src/ops/mod.rs's table with `{want}`",
                    raw.len()
                ));
            }
        } else if rows.iter().any(|r| r.contains("(raw ")) {
            problems.push(format!("{rel}: listed with raw device tests in src/ops/mod.rs's table, but has none: update the row"));
        }
        if calls_fast_cpu && !rows.iter().any(|r| r.contains("(fast_cpu)")) {
            problems.push(format!("{rel}: calls ops::fast_cpu but has no `(fast_cpu)` row in src/ops/mod.rs's table (name the branch and its generic twin)"));
        }
    }
    // Rows for files that no longer exist are stale.
    for r in &header {
        let file = r.trim_start_matches("//! | `").split('`').next().unwrap();
        if !root.join(file).exists() {
            problems.push(format!("src/ops/mod.rs's table names {file}, which does not exist"));
        }
    }
    assert!(problems.is_empty(), "device-specific branches outside the table:\n{}", problems.join("\n"));
}
