//! SFT on a `messages` file over a tiny Qwen3-style model with Qwen3's chat template, checked
//! against PEFT: the committed adapter (trained by lorafit with `tests/fixtures/chat_sft/sft.toml`,
//! seeded) loaded by `PeftModel.from_pretrained` gives, per row, the same mean NLL over the
//! tokens transformers marks as assistant tokens (`return_assistant_tokens_mask` with the
//! `{% generation %}` template) as `lorafit eval --json`; lorafit renders the same ids and mask;
//! a fresh run gives the same adapter; the adapter folder records the template, and `merge`
//! writes it into the merged folder. Fixtures: `scripts/fixtures/chat_sft_fixtures.py`.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use common::max_abs_diff;
use lorafit::train::{config::TrainConfig, sft, Start};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_sft")
}

fn lorafit(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    assert!(out.status.success(), "lorafit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn peft_rows() -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("adapter/peft_nll.json")).unwrap()).unwrap();
    v["rows"].as_array().unwrap().clone()
}

#[test]
fn committed_adapter_scores_as_in_peft_and_renders_as_transformers() {
    let (model, adapter, data) = (dir().join("model"), dir().join("adapter"), dir().join("messages.jsonl"));
    let s = |p: &Path| p.display().to_string();
    let peft = peft_rows();
    // The rendered ids and learned mask equal transformers' (marker template) for every row.
    let rendered: Vec<serde_json::Value> = lorafit(&["render", "--model", &s(&model), "--data", &s(&data), "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rendered.len(), peft.len());
    for (r, p) in rendered.iter().zip(&peft) {
        assert_eq!(r["ids"], p["ids"], "row {}: ids", p["row"]);
        assert_eq!(r["mask"], p["mask"], "row {}: assistant mask", p["row"]);
    }
    // lorafit eval's per-row NLL over the learned tokens equals PEFT's.
    let ours: Vec<serde_json::Value> = lorafit(&["eval", "--model", &s(&model), "--adapter", &s(&adapter), "--data", &s(&data), "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(ours.len(), peft.len());
    for (o, p) in ours.iter().zip(&peft) {
        assert_eq!(o["row"], p["row"]);
        assert_eq!(o["tokens"], p["tokens"], "row {}: learned tokens", p["row"]);
        let (a, b) = (o["nll"].as_f64().unwrap(), p["nll"].as_f64().unwrap());
        assert!((a - b).abs() < 2e-4, "row {}: lorafit eval {a} vs PEFT {b}", p["row"]);
    }
    // Trained: the adapter moved the NLL away from the base's.
    let base: Vec<serde_json::Value> = lorafit(&["eval", "--model", &s(&model), "--data", &s(&data), "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let moved = base.iter().zip(&ours).map(|(b, o)| b["nll"].as_f64().unwrap() - o["nll"].as_f64().unwrap()).sum::<f64>() / base.len() as f64;
    assert!(moved > 0.02, "the adapter lowers the mean NLL of its training rows (by {moved})");
}

#[test]
fn a_fresh_run_gives_the_committed_adapter_and_records_its_template() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sets = [
        format!("model.name={:?}", root.join("tests/fixtures/chat_sft/model").display().to_string()),
        format!("data.path={:?}", root.join("tests/fixtures/chat_sft/messages.jsonl").display().to_string()),
        format!("out.dir={:?}", out.display().to_string()),
    ];
    let cfg = TrainConfig::load(Some(&dir().join("sft.toml")), &sets).unwrap();
    let summary = sft::run(&cfg, Start::Fresh).unwrap();
    assert_eq!((summary.prep.rows, summary.prep.dropped), (6, 0));
    let ours = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let fx = candle_core::safetensors::load(dir().join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ours.len(), fx.len());
    for (k, t) in &fx {
        let (a, b): (Vec<f32>, Vec<f32>) = (ours[k].flatten_all().unwrap().to_vec1().unwrap(), t.flatten_all().unwrap().to_vec1().unwrap());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        // Summation order differs between CPUs (SIMD widths, threads): a relative tolerance.
        assert!(max_abs_diff(&a, &b) <= 1e-4 * scale.max(1.0), "re-trained {k} differs from the fixture by {}", max_abs_diff(&a, &b));
    }
    // lorafit.json records the model's chat template (what chat / generate / merge use).
    let rec = lorafit::render::TemplateRecord::read(&out).unwrap().expect("a template record");
    let source = std::fs::read_to_string(dir().join("model/chat_template.jinja")).unwrap();
    assert_eq!(rec.chat_template.as_deref(), Some(source.as_str()));
    assert_eq!((rec.chat_template_origin.as_str(), rec.prompt_template.as_deref()), ("model", None));
    assert_eq!(rec, lorafit::render::TemplateRecord::read(&dir().join("adapter")).unwrap().unwrap(), "the committed adapter records the same");

    // merge writes the trained template into the merged folder's tokenizer_config.json.
    let merged = tmp.path().join("merged");
    lorafit(&["merge", "--model", &dir().join("model").display().to_string(), "--adapter", &out.display().to_string(), "--out", &merged.display().to_string()]);
    let tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(merged.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["chat_template"].as_str(), Some(source.as_str()));
    // --chat-template overrides it.
    lorafit(&[
        "merge", "--model", &dir().join("model").display().to_string(), "--adapter", &out.display().to_string(), "--out", &merged.display().to_string(),
        "--force", "--chat-template", "alpaca",
    ]);
    let tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(merged.join("tokenizer_config.json")).unwrap()).unwrap();
    let t = tc["chat_template"].as_str().unwrap();
    assert!(t != source && t.contains("### Response"), "the built-in alpaca template: {t}");
}

#[test]
fn the_adapters_template_is_the_default_of_chat_and_generate() {
    // A {prompt}-template adapter: generate renders through it unless --template says otherwise.
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(dir().join("adapter").join(f), a.join(f)).unwrap();
    }
    let rec = lorafit::render::TemplateRecord {
        prompt_template: Some("Q: {prompt}\nA:".into()),
        chat_template: None,
        chat_template_origin: String::new(),
        add_special_tokens: false,
        train_on: lorafit::render::TrainOn::AllAssistant,
        split_special_tokens: false,
    };
    rec.write(&a).unwrap();
    let model = dir().join("model").display().to_string();
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", &model, "--adapter", a.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0"];
        args.extend(extra);
        lorafit(&args)
    };
    assert!(gen(&[]).starts_with("Q: hi\nA:"), "the recorded {{prompt}} template: {}", gen(&[]));
    assert!(gen(&["--template", "none"]).starts_with("hi"), "--template overrides");
}

#[test]
fn conversations_train_in_rm_ppo_and_grpo_through_the_same_template() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = dir().join("model").display().to_string();
    let (rm, ppo) = (tmp.path().join("rm"), tmp.path().join("ppo"));
    let pref = root.join("data/chat_pref_sample.jsonl").display().to_string();
    let chats = root.join("data/chat_sample.jsonl").display().to_string();
    let set = |k: &str, v: &Path| format!("{k}={:?}", v.display().to_string());
    // rm on TRL conversational preference rows: each completion ends at its <|im_end|> (578).
    let shown: Vec<serde_json::Value> =
        lorafit(&["render", "--model", &model, "--data", &pref, "--stage", "rm", "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(shown.len(), 6, "3 rows x (chosen, rejected)");
    for s in &shown {
        let ids: Vec<u64> = s["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(ids.last(), Some(&578), "the reward is read at the end-of-turn: {s}");
        assert_eq!(s["mask"].as_array().unwrap().last().unwrap(), 1);
    }
    lorafit(&["rm", "--model", &model, "--data", &pref, "--set", &set("out.dir", &rm), "--set", "train.max_steps=2", "--set", "data.max_len=256"]);
    assert_eq!(lorafit::render::TemplateRecord::read(&rm).unwrap().unwrap().chat_template_origin, "model");
    // `score` renders conversations through the reward model's recorded template.
    let scored: Vec<serde_json::Value> =
        lorafit(&["score", "--model", &model, "--adapter", rm.to_str().unwrap(), "--data", &chats, "--json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(scored.len(), 4);
    assert!(scored.iter().all(|s| s["reward"].as_f64().unwrap().is_finite()));
    // ppo on messages prompts: rendered with the generation prompt, sampled, scored.
    lorafit(&[
        "ppo", "--model", &model, "--data", &chats, "--reward-adapter", rm.to_str().unwrap(), "--set", &set("out.dir", &ppo),
        "--set", "train.max_steps=1", "--set", "ppo.max_new_tokens=6", "--set", "ppo.minibatch_size=2", "--set", "train.batch_size=2",
    ]);
    let sample: serde_json::Value = serde_json::from_str(std::fs::read_to_string(ppo.join("samples.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert!(sample["prompt"].as_str().unwrap().ends_with("<|im_start|>assistant\n"), "{sample}");
    assert_eq!(lorafit::render::TemplateRecord::read(&ppo).unwrap().unwrap().chat_template_origin, "model");
    // grpo on the same messages prompts, scored by the same reward model: prompts rendered with
    // the generation prompt, groups sampled and scored, the template recorded.
    let grpo = tmp.path().join("grpo");
    lorafit(&[
        "grpo", "--model", &model, "--data", &chats, "--reward-adapter", rm.to_str().unwrap(), "--set", &set("out.dir", &grpo),
        "--set", "train.max_steps=1", "--set", "grpo.max_new_tokens=6", "--set", "grpo.group_size=2", "--set", "train.batch_size=2",
        "--set", "grpo.sample_every=1", "--set", "grpo.max_prompt_len=200",
    ]);
    // Samples keep the prompt as the row gave it: the conversation up to its last user turn.
    let sample: serde_json::Value = serde_json::from_str(std::fs::read_to_string(grpo.join("samples.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(sample["prompt"].as_array().unwrap().last().unwrap()["role"], "user", "{sample}");
    let m: serde_json::Value = serde_json::from_str(std::fs::read_to_string(grpo.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert!(m["reward_mean"].as_f64().unwrap().is_finite() && m["reward_model"].as_f64().unwrap().is_finite(), "{m}");
    // What the policy was prompted with: `render --stage grpo` ends each prompt with the generation prompt.
    let shown: serde_json::Value = serde_json::from_str(lorafit(&["render", "--model", &model, "--data", &chats, "--stage", "grpo", "--json"]).lines().next().unwrap()).unwrap();
    assert!(shown["text"].as_str().unwrap().ends_with("<|im_start|>assistant\n"), "{shown}");
    assert_eq!(lorafit::render::TemplateRecord::read(&grpo).unwrap().unwrap().chat_template_origin, "model");
}

#[test]
fn export_writes_the_adapters_recorded_chat_template() {
    // An adapter trained through a chat template: the GGUF carries it as tokenizer.chat_template
    // (what llama.cpp / Ollama prompt with), as merge writes it into tokenizer_config.json.
    // llama-a (a LLaMA fixture whose tokenizer llama.cpp knows) has no template of its own.
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-a");
    let a = tmp.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(root.join("adapter").join(f), a.join(f)).unwrap();
    }
    let trained = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{# trained #}";
    let rec = lorafit::render::TemplateRecord {
        prompt_template: None,
        chat_template: Some(trained.into()),
        chat_template_origin: "file:trained.jinja".into(),
        add_special_tokens: false,
        train_on: lorafit::render::TrainOn::AllAssistant,
        split_special_tokens: false,
    };
    rec.write(&a).unwrap();
    let model = root.display().to_string();
    let template_of = |path: &Path| {
        let mut f = std::fs::File::open(path).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        c.metadata.get("tokenizer.chat_template").map(|v| v.to_string().unwrap().clone())
    };
    let with = tmp.path().join("with.gguf");
    lorafit(&["export", "--model", &model, "--adapter", a.to_str().unwrap(), "--format", "gguf", "--quant", "f32", "--out", with.to_str().unwrap()]);
    assert_eq!(template_of(&with).as_deref(), Some(trained));
    // Without the adapter: the model's own (here none).
    let base = tmp.path().join("base.gguf");
    lorafit(&["export", "--model", &model, "--format", "gguf", "--quant", "f32", "--out", base.to_str().unwrap()]);
    assert_eq!(template_of(&base), None);
}
