//! The training session refactor changes no number: short seeded SFT, RM and PPO runs on the
//! fixture GPT-2 give exactly the adapters and metrics recorded before the refactor (sha256 of
//! `adapter_model.safetensors`, of `samples.jsonl`, and of the metrics lines with their timing
//! and memory fields removed). The runs cover accumulation across an epoch boundary, LoRA
//! dropout, the f16 loss scaler, eval and checkpoints, the reward head, and PPO with and
//! without a critic adapter, an entropy bonus, the adaptive KL and activation checkpointing.
//!
//! The hashes were recorded on an x86-64 CPU with AVX-512 (gemm picks its kernels at run time,
//! and other kernels sum in another order); on a CPU without it, the runs are checked to be
//! deterministic instead (two runs, same hashes). `RECORD=1` prints the hashes.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use lorafit::train::config::TrainConfig;
use lorafit::train::{ppo, rm, sft, Start};
use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of the metrics lines, each with sorted keys and without timings or memory.
fn metrics_sha(out: &Path) -> String {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut canon = String::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let m: BTreeMap<String, serde_json::Value> = v
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !(k.starts_with("time_") || k.starts_with("peak_rss") || *k == "tokens_per_s" || *k == "elapsed_s"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        canon.push_str(&serde_json::to_string(&m).unwrap());
        canon.push('\n');
    }
    sha(canon.as_bytes())
}

fn digest(out: &Path) -> String {
    let mut s = format!("adapter {} metrics {}", sha(&std::fs::read(out.join("adapter_model.safetensors")).unwrap()), metrics_sha(out));
    if let Ok(samples) = std::fs::read(out.join("samples.jsonl")) {
        s.push_str(&format!(" samples {}", sha(&samples)));
    }
    s
}

fn base(model: &str, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut v: Vec<String> = vec![
        format!("model.name={:?}", fixture(model).display().to_string()),
        format!("out.dir={:?}", out.display().to_string()),
        "data.template=\"Q: {prompt}\\nA:\"".into(),
        "data.max_len=64".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &v).unwrap()
}

fn s(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// (name, digest) of every case, run in `dir`.
fn run_all(dir: &Path) -> Vec<(&'static str, String)> {
    let mut got = vec![];
    let sft_data = format!("data.path={}", s(&fixture("sft_rows.json")));
    let out = dir.join("sft");
    sft::run(
        &base("gpt2-a", &out, &[&sft_data, "lora.target_modules=[\"c_attn\",\"c_fc\"]", "lora.lora_dropout=0.1", "train.batch_size=3",
            "train.grad_accum=2", "train.max_steps=5", "train.eval_every=2", "train.save_every=2", "train.lr=3e-3", "train.seed=11",
            "data.eval_fraction=0.2", "train.warmup_steps=2"]),
        Start::Fresh,
    )
    .unwrap();
    got.push(("sft", digest(&out)));

    let out = dir.join("sft-f16");
    sft::run(
        &base("gpt2-a", &out, &[&sft_data, "model.dtype=\"f16\"", "train.batch_size=4", "train.max_steps=3", "train.lr=5e-3",
            "train.grad_checkpointing=true", "train.seed=3"]),
        Start::Fresh,
    )
    .unwrap();
    got.push(("sft-f16", digest(&out)));

    let out = dir.join("rm");
    rm::run(
        &base("gpt2-a", &out, &[&format!("data.path={}", s(&fixture("rm_ko_rows.json"))), "lora.target_modules=[\"c_attn\"]",
            "train.batch_size=2", "train.grad_accum=2", "train.max_steps=4", "train.lr=5e-3", "train.eval_every=2",
            "data.eval_fraction=0.2", "train.seed=7"]),
        Start::Fresh,
    )
    .unwrap();
    got.push(("rm", digest(&out)));

    let prompts = format!("data.path={}", s(&Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ppo_prompts.json")));
    let rm_dir = format!("ppo.reward_adapter={}", s(&fixture("rm-gpt2-a")));
    let sft_dir = format!("ppo.sft_adapter={}", s(&fixture("sft-gpt2-a")));
    let common = [prompts.as_str(), rm_dir.as_str(), "ppo.max_prompt_len=20", "ppo.max_new_tokens=6", "ppo.top_k=0",
        "ppo.minibatch_size=4", "train.batch_size=6", "train.lr=3e-3", "train.seed=1", "ppo.sample_every=2"];
    let out = dir.join("ppo");
    let mut a: Vec<&str> = common.to_vec();
    a.extend(["lora.target_modules=[\"c_attn\",\"c_fc\"]", "train.max_steps=4", "ppo.kl_coef=0.05", "train.save_every=2"]);
    ppo::run(&base("gpt2-a", &out, &a), Start::Fresh).unwrap();
    got.push(("ppo", digest(&out)));

    let out = dir.join("ppo-critic");
    let mut a: Vec<&str> = common.to_vec();
    a.extend([sft_dir.as_str(), "train.max_steps=3", "ppo.critic_adapter=true", "ppo.ent_coef=0.01", "ppo.target_kl=0.01",
        "ppo.kl_horizon=100", "ppo.reward_normalize=\"batch\"", "train.grad_checkpointing=true", "ppo.ppo_epochs=1"]);
    ppo::run(&base("gpt2-a", &out, &a), Start::Fresh).unwrap();
    got.push(("ppo-critic", digest(&out)));
    got
}

/// Recorded before the refactor (commit 7651e9c's loops) on an AVX-512 CPU.
const EXPECTED: &[(&str, &str)] = &[
    ("sft", "adapter ce0fcf1558cebfbde99297e486b7bb7cfea45275cc8d32444cff8bc5b412d43f metrics 0e85a2080e2f84fe16df58396ba12fe8a5417f4886da1d62b0591d6edf8c33d4"),
    ("sft-f16", "adapter d5b06050c3bb0f2a3a204cd33b5b4ce343cd8e226c4d5fe7a838006b7ff0bfcb metrics b5df41ba0177437d6c227c79d774fa43b24b1e63d13690615d515d17342184f0"),
    ("rm", "adapter 3058dbbcb6a44d383838809a8686ace5a8e6bf32b49a2e2c2a4dcd2f147fc4bc metrics 2b9c459b6b86948e6b19d48ef0c3b065c0c1e3ce334f2553fa122f18723d7225"),
    ("ppo", "adapter f340bd98152ef6d21bca84173275166ecd4bb4c941fac2c9150d3df7a50d695f metrics 598d2acb40ddb7adad074221dceb64cc033890d32bd928f2fe3fb00c54dde6cb samples f7ab9148c0f2c8a9721cec8c6ea29a7f38f5812052495473a6631735965e3cb2"),
    ("ppo-critic", "adapter 51cdcff416ae0f017807294de7e666de5409777952b5e4e7d3245e20df5530d0 metrics 1a8d8723cfad2a15ef1c71cc4592a127fd5570bf43ade80810cb06cf3ec06743 samples 0abe1bd592f20bcf08c63970ec11ee528439bd7d07f6f0b3c5eac7f2d60368c6"),
];

#[test]
fn session_refactor_changes_no_number() {
    let dir = tempfile::tempdir().unwrap();
    let got = run_all(dir.path());
    if std::env::var_os("RECORD").is_some() {
        for (k, v) in &got {
            eprintln!("    (\"{k}\", \"{v}\"),");
        }
    }
    let avx512 = cfg!(target_arch = "x86_64") && {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    };
    if avx512 {
        assert_eq!(got.len(), EXPECTED.len());
        for ((k, v), (ek, ev)) in got.iter().zip(EXPECTED) {
            assert_eq!(k, ek);
            assert_eq!(v, ev, "{k}: the outputs differ from the recorded ones");
        }
    } else {
        eprintln!("no AVX-512 here: the recorded hashes do not apply; checking that the runs are deterministic");
        let dir2 = tempfile::tempdir().unwrap();
        assert_eq!(got, run_all(dir2.path()));
    }
}
