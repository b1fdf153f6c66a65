//! `lorafit chat`: an interactive conversation in the terminal, streaming tokens as they come.
//!
//! Each turn is rendered through the shared template: `{prompt}` receives the earlier turns
//! ("User: ...\nAssistant: ...") followed by the new message, so a model trained with
//! `lorafit sft` sees the format it learned. When the conversation outgrows the context
//! (prompt + `max_new_tokens`), the oldest turns are dropped. `/reset` forgets the history,
//! `/exit` or Ctrl-D (end of input) leaves.
//!
//! A model with a chat template (or `--chat-template`) chats through [`TemplateChat`]: the
//! history is a list of messages rendered by the template with `add_generation_prompt`, as
//! transformers renders it; the reply ends at any of the model's end ids (e.g. Llama 3's
//! `<|eot_id|>`), which is not shown or kept. Old exchanges are dropped to fit the context.
use std::io::{BufRead, Write};

use anyhow::Result;

use crate::data::{Message, Prompt, Role};
use crate::generate::{generate_streaming, SamplingConfig};
use crate::model::Model;
use crate::template::Template;
use crate::tokenizer::Tokenizer;

pub struct Chat<'a> {
    pub model: &'a Model,
    pub tok: &'a Tokenizer,
    pub template: Template,
    pub sampling: SamplingConfig,
    /// (user, assistant) turns so far.
    pub history: Vec<(String, String)>,
}

impl Chat<'_> {
    /// Token ids of the prompt for `message`, dropping the oldest turns until it fits.
    fn prompt_ids(&mut self, message: &str) -> Result<Vec<u32>> {
        let budget = self.model.arch.max_positions().saturating_sub(self.sampling.max_new_tokens).max(1);
        loop {
            let mut text = String::new();
            for (u, a) in &self.history {
                text.push_str(&format!("User: {u}\nAssistant: {a}\n"));
            }
            text.push_str(message);
            let mut ids = self.tok.encode(&self.template.render(&text))?;
            if ids.len() <= budget {
                return Ok(ids);
            }
            if self.history.is_empty() {
                ids.drain(..ids.len() - budget); // one message alone too long: keep its end
                return Ok(ids);
            }
            self.history.remove(0);
        }
    }

    /// One turn: streams the reply to `out` and returns it.
    pub fn turn(&mut self, message: &str, out: &mut dyn Write) -> Result<String> {
        let ids = self.prompt_ids(message)?;
        let text = stream_reply(self.model, self.tok, ids, &self.sampling, out)?;
        self.history.push((message.to_string(), text.clone()));
        Ok(text)
    }

    /// The read-reply loop over `input` until `/exit` or end of input.
    pub fn run(&mut self, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
        run_loop(self, input, out)
    }
}

/// Generates a reply to `ids`, streaming its text to `out` as whole characters; the stop token
/// that ends it is neither shown nor returned. Returns the reply, trimmed.
fn stream_reply(model: &Model, tok: &Tokenizer, ids: Vec<u32>, sampling: &SamplingConfig, out: &mut dyn Write) -> Result<String> {
    let mut reply: Vec<u32> = vec![];
    let mut shown = 0; // bytes of the decoded reply already printed
    let stops = sampling.stop_tokens.clone();
    generate_streaming(model, &[ids], tok.padding_id(), sampling, &mut |_, t| {
        if stops.contains(&t) {
            return Ok(());
        }
        reply.push(t);
        let text = tok.decode(&reply)?;
        // Print only whole characters: a multi-byte character may span tokens.
        if !text.ends_with('\u{fffd}') && text.len() >= shown && text.is_char_boundary(shown) {
            out.write_all(&text.as_bytes()[shown..])?;
            out.flush()?;
            shown = text.len();
        }
        Ok(())
    })?;
    let text = tok.decode(&reply)?;
    if text.len() > shown && text.is_char_boundary(shown) {
        out.write_all(&text.as_bytes()[shown..])?;
    }
    writeln!(out)?;
    Ok(text.trim().to_string())
}

/// A conversation that can take a turn and be reset.
pub trait Conversation {
    fn turn(&mut self, message: &str, out: &mut dyn Write) -> Result<String>;
    fn reset(&mut self);
}

impl Conversation for Chat<'_> {
    fn turn(&mut self, message: &str, out: &mut dyn Write) -> Result<String> {
        Chat::turn(self, message, out)
    }
    fn reset(&mut self) {
        self.history.clear();
    }
}

/// A chat through the model's chat template (see the module doc).
pub struct TemplateChat<'a> {
    pub model: &'a Model,
    pub renderer: crate::render::Renderer<'a>,
    pub sampling: SamplingConfig,
    pub system: Option<String>,
    /// The conversation so far (without the system message).
    pub history: Vec<Message>,
}

impl<'a> TemplateChat<'a> {
    pub fn new(model: &'a Model, renderer: crate::render::Renderer<'a>, sampling: SamplingConfig, system: Option<String>) -> Self {
        Self { model, renderer, sampling, system, history: vec![] }
    }

    /// The prompt ids for the history + `message`, dropping the oldest exchanges until the
    /// prompt and `max_new_tokens` fit the context.
    pub fn prompt_ids(&mut self, message: &str) -> Result<Vec<u32>> {
        let budget = self.model.arch.max_positions().saturating_sub(self.sampling.max_new_tokens).max(1);
        loop {
            let mut msgs: Vec<Message> = self.system.iter().map(|s| Message::new(Role::System, s.clone())).collect();
            msgs.extend(self.history.iter().cloned());
            msgs.push(Message::new(Role::User, message));
            let mut ids = self.renderer.encode_prompt(&Prompt::Messages(msgs))?.ids;
            if ids.len() <= budget {
                return Ok(ids);
            }
            if self.history.is_empty() {
                ids.drain(..ids.len() - budget); // one message alone too long: keep its end
                return Ok(ids);
            }
            // Drop the oldest exchange (a user message and the replies after it).
            let next = self.history.iter().skip(1).position(|m| m.role == Role::User).map_or(self.history.len(), |p| p + 1);
            self.history.drain(..next);
        }
    }
}

impl Conversation for TemplateChat<'_> {
    fn turn(&mut self, message: &str, out: &mut dyn Write) -> Result<String> {
        let ids = self.prompt_ids(message)?;
        let text = stream_reply(self.model, self.renderer.tok, ids, &self.sampling, out)?;
        self.history.push(Message::new(Role::User, message));
        self.history.push(Message::new(Role::Assistant, text.clone()));
        Ok(text)
    }
    fn reset(&mut self) {
        self.history.clear();
    }
}

/// The read-reply loop over `input` until `/exit` or end of input.
pub fn run_loop(chat: &mut dyn Conversation, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "lorafit chat: type a message; /reset forgets the conversation, /exit (or Ctrl-D) leaves.")?;
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let msg = line.trim();
        match msg {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                chat.reset();
                writeln!(out, "(conversation cleared)")?;
            }
            _ => {
                chat.turn(msg, out)?;
            }
        }
    }
}
