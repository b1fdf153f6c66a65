//! `lorafit chat` driven through stdin: two turns, /reset, /exit; Ctrl-D (end of input)
//! leaves cleanly; history stays within the context.
mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use lorafit::chat::Chat;
use lorafit::generate::SamplingConfig;
use lorafit::lora::AdapterSet;
use lorafit::template::Template;
use lorafit::tokenizer::Tokenizer;

fn chat_session(input: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(["chat", "--model", &fixture("gpt2-a").display().to_string(), "--adapter", &fixture("sft-gpt2-a").display().to_string()])
        .args(["--template", "Q: {prompt}\nA:", "--max-new-tokens", "6", "--temperature", "0.7", "--top-k", "20", "--seed", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn two_turns_reset_and_exit_through_stdin() {
    let (ok, out) = chat_session("사과를 영어로?\nand the sky?\n/reset\n/exit\nnever read\n");
    assert!(ok, "{out}");
    assert_eq!(out.matches("> ").count(), 4, "four prompts: two turns, reset, exit\n{out}");
    assert!(out.contains("(conversation cleared)"), "{out}");
    let replies: Vec<&str> = out.split("> ").skip(1).take(2).collect();
    assert!(replies.iter().all(|r| !r.trim().is_empty()), "each turn streams a reply: {out}");
    // End of input (Ctrl-D) leaves with success too.
    let (ok, out) = chat_session("hello\n");
    assert!(ok, "{out}");
}

#[test]
fn history_is_kept_within_the_context() {
    let model = load("gpt2-a", AdapterSet::none());
    let f = files("gpt2-a");
    let tok = Tokenizer::load(&f.tokenizer, &f.config).unwrap();
    let sampling = SamplingConfig { max_new_tokens: 8, temperature: 0.0, ..Default::default() };
    let mut chat = Chat { model: &model, tok: &tok, template: Template::new("Q: {prompt}\nA:").unwrap(), sampling, history: vec![] };
    let mut sink = Vec::new();
    for i in 0..12 {
        chat.turn(&format!("message number {i} about the sea"), &mut sink).unwrap();
    }
    // 64 positions hold only the last few turns: the oldest were dropped, not the newest.
    assert!(chat.history.len() < 12, "old turns dropped");
    assert!(chat.history.last().unwrap().0.contains("number 11"));
}
