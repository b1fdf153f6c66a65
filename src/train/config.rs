//! Training configuration: TOML files in `configs/`, overridden by `--set section.key=value`.
//!
//! Every key has its default here (one place); unknown keys are errors that list the valid ones
//! (serde's `deny_unknown_fields`). The resolved config is written next to the adapter.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::KindExt;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Model folder, hub id, or builtin:<name>.
    pub name: String,
    /// f32 | f16 | bf16 | auto (f32 on CPU, bf16 on GPU).
    pub dtype: String,
    /// cpu | cuda | cuda:N.
    pub device: String,
    /// none | nf4: store the frozen block linears in 4 bits (QLoRA's NF4).
    pub quantize: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { name: "builtin:tiny-gpt2".into(), dtype: "auto".into(), device: "cpu".into(), quantize: "none".into() }
    }
}

impl ModelSection {
    pub fn base_quant(&self) -> anyhow::Result<crate::quant::BaseQuant> {
        crate::quant::BaseQuant::parse(&self.quantize)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training file (JSON array or JSON Lines); empty = the stage's sample file in data/.
    pub path: String,
    /// Held-out file; when empty, `eval_fraction` of the training rows are held out.
    pub eval_path: String,
    pub eval_fraction: f64,
    /// Prompt template with one `{prompt}`; empty = KoChatGPT's bilingual Alpaca template.
    pub template: String,
    /// Longest sequence in tokens (prompt + completion + eos).
    pub max_len: usize,
    /// Skip (and count) malformed rows instead of failing.
    pub skip_bad_rows: bool,
    /// Drop one leading `'` from completions (KoChatGPT's SFT file has a stray one on every row).
    pub strip_leading_quote: bool,
    /// The chat template for conversations (see `render.rs`): "" = the model's, else built-in
    /// kochatgpt (prompt/completion rows then keep the `{prompt}` template); "model"; "prompt"
    /// (the `{prompt}` template only); a built-in (kochatgpt, chatml, alpaca, llama3); or a
    /// path to a .jinja file.
    pub chat_template: String,
    /// all_assistant | last_assistant: which assistant turns of a conversation are learned.
    pub train_on: String,
    /// Tokenize message text as plain text: special-token text typed in a message (e.g.
    /// `<|im_start|>`) is not read as that token (transformers' sanitize_control_tokens).
    pub split_special_tokens: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            eval_path: String::new(),
            eval_fraction: 0.1,
            template: String::new(),
            max_len: 512,
            skip_bad_rows: false,
            strip_leading_quote: true,
            chat_template: String::new(),
            train_on: "all_assistant".into(),
            split_special_tokens: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Module names (suffix match, as PEFT); empty = PEFT's default for the architecture;
    /// `"all-linear"` (a string, as in PEFT) = every linear of the blocks, not the LM head.
    #[serde(deserialize_with = "names_or_one")]
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

/// A list of names, or one name (`target_modules = "all-linear"`).
fn names_or_one<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Default for LoraSection {
    fn default() -> Self {
        Self { r: 8, lora_alpha: 16.0, lora_dropout: 0.05, target_modules: vec![], use_rslora: false }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub epochs: usize,
    /// Optimizer steps to run; 0 = as many as `epochs` takes.
    pub max_steps: usize,
    pub lr: f64,
    /// constant | linear | cosine (after warmup).
    pub schedule: String,
    pub warmup_steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub seed: u64,
    /// Log a metrics line every N steps.
    pub log_every: usize,
    /// Evaluate every N steps (0 = at the end only).
    pub eval_every: usize,
    /// Write a resumable checkpoint every N steps (0 = at the end only).
    pub save_every: usize,
    /// Checkpoints to keep.
    pub keep_last: usize,
    /// Recompute each block in backward instead of keeping its activations.
    pub grad_checkpointing: bool,
    /// Batch sequences of similar length together (less padding).
    pub group_by_length: bool,
    /// Rows of the LM head computed at once in the loss (memory vs speed). 128 keeps a chunk's
    /// f32 logits under glibc's 32 MiB mmap threshold up to a ~65k vocabulary, so their buffers
    /// are reused from step to step instead of faulted in afresh.
    pub loss_chunk: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: 0,
            lr: 2e-4,
            schedule: "cosine".into(),
            warmup_steps: 0,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            seed: 42,
            log_every: 1,
            eval_every: 0,
            save_every: 0,
            keep_last: 2,
            grad_checkpointing: false,
            group_by_length: true,
            loss_chunk: 128,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutSection {
    /// Output folder: the adapter, config.toml, metrics.jsonl, loss.png, checkpoints/;
    /// empty = adapters/<stage>.
    pub dir: String,
}

impl Default for OutSection {
    fn default() -> Self {
        Self { dir: String::new() }
    }
}

/// Reward-model settings (`lorafit rm`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RmSection {
    /// Loss `-log σ(r_chosen - r_rejected - margin)`.
    pub margin: f64,
    /// An SFT adapter to stack (frozen) under the new reward adapter; empty = the bare base.
    pub sft_adapter: String,
}

impl Default for RmSection {
    fn default() -> Self {
        Self { margin: 0.0, sft_adapter: String::new() }
    }
}

/// PPO settings (`lorafit ppo`); `train.max_steps` counts PPO iterations and
/// `train.batch_size` is the number of prompts rolled out per iteration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoSection {
    /// The SFT adapter: the policy starts from it and the reference is it, frozen.
    /// Empty = the policy is a new adapter and the reference is the bare base.
    pub sft_adapter: String,
    /// The reward model folder from `lorafit rm` (adapter + head). Required.
    pub reward_adapter: String,
    /// Give the critic its own trainable adapter (a copy of the reward adapter) besides its
    /// value head; false = the value head trains on the frozen reward model's features.
    pub critic_adapter: bool,
    /// Prompts are cut (from the left) to this many tokens.
    pub max_prompt_len: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    /// Extra texts that end a response besides eos (KoChatGPT stops at "\n").
    pub stop: Vec<String>,
    /// Per-token KL penalty coefficient (start value when `target_kl` > 0).
    pub kl_coef: f64,
    /// Adaptive KL controller target (0 = fixed `kl_coef`), Ziegler et al. 2019.
    pub target_kl: f64,
    pub kl_horizon: f64,
    /// Scores are clipped to ±this (0 = off).
    pub reward_clip: f64,
    /// "none" or "batch" (whiten the scores of each rollout batch).
    pub reward_normalize: String,
    pub gamma: f64,
    pub lam: f64,
    pub ppo_epochs: usize,
    /// Sequences per PPO minibatch.
    pub minibatch_size: usize,
    pub clip_range: f64,
    pub value_clip: f64,
    pub vf_coef: f64,
    /// Entropy bonus coefficient (0 = off). With 0 the logged `entropy` is the sampler's (its
    /// distribution at each sampled token), and the update computes no full-vocabulary logits.
    pub ent_coef: f64,
    /// A minibatch whose mean probability ratio leaves [1/x, x] is skipped (and logged).
    pub ratio_threshold: f64,
    /// Log sample responses every N iterations (0 = never).
    pub sample_every: usize,
}

impl Default for PpoSection {
    fn default() -> Self {
        Self {
            sft_adapter: String::new(),
            reward_adapter: String::new(),
            critic_adapter: false,
            max_prompt_len: 96,
            max_new_tokens: 32,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            stop: vec![],
            kl_coef: 0.1,
            target_kl: 0.0,
            kl_horizon: 10000.0,
            reward_clip: 10.0,
            reward_normalize: "none".into(),
            gamma: 1.0,
            lam: 0.95,
            ppo_epochs: 2,
            minibatch_size: 4,
            clip_range: 0.2,
            value_clip: 0.4,
            vf_coef: 0.5,
            ent_coef: 0.0,
            ratio_threshold: 10.0,
            sample_every: 10,
        }
    }
}

/// Preference optimisation settings (`lorafit dpo`; the losses are in `train/dpo_math.rs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoSection {
    /// sigmoid (DPO) | ipo | hinge | orpo | simpo (orpo and simpo use no reference).
    pub loss: String,
    /// The KL strength β (IPO's τ; SimPO's reward scale).
    pub beta: f64,
    /// cDPO / SimPO label smoothing ε in [0, 0.5): the share of labels taken as flipped.
    pub label_smoothing: f64,
    /// Compute the reference log-probs once before training (kept in the checkpoints).
    pub precompute_ref: bool,
    /// ORPO's λ: the weight of the odds-ratio term next to the SFT NLL.
    pub lambda: f64,
    /// SimPO's γ: the target reward margin.
    pub gamma: f64,
    /// The SFT adapter: the policy starts from it and the reference is it, frozen.
    /// Empty = a new adapter, and the reference is the base with adapters off.
    pub sft_adapter: String,
}

impl Default for DpoSection {
    fn default() -> Self {
        Self { loss: "sigmoid".into(), beta: 0.1, label_smoothing: 0.0, precompute_ref: false, lambda: 0.1, gamma: 0.5, sft_adapter: String::new() }
    }
}

impl DpoSection {
    pub fn validate(&self) -> Result<()> {
        crate::train::dpo_math::LossType::parse(&self.loss)?;
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            bail!("dpo.beta = {} must be above 0; e.g. --set dpo.beta=0.1", self.beta)
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!("dpo.label_smoothing = {} must be in [0, 0.5) (0.5 makes every pair a coin flip); e.g. --set dpo.label_smoothing=0.0", self.label_smoothing)
        }
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) || !self.gamma.is_finite() {
            bail!("dpo.lambda = {} must be 0 or more and dpo.gamma = {} finite", self.lambda, self.gamma)
        }
        Ok(())
    }
}

// ---- GRPO (`lorafit grpo`) -----------------------------------------------------------------

/// GRPO settings (`lorafit grpo`); `train.max_steps` counts GRPO iterations and
/// `train.batch_size` is the number of prompts per iteration (each sampled `group_size` times).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Completions sampled per prompt (at least 2: the advantage is relative to the group).
    pub group_size: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    /// Prompts are cut (from the left) to this many tokens.
    pub max_prompt_len: usize,
    /// Lower clip of the ratio: `1 - epsilon`.
    pub epsilon: f64,
    /// Upper clip of the ratio: `1 + epsilon_high` (DAPO's asymmetric clipping when above `epsilon`).
    pub epsilon_high: f64,
    /// k3 KL to the reference, per token (0 = no reference pass at all).
    pub beta: f64,
    /// grpo (mean over sequences of per-sequence token means) | dr_grpo (sum / (B * max_new_tokens))
    /// | dapo (sum / all completion tokens), as TRL 1.16 defines them.
    pub loss_type: String,
    /// Divide advantages by the group's std (false = Dr. GRPO: only subtract the group mean).
    pub scale_rewards: bool,
    /// Updates per generation, each a pass over all of the iteration's completions.
    pub num_iterations: usize,
    /// The SFT adapter: the policy starts from it and the reference is it, frozen.
    /// Empty = the policy is a new adapter and the reference is the bare base.
    pub sft_adapter: String,
    /// Extra texts that end a completion besides eos (single tokens).
    pub stop: Vec<String>,
    /// Log a sample completion every N iterations (0 = never).
    pub sample_every: usize,
    /// The rewards, summed with their weights.
    pub rewards: Vec<RewardSpec>,
}

impl Default for GrpoSection {
    fn default() -> Self {
        Self {
            group_size: 4,
            max_new_tokens: 128,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_prompt_len: 256,
            epsilon: 0.2,
            epsilon_high: 0.2,
            beta: 0.04,
            loss_type: "grpo".into(),
            scale_rewards: true,
            num_iterations: 1,
            sft_adapter: String::new(),
            stop: vec![],
            sample_every: 10,
            rewards: vec![],
        }
    }
}

/// A program and its arguments: an argv list, or one string split like a shell line (quotes
/// group words) but run without a shell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    Line(String),
    Argv(Vec<String>),
}

impl Default for CommandLine {
    fn default() -> Self {
        CommandLine::Argv(vec![])
    }
}

/// One `[[grpo.rewards]]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSpec {
    /// regex | exact | length | command | model.
    pub kind: String,
    /// The name its mean is logged under (`reward_<name>`); default: the kind, numbered if repeated.
    pub name: String,
    pub weight: f64,
    /// regex: 1 when the completion matches (0 otherwise; `negate` flips it).
    pub pattern: String,
    pub negate: bool,
    /// exact: 1 when the completion's answer equals the data row's `field`.
    pub field: String,
    /// exact: a regex whose first group (or whole match) is the answer; empty = the whole
    /// completion; both sides are trimmed.
    pub extract: String,
    /// length: 1 when the completion has min..=max characters (max 0 = no upper bound).
    pub min: usize,
    pub max: usize,
    /// command: the program (argv list or a string, no shell), and how long one answer may take.
    pub command: CommandLine,
    pub timeout_s: f64,
    /// model: a reward-model folder from `lorafit rm` (on the same base).
    pub adapter: String,
}

impl Default for RewardSpec {
    fn default() -> Self {
        Self {
            kind: String::new(),
            name: String::new(),
            weight: 1.0,
            pattern: String::new(),
            negate: false,
            field: String::new(),
            extract: String::new(),
            min: 0,
            max: 0,
            command: CommandLine::default(),
            timeout_s: 30.0,
            adapter: String::new(),
        }
    }
}

impl GrpoSection {
    /// Checks every key of `[grpo]` and `[[grpo.rewards]]` (regexes compile, each kind has what
    /// it needs); errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.group_size < 2 {
            bail!("grpo.group_size = {}: must be at least 2 (with one completion per prompt every advantage is 0: nothing is learned)", self.group_size)
        }
        if self.max_new_tokens == 0 || self.num_iterations == 0 {
            bail!("grpo.max_new_tokens and grpo.num_iterations must be at least 1")
        }
        if !matches!(self.loss_type.as_str(), "grpo" | "dr_grpo" | "dapo") {
            bail!("grpo.loss_type = {:?}: expected grpo, dr_grpo or dapo", self.loss_type)
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            bail!("grpo.temperature = {}: must be above 0 (GRPO samples its groups)", self.temperature)
        }
        for (k, v) in [("epsilon", self.epsilon), ("epsilon_high", self.epsilon_high), ("beta", self.beta)] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("grpo.{k} = {v}: must be 0 or more")
            }
        }
        for (i, r) in self.rewards.iter().enumerate() {
            let at = format!("grpo.rewards[{i}] (kind {:?})", r.kind);
            if !r.weight.is_finite() {
                bail!("{at}.weight = {}: must be finite", r.weight)
            }
            match r.kind.as_str() {
                "regex" => {
                    if r.pattern.is_empty() {
                        bail!("{at}: pattern is not set")
                    }
                    regex::Regex::new(&r.pattern).with_context(|| format!("{at}.pattern = {:?} does not compile", r.pattern))?;
                }
                "exact" => {
                    if r.field.is_empty() {
                        bail!("{at}: field is not set (the data row's field holding the answer, e.g. field = \"answer\")")
                    }
                    regex::Regex::new(&r.extract).with_context(|| format!("{at}.extract = {:?} does not compile", r.extract))?;
                }
                "length" => {
                    if r.max > 0 && r.max < r.min {
                        bail!("{at}: max ({}) is below min ({})", r.max, r.min)
                    }
                }
                "command" => {
                    if r.command == CommandLine::default() || r.command == CommandLine::Line(String::new()) {
                        bail!("{at}: command is not set (an argv list, or a string such as \"python3 score.py\")")
                    }
                    if !(r.timeout_s > 0.0 && r.timeout_s.is_finite()) {
                        bail!("{at}.timeout_s = {}: must be above 0", r.timeout_s)
                    }
                }
                "model" => {
                    if r.adapter.is_empty() {
                        bail!("{at}: adapter is not set (a folder written by `lorafit rm`, or --reward-adapter DIR)")
                    }
                }
                other => bail!("grpo.rewards[{i}].kind = {other:?}: expected regex, exact, length, command or model"),
            }
        }
        Ok(())
    }
}

/// A whole training config.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub lora: LoraSection,
    pub train: TrainSection,
    pub out: OutSection,
    pub rm: RmSection,
    pub ppo: PpoSection,
    pub grpo: GrpoSection,
    pub dpo: DpoSection,
}

/// Parses `value` as a TOML value (number, bool, array, quoted string), else as a bare string.
fn parse_value(value: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

/// The TOML table of `file`, or an empty one.
pub fn read_table(file: Option<&Path>) -> Result<toml::Table> {
    match file {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read config {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{}: invalid TOML", p.display()))
        }
        None => Ok(toml::Table::new()),
    }
}

/// Applies `--set a.b.c=value` overrides (a dotted path of tables, then the key).
pub fn apply_sets(table: &mut toml::Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let Some((key, value)) = s.split_once('=') else { bail!("--set {s}: expected section.key=value") };
        let parts: Vec<&str> = key.trim().split('.').collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            bail!("--set {s}: the key must be section.key (sections: model, data, lora, train, out, rm, ppo, grpo)")
        }
        let mut t = &mut *table;
        for p in &parts[..parts.len() - 1] {
            let e = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            t = e.as_table_mut().with_context(|| format!("--set {s}: {p} is not a section"))?;
        }
        t.insert(parts[parts.len() - 1].to_string(), parse_value(value.trim()));
    }
    Ok(())
}

/// `over` merged into `base`, table by table (values in `over` win).
pub fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The default of a numeric `section.key` (for the examples in messages).
fn default_of(key: &str) -> String {
    let d = TrainConfig::default();
    match key {
        "train.adam_beta1" => d.train.adam_beta1.to_string(),
        "train.adam_beta2" => d.train.adam_beta2.to_string(),
        "lora.lora_dropout" => d.lora.lora_dropout.to_string(),
        _ => String::new(),
    }
}

impl TrainConfig {
    /// Loads `file` (if any) over the defaults, then applies `--set section.key=value` overrides.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self> {
        let mut table = read_table(file)?;
        apply_sets(&mut table, sets)?;
        let where_ = file.map(|p| p.display().to_string()).unwrap_or_else(|| "--set".into());
        Self::from_table(table, &where_)
    }

    /// A config from a TOML table; `where_` names its source in errors.
    pub fn from_table(table: toml::Table, where_: &str) -> Result<Self> {
        let is_pipeline = table.contains_key("stages");
        let cfg: std::result::Result<TrainConfig, _> = toml::Value::Table(table).try_into();
        let msg = format!("{where_}: invalid config (sections: model, data, lora, train, out, rm, ppo, grpo)");
        let cfg = if is_pipeline {
            cfg.kind(crate::error::Kind::PipelineConfigToStage, msg)?
        } else {
            cfg.with_context(|| msg)?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.batch_size == 0 || t.grad_accum == 0 {
            bail!("train.batch_size and train.grad_accum must be at least 1")
        }
        if !matches!(t.schedule.as_str(), "constant" | "linear" | "cosine") {
            bail!("train.schedule = {:?}: expected constant, linear or cosine", t.schedule)
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            bail!("train.lr must be positive, got {}", t.lr)
        }
        if t.epochs == 0 && t.max_steps == 0 {
            bail!("train.epochs and train.max_steps are both 0: nothing to train")
        }
        if !(0.0..1.0).contains(&self.data.eval_fraction) {
            bail!("data.eval_fraction must be in [0, 1), got {}", self.data.eval_fraction)
        }
        if self.data.max_len < 2 {
            bail!("data.max_len must be at least 2")
        }
        crate::render::TrainOn::parse(&self.data.train_on)?;
        let ct = self.data.chat_template.as_str();
        if !(ct.is_empty() || ct == "model" || ct == "prompt" || crate::chat_template::BUILTINS.contains(&ct) || ct.ends_with(".jinja") || Path::new(ct).is_file()) {
            bail!(
                "data.chat_template = {ct:?}: expected \"\" (the model's), \"model\", \"prompt\", a built-in ({}), or a path to a .jinja file",
                crate::chat_template::BUILTINS.join(", ")
            )
        }
        if t.loss_chunk == 0 {
            bail!("train.loss_chunk must be at least 1")
        }
        if self.lora.r == 0 {
            bail!("lora.r must be at least 1")
        }
        // Optimizer and LoRA settings whose wrong values train a NaN adapter (beta2 = 1 divides
        // by 1 - beta2^t = 0) or none at all; each message names the key to --set.
        let in_unit = |key: &str, v: f64, why: &str| -> Result<()> {
            if !(0.0..1.0).contains(&v) {
                bail!("{key} = {v} is out of range: it must be in [0, 1), at least 0 and below 1 ({why}); e.g. --set {key}={}", default_of(key))
            }
            Ok(())
        };
        in_unit("train.adam_beta1", t.adam_beta1, "AdamW's first-moment decay")?;
        in_unit("train.adam_beta2", t.adam_beta2, "AdamW's second-moment decay; 1 makes every update NaN")?;
        in_unit("lora.lora_dropout", self.lora.lora_dropout, "the share of LoRA inputs dropped in training")?;
        if !(t.adam_eps > 0.0 && t.adam_eps.is_finite()) {
            bail!("train.adam_eps = {} must be above 0 (it keeps AdamW from dividing by zero); e.g. --set train.adam_eps=1e-8", t.adam_eps)
        }
        if !(self.lora.lora_alpha > 0.0 && self.lora.lora_alpha.is_finite()) {
            bail!("lora.lora_alpha = {} must be positive, above 0 (the LoRA update is scaled by lora_alpha / r); e.g. --set lora.lora_alpha=16", self.lora.lora_alpha)
        }
        if !(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite()) {
            bail!("train.max_grad_norm = {} must be above 0, or 0 to turn clipping off; e.g. --set train.max_grad_norm=1.0", t.max_grad_norm)
        }
        let p = &self.ppo;
        if !matches!(p.reward_normalize.as_str(), "none" | "batch") {
            bail!("ppo.reward_normalize = {:?}: expected none or batch", p.reward_normalize)
        }
        if p.minibatch_size == 0 || p.ppo_epochs == 0 || p.max_new_tokens == 0 {
            bail!("ppo.minibatch_size, ppo.ppo_epochs and ppo.max_new_tokens must be at least 1")
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            bail!("train.weight_decay = {} must be 0 or more; e.g. --set train.weight_decay=0.0", t.weight_decay)
        }
        self.grpo.validate()?;
        self.dpo.validate()?;
        Ok(())
    }

    /// This config with the stage's defaults filled in (data file, output folder).
    pub fn for_stage(&self, stage: &str) -> Self {
        let mut c = self.clone();
        if c.data.path.is_empty() {
            c.data.path = match stage {
                "rm" => "data/rm_sample.json",
                "ppo" => "data/ppo_prompts.json",
                "grpo" => "data/grpo_arith.jsonl",
                "dpo" => "data/dpo_pairs.jsonl",
                _ => "data/sft_sample.json",
            }
            .into();
        }
        if c.out.dir.is_empty() {
            c.out.dir = format!("adapters/{stage}");
        }
        c
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

/// Keys that hold paths: a resumed run compares them as paths (`./o/run` = `o/run/`), and those
/// inside the run's own parent folder relative to it (a pipeline folder moved or copied).
const PATH_KEYS: &[&str] = &["model.name", "data.path", "data.eval_path", "rm.sft_adapter", "ppo.sft_adapter", "ppo.reward_adapter", "dpo.sft_adapter", "grpo.sft_adapter"];

/// `p` without `.` components, repeated or trailing slashes.
fn normalize(p: &str) -> std::path::PathBuf {
    Path::new(p).components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

/// `section.key` -> value of every leaf of `t`.
fn flatten(prefix: &str, t: &toml::Table, out: &mut std::collections::BTreeMap<String, toml::Value>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(sub) => flatten(&key, sub, out),
            v => {
                out.insert(key, v.clone());
            }
        }
    }
}

/// What differs between the config a run was started with (`saved`, its TOML) and `now`, one
/// line per key with both values. `out.dir` is not compared (a run folder may be named
/// differently or moved); paths are compared as paths, see [`PATH_KEYS`].
pub fn differences(saved: &str, now: &TrainConfig) -> Result<Vec<String>> {
    let (mut old, mut new) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    flatten("", &toml::from_str(saved).context("the checkpoint's config is not valid TOML")?, &mut old);
    flatten("", &toml::from_str(&now.to_toml()?)?, &mut new);
    let root = |m: &std::collections::BTreeMap<String, toml::Value>| {
        m.get("out.dir").and_then(|v| v.as_str()).map(|d| normalize(d).parent().map(Path::to_path_buf).unwrap_or_default()).unwrap_or_default()
    };
    let (old_root, new_root) = (root(&old), root(&new));
    let same_path = |a: &str, b: &str| {
        let (a, b) = (normalize(a), normalize(b));
        if a == b {
            return true;
        }
        let rel = |p: &Path, r: &Path| if r.as_os_str().is_empty() { None } else { p.strip_prefix(r).ok().map(Path::to_path_buf) };
        matches!((rel(&a, &old_root), rel(&b, &new_root)), (Some(x), Some(y)) if x == y && !x.as_os_str().is_empty())
    };
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(not set)".into());
    let mut diffs = vec![];
    for k in keys {
        if k == "out.dir" {
            continue;
        }
        let (a, b) = (old.get(k), new.get(k));
        let same = match (a, b) {
            (Some(toml::Value::String(x)), Some(toml::Value::String(y))) if PATH_KEYS.contains(&k.as_str()) => same_path(x, y),
            _ => a == b,
        };
        if !same {
            diffs.push(format!("{k} = {} when started, {} now", show(a), show(b)));
        }
    }
    Ok(diffs)
}
