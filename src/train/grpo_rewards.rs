//! GRPO's rule and command rewards (`[[grpo.rewards]]`); the reward-model reward is scored in
//! `grpo.rs` on the shared base. Each reward maps one completion to a number; the total is
//! their weighted sum, and each one's mean is logged as `reward_<name>`.
//!
//! - `regex`: 1 when `pattern` matches the completion, else 0 (`negate` flips it).
//! - `exact`: 1 when the answer equals the data row's `field` (both trimmed); the answer is the
//!   first group (or the whole match) of `extract`, e.g. `\\boxed\{(.*)\}` or `#### (.*)`, or
//!   the whole completion when `extract` is empty; 0 when `extract` does not match.
//! - `length`: 1 when the completion has `min..=max` characters (`max` 0: no upper bound), else 0.
//! - `command`: a user program, started once (no shell), reads one JSON line per completion on
//!   stdin, `{"prompt", "completion", "row"}`, and writes one number per line on stdout. A
//!   program that exits, takes longer than `timeout_s` for one answer, or writes something
//!   that is not a number stops the run with an error naming the program and the data row.
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::{json, Value};

use super::config::{CommandLine, RewardSpec};
use crate::data::Loc;

/// One completion to score: its prompt (as the data row gives it), its text, and its row.
pub struct Scored<'a> {
    pub prompt: &'a Value,
    pub completion: &'a str,
    pub row: &'a Value,
    pub loc: &'a Loc,
}

enum Rule {
    Regex { re: Regex, negate: bool },
    Exact { field: String, extract: Option<Regex> },
    Length { min: usize, max: usize },
    Command(CommandReward),
    /// Scored by the caller (a reward-model adapter); index into the model rewards.
    Model(usize),
}

/// The configured rewards, in config order.
pub struct Rewards {
    rules: Vec<Rule>,
    pub names: Vec<String>,
    pub weights: Vec<f64>,
    /// The folders of the `model` rewards, in order.
    pub model_adapters: Vec<String>,
}

impl Rewards {
    /// Builds the rewards (compiles regexes, starts command programs).
    pub fn new(specs: &[RewardSpec]) -> Result<Self> {
        let (mut rules, mut names, mut weights, mut model_adapters, mut bases) = (vec![], vec![], vec![], vec![], vec![]);
        for (i, s) in specs.iter().enumerate() {
            let at = format!("grpo.rewards[{i}]");
            rules.push(match s.kind.as_str() {
                "regex" => Rule::Regex { re: Regex::new(&s.pattern).with_context(|| format!("{at}.pattern = {:?} does not compile", s.pattern))?, negate: s.negate },
                "exact" => Rule::Exact {
                    field: s.field.clone(),
                    extract: (!s.extract.is_empty())
                        .then(|| Regex::new(&s.extract).with_context(|| format!("{at}.extract = {:?} does not compile", s.extract)))
                        .transpose()?,
                },
                "length" => Rule::Length { min: s.min, max: s.max },
                "command" => Rule::Command(CommandReward::start(&s.command, s.timeout_s).with_context(|| format!("{at} (kind \"command\")"))?),
                "model" => {
                    model_adapters.push(s.adapter.clone());
                    Rule::Model(model_adapters.len() - 1)
                }
                other => bail!("{at}.kind = {other:?}: expected regex, exact, length, command or model"),
            });
            let base = if s.name.is_empty() { s.kind.clone() } else { s.name.clone() };
            let n = bases.iter().filter(|b: &&String| **b == base).count();
            names.push(if n == 0 { base.clone() } else { format!("{base}_{}", n + 1) });
            bases.push(base);
            weights.push(s.weight);
        }
        if rules.is_empty() {
            bail!("grpo.rewards is empty: add a [[grpo.rewards]] table (regex, exact, length, command or model), or pass --reward-command / --reward-adapter")
        }
        Ok(Self { rules, names, weights, model_adapters })
    }

    /// Checks before training that every row has what the rewards read (the `exact` fields).
    pub fn check_rows(&self, rows: &[(&Loc, &Value)]) -> Result<()> {
        for (i, r) in self.rules.iter().enumerate() {
            if let Rule::Exact { field, .. } = r {
                for (loc, row) in rows {
                    match row.get(field) {
                        Some(Value::String(_) | Value::Number(_) | Value::Bool(_)) => {}
                        Some(other) => bail!("{loc}: field \"{field}\" (grpo.rewards[{i}].field, kind \"exact\") must be a string or a number, found {}", crate::data::kind_of(other)),
                        None => bail!("{loc}: missing field \"{field}\", which grpo.rewards[{i}] (kind \"exact\") compares the answer with"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends one check line (the first row, an empty completion) to each command reward and
    /// reads its answer: a program that fails fails before anything is written.
    pub fn check_commands(&mut self, first: &Scored) -> Result<()> {
        for r in &mut self.rules {
            if let Rule::Command(c) = r {
                c.score(first).context("checking the reward command before training (an empty completion of the first row)")?;
            }
        }
        Ok(())
    }

    /// Each reward of each completion, (reward, completion): model rewards from `model_scores`
    /// (one vector per model reward, in completion order).
    pub fn score(&mut self, items: &[Scored], model_scores: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![];
        for rule in &mut self.rules {
            let mut col = Vec::with_capacity(items.len());
            for (k, it) in items.iter().enumerate() {
                col.push(match rule {
                    Rule::Regex { re, negate } => f32::from(re.is_match(it.completion) != *negate),
                    Rule::Exact { field, extract } => {
                        let want = match it.row.get(field.as_str()) {
                            Some(Value::String(s)) => s.trim().to_string(),
                            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                            _ => bail!("{}: missing field \"{field}\" for the exact reward", it.loc),
                        };
                        let got = match extract {
                            Some(re) => re.captures(it.completion).map(|c| c.get(1).or(c.get(0)).map_or("", |m| m.as_str()).trim().to_string()),
                            None => Some(it.completion.trim().to_string()),
                        };
                        f32::from(got.as_deref() == Some(want.as_str()))
                    }
                    Rule::Length { min, max } => {
                        let n = it.completion.chars().count();
                        f32::from(n >= *min && (*max == 0 || n <= *max))
                    }
                    Rule::Command(c) => c.score(it)?,
                    Rule::Model(m) => model_scores[*m][k],
                });
            }
            out.push(col);
        }
        Ok(out)
    }

    /// The weighted sum per completion.
    pub fn total(&self, per: &[Vec<f32>]) -> Vec<f32> {
        let n = per.first().map_or(0, Vec::len);
        (0..n).map(|k| per.iter().zip(&self.weights).map(|(col, &w)| col[k] as f64 * w).sum::<f64>() as f32).collect()
    }
}

/// A reward program: started once, one JSON line in, one number out, per completion.
pub struct CommandReward {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    timeout: Duration,
    /// The program as the user wrote it (for errors).
    shown: String,
}

/// A command string split into words like a shell would (whitespace; '…' and "…" group).
pub fn split_command(line: &str) -> Result<Vec<String>> {
    let (mut words, mut cur, mut quote, mut any) = (vec![], String::new(), None::<char>, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        bail!("command {line:?}: unclosed quote")
    }
    if any || !cur.is_empty() {
        words.push(cur);
    }
    Ok(words)
}

impl CommandReward {
    pub fn start(cmd: &CommandLine, timeout_s: f64) -> Result<Self> {
        let argv = match cmd {
            CommandLine::Line(l) => split_command(l)?,
            CommandLine::Argv(v) => v.clone(),
        };
        let Some((prog, args)) = argv.split_first() else { bail!("the reward command is empty") };
        let shown = argv.join(" ");
        let mut child = crate::runtime::restore_env(&mut Command::new(prog))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the reward command `{shown}`"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Self { child, stdin, lines: rx, timeout: Duration::from_secs_f64(timeout_s), shown })
    }

    /// Why the program stopped answering (its exit status, if it exited).
    fn exited(&mut self) -> String {
        std::thread::sleep(Duration::from_millis(20));
        match self.child.try_wait() {
            Ok(Some(s)) => format!("exited ({s})"),
            _ => "closed its output".into(),
        }
    }

    /// The program's number for one completion.
    pub fn score(&mut self, it: &Scored) -> Result<f32> {
        let line = json!({"prompt": it.prompt, "completion": it.completion, "row": it.row}).to_string();
        let sent = match self.stdin.as_mut() {
            Some(w) => writeln!(w, "{line}").and_then(|_| w.flush()).is_ok(),
            None => false,
        };
        if !sent {
            let why = self.exited();
            bail!("reward command `{}` {why} before scoring {}", self.shown, it.loc)
        }
        match self.lines.recv_timeout(self.timeout) {
            Ok(Ok(text)) => match text.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x as f32),
                _ => bail!("reward command `{}` answered {:?} for {}: expected one number per line", self.shown, text, it.loc),
            },
            Ok(Err(e)) => bail!("reward command `{}`: cannot read its answer for {}: {e}", self.shown, it.loc),
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                bail!("reward command `{}` gave no answer within {:.1} s (timeout_s) for {}", self.shown, self.timeout.as_secs_f64(), it.loc)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let why = self.exited();
                bail!("reward command `{}` {why} without answering {}", self.shown, it.loc)
            }
        }
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        // Closing stdin ends a well-behaved program; one that lingers is stopped.
        drop(self.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::split_command;

    #[test]
    fn command_strings_split_like_a_shell_line() {
        assert_eq!(split_command("python3 score.py").unwrap(), vec!["python3", "score.py"]);
        assert_eq!(split_command("python3 'my dir/s.py' \"\" -x").unwrap(), vec!["python3", "my dir/s.py", "", "-x"]);
        assert!(split_command("a 'b").is_err());
    }
}
