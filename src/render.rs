//! One data row -> token ids + the mask of the tokens the loss learns: the single code path
//! every stage renders through (`lorafit render` shows it; `eval` scores it; SFT/RM/PPO use it).
//!
//! Prompt/completion rows on a model without a chat template keep lorafit's `{prompt}`
//! template: `encode(template(prompt)) ++ encode_plain(completion) ++ eos`, completion and eos
//! learned. Everything else goes through a chat template ([`ChatTemplate`]):
//! 1. render the conversation (`apply_chat_template` semantics);
//! 2. find each assistant turn's span in the text: the `{% generation %}` blocks when the
//!    template has them; else the assistant contents (rendered wrapped in private markers, kept
//!    only if the wrapped and plain renderings agree) extended over the control tokens that
//!    directly follow (ChatML `<|im_end|>`, Llama 3 `<|eot_id|>`, Gemma `<end_of_turn>`); else
//!    prefix by prefix (`render(messages[..i], add_generation_prompt)` is where turn i starts,
//!    `render(messages[..=i])` where it ends);
//! 3. tokenize the text as transformers does (nothing added: the template writes bos), or with
//!    `split_special_tokens` as `apply_chat_template(..., sanitize_control_tokens=True)` does:
//!    control-token text typed in a message is encoded as plain text;
//! 4. a token is learned when its character offsets overlap a learned span (transformers'
//!    `return_assistant_tokens_mask` rule).
//!
//! Too-long conversations lose whole earlier exchanges first (never the system message), then
//! are cut at `max_len`.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::chat_template::{check_private_chars, ChatTemplate, ModelChatFiles, CONTENT_END, CONTENT_START, CTRL_END, CTRL_START, GEN_END, GEN_START};
use crate::data::{Example, Message, Role};
use crate::template::Template;
use crate::tokenizer::Tokenizer;

/// Which assistant turns a conversation teaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    AllAssistant,
    LastAssistant,
}

impl TrainOn {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all_assistant" | "" => Ok(Self::AllAssistant),
            "last_assistant" => Ok(Self::LastAssistant),
            other => bail!("data.train_on = {other:?}: expected all_assistant or last_assistant"),
        }
    }
}

/// The `[data]` settings rendering needs.
#[derive(Clone, Debug)]
pub struct RenderConfig {
    /// "" (the model's template, else built-in kochatgpt for conversations and the `{prompt}`
    /// template for prompt/completion rows), "model", "prompt" (the `{prompt}` template only),
    /// a built-in name, or a path to a .jinja file.
    pub chat_template: String,
    /// The `{prompt}` template ("" = KoChatGPT's).
    pub template: String,
    pub train_on: TrainOn,
    pub split_special_tokens: bool,
    pub max_len: usize,
    pub strip_leading_quote: bool,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self { chat_template: String::new(), template: String::new(), train_on: TrainOn::AllAssistant, split_special_tokens: false, max_len: 512, strip_leading_quote: true }
    }
}

impl RenderConfig {
    pub fn from_data(d: &crate::train::config::DataSection) -> Result<Self> {
        Ok(Self {
            chat_template: d.chat_template.clone(),
            template: d.template.clone(),
            train_on: TrainOn::parse(&d.train_on)?,
            split_special_tokens: d.split_special_tokens,
            max_len: d.max_len,
            strip_leading_quote: d.strip_leading_quote,
        })
    }
}

/// One rendered sequence.
#[derive(Clone, Debug, Serialize)]
pub struct Encoded {
    /// "chosen", "rejected", "completion_N" for ranked rows; None otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub ids: Vec<u32>,
    /// true = the loss learns this token.
    pub mask: Vec<bool>,
    /// The rendered text (before truncation).
    pub text: String,
    /// Byte range of each token in `text` ((0, 0) for tokens the tokenizer added).
    #[serde(skip)]
    pub offsets: Vec<(usize, usize)>,
    /// Earlier exchanges dropped to fit `max_len`.
    pub dropped_turns: usize,
    /// Tokens cut at `max_len` after that.
    pub cut_tokens: usize,
    /// A message holds control-token text (e.g. `<|im_start|>` typed by a user).
    pub special_text: bool,
}

impl Encoded {
    pub fn learned(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
    /// The learned positions as ordered, non-overlapping ranges (`train::batch::SftExample`'s
    /// `learned`).
    pub fn learned_spans(&self) -> Vec<std::ops::Range<usize>> {
        let mut out: Vec<std::ops::Range<usize>> = vec![];
        for (j, &m) in self.mask.iter().enumerate() {
            match out.last_mut() {
                Some(r) if m && r.end == j => r.end = j + 1,
                _ if m => out.push(j..j + 1),
                _ => {}
            }
        }
        out
    }

    pub fn truncated(&self) -> bool {
        self.dropped_turns > 0 || self.cut_tokens > 0
    }
}

/// Counts over the rows rendered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RenderStats {
    pub rows: usize,
    pub sequences: usize,
    /// Sequences that lost earlier turns or were cut at max_len.
    pub truncated: usize,
    pub dropped_turns: usize,
    /// Sequences left with no learned token (not trained on).
    pub no_learned_tokens: usize,
    /// Rows whose messages hold control-token text.
    pub special_text_rows: usize,
}

impl RenderStats {
    pub fn add(&mut self, row: &[Encoded]) {
        self.rows += 1;
        self.sequences += row.len();
        self.truncated += row.iter().filter(|e| e.truncated()).count();
        self.dropped_turns += row.iter().map(|e| e.dropped_turns).sum::<usize>();
        self.no_learned_tokens += row.iter().filter(|e| e.learned() == 0 && !e.ids.is_empty()).count();
        self.special_text_rows += usize::from(row.iter().any(|e| e.special_text));
    }
}

/// Text pieces of a rendering: the text without lorafit's markers, the marker positions, and
/// (split mode) the control tokens typed by users (`as_text`) and lone markers (`breaks`).
#[derive(Debug, Default)]
struct Scan {
    clean: String,
    gen: Vec<usize>,
    content: Vec<usize>,
    as_text: Vec<(usize, usize)>,
    breaks: Vec<usize>,
}

/// The rendering and tokenizing machinery for one tokenizer and template choice.
pub struct Renderer<'a> {
    pub tok: &'a Tokenizer,
    /// The `{prompt}` template for prompt/completion rows; None: they go through `chat` as
    /// `[user, assistant]`.
    pub prompt_template: Option<Template>,
    pub chat: Option<ChatTemplate>,
    pub cfg: RenderConfig,
    /// Every added token's text, longest first (to recognise a marked control token).
    added: Vec<String>,
    /// Control tokens: special added tokens, plus added tokens the template writes.
    control: Vec<String>,
    control_re: Option<regex::Regex>,
    newline_ids: Vec<u32>,
    /// Only the prefix-by-prefix span search (for tests that compare it with the markers).
    pub prefix_spans_only: bool,
    /// The end-of-turn text the template writes after an assistant's content (e.g.
    /// `<|im_end|>`): the control tokens right after the last content of a probe conversation.
    eot: Option<String>,
}

impl<'a> Renderer<'a> {
    /// The template choice for `model_dir` (see [`RenderConfig::chat_template`]).
    pub fn new(tok: &'a Tokenizer, model_dir: &Path, cfg: RenderConfig) -> Result<Self> {
        let files = ModelChatFiles::read(model_dir)?;
        let mut vars = files.vars.clone();
        for (name, id) in [("eos_token", tok.eos_id), ("bos_token", tok.bos_id)] {
            if !vars.contains_key(name) {
                if let Some(t) = id.and_then(|i| tok.id_to_token(i)) {
                    vars.insert(name.into(), t);
                }
            }
        }
        let model_template = |vars: BTreeMap<String, String>| -> Result<Option<ChatTemplate>> {
            files.template.as_ref().map(|(src, path)| ChatTemplate::new(crate::chat_template::Origin::Model(path.clone()), src, vars, false)).transpose()
        };
        let explicit_prompt = (!cfg.template.is_empty()).then(|| Template::new(&cfg.template)).transpose()?;
        let (prompt_template, chat) = match cfg.chat_template.as_str() {
            "" => match model_template(vars.clone())? {
                Some(t) => (explicit_prompt, Some(t)),
                None => (Some(explicit_prompt.unwrap_or_default()), Some(ChatTemplate::builtin("kochatgpt", vars.clone())?)),
            },
            "model" => {
                let t = model_template(vars.clone())?.with_context(|| {
                    format!("data.chat_template = \"model\", but {} has no chat template (tokenizer_config.json's chat_template, or chat_template.jinja)", model_dir.display())
                })?;
                (explicit_prompt, Some(t))
            }
            "prompt" => (Some(explicit_prompt.unwrap_or_default()), None),
            name if crate::chat_template::BUILTINS.contains(&name) => (explicit_prompt, Some(ChatTemplate::builtin(name, vars.clone())?)),
            path => {
                let p = Path::new(path);
                if !p.is_file() {
                    bail!(
                        "data.chat_template = {path:?}: not a built-in ({}), \"model\", \"prompt\", nor an existing .jinja file",
                        crate::chat_template::BUILTINS.join(", ")
                    )
                }
                (explicit_prompt, Some(ChatTemplate::from_file(p, vars.clone())?))
            }
        };
        Self::assemble(tok, prompt_template, chat, cfg, files.control_tokens.as_deref())
    }

    /// A renderer with a `{prompt}` template only (no chat template): text rows exactly as
    /// `lorafit sft` / `rm` / `ppo` always encoded them (the library's `prepare` functions).
    pub fn with_prompt_template(tok: &'a Tokenizer, template: Template, cfg: RenderConfig) -> Result<Self> {
        Self::assemble(tok, Some(template), None, cfg, None)
    }

    /// A renderer for a template an adapter recorded (`lorafit.json`, see [`TemplateRecord`]):
    /// its chat template's text, else its `{prompt}` template.
    pub fn from_record(tok: &'a Tokenizer, model_dir: &Path, rec: &TemplateRecord, cfg: RenderConfig) -> Result<Self> {
        let files = ModelChatFiles::read(model_dir)?;
        let mut vars = files.vars.clone();
        for (name, id) in [("eos_token", tok.eos_id), ("bos_token", tok.bos_id)] {
            if !vars.contains_key(name) {
                if let Some(t) = id.and_then(|i| tok.id_to_token(i)) {
                    vars.insert(name.into(), t);
                }
            }
        }
        let prompt = rec.prompt_template.as_deref().map(Template::new).transpose()?;
        let chat = match &rec.chat_template {
            Some(src) => {
                let origin = match rec.chat_template_origin.strip_prefix("builtin:") {
                    Some(n) => match crate::chat_template::BUILTINS.iter().find(|b| **b == n) {
                        Some(b) => crate::chat_template::Origin::Builtin(b),
                        None => crate::chat_template::Origin::File(PathBuf::from("lorafit.json")),
                    },
                    None => crate::chat_template::Origin::File(PathBuf::from("lorafit.json")),
                };
                Some(ChatTemplate::new(origin, src, vars, rec.add_special_tokens)?)
            }
            None => None,
        };
        anyhow::ensure!(prompt.is_some() || chat.is_some(), "the adapter's lorafit.json records no template");
        Self::assemble(tok, prompt, chat, cfg, files.control_tokens.as_deref())
    }

    /// What this renderer renders with, for an adapter's `lorafit.json` (see [`TemplateRecord`]).
    pub fn record(&self, used_prompt_template: bool, used_chat_template: bool) -> TemplateRecord {
        TemplateRecord {
            prompt_template: self.prompt_template.as_ref().filter(|_| used_prompt_template).map(|t| t.text().to_string()),
            chat_template: self.chat.as_ref().filter(|_| used_chat_template).map(|c| c.source.clone()),
            chat_template_origin: self
                .chat
                .as_ref()
                .filter(|_| used_chat_template)
                .map(|c| match &c.origin {
                    crate::chat_template::Origin::Builtin(n) => format!("builtin:{n}"),
                    crate::chat_template::Origin::Model(_) => "model".to_string(),
                    crate::chat_template::Origin::File(p) => format!("file:{}", p.display()),
                })
                .unwrap_or_default(),
            add_special_tokens: self.chat.as_ref().is_some_and(|c| c.add_special_tokens),
            train_on: self.cfg.train_on,
            split_special_tokens: self.cfg.split_special_tokens,
        }
    }

    fn assemble(tok: &'a Tokenizer, prompt_template: Option<Template>, chat: Option<ChatTemplate>, cfg: RenderConfig, control_list: Option<&[String]>) -> Result<Self> {
        let added_all = tok.added_tokens();
        let added: Vec<String> = added_all.iter().map(|(_, t, _)| t.clone()).filter(|t| !t.is_empty()).collect();
        let source = chat.as_ref().map(|c| c.source.as_str()).unwrap_or("");
        let control: Vec<String> = added_all
            .iter()
            .filter(|(_, t, special)| {
                !t.is_empty()
                    && match control_list {
                        Some(list) => *special || list.contains(t),
                        None => *special || (source.contains(t.as_str()) && !t.chars().all(char::is_whitespace)),
                    }
            })
            .map(|(_, t, _)| t.clone())
            .collect();
        let control_re = (!control.is_empty())
            .then(|| regex::Regex::new(&control.iter().map(|t| regex::escape(t)).collect::<Vec<_>>().join("|")))
            .transpose()?;
        let newline_ids = tok.encode_with_offsets("\n", false)?.0;
        let mut r = Self { tok, prompt_template, chat, cfg, added, control, control_re, newline_ids, prefix_spans_only: false, eot: None };
        r.eot = r.probe_end_of_turn();
        Ok(r)
    }

    /// The control tokens a template writes right after an assistant's content, from
    /// `[user, assistant]` rendered with the content marked (None if that fails or is empty).
    fn probe_end_of_turn(&self) -> Option<String> {
        let probe = [Message::new(Role::User, "Hi"), Message::new(Role::Assistant, "Hello")];
        let s = self.render_scan(&probe, false, true).ok()?;
        let end = *s.content.get(1)?;
        let run = self.control_run(&s.clean, end);
        (run > 0).then(|| s.clean[end..end + run].to_string())
    }

    /// Bytes of the end-of-turn text at `text[at..]` (0 if it is not there).
    fn eot_at(&self, text: &str, at: usize) -> usize {
        match &self.eot {
            Some(e) if text[at..].starts_with(e.as_str()) => e.len(),
            _ => 0,
        }
    }

    /// Ids that end an assistant turn besides the model's end ids: the template's end-of-turn
    /// text when it is one token (ChatML `<|im_end|>`, Gemma `<end_of_turn>`).
    pub fn end_of_turn_ids(&self) -> Vec<u32> {
        self.eot.as_deref().and_then(|t| self.tok.token_to_id(t)).into_iter().collect()
    }

    /// The control tokens (for reports).
    pub fn control_tokens(&self) -> &[String] {
        &self.control
    }

    /// Which template renders prompt/completion rows and which conversations, in words.
    pub fn describe(&self) -> String {
        let chat = self.chat.as_ref().map(|c| c.origin.to_string()).unwrap_or_else(|| "none".into());
        match &self.prompt_template {
            Some(_) => format!("prompt/completion rows: the {{prompt}} template; conversations: {chat}"),
            None => format!("all rows: {chat}"),
        }
    }

    fn has_special_text(&self, msgs: &[Message]) -> bool {
        self.control_re.as_ref().is_some_and(|re| msgs.iter().any(|m| re.is_match(&m.content)))
    }

    /// transformers' `mark_control_tokens`: drop stray markers, wrap each control token.
    fn mark(&self, s: &str) -> String {
        let s: String = s.chars().filter(|&c| c != CTRL_START && c != CTRL_END).collect();
        match &self.control_re {
            Some(re) => re.replace_all(&s, |c: &regex::Captures| format!("{CTRL_START}{}{CTRL_END}", &c[0])).into_owned(),
            None => s,
        }
    }

    fn chat(&self) -> Result<&ChatTemplate> {
        self.chat.as_ref().context("data.chat_template = \"prompt\" renders prompt/completion rows only: set data.chat_template (model, a built-in, or a .jinja file) for conversations")
    }

    fn render_scan(&self, msgs: &[Message], add_generation_prompt: bool, wrap: bool) -> Result<Scan> {
        let chat = self.chat()?;
        let mark = |s: &str| self.mark(s);
        let map: Option<&dyn Fn(&str) -> String> = if self.cfg.split_special_tokens { Some(&mark) } else { None };
        let raw = chat.render_with(msgs, add_generation_prompt, wrap, map)?;
        Ok(self.scan(&raw))
    }

    fn scan(&self, raw: &str) -> Scan {
        let split = self.cfg.split_special_tokens;
        let mut s = Scan { clean: String::with_capacity(raw.len()), ..Default::default() };
        let mut i = 0;
        while i < raw.len() {
            let c = raw[i..].chars().next().unwrap();
            let n = c.len_utf8();
            match c {
                GEN_START | GEN_END => s.gen.push(s.clean.len()),
                CONTENT_START | CONTENT_END => s.content.push(s.clean.len()),
                CTRL_START if split => {
                    let rest = &raw[i + n..];
                    if let Some(t) = self.added.iter().find(|t| rest.starts_with(t.as_str()) && rest[t.len()..].starts_with(CTRL_END)) {
                        s.as_text.push((s.clean.len(), s.clean.len() + t.len()));
                        s.clean.push_str(t);
                        i += n + t.len() + CTRL_END.len_utf8();
                        continue;
                    }
                    s.breaks.push(s.clean.len());
                }
                CTRL_END if split => s.breaks.push(s.clean.len()),
                _ => s.clean.push(c),
            }
            i += n;
        }
        s
    }

    /// Length of the control tokens starting at `text[at..]`, one after another.
    fn control_run(&self, text: &str, mut at: usize) -> usize {
        let start = at;
        'outer: loop {
            for t in &self.control {
                if text[at..].starts_with(t.as_str()) {
                    at += t.len();
                    continue 'outer;
                }
            }
            return at - start;
        }
    }

    /// The byte span of each assistant message in the rendering `scan` of `msgs`.
    fn assistant_spans(&self, msgs: &[Message], add_generation_prompt: bool, plain: &Scan) -> Result<Vec<(usize, usize)>> {
        let n_assist = msgs.iter().filter(|m| m.role == Role::Assistant).count();
        let chat = self.chat()?;
        if chat.has_generation && !self.prefix_spans_only {
            if !plain.gen.len().is_multiple_of(2) {
                bail!("{}: a {{% generation %}} block is not closed", chat.origin)
            }
            let spans: Vec<(usize, usize)> = plain.gen.chunks(2).map(|p| (p[0], p[1])).collect();
            if spans.len() != n_assist {
                bail!("{}: {} {{% generation %}} blocks for {n_assist} assistant messages", chat.origin, spans.len())
            }
            return Ok(spans);
        }
        // Contents wrapped in markers: used when the wrapped rendering is the plain one.
        let wrapped = self.render_scan(msgs, add_generation_prompt, true)?;
        if wrapped.clean == plain.clean && wrapped.content.len() == 2 * n_assist && !self.prefix_spans_only {
            return Ok(wrapped.content.chunks(2).map(|p| (p[0], p[1] + self.eot_at(&plain.clean, p[1]))).collect());
        }
        // Prefix by prefix.
        let full = &plain.clean;
        let mut spans = vec![];
        for (i, m) in msgs.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let before = self.render_scan(&msgs[..i], true, false)?.clean;
            let through = self.render_scan(&msgs[..=i], false, false)?.clean;
            let fail = |why: &str| {
                anyhow::anyhow!(
                    "{}: cannot find assistant message {i} in the rendering ({why}); add {{% generation %}} ... {{% endgeneration %}} around the assistant turns (a copy of the template with markers, as data.chat_template = \"path.jinja\")",
                    chat.origin
                )
            };
            if !full.starts_with(&before) || !through.starts_with(&before) {
                return Err(fail("the conversation's rendering does not start with the rendering of the messages before it"));
            }
            let delta = &through[before.len()..];
            // The turn ends after its end-of-turn text (the last one: a typed one may come
            // earlier), else after its last run of control tokens if only whitespace follows.
            let mut end = delta.trim_end().len();
            if let Some(p) = self.eot.as_deref().and_then(|e| delta.rfind(e).map(|p| p + e.len())) {
                end = p;
            } else {
                let mut at = 0;
                while at < delta.len() {
                    let r = self.control_run(delta, at);
                    if r > 0 {
                        at += r;
                        if delta[at..].trim().is_empty() {
                            end = at;
                            break;
                        }
                    } else {
                        at += delta[at..].chars().next().map_or(1, char::len_utf8);
                    }
                }
            }
            // Text the template puts before the content (Qwen3's empty think block) is not learned.
            let d = &delta[..end];
            let skip = if m.content.trim().is_empty() {
                self.eot.as_deref().and_then(|e| d.rfind(e)).unwrap_or(0) // an empty turn: its end-of-turn
            } else {
                d.find(m.content.as_str()).or_else(|| d.find(m.content.trim())).unwrap_or(0)
            };
            let rest = &full[before.len()..];
            if rest.starts_with(&delta[..end]) {
                spans.push((before.len() + skip, before.len() + end));
            } else if rest.starts_with(&delta[skip..end]) {
                // That text appears only while the turn is the last one.
                spans.push((before.len(), before.len() + end - skip));
            } else {
                return Err(fail("the turn renders differently once later messages follow"));
            }
        }
        Ok(spans)
    }

    /// Tokenizes a scanned rendering: whole (transformers' default), or piece by piece with
    /// typed control tokens as plain text (`split_special_tokens`, transformers'
    /// `encode_marked_chat`). Returns ids and byte offsets in `scan.clean`.
    fn tokenize(&self, scan: &Scan, add_special_tokens: bool) -> Result<crate::tokenizer::IdsOffsets> {
        let text = &scan.clean;
        if !self.cfg.split_special_tokens {
            return self.tok.encode_with_offsets(text, add_special_tokens);
        }
        // Events in order: a typed control token (encoded as text) or a lone marker (a break).
        let mut events: Vec<(usize, usize, bool)> = scan.as_text.iter().map(|&(a, b)| (a, b, true)).chain(scan.breaks.iter().map(|&p| (p, p, false))).collect();
        events.sort();
        let (mut ids, mut offs) = (vec![], vec![]);
        if add_special_tokens {
            let (i, o) = self.tok.encode_with_offsets("", true)?;
            ids.extend(i);
            offs.extend(o);
        }
        let first_end = events.first().map_or(text.len(), |e| e.0);
        let (i, o) = self.tok.encode_with_offsets(&text[..first_end], false)?;
        ids.extend(i);
        offs.extend(o);
        for (k, &(a, b, as_text)) in events.iter().enumerate() {
            if as_text {
                let piece = &text[a..b];
                let with_nl = self.tok.encode_without_added_tokens(&format!("\n{piece}"))?;
                let p_ids = match with_nl.strip_prefix(self.newline_ids.as_slice()) {
                    Some(rest) => rest.to_vec(),
                    None => self.tok.encode_without_added_tokens(piece)?,
                };
                if self.tok.token_to_id(piece).is_some_and(|id| p_ids.contains(&id)) {
                    bail!("cannot encode {piece:?} as plain text: the tokenizer produces that token from plain text (data.split_special_tokens)")
                }
                offs.extend(std::iter::repeat_n((a, b), p_ids.len()));
                ids.extend(p_ids);
            }
            let next = events.get(k + 1).map_or(text.len(), |e| e.0);
            if next > b {
                let piece = &text[b..next];
                let (i, o) = self.tok.encode_with_offsets(&format!("\n{piece}"), false)?;
                if i.starts_with(&self.newline_ids) {
                    let skip = self.newline_ids.len();
                    ids.extend(&i[skip..]);
                    offs.extend(o[skip..].iter().map(|&(s, e)| (b + s.saturating_sub(1), b + e.saturating_sub(1))));
                } else {
                    let (i, o) = self.tok.encode_with_offsets(piece, false)?;
                    ids.extend(i);
                    offs.extend(o.iter().map(|&(s, e)| (b + s, b + e)));
                }
            }
        }
        Ok((ids, offs))
    }

    /// A conversation (or a prompt, with `add_generation_prompt`) rendered and tokenized, with
    /// the assistant messages for which `learn(message_index)` holds learned.
    pub fn encode_messages(&self, msgs: &[Message], add_generation_prompt: bool, learn: &dyn Fn(usize) -> bool) -> Result<Encoded> {
        check_private_chars(msgs)?;
        let chat = self.chat()?;
        let plain = self.render_scan(msgs, add_generation_prompt, false)?;
        let assist: Vec<usize> = (0..msgs.len()).filter(|&i| msgs[i].role == Role::Assistant).collect();
        let spans: Vec<(usize, usize)> = if assist.iter().any(|&i| learn(i)) {
            let all = self.assistant_spans(msgs, add_generation_prompt, &plain)?;
            assist.iter().zip(all).filter(|(&i, _)| learn(i)).map(|(_, s)| s).collect()
        } else {
            vec![]
        };
        let (ids, offsets) = self.tokenize(&plain, chat.add_special_tokens)?;
        // transformers' rule: a token is learned when its offsets overlap a span.
        let mut mask = vec![false; ids.len()];
        let mut k = 0;
        for (t, &(s, e)) in offsets.iter().enumerate() {
            while k < spans.len() && s >= spans[k].1 {
                k += 1;
            }
            if k == spans.len() {
                break;
            }
            if e > spans[k].0 && s < spans[k].1 {
                mask[t] = true;
            }
        }
        let text = plain.clean;
        Ok(Encoded { label: None, ids, mask, text, offsets, dropped_turns: 0, cut_tokens: 0, special_text: self.has_special_text(msgs) })
    }

    /// A conversation for SFT / eval: `train_on` picks the learned turns; too long, it loses
    /// whole earlier exchanges (never the system message), then is cut at `max_len`.
    pub fn encode_chat(&self, msgs: &[Message]) -> Result<Encoded> {
        let last = msgs.iter().rposition(|m| m.role == Role::Assistant);
        let train_on = self.cfg.train_on;
        let learn = move |i: usize| match train_on {
            TrainOn::AllAssistant => true,
            TrainOn::LastAssistant => Some(i) == last,
        };
        self.fit(msgs, &learn, 0)
    }

    /// Encodes `msgs`, dropping exchanges from the front (after a system message, and not
    /// into the messages from `keep_from` on) until it fits `max_len`; then cuts.
    fn fit(&self, msgs: &[Message], learn: &dyn Fn(usize) -> bool, keep_from: usize) -> Result<Encoded> {
        let sys = usize::from(msgs.first().is_some_and(|m| m.role == Role::System));
        let mut dropped = 0;
        let mut start = sys; // messages[sys..start] are dropped
        loop {
            let cur: Vec<Message> = msgs[..sys].iter().chain(&msgs[start..]).cloned().collect();
            let shift = start - sys;
            let mut e = self.encode_messages(&cur, false, &|i| learn(if i < sys { i } else { i + shift }))?;
            e.dropped_turns = dropped;
            if e.ids.len() <= self.cfg.max_len {
                return Ok(e);
            }
            // The next exchange: from `start` past the first assistant turn to the next user turn.
            let next = msgs.iter().enumerate().skip(start).skip_while(|(_, m)| m.role != Role::Assistant).find(|(_, m)| m.role == Role::User).map(|(i, _)| i);
            let can_drop = |n: usize| n > start && if keep_from > 0 { n <= keep_from } else { msgs[n..].iter().any(|m| m.role == Role::Assistant) };
            match next {
                Some(n) if can_drop(n) => {
                    start = n;
                    dropped += 1;
                }
                _ => {
                    e.cut_tokens = e.ids.len() - self.cfg.max_len;
                    e.ids.truncate(self.cfg.max_len);
                    e.mask.truncate(self.cfg.max_len);
                    e.offsets.truncate(self.cfg.max_len);
                    return Ok(e);
                }
            }
        }
    }

    /// A prompt/completion row through the `{prompt}` template, exactly as `lorafit sft`
    /// prepares it: the prompt loses tokens from the left first (keeping at least half the
    /// window), then the completion from the right (its eos with it).
    fn encode_prompt_completion(&self, t: &Template, prompt: &str, completion: &str) -> Result<Encoded> {
        let eos = self.tok.eos_id.context("the tokenizer has no end-of-sequence token: set eos_token_id in config.json")?;
        let completion = if self.cfg.strip_leading_quote { completion.strip_prefix('\'').unwrap_or(completion) } else { completion };
        let ptext = t.render(prompt);
        let (mut p, mut po) = self.tok.encode_with_offsets(&ptext, true)?;
        let (mut c, co) = self.tok.encode_with_offsets(completion, false)?;
        let eos_text = self.tok.id_to_token(eos).unwrap_or_default();
        let text = format!("{ptext}{completion}{eos_text}");
        let mut co: Vec<(usize, usize)> = co.iter().map(|&(s, e)| (s + ptext.len(), e + ptext.len())).collect();
        let mut cut = 0;
        if !c.is_empty() {
            c.push(eos);
            co.push((ptext.len() + completion.len(), text.len()));
            let max_len = self.cfg.max_len;
            if p.len() + c.len() > max_len {
                // At least one prompt token when there is one; an empty prompt stays empty.
                let keep_p = p.len().min(max_len.saturating_sub(c.len()).max(max_len / 2).max(1));
                cut = p.len() + c.len() - max_len.max(keep_p);
                p.drain(..p.len() - keep_p);
                po.drain(..po.len() - keep_p);
                c.truncate(max_len.saturating_sub(keep_p));
                co.truncate(c.len());
            }
        }
        let mask = std::iter::repeat_n(false, p.len()).chain(std::iter::repeat_n(true, c.len())).collect();
        p.extend(c);
        po.extend(co);
        let special_text = self.control_re.as_ref().is_some_and(|re| re.is_match(prompt) || re.is_match(completion));
        Ok(Encoded { label: None, ids: p, mask, text, offsets: po, dropped_turns: 0, cut_tokens: cut, special_text })
    }

    /// Every sequence of one row: one for SFT rows and prompts, one per completion for ranked
    /// rows (prompt + that completion, the completion learned).
    pub fn encode_example(&self, ex: &Example) -> Result<Vec<Encoded>> {
        Ok(match ex {
            Example::Completion { prompt, completion } => match &self.prompt_template {
                Some(t) => vec![self.encode_prompt_completion(t, prompt, completion)?],
                None => {
                    let c = if self.cfg.strip_leading_quote { completion.strip_prefix('\'').unwrap_or(completion) } else { completion };
                    vec![self.encode_chat(&[Message::new(Role::User, prompt.clone()), Message::new(Role::Assistant, c)])?]
                }
            },
            Example::Chat(msgs) => vec![self.encode_chat(msgs)?],
            Example::Prompt(p) => vec![self.encode_prompt(p)?],
            Example::Ranked { prompt, completions, .. } => {
                let k = completions.len();
                let mut out = vec![];
                for (i, c) in completions.iter().enumerate() {
                    let mut e = match (&self.prompt_template, prompt, c) {
                        (Some(t), crate::data::Prompt::Text(p), crate::data::Completion::Text(c)) => self.encode_prompt_completion(t, p, c)?,
                        _ => {
                            let mut msgs = prompt.messages();
                            let n = msgs.len();
                            msgs.extend(c.messages());
                            self.fit(&msgs, &|i| i >= n, n)?
                        }
                    };
                    e.label = Some(if k == 2 { ["chosen", "rejected"][i].to_string() } else { format!("completion_{i}") });
                    out.push(e);
                }
                out
            }
        })
    }

    /// A prompt ready for generation (nothing learned): `template(prompt)` with the
    /// tokenizer's own special tokens, or the chat template with `add_generation_prompt`.
    pub fn encode_prompt(&self, p: &crate::data::Prompt) -> Result<Encoded> {
        match (&self.prompt_template, p) {
            (Some(t), crate::data::Prompt::Text(text)) => {
                let rendered = t.render(text);
                let (ids, offsets) = self.tok.encode_with_offsets(&rendered, true)?;
                let special_text = self.control_re.as_ref().is_some_and(|re| re.is_match(text));
                Ok(Encoded { label: None, mask: vec![false; ids.len()], ids, text: rendered, offsets, dropped_turns: 0, cut_tokens: 0, special_text })
            }
            _ => self.encode_messages(&p.messages(), true, &|_| false),
        }
    }
}

// ---- Stage-specific shapes (the reward model, PPO prompts) ---------------------------------

impl Renderer<'_> {
    /// Whether `ex` renders through the chat template (else through the `{prompt}` template).
    pub fn uses_chat(&self, ex: &Example) -> bool {
        !(ex.is_text() && self.prompt_template.is_some())
    }

    /// A ranked row as the reward model scores it: one sequence per completion, prompt +
    /// completion, the completion learned (shown by `lorafit render --stage rm`), ending at the
    /// completion's last learned token (eos; a chat template's end-of-turn, e.g. `<|im_end|>`),
    /// where the reward is read. Text rows through the `{prompt}` template are
    /// `encode(template(prompt)) ++ encode_plain(completion) ++ eos` (no quote stripped), as
    /// `lorafit rm` always scored them. Too long, a sequence keeps its end: earlier exchanges of
    /// the prompt are dropped first (never the system message), then tokens from the left.
    pub fn encode_reward(&self, ex: &Example) -> Result<Vec<Encoded>> {
        let Example::Ranked { prompt, completions, .. } = ex else {
            bail!("the reward model scores ranked rows (\"chosen\"/\"rejected\" or \"completion_0\".. + \"ranking\")")
        };
        let k = completions.len();
        let mut out = vec![];
        for (i, c) in completions.iter().enumerate() {
            let mut e = match (&self.prompt_template, prompt, c) {
                (Some(t), crate::data::Prompt::Text(p), crate::data::Completion::Text(c)) => {
                    let eos = self.tok.eos_id.context("the tokenizer has no end-of-sequence token: set eos_token_id in config.json")?;
                    let ptext = t.render(p);
                    let (mut ids, mut offsets) = self.tok.encode_with_offsets(&ptext, true)?;
                    let n_prompt = ids.len();
                    let (ci, co) = self.tok.encode_with_offsets(c, false)?;
                    ids.extend(ci);
                    offsets.extend(co.iter().map(|&(a, b)| (a + ptext.len(), b + ptext.len())));
                    let eos_text = self.tok.id_to_token(eos).unwrap_or_default();
                    let text = format!("{ptext}{c}{eos_text}");
                    ids.push(eos);
                    offsets.push((ptext.len() + c.len(), text.len()));
                    let mut mask = vec![false; n_prompt];
                    mask.resize(ids.len(), true);
                    let special_text = self.control_re.as_ref().is_some_and(|re| re.is_match(p) || re.is_match(c));
                    let mut e = Encoded { label: None, ids, mask, text, offsets, dropped_turns: 0, cut_tokens: 0, special_text };
                    cut_left(&mut e, self.cfg.max_len);
                    e
                }
                _ => {
                    let mut msgs = prompt.messages();
                    let n = msgs.len();
                    msgs.extend(c.messages());
                    self.fit_end(&msgs, &|i| i >= n, n, false, self.cfg.max_len)?
                }
            };
            e.label = Some(if k == 2 { ["chosen", "rejected"][i].to_string() } else { format!("completion_{i}") });
            out.push(e);
        }
        Ok(out)
    }

    /// A ranked row as the pairwise methods (`dpo`) learn it: [`Self::encode_example`]'s
    /// sequences when they fit `max_len`; else cut as [`Self::encode_reward`] cuts them
    /// (earlier exchanges first, then prompt tokens from the left), so that each completion and
    /// its end token stay whole when they fit (the sequences of one pair may then keep
    /// different amounts of prompt). Text completions lose a leading quote as in `encode_example`.
    pub fn encode_pair(&self, ex: &Example) -> Result<Vec<Encoded>> {
        let enc = self.encode_example(ex)?;
        if !enc.iter().any(Encoded::truncated) {
            return Ok(enc);
        }
        let mut ex = ex.clone();
        if let (true, Example::Ranked { completions, .. }) = (self.cfg.strip_leading_quote, &mut ex) {
            for c in completions {
                if let crate::data::Completion::Text(t) = c {
                    if let Some(rest) = t.strip_prefix('\'') {
                        *t = rest.to_string();
                    }
                }
            }
        }
        self.encode_reward(&ex)
    }

    /// A conversation as the reward model scores it (`lorafit score`): its last assistant turn
    /// learned, the sequence ending at that turn's last token (see [`Self::encode_reward`]).
    pub fn encode_reward_chat(&self, msgs: &[Message]) -> Result<Encoded> {
        let last = msgs.iter().rposition(|m| m.role == Role::Assistant).context("a conversation to score needs an assistant turn")?;
        self.fit_end(msgs, &|i| i == last, last, false, self.cfg.max_len)
    }

    /// A prompt for generation (PPO), at most `max_len` tokens: text through the `{prompt}`
    /// template cut from the left (as `lorafit ppo` always did); messages with the generation
    /// prompt, losing earlier exchanges first (never the system message), then cut from the left.
    pub fn encode_prompt_fit(&self, p: &crate::data::Prompt, max_len: usize) -> Result<Encoded> {
        match (&self.prompt_template, p) {
            (Some(_), crate::data::Prompt::Text(_)) => {
                let mut e = self.encode_prompt(p)?;
                cut_left(&mut e, max_len);
                Ok(e)
            }
            _ => {
                let msgs = p.messages();
                self.fit_end(&msgs, &|_| false, msgs.len(), true, max_len)
            }
        }
    }

    /// Encodes `msgs` (with the generation prompt when `generation`), keeping the end: drops
    /// exchanges from the front (after a system message, not into the messages from
    /// `keep_from` on) until it fits `max_len`, then cuts tokens from the left. A sequence with
    /// learned tokens ends at its last learned one.
    fn fit_end(&self, msgs: &[Message], learn: &dyn Fn(usize) -> bool, keep_from: usize, generation: bool, max_len: usize) -> Result<Encoded> {
        let sys = usize::from(msgs.first().is_some_and(|m| m.role == Role::System));
        let (mut start, mut dropped) = (sys, 0);
        loop {
            let cur: Vec<Message> = msgs[..sys].iter().chain(&msgs[start..]).cloned().collect();
            let shift = start - sys;
            let mut e = self.encode_messages(&cur, generation, &|i| learn(if i < sys { i } else { i + shift }))?;
            if let Some(last) = e.mask.iter().rposition(|&m| m) {
                e.ids.truncate(last + 1);
                e.mask.truncate(last + 1);
                e.offsets.truncate(last + 1);
            }
            e.dropped_turns = dropped;
            if e.ids.len() <= max_len {
                return Ok(e);
            }
            let next = msgs.iter().enumerate().skip(start).skip_while(|(_, m)| m.role != Role::Assistant).find(|(_, m)| m.role == Role::User).map(|(i, _)| i);
            match next {
                Some(n) if n > start && n < keep_from => {
                    start = n;
                    dropped += 1;
                }
                _ => {
                    cut_left(&mut e, max_len);
                    return Ok(e);
                }
            }
        }
    }
}

/// Drops tokens from the left of `e` until it holds `max_len`.
fn cut_left(e: &mut Encoded, max_len: usize) {
    if e.ids.len() > max_len {
        let cut = e.ids.len() - max_len;
        e.ids.drain(..cut);
        e.mask.drain(..cut);
        e.offsets.drain(..cut);
        e.cut_tokens += cut;
    }
}

/// The template an adapter was trained with, recorded in its folder's `lorafit.json` under
/// `"template"`, so `chat`, `generate` and `merge` render as training did by default.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct TemplateRecord {
    /// The `{prompt}` template text rows went through (None: no text row was trained).
    #[serde(default)]
    pub prompt_template: Option<String>,
    /// The chat template's Jinja text conversations went through (None: none was).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// "model", "builtin:NAME" or "file:PATH".
    #[serde(default)]
    pub chat_template_origin: String,
    /// The tokenizer's own special tokens are added around the rendering (built-ins but llama3).
    #[serde(default)]
    pub add_special_tokens: bool,
    pub train_on: TrainOn,
    #[serde(default)]
    pub split_special_tokens: bool,
}

impl TemplateRecord {
    /// The record in `adapter_dir/lorafit.json`, if any.
    pub fn read(adapter_dir: &Path) -> Result<Option<Self>> {
        let p = adapter_dir.join(crate::peft::STACK_FILE);
        let Ok(text) = std::fs::read_to_string(&p) else { return Ok(None) };
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))?;
        match v.get("template") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(t) => Ok(Some(serde_json::from_value(t.clone()).with_context(|| format!("{}: \"template\" is not a template record", p.display()))?)),
        }
    }

    /// Writes the record into `adapter_dir/lorafit.json`, keeping its other keys (the stack).
    pub fn write(&self, adapter_dir: &Path) -> Result<()> {
        let p = adapter_dir.join(crate::peft::STACK_FILE);
        let mut v: serde_json::Value = match std::fs::read_to_string(&p) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))?,
            Err(_) => serde_json::json!({}),
        };
        let o = v.as_object_mut().with_context(|| format!("{}: not a JSON object", p.display()))?;
        o.insert("template".into(), serde_json::to_value(self)?);
        crate::io::atomic_write(&p, serde_json::to_string_pretty(&v)?.as_bytes())
    }

    /// The record of the first adapter (of `--adapter DIR[:W]` values) that has one.
    pub fn of_adapters(adapters: &[String]) -> Result<Option<Self>> {
        for a in adapters {
            let (dir, _) = crate::peft::parse_adapter_arg(a)?;
            if let Some(r) = Self::read(&dir)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
}

/// `row`'s sequences for one data row: the public entry point of round-2 training code.
pub fn render_example(ex: &Example, r: &Renderer) -> Result<Vec<Encoded>> {
    r.encode_example(ex)
}

// ---- `lorafit render` ------------------------------------------------------------------------

/// `lorafit render`: what a training stage sees, row by row.
#[derive(clap::Args)]
pub struct RenderArgs {
    /// A model folder (only its tokenizer files and chat template are read), a hub id, or
    /// builtin:tiny-gpt2; default: the config's model.name.
    #[arg(long)]
    pub model: Option<String>,
    /// The data file (JSON, JSON Lines or Parquet); default: the config's data.path.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A training config: its [data] settings (template, chat_template, train_on, max_len,
    /// split_special_tokens) are the ones rendered.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override config keys: --set data.train_on=last_assistant.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// The row shapes to read: sft (prompt/completion, conversations), rm (ranked / preference
    /// rows), ppo (prompts), or any.
    #[arg(long, default_value = "any")]
    pub stage: String,
    /// Show only the first N rows (0 = all).
    #[arg(long, default_value_t = 0)]
    pub rows: usize,
    /// One JSON object per sequence: {"row", "ids", "mask", "text"} (+ "label" for ranked rows).
    #[arg(long)]
    pub json: bool,
    /// Skip (and count) malformed rows instead of stopping.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

use std::path::PathBuf;

/// The folder holding `--model`'s tokenizer files (no weights needed for a local folder).
pub fn tokenizer_dir(model: &str) -> Result<PathBuf> {
    if let Some(name) = model.strip_prefix("builtin:") {
        return crate::builtin::materialize(name);
    }
    let p = Path::new(model);
    if p.is_dir() {
        if !p.join("tokenizer.json").is_file() {
            bail!("{}: no tokenizer.json", p.display())
        }
        return Ok(p.to_path_buf());
    }
    Ok(crate::weights::ModelFiles::resolve(model)?.dir)
}

/// Learned byte ranges of `e.text`, merged.
fn learned_ranges(e: &Encoded) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = vec![];
    for (&(s, t), &m) in e.offsets.iter().zip(&e.mask) {
        if !m || t <= s {
            continue;
        }
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(t),
            _ => out.push((s, t)),
        }
    }
    out
}

pub fn run_render(a: RenderArgs) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let mut cfg = crate::train::config::TrainConfig::load(a.config.as_deref(), &a.set)?;
    if a.skip_bad_rows {
        cfg.data.skip_bad_rows = true;
    }
    let model = a.model.clone().unwrap_or_else(|| cfg.model.name.clone());
    let data = a.data.clone().or_else(|| (!cfg.data.path.is_empty()).then(|| PathBuf::from(&cfg.data.path))).context("pass --data (or a config with data.path)")?;
    let stage = match a.stage.as_str() {
        "any" => crate::data::Stage::Any,
        "sft" => crate::data::Stage::Sft,
        "rm" | "dpo" => crate::data::Stage::Preference,
        "ppo" | "grpo" => crate::data::Stage::Prompts,
        other => bail!("--stage {other:?}: expected sft, rm, ppo or any"),
    };
    let dir = tokenizer_dir(&model)?;
    let tok = Tokenizer::load(&dir.join("tokenizer.json"), &dir.join("config.json"))?;
    let r = Renderer::new(&tok, &dir, RenderConfig::from_data(&cfg.data)?)?;
    let color = !a.json && std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    let mut stats = RenderStats::default();
    let limit = if a.rows == 0 { usize::MAX } else { a.rows };
    let mut shown = 0;
    let read = crate::data::for_each_example(&data, stage, cfg.data.skip_bad_rows, |loc, ex| {
        if shown >= limit {
            return Ok(());
        }
        shown += 1;
        // What the stage trains on: the reward model scores each completion up to its end (DPO
        // too when a row is too long); PPO generates after the prompt (cut to ppo.max_prompt_len).
        let seqs = match (a.stage.as_str(), &ex) {
            ("rm", Example::Ranked { .. }) => r.encode_reward(&ex),
            ("dpo", Example::Ranked { .. }) => r.encode_pair(&ex),
            ("ppo" | "grpo", Example::Prompt(p)) => r.encode_prompt_fit(p, cfg.ppo.max_prompt_len).map(|e| vec![e]),
            _ => r.encode_example(&ex),
        }
        .with_context(|| loc.to_string())?;
        stats.add(&seqs);
        for e in &seqs {
            if a.json {
                let mask: Vec<u8> = e.mask.iter().map(|&m| u8::from(m)).collect();
                let mut j = serde_json::json!({"row": loc.n, "ids": e.ids, "mask": mask, "text": e.text});
                if let Some(l) = &e.label {
                    j["label"] = serde_json::json!(l);
                }
                writeln!(out, "{j}")?;
                continue;
            }
            let mut head = format!("── {loc} · {} tokens · {} learned", e.ids.len(), e.learned());
            if let Some(l) = &e.label {
                head.push_str(&format!(" · {l}"));
            }
            if e.dropped_turns > 0 {
                head.push_str(&format!(" · {} earlier exchange(s) dropped", e.dropped_turns));
            }
            if e.cut_tokens > 0 {
                head.push_str(&format!(" · {} tokens cut at max_len", e.cut_tokens));
            }
            if e.special_text {
                head.push_str(" · message text holds special-token text");
            }
            writeln!(out, "{head}")?;
            let (on, off) = if color { ("\x1b[42;30m", "\x1b[0m") } else { ("⟦", "⟧") };
            let mut at = 0;
            let mut text = String::new();
            for (s, t) in learned_ranges(e) {
                text.push_str(&e.text[at..s]);
                text.push_str(on);
                text.push_str(&e.text[s..t]);
                text.push_str(off);
                at = t;
            }
            text.push_str(&e.text[at..]);
            writeln!(out, "{text}")?;
            let ids: Vec<String> = e.ids.iter().zip(&e.mask).map(|(i, &m)| if !m { i.to_string() } else if color { format!("{on}{i}{off}") } else { format!("{i}*") }).collect();
            writeln!(out, "ids: {}", ids.join(" "))?;
        }
        Ok(())
    })?;
    eprintln!(
        "{} rows rendered ({}; {}{} sequences, {} truncated ({} exchanges dropped), {} without a learned token, {} rows with special-token text in messages, {} bad rows skipped)",
        stats.rows,
        r.describe(),
        if color { "" } else { "learned text in ⟦ ⟧ and learned ids marked *; " },
        stats.sequences,
        stats.truncated,
        stats.dropped_turns,
        stats.no_learned_tokens,
        stats.special_text_rows,
        read.skipped_bad
    );
    Ok(())
}

// ---- `lorafit bench render` -----------------------------------------------------------------

/// What `lorafit bench render` measures: a data file streamed through the renderer (render,
/// spans, tokenize, mask) on rayon's threads, nothing kept.
#[derive(Debug, Serialize)]
pub struct RenderBench {
    pub rows: usize,
    pub sequences: usize,
    pub tokens: usize,
    pub learned_tokens: usize,
    pub threads: usize,
    pub seconds: f64,
    /// CPU seconds (user + system) of the process over the run: on a shared machine,
    /// `cpu_seconds / threads` is the wall time the run would take with its cores to itself.
    pub cpu_seconds: f64,
    pub rows_per_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
    pub template: String,
    /// Microseconds per row on one thread over the first 512 conversation rows: rendering,
    /// finding the assistant spans (extra renderings), tokenizing.
    pub us_per_row_render: f64,
    pub us_per_row_spans: f64,
    pub us_per_row_tokenize: f64,
}

/// Renders every row of `data` for `model`'s tokenizer and template, in batches of 4096 rows
/// rendered in parallel (memory: one batch, whatever the file size).
pub fn bench_render(model: &str, data: &Path, cfg: RenderConfig) -> Result<RenderBench> {
    use rayon::prelude::*;
    let dir = tokenizer_dir(model)?;
    let tok = Tokenizer::load(&dir.join("tokenizer.json"), &dir.join("config.json"))?;
    let r = Renderer::new(&tok, &dir, cfg)?;
    let cpu0 = cpu_seconds();
    let t0 = std::time::Instant::now();
    let (mut rows, mut seqs, mut tokens, mut learned) = (0, 0, 0, 0);
    let mut batch: Vec<Example> = Vec::with_capacity(4096);
    let mut flush = |batch: &mut Vec<Example>| -> Result<()> {
        let counts: Vec<(usize, usize, usize)> = batch
            .par_iter()
            .map(|ex| r.encode_example(ex).map(|es| (es.len(), es.iter().map(|e| e.ids.len()).sum(), es.iter().map(Encoded::learned).sum())))
            .collect::<Result<_>>()?;
        for (s, t, l) in counts {
            seqs += s;
            tokens += t;
            learned += l;
        }
        rows += batch.len();
        batch.clear();
        Ok(())
    };
    crate::data::for_each_example(data, crate::data::Stage::Any, false, |_, ex| {
        batch.push(ex);
        if batch.len() == 4096 {
            flush(&mut batch)?;
        }
        Ok(())
    })?;
    flush(&mut batch)?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    // Where one row's time goes (one thread, the first 512 conversations).
    let mut sample = vec![];
    let _ = crate::data::for_each_example(data, crate::data::Stage::Any, false, |_, ex| {
        if let (Example::Chat(m), true) = (ex, sample.len() < 512) {
            sample.push(m);
        }
        Ok(())
    });
    let n = sample.len().max(1) as f64;
    let t = std::time::Instant::now();
    let scans = sample.iter().map(|m| r.render_scan(m, false, false)).collect::<Result<Vec<_>>>()?;
    let us_render = t.elapsed().as_secs_f64() * 1e6 / n;
    let t = std::time::Instant::now();
    for (m, s) in sample.iter().zip(&scans) {
        r.assistant_spans(m, false, s)?;
    }
    let us_spans = t.elapsed().as_secs_f64() * 1e6 / n;
    let t = std::time::Instant::now();
    for s in &scans {
        r.tokenize(s, false)?;
    }
    let us_tok = t.elapsed().as_secs_f64() * 1e6 / n;
    Ok(RenderBench {
        us_per_row_render: us_render,
        us_per_row_spans: us_spans,
        us_per_row_tokenize: us_tok,
        rows,
        sequences: seqs,
        tokens,
        learned_tokens: learned,
        threads: rayon::current_num_threads(),
        seconds,
        cpu_seconds: cpu,
        rows_per_s: rows as f64 / seconds,
        tokens_per_s: tokens as f64 / seconds,
        peak_rss_bytes: crate::runtime::peak_rss_bytes(),
        template: r.describe(),
    })
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
