//! The pieces of supervised batching that every method shares: a tokenized example with the
//! positions it learns, right-padded micro-batches that select exactly those positions, the
//! summed NLL of the learned tokens, the held-out split and the eval loss, and the LoRA config
//! of a new adapter from `[lora]`.
//!
//! A learned token at position `j` is predicted by the hidden state at `j - 1`, so position 0
//! is never learned (it has no prefix). An example's learned positions are a list of spans:
//! one span after the prompt for prompt/completion rows (SFT, PPO's responses), several for a
//! multi-turn conversation that learns its assistant turns only.
use std::collections::HashSet;
use std::ops::Range;

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::config::TrainConfig;
use crate::lora::{LoraConfig, TargetModules};
use crate::model::{causal_mask, Arch, Model};

/// One tokenized sequence and the spans of its positions that carry a loss.
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    /// Half-open, ordered, non-overlapping ranges of positions in `ids` that are learned.
    pub learned: Vec<Range<usize>>,
}

impl SftExample {
    /// A prompt/completion example: `ids[..prompt_len]` is the prompt, the rest is learned.
    pub fn completion(ids: Vec<u32>, prompt_len: usize) -> Self {
        let learned = vec![prompt_len.min(ids.len())..ids.len()];
        Self { ids, learned }
    }

    /// The first learned position (the prompt's length for a prompt/completion example).
    pub fn prompt_len(&self) -> usize {
        self.learned.first().map_or(self.ids.len(), |r| r.start)
    }

    /// The positions that predict a token: every learned position but 0, in order.
    pub fn targets(&self) -> impl Iterator<Item = usize> + '_ {
        self.learned.iter().flat_map(|r| r.start.max(1)..r.end.min(self.ids.len()))
    }

    /// How many tokens this example learns.
    pub fn n_targets(&self) -> usize {
        self.learned.iter().map(|r| r.end.min(self.ids.len()).saturating_sub(r.start.max(1))).sum()
    }
}

/// A right-padded micro-batch and where its labels are.
pub struct Batch {
    /// (B, T) u32 ids and positions; (B, 1, T, T) additive mask.
    pub ids: Tensor,
    pub pos: Tensor,
    pub mask: Tensor,
    /// (N,) flat indices b*T + t of the positions that predict a learned token, and those tokens.
    pub select: Tensor,
    pub targets: Tensor,
    /// Non-pad tokens in the batch.
    pub tokens: usize,
}

pub fn make_batch(exs: &[&SftExample], pad: u32, dev: &Device) -> Result<Batch> {
    let (b, t) = (exs.len(), exs.iter().map(|e| e.ids.len()).max().unwrap_or(1));
    let (mut ids, mut valid, mut select, mut targets) = (Vec::with_capacity(b * t), vec![], vec![], vec![]);
    for (r, e) in exs.iter().enumerate() {
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(pad, t - e.ids.len())));
        valid.push((0..t).map(|j| j < e.ids.len()).collect::<Vec<_>>());
        for j in e.targets() {
            select.push((r * t + j - 1) as u32);
            targets.push(e.ids[j]);
        }
    }
    let pos = Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?.repeat((b, 1))?;
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), dev)?,
        pos,
        mask: causal_mask(&valid, t, 0, dev)?,
        select: Tensor::new(select.as_slice(), dev)?,
        targets: Tensor::new(targets.as_slice(), dev)?,
        tokens: exs.iter().map(|e| e.ids.len()).sum(),
    })
}

/// Sum of the NLL of the batch's learned tokens, from final hidden states h (B, T, C).
pub fn label_nll_sum(model: &Model, h: &Tensor, batch: &Batch, chunk: usize) -> Result<Tensor> {
    let (b, t, c) = h.dims3()?;
    let h = h.reshape((b * t, c))?.index_select(&batch.select, 0)?; // (N, C)
    Ok(model.token_nll(&h, &batch.targets, chunk, 1.0)?.sum_all()?)
}

/// Mean NLL over the learned tokens of `exs` (no update), and the token count.
pub fn eval_loss(model: &Model, exs: &[SftExample], batch_size: usize, pad: u32, chunk: usize) -> Result<(f64, usize)> {
    let (mut sum, mut n) = (0.0, 0);
    for group in exs.chunks(batch_size) {
        let refs: Vec<&SftExample> = group.iter().collect();
        let batch = make_batch(&refs, pad, &model.device)?;
        let h = model.hidden(&batch.ids, &batch.pos, &batch.mask, None)?;
        sum += label_nll_sum(model, &h, &batch, chunk)?.detach().to_scalar::<f32>()? as f64;
        n += batch.targets.dim(0)?;
    }
    Ok((sum / n.max(1) as f64, n))
}

/// Runs `f` in eval mode: LoRA dropout off and no graph kept; training mode again after.
pub fn evaluating<T>(model: &Model, f: impl FnOnce() -> Result<T>) -> Result<T> {
    model.adapters.set_training(false);
    let out = {
        let _no_grad = model.adapters.no_grad();
        f()
    };
    model.adapters.set_training(true);
    out
}

/// Prompts (text or messages) through `r`, each at most `max_len` tokens, cut as the methods
/// that generate cut them (`prompts.rs`): for `lorafit plan`'s lengths. Returns the ids and how
/// many were cut.
pub fn tokenize_prompt_examples<'e>(prompts: impl Iterator<Item = &'e crate::data::Prompt>, r: &crate::render::Renderer, max_len: usize) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut cut = 0;
    let mut out = vec![];
    for p in prompts {
        let e = r.encode_prompt_fit(p, max_len)?;
        cut += usize::from(e.truncated());
        out.push(e.ids);
    }
    Ok((out, cut))
}

/// Indices of the `fraction` of `n` items held out for evaluation (seeded).
pub fn held_out(n: usize, fraction: f64, seed: u64) -> HashSet<usize> {
    let k = ((n as f64) * fraction).round() as usize;
    let order = super::epoch_batches(&vec![0; n], 1, seed, usize::MAX, false);
    order.iter().take(k).map(|b| b[0]).collect()
}

/// `items` split into (train, eval) by [`held_out`], each in its original order.
pub fn split_held_out<T>(items: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let held = held_out(items.len(), fraction, seed);
    let (mut train, mut eval) = (vec![], vec![]);
    for (i, e) in items.into_iter().enumerate() {
        if held.contains(&i) {
            eval.push(e)
        } else {
            train.push(e)
        }
    }
    (train, eval)
}

/// The LoRA config of a new adapter from the `[lora]` section (PEFT's default targets if none).
pub fn lora_config(cfg: &TrainConfig, arch: &Arch) -> LoraConfig {
    let l = &cfg.lora;
    let targets = if l.target_modules.is_empty() { arch.default_lora_targets() } else { l.target_modules.clone() };
    LoraConfig {
        r: l.r,
        lora_alpha: l.lora_alpha,
        lora_dropout: l.lora_dropout,
        // PEFT's keyword: one string, expanded to every linear of the blocks.
        target_modules: if targets.len() == 1 && targets[0].eq_ignore_ascii_case("all-linear") {
            TargetModules::Regex("all-linear".into())
        } else {
            TargetModules::List(targets)
        },
        use_rslora: l.use_rslora,
        base_model_name_or_path: Some(cfg.model.name.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_select_exactly_the_learned_positions() {
        let e = SftExample::completion(vec![5, 6, 7, 8], 2);
        assert_eq!(e.targets().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!((e.prompt_len(), e.n_targets()), (2, 2));
        // An empty prompt: position 0 has no prefix and is not a target.
        let e = SftExample::completion(vec![5, 6, 7], 0);
        assert_eq!(e.targets().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(e.n_targets(), 2);
        // Two assistant turns of a conversation.
        let e = SftExample { ids: (0..10).collect(), learned: vec![2..4, 7..10] };
        assert_eq!(e.targets().collect::<Vec<_>>(), vec![2, 3, 7, 8, 9]);
        let b = make_batch(&[&e], 0, &Device::Cpu).unwrap();
        assert_eq!(b.select.to_vec1::<u32>().unwrap(), vec![1, 2, 6, 7, 8]);
        assert_eq!(b.targets.to_vec1::<u32>().unwrap(), vec![2, 3, 7, 8, 9]);
    }
}
