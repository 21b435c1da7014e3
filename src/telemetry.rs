//! Logging: one subscriber for the process, on stderr, as text or JSON lines. `RUST_LOG`
//! overrides the default filter ([`DEFAULT_FILTER`]).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The filter without `RUST_LOG`: info, with the chatty dependencies at warn. rumqttd's
/// connection handling (`server::broker`) and router (`router::routing`) log the end of
/// every gateway connection as an ERROR, a clean DISCONNECT included: they are off, so that a
/// normal start and stop log no ERROR or WARN and a fleet's reconnects do not flood the log
/// (`RUST_LOG=info,rumqttd=debug` shows them). fwrepo logs what an operator must act on.
pub const DEFAULT_FILTER: &str = "info,sled=warn,actix_server=warn,rumqttd=warn,\
    rumqttd::server::broker=off,rumqttd::router::routing=off,rumqttc=warn";

/// Installs the global subscriber (once; later calls are no-ops).
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
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
