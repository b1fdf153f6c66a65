//! Fuzz-style robustness test (issue 11): seeded mutations of the real fixture files (bit flips,
//! truncations, swapped fields, huge numbers, deep nesting), each loaded through the functions
//! the commands use. Any outcome but `Ok` or an `Err` fails the test: a panic (caught with
//! `catch_unwind`), an abort (a failed allocation aborts in Rust), a stack overflow, a signal or
//! a hang. The cases run in child processes (this test binary, re-run on `fuzz_child`) under a
//! memory cap (RLIMIT_AS), so an attempted huge allocation fails the test, not the machine.
//!
//! `LORAFIT_FUZZ_CASES=N` runs N cases (default [`CASES`], about a minute on 2 cores);
//! `LORAFIT_FUZZ_SEED` changes the seed. A failure names the case; `LORAFIT_FUZZ_ONLY=n` reruns
//! just that case (its files are kept under the printed folder with `LORAFIT_FUZZ_KEEP=1`).
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;
use serde_json::Value;

/// Cases per run in CI.
const CASES: u64 = 8000;
const SEED: u64 = 0x11_7257;
/// Address-space cap of a child: the fixtures need a few hundred MiB at most.
const MEMORY_CAP: u64 = 3 << 30;
/// A case that runs longer than this is a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);
const CHILD_ENV: &str = "LORAFIT_FUZZ_CHILD";

// ---------------------------------------------------------------- seeded randomness

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// splitmix64
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

// ---------------------------------------------------------------- mutations

/// Numbers and values that break careless readers.
fn nasty(rng: &mut Rng) -> Value {
    let pick = rng.below(18);
    match pick {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(1u64 << 31),
        3 => Value::from((1u64 << 32) + 8),
        4 => Value::from(1u64 << 53),
        5 => Value::from(u64::MAX),
        6 => Value::from(i64::MIN),
        7 => serde_json::json!(1e9),
        8 => serde_json::json!(1e308),
        9 => serde_json::json!(-1e308),
        10 => serde_json::json!(0.5),
        11 => Value::from(""),
        12 => Value::from("../../../../etc/passwd"),
        13 => Value::Null,
        14 => Value::Bool(true),
        15 => serde_json::json!([]),
        16 => serde_json::json!({}),
        _ => Value::from("x".repeat(rng.below(5000))),
    }
}

/// JSON pointers of every node of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => m.iter().for_each(|(k, x)| pointers(x, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out)),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| pointers(x, format!("{at}/{i}"), out)),
        _ => {}
    }
    out.push(at);
}

/// Placeholder replaced by deeply nested text after serialisation.
const DEEP: &str = "\u{1}DEEP\u{1}";

/// One structural mutation of a JSON document; returns what it did.
fn mutate_json(v: &mut Value, rng: &mut Rng, protect: &dyn Fn(&str, &Value) -> bool) -> String {
    let mut ps = vec![];
    pointers(v, String::new(), &mut ps);
    let p = rng.pick(&ps).clone();
    let op = rng.below(7);
    let (parent, last) = match p.rfind('/') {
        Some(i) => (p[..i].to_string(), p[i + 1..].replace("~1", "/").replace("~0", "~")),
        None => (String::new(), String::new()),
    };
    match op {
        0 | 1 => {
            let new = nasty(rng);
            if protect(&p, &new) {
                return format!("kept {p}");
            }
            *v.pointer_mut(&p).unwrap() = new.clone();
            format!("{p} = {}", short(&new))
        }
        2 if !p.is_empty() => {
            match v.pointer_mut(&parent).unwrap() {
                Value::Object(m) => _ = m.remove(&last),
                Value::Array(a) => _ = a.remove(last.parse::<usize>().unwrap()),
                _ => {}
            }
            format!("removed {p}")
        }
        3 => {
            // Swap two nodes' values (fields of one object, elements of one array, or anywhere).
            let q = rng.pick(&ps).clone();
            if p.is_empty() || q.is_empty() || p.starts_with(&q) || q.starts_with(&p) {
                return "swap skipped".into();
            }
            let (a, b) = (v.pointer(&p).unwrap().clone(), v.pointer(&q).unwrap().clone());
            if protect(&p, &b) || protect(&q, &a) {
                return "swap kept".into();
            }
            *v.pointer_mut(&p).unwrap() = b;
            *v.pointer_mut(&q).unwrap() = a;
            format!("swapped {p} and {q}")
        }
        4 => {
            let node = v.pointer_mut(&p).unwrap();
            let what = format!("{p} = deep nesting");
            if protect(&p, &Value::Null) {
                return "kept".into();
            }
            *node = Value::from(DEEP);
            what
        }
        5 => {
            // Numbers nudged: off by one, negated, scaled.
            let node = v.pointer_mut(&p).unwrap();
            if let Some(x) = node.as_i64() {
                let new = Value::from(*rng.pick(&[x + 1, x - 1, -x, x.saturating_mul(1 << 20), x.saturating_mul(1 << 40)]));
                if !protect(&p, &new) {
                    *node = new;
                }
                format!("{p} nudged")
            } else if let Some(a) = node.as_array_mut() {
                if !a.is_empty() {
                    let x = a[rng.below(a.len())].clone();
                    a.push(x);
                }
                format!("{p} grown")
            } else {
                "nudge skipped".into()
            }
        }
        _ => {
            if let Value::Object(m) = v.pointer_mut(&parent).unwrap_or(&mut Value::Null) {
                let k = format!("{last}_{}", rng.below(3));
                m.insert(k.clone(), nasty(rng));
                format!("added {parent}/{k}")
            } else {
                "add skipped".into()
            }
        }
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 { format!("{}...", &s[..40]) } else { s }
}

fn to_text(v: &Value, rng: &mut Rng) -> Vec<u8> {
    let s = serde_json::to_string_pretty(v).unwrap();
    let quoted = serde_json::to_string(DEEP).unwrap();
    let depth = *rng.pick(&[200, 5_000, 200_000]);
    s.replace(&quoted, &format!("{}1{}", "[".repeat(depth), "]".repeat(depth))).into_bytes()
}

/// One byte-level mutation.
fn mutate_bytes(b: &mut Vec<u8>, rng: &mut Rng, from: usize) -> String {
    if b.len() <= from {
        b.push(rng.next() as u8);
        return "grew".into();
    }
    let at = from + rng.below(b.len() - from);
    match rng.below(6) {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = from + rng.below(b.len() - from);
                b[i] ^= 1 << rng.below(8);
            }
            format!("{n} bit flips")
        }
        1 => {
            b.truncate(at);
            format!("truncated at {at}")
        }
        2 => {
            let n = 1 + rng.below(64);
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(at..at, junk);
            format!("{n} bytes inserted at {at}")
        }
        3 => {
            let end = (at + 1 + rng.below(64)).min(b.len());
            let fill = *rng.pick(&[0u8, 0xff]);
            b[at..end].fill(fill);
            format!("bytes {at}..{end} = {fill:#x}")
        }
        4 => {
            let end = (at + 8).min(b.len());
            let big = *rng.pick(&[u64::MAX, 1 << 40, 1 << 31, (1 << 32) + 8]).to_le_bytes().first().unwrap();
            b[at..end].fill(big);
            format!("bytes {at}..{end} = big")
        }
        _ => {
            let end = (at + 1 + rng.below(256)).min(b.len());
            let chunk = b[at..end].to_vec();
            b.splice(at..at, chunk);
            format!("bytes {at}..{end} duplicated")
        }
    }
}

// ---------------------------------------------------------------- file formats

fn split_safetensors(b: &[u8]) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&b[8..8 + n]).unwrap(), b[8 + n..].to_vec())
}

/// Mutates a safetensors file: its header (structurally or its length field) or its bytes.
fn mutate_safetensors(b: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let (mut h, data) = split_safetensors(b);
    match rng.below(5) {
        0 | 1 => {
            // Targeted: one tensor's offsets, shape or dtype.
            let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
            let k = rng.pick(&names).clone();
            let t = h.get_mut(&k).unwrap();
            let off = t["data_offsets"].clone();
            let (b0, e0) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
            let what = match rng.below(8) {
                0 => {
                    t["data_offsets"] = serde_json::json!([e0, b0]);
                    "offsets reversed"
                }
                1 => {
                    t["data_offsets"] = serde_json::json!([b0]);
                    "one offset"
                }
                2 => {
                    t["data_offsets"] = serde_json::json!([b0, e0 + 4]);
                    "end moved"
                }
                3 => {
                    t["shape"] = serde_json::json!([1u64 << 31, 36]);
                    "shape 2^31 x 36"
                }
                4 => {
                    t["shape"] = serde_json::json!([u64::MAX, 2]);
                    "shape overflows"
                }
                5 => {
                    t["dtype"] = Value::from(*rng.pick(&["F16", "BOOL", "F4", "I8", "U64", "F8_E4M3", "C64", "Q4"]));
                    "dtype changed"
                }
                6 => {
                    t["data_offsets"] = serde_json::json!([0, e0.wrapping_sub(b0)]);
                    "offsets moved to 0"
                }
                _ => {
                    t["shape"] = serde_json::json!([]);
                    "shape []"
                }
            };
            let mut out = header_bytes(&h);
            out.extend(data);
            (out, format!("header: tensor {k}: {what}"))
        }
        2 => {
            let mut v = Value::Object(h);
            let what = mutate_json(&mut v, rng, &|_, _| false);
            let text = to_text(&v, rng);
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend(text);
            out.extend(data);
            (out, format!("header JSON: {what}"))
        }
        3 => {
            let mut out = b.to_vec();
            let n = *rng.pick(&[0u64, 1, 7, u64::MAX, 1 << 40, b.len() as u64, b.len() as u64 - 8]);
            out[..8].copy_from_slice(&n.to_le_bytes());
            (out, format!("header length = {n}"))
        }
        _ => {
            let mut out = b.to_vec();
            let what = mutate_bytes(&mut out, rng, 0);
            (out, format!("bytes: {what}"))
        }
    }
}

fn header_bytes(h: &serde_json::Map<String, Value>) -> Vec<u8> {
    let text = serde_json::to_vec(h).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out
}

/// The entries of a zip archive, None if it does not read cleanly (a mutated one).
fn read_zip(b: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(b)).ok()?;
    let mut out = vec![];
    for i in 0..z.len() {
        let mut e = z.by_index(i).ok()?;
        let mut v = vec![];
        e.read_to_end(&mut v).ok()?;
        out.push((e.name().ok()?.to_string(), v));
    }
    out.iter().any(|(n, _)| n.ends_with("data.pkl")).then_some(out)
}

fn write_zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(vec![]));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (n, b) in entries {
        w.start_file(n.as_str(), opts).unwrap();
        w.write_all(b).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Mutates a torch.save zip: its pickle (bytes, integers, nesting) or the archive's bytes.
fn mutate_pth(b: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let entries = read_zip(b).filter(|_| rng.chance(0.75));
    let Some(mut entries) = entries else {
        let mut out = b.to_vec();
        let what = mutate_bytes(&mut out, rng, 0);
        return (out, format!("zip bytes: {what}"));
    };
    let i = entries.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    let p = &mut entries[i].1;
    let what = match rng.below(5) {
        0 => format!("pickle bytes: {}", mutate_bytes(p, rng, 2)),
        1 | 2 => {
            // An integer argument (BININT1 / BININT2 / BININT) becomes a huge LONG1 or BININT.
            let at: Vec<usize> = p.iter().enumerate().filter(|(_, &c)| c == b'K' || c == b'M').map(|(i, _)| i).collect();
            if at.is_empty() {
                return (write_zip(&entries), "pickle: no integer to change".into());
            }
            let j = *rng.pick(&at);
            let len = if p[j] == b'K' { 2 } else { 3 };
            let new: Vec<u8> = match rng.below(4) {
                0 => vec![0x8a, 5, 0, 0, 0, 0x80, 0],                      // 2^31
                1 => vec![0x8a, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // 2^63 - 1
                2 => vec![b'J', 0xff, 0xff, 0xff, 0xff],                   // -1
                _ => vec![b'J', 0, 0, 0, 0x40],                            // 2^30
            };
            let end = (j + len).min(p.len());
            p.splice(j..end, new);
            format!("pickle: integer at byte {j} made huge")
        }
        3 => {
            let depth = *rng.pick(&[101usize, 5_000, 200_000]);
            let keep = p.len().min(2);
            let mut q = p[..keep].to_vec();
            q.extend(std::iter::repeat_n(b']', depth));
            q.extend(std::iter::repeat_n(b'a', depth - 1));
            q.push(b'0');
            q.extend(&p[keep..]);
            *p = q;
            format!("pickle: {depth} nested lists")
        }
        _ => {
            // A string length (BINUNICODE) made huge.
            let at: Vec<usize> = p.iter().enumerate().filter(|(_, &c)| c == b'X').map(|(i, _)| i).collect();
            if at.is_empty() {
                return (write_zip(&entries), "pickle: no string to change".into());
            }
            let j = *rng.pick(&at);
            if j + 5 <= p.len() {
                p[j + 1..j + 5].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            format!("pickle: string length at byte {j} = 2^32-1")
        }
    };
    (write_zip(&entries), what)
}

// ---------------------------------------------------------------- cases

/// What a case loads, and through which command's functions.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// `eval` on a model whose weights file is mutated (single, sharded, pickle).
    ModelWeights(&'static str),
    /// `eval --adapter` with a mutated adapter_model.safetensors.
    AdapterWeights(&'static str),
    /// `score` with a mutated reward-model folder file.
    Reward(&'static str),
    /// `eval` with a mutated config.json.
    Config(&'static str),
    /// `eval --adapter` with a mutated adapter_config.json.
    AdapterConfig(&'static str),
    /// Tokenizer::load + encode/decode with a mutated tokenizer.json.
    Tokenizer,
    /// `score` on an RM whose lorafit.json (stack) is mutated.
    Stack,
    /// `merge` with a mutated base weights file or adapter.
    Merge(&'static str),
    /// The data readers of every stage.
    Data(&'static str),
}

const TARGETS: &[(Target, u32)] = &[
    (Target::ModelWeights("gpt2-a"), 3),
    (Target::ModelWeights("llama-b"), 2),
    (Target::ModelWeights("gpt2-b"), 4),
    (Target::AdapterWeights("gpt2-a"), 3),
    (Target::AdapterWeights("llama-a"), 1),
    (Target::Reward("adapter_model.safetensors"), 2),
    (Target::Config("gpt2-a"), 3),
    (Target::Config("llama-a"), 3),
    (Target::AdapterConfig("gpt2-a"), 2),
    (Target::AdapterConfig("llama-a"), 2),
    (Target::Reward("adapter_config.json"), 1),
    (Target::Tokenizer, 3),
    (Target::Stack, 2),
    (Target::Merge("gpt2-a"), 1),
    (Target::Merge("gpt2-b"), 1),
    (Target::Data("data/sft_sample.json"), 1),
    (Target::Data("data/sft_sample.jsonl"), 1),
    (Target::Data("data/alpaca_sample.json"), 1),
    (Target::Data("data/rm_sample.json"), 1),
    (Target::Data("data/rm_pairs_sample.jsonl"), 1),
    (Target::Data("data/ppo_prompts.json"), 1),
    (Target::Data("data/eval_sample.txt"), 1),
    (Target::Data("tests/fixtures/rm_rows.json"), 1),
    // Conversations (issue 13): messages, ShareGPT, TRL preference rows; JSON Lines, JSON, Parquet.
    (Target::Data("data/chat_sample.jsonl"), 1),
    (Target::Data("data/sharegpt_sample.json"), 1),
    (Target::Data("data/chat_pref_sample.jsonl"), 1),
    (Target::Data("tests/fixtures/data/messages.parquet"), 1),
    (Target::Data("tests/fixtures/data/preference.parquet"), 1),
];

fn target(rng: &mut Rng) -> Target {
    let total: u32 = TARGETS.iter().map(|(_, w)| w).sum();
    let mut r = rng.below(total as usize) as u32;
    for (t, w) in TARGETS {
        if r < *w {
            return *t;
        }
        r -= w;
    }
    unreachable!()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Links (or copies, for what a case may change) a fixture folder into `to`.
fn link_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            link_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::os::unix::fs::symlink(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Replaces the link `p` with `bytes`.
fn put(p: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(p);
    std::fs::write(p, bytes).unwrap();
}

/// Writes case `n`'s files under `dir` and returns what to load and a description.
fn build(n: u64, seed: u64, dir: &Path) -> (Target, String) {
    let mut rng = Rng::new(seed.wrapping_mul(0x1000_0001).wrapping_add(n));
    let t = target(&mut rng);
    let rounds = 1 + rng.below(2) + usize::from(rng.chance(0.1));
    let mut what = vec![];
    let mutate_file = |p: &Path, rng: &mut Rng, kind: &str| -> Vec<String> {
        let mut b = std::fs::read(p).unwrap();
        let mut what = vec![];
        for _ in 0..rounds {
            let w = match kind {
                "safetensors" => {
                    let (nb, w) = if split_ok(&b) { mutate_safetensors(&b, rng) } else { let mut x = b.clone(); let w = mutate_bytes(&mut x, rng, 0); (x, w) };
                    b = nb;
                    w
                }
                "pth" => {
                    let (nb, w) = mutate_pth(&b, rng);
                    b = nb;
                    w
                }
                "json" | "llama-json" => match serde_json::from_slice::<Value>(&b) {
                    Ok(mut v) if rng.chance(0.8) => {
                        let w = mutate_json(&mut v, rng, &|_, _| false);
                        b = to_text(&v, rng);
                        w
                    }
                    _ => mutate_bytes(&mut b, rng, 0),
                },
                "jsonl" => {
                    // One line's JSON, or the bytes.
                    let text = String::from_utf8_lossy(&b).to_string();
                    let mut lines: Vec<String> = text.lines().map(String::from).collect();
                    let i = rng.below(lines.len());
                    match lines.get(i).and_then(|l| serde_json::from_str::<Value>(l).ok()).ok_or(()) {
                        Ok(mut v) if rng.chance(0.7) => {
                            let w = mutate_json(&mut v, rng, &|_, _| false);
                            lines[i] = String::from_utf8(to_text(&v, rng)).unwrap().replace('\n', " ");
                            b = lines.join("\n").into_bytes();
                            format!("line {}: {w}", i + 1)
                        }
                        _ => mutate_bytes(&mut b, rng, 0),
                    }
                }
                _ => mutate_bytes(&mut b, rng, 0),
            };
            what.push(w);
        }
        put(p, &b);
        what
    };
    let model = dir.join("model");
    match t {
        Target::ModelWeights(m) | Target::Merge(m) => {
            link_dir(&fixture(m), &model);
            let (file, kind) = match m {
                "gpt2-b" => ("pytorch_model.bin".to_string(), "pth"),
                "llama-b" => (format!("model-0000{}-of-00003.safetensors", 1 + rng.below(3)), "safetensors"),
                _ => ("model.safetensors".to_string(), "safetensors"),
            };
            let file = if matches!(t, Target::Merge(_)) && rng.chance(0.3) { "adapter/adapter_model.safetensors".to_string() } else { file };
            let kind = if file.starts_with("adapter/") { "safetensors" } else { kind };
            let w = mutate_file(&model.join(&file), &mut rng, kind);
            what.push(format!("{m}/{file}"));
            what.extend(w);
        }
        Target::AdapterWeights(m) => {
            link_dir(&fixture(m), &model);
            let w = mutate_file(&model.join("adapter/adapter_model.safetensors"), &mut rng, "safetensors");
            what.push(format!("{m}/adapter/adapter_model.safetensors"));
            what.extend(w);
        }
        Target::Config(m) => {
            link_dir(&fixture(m), &model);
            let w = mutate_file(&model.join("config.json"), &mut rng, if m.starts_with("llama") { "llama-json" } else { "json" });
            what.push(format!("{m}/config.json"));
            what.extend(w);
        }
        Target::AdapterConfig(m) => {
            link_dir(&fixture(m), &model);
            let w = mutate_file(&model.join("adapter/adapter_config.json"), &mut rng, "json");
            what.push(format!("{m}/adapter/adapter_config.json"));
            what.extend(w);
        }
        Target::Tokenizer => {
            link_dir(&fixture("gpt2-a"), &model);
            let w = mutate_file(&model.join("tokenizer.json"), &mut rng, "json");
            what.push("gpt2-a/tokenizer.json".into());
            what.extend(w);
        }
        Target::Reward(f) => {
            link_dir(&fixture("gpt2-a"), &model);
            link_dir(&fixture("rm-gpt2-a"), &dir.join("rm"));
            let w = mutate_file(&dir.join("rm").join(f), &mut rng, if f.ends_with(".json") { "json" } else { "safetensors" });
            what.push(format!("rm-gpt2-a/{f}"));
            what.extend(w);
        }
        Target::Stack => {
            link_dir(&fixture("gpt2-a"), &model);
            let rm = dir.join("rm");
            link_dir(&fixture("rm-gpt2-a"), &rm);
            link_dir(&fixture("gpt2-a").join("adapter"), &rm.join("stack/sft"));
            put(&rm.join("lorafit.json"), br#"{"stack": ["stack/sft"], "copied_from": ["adapters/sft"]}"#);
            if rng.chance(0.3) {
                put(&rm.join("lorafit.json"), br#"{"stacked_on": ["stack/sft"]}"#);
            }
            let w = mutate_file(&rm.join("lorafit.json"), &mut rng, "json");
            what.push("rm/lorafit.json".into());
            what.extend(w);
        }
        Target::Data(rel) => {
            std::fs::create_dir_all(dir).unwrap();
            let name = Path::new(rel).file_name().unwrap();
            std::fs::copy(repo(rel), dir.join(name)).unwrap();
            let w = mutate_file(&dir.join(name), &mut rng, if rel.ends_with(".jsonl") { "jsonl" } else if rel.ends_with(".json") { "json" } else { "text" });
            what.push(rel.to_string());
            what.extend(w);
        }
    }
    (t, what.join("; "))
}

fn split_ok(b: &[u8]) -> bool {
    b.len() >= 8 && {
        let n = u64::from_le_bytes(b[..8].try_into().unwrap());
        n <= (b.len() - 8) as u64 && serde_json::from_slice::<serde_json::Map<String, Value>>(&b[8..8 + n as usize]).is_ok_and(|h| {
            h.iter().filter(|(k, _)| *k != "__metadata__").all(|(_, t)| t["data_offsets"].as_array().is_some_and(|o| o.len() == 2 && o.iter().all(|x| x.as_u64().is_some())))
                && h.len() > 1
        })
    }
}

/// Loads case `n`'s files the way the commands do.
fn load(t: Target, dir: &Path) -> anyhow::Result<()> {
    use lorafit::cli::{load_model, ModelArgs};
    let model = dir.join("model");
    let args = |adapter: bool| ModelArgs {
        model: model.display().to_string(),
        adapter: if adapter { vec![model.join("adapter").display().to_string()] } else { vec![] },
        dtype: "f32".into(),
        device: "cpu".into(),
        quantize: "none".into(),
    };
    let eval = |a: &ModelArgs| -> anyhow::Result<()> {
        let (m, tok, _) = load_model(a)?;
        lorafit::eval::eval_lines(&m, &tok, &["hello world".into(), "Q: 사과\nA: 네".into()], "fuzz")?;
        Ok(())
    };
    match t {
        Target::ModelWeights(_) | Target::Config(_) => eval(&args(false)),
        Target::AdapterWeights(_) | Target::AdapterConfig(_) => eval(&args(true)),
        Target::Tokenizer => {
            let tok = lorafit::tokenizer::Tokenizer::load(&model.join("tokenizer.json"), &model.join("config.json"))?;
            let ids = tok.encode("Q: 사과 이야기\nA: hello <|endoftext|>")?;
            tok.decode(&ids)?;
            tok.encode_plain("x")?;
            eval(&args(false))
        }
        Target::Reward(_) | Target::Stack => {
            let files = lorafit::weights::ModelFiles::from_dir(&model, "fuzz")?;
            let (adapters, head) = lorafit::reward::load_reward_adapter(&dir.join("rm"), "rm", false)?;
            let m = lorafit::model::Model::load(&files, candle_core::DType::F32, &candle_core::Device::Cpu, lorafit::lora::AdapterSet::new(adapters))?;
            let head = lorafit::reward::RewardHead::from_tensor(head, false, m.arch.hidden_size(), &candle_core::Device::Cpu)?;
            lorafit::reward::score(&m, &head, &[vec![5, 6, 7], vec![8]], 1, 2)?;
            Ok(())
        }
        Target::Merge(_) => {
            let o = lorafit::merge::MergeOptions {
                model: model.display().to_string(),
                adapters: vec![(model.join("adapter"), 1.0)],
                out: dir.join("merged"),
                dtype: None,
                force: false,
                max_shard_size: 100_000,
            };
            lorafit::merge::merge(&o)?;
            Ok(())
        }
        Target::Data(rel) => {
            let p = dir.join(Path::new(rel).file_name().unwrap());
            // Every reader, as every stage would read a file passed to it.
            let results = [
                lorafit::data::read_sft(&p, false).map(drop),
                lorafit::data::read_sft(&p, true).map(drop),
                lorafit::data::read_ranked(&p, false).map(drop),
                lorafit::data::read_ranked(&p, true).map(drop),
                lorafit::data::read_prompts(&p, true).map(drop),
                lorafit::eval::read_lines(&p).map(drop),
                lorafit::data::read_records(&p).map(drop),
                render_rows(&p),
            ];
            results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
        }
    }
}

/// Every stage's reader on `p` (skipping bad rows: the failing reads are the readers above), and
/// its first rows rendered as each stage renders them
/// through a chat template (the tiny Qwen3 fixture's), with and without split_special_tokens.
fn render_rows(p: &Path) -> anyhow::Result<()> {
    use lorafit::data::{read_examples, read_stage, Example, Stage};
    use lorafit::render::{RenderConfig, Renderer};
    let mut first_err = None;
    for stage in [Stage::Sft, Stage::Preference, Stage::Prompts] {
        if let Err(e) = read_stage(p, stage, true) {
            first_err.get_or_insert(e);
        }
    }
    let d = repo("tests/fixtures/chat_sft/model");
    let tok = lorafit::tokenizer::Tokenizer::load(&d.join("tokenizer.json"), &d.join("config.json"))?;
    let (rows, _) = read_examples(p, Stage::Any, true)?;
    for split in [false, true] {
        let r = Renderer::new(&tok, &d, RenderConfig { split_special_tokens: split, max_len: 48, ..Default::default() })?;
        for (_, ex) in rows.iter().take(3) {
            let out = match ex {
                Example::Ranked { .. } => r.encode_reward(ex).map(drop),
                Example::Prompt(pr) => r.encode_prompt_fit(pr, 32).map(drop),
                _ => r.encode_example(ex).map(drop),
            };
            if let Err(e) = out {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

// ---------------------------------------------------------------- the child: runs cases

static PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

#[test]
fn fuzz_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return }; // only as a child of `fuzz_loaders`
    let mut it = spec.split(',');
    let (seed, from, to, root, progress) = (
        it.next().unwrap().parse::<u64>().unwrap(),
        it.next().unwrap().parse::<u64>().unwrap(),
        it.next().unwrap().parse::<u64>().unwrap(),
        PathBuf::from(it.next().unwrap()),
        PathBuf::from(it.next().unwrap()),
    );
    let cap = libc::rlimit { rlim_cur: MEMORY_CAP, rlim_max: MEMORY_CAP };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &cap) }, 0, "setrlimit");
    std::panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| info.payload().downcast_ref::<String>().cloned()).unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        *PANIC.lock().unwrap() = format!("{msg}{at}");
    }));
    let mut log = std::fs::OpenOptions::new().append(true).create(true).open(&progress).unwrap();
    for n in from..to {
        let dir = root.join(format!("case-{n}"));
        writeln!(log, "start {n}").unwrap();
        log.flush().unwrap();
        let (t, _) = build(n, seed, &dir);
        let r = std::panic::catch_unwind(|| load(t, &dir));
        let outcome = match r {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => {
                let msg = format!("{e:#}").replace('\n', " ").replace(&format!("{}/", dir.display()), "");
                format!("err {}", msg.chars().take(300).collect::<String>())
            }
            Err(_) => format!("PANIC {}", PANIC.lock().unwrap().replace('\n', " ")),
        };
        writeln!(log, "end {n} {outcome}").unwrap();
        log.flush().unwrap();
        if std::env::var_os("LORAFIT_FUZZ_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

// ---------------------------------------------------------------- the parent

#[test]
fn fuzz_loaders() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let env_u64 = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seed = env_u64("LORAFIT_FUZZ_SEED").unwrap_or(SEED);
    let (from, to) = match env_u64("LORAFIT_FUZZ_ONLY") {
        Some(n) => (n, n + 1),
        None => (0, env_u64("LORAFIT_FUZZ_CASES").unwrap_or(CASES)),
    };
    let root = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("LORAFIT_FUZZ_KEEP").is_some();
    let t0 = Instant::now();
    let workers = 2u64.min(to - from);
    let chunk = (to - from).div_ceil(workers);
    // Each worker runs its range in children; a child that dies is replaced after its case.
    let results: Vec<(BTreeMap<u64, String>, Vec<String>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..workers)
            .map(|w| {
                let root = root.path().to_path_buf();
                sc.spawn(move || run_range(seed, from + w * chunk, (from + (w + 1) * chunk).min(to), &root, w))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut outcomes = BTreeMap::new();
    let mut failures = vec![];
    for (o, f) in results {
        outcomes.extend(o);
        failures.extend(f);
    }
    for (n, o) in &outcomes {
        if o.starts_with("PANIC") {
            failures.push(format!("case {n} panicked: {o}"));
        }
    }
    let ok = outcomes.values().filter(|o| *o == "ok").count();
    let errs = outcomes.values().filter(|o| o.starts_with("err")).count();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("fuzz: {} cases (seed {seed:#x}) in {secs:.1} s: {ok} loaded, {errs} refused with an error, {} failures", to - from, failures.len());
    let mut firsts: BTreeMap<String, u64> = BTreeMap::new();
    for (n, o) in &outcomes {
        let key: String = o.chars().take(70).collect();
        firsts.entry(key).or_insert(*n);
    }
    if std::env::var_os("LORAFIT_FUZZ_VERBOSE").is_some() {
        for (k, n) in &firsts {
            eprintln!("  e.g. case {n}: {k}");
        }
    }
    if keep {
        eprintln!("fuzz: case files kept in {}", root.keep().display());
    }
    let described: Vec<String> = failures
        .iter()
        .take(20)
        .map(|f| {
            let n: u64 = f.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
            let d = tempfile::tempdir().unwrap();
            let (_, what) = build(n, seed, d.path());
            format!("{f}\n    mutation: {what}\n    rerun: LORAFIT_FUZZ_ONLY={n} LORAFIT_FUZZ_SEED={seed} LORAFIT_FUZZ_KEEP=1 cargo test --release --test fuzz -- --nocapture")
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} fuzz cases crashed:\n{}", failures.len(), to - from, described.join("\n"));
    assert_eq!(outcomes.len() as u64, to - from, "every case ran");
}

/// Runs cases `from..to` in child processes; returns each case's outcome and the crashes.
fn run_range(seed: u64, from: u64, to: u64, root: &Path, worker: u64) -> (BTreeMap<u64, String>, Vec<String>) {
    let progress = root.join(format!("progress-{worker}.log"));
    let mut outcomes = BTreeMap::new();
    let mut failures = vec![];
    let mut next = from;
    while next < to {
        let before = next;
        let _ = std::fs::remove_file(&progress);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "fuzz_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, format!("{seed},{next},{to},{},{}", root.display(), progress.display()))
            .env("RUST_BACKTRACE", "0")
            // Few threads and malloc arenas: the address-space cap must not depend on the core count.
            .env("RAYON_NUM_THREADS", "1")
            .env("MALLOC_ARENA_MAX", "2")
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let tail = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        // Wait, killing a child whose current case runs too long.
        let mut last = (0usize, Instant::now());
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            let len = std::fs::metadata(&progress).map(|m| m.len() as usize).unwrap_or(0);
            if len != last.0 {
                last = (len, Instant::now());
            } else if last.1.elapsed() > CASE_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = tail.join().unwrap();
        let log = std::fs::read_to_string(&progress).unwrap_or_default();
        let mut started = None;
        for line in log.lines() {
            let mut w = line.splitn(3, ' ');
            match (w.next(), w.next().and_then(|n| n.parse::<u64>().ok()), w.next()) {
                (Some("start"), Some(n), _) => started = Some(n),
                (Some("end"), Some(n), rest) => {
                    outcomes.insert(n, rest.unwrap_or("").to_string());
                    started = None;
                    next = n + 1;
                }
                _ => {}
            }
        }
        match (status, started) {
            (Some(s), None) if s.success() => {}
            (status, Some(n)) => {
                let how = match status {
                    None => format!("hung (no result in {} s)", CASE_TIMEOUT.as_secs()),
                    Some(s) => {
                        let lines: Vec<&str> = err.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                        let why = lines.iter().find(|l| ["memory allocation", "overflow", "panicked", "abort"].iter().any(|k| l.contains(k)));
                        format!("killed the process ({s}); stderr: {}", why.or(lines.last()).unwrap_or(&""))
                    }
                };
                failures.push(format!("case {n} {how}"));
                outcomes.insert(n, "crash".into());
                next = n + 1;
            }
            (status, None) => {
                failures.push(format!("case {next} the child failed outside a case ({status:?}): {err}"));
                break;
            }
        }
        if next == before {
            failures.push(format!("case {next} the child ran no case: {err}"));
            break;
        }
    }
    (outcomes, failures)
}
