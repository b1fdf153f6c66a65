//! lorafit: LoRA fine-tuning of GPT-2, GPT-NeoX and the LLaMA-like families (Llama 3.x, Mistral,
//! Qwen2/3, Gemma 2/3, EXAONE, Phi-3) on candle, with adapters in PEFT's format.
//!
//! Map of the crate (read in this order):
//! - [`ops`]: training ops whose backward gives input gradients only (no `dW` for frozen weights),
//!   and fused attention / activation nodes with written-out backwards.
//! - [`lora`]: PEFT-semantics LoRA attached at construction; the frozen [`lora::Linear`], which runs
//!   with its active adapters as one graph node (`ops/linear.rs`).
//! - [`model`]: GPT-2, GPT-NeoX and one decoder for the LLaMA-like families (`model/family.rs`:
//!   the switches; `model/rope.rs`: every rope type), numerically equal to transformers;
//!   [`model::Model`] is the entry point.
//! - [`weights`], [`builtin`], [`tokenizer`]: finding and reading model folders; [`pth`]:
//!   `pytorch_model.bin` read by a bounded pickle reader, [`stream_load`]: safetensors.
//! - [`peft`], [`io`]: adapter folders in PEFT's format, crash-safe writes.
//! - [`merge`]: adapters folded into the base, written as a Hugging Face model folder.
//! - [`export`]: the same merge (or the adapters alone) as a GGUF file for llama.cpp / Ollama.
//! - [`generate`], [`eval`]: the KV-cached batched sampler and per-line NLL.
//! - [`data`], [`template`], [`train`]: training data, the shared prompt template, and the
//!   training methods (`train/sft.rs`, `rm.rs`, `ppo.rs`) on one training session
//!   (`train/session.rs`: output folder, checkpoints, loss scaling, metrics, export).
//! - [`chat_template`], [`render`]: models' Jinja chat templates rendered as transformers does,
//!   and the one path from a data row to token ids + the mask of learned tokens (`lorafit render`).
//! - [`plan`]: a training run's peak memory predicted from config.json (`lorafit plan`).
//! - [`outdir`]: output folders: locks, lorafit's marker, inputs never overwritten, stale temps.
//! - [`error`]: error kinds with known fixes (the binary prints their hints).
//! - [`progress`]: log lines and training progress on stderr (a bar, or plain lines in logs).
//! - [`cli`]: the `lorafit` command line.
pub mod builtin;
pub mod chat;
pub mod chat_template;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod io;
pub mod lora;
pub mod merge;
pub mod model;
pub mod outdir;
pub mod ops;
pub mod peft;
pub mod plan;
pub mod prof;
pub mod progress;
pub mod pth;
pub mod quant;
pub mod render;
pub mod reward;
pub mod rng;
pub mod runtime;
pub mod stream_load;
pub mod template;
pub mod tokenizer;
pub mod train;
pub mod weights;
