//! The `lorafit` binary: parse arguments, run, and print the whole error chain with a hint.
use clap::Parser;

/// Known causes and what to do about them, matched against the error chain.
fn hint(chain: &str) -> Option<&'static str> {
    let c = chain.to_lowercase();
    if c.contains("built without cuda") {
        None // the message already says what to do
    } else if c.contains("was it trained on another base") || c.contains("match no layer") || c.contains("matches no lora layer") {
        Some("pass the same --model the adapter was trained on (`lorafit inspect --adapter DIR` shows it)")
    } else if c.contains("not valid utf-8") {
        Some("convert the file to UTF-8, e.g. `iconv -f cp949 -t utf-8 in.txt > out.txt` for Korean text")
    } else if c.contains("hugging face hub") {
        Some("on an offline machine, `--model builtin:tiny-gpt2` runs without any download")
    } else {
        None
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "lorafit=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = lorafit::cli::Cli::parse();
    if let Err(e) = lorafit::cli::run(cli) {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
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
