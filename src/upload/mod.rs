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
use crate::catalog::{
    Catalog, CatalogError, CommitOutcome, FirmwareRecord, FirmwareStatus, PendingUpload,
    SCHEMA_VERSION,
};
use crate::checksum::{ChecksumError, Checksummer, Digests};
use crate::domain::{
    FileName, FirmwareId, Md5Hex, ProductVersion, Sha256Hex, VersionError, parse_name_facts,
};
use crate::metrics::Metrics;

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
    catalog: Catalog,
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
    /// A service writing to `blobs` and `catalog`.
    pub fn new(
        catalog: Catalog,
        blobs: BlobStore,
        metrics: Arc<Metrics>,
        max_concurrent: usize,
        max_bytes: u64,
        idle: Duration,
    ) -> Self {
        UploadService {
            catalog,
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
            if let Some(free) = self.blobs.free_space() {
                if len > free {
                    return Err(UploadError::InsufficientStorage {
                        declared: len,
                        free,
                    });
                }
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
        self.catalog.put_pending_upload(&pending)?;
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
            self.catalog.put_pending_upload(&pending)?;
        }
        session.writer = Some(writer);
        Ok(session)
    }

    async fn discard(&self, key: &str, writer: Option<BlobWriter>, published: bool) {
        let mut clean = true;
        if let Some(w) = writer {
            if let Err(e) = w.abort().await {
                tracing::warn!(upload_id = key, error = %e, "aborting blob upload failed; retrying in the background");
                clean = false;
            }
        }
        if published {
            if let Err(e) = self.blobs.delete(key).await {
                tracing::warn!(upload_id = key, error = %e, "removing blob of failed upload failed; retrying in the background");
                clean = false;
            }
        }
        if !clean {
            // The pending row (with the S3 upload id) stays until the cleanup has succeeded:
            // the background retry and the start-up sweep both work from it.
            self.retry_cleanup(key.to_string());
            return;
        }
        if let Err(e) = self.catalog.remove_pending_upload(key) {
            tracing::warn!(upload_id = key, error = %e, "dropping pending upload row failed");
        }
    }

    /// Removes what one pending upload left (S3 multipart upload, blob, local staging file)
    /// and then its row.
    async fn clean_pending(&self, pending: &PendingUpload) -> Result<(), UploadError> {
        self.blobs
            .discard_partial(&pending.blob_key, pending.multipart_id.as_deref())
            .await?;
        self.catalog.remove_pending_upload(&pending.id)?;
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
                let pending = match svc.catalog.pending_uploads() {
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

    /// Cleans up every pending upload: at start-up (what a crash left) and at shutdown (what
    /// the shutdown cut; no upload handler runs any more). One that cannot be cleaned now
    /// keeps its row and is retried in the background. Returns how many were cleaned.
    pub async fn discard_unfinished(&self) -> usize {
        let pending = match self.catalog.pending_uploads() {
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

/// One upload in progress. Dropping it unfinished cleans up in the background.
pub struct UploadSession {
    svc: UploadService,
    id: FirmwareId,
    writer: Option<BlobWriter>,
    sums: Option<Checksummer>,
    batch: Vec<Bytes>,
    batch_len: usize,
    finished: bool,
    _admission: Admission,
}

impl UploadSession {
    /// Streams a body (or one multipart part) into the upload, enforcing the size limit and the
    /// idle timeout as bytes arrive. With `expected_len` (a raw body's Content-Length), a body
    /// that ends short is an aborted upload, not a smaller file: a closed connection can look
    /// like the end of a body.
    pub async fn write_stream<S, E>(
        &mut self,
        stream: S,
        expected_len: Option<u64>,
    ) -> Result<(), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::time::timeout(self.svc.idle, stream.next())
                .await
                .map_err(|_| UploadError::IdleTimeout(self.svc.idle.as_secs()))?;
            match next {
                None => {
                    let received = self.received();
                    return match expected_len {
                        Some(len) if len != received => Err(UploadError::BodyAborted(format!(
                            "the body ended after {received} of {len} bytes"
                        ))),
                        _ => Ok(()),
                    };
                }
                Some(Err(e)) => return Err(UploadError::BodyAborted(e.to_string())),
                Some(Ok(chunk)) => self.write(chunk).await?,
            }
        }
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), UploadError> {
        let received = self.received() + chunk.len() as u64;
        if received > self.svc.max_bytes {
            return Err(UploadError::TooLarge(self.svc.max_bytes));
        }
        Metrics::add(&self.svc.metrics.bytes_in, chunk.len() as u64);
        self.batch_len += chunk.len();
        self.batch.push(chunk);
        if self.batch_len >= BATCH {
            self.push_batch().await?;
        }
        Ok(())
    }

    fn received(&self) -> u64 {
        self.sums.as_ref().map_or(0, Checksummer::size) + self.batch_len as u64
    }

    async fn push_batch(&mut self) -> Result<(), UploadError> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_len = 0;
        if let Some(sums) = self.sums.as_mut() {
            sums.update(batch.clone()).await?;
        }
        if let Some(w) = self.writer.as_mut() {
            w.write(batch).await?;
        }
        Ok(())
    }

    /// Verifies and commits the upload. On error everything written is removed.
    pub async fn commit(mut self, meta: &UploadMeta) -> Result<UploadOutcome, UploadError> {
        let result = self.try_commit(meta).await;
        self.finished = true;
        let metrics = &self.svc.metrics;
        match &result {
            Ok(UploadOutcome::Created(r)) => {
                Metrics::add(&metrics.uploads_created, 1);
                tracing::info!(firmware_id = %r.id, model = %r.model, product_version = %r.product_version, file_size = r.file_size, md5 = %r.md5, "firmware uploaded");
            }
            Ok(UploadOutcome::Existing(r)) => {
                Metrics::add(&metrics.uploads_duplicate, 1);
                tracing::info!(firmware_id = %r.id, "identical firmware already stored");
            }
            Err(e) => {
                Metrics::add(&metrics.uploads_failed, 1);
                tracing::info!(error = %e, "upload refused");
            }
        }
        result
    }

    async fn try_commit(&mut self, meta: &UploadMeta) -> Result<UploadOutcome, UploadError> {
        let key = self.id.to_string();
        let checked = self.finish_stream(meta).await;
        let (resolved, digests) = match checked {
            Ok(v) => v,
            Err(e) => {
                self.svc.discard(&key, self.writer.take(), false).await;
                return Err(e);
            }
        };
        let Some(writer) = self.writer.take() else {
            return Err(UploadError::InvalidRequest(
                "upload already finished".into(),
            ));
        };
        if let Err(e) = writer.finish().await {
            self.svc.discard(&key, None, true).await;
            return Err(e.into());
        }
        let record = FirmwareRecord {
            v: SCHEMA_VERSION,
            id: self.id.clone(),
            file_name: resolved.file_name.as_str().to_string(),
            model: resolved.model.clone(),
            product_version: resolved.version.as_str().to_string(),
            file_size: digests.size,
            md5: digests.md5.as_str().to_string(),
            sha256: digests.sha256.as_str().to_string(),
            release_note: resolved.release_note.clone(),
            build_time: resolved.build_time,
            created_at: Utc::now(),
            status: FirmwareStatus::Ready,
            verify_status: None,
            verified_at: None,
            deleted_at: None,
            blob_key: key.clone(),
        };
        let outcome = self
            .svc
            .catalog
            .commit_firmware(&record, &resolved.version, &key);
        match outcome {
            Ok(CommitOutcome::Created(r)) => Ok(UploadOutcome::Created(r)),
            Ok(CommitOutcome::Duplicate(existing)) => {
                self.svc.discard(&key, None, true).await;
                Ok(UploadOutcome::Existing(existing))
            }
            Ok(CommitOutcome::Conflict(existing)) => {
                self.svc.discard(&key, None, true).await;
                Err(UploadError::VersionConflict {
                    model: existing.model,
                    version: existing.product_version,
                    existing: existing.id,
                })
            }
            Err(e) => {
                self.svc.discard(&key, None, true).await;
                Err(e.into())
            }
        }
    }

    /// Drains the last block, finishes the digests and checks metadata and checksums.
    async fn finish_stream(
        &mut self,
        meta: &UploadMeta,
    ) -> Result<(ResolvedMeta, Digests), UploadError> {
        if !self.batch.is_empty() {
            self.push_batch().await?;
        }
        let sums = self
            .sums
            .take()
            .ok_or_else(|| UploadError::InvalidRequest("upload already finished".into()))?;
        let digests = sums.finish().await?;
        if digests.size == 0 {
            return Err(UploadError::InvalidRequest("the file is empty".into()));
        }
        let resolved = meta.resolve()?;
        if let Some(given) = &resolved.md5 {
            if given != &digests.md5 {
                return Err(UploadError::ChecksumMismatch {
                    field: "md5",
                    given: given.as_str().into(),
                    computed: digests.md5.as_str().into(),
                });
            }
        }
        if let Some(given) = &resolved.sha256 {
            if given != &digests.sha256 {
                return Err(UploadError::ChecksumMismatch {
                    field: "sha256",
                    given: given.as_str().into(),
                    computed: digests.sha256.as_str().into(),
                });
            }
        }
        Ok((resolved, digests))
    }

    /// Abandons the upload now (instead of in the background on drop).
    pub async fn abort(mut self, reason: &UploadError) {
        self.finished = true;
        Metrics::add(&self.svc.metrics.uploads_failed, 1);
        tracing::info!(upload_id = %self.id, error = %reason, "upload aborted");
        let key = self.id.to_string();
        self.svc.discard(&key, self.writer.take(), false).await;
    }
}

impl Drop for UploadSession {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        Metrics::add(&self.svc.metrics.uploads_failed, 1);
        let svc = self.svc.clone();
        let key = self.id.to_string();
        let writer = self.writer.take();
        tracing::info!(upload_id = %key, "upload dropped unfinished; cleaning up");
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { svc.discard(&key, writer, false).await });
        }
    }
}

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
