//! The one prompt template used by every stage (SFT, reward model, PPO, chat), so a policy is
//! trained, scored and sampled on the same text. KoChatGPT used three different formats for
//! its three stages (REFERENCE §2, flaw 3); lorafit uses this one everywhere.
use anyhow::{bail, Result};

/// KoChatGPT's bilingual Alpaca template; `{prompt}` is replaced by the instruction.
pub const KOCHATGPT_TEMPLATE: &str = "Below is an instruction that describes a task.\n아래는 작업을 설명하는 명령어입니다.\n\nWrite a response that appropriately completes the request.\n명령어에 따른 요청을 적절히 완료하는 응답을 작성하세요.\n\n### Instruction(명령어):\n{prompt}\n\n### Response(응답):";

#[derive(Clone, Debug)]
pub struct Template(String);

impl Template {
    /// A template must contain `{prompt}` exactly once.
    pub fn new(text: &str) -> Result<Self> {
        match text.matches("{prompt}").count() {
            1 => Ok(Self(text.to_string())),
            0 => bail!("the prompt template has no {{prompt}} placeholder: {text:?}"),
            n => bail!("the prompt template has {n} {{prompt}} placeholders, expected one"),
        }
    }

    /// A config or flag value: empty means the default (KoChatGPT's) template.
    pub fn or_default(text: &str) -> Result<Self> {
        if text.is_empty() { Ok(Self::kochatgpt()) } else { Self::new(text) }
    }

    pub fn kochatgpt() -> Self {
        Self(KOCHATGPT_TEMPLATE.to_string())
    }

    pub fn render(&self, prompt: &str) -> String {
        self.0.replace("{prompt}", prompt)
    }

    pub fn text(&self) -> &str {
        &self.0
    }
}

impl Default for Template {
    fn default() -> Self {
        Self::kochatgpt()
    }
}
