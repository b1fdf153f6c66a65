//! `lorafit merge` against PEFT / transformers (fixtures by scripts/fixtures/merge_fixtures.py):
//! merged weights, keys and logits, f16 output, shards, the reward model's seq-cls checkpoint,
//! and the refusals (tied head, existing output, other base, fan_in_fan_out, non-finite, disk).
mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use lorafit::lora::AdapterSet;
use lorafit::merge::{check_disk_space, merge, MergeOptions, MergeReport};
use lorafit::model::Model;
use lorafit::weights::ModelFiles;

fn opts(model: &str, adapters: &[(PathBuf, f64)], out: &Path) -> MergeOptions {
    let model = fixture(model).display().to_string();
    MergeOptions { model, adapters: adapters.to_vec(), out: out.to_path_buf(), dtype: None, force: false, max_shard_size: 2_000_000_000 }
}

/// Every tensor of a model folder's safetensors files (not grads.safetensors).
fn weights(dir: &Path) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("model") && name.ends_with(".safetensors") {
            all.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    all
}

fn keys(m: &HashMap<String, Tensor>) -> BTreeSet<String> {
    m.keys().cloned().collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn reference(m: &str) -> (HashMap<String, Tensor>, serde_json::Value) {
    let d = fixture(&format!("merge-{m}"));
    let t = candle_core::safetensors::load(d.join("expected.safetensors"), &Device::Cpu).unwrap();
    (t, serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap())
}

/// Logits of line 0 from the merged folder loaded by lorafit with no adapters.
fn merged_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let files = ModelFiles::from_dir(dir, "merged").unwrap();
    let model = Model::load(&files, DType::F32, &Device::Cpu, AdapterSet::none()).unwrap();
    logits(&model, ids).concat()
}

fn adapters(m: &str, pair: bool) -> Vec<(PathBuf, f64)> {
    let mut v = vec![(fixture(m).join("adapter"), 1.0)];
    if pair {
        v.push((fixture(m).join("adapter2"), 0.5));
    }
    v
}

/// Merges `variant` ("single" / "pair") and checks weights, keys, logits and config.json.
fn check_variant(m: &str, variant: &str) -> MergeReport {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let r = merge(&opts(m, &adapters(m, variant == "pair"), &out)).unwrap();
    let (exp, info) = reference(m);
    let (base, got) = (weights(&fixture(m)), weights(&out));
    assert_eq!(keys(&got), keys(&base), "{m} {variant}: the merged folder keeps the base's keys");
    let mut merged = 0;
    for (k, t) in &got {
        assert_eq!(t.dtype(), DType::F32);
        match exp.get(&format!("{variant}.{k}")) {
            Some(e) => {
                merged += 1;
                let d = max_abs_diff(&flat(t), &flat(e));
                assert!(d < 1e-5, "{m} {variant}: {k} differs from the reference by {d}");
            }
            None => assert_eq!(flat(t), flat(&base[k]), "{m} {variant}: {k} must be the base's"),
        }
    }
    assert_eq!(merged, r.merged_tensors);
    assert_eq!(merged, exp.keys().filter(|k| k.starts_with(&format!("{variant}."))).count());
    let ids: Vec<u32> = serde_json::from_value(info["ids0"].clone()).unwrap();
    let d = max_abs_diff(&merged_logits(&out, &ids), &flat(&exp[&format!("logits.{variant}")]));
    assert!(d < 1e-4, "{m} {variant}: lorafit's logits on the merged folder differ from transformers' by {d}");
    let d = info["transformers_on_lorafit_merge_max_diff"][variant].as_f64().unwrap();
    assert!(d < 1e-4, "{m} {variant}: transformers on lorafit's merge was off by {d}");
    let cfg = config(&out);
    assert_eq!(cfg["dtype"], "float32");
    assert_eq!(cfg["lorafit_merge"]["adapters"].as_array().unwrap().len(), if variant == "pair" { 2 } else { 1 });
    for f in ["tokenizer.json", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f} copied");
    }
    eprintln!("{m} {variant}: {merged} merged tensors, logits diff {d:.2e}, peak RSS {:?}", r.peak_rss_bytes);
    r
}

#[test]
fn gpt2_single_and_weighted_pair() {
    check_variant("gpt2-a", "single");
    check_variant("gpt2-a", "pair");
}

#[test]
fn llama_single_and_weighted_pair_with_untied_lm_head() {
    check_variant("llama-a", "single");
    check_variant("llama-a", "pair");
    assert!(reference("llama-a").0.contains_key("pair.lm_head.weight"), "adapter2 has a LoRA on the untied head");
}

#[test]
fn f16_output() {
    for m in ["gpt2-a", "llama-a"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("f16");
        merge(&MergeOptions { dtype: Some(DType::F16), ..opts(m, &adapters(m, false), &out) }).unwrap();
        let (exp, info) = reference(m);
        for (k, t) in weights(&out) {
            assert_eq!(t.dtype(), DType::F16, "{k}");
            if let Some(e) = exp.get(&format!("single.{k}")) {
                for (x, y) in flat(&t).iter().zip(flat(e)) {
                    assert!((x - y).abs() <= 5e-4 * y.abs() + 1e-7, "{m} f16 {k}: {x} vs {y}: more than f16 rounding");
                }
            }
        }
        assert_eq!(config(&out)["dtype"], "float16");
        let ids: Vec<u32> = serde_json::from_value(info["ids0"].clone()).unwrap();
        let d = max_abs_diff(&merged_logits(&out, &ids), &flat(&exp["logits.single_f16"]));
        assert!(d < 1e-4, "{m}: f16 merge, lorafit vs transformers logits differ by {d}");
    }
}

#[test]
fn sharded_output_loads_like_one_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sharded");
    let r = merge(&MergeOptions { max_shard_size: 50_000, ..opts("llama-a", &adapters("llama-a", false), &out) }).unwrap();
    assert!(r.files.len() > 2, "{:?}", r.files);
    assert_eq!(r.files[0], format!("model-00001-of-{:05}.safetensors", r.files.len()));
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(r.bytes));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), r.tensors);
    let (exp, info) = reference("llama-a");
    let ids: Vec<u32> = serde_json::from_value(info["ids0"].clone()).unwrap();
    assert!(max_abs_diff(&merged_logits(&out, &ids), &flat(&exp["logits.single"])) < 1e-4);
}

#[test]
fn reward_model_becomes_a_sequence_classification_checkpoint() {
    for (m, arch) in [("gpt2-a", "GPT2ForSequenceClassification"), ("llama-a", "LlamaForSequenceClassification")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("rm");
        let rm = fixture(&format!("rm-{m}"));
        let r = merge(&opts(m, &[(rm.clone(), 1.0)], &out)).unwrap();
        assert!(r.sequence_classification);
        let cfg = config(&out);
        assert_eq!(cfg["architectures"], serde_json::json!([arch]));
        assert_eq!(cfg["num_labels"], 1);
        assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0"}));
        let got = weights(&out);
        let mut want = keys(&weights(&fixture(m)));
        want.remove("lm_head.weight"); // llama-a's untied head is not part of a seq-cls model
        want.insert("score.weight".into());
        assert_eq!(keys(&got), want);
        let adapter = candle_core::safetensors::load(rm.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let head = &adapter[lorafit::reward::SCORE_KEY];
        assert_eq!(got["score.weight"].dims(), head.dims());
        assert_eq!(flat(&got["score.weight"]), flat(head), "score.weight is the adapter's head");
        let d = reference(m).1["transformers_on_lorafit_merge_max_diff"]["reward"].as_f64().unwrap();
        assert!(d < 1e-4, "{m}: transformers' rewards on lorafit's merge vs PEFT's: {d}");
    }
}

/// Writes a PEFT adapter folder targeting `modules` with the given LoRA tensors.
fn write_adapter(dir: &Path, modules: &[&str], fan_in_fan_out: bool, tensors: Vec<(String, Tensor)>) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": modules, "fan_in_fan_out": fan_in_fan_out});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    lorafit::io::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, HashMap::new()).unwrap();
}

fn lm_head_lora(hidden: usize) -> Vec<(String, Tensor)> {
    let a = Tensor::ones((2, hidden), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::ones((400, 2), DType::F32, &Device::Cpu).unwrap();
    vec![(lorafit::lora::peft_key("lm_head", "lora_A"), a), (lorafit::lora::peft_key("lm_head", "lora_B"), b)]
}

fn merge_err(o: &MergeOptions) -> String {
    let e = format!("{:#}", merge(o).expect_err("merge must fail"));
    assert!(!o.out.exists(), "nothing written at {} after: {e}", o.out.display());
    e
}

#[test]
fn tied_head_adapter_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (m, hidden) in [("gpt2-a", 32), ("llama-b", 48)] {
        let a = tmp.path().join(format!("head-{m}"));
        write_adapter(&a, &["lm_head"], false, lm_head_lora(hidden));
        let e = merge_err(&opts(m, &[(a, 1.0)], &tmp.path().join("out")));
        assert!(e.contains("lm_head") && e.contains("tied to the input embeddings"), "{e}");
    }
}

#[test]
fn existing_output_is_refused_unless_force() {
    // Issue 11: --force replaces only an earlier merge (lorafit's marker), never other files.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    let a = fixture("gpt2-a").join("adapter");
    let run = |force: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"));
        cmd.args(["merge", "--model", &fixture("gpt2-a").display().to_string(), "--adapter", &a.display().to_string()]);
        cmd.args(["--out", &out.display().to_string()]).args(force.then_some("--force"));
        cmd.output().unwrap()
    };
    for force in [false, true] {
        let o = run(force);
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("was not written by lorafit"), "{o:?}");
        assert!(out.join("keep.txt").is_file() && !out.join("model.safetensors").exists());
    }
    // An earlier merge: refused without --force, replaced with it (files of the user's stay).
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    assert!(run(false).status.success());
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = run(false);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists (an earlier lorafit merge); pass --force"), "{o:?}");
    let o = run(true);
    assert!(o.status.success(), "{o:?}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["merged_tensors"], 8);
    assert!(out.join("keep.txt").is_file() && out.join("model.safetensors").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary folders left: {leftovers:?}");
    let inside: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(inside.iter().all(|n| !n.contains("merge-tmp")), "no temporary folders left: {inside:?}");
}

#[test]
fn bad_inputs_are_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Trained on another base: gpt2-a's adapter on gpt2-b (n_embd 36, not 32).
    let e = merge_err(&opts("gpt2-b", &adapters("gpt2-a", false), &out));
    assert!(e.contains("has shape [4, 32], the model needs [4, 36]"), "{e}");
    // Targets that match nothing: a LLaMA adapter on GPT-2.
    let e = merge_err(&opts("gpt2-a", &adapters("llama-a", false), &out));
    assert!(e.contains("match no layer of this model"), "{e}");
    // Stacked adapters that disagree on the layer layout.
    let flipped = tmp.path().join("flipped");
    std::fs::create_dir(&flipped).unwrap();
    let src = fixture("gpt2-a").join("adapter2");
    std::fs::copy(src.join("adapter_model.safetensors"), flipped.join("adapter_model.safetensors")).unwrap();
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    std::fs::write(flipped.join("adapter_config.json"), text.replace("\"fan_in_fan_out\": true", "\"fan_in_fan_out\": false")).unwrap();
    let e = merge_err(&opts("gpt2-a", &[(fixture("gpt2-a").join("adapter"), 1.0), (flipped, 1.0)], &out));
    assert!(e.contains("fan_in_fan_out = false") && e.contains("Conv1D") && e.contains("nor stacked with"), "{e}");
    // A reward model whose stack is also passed explicitly would be merged twice.
    let rm = tmp.path().join("rm");
    std::fs::create_dir(&rm).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("rm-gpt2-a").join(f), rm.join(f)).unwrap();
    }
    lorafit::peft::write_stack(&rm, &[fixture("gpt2-a").join("adapter2")]).unwrap();
    let e = merge_err(&opts("gpt2-a", &[(fixture("gpt2-a").join("adapter2"), 1.0), (rm.clone(), 1.0)], &out));
    assert!(e.contains("merged twice"), "{e}");
    // ... and merges with its stack when passed alone.
    let r = merge(&opts("gpt2-a", &[(rm, 1.0)], &out)).unwrap();
    assert_eq!(config(&out)["lorafit_merge"]["adapters"][0]["stacked_under"].as_str().map(|s| s.ends_with("rm")), Some(true));
    assert!(r.sequence_classification);
    std::fs::remove_dir_all(&out).unwrap();
    // Values that overflow the output dtype: caught before anything is written.
    let big = tmp.path().join("big");
    let t = candle_core::safetensors::load(fixture("gpt2-a").join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    std::fs::create_dir(&big).unwrap();
    std::fs::copy(fixture("gpt2-a").join("adapter/adapter_config.json"), big.join("adapter_config.json")).unwrap();
    let t: Vec<(String, Tensor)> = t.into_iter().map(|(k, v)| (k, (v * 1e4).unwrap())).collect();
    lorafit::io::write_safetensors(&big.join("adapter_model.safetensors"), &t, HashMap::new()).unwrap();
    let e = merge_err(&MergeOptions { dtype: Some(DType::F16), ..opts("gpt2-a", &[(big, 1.0)], &out) });
    assert!(e.contains("non-finite"), "{e}");
    // Not enough disk: the check merge runs before writing.
    let e = format!("{:#}", check_disk_space(tmp.path(), 1 << 62).unwrap_err());
    assert!(e.contains("not enough disk space"), "{e}");
    check_disk_space(tmp.path(), 1).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(leftovers.iter().all(|n| !n.contains("merge-tmp")), "temporary folder left: {leftovers:?}");
}
