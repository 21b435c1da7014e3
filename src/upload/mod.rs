//! Uploads (contract §3): admission (size limit, free space, concurrency), one streaming pass of
//! the body through MD5 + SHA-256 + size into the blob store, then verification and commit.
//!
//! Commit protocol: (1) a pending-upload row is written before the first byte reaches the blob
//! store (with the S3 multipart id); (2) the body streams into the blob writer and the
//! checksummer; (3) metadata and the client's checksums are checked; (4) the blob is published
//! and the record committed in one catalog transaction, which also drops the pending row. On any
//! failure, and when an [`UploadSession`] is dropped unfinished (client gone), the writer is
//! aborted, the blob removed and the pending row dropped; a crash leaves only what the start-up
//! sweep removes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::blobs::{BlobError, BlobStore, BlobWriter};
use crate::checksum::{ChecksumError, Checksummer, Digests};
use crate::domain::{
    FileName, FirmwareId, Md5Hex, ProductVersion, Sha256Hex, VersionError, parse_name_facts,
};
use crate::metrics::Metrics;
use crate::store::{
    CatalogError, CommitOutcome, FirmwareRecord, FirmwareStatus, FirmwareStore, PendingUpload,
    SCHEMA_VERSION, UploadStore,
};

/// Body chunks are handed to the digests and the blob writer in batches of about this size
/// (as received: never copied).
const BATCH: usize = 1 << 20;
/// Longest accepted release note, in bytes.
const MAX_NOTE: usize = 16 << 10;

/// Errors of the upload layer.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// `--max-concurrent-uploads` uploads are running.
    #[error("{0} uploads are in progress; retry later")]
    TooMany(usize),
    /// The body exceeds `--max-upload-bytes`.
    #[error("upload exceeds the limit of {0} bytes")]
    TooLarge(u64),
    /// The declared length exceeds the free space.
    #[error("upload of {declared} bytes exceeds the {free} bytes free")]
    InsufficientStorage {
        /// Declared length.
        declared: u64,
        /// Free bytes.
        free: u64,
    },
    /// Malformed input (file name, checksum format, empty file, multipart shape).
    #[error("{0}")]
    InvalidRequest(String),
    /// A version with a non-numeric part.
    #[error(transparent)]
    InvalidVersion(#[from] VersionError),
    /// No version given and none parsable from the file name.
    #[error("no product_version given and none parsable from file name {0:?}")]
    VersionRequired(String),
    /// Well-formed but unusable values.
    #[error("{0}")]
    ValidationFailed(String),
    /// A given checksum differs from the computed one.
    #[error("{field} mismatch: given {given}, computed {computed}")]
    ChecksumMismatch {
        /// `md5` or `sha256`.
        field: &'static str,
        /// What the client gave.
        given: String,
        /// What the bytes hash to.
        computed: String,
    },
    /// Same model and version, other content.
    #[error("{model} {version} already exists with different content (firmware {existing})")]
    VersionConflict {
        /// Model.
        model: String,
        /// Version.
        version: String,
        /// The existing record.
        existing: FirmwareId,
    },
    /// The client's body ended with an error (disconnect, malformed chunking).
    #[error("upload body aborted: {0}")]
    BodyAborted(String),
    /// The client sent nothing for the idle timeout.
    #[error("upload body idle for more than {0} s")]
    IdleTimeout(u64),
    /// The blob store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Hashing failed.
    #[error(transparent)]
    Checksum(#[from] ChecksumError),
}

/// What the client says about the package (multipart text parts or query parameters).
#[derive(Clone, Debug, Default)]
pub struct UploadMeta {
    /// Package file name.
    pub file_name: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// Product version.
    pub product_version: Option<String>,
    /// Expected MD5.
    pub md5: Option<String>,
    /// Expected SHA-256.
    pub sha256: Option<String>,
    /// Release note.
    pub release_note: Option<String>,
}

/// Metadata checked and parsed.
#[derive(Clone, Debug)]
pub struct ResolvedMeta {
    file_name: FileName,
    model: String,
    version: ProductVersion,
    build_time: Option<DateTime<Utc>>,
    md5: Option<Md5Hex>,
    sha256: Option<Sha256Hex>,
    release_note: Option<String>,
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl UploadMeta {
    /// Checks everything that does not depend on the bytes: file name, model, version and
    /// checksum formats.
    pub fn resolve(&self) -> Result<ResolvedMeta, UploadError> {
        let raw_name = self
            .file_name
            .as_deref()
            .ok_or_else(|| UploadError::InvalidRequest("file_name is required".into()))?;
        let file_name =
            FileName::parse(raw_name).map_err(|e| UploadError::InvalidRequest(e.to_string()))?;
        let facts = parse_name_facts(file_name.as_str());
        let version_text = match (non_empty(&self.product_version), &facts) {
            (Some(v), _) => v.to_string(),
            (None, Some(f)) => f.version.clone(),
            (None, None) => return Err(UploadError::VersionRequired(raw_name.to_string())),
        };
        let version = ProductVersion::parse(&version_text)?;
        let model = match (non_empty(&self.model), &facts) {
            (Some(m), _) => m.to_string(),
            (None, Some(f)) => f.model.clone(),
            (None, None) => {
                return Err(UploadError::ValidationFailed(format!(
                    "no model given and none parsable from file name {raw_name:?}"
                )));
            }
        };
        if model.len() > 128 || model.chars().any(char::is_control) {
            return Err(UploadError::InvalidRequest(
                "model must be at most 128 characters without control characters".into(),
            ));
        }
        let bad =
            |e: crate::domain::ChecksumFormatError| UploadError::InvalidRequest(e.to_string());
        let md5 = non_empty(&self.md5)
            .map(Md5Hex::parse)
            .transpose()
            .map_err(bad)?;
        let sha256 = non_empty(&self.sha256)
            .map(Sha256Hex::parse)
            .transpose()
            .map_err(bad)?;
        let release_note = non_empty(&self.release_note).map(str::to_string);
        if release_note.as_ref().is_some_and(|n| n.len() > MAX_NOTE) {
            return Err(UploadError::InvalidRequest(format!(
                "release_note is longer than {MAX_NOTE} bytes"
            )));
        }
        Ok(ResolvedMeta {
            file_name,
            model,
            version,
            build_time: facts.and_then(|f| f.build_time),
            md5,
            sha256,
            release_note,
        })
    }
}

/// How an upload ended.
#[derive(Debug)]
pub enum UploadOutcome {
    /// A new record (201).
    Created(FirmwareRecord),
    /// The identical package was already there (200).
    Existing(FirmwareRecord),
}

/// Admits, streams and commits uploads. Cheap to clone.
#[derive(Clone)]
pub struct UploadService {
    firmware: Arc<dyn FirmwareStore>,
    uploads: Arc<dyn UploadStore>,
    blobs: BlobStore,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    max_slots: usize,
    max_bytes: u64,
    idle: Duration,
}

/// A granted upload slot.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

impl UploadService {
    /// A service writing to `blobs`, recording uploads in progress in `uploads` and committed
    /// ones in `firmware`.
    pub fn new(
        firmware: Arc<dyn FirmwareStore>,
        uploads: Arc<dyn UploadStore>,
        blobs: BlobStore,
        metrics: Arc<Metrics>,
        max_concurrent: usize,
        max_bytes: u64,
        idle: Duration,
    ) -> Self {
        UploadService {
            firmware,
            uploads,
            blobs,
            metrics,
            slots: Arc::new(Semaphore::new(max_concurrent)),
            max_slots: max_concurrent,
            max_bytes,
            idle,
        }
    }

    /// Uploads in progress.
    pub fn in_progress(&self) -> usize {
        self.max_slots - self.slots.available_permits()
    }

    /// Checks the declared length (`overhead`: framing bytes that are not file content, e.g.
    /// multipart boundaries) and takes an upload slot.
    pub fn admit(
        &self,
        declared_len: Option<u64>,
        overhead: u64,
    ) -> Result<Admission, UploadError> {
        if let Some(len) = declared_len {
            if len > self.max_bytes.saturating_add(overhead) {
                return Err(UploadError::TooLarge(self.max_bytes));
            }
            if let Some(free) = self.blobs.free_space()
                && len > free
            {
                return Err(UploadError::InsufficientStorage {
                    declared: len,
                    free,
                });
            }
        }
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(_permit) => {
                Metrics::add(&self.metrics.uploads_started, 1);
                Ok(Admission { _permit })
            }
            Err(_) => {
                Metrics::add(&self.metrics.uploads_rejected_busy, 1);
                Err(UploadError::TooMany(self.max_slots))
            }
        }
    }

    /// Starts an upload: records it as pending, opens the blob writer and the checksummer.
    pub async fn begin(&self, admission: Admission) -> Result<UploadSession, UploadError> {
        let id = FirmwareId::generate();
        let key = id.to_string();
        let mut pending = PendingUpload {
            v: SCHEMA_VERSION,
            id: key.clone(),
            blob_key: key.clone(),
            multipart_id: None,
            started_at: Utc::now(),
        };
        // Recorded before the store is touched, so a crash at any later point is swept.
        self.uploads.put_pending_upload(&pending).await?;
        let mut session = UploadSession {
            svc: self.clone(),
            id,
            writer: None,
            sums: Some(Checksummer::new()),
            batch: Vec::new(),
            batch_len: 0,
            finished: false,
            _admission: admission,
        };
        let writer = self.blobs.writer(&key).await?;
        if let Some(mpu) = writer.multipart_id() {
            pending.multipart_id = Some(mpu);
            self.uploads.put_pending_upload(&pending).await?;
        }
        session.writer = Some(writer);
        Ok(session)
    }

    async fn discard(&self, key: &str, writer: Option<BlobWriter>, published: bool) {
        let mut clean = true;
        if let Some(w) = writer
            && let Err(e) = w.abort().await
        {
            tracing::warn!(upload_id = key, error = %e, "aborting blob upload failed; retrying in the background");
            clean = false;
        }
        if published && let Err(e) = self.blobs.delete(key).await {
            tracing::warn!(upload_id = key, error = %e, "removing blob of failed upload failed; retrying in the background");
            clean = false;
        }
        if !clean {
            // The pending row (with the S3 upload id) stays until the cleanup has succeeded:
            // the background retry and the start-up sweep both work from it.
            self.retry_cleanup(key.to_string());
            return;
        }
        if let Err(e) = self.uploads.remove_pending_upload(key).await {
            tracing::warn!(upload_id = key, error = %e, "dropping pending upload row failed");
        }
    }

    /// Removes what one pending upload left (S3 multipart upload, blob, local staging file)
    /// and then its row.
    async fn clean_pending(&self, pending: &PendingUpload) -> Result<(), UploadError> {
        self.blobs
            .discard_partial(&pending.blob_key, pending.multipart_id.as_deref())
            .await?;
        self.uploads.remove_pending_upload(&pending.id).await?;
        Ok(())
    }

    /// Retries the cleanup of `key` with backoff (1 s doubling to 5 min) until it succeeds or
    /// the pending row is gone; a restart's sweep takes over if the process ends first.
    fn retry_cleanup(&self, key: String) {
        let svc = self.clone();
        tokio::spawn(async move {
            let mut wait = std::time::Duration::from_secs(1);
            loop {
                tokio::time::sleep(wait).await;
                let pending = match svc.uploads.pending_uploads().await {
                    Ok(all) => all.into_iter().find(|p| p.id == key),
                    Err(_) => None,
                };
                let Some(pending) = pending else { return };
                match svc.clean_pending(&pending).await {
                    Ok(()) => {
                        tracing::info!(upload_id = %key, "cleaned up an interrupted upload");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(upload_id = %key, error = %e, "upload cleanup still failing");
                        wait = (wait * 2).min(std::time::Duration::from_secs(300));
                    }
                }
            }
        });
    }

    /// Uploads in progress or waiting for their cleanup.
    pub async fn pending(&self) -> Result<Vec<PendingUpload>, CatalogError> {
        self.uploads.pending_uploads().await
    }

    /// Cleans up every pending upload: at start-up (what a crash left) and at shutdown (what
    /// the shutdown cut; no upload handler runs any more). One that cannot be cleaned now
    /// keeps its row and is retried in the background. Returns how many were cleaned.
    pub async fn discard_unfinished(&self) -> usize {
        let pending = match self.uploads.pending_uploads().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read pending uploads");
                return 0;
            }
        };
        let mut cleaned = 0;
        for p in pending {
            match self.clean_pending(&p).await {
                Ok(()) => {
                    tracing::info!(upload_id = %p.id, "swept an interrupted upload");
                    cleaned += 1;
                }
                Err(e) => {
                    tracing::warn!(upload_id = %p.id, error = %e, "cannot clean up an interrupted upload now; retrying in the background");
                    self.retry_cleanup(p.id.clone());
                }
            }
        }
        cleaned
    }
}

mod session;

pub use session::UploadSession;

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> UploadMeta {
        UploadMeta {
            file_name: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn resolves_names_and_versions() {
        let r = meta("WM265E_07.01.10.05.zip").resolve().unwrap();
        assert_eq!(
            (r.model.as_str(), r.version.as_str()),
            ("WM265E", "07.01.10.05")
        );
        assert!(matches!(
            meta("fw.bin").resolve(),
            Err(UploadError::VersionRequired(_))
        ));
        let mut m = meta("fw.bin");
        m.product_version = Some("1.a".into());
        assert!(matches!(m.resolve(), Err(UploadError::InvalidVersion(_))));
        m.product_version = Some("1.2".into());
        assert!(matches!(m.resolve(), Err(UploadError::ValidationFailed(_))));
        m.model = Some("Dock3".into());
        assert!(m.resolve().is_ok());
        m.md5 = Some("xyz".into());
        assert!(matches!(m.resolve(), Err(UploadError::InvalidRequest(_))));
        assert!(matches!(
            meta("../x_1.zip").resolve(),
            Err(UploadError::InvalidRequest(_))
        ));
    }
}
