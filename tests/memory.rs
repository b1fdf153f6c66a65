//! PPO's four roles share ONE base: a whole PPO process (policy, reference, reward and critic,
//! generation included) peaks within a fraction of one base copy of a single SFT step on the
//! same KoGPT2-shaped model (125M parameters, 500 MB in f32).
use std::path::Path;
use std::process::Command;

fn lorafit(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafit")).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "lorafit {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

#[test]
fn ppo_holds_the_base_once() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let model = "builtin:kogpt2-shape";
    let common = ["--set", "data.max_len=64", "--set", "data.template=\"Q: {prompt}\\nA:\"", "--set", "train.batch_size=2", "--set", "data.eval_fraction=0"];
    let sft_peak = lorafit(&["bench", "sft", "--model", model, "--batch", "2", "--seq", "64", "--steps", "1", "--json"])["peak_rss_bytes"].as_f64().unwrap();
    let data = |f: &str| Path::new(root).join(f).display().to_string();
    let mut a = vec!["sft", "--model", model, "--out"];
    let (sft_out, rm_out, ppo_out) = (d("sft"), d("rm"), d("ppo"));
    let sft_data = data("tests/fixtures/sft_rows.json");
    a.extend([sft_out.as_str(), "--data", &sft_data, "--set", "train.max_steps=1"]);
    a.extend(common);
    lorafit(&a);
    let rm_data = data("tests/fixtures/rm_rows.json");
    let mut a = vec!["rm", "--model", model, "--out", &rm_out, "--data", &rm_data, "--set", "train.max_steps=1"];
    a.extend(common);
    lorafit(&a);
    let ppo_data = data("data/ppo_prompts.json");
    let mut a = vec!["ppo", "--model", model, "--out", &ppo_out, "--data", &ppo_data, "--sft-adapter", &sft_out, "--reward-adapter", &rm_out,
        "--set", "train.max_steps=1", "--set", "ppo.max_prompt_len=48", "--set", "ppo.max_new_tokens=16", "--set", "ppo.minibatch_size=2"];
    a.extend(common);
    let ppo_peak = lorafit(&a)["peak_rss_bytes"].as_f64().unwrap();
    let base = 124.4e6 * 4.0; // KoGPT2's parameters in f32
    eprintln!("peak RSS: SFT step {:.0} MB, PPO iteration {:.0} MB, one base copy {:.0} MB", sft_peak / 1e6, ppo_peak / 1e6, base / 1e6);
    assert!(ppo_peak - sft_peak < 0.5 * base, "PPO peaks {:.0} MB above an SFT step: a base copy is {:.0} MB", (ppo_peak - sft_peak) / 1e6, base / 1e6);
}
