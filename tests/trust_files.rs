//! Issue 11 ("Trust"), the file side: no command destroys or mixes a user's files, and no
//! crafted or damaged file panics or aborts a loader. CLI cases run the binary and expect exit
//! code 1 (never 101 = panic, never a signal) with a message naming the file / tensor / field
//! and the fix.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{Device, Tensor};
use common::*;

/// Runs lorafit in `cwd` (None: here) with caches pointed away from the user's.
fn lorafit_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorafit"));
    cmd.args(args).env("RUST_LOG", "warn").env("HF_HOME", empty.path()).env("HF_HUB_OFFLINE", "1").stdin(Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().expect("cannot run lorafit")
}

fn lorafit(args: &[&str]) -> Output {
    lorafit_in(None, args)
}

/// Asserts exit code 1 with every needle in stderr (case-insensitive); returns stderr.
fn fails(o: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "exit {:?} (101 = panic, None = a signal), want 1:\n{err}", o.status);
    assert!(!err.contains("panicked"), "panic:\n{err}");
    for n in needles {
        assert!(err.to_lowercase().contains(&n.to_lowercase()), "stderr lacks {n:?}:\n{err}");
    }
    err
}

fn s(p: &Path) -> String {
    p.display().to_string()
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

/// Every file under `dir` (relative path -> content), to prove nothing changed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out)
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn merge_args<'a>(model: &'a str, adapter: &'a str, out: &'a str, force: bool) -> Vec<&'a str> {
    let mut v = vec!["merge", "--model", model, "--adapter", adapter, "--out", out];
    if force {
        v.push("--force");
    }
    v
}

/// A process id that no process has (a child that has exited and been reaped).
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

// ---------------------------------------------------------------- merge: what --out may be

#[test]
fn merge_force_never_deletes_what_lorafit_did_not_write() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("m");
    copy_dir(&fixture("gpt2-a"), &model);
    let theses = t.path().join("theses");
    std::fs::create_dir_all(theses.join("chapter1")).unwrap();
    std::fs::write(theses.join("thesis.tex"), "\\documentclass{article}").unwrap();
    std::fs::write(theses.join("chapter1/intro.tex"), "years of work").unwrap();
    let (m, a) = (s(&model), s(&model.join("adapter")));

    // A folder of unrelated files: refused, with --force or without, untouched (not even a lock file).
    let before = snapshot(&theses);
    for force in [false, true] {
        let o = lorafit(&merge_args(&m, &a, &s(&theses), force));
        fails(&o, &[&s(&theses), "not written by lorafit", "thesis.tex", "hint:", "choose another --out"]);
        assert_eq!(snapshot(&theses), before, "force={force}: the folder's files changed");
    }

    // The model's own folder, a folder holding an input adapter, the adapter itself: refused always.
    let before = snapshot(&model);
    for (out, needle) in [(m.clone(), "same folder as --model"), (s(t.path()), "contains --model"), (a.clone(), "same folder as --adapter")] {
        for force in [false, true] {
            let o = lorafit(&merge_args(&m, &a, &out, force));
            fails(&o, &[&out, needle, "hint:", "outside the model, adapter and data folders"]);
            assert_eq!(snapshot(&model), before, "--out {out} --force={force}: the model folder changed");
        }
    }
    assert!(theses.join("thesis.tex").is_file());

    // A training run's folder (lorafit's marker of another kind) is not a merge's to replace.
    let run = t.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join(".lorafit"), r#"{"lorafit": "0.1.0", "kind": "sft"}"#).unwrap();
    std::fs::write(run.join("adapter_model.safetensors"), "weights of hours of training").unwrap();
    let before = snapshot(&run);
    fails(&lorafit(&merge_args(&m, &a, &s(&run), true)), &[&s(&run), "lorafit sft output, not a merged model"]);
    assert_eq!(snapshot(&run), before);
}

#[test]
fn merged_folder_has_the_marker_and_force_replaces_only_its_files() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("merged");
    let (m, a) = (s(&fixture("gpt2-a")), s(&fixture("gpt2-a").join("adapter")));
    let o = lorafit(&merge_args(&m, &a, &s(&out), false));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let marker: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join(".lorafit")).unwrap()).unwrap();
    assert_eq!(marker["kind"], "merge");
    let mut files: Vec<String> = serde_json::from_value(marker["files"].clone()).unwrap();
    files.sort();
    assert_eq!(files, ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]);

    // A marker that names files outside the folder (crafted, or damaged): those are never removed.
    let victim = t.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let mut crafted = marker.clone();
    files.extend(["../victim.txt", "/etc/hostname", "", "."].map(String::from));
    crafted["files"] = serde_json::json!(files);
    std::fs::write(out.join(".lorafit"), crafted.to_string()).unwrap();
    std::fs::write(out.join("notes.md"), "my notes").unwrap();
    // Sharded this time: the old model.safetensors goes, the user's notes stay.
    let out_s = s(&out);
    let mut args = merge_args(&m, &a, &out_s, true);
    args.extend(["--max-shard-size", "60000"]);
    let o = lorafit(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert_eq!(std::fs::read_to_string(out.join("notes.md")).unwrap(), "my notes");
    assert!(!out.join("model.safetensors").exists() && out.join("model.safetensors.index.json").is_file());
    // A file of the user's with a name the merge writes is refused, not overwritten.
    std::fs::write(out.join("model.safetensors"), "the user's own file").unwrap();
    fails(&lorafit(&merge_args(&m, &a, &s(&out), true)), &[&s(&out), "model.safetensors", "did not write"]);
    assert_eq!(std::fs::read_to_string(out.join("model.safetensors")).unwrap(), "the user's own file");
}

#[test]
fn a_second_merge_into_the_same_out_fails_at_once_naming_the_first() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("merged");
    let (m, a) = (s(&fixture("gpt2-a")), s(&fixture("gpt2-a").join("adapter")));
    // Merge A is frozen (SIGSTOP) while it holds the lock; merge B must fail naming it. Merges of
    // the tiny fixture are quick, so the freeze is retried until it lands inside A's claim.
    for attempt in 0..50 {
        let _ = std::fs::remove_dir_all(&out);
        let mut first = Command::new(env!("CARGO_BIN_EXE_lorafit"))
            .args(merge_args(&m, &a, &s(&out), false))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = first.id();
        let lock = out.join(".lorafit.lock");
        let mut frozen = false;
        while first.try_wait().unwrap().is_none() {
            if std::fs::read_to_string(&lock).is_ok_and(|s| s.starts_with(&format!("pid {pid}\n"))) {
                unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                frozen = first.try_wait().unwrap().is_none() && out.join(".lorafit.lock").exists();
                break;
            }
        }
        if !frozen {
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            first.wait().unwrap();
            assert!(attempt < 49, "could not catch a merge holding its lock");
            continue;
        }
        let second = lorafit(&merge_args(&m, &a, &s(&out), true));
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        let status = first.wait().unwrap();
        // A holds the lock only after its own checks: it may have been frozen after finishing
        // its writes too; either way B must not have written.
        fails(&second, &[&s(&out), &format!("is being written by pid {pid}"), "lock", "hint:", "wait for that run"]);
        assert!(status.success(), "the first merge must finish: {status:?}");
        assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
        return;
    }
}

#[test]
fn stale_merge_temps_are_removed_by_the_next_merge() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("merged");
    let (m, a) = (s(&fixture("gpt2-a")), s(&fixture("gpt2-a").join("adapter")));
    assert!(lorafit(&merge_args(&m, &a, &s(&out), false)).status.success());
    // What killed merges leave: beside --out (older versions) and inside it; and a live one's.
    let dead = dead_pid();
    let beside = t.path().join(format!(".merged.merge-tmp-{dead}"));
    let inside = out.join(format!(".merged.merge-tmp-{dead}"));
    let live = t.path().join(format!(".merged.merge-tmp-{}", std::process::id()));
    for d in [&beside, &inside, &live] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("model.safetensors"), vec![0u8; 1000]).unwrap();
    }
    let o = lorafit(&merge_args(&m, &a, &s(&out), true));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!beside.exists() && !inside.exists(), "stale temp folders are removed");
    assert!(live.exists(), "a temp of a running process is left alone");
    // A merge that fails (here: an adapter for another model) leaves no temp and no new folder.
    let fresh = t.path().join("fresh");
    fails(&lorafit(&merge_args(&m, &s(&fixture("llama-a").join("adapter")), &s(&fresh), false)), &["match no layer"]);
    assert!(!fresh.exists(), "a failed merge leaves no folder behind");
    let names: Vec<String> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(names.iter().filter(|n| n.contains("merge-tmp")).count() == 1, "{names:?}");
}

#[test]
fn disk_space_message_is_true() {
    let t = tempfile::tempdir().unwrap();
    let e = format!("{:#}", lorafit::merge::check_disk_space(t.path(), 1 << 62).unwrap_err());
    // "needs X (N bytes), Y (M bytes) are free (Z short)": both byte counts shown, and N > M.
    let nums: Vec<u64> = e.split(['(', ' ']).filter_map(|w| w.parse().ok()).collect();
    assert!(nums.len() >= 3 && nums[0] == 1 << 62 && nums[0] > nums[1] && nums[2] == nums[0] - nums[1], "{e}: {nums:?}");
    assert!(e.contains("short") && e.contains("nothing was written"), "{e}");
}

// ---------------------------------------------------------------- portable adapter folders

fn rm_config(out: &Path, sft: &Path) -> lorafit::train::config::TrainConfig {
    let sets: Vec<String> = vec![
        format!("model.name={:?}", s(&fixture("gpt2-a"))),
        format!("data.path={:?}", s(&fixture("rm_rows.json"))),
        format!("out.dir={:?}", s(out)),
        "data.template=\"Q: {prompt}\\nA:\"".into(),
        "data.max_len=64".into(),
        "train.max_steps=2".into(),
        "train.seed=5".into(),
        format!("rm.sft_adapter={:?}", s(sft)),
    ];
    lorafit::train::config::TrainConfig::load(None, &sets).unwrap()
}

fn score(cwd: &Path, rm: &str, data: &str) -> Output {
    lorafit_in(Some(cwd), &["score", "--model", &s(&fixture("gpt2-a")), "--adapter", rm, "--data", data, "--json"])
}

#[test]
fn a_stacked_reward_model_travels_as_one_folder() {
    let t = tempfile::tempdir().unwrap();
    // SFT adapter and RM in a project folder; the RM is trained with relative paths from there.
    let project = t.path().join("project");
    copy_dir(&fixture("gpt2-a").join("adapter"), &project.join("adapters/sft"));
    let rm_dir = project.join("adapters/rm");
    lorafit::train::rm::run(&rm_config(&rm_dir, &project.join("adapters/sft")), lorafit::train::Start::Fresh).unwrap();
    let note: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(rm_dir.join("lorafit.json")).unwrap()).unwrap();
    assert_eq!(note["stack"], serde_json::json!(["stack/sft"]));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(std::fs::read(rm_dir.join("stack/sft").join(f)).unwrap(), std::fs::read(project.join("adapters/sft").join(f)).unwrap(), "{f}");
    }
    let data = t.path().join("lines.txt");
    std::fs::write(&data, "Q: 사과 이야기 0\nA: 네, 좋아요!\nQ: x\nA: 몰라.\n").unwrap();
    let here = score(t.path(), &s(&rm_dir), &s(&data));
    assert!(here.status.success(), "{}", String::from_utf8_lossy(&here.stderr));

    // Copied elsewhere, the SFT adapter gone, used from another working directory by a relative path.
    let elsewhere = t.path().join("downloads/rm-copy");
    copy_dir(&rm_dir, &elsewhere);
    std::fs::remove_dir_all(&project).unwrap();
    let cwd = t.path().join("downloads");
    let moved = score(&cwd, "rm-copy", &s(&data));
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
    assert_eq!(moved.stdout, here.stdout, "the copied reward model gives the same rewards");
    let o = lorafit_in(Some(&cwd), &["merge", "--model", &s(&fixture("gpt2-a")), "--adapter", "rm-copy", "--out", "merged"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cwd.join("merged/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["lorafit_merge"]["adapters"][0]["path"], "rm-copy/stack/sft");
    let o = lorafit_in(Some(&cwd), &["inspect", "rm-copy"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("stacked on:     stack/sft (inside this folder, copied from"), "{o:?}");
}

#[test]
fn adapter_metadata_never_leads_outside_the_folder() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("lines.txt");
    std::fs::write(&data, "Q: x\nA: y\n").unwrap();
    let secret = t.path().join("elsewhere");
    copy_dir(&fixture("gpt2-a").join("adapter"), &secret);
    let rm = t.path().join("rm");
    copy_dir(&fixture("rm-gpt2-a"), &rm);
    let note = rm.join("lorafit.json");
    let cases: Vec<(String, Vec<&str>)> = vec![
        // Old style (paths relative to where `rm` ran, or absolute) pointing outside: a clear error.
        (format!(r#"{{"stacked_on": [{:?}]}}"#, s(&secret)), vec!["stacked_on", "outside the adapter folder", "stack/sft", "\"stack\": [\"stack/sft\"]"]),
        (r#"{"stacked_on": ["adapters/sft-kogpt2"]}"#.into(), vec!["stacked_on", "adapters/sft-kogpt2", "outside the adapter folder"]),
        // New style: only plain folder names inside.
        (r#"{"stack": ["../elsewhere"]}"#.into(), vec!["\"../elsewhere\"", "not a folder inside"]),
        (format!(r#"{{"stack": [{:?}]}}"#, s(&secret)), vec!["not a folder inside"]),
        (r#"{"stack": "stack/sft"}"#.into(), vec!["\"stack\" must be a list"]),
        (r#"{"stack": [1]}"#.into(), vec!["a number, not a folder name"]),
    ];
    for (text, needles) in &cases {
        std::fs::write(&note, text).unwrap();
        let mut n = vec![s(&note)];
        n.extend(needles.iter().map(|x| x.to_string()));
        fails(&score(t.path(), &s(&rm), &s(&data)), &n.iter().map(String::as_str).collect::<Vec<_>>());
    }
    // A symlink inside the folder that leads out of it.
    std::os::unix::fs::symlink(&secret, rm.join("stack")).unwrap();
    std::fs::write(&note, r#"{"stack": ["stack"]}"#).unwrap();
    fails(&score(t.path(), &s(&rm), &s(&data)), &[&s(&note), "not a folder inside"]);
    std::fs::remove_file(rm.join("stack")).unwrap();
    // An old-style entry that does stay inside the folder still works.
    copy_dir(&secret, &rm.join("sft"));
    std::fs::write(&note, format!(r#"{{"stacked_on": [{:?}]}}"#, s(&rm.join("sft")))).unwrap();
    let o = score(t.path(), &s(&rm), &s(&data));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

// ---------------------------------------------------------------- adapters that must not load

/// A copy of gpt2-a's adapter with one value of c_attn's lora_B made `v`.
fn poisoned(dir: &Path, v: f32) -> PathBuf {
    let a = dir.join(format!("adapter-{v}"));
    copy_dir(&fixture("gpt2-a").join("adapter"), &a);
    let p = a.join("adapter_model.safetensors");
    let mut m = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    let k = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight";
    let mut x: Vec<f32> = m[k].flatten_all().unwrap().to_vec1().unwrap();
    x[5] = v;
    m.insert(k.into(), Tensor::from_vec(x, m[k].dims(), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&m, &p).unwrap();
    a
}

#[test]
fn non_finite_adapters_are_refused_by_every_command() {
    let t = tempfile::tempdir().unwrap();
    let model = s(&fixture("gpt2-a"));
    let data = t.path().join("d.txt");
    std::fs::write(&data, "hello world\n").unwrap();
    for v in [f32::NAN, f32::INFINITY] {
        let a = poisoned(t.path(), v);
        let a_s = s(&a);
        let needles = [s(&a.join("adapter_model.safetensors")), "h.1.attn.c_attn.lora_B.weight".into(), "non-finite".into(), "hint:".into(), "earlier checkpoint".into()];
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        fails(&lorafit(&["eval", "--model", &model, "--adapter", &a_s, "--data", &s(&data)]), &needles);
        fails(&lorafit(&["generate", "--model", &model, "--adapter", &a_s, "--prompt", "hi", "--max-new-tokens", "2"]), &needles);
        fails(&lorafit(&["chat", "--model", &model, "--adapter", &a_s]), &needles);
        fails(&lorafit(&merge_args(&model, &a_s, &s(&t.path().join("out")), false)), &needles);
        assert!(!t.path().join("out").exists());
    }
    // A reward model with a NaN head.
    let rm = t.path().join("rm");
    copy_dir(&fixture("rm-gpt2-a"), &rm);
    let p = rm.join("adapter_model.safetensors");
    let mut m = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    let head = &m["base_model.model.score.weight"];
    m.insert("base_model.model.score.weight".into(), (head * f64::NAN).unwrap());
    candle_core::safetensors::save(&m, &p).unwrap();
    fails(&lorafit(&["score", "--model", &model, "--adapter", &s(&rm), "--data", &s(&data)]), &[&s(&p), "base_model.model.score.weight", "non-finite"]);
}

#[test]
fn a_reward_model_where_a_plain_adapter_belongs_is_named() {
    let t = tempfile::tempdir().unwrap();
    let prompts = t.path().join("p.json");
    std::fs::write(&prompts, r#"[{"prompt": "hello"}, {"prompt": "world"}]"#).unwrap();
    let (model, rm) = (s(&fixture("gpt2-a")), s(&fixture("rm-gpt2-a")));
    let out = s(&t.path().join("ppo"));
    let o = lorafit(&["ppo", "--model", &model, "--sft-adapter", &rm, "--reward-adapter", &rm, "--data", &s(&prompts), "--out", &out, "--set", "ppo.max_prompt_len=16", "--set", "ppo.max_new_tokens=8"]);
    fails(&o, &[&rm, "is a reward model", "score.weight", "hint:", "--reward-adapter"]);
    fails(&lorafit(&["eval", "--model", &model, "--adapter", &rm, "--data", &s(&prompts)]), &[&rm, "is a reward model"]);
    // A reward model merged together with an unrelated plain adapter: refused, explained.
    let a = s(&fixture("gpt2-a").join("adapter2"));
    let o = lorafit(&["merge", "--model", &model, "--adapter", &rm, "--adapter", &a, "--out", &s(&t.path().join("m"))]);
    fails(&o, &[&a, "merged together with the reward model", "score head", "merge the reward model alone"]);
    assert!(!t.path().join("m").exists());
}

// ---------------------------------------------------------------- crafted weight files

/// Rewrites the JSON header of safetensors file `p` with `f`, keeping the data.
fn edit_header(p: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h);
    let h = serde_json::to_vec(&h).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(p, out).unwrap();
}

#[test]
fn crafted_safetensors_headers_are_errors_not_panics() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("m");
    copy_dir(&fixture("gpt2-a"), &model);
    let data = t.path().join("d.txt");
    std::fs::write(&data, "hello world\n").unwrap();
    let w = model.join("model.safetensors");
    let aw = model.join("adapter/adapter_model.safetensors");
    let orig = (std::fs::read(&w).unwrap(), std::fs::read(&aw).unwrap());
    let key = "transformer.h.0.attn.c_attn.weight";
    let akey = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight";
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>, &str)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|h, k| h[k]["data_offsets"] = serde_json::json!([384, 0])), "reversed"),
        (Box::new(|h, k| h[k]["data_offsets"] = serde_json::json!([0])), "has 1 numbers"),
        (Box::new(|h, k| h[k]["data_offsets"] = serde_json::json!([0, 1, 2])), "has 3 numbers"),
        (Box::new(|h, k| h[k]["shape"] = serde_json::json!([2147483648u64, 36])), "needs 309237645312 bytes"),
        (Box::new(|h, k| h[k]["shape"] = serde_json::json!([u64::MAX, u64::MAX])), "more than 2^64"),
        (Box::new(|h, k| h[k]["dtype"] = serde_json::json!("F99")), "field \"dtype\""),
        (Box::new(|h, k| _ = h[k].as_object_mut().unwrap().remove("shape")), "no \"shape\""),
        (Box::new(|h, k| h[k]["data_offsets"] = serde_json::json!([0, 1u64 << 40])), "truncated"),
        (Box::new(|h, k| h[k]["data_offsets"][1] = serde_json::json!(-1)), "data_offsets"),
        (Box::new(|h, _| _ = h.insert("__metadata__".into(), serde_json::json!({"format": 1}))), "__metadata__"),
    ];
    for (i, (edit, want)) in cases.iter().enumerate() {
        for (file, k, adapter) in [(&w, key, false), (&aw, akey, true)] {
            std::fs::write(&w, &orig.0).unwrap();
            std::fs::write(&aw, &orig.1).unwrap();
            edit_header(file, |h| edit(h, k));
            let mut args = vec!["eval".to_string(), "--model".into(), s(&model), "--data".into(), s(&data)];
            if adapter {
                args.extend(["--adapter".into(), s(&model.join("adapter"))]);
            }
            let o = lorafit(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let e = fails(&o, &[&s(file), want]);
            if !want.contains("metadata") {
                assert!(e.contains(k), "case {i}: names the tensor: {e}");
            }
        }
    }
    // Overlaps, holes and trailing bytes.
    std::fs::write(&aw, &orig.1).unwrap();
    std::fs::write(&w, &orig.0).unwrap();
    edit_header(&aw, |h| {
        let a = &h[akey]["data_offsets"];
        let (b, e) = (a[0].as_u64().unwrap(), a[1].as_u64().unwrap());
        // Shift lora_A by 4 bytes: it overlaps its neighbour (or leaves a hole before it).
        h[akey]["data_offsets"] = serde_json::json!([b + 4, e + 4]);
    });
    let o = lorafit(&["eval", "--model", &s(&model), "--adapter", &s(&model.join("adapter")), "--data", &s(&data)]);
    fails(&o, &[&s(&aw), "without holes or overlaps"]);
    let mut bytes = orig.1.clone();
    bytes.extend([0u8; 16]);
    std::fs::write(&aw, bytes).unwrap();
    let o = lorafit(&["eval", "--model", &s(&model), "--adapter", &s(&model.join("adapter")), "--data", &s(&data)]);
    fails(&o, &[&s(&aw), "16 bytes after the last tensor"]);
    // A header length of 2^63: refused before any allocation.
    let mut bytes = orig.0.clone();
    bytes[..8].copy_from_slice(&(1u64 << 63).to_le_bytes());
    std::fs::write(&w, bytes).unwrap();
    fails(&lorafit(&["eval", "--model", &s(&model), "--data", &s(&data)]), &[&s(&w), "truncated or not a safetensors file"]);
}

/// Replaces `data.pkl` of a torch.save zip with `f(old)` (entries stored, as torch writes them).
fn edit_pickle(p: &Path, f: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    use std::io::{Read, Write};
    let mut z = zip::ZipArchive::new(std::fs::File::open(p).unwrap()).unwrap();
    let mut entries = vec![];
    for i in 0..z.len() {
        let mut e = z.by_index(i).unwrap();
        let mut b = vec![];
        e.read_to_end(&mut b).unwrap();
        entries.push((e.name().unwrap().to_string(), b));
    }
    let mut f = Some(f);
    let mut w = zip::ZipWriter::new(std::fs::File::create(p).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        let bytes = if name.ends_with("data.pkl") { (f.take().unwrap())(bytes) } else { bytes };
        w.start_file(name, opts).unwrap();
        w.write_all(&bytes).unwrap();
    }
    w.finish().unwrap();
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let i = hay.windows(from.len()).position(|w| w == from).expect("pattern in the pickle");
    [&hay[..i], to, &hay[i + from.len()..]].concat()
}

#[test]
fn crafted_pytorch_checkpoints_are_errors_not_aborts() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("d.txt");
    std::fs::write(&data, "hello world\n").unwrap();
    let fresh = |name: &str| {
        let m = t.path().join(name);
        copy_dir(&fixture("gpt2-b"), &m);
        m
    };
    let eval = |m: &Path| lorafit(&["eval", "--model", &s(m), "--data", &s(&data)]);
    // Unchanged, it loads (the reader round-trips torch's format).
    let m = fresh("ok");
    edit_pickle(&m.join("pytorch_model.bin"), |b| b);
    assert!(eval(&m).status.success(), "{}", String::from_utf8_lossy(&eval(&m).stderr));

    // wte's size (400, 36) -> (2^31 - 1, 36): 309 GB claimed from a 57,600-byte storage (an
    // abort before: the reader allocated it), and the same with 2^31 as a LONG1.
    for (arg, shown) in [(&b"J\xff\xff\xff\x7f"[..], "[2147483647, 36]"), (&b"\x8a\x05\x00\x00\x00\x80\x00"[..], "[2147483648, 36]")] {
        let m = fresh(&format!("huge-{}", arg.len()));
        edit_pickle(&m.join("pytorch_model.bin"), |b| replace(&b, b"M\x90\x01K$\x86", &[arg, b"K$\x86"].concat())); // BININT2 400 -> ...
        fails(&eval(&m), &[&s(&m.join("pytorch_model.bin")), "transformer.wte.weight", shown, "reaches past its storage of 14400 elements"]);
    }

    // The storage claims more elements than its zip entry holds.
    let m = fresh("storage");
    edit_pickle(&m.join("pytorch_model.bin"), |b| replace(&b, b"M@8t", b"J\x00\x00\x00\x40t")); // numel 14400 -> 2^30
    fails(&eval(&m), &[&s(&m.join("pytorch_model.bin")), "transformer.wte.weight", "storage claims 1073741824 elements"]);

    // 200,000 nested lists before the state dict: a bounded depth, not a stack overflow.
    let m = fresh("deep");
    edit_pickle(&m.join("pytorch_model.bin"), |b| {
        let mut p = b[..2].to_vec();
        p.extend(std::iter::repeat_n(b']', 200_000));
        p.extend(std::iter::repeat_n(b'a', 199_999));
        p.push(b'0'); // POP
        p.extend(&b[2..]);
        p
    });
    fails(&eval(&m), &[&s(&m.join("pytorch_model.bin")), "data.pkl", "nested more than 100"]);

    // Truncated, and not a zip at all.
    let m = fresh("cut");
    let b = std::fs::read(m.join("pytorch_model.bin")).unwrap();
    std::fs::write(m.join("pytorch_model.bin"), &b[..b.len() - 300]).unwrap();
    fails(&eval(&m), &[&s(&m.join("pytorch_model.bin"))]);
    std::fs::write(m.join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    fails(&eval(&m), &[&s(&m.join("pytorch_model.bin")), "not a torch.save zip archive"]);
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused_at_load() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m");
    copy_dir(&fixture("gpt2-a"), &m);
    let tj = m.join("tokenizer.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    v["model"]["vocab"]["<extra>"] = serde_json::json!(999);
    v["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({"id": 999, "content": "<extra>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    std::fs::write(&tj, v.to_string()).unwrap();
    let data = t.path().join("d.txt");
    std::fs::write(&data, "hello world\n").unwrap(); // the token need not even occur
    let o = lorafit(&["eval", "--model", &s(&m), "--data", &s(&data)]);
    fails(&o, &[&s(&tj), "\"<extra>\" has id 999", "400 rows", "vocab_size 400", "hint:", "tokenizer.json that came with this model"]);
}
