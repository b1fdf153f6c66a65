//! The `lorafit` binary: parse arguments, run, and print the whole error chain with the hint of
//! its kind ([`lorafit::error::Kind`]).
use clap::Parser;

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
    // Like every Unix tool, end quietly when the reader of stdout goes away (`lorafit plan | head`)
    // instead of panicking in println!.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    lorafit::runtime::tune_allocator();
    lorafit::runtime::tune_threads();
    lorafit::progress::init_logging();
    let cli = lorafit::cli::Cli::parse();
    if let Err(e) = lorafit::cli::run(cli) {
        let chain: Vec<String> = e.chain().map(message).collect();
        eprintln!("error: {}", chain[0]);
        for c in &chain[1..] {
            eprintln!("  caused by: {c}");
        }
        if let Some(h) = lorafit::error::kind_of(&e).and_then(lorafit::error::Kind::hint) {
            eprintln!("hint: {h}");
        }
        std::process::exit(1);
    }
}
