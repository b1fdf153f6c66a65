//! The `lorafit` binary: parse arguments, run, and print the whole error chain with a hint.
use clap::Parser;

/// Known causes and what to do about them, matched against the error chain.
fn hint(chain: &str) -> Option<&'static str> {
    let c = chain.to_lowercase();
    if c.contains("built without cuda") {
        None // the message already says what to do
    } else if c.contains("trained on another base")
        || c.contains("match no layer")
        || c.contains("matches no lora layer")
        || c.contains("but has no tensor")
    {
        Some("pass the same --model the adapter was trained on (`lorafit inspect --adapter DIR` shows it)")
    } else if c.contains("unknown field `stages`") {
        Some("this is a pipeline config: run it with `lorafit pipeline --config FILE`")
    } else if c.contains("not valid utf-8") {
        Some("convert the file to UTF-8, e.g. `iconv -f cp949 -t utf-8 in.txt > out.txt` for Korean text")
    } else if c.contains("more than the model's context") {
        Some("eval scores each line as one sequence: split the long lines (the context is n_positions or max_position_embeddings in config.json)")
    } else if c.contains("hugging face hub") {
        Some("on an offline machine, `--model builtin:tiny-gpt2` runs without any download")
    } else {
        None
    }
}

/// One error of the chain as text. candle appends a backtrace to its errors when RUST_BACKTRACE
/// is set; these are input errors, not panics, so the message is printed without it.
fn message(e: &(dyn std::error::Error + 'static)) -> String {
    fn candle(e: &candle_core::Error) -> String {
        use candle_core::Error::*;
        match e {
            WithBacktrace { inner, .. } => candle(inner),
            WithPath { inner, path } => format!("{}: {}", path.display(), candle(inner)),
            Context { inner, context } => format!("{context}: {}", candle(inner)),
            e => e.to_string(),
        }
    }
    e.downcast_ref::<candle_core::Error>().map_or_else(|| e.to_string(), candle)
}

fn main() {
    lorafit::runtime::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "lorafit=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = lorafit::cli::Cli::parse();
    if let Err(e) = lorafit::cli::run(cli) {
        let chain: Vec<String> = e.chain().map(message).collect();
        eprintln!("error: {}", chain[0]);
        for c in &chain[1..] {
            eprintln!("  caused by: {c}");
        }
        if let Some(h) = hint(&chain.join(" ")) {
            eprintln!("hint: {h}");
        }
        std::process::exit(1);
    }
}
