//! DPO pairs longer than `data.max_len` are cut on the prompt side as `rm` cuts them
//! (`Renderer::encode_reward`: earlier exchanges first, then prompt tokens from the left), so
//! both answers and their end-of-turn stay whole and the pair is kept; such rows are counted.
use std::path::{Path, PathBuf};

use lorafit::data::{Example, Message, Prompt, Role};
use lorafit::render::{Encoded, RenderConfig, Renderer};
use lorafit::tokenizer::Tokenizer;
use lorafit::train::batch::SftExample;
use lorafit::train::pairs::read_pairs;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tok(dir: &Path) -> Tokenizer {
    Tokenizer::load(&dir.join("tokenizer.json"), &dir.join("config.json")).unwrap()
}

/// The learned token ids of a sequence.
fn learned(ids: &[u32], spans: &[std::ops::Range<usize>]) -> Vec<u32> {
    spans.iter().flat_map(|r| ids[r.clone()].iter().copied()).collect()
}

fn answers(e: &Encoded) -> Vec<u32> {
    learned(&e.ids, &e.learned_spans())
}

fn of(e: &SftExample) -> Vec<u32> {
    learned(&e.ids, &e.learned)
}

#[test]
fn long_conversational_pairs_keep_both_answers_whole() {
    let d = fixture("chat/qwen3");
    let t = tok(&d);
    let rc = |max_len| RenderConfig { chat_template: "model".into(), max_len, ..Default::default() };
    let long = "tell me more about this topic ".repeat(6);
    let prompt = vec![
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, long.as_str()),
        Message::new(Role::Assistant, long.as_str()),
        Message::new(Role::User, "so, yes or no?"),
    ];
    let (chosen, rejected) = ("Yes, and here is why: it is simply the better answer.", "No.");
    let row = serde_json::json!({
        "prompt": serde_json::to_value(&prompt).unwrap(),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    });
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, format!("{row}\n")).unwrap();

    // Untruncated: the answers as they should be learned, and the longer sequence's length.
    let ex = Example::Ranked {
        prompt: Prompt::Messages(prompt.clone()),
        completions: [chosen, rejected].map(|c| lorafit::data::Completion::Messages(vec![Message::new(Role::Assistant, c)])).to_vec(),
        pairs: vec![(0, 1)],
    };
    let full = Renderer::new(&t, &d, rc(100_000)).unwrap().encode_reward(&ex).unwrap();
    let longest = full.iter().map(|e| e.ids.len()).max().unwrap();
    // A budget the chosen sequence only fits by losing the first exchange.
    let max_len = longest - 10;
    let r = Renderer::new(&t, &d, rc(max_len)).unwrap();
    let (pairs, stats) = read_pairs(&data, &r, false).unwrap();
    assert_eq!((stats.pairs, stats.dropped, stats.prompt_cut, stats.truncated), (1, 0, 1, 1), "{stats:?}");
    let p = &pairs[0];
    assert!(p.chosen.ids.len() <= max_len && p.rejected.ids.len() <= max_len);
    assert_eq!(of(&p.chosen), answers(&full[0]), "the chosen answer and its end-of-turn are whole");
    assert_eq!(of(&p.rejected), answers(&full[1]), "the rejected answer and its end-of-turn are whole");
    // Each sequence ends at its answer's end-of-turn and keeps the system message.
    for (e, f) in [(&p.chosen, &full[0]), (&p.rejected, &full[1])] {
        assert_eq!(e.ids.last(), f.ids.last());
        assert_eq!(e.ids[..5], f.ids[..5], "the system message stays");
    }
    // As `rm` renders it with the same budget.
    let rm = r.encode_reward(&ex).unwrap();
    assert_eq!((p.chosen.ids.clone(), p.rejected.ids.clone()), (rm[0].ids.clone(), rm[1].ids.clone()));
}

#[test]
fn long_text_pairs_lose_prompt_tokens_before_answer_tokens() {
    let d = fixture("gpt2-a");
    let t = tok(&d);
    let (prompt, chosen, rejected) = ("word ".repeat(10), format!("'{}", "yes ".repeat(20)), "no ".repeat(12));
    let row = serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected});
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, format!("{row}\n")).unwrap();
    let full = Renderer::new(&t, &d, RenderConfig { template: "Q: {prompt}\nA:".into(), max_len: 100_000, ..Default::default() }).unwrap();
    let ex = Example::Ranked { prompt: Prompt::Text(prompt.clone()), completions: [chosen, rejected].map(lorafit::data::Completion::Text).to_vec(), pairs: vec![(0, 1)] };
    let want = full.encode_example(&ex).unwrap();
    // (The chosen answer's leading quote is stripped, `data.strip_leading_quote`, both ways.)
    // The chosen answer is longer than half the budget: the old cut (half kept for the prompt)
    // lost its end; now only prompt tokens go.
    let max_len = want[0].learned() + 4;
    assert!(want[0].learned() > max_len / 2 && want[0].ids.len() > max_len);
    assert!(full.encode_prompt(&Prompt::Text(prompt.clone())).unwrap().ids.len() < max_len, "the prompt alone fits");
    let r = Renderer::new(&t, &d, RenderConfig { template: "Q: {prompt}\nA:".into(), max_len, ..Default::default() }).unwrap();
    let (pairs, stats) = read_pairs(&data, &r, false).unwrap();
    assert_eq!((stats.pairs, stats.prompt_cut, stats.prompt_too_long), (1, 1, 0), "{stats:?}");
    assert_eq!(of(&pairs[0].chosen), answers(&want[0]));
    assert_eq!(of(&pairs[0].rejected), answers(&want[1]));
    assert_eq!(pairs[0].chosen.ids.len(), max_len);
}
