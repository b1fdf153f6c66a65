//! `lorafit chat`: an interactive conversation in the terminal, streaming tokens as they come.
//!
//! Each turn is rendered through the shared template: `{prompt}` receives the earlier turns
//! ("User: ...\nAssistant: ...") followed by the new message, so a model trained with
//! `lorafit sft` sees the format it learned. When the conversation outgrows the context
//! (prompt + `max_new_tokens`), the oldest turns are dropped. `/reset` forgets the history,
//! `/exit` or Ctrl-D (end of input) leaves.
use std::io::{BufRead, Write};

use anyhow::Result;

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
        let mut reply: Vec<u32> = vec![];
        let mut shown = 0; // bytes of the decoded reply already printed
        let stops = self.sampling.stop_tokens.clone();
        let tok = self.tok;
        generate_streaming(self.model, &[ids], tok.padding_id(), &self.sampling, &mut |_, t| {
            if stops.contains(&t) {
                return Ok(());
            }
            reply.push(t);
            let text = tok.decode(&reply)?;
            // Print only whole characters: a multi-byte character may span tokens.
            if !text.ends_with('\u{fffd}') && text.len() >= shown && text.is_char_boundary(shown) {
                out.write_all(text[shown..].as_bytes())?;
                out.flush()?;
                shown = text.len();
            }
            Ok(())
        })?;
        let text = tok.decode(&reply)?;
        if text.len() > shown && text.is_char_boundary(shown) {
            out.write_all(text[shown..].as_bytes())?;
        }
        writeln!(out)?;
        let text = text.trim().to_string();
        self.history.push((message.to_string(), text.clone()));
        Ok(text)
    }

    /// The read-reply loop over `input` until `/exit` or end of input.
    pub fn run(&mut self, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
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
                    self.history.clear();
                    writeln!(out, "(conversation cleared)")?;
                }
                _ => {
                    self.turn(msg, out)?;
                }
            }
        }
    }
}
