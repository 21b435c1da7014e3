//! One upload in progress: bytes are hashed and streamed into the blob store as they arrive,
//! size limits and idle timeouts are checked on the way, and `commit` verifies and records it
//! (or removes everything written).

use super::*;

/// One upload in progress. Dropping it unfinished cleans up in the background.
pub struct UploadSession {
    pub(super) svc: UploadService,
    pub(super) id: FirmwareId,
    pub(super) writer: Option<BlobWriter>,
    pub(super) sums: Option<Checksummer>,
    pub(super) batch: Vec<Bytes>,
    pub(super) batch_len: usize,
    pub(super) finished: bool,
    pub(super) _admission: Admission,
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
        let outcome = self.svc.firmware.commit_firmware(&record, &key).await;
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
        if let Some(given) = &resolved.md5
            && given != &digests.md5
        {
            return Err(UploadError::ChecksumMismatch {
                field: "md5",
                given: given.as_str().into(),
                computed: digests.md5.as_str().into(),
            });
        }
        if let Some(given) = &resolved.sha256
            && given != &digests.sha256
        {
            return Err(UploadError::ChecksumMismatch {
                field: "sha256",
                given: given.as_str().into(),
                computed: digests.sha256.as_str().into(),
            });
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
