//! A reward model per family, end to end (issue 12): `lorafit rm` re-trains the committed adapter
//! (tests/fixtures/families/<name>/rm/), lorafit's rewards with it equal PEFT's (base as
//! `AutoModelForSequenceClassification` + `PeftModel`, SEQ_CLS, modules_to_save score) and
//! transformers' on lorafit's merged folder (`AutoModelForSequenceClassification.from_pretrained`),
//! and `lorafit merge` writes the folder that was measured: the family's sequence classifier, and
//! for EXAONE 3.5 (no `exaone` classifier in transformers) a LLaMA one with LLaMA's key names.
//! The Python side is scripts/fixtures/family_rm_checks.py (rewards.json, checks.json `rm_merge`).
mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::max_abs_diff;
use lorafit::lora::AdapterSet;
use lorafit::model::Model;
use lorafit::reward::{load_reward_adapter, score, RewardHead};
use lorafit::train::config::TrainConfig;
use lorafit::train::{rm, Start};
use lorafit::weights::ModelFiles;

const FAMILIES: [&str; 12] = ["llama3", "llama-bias", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "gpt_neox", "exaone4", "exaone", "gemma3-mm"];

/// family_rm_checks.py's RM_SETS.
const RM_SETS: [&str; 11] = [
    "data.template=\"Q: {prompt}\\nA:\"", "data.max_len=48", "lora.target_modules=all-linear", "lora.r=4", "lora.lora_alpha=8",
    "lora.lora_dropout=0.0", "train.lr=3e-2", "train.batch_size=4", "train.max_steps=6", "train.seed=5", "data.eval_fraction=0",
];

fn dir(name: &str) -> std::path::PathBuf {
    common::fixture("families").join(name)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn rm_retrains_to_the_committed_adapter() {
    for name in FAMILIES {
        let committed = dir(name).join("rm");
        let sets_used: Vec<String> = serde_json::from_value(json(&committed.join("rewards.json"))["rm_sets"].clone()).unwrap();
        assert_eq!(sets_used, RM_SETS, "{name}: the fixture was made with other settings");
        let tmp = tempfile::tempdir().unwrap();
        let mut sets: Vec<String> = RM_SETS.iter().map(|s| s.to_string()).collect();
        sets.extend([
            format!("model.name={:?}", dir(name).display().to_string()),
            format!("data.path={:?}", common::fixture("rm_rows.json").display().to_string()),
            format!("out.dir={:?}", tmp.path().display().to_string()),
        ]);
        rm::run(&TrainConfig::load(None, &sets).unwrap(), Start::Fresh).unwrap_or_else(|e| panic!("{name}: rm: {e:#}"));
        let ours = candle_core::safetensors::load(tmp.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let theirs = candle_core::safetensors::load(committed.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name}: adapter tensors");
        assert!(theirs.contains_key("base_model.model.score.weight"), "{name}: the score head is in the adapter");
        for (k, t) in &theirs {
            let d = max_abs_diff(&ours[k].flatten_all().unwrap().to_vec1().unwrap(), &t.flatten_all().unwrap().to_vec1().unwrap());
            assert!(d < 1e-5, "{name}: re-trained {k} differs from the fixture by {d}");
        }
    }
}

#[test]
fn rewards_equal_peft_and_transformers_on_the_merged_folder() {
    for name in FAMILIES {
        let committed = dir(name).join("rm");
        let r = json(&committed.join("rewards.json"));
        let (peft, merged, head_only) = (floats(&r["peft"]), floats(&r["transformers_merged"]), floats(&r["base_with_trained_head"]));
        let ids: Vec<Vec<u32>> = serde_json::from_value(json(&dir(name).join("expected.json"))["ids"].clone()).unwrap();
        let (adapters, head) = load_reward_adapter(&committed, "rm", false).unwrap();
        let model = Model::load(&ModelFiles::from_dir(&dir(name), "fixture").unwrap(), DType::F32, &Device::Cpu, AdapterSet::new(adapters)).unwrap();
        let head = RewardHead::from_tensor(head, false, model.arch.hidden_size(), &Device::Cpu).unwrap();
        // Batched with padding (pad id 1, which no line holds): each line at its own last token.
        let ours = score(&model, &head, &ids, 1, 8).unwrap();
        let tol = 1e-4 * peft.iter().fold(1f32, |m, x| m.max(x.abs()));
        for (i, o) in ours.iter().enumerate() {
            assert!((o - peft[i]).abs() < tol, "{name}: line {i}: lorafit {o} vs PEFT {}", peft[i]);
            assert!((o - merged[i]).abs() < tol, "{name}: line {i}: lorafit {o} vs transformers on lorafit's merge {}", merged[i]);
        }
        // The LoRA moves the rewards far past the tolerance: a merge without it would show.
        let effect = max_abs_diff(&peft, &head_only);
        assert!(effect > 100.0 * tol, "{name}: the LoRA moves the rewards by {effect} only");
        // What family_rm_checks.py measured with the `lorafit score` CLI and the loaded merge.
        let c = &json(&dir(name).join("checks.json"))["rm_merge"];
        for k in ["max_lorafit_vs_transformers_merged", "max_lorafit_vs_peft"] {
            assert!(c[k].as_f64().unwrap() < 1e-4 * c["reward_scale"].as_f64().unwrap(), "{name}: {k}: {c}");
        }
        assert_eq!((c["unused_merged_keys"].as_array().unwrap().len(), c["missing_merged_keys"].as_array().unwrap().len()), (0, 0), "{name}: {c}");
    }
}

#[test]
fn merged_reward_model_is_the_folder_transformers_loaded() {
    for name in FAMILIES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let o = lorafit::merge::MergeOptions {
            model: dir(name).display().to_string(),
            adapters: vec![(dir(name).join("rm"), 1.0)],
            out: out.clone(),
            dtype: None,
            force: false,
            max_shard_size: 2_000_000_000,
        };
        lorafit::merge::merge(&o).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let cfg = json(&out.join("config.json"));
        let c = &json(&dir(name).join("checks.json"))["rm_merge"];
        assert_eq!(cfg["architectures"][0], c["transformers_class"], "{name}");
        assert_eq!(cfg["model_type"], c["merged_model_type"], "{name}");
        assert_eq!(cfg["num_labels"], 1);
        let keys: Vec<String> = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap().into_keys().collect();
        assert!(keys.iter().any(|k| k == "score.weight"), "{name}: no score.weight");
        assert!(!keys.iter().any(|k| k.ends_with("lm_head.weight") || k == "embed_out.weight"), "{name}: an LM head in a sequence classifier");
        if name == "exaone" {
            // EXAONE 3.5's original names and aliases became LLaMA's.
            assert_eq!(cfg["model_type"], "llama");
            assert!(keys.iter().all(|k| !k.starts_with("transformer.")), "{keys:?}");
            assert!(keys.contains(&"model.layers.1.self_attn.o_proj.weight".to_string()) && keys.contains(&"model.layers.0.mlp.gate_proj.weight".to_string()), "{keys:?}");
            for k in ["num_layers", "layer_norm_epsilon", "activation_function"] {
                assert!(cfg.get(k).is_none(), "{k} left in {cfg}");
            }
            assert_eq!((cfg["num_hidden_layers"].as_u64(), cfg["rms_norm_eps"].as_f64(), cfg["rope_theta"].as_f64()), (Some(2), Some(1e-5), Some(1e6)));
        }
    }
}

/// EXAONE 3.5 as transformers 5 saves it (`rope_parameters` holding the base, `num_hidden_layers`,
/// no `rope_theta` nor epsilon key: ExaoneConfig's defaults, which differ from LlamaConfig's)
/// merges to a LLaMA config that states them.
#[test]
fn exaone_in_transformers_5_form_merges_with_its_defaults_written_out() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("exaone5");
    std::fs::create_dir(&base).unwrap();
    let mut cfg = json(&dir("exaone").join("config.json"));
    let o = cfg.as_object_mut().unwrap();
    let mut rope = o.remove("rope_scaling").unwrap();
    o.remove("rope_theta");
    rope["rope_theta"] = 1e6.into();
    o.insert("rope_parameters".into(), rope);
    let layers = o.remove("num_layers").unwrap();
    o.insert("num_hidden_layers".into(), layers);
    o.remove("layer_norm_epsilon");
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(dir("exaone").join(f), base.join(f)).unwrap();
    }
    let out = tmp.path().join("merged");
    let o = lorafit::merge::MergeOptions {
        model: base.display().to_string(),
        adapters: vec![(dir("exaone").join("rm"), 1.0)],
        out: out.clone(),
        dtype: None,
        force: false,
        max_shard_size: 2_000_000_000,
    };
    lorafit::merge::merge(&o).unwrap();
    let m = json(&out.join("config.json"));
    assert_eq!((m["model_type"].as_str(), m["architectures"][0].as_str()), (Some("llama"), Some("LlamaForSequenceClassification")));
    assert_eq!(m["rope_parameters"]["rope_theta"].as_f64(), Some(1e6));
    assert_eq!(m["rope_parameters"]["rope_type"], "llama3");
    assert!(m.get("rope_theta").is_none(), "{m}");
    // ExaoneConfig's epsilon (LlamaConfig's default is 1e-6) and token ids, written out.
    assert_eq!((m["rms_norm_eps"].as_f64(), m["num_hidden_layers"].as_u64(), m["pad_token_id"].as_u64()), (Some(1e-5), Some(2), Some(1)));
}
