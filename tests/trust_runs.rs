//! Issue 11, the training side: a run folder is locked, checked and replaced only where lorafit
//! wrote it; wrong optimizer settings are refused and a diverged run writes no NaN adapter;
//! stale temp files go; `--resume` forgives a differently spelled or moved folder, names what
//! differs, leaves a finished run alone and keeps step 1's loss; a crash before the first
//! checkpoint is met with `--force`; no SFT row panics; without a terminal the progress is
//! plain lines, and every run says where its output is and what to run next; the plots have
//! titles, axes, ticks and legends. CLI cases run the built binary and must exit 1 (never 101
//! or a signal) with a message naming the file or key and the fix.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorafit"));
    c.env_remove("RUST_LOG").env("RUST_BACKTRACE", "1").env("HF_HUB_OFFLINE", "1");
    c
}

/// `sft` on the fixture GPT-2 into `out`, with `extra` --set values.
fn sft_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "sft".into(),
        "--model".into(),
        fixture("gpt2-a").display().to_string(),
        "--data".into(),
        fixture("sft_rows.json").display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    for s in ["data.template=\"Q: {prompt}\\nA:\"", "lora.target_modules=[\"c_attn\"]", "train.batch_size=4", "train.lr=1e-3", "data.max_len=64"]
        .iter()
        .chain(extra)
    {
        v.push("--set".into());
        v.push(s.to_string());
    }
    v
}

fn run(args: &[String]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The error contract: exit code 1 (not a panic's 101, not a signal), `error:` first, each of
/// `needles` in the message (case-insensitive).
fn expect_error(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit status {:?} (101 = panic), want 1:\n{err}", o.status);
    assert!(!err.contains("panicked"), "panic:\n{err}");
    let e = err[err.find("error:").unwrap_or_else(|| panic!("no `error:` line:\n{err}"))..].to_lowercase();
    for n in needles {
        assert!(e.contains(&n.to_lowercase()), "the error lacks {n:?}:\n{err}");
    }
    err
}

fn expect_ok(o: &Output) -> String {
    let err = stderr(o);
    assert!(o.status.success(), "exit status {:?}:\n{err}", o.status);
    err
}

/// Waits until `path` holds `text` (a process has written it).
fn wait_for(path: &Path, text: &str, child: &mut Child) {
    let t0 = Instant::now();
    while !std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
        assert!(child.try_wait().unwrap().is_none(), "the first run ended before {} held {text:?}", path.display());
        assert!(t0.elapsed() < Duration::from_secs(120), "{} never held {text:?}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A PID that no process has (a child that has exited).
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_second_run_into_the_same_folder_fails_at_once_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = sft_args(&out, &["train.max_steps=200", "train.save_every=50"]);
    let mut first = bin().args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for(&out.join(".lorafit.lock"), &format!("pid {}", first.id()), &mut first);
    let t0 = Instant::now();
    let second = run(&args);
    expect_error(&second, &[&out.display().to_string(), "lock", &format!("pid {}", first.id()), "wait for that run"]);
    assert!(t0.elapsed() < Duration::from_secs(10), "the second run failed at once");
    assert!(first.wait().unwrap().success(), "the first run is undisturbed");
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 200, "one run's metrics, not two interleaved");

    // Two pipelines into one root: the root is locked too.
    let cfg = pipeline_config(dir.path(), "pipe", 30);
    let pargs: Vec<String> = vec!["pipeline".into(), "--config".into(), cfg.display().to_string()];
    let root = dir.path().join("pipe");
    let mut first = bin().args(&pargs).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for(&root.join(".lorafit.lock"), &format!("pid {}", first.id()), &mut first);
    expect_error(&run(&pargs), &[&root.display().to_string(), "lock", &format!("pid {}", first.id())]);
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn wrong_optimizer_and_lora_settings_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (set, key) in [
        ("train.adam_beta2=1.0", "train.adam_beta2"),
        ("train.adam_beta1=-0.1", "train.adam_beta1"),
        ("train.adam_eps=0", "train.adam_eps"),
        ("lora.lora_alpha=0", "lora.lora_alpha"),
        ("lora.lora_dropout=1.0", "lora.lora_dropout"),
        ("train.max_grad_norm=-1", "train.max_grad_norm"),
    ] {
        let out = dir.path().join(key);
        let err = expect_error(&run(&sft_args(&out, &[set, "train.max_steps=2"])), &[key, "--set"]);
        assert!(!out.exists(), "{set}: nothing written\n{err}");
    }
}

#[test]
fn a_diverged_run_stops_with_an_error_and_writes_no_nan_adapter() {
    // lr 1e39 overflows f32 in the first AdamW update: the adapter turns to inf / NaN.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = expect_error(&run(&sft_args(&out, &["train.lr=1e39", "train.max_steps=4", "train.save_every=1"])), &["diverged", "step 1", "lower train.lr"]);
    assert!(err.contains("base_model.model"), "the message names the tensor:\n{err}");
    assert!(!out.join("adapter_model.safetensors").exists(), "no adapter exported");
    assert!(lorafit::train::checkpoint::list(&out).unwrap().is_empty(), "no non-finite checkpoint");
    assert!(!out.join("summary.json").exists());
}

/// The guard through the library: a method whose trainables go non-finite at step 3 stops the
/// run there; the checkpoints of steps 1 and 2 stay, finite, and nothing is exported.
#[test]
fn divergence_keeps_the_last_finite_checkpoint() {
    use lorafit::lora::{Adapter, AdapterSet};
    use lorafit::train::session::{Method, Session, StepOut, Trainer};
    use lorafit::train::{GradAccum, Start};

    struct Poison;
    impl Method for Poison {
        fn lens(&self) -> Vec<usize> {
            vec![1; 8]
        }
        fn batches_per_step(&self) -> usize {
            1
        }
        fn group_by_length(&self) -> bool {
            false
        }
        fn step(&mut self, tr: &mut Trainer, _: &[Vec<usize>]) -> anyhow::Result<StepOut> {
            if tr.step == 2 {
                let (_, v) = &tr.vars()[0];
                v.set(&(v.as_tensor().ones_like()? * f64::NAN)?)?;
            }
            tr.apply(GradAccum::new(tr.vars().len()))?;
            Ok(StepOut { metrics: Default::default(), show: String::new(), tokens: 1 })
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let sets: Vec<String> = vec![
        format!("model.name={:?}", fixture("gpt2-a").display().to_string()),
        format!("out.dir={:?}", out.display().to_string()),
        "train.max_steps=5".into(),
        "train.save_every=1".into(),
        "train.keep_last=10".into(),
        "train.batch_size=1".into(),
    ];
    let cfg = lorafit::train::config::TrainConfig::load(None, &sets).unwrap();
    let mut session = Session::open(&cfg, "sft", Start::Fresh, &[]).unwrap();
    let a = Adapter::fresh("sft", lorafit::train::batch::lora_config(&cfg, &lorafit::model::Arch::from_file(&files("gpt2-a").config).unwrap()), 1).unwrap();
    let model = load("gpt2-a", AdapterSet::new(vec![a.clone()]));
    let e = session.train(&model, &a, a.vars(), &mut Poison).err().expect("the run stops");
    assert_eq!(lorafit::error::kind_of(&e), Some(lorafit::error::Kind::Diverged));
    let msg = format!("{e:#}");
    assert!(msg.contains("step 3 of 5") && msg.contains("step-00000002"), "{msg}");
    let kept = lorafit::train::checkpoint::list(&out).unwrap();
    assert_eq!(kept.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect::<Vec<_>>(), ["step-00000001", "step-00000002"]);
    let t = candle_core::safetensors::load(kept[1].join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(t.values().all(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite())));
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn stale_temp_files_of_killed_runs_are_removed_when_the_folder_is_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = sft_args(&out, &["train.max_steps=6", "train.save_every=2", "train.keep_last=3"]);
    expect_ok(&run(&args));
    // As a run killed while writing step 6 leaves it.
    let ckpts = lorafit::train::checkpoint::list(&out).unwrap();
    std::fs::remove_dir_all(ckpts.last().unwrap()).unwrap();
    let dead = dead_pid();
    let tmp_ckpt = out.join(format!("checkpoints/.step-00000006.tmp-{dead}"));
    std::fs::create_dir_all(&tmp_ckpt).unwrap();
    std::fs::write(tmp_ckpt.join("optimizer.safetensors"), vec![0u8; 1000]).unwrap();
    let tmp_file = out.join(format!(".adapter_model.safetensors.tmp-{dead}"));
    std::fs::write(&tmp_file, "half").unwrap();
    let live = out.join(format!(".notes.txt.tmp-{}", std::process::id()));
    std::fs::write(&live, "a live process's temp").unwrap();
    let mut resume = args.clone();
    resume.push("--resume".into());
    expect_ok(&run(&resume));
    assert!(!tmp_ckpt.exists() && !tmp_file.exists(), "stale temps removed");
    assert!(live.exists(), "a temp whose process still runs is kept");
}

/// A checkpoint that cannot be written leaves no temp folder behind.
#[test]
fn a_failed_checkpoint_removes_its_temp_folder() {
    use lorafit::lora::{Adapter, AdapterSet, LoraConfig, TargetModules};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let cfg = LoraConfig { r: 2, lora_alpha: 4.0, target_modules: TargetModules::List(vec!["c_attn".into()]), ..Default::default() };
    let a = Adapter::fresh("sft", cfg, 1).unwrap();
    let _model = load("gpt2-a", AdapterSet::new(vec![a.clone()]));
    let opt = lorafit::train::optim::AdamW::new(a.vars(), &Default::default()).unwrap();
    let state = lorafit::train::checkpoint::TrainState {
        step: 1,
        epoch: 0,
        batch_in_epoch: 1,
        dropout_rng: vec![],
        tokens_seen: 0,
        config: String::new(),
        extra: serde_json::Value::Null,
    };
    // A file where the checkpoint folder goes: the final move fails.
    std::fs::create_dir_all(out.join("checkpoints")).unwrap();
    std::fs::write(out.join("checkpoints/step-00000001"), "in the way").unwrap();
    assert!(lorafit::train::checkpoint::save(out, &a, "m", &opt, &state, 2, &[], &[]).is_err());
    let left: Vec<String> = std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(left, ["step-00000001"], "no temp folder left");
}

#[test]
fn resume_forgives_the_folder_name_names_differences_and_keeps_step_one() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let rel = |out: &str| -> Vec<String> { sft_args(Path::new(out), &["train.max_steps=6", "train.save_every=2", "lora.lora_dropout=0.1"]) };
    let go = |args: &[String]| bin().args(args).current_dir(cwd).output().unwrap();
    expect_ok(&go(&rel("full")));
    expect_ok(&go(&rel("o/run")));
    let summary = |d: &str| -> serde_json::Value { serde_json::from_slice(&read(&cwd.join(d).join("summary.json"))).unwrap() };
    // Cut the run back to step 4, as a kill after that checkpoint leaves it.
    let cut = |d: &str| {
        let last = lorafit::train::checkpoint::list(&cwd.join(d)).unwrap().pop().unwrap();
        std::fs::remove_dir_all(last).unwrap();
    };
    cut("o/run");
    let mut args = rel("./o/run/");
    args.push("--resume".into());
    expect_ok(&go(&args));
    assert_eq!(read(&cwd.join("full/adapter_model.safetensors")), read(&cwd.join("o/run/adapter_model.safetensors")));
    assert_eq!(summary("full")["first_loss"], summary("o/run")["first_loss"], "first_loss is step 1's, not the first after the resume");
    assert_eq!(summary("full")["final_loss"], summary("o/run")["final_loss"]);

    // Moved: resumes from its new place.
    std::fs::rename(cwd.join("o/run"), cwd.join("o/moved")).unwrap();
    cut("o/moved");
    let mut args = rel("o/moved");
    args.push("--resume".into());
    expect_ok(&go(&args));
    assert_eq!(read(&cwd.join("full/adapter_model.safetensors")), read(&cwd.join("o/moved/adapter_model.safetensors")));

    // Changed settings: each key named with both values.
    cut("o/moved");
    let mut args = sft_args(Path::new("o/moved"), &["train.max_steps=6", "train.save_every=2", "lora.lora_dropout=0.2", "train.seed=7"]);
    args.push("--resume".into());
    expect_error(&go(&args), &["lora.lora_dropout = 0.1 when started, 0.2 now", "train.seed = 42 when started, 7 now", "config.toml"]);
}

#[test]
fn resume_of_a_finished_run_says_so_and_keeps_its_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = sft_args(&out, &["train.max_steps=3"]);
    expect_ok(&run(&args));
    let (summary, adapter) = (read(&out.join("summary.json")), read(&out.join("adapter_model.safetensors")));
    let mut resume = args.clone();
    resume.push("--resume".into());
    let o = run(&resume);
    let err = expect_ok(&o);
    assert!(err.contains("finished run"), "{err}");
    assert_eq!(read(&out.join("summary.json")), summary, "summary.json untouched");
    assert_eq!(read(&out.join("adapter_model.safetensors")), adapter);
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(printed["first_loss"].is_f64() && printed["steps"] == 3, "the stored summary is printed: {printed}");
    // And a run without flags into it is refused: it is finished, --force replaces it.
    expect_error(&run(&args), &[&out.display().to_string(), "finished", "--force"]);
}

#[test]
fn a_run_killed_before_its_first_checkpoint_is_restarted_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // What a run killed while writing its first checkpoint leaves.
    std::fs::create_dir_all(out.join(format!("checkpoints/.step-00000002.tmp-{}", dead_pid()))).unwrap();
    std::fs::write(out.join(".lorafit"), "{\"lorafit\": \"0.1.0\", \"kind\": \"sft\"}").unwrap();
    std::fs::write(out.join("config.toml"), "").unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 3.0}\n").unwrap();
    let args = sft_args(&out, &["train.max_steps=2"]);
    let err = expect_error(&run(&args), &[&out.display().to_string(), "before its first checkpoint", "--force"]);
    assert!(!err.contains("pass --resume"), "no advice to resume what cannot be resumed:\n{err}");
    let mut resume = args.clone();
    resume.push("--resume".into());
    expect_error(&run(&resume), &["nothing to resume", "--force"]);
    let mut force = args.clone();
    force.push("--force".into());
    expect_ok(&run(&force));
    assert!(out.join("adapter_model.safetensors").is_file());
}

#[test]
fn an_empty_prompt_with_a_long_completion_trains_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.json");
    let long = "a long answer that does not fit ".repeat(20);
    let rows: Vec<serde_json::Value> = (0..6).map(|i| serde_json::json!({"prompt": "", "completion": format!("{i} {long}")})).collect();
    std::fs::write(&data, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = dir.path().join("run");
    let mut args = sft_args(&out, &["data.template=\"{prompt}\"", "data.max_len=16", "train.max_steps=2", "data.eval_fraction=0"]);
    let i = args.iter().position(|a| a == "--data").unwrap();
    args[i + 1] = data.display().to_string();
    expect_ok(&run(&args));
    let s: serde_json::Value = serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(s["prep"]["truncated"], 6);
    assert!(s["final_loss"].as_f64().unwrap().is_finite());
}

#[test]
fn without_a_terminal_progress_is_plain_lines_and_the_run_ends_with_what_to_do_next() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = expect_ok(&run(&sft_args(&out, &["train.max_steps=6", "train.log_every=2"])));
    assert!(!err.contains('\u{1b}'), "no ANSI escape codes in a log:\n{err}");
    assert!(!err.contains("lorafit::"), "short labels, not module paths:\n{err}");
    for step in [2, 4, 6] {
        let line = err.lines().find(|l| l.contains(&format!("step {step}/6"))).unwrap_or_else(|| panic!("no line for step {step}:\n{err}"));
        assert!(line.contains(" sft: "), "{line}");
        for k in ["loss ", "lr ", "tok/s", "elapsed "] {
            assert!(line.contains(k), "{line} lacks {k:?}");
        }
        assert_eq!(line.contains("ETA"), step < 6, "{line}");
    }
    assert!(!err.contains("step 1/6") && !err.contains("step 3/6"), "one line per log_every steps:\n{err}");
    let o = out.display().to_string();
    assert!(err.contains(&format!("output in {o}")), "{err}");
    assert!(err.contains(&format!("lorafit generate --model {} --adapter {o}", fixture("gpt2-a").display())), "{err}");
    assert!(err.contains(&format!("lorafit merge --model {} --adapter {o}", fixture("gpt2-a").display())), "{err}");
}

/// A pipeline config on the fixture GPT-2 with its root in `dir/name`.
fn pipeline_config(dir: &Path, name: &str, ppo_steps: usize) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let q = |p: PathBuf| toml::Value::String(p.display().to_string()).to_string();
    let text = format!(
        "[model]\nname = {}\n[data]\ntemplate = \"Q: {{prompt}}\\nA:\"\nmax_len = 64\n[lora]\ntarget_modules = [\"c_attn\"]\n\
         [train]\nbatch_size = 4\nlr = 1e-3\n[out]\ndir = {}\n\
         [stages.sft.data]\npath = {}\n[stages.sft.train]\nmax_steps = 4\n\
         [stages.rm.data]\npath = {}\n[stages.rm.train]\nmax_steps = 3\n\
         [stages.ppo.data]\npath = {}\n[stages.ppo.train]\nmax_steps = {ppo_steps}\n[stages.ppo.ppo]\nmax_prompt_len = 20\nmax_new_tokens = 6\nminibatch_size = 2\n",
        q(fixture("gpt2-a")),
        q(dir.join(name)),
        q(fixture("sft_rows.json")),
        q(fixture("rm_ko_rows.json")),
        q(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/ppo_prompts.json")),
    );
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn pipeline_resume_on_a_finished_pipeline_says_so_and_ppo_plots_reward_and_kl() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = pipeline_config(dir.path(), "pipe", 3);
    let args: Vec<String> = vec!["pipeline".into(), "--config".into(), cfg.display().to_string()];
    let err = expect_ok(&run(&args));
    let root = dir.path().join("pipe");
    assert!(err.contains(&format!("lorafit generate --model {} --adapter {}", fixture("gpt2-a").display(), root.join("ppo").display())), "{err}");
    let mut resume = args.clone();
    resume.push("--resume".into());
    let o = run(&resume);
    let err = expect_ok(&o);
    assert!(err.contains("finished pipeline"), "{err}");
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for stage in ["sft", "rm", "ppo"] {
        assert!(s[stage].is_object(), "{stage}: the stored summary, not null: {s}");
    }
    // PPO's plot: reward and KL.
    let png = root.join("ppo/reward.png");
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let info = dec.read_info().unwrap().info().clone();
    assert_eq!(info.width, 800);
    assert!(info.height > 500, "two panels");
}

#[test]
fn plots_have_a_title_axis_labels_ticks_and_a_legend() {
    use lorafit::train::plot::{render, PanelSpec};
    let logged: Vec<serde_json::Value> = (1..=40)
        .map(|s| {
            let mut v = serde_json::json!({"step": s, "loss": 3.0 / (s as f64).sqrt()});
            if s % 10 == 0 {
                v["eval_loss"] = (3.2 / (s as f64).sqrt()).into();
            }
            v
        })
        .collect();
    let panels = [PanelSpec { y_label: "loss", line: ("loss", "train loss"), dots: Some(("eval_loss", "eval loss")) }];
    let d = render("sft adapters/run  (skt/kogpt2-base-v2)", &panels, &logged);
    for t in ["sft adapters/run  (skt/kogpt2-base-v2)", "step", "loss", "train loss", "smoothed", "eval loss"] {
        assert!(d.texts.iter().any(|x| x == t), "{t:?} drawn: {:?}", d.texts);
    }
    let numbers: Vec<f64> = d.texts.iter().filter_map(|t| t.parse().ok()).collect();
    assert!(numbers.iter().filter(|&&n| n > 0.0 && n < 4.0 && n.fract() != 0.0).count() >= 3, "at least 3 y ticks between min and max: {:?}", d.texts);
    assert!(numbers.contains(&40.0) && numbers.contains(&20.0), "x ticks at round steps: {:?}", d.texts);
    let red = d.rgb.chunks(3).filter(|p| p == &[210, 40, 40]).count();
    assert!(red > 4 * 49, "eval points drawn (and in the legend)");
}

#[test]
fn force_replaces_only_what_lorafit_wrote() {
    let dir = tempfile::tempdir().unwrap();
    // A folder lorafit did not write: refused, every file left as it was.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("thesis.tex"), "chapter 1").unwrap();
    std::fs::write(theirs.join("adapter_model.safetensors"), "someone else's").unwrap();
    let mut args = sft_args(&theirs, &["train.max_steps=2"]);
    args.push("--force".into());
    expect_error(&run(&args), &[&theirs.display().to_string(), "not written by lorafit", ".lorafit", "another --out"]);
    assert_eq!(read(&theirs.join("thesis.tex")), b"chapter 1");
    assert_eq!(read(&theirs.join("adapter_model.safetensors")), b"someone else's");
    // A run folder with a file of the user's: the run files are replaced, the user's file stays.
    let ours = dir.path().join("ours");
    expect_ok(&run(&sft_args(&ours, &["train.max_steps=2"])));
    std::fs::write(ours.join("notes.txt"), "keep me").unwrap();
    let mut args = sft_args(&ours, &["train.max_steps=3"]);
    args.push("--force".into());
    expect_ok(&run(&args));
    assert_eq!(read(&ours.join("notes.txt")), b"keep me");
    let s: serde_json::Value = serde_json::from_slice(&read(&ours.join("summary.json"))).unwrap();
    assert_eq!(s["steps"], 3);
    // --out holding the data: refused with --force too.
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::copy(fixture("sft_rows.json"), data_dir.join("rows.json")).unwrap();
    let mut args = sft_args(&data_dir, &["train.max_steps=2"]);
    let i = args.iter().position(|a| a == "--data").unwrap();
    args[i + 1] = data_dir.join("rows.json").display().to_string();
    args.push("--force".into());
    expect_error(&run(&args), &["--data", "choose an --out folder outside"]);
    assert!(data_dir.join("rows.json").is_file());
}
