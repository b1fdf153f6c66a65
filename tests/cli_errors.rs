//! Bad input through the real binary: every case must exit 1 (never 0, never a panic's 101) with
//! a one-paragraph message on stderr that starts with `error:`, names the offending file (or
//! key / field) and says what is wrong.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use tempfile::TempDir;

/// Runs lorafit with `args` and `env`, HF / lorafit caches pointed away from the user's.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorafit"));
    cmd.args(args)
        .env("RUST_LOG", "warn") // progress lines (builtin model written) are not part of an error
        .env("RUST_BACKTRACE", "1") // as many developers have it: errors must still be one paragraph
        .env("HF_HOME", empty.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("LORAFIT_CACHE", empty.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run lorafit");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Asserts the error contract and that stderr contains each of `needles` (case-insensitive).
fn expect_error(args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let (code, err) = run(args, env);
    let shown = format!("lorafit {}\n--- stderr ---\n{err}", args.join(" "));
    if std::env::var_os("SHOW_ERRORS").is_some() {
        eprintln!("{shown}"); // to review every message: SHOW_ERRORS=1 cargo test ... -- --nocapture
    }
    assert_eq!(code, Some(1), "exit code {code:?} (101 = panic), want 1: {shown}");
    assert!(err.starts_with("error:"), "stderr does not start with `error:`: {shown}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic: {shown}");
    assert!(!err.trim().contains("\n\n"), "more than one paragraph: {shown}");
    assert!(!err.contains("  0: ") && !err.contains("backtrace"), "backtrace printed: {shown}");
    let lower = err.to_lowercase();
    for n in needles {
        assert!(lower.contains(&n.to_lowercase()), "stderr lacks {n:?}: {shown}");
    }
    err
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A scratch copy of fixture `name`, plus a small valid data file `data.txt`.
struct Fixture {
    _tmp: TempDir,
    root: PathBuf,
    model: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let model = root.join(name);
        copy_dir(&fixtures().join(name), &model);
        std::fs::write(root.join("data.txt"), "hello world\nthe cat sat\n").unwrap();
        Self { _tmp: tmp, root, model }
    }
    fn p(&self, rel: &str) -> String {
        self.model.join(rel).display().to_string()
    }
    fn data(&self) -> String {
        self.root.join("data.txt").display().to_string()
    }
    /// `eval` of data.txt with the model and, if given, one adapter.
    fn eval(&self, adapter: Option<&str>, needles: &[&str]) -> String {
        let (m, d) = (self.model.display().to_string(), self.data());
        let mut args = vec!["eval", "--model", &m, "--data", &d];
        let a;
        if let Some(rel) = adapter {
            a = self.p(rel);
            args.extend(["--adapter", &a]);
        }
        expect_error(&args, &[], needles)
    }
}

fn edit_json(path: &str, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_tensors(path: &str, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut m = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    f(&mut m);
    candle_core::safetensors::save(&m, path).unwrap();
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

const C_ATTN_A: &str = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight";

#[test]
fn config_json_missing_malformed_or_unsupported() {
    let f = Fixture::new("gpt2-a");
    let cfg = f.p("config.json");
    std::fs::rename(&cfg, f.p("config.moved")).unwrap();
    f.eval(None, &[&f.model.display().to_string(), "no config.json"]);

    std::fs::write(&cfg, "{\"model_type\": \"gpt2\",").unwrap();
    f.eval(None, &[&cfg, "not valid json", "line 1"]);

    std::fs::write(&cfg, b"{\"model_type\": \"gpt2\", \"x\": \"\xff\"}").unwrap();
    f.eval(None, &[&cfg, "utf-8"]);

    std::fs::copy(f.p("config.moved"), &cfg).unwrap();
    edit_json(&cfg, |c| _ = c.remove("model_type"));
    f.eval(None, &[&cfg, "model_type"]);

    edit_json(&cfg, |c| _ = c.insert("model_type".into(), "bert".into()));
    f.eval(None, &[&cfg, "\"bert\"", "not supported", "gpt2", "llama"]);

    edit_json(&cfg, |c| {
        c.insert("model_type".into(), "gpt2".into());
        c.remove("n_embd");
    });
    f.eval(None, &[&cfg, "n_embd", "missing"]);

    edit_json(&cfg, |c| {
        c.insert("n_embd".into(), 32.into());
        c.insert("n_head".into(), "four".into());
    });
    f.eval(None, &[&cfg, "field \"n_head\" = \"four\"", "invalid type"]);

    edit_json(&cfg, |c| _ = c.insert("n_head".into(), 5.into()));
    f.eval(None, &[&cfg, "n_embd", "n_head", "divisible"]);
}

#[test]
fn weights_missing_tensor_wrong_shape_truncated() {
    let f = Fixture::new("gpt2-a");
    let w = f.p("model.safetensors");
    let orig = std::fs::read(&w).unwrap();
    let key = "transformer.h.1.mlp.c_fc.weight";
    edit_tensors(&w, |m| _ = m.remove(key));
    f.eval(None, &[&w, key, "cannot find"]);

    std::fs::write(&w, &orig).unwrap();
    edit_tensors(&w, |m| _ = m.insert(key.into(), zeros(&[32, 100])));
    f.eval(None, &[&w, key, "[32, 128]", "[32, 100]"]);

    std::fs::write(&w, &orig[..orig.len() / 2]).unwrap();
    f.eval(None, &[&w, "truncated"]);
    std::fs::write(&w, &orig[..100]).unwrap();
    f.eval(None, &[&w, "truncated"]);

    std::fs::remove_file(&w).unwrap();
    f.eval(None, &[&f.model.display().to_string(), "no weights", "model.safetensors"]);

    let f = Fixture::new("gpt2-a");
    std::fs::remove_file(f.p("tokenizer.json")).unwrap();
    f.eval(None, &[&f.p("tokenizer.json"), "no tokenizer.json"]);
}

#[test]
fn sharded_and_pickle_weights_damaged() {
    let f = Fixture::new("llama-b");
    std::fs::remove_file(f.p("model-00002-of-00003.safetensors")).unwrap();
    f.eval(None, &[&f.p("model.safetensors.index.json"), "model-00002-of-00003.safetensors", "missing"]);

    let f = Fixture::new("gpt2-b");
    let bin = f.p("pytorch_model.bin");
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes[..bytes.len() / 2]).unwrap();
    f.eval(None, &[&bin, "pytorch"]);
}

#[test]
fn adapter_folder_broken() {
    let f = Fixture::new("gpt2-a");
    f.eval(Some("no-such-adapter"), &[&f.p("no-such-adapter"), "does not exist"]);

    let cfg = f.p("adapter/adapter_config.json");
    let orig = std::fs::read(&cfg).unwrap();
    std::fs::remove_file(&cfg).unwrap();
    f.eval(Some("adapter"), &[&cfg, "cannot read", "no such file"]);

    std::fs::write(&cfg, "{\"r\": 4,").unwrap();
    f.eval(Some("adapter"), &[&cfg, "not a valid peft lora config"]);

    std::fs::write(&cfg, &orig).unwrap();
    let st = f.p("adapter/adapter_model.safetensors");
    let st_orig = std::fs::read(&st).unwrap();
    std::fs::write(&st, &st_orig[..st_orig.len() / 2]).unwrap();
    f.eval(Some("adapter"), &[&st, "truncated"]);

    std::fs::remove_file(&st).unwrap();
    f.eval(Some("adapter"), &[&f.p("adapter"), "adapter_model.safetensors"]);
}

#[test]
fn adapter_tensors_do_not_fit_the_model() {
    let f = Fixture::new("gpt2-a");
    let st = f.p("adapter/adapter_model.safetensors");
    let orig = std::fs::read(&st).unwrap();
    let extra = "base_model.model.transformer.h.7.attn.c_attn.lora_A.weight";
    edit_tensors(&st, |m| _ = m.insert(extra.into(), zeros(&[4, 32])));
    f.eval(Some("adapter"), &[&f.p("adapter"), extra, "matches no lora layer", "hint:"]);

    std::fs::write(&st, &orig).unwrap();
    edit_tensors(&st, |m| _ = m.insert("score.weight".into(), zeros(&[2, 32])));
    f.eval(Some("adapter"), &[&st, "score.weight", "not a lora matrix"]);

    std::fs::write(&st, &orig).unwrap();
    edit_tensors(&st, |m| _ = m.insert(C_ATTN_A.into(), zeros(&[4, 30])));
    f.eval(Some("adapter"), &[&f.p("adapter"), C_ATTN_A, "[4, 30]", "[4, 32]"]);

    std::fs::write(&st, &orig).unwrap();
    edit_tensors(&st, |m| _ = m.remove(C_ATTN_A));
    f.eval(Some("adapter"), &[&f.p("adapter"), C_ATTN_A, "no tensor", "hint:"]);
}

#[test]
fn adapter_of_another_model() {
    let f = Fixture::new("gpt2-a");
    copy_dir(&fixtures().join("llama-a/adapter"), &f.model.join("llama"));
    f.eval(Some("llama"), &[&f.p("llama"), "match no layer", "hint:", "--model"]);
    copy_dir(&fixtures().join("gpt2-b/adapter"), &f.model.join("gpt2-b"));
    f.eval(Some("gpt2-b"), &[&f.p("gpt2-b"), "shape", "another base model", "hint:"]);

    // The same GPT-2 adapter on the builtin model (another width): LORAFIT_CACHE is a temp dir.
    let (a, d) = (f.p("adapter"), f.data());
    expect_error(
        &["eval", "--model", "builtin:tiny-gpt2", "--adapter", &a, "--data", &d],
        &[],
        &[&a, "[4, 64]", "[4, 32]", "another base model"],
    );
}

#[test]
fn adapter_config_features_that_change_the_math_are_rejected() {
    let f = Fixture::new("gpt2-a");
    let cfg = f.p("adapter/adapter_config.json");
    let orig = std::fs::read(&cfg).unwrap();
    // (field, value, what the message must say)
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("use_dora", true.into(), "DoRA"),
        ("lora_bias", true.into(), "not supported"),
        ("target_parameters", serde_json::json!(["mlp.experts.gate_up_proj"]), "not supported"),
        ("layer_replication", serde_json::json!([[0, 2], [1, 2]]), "not supported"),
        ("trainable_token_indices", serde_json::json!([3, 4]), "not supported"),
        ("alora_invocation_tokens", serde_json::json!([5, 6]), "not supported"),
        ("layers_to_transform", serde_json::json!([0]), "not supported"),
        ("bias", "all".into(), "supported"),
        ("peft_type", "IA3".into(), "only LORA"),
        ("exclude_modules", "(".into(), "invalid"),
    ];
    for (field, value, what) in cases {
        std::fs::write(&cfg, &orig).unwrap();
        edit_json(&cfg, |c| _ = c.insert(field.to_string(), value.clone()));
        f.eval(Some("adapter"), &[&cfg, field, what, "unsupported adapter configuration"]);
    }
}

#[test]
fn exclude_modules_is_honoured() {
    let f = Fixture::new("gpt2-a");
    let cfg = f.p("adapter/adapter_config.json");
    let st = f.p("adapter/adapter_model.safetensors");
    let orig = std::fs::read(&st).unwrap();
    let (m, a, d) = (f.model.display().to_string(), f.p("adapter"), f.data());
    // PEFT's rule: a list matches by name suffix, a string is a full-match regex.
    for exclude in [serde_json::json!(["c_fc"]), serde_json::json!(r"transformer\.h\.\d+\.mlp\.c_fc")] {
        edit_json(&cfg, |c| _ = c.insert("exclude_modules".into(), exclude));
        // The excluded layers' tensors are then unmatched: the adapter is refused, not half-applied.
        std::fs::write(&st, &orig).unwrap();
        f.eval(Some("adapter"), &[&a, "mlp.c_fc.lora_a.weight", "matches no lora layer"]);
        // Without those tensors it loads and runs.
        edit_tensors(&st, |m| m.retain(|k, _| !k.contains(".c_fc.")));
        let (code, err) = run(&["eval", "--model", &m, "--adapter", &a, "--data", &d], &[]);
        assert_eq!(code, Some(0), "{err}");
    }
}

#[test]
fn data_file_unreadable_invalid_utf8_or_too_long() {
    let f = Fixture::new("gpt2-a");
    let m = f.model.display().to_string();
    let missing = f.root.join("nope.txt").display().to_string();
    expect_error(&["eval", "--model", &m, "--data", &missing], &[], &[&missing, "cannot read", "no such file"]);
    let dir = f.root.display().to_string();
    expect_error(&["eval", "--model", &m, "--data", &dir], &[], &[&dir, "cannot read", "directory"]);

    let bad = f.root.join("cp949.txt");
    std::fs::write(&bad, b"hello\n\xc7\xd1\xb1\xdb text\n").unwrap(); // "한글" in CP949
    let bad = bad.display().to_string();
    expect_error(&["eval", "--model", &m, "--data", &bad], &[], &[&bad, "line 2", "not valid utf-8", "hint:", "iconv"]);

    let long = f.root.join("long.txt");
    std::fs::write(&long, format!("short line\n{}\n", "lorafit reads text. ".repeat(40))).unwrap();
    let long = long.display().to_string();
    expect_error(&["eval", "--model", &m, "--data", &long], &[], &[&long, "line 2", "tokens", "context of 64", "hint:", "split"]);
}

#[test]
fn model_argument_and_device() {
    let f = Fixture::new("gpt2-a");
    let d = f.data();
    expect_error(&["eval", "--model", "builtin:nope", "--data", &d], &[], &["\"nope\"", "unknown builtin", "tiny-gpt2"]);

    let w = f.p("model.safetensors");
    expect_error(&["eval", "--model", &w, "--data", &d], &[], &[&w, "is a file", "folder"]);
    let gone = f.p("gone");
    expect_error(&["eval", "--model", &gone, "--data", &d], &[], &[&gone, "no such folder"]);

    let hf_home = tempfile::tempdir().unwrap();
    let home = hf_home.path().display().to_string();
    let err = expect_error(
        &["eval", "--model", "nobody/no-such-model", "--data", &d],
        &[("HF_HOME", &home), ("HF_HUB_OFFLINE", "1")],
        &["nobody/no-such-model", "HF_HUB_OFFLINE", &home, "download", "--model /path/to/folder"],
    );
    assert!(err.contains("hint:"), "{err}");

    #[cfg(not(feature = "cuda"))]
    {
        let m = f.model.display().to_string();
        expect_error(&["eval", "--model", &m, "--data", &d, "--device", "cuda"], &[], &["--device cuda", "without cuda", "--features cuda"]);
    }
}
