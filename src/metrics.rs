//! Process counters, rendered as Prometheus text by `/metrics`. Plain atomics: cheap enough for
//! the upload and download hot paths.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the whole process.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Uploads started (admitted).
    pub uploads_started: AtomicU64,
    /// Uploads that created a record.
    pub uploads_created: AtomicU64,
    /// Uploads answered with an existing identical record.
    pub uploads_duplicate: AtomicU64,
    /// Uploads that failed or were aborted.
    pub uploads_failed: AtomicU64,
    /// Uploads refused with 429.
    pub uploads_rejected_busy: AtomicU64,
    /// Upload body bytes received.
    pub bytes_in: AtomicU64,
    /// Download body bytes sent.
    pub bytes_out: AtomicU64,
    /// Download requests answered (GET and HEAD, any status).
    pub download_requests: AtomicU64,
    /// Download requests that failed on the server side (blob missing, store error).
    pub download_errors: AtomicU64,
}

/// Point-in-time values the counters do not hold.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Download sessions in state `active`.
    pub active_downloads: usize,
    /// Local read streams in flight.
    pub read_streams: usize,
    /// Uploads in progress.
    pub uploads_in_progress: usize,
    /// Open HTTP connections.
    pub open_connections: usize,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        counter(
            "fwrepo_uploads_started_total",
            "Uploads admitted.",
            &self.uploads_started,
        );
        counter(
            "fwrepo_uploads_created_total",
            "Uploads that created a firmware record.",
            &self.uploads_created,
        );
        counter(
            "fwrepo_uploads_duplicate_total",
            "Uploads answered with an identical existing record.",
            &self.uploads_duplicate,
        );
        counter(
            "fwrepo_uploads_failed_total",
            "Uploads that failed or were aborted.",
            &self.uploads_failed,
        );
        counter(
            "fwrepo_uploads_rejected_busy_total",
            "Uploads refused with 429 too_many_uploads.",
            &self.uploads_rejected_busy,
        );
        counter(
            "fwrepo_bytes_in_total",
            "Upload body bytes received.",
            &self.bytes_in,
        );
        counter(
            "fwrepo_bytes_out_total",
            "Download body bytes sent.",
            &self.bytes_out,
        );
        counter(
            "fwrepo_download_requests_total",
            "Download requests answered.",
            &self.download_requests,
        );
        counter(
            "fwrepo_download_errors_total",
            "Download requests failed by the server.",
            &self.download_errors,
        );
        let mut gauge = |name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "fwrepo_active_downloads",
            "Download sessions in state active.",
            g.active_downloads,
        );
        gauge(
            "fwrepo_download_read_streams",
            "Local blob read streams in flight.",
            g.read_streams,
        );
        gauge(
            "fwrepo_uploads_in_progress",
            "Uploads in progress.",
            g.uploads_in_progress,
        );
        out
    }
}
