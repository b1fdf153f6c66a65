//! Shared helpers for the integration tests: fixture paths and the `expected.json` schema
//! written by `scripts/fixtures/make_fixtures.py`.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorafit::lora::AdapterSet;
use lorafit::model::Model;
use lorafit::weights::ModelFiles;
use serde::Deserialize;

pub const MODELS: [&str; 4] = ["gpt2-a", "gpt2-b", "llama-a", "llama-b"];

#[derive(Deserialize)]
pub struct Outputs {
    pub nll: Vec<f64>,
    /// Full-vocab logits at every position of line 0: (T0, V).
    pub logits0: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
pub struct Gen {
    pub prompts_ids: Vec<Vec<u32>>,
    pub pad_id: u32,
    pub max_new_tokens: usize,
    pub base_greedy: Vec<Vec<u32>>,
    pub adapter_greedy: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
pub struct Expected {
    pub lines: Vec<String>,
    pub ids: Vec<Vec<u32>>,
    pub base: Outputs,
    pub adapter: Outputs,
    pub scaling: f64,
    pub generate: Gen,
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn expected(name: &str) -> Expected {
    let p = fixture(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn files(name: &str) -> ModelFiles {
    ModelFiles::from_dir(&fixture(name), name).unwrap()
}

/// The fixture model in f32 on the CPU with the given adapters.
pub fn load(name: &str, adapters: AdapterSet) -> Model {
    Model::load(&files(name), DType::F32, &Device::Cpu, adapters).unwrap()
}

/// The fixture model with its PEFT adapter (frozen, or trainable Vars).
pub fn load_with_adapter(name: &str, trainable: bool) -> Model {
    let a = lorafit::peft::load_adapter(&fixture(name).join("adapter"), "fixture", 1.0, trainable).unwrap();
    load(name, AdapterSet::new(vec![a]))
}

/// Largest |a - b| over two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Logits (T, V) of an unpadded sequence.
pub fn logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&x).unwrap().squeeze(0).unwrap().to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

/// `../shared/assets/<rel>` if present (CI and the dev machines have it; a bare clone may not).
pub fn shared_asset(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/assets").join(rel);
    if p.exists() {
        Some(p)
    } else if std::env::var("CI").is_ok() {
        panic!("{} is absent: CI must run with ../shared beside the repo", p.display())
    } else {
        eprintln!("SKIPPED: {} is absent (tests that read ../shared/assets need it)", p.display());
        None
    }
}

/// Starts `lorafit args` and SIGKILLs it once `out` holds a checkpoint (checking every
/// `poll`), before it finished: the first half of the resume tests, whose resumed run must
/// reach the uninterrupted run's adapter.
pub fn kill_at_first_checkpoint(args: &[String], out: &Path, poll: std::time::Duration) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit")).args(args).env("RUST_LOG", "warn").spawn().unwrap();
    let t0 = std::time::Instant::now();
    while lorafit::train::checkpoint::list(out).unwrap().is_empty() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(poll);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.join("summary.json").exists(), "the run was killed before finishing");
}
