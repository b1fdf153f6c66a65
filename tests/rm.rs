//! Reward model: it learns a visible preference, its folder round-trips head included, PEFT
//! gives the same rewards, and bad rankings are refused with file, row and field.
mod common;

use std::path::Path;

use candle_core::Device;
use common::*;
use lorafit::lora::AdapterSet;
use lorafit::reward::{load_reward_adapter, score, RewardHead};
use lorafit::train::config::TrainConfig;
use lorafit::train::rm;
use lorafit::train::Start;

fn config(model: &str, out: &Path, sets: &[&str]) -> TrainConfig {
    let mut all: Vec<String> = vec![
        format!("model.name={:?}", fixture(model).display().to_string()),
        format!("data.path={:?}", fixture("rm_rows.json").display().to_string()),
        format!("out.dir={:?}", out.display().to_string()),
        "data.template=\"Q: {prompt}\\nA:\"".into(),
        "data.max_len=64".into(),
        "train.lr=5e-3".into(),
        "lora.lora_dropout=0.1".into(),
        "train.seed=5".into(),
        "data.eval_fraction=0.25".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &all).unwrap()
}

fn sequences(m: &str) -> Vec<Vec<u32>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(&format!("rm-{m}")).join("sequences.json")).unwrap()).unwrap();
    serde_json::from_value(v["ids"].clone()).unwrap()
}

fn rewards_of(m: &str, dir: &Path, seqs: &[Vec<u32>]) -> Vec<f32> {
    let (adapters, head) = load_reward_adapter(dir, "rm", false).unwrap();
    let model = load(m, AdapterSet::new(adapters));
    let head = RewardHead::from_tensor(head, false, model.arch.hidden_size(), &Device::Cpu).unwrap();
    score(&model, &head, seqs, 1, 4).unwrap()
}

#[test]
fn learns_a_visible_preference_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let s = rm::run(&config("gpt2-a", dir.path(), &["train.epochs=3", "lora.target_modules=[\"c_attn\",\"c_proj\",\"c_fc\"]"]), Start::Fresh).unwrap();
    assert!(s.eval_accuracy.unwrap() > 0.9, "held-out accuracy {:?}", s.eval_accuracy);
    assert!(s.eval_margin.unwrap() > 0.0);
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for k in ["step", "loss", "accuracy", "margin", "eval_accuracy", "eval_margin"] {
        assert!(last.get(k).is_some(), "metrics has {k}");
    }
    // The folder is a PEFT SEQ_CLS adapter with the head as modules_to_save.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    let t = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t["base_model.model.score.weight"].dims(), &[1, 32]);
    // Reloading (twice, through a re-save) gives identical rewards.
    let seqs = sequences("gpt2-a");
    let r1 = rewards_of("gpt2-a", dir.path(), &seqs);
    let again = tempfile::tempdir().unwrap();
    let (adapters, head) = load_reward_adapter(dir.path(), "rm", false).unwrap();
    let _model = load("gpt2-a", AdapterSet::new(adapters.clone()));
    lorafit::peft::save_adapter(&adapters[0], again.path(), "gpt2-a", &[("base_model.model.score.weight".into(), head)]).unwrap();
    assert_eq!(r1, rewards_of("gpt2-a", again.path(), &seqs));
}

#[test]
fn rewards_match_peft_sequence_classification() {
    for (m, targets) in [("gpt2-a", "[\"c_attn\",\"c_proj\",\"c_fc\"]"), ("llama-a", "[\"q_proj\",\"v_proj\",\"o_proj\",\"up_proj\"]")] {
        let committed = fixture(&format!("rm-{m}"));
        let seqs = sequences(m);
        let peft: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(committed.join("peft_rewards.json")).unwrap()).unwrap();
        let ours = rewards_of(m, &committed, &seqs);
        for (i, r) in ours.iter().enumerate() {
            let theirs = peft["rewards"][i].as_f64().unwrap() as f32;
            assert!((r - theirs).abs() < 1e-4, "{m}: sequence {i}: lorafit {r} vs PEFT {theirs}");
        }
        // Batched scoring (padded) equals one at a time.
        let one: Vec<f32> = seqs.iter().flat_map(|s| rewards_of(m, &committed, std::slice::from_ref(s))).collect();
        assert!(max_abs_diff(&ours, &one) < 1e-5);
        // Re-training with the fixture's recipe reproduces the committed tensors.
        let dir = tempfile::tempdir().unwrap();
        rm::run(&config(m, dir.path(), &["train.epochs=2", &format!("lora.target_modules={targets}")]), Start::Fresh).unwrap();
        let a = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let b = candle_core::safetensors::load(committed.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        for (k, t) in &b {
            let d = max_abs_diff(&a[k].flatten_all().unwrap().to_vec1().unwrap(), &t.flatten_all().unwrap().to_vec1().unwrap());
            assert!(d < 1e-5, "{m}: re-trained {k} differs by {d}");
        }
    }
}

#[test]
fn folders_without_a_head_are_refused() {
    let err = format!("{:#}", load_reward_adapter(&fixture("sft-gpt2-a"), "rm", false).err().unwrap());
    assert!(err.contains("no reward head") && err.contains("sft-gpt2-a"), "{err}");
}

#[test]
fn bad_rankings_are_refused_with_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"prompt": "p", "completion_0": "a", "completion_1": "b", "completion_2": "c", "ranking": [0, 1, 2]}"#;
    let cases: &[(&str, &str)] = &[
        (r#"{"prompt": "p", "completion_0": "a", "completion_1": "b", "completion_2": "c", "ranking": [0, 0, 2]}"#, "row 2: field \"ranking\""),
        (r#"{"prompt": "p", "completion_0": "a", "completion_1": "b", "completion_2": "c", "ranking": [0, 1]}"#, "row 2: field \"ranking\" has 2 entries but the row has 3 completions"),
        (r#"{"prompt": "p", "completion_0": "a", "completion_2": "c", "ranking": [0, 1, 2]}"#, "row 2: missing field \"completion_1\""),
        (r#"{"prompt": "p", "completion_0": "a", "completion_1": " ", "ranking": [1, 0]}"#, "row 2: field \"completion_1\" is empty"),
        (r#"{"prompt": "p", "chosen": "same", "rejected": "same"}"#, "row 2: fields \"chosen\" and \"rejected\" are identical"),
        (r#"{"prompt": "p", "completion_0": "a", "completion_1": "b", "ranking": [1, 5]}"#, "row 2: field \"ranking\""),
    ];
    for (i, (bad, want)) in cases.iter().enumerate() {
        let data = dir.path().join(format!("bad{i}.json"));
        std::fs::write(&data, format!("[{ok}, {bad}]")).unwrap();
        let out = dir.path().join(format!("out{i}"));
        let cfg = config("gpt2-a", &out, &[&format!("data.path={:?}", data.display().to_string())]);
        let err = format!("{:#}", rm::run(&cfg, Start::Fresh).unwrap_err());
        assert!(err.contains(&data.display().to_string()) && err.contains(want), "case {i}: {err}");
        assert!(!out.exists(), "case {i}: nothing written");
    }
    // Ties give no pair but are valid; --skip-bad-rows counts bad rows.
    let rows = lorafit::data::read_ranked(&write(&dir, "tie.json", r#"[{"prompt": "p", "completion_0": "a", "completion_1": "b", "completion_2": "c", "ranking": [1, 0, 1]}]"#), false).unwrap().0;
    assert_eq!(rows[0].pairs, vec![(1, 0), (1, 2)]);
    let (rows, skipped) = lorafit::data::read_ranked(&write(&dir, "mixed.jsonl", &format!("{ok}\n{{\"prompt\": \"p\", \"chosen\": \"x\", \"rejected\": \"x\"}}\n")), true).unwrap();
    assert_eq!((rows.len(), skipped), (1, 1));
    assert_eq!(rows[0].pairs.len(), 3, "K = 3 gives C(3,2) pairs");
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn score_command_reads_text_lines_and_json_rows() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("lines.txt");
    std::fs::write(&text, "Q: 사과 이야기 0\nA: 네, 좋아요!\n\nQ: x\nA: 몰라.\n").unwrap();
    let rows = dir.path().join("rows.json");
    std::fs::write(&rows, r#"[{"prompt": "사과 이야기 0", "completion": "네, 좋아요!"}, {"prompt": "x", "completion": "몰라."}]"#).unwrap();
    let run = |data: &Path, template: &str| -> Vec<serde_json::Value> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"))
            .args(["score", "--model", &fixture("gpt2-a").display().to_string(), "--adapter", &fixture("rm-gpt2-a").display().to_string()])
            .args(["--data", &data.display().to_string(), "--template", template, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let lines = run(&text, "");
    assert_eq!(lines.iter().map(|v| v["line"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 4, 5], "empty lines are skipped, numbering kept");
    let json = run(&rows, "Q: {prompt}\nA:");
    assert_eq!(json.len(), 2);
    // JSON rows are scored as template(prompt) + completion + eos: the same as the library does.
    let f = files("gpt2-a");
    let tok = lorafit::tokenizer::Tokenizer::load(&f.tokenizer, &f.config).unwrap();
    let mut ids = tok.encode("Q: 사과 이야기 0\nA:").unwrap();
    ids.extend(tok.encode_plain("네, 좋아요!").unwrap());
    ids.push(tok.eos_id.unwrap());
    let r = rewards_of("gpt2-a", &fixture("rm-gpt2-a"), &[ids])[0];
    assert!((json[0]["reward"].as_f64().unwrap() as f32 - r).abs() < 1e-5);
}
