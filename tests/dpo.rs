//! `lorafit dpo`: the losses and their gradients against TRL's own functions (fixture numbers
//! from `scripts/fixtures/dpo_fixture.py`), the first step's loss is ln 2, a stories260K run
//! raises the accuracy on its pairs, a SIGKILLed run resumes to the same adapter, the adapter
//! loads in PEFT with the same NLL, and bad input is counted or refused before anything is written.
mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use lorafit::lora::AdapterSet;
use lorafit::train::config::TrainConfig;
use lorafit::train::dpo;
use lorafit::train::dpo_math::{pair_losses, LossParams, LossType, PairLogps};
use lorafit::train::Start;
use serde_json::Value;

fn config(out: &Path, sets: &[&str]) -> TrainConfig {
    let mut all: Vec<String> = vec![
        format!("model.name={:?}", fixture("gpt2-a").display().to_string()),
        format!("data.path={:?}", fixture("dpo/pairs.jsonl").display().to_string()),
        format!("out.dir={:?}", out.display().to_string()),
        "data.template=\"Q: {prompt}\\nA:\"".into(),
        "data.max_len=64".into(),
        "data.eval_fraction=0".into(),
        "lora.target_modules=[\"c_attn\", \"c_proj\", \"c_fc\"]".into(),
        "train.lr=5e-3".into(),
        "train.batch_size=2".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &all).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Equal to 1e-9 relative (TRL's ORPO casts the log-probs to f32 first: 1e-6 there).
fn close_to(a: f64, b: f64, rel: f64, what: &str) {
    assert!((a - b).abs() <= rel * (1.0 + b.abs()), "{what}: lorafit {a} vs TRL {b}");
}

#[test]
fn losses_and_gradients_match_trl() {
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(fixture("dpo/losses.json")).unwrap()).unwrap();
    let inp = &fx["inputs"];
    let t = |k: &str| Tensor::new(f64s(&inp[k]), &Device::Cpu).unwrap();
    let (rc, rr, nc, nr) = (t("ref_chosen"), t("ref_rejected"), t("len_chosen"), t("len_rejected"));
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let name = format!("{} beta={} eps={} lambda={} gamma={}", case["loss"], case["beta"], case["label_smoothing"], case["lambda"], case["gamma"]);
        let p = LossParams {
            loss: LossType::parse(case["loss"].as_str().unwrap()).unwrap(),
            beta: case["beta"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
            lambda: case["lambda"].as_f64().unwrap(),
            gamma: case["gamma"].as_f64().unwrap(),
        };
        let rel = if p.loss == LossType::Orpo { 1e-6 } else { 1e-9 };
        let close = |a: f64, b: f64, what: &str| close_to(a, b, rel, what);
        let (c, r) = (Var::from_tensor(&t("chosen")).unwrap(), Var::from_tensor(&t("rejected")).unwrap());
        let with_ref = p.loss.needs_reference();
        let x = PairLogps {
            chosen: c.as_tensor(),
            rejected: r.as_tensor(),
            ref_chosen: with_ref.then_some(&rc),
            ref_rejected: with_ref.then_some(&rr),
            len_chosen: &nc,
            len_rejected: &nr,
        };
        let out = pair_losses(&p, &x).unwrap();
        let mean = out.loss.mean_all().unwrap();
        close(mean.to_scalar::<f64>().unwrap(), case["mean_loss"].as_f64().unwrap(), &format!("{name}: mean loss"));
        if let Some(per) = case.get("per_pair") {
            for (a, b) in out.loss.to_vec1::<f64>().unwrap().iter().zip(f64s(per)) {
                close(*a, b, &format!("{name}: pair loss"));
            }
        }
        let grads = mean.backward().unwrap();
        for (v, k) in [(&c, "grad_chosen"), (&r, "grad_rejected")] {
            let g: Vec<f64> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
            for (a, b) in g.iter().zip(f64s(&case[k])) {
                close(*a, b, &format!("{name}: {k}"));
            }
        }
        let (wc, wr): (Vec<f64>, Vec<f64>) = (out.rewards_chosen.to_vec1().unwrap(), out.rewards_rejected.to_vec1().unwrap());
        let n = wc.len() as f64;
        if let Some(m) = case.get("metrics") {
            // TRL's logged means: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins.
            close(wc.iter().sum::<f64>() / n, m["rewards_chosen"].as_f64().unwrap(), &format!("{name}: rewards_chosen"));
            close(wr.iter().sum::<f64>() / n, m["rewards_rejected"].as_f64().unwrap(), &format!("{name}: rewards_rejected"));
            let margin = wc.iter().zip(&wr).map(|(a, b)| a - b).sum::<f64>() / n;
            close(margin, m["margin"].as_f64().unwrap(), &format!("{name}: margin"));
            let acc = wc.iter().zip(&wr).filter(|(a, b)| a > b).count() as f64 / n;
            assert!((acc - m["accuracy"].as_f64().unwrap()).abs() < 1e-6, "{name}: accuracy {acc}");
        }
        for (k, got) in [("rewards_chosen", &wc), ("rewards_rejected", &wr)] {
            if let Some(want) = case.get(k) {
                got.iter().zip(f64s(want)).for_each(|(a, b)| close(*a, b, &format!("{name}: {k}")));
            }
        }
    }
}

#[test]
fn first_step_loss_is_ln2_with_a_fresh_adapter_or_an_sft_copy() {
    let ln2 = std::f64::consts::LN_2 as f32 as f64;
    // The SFT adapter: the fixture's trained one (lora_B != 0), its dropout off (with dropout
    // the policy's first pass is noisy where the frozen reference's is not).
    let sft_dir = tempfile::tempdir().unwrap();
    let src = fixture("gpt2-a").join("adapter");
    std::fs::copy(src.join("adapter_model.safetensors"), sft_dir.path().join("adapter_model.safetensors")).unwrap();
    let mut ac: Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    ac["lora_dropout"] = 0.0.into();
    std::fs::write(sft_dir.path().join("adapter_config.json"), ac.to_string()).unwrap();
    for sft in [None, Some(sft_dir.path().to_path_buf())] {
        let dir = tempfile::tempdir().unwrap();
        let mut sets = vec!["train.max_steps=2".to_string(), "lora.lora_dropout=0.1".into()];
        if let Some(a) = &sft {
            sets.push(format!("dpo.sft_adapter={:?}", a.display().to_string()));
        }
        let cfg = config(dir.path(), &sets.iter().map(String::as_str).collect::<Vec<_>>());
        let s = dpo::run(&cfg, Start::Fresh).unwrap();
        assert_eq!(s.first_loss, Some(ln2), "sft adapter {sft:?}: the policy equals the reference at step 1");
        assert!(s.final_loss.unwrap() < ln2, "the second step learned: {:?}", s.final_loss);
        // Bad input of the fixture file: its identical pair is skipped and counted; its
        // conversation, rendered through the built-in chat template, is longer than the
        // 64-token window: cut on the prompt side as `rm` cuts it (counted), both answers kept.
        assert_eq!((s.data.rows, s.data.identical, s.data.dropped, s.data.prompt_cut, s.data.pairs), (8, 1, 0, 1, 9));
    }
}

/// The pretrained tiny LLaMA learns which feeling fits the story (happy after good news, sad
/// after bad: no single direction fits all pairs); held out = the same pairs, so eval_* is
/// measured on the training pairs.
#[test]
fn stories260k_dpo_raises_accuracy_on_its_pairs() {
    let Some(model) = shared_asset("stories260K") else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = fixture("dpo/stories_pairs.jsonl").display().to_string();
    let sets = [
        format!("model.name={:?}", model.display().to_string()),
        format!("data.path={data:?}"),
        format!("data.eval_path={data:?}"),
        "data.template=\"{prompt}\"".into(),
        "data.max_len=128".into(),
        "lora.target_modules=[\"q_proj\",\"v_proj\",\"o_proj\",\"up_proj\",\"down_proj\"]".into(),
        "lora.lora_dropout=0.0".into(),
        "train.max_steps=24".into(),
        "train.batch_size=4".into(),
        "train.lr=1e-2".into(),
        "train.eval_every=1".into(),
        "dpo.beta=0.5".into(),
    ];
    let cfg = config(dir.path(), &sets.iter().map(String::as_str).collect::<Vec<_>>());
    let s = dpo::run(&cfg, Start::Fresh).unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["accuracy"].as_f64(), Some(0.0), "step 1: policy = reference, every reward 0, no pair ranked right");
    let first = lines[0]["eval_accuracy"].as_f64().unwrap();
    assert!(first <= 0.75, "after one step the policy still ranks pairs wrongly: {first}");
    assert_eq!(s.eval_accuracy, Some(1.0), "after training every pair is ranked right ({first} after step 1)");
    assert!(s.eval_margin.unwrap() > 2.0 && s.eval_loss.unwrap() < 0.1, "{s:?}");
    for k in ["rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected", "margin", "accuracy", "time_reference_s", "peak_rss_after_update_mib"] {
        assert!(lines[5][k].is_number(), "metrics line lacks {k}");
    }
}

#[test]
fn killed_run_resumes_to_the_same_adapter_with_its_precomputed_reference() {
    let bin = env!("CARGO_BIN_EXE_lorafit");
    let args = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = vec!["dpo".into(), "--model".into(), fixture("gpt2-a").display().to_string(),
            "--data".into(), fixture("dpo/pairs.jsonl").display().to_string(), "--out".into(), out.display().to_string()];
        for s in ["data.template=\"Q: {prompt}\\nA:\"", "lora.lora_dropout=0.1", "train.batch_size=2", "train.grad_accum=2",
                  "train.max_steps=40", "train.save_every=3", "train.lr=1e-3", "lora.target_modules=[\"c_attn\",\"c_fc\"]",
                  "dpo.precompute_ref=true", "data.eval_fraction=0.25"] {
            v.push("--set".into());
            v.push(s.into());
        }
        v
    };
    let dir = tempfile::tempdir().unwrap();
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    let ok = std::process::Command::new(bin).args(args(&full)).env("RUST_LOG", "warn").status().unwrap();
    assert!(ok.success());

    let mut child = std::process::Command::new(bin).args(args(&cut)).env("RUST_LOG", "warn").spawn().unwrap();
    let t0 = std::time::Instant::now();
    while lorafit::train::checkpoint::list(&cut).unwrap().is_empty() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!cut.join("summary.json").exists(), "the run was killed before finishing");
    // The checkpoint keeps the reference log-probs with the data cursor.
    let last = lorafit::train::checkpoint::list(&cut).unwrap().pop().unwrap();
    let state = lorafit::train::checkpoint::read_state(&last).unwrap();
    assert!(state.extra["ref_logps"].as_array().is_some_and(|a| !a.is_empty()), "no reference log-probs in {}", last.display());
    let mut resume = args(&cut);
    resume.push("--resume".into());
    let ok = std::process::Command::new(bin).args(resume).env("RUST_LOG", "warn").status().unwrap();
    assert!(ok.success());
    let a = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed adapter differs from the uninterrupted one");
    let lines = |p: &Path| std::fs::read_to_string(p.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines(&full), lines(&cut), "the resumed metrics log reads as one run");
    let summary = |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p.join("summary.json")).unwrap()).unwrap() };
    assert_eq!(summary(&full)["eval_accuracy"], summary(&cut)["eval_accuracy"]);
    assert!(summary(&full)["eval_loss"].is_number() && summary(&full)["eval_margin"].is_number());
}

/// The DPO fixture: an adapter trained by `lorafit dpo` (the recipe below, seeded), then
/// evaluated by PEFT (`scripts/fixtures/peft_nll.py tests/fixtures/gpt2-a tests/fixtures/dpo/adapter`).
/// Re-training must give the same tensors, and lorafit's NLL with it must equal PEFT's.
#[test]
fn trained_adapter_loads_in_peft_with_the_same_nll() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["train.epochs=3", "train.seed=5", "dpo.beta=0.5"]);
    dpo::run(&cfg, Start::Fresh).unwrap();
    let committed = fixture("dpo/adapter");
    if std::env::var("LORAFIT_WRITE_DPO_FIXTURE").is_ok() {
        std::fs::create_dir_all(&committed).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::copy(dir.path().join(f), committed.join(f)).unwrap();
        }
        return;
    }
    let ours = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let fx = candle_core::safetensors::load(committed.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ours.len(), fx.len());
    let mut moved = 0f32;
    for (k, t) in &fx {
        let (a, b): (Vec<f32>, Vec<f32>) = (ours[k].flatten_all().unwrap().to_vec1().unwrap(), t.flatten_all().unwrap().to_vec1().unwrap());
        assert!(max_abs_diff(&a, &b) < 1e-5, "re-trained {k} differs from the fixture");
        if k.contains("lora_B") {
            moved = moved.max(b.iter().fold(0.0, |m, x| m.max(x.abs())));
        }
    }
    assert!(moved > 1e-3, "the fixture adapter was trained (lora_B moved off 0)");
    let peft: Value = serde_json::from_str(&std::fs::read_to_string(committed.join("peft_nll.json")).unwrap()).unwrap();
    let a = lorafit::peft::load_adapter(&committed, "dpo", 1.0, false).unwrap();
    let model = load("gpt2-a", AdapterSet::new(vec![a]));
    let base = load("gpt2-a", AdapterSet::none());
    let mut differs = false;
    for (i, ids) in expected("gpt2-a").ids.iter().enumerate() {
        let ours = model.sequence_nll(ids).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let theirs = peft["nll"][i].as_f64().unwrap();
        assert!((ours - theirs).abs() < 2e-4, "line {i}: lorafit {ours} vs PEFT {theirs}");
        differs |= (base.sequence_nll(ids).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap() - theirs).abs() > 1e-3;
    }
    assert!(differs, "the adapter changes the model's NLL");
}

#[test]
fn bad_input_is_counted_or_refused_naming_file_row_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"completion_0\": \"x\", \"completion_1\": \"y\", \"ranking\": [0, 0]}\n",
         "line 2: field \"ranking\" = [0, 0] ranks every completion equal"),
        ("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": 5, \"rejected\": \"c\"}\n", "line 2: field \"chosen\" must be a string"),
        ("{\"prompt\": \"a\", \"chosen\": \"b\"}\n", "line 1: missing field \"rejected\""),
        ("{\"prompt\": \"a\", \"completion\": \"b\"}\n", "line 1: a prompt/completion row, but this stage takes ranked answers"),
        ("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"b\"}\n", "no usable preference pairs (1 rows, 1 identical"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let data = dir.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&data, text).unwrap();
        let out = dir.path().join(format!("out{i}"));
        let cfg = config(&out, &[&format!("data.path={:?}", data.display().to_string())]);
        let err = format!("{:#}", dpo::run(&cfg, Start::Fresh).unwrap_err());
        assert!(err.contains(&data.display().to_string()) && err.contains(want), "case {i}: {err}");
        assert!(!out.exists(), "case {i}: no output folder is left behind");
    }
    // A prompt longer than max_len is counted (and the pair kept, cut from the left).
    let data = dir.path().join("long.jsonl");
    let long = "word ".repeat(80);
    std::fs::write(&data, format!("{{\"prompt\": \"{long}\", \"chosen\": \"yes.\", \"rejected\": \"no.\"}}\n{{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}}\n")).unwrap();
    let cfg = config(&dir.path().join("long"), &[&format!("data.path={:?}", data.display().to_string()), "train.max_steps=1"]);
    let s = dpo::run(&cfg, Start::Fresh).unwrap();
    assert_eq!((s.data.prompt_too_long, s.data.truncated, s.data.pairs), (1, 1, 2));
    // Config keys: unknown ones list the valid ones; values out of range name the key.
    let err = format!("{:#}", TrainConfig::load(None, &["dpo.betta=1".into()]).unwrap_err());
    assert!(err.contains("betta") && err.contains("label_smoothing"), "{err}");
    for (set, want) in [("dpo.loss=\"kto\"", "dpo.loss = \"kto\""), ("dpo.beta=0", "dpo.beta = 0"), ("dpo.label_smoothing=0.5", "dpo.label_smoothing = 0.5")] {
        let err = format!("{:#}", TrainConfig::load(None, &[set.into()]).unwrap_err());
        assert!(err.contains(want), "{set}: {err}");
    }
}

/// Every loss trains on the fixture (no reference pass for orpo / simpo) without NaN.
#[test]
fn every_loss_runs_and_precompute_changes_nothing() {
    let mut first = None;
    for (loss, pre) in [("sigmoid", false), ("sigmoid", true), ("ipo", false), ("hinge", false), ("orpo", false), ("simpo", false)] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &[&format!("dpo.loss={loss:?}"), &format!("dpo.precompute_ref={pre}"), "train.max_steps=3", "dpo.label_smoothing=0.1"]);
        let s = dpo::run(&cfg, Start::Fresh).unwrap();
        assert!(s.final_loss.unwrap().is_finite(), "{loss}");
        if loss == "sigmoid" {
            let a = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
            match &first {
                None => first = Some(a),
                Some(f) => assert!(f == &a, "precompute_ref gives the same adapter"),
            }
        }
    }
}

/// `pipeline` with `[stages.dpo]`: SFT, then DPO whose policy starts as a copy of the SFT
/// adapter and whose reference is that adapter (no dropout: the first DPO loss is exactly ln 2).
#[test]
fn pipeline_runs_sft_then_dpo_from_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("run");
    let cfg = dir.path().join("pipeline.toml");
    std::fs::write(&cfg, format!(
        "[model]\nname = {:?}\n[data]\ntemplate = \"Q: {{prompt}}\\nA:\"\nmax_len = 64\neval_fraction = 0\n\
         [lora]\nlora_dropout = 0.0\ntarget_modules = [\"c_attn\", \"c_fc\"]\n[train]\nbatch_size = 2\nmax_steps = 2\nlr = 5e-3\n\
         [out]\ndir = {:?}\n[stages.sft.data]\npath = {:?}\n[stages.dpo.data]\npath = {:?}\n",
        fixture("gpt2-a").display().to_string(), root.display().to_string(),
        fixture("sft_rows.json").display().to_string(), fixture("dpo/pairs.jsonl").display().to_string(),
    )).unwrap();
    // What `lorafit pipeline --dtype f32` sets (for sft, rm, ppo): it reaches the dpo stage too.
    let flags: Vec<String> = ["sft", "rm", "ppo"].iter().map(|st| format!("stages.{st}.model.dtype=\"f32\"")).collect();
    let s = lorafit::train::pipeline::run(&cfg, &flags, Start::Fresh).unwrap();
    let (sft, d) = (s.sft.unwrap(), s.dpo.unwrap());
    assert!(s.rm.is_none() && s.ppo.is_none());
    assert_eq!(d.first_loss, Some(std::f64::consts::LN_2 as f32 as f64));
    let saved = std::fs::read_to_string(root.join("dpo/config.toml")).unwrap();
    assert!(saved.contains(&format!("sft_adapter = {:?}", sft.out_dir.display().to_string())), "{saved}");
    assert!(saved.contains("dtype = \"f32\""), "{saved}");
    // The SFT adapter moved (lora_B != 0), so the ln 2 above is the SFT copy against itself.
    let a = candle_core::safetensors::load(root.join("sft/adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(a.iter().any(|(k, t)| k.contains("lora_B") && t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0));
    // --resume of the finished pipeline reads both summaries and runs nothing.
    let again = lorafit::train::pipeline::run(&cfg, &flags, Start::Resume).unwrap();
    assert_eq!(again.dpo.unwrap().final_loss, d.final_loss);
}
