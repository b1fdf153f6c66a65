//! `lorafit export` through the real binary: what it writes (Modelfile, inspect), and bad input,
//! which must exit 1 with a message that names the flag or file and the fix, and leave nothing
//! half-written (no file replaced that lorafit did not write, no temp file left).
mod common;

use std::path::Path;
use std::process::Command;

use common::fixture;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(args).env("RUST_LOG", "warn").env("HF_HUB_OFFLINE", "1").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = run(args);
    assert_eq!(code, Some(0), "lorafit {}\n{err}", args.join(" "));
    out
}

/// Exit code 1, `error:` first, no panic, and each needle (case-insensitive) in stderr.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let (code, _, err) = run(args);
    let shown = format!("lorafit {}\n--- stderr ---\n{err}", args.join(" "));
    assert_eq!(code, Some(1), "{shown}");
    assert!(err.starts_with("error:") && !err.contains("panicked"), "{shown}");
    for n in needles {
        assert!(err.to_lowercase().contains(&n.to_lowercase()), "missing {n:?}: {shown}");
    }
    err
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn no_temps(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.contains(".tmp-") || n.ends_with(".lock")).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn export_writes_gguf_modelfile_and_inspect_shows_it() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m.gguf");
    let m = s(&fixture("llama-a"));
    let a = s(&fixture("llama-a").join("adapter"));
    let report = ok(&["export", "--model", &m, "--adapter", &format!("{a}:0.5"), "--quant", "q8_0", "--out", &s(&out), "--ollama"]);
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r["architecture"], "llama");
    assert_eq!(r["bytes"].as_u64().unwrap(), std::fs::metadata(&out).unwrap().len());
    // 88-wide ffn_down rows are no multiple of 32: f16, said so.
    assert!(r["fallbacks"].as_array().unwrap().iter().any(|f| f.as_str().unwrap().contains("ffn_down")), "{report}");
    let mf = std::fs::read_to_string(t.path().join("Modelfile")).unwrap();
    assert!(mf.starts_with("# Modelfile written by lorafit") && mf.contains("FROM ./m.gguf") && mf.contains("PARAMETER stop \"<|endoftext|>\""), "{mf}");
    let shown = ok(&["inspect", &s(&out)]);
    for needle in ["architecture:   llama", "Q8_0", "F16", "tokenizer:      gpt2 (pre gpt-2), 400 tokens", "exported by:    lorafit", &format!("adapter:        {a} (weight 0.5)")] {
        assert!(shown.contains(needle), "inspect lacks {needle:?}:\n{shown}");
    }
    // --force replaces lorafit's own file (and Modelfile).
    ok(&["export", "--model", &m, "--quant", "f16", "--out", &s(&out), "--ollama", "--force"]);
    assert!(ok(&["inspect", &s(&out)]).contains("adapter:        (none: the base model)"));
    // The adapter alone, and a Modelfile with ADAPTER.
    let lora = t.path().join("lora.gguf");
    ok(&["export", "--model", &m, "--adapter", &a, "--format", "gguf-lora", "--out", &s(&lora), "--ollama", "--force"]);
    let shown = ok(&["inspect", &s(&lora)]);
    assert!(shown.contains("LoRA adapter (28 tensors) for a llama model, alpha 8"), "{shown}");
    assert!(std::fs::read_to_string(t.path().join("Modelfile")).unwrap().contains("ADAPTER ./lora.gguf"));
    no_temps(t.path());
}

#[test]
fn bad_input_is_refused_with_the_fix() {
    let t = tempfile::tempdir().unwrap();
    let m = s(&fixture("gpt2-a"));
    let out = t.path().join("x.gguf");
    let o = s(&out);
    // A quant type llama.cpp's mixes do not include / lorafit does not write.
    fails(&["export", "--model", &m, "--quant", "q3_k_s", "--out", &o], &["--quant q3_k_s", "llama-quantize", "q4_k_m"]);
    fails(&["export", "--model", &m, "--quant", "q7", "--out", &o], &["--quant q7", "no such type", "q4_k_m"]);
    fails(&["export", "--model", &m, "--format", "ggml", "--out", &o], &["--format ggml", "gguf-lora"]);
    fails(&["export", "--model", &m, "--format", "gguf-lora", "--out", &o], &["--adapter"]);
    fails(&["export", "--model", &m, "--adapter", &s(&fixture("gpt2-a").join("adapter")), "--format", "gguf-lora", "--quant", "q4_k_m", "--out", &o], &["--quant q4_k_m", "f32, f16, bf16 or q8_0"]);
    // An existing file: --force needed; a file lorafit did not write is never replaced.
    std::fs::write(&out, b"my notes").unwrap();
    fails(&["export", "--model", &m, "--out", &o], &[&o, "already exists", "--force"]);
    fails(&["export", "--model", &m, "--out", &o, "--force"], &[&format!("--out {o}"), "not written by lorafit", "hint:"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"my notes");
    // A folder as --out.
    fails(&["export", "--model", &m, "--out", &s(t.path())], &["is a folder", "model.gguf"]);
    // A Modelfile lorafit did not write blocks --ollama before anything is written.
    let out2 = t.path().join("y.gguf");
    std::fs::write(t.path().join("Modelfile"), "FROM llama3\n").unwrap();
    fails(&["export", "--model", &m, "--out", &s(&out2), "--ollama", "--force"], &["--ollama: the Modelfile", "not written by lorafit"]);
    assert!(!out2.exists());
    // Another export writing the same file (its advisory lock held): refused at once.
    let lock = std::fs::File::create(t.path().join(".y.gguf.lock")).unwrap();
    lock.try_lock().unwrap();
    fails(&["export", "--model", &m, "--out", &s(&out2)], &["y.gguf is being written by", "wait"]);
    drop(lock);
    std::fs::remove_file(t.path().join(".y.gguf.lock")).unwrap();
    // A temp file a killed export left is removed by the next one.
    std::fs::write(t.path().join(".y.gguf.tmp-999999999"), b"partial").unwrap();
    ok(&["export", "--model", &m, "--out", &s(&out2)]);
    assert!(out2.exists());
    // A reward model is no generation model.
    fails(&["export", "--model", &m, "--adapter", &s(&fixture("rm-gpt2-a")), "--out", &s(&t.path().join("z.gguf"))], &["reward model", "SFT or PPO"]);
    no_temps(t.path());
}

#[test]
fn unsupported_tokenizer_and_architecture_are_refused_with_the_reason() {
    let t = tempfile::tempdir().unwrap();
    // gpt2-a with a KoGPT2-style tokenizer: Metaspace BPE, no byte fallback.
    let d = t.path().join("metaspace");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("gpt2-a").join(f), d.join(f)).unwrap();
    }
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("gpt2-a").join("tokenizer.json")).unwrap()).unwrap();
    tok["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
    tok["decoder"] = serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let out = t.path().join("new-folder").join("k.gguf");
    fails(&["export", "--model", &s(&d), "--out", &s(&out)], &["tokenizer.json", "llama.cpp cannot represent", "byte"]);
    assert!(!t.path().join("new-folder").exists(), "the folder the failed export created is removed");
    // A model_type llama.cpp runs only with a file lorafit does not write (Gemma 3's vision
    // tower needs a separate mmproj GGUF).
    let q = fixture("families/gemma3-mm");
    let (code, _, err) = run(&["export", "--model", &s(&q), "--out", &s(&out)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("\"gemma3\"") && err.contains("mmproj"), "{err}");
    no_temps(t.path());
}

#[test]
fn the_real_kogpt2_tokenizer_is_refused_and_gpt2s_is_exported() {
    let t = tempfile::tempdir().unwrap();
    for (asset, good) in [("kogpt2/tokenizer.json", false), ("gpt2/tokenizer.json", true)] {
        let Some(tok) = common::shared_asset(asset) else { return };
        let d = t.path().join(asset.replace('/', "-"));
        std::fs::create_dir_all(&d).unwrap();
        // A GPT-2 of the tokenizer's vocabulary, weights from gpt2-a's shapes except the embedding.
        let vocab = if good { 50257 } else { 51200 };
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("gpt2-a").join("config.json")).unwrap()).unwrap();
        cfg["vocab_size"] = vocab.into();
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        let mut w = candle_core::safetensors::load(fixture("gpt2-a").join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
        w.insert("transformer.wte.weight".into(), candle_core::Tensor::zeros((vocab, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
        candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
        std::fs::copy(&tok, d.join("tokenizer.json")).unwrap();
        let out = t.path().join("o.gguf");
        if good {
            ok(&["export", "--model", &s(&d), "--out", &s(&out), "--force"]);
            let shown = ok(&["inspect", &s(&out)]);
            assert!(shown.contains("tokenizer:      gpt2 (pre gpt-2), 50257 tokens"), "{shown}");
        } else {
            fails(&["export", "--model", &s(&d), "--out", &s(&out)], &["Metaspace", "KoGPT2", "llama.cpp cannot represent"]);
        }
    }
}
