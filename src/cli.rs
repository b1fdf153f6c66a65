//! The `lorafit` command line: argument definitions and one function per subcommand.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::generate::{generate, SamplingConfig};
use crate::lora::AdapterSet;
use crate::model::Model;
use crate::runtime::{fmt_bytes, parse_device, parse_dtype, peak_rss_bytes};
use crate::tokenizer::Tokenizer;
use crate::weights::ModelFiles;
use crate::{eval, peft};

#[derive(Parser)]
#[command(name = "lorafit", version, about = "LoRA fine-tuning of GPT-2 / LLaMA models with PEFT-compatible adapters")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Supervised fine-tuning of a LoRA adapter on prompt/completion pairs.
    Sft(TrainArgs),
    /// Train a reward model (LoRA + scalar head) from ranked answers.
    Rm(RmArgs),
    /// Rewards of texts under a reward model trained by `lorafit rm`.
    Score(ScoreArgs),
    /// PPO of the policy against the reward model; policy, reference, reward and critic share one base.
    Ppo(PpoArgs),
    /// GRPO: sample a group of answers per prompt, reward each (rules, a command, a reward model), learn from the group-relative advantage; no critic.
    Grpo(GrpoArgs),
    /// Preference optimisation on chosen/rejected pairs: DPO, IPO, hinge, ORPO or SimPO (dpo.loss).
    Dpo(DpoArgs),
    /// SFT, reward model and PPO in order, from one config (the KoChatGPT recipe in one command).
    Pipeline(PipelineArgs),
    /// Mean next-token NLL of each line of a text file, and the file's perplexity.
    Eval(EvalArgs),
    /// Continue one or more prompts (batched, KV-cached).
    Generate(GenerateArgs),
    /// Chat with a model in the terminal (streaming; /reset, /exit, Ctrl-D).
    Chat(ChatArgs),
    /// Show what an adapter folder or a merged model folder holds and what it was made from.
    Inspect(InspectArgs),
    /// Fold LoRA adapters into the base and write a Hugging Face model folder.
    Merge(MergeArgs),
    /// Measure load time, memory and generation speed (see docs/BENCHMARKS.md).
    Bench(BenchArgs),
    /// Predict a training run's peak memory from config.json alone, against a --budget.
    Plan(crate::plan::PlanArgs),
    /// Write the merged model (or the adapters alone) as GGUF for llama.cpp, Ollama and LM Studio.
    Export(ExportArgs),
    /// Show each data row as a stage sees it: the rendered text, the token ids, and which tokens are learned.
    Render(crate::render::RenderArgs),
}

/// The model to load, and the adapters to attach.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder, a hub id (e.g. skt/kogpt2-base-v2), or builtin:tiny-gpt2.
    #[arg(long)]
    pub model: String,
    /// A PEFT LoRA adapter folder, optionally weighted: --adapter DIR[:WEIGHT]. Repeat to stack.
    #[arg(long)]
    pub adapter: Vec<String>,
    /// Base weights dtype: f32, f16, bf16, or auto (f32 on CPU, bf16 on GPU).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Store the base's block linears in 4 bits: none or nf4 (QLoRA's NF4).
    #[arg(long, default_value = "none")]
    pub quantize: String,
}

/// Arguments shared by the training commands (`sft` has exactly these; `rm` and `ppo` add
/// their adapters: [`RmArgs`], [`PpoArgs`]).
#[derive(Args)]
pub struct TrainArgs {
    /// TOML config (see configs/); every key has a default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides model.name.
    #[arg(long)]
    pub model: Option<String>,
    /// Overrides data.path.
    #[arg(long)]
    pub data: Option<String>,
    /// Overrides out.dir.
    #[arg(long)]
    pub out: Option<String>,
    /// Overrides model.device: cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Overrides model.dtype: the frozen base's dtype, f32, f16, bf16 or auto (f32 on CPU, bf16 on GPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Overrides model.quantize: none, or nf4 (a 4-bit frozen base, QLoRA's NF4).
    #[arg(long)]
    pub quantize: Option<String>,
    /// Override any config key: --set train.lr=1e-4 --set lora.target_modules='["c_attn"]'.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Replace a previous run's files in --out.
    #[arg(long)]
    pub force: bool,
    /// Skip (and count) malformed data rows instead of stopping.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

/// `lorafit rm`: the training flags and the SFT adapter to stack under the reward adapter.
#[derive(Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Overrides rm.sft_adapter: an SFT adapter to stack (frozen) under the new reward adapter.
    #[arg(long)]
    pub sft_adapter: Option<String>,
}

impl RmArgs {
    pub fn start(&self) -> crate::train::Start {
        self.train.start()
    }

    /// The config, as [`TrainArgs::resolve`], with `--sft-adapter` (`stage` is always "rm").
    pub fn resolve(&self, _stage: &str) -> Result<crate::train::config::TrainConfig> {
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let sets: Vec<String> = self.sft_adapter.iter().map(|a| format!("rm.sft_adapter={}", quote(a))).collect();
        self.train.resolve_with(&sets)
    }
}

/// `lorafit ppo`: the training flags, the policy's SFT adapter and the reward model.
#[derive(Args)]
pub struct PpoArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Overrides ppo.sft_adapter: the policy's start and the (frozen) reference.
    #[arg(long)]
    pub sft_adapter: Option<String>,
    /// Overrides ppo.reward_adapter: the reward model folder written by `lorafit rm`.
    #[arg(long)]
    pub reward_adapter: Option<String>,
}

impl PpoArgs {
    pub fn start(&self) -> crate::train::Start {
        self.train.start()
    }

    /// The config, as [`TrainArgs::resolve`], with the adapter flags (`stage` is always "ppo").
    pub fn resolve(&self, _stage: &str) -> Result<crate::train::config::TrainConfig> {
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut sets: Vec<String> = self.sft_adapter.iter().map(|a| format!("ppo.sft_adapter={}", quote(a))).collect();
        sets.extend(self.reward_adapter.iter().map(|a| format!("ppo.reward_adapter={}", quote(a))));
        self.train.resolve_with(&sets)
    }
}

/// `lorafit dpo`: the training flags and the SFT adapter the policy starts from.
#[derive(Args)]
pub struct DpoArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Overrides dpo.sft_adapter: the policy's start and the (frozen) reference.
    #[arg(long)]
    pub sft_adapter: Option<String>,
}

impl DpoArgs {
    pub fn start(&self) -> crate::train::Start {
        self.train.start()
    }

    /// The config, as [`TrainArgs::resolve`], with `--sft-adapter` (`stage` is always "dpo").
    pub fn resolve(&self, _stage: &str) -> Result<crate::train::config::TrainConfig> {
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let sets: Vec<String> = self.sft_adapter.iter().map(|a| format!("dpo.sft_adapter={}", quote(a))).collect();
        self.train.resolve_with(&sets)
    }
}

/// `lorafit grpo`: the training flags, the policy's SFT adapter and rewards from the command line.
#[derive(Args)]
pub struct GrpoArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Overrides grpo.sft_adapter: the policy's start and the (frozen) reference.
    #[arg(long)]
    pub sft_adapter: Option<String>,
    /// Adds a `model` reward: a reward model folder written by `lorafit rm` (same base). Repeatable.
    #[arg(long)]
    pub reward_adapter: Vec<String>,
    /// Adds a `command` reward: a program (no shell) reading JSON Lines {"prompt", "completion",
    /// "row"} on stdin and writing one number per line, e.g. --reward-command "python3 score.py". Repeatable.
    #[arg(long)]
    pub reward_command: Vec<String>,
}

impl GrpoArgs {
    pub fn start(&self) -> crate::train::Start {
        self.train.start()
    }

    /// The config, as [`TrainArgs::resolve`], with the adapter flag; each reward flag adds a
    /// `[[grpo.rewards]]` table (weight 1).
    pub fn resolve(&self, _stage: &str) -> Result<crate::train::config::TrainConfig> {
        use crate::train::config::{CommandLine, RewardSpec};
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let sets: Vec<String> = self.sft_adapter.iter().map(|a| format!("grpo.sft_adapter={}", quote(a))).collect();
        let mut cfg = self.train.resolve_with(&sets)?;
        for a in &self.reward_adapter {
            cfg.grpo.rewards.push(RewardSpec { kind: "model".into(), adapter: a.clone(), ..Default::default() });
        }
        for c in &self.reward_command {
            cfg.grpo.rewards.push(RewardSpec { kind: "command".into(), command: CommandLine::Line(c.clone()), ..Default::default() });
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

impl TrainArgs {
    pub fn start(&self) -> crate::train::Start {
        use crate::train::Start;
        if self.resume {
            Start::Resume
        } else if self.force {
            Start::Force
        } else {
            Start::Fresh
        }
    }

    /// The config file, then --set, then the dedicated flags.
    pub fn resolve(&self, _stage: &str) -> Result<crate::train::config::TrainConfig> {
        self.resolve_with(&[])
    }

    /// [`TrainArgs::resolve`] with the flags of a subcommand (`extra`, as `--set`s) after the common ones.
    pub fn resolve_with(&self, extra: &[String]) -> Result<crate::train::config::TrainConfig> {
        let mut sets = self.set.clone();
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        if let Some(m) = &self.model {
            sets.push(format!("model.name={}", quote(m)));
        }
        if let Some(d) = &self.data {
            sets.push(format!("data.path={}", quote(d)));
        }
        if let Some(o) = &self.out {
            sets.push(format!("out.dir={}", quote(o)));
        }
        if let Some(d) = &self.device {
            sets.push(format!("model.device={}", quote(d)));
        }
        if let Some(d) = &self.dtype {
            sets.push(format!("model.dtype={}", quote(d)));
        }
        if let Some(q) = &self.quantize {
            sets.push(format!("model.quantize={}", quote(q)));
        }
        if self.skip_bad_rows {
            sets.push("data.skip_bad_rows=true".into());
        }
        sets.extend(extra.iter().cloned());
        crate::train::config::TrainConfig::load(self.config.as_deref(), &sets)
    }
}

#[derive(Args)]
pub struct PipelineArgs {
    /// Pipeline config (e.g. configs/pipeline-smoke.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Override any key, for every stage (train.seed=3) or one (stages.rm.train.epochs=2).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Skip finished stages and resume the interrupted one.
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Replace previous runs in the stages' output folders.
    #[arg(long)]
    pub force: bool,
    /// Overrides model.device in every stage: cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Overrides model.dtype in every stage: f32, f16, bf16 or auto.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Overrides model.quantize in every stage: none or nf4.
    #[arg(long)]
    pub quantize: Option<String>,
}

impl PipelineArgs {
    /// `--set`s, then the dedicated flags for every stage (over the stages' own tables too).
    pub fn sets(&self) -> Vec<String> {
        let mut sets = self.set.clone();
        for (key, v) in [("device", &self.device), ("dtype", &self.dtype), ("quantize", &self.quantize)] {
            if let Some(v) = v {
                let v = toml::Value::String(v.clone());
                sets.extend(["sft", "rm", "ppo"].map(|stage| format!("stages.{stage}.model.{key}={v}")));
                // An sft -> grpo pipeline (a [stages.grpo] table) gets the flag in its grpo stage too.
                let table = crate::train::config::read_table(Some(&self.config)).unwrap_or_default();
                if table.get("stages").and_then(|s| s.get("grpo")).is_some() {
                    sets.push(format!("stages.grpo.model.{key}={v}"));
                }
            }
        }
        sets
    }
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Base model (the one the reward model was trained on).
    #[arg(long)]
    pub model: String,
    /// Reward-model folder written by `lorafit rm` (adapter + score head).
    #[arg(long)]
    pub adapter: PathBuf,
    /// A text file (each line scored as is, at its last token) or a JSON / JSON Lines file of
    /// {"prompt", "completion"} rows (scored as template(prompt) + completion + eos) or
    /// conversations ({"messages"}: through the chat template, scored at the last assistant
    /// turn's end, as `rm` trained).
    #[arg(long)]
    pub data: PathBuf,
    /// The template for JSON rows: `kochatgpt` (= "", the default of every stage), `none`, or a
    /// text with one {prompt}.
    #[arg(long, default_value = "")]
    pub template: String,
    /// One JSON object per line: {"line", "reward"}.
    #[arg(long)]
    pub json: bool,
    /// Base weights dtype: f32, f16, bf16, or auto (f32 on CPU, bf16 on GPU).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Store the base's block linears in 4 bits: none or nf4 (QLoRA's NF4).
    #[arg(long, default_value = "none")]
    pub quantize: String,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text file: one sequence per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object per line: {"line", "tokens", "nll"} ({"row", "tokens", "nll"} for
    /// JSON / JSON Lines / Parquet data, scored over the learned tokens as `lorafit render` shows).
    #[arg(long)]
    pub json: bool,
    /// JSON data: a training config whose [data] settings render the rows (chat_template, train_on, ...).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Sampling flags. Unset flags take the model's generation_config.json values (as transformers'
/// `generate`: sampling settings only when it sets `do_sample`), else lorafit's defaults.
#[derive(Args)]
pub struct SamplingArgs {
    /// Tokens to generate per prompt [default: generation_config.json's, else 64].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy [default: generation_config.json's when it samples, else 0].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens (0 = all) [default: generation_config.json's, else 0].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: smallest set of tokens with probability >= p (1 = off) [default: generation_config.json's, else 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Penalise tokens already present (1 = off; 1.2 is common) [default: generation_config.json's, else 1].
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Never stop at an end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text; repeat for a batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Render each prompt through a template first: `kochatgpt` (the training default; "" too),
    /// `none`, or a text with one {prompt}. Without it the prompt is continued as given.
    #[arg(long)]
    pub template: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Render each prompt as a user message through the chat template, with the generation
    /// prompt, and print only the reply.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: the chat template ("" = the model's, else built-in kochatgpt; a built-in name
    /// or a .jinja file).
    #[arg(long, default_value = "")]
    pub chat_template: String,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompt template: `kochatgpt` (= "", as in training), `none`, or a text with one {prompt}.
    /// Used when the model has no chat template, or when given (and --chat-template is not).
    #[arg(long, default_value = "")]
    pub template: String,
    /// The chat template ("" = the model's; a built-in: kochatgpt, chatml, alpaca, llama3; or a
    /// .jinja file). A model with a template chats through it, with add_generation_prompt.
    #[arg(long, default_value = "")]
    pub chat_template: String,
    /// A system message for chat-template conversations.
    #[arg(long)]
    pub system: Option<String>,
}

/// A `--template` value: a name — `kochatgpt` (KoChatGPT's bilingual Alpaca template, the
/// training default, also spelt "") or `none` (the text as is) — or a template text with one
/// `{prompt}`. `None` for `none`.
pub fn template_arg(value: &str) -> Result<Option<crate::template::Template>> {
    use crate::template::Template;
    match value {
        "" | "kochatgpt" => Ok(Some(Template::kochatgpt())),
        "none" => Ok(None),
        text => Template::new(text).map(Some).with_context(|| {
            format!("--template {text:?}: expected a name (kochatgpt, none) or a template text with one {{prompt}}")
        }),
    }
}

#[derive(Args)]
pub struct InspectArgs {
    /// An adapter folder (adapter_config.json) or a model folder (config.json), e.g. from `merge`.
    #[arg(required_unless_present = "adapter")]
    pub path: Option<PathBuf>,
    /// The same, as a flag.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base: a Hugging Face model folder, a hub id, or builtin:tiny-gpt2.
    #[arg(long)]
    pub model: String,
    /// A PEFT LoRA adapter folder, optionally weighted: --adapter DIR[:WEIGHT] (default 1). Repeat
    /// to merge several. A reward model from `lorafit rm` (with its stack) gives a
    /// sequence-classification checkpoint with its score head.
    #[arg(long, required = true)]
    pub adapter: Vec<String>,
    /// The folder to write (config.json, model.safetensors or shards, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype: f32, f16, bf16, or auto (the base checkpoint's). The merge itself is f32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Largest safetensors file before sharding, as transformers: 2GB, 500MB, 1GiB or bytes.
    #[arg(long, default_value = "2GB")]
    pub max_shard_size: String,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// The chat template written into the merged tokenizer_config.json: "" = the one the
    /// adapter was trained with (its lorafit.json), else the base's; "model" (the base's), a
    /// built-in (kochatgpt, chatml, alpaca, llama3) or a .jinja file.
    #[arg(long, default_value = "")]
    pub chat_template: String,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The base: a Hugging Face model folder, a hub id, or builtin:tiny-gpt2.
    #[arg(long)]
    pub model: String,
    /// A PEFT LoRA adapter folder, optionally weighted: --adapter DIR[:WEIGHT] (default 1).
    /// Repeat to fold several in. None: the base alone.
    #[arg(long)]
    pub adapter: Vec<String>,
    /// gguf (the merged model) or gguf-lora (the adapters alone, for llama-cli --lora / Ollama ADAPTER).
    #[arg(long, default_value = "gguf")]
    pub format: String,
    /// The file to write, e.g. model-q4_k_m.gguf.
    #[arg(long)]
    pub out: PathBuf,
    /// f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k (llama.cpp's mixes; gguf-lora: f32, f16, bf16, q8_0).
    #[arg(long, default_value = "f16")]
    pub quant: String,
    /// Replace an existing --out that lorafit wrote.
    #[arg(long)]
    pub force: bool,
    /// Also write an Ollama Modelfile beside --out.
    #[arg(long)]
    pub ollama: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// What to measure: `generate` (load time, peak memory, generation tokens/s), `sft`
    /// (median step time, tokens/s and peak memory of SFT steps on random tokens), `rm` (the
    /// same for reward-model steps: --batch pairs, chosen + rejected in one batch) or `gemm`
    /// (candle's f32 matmul GFLOP/s at --gemm MxKxN).
    pub what: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Prompt length in tokens (random ids, seeded).
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// sft, rm: sequence length.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// sft, rm: timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// sft, rm: LoRA target modules, comma-separated (default: PEFT's for the architecture,
    /// c_attn for GPT-2, q_proj,v_proj for LLaMA).
    #[arg(long)]
    pub targets: Option<String>,
    /// sft, rm: LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// sft, rm: recompute blocks in backward.
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// sft: after the timed steps, measure the GEMM peak and print where one more step's time
    /// goes, per phase (wall, CPU, minor faults) and per op kind (ms, GFLOP/s, % of the peak).
    #[arg(long)]
    pub profile: bool,
    /// gemm: the shape M x K x N.
    #[arg(long, default_value = "2048x768x3072")]
    pub gemm: String,
    #[arg(long)]
    pub json: bool,
    /// render: the data file rendered and tokenized (JSON, JSON Lines, Parquet).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sft(a) => {
            let s = crate::train::sft::run(&a.resolve("sft")?, a.start())?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Command::Rm(a) => {
            let s = crate::train::rm::run(&a.resolve("rm")?, a.start())?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Command::Dpo(a) => {
            let s = crate::train::dpo::run(&a.resolve("dpo")?, a.start())?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Command::Score(a) => cmd_score(a),
        Command::Pipeline(a) => {
            use crate::train::Start;
            let start = if a.resume { Start::Resume } else if a.force { Start::Force } else { Start::Fresh };
            let s = crate::train::pipeline::run(&a.config, &a.sets(), start)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Command::Ppo(a) => {
            let s = crate::train::ppo::run(&a.resolve("ppo")?, a.start())?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Command::Grpo(a) => {
            let s = crate::train::grpo::run(&a.resolve("grpo")?, a.start())?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Command::Eval(a) => cmd_eval(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => {
            let (model, tok, files) = load_model(&a.model)?;
            // Without template flags: the template the adapter was trained with (lorafit.json).
            if a.chat_template.is_empty() && a.template.is_empty() {
                if let Some(rec) = crate::render::TemplateRecord::of_adapters(&a.model.adapter)? {
                    if rec.chat_template.is_some() {
                        let rc = crate::render::RenderConfig { max_len: usize::MAX, ..Default::default() };
                        let r = crate::render::Renderer::from_record(&tok, &files.dir, &rec, rc)?;
                        eprintln!("chatting through the adapter's training template ({}; --chat-template or --template to choose another)", rec.chat_template_origin);
                        let sampling = sampling_config(&a.sampling, &tok, &files, &r.end_of_turn_ids())?;
                        let mut chat = crate::chat::TemplateChat::new(&model, r, sampling, a.system.clone());
                        return crate::chat::run_loop(&mut chat, &mut std::io::stdin().lock(), &mut std::io::stdout().lock());
                    }
                    if let Some(t) = &rec.prompt_template {
                        eprintln!("chatting through the adapter's training template {t:?} (--chat-template or --template to choose another)");
                        let sampling = sampling_config(&a.sampling, &tok, &files, &[])?;
                        let mut chat = crate::chat::Chat { model: &model, tok: &tok, template: crate::template::Template::new(t)?, sampling, history: vec![] };
                        return chat.run(&mut std::io::stdin().lock(), &mut std::io::stdout().lock());
                    }
                }
            }
            // The model's chat template (or --chat-template) unless --template asks for a {prompt} one.
            let renderer = chat_renderer(&tok, &files, &a.chat_template, !a.template.is_empty())?;
            if let Some(r) = renderer {
                let sampling = sampling_config(&a.sampling, &tok, &files, &r.end_of_turn_ids())?;
                let mut chat = crate::chat::TemplateChat::new(&model, r, sampling, a.system.clone());
                return crate::chat::run_loop(&mut chat, &mut std::io::stdin().lock(), &mut std::io::stdout().lock());
            }
            let template = template_arg(&a.template)?.unwrap_or(crate::template::Template::new("{prompt}")?);
            let sampling = sampling_config(&a.sampling, &tok, &files, &[])?;
            let mut chat = crate::chat::Chat { model: &model, tok: &tok, template, sampling, history: vec![] };
            chat.run(&mut std::io::stdin().lock(), &mut std::io::stdout().lock())
        }
        Command::Inspect(a) => {
            let path = a.path.or(a.adapter).expect("clap requires one");
            print!("{}", crate::inspect::describe(&path)?);
            Ok(())
        }
        Command::Bench(a) => cmd_bench(a),
        Command::Plan(a) => crate::plan::run(a),
        Command::Merge(a) => cmd_merge(a),
        Command::Export(a) => cmd_export(a),
        Command::Render(a) => crate::render::run_render(a),
    }
}

/// Resolves and loads the model, its tokenizer and the `--adapter` stack.
pub fn load_model(args: &ModelArgs) -> Result<(Model, Tokenizer, ModelFiles)> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    let files = ModelFiles::resolve(&args.model)?;
    let mut adapters = vec![];
    for a in &args.adapter {
        let (dir, weight) = peft::parse_adapter_arg(a)?;
        // Named by folder, so that load errors say which adapter is wrong.
        adapters.push(peft::load_adapter(&dir, &dir.display().to_string(), weight, false)?);
    }
    let quant = crate::quant::BaseQuant::parse(&args.quantize)?;
    let model = Model::load(&files, dtype, &device, AdapterSet::new(adapters).with_base_quant(quant))?;
    let tok = Tokenizer::load(&files.tokenizer, &files.config)?;
    Ok((model, tok, files))
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    // Data rows (JSON, JSON Lines, Parquet): NLL over the learned tokens of each row.
    let mut head = [0u8; 64];
    let n = std::fs::File::open(&a.data).and_then(|mut f| std::io::Read::read(&mut f, &mut head)).unwrap_or(0);
    let first = String::from_utf8_lossy(&head[..n]).trim_start_matches('\u{feff}').trim_start().chars().next();
    if head[..n].starts_with(b"PAR1") || matches!(first, Some('[') | Some('{')) {
        let cfg = crate::train::config::TrainConfig::load(a.config.as_deref(), &[])?;
        let (model, tok, files) = load_model(&a.model)?;
        let mut rc = crate::render::RenderConfig::from_data(&cfg.data)?;
        rc.max_len = model.arch.max_positions(); // too long: earlier exchanges dropped, as in training
        let r = crate::render::Renderer::new(&tok, &files.dir, rc)?;
        let rows = eval::eval_rows(&model, &r, &a.data, cfg.data.skip_bad_rows)?;
        for row in &rows {
            if a.json {
                println!("{}", serde_json::to_string(row)?);
            } else {
                match row.nll {
                    Some(nll) => println!("row {:>5}  learned tokens {:>5}  nll {nll:.6}", row.row, row.tokens),
                    None => println!("row {:>5}  learned tokens {:>5}  nll -", row.row, row.tokens),
                }
            }
        }
        if !a.json {
            let (s, n) = rows.iter().filter_map(|r| r.nll.map(|x| (x * r.tokens as f64, r.tokens))).fold((0.0, 0), |(a, b), (x, y)| (a + x, b + y));
            if n > 0 {
                println!("perplexity {:.4} over {n} learned tokens ({})", (s / n as f64).exp(), r.describe());
            }
        }
        return Ok(());
    }
    let lines = eval::read_lines(&a.data)?;
    let (model, tok, _) = load_model(&a.model)?;
    let res = eval::eval_lines(&model, &tok, &lines, &a.data.display().to_string())?;
    if a.json {
        for r in &res {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        for r in &res {
            match r.nll {
                Some(nll) => println!("line {:>5}  tokens {:>5}  nll {nll:.6}", r.line, r.tokens),
                None => println!("line {:>5}  tokens {:>5}  nll -", r.line, r.tokens),
            }
        }
        match eval::perplexity(&res) {
            Some(ppl) => println!("perplexity {ppl:.4} over {} lines", res.iter().filter(|r| r.nll.is_some()).count()),
            None => println!("no line has 2 or more tokens: no perplexity"),
        }
    }
    Ok(())
}

fn cmd_score(a: ScoreArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let files = ModelFiles::resolve(&a.model)?;
    let tok = Tokenizer::load(&files.tokenizer, &files.config)?;
    // JSON rows go through the template; anything else is a text file, one sequence per line.
    let head_bytes = std::fs::read(&a.data).with_context(|| format!("cannot read data file {}", a.data.display()))?;
    let first = String::from_utf8_lossy(&head_bytes[..head_bytes.len().min(4096)]).trim_start_matches('\u{feff}').trim_start().chars().next();
    let (labels, seqs): (Vec<usize>, Vec<Vec<u32>>) = if matches!(first, Some('[') | Some('{')) {
        let template = template_arg(&a.template)?;
        let eos = tok.eos_id.context("the tokenizer has no end-of-sequence token")?;
        let mut out = (vec![], vec![]);
        // Conversations render as `rm` trained on them: the reward model's recorded template
        // (lorafit.json), else the model's; scored at the last assistant turn's end-of-turn.
        let rc = crate::render::RenderConfig { max_len: usize::MAX, ..Default::default() };
        let renderer = match crate::render::TemplateRecord::read(&a.adapter)?.filter(|r| r.chat_template.is_some()) {
            Some(rec) => crate::render::Renderer::from_record(&tok, &files.dir, &rec, rc)?,
            None => crate::render::Renderer::new(&tok, &files.dir, rc)?,
        };
        for (loc, v) in crate::data::read_records(&a.data)? {
            if crate::data::is_conversational(&v) {
                let msgs = match crate::data::parse_example(&v, &loc, crate::data::Stage::Sft)? {
                    crate::data::Example::Chat(m) => m,
                    _ => anyhow::bail!("{loc}: expected a conversation to score (\"messages\", \"conversations\", or \"prompt\" + \"completion\" as messages)"),
                };
                out.0.push(loc.n);
                out.1.push(renderer.encode_reward_chat(&msgs).with_context(|| loc.to_string())?.ids);
                continue;
            }
            let p = crate::data::str_field(&v, &loc, "prompt")?;
            let c = crate::data::str_field(&v, &loc, "completion")?;
            let mut ids = tok.encode(&template.as_ref().map_or(p.to_string(), |t| t.render(p)))?;
            ids.extend(tok.encode_plain(c)?);
            ids.push(eos);
            out.0.push(loc.n);
            out.1.push(ids);
        }
        out
    } else {
        let lines = eval::read_lines(&a.data)?;
        let mut out = (vec![], vec![]);
        for (i, l) in lines.iter().enumerate() {
            let ids = tok.encode(l)?;
            if !ids.is_empty() {
                out.0.push(i + 1);
                out.1.push(ids);
            }
        }
        out
    };
    let ctx = crate::model::Arch::from_file(&files.config)?.max_positions();
    if let Some((n, s)) = labels.iter().zip(&seqs).find(|(_, s)| s.len() > ctx) {
        crate::bail_kind!(crate::error::Kind::ScoreContextOverflow, "{}: entry {n} has {} tokens, more than the model's context of {ctx}", a.data.display(), s.len())
    }
    let (adapters, head) = crate::reward::load_reward_adapter(&a.adapter, "rm", false)?;
    let quant = crate::quant::BaseQuant::parse(&a.quantize)?;
    let model = Model::load(&files, dtype, &device, AdapterSet::new(adapters).with_base_quant(quant))?;
    let head = crate::reward::RewardHead::from_tensor(head, false, model.arch.hidden_size(), &device)?;
    let rewards = crate::reward::score(&model, &head, &seqs, tok.padding_id(), 8)?;
    for (n, r) in labels.iter().zip(&rewards) {
        if a.json {
            println!("{}", serde_json::json!({"line": n, "reward": r}));
        } else {
            println!("{n:>6}  {r:>10.5}");
        }
    }
    Ok(())
}

fn cmd_merge(a: MergeArgs) -> Result<()> {
    let dtype = if a.dtype == "auto" { None } else { Some(parse_dtype(&a.dtype, &candle_core::Device::Cpu)?) };
    let adapters = a.adapter.iter().map(|s| peft::parse_adapter_arg(s)).collect::<Result<Vec<_>>>()?;
    let max_shard_size = crate::merge::parse_size(&a.max_shard_size)?;
    // A --chat-template is resolved (and checked) before anything is written.
    let chosen = if a.chat_template.is_empty() {
        None
    } else {
        let files = ModelFiles::resolve(&a.model)?;
        let tok = Tokenizer::load(&files.tokenizer, &files.config)?;
        let rc = crate::render::RenderConfig { chat_template: a.chat_template.clone(), ..Default::default() };
        let r = crate::render::Renderer::new(&tok, &files.dir, rc)?;
        Some((files.dir.clone(), r.chat.as_ref().map(|c| c.source.clone()).context("--chat-template names no chat template")?))
    };
    let opts = crate::merge::MergeOptions { model: a.model, adapters, out: a.out, dtype, force: a.force, max_shard_size };
    let r = crate::merge::merge(&opts)?;
    if let Some((dir, text)) = chosen {
        crate::chat_template::install_chat_template(&dir, &opts.out, Some(&text))?;
    }
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn cmd_export(a: ExportArgs) -> Result<()> {
    let adapters = a.adapter.iter().map(|s| peft::parse_adapter_arg(s)).collect::<Result<Vec<_>>>()?;
    let opts = crate::export::ExportOptions {
        model: a.model,
        adapters,
        format: crate::export::Format::parse(&a.format)?,
        out: a.out,
        quant: crate::export::quant::Quant::parse(&a.quant)?,
        force: a.force,
        ollama: a.ollama,
        slice_values: crate::export::SLICE,
    };
    let r = crate::export::export(&opts)?;
    for f in &r.fallbacks {
        eprintln!("note: {f}");
    }
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

/// The flags over the model's generation_config.json; generation stops at any of the model's
/// end ids (config.json and generation_config.json `eos_token_id` lists) and `extra_stops`.
fn sampling_config(s: &SamplingArgs, tok: &Tokenizer, files: &ModelFiles, extra_stops: &[u32]) -> Result<SamplingConfig> {
    let defaults = crate::generate::GenerationDefaults::read(&files.dir)?;
    let mut stops = if s.ignore_eos { vec![] } else { tok.end_ids.clone() };
    if !s.ignore_eos {
        stops.extend(extra_stops.iter().filter(|i| !tok.end_ids.contains(i)));
    }
    Ok(defaults.resolve(s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.max_new_tokens, s.seed, stops))
}

/// The chat-template renderer for `chat` / `generate --chat`: `chat_template` ("" = the model's,
/// else built-in kochatgpt); None when a `{prompt}` template was asked for, or when the model
/// has no template and none was named (the `{prompt}` path stays the default there).
fn chat_renderer<'t>(tok: &'t Tokenizer, files: &ModelFiles, chat_template: &str, prompt_template: bool) -> Result<Option<crate::render::Renderer<'t>>> {
    if prompt_template && chat_template.is_empty() {
        return Ok(None);
    }
    let cfg = crate::render::RenderConfig { chat_template: chat_template.to_string(), max_len: usize::MAX, ..Default::default() };
    let r = crate::render::Renderer::new(tok, &files.dir, cfg)?;
    let has_own = r.chat.as_ref().is_some_and(|c| !matches!(c.origin, crate::chat_template::Origin::Builtin(_)) || !chat_template.is_empty());
    Ok(has_own.then_some(r))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let (model, tok, files) = load_model(&a.model)?;
    // Without template flags: the template the adapter was trained with (lorafit.json).
    let rec = if a.chat_template.is_empty() && a.template.is_none() { crate::render::TemplateRecord::of_adapters(&a.model.adapter)? } else { None };
    if a.chat {
        anyhow::ensure!(a.template.is_none(), "--chat renders through the chat template (--chat-template); --template is the {{prompt}} alternative: pass one of them");
        let recorded = match rec.as_ref().filter(|r| r.chat_template.is_some()) {
            Some(rec) => Some(crate::render::Renderer::from_record(&tok, &files.dir, rec, crate::render::RenderConfig { max_len: usize::MAX, ..Default::default() })?),
            None => None,
        };
        let r = match recorded {
            Some(r) => Some(r),
            None => chat_renderer(&tok, &files, &a.chat_template, false)?,
        };
        let r = match r {
            Some(r) => r,
            // No template in the model: the built-in kochatgpt one.
            None => crate::render::Renderer::new(&tok, &files.dir, crate::render::RenderConfig { chat_template: "kochatgpt".into(), max_len: usize::MAX, ..Default::default() })?,
        };
        let cfg = sampling_config(&a.sampling, &tok, &files, &r.end_of_turn_ids())?;
        let prompts = a
            .prompt
            .iter()
            .map(|p| Ok(r.encode_prompt(&crate::data::Prompt::Messages(vec![crate::data::Message::new(crate::data::Role::User, p.clone())]))?.ids))
            .collect::<Result<Vec<_>>>()?;
        let outs = generate(&model, &prompts, tok.padding_id(), &cfg)?;
        for (i, o) in outs.iter().enumerate() {
            if prompts.len() > 1 {
                println!("--- prompt {} ---", i + 1);
            }
            let reply: Vec<u32> = o.iter().copied().filter(|t| !cfg.stop_tokens.contains(t)).collect();
            println!("{}", tok.decode(&reply)?);
        }
        return Ok(());
    }
    let cfg = sampling_config(&a.sampling, &tok, &files, &[])?;
    let mut template = a.template.as_deref().map(template_arg).transpose()?.flatten();
    if let Some(t) = rec.as_ref().and_then(|r| r.prompt_template.as_deref()) {
        eprintln!("rendering each prompt through the adapter's training template {t:?} (--template none to continue the prompt as given)");
        template = Some(crate::template::Template::new(t)?);
    }
    let render = |p: &String| template.as_ref().map_or(p.clone(), |t| t.render(p));
    let prompts = a.prompt.iter().map(|p| tok.encode(&render(p))).collect::<Result<Vec<_>>>()?;
    let outs = generate(&model, &prompts, tok.padding_id(), &cfg)?;
    for (i, (p, o)) in prompts.iter().zip(&outs).enumerate() {
        if prompts.len() > 1 {
            println!("--- prompt {} ---", i + 1);
        }
        let all: Vec<u32> = p.iter().chain(o.iter()).copied().collect();
        println!("{}", tok.decode(&all)?);
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    if a.what == "render" {
        let data = a.data.as_ref().context("bench render needs --data")?;
        let r = crate::render::bench_render(&a.model.model, data, crate::render::RenderConfig { max_len: usize::MAX, ..Default::default() })?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "render {} rows ({} tokens, {} learned) in {:.2} s on {} threads: {:.0} rows/s, {:.0} tokens/s, peak RSS {}",
                r.rows, r.tokens, r.learned_tokens, r.seconds, r.threads, r.rows_per_s, r.tokens_per_s, r.peak_rss_bytes.map(fmt_bytes).unwrap_or_default()
            );
        }
        return Ok(());
    }
    use crate::train::bench;
    let m = &a.model;
    if a.what == "sft" || a.what == "rm" {
        let mut b = bench::StepBench {
            model: m.model.clone(),
            dtype: m.dtype.clone(),
            device: m.device.clone(),
            quantize: m.quantize.clone(),
            batch: a.batch,
            seq: a.seq,
            steps: a.steps,
            r: a.r,
            targets: vec![],
            grad_checkpointing: a.grad_checkpointing,
            profile: a.profile,
        };
        anyhow::ensure!(!a.profile || a.what == "sft", "bench {} --profile: --profile applies to bench sft only", a.what);
        b.check(&a.what, a.targets.as_deref())?;
        if a.what == "sft" {
            let r = bench::bench_sft(&b)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "sft step {:.3} s (median of {}), {:.0} tokens/s, peak RSS {}",
                    r.step_s_median, a.steps, r.tokens_per_s, r.peak_rss_bytes.map(fmt_bytes).unwrap_or_default()
                );
                if let Some(p) = &r.profile {
                    print!("\n{}", bench::profile_table(p));
                }
            }
        } else {
            let r = bench::bench_rm(&b)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("rm step {:.3} s (median of {}), peak RSS {}", r.step_s_median, a.steps, r.peak_rss_bytes.map(fmt_bytes).unwrap_or_default());
            }
        }
        return Ok(());
    }
    if a.what == "gemm" {
        let dims: Vec<usize> = a.gemm.split('x').map(str::parse).collect::<std::result::Result<_, _>>().context("--gemm: expected MxKxN")?;
        anyhow::ensure!(dims.len() == 3, "--gemm: expected MxKxN");
        anyhow::ensure!(m.quantize == "none", "bench gemm --quantize {}: gemm measures f32 matmuls; --quantize does not apply", m.quantize);
        bench::check_gemm(&m.device, dims[0], dims[1], dims[2], a.repeats)?;
        for g in bench::bench_gemm(&m.device, dims[0], dims[1], dims[2], a.repeats)? {
            if a.json {
                println!("{}", serde_json::to_string(&g)?);
            } else {
                println!("{} {}: {:.1} GFLOP/s median, {:.1} best", a.gemm, g.layout, g.gflops_median, g.gflops_best);
            }
        }
        return Ok(());
    }
    anyhow::ensure!(a.what == "generate", "bench {:?}: expected `generate`, `sft`, `rm` or `gemm`", a.what);
    bench::check_generate(&m.model, &m.dtype, &m.device, &m.quantize, a.batch, a.prompt_len, a.new_tokens, a.repeats)?;
    let rss_start = peak_rss_bytes().unwrap_or(0); // the process before any weight is read
    let t0 = Instant::now();
    let (model, _tok, _) = load_model(&a.model)?;
    let load_s = t0.elapsed().as_secs_f64();
    let rss_load = peak_rss_bytes().unwrap_or(0);
    let vocab = model.arch.vocab_size() as u64;
    let mut rng = crate::rng::SeededRng::new(7);
    let prompts: Vec<Vec<u32>> = (0..a.batch)
        .map(|_| (0..a.prompt_len).map(|_| (rng.uniform_f32() as f64 * vocab as f64) as u32 % vocab as u32).collect())
        .collect();
    let cfg = SamplingConfig { max_new_tokens: a.new_tokens, ..Default::default() };
    let mut times = vec![];
    for _ in 0..a.repeats.max(1) {
        let t = Instant::now();
        let out = generate(&model, &prompts, 0, &cfg).context("bench generation")?;
        times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(out.iter().all(|o| o.len() == a.new_tokens), "generation stopped early");
    }
    times.sort_by(f64::total_cmp);
    let gen_s = times[times.len() / 2];
    let tps = (a.batch * a.new_tokens) as f64 / gen_s;
    let rss = peak_rss_bytes().unwrap_or(0);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"tool": "lorafit", "model": a.model.model, "dtype": format!("{:?}", model.dtype).to_lowercase(),
                "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "load_s": load_s,
                "peak_rss_before_load_bytes": rss_start, "peak_rss_after_load_bytes": rss_load, "gen_s": gen_s, "tokens_per_s": tps, "peak_rss_bytes": rss})
        );
    } else {
        println!("load {load_s:.2} s (peak RSS {}), generate {gen_s:.3} s = {tps:.1} tokens/s (peak RSS {})", fmt_bytes(rss_load), fmt_bytes(rss));
    }
    Ok(())
}
