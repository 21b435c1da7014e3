//! Firmware records, pending uploads and download sessions in sled.

use futures::stream::BoxStream;
use sled::transaction::{ConflictableTransactionError, Transactional};

use super::*;
use crate::domain::FirmwareId;
use crate::store::{
    CommitOutcome, DownloadSessionRecord, Edit, FirmwareQuery, FirmwareRecord, FirmwareStatus,
    FirmwareStore, PendingUpload, SessionQuery, SessionStore, UploadStore,
};

#[async_trait::async_trait]
impl FirmwareStore for Catalog {
    async fn firmware(&self, id: &FirmwareId) -> StoreResult<FirmwareRecord> {
        let t = self.trees()?;
        let key = id.as_str().as_bytes();
        let v = t.firmware.get(key)?.ok_or(CatalogError::NotFound)?;
        decode(key, &v)
    }

    async fn list_firmware(
        &self,
        query: &FirmwareQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<FirmwareRecord>> {
        let t = self.trees()?;
        page_desc(&t.firmware, page, |r| query.matches(r))
    }

    fn all_firmware(&self) -> BoxStream<'_, StoreResult<FirmwareRecord>> {
        let (unopened, iter) = match self.trees() {
            Ok(t) => (None, Some(t.firmware.iter())),
            Err(e) => (Some(Err(e)), None),
        };
        Box::pin(futures::stream::iter(unopened.into_iter().chain(
            iter.into_iter().flatten().map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            }),
        )))
    }

    async fn commit_firmware(
        &self,
        record: &FirmwareRecord,
        upload_id: &str,
    ) -> StoreResult<CommitOutcome> {
        let t = self.trees()?;
        let version = ProductVersion::parse(&record.product_version)
            .map_err(|e| CatalogError::Storage(e.to_string().into()))?;
        let vkey = version_key(&record.model, &version);
        let id_key = record.id.as_str().as_bytes().to_vec();
        let value = encode(record);
        let outcome = (&t.firmware, &t.firmware_versions, &t.uploads)
            .transaction(|(fw, versions, uploads)| {
                if let Some(existing_id) = versions.get(&vkey)? {
                    let existing = fw.get(&existing_id)?.ok_or_else(|| {
                        ConflictableTransactionError::Abort(CatalogError::NotFound)
                    })?;
                    let existing: FirmwareRecord = decode(&existing_id, &existing)
                        .map_err(ConflictableTransactionError::Abort)?;
                    return Ok(
                        if existing.sha256 == record.sha256
                            && existing.file_size == record.file_size
                        {
                            CommitOutcome::Duplicate(existing)
                        } else {
                            CommitOutcome::Conflict(existing)
                        },
                    );
                }
                fw.insert(id_key.as_slice(), value.as_slice())?;
                versions.insert(vkey.as_slice(), id_key.as_slice())?;
                uploads.remove(upload_id.as_bytes())?;
                Ok(CommitOutcome::Created(record.clone()))
            })
            .map_err(tx_abort)?;
        Ok(outcome)
    }

    async fn update_firmware(
        &self,
        id: &FirmwareId,
        edit: Edit<'_, FirmwareRecord>,
    ) -> StoreResult<FirmwareRecord> {
        let t = self.trees()?;
        let key = id.as_str().as_bytes();
        let updated = (&t.firmware, &t.firmware_versions)
            .transaction(|(fw, versions)| {
                let current = fw
                    .get(key)?
                    .ok_or(ConflictableTransactionError::Abort(CatalogError::NotFound))?;
                let mut record: FirmwareRecord =
                    decode(key, &current).map_err(ConflictableTransactionError::Abort)?;
                let was_deleted = record.status == FirmwareStatus::Deleted;
                edit(&mut record);
                if record.status == FirmwareStatus::Deleted
                    && !was_deleted
                    && let Ok(v) = ProductVersion::parse(&record.product_version)
                {
                    let vkey = version_key(&record.model, &v);
                    if versions.get(&vkey)?.as_deref() == Some(key) {
                        versions.remove(vkey)?;
                    }
                }
                fw.insert(key, encode(&record))?;
                Ok(record)
            })
            .map_err(tx_abort)?;
        Ok(updated)
    }

    async fn import_firmware(&self, record: &FirmwareRecord) -> StoreResult<bool> {
        let t = self.trees()?;
        let key = record.id.as_str().as_bytes().to_vec();
        let vkey = ProductVersion::parse(&record.product_version)
            .ok()
            .filter(|_| record.status != FirmwareStatus::Deleted)
            .map(|v| version_key(&record.model, &v));
        let value = encode(record);
        (&t.firmware, &t.firmware_versions)
            .transaction(|(fw, versions)| {
                if fw.get(&key)?.is_some() {
                    return Ok(false);
                }
                if let Some(vkey) = &vkey {
                    if versions.get(vkey)?.is_some() {
                        return Ok(false);
                    }
                    versions.insert(vkey.as_slice(), key.as_slice())?;
                }
                fw.insert(key.as_slice(), value.as_slice())?;
                Ok(true)
            })
            .map_err(tx_abort::<std::convert::Infallible>)
    }
}

#[async_trait::async_trait]
impl UploadStore for Catalog {
    async fn put_pending_upload(&self, upload: &PendingUpload) -> StoreResult<()> {
        let t = self.trees()?;
        t.uploads.insert(upload.id.as_bytes(), encode(upload))?;
        Ok(())
    }

    async fn remove_pending_upload(&self, id: &str) -> StoreResult<()> {
        let t = self.trees()?;
        t.uploads.remove(id.as_bytes())?;
        Ok(())
    }

    async fn pending_uploads(&self) -> StoreResult<Vec<PendingUpload>> {
        all_of(&self.trees()?.uploads)
    }
}

#[async_trait::async_trait]
impl SessionStore for Catalog {
    async fn merge_sessions(&self, sessions: &[DownloadSessionRecord]) -> StoreResult<()> {
        let t = self.trees()?;
        let mut batch = sled::Batch::default();
        for s in sessions {
            let merged = match t.sessions.get(s.id.as_bytes())? {
                Some(v) => decode::<DownloadSessionRecord>(s.id.as_bytes(), &v)?.merged(s),
                None => s.clone(),
            };
            batch.insert(s.id.as_bytes(), encode(&merged));
        }
        t.sessions.apply_batch(batch)?;
        Ok(())
    }

    async fn list_sessions(
        &self,
        query: &SessionQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<DownloadSessionRecord>> {
        let t = self.trees()?;
        page_desc(&t.sessions, page, |s| query.matches(s))
    }

    async fn recent_sessions(
        &self,
        since: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<Vec<DownloadSessionRecord>> {
        let all: Vec<DownloadSessionRecord> = all_of(&self.trees()?.sessions)?;
        Ok(all
            .into_iter()
            .filter(|s| s.last_seen_at >= since)
            .collect())
    }

    async fn prune_sessions(&self, cutoff: chrono::DateTime<chrono::Utc>) -> StoreResult<usize> {
        self.blocking(move |t| {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in t.sessions.iter() {
                let (k, v) = kv?;
                let s: DownloadSessionRecord = decode(&k, &v)?;
                if s.last_seen_at < cutoff {
                    batch.remove(k);
                    n += 1;
                }
            }
            t.sessions.apply_batch(batch)?;
            Ok(n)
        })
        .await
    }
}
