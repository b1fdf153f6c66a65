//! `lorafit eval`: mean next-token negative log-likelihood per line of a text file.
//!
//! Each line is tokenized with the tokenizer's own rules (nothing added); its NLL is the mean
//! of `-log p(x_t | x_<t)` over t = 1..n-1, and the file's perplexity is
//! `exp(Σ_lines Σ_t nll / Σ_lines (n - 1))`. Lines with fewer than 2 tokens have no NLL.
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::model::Model;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Serialize)]
pub struct LineNll {
    /// 1-based line number in the file.
    pub line: usize,
    pub tokens: usize,
    /// Mean NLL over the line's `tokens - 1` predictions; None below 2 tokens.
    pub nll: Option<f64>,
}

/// Reads a UTF-8 text file into lines, with errors that name the file and the line.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()).collect()),
        Err(e) => {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            crate::bail_kind!(crate::error::Kind::NotUtf8, "{}: line {line} is not valid UTF-8 (byte {})", path.display(), e.valid_up_to())
        }
    }
}

/// NLL of every line; no graph is kept.
pub fn eval_lines(model: &Model, tok: &Tokenizer, lines: &[String], source: &str) -> Result<Vec<LineNll>> {
    let ctx = model.arch.max_positions();
    let mut out = Vec::with_capacity(lines.len());
    for (i, text) in lines.iter().enumerate() {
        let ids = tok.encode(text)?;
        if ids.len() > ctx {
            crate::bail_kind!(crate::error::Kind::EvalContextOverflow, "{source}: line {} has {} tokens, more than the model's context of {ctx}", i + 1, ids.len())
        }
        let nll = if ids.len() >= 2 {
            let loss = model.sequence_nll(&ids)?.detach();
            Some(loss.to_scalar::<f32>()? as f64)
        } else {
            None
        };
        out.push(LineNll { line: i + 1, tokens: ids.len(), nll });
    }
    Ok(out)
}

/// `exp` of the token-weighted mean NLL over the lines that have one.
pub fn perplexity(lines: &[LineNll]) -> Option<f64> {
    let (sum, n) = lines
        .iter()
        .filter_map(|l| l.nll.map(|nll| (nll * (l.tokens - 1) as f64, l.tokens - 1)))
        .fold((0.0, 0usize), |(s, n), (a, b)| (s + a, n + b));
    (n > 0).then(|| (sum / n as f64).exp())
}

/// The NLL of one data row over its learned tokens (a conversation's assistant turns, a
/// completion and its eos), as `lorafit render` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct RowNll {
    /// 1-based row (JSON array, Parquet) or line (JSON Lines) of the file.
    pub row: usize,
    /// Learned tokens scored.
    pub tokens: usize,
    /// Mean `-log p(token | prefix)` over them; None when the row has none.
    pub nll: Option<f64>,
}

/// Mean NLL of the tokens `ids[j]` with `learn[j]` (j >= 1), each predicted from its prefix.
pub fn masked_nll(model: &Model, ids: &[u32], learn: &[bool]) -> Result<Option<f64>> {
    let picks: Vec<u32> = (1..ids.len()).filter(|&j| learn[j]).map(|j| j as u32 - 1).collect();
    if picks.is_empty() {
        return Ok(None);
    }
    let dev = &model.device;
    let _no_grad = model.adapters.no_grad();
    let t = ids.len();
    let x = candle_core::Tensor::new(ids, dev)?.unsqueeze(0)?; // (1, T)
    let pos = candle_core::Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?;
    let mask = crate::model::causal_mask(&[vec![true; t]], t, 0, dev)?;
    let h = model.hidden(&x, &pos, &mask, None)?.squeeze(0)?; // (T, C)
    let h = h.index_select(&candle_core::Tensor::new(picks.as_slice(), dev)?, 0)?; // (N, C)
    let logits = model.lm_head(&h)?.to_dtype(candle_core::DType::F32)?; // (N, V)
    let targets: Vec<u32> = picks.iter().map(|&p| ids[p as usize + 1]).collect();
    let nll = crate::ops::cross_entropy(&logits, &candle_core::Tensor::new(targets.as_slice(), dev)?)?.mean_all()?.detach();
    Ok(Some(nll.to_scalar::<f32>()? as f64))
}

/// Per-row NLL of a JSON / JSON Lines / Parquet data file rendered through `r` (bad rows stop
/// the run, or with `skip_bad_rows` are skipped and counted).
pub fn eval_rows(model: &Model, r: &crate::render::Renderer, path: &Path, skip_bad_rows: bool) -> Result<Vec<RowNll>> {
    let ctx = model.arch.max_positions();
    let mut out = vec![];
    crate::data::for_each_example(path, crate::data::Stage::Sft, skip_bad_rows, |loc, ex| {
        for e in r.encode_example(&ex).with_context(|| loc.to_string())? {
            if e.ids.len() > ctx {
                crate::bail_kind!(crate::error::Kind::EvalContextOverflow, "{loc}: {} tokens, more than the model's context of {ctx}", e.ids.len())
            }
            out.push(RowNll { row: loc.n, tokens: e.learned(), nll: masked_nll(model, &e.ids, &e.mask)? });
        }
        Ok(())
    })?;
    Ok(out)
}
