//! Issue 11, the command line: flags every command that loads a model takes (`--dtype`,
//! `--quantize`), per-command flags, `generate --template` and the README's example, `bench`
//! flags checked like training flags, target hints that list the model's layer names, and
//! messages that name the key and the fix. Errors go through the real binary: exit code 1
//! (never a panic's 101 or a signal), `error:` first, the key / flag named, a hint where one
//! is known. Builtin models use LORAFIT_CACHE when it is set, else the shared default cache.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::Parser;
use lorafit::cli::{Cli, Command as Sub};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(rel: &str) -> String {
    root().join("tests/fixtures").join(rel).display().to_string()
}

fn lorafit(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorafit"));
    cmd.args(args).current_dir(root()).env("RUST_LOG", "warn").env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run lorafit")
}

/// Runs lorafit, expects success, returns stdout.
fn ok(args: &[&str]) -> String {
    let out = lorafit(args, &[]);
    assert!(out.status.success(), "lorafit {args:?} failed ({:?}):\n{}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs lorafit, expects the error contract (exit 1, `error:` first, no panic) and each needle
/// (case-insensitive) in stderr; returns stderr.
fn fails(args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let out = lorafit(args, env);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let shown = format!("lorafit {}\n--- stderr ---\n{err}", args.join(" "));
    assert_eq!(out.status.code(), Some(1), "exit code {:?} (101 = panic, None = a signal), want 1: {shown}", out.status.code());
    assert!(err.starts_with("error:"), "stderr does not start with `error:`: {shown}");
    assert!(!err.contains("panicked"), "panic: {shown}");
    let lower = err.to_lowercase();
    for n in needles {
        assert!(lower.contains(&n.to_lowercase()), "stderr lacks {n:?}: {shown}");
    }
    err
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

// ---- 1. flags ---------------------------------------------------------------------------------

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("lorafit").chain(args.iter().copied())).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn training_commands_take_dtype_and_quantize() {
    let common = ["--dtype", "bf16", "--quantize", "nf4", "--device", "cpu"];
    for stage in ["sft", "rm", "ppo"] {
        let args: Vec<&str> = [stage].into_iter().chain(common).collect();
        let cfg = match parse(&args).command {
            Sub::Sft(a) => a.resolve("sft").unwrap(),
            Sub::Rm(a) => a.resolve("rm").unwrap(),
            Sub::Ppo(a) => a.resolve("ppo").unwrap(),
            _ => unreachable!(),
        };
        assert_eq!((cfg.model.dtype.as_str(), cfg.model.quantize.as_str()), ("bf16", "nf4"), "{stage}");
    }
    // The pipeline's flags win over the stages' own tables.
    let smoke = root().join("configs/pipeline-smoke.toml").display().to_string();
    let Sub::Pipeline(a) = parse(&["pipeline", "--config", &smoke, "--dtype", "f16", "--quantize", "nf4"]).command else { unreachable!() };
    let stages = lorafit::train::pipeline::stage_configs(&a.config, &a.sets()).unwrap();
    for cfg in &stages {
        assert_eq!((cfg.model.dtype.as_str(), cfg.model.quantize.as_str()), ("f16", "nf4"));
    }

    // Through the binary: a real SFT step on a bf16 NF4 base, recorded in the resolved config.
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run").display().to_string();
    let data = root().join("data/sft_sample.json").display().to_string();
    ok(&["sft", "--model", "builtin:tiny-gpt2", "--data", &data, "--out", &dir, "--dtype", "bf16", "--quantize", "nf4", "--set", "train.max_steps=1", "--set", "data.max_len=64"]);
    let resolved = std::fs::read_to_string(Path::new(&dir).join("config.toml")).unwrap();
    assert!(resolved.contains("dtype = \"bf16\"") && resolved.contains("quantize = \"nf4\""), "{resolved}");

    // A wrong value names the flag.
    fails(&["sft", "--dtype", "f64", "--out", &dir, "--force"], &[], &["--dtype f64", "f32, f16, bf16"]);
}

#[test]
fn adapter_flags_belong_to_the_commands_that_use_them() {
    let help = |cmd: &str| ok(&[cmd, "--help"]);
    let (sft, rm, ppo) = (help("sft"), help("rm"), help("ppo"));
    for h in [&sft, &rm, &ppo] {
        assert!(h.contains("--dtype") && h.contains("--quantize") && h.contains("--device"), "{h}");
    }
    assert!(!sft.contains("--sft-adapter") && !sft.contains("--reward-adapter"), "sft --help:\n{sft}");
    assert!(rm.contains("--sft-adapter") && !rm.contains("--reward-adapter"), "rm --help:\n{rm}");
    assert!(ppo.contains("--sft-adapter") && ppo.contains("--reward-adapter"), "ppo --help:\n{ppo}");
    // And clap refuses them where they mean nothing (a usage error, before anything runs).
    let out = lorafit(&["sft", "--sft-adapter", "x"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = lorafit(&["rm", "--reward-adapter", "x"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn generate_template_and_the_readme_example() {
    // The README's `generate` example, run as written with the model and adapter swapped for
    // local ones: builtin:tiny-gpt2 and an adapter from one SFT step.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let i = lines.iter().position(|l| l.starts_with("lorafit generate --model skt/kogpt2-base-v2")).expect("README has the generate example");
    let mut example = String::new();
    for l in &lines[i..] {
        example.push_str(l.trim_end_matches('\\'));
        if !l.ends_with('\\') {
            break;
        }
    }
    assert!(example.contains("--template kochatgpt"), "{example}");
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("sft").display().to_string();
    let data = root().join("data/sft_sample.json").display().to_string();
    ok(&["sft", "--model", "builtin:tiny-gpt2", "--data", &data, "--out", &adapter, "--set", "train.max_steps=1", "--set", "data.max_len=64"]);
    let bin = env!("CARGO_BIN_EXE_lorafit");
    let command = example
        .replacen("lorafit", &format!("'{bin}'"), 1)
        .replace("skt/kogpt2-base-v2", "builtin:tiny-gpt2")
        .replace("adapters/sft-kogpt2", &adapter)
        + " --max-new-tokens 4";
    let out = Command::new("bash").arg("-c").arg(&command).current_dir(root()).env("RUST_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "{command}\n{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("Below is an instruction") && text.contains("### Response(응답):"), "the prompt went through KoChatGPT's template:\n{text}");

    // Names, a template text, and none.
    let gen = |template: &[&str]| {
        let mut a = vec!["generate", "--model", "builtin:tiny-gpt2", "--prompt", "hi", "--max-new-tokens", "1"];
        a.extend(template);
        ok(&a)
    };
    assert!(gen(&["--template", "Q: {prompt}"]).starts_with("Q: hi"));
    assert!(gen(&["--template", "none"]).starts_with("hi"));
    assert!(gen(&[]).starts_with("hi"), "without --template the prompt is continued as given");
    assert_eq!(gen(&["--template", ""]), gen(&["--template", "kochatgpt"]), "\"\" is KoChatGPT's, as in training and chat");
    fails(
        &["generate", "--model", "builtin:tiny-gpt2", "--prompt", "hi", "--template", "chatml-typo"],
        &[],
        &["--template \"chatml-typo\"", "kochatgpt, none", "{prompt}"],
    );
}

// ---- 2. bench flags ---------------------------------------------------------------------------

#[test]
fn bench_flags_are_checked_like_training_flags() {
    let gpt2 = fixture("gpt2-a");
    let bench = |extra: &[&str], needles: &[&str]| {
        let mut a = vec!["bench", "sft", "--model", gpt2.as_str()];
        a.extend(extra);
        if !extra.contains(&"--seq") {
            a.extend(["--seq", "32"]);
        }
        fails(&a, &[], needles);
    };
    bench(&["--steps", "0"], &["--steps 0", "at least 1"]); // was a panic at bench.rs:132
    bench(&["--batch", "0"], &["--batch 0", "at least 1"]); // was "empty tensor for reduce"
    bench(&["--seq", "0"], &["--seq 0", "at least 2"]);
    bench(&["--r", "0"], &["--r 0", "at least 1"]);
    // Longer than the context: was an attempt to allocate 40 GB for the causal mask (abort).
    fails(&["bench", "sft", "--model", "builtin:tiny-gpt2", "--seq", "100000"], &[], &["--seq 100000", "context of 512"]);
    fails(&["bench", "rm", "--model", &gpt2, "--seq", "65"], &[], &["--seq 65", "context of 64"]);
    // Within the context but past this machine's memory: refused before any allocation.
    fails(&["bench", "sft", "--model", "builtin:tiny-gpt2", "--seq", "512", "--batch", "1000000"], &[], &["--batch 1000000", "available", "lower --seq or --batch"]);
    fails(
        &["bench", "sft", "--model", "builtin:tiny-gpt2", "--seq", "512", "--batch", "100000000"],
        &[],
        &["--batch 100000000", "more than any machine holds", "lower --seq or --batch"],
    );
    fails(&["bench", "generate", "--model", "builtin:tiny-gpt2", "--batch", "100000000"], &[], &["--batch 100000000", "available"]);
    fails(&["bench", "generate", "--model", &gpt2, "--prompt-len", "60", "--new-tokens", "10"], &[], &["--prompt-len 60", "context of 64"]);
    fails(&["bench", "generate", "--model", &gpt2, "--repeats", "0"], &[], &["--repeats 0"]);
    fails(&["bench", "gemm", "--model", &gpt2, "--gemm", "1000000x1000000x1000000"], &[], &["--gemm", "available"]);
    fails(&["bench", "gemm", "--model", &gpt2, "--gemm", "0x8x8"], &[], &["--gemm 0x8x8", "at least 1"]);
    fails(&["bench", "gemm", "--model", &gpt2, "--gemm", "8x8x8", "--quantize", "nf4"], &[], &["--quantize", "does not apply"]);
}

#[test]
fn bench_targets_default_per_architecture() {
    // `--targets` used to default to c_attn, which fails on every LLaMA.
    let r = json(&ok(&["bench", "sft", "--model", &fixture("llama-a"), "--seq", "16", "--steps", "1", "--json"]));
    assert_eq!(r["targets"], serde_json::json!(["q_proj", "v_proj"]), "{r}");
    let r = json(&ok(&["bench", "rm", "--model", &fixture("gpt2-a"), "--seq", "16", "--steps", "1", "--json"]));
    assert_eq!(r["targets"], serde_json::json!(["c_attn"]), "{r}");
    // A name this model does not have: the layer names it does have.
    let err = fails(
        &["bench", "sft", "--model", &fixture("llama-a"), "--seq", "16", "--steps", "1", "--targets", "c_attn"],
        &[],
        &["[\"c_attn\"]", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj", "hint:", "--targets"],
    );
    assert!(!err.contains("pass the same --model"), "{err}");
}

#[test]
fn bench_rm_honours_quantize() {
    // On a 125M-parameter base the NF4 base is a fraction of the f32 one after loading.
    let run = |q: &str| json(&ok(&["bench", "rm", "--model", "builtin:kogpt2-shape", "--seq", "16", "--steps", "1", "--quantize", q, "--json"]));
    let (plain, nf4) = (run("none"), run("nf4"));
    assert_eq!(nf4["quantize"], "nf4", "{nf4}");
    let loaded = |r: &serde_json::Value| r["rss_after_load_bytes"].as_f64().unwrap() - r["peak_rss_before_load_bytes"].as_f64().unwrap();
    let (p, q) = (loaded(&plain), loaded(&nf4));
    assert!(q < 0.5 * p, "bench rm --quantize nf4 loaded {q} bytes, the f32 base {p}: --quantize was ignored");
}

// ---- 3. target hints --------------------------------------------------------------------------

#[test]
fn targets_that_match_nothing_list_the_models_layer_names() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o").display().to_string();
    let data = root().join("data/sft_sample.json").display().to_string();
    for (model, wrong, names) in [
        (fixture("gpt2-a"), "[\"q_proj\"]", "c_attn, c_proj, c_fc"),
        (fixture("llama-a"), "[\"c_attn\"]", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ] {
        let set = format!("lora.target_modules={wrong}");
        let err = fails(&["sft", "--model", &model, "--data", &data, "--out", &out, "--set", &set], &[], &[wrong, names, "hint:", "lora.target_modules"]);
        assert!(!err.contains("pass the same --model"), "a fresh adapter was trained on no model: {err}");
    }
    // A loaded adapter of another architecture: the names too, and the --model hint.
    fails(
        &["eval", "--model", &fixture("gpt2-a"), "--adapter", &fixture("llama-a/adapter"), "--data", &root().join("data/eval_sample.txt").display().to_string()],
        &[],
        &["match no layer", "c_attn, c_proj, c_fc", "hint:", "--model"],
    );
}

// ---- 5. messages ------------------------------------------------------------------------------

#[test]
fn lora_dropout_out_of_range_names_the_key() {
    // In an adapter_config.json: the key, as an invalid value (not an unsupported feature).
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(root().join("tests/fixtures/gpt2-a/adapter").join(f), adapter.join(f)).unwrap();
    }
    let cfg = adapter.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["lora_dropout"] = 1.5.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let (a, data) = (adapter.display().to_string(), root().join("data/eval_sample.txt").display().to_string());
    let err = fails(&["eval", "--model", &fixture("gpt2-a"), "--adapter", &a, "--data", &data], &[], &[&cfg.display().to_string(), "lora_dropout = 1.5", "[0, 1)", "invalid"]);
    assert!(!err.contains("unsupported"), "an out-of-range value is not an unsupported feature: {err}");

    // In a training config: `lora.lora_dropout`, and lora.lora_alpha the same way.
    let out = tmp.path().join("o").display().to_string();
    let err = fails(&["sft", "--out", &out, "--set", "lora.lora_dropout=2"], &[], &["lora.lora_dropout = 2", "[0, 1)"]);
    assert!(!err.contains("unsupported"), "{err}");
    fails(&["sft", "--out", &out, "--set", "lora.lora_alpha=-1"], &[], &["lora.lora_alpha = -1", "positive"]);
    // plan checks them too.
    fails(&["plan", "--set", "lora.lora_dropout=1"], &[], &["lora.lora_dropout = 1"]);
}

#[test]
fn score_context_overflow_hint_is_about_score() {
    let tmp = tempfile::tempdir().unwrap();
    let long = tmp.path().join("long.txt");
    std::fs::write(&long, format!("short line\n{}\n", "lorafit reads text. ".repeat(40))).unwrap();
    let l = long.display().to_string();
    let err = fails(
        &["score", "--model", &fixture("gpt2-a"), "--adapter", &fixture("rm-gpt2-a"), "--data", &l],
        &[],
        &[&l, "entry 2", "context of 64", "hint:", "score reads each entry"],
    );
    let hint = err.lines().find(|l| l.starts_with("hint:")).unwrap();
    assert!(!hint.contains("eval"), "{hint}");
}

// ---- 6. a pipeline config given to a stage ----------------------------------------------------

#[test]
fn pipeline_config_given_to_a_stage() {
    let smoke = root().join("configs/pipeline-smoke.toml").display().to_string();
    for stage in ["sft", "rm", "ppo"] {
        fails(&[stage, "--config", &smoke], &[], &[&smoke, "stages", "hint:", "lorafit pipeline --config"]);
    }
}
