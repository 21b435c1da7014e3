//! The catalog: every durable record fwrepo keeps, in sled. One named tree per record kind or
//! index, keys that sort (ULIDs, big-endian version keys), values as JSON with a schema version.
//!
//! Invariants:
//! - `firmware` holds only committed records (an upload in progress lives in `uploads` and is
//!   invisible to the API); `firmware_versions` maps (lower-cased model, version sort key) to the
//!   id of the one non-deleted record with that model and normalized version.
//! - A commit inserts the record and its index entry and drops the pending upload row in one
//!   transaction; a delete tombstones the record and frees its index entry in one transaction.
//! - Download sessions are written only by the progress flusher, never once per request.

mod records;

pub use records::{
    DownloadSessionRecord, FirmwareRecord, FirmwareStatus, PendingUpload, SCHEMA_VERSION,
    SessionState, VerifyStatus,
};

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::domain::{FirmwareId, ProductVersion};

/// Errors of the catalog layer.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// sled failed (I/O, corruption).
    #[error("catalog storage error: {0}")]
    Storage(#[from] sled::Error),
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

/// One page of a list.
#[derive(Debug)]
pub struct Page<T> {
    /// Items, newest first.
    pub items: Vec<T>,
    /// Cursor for the next page, if there may be one.
    pub next_cursor: Option<String>,
}

/// Paging request: `limit` (1–500) and an optional cursor from a previous page.
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

/// Group commit: concurrent callers of [`Catalog::flush`] share one fsync.
#[derive(Default)]
struct FlushGate {
    gate: tokio::sync::Mutex<()>,
    requested: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
}

/// The sled database and its trees. Cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    flushes: std::sync::Arc<FlushGate>,
    db: sled::Db,
    firmware: sled::Tree,
    firmware_versions: sled::Tree,
    uploads: sled::Tree,
    sessions: sled::Tree,
    devices: sled::Tree,
    tasks: sled::Tree,
    orphans: sled::Tree,
    idempotency: sled::Tree,
    meta: sled::Tree,
    rollouts: sled::Tree,
    rollout_members: sled::Tree,
    tokens: sled::Tree,
    audit: sled::Tree,
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, CatalogError> {
    serde_json::from_slice(value).map_err(|source| CatalogError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(value).unwrap_or_default()
}

fn version_key(model: &str, version: &ProductVersion) -> Vec<u8> {
    let mut key = model.to_lowercase().into_bytes();
    key.push(0);
    key.extend(version.sort_key());
    key
}

fn tx_abort<E>(e: TransactionError<E>) -> CatalogError
where
    CatalogError: From<E>,
{
    match e {
        TransactionError::Abort(e) => CatalogError::from(e),
        TransactionError::Storage(e) => CatalogError::Storage(e),
    }
}

impl From<std::convert::Infallible> for CatalogError {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

impl Catalog {
    /// Opens (or creates) the catalog under `dir` with a page cache of `cache_mb` MiB.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Catalog, CatalogError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb.saturating_mul(1 << 20))
            .open()?;
        Ok(Catalog {
            flushes: std::sync::Arc::default(),
            firmware: db.open_tree("firmware")?,
            firmware_versions: db.open_tree("firmware_versions")?,
            uploads: db.open_tree("uploads")?,
            sessions: db.open_tree("download_sessions")?,
            devices: db.open_tree("devices")?,
            tasks: db.open_tree("ota_tasks")?,
            orphans: db.open_tree("ota_orphans")?,
            idempotency: db.open_tree("idempotency")?,
            meta: db.open_tree("meta")?,
            rollouts: db.open_tree("rollouts")?,
            rollout_members: db.open_tree("rollout_members")?,
            tokens: db.open_tree("api_tokens")?,
            audit: db.open_tree("audit")?,
            db,
        })
    }

    /// Flushes everything written so far to disk. Concurrent callers share fsyncs (group
    /// commit): a caller returns once a flush that started after its call has finished.
    pub async fn flush(&self) -> Result<(), CatalogError> {
        use std::sync::atomic::Ordering::SeqCst;
        let f = &self.flushes;
        let mine = f.requested.fetch_add(1, SeqCst) + 1;
        let _turn = f.gate.lock().await;
        if f.completed.load(SeqCst) >= mine {
            return Ok(());
        }
        let covers = f.requested.load(SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| CatalogError::Storage(sled::Error::ReportableBug(e.to_string())))??;
        f.completed.fetch_max(covers, SeqCst);
        Ok(())
    }

    /// Flushes synchronously (offline tools).
    pub fn flush_blocking(&self) -> Result<(), CatalogError> {
        self.db.flush()?;
        Ok(())
    }

    /// A cheap read that proves the database answers (readiness).
    pub fn check(&self) -> Result<(), CatalogError> {
        self.meta.get("instance_id")?;
        Ok(())
    }

    /// The instance id kept in the data directory, created on first use.
    pub fn instance_id(&self) -> Result<String, CatalogError> {
        if let Some(v) = self.meta.get("instance_id")? {
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        let id = crate::domain::ids::next().to_lowercase();
        let _ = self.meta.compare_and_swap(
            "instance_id",
            None as Option<&[u8]>,
            Some(id.as_bytes()),
        )?;
        let v = self.meta.get("instance_id")?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    // ---- firmware ----

    /// One firmware record (tombstones included).
    pub fn firmware(&self, id: &FirmwareId) -> Result<FirmwareRecord, CatalogError> {
        let key = id.as_str().as_bytes();
        let v = self.firmware.get(key)?.ok_or(CatalogError::NotFound)?;
        decode(key, &v)
    }

    /// Newest-first page of firmware records matching `filter`.
    pub fn list_firmware(
        &self,
        page: &PageRequest,
        filter: impl Fn(&FirmwareRecord) -> bool,
    ) -> Result<Page<FirmwareRecord>, CatalogError> {
        page_desc(&self.firmware, page, filter)
    }

    /// Every firmware record, oldest first (export).
    pub fn all_firmware(&self) -> impl Iterator<Item = Result<FirmwareRecord, CatalogError>> + '_ {
        self.firmware.iter().map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
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
        let vkey = version_key(&record.model, version);
        let id_key = record.id.as_str().as_bytes().to_vec();
        let value = encode(record);
        let outcome = (&self.firmware, &self.firmware_versions, &self.uploads)
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
        let key = id.as_str().as_bytes();
        let updated = (&self.firmware, &self.firmware_versions)
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
        let key = record.id.as_str().as_bytes().to_vec();
        let vkey = ProductVersion::parse(&record.product_version)
            .ok()
            .filter(|_| record.status != FirmwareStatus::Deleted)
            .map(|v| version_key(&record.model, &v));
        let value = encode(record);
        (&self.firmware, &self.firmware_versions)
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
        self.uploads.insert(upload.id.as_bytes(), encode(upload))?;
        Ok(())
    }

    /// Forgets a pending upload (aborted and cleaned up).
    pub fn remove_pending_upload(&self, id: &str) -> Result<(), CatalogError> {
        self.uploads.remove(id.as_bytes())?;
        Ok(())
    }

    /// Every pending upload (the start-up sweep aborts them).
    pub fn pending_uploads(&self) -> Result<Vec<PendingUpload>, CatalogError> {
        self.uploads
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
        let mut batch = sled::Batch::default();
        for s in sessions {
            batch.insert(s.id.as_bytes(), encode(s));
        }
        self.sessions.apply_batch(batch)?;
        Ok(())
    }

    /// Newest-first page of stored sessions matching `filter`.
    pub fn list_sessions(
        &self,
        page: &PageRequest,
        filter: impl Fn(&DownloadSessionRecord) -> bool,
    ) -> Result<Page<DownloadSessionRecord>, CatalogError> {
        page_desc(&self.sessions, page, filter)
    }

    /// Stored sessions last seen within `since_secs` (restart: resume keyed sessions).
    pub fn recent_sessions(
        &self,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<DownloadSessionRecord>, CatalogError> {
        let mut out = Vec::new();
        for kv in self.sessions.iter() {
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
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.sessions.iter() {
            let (k, v) = kv?;
            let s: DownloadSessionRecord = decode(&k, &v)?;
            if s.last_seen_at < cutoff {
                batch.remove(k);
                n += 1;
            }
        }
        self.sessions.apply_batch(batch)?;
        Ok(n)
    }
}

impl Catalog {
    /// Stores a device record under its serial number.
    pub fn put_device<T: serde::Serialize>(
        &self,
        sn: &str,
        device: &T,
    ) -> Result<(), CatalogError> {
        self.devices.insert(sn.as_bytes(), encode(device))?;
        Ok(())
    }

    /// Removes a device record.
    pub fn delete_device(&self, sn: &str) -> Result<(), CatalogError> {
        self.devices.remove(sn.as_bytes())?;
        Ok(())
    }

    /// Every stored device record.
    pub fn all_devices<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, CatalogError> {
        self.devices
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }
}

impl Catalog {
    /// Stores an OTA task.
    pub fn put_task<T: serde::Serialize>(&self, id: &str, task: &T) -> Result<(), CatalogError> {
        self.tasks.insert(id.as_bytes(), encode(task))?;
        Ok(())
    }

    /// Keeps an OTA message that matched no task (at most 10,000; the oldest go first).
    pub fn put_orphan(&self, msg: &serde_json::Value) -> Result<(), CatalogError> {
        while self.orphans.len() >= 10_000 {
            if self.orphans.pop_min()?.is_none() {
                break;
            }
        }
        self.orphans
            .insert(crate::domain::ids::next().as_bytes(), encode(msg))?;
        Ok(())
    }

    /// Removes OTA tasks that finished before `cutoff`; returns how many.
    pub fn prune_tasks(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, CatalogError> {
        #[derive(serde::Deserialize)]
        struct Finished {
            finished_at: Option<chrono::DateTime<chrono::Utc>>,
        }
        let mut removed = 0;
        for kv in self.tasks.iter() {
            let (k, v) = kv?;
            let old = serde_json::from_slice::<Finished>(&v)
                .ok()
                .and_then(|t| t.finished_at)
                .is_some_and(|f| f < cutoff);
            if old {
                self.tasks.remove(&k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes an OTA task (one whose publish failed).
    pub fn delete_task(&self, id: &str) -> Result<(), CatalogError> {
        self.tasks.remove(id.as_bytes())?;
        Ok(())
    }

    /// One OTA task.
    pub fn task<T: serde::de::DeserializeOwned>(
        &self,
        id: &str,
    ) -> Result<Option<T>, CatalogError> {
        self.tasks
            .get(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    /// Every OTA task.
    pub fn all_tasks<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, CatalogError> {
        self.tasks
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Newest-first page of OTA tasks.
    pub fn list_tasks<T: serde::de::DeserializeOwned>(
        &self,
        page: &PageRequest,
        filter: impl Fn(&T) -> bool,
    ) -> Result<Page<T>, CatalogError> {
        page_desc(&self.tasks, page, filter)
    }

    /// The stored answer of an Idempotency-Key seen within 24 h: (body hash, status, answer).
    pub fn idempotent(
        &self,
        key: &str,
    ) -> Result<Option<(String, u16, serde_json::Value)>, CatalogError> {
        let Some(v) = self.idempotency.get(key.as_bytes())? else {
            return Ok(None);
        };
        let rec: serde_json::Value = decode(key.as_bytes(), &v)?;
        let at = rec["at"].as_i64().unwrap_or(0);
        if chrono::Utc::now().timestamp() - at > 86_400 {
            self.idempotency.remove(key.as_bytes())?;
            return Ok(None);
        }
        Ok(Some((
            rec["hash"].as_str().unwrap_or_default().to_string(),
            rec["status"].as_u64().unwrap_or(200) as u16,
            rec["answer"].clone(),
        )))
    }

    /// Removes the Idempotency-Key answers older than 24 h; returns how many.
    pub fn prune_idempotency(&self) -> Result<usize, CatalogError> {
        let cutoff = chrono::Utc::now().timestamp() - 86_400;
        let mut removed = 0;
        for kv in self.idempotency.iter() {
            let (k, v) = kv?;
            let at = serde_json::from_slice::<serde_json::Value>(&v)
                .ok()
                .and_then(|rec| rec["at"].as_i64())
                .unwrap_or(0);
            if at < cutoff {
                self.idempotency.remove(&k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Remembers the answer to an Idempotency-Key.
    pub fn put_idempotent(
        &self,
        key: &str,
        hash: &str,
        status: u16,
        answer: &serde_json::Value,
    ) -> Result<(), CatalogError> {
        let rec = serde_json::json!({"hash": hash, "status": status, "answer": answer,
            "at": chrono::Utc::now().timestamp()});
        self.idempotency.insert(key.as_bytes(), encode(&rec))?;
        Ok(())
    }
}

impl Catalog {
    /// Stores a rollout.
    pub fn put_rollout<T: serde::Serialize>(&self, id: &str, r: &T) -> Result<(), CatalogError> {
        self.rollouts.insert(id.as_bytes(), encode(r))?;
        Ok(())
    }

    /// One rollout.
    pub fn rollout<T: serde::de::DeserializeOwned>(
        &self,
        id: &str,
    ) -> Result<Option<T>, CatalogError> {
        self.rollouts
            .get(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    /// Every rollout.
    pub fn all_rollouts<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, CatalogError> {
        self.rollouts
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Newest-first page of rollouts.
    pub fn list_rollouts<T: serde::de::DeserializeOwned>(
        &self,
        page: &PageRequest,
        filter: impl Fn(&T) -> bool,
    ) -> Result<Page<T>, CatalogError> {
        page_desc(&self.rollouts, page, filter)
    }

    /// Stores rollout members (one gateway each) under `rollout_id/key`.
    pub fn put_members<T: serde::Serialize>(
        &self,
        rollout_id: &str,
        members: &[(String, &T)],
    ) -> Result<(), CatalogError> {
        let mut batch = sled::Batch::default();
        for (key, m) in members {
            batch.insert(format!("{rollout_id}/{key}").into_bytes(), encode(m));
        }
        self.rollout_members.apply_batch(batch)?;
        Ok(())
    }

    /// A rollout's members in key order.
    pub fn members<T: serde::de::DeserializeOwned>(
        &self,
        rollout_id: &str,
    ) -> Result<Vec<T>, CatalogError> {
        self.rollout_members
            .scan_prefix(format!("{rollout_id}/").as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }
}

/// Walks `tree` from newest to oldest key after the cursor, keeping matching values.
fn page_desc<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    page: &PageRequest,
    filter: impl Fn(&T) -> bool,
) -> Result<Page<T>, CatalogError> {
    let limit = page.limit();
    let iter = match page.after_key()? {
        Some(after) => tree.range(..after),
        None => tree.iter(),
    };
    let mut items = Vec::with_capacity(limit);
    let mut last_key = None;
    for kv in iter.rev() {
        let (k, v) = kv?;
        let item: T = decode(&k, &v)?;
        if filter(&item) {
            if items.len() == limit {
                return Ok(Page {
                    items,
                    next_cursor: last_key
                        .map(|k: sled::IVec| cursor_for(&String::from_utf8_lossy(&k))),
                });
            }
            items.push(item);
            last_key = Some(k);
        }
    }
    Ok(Page {
        items,
        next_cursor: None,
    })
}

impl Catalog {
    /// Stores an API token record (only the token's hash is in it) under its id.
    pub fn put_token<T: serde::Serialize>(&self, id: &str, t: &T) -> Result<(), CatalogError> {
        self.tokens.insert(id.as_bytes(), encode(t))?;
        Ok(())
    }

    /// Every API token record.
    pub fn all_tokens<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, CatalogError> {
        self.tokens
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Newest-first page of API token records.
    pub fn list_tokens<T: serde::de::DeserializeOwned>(
        &self,
        page: &PageRequest,
    ) -> Result<Page<T>, CatalogError> {
        page_desc(&self.tokens, page, |_: &T| true)
    }

    /// Appends an audit entry under its (time-ordered) id.
    pub fn put_audit<T: serde::Serialize>(&self, id: &str, entry: &T) -> Result<(), CatalogError> {
        self.audit.insert(id.as_bytes(), encode(entry))?;
        Ok(())
    }

    /// Newest-first page of audit entries whose id sorts at or after `since_key`.
    pub fn list_audit<T: serde::de::DeserializeOwned>(
        &self,
        page: &PageRequest,
        since_key: Option<&str>,
    ) -> Result<Page<T>, CatalogError> {
        let Some(since) = since_key else {
            return page_desc(&self.audit, page, |_: &T| true);
        };
        let limit = page.limit();
        let upper = page.after_key()?;
        let iter = match &upper {
            Some(after) => self.audit.range(since.as_bytes()..after.as_slice()),
            None => self.audit.range(since.as_bytes()..),
        };
        let mut items = Vec::with_capacity(limit);
        let mut last_key: Option<sled::IVec> = None;
        for kv in iter.rev() {
            let (k, v) = kv?;
            if items.len() == limit {
                return Ok(Page {
                    items,
                    next_cursor: last_key.map(|k| cursor_for(&String::from_utf8_lossy(&k))),
                });
            }
            items.push(decode(&k, &v)?);
            last_key = Some(k);
        }
        Ok(Page {
            items,
            next_cursor: None,
        })
    }

    /// Removes audit entries whose id sorts before `before_key`; returns how many.
    pub fn prune_audit(&self, before_key: &str) -> Result<usize, CatalogError> {
        let mut removed = 0;
        for kv in self.audit.range(..before_key.as_bytes()) {
            let (k, _) = kv?;
            self.audit.remove(&k)?;
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model: &str, version: &str, sha: &str) -> FirmwareRecord {
        FirmwareRecord::new_for_test(model, version, sha)
    }

    #[test]
    fn finished_tasks_are_pruned_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), 8).unwrap();
        let now = chrono::Utc::now();
        let day = chrono::Duration::days(1);
        cat.put_task("old", &serde_json::json!({"finished_at": now - day * 200}))
            .unwrap();
        cat.put_task("recent", &serde_json::json!({"finished_at": now - day}))
            .unwrap();
        cat.put_task("open", &serde_json::json!({"finished_at": null}))
            .unwrap();
        assert_eq!(cat.prune_tasks(now - day * 180).unwrap(), 1);
        let left: Vec<serde_json::Value> = cat.all_tasks().unwrap();
        assert_eq!(left.len(), 2);
    }

    #[test]
    fn idempotency_answers_expire_after_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), 8).unwrap();
        cat.put_idempotent("fresh", "h", 201, &serde_json::json!({}))
            .unwrap();
        let old = serde_json::json!({"hash": "h", "status": 201, "answer": {},
            "at": chrono::Utc::now().timestamp() - 90_000});
        cat.idempotency.insert("old", encode(&old)).unwrap();
        assert_eq!(cat.prune_idempotency().unwrap(), 1);
        assert!(cat.idempotent("fresh").unwrap().is_some());
        assert!(cat.idempotency.get("old").unwrap().is_none());
    }

    #[test]
    fn commit_detects_duplicates_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), 8).unwrap();
        let a = record("Dock", "1.2", "aa");
        let v = ProductVersion::parse("1.2").unwrap();
        assert!(matches!(
            cat.commit_firmware(&a, &v, "u1").unwrap(),
            CommitOutcome::Created(_)
        ));
        let same = record("dock", "1.2.0", "aa");
        let v2 = ProductVersion::parse("1.2.0").unwrap();
        assert!(
            matches!(cat.commit_firmware(&same, &v2, "u2").unwrap(), CommitOutcome::Duplicate(r) if r.id == a.id)
        );
        let other = record("DOCK", "01.02", "bb");
        assert!(matches!(
            cat.commit_firmware(&other, &v, "u3").unwrap(),
            CommitOutcome::Conflict(_)
        ));
        cat.update_firmware(&a.id, |r| r.status = FirmwareStatus::Deleted)
            .unwrap();
        assert!(matches!(
            cat.commit_firmware(&other, &v, "u4").unwrap(),
            CommitOutcome::Created(_)
        ));
    }

    #[test]
    fn pages_are_newest_first_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), 8).unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let r = record("m", &format!("1.{i}"), "x");
            let v = ProductVersion::parse(&r.product_version).unwrap();
            cat.commit_firmware(&r, &v, "u").unwrap();
            ids.push(r.id);
        }
        let p1 = cat
            .list_firmware(
                &PageRequest {
                    limit: Some(2),
                    cursor: None,
                },
                |_| true,
            )
            .unwrap();
        assert_eq!(
            p1.items.iter().map(|r| &r.id).collect::<Vec<_>>(),
            vec![&ids[4], &ids[3]]
        );
        // An insert between pages does not shift the next page.
        let r = record("m", "9.9", "x");
        cat.commit_firmware(&r, &ProductVersion::parse("9.9").unwrap(), "u")
            .unwrap();
        let p2 = cat
            .list_firmware(
                &PageRequest {
                    limit: Some(2),
                    cursor: p1.next_cursor.clone(),
                },
                |_| true,
            )
            .unwrap();
        assert_eq!(
            p2.items.iter().map(|r| &r.id).collect::<Vec<_>>(),
            vec![&ids[2], &ids[1]]
        );
        let p3 = cat
            .list_firmware(
                &PageRequest {
                    limit: Some(2),
                    cursor: p2.next_cursor,
                },
                |_| true,
            )
            .unwrap();
        assert_eq!(p3.items.len(), 1);
        assert!(p3.next_cursor.is_none());
        assert!(matches!(
            cat.list_firmware(
                &PageRequest {
                    limit: None,
                    cursor: Some("!!".into())
                },
                |_| true
            ),
            Err(CatalogError::InvalidCursor)
        ));
    }
}
