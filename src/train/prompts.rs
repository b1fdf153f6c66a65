//! Prompts for the methods that generate (PPO, GRPO): rows read as `Stage::Prompts` (text or
//! messages; each row kept whole, for rewards that read its other fields), rendered through
//! `render::Renderer` (the `{prompt}` template, or the chat template with the generation
//! prompt, as every stage renders) and cut to the method's prompt length by
//! `Renderer::encode_prompt_fit` (earlier exchanges first, then tokens from the left: the end
//! of a prompt is what the answer follows); the tokens that end a completion; the template
//! record. `lorafit render --stage ppo|grpo` and `lorafit plan` show the same ids.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::config::TrainConfig;
use super::Setup;
use crate::data::Loc;
use crate::render::{RenderConfig, Renderer, TemplateRecord};

/// One prompt row: its ids (rendered, cut), its prompt as the row gives it, the row.
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

/// The prompts of a run and how their completions end.
pub struct Prompts {
    pub rows: Vec<PromptRow>,
    /// Generation stops at: eos; when prompts are conversations, also the template's
    /// end-of-turn (ChatML `<|im_end|>`) and the model's end ids; the single-token stop texts.
    pub stop: Vec<u32>,
    pub eos: u32,
    /// The token a reward model reads a cut completion at: eos, or the chat template's
    /// end-of-turn when prompts are conversations (as `lorafit rm` trained on them).
    pub end: u32,
    /// Which templates rendered the prompts (for the adapter's `lorafit.json`).
    pub record: TemplateRecord,
}

/// The prompts of `data.path` (see the module header), the stop tokens, eos and the end token.
pub fn load_prompts(cfg: &TrainConfig, setup: &Setup, lim: &PromptLimits) -> Result<Prompts> {
    let (sec, tok) = (lim.section, &setup.tok);
    let eos = tok.eos_id.context("the tokenizer has no end-of-sequence token")?;
    if lim.max_prompt_len + lim.max_new_tokens > setup.arch.max_positions() {
        bail!(
            "{sec}.max_prompt_len ({}) + {sec}.max_new_tokens ({}) exceed the model's context of {} tokens",
            lim.max_prompt_len, lim.max_new_tokens, setup.arch.max_positions()
        )
    }
    let r = Renderer::new(tok, &setup.files.dir, RenderConfig::from_data(&cfg.data)?)?;
    let (read, skipped_bad) = crate::data::read_prompt_rows(Path::new(&cfg.data.path), cfg.data.skip_bad_rows)?;
    let (chat, text) = (read.iter().any(|(_, e, _)| r.uses_chat(e)), read.iter().any(|(_, e, _)| !r.uses_chat(e)));
    let mut rows = Vec::with_capacity(read.len());
    let mut cut = 0;
    for (loc, ex, row) in read {
        let crate::data::Example::Prompt(p) = &ex else { bail!("{loc}: not a prompt row") };
        let e = r.encode_prompt_fit(p, lim.max_prompt_len).with_context(|| format!("{loc}"))?;
        cut += usize::from(e.truncated());
        let prompt = match p {
            crate::data::Prompt::Text(t) => Value::String(t.clone()),
            crate::data::Prompt::Messages(m) => serde_json::to_value(m)?,
        };
        rows.push(PromptRow { ids: e.ids, prompt, row, loc });
    }
    let (mut stop, mut end) = (vec![eos], eos);
    if chat {
        // A conversation's answer ends at the template's end-of-turn or one of the model's end ids.
        let eot = r.end_of_turn_ids();
        end = eot.first().copied().unwrap_or(eos);
        for &i in eot.iter().chain(&tok.end_ids) {
            if !stop.contains(&i) {
                stop.push(i);
            }
        }
    }
    for s in lim.stop {
        match tok.encode_plain(s)?.as_slice() {
            [id] => stop.push(*id),
            other => bail!("{sec}.stop {s:?} is {} tokens; a stop text must be a single token", other.len()),
        }
    }
    tracing::info!("data: {} prompts ({}; {cut} cut to {} tokens, {skipped_bad} bad rows skipped)", rows.len(), r.describe(), lim.max_prompt_len);
    Ok(Prompts { rows, stop, eos, end, record: r.record(text, chat) })
}
