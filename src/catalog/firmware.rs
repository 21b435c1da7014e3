//! Firmware records, pending uploads and download sessions.

use sled::transaction::{ConflictableTransactionError, Transactional};

use super::*;
use crate::domain::{FirmwareId, ProductVersion};

impl Catalog {
    /// One firmware record (tombstones included).
    pub fn firmware(&self, id: &FirmwareId) -> Result<FirmwareRecord, CatalogError> {
        let t = self.trees()?;
        let key = id.as_str().as_bytes();
        let v = t.firmware.get(key)?.ok_or(CatalogError::NotFound)?;
        decode(key, &v)
    }

    /// Newest-first page of firmware records matching `filter`.
    pub fn list_firmware(
        &self,
        page: &PageRequest,
        filter: impl Fn(&FirmwareRecord) -> bool,
    ) -> Result<Page<FirmwareRecord>, CatalogError> {
        let t = self.trees()?;
        page_desc(&t.firmware, page, filter)
    }

    /// Every firmware record, oldest first (export).
    pub fn all_firmware(&self) -> impl Iterator<Item = Result<FirmwareRecord, CatalogError>> {
        let (unopened, iter) = match self.trees() {
            Ok(t) => (None, Some(t.firmware.iter())),
            Err(e) => (Some(Err(e)), None),
        };
        unopened
            .into_iter()
            .chain(iter.into_iter().flatten().map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            }))
    }

    /// Inserts a record as committed and drops the pending upload row, in one transaction;
    /// unless its model + version exists: then nothing changes (the caller removes its blob and
    /// then the pending row) and the outcome says whether the content is the same.
    pub fn commit_firmware(
        &self,
        record: &FirmwareRecord,
        version: &ProductVersion,
        upload_id: &str,
    ) -> Result<CommitOutcome, CatalogError> {
        let t = self.trees()?;
        let vkey = version_key(&record.model, version);
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

    /// Rewrites a record (status changes); tombstoning also frees its model+version, in one
    /// transaction. Returns the stored record.
    pub fn update_firmware(
        &self,
        id: &FirmwareId,
        change: impl Fn(&mut FirmwareRecord),
    ) -> Result<FirmwareRecord, CatalogError> {
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
                change(&mut record);
                if record.status == FirmwareStatus::Deleted && !was_deleted {
                    if let Ok(v) = ProductVersion::parse(&record.product_version) {
                        let vkey = version_key(&record.model, &v);
                        if versions.get(&vkey)?.as_deref() == Some(key) {
                            versions.remove(vkey)?;
                        }
                    }
                }
                fw.insert(key, encode(&record))?;
                Ok(record)
            })
            .map_err(tx_abort)?;
        Ok(updated)
    }

    /// Imports a record as is (offline restore). Returns false if its id or its model+version
    /// is already present.
    pub fn import_firmware(&self, record: &FirmwareRecord) -> Result<bool, CatalogError> {
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

    // ---- pending uploads ----

    /// Records an upload that has started (before its first byte reaches the blob store).
    pub fn put_pending_upload(&self, upload: &PendingUpload) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.uploads.insert(upload.id.as_bytes(), encode(upload))?;
        Ok(())
    }

    /// Forgets a pending upload (aborted and cleaned up).
    pub fn remove_pending_upload(&self, id: &str) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.uploads.remove(id.as_bytes())?;
        Ok(())
    }

    /// Every pending upload (the start-up sweep aborts them).
    pub fn pending_uploads(&self) -> Result<Vec<PendingUpload>, CatalogError> {
        let t = self.trees()?;
        t.uploads
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    // ---- download sessions ----

    /// Stores sessions (the progress flusher) in one batch.
    pub fn put_sessions(&self, sessions: &[DownloadSessionRecord]) -> Result<(), CatalogError> {
        let t = self.trees()?;
        let mut batch = sled::Batch::default();
        for s in sessions {
            batch.insert(s.id.as_bytes(), encode(s));
        }
        t.sessions.apply_batch(batch)?;
        Ok(())
    }

    /// Newest-first page of stored sessions matching `filter`.
    pub fn list_sessions(
        &self,
        page: &PageRequest,
        filter: impl Fn(&DownloadSessionRecord) -> bool,
    ) -> Result<Page<DownloadSessionRecord>, CatalogError> {
        let t = self.trees()?;
        page_desc(&t.sessions, page, filter)
    }

    /// Stored sessions last seen within `since_secs` (restart: resume keyed sessions).
    pub fn recent_sessions(
        &self,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<DownloadSessionRecord>, CatalogError> {
        let t = self.trees()?;
        let mut out = Vec::new();
        for kv in t.sessions.iter() {
            let (k, v) = kv?;
            let s: DownloadSessionRecord = decode(&k, &v)?;
            if s.last_seen_at >= since {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Deletes sessions last seen before `cutoff`; returns how many.
    pub fn prune_sessions(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, CatalogError> {
        let t = self.trees()?;
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
    }
}
