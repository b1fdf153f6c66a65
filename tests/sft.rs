//! SFT: it learns, accumulation and activation checkpointing change nothing, a killed run
//! resumes to the same adapter, and bad data is refused before anything is written.
mod common;

use std::path::Path;

use candle_core::Device;
use common::*;
use lorafit::data::SftRow;
use lorafit::lora::AdapterSet;
use lorafit::template::Template;
use lorafit::tokenizer::Tokenizer;
use lorafit::train::config::TrainConfig;
use lorafit::train::sft::{self, make_batch, prepare, SftExample};
use lorafit::train::Start;
use lorafit::train::{forward_backward, GradAccum};

fn config(out: &Path, sets: &[&str]) -> TrainConfig {
    let mut all: Vec<String> = vec![
        format!("model.name={:?}", fixture("gpt2-a").display().to_string()),
        format!("data.path={:?}", fixture("sft_rows.json").display().to_string()),
        format!("out.dir={:?}", out.display().to_string()),
        "data.template=\"Q: {prompt}\\nA:\"".into(),
        "data.max_len=64".into(),
        "lora.target_modules=[\"c_attn\", \"c_proj\", \"c_fc\"]".into(),
        "lora.lora_dropout=0.1".into(),
        "train.lr=5e-3".into(),
        "train.batch_size=4".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &all).unwrap()
}

#[test]
fn completion_loss_falls_well_below_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = sft::run(&config(dir.path(), &["train.epochs=10", "data.eval_fraction=0.2"]), Start::Fresh).unwrap();
    let (first, last) = (s.first_loss.unwrap(), s.final_loss.unwrap());
    assert!(last < 0.6 * first, "loss {first} -> {last}");
    for f in ["adapter_model.safetensors", "adapter_config.json", "config.toml", "metrics.jsonl", "loss.png", "summary.json"] {
        assert!(dir.path().join(f).is_file(), "{f} written");
    }
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for k in ["step", "loss", "lr", "tokens_per_s"] {
        assert!(lines.iter().all(|l| l.get(k).is_some()), "metrics lines have {k}");
    }
    assert!(lines.last().unwrap().get("eval_loss").is_some(), "the last line has eval_loss");
    let a = lorafit::peft::load_adapter(dir.path(), "sft", 1.0, false).unwrap();
    assert!(a.config.fan_in_fan_out, "GPT-2 adapters record fan_in_fan_out");
}

fn toy_examples(n: usize) -> (Vec<SftExample>, u32) {
    let f = files("gpt2-a");
    let tok = Tokenizer::load(&f.tokenizer, &f.config).unwrap();
    let (rows, _, _) = lorafit::data::read_sft(&fixture("sft_rows.json"), false).unwrap();
    let (ex, _) = prepare(&rows[..n], &tok, &Template::new("Q: {prompt}\nA:").unwrap(), 64, true).unwrap();
    (ex, tok.padding_id())
}

/// Gradients of one optimizer step over `groups` micro-batches (`dropout`: LoRA dropout on).
fn step_grads(groups: &[Vec<usize>], checkpointing: bool, dropout: bool) -> Vec<Vec<f32>> {
    let (ex, pad) = toy_examples(8);
    // The PEFT fixture adapter: a non-zero B, so every tensor gets a gradient; dropout 0.05.
    let a = lorafit::peft::load_adapter(&fixture("gpt2-a").join("adapter"), "a", 1.0, true).unwrap();
    let model = load("gpt2-a", AdapterSet::new(vec![a.clone()]));
    model.adapters.set_training(dropout);
    let vars = a.vars();
    let batches: Vec<_> = groups.iter().map(|g| make_batch(&g.iter().map(|&i| &ex[i]).collect::<Vec<_>>(), pad, &Device::Cpu).unwrap()).collect();
    let denom = batches.iter().map(|b| b.targets.dim(0).unwrap()).sum::<usize>() as f64;
    let mut acc = GradAccum::new(vars.len());
    for b in &batches {
        let f = |h: &candle_core::Tensor| Ok((sft::label_nll_sum(&model, h, b, 3).unwrap() / denom).unwrap());
        forward_backward(&model, &b.ids, &b.pos, b.mask.clone(), checkpointing, &f, &vars, &mut acc).unwrap();
    }
    acc.finish(&vars).unwrap().iter().map(|g| g.flatten_all().unwrap().to_vec1().unwrap()).collect()
}

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let groups = vec![vec![0, 1, 2, 3]];
    // Dropout on: the recomputation must draw the same masks.
    let (plain, ckpt) = (step_grads(&groups, false, true), step_grads(&groups, true, true));
    for (p, c) in plain.iter().zip(&ckpt) {
        assert!(p.iter().all(|x| x.is_finite()) && p.iter().any(|&x| x != 0.0));
        assert!(max_abs_diff(p, c) <= 1e-6, "checkpointed gradient differs by {}", max_abs_diff(p, c));
    }
}

#[test]
fn accumulation_equals_one_big_batch() {
    // Dropout off: two micro-batches draw other masks than one big batch.
    let (big, split) = (step_grads(&[vec![0, 1, 2, 3]], false, false), step_grads(&[vec![0, 1], vec![2, 3]], false, false));
    for (b, s) in big.iter().zip(&split) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max_abs_diff(b, s) <= 1e-5 * scale.max(1e-3), "accumulated gradient differs by {}", max_abs_diff(b, s));
    }
}

#[test]
fn labels_cover_completion_and_eos_never_prompt_or_padding() {
    let f = files("gpt2-a");
    let tok = Tokenizer::load(&f.tokenizer, &f.config).unwrap();
    let t = Template::new("Q: {prompt}\nA:").unwrap();
    let rows = vec![
        SftRow { prompt: "하늘".into(), completion: "'sky".into() },
        SftRow { prompt: "a much longer prompt that will need truncation on the left side".into(), completion: "ok".into() },
        SftRow { prompt: "x".into(), completion: "".into() },
    ];
    let (ex, stats) = prepare(&rows, &tok, &t, 16, true).unwrap();
    assert_eq!((stats.rows, stats.truncated, stats.dropped), (3, 1, 1));
    let eos = tok.eos_id.unwrap();
    assert_eq!(*ex[0].ids.last().unwrap(), eos, "eos is learned");
    assert_eq!(&ex[0].ids[ex[0].prompt_len()..ex[0].ids.len() - 1], tok.encode_plain("sky").unwrap().as_slice(), "stray quote stripped");
    assert!(ex[1].ids.len() <= 16 && ex[1].ids.ends_with(&[eos]), "the prompt side is cut first");
    let pad = tok.padding_id();
    assert_ne!(pad, eos, "padding is not eos");
    let b = make_batch(&[&ex[0], &ex[1]], pad, &Device::Cpu).unwrap();
    let n_learned = (ex[0].ids.len() - ex[0].prompt_len()) + (ex[1].ids.len() - ex[1].prompt_len());
    assert_eq!(b.targets.dim(0).unwrap(), n_learned);
    let flat: Vec<u32> = b.ids.flatten_all().unwrap().to_vec1().unwrap();
    let t_len = b.ids.dim(1).unwrap() as u32;
    for &s in &b.select.to_vec1::<u32>().unwrap() {
        assert_ne!(flat[s as usize + 1], pad, "a padding position is never a target (position {s})");
        let (row, col) = (s / t_len, s % t_len);
        let e = &ex[row as usize];
        assert!(col as usize + 1 >= e.prompt_len(), "a prompt token is never a target");
    }
}

#[test]
fn killed_run_resumes_to_the_same_adapter() {
    let bin = env!("CARGO_BIN_EXE_lorafit");
    let args = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = vec!["sft".into(), "--model".into(), fixture("gpt2-a").display().to_string(),
            "--data".into(), fixture("sft_rows.json").display().to_string(), "--out".into(), out.display().to_string()];
        for s in ["data.template=\"Q: {prompt}\\nA:\"", "lora.lora_dropout=0.1", "train.batch_size=2", "train.grad_accum=2",
                  "train.max_steps=40", "train.save_every=3", "train.lr=1e-3", "lora.target_modules=[\"c_attn\",\"c_fc\"]"] {
            v.push("--set".into());
            v.push(s.into());
        }
        v
    };
    let dir = tempfile::tempdir().unwrap();
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    let ok = std::process::Command::new(bin).args(args(&full)).env("RUST_LOG", "warn").status().unwrap();
    assert!(ok.success());

    // Start again, SIGKILL once a checkpoint exists, then resume.
    common::kill_at_first_checkpoint(&args(&cut), &cut, std::time::Duration::from_millis(5));
    let mut resume = args(&cut);
    resume.push("--resume".into());
    let ok = std::process::Command::new(bin).args(resume).env("RUST_LOG", "warn").status().unwrap();
    assert!(ok.success());
    let a = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed adapter differs from the uninterrupted one");
    let steps = |p: &Path| std::fs::read_to_string(p.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(steps(&full), steps(&cut), "the resumed metrics log reads as one run");
}

#[test]
fn bad_rows_are_refused_with_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("[{\"prompt\": \"a\", \"completion\": \"b\"}, {\"prompt\": 3, \"completion\": \"b\"}]", "row 2: field \"prompt\" must be a string"),
        ("[{\"prompt\": \"a\", \"completion\": \"b\"}, {\"prompt\": \"a\"}]", "row 2: missing field \"completion\""),
        ("[{\"prompt\": \"a\", \"completion\": \"b\"}, 7]", "row 2: expected a JSON object"),
        ("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": \"b\"\n", "line 2: invalid JSON"),
        ("", "the file is empty"),
        ("\u{feff}[{\"instruction\": \"a\", \"input\": \"\", \"output\": 5}]", "row 1: field \"output\" must be a string"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let data = dir.path().join(format!("bad{i}.json"));
        std::fs::write(&data, text).unwrap();
        let out = dir.path().join(format!("out{i}"));
        let cfg = config(&out, &[&format!("data.path={:?}", data.display().to_string())]);
        let err = format!("{:#}", sft::run(&cfg, Start::Fresh).unwrap_err());
        assert!(err.contains(&data.display().to_string()) && err.contains(want), "case {i}: {err}");
        assert!(!out.exists(), "case {i}: no output folder is left behind");
    }
    // --skip-bad-rows counts them instead.
    let data = dir.path().join("mixed.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \"bb\"}\n{\"prompt\": 1}\n{\"prompt\": \"c\", \"completion\": \"dd\"}\n").unwrap();
    let out = dir.path().join("skip");
    let cfg = config(&out, &[&format!("data.path={:?}", data.display().to_string()), "data.skip_bad_rows=true", "train.max_steps=1", "data.eval_fraction=0"]);
    assert_eq!(sft::run(&cfg, Start::Fresh).unwrap().prep.skipped_bad, 1);
    // A template without {prompt}, and unknown config keys.
    let err = format!("{:#}", TrainConfig::load(None, &["data.template=\"no placeholder\"".into()]).and_then(|c| {
        sft::run(&c, Start::Fresh).map(|_| ())
    }).unwrap_err());
    assert!(err.contains("{prompt}"), "{err}");
    let err = format!("{:#}", TrainConfig::load(None, &["train.lr_typo=1".into()]).unwrap_err());
    assert!(err.contains("lr_typo") && err.contains("batch_size"), "unknown keys list the valid ones: {err}");
}

/// The SFT fixtures: adapters trained by `lorafit sft` (the recipe below, seeded), then
/// evaluated by PEFT (`scripts/fixtures/peft_nll.py`). Re-training here must give the same
/// tensors, and lorafit's NLL with the committed adapter must equal PEFT's.
#[test]
fn trained_adapter_loads_in_peft_with_the_same_nll() {
    for (m, targets) in [
        ("gpt2-a", "[\"c_attn\",\"c_proj\",\"c_fc\"]"),
        ("llama-a", "[\"q_proj\",\"k_proj\",\"v_proj\",\"o_proj\",\"gate_proj\",\"up_proj\",\"down_proj\"]"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let sets = [
            format!("model.name={:?}", fixture(m).display().to_string()),
            format!("lora.target_modules={targets}"),
            "train.epochs=3".into(),
            "train.seed=5".into(),
            "data.eval_fraction=0".into(),
        ];
        let cfg = config(dir.path(), &sets.iter().map(String::as_str).collect::<Vec<_>>());
        sft::run(&cfg, Start::Fresh).unwrap();
        let committed = fixture(&format!("sft-{m}"));
        let ours = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let fx = candle_core::safetensors::load(committed.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(ours.len(), fx.len());
        for (k, t) in &fx {
            let d = max_abs_diff(&ours[k].flatten_all().unwrap().to_vec1().unwrap(), &t.flatten_all().unwrap().to_vec1().unwrap());
            assert!(d < 1e-5, "{m}: re-trained {k} differs from the fixture by {d}");
        }
        let peft: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(committed.join("peft_nll.json")).unwrap()).unwrap();
        let a = lorafit::peft::load_adapter(&committed, "sft", 1.0, false).unwrap();
        let model = load(m, AdapterSet::new(vec![a]));
        for (i, ids) in expected(m).ids.iter().enumerate() {
            let ours = model.sequence_nll(ids).unwrap().to_scalar::<f32>().unwrap() as f64;
            let theirs = peft["nll"][i].as_f64().unwrap();
            assert!((ours - theirs).abs() < 2e-4, "{m}: line {i}: lorafit {ours} vs PEFT {theirs}");
        }
    }
}

#[test]
fn f16_base_trains_with_dynamic_loss_scaling() {
    use lorafit::train::optim::LossScaler;
    let mut s = LossScaler::new(true);
    assert_eq!(s.scale, 65536.0);
    assert!(!s.update(f64::INFINITY), "a non-finite step is skipped");
    assert!(!s.update(f64::NAN));
    assert_eq!(s.scale, 16384.0, "and the scale halves each time");
    for _ in 0..s.growth_interval {
        assert!(s.update(1.0));
    }
    assert_eq!(s.scale, 32768.0, "it doubles after growth_interval good steps");
    let mut off = LossScaler::new(false);
    assert!(!off.update(f64::NAN) && off.scale == 1.0, "f32: skipped, never scaled");

    let dir = tempfile::tempdir().unwrap();
    let s = sft::run(&config(dir.path(), &["model.dtype=\"f16\"", "train.epochs=4"]), Start::Fresh).unwrap();
    assert!(s.final_loss.unwrap().is_finite() && s.final_loss.unwrap() < s.first_loss.unwrap(), "{s:?}");
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(last["loss_scale"].as_f64().unwrap() >= 1.0);
    let a = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(a.values().all(|t| t.dtype() == candle_core::DType::F32), "adapters stay f32 on an f16 base");
}
