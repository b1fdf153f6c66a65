//! What `lorafit plan` reads from the data: the rows as the stage would tokenize them
//! (`train::sft::prepare`, `train::rm::prepare`, PPO's prompt cut), so the plan sizes the
//! largest micro-batch the run will build (its longest rows, padded to the longest) and an RM
//! batch by its real completions per prompt. Without a data file, or without the tokenizer,
//! the plan says what it assumed instead.
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::template::Template;
use crate::tokenizer::Tokenizer;
use crate::train::config::TrainConfig;

/// What the data holds, as reported in the plan.
#[derive(Clone, Debug, Serialize)]
pub struct DataStats {
    pub path: String,
    pub rows: usize,
    /// Tokens of the longest row as trained (template + completion + eos, cut to
    /// `data.max_len`; PPO: the longest templated prompt, cut to `ppo.max_prompt_len`).
    /// None when the tokenizer is not at hand.
    pub longest_tokens: Option<usize>,
    /// RM: the most completions one prompt has.
    pub max_completions: Option<usize>,
}

impl DataStats {
    pub fn describe(&self) -> String {
        let mut s = format!("{} rows", self.rows);
        if let Some(t) = self.longest_tokens {
            s += &format!(", the longest {t} tokens");
        }
        if let Some(k) = self.max_completions {
            s += &format!(", up to {k} completions per prompt");
        }
        s
    }
}

/// The data as the formulas use it.
#[derive(Default)]
pub(super) struct Measured {
    pub stats: Option<DataStats>,
    /// (tokens, learned tokens) of each tokenized row, longest first.
    lens: Option<Vec<(usize, usize)>>,
    /// RM: completions of each prompt, most first.
    ks: Option<Vec<usize>>,
    /// Why nothing (or nothing tokenized) was read.
    why: Option<String>,
}

impl Measured {
    /// Reads `cfg.data.path` for `stage`, if one is configured; the tokenizer is the one next to
    /// `config_json` (a local folder, a builtin, or the hub cache), if it is there.
    pub fn read(cfg: &TrainConfig, stage: &str, config_json: &Path) -> Result<Self> {
        let d = &cfg.data;
        if d.path.is_empty() {
            return Ok(Self { why: Some("no data file is configured (data.path or --data)".into()), ..Default::default() });
        }
        let path = Path::new(&d.path);
        if !path.exists() {
            return Ok(Self { why: Some(format!("the data file {} does not exist", d.path)), ..Default::default() });
        }
        let tokenizer = config_json.with_file_name("tokenizer.json");
        let tok = if tokenizer.is_file() { Some(Tokenizer::load(&tokenizer, config_json)?) } else { None };
        let template = Template::or_default(&d.template)?;
        let ctx = crate::model::Arch::from_file(config_json)?.max_positions();
        let max_len = d.max_len.min(ctx);
        let mut m = Self::default();
        let rows = match stage {
            "rm" => {
                let (rows, _) = crate::data::read_ranked(path, d.skip_bad_rows)?;
                let mut ks: Vec<usize> = rows.iter().map(|r| r.completions.len()).collect();
                ks.sort_unstable_by(|a, b| b.cmp(a));
                m.ks = Some(ks);
                if let Some(tok) = &tok {
                    let (exs, _) = crate::train::rm::prepare(&rows, tok, &template, max_len)?;
                    m.lens = Some(exs.iter().map(|e| (e.seqs.iter().map(Vec::len).max().unwrap_or(0), 0)).collect());
                }
                rows.len()
            }
            "ppo" => {
                let (prompts, _) = crate::data::read_prompts(path, d.skip_bad_rows)?;
                if let Some(tok) = &tok {
                    let cut = cfg.ppo.max_prompt_len;
                    m.lens = Some(prompts.iter().map(|p| Ok((tok.encode(&template.render(p))?.len().min(cut), 0))).collect::<Result<_>>()?);
                }
                prompts.len()
            }
            _ => {
                let (rows, _, _) = crate::data::read_sft(path, d.skip_bad_rows)?;
                if let Some(tok) = &tok {
                    let (exs, _) = crate::train::sft::prepare(&rows, tok, &template, max_len, d.strip_leading_quote)?;
                    m.lens = Some(exs.iter().map(|e| (e.ids.len(), e.ids.len() - e.prompt_len())).collect());
                }
                rows.len()
            }
        };
        if let Some(l) = &mut m.lens {
            l.sort_unstable_by(|a, b| b.cmp(a));
        }
        if tok.is_none() {
            m.why = Some(format!("the rows were not tokenized: no tokenizer.json next to {}", config_json.display()));
        }
        let longest = m.lens.as_ref().and_then(|l| l.first()).map(|x| x.0);
        m.stats = Some(DataStats { path: d.path.clone(), rows, longest_tokens: longest, max_completions: m.ks.as_ref().and_then(|k| k.first().copied()) });
        Ok(m)
    }

    /// Rows read (None: not read).
    pub fn rows(&self) -> Option<usize> {
        self.stats.as_ref().map(|s| s.rows)
    }

    /// Tokens of the longest row (None: not tokenized).
    pub fn longest(&self) -> Option<usize> {
        self.lens.as_ref().and_then(|l| l.first()).map(|x| x.0)
    }

    /// Learned tokens of the `b` longest rows (the largest SFT micro-batch).
    pub fn learned(&self, b: usize) -> Option<usize> {
        self.lens.as_ref().map(|l| l.iter().take(b).map(|x| x.1).sum())
    }

    /// Sequences in an RM micro-batch of `b` prompts: at most the `b` largest completion counts.
    pub fn completions(&self, b: usize) -> Option<usize> {
        self.ks.as_ref().map(|k| k.iter().take(b).sum())
    }

    /// What the plan assumed for want of data, in words.
    pub fn assumptions(&self, stage: &str, cfg: &TrainConfig) -> Vec<String> {
        let Some(why) = &self.why else { return vec![] };
        let mut out = vec![];
        if self.lens.is_none() {
            out.push(match stage {
                "ppo" => format!("every prompt fills ppo.max_prompt_len = {} tokens ({why})", cfg.ppo.max_prompt_len),
                _ => format!("every row fills data.max_len = {} tokens ({why})", cfg.data.max_len),
            });
        }
        if stage == "rm" && self.ks.is_none() {
            out.push(format!("2 completions per prompt, a chosen and a rejected one ({why})"));
        }
        out
    }
}
