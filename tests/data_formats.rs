//! Data formats (issue 13) and the data-reader items of issue 11: conversations (`messages`,
//! ShareGPT `conversations`, TRL's conversational prompt/completion and preference rows, PPO
//! prompts as messages) in JSON, JSON Lines and Parquet; bad rows named by file, row and field
//! and skipped with --skip-bad-rows, malformed JSON Lines lines included; a pretty-printed JSON
//! object explained.
use std::path::{Path, PathBuf};

use lorafit::data::{read_examples, read_prompts, read_ranked, read_sft, Completion, Example, Message, Prompt, Role, Stage};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

fn u(s: &str) -> Message {
    Message::new(Role::User, s)
}
fn a(s: &str) -> Message {
    Message::new(Role::Assistant, s)
}
fn sys(s: &str) -> Message {
    Message::new(Role::System, s)
}

#[test]
fn conversations_in_every_shape() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = write(
        &dir,
        "chat.jsonl",
        concat!(
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#, "\n",
            r#"{"conversations": [{"from": "human", "value": "안녕"}, {"from": "gpt", "value": "안녕하세요"}, {"from": "human", "value": "잘 가"}, {"from": "gpt", "value": "또 봐요"}]}"#, "\n",
            r#"{"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}"#, "\n",
            r#"{"prompt": "plain", "completion": "text"}"#, "\n",
            r#"{"instruction": "do", "input": "this", "output": "done"}"#, "\n",
        ),
    );
    let (rows, stats) = read_examples(&jsonl, Stage::Sft, false).unwrap();
    assert_eq!(stats.rows, 5);
    let got: Vec<Example> = rows.into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        got,
        vec![
            Example::Chat(vec![sys("Be brief."), u("Hi"), a("Hello")]),
            Example::Chat(vec![u("안녕"), a("안녕하세요"), u("잘 가"), a("또 봐요")]),
            Example::Chat(vec![u("Q"), a("A")]),
            Example::Completion { prompt: "plain".into(), completion: "text".into() },
            Example::Completion { prompt: "do\n\nthis".into(), completion: "done".into() },
        ]
    );
    // The same rows as one JSON array (pretty-printed over many lines).
    let arr: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let json = write(&dir, "chat.json", &serde_json::to_string_pretty(&arr).unwrap());
    let again: Vec<Example> = read_examples(&json, Stage::Sft, false).unwrap().0.into_iter().map(|(_, e)| e).collect();
    assert_eq!(again, got);

    // Preference rows: TRL's explicit and implicit prompt, and KoChatGPT rankings.
    let pref = write(
        &dir,
        "pref.jsonl",
        concat!(
            r#"{"prompt": [{"role": "user", "content": "Best fruit?"}], "chosen": [{"role": "assistant", "content": "Mango"}], "rejected": [{"role": "assistant", "content": "Rock"}]}"#, "\n",
            r#"{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]}"#, "\n",
            r#"{"prompt": "p", "completion_0": "a", "completion_1": "b", "ranking": [1, 0]}"#, "\n",
        ),
    );
    let got: Vec<Example> = read_examples(&pref, Stage::Preference, false).unwrap().0.into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        got[0],
        Example::Ranked { prompt: Prompt::Messages(vec![u("Best fruit?")]), completions: vec![Completion::Messages(vec![a("Mango")]), Completion::Messages(vec![a("Rock")])], pairs: vec![(0, 1)] }
    );
    assert_eq!(
        got[1],
        Example::Ranked { prompt: Prompt::Messages(vec![u("Hi")]), completions: vec![Completion::Messages(vec![a("Hello!")]), Completion::Messages(vec![a("Go away")])], pairs: vec![(0, 1)] }
    );
    assert!(matches!(&got[2], Example::Ranked { pairs, .. } if pairs == &vec![(1, 0)]));

    // PPO prompts as messages (a trailing assistant turn is what PPO generates: dropped).
    let got: Vec<Example> = read_examples(&jsonl, Stage::Prompts, false).unwrap().0.into_iter().map(|(_, e)| e).collect();
    assert_eq!(got[0], Example::Prompt(Prompt::Messages(vec![sys("Be brief."), u("Hi")])));
    assert_eq!(got[3], Example::Prompt(Prompt::Text("plain".into())));
}

#[test]
fn parquet_is_read_row_group_by_row_group() {
    let (rows, stats) = read_examples(&fixture("messages.parquet"), Stage::Sft, false).unwrap();
    assert_eq!(stats.rows, 5, "3 row groups: 2 + 2 + 1 rows");
    assert_eq!(rows[0].1, Example::Chat(vec![sys("You are a helpful assistant."), u("Hi!"), a("Hello! How can I help?")]));
    assert_eq!(rows[1].1, Example::Chat(vec![u("서울은 어디에 있나요?"), a("서울은 한국에 있습니다.")]));
    assert_eq!(rows[4].1, Example::Chat(vec![u("Say nothing."), a("")]));
    assert_eq!(rows[2].0.to_string(), format!("{}: row 3", fixture("messages.parquet").display()));
    let (rows, _) = read_examples(&fixture("preference.parquet"), Stage::Preference, false).unwrap();
    assert_eq!(
        rows[1].1,
        Example::Ranked { prompt: Prompt::Messages(vec![u("가장 큰 바다는?")]), completions: vec![Completion::Messages(vec![a("태평양입니다.")]), Completion::Messages(vec![a("모릅니다.")])], pairs: vec![(0, 1)] }
    );
    // A codec this build lacks is named, with the fix.
    if !cfg!(feature = "parquet-zstd") {
        let err = format!("{:#}", read_examples(&fixture("messages_zstd.parquet"), Stage::Sft, false).unwrap_err());
        assert!(err.contains("zstd") && err.contains("row 1"), "{err}");
    }
}

#[test]
fn bad_conversation_rows_name_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    let cases: &[(&str, &str)] = &[
        (r#"{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}"#, "line 2: field \"messages\"[0].role = \"robot\": unknown role"),
        (r#"{"messages": []}"#, "line 2: field \"messages\" is an empty conversation"),
        (r#"{"messages": [{"role": "user", "content": "q"}]}"#, "line 2: field \"messages\" has no assistant turn"),
        (
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            "line 2: field \"messages\"[1]: a second system message",
        ),
        (r#"{"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}"#, "line 2: field \"messages\"[0].content must be a string, found an array"),
        (r#"{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}"#, "line 2: field \"conversations\"[0].value must be a string, found a number"),
        (r#"{"conversations": [{"from": "bard", "value": "q"}]}"#, "line 2: field \"conversations\"[0].from = \"bard\": unknown role"),
        (r#"{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}"#, "line 2: field \"messages\"[0]: an assistant turn before any user turn"),
        (r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}"#, "line 2: field \"chosen\"[0] has role user"),
        (r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": [{"role": "assistant", "content": "y"}]}"#, "line 2: field \"chosen\" is empty: the assistant turn is missing"),
    ];
    for (i, (bad, want)) in cases.iter().enumerate() {
        let f = write(&dir, &format!("bad{i}.jsonl"), &format!("{ok}\n{bad}\n{ok}\n"));
        let stage = if bad.contains("chosen") { Stage::Preference } else { Stage::Sft };
        let ok_row = if stage == Stage::Preference {
            r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}"#
        } else {
            ok
        };
        std::fs::write(&f, format!("{ok_row}\n{bad}\n{ok_row}\n")).unwrap();
        let err = format!("{:#}", read_examples(&f, stage, false).unwrap_err());
        assert!(err.contains(&f.display().to_string()) && err.contains(want), "case {i}: {err}");
        let (rows, stats) = read_examples(&f, stage, true).unwrap();
        assert_eq!((rows.len(), stats.skipped_bad), (2, 1), "case {i}: skipped and counted");
    }
}

/// Issue 11: --skip-bad-rows skips (and counts) a malformed JSON Lines line too, in every reader.
#[test]
fn skip_bad_rows_skips_malformed_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "sft.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": \n{\"prompt\": 3}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n");
    let err = format!("{:#}", read_sft(&f, false).unwrap_err());
    assert!(err.contains("line 2: invalid JSON"), "{err}");
    let (rows, _, skipped) = read_sft(&f, true).unwrap();
    assert_eq!((rows.len(), skipped), (2, 2), "the malformed line and the wrong-typed field");
    let (rows, stats) = read_examples(&f, Stage::Sft, true).unwrap();
    assert_eq!((rows.len(), stats.skipped_bad), (2, 2));
    let (prompts, skipped) = read_prompts(&f, true).unwrap();
    assert_eq!((prompts.len(), skipped), (2, 2), "{prompts:?}");
    let r = write(&dir, "rm.jsonl", "{\"prompt\": \"p\", \"chosen\": \"x\", \"rejected\": \"y\"}\n{oops\n");
    assert_eq!(read_ranked(&r, true).unwrap().1, 1);
    // A malformed element of a JSON array is one bad row too.
    let arr = write(&dir, "arr.json", "[{\"prompt\": \"a\", \"completion\": \"b\"},\n {\"prompt\": tru, \"x\": 1},\n {\"prompt\": \"c\", \"completion\": \"d\"}]");
    let err = format!("{:#}", read_sft(&arr, false).unwrap_err());
    assert!(err.contains("row 2 (line 2): invalid JSON"), "{err}");
    assert_eq!(read_sft(&arr, true).unwrap().2, 1);
    // Broken structure is not a row: always an error.
    let open = write(&dir, "open.json", "[{\"prompt\": \"a\", \"completion\": \"b\"}, {\"prompt\": \"c\"");
    assert!(format!("{:#}", read_sft(&open, true).unwrap_err()).contains("not closed"));
    let trail = write(&dir, "trail.json", "[{\"prompt\": \"a\", \"completion\": \"b\"}] x");
    assert!(format!("{:#}", read_sft(&trail, true).unwrap_err()).contains("text after the end of the JSON array"));
}

/// Issue 11: a pretty-printed JSON object is named as such, with the accepted shapes.
#[test]
fn a_pretty_printed_object_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "data.json", "{\n  \"data\": [\n    {\"prompt\": \"a\", \"completion\": \"b\"}\n  ]\n}\n");
    let err = format!("{:#}", read_sft(&f, true).unwrap_err());
    assert!(err.contains("one JSON object") && err.contains("\"data\"") && err.contains("JSON array of row objects") && err.contains("JSON Lines") && err.contains("Parquet"), "{err}");
    assert!(!err.contains("invalid JSON (read as JSON Lines"), "{err}");
}
