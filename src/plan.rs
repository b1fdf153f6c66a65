//! `lorafit plan`: the peak memory of a training run, predicted from `config.json` alone (no
//! tokenizer, no weights: plan a 7B run before downloading it), with a verdict against
//! `--budget` and, when it does not fit, the settings that would (each one re-planned).
//!
//! Notation: L layers, C hidden, H heads, Q = H·head_dim, K = kv_heads·head_dim, F MLP width,
//! V vocab, P positions; a micro-batch of B sequences of T tokens, N = B·T, S = B·H·T² attention
//! scores; e = bytes of the base dtype (4 f32, 2 f16/bf16); LoRA tensors are always f32.
//! - Parameters: GPT-2 `V·C + P·C + L·(4C² + 2C·F + 9C + F) + 2C` (+V·C untied); the LLaMA-like
//!   families `V·C + L·(C·(2Q + 2K) + 3C·F + nC [+ 2·head_dim]) + C` (n = 2 RMSNorms per layer, 4 for
//!   Gemma; q/k norms for Qwen3, Gemma 3, EXAONE 4; + biases, + V·C untied); GPT-NeoX
//!   `V·C + L·(4C² + 2C·F + 10C + F) + 2C` (+ V·C untied). Base bytes = params·e,
//!   or 0.5625 B/param (NF4: 4 bits + an f32 absmax per 64) for the block linears. Rope has no table
//!   (cos/sin are computed at the positions used).
//! - Load (`stream_load.rs`): tensors are read one by one, straight into the tensor when the file
//!   has the wanted dtype, else into a byte buffer and converted: peak = max over tensors in load
//!   order of (kept so far + tensor [+ buffer + dtype copy]).
//! - LoRA, per targeted linear in→out: r·(in+out) params; params, grads, AdamW m and v: 16 B each.
//! - Activations kept for backward per block (candle keeps every op input of the graph):
//!   GPT-2 `e·N·(7C + F) + S·e` (attention is one node keeping qkv and the probabilities,
//!   `ops/attention.rs`; LayerNorm and GELU run inside the next linear's node, `ops::Pre`);
//!   the LLaMA-like decoder `e·N·(4C + 3Q + 4K + 3F) + S·e` (heads and the gated MLP are one node
//!   each, `ops/family.rs`), + 2C with post-norms (Gemma, EXAONE 4); GPT-NeoX `e·N·(11C + F) + S·e`;
//!   plus per LoRA linear
//!   (one fused node, `ops/linear.rs`) `N·(4r [+ in, the u8 mask, with dropout])`. Plus the
//!   mask 4·B·T², the embeddings, the final norm and the labelled rows.
//! - Transients (measured, one op at a time): the activation's backward 4 (gelu) / 6 (silu)
//!   ·N·F·e on f32 CPU tensors (`ops/act.rs`), 21.5 / 18 ·N·F·e where it falls back to composed
//!   ops; attention (`ops/attention.rs`) S·16 (f32) or S·9e, + 8·N·C·e; forward softmax 2·S·4;
//!   LM head (labelled rows only, `train.loss_chunk` rows × V at a time, its gradient computed
//!   in the forward): 12 B (f32) or 12+e B per element, and the kept input gradient labels·C·e;
//!   with a LoRA on the head, all labelled rows at once: forward 12 B, backward 16 B or 24+e B.
//! - With activation checkpointing: the mask and L+1 block inputs, plus the largest of: one block's
//!   graph in forward, the head's loss, or one recomputed block with its backward.
//! - PPO: KV cache B·L·2·K·(prompt+new)·e during rollouts, no-grad passes, then SFT-like minibatch
//!   steps (mb sequences, mb·new labels), with the entropy's full logits when `ent_coef` > 0;
//!   all roles share one base.
//! - NF4: + (12 + e)·in·out for the largest linear, dequantized per pass (`quant.rs`).
//! - bf16 on the CPU: candle widens each matmul's operands to f32; the LM head's (4·V·C +
//!   4·rows·V) is added to the loss's working set.
//! - RSS (CPU) = the above + RUNTIME + 2 % of the activations (+ 0.2 block with checkpointing):
//!   glibc keeps freed heap pages. Calibrated against `bench sft` peak RSS (see tests/plan.rs).
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::lora::LoraConfig;
use crate::model::Arch;
use crate::runtime::fmt_bytes;
use crate::train::config::TrainConfig;

/// RSS of the process beyond its tensors (binary, libraries, thread stacks, gemm packing
/// buffers): 7.6 MiB measured after loading a 0.6 MB model, fitted to 10 MiB on training steps.
const RUNTIME: f64 = 10.0 * 1048576.0;
/// GPU: the CUDA context and kernels (not measured here; a typical figure).
const CUDA_CONTEXT: f64 = 512.0 * 1048576.0;

#[derive(Args)]
pub struct PlanArgs {
    /// A folder with config.json (weights not needed), a hub id (only config.json is fetched), or builtin:<name>.
    #[arg(long)]
    pub model: Option<String>,
    /// TOML training config (see configs/); every key has a default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any config key: --set train.batch_size=8.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// sft, rm (assumes 2 completions per prompt) or ppo.
    #[arg(long, default_value = "sft")]
    pub stage: String,
    /// Memory available: 8GiB, 16GB, 500MiB ... (RAM on CPU, GPU memory on cuda).
    #[arg(long)]
    pub budget: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Component { pub name: String, pub bytes: u64 }

/// A change, the `--set` overrides that make it (re-plan with them to check), its peak.
#[derive(Debug, Serialize)]
pub struct Suggestion { pub change: String, pub sets: Vec<String>, pub peak_bytes: u64, pub fits: bool }

#[derive(Debug, Serialize)]
pub struct Plan {
    pub model: String, pub stage: String, pub device: String, pub dtype: String,
    pub params: u64, pub trainable_params: u64,
    /// The phase that peaks (`load`, `train step`, `rollout`), its components (they sum to the peak).
    pub phase: String,
    pub components: Vec<Component>,
    pub peak_bytes: u64, pub load_peak_bytes: u64,
    pub budget_bytes: Option<u64>, pub fits: Option<bool>, pub suggestions: Vec<Suggestion>,
}

/// The config numbers the formulas use (f64: they only feed byte estimates; params are exact).
/// `tensors`: every tensor in load order (elements, is a block linear weight NF4 quantizes);
/// `linears`: layer 0's linears (module path, in, out); `head`: the LM head's module path;
/// `kept`: activation values kept per token and block, in units of the base dtype (see the header);
/// `gelu`: the MLP activation is GELU (its backward's working set differs from SiLU's).
struct Shape { gelu: bool, c: f64, l: f64, h: f64, k: f64, f: f64, v: f64, pos: f64, kept: f64, head: String, tensors: Vec<(u64, bool)>, linears: Vec<(String, f64, f64)>, file_bytes: f64 }

impl Shape {
    fn new(arch: &Arch, raw: &serde_json::Value) -> Self {
        let file_bytes = match raw.get("torch_dtype").or_else(|| raw.get("dtype")).and_then(|d| d.as_str()) {
            Some("float16" | "bfloat16") => 2.0,
            _ => 4.0,
        };
        // (C, L, H, Q, K, F, V, P, tied, norm tensor sizes per layer, linears (path, in, out, bias), kept per token)
        let (c, l, h, k, f, v, pos, tied, norms, lin, kept): (usize, usize, usize, usize, usize, usize, usize, bool, Vec<usize>, Vec<(String, usize, usize, bool)>, f64) = match arch {
            Arch::Gpt2(g) => {
                let (c, f) = (g.n_embd, g.n_inner());
                let p = "transformer.h.0.";
                let lin = [("attn.c_attn", c, 3 * c), ("attn.c_proj", c, c), ("mlp.c_fc", c, f), ("mlp.c_proj", f, c)].map(|(n, i, o)| (format!("{p}{n}"), i, o, true)).to_vec();
                // qkv (3C), attention out, c_proj out, residual, mlp out, residual (7C) and c_fc's output (F).
                (c, g.n_layer, g.n_head, c, f, g.vocab_size, g.n_positions, g.tie_word_embeddings, vec![c; 4], lin, (7 * c + f) as f64)
            }
            Arch::Decoder(m) => {
                let (c, f, q, k) = (m.hidden_size, m.intermediate_size, m.q_dim(), m.kv_dim());
                let mut norms = vec![c; m.norms_per_layer()];
                if m.qk_norm {
                    norms.extend([m.head_dim, m.head_dim]);
                }
                // Residuals and block outputs (4C; the pre-norms run inside the next linears'
                // nodes); q: its projection, its heads (norm + transpose + rope, one node) and the
                // attention output (3Q); k, v: projection and heads (4K); gate, up and their gated
                // product (3F, `ops::family::gated`); post-norms (Gemma, EXAONE 4) keep their outputs (2C).
                let mut kept = 4 * c + 3 * q + 4 * k + 3 * f;
                if m.norms != crate::model::family::NormPlacement::Pre {
                    kept += 2 * c;
                }
                (c, m.num_hidden_layers, m.num_attention_heads, k, f, m.vocab_size, m.max_position_embeddings, m.tie_word_embeddings, norms, m.linears(), kept as f64)
            }
            Arch::GptNeox(g) => {
                let (c, f) = (g.hidden_size, g.intermediate_size);
                let (p, b) = ("gpt_neox.layers.0.", g.attention_bias);
                let lin = [("attention.query_key_value", c, 3 * c, b), ("attention.dense", c, c, b), ("mlp.dense_h_to_4h", c, f, true), ("mlp.dense_4h_to_h", f, c, true)]
                    .map(|(n, i, o, b)| (format!("{p}{n}"), i, o, b))
                    .to_vec();
                // input, qkv (3C), its heads (3C), attention out, dense out, residuals (2C),
                // mlp out (C) and dense_h_to_4h's output (F).
                let kept = 11 * c + f;
                (c, g.num_hidden_layers, g.num_attention_heads, c, f, g.vocab_size, g.max_position_embeddings, g.tie_word_embeddings, vec![c; 4], lin, kept as f64)
            }
        };
        let gpt2 = matches!(arch, Arch::Gpt2(_));
        let gelu = match arch {
            Arch::Decoder(m) => m.act == crate::model::family::Act::GeluTanh,
            _ => true,
        };
        let mut t = vec![((v * c) as u64, false)];
        if gpt2 {
            t.push(((pos * c) as u64, false)); // learned positions
        }
        for _ in 0..l {
            t.extend(norms.iter().map(|&n| (n as u64, false)));
            for (_, a, b, bias) in &lin {
                t.push(((a * b) as u64, true));
                if *bias {
                    t.push((*b as u64, false));
                }
            }
        }
        t.extend(std::iter::repeat_n((c as u64, false), if gpt2 || matches!(arch, Arch::GptNeox(_)) { 2 } else { 1 })); // final norm
        if !tied {
            t.push(((v * c) as u64, false));
        }
        let linears = lin.iter().map(|(n, a, b, _)| (n.clone(), *a as f64, *b as f64)).collect();
        let f64_ = |x: usize| x as f64;
        Shape { gelu, c: f64_(c), l: f64_(l), h: f64_(h), k: f64_(k), f: f64_(f), v: f64_(v), pos: f64_(pos), kept, head: arch.lm_head_name().into(), tensors: t, linears, file_bytes }
    }
}

/// What a plan depends on, from the resolved config.
struct Run<'a> { s: &'a Shape, cfg: &'a TrainConfig, lora: LoraConfig, stage: &'a str, gpu: bool, e: f64, dtype: String, nf4: bool }

/// One forward + backward: B sequences of T tokens, labelled rows, LoRA dropout, adapters
/// active in the pass, and a working set at the loss besides the head (PPO's entropy logits).
struct Pass { b: f64, t: f64, labels: f64, dropout: bool, active: f64, at_loss: f64 }

impl Run<'_> {
    /// LoRA parameters of one adapter.
    fn lora_params(&self) -> f64 {
        let per: f64 = self.s.linears.iter().filter(|x| self.lora.targets(&x.0)).map(|x| self.lora.rank_and_scaling(&x.0).0 as f64 * (x.1 + x.2)).sum();
        let head = if self.lora.targets(&self.s.head) { self.lora.r as f64 * (self.s.c + self.s.v) } else { 0.0 };
        per * self.s.l + head
    }

    /// (peak while loading, base bytes kept): tensors in load order, each read into a buffer.
    fn load(&self) -> (f64, f64) {
        let (e, sf) = (self.e, self.s.file_bytes);
        let (mut kept, mut peak) = (0.0, 0.0f64);
        for &(n, lin) in &self.s.tensors {
            let n = n as f64;
            // Stored as wanted: read straight into the tensor; else a byte buffer, then converted.
            let mut during = n * if sf == e { sf } else { (2.0 * sf).max(sf + e) };
            let mut keep = n * e;
            if lin && self.nf4 {
                during = during.max(n * (e + 6.0)); // dense + f32 copy + codes + packed (quant.rs)
                keep = n * 0.5625;
            }
            if self.gpu {
                during = n * e; // the CPU-side buffers are host memory
            }
            peak = peak.max(kept + during);
            kept += keep;
        }
        (peak.max(kept), kept)
    }

    /// Bytes of one pass: (kept + working set at the peak, allocator slack, which op peaks).
    fn pass(&self, p: &Pass) -> (f64, f64, &'static str) {
        let (s, e, ck) = (self.s, self.e, self.cfg.train.grad_checkpointing);
        let (n, sc) = (p.b * p.t, p.b * s.h * p.t * p.t);
        // GPT-2: qkv (3C), attention out, c_proj out, residual, mlp out, residual, and c_fc's
        // output (F), plus the attention probabilities (ops/attention.rs). The LayerNorms and
        // GELU run inside the next linear's node and their outputs are not kept.
        // LLaMA: residuals and projections (4C; the norms run inside the next linears' nodes),
        // q/k/v, their head copies and RoPE (4Q + 4K, v has no RoPE but the attention output is
        // Q wide), gate, up, silu, product (4F).
        let mut blk = n * e * s.kept;
        blk += sc * e;
        for (path, i, _) in s.linears.iter().filter(|x| self.lora.targets(&x.0)) {
            let r = self.lora.rank_and_scaling(path).0 as f64;
            // The fused LoRA node (ops/linear.rs) keeps z = u Aᵀ (f32) and a u8 dropout mask.
            blk += p.active * n * (4.0 * r + if p.dropout { *i } else { 0.0 });
        }
        let f32_act = e == 4.0; // ops/act.rs: one-pass backward on f32 CPU tensors
        let act = n * s.f * e * match (s.gelu, f32_act) {
            (true, true) => 4.0,
            (false, true) => 6.0,
            (true, false) => 21.5,
            (false, false) => 18.0,
        };
        let attn = sc * if e == 4.0 { 16.0 } else { 9.0 * e } + 8.0 * n * s.c * e;
        let head_lora = self.lora.targets(&s.head);
        let rows = if head_lora { p.labels } else { (self.cfg.train.loss_chunk as f64).min(p.labels) };
        // The fused head + loss (ops::lm_head_cross_entropy) does its backward work in the forward,
        // a chunk at a time, and keeps only the input gradient (labels × C); with a LoRA on the
        // head the (labels, V) logits go through the plain cross-entropy op instead.
        let (head_f, head_b) = if head_lora {
            (12.0 * rows * s.v, rows * s.v * if e == 4.0 { 16.0 } else { 24.0 + e })
        } else {
            (rows * s.v * if e == 4.0 { 12.0 } else { 12.0 + e }, 0.0)
        };
        // candle has no bf16 GEMM on the CPU: it widens both operands to f32 (the whole weight,
        // 4 B per value) and the product too, per matmul. The LM head's is the largest.
        let (head_f, head_b) = if self.dtype == "bf16" && !self.gpu {
            let widen = 4.0 * s.v * s.c + 4.0 * rows * s.v;
            (head_f + widen, if head_b > 0.0 { head_b + widen } else { 0.0 })
        } else {
            (head_f, head_b)
        };
        let kept_dh = if head_lora { 0.0 } else { p.labels * s.c * e };
        let (mask, tail) = (4.0 * p.b * p.t * p.t, n * s.c * e + p.labels * s.c * e + kept_dh);
        let bwd = act.max(attn);
        let (total, what) = if !ck {
            let kept = mask + n * s.c * e + s.l * blk + tail;
            let cands = [(2.0 * sc * 4.0, "attention softmax (forward)"), (head_f.max(p.at_loss), "loss (forward)"), (head_b, "LM head (backward)"), (bwd, if act > attn { "MLP activation (backward)" } else { "attention (backward)" })];
            let (t, w) = cands.iter().fold((0.0, ""), |m, c| if c.0 > m.0 { *c } else { m });
            (kept + t, w)
        } else {
            let inputs = mask + (s.l + 1.0) * n * s.c * e;
            let cands = [(blk + 2.0 * sc * 4.0, "one block (forward)"), (tail + head_f.max(head_b).max(p.at_loss), "loss"), (n * s.c * e + blk + bwd, "one block recomputed + its backward")];
            let (t, w) = cands.iter().fold((0.0, ""), |m, c| if c.0 > m.0 { *c } else { m });
            (inputs + t, w)
        };
        // NF4: the weight of the linear in flight is dequantized (codes, levels, scales, dense).
        let deq = if self.nf4 { (12.0 + e) * s.linears.iter().map(|x| x.1 * x.2).fold(0.0, f64::max) } else { 0.0 };
        (total + deq, 0.02 * total + if ck { 0.2 * blk } else { 0.0 }, what)
    }

    /// No-grad forward of B sequences of T tokens (rollouts, scoring, old log-probs): the mask,
    /// residual-sized tensors, and the larger of the scores with their mask-add and softmax
    /// (12 B per score whatever e) or the MLP's two N·F tensors.
    fn infer(&self, b: f64, t: f64) -> f64 {
        let (s, n) = (self.s, b * t);
        4.0 * b * t * t + 10.0 * n * s.c * self.e + (12.0 * b * s.h * t * t).max(2.0 * n * s.f * self.e)
    }

    fn phases(&self) -> (Vec<Component>, String, f64) {
        let (s, cfg, e) = (self.s, self.cfg, self.e);
        let (load_peak, base) = self.load();
        let runtime = if self.gpu { CUDA_CONTEXT } else { RUNTIME };
        let lp = self.lora_params();
        let (b, t) = (cfg.train.batch_size as f64, cfg.data.max_len.min(s.pos as usize) as f64);
        let mut common = vec![(if self.gpu { "CUDA context (typical)".to_string() } else { "runtime (binary, libraries, threads)".into() }, runtime)];
        common.push((format!("base weights ({})", if self.nf4 { format!("NF4 block linears, {} rest", self.dtype) } else { self.dtype.clone() }), base));
        let (adapters, pass, phase) = match self.stage {
            "ppo" => {
                let p = &cfg.ppo;
                let (tp, new, mb) = (p.max_prompt_len as f64, p.max_new_tokens as f64, p.minibatch_size as f64);
                let trainable = if p.critic_adapter { 2.0 } else { 1.0 };
                let adapters = lp * (16.0 * trainable + 4.0 * 3.0) + 32.0 * s.c;
                // Generation: the KV cache grows to prompt + new (each step re-concatenates one layer);
                // then scoring (+ eos) and log-prob passes over the whole batch, without a graph.
                let kv = |t: f64| b * s.l * 2.0 * s.k * t * e;
                let gen = (kv(tp + new) + 2.0 * kv(tp + new) / s.l).max(kv(tp) + self.infer(b, tp));
                let roll = gen.max(self.infer(b, tp + new + 1.0));
                // The entropy's full logits exist in the update only when it is in the loss.
                let entropy = if p.ent_coef > 0.0 { mb * new * s.v * if e == 4.0 { 16.0 } else { e + 16.0 } } else { 0.0 };
                let (step, slack, what) = self.pass(&Pass { b: mb, t: tp + new, labels: mb * new, dropout: false, active: 1.0, at_loss: entropy });
                if roll > step + slack {
                    let what = if gen >= roll { "KV cache of the rollouts + generation" } else { "no-grad scoring / log-prob pass" };
                    (adapters, vec![(what.into(), roll)], "rollout")
                } else {
                    (adapters, vec![(format!("minibatch step: activations + peak op ({what})"), step), ("allocator slack".into(), slack)], "train step")
                }
            }
            stage => {
                let (rm, stacked) = (stage == "rm", !cfg.rm.sft_adapter.is_empty() && stage == "rm");
                let pass = Pass { b: if rm { 2.0 * b } else { b }, t, labels: if rm { 0.0 } else { b * (t - 1.0) }, dropout: cfg.lora.lora_dropout > 0.0, active: if stacked { 2.0 } else { 1.0 }, at_loss: 0.0 };
                let (step, slack, what) = self.pass(&pass);
                let adapters = 16.0 * lp + if stacked { 4.0 * lp } else { 0.0 } + if rm { 16.0 * s.c } else { 0.0 };
                (adapters, vec![(format!("activations + peak op ({what})"), step), ("allocator slack".into(), slack)], "train step")
            }
        };
        common.push(("LoRA params + grads + AdamW m, v (f32)".into(), adapters));
        let load = vec![common[0].clone(), ("loading: weights + tensor in flight".into(), load_peak)];
        let train: Vec<(String, f64)> = common.into_iter().chain(pass).collect();
        let sum = |v: &[(String, f64)]| v.iter().map(|c| c.1).sum::<f64>();
        let (chosen, phase) = if sum(&load) > sum(&train) { (load, "load") } else { (train, phase) };
        (chosen.into_iter().map(|(name, b)| Component { name, bytes: b as u64 }).collect(), phase.into(), runtime + load_peak)
    }
}

/// Parses 8GiB, 16GB, 500MiB, 1.5G (K/M/G/T alone are binary), or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len()));
    let x: f64 = num.parse().with_context(|| format!("--budget {s}: expected a size such as 8GiB, 16GB or 500MiB"))?;
    let units = [("", 1.0), ("b", 1.0), ("kb", 1e3), ("mb", 1e6), ("gb", 1e9), ("tb", 1e12), ("k", 1024.0), ("kib", 1024.0), ("m", 1048576.0), ("mib", 1048576.0), ("g", 1073741824.0), ("gib", 1073741824.0), ("t", 1099511627776.0), ("tib", 1099511627776.0)];
    let u = unit.trim().to_ascii_lowercase();
    let mult = units.iter().find(|(n, _)| *n == u).map(|x| x.1).with_context(|| format!("--budget {s}: unknown unit {u:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"))?;
    Ok((x * mult) as u64)
}

/// The plan of `model` (or model.name) under `config` + `sets` for `stage`, without suggestions.
fn plan_once(model: Option<&str>, config: Option<&std::path::Path>, sets: &[String], stage: &str) -> Result<Plan> {
    let mut sets = sets.to_vec();
    if let Some(m) = model {
        sets.push(format!("model.name={}", toml::Value::String(m.to_string())));
    }
    let cfg = TrainConfig::load(config, &sets)?;
    let path = crate::weights::ModelFiles::config_only(&cfg.model.name)?;
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let arch = Arch::from_file(&path)?;
    let s = Shape::new(&arch, &raw);
    let gpu = cfg.model.device != "cpu";
    let e = match cfg.model.dtype.as_str() {
        "f32" | "float32" => 4.0,
        "f16" | "float16" | "bf16" | "bfloat16" => 2.0,
        "auto" => if gpu { 2.0 } else { 4.0 },
        d => bail!("model.dtype = {d:?}: expected f32, f16, bf16 or auto"),
    };
    anyhow::ensure!(matches!(stage, "sft" | "rm" | "ppo"), "--stage {stage}: expected sft, rm or ppo");
    let nf4 = crate::quant::BaseQuant::parse(&cfg.model.quantize)? == crate::quant::BaseQuant::Nf4;
    let dtype = if e == 4.0 { "f32".into() } else if cfg.model.dtype == "auto" { "bf16".into() } else { cfg.model.dtype.clone() };
    let run = Run { s: &s, cfg: &cfg, lora: crate::train::sft::lora_config(&cfg, &arch), stage, gpu, e, dtype: dtype.clone(), nf4 };
    let (components, phase, load_peak) = run.phases();
    let trainable = run.lora_params() as u64 * if stage == "ppo" && cfg.ppo.critic_adapter { 2 } else { 1 };
    let (params, peak_bytes) = (s.tensors.iter().map(|t| t.0).sum(), components.iter().map(|c| c.bytes).sum());
    let (model, device, load_peak_bytes) = (cfg.model.name.clone(), cfg.model.device.clone(), load_peak as u64);
    Ok(Plan { model, stage: stage.into(), device, dtype, params, trainable_params: trainable, phase, components, peak_bytes, load_peak_bytes, budget_bytes: None, fits: None, suggestions: vec![] })
}

/// The plan with its verdict and, when over budget, the changes that fit (each one re-planned).
pub fn plan(model: Option<&str>, config: Option<&std::path::Path>, sets: &[String], stage: &str, budget: Option<u64>) -> Result<Plan> {
    let mut p = plan_once(model, config, sets, stage)?;
    let Some(budget) = budget else { return Ok(p) };
    (p.budget_bytes, p.fits) = (Some(budget), Some(p.peak_bytes <= budget));
    if p.peak_bytes <= budget {
        return Ok(p);
    }
    let cfg = TrainConfig::load(config, sets)?;
    let try_ = |change: String, extra: Vec<String>| -> Result<Suggestion> {
        let all: Vec<String> = sets.iter().chain(&extra).cloned().collect();
        let peak = plan_once(model, config, &all, stage)?.peak_bytes;
        Ok(Suggestion { change, sets: extra, peak_bytes: peak, fits: peak <= budget })
    };
    // The batch knob: sequences per micro-batch (same per optimizer step via grad_accum); for PPO
    // the minibatch of the update, or the prompts per rollout when the rollout peaks.
    let (key, bs, acc, len) = match (stage, p.phase.as_str()) {
        ("ppo", "rollout") => ("train.batch_size", cfg.train.batch_size, 0, 0),
        ("ppo", _) => ("ppo.minibatch_size", cfg.ppo.minibatch_size, 0, 0),
        _ => ("train.batch_size", cfg.train.batch_size, cfg.train.grad_accum, cfg.data.max_len),
    };
    let halve = |k: usize| [format!("{key}={}", bs >> k), format!("train.grad_accum={}", acc << k)].into_iter().take(if acc > 0 { 2 } else { 1 }).collect::<Vec<_>>();
    let mut out = vec![];
    if !cfg.train.grad_checkpointing {
        out.push(try_("enable activation checkpointing".into(), vec!["train.grad_checkpointing=true".into()])?);
    }
    // The largest micro-batch (same sequences per optimizer step) and the longest max_len that fit.
    for k in (1..usize::BITS as usize).take_while(|&k| bs >> k > 0) {
        let s = try_(format!("{key} {bs} -> {}{}", bs >> k, if acc > 0 { format!(" with train.grad_accum {acc} -> {}", acc << k) } else { String::new() }), halve(k))?;
        if s.fits {
            out.push(s);
            break;
        }
    }
    for l in (0..).map(|k| len >> (k + 1)).take_while(|&l| l >= 32) {
        let s = try_(format!("data.max_len {len} -> {l} (longer rows are truncated)"), vec![format!("data.max_len={l}")])?;
        if s.fits {
            out.push(s);
            break;
        }
    }
    if p.dtype == "f32" {
        out.push(try_("bf16 base (slower on CPU)".into(), vec!["model.dtype=bf16".into()])?);
    }
    if cfg.model.quantize != "nf4" {
        out.push(try_("4-bit base (QLoRA's NF4)".into(), vec!["model.quantize=nf4".into()])?);
    }
    if p.device == "cpu" {
        out.push(try_("on a GPU in bf16 (the budget is then GPU memory)".into(), vec!["model.device=\"cuda\"".into(), "model.dtype=bf16".into()])?);
    }
    if !out.iter().any(|s| s.fits) {
        // All of them at once, halving the batch until it fits.
        let all: Vec<String> = vec!["train.grad_checkpointing=true".into(), "model.quantize=nf4".into(), "model.dtype=bf16".into()];
        for k in (0..usize::BITS as usize).take_while(|&k| bs >> k > 0) {
            let extra: Vec<String> = all.iter().cloned().chain(if k > 0 { halve(k) } else { vec![] }).collect();
            let s = try_(format!("all of: {}", extra.join(", ")), extra)?;
            if s.fits {
                out.push(s);
                break;
            }
        }
    }
    p.suggestions = out.into_iter().filter(|s| s.fits).collect();
    Ok(p)
}

/// `lorafit plan`.
pub fn run(a: PlanArgs) -> Result<()> {
    let budget = a.budget.as_deref().map(parse_bytes).transpose()?;
    let p = plan(a.model.as_deref(), a.config.as_deref(), &a.set, &a.stage, budget)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    println!("{} ({} parameters), stage {}, {} {}, peak in the {} phase:\n", p.model, p.params, p.stage, p.device, p.dtype, p.phase);
    for c in &p.components {
        println!("  {:<62} {:>12}", c.name, fmt_bytes(c.bytes));
    }
    println!("  {:<62} {:>12}", "predicted peak", fmt_bytes(p.peak_bytes));
    println!("  ({} trainable parameters; loading alone peaks at {})", p.trainable_params, fmt_bytes(p.load_peak_bytes));
    if let (Some(b), Some(fits)) = (p.budget_bytes, p.fits) {
        println!("\nbudget {}: {}", fmt_bytes(b), if fits { "fits" } else { "does NOT fit" });
        if !fits && p.suggestions.is_empty() {
            println!("no single change (nor all of them together) fits this budget");
        }
        for s in &p.suggestions {
            println!("  fits with {}: peak {}   [--set {}]", s.change, fmt_bytes(s.peak_bytes), s.sets.join(" --set "));
        }
    }
    Ok(())
}
