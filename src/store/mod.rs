//! The storage interface's shared vocabulary: the error every backend returns, paging, the
//! records several services share (firmware, pending uploads, download sessions, idempotency
//! answers), and the ports for them. Ports for the other aggregates live next to their record
//! types in the service that owns them (`ota::TaskStore`, `rollout::RolloutStore`,
//! `devices::DeviceStore`, `auth::TokenStore`, `audit::AuditStore`), so a backend
//! (`catalog::sled`) depends on the services and no service depends on a backend.
//!
//! Every port is async (a database answers over the network) and object safe: services hold
//! `Arc<dyn …Store>`. Operations the domain relies on being atomic are single calls here:
//! committing an upload, tombstoning a version, recording an idempotent answer once, merging
//! a download session's coverage.

mod records;

pub use records::{
    DownloadSessionRecord, FirmwareRecord, FirmwareStatus, PendingUpload, SCHEMA_VERSION,
    SessionState, VerifyStatus, cover, percent,
};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::domain::{FirmwareId, ProductVersion};

/// A backend's own error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of the storage layer, whichever backend.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The backend failed (I/O, corruption, a lost connection).
    #[error("catalog storage error: {0}")]
    Storage(#[source] BoxError),
    /// A stored value could not be decoded.
    #[error("catalog record {key} is unreadable: {source}")]
    Decode {
        /// Key of the record.
        key: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// No record with this id.
    #[error("not found")]
    NotFound,
    /// The paging cursor is not one this catalog issued.
    #[error("invalid cursor")]
    InvalidCursor,
    /// A write could not be made durable and writes are refused until the catalog recovers.
    #[error("the catalog cannot make writes durable now ({0:?})")]
    Unwritable(CatalogFault),
}

/// Why the catalog cannot make writes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogFault {
    /// The file system is full.
    NoSpace,
    /// Any other I/O or storage error.
    Unavailable,
}

impl CatalogError {
    /// Whether the cause is a full file system (ENOSPC, EDQUOT).
    pub fn is_no_space(&self) -> bool {
        match self {
            CatalogError::Storage(e) => e
                .downcast_ref::<std::io::Error>()
                .is_some_and(crate::domain::io_no_space),
            CatalogError::Unwritable(CatalogFault::NoSpace) => true,
            _ => false,
        }
    }

    /// The fault this error puts the catalog in.
    pub fn fault(&self) -> CatalogFault {
        if self.is_no_space() {
            CatalogFault::NoSpace
        } else {
            CatalogFault::Unavailable
        }
    }
}

impl From<std::convert::Infallible> for CatalogError {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

/// Result of a storage call.
pub type StoreResult<T> = Result<T, CatalogError>;

/// One page of a list.
#[derive(Debug)]
pub struct Page<T> {
    /// Items, newest first.
    pub items: Vec<T>,
    /// Cursor for the next page, if there may be one.
    pub next_cursor: Option<String>,
}

/// Paging request: `limit` (1–500) and an optional cursor from a previous page. Every list is
/// newest first by record id (ULIDs sort by time); a cursor is the last id returned, so pages
/// stay stable while newer records are inserted.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// Items wanted (clamped to 1–500; default 50).
    pub limit: Option<usize>,
    /// Opaque cursor.
    pub cursor: Option<String>,
}

impl PageRequest {
    /// The effective limit.
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(50).clamp(1, 500)
    }

    /// The decoded cursor key (items strictly older than it follow).
    pub fn after_key(&self) -> Result<Option<Vec<u8>>, CatalogError> {
        match self.cursor.as_deref() {
            None | Some("") => Ok(None),
            Some(c) => URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .filter(|k| ulid::Ulid::from_string(&String::from_utf8_lossy(k)).is_ok())
                .map(Some)
                .ok_or(CatalogError::InvalidCursor),
        }
    }
}

/// Encodes a record key as an opaque cursor.
pub fn cursor_for(key: &str) -> String {
    URL_SAFE_NO_PAD.encode(key.as_bytes())
}

/// Whether the catalog makes writes durable, and the means to wait for it.
#[async_trait::async_trait]
pub trait Durability: Send + Sync {
    /// Returns once everything written before the call is durable (group commit: concurrent
    /// callers may share one flush). A failure marks the catalog unwritable.
    async fn flush(&self) -> StoreResult<()>;
    /// Why writes are refused now, if they are.
    fn fault(&self) -> Option<CatalogFault>;
    /// Proves the catalog answers and writes durably (readiness).
    async fn check(&self) -> StoreResult<()>;
    /// Prometheus text of the backend.
    fn render_metrics(&self) -> String;
    /// Keeps the catalog's health current until `cancel` (flushes now and then so that a
    /// failed background write is seen; recovers once the cause is gone).
    async fn watch(&self, cancel: tokio_util::sync::CancellationToken);
}

/// Result of committing an upload.
#[derive(Debug)]
pub enum CommitOutcome {
    /// The record was inserted.
    Created(FirmwareRecord),
    /// A record with the same model, version and content exists; nothing was inserted.
    Duplicate(FirmwareRecord),
    /// A record with the same model and version but other content exists.
    Conflict(FirmwareRecord),
}

/// Which firmware records a list wants (all fields optional, combined with AND).
#[derive(Debug, Clone, Default)]
pub struct FirmwareQuery {
    /// Model, case-insensitive.
    pub model: Option<String>,
    /// Normalized version.
    pub version: Option<ProductVersion>,
    /// Exactly this status.
    pub status: Option<FirmwareStatus>,
    /// Leave tombstones out.
    pub live_only: bool,
}

impl FirmwareQuery {
    /// Whether `r` is wanted.
    pub fn matches(&self, r: &FirmwareRecord) -> bool {
        self.model
            .as_ref()
            .is_none_or(|m| r.model.eq_ignore_ascii_case(m))
            && self.status.is_none_or(|s| r.status == s)
            && !(self.live_only && r.status == FirmwareStatus::Deleted)
            && self
                .version
                .as_ref()
                .is_none_or(|v| ProductVersion::parse(&r.product_version).is_ok_and(|rv| &rv == v))
    }
}

/// An in-place edit of a stored record, applied atomically by the backend (read, edit,
/// write in one transaction; a backend may call it more than once on conflicts).
pub type Edit<'a, T> = &'a (dyn Fn(&mut T) + Send + Sync);

/// Committed firmware records (contract §3).
#[async_trait::async_trait]
pub trait FirmwareStore: Send + Sync {
    /// One record (tombstones included).
    async fn firmware(&self, id: &FirmwareId) -> StoreResult<FirmwareRecord>;
    /// Newest-first page of the records `query` wants.
    async fn list_firmware(
        &self,
        query: &FirmwareQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<FirmwareRecord>>;
    /// Every record, oldest first (export, the start-up sweep).
    fn all_firmware(&self) -> BoxStream<'_, StoreResult<FirmwareRecord>>;
    /// Inserts `record` and drops the pending upload `upload_id`, in one atomic step; unless
    /// its model + normalized version exists: then nothing changes and the outcome says
    /// whether the content is the same.
    async fn commit_firmware(
        &self,
        record: &FirmwareRecord,
        upload_id: &str,
    ) -> StoreResult<CommitOutcome>;
    /// Applies `edit` atomically; tombstoning also frees the model + version. Returns the
    /// stored record.
    async fn update_firmware(
        &self,
        id: &FirmwareId,
        edit: Edit<'_, FirmwareRecord>,
    ) -> StoreResult<FirmwareRecord>;
    /// Imports a record as is (restore, moving between backends). False if its id or its
    /// live model + version is already present.
    async fn import_firmware(&self, record: &FirmwareRecord) -> StoreResult<bool>;
}

/// Uploads in progress (so that a crash leaves nothing behind).
#[async_trait::async_trait]
pub trait UploadStore: Send + Sync {
    /// Records (or updates) an upload that has started.
    async fn put_pending_upload(&self, upload: &PendingUpload) -> StoreResult<()>;
    /// Forgets a pending upload.
    async fn remove_pending_upload(&self, id: &str) -> StoreResult<()>;
    /// Every pending upload.
    async fn pending_uploads(&self) -> StoreResult<Vec<PendingUpload>>;
}

/// Which download sessions a list wants.
#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    /// Exactly this state.
    pub state: Option<SessionState>,
    /// Of this firmware.
    pub firmware_id: Option<FirmwareId>,
    /// Of this task and device.
    pub task_device: Option<(String, String)>,
}

impl SessionQuery {
    /// Whether `s` is wanted.
    pub fn matches(&self, s: &DownloadSessionRecord) -> bool {
        self.state.is_none_or(|w| s.state == w)
            && self
                .firmware_id
                .as_ref()
                .is_none_or(|f| &s.firmware_id == f)
            && self.task_device.as_ref().is_none_or(|(t, sn)| {
                s.task_id.as_deref() == Some(t.as_str()) && s.sn.as_deref() == Some(sn.as_str())
            })
    }
}

/// Download sessions, written in batches by the progress flusher.
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync {
    /// Merges each session into its stored copy in one batch: covered ranges are united
    /// (interval union is commutative, so several writers of one session agree), counters
    /// and timestamps keep the larger value, state and percent follow the merged coverage.
    async fn merge_sessions(&self, sessions: &[DownloadSessionRecord]) -> StoreResult<()>;
    /// Newest-first page of the stored sessions `query` wants.
    async fn list_sessions(
        &self,
        query: &SessionQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<DownloadSessionRecord>>;
    /// Sessions last seen at or after `since` (restart: resume keyed sessions).
    async fn recent_sessions(
        &self,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<DownloadSessionRecord>>;
    /// Deletes sessions last seen before `cutoff`; returns how many.
    async fn prune_sessions(&self, cutoff: DateTime<Utc>) -> StoreResult<usize>;
}

/// What an Idempotency-Key answered the first time.
#[derive(Clone, Debug, PartialEq)]
pub struct IdempotentAnswer {
    /// SHA-256 of the first request's body: another body with the same key is refused.
    pub body_hash: String,
    /// The first answer, replayed.
    pub answer: serde_json::Value,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

/// How long an Idempotency-Key's answer is kept.
pub const IDEMPOTENCY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// Idempotency-Key answers, kept 24 h.
#[async_trait::async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// The answer recorded for `key` within the window, if any.
    async fn idempotent(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<IdempotentAnswer>>;
    /// Records `answer` for `key` once: when the key already has a live answer, that one is
    /// kept and returned (the first writer wins).
    async fn record_idempotent(
        &self,
        key: &str,
        answer: &IdempotentAnswer,
    ) -> StoreResult<Option<IdempotentAnswer>>;
    /// Removes answers recorded before `now - IDEMPOTENCY_WINDOW`; returns how many.
    async fn prune_idempotency(&self, now: DateTime<Utc>) -> StoreResult<usize>;
}
