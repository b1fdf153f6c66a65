//! GRPO: advantages and the three loss normalisations against TRL's own `_compute_loss` on
//! fixture numbers (value and gradient); a regex reward rises within seconds; a SIGKILLed run
//! resumes to the same adapter bit for bit; the adapter loads in PEFT with the same NLL; the
//! command-reward protocol and its errors; bad input fails before anything is written; the
//! sft -> grpo pipeline.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use common::*;
use lorafit::lora::AdapterSet;
use lorafit::train::config::TrainConfig;
use lorafit::train::grpo;
use lorafit::train::grpo_math::{group_advantages, grpo_loss, token_weights, LossParams};
use lorafit::train::Start;
use serde_json::Value;

fn data() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/grpo_arith.jsonl").display().to_string()
}

/// The recipe of every run here: gpt2-a, short prompts and completions, 4 prompts x group 4.
fn sets(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("model.name={:?}", fixture("gpt2-a").display().to_string()),
        format!("data.path={:?}", data()),
        format!("out.dir={:?}", out.display().to_string()),
        "data.template=\"Q: {prompt}\\nA:\"".into(),
        "grpo.max_prompt_len=20".into(),
        "grpo.max_new_tokens=8".into(),
        "grpo.sample_every=0".into(),
        "train.batch_size=4".into(),
        "train.lr=2e-2".into(),
        "lora.target_modules=[\"c_attn\",\"c_fc\"]".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A config with one `[[grpo.rewards]]` table written as TOML.
fn config(dir: &Path, out: &Path, rewards: &str, extra: &[&str]) -> TrainConfig {
    let file = dir.join(format!("{}.toml", out.file_name().unwrap().to_string_lossy()));
    std::fs::write(&file, rewards).unwrap();
    TrainConfig::load(Some(&file), &sets(out, extra)).unwrap()
}

const REGEX_E: &str = "[[grpo.rewards]]\nkind = \"regex\"\npattern = \"e\"\n";

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn advantages_and_loss_types_match_trl() {
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(fixture("grpo/trl_loss.json")).unwrap()).unwrap();
    let v = |x: &Value| -> Vec<f32> { x.as_array().unwrap().iter().map(|y| y.as_f64().unwrap() as f32).collect() };
    let (g, max_len) = (fx["group_size"].as_u64().unwrap() as usize, fx["max_completion_length"].as_u64().unwrap() as usize);
    let lens: Vec<usize> = fx["lens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let rewards = v(&fx["rewards"]);
    for (scale, key) in [(true, "scaled"), (false, "unscaled")] {
        let ours = group_advantages(&rewards, g, scale).unwrap();
        let d = max_abs_diff(&ours, &v(&fx["advantages"][key]));
        assert!(d < 1e-5, "{key} advantages differ from TRL's by {d}");
    }
    let dev = Device::Cpu;
    let (logp, old, reference) = (v(&fx["logp"]), v(&fx["old"]), v(&fx["ref"]));
    for case in fx["cases"].as_array().unwrap() {
        let (lt, scale) = (case["loss_type"].as_str().unwrap(), case["scale_rewards"].as_bool().unwrap());
        let p = LossParams { epsilon: case["epsilon"].as_f64().unwrap(), epsilon_high: case["epsilon_high"].as_f64().unwrap(), beta: case["beta"].as_f64().unwrap() };
        let adv = group_advantages(&rewards, g, scale).unwrap();
        let adv_tok: Vec<f32> = lens.iter().zip(&adv).flat_map(|(&n, &a)| std::iter::repeat_n(a, n)).collect();
        let w = token_weights(&lens, lt, max_len).unwrap();
        let x = Var::new(logp.as_slice(), &dev).unwrap();
        let t = |s: &[f32]| Tensor::new(s, &dev).unwrap();
        let r = t(&reference);
        let (loss, stats) = grpo_loss(x.as_tensor(), &t(&old), Some(&r), &t(&adv_tok), &t(&w), p).unwrap();
        let ours = loss.to_scalar::<f32>().unwrap() as f64;
        let theirs = case["loss"].as_f64().unwrap();
        assert!((ours - theirs).abs() < 1e-6 + 1e-5 * theirs.abs(), "{lt} (scale {scale}): loss {ours} vs TRL {theirs}");
        let grad = loss.backward().unwrap().get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let d = max_abs_diff(&grad, &v(&case["grad"]));
        assert!(d < 1e-6, "{lt} (scale {scale}, eps {:?}): d loss / d logp differs from TRL's by {d}", p);
        let clip = stats.clipped as f64 / stats.tokens as f64;
        assert!((clip - case["clip_ratio"].as_f64().unwrap()).abs() < 1e-6, "{lt}: clip ratio {clip} vs TRL {}", case["clip_ratio"]);
        if let Some(kl) = case["kl"].as_f64() {
            assert!((stats.kl_sum / stats.tokens as f64 - kl).abs() < 1e-5, "{lt}: kl");
        }
    }
}

#[test]
fn a_regex_reward_rises_and_the_metrics_are_all_there() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let s = grpo::run(&config(dir.path(), &out, REGEX_E, &["train.max_steps=40", "train.seed=1"]), Start::Fresh).unwrap();
    assert_eq!(s.iterations, 40);
    let m = metrics(&out);
    assert_eq!(m.len(), 40);
    for k in ["reward_mean", "reward_std", "reward_regex", "kl_mean", "clip_ratio", "completion_len", "entropy", "loss", "time_generate_s", "time_update_s", "peak_rss_after_update_mib"] {
        assert!(m.iter().all(|l| l[k].as_f64().is_some_and(f64::is_finite)), "every line has a finite {k}");
    }
    let r: Vec<f64> = m.iter().map(|l| l["reward_mean"].as_f64().unwrap()).collect();
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (first, last) = (mean(&r[..10]), mean(&r[30..]));
    assert!(last > first + 0.2, "reward_mean {first:.3} (first 10) -> {last:.3} (last 10)");
    assert_eq!(m[0]["kl_mean"].as_f64().unwrap(), 0.0, "policy = reference before the first update");
    assert!(m.iter().all(|l| l["kl_mean"].as_f64().unwrap() >= 0.0), "k3 is never negative");
    assert!(out.join("adapter_model.safetensors").is_file() && out.join("reward.png").is_file());
    // The adapter records the template its prompts went through, as sft / rm / ppo adapters do.
    let rec = lorafit::render::TemplateRecord::read(&out).unwrap().expect("lorafit.json records the template");
    assert!(rec.prompt_template.is_some() || rec.chat_template.is_some(), "{rec:?}");

    // β = 0: no reference pass (no KL logged); Dr. GRPO / DAPO settings run too.
    let out = dir.path().join("nokl");
    grpo::run(&config(dir.path(), &out, REGEX_E, &["train.max_steps=2", "grpo.beta=0", "grpo.loss_type=\"dapo\"", "grpo.scale_rewards=false", "grpo.num_iterations=2"]), Start::Fresh).unwrap();
    assert!(metrics(&out).iter().all(|l| l.get("kl_mean").is_none()));
}

#[test]
fn killed_grpo_resumes_to_the_same_adapter() {
    let bin = env!("CARGO_BIN_EXE_lorafit");
    let dir = tempfile::tempdir().unwrap();
    let rewards = dir.path().join("rewards.toml");
    std::fs::write(&rewards, REGEX_E).unwrap();
    let args = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = vec!["grpo".into(), "--config".into(), rewards.display().to_string()];
        for s in sets(out, &["train.max_steps=24", "train.save_every=3", "grpo.num_iterations=2"]) {
            v.push("--set".into());
            v.push(s);
        }
        v
    };
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    assert!(std::process::Command::new(bin).args(args(&full)).env("RUST_LOG", "warn").status().unwrap().success());
    common::kill_at_first_checkpoint(&args(&cut), &cut, std::time::Duration::from_millis(2));
    let mut resume = args(&cut);
    resume.push("--resume".into());
    assert!(std::process::Command::new(bin).args(resume).env("RUST_LOG", "warn").status().unwrap().success());
    let (a, b) = (std::fs::read(full.join("adapter_model.safetensors")).unwrap(), std::fs::read(cut.join("adapter_model.safetensors")).unwrap());
    assert!(a == b, "the resumed adapter differs from the uninterrupted one");
    let strip = |v: &Value| -> Value {
        let mut o = v.as_object().unwrap().clone();
        o.retain(|k, _| !k.starts_with("time_") && !k.starts_with("peak_rss"));
        Value::Object(o)
    };
    let (ma, mb): (Vec<_>, Vec<_>) = (metrics(&full).iter().map(strip).collect(), metrics(&cut).iter().map(strip).collect());
    assert_eq!(ma, mb, "the resumed metrics log reads as the uninterrupted one");
}

/// tests/fixtures/grpo/gpt2-a: an adapter trained by `lorafit grpo` (the recipe is in
/// scripts/fixtures/grpo_fixture.py's header), evaluated by PEFT with
/// scripts/fixtures/peft_nll.py. lorafit's NLL with it equals PEFT's, and it is not the base.
#[test]
fn the_grpo_adapter_loads_in_peft_with_the_same_nll() {
    let committed = fixture("grpo/gpt2-a");
    let peft: Value = serde_json::from_str(&std::fs::read_to_string(committed.join("peft_nll.json")).unwrap()).unwrap();
    let a = lorafit::peft::load_adapter(&committed, "grpo", 1.0, false).unwrap();
    let model = load("gpt2-a", AdapterSet::new(vec![a]));
    let exp = expected("gpt2-a");
    let mut moved = 0.0f64;
    for (i, ids) in exp.ids.iter().enumerate() {
        let ours = model.sequence_nll(ids).unwrap().to_scalar::<f32>().unwrap() as f64;
        let theirs = peft["nll"][i].as_f64().unwrap();
        assert!((ours - theirs).abs() < 2e-4, "line {i}: lorafit {ours} vs PEFT {theirs}");
        moved = moved.max((ours - exp.base.nll[i]).abs());
    }
    assert!(moved > 1e-3, "the adapter changes the model (max NLL change {moved})");
}

/// A shell program as an argv list (no shell is involved in starting it: `sh` is the program).
fn sh(script: &str) -> String {
    format!("command = [\"sh\", \"-c\", {:?}]\n", script)
}

#[test]
fn command_rewards_speak_json_lines_and_their_failures_name_program_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("seen.jsonl");
    // 1 for a completion of the row whose answer is 16, else 0.5; every request kept.
    let script = format!(
        "while IFS= read -r l; do printf '%s\\n' \"$l\" >> {}; case \"$l\" in *'\"answer\":\"16\"'*) echo 1;; *) echo 0.5;; esac; done",
        log.display()
    );
    let out = dir.path().join("ok");
    let text = format!("[[grpo.rewards]]\nkind = \"command\"\nname = \"judge\"\n{}weight = 2.0\n", sh(&script));
    grpo::run(&config(dir.path(), &out, &text, &["train.max_steps=2"]), Start::Fresh).unwrap();
    let seen: Vec<Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(seen.len(), 1 + 2 * 4 * 4, "one check line, then one line per completion");
    assert_eq!(seen[0]["completion"], "", "the check line has an empty completion");
    for s in &seen {
        assert!(s["prompt"].as_str().unwrap().starts_with("What is") && s["completion"].is_string() && s["row"]["answer"].is_string(), "{s}");
        assert_eq!(s["row"]["prompt"], s["prompt"]);
    }
    for l in metrics(&out) {
        let r = l["reward_judge"].as_f64().unwrap();
        assert!((0.5..=1.0).contains(&r));
        assert!((l["reward_mean"].as_f64().unwrap() - 2.0 * r).abs() < 1e-6, "the total is the weighted sum");
    }

    // A program that exits, hangs, or prints text: an error naming the program and the row; nothing written.
    for (name, script, timeout, want) in [
        ("exits", "exit 3", 5.0, "exited"),
        ("hangs", "sleep 30", 0.5, "no answer within 0.5 s"),
        ("text", "while read l; do echo hello; done", 5.0, "answered \"hello\""),
    ] {
        let out = dir.path().join(name);
        let text = format!("[[grpo.rewards]]\nkind = \"command\"\n{}timeout_s = {timeout}\n", sh(script));
        let err = format!("{:#}", grpo::run(&config(dir.path(), &out, &text, &["train.max_steps=1"]), Start::Fresh).unwrap_err());
        assert!(err.contains(want) && err.contains("sh -c") && err.contains("grpo_arith.jsonl: line 1"), "{name}: {err}");
        assert!(!out.exists(), "{name}: nothing written");
    }
    // The string form is split into words without a shell: a missing program is named.
    let out = dir.path().join("missing");
    let text = "[[grpo.rewards]]\nkind = \"command\"\ncommand = \"no-such-program-lorafit score.py\"\n";
    let err = format!("{:#}", grpo::run(&config(dir.path(), &out, text, &["train.max_steps=1"]), Start::Fresh).unwrap_err());
    assert!(err.contains("cannot start the reward command `no-such-program-lorafit score.py`"), "{err}");
    assert!(!out.exists());
}

#[test]
fn bad_input_is_refused_naming_the_key_or_row_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let load = |out: &Path, rewards: &str, extra: &[&str]| -> anyhow::Result<TrainConfig> {
        let file = dir.path().join("r.toml");
        std::fs::write(&file, rewards).unwrap();
        TrainConfig::load(Some(&file), &sets(out, extra))
    };
    let out = dir.path().join("x");
    let err = format!("{:#}", load(&out, REGEX_E, &["grpo.group_size=1"]).unwrap_err());
    assert!(err.contains("grpo.group_size") && err.contains("advantage"), "{err}");
    let err = format!("{:#}", load(&out, "[[grpo.rewards]]\nkind = \"regex\"\npattern = \"(unclosed\"\n", &[]).unwrap_err());
    assert!(err.contains("grpo.rewards[0]") && err.contains("pattern") && err.contains("(unclosed"), "{err}");
    let err = format!("{:#}", load(&out, "[[grpo.rewards]]\nkind = \"regex\"\npatern = \"x\"\n", &[]).unwrap_err());
    assert!(err.contains("patern"), "unknown keys are refused: {err}");
    let err = format!("{:#}", load(&out, "[[grpo.rewards]]\nkind = \"bleu\"\n", &[]).unwrap_err());
    assert!(err.contains("grpo.rewards[0].kind") && err.contains("regex, exact, length, command or model"), "{err}");
    let err = format!("{:#}", load(&out, REGEX_E, &["grpo.loss_type=\"bnpo\""]).unwrap_err());
    assert!(err.contains("grpo.loss_type"), "{err}");
    assert!(!out.exists());

    // An exact reward whose field a row lacks: the file, the row and the field.
    let rows = dir.path().join("rows.jsonl");
    std::fs::write(&rows, "{\"prompt\": \"1 + 1?\", \"answer\": \"2\"}\n{\"prompt\": \"2 + 2?\"}\n").unwrap();
    let exact = "[[grpo.rewards]]\nkind = \"exact\"\nfield = \"answer\"\nextract = \"#### (.*)\"\n";
    let cfg = load(&out, exact, &[&format!("data.path={:?}", rows.display().to_string())]).unwrap();
    let err = format!("{:#}", grpo::run(&cfg, Start::Fresh).unwrap_err());
    assert!(err.contains("rows.jsonl: line 2") && err.contains("\"answer\""), "{err}");
    assert!(!out.exists(), "nothing written");
    // No rewards at all.
    let err = format!("{:#}", grpo::run(&load(&out, "", &[]).unwrap(), Start::Fresh).unwrap_err());
    assert!(err.contains("grpo.rewards is empty"), "{err}");
    assert!(!out.exists());
}

#[test]
fn rule_rewards_score_as_documented_and_sft_then_grpo_runs_as_a_pipeline() {
    use lorafit::train::grpo_rewards::{Rewards, Scored};
    let specs: TrainConfig = toml::from_str(
        "[[grpo.rewards]]\nkind = \"exact\"\nfield = \"answer\"\nextract = '\\\\boxed\\{(.*)\\}'\n\
         [[grpo.rewards]]\nkind = \"regex\"\npattern = \"[0-9]\"\nnegate = true\nweight = 0.5\n\
         [[grpo.rewards]]\nkind = \"length\"\nmin = 3\nmax = 12\n",
    )
    .unwrap();
    let mut r = Rewards::new(&specs.grpo.rewards).unwrap();
    assert_eq!(r.names, ["exact", "regex", "length"]);
    let row = serde_json::json!({"prompt": "p", "answer": "42"});
    let loc = lorafit::data::Loc { file: "f".into(), kind: "line", n: 1 };
    let prompt = Value::String("p".into());
    let items: Vec<Scored> = ["so \\boxed{ 42 }", "\\boxed{41}", "no"].iter().map(|c| Scored { prompt: &prompt, completion: c, row: &row, loc: &loc }).collect();
    let per = r.score(&items, &[]).unwrap();
    assert_eq!(per, vec![vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0], vec![0.0, 1.0, 0.0]]);
    assert_eq!(r.total(&per), vec![1.0, 1.0, 0.5]);

    // sft -> grpo: the GRPO stage starts from (and is referenced to) the SFT adapter.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pipe");
    let cfg = dir.path().join("pipe.toml");
    let text = format!(
        "[model]\nname = {:?}\n[data]\ntemplate = \"Q: {{prompt}}\\nA:\"\neval_fraction = 0.0\n[lora]\ntarget_modules = [\"c_attn\"]\n\
         [train]\nbatch_size = 2\n[out]\ndir = {:?}\n[stages.sft.data]\npath = {:?}\n[stages.sft.train]\nmax_steps = 2\n\
         [stages.grpo.data]\npath = {:?}\n[stages.grpo.train]\nmax_steps = 2\n[stages.grpo.grpo]\nmax_prompt_len = 20\nmax_new_tokens = 6\n\
         [[stages.grpo.grpo.rewards]]\nkind = \"regex\"\npattern = \"e\"\n",
        fixture("gpt2-a").display().to_string(),
        root.display().to_string(),
        fixture("sft_rows.json").display().to_string(),
        data()
    );
    std::fs::write(&cfg, text).unwrap();
    let (_, _, g) = lorafit::train::pipeline::grpo_stages(&cfg, &[]).unwrap().unwrap();
    assert_eq!(PathBuf::from(&g.grpo.sft_adapter), root.join("sft"));
    let s = lorafit::train::pipeline::run(&cfg, &[], Start::Fresh).unwrap();
    assert!(s.grpo.is_some() && s.ppo.is_none() && s.rm.is_none());
    assert!(root.join("grpo/adapter_model.safetensors").is_file() && root.join("sft/adapter_model.safetensors").is_file());
    // --resume of the finished pipeline reads both summaries and runs nothing.
    assert_eq!(lorafit::train::pipeline::run(&cfg, &[], Start::Resume).unwrap().grpo.unwrap().iterations, 2);
}

#[test]
fn reward_flags_add_a_reward_model_and_a_command_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli");
    let mut args: Vec<String> = vec![
        "grpo".into(),
        "--reward-adapter".into(),
        fixture("rm-gpt2-a").display().to_string(),
        "--reward-command".into(),
        "sh -c 'while read l; do echo 0.25; done'".into(),
    ];
    for s in sets(&out, &["train.max_steps=2", "grpo.beta=0"]) {
        args.push("--set".into());
        args.push(s);
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit")).args(&args).env("RUST_LOG", "warn").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for l in metrics(&out) {
        let (m, c) = (l["reward_model"].as_f64().unwrap(), l["reward_command"].as_f64().unwrap());
        assert_eq!(c, 0.25);
        assert!((l["reward_mean"].as_f64().unwrap() - (m + c)).abs() < 1e-5, "weights 1: the total is the sum");
    }
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains("kind = \"model\"") && saved.contains("kind = \"command\""), "the flags are part of the run's config");
}
