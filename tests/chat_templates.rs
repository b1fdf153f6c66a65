//! Chat templates against transformers (issue 13): for the real templates of Llama 3.1,
//! Qwen2.5, Qwen3, Gemma 3, Mistral (Nemo), EXAONE 3.5 and Phi-3.5 and six conversations each,
//! lorafit's text, token ids and loss masks equal `apply_chat_template`'s
//! (`scripts/fixtures/chat_fixtures.py`; tiny tokenizers built like the real ones).
//! The masks come from transformers' `return_assistant_tokens_mask` on marker versions of the
//! templates; lorafit finds the spans on the original (marker-less) templates, and on the
//! marker versions through the markers: both must give transformers' mask.
use std::path::{Path, PathBuf};

use lorafit::data::{Message, Prompt, Role};
use lorafit::render::{RenderConfig, Renderer, TrainOn};
use lorafit::tokenizer::Tokenizer;
use serde_json::Value;

const FAMILIES: [&str; 7] = ["llama3.1", "qwen2.5", "qwen3", "gemma3", "mistral-nemo", "exaone3.5", "phi3.5"];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat").join(name)
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn mask(v: &Value) -> Vec<bool> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() == 1).collect()
}

fn cfg(chat_template: &str, split: bool, train_on: TrainOn) -> RenderConfig {
    RenderConfig { chat_template: chat_template.into(), split_special_tokens: split, train_on, max_len: 100_000, ..Default::default() }
}

#[test]
fn ids_and_masks_equal_transformers() {
    for fam in FAMILIES {
        let d = dir(fam);
        let tok = Tokenizer::load(&d.join("tokenizer.json"), &d.join("config.json")).unwrap();
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
        let markers = dir("templates").join(expected["template"].as_str().unwrap().replace(".jinja", ".markers.jinja"));
        let methods = [("model", false, "spans found without markers"), ("model", true, "prefix by prefix"), (markers.to_str().unwrap(), false, "marker version")];
        for (template, prefix_only, how) in methods {
            for split in [false, true] {
                for train_on in [TrainOn::AllAssistant, TrainOn::LastAssistant] {
                    let mut r = Renderer::new(&tok, &d, cfg(template, split, train_on)).unwrap();
                    r.prefix_spans_only = prefix_only;
                    let sfx = if split { "_split" } else { "" };
                    let last = if train_on == TrainOn::LastAssistant { "_last" } else { "" };
                    for (n, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
                        let msgs = messages(&case["messages"]);
                        let what = format!("{fam}, {how}, split={split}, {train_on:?}, conversation {n}");
                        // Mistral puts the system message into the last user turn (a conversation that ends with an
                        // assistant turn loses it): a prefix of
                        // the conversation renders differently, and the prefix search says so.
                        let system_moves = fam == "mistral-nemo" && msgs[0].role == Role::System;
                        let e = match r.encode_chat(&msgs) {
                            Err(e) if prefix_only && system_moves => {
                                assert!(format!("{e:#}").contains("{% generation %}"), "{what}: {e:#}");
                                continue;
                            }
                            r => r.unwrap_or_else(|e| panic!("{what}: {e:#}")),
                        };
                        assert!(!(prefix_only && system_moves), "{what}: the prefix search should fail here");
                        assert_eq!(e.text, case["text"].as_str().unwrap(), "{what}: text");
                        assert_eq!(e.ids, ids(&case[format!("ids{sfx}")]), "{what}: ids");
                        assert_eq!(e.mask, mask(&case[format!("mask{sfx}{last}")]), "{what}: mask");
                        assert_eq!(e.special_text, n == 5, "{what}: typed control text is reported");
                        // The generation prompt (chat, generate --chat, PPO prompts).
                        let last_user = msgs.iter().rposition(|m| m.role == Role::User).unwrap();
                        if !split {
                            let g = r.encode_prompt(&Prompt::Messages(msgs[..=last_user].to_vec())).unwrap();
                            assert_eq!(g.ids, ids(&case["gen_ids"]), "{what}: generation prompt");
                            assert!(g.mask.iter().all(|&m| !m));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_template_is_read_from_tokenizer_config_in_both_forms() {
    let d = dir("qwen3");
    let tok = Tokenizer::load(&d.join("tokenizer.json"), &d.join("config.json")).unwrap();
    let source = std::fs::read_to_string(d.join("chat_template.jinja")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let msgs = vec![Message::new(Role::User, "Hello"), Message::new(Role::Assistant, "Hi")];
    let want = Renderer::new(&tok, &d, cfg("model", false, TrainOn::AllAssistant)).unwrap().encode_chat(&msgs).unwrap().ids;
    for form in [
        serde_json::json!({"chat_template": source, "eos_token": "<|im_end|>"}),
        serde_json::json!({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}], "eos_token": {"content": "<|im_end|>", "special": true}}),
    ] {
        std::fs::write(tmp.path().join("tokenizer_config.json"), form.to_string()).unwrap();
        let r = Renderer::new(&tok, tmp.path(), cfg("", false, TrainOn::AllAssistant)).unwrap();
        assert!(r.prompt_template.is_none(), "a model with a template renders prompt/completion rows through it");
        assert_eq!(r.encode_chat(&msgs).unwrap().ids, want);
    }
    // No template: conversations use the built-in kochatgpt, prompt/completion rows the {prompt} template.
    std::fs::write(tmp.path().join("tokenizer_config.json"), "{}").unwrap();
    let r = Renderer::new(&tok, tmp.path(), cfg("", false, TrainOn::AllAssistant)).unwrap();
    assert!(r.prompt_template.is_some());
    assert!(r.describe().contains("kochatgpt"), "{}", r.describe());
    let err = Renderer::new(&tok, tmp.path(), cfg("model", false, TrainOn::AllAssistant)).err().unwrap();
    assert!(format!("{err:#}").contains("has no chat template"), "{err:#}");
}
