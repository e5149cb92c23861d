//! The agent's log output: tracing events as text lines (`key=value` fields) or JSON, to stderr.

use std::io::IsTerminal;

use tracing_subscriber::{
    EnvFilter,
    field::MakeExt,
    fmt::{FormatFields, format::Writer},
};

/// Installs the global subscriber: the level comes from `RUST_LOG` (default `info`).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person at a terminal: escape codes in a log file are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.fmt_fields(fields()).init();
    }
}

/// Fields as `name=value` separated by spaces, the message first — the text of tracing's
/// default, without its per-field styling, which cost an access-log line (one per proxied
/// connection) about as much as everything else in closing it.
pub fn fields() -> impl for<'w> FormatFields<'w> + 'static {
    tracing_subscriber::fmt::format::debug_fn(|w: &mut Writer<'_>, field, value| {
        match field.name() {
            "message" => write!(w, "{value:?}"),
            name => write!(w, "{name}={value:?}"),
        }
    })
    .delimited(" ")
}
