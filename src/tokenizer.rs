//! The model's `tokenizer.json`, and its special ids read from `config.json` and the vocab.
//!
//! Text is encoded with the tokenizer's own special-token rules (its post-processor may add
//! a bos, as LLaMA's does; GPT-2's adds nothing). Padding never reuses eos when the vocab has
//! a pad token (KoGPT2: `</s>` = 1 is bos and eos, `<pad>` = 3).
use std::path::Path;

use anyhow::{anyhow, Context, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub eos_id: Option<u32>,
    pub bos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

fn first_id(v: Option<&serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
        serde_json::Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

/// Every id the tokenizer can produce (its vocabulary and added tokens) must be a row of the
/// model's embedding: otherwise the first such token fails deep in the model
/// ("index-select invalid index"). Checked at load, naming both numbers.
fn check_fits_model(inner: &tokenizers::Tokenizer, tokenizer_json: &Path, config_json: &Path) -> Result<()> {
    let Ok(arch) = crate::model::Arch::from_file(config_json) else {
        return Ok(()); // config.json's own errors are reported where the model is loaded
    };
    let vocab = arch.vocab_size();
    let top = inner.get_vocab(true).into_iter().max_by_key(|(_, id)| *id);
    if let Some((token, id)) = top.filter(|(_, id)| *id as usize >= vocab) {
        crate::bail_kind!(
            crate::error::Kind::TokenizerModelMismatch,
            "{}: token {token:?} has id {id}, but the model's embedding has {vocab} rows (vocab_size {vocab} in {}): \
             the largest token id must be below vocab_size",
            tokenizer_json.display(),
            config_json.display()
        )
    }
    Ok(())
}

impl Tokenizer {
    /// Loads `tokenizer.json`; special ids come from `config.json` first, then the vocab.
    pub fn load(tokenizer_json: &Path, config_json: &Path) -> Result<Self> {
        if !tokenizer_json.is_file() {
            anyhow::bail!(
                "{}: no tokenizer.json (lorafit needs the fast-tokenizer file; `AutoTokenizer.from_pretrained(...).save_pretrained(dir)` writes one)",
                tokenizer_json.display()
            )
        }
        let what = || format!("cannot load {} (the tokenizers library failed on it; is the file damaged?)", tokenizer_json.display());
        let inner = crate::error::catch_panic(what, || tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| anyhow!("{e}")))
            .with_context(|| format!("cannot load {}", tokenizer_json.display()))?;
        let cfg: serde_json::Value = std::fs::read_to_string(config_json)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let vocab_id = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos_id = first_id(cfg.get("eos_token_id")).or_else(|| vocab_id(&["</s>", "<|endoftext|>", "<eos>", "<|eot_id|>"]));
        let bos_id = first_id(cfg.get("bos_token_id")).or_else(|| vocab_id(&["<s>", "<bos>", "<|begin_of_text|>"]));
        let pad_id = first_id(cfg.get("pad_token_id")).or_else(|| vocab_id(&["<pad>", "[PAD]", "<|pad|>"]));
        check_fits_model(&inner, tokenizer_json, config_json)?;
        Ok(Self { inner, eos_id, bos_id, pad_id })
    }

    /// Token ids of `text` under the tokenizer's own rules (nothing else added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = crate::error::catch_panic(|| format!("tokenizing {text:?}"), || self.inner.encode(text, true).map_err(|e| anyhow!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with no special tokens at all (a completion appended to a prompt).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = crate::error::catch_panic(|| format!("tokenizing {text:?}"), || self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept (KoGPT2's emoji are special tokens).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        crate::error::catch_panic(|| format!("decoding {ids:?}"), || self.inner.decode(ids, false).map_err(|e| anyhow!("decoding {ids:?}: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id used to pad batches: the pad token, else eos (masked out either way), else 0.
    pub fn padding_id(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }
}
