//! The model families through lorafit's commands: an SFT adapter that PEFT loads with the same
//! NLL, merged folders that transformers loads with the same NLL (scripts/fixtures/family_checks.py),
//! hub-shaped config.json files of each family (exact parameter counts, `configs/sft-llama.toml`'s
//! default), and bad input: unsupported variants, checkpoints that do not match their config,
//! adapters made for another family, `max_position_embeddings` too large (issue 11).
mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use common::max_abs_diff;
use lorafit::lora::AdapterSet;
use lorafit::model::{Arch, Model};
use lorafit::train::config::TrainConfig;
use lorafit::train::{sft, Start};
use lorafit::weights::ModelFiles;

const FAMILIES: [&str; 12] = ["llama3", "llama-bias", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "gpt_neox", "exaone4", "exaone", "gemma3-mm"];

fn dir(name: &str) -> std::path::PathBuf {
    common::fixture("families").join(name)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(name: &str) -> Vec<Vec<u32>> {
    serde_json::from_value(json(&dir(name).join("expected.json"))["ids"].clone()).unwrap()
}

fn load(d: &Path, adapters: AdapterSet) -> anyhow::Result<Model> {
    Model::load(&ModelFiles::from_dir(d, "fixture")?, DType::F32, &Device::Cpu, adapters)
}

fn nll(model: &Model, ids: &[u32]) -> f32 {
    model.sequence_nll(ids).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn sft_adapter_loads_in_peft_with_the_same_nll() {
    for name in FAMILIES {
        let committed = dir(name).join("sft");
        let peft = json(&committed.join("peft_nll.json"));
        let tmp = tempfile::tempdir().unwrap();
        let mut sets: Vec<String> = serde_json::from_value(peft["sets"].clone()).unwrap();
        sets.extend([
            format!("model.name={:?}", dir(name).display().to_string()),
            format!("data.path={:?}", common::fixture("sft_rows.json").display().to_string()),
            format!("out.dir={:?}", tmp.path().display().to_string()),
        ]);
        sft::run(&TrainConfig::load(None, &sets).unwrap(), Start::Fresh).unwrap();
        let ours = candle_core::safetensors::load(tmp.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let theirs = candle_core::safetensors::load(committed.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name}: adapter tensors");
        for (k, t) in &theirs {
            let d = max_abs_diff(&ours[k].flatten_all().unwrap().to_vec1().unwrap(), &t.flatten_all().unwrap().to_vec1().unwrap());
            assert!(d < 1e-5, "{name}: re-trained {k} differs from the fixture by {d}");
        }
        let a = lorafit::peft::load_adapter(&committed, "sft", 1.0, false).unwrap();
        let model = load(&dir(name), AdapterSet::new(vec![a])).unwrap();
        for (i, ids) in ids(name).iter().enumerate() {
            let (ours, theirs) = (nll(&model, ids), peft["nll"][i].as_f64().unwrap() as f32);
            assert!((ours - theirs).abs() < 2e-4, "{name}: line {i}: lorafit {ours} vs PEFT {theirs}");
        }
    }
}

#[test]
fn merged_folder_keeps_the_family_keys_and_the_adapter_nll() {
    for name in FAMILIES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let o = lorafit::merge::MergeOptions {
            model: dir(name).display().to_string(),
            adapters: vec![(dir(name).join("adapter"), 1.0)],
            out: out.clone(),
            dtype: None,
            force: false,
            max_shard_size: 2_000_000_000,
        };
        lorafit::merge::merge(&o).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let keys = |p: &Path| -> std::collections::BTreeSet<String> {
            candle_core::safetensors::load(p.join("model.safetensors"), &Device::Cpu).unwrap().into_keys().collect()
        };
        assert_eq!(keys(&out), keys(&dir(name)), "{name}: the merged folder keeps the checkpoint's own key names");
        let want = candle_core::safetensors::load(dir(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let want: Vec<f32> = want["nll.adapter"].to_vec1().unwrap();
        let merged = load(&out, AdapterSet::none()).unwrap();
        for (i, ids) in ids(name).iter().enumerate() {
            let got = nll(&merged, ids);
            assert!((got - want[i]).abs() < 2e-4, "{name}: merged line {i} NLL {got} vs PEFT unmerged {}", want[i]);
        }
        // transformers loads lorafit's merge with the same logits (measured by family_checks.py).
        let c = json(&dir(name).join("checks.json"));
        assert!(c["merge"]["max_logits_diff"].as_f64().unwrap() < 1e-4 && c["merge"]["max_nll_diff"].as_f64().unwrap() < 2e-4, "{name}: {c}");
    }
}

/// A folder holding only `config` as config.json.
fn config_dir(config: &serde_json::Value) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), config.to_string()).unwrap();
    d
}

fn lorafit(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(args).env("RUST_LOG", "warn").env("HF_HUB_OFFLINE", "1").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn plan_params(config: &serde_json::Value, extra: &[&str]) -> u64 {
    let d = config_dir(config);
    let mut args = vec!["plan", "--model", d.path().to_str().unwrap(), "--json"];
    args.extend(extra);
    let (code, out, err) = lorafit(&args);
    assert_eq!(code, Some(0), "plan failed: {err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["params"].as_u64().unwrap()
}

/// config.json as the hub has it for meta-llama/Llama-3.2-1B (the default of configs/sft-llama.toml).
pub fn llama_3_2_1b() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
        "use_cache": true, "vocab_size": 128256
    })
}

#[test]
fn hub_shaped_configs_parse_with_exact_parameter_counts() {
    // Llama-3.2-1B through configs/sft-llama.toml (its default model): 1,235,814,400 parameters.
    let d = config_dir(&llama_3_2_1b());
    let (code, out, err) = lorafit(&["plan", "--config", "configs/sft-llama.toml", "--model", d.path().to_str().unwrap(), "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["params"].as_u64().unwrap(), 1_235_814_400);
    // Llama-3.1-8B-Instruct lists three eos ids.
    let mut l8 = llama_3_2_1b();
    l8["eos_token_id"] = serde_json::json!([128001, 128008, 128009]);
    let Arch::Decoder(c) = Arch::from_file(&config_dir(&l8).path().join("config.json")).unwrap() else { panic!() };
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.rope.kind, "llama3");
    let qwen3_0_6b = serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
        "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": null,
        "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_sliding_window": false, "vocab_size": 151936});
    assert_eq!(plan_params(&qwen3_0_6b, &[]), 596_049_920);
    let qwen2_5_0_5b = serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "use_sliding_window": false, "vocab_size": 151936});
    assert_eq!(plan_params(&qwen2_5_0_5b, &[]), 494_032_768);
    let gemma3_1b = serde_json::json!({"architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attn_logit_softcapping": null, "bos_token_id": 2,
        "eos_token_id": [1, 106], "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
        "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null,
        "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144});
    assert_eq!(plan_params(&gemma3_1b, &[]), 999_885_952);
    let Arch::Decoder(g) = Arch::from_file(&config_dir(&gemma3_1b).path().join("config.json")).unwrap() else { panic!() };
    let global: Vec<usize> = g.layers.iter().enumerate().filter(|(_, l)| l.window.is_none()).map(|(i, _)| i).collect();
    assert_eq!(global, vec![5, 11, 17, 23], "every 6th layer is global");
    assert_eq!((g.rope.theta, g.rope_local.as_ref().unwrap().theta), (1e6, 1e4));
    let phi3_mini = serde_json::json!({"architectures": ["Phi3ForCausalLM"], "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu",
        "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "pad_token_id": 32000, "rms_norm_eps": 1e-05,
        "rope_scaling": null, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": false, "vocab_size": 32064});
    assert_eq!(plan_params(&phi3_mini, &[]), 3_821_079_552);
    let polyglot_ko_1_3b = serde_json::json!({"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
        "hidden_size": 2048, "intermediate_size": 8192, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neox",
        "num_attention_heads": 16, "num_hidden_layers": 24, "rotary_emb_base": 10000, "rotary_pct": 0.5, "tie_word_embeddings": false,
        "use_parallel_residual": true, "vocab_size": 30080});
    assert_eq!(plan_params(&polyglot_ko_1_3b, &[]), 1_331_810_304);
    let exaone_3_5_2_4b = serde_json::json!({"architectures": ["ExaoneForCausalLM"], "activation_function": "silu", "hidden_size": 2560,
        "intermediate_size": 7168, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 32768, "model_type": "exaone", "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_layers": 30, "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 1000000.0, "tie_word_embeddings": true, "vocab_size": 102400});
    // V·C + 30·(C·(2·2560 + 2·640) + 3·C·7168 + 2C) + C
    assert_eq!(plan_params(&exaone_3_5_2_4b, &[]), 102400 * 2560 + 30 * (2560 * (2 * 2560 + 2 * 640) + 3 * 2560 * 7168 + 2 * 2560) + 2560);
    let exaone4_32b_like = serde_json::json!({"architectures": ["Exaone4ForCausalLM"], "hidden_size": 5120, "intermediate_size": 27392,
        "model_type": "exaone4", "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 8,
        "sliding_window": 4096, "sliding_window_pattern": "LLLG", "vocab_size": 102400, "tie_word_embeddings": false, "rope_theta": 1000000.0});
    let Arch::Decoder(e) = Arch::from_file(&config_dir(&exaone4_32b_like).path().join("config.json")).unwrap() else { panic!() };
    let kinds: Vec<(bool, bool)> = e.layers.iter().map(|l| (l.window.is_some(), l.rope != lorafit::model::family::LayerRope::None)).collect();
    assert_eq!(kinds, [(true, true), (true, true), (true, true), (false, false)].repeat(2), "LLLG: global layers have no rope");
    // `inspect` on a model folder lists what lorafit loads.
    let (code, out, _) = lorafit(&["inspect", dir("gemma3").to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(out.contains("gemma3_text") && out.contains("gpt_neox") && out.contains("exaone4"), "{out}");
}

/// lorafit's error (the whole chain) for loading `config` (edited from `base`'s) over `base`'s weights.
fn load_error(base: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let mut cfg = json(&dir(base).join("config.json"));
    edit(&mut cfg);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(dir(base).join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    match load(tmp.path(), AdapterSet::none()) {
        Ok(_) => panic!("{base}: the edited config loaded: {cfg}"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_has(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}:\n{err}");
    }
}

#[test]
fn unsupported_variants_are_errors_naming_the_key() {
    assert_has(&load_error("llama3", |c| c["rope_scaling"]["rope_type"] = "mrope".into()), &["rope_scaling.rope_type", "mrope", "llama3, yarn"]);
    assert_has(&load_error("llama3", |c| c["rope_scaling"]["mrope_section"] = serde_json::json!([1, 2])), &["rope_scaling.mrope_section"]);
    assert_has(&load_error("llama3", |c| c["attn_logit_softcapping"] = 50.0.into()), &["attn_logit_softcapping", "\"llama\""]);
    assert_has(&load_error("mistral", |c| c["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"])), &["layer_types", "\"mistral\""]);
    assert_has(&load_error("qwen3", |c| c["layer_types"] = serde_json::json!(["full_attention", "chunked_attention"])), &["layer_types[1]", "chunked_attention"]);
    assert_has(&load_error("mistral", |c| c["hidden_act"] = "gelu".into()), &["hidden_act", "gelu", "silu"]);
    assert_has(&load_error("qwen2", |c| drop(c.as_object_mut().unwrap().remove("hidden_size"))), &["hidden_size is missing"]);
    assert_has(&load_error("gemma3", |c| c["use_bidirectional_attention"] = true.into()), &["use_bidirectional_attention"]);
    assert_has(&load_error("llama3", |c| c["max_position_embeddings"] = (u32::MAX as u64 + 9).into()), &["max_position_embeddings = 4294967304", "32-bit"]);
    // An unknown model_type lists what is supported.
    assert_has(&load_error("llama3", |c| c["model_type"] = "mamba".into()), &["\"mamba\" is not supported", "gpt_neox", "qwen3", "gemma3_text", "exaone4", "phi3"]);
}

#[test]
fn checkpoints_that_do_not_match_their_config_are_errors_naming_the_tensor() {
    // Biases present (Qwen2's q/k/v) but a config without them.
    let as_llama = |c: &mut serde_json::Value| {
        c["model_type"] = "llama".into();
        for k in ["sliding_window", "use_sliding_window", "max_window_layers"] {
            c.as_object_mut().unwrap().remove(k);
        }
    };
    assert_has(&load_error("qwen2", as_llama), &["model.layers.0.self_attn.q_proj.bias", "present", "attention_bias"]);
    // Biases absent but attention_bias = true.
    assert_has(&load_error("llama3", |c| c["attention_bias"] = true.into()), &["q_proj.bias", "absent", "attention_bias"]);
    // head_dim not as stored: the tensor and both shapes.
    assert_has(&load_error("llama3", |c| drop(c.as_object_mut().unwrap().remove("head_dim"))), &["model.layers.0.self_attn.q_proj.weight", "[32, 32]", "[48, 32]"]);
    // q/k norms in the checkpoint that the family has not.
    assert_has(&load_error("qwen3", as_llama), &["q_norm.weight", "present"]);
    // An untied config over a tied checkpoint.
    assert_has(&load_error("llama3", |c| c["tie_word_embeddings"] = false.into()), &["lm_head.weight", "tie_word_embeddings"]);
}

#[test]
fn adapters_made_for_another_family_are_refused() {
    for (adapter, model) in [("phi3", "llama3"), ("gpt_neox", "mistral"), ("qwen3", "qwen2")] {
        let a = lorafit::peft::load_adapter(&dir(adapter).join("adapter"), "other", 1.0, false).unwrap();
        let e = load(&dir(model), AdapterSet::new(vec![a])).err().unwrap_or_else(|| panic!("{adapter} adapter loaded on {model}"));
        assert_eq!(lorafit::error::kind_of(&e), Some(lorafit::error::Kind::AdapterModelMismatch), "{adapter} on {model}: {e:#}");
        let err = format!("{e:#}");
        // It names the adapter's own base model (no layer matched) or the tensor and both shapes.
        assert!(err.contains(&format!("families/{adapter}")) || (err.contains(".lora_") && err.contains("has shape")), "{adapter} on {model}: {err}");
    }
}

/// Issue 11: a huge `max_position_embeddings` neither aborts nor is truncated.
#[test]
fn huge_max_position_embeddings_loads_and_too_large_ones_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lines.txt");
    std::fs::write(&data, "The base model stays frozen.\n").unwrap();
    for (max, ok) in [(1_000_000_000u64, true), (u32::MAX as u64 + 9, false)] {
        let d = tmp.path().join(format!("m{max}"));
        std::fs::create_dir(&d).unwrap();
        let mut cfg = json(&dir("llama3").join("config.json"));
        cfg["max_position_embeddings"] = max.into();
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(dir("llama3").join(f), d.join(f)).unwrap();
        }
        let (code, out, err) = lorafit(&["eval", "--model", d.to_str().unwrap(), "--data", data.to_str().unwrap()]);
        if ok {
            assert_eq!(code, Some(0), "max_position_embeddings {max}: {err}");
            assert!(out.to_lowercase().contains("nll") || out.to_lowercase().contains("perplexity"), "{out}");
        } else {
            assert_eq!(code, Some(1), "max_position_embeddings {max}: exit {code:?} (101 = panic, 134 = abort): {err}");
            assert!(err.contains("max_position_embeddings = 4294967304"), "{err}");
        }
    }
}

/// Every family through the reward-model and PPO stages (a few steps each): they finish with
/// finite losses, rewards and KL, and the reward adapter merges into the family's
/// sequence-classification checkpoint.
#[test]
fn rm_and_ppo_run_on_every_family() {
    use lorafit::train::{ppo, rm};
    for name in FAMILIES {
        let tmp = tempfile::tempdir().unwrap();
        let base = |out: &Path, extra: &[String]| -> TrainConfig {
            let mut v = vec![
                format!("model.name={:?}", dir(name).display().to_string()),
                format!("out.dir={:?}", out.display().to_string()),
                "data.template=\"Q: {prompt}\\nA:\"".into(),
                "data.max_len=48".into(),
                "lora.target_modules=all-linear".into(),
                "train.batch_size=4".into(),
            ];
            v.extend(extra.iter().cloned());
            TrainConfig::load(None, &v).unwrap()
        };
        let rm_dir = tmp.path().join("rm");
        let extra = [format!("data.path={:?}", common::fixture("rm_rows.json").display().to_string()), "train.max_steps=2".into(), "data.eval_fraction=0".into()];
        let s = rm::run(&base(&rm_dir, &extra), Start::Fresh).unwrap_or_else(|e| panic!("{name}: rm: {e:#}"));
        assert!(s.final_loss.unwrap().is_finite(), "{name}: rm loss");
        let ppo_dir = tmp.path().join("ppo");
        let extra = [
            format!("ppo.reward_adapter={:?}", rm_dir.display().to_string()),
            format!("data.path={:?}", Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ppo_prompts.json").display().to_string()),
            "ppo.max_prompt_len=16".into(),
            "ppo.max_new_tokens=8".into(),
            "ppo.minibatch_size=4".into(),
            "train.max_steps=1".into(),
        ];
        ppo::run(&base(&ppo_dir, &extra), Start::Fresh).unwrap_or_else(|e| panic!("{name}: ppo: {e:#}"));
        let m = std::fs::read_to_string(ppo_dir.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
        for k in ["reward_mean", "kl_mean"] {
            assert!(last[k].as_f64().is_some_and(f64::is_finite), "{name}: ppo {k} in {last}");
        }
        let out = tmp.path().join("merged-rm");
        let o = lorafit::merge::MergeOptions {
            model: dir(name).display().to_string(),
            adapters: vec![(rm_dir.clone(), 1.0)],
            out: out.clone(),
            dtype: None,
            force: false,
            max_shard_size: 2_000_000_000,
        };
        lorafit::merge::merge(&o).unwrap_or_else(|e| panic!("{name}: merge rm: {e:#}"));
        let arch = json(&out.join("config.json"))["architectures"][0].as_str().unwrap().to_string();
        assert!(arch.ends_with("ForSequenceClassification"), "{name}: {arch}");
    }
}
