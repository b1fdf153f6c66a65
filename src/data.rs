//! Reading training data: JSON arrays or JSON Lines (detected from the content, not the file
//! name; a UTF-8 BOM is tolerated), with errors that name the file, the row or line, and the field.
//!
//! SFT rows: KoChatGPT's `{"prompt", "completion", "tokens"}` (`tokens` ignored: it is an OpenAI
//! count) or Alpaca's `{"instruction", "input", "output"}` (prompt = instruction, plus
//! `"\n\n" + input` when input is non-empty).
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Where a record sits in its file: "row 3" of a JSON array or "line 3" of JSON Lines.
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

/// Every record of a JSON-array or JSON-Lines file, with its location.
pub fn read_records(path: &Path) -> Result<Vec<(Loc, Value)>> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read data file {file}"))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        crate::error::tagged(crate::error::Kind::NotUtf8, format!("{file}: line {line} is not valid UTF-8"))
    })?;
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        bail!("{file}: the file is empty")
    }
    if trimmed.starts_with('[') {
        let rows: Vec<Value> = serde_json::from_str(text)
            .with_context(|| format!("{file}: invalid JSON (the file starts with '[' so it is read as one JSON array)"))?;
        if rows.is_empty() {
            bail!("{file}: the JSON array is empty")
        }
        return Ok(rows.into_iter().enumerate().map(|(i, v)| (Loc { file: file.clone(), kind: "row", n: i + 1 }, v)).collect());
    }
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let loc = Loc { file: file.clone(), kind: "line", n: i + 1 };
        let v: Value = serde_json::from_str(line).with_context(|| format!("{loc}: invalid JSON (read as JSON Lines)"))?;
        out.push((loc, v));
    }
    if out.is_empty() {
        bail!("{file}: no records")
    }
    Ok(out)
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
    let records = read_records(path)?;
    let format = records.iter().find_map(|(_, v)| detect(v)).with_context(|| {
        format!(
            "{}: no row has SFT fields: expected {{\"prompt\", \"completion\"}} (KoChatGPT) or {{\"instruction\", \"input\", \"output\"}} (Alpaca)",
            path.display()
        )
    })?;
    let (rows, skipped) = parse_rows(path, &records, skip_bad_rows, |v, loc| sft_row(v, loc, format))?;
    Ok((rows, format, skipped))
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
    parse_rows(path, &read_records(path)?, skip_bad_rows, ranked_row)
}

/// Reads `{"prompt"}` rows (PPO prompts; extra fields are ignored).
pub fn read_prompts(path: &Path, skip_bad_rows: bool) -> Result<(Vec<String>, usize)> {
    parse_rows(path, &read_records(path)?, skip_bad_rows, |v, loc| {
        let p = str_field(v, loc, "prompt")?;
        if p.trim().is_empty() {
            bail!("{loc}: field \"prompt\" is empty")
        }
        Ok(p.to_string())
    })
}
