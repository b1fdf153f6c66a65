//! What a user sees while a command runs: log lines and training progress on stderr.
//!
//! - Log lines read `2025-01-31 14:02:11  INFO sft: message`: local time, level, and a short
//!   label (the stage whose span is current, else the last part of the module path), no colour
//!   codes, so a log file (`lorafit sft ... 2> log`) reads like the terminal.
//! - On a terminal a training run shows one indicatif bar; log lines are written with the bar
//!   suspended, so no stale bar is left above them. Without a terminal (nohup, CI, tmux logs)
//!   there is no bar: one plain line per `train.log_every` steps says the step, the method's
//!   figures, the learning rate, tokens/s, the elapsed time and the ETA.
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// The bar being drawn, if any: log lines suspend it while they are written.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Installs the log subscriber (`RUST_LOG` filters; default `lorafit=info,warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "lorafit=info,warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(LogWriter).event_format(ShortFormat).init();
}

/// Writes each log line to stderr in one piece, with the progress bar (if any) suspended.
pub struct LogWriter;

/// One log line being formatted.
pub struct LineBuf(Vec<u8>);

impl Write for LineBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineBuf {
    fn drop(&mut self) {
        let out = |b: &[u8]| {
            let _ = std::io::stderr().lock().write_all(b);
        };
        match BAR.lock().ok().and_then(|g| g.clone()) {
            Some(bar) => bar.suspend(|| out(&self.0)),
            None => out(&self.0),
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineBuf;
    fn make_writer(&'a self) -> LineBuf {
        LineBuf(Vec::with_capacity(160))
    }
}

/// `date time LEVEL label: fields`.
pub struct ShortFormat;

/// The label of a log line: the innermost span's name (a stage: `sft`, `rm`, `ppo`,
/// `pipeline`), else the last part of the module path (`lorafit::outdir` -> `outdir`).
fn label(target: &str, span: Option<&'static str>) -> String {
    match span {
        Some(s) => s.to_string(),
        None if target.starts_with("lorafit") => target.rsplit("::").next().unwrap_or(target).to_string(),
        None => target.to_string(),
    }
}

/// Local wall-clock time, `YYYY-MM-DD HH:MM:SS`.
fn local_time() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let t = secs as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which outlives the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return String::new();
    }
    format!("{}-{:02}-{:02} {:02}:{:02}:{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec)
}

impl<S, N> FormatEvent<S, N> for ShortFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let meta = event.metadata();
        let span = ctx.lookup_current().map(|s| s.name());
        write!(w, "{} {:>5} {}: ", local_time(), meta.level(), label(meta.target(), span))?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// `h:mm:ss`.
pub fn hms(secs: f64) -> String {
    let s = if secs.is_finite() { secs.max(0.0).round() as u64 } else { 0 };
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// A training run's progress: a bar on a terminal, plain lines otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    /// The step this process started at (a resumed run's ETA counts only its own steps).
    first: usize,
    every: usize,
    started: Instant,
}

impl Progress {
    /// Progress of `total` steps of which `done` are done; plain lines every `every` steps.
    pub fn new(total: usize, done: usize, every: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let pb = indicatif::ProgressBar::new(total as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_position(done as u64);
            if let Ok(mut g) = BAR.lock() {
                *g = Some(pb.clone());
            }
            pb
        });
        Self { bar, total, first: done, every: every.max(1), started: Instant::now() }
    }

    /// Step `step` is done; `msg` holds the method's figures (`loss 1.2345  lr 2.0e-4 ...`).
    pub fn update(&self, step: usize, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_message(msg.to_string());
                b.set_position(step as u64);
            }
            None if step % self.every == 0 || step == self.total => {
                let elapsed = self.started.elapsed().as_secs_f64();
                let per_step = elapsed / (step.saturating_sub(self.first)).max(1) as f64;
                let mut line = format!("step {step}/{}  {msg}  elapsed {}", self.total, hms(elapsed));
                if step < self.total {
                    let _ = write!(line, "  ETA {}", hms(per_step * (self.total - step) as f64));
                }
                tracing::info!("{line}");
            }
            None => {}
        }
    }
}

impl Drop for Progress {
    /// Clears the bar (it never stays behind on the terminal).
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            if let Ok(mut g) = BAR.lock() {
                *g = None;
            }
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_times() {
        assert_eq!(label("lorafit::train::sft", None), "sft");
        assert_eq!(label("lorafit::outdir", Some("ppo")), "ppo");
        assert_eq!(label("hf_hub::api", None), "hf_hub::api");
        assert_eq!(hms(3725.2), "1:02:05");
        assert_eq!(hms(f64::NAN), "0:00:00");
    }
}
