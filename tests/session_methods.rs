//! What PPO gained by moving onto the training session: the f16 dynamic loss scaler (an f16
//! PPO run logs its loss scale and trains a finite policy), and the session's plot.
mod common;

use std::path::Path;

use common::*;
use lorafit::train::config::TrainConfig;
use lorafit::train::{ppo, Start};

#[test]
fn ppo_on_an_f16_base_trains_with_dynamic_loss_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ppo");
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let sets: Vec<String> = vec![
        format!("model.name={}", q(&fixture("gpt2-a"))),
        "model.dtype=\"f16\"".into(),
        format!("out.dir={}", q(&out)),
        "data.template=\"Q: {prompt}\\nA:\"".into(),
        format!("data.path={}", q(&Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ppo_prompts.json"))),
        format!("ppo.reward_adapter={}", q(&fixture("rm-gpt2-a"))),
        format!("ppo.sft_adapter={}", q(&fixture("sft-gpt2-a"))),
        "ppo.critic_adapter=true".into(),
        "ppo.max_prompt_len=20".into(),
        "ppo.max_new_tokens=6".into(),
        "ppo.minibatch_size=2".into(),
        "train.batch_size=4".into(),
        "train.max_steps=3".into(),
    ];
    let s = ppo::run(&TrainConfig::load(None, &sets).unwrap(), Start::Fresh).unwrap();
    assert_eq!(s.iterations, 3);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for l in &lines {
        assert!(l["loss_scale"].as_f64().unwrap() >= 1.0, "the f16 loss scale is logged: {l}");
        assert!(l["skipped_steps"].as_u64().is_some(), "{l}");
        assert!(l["policy_loss"].as_f64().unwrap().is_finite() && l["value_loss"].as_f64().unwrap().is_finite(), "{l}");
    }
    let a = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    for (k, t) in &a {
        assert_eq!(t.dtype(), candle_core::DType::F32, "{k}: adapters stay f32");
        assert!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()), "{k} is finite");
    }
    assert!(out.join("reward.png").is_file(), "PPO plots reward and KL");
}
