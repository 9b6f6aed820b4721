//! Logging with tracing: readable text locally, JSON in production. Secrets never reach a log
//! line because they are `secrecy` types whose Debug prints `[REDACTED]`. The settings' `log`
//! section uses this module's types; this module reads no settings of its own.

use serde::Deserialize;
use tracing_subscriber::filter::{Directive, LevelFilter};
use tracing_subscriber::{fmt, EnvFilter};

/// Text for people, JSON for log pipelines.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What `log.level` accepts, for the error that refuses anything else.
pub const LEVEL_CHOICES: &str =
    "trace, debug, info, warn, error or off, or a tracing filter such as info,rollback_responder=debug";

/// The filter for `log.level`: a level, or a tracing filter of comma-separated directives
/// (`info,rollback_responder=debug`, `warn,rollback_responder[incident]=trace`).
///
/// Stricter than `EnvFilter::new`, which reads a misspelt level (`warning`) as a target name
/// and so drops every event, errors included: a directive without `=` or `[` must be a level.
/// The setting names a level, so a bare target (`rollback_responder`, "every level of that
/// target") is refused too; write `rollback_responder=trace`.
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    let mut directives = Vec::new();
    for d in level.split(',').map(str::trim) {
        if d.is_empty() {
            return Err(format!("{level:?} has an empty directive"));
        }
        if !d.contains(['=', '[']) {
            d.parse::<LevelFilter>().map_err(|_| format!("{d:?} is not a level"))?;
        } else {
            d.parse::<Directive>()
                .map_err(|e| format!("{d:?} is not a filter directive ({e})"))?;
        }
        directives.push(d);
    }
    EnvFilter::builder()
        .parse(directives.join(","))
        .map_err(|e| format!("{level:?}: {e}"))
}

/// Installs the global subscriber; `RUST_LOG` overrides the configured level. The level is
/// checked when the configuration is loaded; an unchecked one that is wrong means `info`.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        filter(level).unwrap_or_else(|e| {
            eprintln!("log.level: {e}; logging at info");
            EnvFilter::new("info")
        })
    });
    // Colour only for a person at a terminal: a file, a pipe or a log collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters_are_accepted() {
        for ok in [
            "trace",
            "debug",
            "info",
            "warn",
            "error",
            "off",
            "WARN",
            "info,rollback_responder=debug",
            "warn, rollback_responder=debug",
            "warn,rollback_responder::http=trace",
            "info,[incident]=debug",
            "info,rollback_responder[incident{id}]=trace",
        ] {
            assert!(filter(ok).is_ok(), "{ok}: {:?}", filter(ok).err());
        }
    }

    #[test]
    fn a_misspelt_level_is_refused_not_read_as_a_target() {
        for bad in [
            "warning",
            "",
            "information",
            "info,rollback_responder=verbose",
            "info,",
            "rollback_responder",
            "info,[incident",
        ] {
            assert!(filter(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(filter("warning").unwrap_err(), "\"warning\" is not a level");
    }
}
