//! PPO: against a reward model that prefers a visible property (Korean words over English
//! ones), reward rises while KL stays non-negative and bounded, deterministically; the four
//! roles share one base in memory; bad inputs fail before any rollout.
mod common;

use std::path::Path;

use common::*;
use lorafit::train::config::TrainConfig;
use lorafit::train::Start;
use lorafit::train::{ppo, rm};

fn sets(model: &str, out: &Path, extra: &[String]) -> Vec<String> {
    let mut v = vec![
        format!("model.name={:?}", fixture(model).display().to_string()),
        format!("out.dir={:?}", out.display().to_string()),
        "data.template=\"Q: {prompt}\\nA:\"".into(),
        "data.max_len=64".into(),
        "lora.target_modules=[\"c_attn\",\"c_fc\"]".into(),
    ];
    v.extend(extra.iter().cloned());
    v
}

/// A reward model on gpt2-a that prefers Korean words (tests/fixtures/rm_ko_rows.json).
fn reward_model(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("rm");
    let extra = [
        format!("data.path={:?}", fixture("rm_ko_rows.json").display().to_string()),
        "train.lr=5e-3".into(),
        "train.epochs=3".into(),
        "data.eval_fraction=0.2".into(),
    ];
    rm::run(&TrainConfig::load(None, &sets("gpt2-a", &out, &extra)).unwrap(), Start::Fresh).unwrap();
    out
}

fn ppo_config(out: &Path, rm: &Path, extra: &[&str]) -> TrainConfig {
    let mut e: Vec<String> = vec![
        format!("ppo.reward_adapter={:?}", rm.display().to_string()),
        format!("data.path={:?}", Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ppo_prompts.json").display().to_string()),
        "ppo.max_prompt_len=20".into(),
        "ppo.max_new_tokens=8".into(),
        "ppo.top_k=0".into(),
        "ppo.kl_coef=0.02".into(),
        "ppo.minibatch_size=8".into(),
        "train.batch_size=16".into(),
        "train.lr=3e-3".into(),
        "train.seed=1".into(),
    ];
    e.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &sets("gpt2-a", out, &e)).unwrap()
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn reward_rises_while_kl_stays_non_negative_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let rm = reward_model(dir.path());
    let out = dir.path().join("ppo");
    ppo::run(&ppo_config(&out, &rm, &["train.max_steps=60"]), Start::Fresh).unwrap();
    let m = metrics(&out);
    assert_eq!(m.len(), 60);
    for k in ["step", "reward_mean", "reward_std", "kl_mean", "policy_loss", "value_loss", "clipfrac", "entropy", "response_len"] {
        assert!(m.iter().all(|l| l[k].as_f64().is_some_and(f64::is_finite)), "every line has a finite {k}");
    }
    let r: Vec<f64> = m.iter().map(|l| l["reward_mean"].as_f64().unwrap()).collect();
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (first, last) = (mean(&r[..10]), mean(&r[50..]));
    assert!(last > first + 0.15, "reward_mean {first:.3} (first 10) -> {last:.3} (last 10)");
    let kl: Vec<f64> = m.iter().map(|l| l["kl_mean"].as_f64().unwrap()).collect();
    assert_eq!(kl[0], 0.0, "policy = reference at the start");
    assert!(kl.iter().all(|&k| (0.0..20.0).contains(&k)), "KL stays in [0, 20): {kl:?}");
    assert!(out.join("adapter_model.safetensors").is_file() && out.join("samples.jsonl").is_file());

    // Same seed, same run (timings and memory aside: the peak RSS is the process's high-water
    // mark, and run b runs in the same process after run a).
    let strip = |v: &serde_json::Value| -> serde_json::Value {
        let mut o = v.as_object().unwrap().clone();
        o.retain(|k, _| !k.starts_with("time_") && !k.starts_with("peak_rss"));
        serde_json::Value::Object(o)
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        ppo::run(&ppo_config(out, &rm, &["train.max_steps=8"]), Start::Fresh).unwrap();
    }
    let (ma, mb): (Vec<_>, Vec<_>) = (metrics(&a).iter().map(strip).collect(), metrics(&b).iter().map(strip).collect());
    assert_eq!(ma, mb, "seeded runs agree");
    assert_eq!(std::fs::read(a.join("adapter_model.safetensors")).unwrap(), std::fs::read(b.join("adapter_model.safetensors")).unwrap());
}

#[test]
fn killed_ppo_resumes_to_the_same_policy() {
    let dir = tempfile::tempdir().unwrap();
    let rm = reward_model(dir.path());
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    ppo::run(&ppo_config(&full, &rm, &["train.max_steps=6", "train.save_every=3"]), Start::Fresh).unwrap();
    // A run stopped after its step-3 checkpoint (max_steps differs, so build it by hand).
    ppo::run(&ppo_config(&cut, &rm, &["train.max_steps=6", "train.save_every=3"]), Start::Fresh).unwrap();
    let ckpts = lorafit::train::checkpoint::list(&cut).unwrap();
    assert_eq!(ckpts.len(), 2);
    std::fs::remove_dir_all(&ckpts[1]).unwrap();
    std::fs::remove_file(cut.join("adapter_model.safetensors")).unwrap();
    ppo::run(&ppo_config(&cut, &rm, &["train.max_steps=6", "train.save_every=3"]), Start::Resume).unwrap();
    assert!(std::fs::read(full.join("adapter_model.safetensors")).unwrap() == std::fs::read(cut.join("adapter_model.safetensors")).unwrap());
    assert_eq!(metrics(&full).len(), metrics(&cut).len());
}

#[test]
fn bad_inputs_fail_before_any_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> String {
        let out = dir.path().join(name);
        let mut e: Vec<String> = vec![
            format!("data.path={:?}", Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ppo_prompts.json").display().to_string()),
            "ppo.max_prompt_len=20".into(),
            "ppo.max_new_tokens=8".into(),
        ];
        e.extend(extra.iter().map(|s| s.to_string()));
        let err = format!("{:#}", ppo::run(&TrainConfig::load(None, &sets("gpt2-a", &out, &e)).unwrap(), Start::Fresh).unwrap_err());
        assert!(!out.exists(), "{name}: nothing written");
        err
    };
    let sft = fixture("sft-gpt2-a").display().to_string();
    let rm = fixture("rm-gpt2-a").display().to_string();
    let err = run("no-rm", &[]);
    assert!(err.contains("reward_adapter"), "{err}");
    let err = run("sft-as-rm", &[&format!("ppo.reward_adapter={sft:?}")]);
    assert!(err.contains("no reward head"), "{err}");
    let err = run("other-base", &[&format!("ppo.reward_adapter={rm:?}"), &format!("ppo.sft_adapter={:?}", fixture("sft-llama-a").display().to_string())]);
    assert!(err.contains("match no layer") || err.contains("another base"), "{err}");
    let err = run("too-long", &[&format!("ppo.reward_adapter={rm:?}"), "ppo.max_prompt_len=60", "ppo.max_new_tokens=32"]);
    assert!(err.contains("context"), "{err}");
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let err = run("empty", &[&format!("ppo.reward_adapter={rm:?}"), &format!("data.path={:?}", empty.display().to_string())]);
    assert!(err.contains("empty"), "{err}");
}
