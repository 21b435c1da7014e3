//! Logging: one subscriber for the process, on stderr, as text or JSON lines. `RUST_LOG`
//! overrides the default filter (`info`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber (once; later calls are no-ops).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sled=warn,actix_server=warn,rumqttd=warn,rumqttc=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (the disk under a redirected stderr is full) is
        // dropped; reporting it would write to stderr again, and that panics.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
