//! Chat templates: the Jinja text a model ships in `tokenizer_config.json` (`chat_template`, a
//! string or the named-list form) or `chat_template.jinja`, rendered as transformers'
//! `apply_chat_template` renders it: minijinja with Python's string and dict methods
//! (minijinja-contrib `pycompat`), `trim_blocks` + `lstrip_blocks`, loop controls,
//! `raise_exception`, `strftime_now`, a `tojson` that writes what Python's `json.dumps` writes,
//! and the variables `messages`, `add_generation_prompt`, `tools` = none, `documents` = none and
//! the named special tokens (`bos_token`, `eos_token`, ...).
//!
//! `{% generation %}` ... `{% endgeneration %}` (transformers' marker for the tokens the
//! assistant writes) is rewritten into an `if` block that prints a private marker character
//! at each end, with the tags' whitespace control kept, so the rendered text is unchanged and the
//! markers give the character spans transformers reports. Models without a template use a named
//! built-in ([`BUILTINS`]).
//! Reference: transformers `utils/chat_template_utils.py` (`_cached_compile_jinja_template`,
//! `render_jinja_template`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::data::{Message, Role};

/// Private-use characters that lorafit writes into a rendering and removes again: the two
/// ends of a `{% generation %}` block and of an assistant message's content. Message text that
/// contains them is refused (it cannot be told apart).
pub const GEN_START: char = '\u{10FFF0}';
pub const GEN_END: char = '\u{10FFF1}';
pub const CONTENT_START: char = '\u{10FFF2}';
pub const CONTENT_END: char = '\u{10FFF3}';
/// transformers' markers around control-token text typed by a user (`sanitize_control_tokens`).
pub const CTRL_START: char = '\u{F0000}';
pub const CTRL_END: char = '\u{F0001}';

/// Names of the built-in templates, for models that ship none.
pub const BUILTINS: [&str; 4] = ["kochatgpt", "chatml", "alpaca", "llama3"];

/// KoChatGPT's bilingual Alpaca format for conversations: a single-turn conversation renders
/// exactly as `template::KOCHATGPT_TEMPLATE` + completion + eos (a system message replaces the
/// preamble); later turns repeat the instruction/response block.
const KOCHATGPT: &str = "{%- if messages[0].role == 'system' -%}
{{ messages[0].content }}{% set loop_messages = messages[1:] %}
{%- else -%}
Below is an instruction that describes a task.\n아래는 작업을 설명하는 명령어입니다.\n\nWrite a response that appropriately completes the request.\n명령어에 따른 요청을 적절히 완료하는 응답을 작성하세요.{% set loop_messages = messages %}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == 'user' -%}
{{ '\\n\\n### Instruction(명령어):\\n' + message.content + '\\n\\n### Response(응답):' }}
{%- elif message.role == 'assistant' -%}
{% generation %}{{ message.content + eos_token }}{% endgeneration %}
{%- endif -%}
{%- endfor -%}";

/// ChatML (Qwen's format) without tools.
const CHATML: &str = "{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}
{%- else -%}
{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}";

/// Stanford Alpaca's format; a system message replaces the preamble.
const ALPACA: &str = "{%- if messages[0].role == 'system' -%}
{{ messages[0].content }}{% set loop_messages = messages[1:] %}
{%- else -%}
Below is an instruction that describes a task. Write a response that appropriately completes the request.{% set loop_messages = messages %}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == 'user' -%}
{{ '\\n\\n### Instruction:\\n' + message.content + '\\n\\n### Response:\\n' }}
{%- elif message.role == 'assistant' -%}
{% generation %}{{ message.content + eos_token }}{% endgeneration %}
{%- endif -%}
{%- endfor -%}";

/// Llama 3's format (without 3.1's date and tool header).
const LLAMA3: &str = "{{- bos_token }}
{%- for message in messages -%}
{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
{%- if message.role == 'assistant' -%}
{% generation %}{{ message.content | trim + '<|eot_id|>' }}{% endgeneration %}
{%- else -%}
{{ message.content | trim + '<|eot_id|>' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif -%}";

/// The named special tokens a template sees (transformers' `special_tokens_map`).
pub const SPECIAL_NAMES: [&str; 7] = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// Where a template came from, for messages and `lorafit render`.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// The model folder's `tokenizer_config.json` or `chat_template.jinja`.
    Model(PathBuf),
    Builtin(&'static str),
    File(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Model(p) => write!(f, "the model's chat template ({})", p.display()),
            Origin::Builtin(n) => write!(f, "the built-in {n} template"),
            Origin::File(p) => write!(f, "the chat template {}", p.display()),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    pub origin: Origin,
    /// The Jinja text as given (what `merge` writes into tokenizer_config.json).
    pub source: String,
    env: Environment<'static>,
    /// The template has `{% generation %}` markers.
    pub has_generation: bool,
    /// Tokenize the rendering with the tokenizer's own special-token rules (a bos added by its
    /// post-processor): true for built-ins that do not write bos themselves, as the `{prompt}`
    /// template always did; false for model templates, as transformers (they write bos).
    pub add_special_tokens: bool,
    /// bos_token, eos_token, ...: the named special tokens.
    pub vars: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("has_generation", &self.has_generation).finish()
    }
}

/// What the model folder says about chat: its template (if any) and its special tokens.
#[derive(Clone, Debug, Default)]
pub struct ModelChatFiles {
    pub template: Option<(String, PathBuf)>,
    /// bos_token etc. as strings.
    pub vars: BTreeMap<String, String>,
    /// tokenizer_config.json's `chat_control_tokens`, when set.
    pub control_tokens: Option<Vec<String>>,
}

/// A special-token value: a string or an AddedToken object `{"content": ...}`.
fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl ModelChatFiles {
    /// Reads `chat_template.jinja` (transformers' own file, preferred as it does) or
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`
    /// whose "default" entry is taken), and the special tokens of tokenizer_config.json /
    /// special_tokens_map.json.
    pub fn read(dir: &Path) -> Result<Self> {
        let mut out = Self::default();
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).with_context(|| format!("{}: invalid JSON", cfg_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let map: serde_json::Value = std::fs::read_to_string(dir.join("special_tokens_map.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        for name in SPECIAL_NAMES {
            if let Some(s) = cfg.get(name).and_then(token_string).or_else(|| map.get(name).and_then(token_string)) {
                out.vars.insert(name.to_string(), s);
            }
        }
        out.control_tokens = cfg.get("chat_control_tokens").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect());
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?;
            out.template = Some((text, jinja));
            return Ok(out);
        }
        match cfg.get("chat_template") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) => out.template = Some((s.clone(), cfg_path.clone())),
            Some(serde_json::Value::Array(list)) => {
                let named = |n: &str| list.iter().find(|e| e.get("name").and_then(|x| x.as_str()) == Some(n));
                let entry = named("default").or_else(|| list.first());
                let text = entry.and_then(|e| e.get("template")).and_then(|t| t.as_str()).with_context(|| {
                    format!("{}: \"chat_template\" is a list without a {{\"name\": \"default\", \"template\": ...}} entry", cfg_path.display())
                })?;
                out.template = Some((text.to_string(), cfg_path.clone()));
            }
            Some(other) => bail!("{}: \"chat_template\" must be a string or a list of {{name, template}}, found {other}", cfg_path.display()),
        }
        Ok(out)
    }
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` into blocks that print a marker, keeping
/// each tag's whitespace control (`-`, `+`) on a block tag, so trimming is unchanged.
fn rewrite_generation(source: &str) -> (String, bool) {
    let re = regex::Regex::new(r"\{%([-+]?)\s*(generation|endgeneration)\s*([-+]?)%\}").unwrap();
    let mut found = false;
    let out = re.replace_all(source, |c: &regex::Captures| {
        found = true;
        let mark = if &c[2] == "generation" { GEN_START } else { GEN_END };
        format!("{{%{} if true %}}{{{{ \"{mark}\" }}}}{{% endif {}%}}", &c[1], &c[3])
    });
    (out.into_owned(), found)
}

/// transformers' `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("the chat template refused the conversation: {msg}")))
}

/// transformers' `strftime_now(format)`: the current UTC date/time (the common directives).
fn strftime_now(fmt: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Ok(Value::from(strftime(&fmt, secs)))
}

/// `strftime` for UTC seconds: %d %m %Y %y %b %B %a %A %H %M %S %j %%.
pub fn strftime(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let jday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('a') => out.push_str(&DAYS[days.rem_euclid(7) as usize][..3]),
            Some('A') => out.push_str(DAYS[days.rem_euclid(7) as usize]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{jday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A JSON string as Python's `json.dumps(..., ensure_ascii=False)` writes it.
fn py_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `v` as Python's `json.dumps(v, ensure_ascii=False, indent=indent, sort_keys=sort)` text
/// (separators `", "` and `": "`, or `","` with an indent).
fn py_json(v: &Value, indent: Option<usize>, sort: bool, level: usize, out: &mut String) -> Result<(), Error> {
    let nl = |out: &mut String, l: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * l));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&format!("{f}"));
                }
            }
        }
        ValueKind::String | ValueKind::Bytes => py_json_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                nl(out, level + 1);
                py_json(x, indent, sort, level + 1, out)?;
            }
            if !items.is_empty() {
                nl(out, level);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                nl(out, level + 1);
                match k.as_str() {
                    Some(s) => py_json_str(s, out),
                    None => py_json_str(&k.to_string(), out),
                }
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, sort, level + 1, out)?;
            }
            if !keys.is_empty() {
                nl(out, level);
            }
            out.push('}');
        }
        _ => py_json_str(&v.to_string(), out),
    }
    Ok(())
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, sort_keys=False)`.
fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(&v, indent, sort.unwrap_or(false), 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn environment(source: &str) -> Result<(Environment<'static>, bool)> {
    let mut env = Environment::new();
    env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    let (text, has_generation) = rewrite_generation(source);
    env.add_template_owned("chat", text).map_err(|e| anyhow::anyhow!("the chat template does not parse: {e:#}"))?;
    Ok((env, has_generation))
}

/// One message as the template sees it.
#[derive(serde::Serialize)]
struct TMessage<'a> {
    role: &'a str,
    content: std::borrow::Cow<'a, str>,
}

impl ChatTemplate {
    /// Compiles `source`; `vars` are the named special tokens.
    pub fn new(origin: Origin, source: &str, vars: BTreeMap<String, String>, add_special_tokens: bool) -> Result<Self> {
        let (env, has_generation) = environment(source).with_context(|| format!("compiling {origin}"))?;
        Ok(Self { origin, source: source.to_string(), env, has_generation, add_special_tokens, vars })
    }

    /// A built-in template by name; `vars` must hold eos_token for those that write it.
    pub fn builtin(name: &str, vars: BTreeMap<String, String>) -> Result<Self> {
        let (n, src) = match name {
            "kochatgpt" => ("kochatgpt", KOCHATGPT),
            "chatml" => ("chatml", CHATML),
            "alpaca" => ("alpaca", ALPACA),
            "llama3" => ("llama3", LLAMA3),
            other => bail!("no built-in chat template {other:?} (built-ins: {})", BUILTINS.join(", ")),
        };
        if src.contains("eos_token") && !vars.contains_key("eos_token") {
            bail!("the built-in {n} template writes eos_token, and this tokenizer has no end-of-sequence token")
        }
        if src.contains("bos_token") && !vars.contains_key("bos_token") {
            bail!("the built-in {n} template writes bos_token, and this tokenizer has no begin-of-sequence token")
        }
        // llama3 writes its bos itself; the others rely on the tokenizer's own rules.
        Self::new(Origin::Builtin(n), src, vars, n != "llama3")
    }

    /// A `.jinja` file given by path.
    pub fn from_file(path: &Path, vars: BTreeMap<String, String>) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read chat template {}", path.display()))?;
        Self::new(Origin::File(path.to_path_buf()), &text, vars, false)
    }

    /// Renders `messages`; assistant contents are wrapped in the content markers when `wrap`,
    /// and `content` is replaced by `map(i, content)` first (the control-token marking).
    pub fn render_with(&self, messages: &[Message], add_generation_prompt: bool, wrap: bool, map: Option<&dyn Fn(&str) -> String>) -> Result<String> {
        let msgs: Vec<TMessage> = messages
            .iter()
            .map(|m| {
                let mut c: std::borrow::Cow<str> = match map {
                    Some(f) => f(&m.content).into(),
                    None => m.content.as_str().into(),
                };
                if wrap && m.role == Role::Assistant {
                    c = format!("{CONTENT_START}{c}{CONTENT_END}").into();
                }
                TMessage { role: m.role.as_str(), content: c }
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        for (k, v) in &self.vars {
            ctx.insert(k.as_str(), Value::from(v.as_str()));
        }
        ctx.insert("messages", Value::from(minijinja::value::Serde(&msgs)));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(Value::from(minijinja::value::Serde(&ctx))).map_err(|e| anyhow::anyhow!("{e:#}")).with_context(|| format!("rendering {}", self.origin))
    }

    /// The rendered text, as `apply_chat_template(messages, tokenize=False)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.render_with(messages, add_generation_prompt, false, None)?;
        Ok(t.replace([GEN_START, GEN_END], ""))
    }
}

/// Message text that holds one of lorafit's private marker characters cannot be rendered
/// with spans; the error names the message.
pub fn check_private_chars(messages: &[Message]) -> Result<()> {
    for (i, m) in messages.iter().enumerate() {
        if m.content.chars().any(|c| matches!(c, GEN_START | GEN_END | CONTENT_START | CONTENT_END)) {
            bail!("message {i} contains a private-use character U+10FFF0..U+10FFF3 that lorafit uses as a marker")
        }
    }
    Ok(())
}

/// Makes the merged model folder `out` carry a chat template in its tokenizer_config.json, so
/// every runtime picks it up: `template` when given (the one an adapter was trained with),
/// else the base model's (from its chat_template.jinja or tokenizer_config.json). A folder
/// without tokenizer_config.json, or whose file already holds that template, is left as it is.
pub fn install_chat_template(model_dir: &Path, out: &Path, template: Option<&str>) -> Result<()> {
    let base = ModelChatFiles::read(model_dir)?;
    let Some(text) = template.map(str::to_string).or(base.template.map(|(t, _)| t)) else { return Ok(()) };
    let path = out.join("tokenizer_config.json");
    // Only a tokenizer_config.json the merge copied is edited (merge installs the files it lists).
    let Ok(raw) = std::fs::read_to_string(&path) else { return Ok(()) };
    let mut cfg: serde_json::Value = serde_json::from_str(&raw).with_context(|| format!("{}: invalid JSON", path.display()))?;
    if cfg.get("chat_template").and_then(|v| v.as_str()) == Some(text.as_str()) {
        return Ok(());
    }
    let obj = cfg.as_object_mut().with_context(|| format!("{}: not a JSON object", path.display()))?;
    obj.insert("chat_template".into(), serde_json::Value::String(text));
    crate::io::atomic_write(&path, serde_json::to_string_pretty(&cfg)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        let (t, found) = rewrite_generation("a {%- generation -%} b {% endgeneration +%}");
        assert!(found);
        assert_eq!(t, format!("a {{%- if true %}}{{{{ \"{GEN_START}\" }}}}{{% endif -%}} b {{% if true %}}{{{{ \"{GEN_END}\" }}}}{{% endif +%}}"));
    }

    #[test]
    fn strftime_matches_python() {
        // datetime.fromtimestamp(1721952000, timezone.utc).strftime(...)
        assert_eq!(strftime("%d %b %Y", 1721952000), "26 Jul 2024");
        assert_eq!(strftime("%A %B %j %H:%M:%S %y %m %%", 1721952000 + 3723), "Friday July 208 01:02:03 24 07 %");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let env = environment("{{ x | tojson }}|{{ x | tojson(indent=2) }}").unwrap().0;
        let x = serde_json::json!({"b": [1, 2.5, "é\n"], "a": null});
        let out = env.get_template("chat").unwrap().render(minijinja::context! { x => Value::from(minijinja::value::Serde(&x)) }).unwrap();
        // serde_json sorts keys here (no preserve_order), so "a" comes first.
        assert_eq!(out, "{\"a\": null, \"b\": [1, 2.5, \"é\\n\"]}|{\n  \"a\": null,\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\"\n  ]\n}");
    }
}
