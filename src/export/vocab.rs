//! The tokenizer as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), as llama.cpp's
//! converter writes it from a Hugging Face folder (`TextModel._set_vocab_gpt2`,
//! `_set_vocab_llama_hf`, gguf-py `SpecialVocab`), or a refusal saying why llama.cpp cannot run it.
//!
//! - Byte-level BPE (GPT-2, Llama 3, Qwen, ...): `tokenizer.ggml.model = "gpt2"`, tokens (padded
//!   to the config's vocab_size with `[PADn]`), token types, merges, and `tokenizer.ggml.pre`, the
//!   pre-tokenizer llama.cpp must apply, named as the converter names it: by the sha256 of the ids
//!   of a fixed text ([`super::pre_hashes`]); a plain GPT-2 ByteLevel pre-tokenizer missing from
//!   that table is `gpt-2`; any other unknown one is refused.
//! - SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, stories260K, ...): `"llama"`,
//!   tokens, types (`<0xNN>` bytes) and scores. The converter writes -1000 for every score when it
//!   has only tokenizer.json; lorafit writes minus the rank of the merge that makes each token, so
//!   llama.cpp's SPM tokenizer (highest score merges first) merges in BPE's order.
//! - Anything else (KoGPT2's Metaspace BPE without byte tokens, WordPiece, Unigram) is refused:
//!   llama.cpp's SPM tokenizer aborts on a character outside such a vocabulary.
use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value as Json;
use sha2::Digest;

use super::gguf::Value;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The tokenizer's metadata and what the rest of the export needs from it.
pub struct Vocab {
    pub kvs: Vec<(String, Value)>,
    /// `gpt2` or `llama`.
    pub model: String,
    pub pre: String,
    pub n_tokens: usize,
    /// End ids (eos, eot) and their texts, for Ollama's stop parameters.
    pub stops: Vec<String>,
    pub chat_template: Option<String>,
    /// What differs from the Hugging Face tokenizer, for the user.
    pub notes: Vec<String>,
}

fn read_json(p: &Path) -> Result<Option<Json>> {
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))?))
}

/// Every node of a pre-tokenizer / normalizer tree (`Sequence`s flattened).
fn flatten<'a>(v: &'a Json, list_key: &str, out: &mut Vec<&'a Json>) {
    if let Some(items) = v.get(list_key).and_then(Json::as_array) {
        items.iter().for_each(|i| flatten(i, list_key, out));
    } else if !v.is_null() {
        out.push(v);
    }
}

fn ty(v: &Json) -> &str {
    v.get("type").and_then(Json::as_str).unwrap_or("")
}

/// The converter's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// sha256 of Python's `str(ids)` of [`super::pre_hashes::CHKTXT`], as `get_vocab_base_pre`.
pub fn pre_hash(tok: &tokenizers::Tokenizer) -> Result<String> {
    let enc = tok.encode(super::pre_hashes::CHKTXT, true).map_err(|e| anyhow!("tokenizing the pre-tokenizer probe: {e}"))?;
    let s = format!("[{}]", enc.get_ids().iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
    Ok(format!("{:x}", sha2::Sha256::digest(s.as_bytes())))
}

/// Builds the tokenizer metadata of the model folder `dir` (tokenizer.json, tokenizer_config.json,
/// config.json, chat_template.jinja) for a model of `vocab_size` embedding rows.
pub fn build(dir: &Path, tokenizer_json: &Path, config: &Json, vocab_size: usize) -> Result<Vocab> {
    let tj = read_json(tokenizer_json)?.with_context(|| {
        format!("{}: no tokenizer.json; GGUF export needs the fast-tokenizer file (save the tokenizer with transformers to get one)", tokenizer_json.display())
    })?;
    let tok = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| anyhow!("cannot load {}: {e}", tokenizer_json.display()))?;
    let tcfg = read_json(&dir.join("tokenizer_config.json"))?;
    let model = &tj["model"];
    let model_type = match model.get("type").and_then(Json::as_str) {
        Some(t) => t.to_string(),
        None if model.get("merges").is_some() => "BPE".into(),
        None => "unknown".into(),
    };
    let mut pre_nodes = vec![];
    flatten(&tj["pre_tokenizer"], "pretokenizers", &mut pre_nodes);
    let byte_level = pre_nodes.iter().any(|p| ty(p) == "ByteLevel");
    let byte_fallback = model.get("byte_fallback").and_then(Json::as_bool).unwrap_or(false);
    let file = tokenizer_json.display();
    if model_type != "BPE" {
        bail!("{file}: a {model_type} tokenizer; lorafit exports BPE tokenizers to GGUF (byte-level, or SentencePiece-style with byte fallback)")
    }
    if !byte_level && !byte_fallback {
        let pre: Vec<&str> = pre_nodes.iter().map(|p| ty(p)).collect();
        bail!(
            "{file}: a BPE vocabulary without a byte-level pre-tokenizer (pre-tokenizer {pre:?}) and without byte fallback \
             (no <0xNN> tokens), as KoGPT2's: llama.cpp cannot represent it (its SentencePiece tokenizer aborts on any \
             character outside the vocabulary, and its BPE tokenizer expects byte-level tokens)"
        )
    }

    // id -> added token (special or not), from tokenizer.json.
    let added: HashMap<u32, (String, bool)> = tj["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["id"].as_u64()? as u32, (a["content"].as_str()?.to_string(), a["special"].as_bool().unwrap_or(false)))))
        .collect();
    let full = tok.get_vocab(true);
    let mut by_id: Vec<Option<String>> = vec![None; vocab_size.max(full.values().map(|&i| i as usize + 1).max().unwrap_or(0))];
    for (t, &i) in &full {
        by_id[i as usize] = Some(t.clone());
    }
    if by_id.len() > vocab_size {
        bail!("{file}: the tokenizer has ids up to {}, but the model has {vocab_size} embedding rows", by_id.len() - 1)
    }
    let mut notes = vec![];
    let mut kvs: Vec<(String, Value)> = vec![];
    let (tok_model, pre);
    if byte_level {
        tok_model = "gpt2";
        let hash = pre_hash(&tok)?;
        let known = super::pre_hashes::PRE_HASHES.iter().find(|(h, _)| *h == hash).map(|(_, n)| n.to_string());
        let plain_gpt2 = pre_nodes.len() == 1 && ty(pre_nodes[0]) == "ByteLevel" && pre_nodes[0].get("use_regex").and_then(Json::as_bool).unwrap_or(true);
        pre = match known {
            Some(n) => n,
            None if plain_gpt2 => "gpt-2".to_string(),
            None => bail!(
                "{file}: llama.cpp does not know this byte-level pre-tokenizer (probe hash {hash}, not in convert_hf_to_gguf's table), \
                 so it would split text differently from the Hugging Face tokenizer"
            ),
        };
        let mut tokens = vec![];
        let mut types = vec![];
        for (i, t) in by_id.iter().enumerate() {
            match (t, added.get(&(i as u32))) {
                (None, _) => {
                    tokens.push(format!("[PAD{i}]"));
                    types.push(UNUSED);
                }
                (Some(t), Some((_, special))) => {
                    if *special || looks_special(t) {
                        tokens.push(t.clone());
                        types.push(CONTROL);
                    } else {
                        tokens.push(t.replace('\u{2581}', " "));
                        types.push(USER_DEFINED);
                    }
                }
                (Some(t), None) => {
                    tokens.push(t.clone());
                    types.push(NORMAL);
                }
            }
        }
        let merges: Vec<String> = merges(model)?;
        kvs.push(("tokenizer.ggml.model".into(), Value::Str(tok_model.into())));
        kvs.push(("tokenizer.ggml.pre".into(), Value::Str(pre.clone())));
        kvs.push(("tokenizer.ggml.tokens".into(), Value::strs(tokens)));
        kvs.push(("tokenizer.ggml.token_type".into(), Value::Arr(types.into_iter().map(Value::I32).collect())));
        kvs.push(("tokenizer.ggml.merges".into(), Value::strs(merges)));
    } else {
        tok_model = "llama";
        pre = "default".to_string();
        // Scores: minus the rank of the merge that makes the token (BPE's order for SPM's search).
        let mut score: HashMap<String, f32> = HashMap::new();
        for (rank, m) in merges(model)?.iter().enumerate() {
            let joined: String = m.split(' ').collect::<Vec<_>>().concat().replace('\u{120}', " ");
            score.entry(joined).or_insert(-(rank as f32));
        }
        let specials: HashSet<u32> = added.iter().filter(|(_, (_, s))| *s).map(|(i, _)| *i).collect();
        let byte_re = regex::Regex::new(r"^<0x[0-9A-Fa-f]{2}>$").unwrap();
        let (mut tokens, mut scores, mut types) = (vec![], vec![], vec![]);
        for (i, t) in by_id.iter().enumerate() {
            let id = i as u32;
            let Some(t) = t else {
                tokens.push(format!("[PAD{i}]"));
                scores.push(-1000.0);
                types.push(UNUSED);
                continue;
            };
            tokens.push(t.clone());
            scores.push(score.get(t).copied().unwrap_or(0.0));
            types.push(if byte_re.is_match(t) {
                BYTE
            } else if specials.contains(&id) {
                CONTROL
            } else if added.contains_key(&id) {
                USER_DEFINED
            } else {
                NORMAL
            });
        }
        if let Some(p) = tcfg.as_ref().and_then(|c| c.get("add_prefix_space")).and_then(Json::as_bool) {
            kvs.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(p)));
        }
        kvs.push(("tokenizer.ggml.model".into(), Value::Str(tok_model.into())));
        kvs.push(("tokenizer.ggml.pre".into(), Value::Str(pre.clone())));
        kvs.push(("tokenizer.ggml.tokens".into(), Value::strs(tokens)));
        kvs.push(("tokenizer.ggml.scores".into(), Value::Arr(scores.into_iter().map(Value::F32).collect())));
        kvs.push(("tokenizer.ggml.token_type".into(), Value::Arr(types.into_iter().map(Value::I32).collect())));
        notes.push("token scores are minus each token's BPE merge rank (llama.cpp's converter writes -1000 for all when it has only tokenizer.json)".into());
    }

    // gguf-py SpecialVocab: ids from tokenizer_config.json's *_token strings, then config.json's
    // *_token_id; add_bos/add_eos from the post-processor, then tokenizer_config.json.
    let mut ids: Vec<(&str, u32)> = vec![];
    let set_id = |ids: &mut Vec<(&str, u32)>, typ: &'static str, id: Option<u64>| {
        if let Some(id) = id.filter(|&i| (i as usize) < vocab_size) {
            if !ids.iter().any(|(t, _)| *t == typ) {
                ids.push((typ, id as u32));
            }
        }
    };
    const TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];
    let mut add: Vec<(&str, bool)> = vec![];
    let mut post = vec![];
    flatten(&tj["post_processor"], "processors", &mut post);
    let special_bos = tcfg.as_ref().and_then(|c| token_text(&c["bos_token"]));
    let special_eos = tcfg.as_ref().and_then(|c| token_text(&c["eos_token"]));
    for p in &post {
        match ty(p) {
            "ByteLevel" => {
                for t in ["bos", "eos"] {
                    if !add.iter().any(|(k, _)| *k == t) {
                        add.push((t, false));
                    }
                }
            }
            "RobertaProcessing" => add.extend([("bos", true), ("eos", true), ("sep", true)]),
            "TemplateProcessing" => {
                let single = p["single"].as_array().cloned().unwrap_or_default();
                let special = |v: &Json| v["SpecialToken"]["id"].as_str().map(String::from);
                let (mut first, mut last) = (None, None);
                if single.len() > 1 {
                    first = special(&single[0]);
                    last = special(&single[single.len() - 1]);
                    if let Some(f) = &first {
                        add.retain(|(k, _)| *k != "bos");
                        add.push(("bos", tcfg.is_none() || special_bos.as_deref() == Some(f.as_str())));
                    }
                    if let Some(l) = &last {
                        add.retain(|(k, _)| *k != "eos");
                        add.push(("eos", tcfg.is_none() || special_eos.as_deref() == Some(l.as_str())));
                    }
                }
                // The pair template "A [sep] B": whether a separator is added (SpecialVocab).
                let pair = p["pair"].as_array().cloned().unwrap_or_default();
                let start = usize::from(first.is_some() && pair.first().and_then(special) == first);
                let stop = pair.len() - usize::from(last.is_some() && pair.last().and_then(special) == last);
                let mid = if start < stop { &pair[start..stop] } else { &pair[0..0] };
                fn seq(v: Option<&Json>) -> Option<&str> {
                    v.and_then(|v| v["Sequence"]["id"].as_str())
                }
                if !mid.is_empty() && seq(mid.first()) == Some("A") && seq(mid.last()) == Some("B") && mid.len() > 2 {
                    let inner = &mid[1..mid.len() - 1];
                    let sep = tcfg.as_ref().and_then(|c| token_text(&c["sep_token"]));
                    let eos = special_eos.clone().or(if tcfg.is_none() { last.clone() } else { None });
                    let is_sep = |t: &Option<String>| t.is_some() && (*t == sep || *t == eos);
                    let e0 = special(&inner[0]);
                    let mut add_sep = is_sep(&e0) && last.is_none();
                    if inner.len() == 2 && is_sep(&special(&inner[1])) {
                        add_sep = true;
                    }
                    add.retain(|(k, _)| *k != "sep");
                    add.push(("sep", add_sep));
                }
            }
            _ => {}
        }
    }
    if let Some(c) = &tcfg {
        for typ in TYPES {
            if let Some(b) = c.get(format!("add_{typ}_token")).and_then(Json::as_bool) {
                if !add.iter().any(|(k, _)| *k == typ) {
                    add.push((typ, b));
                }
            }
            if let Some(text) = token_text(&c[format!("{typ}_token")]) {
                let id = added.iter().find(|(_, (t, _))| *t == text).map(|(i, _)| *i as u64);
                set_id(&mut ids, typ, id);
            }
        }
    }
    for typ in TYPES {
        set_id(&mut ids, typ, config.get(format!("{typ}_token_id")).and_then(Json::as_u64));
    }
    let key = |typ: &str| if typ == "pad" { "tokenizer.ggml.padding_token_id".to_string() } else { format!("tokenizer.ggml.{typ}_token_id") };
    for (typ, id) in &ids {
        kvs.push((key(typ), Value::U32(*id)));
    }
    for (typ, b) in &add {
        kvs.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(*b)));
    }

    // The chat template: tokenizer_config.json's, else chat_template.jinja / chat_template.json.
    let mut chat_template = None;
    if let Some(c) = &tcfg {
        let alt = if dir.join("chat_template.jinja").is_file() {
            Some(Json::String(std::fs::read_to_string(dir.join("chat_template.jinja"))?))
        } else {
            read_json(&dir.join("chat_template.json"))?.and_then(|j| j.get("chat_template").cloned())
        };
        match c.get("chat_template").cloned().or(alt) {
            Some(Json::String(s)) => chat_template = Some(s),
            Some(Json::Array(list)) => {
                for t in list {
                    let (Some(name), Some(text)) = (t["name"].as_str(), t["template"].as_str()) else { continue };
                    if name == "default" {
                        chat_template = Some(text.to_string());
                    } else {
                        kvs.push((format!("tokenizer.chat_template.{name}"), Value::Str(text.into())));
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(t) = &chat_template {
        kvs.push(("tokenizer.chat_template".into(), Value::Str(t.clone())));
    }
    let mut norms = vec![];
    flatten(&tj["normalizer"], "normalizers", &mut norms);
    for n in norms {
        match ty(n) {
            "Lowercase" => kvs.push(("tokenizer.ggml.normalizer.lowercase".into(), Value::Bool(true))),
            "StripAccents" => kvs.push(("tokenizer.ggml.normalizer.strip_accents".into(), Value::Bool(true))),
            "BertNormalizer" => {
                if let Some(b) = n.get("lowercase").and_then(Json::as_bool) {
                    kvs.push(("tokenizer.ggml.normalizer.lowercase".into(), Value::Bool(b)));
                }
                if let Some(b) = n.get("strip_accents").and_then(Json::as_bool) {
                    kvs.push(("tokenizer.ggml.normalizer.strip_accents".into(), Value::Bool(b)));
                }
            }
            other => notes.push(format!("the tokenizer's {other} normalizer has no llama.cpp equivalent (text it changes may tokenize differently)")),
        }
    }
    let stops = ids
        .iter()
        .filter(|(t, _)| *t == "eos")
        .filter_map(|(_, id)| by_id.get(*id as usize).cloned().flatten())
        .collect();
    Ok(Vocab { kvs, model: tok_model.into(), pre, n_tokens: by_id.len(), stops, chat_template, notes })
}

/// A `*_token` entry of tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: &Json) -> Option<String> {
    v.as_str().or_else(|| v.get("content").and_then(Json::as_str)).map(String::from)
}

/// The BPE merges as llama.cpp stores them: `"a b"`, spaces inside a part written as U+0120
/// (gguf-py's encoding of the list form that transformers 4.45+ saves).
fn merges(model: &Json) -> Result<Vec<String>> {
    let Some(list) = model.get("merges").and_then(Json::as_array) else { return Ok(vec![]) };
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let enc = |v: &Json| v.as_str().map(|s| s.replace(' ', "\u{120}"));
                Ok(format!("{} {}", enc(&pair[0]).context("merge part")?, enc(&pair[1]).context("merge part")?))
            }
            other => bail!("unknown merge entry {other}"),
        })
        .collect()
}
