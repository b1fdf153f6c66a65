//! What `lorafit plan` reads from the data: the rows as the stage would tokenize them
//! (`train::sft::prepare`, `train::rm::prepare`, DPO's `train::pairs::read_pairs`, the PPO /
//! GRPO prompt cut), so the plan sizes the largest micro-batch the run will build (its longest
//! rows, padded to the longest), an RM batch by its real completions per prompt and a DPO pass
//! by its longest pair. Without a data file, or without the tokenizer,
//! the plan says what it assumed instead.
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

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
    /// DPO: the preference pairs the rows give (rankings expand to several; None: not tokenized).
    pub pairs: Option<usize>,
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
        if let Some(p) = self.pairs {
            s += &format!(", {p} pairs");
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
    /// DPO: the pairs read (the unit of a micro-batch).
    pairs: Option<usize>,
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
        let ctx = crate::model::Arch::from_file(config_json)?.max_positions();
        let max_len = d.max_len.min(ctx);
        // Rows through the renderer the stage trains with (`render.rs`): prompt/completion rows
        // through the `{prompt}` template, conversations through the chat template.
        let renderer = match &tok {
            Some(t) => {
                let mut rc = crate::render::RenderConfig::from_data(d)?;
                rc.max_len = max_len;
                Some(crate::render::Renderer::new(t, config_json.parent().unwrap_or(Path::new(".")), rc)?)
            }
            None => None,
        };
        let mut m = Self::default();
        let rows = match stage {
            "rm" => {
                let read = crate::data::read_stage(path, crate::data::Stage::Preference, d.skip_bad_rows)?;
                let mut ks: Vec<usize> = read.rows.iter().map(|(_, e)| if let crate::data::Example::Ranked { completions, .. } = e { completions.len() } else { 0 }).collect();
                ks.sort_unstable_by(|a, b| b.cmp(a));
                m.ks = Some(ks);
                if let Some(r) = &renderer {
                    let (exs, _) = crate::train::rm::prepare_examples(read.rows.iter().map(|(l, e)| (Some(l), e)), r)?;
                    m.lens = Some(exs.iter().map(|e| (e.seqs.iter().map(Vec::len).max().unwrap_or(0), 0)).collect());
                }
                read.rows.len()
            }
            "dpo" => match &renderer {
                // The pairs as `dpo` renders them (`train::pairs`): (longer sequence, learned
                // tokens of both); the rows without the tokenizer.
                Some(r) => {
                    let (pairs, stats) = crate::train::pairs::read_pairs(path, r, d.skip_bad_rows)?;
                    m.lens = Some(pairs.iter().map(|p| (p.len(), p.chosen.n_targets() + p.rejected.n_targets())).collect());
                    m.pairs = Some(pairs.len());
                    stats.rows
                }
                None => crate::data::open_records(path)?.filter(|r| matches!(r, Ok(crate::data::Record::Value(..)))).count(),
            },
            "ppo" | "grpo" => {
                let read = crate::data::read_stage(path, crate::data::Stage::Prompts, d.skip_bad_rows)?;
                let prompts: Vec<&crate::data::Prompt> = read.rows.iter().filter_map(|(_, e)| if let crate::data::Example::Prompt(p) = e { Some(p) } else { None }).collect();
                if let Some(r) = &renderer {
                    let max_prompt = if stage == "grpo" { cfg.grpo.max_prompt_len } else { cfg.ppo.max_prompt_len };
                    let (ids, _) = crate::train::batch::tokenize_prompt_examples(prompts.iter().copied(), r, max_prompt)?;
                    m.lens = Some(ids.iter().map(|p| (p.len(), 0)).collect());
                }
                prompts.len()
            }
            _ => {
                let read = crate::data::read_stage(path, crate::data::Stage::Sft, d.skip_bad_rows)?;
                if let Some(r) = &renderer {
                    let (exs, _) = crate::train::sft::prepare_examples(read.rows.iter().map(|(l, e)| (Some(l), e)), r)?;
                    m.lens = Some(exs.iter().map(|e| (e.ids.len(), e.learned.iter().map(|s| s.len()).sum())).collect());
                }
                read.rows.len()
            }
        };
        if let Some(l) = &mut m.lens {
            l.sort_unstable_by(|a, b| b.cmp(a));
        }
        if tok.is_none() {
            m.why = Some(format!("the rows were not tokenized: no tokenizer.json next to {}", config_json.display()));
        }
        let longest = m.lens.as_ref().and_then(|l| l.first()).map(|x| x.0);
        m.stats = Some(DataStats { path: d.path.clone(), rows, longest_tokens: longest, max_completions: m.ks.as_ref().and_then(|k| k.first().copied()), pairs: m.pairs });
        Ok(m)
    }

    /// Rows read (None: not read).
    pub fn rows(&self) -> Option<usize> {
        self.stats.as_ref().map(|s| s.rows)
    }

    /// DPO: pairs read (None: not tokenized).
    pub fn pairs(&self) -> Option<usize> {
        self.pairs
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
                "grpo" => format!("every prompt fills grpo.max_prompt_len = {} tokens ({why})", cfg.grpo.max_prompt_len),
                "dpo" => format!("every pair's sequences fill data.max_len = {} tokens, all of them learned but the first ({why})", cfg.data.max_len),
                _ => format!("every row fills data.max_len = {} tokens ({why})", cfg.data.max_len),
            });
        }
        if stage == "rm" && self.ks.is_none() {
            out.push(format!("2 completions per prompt, a chosen and a rejected one ({why})"));
        }
        out
    }
}
