//! `lorafit bench sft --profile` (src/prof.rs, src/train/bench.rs): the profile of one step runs,
//! its kinds sum to at most each phase's wall time, each kind's GEMM FLOPs equal the analytic
//! count for the shape (2·m·n·k per GEMM of GPT-2's forward and written-out backward), and the
//! profiler changes no number: the steps' losses and the adapter are bit-identical with and
//! without it. Tiny builtin model (2 layers, 64 wide, vocab 257), a few seconds in release.
use std::process::Command;

use lorafit::train::bench::{bench_sft, StepBench};
use serde_json::Value;

const MODEL: &str = "builtin:tiny-gpt2";
// tiny-gpt2's shape (src/builtin.rs): C, layers, vocab, MLP width 4C.
const C: u64 = 64;
const L: u64 = 2;
const V: u64 = 257;
const F: u64 = 4 * C;
const R: u64 = 8;

fn lorafit(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(args).env("RUST_LOG", "warn").env("RAYON_NUM_THREADS", "2").output().unwrap();
    assert!(out.status.success(), "lorafit {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// GEMM FLOPs of one SFT step of GPT-2 per (phase, kind), B x T tokens, every token but the first
/// learned, LoRA rank R on `targets` (c_attn must be one: then every block's backward runs).
fn analytic(b: u64, t: u64, targets: &[&str]) -> Vec<(&'static str, &'static str, u64)> {
    let n = b * t;
    // (name, in, out) of a block's linears; c_proj matches both projections, as PEFT's names do.
    let linears = [("c_attn", C, 3 * C), ("c_proj", C, C), ("c_fc", C, F), ("c_proj", F, C)];
    let (mut fwd_frozen, mut bwd_frozen, mut fwd_lora, mut bwd_lora) = (0, 0, 0, 0);
    for layer in 0..L {
        for (name, i, o) in linears {
            // Block 0's c_attn reads the embeddings (frozen): no input gradient there.
            let need_dx = !(layer == 0 && name == "c_attn");
            fwd_frozen += 2 * n * i * o;
            if need_dx {
                bwd_frozen += 2 * n * o * i;
            }
            if targets.contains(&name) {
                fwd_lora += 2 * n * i * R + 2 * n * R * o; // z = u Aᵀ, z Bᵀ
                bwd_lora += 2 * n * o * R + 2 * R * n * i + 2 * o * n * R; // gz = g B, dA = gzᵀ u, dB = gᵀ z
                if need_dx {
                    bwd_lora += 2 * n * R * i; // gz A
                }
            }
        }
    }
    let m = b * (t - 1); // learned tokens
    vec![
        ("forward", "frozen_gemm", fwd_frozen),
        ("forward", "lora", fwd_lora),
        ("forward", "attention", L * 4 * b * t * t * C), // Q Kᵀ, P V
        ("forward", "loss_head", 4 * m * C * V),         // logits h W, and dh = (p - onehot) Wᵀ kept for the backward
        ("forward", "other", 0),
        ("backward", "frozen_gemm", bwd_frozen),
        ("backward", "lora", bwd_lora),
        ("backward", "attention", L * 8 * b * t * t * C), // dV, dP, dQ, dK
        ("backward", "loss_head", 0),
        ("backward", "other", 0),
        ("optimizer", "optimizer", 0),
    ]
}

fn check_profile(p: &Value, b: u64, t: u64, targets: &[&str]) {
    assert!(p["gemm_peak_gflops"].as_f64().unwrap() > 0.0, "no GEMM peak: {p}");
    let phases = p["phases"].as_array().unwrap();
    assert_eq!(phases.iter().map(|ph| ph["phase"].as_str().unwrap()).collect::<Vec<_>>(), ["forward", "backward", "optimizer"]);
    for ph in phases {
        let wall = ph["wall_ms"].as_f64().unwrap();
        assert!(wall > 0.0 && ph["cpu_ms"].as_f64().unwrap() >= 0.0, "{ph}");
        let cats = ph["cats"].as_array().unwrap();
        let sum: f64 = cats.iter().map(|c| c["ms"].as_f64().unwrap()).sum();
        let claimed: f64 = cats.iter().filter(|c| c["cat"] != "other").map(|c| c["ms"].as_f64().unwrap()).sum();
        assert!(claimed <= wall * (1.0 + 1e-9) && sum <= wall * (1.0 + 1e-9) + 1e-6, "phase {}: kinds sum to {sum} ms ({claimed} ms claimed), wall {wall} ms", ph["phase"]);
    }
    let step: f64 = phases.iter().map(|ph| ph["wall_ms"].as_f64().unwrap()).sum();
    assert!((p["step_ms"].as_f64().unwrap() - step).abs() < 1e-6);
    for (phase, cat, want) in analytic(b, t, targets) {
        let ph = phases.iter().find(|ph| ph["phase"] == phase).unwrap();
        let c = ph["cats"].as_array().unwrap().iter().find(|c| c["cat"] == cat).unwrap_or_else(|| panic!("no {phase}/{cat} in {ph}"));
        assert_eq!(c["flops"].as_u64().unwrap(), want, "{phase} {cat}: GEMM FLOPs (targets {targets:?}, {b} x {t})");
    }
    // Every GEMM of the step is in a kind of ours: none left to "other".
    let opt = phases.iter().find(|ph| ph["phase"] == "optimizer").unwrap();
    assert!(opt["cats"].as_array().unwrap().iter().any(|c| c["cat"] == "optimizer" && c["calls"].as_u64().unwrap() == 1), "{opt}");
}

#[test]
fn profile_runs_and_counts_the_flops_of_the_shape() {
    for (targets, b, t) in [("c_attn", 2, 32), ("c_attn,c_proj,c_fc", 1, 48)] {
        let (bs, ts) = (b.to_string(), t.to_string());
        let out = lorafit(&["bench", "sft", "--model", MODEL, "--batch", &bs, "--seq", &ts, "--targets", targets, "--steps", "1", "--profile", "--json"]);
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"));
        assert!(v["step_s_median"].as_f64().unwrap() > 0.0);
        check_profile(&v["profile"], b, t, &targets.split(',').collect::<Vec<_>>());
    }
    // The table in text mode, after the usual line.
    let text = lorafit(&["bench", "sft", "--model", MODEL, "--batch", "1", "--seq", "16", "--steps", "1", "--profile"]);
    assert!(text.starts_with("sft step ") && text.contains("| forward | frozen linear GEMMs |") && text.contains("% of GEMM peak"), "{text}");
}

#[test]
fn without_profile_the_output_is_unchanged() {
    let out = lorafit(&["bench", "sft", "--model", MODEL, "--batch", "1", "--seq", "16", "--steps", "1", "--json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v.get("profile").is_none() && v.get("losses").is_none() && v.get("adapter_after").is_none(), "{v}");
    let text = lorafit(&["bench", "sft", "--model", MODEL, "--batch", "1", "--seq", "16", "--steps", "1"]);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("sft step "), "{text}");
}

/// The same three steps (warm-up, timed, then profiled or timed) give the same losses and adapter,
/// bit for bit, with the profiler on for the third and without it.
#[test]
fn profiling_changes_no_number() {
    for checkpointing in [false, true] {
        let mut b = StepBench {
            model: MODEL.into(),
            dtype: "f32".into(),
            device: "cpu".into(),
            quantize: "none".into(),
            batch: 2,
            seq: 24,
            steps: 1,
            r: 8,
            targets: vec![],
            grad_checkpointing: checkpointing,
            profile: true,
        };
        b.check("sft", Some("c_attn,c_fc")).unwrap();
        let with = bench_sft(&b).unwrap();
        assert!(with.profile.is_some());
        b.profile = false;
        b.steps = 2;
        let without = bench_sft(&b).unwrap();
        assert!(without.profile.is_none());
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(with.losses.len(), 3);
        assert_eq!(bits(&with.losses), bits(&without.losses), "checkpointing {checkpointing}: losses {:?} vs {:?}", with.losses, without.losses);
        assert_eq!(with.adapter_after.len(), without.adapter_after.len());
        for (a, b) in with.adapter_after.iter().zip(&without.adapter_after) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len(), "checkpointing {checkpointing}: the adapter differs");
        }
    }
}
