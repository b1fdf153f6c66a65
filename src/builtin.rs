//! Built-in models for offline smoke runs and benchmarks: `--model builtin:<name>`.
//!
//! A fresh machine cannot download a model and fetched weights may not be committed, so
//! lorafit writes these itself: a GPT-2 config, seeded random weights (N(0, 0.02), as HF
//! initialises GPT-2) and a byte-level tokenizer made in code (256 byte tokens, no merges,
//! plus `<|endoftext|>`). They are UNTRAINED: outputs are noise until you fine-tune them.
//! The folder is written once under the cache dir (`$LORAFIT_CACHE`, else
//! `$XDG_CACHE_HOME/lorafit`, else `~/.cache/lorafit`) and is a normal HF model folder.
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::rng::SeededRng;

struct Spec {
    name: &'static str,
    about: &'static str,
    vocab: usize,
    positions: usize,
    embd: usize,
    layers: usize,
    heads: usize,
}

const SPECS: &[Spec] = &[
    Spec { name: "tiny-gpt2", about: "2 layers, 64 wide, byte-level: a smoke-test model", vocab: 257, positions: 512, embd: 64, layers: 2, heads: 4 },
    Spec { name: "kogpt2-shape", about: "KoGPT2's shape (12 x 768, vocab 51,200), random: for benchmarks", vocab: 51200, positions: 1024, embd: 768, layers: 12, heads: 12 },
];

/// Names accepted after `builtin:`.
pub fn names() -> Vec<&'static str> {
    SPECS.iter().map(|s| s.name).collect()
}

pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("LORAFIT_CACHE") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lorafit");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache").join("lorafit")
}

/// GPT-2's byte -> printable char map (`bytes_to_unicode`), used by byte-level BPE vocabularies.
pub fn byte_chars() -> Vec<char> {
    let direct: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if direct.contains(&b) {
            chars[b as usize] = char::from_u32(b).unwrap();
        } else {
            chars[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        }
    }
    chars
}

/// A byte-level BPE tokenizer.json with no merges: token id = byte value, 256 = `<|endoftext|>`.
pub fn byte_tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> =
        byte_chars().iter().enumerate().map(|(i, c)| (c.to_string(), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Writes the builtin model `name` (once) and returns its folder.
pub fn materialize(name: &str) -> Result<PathBuf> {
    let Some(spec) = SPECS.iter().find(|s| s.name == name) else {
        bail!("unknown builtin model {name:?}; builtin models: {}", names().join(", "))
    };
    let dir = cache_dir().join("builtin").join(format!("{name}-v1"));
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    tracing::info!("writing builtin model {name} ({}) to {}", spec.about, dir.display());
    let parent = dir.parent().unwrap();
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;

    let config = json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": spec.vocab, "n_positions": spec.positions, "n_ctx": spec.positions,
        "n_embd": spec.embd, "n_layer": spec.layers, "n_head": spec.heads, "n_inner": null,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 256, "eos_token_id": 256, "tie_word_embeddings": true,
        "lorafit_builtin": format!("{name}: {} (untrained, seeded random weights)", spec.about),
    });
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    std::fs::write(tmp.join("tokenizer.json"), serde_json::to_string(&byte_tokenizer_json())?)?;

    let dev = Device::Cpu;
    let (c, f) = (spec.embd, 4 * spec.embd);
    let mut rng = SeededRng::new(0x10AF17);
    let mut w: HashMap<String, Tensor> = HashMap::new();
    let mut normal = |shape: &[usize]| rng.normal(shape, 0.02, &dev);
    w.insert("transformer.wte.weight".into(), normal(&[spec.vocab, c])?);
    w.insert("transformer.wpe.weight".into(), normal(&[spec.positions, c])?);
    for i in 0..spec.layers {
        let p = format!("transformer.h.{i}");
        for (name, shape) in [("attn.c_attn", [c, 3 * c]), ("attn.c_proj", [c, c]), ("mlp.c_fc", [c, f]), ("mlp.c_proj", [f, c])] {
            w.insert(format!("{p}.{name}.weight"), normal(&shape)?);
            w.insert(format!("{p}.{name}.bias"), Tensor::zeros(shape[1], candle_core::DType::F32, &dev)?);
        }
        for ln in ["ln_1", "ln_2"] {
            w.insert(format!("{p}.{ln}.weight"), Tensor::ones(c, candle_core::DType::F32, &dev)?);
            w.insert(format!("{p}.{ln}.bias"), Tensor::zeros(c, candle_core::DType::F32, &dev)?);
        }
    }
    w.insert("transformer.ln_f.weight".into(), Tensor::ones(c, candle_core::DType::F32, &dev)?);
    w.insert("transformer.ln_f.bias".into(), Tensor::zeros(c, candle_core::DType::F32, &dev)?);
    candle_core::safetensors::save(&w, tmp.join("model.safetensors"))?;

    // Another process may have written it meanwhile: keep theirs.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model.safetensors").is_file() {
            bail!("cannot write builtin model to {}", dir.display())
        }
    }
    Ok(dir)
}
