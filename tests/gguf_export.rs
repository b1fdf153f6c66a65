//! `lorafit export` against llama.cpp itself (fixtures from scripts/fixtures/gguf_fixtures.sh,
//! tests/fixtures/gguf/): metadata keys, value types, values and tensor names / types / shapes
//! equal those of llama.cpp's convert_hf_to_gguf.py (+ llama-quantize for q4_k_m) on the same
//! merged model; our f32 tensors are the merged model's bit for bit; our files are the ones
//! llama.cpp ran in the fixture script (tensor data sha256), whose logits are checked against
//! transformers'; ggml's own blocks are reproduced; candle's GGUF reader loads every file.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::fixture;
use lorafit::export::gguf::{Header, Value};
use lorafit::export::quant::{dequantize, quantize, GgmlType, Quant};
use lorafit::export::{export, ExportOptions, Format};
use serde_json::Value as Json;
use sha2::Digest;

const QUANTS: [&str; 4] = ["f32", "f16", "q8_0", "q4_k_m"];

fn gguf_fixture(name: &str) -> PathBuf {
    fixture("gguf").join(name)
}

fn record(m: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(gguf_fixture(&format!("{m}.json"))).unwrap()).unwrap()
}

/// The pair the fixture script exports: adapter at 1 and adapter2 at 0.5.
fn pair(m: &str) -> Vec<(PathBuf, f64)> {
    vec![(fixture(m).join("adapter"), 1.0), (fixture(m).join("adapter2"), 0.5)]
}

fn run_export(model: &Path, adapters: Vec<(PathBuf, f64)>, format: Format, quant: &str, out: &Path) -> lorafit::export::ExportReport {
    run_export_sliced(model, adapters, format, quant, out, lorafit::export::SLICE)
}

fn run_export_sliced(model: &Path, adapters: Vec<(PathBuf, f64)>, format: Format, quant: &str, out: &Path, slice_values: usize) -> lorafit::export::ExportReport {
    let o = ExportOptions {
        model: model.display().to_string(),
        adapters,
        format,
        out: out.to_path_buf(),
        quant: Quant::parse(quant).unwrap(),
        force: true,
        ollama: false,
        slice_values,
    };
    export(&o).unwrap_or_else(|e| panic!("export {} {quant}: {e:#}", model.display()))
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

/// Our file's metadata in the fixture's listing form (arrays as length + sha256 of elements).
fn listing(h: &Header) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    for (k, v) in &h.kvs {
        let j = match v {
            Value::Arr(items) => {
                let bytes: Vec<u8> = match items.first() {
                    Some(Value::Str(_)) => items.iter().map(|s| s.as_str().unwrap().as_bytes().to_vec()).collect::<Vec<_>>().join(&0u8),
                    _ => items
                        .iter()
                        .flat_map(|x| match x {
                            Value::I32(i) => i.to_le_bytes().to_vec(),
                            Value::U32(i) => i.to_le_bytes().to_vec(),
                            Value::F32(f) => f.to_le_bytes().to_vec(),
                            other => panic!("array element {other:?}"),
                        })
                        .collect(),
                };
                let et = v.type_name().trim_start_matches("ARRAY[").trim_end_matches(']').to_string();
                serde_json::json!({"type": format!("ARRAY[{et}]"), "len": items.len(), "sha256": sha(&bytes)})
            }
            Value::Str(s) => serde_json::json!({"type": "STRING", "value": s}),
            Value::F32(f) => serde_json::json!({"type": "FLOAT32", "value": *f as f64}),
            Value::Bool(b) => serde_json::json!({"type": "BOOL", "value": b}),
            other => serde_json::json!({"type": other.type_name(), "value": other.as_u64().unwrap()}),
        };
        out.insert(k.clone(), j);
    }
    out
}

/// Keys compared with llama.cpp's: all but the provenance ones (general.name, size_label, ...
/// and lorafit.*); general.architecture / type / file_type / quantization_version are compared.
fn compared(k: &str) -> bool {
    !k.starts_with("lorafit.") && (!k.starts_with("general.") || matches!(k, "general.architecture" | "general.type" | "general.file_type" | "general.quantization_version"))
}

#[test]
fn metadata_and_tensors_equal_llama_cpps_converter() {
    let tmp = tempfile::tempdir().unwrap();
    for m in ["llama-a", "gpt2-a"] {
        let rec = record(m);
        for q in QUANTS {
            let out = tmp.path().join(format!("{m}-{q}.gguf"));
            run_export(&fixture(m), pair(m), Format::Gguf, q, &out);
            let h = Header::read_file(&out).unwrap();
            let ours: BTreeMap<String, Json> = listing(&h).into_iter().filter(|(k, _)| compared(k)).collect();
            let theirs: BTreeMap<String, Json> =
                rec["llama_cpp"][q]["kvs"].as_object().unwrap().iter().filter(|(k, _)| compared(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
            assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{m} {q}: metadata keys");
            for (k, v) in &theirs {
                let o = &ours[k];
                assert_eq!(o["type"], v["type"], "{m} {q}: type of {k}");
                match (o["value"].as_f64(), v["value"].as_f64()) {
                    (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-7 * b.abs(), "{m} {q}: {k} = {a}, llama.cpp {b}"),
                    _ => assert_eq!(o, v, "{m} {q}: {k}"),
                }
            }
            let mut tensors: Vec<Json> = h.tensors.iter().map(|t| serde_json::json!([t.name, t.ty.name(), t.shape])).collect();
            tensors.sort_by_key(|t| t[0].as_str().unwrap().to_string());
            assert_eq!(Json::Array(tensors), rec["llama_cpp"][q]["tensors"], "{m} {q}: tensor names, types and shapes");
            // The file llama.cpp ran in the fixture script is the one lorafit writes now.
            let bytes = std::fs::read(&out).unwrap();
            assert_eq!(sha(&bytes[h.data_offset as usize..]), rec["ours_data_sha256"][q].as_str().unwrap(), "{m} {q}: tensor data changed since the fixtures were made");
        }
        // The base and LoRA files the fixture ran too.
        let base = tmp.path().join("base.gguf");
        run_export(&fixture(m), vec![], Format::Gguf, "f32", &base);
        let lora = tmp.path().join("lora.gguf");
        run_export(&fixture(m), vec![(fixture(m).join("adapter"), 1.0)], Format::GgufLora, "f32", &lora);
        let lora_pair = tmp.path().join("lora-pair.gguf");
        run_export(&fixture(m), pair(m), Format::GgufLora, "f32", &lora_pair);
        for (f, key) in [(&base, "base-f32"), (&lora, "lora"), (&lora_pair, "lora-pair")] {
            let h = Header::read_file(f).unwrap();
            let bytes = std::fs::read(f).unwrap();
            assert_eq!(sha(&bytes[h.data_offset as usize..]), rec["ours_data_sha256"][key].as_str().unwrap(), "{m} {key}");
        }
    }
}

/// Mean next-token NLL of each row of `logits` (texts, T, V) for `ids`.
fn nlls(logits: &Tensor, ids: &Json) -> Vec<f64> {
    let l: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    l.iter()
        .zip(ids.as_array().unwrap())
        .map(|(rows, seq)| {
            let seq: Vec<usize> = seq.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let n = seq.len().min(rows.len());
            (0..n - 1)
                .map(|t| {
                    let m = rows[t].iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                    let lse = m + rows[t].iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    lse - rows[t][seq[t + 1]] as f64
                })
                .sum::<f64>()
                / (n - 1) as f64
        })
        .collect()
}

#[test]
fn llama_cpps_logits_on_our_files_match_transformers() {
    // Per-token logits llama.cpp computed (f32 KV cache) from our exports of the merged fixture
    // models, against transformers on the same merged model (fixture script, tests/fixtures/gguf).
    for m in ["llama-a", "gpt2-a"] {
        let rec = record(m);
        let t = candle_core::safetensors::load(gguf_fixture(&format!("{m}-logits.safetensors")), &Device::Cpu).unwrap();
        let diff = |a: &str, b: &str| -> f32 {
            (&t[a] - &t[b]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        let own = |q: &str| rec["llama_cpp_own_files_max_abs_diff_vs_transformers"][q].as_f64().unwrap() as f32;
        let scale = t["hf.pair"].abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 1.0, "{m}: logits of magnitude {scale}: a meaningful comparison");
        // Our files and llama.cpp's converter's give llama.cpp the very same logits (f32, f16,
        // q8_0: the same tensor bytes); q4_k_m differs (llama.cpp quantizes its f16 file, we the
        // f32 merge) but is as close to transformers (below).
        for q in ["f32", "f16", "q8_0"] {
            let d = rec["ours_vs_llama_cpp_own_files_max_abs_diff"][q].as_f64().unwrap();
            assert!(d < 1e-6, "{m} {q}: llama.cpp on ours vs on its converter's file: {d}");
        }
        // f32: 1e-4 for LLaMA. GPT-2 in llama.cpp computes GELU through an f16 lookup table
        // (ggml's GGML_GELU_FP16), ~1.5e-3 from transformers whoever wrote the file: the bound is
        // llama.cpp's own f32 conversion's distance.
        let f32_bound = if m == "gpt2-a" { own("f32") + 1e-6 } else { 1e-4 };
        assert!(f32_bound < 5e-3, "{m}: llama.cpp's own f32 file is {f32_bound} from transformers");
        let d = diff("ours.f32", "hf.pair");
        assert!(d < f32_bound, "{m} f32: max |llama.cpp - transformers| = {d} >= {f32_bound}");
        let d = diff("ours.f16", "hf.pair");
        assert!(d < 1e-2, "{m} f16: max |llama.cpp - transformers| = {d}");
        // q8_0: llama.cpp also quantizes the activations to 8 bits in its q8_0 products; on these
        // small random models that is up to ~5% of the logit range, for its own q8_0 file alike.
        // The bound 5e-2 holds for each line's mean NLL; the logits stay within llama.cpp's own.
        let d = diff("ours.q8_0", "hf.pair");
        assert!(d <= own("q8_0") + 1e-6 && d < 0.06 * scale, "{m} q8_0: {d} (llama.cpp's own q8_0 file: {})", own("q8_0"));
        let ref_nll = nlls(&t["hf.pair"], &rec["ids"]);
        let f32_nll = if m == "gpt2-a" { 1e-3 } else { 1e-4 }; // GPT-2: ggml's f16 GELU table, as above
        for (q, tol) in [("f32", f32_nll), ("f16", 1e-2), ("q8_0", 5e-2)] {
            let got = nlls(&t[&format!("ours.{q}")], &rec["ids"]);
            for (a, b) in got.iter().zip(&ref_nll) {
                assert!((a - b).abs() < tol, "{m} {q}: per-line NLL {a} vs transformers {b}");
            }
        }
        let (ours, theirs) = (diff("ours.q4_k_m", "hf.pair"), own("q4_k_m"));
        assert!(ours <= theirs * 1.25 + 1e-3, "{m} q4_k_m: ours {ours}, llama.cpp's own {theirs}");
        // Base GGUF + LoRA GGUF applied by llama.cpp at load: as the merged model.
        let bound = if m == "gpt2-a" { own("f32") * 1.5 } else { 1e-4 };
        assert!(diff("ours.lora", "hf.single") < bound, "{m}: base + LoRA GGUF vs transformers + PEFT: {}", diff("ours.lora", "hf.single"));
        assert!(diff("ours.lora_pair", "hf.pair") < bound, "{m}: base + stacked LoRA GGUF: {}", diff("ours.lora_pair", "hf.pair"));
    }
}

/// Undoes llama.cpp's q/k permutation and GPT-2's transpose: GGUF name -> checkpoint values.
fn to_checkpoint(name: &str, v: Vec<f32>, shape: &[usize], cfg: &Json, gpt2: bool) -> (Vec<f32>, Vec<usize>) {
    let heads = cfg["num_attention_heads"].as_u64().unwrap_or(1) as usize;
    if name.ends_with("attn_q.weight") && !gpt2 {
        return (lorafit::export::arch::unpermute(&v, shape[0], heads).unwrap(), shape.to_vec());
    }
    if name.ends_with("attn_k.weight") && !gpt2 {
        let kv = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
        return (lorafit::export::arch::unpermute(&v, shape[0], kv).unwrap(), shape.to_vec());
    }
    let conv1d = gpt2 && ["attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"].iter().any(|s| name.ends_with(s));
    if conv1d {
        let t = Tensor::from_vec(v, (shape[0], shape[1]), &Device::Cpu).unwrap().t().unwrap().contiguous().unwrap();
        return (t.flatten_all().unwrap().to_vec1().unwrap(), vec![shape[1], shape[0]]);
    }
    (v, shape.to_vec())
}

#[test]
fn f32_export_is_the_merged_model_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for (m, names) in [
        ("llama-a", &[("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight"), ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"), ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"), ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"), ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight")][..]),
        ("gpt2-a", &[("token_embd.weight", "transformer.wte.weight"), ("blk.0.attn_qkv.weight", "transformer.h.0.attn.c_attn.weight"), ("blk.1.ffn_up.weight", "transformer.h.1.mlp.c_fc.weight"), ("blk.1.ffn_down.weight", "transformer.h.1.mlp.c_proj.weight"), ("blk.0.attn_qkv.bias", "transformer.h.0.attn.c_attn.bias"), ("position_embd.weight", "transformer.wpe.weight")][..]),
    ] {
        let merged = tmp.path().join(format!("{m}-merged"));
        lorafit::merge::merge(&lorafit::merge::MergeOptions {
            model: fixture(m).display().to_string(),
            adapters: pair(m),
            out: merged.clone(),
            dtype: Some(DType::F32),
            force: false,
            max_shard_size: 1 << 40,
        })
        .unwrap();
        let reference = candle_core::safetensors::load(merged.join("model.safetensors"), &Device::Cpu).unwrap();
        let out = tmp.path().join(format!("{m}.gguf"));
        run_export(&fixture(m), pair(m), Format::Gguf, "f32", &out);
        let h = Header::read_file(&out).unwrap();
        let mut f = std::fs::File::open(&out).unwrap();
        let cfg: Json = serde_json::from_str(&std::fs::read_to_string(fixture(m).join("config.json")).unwrap()).unwrap();
        assert_eq!(h.tensors.len(), reference.len(), "{m}: one GGUF tensor per checkpoint tensor");
        for (g, hf) in names {
            let info = h.tensors.iter().find(|t| t.name == *g).unwrap();
            let v = dequantize(GgmlType::F32, &h.tensor_bytes(&mut f, g).unwrap()).unwrap();
            let (v, shape) = to_checkpoint(g, v, &info.shape, &cfg, m == "gpt2-a");
            let r = &reference[*hf];
            assert_eq!(r.dims(), shape.as_slice(), "{m} {g}");
            let rv: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
            let same = rv.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{m}: {g} differs from the merged {hf}");
        }
    }
}

#[test]
fn quantized_blocks_equal_ggmls() {
    // ggml_quantize_chunk's bytes for a fixed matrix (4 rows of 512: small, unit, large scales
    // and an all-positive block): lorafit's quantization gives the same blocks.
    let t = candle_core::safetensors::load(gguf_fixture("ggml_blocks.safetensors"), &Device::Cpu).unwrap();
    let x: Vec<f32> = t["input"].flatten_all().unwrap().to_vec1().unwrap();
    // (type, largest error as a fraction of the row's largest magnitude: half a quantization step)
    for (name, ty, frac) in [
        ("Q8_0", GgmlType::Q8_0, 0.005),
        ("Q4_0", GgmlType::Q4_0, 0.13), // max / 8: +max has no level (levels -8..7)
        ("Q5_0", GgmlType::Q5_0, 0.065), // max / 16 likewise
        ("Q5_1", GgmlType::Q5_1, 0.035),
        ("Q4_K", GgmlType::Q4_K, 0.1),
        ("Q5_K", GgmlType::Q5_K, 0.05),
        ("Q6_K", GgmlType::Q6_K, 0.03),
    ] {
        let want: Vec<u8> = t[name].to_vec1().unwrap();
        let got = quantize(ty, &x, 512).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let block = ty.bytes(ty.block());
        let differing = got.chunks(block).zip(want.chunks(block)).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} of {} blocks differ from ggml's", got.len() / block);
        // And they decode to within the format's error.
        let back = dequantize(ty, &got).unwrap();
        for (r, (xs, ys)) in x.chunks(512).zip(back.chunks(512)).enumerate() {
            let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = xs.iter().zip(ys).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= frac * max, "{name} row {r}: error {err} > {frac} x {max}");
        }
    }
}

/// scripts/fixtures/gguf_fixtures.py's `probe_matrix`, value for value.
fn probe_matrix(rows: usize, cols: usize) -> Vec<f32> {
    let mut s: u32 = 2463534242;
    let scales = [0.001f32, 0.02, 1.0, 3.0, 50.0];
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let mut v = ((s % 20001) as i32 - 10000) as f32 / 10000.0;
            v *= scales[r % 5];
            if r % 7 == 0 {
                v = v.abs();
            }
            if r % 11 == 0 && c == r % cols {
                v *= 8.0;
            }
            out.push(v);
        }
    }
    out
}

#[test]
fn quantized_probe_matrix_equals_ggmls() {
    // 256 x 512 values over five decades of scale: every block lorafit writes equals
    // ggml_quantize_chunk's (sha256 of the whole output per type, from the fixture script).
    let rec: Json = serde_json::from_str(&std::fs::read_to_string(gguf_fixture("ggml_probe.json")).unwrap()).unwrap();
    let (rows, cols) = (rec["rows"].as_u64().unwrap() as usize, rec["cols"].as_u64().unwrap() as usize);
    let x = probe_matrix(rows, cols);
    for (name, ty) in [("Q8_0", GgmlType::Q8_0), ("Q4_0", GgmlType::Q4_0), ("Q5_0", GgmlType::Q5_0), ("Q5_1", GgmlType::Q5_1), ("Q4_K", GgmlType::Q4_K), ("Q5_K", GgmlType::Q5_K), ("Q6_K", GgmlType::Q6_K)] {
        let got = quantize(ty, &x, cols).unwrap();
        assert_eq!(sha(&got), rec["sha256"][name].as_str().unwrap(), "{name}: lorafit's blocks differ from ggml's");
    }
}

#[test]
fn candles_reader_loads_every_export() {
    let tmp = tempfile::tempdir().unwrap();
    for m in ["llama-a", "gpt2-a"] {
        let mut files = vec![];
        for q in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] {
            let out = tmp.path().join(format!("{m}-{q}.gguf"));
            run_export(&fixture(m), pair(m), Format::Gguf, q, &out);
            files.push(out);
        }
        let lora = tmp.path().join(format!("{m}-lora.gguf"));
        run_export(&fixture(m), pair(m), Format::GgufLora, "f16", &lora);
        files.push(lora);
        for p in files {
            let mut f = std::fs::File::open(&p).unwrap();
            let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let ours = Header::read_file(&p).unwrap();
            assert_eq!(c.tensor_infos.len(), ours.tensors.len());
            assert_eq!(c.metadata.len(), ours.kvs.len());
            for t in &ours.tensors {
                let q = c.tensor(&mut f, &t.name, &Device::Cpu).unwrap();
                assert_eq!(q.shape().dims(), t.shape.as_slice(), "{} {}", p.display(), t.name);
                let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mine = dequantize(t.ty, &ours.tensor_bytes(&mut f, &t.name).unwrap()).unwrap();
                assert_eq!(deq, mine, "{} {}", p.display(), t.name);
            }
        }
    }
}

#[test]
fn large_tensors_in_slices_equal_whole() {
    // A tensor over the slice size is read and permuted in pieces: the same bytes as whole.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wide-llama");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = serde_json::json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 400,
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(fixture("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut rng = lorafit::rng::SeededRng::new(1);
    let mut t = std::collections::HashMap::new();
    let mut put = |rng: &mut lorafit::rng::SeededRng, name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.uniform_f32() - 0.5).collect();
        t.insert(name.to_string(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    put(&mut rng, "model.embed_tokens.weight", &[400, 256]);
    put(&mut rng, "lm_head.weight", &[400, 256]);
    put(&mut rng, "model.norm.weight", &[256]);
    put(&mut rng, "model.layers.0.input_layernorm.weight", &[256]);
    put(&mut rng, "model.layers.0.post_attention_layernorm.weight", &[256]);
    put(&mut rng, "model.layers.0.self_attn.q_proj.weight", &[256, 256]);
    put(&mut rng, "model.layers.0.self_attn.k_proj.weight", &[128, 256]);
    put(&mut rng, "model.layers.0.self_attn.v_proj.weight", &[128, 256]);
    put(&mut rng, "model.layers.0.self_attn.o_proj.weight", &[256, 256]);
    put(&mut rng, "model.layers.0.mlp.gate_proj.weight", &[512, 256]);
    put(&mut rng, "model.layers.0.mlp.up_proj.weight", &[512, 256]);
    put(&mut rng, "model.layers.0.mlp.down_proj.weight", &[256, 512]);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    // An adapter on q_proj (permuted), down_proj and lm_head: slices fold B's rows.
    let ad = tmp.path().join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    let acfg = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "down_proj", "lm_head"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false});
    std::fs::write(ad.join("adapter_config.json"), acfg.to_string()).unwrap();
    let mut a = std::collections::HashMap::new();
    for (path, inp, out) in [("model.layers.0.self_attn.q_proj", 256, 256), ("model.layers.0.mlp.down_proj", 512, 256), ("lm_head", 256, 400)] {
        let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform_f32() - 0.5).collect() };
        a.insert(format!("base_model.model.{path}.lora_A.weight"), Tensor::from_vec(r(4 * inp), (4, inp), &Device::Cpu).unwrap());
        a.insert(format!("base_model.model.{path}.lora_B.weight"), Tensor::from_vec(r(out * 4), (out, 4), &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&a, ad.join("adapter_model.safetensors")).unwrap();
    let out = tmp.path().join("w.gguf");
    run_export_sliced(&dir, vec![(ad.clone(), 0.7)], Format::Gguf, "f32", &out, 1000);
    let whole = tmp.path().join("w2.gguf");
    run_export(&dir, vec![(ad.clone(), 0.7)], Format::Gguf, "f32", &whole);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap(), "sliced and whole f32 exports differ");
    run_export_sliced(&dir, vec![(ad.clone(), 0.7)], Format::Gguf, "q4_k_m", &out, 1000);
    run_export(&dir, vec![(ad, 0.7)], Format::Gguf, "q4_k_m", &whole);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap(), "sliced and whole q4_k_m exports differ");
    let h = Header::read_file(&whole).unwrap();
    let ty = |n: &str| h.tensors.iter().find(|t| t.name == n).unwrap().ty.name();
    // 256-wide rows: real k-quant blocks; one layer: use_more_bits picks it; ffn_down rows 512.
    assert_eq!((ty("blk.0.attn_q.weight"), ty("blk.0.attn_v.weight"), ty("blk.0.ffn_down.weight"), ty("output.weight")), ("Q4_K", "Q6_K", "Q6_K", "Q6_K"));
}

#[test]
fn stories260k_matches_the_converter_and_tokenizes_better() {
    // A real tiny Llama whose tokenizer.json is SentencePiece-style BPE with byte fallback
    // (tokenizer.ggml.model = "llama"). Two deliberate differences from llama.cpp's converter,
    // which has only tokenizer.json here: scores are minus each token's merge rank (it writes
    // -1000 for all), and the tokens tokenizer.json marks special are CONTROL (it writes NORMAL,
    // as transformers lists no special tokens without tokenizer_config.json). With them,
    // llama.cpp tokenizes every probe line as the Hugging Face tokenizer does (fixture script).
    let Some(st) = common::shared_asset("stories260K") else { return };
    let rec: Json = serde_json::from_str(&std::fs::read_to_string(gguf_fixture("stories260K.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("st.gguf");
    run_export(&st, vec![], Format::Gguf, "f32", &out);
    let h = Header::read_file(&out).unwrap();
    let ours = listing(&h);
    let theirs = rec["llama_cpp"]["f32"]["kvs"].as_object().unwrap();
    let keys = |it: Vec<&String>| it.into_iter().filter(|k| compared(k)).cloned().collect::<Vec<_>>();
    assert_eq!(keys(ours.keys().collect()), keys(theirs.keys().collect()));
    for (k, v) in theirs.iter().filter(|(k, _)| compared(k)) {
        if k == "tokenizer.ggml.scores" || k == "tokenizer.ggml.token_type" {
            assert_eq!((&ours[k]["type"], &ours[k]["len"]), (&v["type"], &v["len"]), "{k}");
            continue;
        }
        match (ours[k]["value"].as_f64(), v["value"].as_f64()) {
            (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-7 * b.abs(), "{k}: {a} vs {b}"),
            _ => assert_eq!(&ours[k], v, "{k}"),
        }
    }
    let Some(Value::Arr(types)) = h.get("tokenizer.ggml.token_type") else { panic!() };
    assert_eq!(types[..4], [Value::I32(3), Value::I32(3), Value::I32(3), Value::I32(6)], "<unk> <s> </s> CONTROL, <0x00> BYTE");
    let mut tensors: Vec<Json> = h.tensors.iter().map(|t| serde_json::json!([t.name, t.ty.name(), t.shape])).collect();
    tensors.sort_by_key(|t| t[0].as_str().unwrap().to_string());
    assert_eq!(Json::Array(tensors), rec["llama_cpp"]["f32"]["tensors"]);
    let agree = |who: &str| rec["tokenization"][who]["agree"].as_array().unwrap().iter().filter(|a| a.as_bool().unwrap()).count();
    assert_eq!(agree("ours"), rec["tokenization"]["lines"].as_array().unwrap().len(), "llama.cpp on our file tokenizes every line as HF");
    assert!(agree("ours") > agree("llama_cpp_converter"));
}
