//! The model's `tokenizer.json`, and its special ids read from `config.json` and the vocab.
//!
//! Text is encoded with the tokenizer's own special-token rules (its post-processor may add
//! a bos, as LLaMA's does; GPT-2's adds nothing). Padding never reuses eos when the vocab has
//! a pad token (KoGPT2: `</s>` = 1 is bos and eos, `<pad>` = 3).
use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// Token ids and the byte range of each in the text.
pub type IdsOffsets = (Vec<u32>, Vec<(usize, usize)>);

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub eos_id: Option<u32>,
    pub bos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Every id that ends generation: `eos_token_id` of config.json and of generation_config.json
    /// (an int or a list: Llama 3 lists `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`), and eos.
    pub end_ids: Vec<u32>,
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
        let gen: serde_json::Value = config_json
            .parent()
            .and_then(|d| std::fs::read_to_string(d.join("generation_config.json")).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let mut end_ids: Vec<u32> = eos_id.into_iter().collect();
        for v in [cfg.get("eos_token_id"), gen.get("eos_token_id")].into_iter().flatten() {
            let ids: Vec<u32> = match v {
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                other => other.as_u64().map(|x| x as u32).into_iter().collect(),
            };
            for i in ids {
                if !end_ids.contains(&i) {
                    end_ids.push(i);
                }
            }
        }
        check_fits_model(&inner, tokenizer_json, config_json)?;
        Ok(Self { inner, eos_id, bos_id, pad_id, end_ids })
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

    /// Token ids of `text` with their byte offsets in `text` (`add_special_tokens`: the
    /// tokenizer's post-processor may add a bos, whose offsets are (0, 0)).
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<IdsOffsets> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Token ids of `text` as plain text: normalizer, pre-tokenizer and model only, no added
    /// token (special or not) matched (transformers' `_encode_without_added_tokens`).
    pub fn encode_without_added_tokens(&self, text: &str) -> Result<Vec<u32>> {
        use tokenizers::{Model, Normalizer, OffsetReferential, OffsetType, PreTokenizer};
        let mut n = tokenizers::NormalizedString::from(text);
        if let Some(norm) = self.inner.get_normalizer() {
            norm.normalize(&mut n).map_err(|e| anyhow!("normalizing {text:?}: {e}"))?;
        }
        let mut pre = tokenizers::PreTokenizedString::from(n.get());
        if let Some(pt) = self.inner.get_pre_tokenizer() {
            pt.pre_tokenize(&mut pre).map_err(|e| anyhow!("pre-tokenizing {text:?}: {e}"))?;
        }
        let mut ids = vec![];
        for (split, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            for t in self.inner.get_model().tokenize(split).map_err(|e| anyhow!("tokenizing {split:?}: {e}"))? {
                ids.push(t.id);
            }
        }
        Ok(ids)
    }

    /// The added tokens (id, text, special), longest text first.
    pub fn added_tokens(&self) -> Vec<(u32, String, bool)> {
        let mut v: Vec<(u32, String, bool)> = self.inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content, t.special)).collect();
        v.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        v
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id used to pad batches: the pad token, else eos (masked out either way), else 0.
    pub fn padding_id(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }
}
