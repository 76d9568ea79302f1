//! Log setup for `tally serve`: `tracing` to stderr, human-readable by default or one JSON object
//! per line (`--log-format json`) for collectors; levels from `TALLY_LOG`, else `RUST_LOG`, else
//! `info`. Secrets are never logged: keys appear only as ids, the generated admin key only as the
//! path of the file holding it.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-11-29T12:00:00.000Z  INFO tally: message key=value`
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not `text` or `json`")),
        }
    }
}

/// Installs the global subscriber. Returns an error naming the variable when the filter does not
/// parse; a second call does nothing.
pub fn init(format: LogFormat) -> Result<(), String> {
    let (var, directives) = match std::env::var("TALLY_LOG") {
        Ok(v) => ("TALLY_LOG", v),
        Err(_) => ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_default()),
    };
    let directives = if directives.trim().is_empty() {
        "info".to_string()
    } else {
        directives
    };
    let filter = EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| format!("{var}={directives:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}
