//! `lorafit plan`: the peak memory of a training run, predicted from `config.json` alone (no
//! weights: plan a 7B run before downloading it), with a verdict against `--budget` and, when
//! it does not fit, the smallest set of changes that would (`plan/suggest.rs`, each re-planned).
//! A pipeline config is planned stage by stage. When the config names a data file (and the
//! tokenizer is at hand) the rows are read and tokenized (`plan/data.rs`): the longest batch
//! and an RM batch's real number of completions replace the assumptions (T = `data.max_len`,
//! 2 completions per prompt), which are otherwise stated in the plan.
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
//!   in the forward): 12 B (f32) or 12+e B per element, and the kept input gradient labels·C·e.
//!   f32 on the CPU (`ops/fused_cpu.rs`, one pass in the GEMM outputs): attention S·4, forward
//!   softmax 0, LM head 8 B per element (4 without a gradient), no-grad scores 4·S;
//!   with a LoRA on the head, all labelled rows at once: forward 12 B, backward 16 B or 24+e B.
//! - With activation checkpointing: the mask and L+1 block inputs, plus the largest of: one block's
//!   graph in forward, the head's loss, or one recomputed block with its backward.
//! - PPO: KV cache B·L·2·K·(prompt+new)·e during rollouts, no-grad passes, then SFT-like minibatch
//!   steps (mb sequences, mb·new labels), with the entropy's full logits when `ent_coef` > 0;
//!   all roles share one base.
//! - DPO: one pair (chosen + rejected, 2 sequences of the pair's longer length) per
//!   forward/backward, the gradients accumulated; the no-grad reference pass of one pair (none
//!   for orpo/simpo), the eval pass of `batch_size` pairs; the frozen SFT adapter with `dpo.sft_adapter`.
//! - GRPO: generation of prompts × `group_size` with a KV cache (as PPO), the reference
//!   (β > 0) and reward-model passes one group at a time without a graph, and the update's
//!   forward/backward one group at a time (group_size sequences of prompt + new tokens).
//! - NF4: + (12 + e)·in·out for the largest linear, dequantized per pass (`quant.rs`).
//! - bf16 on the CPU: candle widens each matmul's operands to f32; the LM head's (4·V·C +
//!   4·rows·V) is added to the loss's working set.
//! - RSS (CPU) = the above + RUNTIME + 2 % of the activations (+ 0.2 block with checkpointing):
//!   glibc keeps freed heap pages. Calibrated against `bench sft` peak RSS (see tests/plan.rs).
//!
//! Sizes are f64 (estimates) and parameter counts u128 (exact), so an absurd config.json cannot
//! overflow; a plan past [`MAX_BYTES`] is an error.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::lora::LoraConfig;
use crate::model::Arch;
use crate::runtime::fmt_bytes;
use crate::train::config::TrainConfig;

mod data;
mod suggest;

pub use data::DataStats;

/// RSS of the process beyond its tensors (binary, libraries, thread stacks, gemm packing
/// buffers): 7.6 MiB measured after loading a 0.6 MB model, fitted to 10 MiB on training steps;
/// refitted to 12 MiB when the binary grew to 24.6 MB with DPO, GRPO, Parquet and the GGUF
/// families (the tiny llama-a step measured 20.0 MiB against 17.0 planned: -15%).
const RUNTIME: f64 = 12.0 * 1048576.0;
/// GPU: the CUDA context and kernels (not measured here; a typical figure).
const CUDA_CONTEXT: f64 = 512.0 * 1048576.0;
/// 1 PiB: more memory than any one machine holds. A plan past it comes from a config.json
/// with absurd sizes, and is an error rather than a number.
pub const MAX_BYTES: f64 = 1125899906842624.0;

#[derive(Args)]
pub struct PlanArgs {
    /// A folder with config.json (weights not needed), a hub id (only config.json is fetched), or builtin:<name>.
    #[arg(long)]
    pub model: Option<String>,
    /// TOML training config (see configs/), or a pipeline config (each stage is planned).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides data.path: its rows are read (and tokenized, when the tokenizer is at hand) to
    /// find the longest batch and an RM's completions per prompt.
    #[arg(long)]
    pub data: Option<String>,
    /// Override any config key: --set train.batch_size=8.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Overrides model.device: cpu, cuda or cuda:N (the budget is then GPU memory).
    #[arg(long)]
    pub device: Option<String>,
    /// Overrides model.dtype: f32, f16, bf16 or auto.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Overrides model.quantize: none or nf4.
    #[arg(long)]
    pub quantize: Option<String>,
    /// sft, rm, ppo, dpo or grpo (default: dpo / grpo for a config with that table, else sft;
    /// with a pipeline config, every stage).
    #[arg(long)]
    pub stage: Option<String>,
    /// Memory available: 8GiB, 16GB, 500MiB ... (RAM on CPU, GPU memory on cuda).
    #[arg(long)]
    pub budget: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Component { pub name: String, pub bytes: u64 }

/// A set of changes, the `--set` overrides that make it (re-plan with them to check), its peak.
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
    pub budget_bytes: Option<u64>, pub fits: Option<bool>,
    /// The smallest sets of changes that fit, cheapest first (empty when it fits).
    pub suggestions: Vec<Suggestion>,
    /// What was read from the data file, when one is configured.
    pub data: Option<DataStats>,
    /// What the plan assumed where it read nothing.
    pub assumptions: Vec<String>,
}

/// The config numbers the formulas use (f64: they only feed byte estimates; element counts are
/// exact u128). Tensors in load order, each (elements, is a block linear weight NF4 quantizes):
/// `prefix` (embeddings), `layer` (one block, repeated `layers` times), `suffix` (final norm,
/// untied head). `linears`: layer 0's linears (module path, in, out); `head`: the LM head's
/// module path; `kept`: activation values kept per token and block, in units of the base dtype
/// (see the header); `gelu`: the MLP activation is GELU (its backward's working set differs from SiLU's).
struct Shape {
    gelu: bool, c: f64, l: f64, h: f64, k: f64, f: f64, v: f64, pos: f64, kept: f64, head: String,
    prefix: Vec<(u128, bool)>, layer: Vec<(u128, bool)>, suffix: Vec<(u128, bool)>, layers: u128,
    linears: Vec<(String, f64, f64)>, file_bytes: f64,
}

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
        let u = |x: usize| x as u128;
        let mut pre = vec![(u(v) * u(c), false)];
        if gpt2 {
            pre.push((u(pos) * u(c), false)); // learned positions
        }
        let mut layer: Vec<(u128, bool)> = norms.iter().map(|&n| (u(n), false)).collect();
        for (_, a, b, bias) in &lin {
            layer.push((u(*a) * u(*b), true));
            if *bias {
                layer.push((u(*b), false));
            }
        }
        let final_norms = if gpt2 || matches!(arch, Arch::GptNeox(_)) { 2 } else { 1 }; // weight (+ bias)
        let mut suffix: Vec<(u128, bool)> = std::iter::repeat_n((u(c), false), final_norms).collect();
        if !tied {
            suffix.push((u(v) * u(c), false));
        }
        let linears = lin.iter().map(|(n, a, b, _)| (n.clone(), *a as f64, *b as f64)).collect();
        let f64_ = |x: usize| x as f64;
        Shape {
            gelu, c: f64_(c), l: f64_(l), h: f64_(h), k: f64_(k), f: f64_(f), v: f64_(v), pos: f64_(pos), kept, head: arch.lm_head_name().into(),
            prefix: pre, layer, suffix, layers: u(l), linears, file_bytes,
        }
    }

    /// Every parameter of the base, exactly.
    fn params(&self) -> u128 {
        let sum = |t: &[(u128, bool)]| t.iter().map(|x| x.0).fold(0u128, u128::saturating_add);
        sum(&self.prefix).saturating_add(self.layers.saturating_mul(sum(&self.layer))).saturating_add(sum(&self.suffix))
    }
}

/// What a plan depends on, from the resolved config (and the data, when read).
struct Run<'a> { s: &'a Shape, cfg: &'a TrainConfig, lora: LoraConfig, stage: &'a str, gpu: bool, e: f64, dtype: String, nf4: bool, data: &'a data::Measured }

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
        // (bytes while the tensor is read, bytes kept after)
        let cost = |&(n, lin): &(u128, bool)| -> (f64, f64) {
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
            (during, keep)
        };
        // (peak above what was kept before, bytes kept) of a run of tensors.
        let run = |t: &[(u128, bool)]| t.iter().map(cost).fold((0.0f64, 0.0), |(peak, kept), (d, k)| (peak.max(kept + d), kept + k));
        let ((p0, k0), (p1, k1), (p2, k2)) = (run(&self.s.prefix), run(&self.s.layer), run(&self.s.suffix));
        // Every block is the same: the last one, on top of all the others, peaks highest.
        let layers = self.s.layers as f64;
        let peak = if layers > 0.0 { p0.max(k0 + (layers - 1.0) * k1 + p1) } else { p0 };
        let kept = k0 + layers * k1;
        let peak = peak.max(kept + p2);
        let kept = kept + k2;
        (peak, kept)
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
        // f32 on the CPU: attention's softmax backward runs in dP's buffer and the forward's in
        // the scores' (ops/fused_cpu.rs); elsewhere the composed ops' temporaries.
        let fused = self.fused_cpu();
        let attn = sc * if fused { 4.0 } else if e == 4.0 { 16.0 } else { 9.0 * e } + 8.0 * n * s.c * e;
        let softmax_fwd = if fused { 0.0 } else { 2.0 * sc * 4.0 };
        let head_lora = self.lora.targets(&s.head);
        let rows = if head_lora { p.labels } else { (self.cfg.train.loss_chunk as f64).min(p.labels) };
        // The fused head + loss (ops::lm_head_cross_entropy) does its backward work in the forward,
        // a chunk at a time, and keeps only the input gradient (labels × C); with a LoRA on the
        // head the (labels, V) logits go through the plain cross-entropy op instead.
        let (head_f, head_b) = if head_lora {
            (12.0 * rows * s.v, rows * s.v * if e == 4.0 { 16.0 } else { 24.0 + e })
        } else {
            (rows * s.v * if fused { 8.0 } else if e == 4.0 { 12.0 } else { 12.0 + e }, 0.0)
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
            let cands = [(softmax_fwd, "attention softmax (forward)"), (head_f.max(p.at_loss), "loss (forward)"), (head_b, "LM head (backward)"), (bwd, if act > attn { "MLP activation (backward)" } else { "attention (backward)" })];
            let (t, w) = cands.iter().fold((0.0, ""), |m, c| if c.0 > m.0 { *c } else { m });
            (kept + t, w)
        } else {
            let inputs = mask + (s.l + 1.0) * n * s.c * e;
            let cands = [(blk + softmax_fwd, "one block (forward)"), (tail + head_f.max(head_b).max(p.at_loss), "loss"), (n * s.c * e + blk + bwd, "one block recomputed + its backward")];
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
        let per_score = if self.fused_cpu() { 4.0 } else { 12.0 };
        4.0 * b * t * t + 10.0 * n * s.c * self.e + (per_score * b * s.h * t * t).max(2.0 * n * s.f * self.e)
    }

    /// Whether the one-pass kernels of `ops/fused_cpu.rs` run: f32 on the CPU (their temporaries
    /// are the GEMM outputs they work in).
    fn fused_cpu(&self) -> bool {
        self.e == 4.0 && !self.gpu && !crate::ops::generic_ops()
    }

    /// The LM head's no-grad log-probs of `labels` rows, `train.loss_chunk` rows at a time.
    fn head_infer(&self, labels: f64) -> f64 {
        (if self.fused_cpu() { 4.0 } else { 12.0 }) * (self.cfg.train.loss_chunk as f64).min(labels) * self.s.v
    }

    /// The peak phase's components (bytes; they sum to the peak), the phase, and the load peak.
    fn phases(&self) -> (Vec<(String, f64)>, &'static str, f64) {
        let (s, cfg, e) = (self.s, self.cfg, self.e);
        let (load_peak, base) = self.load();
        let runtime = if self.gpu { CUDA_CONTEXT } else { RUNTIME };
        let lp = self.lora_params();
        // The largest micro-batch: B rows of T tokens (the data's longest rows when it was read).
        let bs = cfg.train.batch_size;
        let b = self.data.rows().map_or(bs, |n| bs.min(n)) as f64;
        let t = self.data.longest().map_or(cfg.data.max_len.min(s.pos as usize), |l| l.min(cfg.data.max_len)) as f64;
        let mut common = vec![(if self.gpu { "CUDA context (typical)".to_string() } else { "runtime (binary, libraries, threads)".into() }, runtime)];
        common.push((format!("base weights ({})", if self.nf4 { format!("NF4 block linears, {} rest", self.dtype) } else { self.dtype.clone() }), base));
        let (adapters, pass, phase) = match self.stage {
            "ppo" => {
                let p = &cfg.ppo;
                let tp = self.data.longest().map_or(p.max_prompt_len, |l| l.min(p.max_prompt_len)) as f64;
                let (new, mb) = (p.max_new_tokens as f64, (p.minibatch_size as f64).min(b));
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
            "dpo" => {
                // One pair (chosen + rejected, 2 sequences) per forward/backward, the gradients
                // accumulated; the reference and eval passes have no graph.
                let pairs = self.data.pairs().map_or(bs, |n| bs.min(n)) as f64;
                let with_ref = crate::train::dpo_math::LossType::parse(&cfg.dpo.loss).map_or(true, |l| l.needs_reference());
                let labels = self.data.learned(1).map_or(2.0 * (t - 1.0), |l| l as f64);
                let (step, slack, what) = self.pass(&Pass { b: 2.0, t, labels, dropout: cfg.lora.lora_dropout > 0.0, active: 1.0, at_loss: 0.0 });
                // Training's reference pass goes one pair at a time (as the policy's); the eval
                // pass, when there is held-out data, `batch_size` pairs at a time.
                let eval = cfg.data.eval_fraction > 0.0 || !cfg.data.eval_path.is_empty();
                let per = if eval { pairs } else { 1.0 };
                let ref_labels = self.data.learned(if eval { bs } else { 1 }).map_or(2.0 * per * (t - 1.0), |l| l as f64);
                let reference = if with_ref || eval { self.infer(2.0 * per, t) + self.head_infer(ref_labels) } else { 0.0 };
                let stacked = with_ref && !cfg.dpo.sft_adapter.is_empty();
                let adapters = 16.0 * lp + if stacked { 4.0 * lp } else { 0.0 };
                if reference > step + slack {
                    let what = if eval { "no-grad eval pass of a batch of pairs" } else { "no-grad reference pass of a pair" };
                    (adapters, vec![(what.into(), reference)], "reference")
                } else {
                    (adapters, vec![(format!("one pair's forward/backward: activations + peak op ({what})"), step), ("allocator slack".into(), slack)], "train step")
                }
            }
            "grpo" => {
                let g = &cfg.grpo;
                let tp = self.data.longest().map_or(g.max_prompt_len, |l| l.min(g.max_prompt_len)) as f64;
                let (new, group) = (g.max_new_tokens as f64, g.group_size as f64);
                // Generation: every prompt group_size times in one batch, KV-cached, with the
                // sampler's logits per step; then reference and reward passes per group, no graph.
                let nb = b * group;
                let kv = |t: f64| nb * s.l * 2.0 * s.k * t * e;
                let gen = (kv(tp + new) + 2.0 * kv(tp + new) / s.l).max(kv(tp) + self.infer(nb, tp)) + 16.0 * nb * s.v;
                let scoring = self.infer(group, tp + new + 1.0) + self.head_infer(group * new);
                let roll = gen.max(scoring);
                let (step, slack, what) = self.pass(&Pass { b: group, t: tp + new, labels: group * new, dropout: false, active: 1.0, at_loss: 0.0 });
                let models = g.rewards.iter().filter(|r| r.kind == "model").count() as f64;
                let stacked = g.beta > 0.0 && !g.sft_adapter.is_empty();
                let adapters = 16.0 * lp + if stacked { 4.0 * lp } else { 0.0 } + models * (4.0 * lp + 4.0 * s.c);
                if roll > step + slack {
                    let what = if gen >= scoring { "KV cache of the groups + generation" } else { "no-grad reference / reward pass of a group" };
                    (adapters, vec![(what.into(), roll)], "rollout")
                } else {
                    (adapters, vec![(format!("one group's forward/backward: activations + peak op ({what})"), step), ("allocator slack".into(), slack)], "train step")
                }
            }
            stage => {
                let (rm, stacked) = (stage == "rm", !cfg.rm.sft_adapter.is_empty() && stage == "rm");
                // RM: every completion of the batch's prompts is a sequence; SFT: the learned tokens.
                let seqs = if rm { self.data.completions(bs).unwrap_or(2 * bs) as f64 } else { b };
                let labels = if rm { 0.0 } else { self.data.learned(bs).map_or(b * (t - 1.0), |l| l as f64) };
                let pass = Pass { b: seqs, t, labels, dropout: cfg.lora.lora_dropout > 0.0, active: if stacked { 2.0 } else { 1.0 }, at_loss: 0.0 };
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
        (chosen, phase, runtime + load_peak)
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

/// A model as the plan sees it: its config.json, read once.
struct Base { config: PathBuf, arch: Arch, shape: Shape }

impl Base {
    fn read(name: &str) -> Result<Self> {
        let config = crate::weights::ModelFiles::config_only(name)?;
        let text = std::fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
        let raw: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", config.display()))?;
        let arch = Arch::from_file(&config)?;
        let shape = Shape::new(&arch, &raw);
        Ok(Self { config, arch, shape })
    }
}

/// `cfg` with `--set` overrides applied (a suggestion, re-planned).
fn with_sets(cfg: &TrainConfig, sets: &[String]) -> Result<TrainConfig> {
    let mut table = toml::Table::try_from(cfg).context("plan: the config as TOML")?;
    crate::train::config::apply_sets(&mut table, sets)?;
    TrainConfig::from_table(table, "--set")
}

impl<'a> Run<'a> {
    fn new(base: &'a Base, cfg: &'a TrainConfig, stage: &'a str, data: &'a data::Measured) -> Result<Self> {
        let gpu = cfg.model.device != "cpu";
        let e = match cfg.model.dtype.as_str() {
            "f32" | "float32" => 4.0,
            "f16" | "float16" | "bf16" | "bfloat16" => 2.0,
            "auto" => if gpu { 2.0 } else { 4.0 },
            d => bail!("model.dtype = {d:?}: expected f32, f16, bf16 or auto"),
        };
        let nf4 = crate::quant::BaseQuant::parse(&cfg.model.quantize)? == crate::quant::BaseQuant::Nf4;
        let dtype = if e == 4.0 { "f32".into() } else if cfg.model.dtype == "auto" { "bf16".into() } else { cfg.model.dtype.clone() };
        let lora = crate::train::sft::lora_config(cfg, &base.arch);
        lora.check_values("lora.")?;
        if stage == "dpo" {
            crate::train::dpo_math::LossType::parse(&cfg.dpo.loss)?;
        }
        Ok(Run { s: &base.shape, cfg, lora, stage, gpu, e, dtype, nf4, data })
    }
}

/// The peak of generating `new` tokens after prompts of `prompt` tokens, `batch` at a time,
/// with the model of `cfg` (no adapters): the base, the KV cache and the prompt's pass.
pub fn generation_bytes(cfg: &TrainConfig, batch: usize, prompt: usize, new: usize) -> Result<f64> {
    let base = Base::read(&cfg.model.name)?;
    let data = data::Measured::default();
    let run = Run::new(&base, cfg, "sft", &data)?;
    let (s, (b, p, n)) = (&base.shape, (batch as f64, prompt as f64, new as f64));
    let (load_peak, kept) = run.load();
    let kv = b * s.l * 2.0 * s.k * (p + n) * run.e;
    Ok(if run.gpu { CUDA_CONTEXT } else { RUNTIME } + load_peak.max(kept + kv + run.infer(b, p)))
}

/// The plan of `stage` under `cfg`, without verdict or suggestions.
fn plan_config(base: &Base, cfg: &TrainConfig, stage: &str, data: &data::Measured) -> Result<Plan> {
    let run = Run::new(base, cfg, stage, data)?;
    let (dtype, params) = (run.dtype.clone(), base.shape.params());
    let (components, phase, load_peak) = run.phases();
    let peak: f64 = components.iter().map(|c| c.1).sum();
    // NaN (e.g. 0 · inf from an absurd size) is past the limit too.
    if peak.is_nan() || peak > MAX_BYTES {
        bail!(
            "{}: the {stage} run of this model ({params} parameters, micro-batches of {} sequences of up to {} tokens) needs {:.3e} bytes, \
             more than any machine holds (1 PiB): check the sizes in {} (hidden size, layers, heads, vocab_size, intermediate size) \
             and train.batch_size, data.max_len",
            cfg.model.name, cfg.train.batch_size, cfg.data.max_len, peak, base.config.display()
        )
    }
    let components: Vec<Component> = components.into_iter().map(|(name, b)| Component { name, bytes: b as u64 }).collect();
    let trainable = run.lora_params() as u64 * if stage == "ppo" && cfg.ppo.critic_adapter { 2 } else { 1 };
    let peak_bytes = components.iter().map(|c| c.bytes).sum();
    Ok(Plan {
        model: cfg.model.name.clone(), stage: stage.into(), device: cfg.model.device.clone(), dtype,
        params: params as u64, trainable_params: trainable, phase: phase.into(), components, peak_bytes, load_peak_bytes: load_peak as u64,
        budget_bytes: None, fits: None, suggestions: vec![], data: data.stats.clone(), assumptions: data.assumptions(stage, cfg),
    })
}

fn check_stage(stage: &str) -> Result<()> {
    anyhow::ensure!(matches!(stage, "sft" | "rm" | "ppo" | "dpo" | "grpo"), "--stage {stage}: expected sft, rm, ppo, dpo or grpo");
    Ok(())
}

/// The plan of `stage` under the resolved `cfg` (its data read when configured) with the
/// verdict against `budget` and, over it, the smallest changes that fit. `prefix` goes before
/// the suggestions' `--set` keys (`stages.rm.` for a pipeline's stage).
pub fn plan_stage(cfg: &TrainConfig, stage: &str, budget: Option<u64>, prefix: &str) -> Result<Plan> {
    check_stage(stage)?;
    let base = Base::read(&cfg.model.name)?;
    let data = data::Measured::read(cfg, stage, &base.config)?;
    let mut p = plan_config(&base, cfg, stage, &data)?;
    if let Some(budget) = budget {
        (p.budget_bytes, p.fits) = (Some(budget), Some(p.peak_bytes <= budget));
        if p.peak_bytes > budget {
            p.suggestions = suggest::smallest_changes(&base, cfg, &data, &p, budget, prefix)?;
        }
    }
    Ok(p)
}

/// `lorafit plan`.
pub fn run(a: PlanArgs) -> Result<()> {
    let budget = a.budget.as_deref().map(parse_bytes).transpose()?;
    if let Some(s) = &a.stage {
        check_stage(s)?;
    }
    let flags = [("model.name", &a.model), ("model.device", &a.device), ("model.dtype", &a.dtype), ("model.quantize", &a.quantize)];
    let quote = |v: &str| toml::Value::String(v.to_string()).to_string();
    let table = match &a.config {
        Some(p) => Some(crate::train::config::read_table(Some(p))?),
        None => None,
    };
    let pipeline = table.as_ref().is_some_and(|t| t.contains_key("stages"));
    // The stages of a pipeline: sft -> dpo, sft -> grpo, or sft -> rm -> ppo.
    let stages_of = |k: &str| table.as_ref().and_then(|t| t.get("stages")).and_then(|s| s.get(k)).is_some();
    let names: &[&str] = if stages_of("dpo") { &["sft", "dpo"] } else if stages_of("grpo") { &["sft", "grpo"] } else { &["sft", "rm", "ppo"] };
    // A single config with a [dpo] or [grpo] table is planned as that method unless --stage says.
    let has = |k: &str| table.as_ref().is_some_and(|t| t.contains_key(k));
    let single = if has("dpo") { "dpo" } else if has("grpo") { "grpo" } else { "sft" };
    let plans = if pipeline {
        let file = a.config.as_deref().expect("a pipeline has a config");
        // The flags win over the stages' own tables, as in `lorafit pipeline`.
        let mut sets = a.set.clone();
        for (key, v) in flags {
            if let Some(v) = v {
                sets.extend(names.iter().map(|s| format!("stages.{s}.{key}={}", quote(v))));
            }
        }
        if let Some(d) = &a.data {
            let stage = a.stage.as_deref().context("--data with a pipeline config: say which stage reads it with --stage (or --set stages.<stage>.data.path=...)")?;
            sets.push(format!("stages.{stage}.data.path={}", quote(d)));
        }
        let cfgs: Vec<TrainConfig> = match names[1] {
            "dpo" => crate::train::pipeline::resolve_sft_dpo(file, &sets)?.context("a pipeline with [stages.dpo]")?.1.into(),
            "grpo" => {
                let (_, sft, grpo) = crate::train::pipeline::grpo_stages(file, &sets)?.context("a pipeline with [stages.grpo]")?;
                vec![sft, grpo]
            }
            _ => crate::train::pipeline::stage_configs(file, &sets)?.into(),
        };
        if let Some(s) = &a.stage {
            anyhow::ensure!(names.contains(&s.as_str()), "--stage {s}: {} has the stages {}", file.display(), names.join(", "));
        }
        let mut plans = vec![];
        for (&stage, cfg) in names.iter().zip(&cfgs) {
            if a.stage.as_deref().is_none_or(|s| s == stage) {
                plans.push(plan_stage(cfg, stage, budget, &format!("stages.{stage}.")).with_context(|| format!("{}: stage {stage}", file.display()))?);
            }
        }
        plans
    } else {
        let mut sets = a.set.clone();
        for (key, v) in flags.into_iter().chain([("data.path", &a.data)]) {
            if let Some(v) = v {
                sets.push(format!("{key}={}", quote(v)));
            }
        }
        let cfg = TrainConfig::load(a.config.as_deref(), &sets)?;
        let stage = a.stage.as_deref().unwrap_or(single);
        vec![plan_stage(&cfg, stage, budget, "")?]
    };
    if a.json {
        let out = if pipeline {
            let fits = budget.map(|_| plans.iter().all(|p| p.fits == Some(true)));
            serde_json::json!({"config": a.config, "stages": plans, "fits": fits})
        } else {
            serde_json::to_value(&plans[0])?
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (i, p) in plans.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_plan(p);
    }
    Ok(())
}

fn print_plan(p: &Plan) {
    println!("{} ({} parameters), stage {}, {} {}, peak in the {} phase:\n", p.model, p.params, p.stage, p.device, p.dtype, p.phase);
    for c in &p.components {
        println!("  {:<62} {:>12}", c.name, fmt_bytes(c.bytes));
    }
    println!("  {:<62} {:>12}", "predicted peak", fmt_bytes(p.peak_bytes));
    println!("  ({} trainable parameters; loading alone peaks at {})", p.trainable_params, fmt_bytes(p.load_peak_bytes));
    if let Some(d) = &p.data {
        println!("  data {}: {}", d.path, d.describe());
    }
    for a in &p.assumptions {
        println!("  assumed: {a}");
    }
    if let (Some(b), Some(fits)) = (p.budget_bytes, p.fits) {
        println!("\nbudget {}: {}", fmt_bytes(b), if fits { "fits" } else { "does NOT fit" });
        if !fits && p.suggestions.is_empty() {
            println!("no combination of checkpointing, a 16-bit base, a smaller micro-batch and NF4 fits this budget");
        }
        if !p.suggestions.is_empty() {
            println!("the smallest changes that fit, least costly first:");
        }
        for s in &p.suggestions {
            println!("  {}: peak {}   [--set {}]", s.change, fmt_bytes(s.peak_bytes), s.sets.join(" --set "));
        }
    }
}
