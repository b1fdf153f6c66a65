//! `lorafit plan` for the preference methods: a `[dpo]` / `[grpo]` config is planned as that
//! method (its pairs / prompts read), a pipeline with `[stages.dpo]` / `[stages.grpo]` stage by
//! stage, and the predicted peak is within 15% (the bound of tests/plan.rs) of the peak RSS a
//! real `lorafit dpo` / `lorafit grpo` run on the KoGPT2 shape measures (its summary.json).
use std::path::Path;
use std::process::Command;

fn lorafit(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "lorafit {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

fn repo(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn dpo_and_grpo_configs_and_pipelines_are_planned() {
    // A single config with a [dpo] table: the dpo stage, its pairs read (rankings expand).
    let p = lorafit(&["plan", "--config", &repo("configs/dpo-smoke.toml"), "--json"]);
    assert_eq!(p["stage"], "dpo", "{p:#}");
    assert!(p["data"]["pairs"].as_u64().unwrap() > p["data"]["rows"].as_u64().unwrap() / 2, "{p:#}");
    assert!(p["data"]["longest_tokens"].as_u64().unwrap() > 0);
    let g = lorafit(&["plan", "--config", &repo("configs/grpo-smoke.toml"), "--json"]);
    assert_eq!(g["stage"], "grpo", "{g:#}");
    assert!(g["data"]["longest_tokens"].as_u64().unwrap() > 0);
    // orpo needs no reference; the plan still names a peak that is a sum of its components.
    let o = lorafit(&["plan", "--config", &repo("configs/dpo-smoke.toml"), "--set", "dpo.loss=\"orpo\"", "--json"]);
    let sum: u64 = o["components"].as_array().unwrap().iter().map(|c| c["bytes"].as_u64().unwrap()).sum();
    assert_eq!(sum, o["peak_bytes"].as_u64().unwrap());
    // Pipelines: sft -> dpo and sft -> grpo, every stage planned, --stage picks one.
    for (file, second) in [("configs/pipeline-dpo-smoke.toml", "dpo"), ("configs/pipeline-grpo-smoke.toml", "grpo")] {
        let p = lorafit(&["plan", "--config", &repo(file), "--json"]);
        let stages: Vec<&str> = p["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
        assert_eq!(stages, ["sft", second], "{file}");
        let one = lorafit(&["plan", "--config", &repo(file), "--stage", second, "--json"]);
        assert_eq!(one["stages"].as_array().unwrap().len(), 1);
    }
    // A bad loss is refused by name.
    let out = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(["plan", "--config", &repo("configs/dpo-smoke.toml"), "--set", "dpo.loss=\"sigmiod\""]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("sigmiod"));
}

/// Random lowercase text of `n` characters (1 token each: the builtin tokenizer is byte-level).
fn text(seed: &mut u64, n: usize) -> String {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (b'a' + ((*seed >> 33) % 26) as u8) as char
        })
        .collect()
}

/// (measured peak RSS of the run, planned peak) for `method` run with `args`.
fn measure(method: &str, args: &[String], out: &Path) -> (f64, f64) {
    let mut run: Vec<&str> = vec![method];
    run.extend(args.iter().map(String::as_str));
    let o = out.display().to_string();
    run.extend(["--out", &o, "--force"]);
    let status = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(&run).env("RUST_LOG", "warn").stdout(std::process::Stdio::null()).status().unwrap();
    assert!(status.success(), "lorafit {run:?}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let measured = summary["peak_rss_bytes"].as_f64().expect("peak RSS is measured on Linux");
    let mut plan: Vec<&str> = vec!["plan", "--stage", method, "--json"];
    plan.extend(args.iter().map(String::as_str));
    let predicted = lorafit(&plan)["peak_bytes"].as_f64().unwrap();
    eprintln!("{method}: measured {:.1} MiB, planned {:.1} MiB ({:+.1}%)", measured / 1048576.0, predicted / 1048576.0, (predicted / measured - 1.0) * 100.0);
    (measured, predicted)
}

#[test]
fn plan_matches_measured_peak_rss_of_dpo_and_grpo() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 7;
    // DPO as in scripts/bench/dpo.sh: 2 pairs x 256 tokens (128 prompt + 127 completion + eos).
    let pairs = dir.path().join("pairs.jsonl");
    let rows: Vec<String> = (0..4).map(|_| serde_json::json!({"prompt": text(&mut seed, 128), "chosen": text(&mut seed, 127), "rejected": text(&mut seed, 127)}).to_string()).collect();
    std::fs::write(&pairs, rows.join("\n")).unwrap();
    let common = ["--model", "builtin:kogpt2-shape", "--set", "lora.target_modules=[\"c_attn\",\"c_proj\",\"c_fc\"]", "--set", "lora.r=8", "--set", "train.batch_size=2", "--set", "train.max_steps=2", "--set", "train.save_every=0"];
    let mut dpo: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    dpo.extend(["--data", pairs.to_str().unwrap(), "--set", "data.template=\"{prompt}\"", "--set", "data.max_len=512", "--set", "data.eval_fraction=0", "--set", "lora.lora_dropout=0.0"].map(String::from));
    // GRPO: 2 prompts of 64 tokens x group 4 x 64 new tokens, a reference pass (beta > 0).
    let prompts = dir.path().join("prompts.jsonl");
    let rows: Vec<String> = (0..4).map(|_| serde_json::json!({"prompt": text(&mut seed, 64)}).to_string()).collect();
    std::fs::write(&prompts, rows.join("\n")).unwrap();
    let cfg = dir.path().join("grpo.toml");
    std::fs::write(&cfg, "[grpo]\ngroup_size = 4\nmax_new_tokens = 64\nbeta = 0.04\n[[grpo.rewards]]\nkind = \"length\"\nmin = 4\nmax = 100\n").unwrap();
    let mut grpo: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    grpo.extend(["--config", cfg.to_str().unwrap(), "--data", prompts.to_str().unwrap(), "--set", "data.template=\"{prompt}\""].map(String::from));
    let runs = [measure("dpo", &dpo, &dir.path().join("dpo")), measure("grpo", &grpo, &dir.path().join("grpo"))];
    for (measured, predicted) in runs {
        assert!((predicted / measured - 1.0).abs() < 0.15, "planned {predicted} bytes, measured {measured}");
    }
}
