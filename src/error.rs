//! Error kinds: the causes lorafit knows a fix for. A library error that deserves a hint is
//! tagged with a [`Kind`] where it is raised (`bail_kind!` / [`KindExt::kind`]); the binary
//! finds the tag anywhere in the error chain and prints the kind's hint. Hints are attached to
//! kinds, never to the wording of messages, so rewording a message cannot lose its hint.
use std::fmt;

/// A known cause with a known fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An adapter whose tensors or targets do not fit the model it is attached to.
    AdapterModelMismatch,
    /// `target_modules` of a new adapter match no layer of the model.
    TargetsMatchNothing,
    /// A pipeline config given to a stage command.
    PipelineConfigToStage,
    /// A text file that is not UTF-8.
    NotUtf8,
    /// `eval`: a line longer than the model's context.
    EvalContextOverflow,
    /// `score`: an entry longer than the model's context.
    ScoreContextOverflow,
    /// A hub id on a machine that cannot reach the hub.
    Offline,
    /// Another lorafit process holds the output folder's lock.
    OutputLocked,
    /// `--force` on a folder lorafit did not write.
    NotLorafitOutput,
    /// `--out` equal to, or containing, one of the command's inputs.
    OutputIsInput,
    /// A run folder that exists but has no checkpoint to resume from.
    NoCheckpoint,
    /// An output folder that already holds a run (neither --resume nor --force given).
    OutputHasRun,
    /// An output folder that holds a finished run (a new run into it needs --force).
    RunFinished,
    /// `--resume` with a config that differs from the one the run was started with.
    ConfigDiffers,
    /// Training diverged: the adapter's values are no longer finite.
    Diverged,
    /// A CUDA device asked of a binary built without CUDA (the message says what to do).
    NoCuda,
    /// A reward model given where a plain (policy/SFT) adapter is expected.
    RewardModelAsAdapter,
    /// An adapter file holding NaN or Inf values.
    NonFiniteAdapter,
    /// A tokenizer whose token ids do not fit the model's embedding.
    TokenizerModelMismatch,
    /// An output file that exists (no --force).
    OutputExists,
    /// `--force` on a file lorafit did not write.
    NotLorafitFile,
    /// A `model_type` lorafit has no implementation of, or a config.json setting of a supported one
    /// that it does not implement (a rope type, an activation, a key another family has).
    UnsupportedModel,
    /// A checkpoint whose tensors do not match its config.json (head_dim, biases, norms).
    CheckpointConfigMismatch,
}

impl Kind {
    /// What to do about it, printed by the binary after the error chain.
    pub fn hint(self) -> Option<&'static str> {
        Some(match self {
            Kind::AdapterModelMismatch => {
                "pass the same --model the adapter was trained on (`lorafit inspect DIR` shows it)"
            }
            Kind::TargetsMatchNothing => {
                "set lora.target_modules (`bench`: --targets) to some of the layer names listed above, or leave it out for PEFT's default for this architecture"
            }
            Kind::PipelineConfigToStage => "this is a pipeline config: run it with `lorafit pipeline --config FILE`",
            Kind::NotUtf8 => {
                "convert the file to UTF-8, e.g. `iconv -f cp949 -t utf-8 in.txt > out.txt` for Korean text"
            }
            Kind::EvalContextOverflow => {
                "eval scores each line as one sequence: split the long lines (the context is n_positions or max_position_embeddings in config.json)"
            }
            Kind::ScoreContextOverflow => {
                "score reads each entry as one sequence: shorten the long entries (the context is n_positions or max_position_embeddings in config.json)"
            }
            Kind::Offline => "on an offline machine, `--model builtin:tiny-gpt2` runs without any download",
            Kind::OutputLocked => "wait for that run to finish, or choose another --out",
            Kind::NotLorafitOutput => {
                "lorafit only replaces folders it wrote itself (they hold a .lorafit marker): choose another --out, or move that folder away yourself"
            }
            Kind::OutputIsInput => "choose an --out folder outside the model, adapter and data folders",
            Kind::NoCheckpoint => "the earlier run stopped before its first checkpoint: start it again with --force",
            Kind::OutputHasRun => "pass --resume to continue it, --force to replace it, or choose another --out",
            Kind::RunFinished => "pass --force to replace it, or choose another --out (`lorafit inspect DIR` shows what it holds)",
            Kind::ConfigDiffers => {
                "resume with the settings the run was started with (its config.toml), or start a new run with --force or another --out"
            }
            Kind::Diverged => {
                "lower train.lr, keep train.max_grad_norm on (e.g. 1.0), or use --dtype f32; the last finite checkpoint is kept"
            }
            Kind::NoCuda => return None,
            Kind::RewardModelAsAdapter => "a reward model from `lorafit rm` belongs in --reward-adapter (ppo) or `lorafit score --adapter`",
            Kind::NonFiniteAdapter => {
                "the adapter is damaged or comes from a run that diverged: use an earlier checkpoint (checkpoints/step-*), download it again, or train again with a lower train.lr"
            }
            Kind::TokenizerModelMismatch => {
                "use the tokenizer.json that came with this model (the tokenizer and the weights must come from the same model)"
            }
            Kind::OutputExists => "pass --force to replace it (lorafit replaces only files it wrote), or choose another --out",
            Kind::NotLorafitFile => {
                "lorafit only replaces files it wrote itself (a GGUF with lorafit.* metadata, a Modelfile with its first line): choose another --out, or move that file away yourself"
            }
            Kind::UnsupportedModel => {
                "lorafit loads the model_types of README's \"Supported models\" with the config.json keys transformers reads for them: fix the named key, or use a supported model"
            }
            Kind::CheckpointConfigMismatch => {
                "config.json must describe these weights: use the config.json that came with the checkpoint (or fix the named key)"
            }
        })
    }
}

/// An error message with its [`Kind`]. It lives in an `anyhow` chain as a context layer or
/// as the root error; [`kind_of`] finds it.
#[derive(Debug)]
pub struct Tagged {
    pub kind: Kind,
    pub msg: String,
}

impl fmt::Display for Tagged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Tagged {}

/// A new error of `kind`.
pub fn tagged(kind: Kind, msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Tagged { kind, msg: msg.into() })
}

/// `bail_kind!(Kind::X, "format {}", args)`: return an error of that kind.
#[macro_export]
macro_rules! bail_kind {
    ($kind:expr, $($arg:tt)*) => {
        return Err($crate::error::tagged($kind, format!($($arg)*)))
    };
}

/// Tags an existing error with a kind (as a context layer with the given message).
pub trait KindExt<T> {
    fn kind(self, kind: Kind, msg: impl Into<String>) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> KindExt<T> for std::result::Result<T, E> {
    fn kind(self, kind: Kind, msg: impl Into<String>) -> anyhow::Result<T> {
        self.map_err(|e| e.into().context(Tagged { kind, msg: msg.into() }))
    }
}

/// The kind of the outermost tagged layer of `e`'s chain, if any.
pub fn kind_of(e: &anyhow::Error) -> Option<Kind> {
    // anyhow's downcast looks through every context layer and the root error.
    if let Some(t) = e.downcast_ref::<Tagged>() {
        return Some(t.kind);
    }
    e.chain().find_map(|c| c.downcast_ref::<Tagged>()).map(|t| t.kind)
}

thread_local! {
    /// Set while [`catch_panic`] runs: the panic hook stays quiet (the panic becomes an error).
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into an error `what(): <panic message>`. For calls into
/// dependencies that panic on malformed input (the `tokenizers` crate does on some damaged
/// tokenizer.json files): lorafit's own code returns errors, and no input may end in a panic.
/// The panic is not printed (the process's hook is wrapped once, quiet on this thread only
/// while `f` runs).
pub fn catch_panic<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r.unwrap_or_else(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        Err(anyhow::anyhow!("{}: {msg}", what()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn kind_is_found_through_contexts() {
        let e: anyhow::Result<()> = Err(tagged(Kind::Offline, "no hub")).context("loading the model").context("sft");
        assert_eq!(kind_of(&e.unwrap_err()), Some(Kind::Offline));
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("io")).kind(Kind::NotUtf8, "bad file").context("outer");
        assert_eq!(kind_of(&e.unwrap_err()), Some(Kind::NotUtf8));
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("plain")).context("outer");
        assert_eq!(kind_of(&e.unwrap_err()), None);
    }
}
