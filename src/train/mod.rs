//! Training. Each method (`sft.rs`, `rm.rs`, `ppo.rs`) is one readable file: its data, its
//! model and trainables, and what one step does ([`session::Method`]). What every method
//! shares is here and beside it:
//! - [`session`]: the run around the method: output folder (lock, marker, --force/--resume),
//!   config and metrics files, the data cursor, checkpoints and resume, the f16 loss scaler,
//!   the non-finite guard, the export, the plot and the summary;
//! - [`batch`]: tokenized examples with their learned spans, micro-batches, the label NLL, the
//!   eval split, the LoRA config of a new adapter;
//! - this file: the setup of the model and tokenizer, gradient accumulation, and the
//!   forward/backward of one micro-batch (with optional activation checkpointing);
//! - [`trainer`]: what a method's step updates through (AdamW, schedule, clipping, the f16
//!   loss scaler, the non-finite guard, accumulation of micro-batches);
//! - `optim.rs` (AdamW, schedule, clipping, loss scaler), `checkpoint.rs`, `plot.rs`, and
//!   PPO's `roles.rs` and `ppo_math.rs`; GRPO's `grpo_math.rs` and `grpo_rewards.rs`; `prompts.rs`
//!   (prompts for the methods that generate, through the renderer).
pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod grpo;
pub mod grpo_math;
pub mod grpo_rewards;
pub mod dpo;
pub mod dpo_math;
pub mod optim;
pub mod pairs;
pub mod pipeline;
pub mod plot;
pub mod ppo;
pub mod ppo_math;
pub mod prompts;
pub mod rm;
pub mod roles;
pub mod session;
pub mod sft;
pub mod trainer;

pub use batch::held_out;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::model::Model;

/// What every stage resolves from `[model]` and `[data]` before it reads any data.
pub struct Setup {
    pub template: crate::template::Template,
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
    pub files: crate::weights::ModelFiles,
    pub arch: crate::model::Arch,
    pub tok: crate::tokenizer::Tokenizer,
    quant: crate::quant::BaseQuant,
}

impl Setup {
    pub fn new(cfg: &config::TrainConfig) -> Result<Self> {
        let template = crate::template::Template::or_default(&cfg.data.template)?;
        let device = crate::runtime::parse_device(&cfg.model.device)?;
        let dtype = crate::runtime::parse_dtype(&cfg.model.dtype, &device)?;
        let quant = cfg.model.base_quant()?;
        let files = crate::weights::ModelFiles::resolve(&cfg.model.name)?;
        let arch = crate::model::Arch::from_file(&files.config)?;
        let tok = crate::tokenizer::Tokenizer::load(&files.tokenizer, &files.config)?;
        Ok(Self { template, device, dtype, files, arch, tok, quant })
    }

    /// The base, loaded once, with `adapters` attached.
    pub fn load_model(&self, adapters: Vec<std::sync::Arc<crate::lora::Adapter>>) -> Result<Model> {
        Model::load(&self.files, self.dtype, &self.device, crate::lora::AdapterSet::new(adapters).with_base_quant(self.quant))
    }
}

/// Gradients of the trainable tensors, summed over the micro-batches of one optimizer step.
pub struct GradAccum {
    grads: Vec<Option<Tensor>>,
}

impl GradAccum {
    pub fn new(n: usize) -> Self {
        Self { grads: vec![None; n] }
    }

    /// Adds the gradients of `vars` found in `store` (only those: nothing else is kept).
    pub fn add(&mut self, store: &GradStore, vars: &[(String, Var)]) -> Result<()> {
        for (i, (_, v)) in vars.iter().enumerate() {
            if let Some(g) = store.get(v.as_tensor()) {
                self.grads[i] = Some(match self.grads[i].take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// The summed gradients, zeros for tensors that got none.
    pub fn finish(self, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
        self.grads
            .into_iter()
            .zip(vars)
            .map(|(g, (_, v))| Ok(match g {
                Some(g) => g,
                None => v.zeros_like()?,
            }))
            .collect()
    }
}

/// Forward and backward of one micro-batch. `loss_fn` maps the final hidden states (B, T, C)
/// to the scalar loss of this micro-batch (already divided by the step's normaliser).
/// Returns the loss value; gradients of `vars` are added to `acc`.
///
/// With `checkpointing` (REFERENCE §3): run every block without keeping its graph, saving only
/// its input; backprop the head from the last block's output; then, block by block in reverse,
/// recompute the block from a fresh Var of its input and backprop `sum(out · g_out)`. Each
/// block's LoRA dropout stream is rewound so the recomputation draws the same masks.
pub fn forward_backward(
    model: &Model,
    ids: &Tensor,
    pos: &Tensor,
    mask: Tensor,
    checkpointing: bool,
    loss_fn: &dyn Fn(&Tensor) -> Result<Tensor>,
    vars: &[(String, Var)],
    acc: &mut GradAccum,
) -> Result<f64> {
    let (x0, ctx) = model.embed(ids, pos, mask)?;
    if !checkpointing {
        let mut x = x0;
        for i in 0..model.num_layers() {
            x = model.block(i, &x, &ctx, None)?;
        }
        let loss = loss_fn(&model.final_norm(&x)?)?;
        crate::prof::phase(crate::prof::Phase::Backward); // `bench sft --profile`; nothing when off
        acc.add(&loss.backward()?, vars)?;
        return Ok(loss.to_scalar::<f32>()? as f64);
    }
    let adapters = &model.adapters.adapters;
    let mut inputs = vec![x0.detach()];
    let mut rng_at = vec![];
    for i in 0..model.num_layers() {
        rng_at.push(adapters.iter().map(|a| a.dropout_rng()).collect::<Vec<_>>());
        let y = model.block(i, inputs.last().unwrap(), &ctx, None)?.detach();
        inputs.push(y);
    }
    let rng_end: Vec<_> = adapters.iter().map(|a| a.dropout_rng()).collect();
    let last = Var::from_tensor(inputs.last().unwrap())?;
    let loss = loss_fn(&model.final_norm(last.as_tensor())?)?;
    crate::prof::phase(crate::prof::Phase::Backward); // the recomputed blocks count as backward
    let store = loss.backward()?;
    acc.add(&store, vars)?;
    let mut g = store.get(last.as_tensor()).context("no gradient reached the last block's output")?.clone();
    drop(store);
    for i in (0..model.num_layers()).rev() {
        for (a, r) in adapters.iter().zip(&rng_at[i]) {
            a.set_dropout_rng(r.clone());
        }
        let x = Var::from_tensor(&inputs[i])?;
        let y = model.block(i, x.as_tensor(), &ctx, None)?;
        let store = (y * &g)?.sum_all()?.backward()?;
        acc.add(&store, vars)?;
        if i > 0 {
            g = store.get(x.as_tensor()).context("no gradient reached a block's input")?.clone();
        }
    }
    for (a, r) in adapters.iter().zip(rng_end) {
        a.set_dropout_rng(r);
    }
    Ok(loss.to_scalar::<f32>()? as f64)
}

/// How a run treats its output folder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Start {
    /// A new run; refuse an output folder that already holds one.
    Fresh,
    /// A new run that replaces the run files already in the output folder.
    Force,
    /// Continue from the newest checkpoint in the output folder.
    Resume,
}

/// Micro-batches (indices into the examples) of one epoch, a function of (seed, epoch) only.
/// With `group_by_length`, shuffled examples are sorted by length within windows of 16
/// batches, cut into batches, and the batches shuffled: little padding, random order.
pub fn epoch_batches(lens: &[usize], batch_size: usize, seed: u64, epoch: usize, group_by_length: bool) -> Vec<Vec<usize>> {
    let mut rng = crate::rng::SeededRng::derive(seed, &format!("data-epoch-{epoch}"));
    let mut shuffle = |v: &mut Vec<usize>| {
        for i in (1..v.len()).rev() {
            let j = (rng.uniform_f32() as f64 * (i + 1) as f64) as usize % (i + 1);
            v.swap(i, j);
        }
    };
    let mut order: Vec<usize> = (0..lens.len()).collect();
    shuffle(&mut order);
    if !group_by_length {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = vec![];
    for window in order.chunks(batch_size * 16) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    let mut idx: Vec<usize> = (0..batches.len()).collect();
    shuffle(&mut idx);
    idx.into_iter().map(|i| batches[i].clone()).collect()
}
