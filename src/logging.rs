//! Log output: human-readable on a terminal, JSON lines otherwise (what a
//! log collector under Docker or Kubernetes wants).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogLevel};

/// Installs the global subscriber. Spiegel's own events follow `level`;
/// the libraries' (HTTP client, runtime) only show warnings and errors.
pub fn init(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Error | LogLevel::Fatal => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    let filter = EnvFilter::new(format!("warn,spiegel={level}"));
    let tty = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !tty,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in a file or a pipe.
        .with_ansi(tty)
        .with_target(false);
    // A second init (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
