//! Preference pairs for the methods that learn from them (`dpo`, and any later pairwise
//! method): rows read as [`Example::Ranked`] (TRL's `{prompt, chosen, rejected}`, plain or
//! conversational, or KoChatGPT's K-way rankings expanded to their C(K,2) better-worse pairs,
//! ties giving none, exactly as `rm` reads them), each completion rendered with its prompt
//! through `render::Renderer` (prompt and completion tokenized separately, end token
//! appended; the completion learned), and the summed log-prob of each sequence's learned
//! tokens.
//!
//! Bad input: a pair whose chosen equals its rejected is skipped and counted; a row longer than
//! `max_len` is cut on its prompt side as `rm` cuts it (counted; a prompt longer than `max_len`
//! too), keeping the answers whole when they fit; a ranking of ties only
//! and malformed rows are errors naming the file, row and field (or counted with
//! `skip_bad_rows`).
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::batch::{split_held_out, Batch, SftExample};
use super::config::DataSection;
use crate::data::{open_records, parse_example, Example, Record, Stage};
use crate::model::Model;
use crate::render::Renderer;

/// One preference pair: the two sequences (prompt + completion + eos; the completion learned).
#[derive(Clone, Debug)]
pub struct Pair {
    /// The data row it came from (0-based; the pairs of one ranking share it).
    pub row: usize,
    pub chosen: SftExample,
    pub rejected: SftExample,
}

impl Pair {
    /// Length of the longer sequence (the cursor batches pairs of similar length).
    pub fn len(&self) -> usize {
        self.chosen.ids.len().max(self.rejected.ids.len())
    }
}

/// What happened to the rows on the way to pairs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PairStats {
    pub rows: usize,
    pub pairs: usize,
    /// Pairs whose chosen equals their rejected (skipped).
    pub identical: usize,
    /// Pairs with a prompt longer than `max_len` tokens (kept, cut from the left).
    pub prompt_too_long: usize,
    /// Pairs with a sequence cut to `max_len`.
    pub truncated: usize,
    /// Pairs that `max_len` cut to no completion token or to no difference (skipped).
    pub dropped: usize,
    /// Rows too long for `max_len` whose sequences were cut on the prompt side (earlier
    /// exchanges, then prompt tokens from the left) to keep the answers whole.
    #[serde(default)]
    pub prompt_cut: usize,
    pub skipped_bad: usize,
}

/// Whether a raw row's `chosen` and `rejected` are the same value (a pair that teaches nothing).
fn identical_pair(v: &Value) -> bool {
    matches!((v.get("chosen"), v.get("rejected")), (Some(a), Some(b)) if a == b)
}

/// Reads and renders the pairs of a data file ([`Renderer::encode_pair`]: a row too long for
/// `max_len` loses its prompt side first, each completion and its end token kept whole when
/// they fit).
pub fn read_pairs(path: &Path, r: &Renderer, skip_bad_rows: bool) -> Result<(Vec<Pair>, PairStats)> {
    let mut stats = PairStats::default();
    let mut out = vec![];
    let mut identical_at: Vec<String> = vec![];
    for rec in open_records(path)? {
        let (loc, v) = match rec? {
            Record::Value(loc, v) => (loc, v),
            Record::Bad(_, e) if skip_bad_rows => {
                tracing::warn!("skipping bad row: {e:#}");
                stats.skipped_bad += 1;
                continue;
            }
            Record::Bad(_, e) => return Err(e),
        };
        if v.is_object() && identical_pair(&v) {
            stats.rows += 1;
            stats.identical += 1;
            identical_at.push(loc.to_string());
            continue;
        }
        let ex = match parse_example(&v, &loc, Stage::Preference) {
            Ok(ex) => ex,
            Err(e) if skip_bad_rows => {
                tracing::warn!("skipping bad row: {e:#}");
                stats.skipped_bad += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        stats.rows += 1;
        let Example::Ranked { prompt, pairs, .. } = &ex else { anyhow::bail!("{path:?}: row {}: not a ranked/pair row", stats.rows) };
        let enc = r.encode_pair(&ex).with_context(|| format!("{loc}"))?;
        let too_long = enc.iter().any(|e| e.truncated()) && r.encode_prompt(prompt)?.ids.len() > r.cfg.max_len;
        stats.prompt_cut += usize::from(enc.iter().any(|e| e.truncated()));
        for &(c, j) in pairs {
            let (ec, ej) = (&enc[c], &enc[j]);
            let cut = ec.truncated() || ej.truncated();
            if ec.ids == ej.ids && !cut {
                stats.identical += 1;
                identical_at.push(format!("{loc} (completions {c} and {j} tokenize the same)"));
                continue;
            }
            if ec.ids == ej.ids || ec.learned() == 0 || ej.learned() == 0 {
                // Cut by max_len down to no difference, or to no completion token.
                stats.dropped += 1;
                continue;
            }
            stats.truncated += usize::from(ec.truncated() || ej.truncated());
            stats.prompt_too_long += usize::from(too_long);
            let ex = |e: &crate::render::Encoded| SftExample { ids: e.ids.clone(), learned: e.learned_spans() };
            out.push(Pair { row: stats.rows - 1, chosen: ex(ec), rejected: ex(ej) });
        }
    }
    if stats.identical > 0 {
        let shown: Vec<&str> = identical_at.iter().take(3).map(String::as_str).collect();
        tracing::warn!("{} pairs with chosen == rejected skipped: {}{}", stats.identical, shown.join("; "), if identical_at.len() > 3 { "; ..." } else { "" });
    }
    if stats.dropped > 0 {
        tracing::warn!("{}: {} pairs skipped: data.max_len = {} cuts them to no completion token or to no difference", path.display(), stats.dropped, r.cfg.max_len);
    }
    if stats.prompt_cut > 0 {
        tracing::info!("{}: {} rows longer than data.max_len = {} were cut on the prompt side (earlier exchanges, then prompt tokens from the left) to keep their answers", path.display(), stats.prompt_cut, r.cfg.max_len);
    }
    if stats.prompt_too_long > 0 {
        tracing::warn!("{}: {} pairs have a prompt longer than data.max_len = {} tokens (cut from the left)", path.display(), stats.prompt_too_long, r.cfg.max_len);
    }
    stats.pairs = out.len();
    if out.is_empty() {
        anyhow::bail!("{}: no usable preference pairs ({} rows, {} identical, {} without a learned token, {} bad rows skipped)", path.display(), stats.rows, stats.identical, stats.dropped, stats.skipped_bad)
    }
    Ok((out, stats))
}

/// The pairs of `data.path` for training and of `data.eval_path` (or `data.eval_fraction` of
/// the rows, held out by row so the pairs of one ranking stay on one side) for evaluation.
pub fn load_pairs(data: &DataSection, seed: u64, r: &Renderer) -> Result<(Vec<Pair>, Vec<Pair>, PairStats)> {
    let (all, stats) = read_pairs(Path::new(&data.path), r, data.skip_bad_rows)?;
    let (train, eval) = if !data.eval_path.is_empty() {
        (all, read_pairs(Path::new(&data.eval_path), r, data.skip_bad_rows)?.0)
    } else {
        let mut rows: Vec<Vec<Pair>> = vec![];
        for p in all {
            match rows.last_mut() {
                Some(g) if g[0].row == p.row => g.push(p),
                _ => rows.push(vec![p]),
            }
        }
        let (t, e) = split_held_out(rows, data.eval_fraction, seed);
        (t.into_iter().flatten().collect(), e.into_iter().flatten().collect())
    };
    if train.is_empty() {
        anyhow::bail!("{}: no training pairs left after the eval split", data.path)
    }
    Ok((train, eval, stats))
}

/// The (S, N) 0/1 matrix that sums a batch's N per-token values into its S sequences
/// (`make_batch` selects targets row by row, in order).
pub fn sequence_sums(exs: &[&SftExample], dev: &Device) -> Result<Tensor> {
    let n: usize = exs.iter().map(|e| e.n_targets()).sum();
    let mut m = vec![0f32; exs.len() * n];
    let mut k = 0;
    for (s, e) in exs.iter().enumerate() {
        for _ in 0..e.n_targets() {
            m[s * n + k] = 1.0;
            k += 1;
        }
    }
    Ok(Tensor::from_vec(m, (exs.len(), n), dev)?)
}

/// Summed log-probs (S,) f32 of each sequence's learned tokens, from final hidden states
/// h (B, T, C) of `batch`; `sums` from [`sequence_sums`].
pub fn sequence_logps(model: &Model, h: &Tensor, batch: &Batch, sums: &Tensor, chunk: usize) -> Result<Tensor> {
    let (b, t, c) = h.dims3()?;
    let hs = h.reshape((b * t, c))?.index_select(&batch.select, 0)?; // (N, C)
    let logp = model.token_nll(&hs, &batch.targets, chunk, 1.0)?.neg()?; // (N,)
    Ok(sums.matmul(&logp.unsqueeze(1)?)?.squeeze(1)?) // (S,)
}
