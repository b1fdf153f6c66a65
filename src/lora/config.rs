//! PEFT's `LoraConfig` (`adapter_config.json`): which modules an adapter wraps (PEFT's suffix
//! match, or a full-match regex; `exclude_modules`), each module's rank and scaling
//! (`rank_pattern`, `alpha_pattern`, rsLoRA), and the one mapping from module paths to PEFT's
//! tensor keys, used by both save and load. Reference: PEFT `tuners/lora/config.py`,
//! `tuners/tuners_utils.py` (`check_target_module_exists`, `get_pattern_key`).
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// `target_modules` as PEFT stores it: a list of names (suffix match) or one regex (full match).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// The fields of PEFT's `LoraConfig` that lorafit reads and writes (`adapter_config.json`).
///
/// Unknown keys are ignored on read, as PEFT itself does: PEFT versions add fields often.
/// Features lorafit does not implement (DoRA, bias training, layer subsets) are rejected
/// by [`LoraConfig::validate`] instead of being silently dropped.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    pub bias: String,
    pub modules_to_save: Option<Vec<String>>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub init_lora_weights: serde_json::Value,
    pub inference_mode: bool,
    pub use_dora: bool,
    pub layers_to_transform: Option<serde_json::Value>,
    pub layers_pattern: Option<serde_json::Value>,
    pub revision: Option<String>,
    /// Modules never wrapped, even when `target_modules` matches them (PEFT's rule: a list
    /// matches by name suffix, a string is a full-match regex).
    pub exclude_modules: Option<TargetModules>,
    // PEFT features that change the math; rejected by `validate` unless at their defaults.
    pub lora_bias: bool,
    pub target_parameters: Option<serde_json::Value>,
    pub layer_replication: Option<serde_json::Value>,
    pub trainable_token_indices: Option<serde_json::Value>,
    pub alora_invocation_tokens: Option<serde_json::Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        // PEFT's own defaults (r = 8, lora_alpha = 8); lorafit's training configs set their own.
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(vec![]),
            use_rslora: false,
            fan_in_fan_out: false,
            bias: "none".into(),
            modules_to_save: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            init_lora_weights: serde_json::Value::Bool(true),
            inference_mode: true,
            use_dora: false,
            layers_to_transform: None,
            layers_pattern: None,
            revision: None,
            exclude_modules: None,
            lora_bias: false,
            target_parameters: None,
            layer_replication: None,
            trainable_token_indices: None,
            alora_invocation_tokens: None,
        }
    }
}

/// A JSON value that PEFT treats as unset: null, or an empty list / map / string.
fn is_unset(v: &Option<serde_json::Value>) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Array(a)) => a.is_empty(),
        Some(serde_json::Value::Object(o)) => o.is_empty(),
        Some(serde_json::Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

/// PEFT's `get_pattern_key` match: `(.*\.)?(pattern)$` against the module path.
fn pattern_matches(pattern: &str, path: &str) -> bool {
    regex::Regex::new(&format!(r"^(.*\.)?(?:{pattern})$")).map(|re| re.is_match(path)).unwrap_or(false)
}

impl LoraConfig {
    /// Rejects values out of range, naming the key as `{prefix}key` (`""` for an
    /// adapter_config.json, `"lora."` for a training config's `[lora]` section).
    pub fn check_values(&self, prefix: &str) -> Result<()> {
        if self.r == 0 {
            bail!("{prefix}r = 0: the rank must be at least 1")
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("{prefix}lora_dropout = {} is out of range: it must be in [0, 1) (the probability of zeroing an input of the LoRA path)", self.lora_dropout)
        }
        if !self.lora_alpha.is_finite() {
            bail!("{prefix}lora_alpha = {} must be a finite number", self.lora_alpha)
        }
        if let Some((p, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            bail!("{prefix}rank_pattern[{p:?}] = 0: a rank must be at least 1")
        }
        if let Some((p, a)) = self.alpha_pattern.iter().find(|(_, a)| !a.is_finite()) {
            bail!("{prefix}alpha_pattern[{p:?}] = {a} must be a finite number")
        }
        Ok(())
    }

    /// Rejects what lorafit cannot apply faithfully: values out of range
    /// ([`LoraConfig::check_values`]) and PEFT features it does not implement.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            bail!("peft_type is {:?}: only LORA adapters are supported", self.peft_type)
        }
        self.check_values("")?;
        if self.use_dora {
            bail!("use_dora = true: DoRA adapters are not supported")
        }
        if self.lora_bias {
            bail!("lora_bias = true: LoRA bias terms (lora_B.bias) are not supported")
        }
        for (field, v) in [
            ("target_parameters", &self.target_parameters),
            ("layer_replication", &self.layer_replication),
            ("trainable_token_indices", &self.trainable_token_indices),
            ("alora_invocation_tokens", &self.alora_invocation_tokens),
        ] {
            if !is_unset(v) {
                bail!("{field} = {}: this PEFT feature is not supported (only null)", v.as_ref().unwrap())
            }
        }
        if self.bias != "none" {
            bail!("bias = {:?}: only bias = \"none\" is supported", self.bias)
        }
        if self.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
            bail!("layers_to_transform is set: adapters on a subset of layers are not supported")
        }
        if let TargetModules::Regex(re) = &self.target_modules {
            if re != "all-linear" {
                regex::Regex::new(re).with_context(|| format!("target_modules regex {re:?} is invalid"))?;
            }
        }
        if let Some(TargetModules::Regex(re)) = &self.exclude_modules {
            regex::Regex::new(re).with_context(|| format!("exclude_modules regex {re:?} is invalid"))?;
        }
        Ok(())
    }

    /// PEFT's `check_target_module_exists`: does this adapter wrap the module at `path`?
    pub fn targets(&self, path: &str) -> bool {
        let excluded = match &self.exclude_modules {
            Some(TargetModules::Regex(re)) if !re.is_empty() => {
                regex::Regex::new(&format!("^(?:{re})$")).map(|r| r.is_match(path)).unwrap_or(false)
            }
            Some(TargetModules::List(names)) => names.iter().any(|t| path == t || path.ends_with(&format!(".{t}"))),
            _ => false,
        };
        if excluded {
            return false;
        }
        match &self.target_modules {
            // PEFT's all-linear: every linear but the output layer (lm_head; GPT-NeoX's embed_out).
            TargetModules::Regex(re) if re == "all-linear" => !(path.ends_with("lm_head") || path == "embed_out"),
            TargetModules::Regex(re) => {
                regex::Regex::new(&format!("^(?:{re})$")).map(|r| r.is_match(path)).unwrap_or(false)
            }
            TargetModules::List(names) => {
                names.iter().any(|t| path == t || path.ends_with(&format!(".{t}")))
            }
        }
    }

    /// (rank, scaling) for the module at `path`, honouring `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_scaling(&self, path: &str) -> (usize, f64) {
        let r = self.rank_pattern.iter().find(|(p, _)| pattern_matches(p, path)).map(|(_, &r)| r).unwrap_or(self.r);
        let alpha =
            self.alpha_pattern.iter().find(|(p, _)| pattern_matches(p, path)).map(|(_, &a)| a).unwrap_or(self.lora_alpha);
        let scaling = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scaling)
    }
}

/// PEFT's default `target_modules` for a `model_type` (its
/// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`), for the families lorafit knows.
pub fn peft_default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "gpt2" => &["c_attn"],
        "gpt_neox" => &["query_key_value"],
        "llama" | "mistral" | "qwen2" | "qwen3" | "gemma3_text" => &["q_proj", "v_proj"],
        _ => return None,
    })
}

/// The PEFT tensor key of a LoRA matrix: the one mapping used by both save and load.
/// `which` is `"lora_A"` or `"lora_B"`.
pub fn peft_key(module_path: &str, which: &str) -> String {
    format!("base_model.model.{module_path}.{which}.weight")
}

/// Inverse of [`peft_key`]; also accepts keys that kept PEFT's in-memory adapter name
/// (`...lora_A.default.weight`), as some third-party files do.
pub fn parse_peft_key(key: &str) -> Option<(String, &'static str)> {
    let rest = key.strip_prefix("base_model.model.")?;
    for which in ["lora_A", "lora_B"] {
        for suffix in [format!(".{which}.weight"), format!(".{which}.default.weight")] {
            if let Some(path) = rest.strip_suffix(&suffix) {
                return Some((path.to_string(), which));
            }
        }
    }
    None
}

