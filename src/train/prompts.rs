//! Prompts for the methods that generate (GRPO; PPO once its data moves onto the renderer):
//! rows read as `Stage::Prompts` (text or messages; each row kept whole, for rewards that read
//! its other fields), rendered through `render::Renderer` (the `{prompt}` template or the chat
//! template with the generation prompt, as every stage renders), cut from the left to the
//! method's prompt length (the end of a prompt is what the answer follows); and the tokens that
//! end a completion.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::config::TrainConfig;
use super::Setup;
use crate::data::{Loc, Stage};

/// One prompt row: its ids (rendered, cut from the left), its prompt as the row gives it, the row.
pub struct PromptRow {
    pub ids: Vec<u32>,
    pub prompt: Value,
    pub row: Value,
    pub loc: Loc,
}

/// How long prompts and completions may be, and the extra stop texts, of the method whose
/// config section is `section` (for messages: `grpo.max_prompt_len`, ...).
pub struct PromptLimits<'a> {
    pub section: &'a str,
    pub max_prompt_len: usize,
    pub max_new_tokens: usize,
    pub stop: &'a [String],
}

/// The prompts of `data.path`: read as `Stage::Prompts` rows (keeping each row), rendered
/// through the model's template path (`render::Renderer`), cut from the left to
/// `max_prompt_len`. Also the stop tokens (eos, the template's end of turn, the stop texts) and eos.
pub fn load_prompts(cfg: &TrainConfig, setup: &Setup, lim: &PromptLimits) -> Result<(Vec<PromptRow>, Vec<u32>, u32)> {
    let (sec, tok) = (lim.section, &setup.tok);
    let eos = tok.eos_id.context("the tokenizer has no end-of-sequence token")?;
    if lim.max_prompt_len + lim.max_new_tokens > setup.arch.max_positions() {
        bail!(
            "{sec}.max_prompt_len ({}) + {sec}.max_new_tokens ({}) exceed the model's context of {} tokens",
            lim.max_prompt_len, lim.max_new_tokens, setup.arch.max_positions()
        )
    }
    let renderer = crate::render::Renderer::new(tok, &setup.files.dir, crate::render::RenderConfig::from_data(&cfg.data)?)?;
    let (rows, stats) = crate::data::read_examples_with_rows(Path::new(&cfg.data.path), Stage::Prompts, cfg.data.skip_bad_rows)?;
    let mut out = Vec::with_capacity(rows.len());
    let mut cut = 0;
    for (loc, ex, row) in rows {
        let crate::data::Example::Prompt(p) = &ex else { bail!("{loc}: not a prompt row") };
        let mut ids = renderer.encode_prompt(p).with_context(|| format!("{loc}"))?.ids;
        if ids.len() > lim.max_prompt_len {
            cut += 1;
            ids.drain(..ids.len() - lim.max_prompt_len);
        }
        let prompt = match p {
            crate::data::Prompt::Text(t) => Value::String(t.clone()),
            crate::data::Prompt::Messages(m) => serde_json::to_value(m)?,
        };
        out.push(PromptRow { ids, prompt, row, loc });
    }
    let mut stop = vec![eos];
    stop.extend(renderer.end_of_turn_ids().into_iter().filter(|i| *i != eos));
    for s in lim.stop {
        match tok.encode_plain(s)?.as_slice() {
            [id] => stop.push(*id),
            other => bail!("{sec}.stop {s:?} is {} tokens; a stop text must be a single token", other.len()),
        }
    }
    tracing::info!("data: {} prompts ({cut} cut to {} tokens, {} bad rows skipped)", out.len(), lim.max_prompt_len, stats.skipped_bad);
    Ok((out, stop, eos))
}

