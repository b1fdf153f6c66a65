//! Reading training data: JSON arrays, JSON Lines or Parquet (detected from the content, not the
//! file name; a UTF-8 BOM is tolerated), streamed record by record, with errors that name the
//! file, the row or line, and the field.
//!
//! SFT rows: KoChatGPT's `{"prompt", "completion", "tokens"}` (`tokens` ignored: it is an OpenAI
//! count) or Alpaca's `{"instruction", "input", "output"}` (prompt = instruction, plus
//! `"\n\n" + input` when input is non-empty). Conversations (OpenAI `messages`, ShareGPT
//! `conversations`, TRL's conversational prompt/completion and preference rows) are read by
//! [`read_examples`] into [`Example`]s; `render.rs` turns them into token ids and loss masks.
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::error::{tagged, Kind};

/// Where a record sits in its file: "row 3" of a JSON array or Parquet file, "line 3" of JSON Lines.
#[derive(Clone, Debug)]
pub struct Loc {
    pub file: String,
    pub kind: &'static str,
    pub n: usize,
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}", self.file, self.kind, self.n)
    }
}

/// One record of a data file: a parsed JSON value, or a record that is not valid JSON (a
/// malformed line or array element: a bad row that `--skip-bad-rows` may skip).
pub enum Record {
    Value(Loc, Value),
    Bad(Loc, anyhow::Error),
}

/// A stream of records; an `Err` item is fatal (unreadable file, broken array structure).
pub type Records = Box<dyn Iterator<Item = Result<Record>> + Send>;

/// The accepted top-level shapes, for error messages.
const SHAPES: &str = "a JSON array of row objects ([{...}, {...}]), JSON Lines (one object per line), or a Parquet file";

/// Opens a data file as a stream of records: Parquet (by its `PAR1` magic), a JSON array (the
/// first non-blank character is `[`), or JSON Lines. Memory does not grow with the file size.
pub fn open_records(path: &Path) -> Result<Records> {
    let file = path.display().to_string();
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read data file {file}"))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).with_context(|| format!("cannot read data file {file}"))?;
    if n == 4 && &magic == b"PAR1" {
        return parquet_records(path);
    }
    let mut r = BufReader::with_capacity(1 << 16, std::fs::File::open(path).with_context(|| format!("cannot read data file {file}"))?);
    // Skip a BOM and leading whitespace to see the first character.
    let mut line = 1;
    loop {
        let buf = r.fill_buf().with_context(|| format!("cannot read data file {file}"))?;
        if buf.is_empty() {
            bail!("{file}: the file is empty")
        }
        if buf.starts_with(b"\xEF\xBB\xBF") {
            r.consume(3);
            continue;
        }
        let ws = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
        line += buf[..ws].iter().filter(|&&b| b == b'\n').count();
        let more = ws < buf.len();
        let first = buf.get(ws).copied();
        r.consume(ws);
        if more {
            if first == Some(b'[') {
                r.consume(1);
                return Ok(Box::new(ArrayRecords { r, file, row: 0, line, done: false }));
            }
            return Ok(Box::new(LineRecords { r, path: path.to_path_buf(), file, line: line - 1, buf: vec![], seen: false }));
        }
    }
}

/// JSON Lines, line by line.
struct LineRecords {
    r: BufReader<std::fs::File>,
    path: std::path::PathBuf,
    file: String,
    line: usize,
    buf: Vec<u8>,
    /// A non-blank line was read already.
    seen: bool,
}

impl Iterator for LineRecords {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            self.buf.clear();
            match self.r.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(anyhow::Error::new(e).context(format!("cannot read data file {}", self.file)))),
            }
            self.line += 1;
            let text = match std::str::from_utf8(&self.buf) {
                Ok(t) => t,
                Err(_) => return Some(Err(tagged(Kind::NotUtf8, format!("{}: line {} is not valid UTF-8", self.file, self.line)))),
            };
            if text.trim().is_empty() {
                continue;
            }
            let loc = Loc { file: self.file.clone(), kind: "line", n: self.line };
            let first = !std::mem::replace(&mut self.seen, true);
            return Some(Ok(match serde_json::from_str::<Value>(text) {
                Ok(v) => Record::Value(loc, v),
                Err(e) => {
                    // A pretty-printed JSON object breaks at its first line: say what the file is.
                    if first && text.trim_start().starts_with('{') && e.is_eof() {
                        if let Some(msg) = one_object(&self.path, &self.file) {
                            return Some(Err(anyhow::anyhow!(msg)));
                        }
                    }
                    Record::Bad(loc.clone(), anyhow::Error::new(e).context(format!("{loc}: invalid JSON (read as JSON Lines: one JSON object per line)")))
                }
            }));
        }
    }
}

/// If the whole file is one JSON object, the message that says so.
fn one_object(path: &Path, file: &str) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let o = v.as_object()?;
    let keys: Vec<&str> = o.keys().map(String::as_str).take(6).collect();
    let list = o.iter().find(|(_, v)| v.is_array()).map(|(k, _)| format!(" (its array \"{k}\" may hold the rows: write that array alone to a file)")).unwrap_or_default();
    Some(format!(
        "{file}: the file is one JSON object spread over several lines (keys: {}), not a data file{list}; accepted: {SHAPES}",
        keys.join(", ")
    ))
}

/// A JSON array, element by element: each element's bytes are cut at the top-level commas
/// (strings and nesting tracked), then parsed alone, so a bad element is one bad row.
struct ArrayRecords {
    r: BufReader<std::fs::File>,
    file: String,
    row: usize,
    line: usize,
    done: bool,
}

impl ArrayRecords {
    fn byte(&mut self) -> Result<Option<u8>> {
        let buf = self.r.fill_buf().with_context(|| format!("cannot read data file {}", self.file))?;
        let b = buf.first().copied();
        if b.is_some() {
            self.r.consume(1);
        }
        if b == Some(b'\n') {
            self.line += 1;
        }
        Ok(b)
    }

    fn element(&mut self) -> Result<Option<(usize, Vec<u8>)>> {
        // Skip whitespace; `]` ends the array.
        let mut b = loop {
            match self.byte()? {
                None => bail!("{}: the JSON array is not closed (no ']' after row {})", self.file, self.row),
                Some(c) if c.is_ascii_whitespace() => continue,
                Some(c) => break c,
            }
        };
        if b == b']' {
            if self.row == 0 {
                bail!("{}: the JSON array is empty", self.file)
            }
            loop {
                match self.byte()? {
                    None => return Ok(None),
                    Some(c) if c.is_ascii_whitespace() => continue,
                    Some(_) => bail!("{}: line {}: text after the end of the JSON array", self.file, self.line),
                }
            }
        }
        let start_line = self.line;
        let (mut out, mut depth, mut in_str, mut esc) = (Vec::new(), 0i64, false, false);
        loop {
            if in_str {
                if esc {
                    esc = false;
                } else if b == b'\\' {
                    esc = true;
                } else if b == b'"' {
                    in_str = false;
                }
            } else {
                match b {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => depth -= 1,
                    b']' | b',' if depth == 0 => {
                        if b == b']' {
                            self.done = true;
                        }
                        return Ok(Some((start_line, out)));
                    }
                    _ => {}
                }
            }
            out.push(b);
            b = match self.byte()? {
                Some(c) => c,
                None => bail!("{}: the JSON array is not closed (row {} starting at line {start_line} runs to the end of the file)", self.file, self.row + 1),
            };
        }
    }
}

impl Iterator for ArrayRecords {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Result<Record>> {
        if self.done {
            // Only whitespace may follow the closing bracket.
            loop {
                match self.byte() {
                    Err(e) => return Some(Err(e)),
                    Ok(None) => return None,
                    Ok(Some(c)) if c.is_ascii_whitespace() => continue,
                    Ok(Some(_)) => {
                        self.done = false;
                        return Some(Err(anyhow::anyhow!("{}: line {}: text after the end of the JSON array", self.file, self.line)));
                    }
                }
            }
        }
        let (line, bytes) = match self.element() {
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
            Ok(None) => return None,
            Ok(Some(x)) => x,
        };
        self.row += 1;
        let loc = Loc { file: self.file.clone(), kind: "row", n: self.row };
        if std::str::from_utf8(&bytes).is_err() {
            return Some(Err(tagged(Kind::NotUtf8, format!("{loc} (line {line}) is not valid UTF-8"))));
        }
        Some(Ok(match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => Record::Value(loc, v),
            Err(e) => Record::Bad(loc.clone(), anyhow::Error::new(e).context(format!("{loc} (line {line}): invalid JSON (the file starts with '[' so it is read as one JSON array)"))),
        }))
    }
}

/// A Parquet file (what Hugging Face `datasets` stores), row group by row group; each row as a
/// JSON object (lists of structs become arrays of objects).
fn parquet_records(path: &Path) -> Result<Records> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = path.display().to_string();
    let f = std::fs::File::open(path).with_context(|| format!("cannot read data file {file}"))?;
    let reader = SerializedFileReader::new(f).with_context(|| format!("{file}: not a readable Parquet file"))?;
    if reader.metadata().file_metadata().num_rows() == 0 {
        bail!("{file}: the Parquet file has no rows")
    }
    let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader) as Box<dyn FileReader>);
    let mut n = 0;
    Ok(Box::new(rows.map(move |r| {
        n += 1;
        let loc = Loc { file: file.clone(), kind: "row", n };
        match r {
            Ok(row) => Ok(Record::Value(loc, row.to_json_value())),
            Err(e) => {
                let hint = if e.to_string().contains("Disabled feature") {
                    " (a codec this build lacks: zstd needs `cargo build --release --features parquet-zstd`; or re-save the file with snappy, pyarrow's default)"
                } else {
                    ""
                };
                Err(anyhow::anyhow!("{loc}: cannot read the Parquet data: {e}{hint}"))
            }
        }
    })))
}

/// Every record of a data file, with its location; the first malformed record is an error.
pub fn read_records(path: &Path) -> Result<Vec<(Loc, Value)>> {
    let mut out = vec![];
    for r in open_records(path)? {
        match r? {
            Record::Value(loc, v) => out.push((loc, v)),
            Record::Bad(_, e) => return Err(e),
        }
    }
    if out.is_empty() {
        bail!("{}: no records", path.display())
    }
    Ok(out)
}

/// Every record of a data file; with `skip_bad_rows`, malformed records (invalid JSON lines or
/// array elements) are logged, counted and left out. Returns the records and the number skipped.
pub fn read_records_skipping(path: &Path, skip_bad_rows: bool) -> Result<(Vec<(Loc, Value)>, usize)> {
    let (mut out, mut skipped) = (vec![], 0);
    for r in open_records(path)? {
        match r? {
            Record::Value(loc, v) => out.push((loc, v)),
            Record::Bad(_, e) if skip_bad_rows => {
                tracing::warn!("skipping bad row: {e:#}");
                skipped += 1;
            }
            Record::Bad(_, e) => return Err(e),
        }
    }
    if out.is_empty() {
        bail!("{}: no usable records ({skipped} skipped)", path.display())
    }
    Ok((out, skipped))
}

/// A required string field of a record.
pub fn str_field<'a>(v: &'a Value, loc: &Loc, field: &str) -> Result<&'a str> {
    let obj = v.as_object().with_context(|| format!("{loc}: expected a JSON object, found {}", kind_of(v)))?;
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("{loc}: field \"{field}\" must be a string, found {}", kind_of(other)),
        None => bail!("{loc}: missing field \"{field}\""),
    }
}

pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses every record with `parse`. A bad row stops the read, or with `skip_bad_rows` is
/// logged and counted. Returns the rows and the number skipped.
pub fn parse_rows<T>(
    path: &Path,
    records: &[(Loc, Value)],
    skip_bad_rows: bool,
    parse: impl Fn(&Value, &Loc) -> Result<T>,
) -> Result<(Vec<T>, usize)> {
    let (mut rows, mut skipped) = (vec![], 0);
    for (loc, v) in records {
        match parse(v, loc) {
            Ok(r) => rows.push(r),
            Err(e) if skip_bad_rows => {
                tracing::warn!("skipping bad row: {e:#}");
                skipped += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if rows.is_empty() {
        bail!("{}: no usable rows ({skipped} skipped)", path.display())
    }
    Ok((rows, skipped))
}

/// One supervised pair.
#[derive(Clone, Debug)]
pub struct SftRow {
    pub prompt: String,
    pub completion: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SftFormat {
    KoChatGpt,
    Alpaca,
}

fn detect(v: &Value) -> Option<SftFormat> {
    let o = v.as_object()?;
    if o.contains_key("prompt") || o.contains_key("completion") {
        Some(SftFormat::KoChatGpt)
    } else if o.contains_key("instruction") || o.contains_key("output") {
        Some(SftFormat::Alpaca)
    } else {
        None
    }
}

fn sft_row(v: &Value, loc: &Loc, format: SftFormat) -> Result<SftRow> {
    Ok(match format {
        SftFormat::KoChatGpt => SftRow { prompt: str_field(v, loc, "prompt")?.into(), completion: str_field(v, loc, "completion")?.into() },
        SftFormat::Alpaca => {
            let instruction = str_field(v, loc, "instruction")?;
            let input = match v.get("input") {
                None | Some(Value::Null) => "",
                Some(_) => str_field(v, loc, "input")?,
            };
            let prompt = if input.trim().is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") };
            SftRow { prompt, completion: str_field(v, loc, "output")?.into() }
        }
    })
}

/// Reads SFT rows. With `skip_bad_rows`, a bad row is counted and skipped instead of failing.
/// Returns the rows and the number skipped.
pub fn read_sft(path: &Path, skip_bad_rows: bool) -> Result<(Vec<SftRow>, SftFormat, usize)> {
    let (records, bad) = read_records_skipping(path, skip_bad_rows)?;
    let format = records.iter().find_map(|(_, v)| detect(v)).with_context(|| {
        format!(
            "{}: no row has SFT fields: expected {{\"prompt\", \"completion\"}} (KoChatGPT) or {{\"instruction\", \"input\", \"output\"}} (Alpaca)",
            path.display()
        )
    })?;
    let (rows, skipped) = parse_rows(path, &records, skip_bad_rows, |v, loc| sft_row(v, loc, format))?;
    Ok((rows, format, skipped + bad))
}

/// One prompt with its K >= 2 ranked completions, expanded to preference pairs.
#[derive(Clone, Debug)]
pub struct RankedRow {
    pub prompt: String,
    pub completions: Vec<String>,
    /// (chosen, rejected) indices into `completions`: every better-worse pair (ties give none).
    pub pairs: Vec<(usize, usize)>,
}

/// KoChatGPT's `{"prompt", "completion_0".., "ranking"}` (ranking[i] = rank of completion_i,
/// 0 best; ties allowed) or TRL's `{"prompt", "chosen", "rejected"}`.
fn ranked_row(v: &Value, loc: &Loc) -> Result<RankedRow> {
    let prompt = str_field(v, loc, "prompt")?.to_string();
    let o = v.as_object().unwrap();
    let nonempty = |field: &str| -> Result<String> {
        let s = str_field(v, loc, field)?;
        if s.trim().is_empty() {
            bail!("{loc}: field \"{field}\" is empty")
        }
        Ok(s.to_string())
    };
    if o.contains_key("chosen") || o.contains_key("rejected") {
        let (chosen, rejected) = (nonempty("chosen")?, nonempty("rejected")?);
        if chosen == rejected {
            bail!("{loc}: fields \"chosen\" and \"rejected\" are identical")
        }
        return Ok(RankedRow { prompt, completions: vec![chosen, rejected], pairs: vec![(0, 1)] });
    }
    let ranking = match o.get("ranking") {
        Some(Value::Array(a)) => a,
        Some(other) => bail!("{loc}: field \"ranking\" must be an array, found {}", kind_of(other)),
        None => bail!("{loc}: missing field \"ranking\" (or \"chosen\"/\"rejected\")"),
    };
    let k = ranking.len();
    let present = (0..).take_while(|i| o.contains_key(&format!("completion_{i}"))).count();
    if k < 2 {
        bail!("{loc}: field \"ranking\" has {k} entries; a ranking needs at least 2 completions")
    }
    if present > k {
        bail!("{loc}: field \"ranking\" has {k} entries but the row has {present} completions (completion_0..completion_{})", present - 1)
    }
    let completions = (0..k).map(|i| nonempty(&format!("completion_{i}"))).collect::<Result<Vec<_>>>()?;
    let ranks = ranking
        .iter()
        .map(|r| r.as_u64().filter(|&r| (r as usize) < k).map(|r| r as usize))
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("{loc}: field \"ranking\" = {} must hold integer ranks 0..{} (0 = best)", Value::Array(ranking.clone()), k - 1))?;
    if !ranks.contains(&0) {
        bail!("{loc}: field \"ranking\" = {ranks:?} has no rank 0 (the best completion)")
    }
    let mut sorted = ranks.clone();
    sorted.sort();
    sorted.dedup();
    let is_permutation = sorted.len() == k;
    // A tie list: ranks may repeat, but must be dense from 0 (e.g. [0, 1, 1] or [1, 0, 0]).
    if !is_permutation && sorted.iter().enumerate().any(|(i, &r)| r != i) {
        bail!("{loc}: field \"ranking\" = {ranks:?} is neither a permutation of 0..{} nor a tie list (dense ranks from 0)", k - 1)
    }
    let mut pairs = vec![];
    for i in 0..k {
        for j in i + 1..k {
            match ranks[i].cmp(&ranks[j]) {
                std::cmp::Ordering::Less => pairs.push((i, j)),
                std::cmp::Ordering::Greater => pairs.push((j, i)),
                std::cmp::Ordering::Equal => {}
            }
        }
    }
    if pairs.is_empty() {
        bail!("{loc}: field \"ranking\" = {ranks:?} ranks every completion equal: no preference pair")
    }
    Ok(RankedRow { prompt, completions, pairs })
}

/// Reads ranked rows. With `skip_bad_rows`, bad rows are counted and skipped.
pub fn read_ranked(path: &Path, skip_bad_rows: bool) -> Result<(Vec<RankedRow>, usize)> {
    let (records, bad) = read_records_skipping(path, skip_bad_rows)?;
    let (rows, skipped) = parse_rows(path, &records, skip_bad_rows, ranked_row)?;
    Ok((rows, skipped + bad))
}

/// Reads `{"prompt"}` rows (PPO prompts; extra fields are ignored).
pub fn read_prompts(path: &Path, skip_bad_rows: bool) -> Result<(Vec<String>, usize)> {
    let (records, bad) = read_records_skipping(path, skip_bad_rows)?;
    let (rows, skipped) = parse_rows(path, &records, skip_bad_rows, |v, loc| {
        let p = str_field(v, loc, "prompt")?;
        if p.trim().is_empty() {
            bail!("{loc}: field \"prompt\" is empty")
        }
        Ok(p.to_string())
    })?;
    Ok((rows, skipped + bad))
}

// ---- Conversations -------------------------------------------------------------------------

/// Who speaks a message. ShareGPT's `human` / `gpt` are read as `user` / `assistant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}

/// One data row, before any template: what every stage renders through one code path
/// (`render::Renderer`).
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// A prompt and its completion as plain text (KoChatGPT, Alpaca): through a `{prompt}`
    /// template exactly as `lorafit sft` always rendered it, or through a chat template as
    /// `[user: prompt, assistant: completion]`.
    Completion { prompt: String, completion: String },
    /// A conversation (`messages`, ShareGPT `conversations`, or TRL's conversational
    /// prompt/completion): the assistant turns are learned.
    Chat(Vec<Message>),
    /// A prompt to continue (PPO): text, or messages ending in a user turn.
    Prompt(Prompt),
    /// Ranked answers to one prompt (RM and the preference methods): KoChatGPT's K-way
    /// rankings, TRL's `chosen` / `rejected` as text or as assistant messages. `pairs` are
    /// (better, worse) indices into `completions`.
    Ranked { prompt: Prompt, completions: Vec<Completion>, pairs: Vec<(usize, usize)> },
}

/// A prompt as text or as messages.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

/// A completion as text or as the assistant message(s) that answer the prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Completion {
    Text(String),
    Messages(Vec<Message>),
}

impl Prompt {
    /// The prompt as messages (text becomes one user message).
    pub fn messages(&self) -> Vec<Message> {
        match self {
            Prompt::Text(t) => vec![Message::new(Role::User, t.clone())],
            Prompt::Messages(m) => m.clone(),
        }
    }
}

impl Completion {
    pub fn messages(&self) -> Vec<Message> {
        match self {
            Completion::Text(t) => vec![Message::new(Role::Assistant, t.clone())],
            Completion::Messages(m) => m.clone(),
        }
    }
}

/// Which example shapes a stage takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// SFT and eval: completions and conversations.
    Sft,
    /// Reward model / preference methods: rankings and pairs.
    Preference,
    /// PPO: prompts.
    Prompts,
    /// `lorafit render`: whatever the row is.
    Any,
}

/// The message list under `field` (`messages`: role/content; `conversations`: ShareGPT's
/// from/value), checked: known roles, string content, at most one system message and only first.
pub fn parse_messages(v: &Value, loc: &Loc, field: &str) -> Result<Vec<Message>> {
    let arr = match v {
        Value::Array(a) => a,
        other => bail!("{loc}: field \"{field}\" must be an array of messages, found {}", kind_of(other)),
    };
    let sharegpt = field == "conversations";
    let (role_key, content_key) = if sharegpt { ("from", "value") } else { ("role", "content") };
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let at = format!("{loc}: field \"{field}\"[{i}]");
        let o = m.as_object().with_context(|| format!("{at}: expected a message object {{\"{role_key}\", \"{content_key}\"}}, found {}", kind_of(m)))?;
        // ShareGPT files in the wild use either spelling of the keys.
        let get = |a: &str, b: &str| o.get(a).or_else(|| o.get(b));
        let (rk, ck) = if sharegpt { ("from", "value") } else { ("role", "content") };
        let role = match if sharegpt { get("from", "role") } else { o.get("role") } {
            Some(Value::String(r)) => r.as_str(),
            Some(other) => bail!("{at}.{rk} must be a string, found {}", kind_of(other)),
            None => bail!("{at}: missing \"{rk}\""),
        };
        let role = match role {
            "system" => Role::System,
            "user" | "human" => Role::User,
            "assistant" | "gpt" | "model" => Role::Assistant,
            other => bail!(
                "{at}.{rk} = {other:?}: unknown role (expected system, user or assistant{})",
                if sharegpt { "; ShareGPT: system, human or gpt" } else { "" }
            ),
        };
        let content = match if sharegpt { get("value", "content") } else { o.get("content") } {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Null) if role == Role::Assistant && !sharegpt => bail!("{at}.{ck} is null (tool calls are not supported)"),
            Some(other) => bail!("{at}.{ck} must be a string, found {} (multimodal content parts are not supported)", kind_of(other)),
            None => bail!("{at}: missing \"{ck}\""),
        };
        if role == Role::System && i > 0 {
            if out.iter().any(|m: &Message| m.role == Role::System) {
                bail!("{at}: a second system message (one is allowed, first)")
            }
            bail!("{at}: the system message must come first")
        }
        out.push(Message { role, content });
    }
    Ok(out)
}

/// A conversation to learn from: non-empty, with at least one assistant turn, and a user turn
/// before the first assistant turn.
fn check_conversation(msgs: &[Message], loc: &Loc, field: &str) -> Result<()> {
    if msgs.is_empty() {
        bail!("{loc}: field \"{field}\" is an empty conversation")
    }
    let Some(first_a) = msgs.iter().position(|m| m.role == Role::Assistant) else {
        bail!("{loc}: field \"{field}\" has no assistant turn: nothing to learn")
    };
    if !msgs[..first_a].iter().any(|m| m.role == Role::User) {
        bail!("{loc}: field \"{field}\"[{first_a}]: an assistant turn before any user turn")
    }
    Ok(())
}

/// A prompt as messages: non-empty, ending in a user turn.
fn check_prompt(msgs: &[Message], loc: &Loc, field: &str) -> Result<()> {
    match msgs.last() {
        None => bail!("{loc}: field \"{field}\" is an empty conversation"),
        Some(m) if m.role != Role::User => bail!("{loc}: field \"{field}\" must end with a user message, ends with {}", m.role.as_str()),
        _ => Ok(()),
    }
}

/// Completion messages: non-empty, assistant turns only.
fn check_answer(msgs: &[Message], loc: &Loc, field: &str) -> Result<()> {
    if msgs.is_empty() {
        bail!("{loc}: field \"{field}\" is empty: the assistant turn is missing")
    }
    if let Some((i, m)) = msgs.iter().enumerate().find(|(_, m)| m.role != Role::Assistant) {
        bail!("{loc}: field \"{field}\"[{i}] has role {}: a completion holds assistant messages only", m.role.as_str())
    }
    Ok(())
}

/// A prompt field: text or messages.
fn prompt_field(v: &Value, loc: &Loc) -> Result<Prompt> {
    match v.get("prompt") {
        Some(Value::String(s)) => {
            if s.trim().is_empty() {
                bail!("{loc}: field \"prompt\" is empty")
            }
            Ok(Prompt::Text(s.clone()))
        }
        Some(m @ Value::Array(_)) => {
            let msgs = parse_messages(m, loc, "prompt")?;
            check_prompt(&msgs, loc, "prompt")?;
            Ok(Prompt::Messages(msgs))
        }
        Some(other) => bail!("{loc}: field \"prompt\" must be a string or an array of messages, found {}", kind_of(other)),
        None => bail!("{loc}: missing field \"prompt\""),
    }
}

/// A completion field: text (non-empty) or assistant messages.
fn completion_field(v: &Value, loc: &Loc, field: &str) -> Result<Completion> {
    match v.get(field) {
        Some(Value::String(s)) => {
            if s.trim().is_empty() {
                bail!("{loc}: field \"{field}\" is empty")
            }
            Ok(Completion::Text(s.clone()))
        }
        Some(m @ Value::Array(_)) => {
            let msgs = parse_messages(m, loc, field)?;
            check_answer(&msgs, loc, field)?;
            Ok(Completion::Messages(msgs))
        }
        Some(other) => bail!("{loc}: field \"{field}\" must be a string or an array of messages, found {}", kind_of(other)),
        None => bail!("{loc}: missing field \"{field}\""),
    }
}

/// One row as an [`Example`], by its fields (each row on its own: a file may mix shapes).
pub fn parse_example(v: &Value, loc: &Loc, stage: Stage) -> Result<Example> {
    let o = v.as_object().with_context(|| format!("{loc}: expected a JSON object, found {}", kind_of(v)))?;
    let has = |k: &str| o.contains_key(k);
    let ex = if has("messages") || has("conversations") {
        let field = if has("messages") { "messages" } else { "conversations" };
        let msgs = parse_messages(&o[field], loc, field)?;
        if stage == Stage::Prompts {
            // PPO: the conversation so far; a trailing assistant turn is dropped (it is what PPO generates).
            let mut msgs = msgs;
            while msgs.last().is_some_and(|m| m.role == Role::Assistant) {
                msgs.pop();
            }
            check_prompt(&msgs, loc, field)?;
            Example::Prompt(Prompt::Messages(msgs))
        } else {
            check_conversation(&msgs, loc, field)?;
            Example::Chat(msgs)
        }
    } else if has("chosen") || has("rejected") {
        let (prompt, chosen, rejected) = if has("prompt") {
            (prompt_field(v, loc)?, completion_field(v, loc, "chosen")?, completion_field(v, loc, "rejected")?)
        } else {
            implicit_prompt(v, loc)?
        };
        if chosen == rejected {
            bail!("{loc}: fields \"chosen\" and \"rejected\" are identical")
        }
        Example::Ranked { prompt, completions: vec![chosen, rejected], pairs: vec![(0, 1)] }
    } else if has("ranking") {
        let r = ranked_row(v, loc)?;
        Example::Ranked { prompt: Prompt::Text(r.prompt), completions: r.completions.into_iter().map(Completion::Text).collect(), pairs: r.pairs }
    } else if has("instruction") || has("output") {
        let r = sft_row(v, loc, SftFormat::Alpaca)?;
        Example::Completion { prompt: r.prompt, completion: r.completion }
    } else if has("completion") {
        match (prompt_field(v, loc)?, completion_field(v, loc, "completion")?) {
            (Prompt::Text(p), Completion::Text(c)) => Example::Completion { prompt: p, completion: c },
            (p, c) => {
                let mut msgs = p.messages();
                msgs.extend(c.messages());
                check_conversation(&msgs, loc, "prompt")?;
                Example::Chat(msgs)
            }
        }
    } else if has("prompt") {
        Example::Prompt(prompt_field(v, loc)?)
    } else {
        let keys: Vec<&str> = o.keys().map(String::as_str).take(8).collect();
        bail!(
            "{loc}: no known fields (found: {}); expected \"messages\", \"conversations\", \"prompt\" + \"completion\", \
             \"instruction\" + \"output\", \"prompt\" + \"chosen\" + \"rejected\", \"prompt\" + \"completion_0\".. + \"ranking\", or \"prompt\"",
            keys.join(", ")
        )
    };
    // Does the stage take this shape?
    let ok = match (&ex, stage) {
        (_, Stage::Any) => true,
        (Example::Completion { .. } | Example::Chat(_), Stage::Sft) => true,
        (Example::Ranked { .. }, Stage::Preference) => true,
        (Example::Prompt(_), Stage::Prompts) => true,
        (Example::Completion { prompt, .. }, Stage::Prompts) => {
            return Ok(Example::Prompt(Prompt::Text(prompt.clone())));
        }
        (Example::Chat(m), Stage::Prompts) => {
            let mut m = m.clone();
            while m.last().is_some_and(|x| x.role == Role::Assistant) {
                m.pop();
            }
            return Ok(Example::Prompt(Prompt::Messages(m)));
        }
        (Example::Ranked { prompt, .. }, Stage::Prompts) => return Ok(Example::Prompt(prompt.clone())),
        _ => false,
    };
    if !ok {
        let what = match ex {
            Example::Completion { .. } => "a prompt/completion row",
            Example::Chat(_) => "a conversation",
            Example::Prompt(_) => "a prompt without an answer",
            Example::Ranked { .. } => "a ranked / preference row",
        };
        let want = match stage {
            Stage::Sft => "prompt/completion rows or conversations",
            Stage::Preference => "ranked answers: \"chosen\"/\"rejected\" or \"completion_0\".. + \"ranking\"",
            _ => "prompts",
        };
        bail!("{loc}: {what}, but this stage takes {want}")
    }
    Ok(ex)
}

/// TRL's implicit-prompt preference rows: `chosen` and `rejected` are whole conversations that
/// share their prompt; the prompt is their longest common prefix of messages (TRL's
/// `extract_prompt`), cut back to end at a user turn.
fn implicit_prompt(v: &Value, loc: &Loc) -> Result<(Prompt, Completion, Completion)> {
    let conv = |f: &str| -> Result<Vec<Message>> {
        match v.get(f) {
            Some(m @ Value::Array(_)) => parse_messages(m, loc, f),
            Some(Value::String(_)) => bail!("{loc}: field \"{f}\" is text but the row has no \"prompt\""),
            Some(other) => bail!("{loc}: field \"{f}\" must be an array of messages, found {}", kind_of(other)),
            None => bail!("{loc}: missing field \"{f}\""),
        }
    };
    let (c, r) = (conv("chosen")?, conv("rejected")?);
    let mut n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
    while n > 0 && c[n - 1].role != Role::User {
        n -= 1;
    }
    let prompt = c[..n].to_vec();
    check_prompt(&prompt, loc, "chosen")?;
    let (ca, ra) = (c[n..].to_vec(), r[n..].to_vec());
    check_answer(&ca, loc, "chosen")?;
    check_answer(&ra, loc, "rejected")?;
    Ok((Prompt::Messages(prompt), Completion::Messages(ca), Completion::Messages(ra)))
}

/// Rows read so far and what was skipped.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReadStats {
    pub rows: usize,
    pub skipped_bad: usize,
}

/// Streams the examples of a data file for `stage`, calling `f(loc, example)` for each;
/// bad rows (malformed JSON, wrong fields) stop the read with the file/row/field error, or with
/// `skip_bad_rows` are logged and counted. Memory does not grow with the file.
pub fn for_each_example(path: &Path, stage: Stage, skip_bad_rows: bool, mut f: impl FnMut(&Loc, Example) -> Result<()>) -> Result<ReadStats> {
    let mut stats = ReadStats::default();
    for r in open_records(path)? {
        let parsed = match r? {
            Record::Value(loc, v) => parse_example(&v, &loc, stage).map(|e| (loc, e)),
            Record::Bad(_, e) => Err(e),
        };
        match parsed {
            Ok((loc, ex)) => {
                stats.rows += 1;
                f(&loc, ex)?;
            }
            Err(e) if skip_bad_rows => {
                tracing::warn!("skipping bad row: {e:#}");
                stats.skipped_bad += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if stats.rows == 0 {
        bail!("{}: no usable rows ({} skipped)", path.display(), stats.skipped_bad)
    }
    Ok(stats)
}

/// Every example of a data file (see [`for_each_example`]), with its location.
pub fn read_examples(path: &Path, stage: Stage, skip_bad_rows: bool) -> Result<(Vec<(Loc, Example)>, ReadStats)> {
    let mut out = vec![];
    let stats = for_each_example(path, stage, skip_bad_rows, |loc, ex| {
        out.push((loc.clone(), ex));
        Ok(())
    })?;
    Ok((out, stats))
}

/// The prompts of a data file as [`read_stage`] reads them (`Stage::Prompts`), each with its
/// row as read (GRPO's `exact` and `command` rewards read the row's other fields, e.g.
/// `answer`). Returns the rows and the number of bad rows skipped.
pub fn read_prompt_rows(path: &Path, skip_bad_rows: bool) -> Result<(Vec<(Loc, Example, Value)>, usize)> {
    let (records, bad) = read_records_skipping(path, skip_bad_rows)?;
    let (rows, skipped) = parse_rows(path, &records, skip_bad_rows, |v, loc| Ok((loc.clone(), prompt_example(v, loc)?, v.clone())))?;
    Ok((rows, bad + skipped))
}

/// A `Stage::Prompts` row: a conversation (its trailing answer dropped), or a text row's
/// `"prompt"` field, as lorafit always read PPO prompts.
fn prompt_example(v: &Value, loc: &Loc) -> Result<Example> {
    if is_conversational(v) {
        return parse_example(v, loc, Stage::Prompts);
    }
    let p = str_field(v, loc, "prompt")?;
    if p.trim().is_empty() {
        bail!("{loc}: field \"prompt\" is empty")
    }
    Ok(Example::Prompt(Prompt::Text(p.to_string())))
}

// ---- Rows for a training stage -------------------------------------------------------------

/// A row that needs the conversational reader: `messages` / `conversations`, or a prompt,
/// completion, chosen or rejected given as messages.
pub fn is_conversational(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    o.contains_key("messages") || o.contains_key("conversations") || ["prompt", "completion", "chosen", "rejected"].iter().any(|k| o.get(*k).is_some_and(Value::is_array))
}

/// The rows of a training stage's file, as [`Example`]s, with their locations.
#[derive(Debug, Default)]
pub struct StageRows {
    pub rows: Vec<(Loc, Example)>,
    /// Bad rows skipped (with `skip_bad_rows`).
    pub skipped_bad: usize,
    /// The text rows' SFT format (KoChatGPT or Alpaca, decided by the first row that has
    /// either's fields), when the file has text rows.
    pub sft_format: Option<SftFormat>,
    /// Rows that are conversations (or prompts / preferences as messages).
    pub conversations: usize,
}

/// Reads a stage's data file: conversational rows through [`parse_example`]; text rows exactly
/// as lorafit always read them ([`read_sft`], [`read_ranked`], [`read_prompts`]: the same rows,
/// the same errors), so prompt/completion data trains on the same ids as before.
pub fn read_stage(path: &Path, stage: Stage, skip_bad_rows: bool) -> Result<StageRows> {
    let (records, bad) = read_records_skipping(path, skip_bad_rows)?;
    let mut out = StageRows { skipped_bad: bad, ..Default::default() };
    if stage == Stage::Sft {
        out.sft_format = records.iter().filter(|(_, v)| !is_conversational(v)).find_map(|(_, v)| detect(v));
        if out.sft_format.is_none() && records.iter().all(|(_, v)| !is_conversational(v)) {
            bail!(
                "{}: no row has SFT fields: expected {{\"prompt\", \"completion\"}} (KoChatGPT), {{\"instruction\", \"input\", \"output\"}} (Alpaca), \
                 {{\"messages\": [...]}} or {{\"conversations\": [...]}}",
                path.display()
            )
        }
    }
    let (rows, skipped) = parse_rows(path, &records, skip_bad_rows, |v, loc| {
        let ex = if is_conversational(v) {
            parse_example(v, loc, stage)?
        } else {
            match stage {
                Stage::Sft => {
                    let format = out.sft_format.with_context(|| format!("{loc}: no SFT fields (prompt/completion, instruction/output, messages)"))?;
                    let r = sft_row(v, loc, format)?;
                    Example::Completion { prompt: r.prompt, completion: r.completion }
                }
                Stage::Preference => {
                    let r = ranked_row(v, loc)?;
                    Example::Ranked { prompt: Prompt::Text(r.prompt), completions: r.completions.into_iter().map(Completion::Text).collect(), pairs: r.pairs }
                }
                Stage::Prompts => prompt_example(v, loc)?,
                Stage::Any => parse_example(v, loc, stage)?,
            }
        };
        Ok((loc.clone(), ex))
    })?;
    out.conversations = rows.iter().filter(|(_, e)| !e.is_text()).count();
    out.rows = rows;
    out.skipped_bad += skipped;
    Ok(out)
}

impl Example {
    /// Plain text only (no messages): what a `{prompt}` template can render.
    pub fn is_text(&self) -> bool {
        match self {
            Example::Completion { .. } | Example::Prompt(Prompt::Text(_)) => true,
            Example::Ranked { prompt: Prompt::Text(_), completions, .. } => completions.iter().all(|c| matches!(c, Completion::Text(_))),
            _ => false,
        }
    }
}
