//! `lorafit render` and the pieces around it (issue 13): prompt/completion rows render exactly
//! as `lorafit sft` prepares them; conversations lose whole earlier exchanges (never the system
//! message) to fit; `eval` scores the learned tokens; generation stops at every end id and takes
//! generation_config.json's defaults; `merge` carries the chat template.
use std::path::{Path, PathBuf};
use std::process::Command;

use lorafit::data::{read_sft, Example, Message, Role};
use lorafit::render::{RenderConfig, Renderer, TrainOn};
use lorafit::template::Template;
use lorafit::tokenizer::Tokenizer;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

fn tok(dir: &Path) -> Tokenizer {
    Tokenizer::load(&dir.join("tokenizer.json"), &dir.join("config.json")).unwrap()
}

#[test]
fn prompt_completion_rows_render_as_sft_prepares_them() {
    let d = fixture("gpt2-a");
    let t = tok(&d);
    let (rows, _, _) = read_sft(&root().join("data/sft_sample.json"), false).unwrap();
    for max_len in [512, 40] {
        let (exs, _) = lorafit::train::sft::prepare(&rows, &t, &Template::kochatgpt(), max_len, true).unwrap();
        let r = Renderer::new(&t, &d, RenderConfig { max_len, ..Default::default() }).unwrap();
        assert!(r.prompt_template.is_some(), "no chat template in gpt2-a: the {{prompt}} template");
        for (row, ex) in rows.iter().zip(&exs) {
            let e = &r.encode_example(&Example::Completion { prompt: row.prompt.clone(), completion: row.completion.clone() }).unwrap()[0];
            assert_eq!(e.ids, ex.ids, "max_len {max_len}");
            let want: Vec<bool> = (0..ex.ids.len()).map(|j| ex.learned.iter().any(|r| r.contains(&j))).collect();
            assert_eq!(e.mask, want, "max_len {max_len}");
            assert_eq!(e.learned_spans(), ex.learned, "max_len {max_len}: the learned ranges SFT batches use");
        }
    }
}

#[test]
fn long_conversations_lose_whole_earlier_exchanges_first() {
    let d = fixture("chat/qwen3");
    let t = tok(&d);
    let msgs = vec![
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "first question here"),
        Message::new(Role::Assistant, "first answer here"),
        Message::new(Role::User, "second question"),
        Message::new(Role::Assistant, "second answer"),
        Message::new(Role::User, "third"),
        Message::new(Role::Assistant, "3"),
    ];
    let full = Renderer::new(&t, &d, RenderConfig { chat_template: "model".into(), max_len: 100_000, ..Default::default() }).unwrap().encode_chat(&msgs).unwrap();
    let without_first: Vec<Message> = [&msgs[..1], &msgs[3..]].concat();
    let want = Renderer::new(&t, &d, RenderConfig { chat_template: "model".into(), max_len: 100_000, ..Default::default() }).unwrap().encode_chat(&without_first).unwrap();
    let r = Renderer::new(&t, &d, RenderConfig { chat_template: "model".into(), max_len: want.ids.len(), ..Default::default() }).unwrap();
    let e = r.encode_chat(&msgs).unwrap();
    assert!(full.ids.len() > want.ids.len());
    assert_eq!((e.ids.clone(), e.mask.clone(), e.dropped_turns, e.cut_tokens), (want.ids.clone(), want.mask.clone(), 1, 0));
    assert!(e.text.starts_with("<|im_start|>system\nBe brief."), "the system message stays: {}", e.text);
    // Too long even alone: cut at max_len, counted.
    let r = Renderer::new(&t, &d, RenderConfig { chat_template: "model".into(), max_len: 10, train_on: TrainOn::LastAssistant, ..Default::default() }).unwrap();
    let e = r.encode_chat(&msgs).unwrap();
    assert_eq!((e.ids.len(), e.dropped_turns), (10, 2));
    assert!(e.cut_tokens > 0);
}

#[test]
fn render_command_prints_ids_masks_and_text() {
    let bin = env!("CARGO_BIN_EXE_lorafit");
    let out = Command::new(bin).args(["render", "--model"]).arg(fixture("chat/qwen3")).args(["--data"]).arg(root().join("data/chat_sample.jsonl")).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    let t = tok(&fixture("chat/qwen3"));
    let r = Renderer::new(&t, &fixture("chat/qwen3"), RenderConfig::default()).unwrap();
    let (rows, _) = lorafit::data::read_examples(&root().join("data/chat_sample.jsonl"), lorafit::data::Stage::Sft, false).unwrap();
    for (l, (loc, ex)) in lines.iter().zip(&rows) {
        let e = &r.encode_example(ex).unwrap()[0];
        assert_eq!(l["row"].as_u64().unwrap() as usize, loc.n);
        let ids: Vec<u32> = l["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let mask: Vec<bool> = l["mask"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() == 1).collect();
        assert_eq!((&ids, &mask), (&e.ids, &e.mask));
        assert!(mask.iter().any(|&m| m) && l["text"].as_str().unwrap().contains("<|im_start|>assistant"));
    }
    // Text mode, not a terminal: learned text between ⟦ ⟧, learned ids starred; every data format.
    for (data, stage) in [("data/sft_sample.jsonl", "sft"), ("data/sharegpt_sample.json", "sft"), ("data/chat_pref_sample.jsonl", "rm"), ("data/rm_sample.json", "rm"), ("data/ppo_prompts.json", "ppo")] {
        let out = Command::new(bin).args(["render", "--model", "builtin:tiny-gpt2", "--rows", "2", "--stage", stage, "--data"]).arg(root().join(data)).output().unwrap();
        assert!(out.status.success(), "{data}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("── "), "{data}: {text}");
        if stage != "ppo" {
            assert!(text.contains('⟦') && text.contains('*'), "{data}: {text}");
        }
    }
}

#[test]
fn eval_scores_the_learned_tokens() {
    let d = fixture("gpt2-a");
    let files = lorafit::weights::ModelFiles::resolve(d.to_str().unwrap()).unwrap();
    let model = lorafit::model::Model::load(&files, candle_core::DType::F32, &candle_core::Device::Cpu, lorafit::lora::AdapterSet::new(vec![])).unwrap();
    let t = tok(&d);
    let ids = t.encode("Hello there, who are you?").unwrap();
    let all = lorafit::eval::masked_nll(&model, &ids, &vec![true; ids.len()]).unwrap().unwrap();
    let reference = model.sequence_nll(&ids).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((all - reference).abs() < 1e-6, "{all} vs {reference}");
    // Only the last two tokens: their mean NLL.
    let mut learn = vec![false; ids.len()];
    let n = ids.len();
    learn[n - 2] = true;
    learn[n - 1] = true;
    let part = lorafit::eval::masked_nll(&model, &ids, &learn).unwrap().unwrap();
    let a = model.sequence_nll(&ids).unwrap().to_scalar::<f32>().unwrap() as f64 * (n - 1) as f64;
    let b = model.sequence_nll(&ids[..n - 2]).unwrap().to_scalar::<f32>().unwrap() as f64 * (n - 3) as f64;
    assert!((part - (a - b) / 2.0).abs() < 1e-4, "{part} vs {}", (a - b) / 2.0);
    assert!(lorafit::eval::masked_nll(&model, &ids, &vec![false; n]).unwrap().is_none());
    // The CLI on conversation data: one {"row", "tokens", "nll"} per row (gpt2-a's context is
    // 64 tokens: short ChatML conversations).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c.jsonl");
    let m = |u: &str, a: &str| format!(r#"{{"messages": [{{"role": "user", "content": "{u}"}}, {{"role": "assistant", "content": "{a}"}}]}}"#);
    std::fs::write(&data, [m("Hi", "Hello"), m("안녕", "네"), m("2+2?", "4")].join("\n")).unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[data]\nchat_template = \"chatml\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(["eval", "--json", "--model"]).arg(&d).arg("--data").arg(&data).arg("--config").arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["row"].is_u64() && r["tokens"].as_u64().unwrap() > 0 && r["nll"].as_f64().unwrap() > 0.0));
}

#[test]
fn generation_stops_at_every_end_id_with_the_models_defaults() {
    let d = fixture("chat/llama3.1");
    let t = tok(&d);
    let id = |s: &str| t.token_to_id(s).unwrap();
    let mut want = vec![id("<|eot_id|>"), id("<|end_of_text|>"), id("<|eom_id|>")];
    let mut got = t.end_ids.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "config.json's eos and generation_config.json's list");
    let g = lorafit::generate::GenerationDefaults::read(&d).unwrap();
    let s = g.resolve(None, None, None, None, None, 0, vec![]);
    assert_eq!((s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.max_new_tokens), (0.6, 20, 0.9, 1.1, 7));
    let s = g.resolve(Some(0.0), Some(3), None, Some(1.0), Some(9), 0, vec![]);
    assert_eq!((s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.max_new_tokens), (0.0, 3, 0.9, 1.0, 9), "flags win");
    let none = lorafit::generate::GenerationDefaults::default().resolve(None, None, None, None, None, 0, vec![]);
    assert_eq!((none.temperature, none.top_k, none.max_new_tokens), (0.0, 0, 64), "no file: lorafit's defaults (greedy)");
    // The chat template's end-of-turn token stops a reply too (ChatML's <|im_end|>).
    let q = fixture("chat/qwen3");
    let qt = tok(&q);
    let r = Renderer::new(&qt, &q, RenderConfig::default()).unwrap();
    assert_eq!(r.end_of_turn_ids(), vec![qt.token_to_id("<|im_end|>").unwrap()]);
}

#[test]
fn merge_writes_the_chat_template_into_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    let (base, out) = (dir.path().join("base"), dir.path().join("out"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let tmpl = "{% for m in messages %}{{ m.content }}{% endfor %}";
    std::fs::write(base.join("chat_template.jinja"), tmpl).unwrap();
    std::fs::write(out.join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    lorafit::chat_template::install_chat_template(&base, &out, None).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["chat_template"].as_str(), cfg["eos_token"].as_str()), (Some(tmpl), Some("</s>")));
    // An adapter's own template wins.
    lorafit::chat_template::install_chat_template(&base, &out, Some("X")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["chat_template"].as_str(), Some("X"));
}

#[test]
fn chat_settings_are_validated_and_chat_commands_run() {
    use lorafit::train::config::TrainConfig;
    let err = format!("{:#}", TrainConfig::load(None, &["data.train_on=\"every_turn\"".into()]).unwrap_err());
    assert!(err.contains("data.train_on") && err.contains("last_assistant"), "{err}");
    let err = format!("{:#}", TrainConfig::load(None, &["data.chat_template=\"chatlm\"".into()]).unwrap_err());
    assert!(err.contains("data.chat_template") && err.contains("kochatgpt, chatml, alpaca, llama3"), "{err}");
    assert!(TrainConfig::load(None, &["data.chat_template=\"llama3\"".into(), "data.split_special_tokens=true".into()]).is_ok());
    let bin = env!("CARGO_BIN_EXE_lorafit");
    let out = Command::new(bin).args(["generate", "--model", "builtin:tiny-gpt2", "--chat", "--prompt", "안녕", "--prompt", "hi", "--max-new-tokens", "3"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--- prompt 2 ---"));
    let mut child = Command::new(bin)
        .args(["chat", "--model", "builtin:tiny-gpt2", "--chat-template", "chatml", "--system", "Be brief.", "--max-new-tokens", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\nagain\n/exit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches("> ").count(), 3, "two replies, then /exit");
}
