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

mod admin;
mod backend;
mod firmware;
mod fleet;
pub mod postgres;
mod tasks;

pub mod transfer;

pub use backend::{CatalogBackend, PoolLimits, open, open_store, redact};

use crate::ota::OtaStores;
use crate::rollout::RolloutStores;

/// The OTA service's ports, served by `store`.
pub fn ota_stores(store: &Arc<dyn Store>) -> OtaStores {
    OtaStores {
        tasks: store.clone(),
        firmware: store.clone(),
        idempotency: store.clone(),
        durability: store.clone(),
    }
}

/// The rollout service's ports, served by `store`.
pub fn rollout_stores(store: &Arc<dyn Store>) -> RolloutStores {
    RolloutStores {
        rollouts: store.clone(),
        firmware: store.clone(),
        idempotency: store.clone(),
    }
}

/// The whole storage interface: every port a catalog backend implements (one backend serves
/// them all; services hold only the ports they use).
pub trait Store:
    crate::store::FirmwareStore
    + crate::store::UploadStore
    + crate::store::SessionStore
    + crate::store::IdempotencyStore
    + crate::store::Durability
    + crate::ota::store::TaskStore
    + crate::rollout::store::RolloutStore
    + crate::devices::DeviceStore
    + crate::auth::TokenStore
    + crate::audit::AuditStore
    + crate::cluster::ClusterStore
{
}

impl<T> Store for T where
    T: crate::store::FirmwareStore
        + crate::store::UploadStore
        + crate::store::SessionStore
        + crate::store::IdempotencyStore
        + crate::store::Durability
        + crate::ota::store::TaskStore
        + crate::rollout::store::RolloutStore
        + crate::devices::DeviceStore
        + crate::auth::TokenStore
        + crate::audit::AuditStore
        + crate::cluster::ClusterStore
{
}

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

use sled::transaction::TransactionError;

use crate::domain::ProductVersion;
use crate::store::{CatalogError, CatalogFault, Page, PageRequest, StoreResult, cursor_for};

impl From<sled::Error> for CatalogError {
    fn from(e: sled::Error) -> Self {
        match e {
            // The I/O error itself, so that `is_no_space` sees it.
            sled::Error::Io(io) => CatalogError::Storage(Box::new(io)),
            other => CatalogError::Storage(Box::new(other)),
        }
    }
}

/// Group commit: concurrent callers of [`Catalog::flush`] share one fsync.
#[derive(Default)]
struct FlushGate {
    gate: tokio::sync::Mutex<()>,
    requested: AtomicU64,
    completed: AtomicU64,
    /// Flushes that reached the disk.
    flushed: AtomicU64,
}

/// The open sled database and its trees.
pub(crate) struct Trees {
    db: sled::Db,
    firmware: sled::Tree,
    firmware_versions: sled::Tree,
    uploads: sled::Tree,
    sessions: sled::Tree,
    devices: sled::Tree,
    tasks: sled::Tree,
    task_history: sled::Tree,
    orphans: sled::Tree,
    claims: sled::Tree,
    idempotency: sled::Tree,
    meta: sled::Tree,
    rollouts: sled::Tree,
    rollout_members: sled::Tree,
    tokens: sled::Tree,
    audit: sled::Tree,
    replicas: sled::Tree,
}

impl Trees {
    fn open(dir: &Path, cache_mb: u64) -> Result<Trees, CatalogError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb.saturating_mul(1 << 20))
            .open()?;
        Ok(Trees {
            firmware: db.open_tree("firmware")?,
            firmware_versions: db.open_tree("firmware_versions")?,
            uploads: db.open_tree("uploads")?,
            sessions: db.open_tree("download_sessions")?,
            devices: db.open_tree("devices")?,
            tasks: db.open_tree("ota_tasks")?,
            task_history: db.open_tree("ota_task_history")?,
            orphans: db.open_tree("ota_orphans")?,
            claims: db.open_tree("ota_claims")?,
            idempotency: db.open_tree("idempotency")?,
            meta: db.open_tree("meta")?,
            rollouts: db.open_tree("rollouts")?,
            rollout_members: db.open_tree("rollout_members")?,
            tokens: db.open_tree("api_tokens")?,
            audit: db.open_tree("audit")?,
            replicas: db.open_tree("replicas")?,
            db,
        })
    }
}

struct Shared {
    dir: PathBuf,
    cache_mb: u64,
    /// `None` only while a broken database is being reopened.
    trees: RwLock<Option<Arc<Trees>>>,
    flushes: FlushGate,
    /// Whether the last flush (or recovery probe) made writes durable.
    writable: AtomicBool,
    /// Why the catalog cannot write (for `/readyz` and the logs).
    fault: Mutex<Option<CatalogFault>>,
    /// One recovery at a time.
    recovering: tokio::sync::Mutex<()>,
}

/// Free bytes a full disk must have again before the catalog is reopened (sled writes a
/// segment of up to 512 KiB and its config when it opens).
const RECOVERY_ROOM: u64 = 4 << 20;

/// The sled database and its trees. Cheap to clone. sled keeps the first I/O error it meets
/// and fails every later write with it, so a failed flush marks the catalog unwritable and
/// [`Catalog::recover`] reopens the database once the cause is gone (a full disk freed).
#[derive(Clone)]
pub struct Catalog {
    shared: Arc<Shared>,
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
        TransactionError::Storage(e) => <CatalogError as From<sled::Error>>::from(e),
    }
}

fn join_error(e: tokio::task::JoinError) -> CatalogError {
    CatalogError::Storage(Box::new(e))
}

impl Catalog {
    /// Runs a long sled walk (retention pruning) off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Trees) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let trees = self.trees()?;
        tokio::task::spawn_blocking(move || f(&trees))
            .await
            .map_err(join_error)?
    }

    /// Opens (or creates) the catalog under `dir` with a page cache of `cache_mb` MiB.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Catalog, CatalogError> {
        let trees = Trees::open(dir, cache_mb)?;
        Ok(Catalog {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                cache_mb,
                trees: RwLock::new(Some(Arc::new(trees))),
                flushes: FlushGate::default(),
                writable: AtomicBool::new(true),
                fault: Mutex::new(None),
                recovering: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The open database, or `Unwritable` while it is being reopened.
    /// How many gateway messages matching no task are kept (tests).
    #[cfg(test)]
    pub(crate) fn orphan_count(&self) -> usize {
        self.trees().map_or(0, |t| t.orphans.len())
    }

    pub(crate) fn trees(&self) -> Result<Arc<Trees>, CatalogError> {
        let slot = self.shared.trees.read().unwrap_or_else(|p| p.into_inner());
        slot.clone().ok_or_else(|| {
            CatalogError::Unwritable(self.fault().unwrap_or(CatalogFault::Unavailable))
        })
    }

    /// Flushes everything written so far to disk. Concurrent callers share fsyncs (group
    /// commit): a caller returns once a flush that started after its call has finished. A
    /// failure marks the catalog unwritable until [`Catalog::recover`] succeeds.
    pub async fn flush(&self) -> Result<(), CatalogError> {
        let f = &self.shared.flushes;
        let mine = f.requested.fetch_add(1, SeqCst) + 1;
        let _turn = f.gate.lock().await;
        if f.completed.load(SeqCst) >= mine {
            return self.writable_or_fault();
        }
        let covers = f.requested.load(SeqCst);
        let trees = self.trees()?;
        let result = tokio::task::spawn_blocking(move || trees.db.flush())
            .await
            .map_err(join_error)
            .and_then(|r| r.map_err(CatalogError::from));
        match result {
            Ok(_) => {
                f.completed.fetch_max(covers, SeqCst);
                f.flushed.fetch_add(1, SeqCst);
                self.writable_or_fault()
            }
            Err(e) => {
                self.mark_unwritable(&e);
                Err(e)
            }
        }
    }

    fn writable_or_fault(&self) -> Result<(), CatalogError> {
        match self.fault() {
            None => Ok(()),
            Some(fault) => Err(CatalogError::Unwritable(fault)),
        }
    }

    fn mark_unwritable(&self, e: &CatalogError) {
        let fault = e.fault();
        if self.shared.writable.swap(false, SeqCst) {
            tracing::error!(error = %e, "the catalog cannot make writes durable; refusing writes until it recovers");
        }
        *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault);
    }

    /// Why writes are refused now, if they are.
    pub fn fault(&self) -> Option<CatalogFault> {
        if self.shared.writable.load(SeqCst) {
            return None;
        }
        let fault = *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner());
        Some(fault.unwrap_or(CatalogFault::Unavailable))
    }

    /// Reopens a catalog whose writes failed and proves with a probe write and a flush that
    /// writes are durable again. A no-op while the catalog is writable.
    pub async fn recover(&self) -> Result<(), CatalogError> {
        let _one = self.shared.recovering.lock().await;
        let Some(fault) = self.fault() else {
            return Ok(());
        };
        // The broken database still serves reads; it is only dropped (sled must be closed
        // before it can be opened again) once the disk has room for the reopen and the probe.
        let room = fs4::available_space(&self.shared.dir).unwrap_or(u64::MAX);
        if fault == CatalogFault::NoSpace && room < RECOVERY_ROOM {
            return Err(CatalogError::Unwritable(fault));
        }
        let old = self
            .shared
            .trees
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut old) = old {
            // Requests in flight hold the old database for a moment; sled's file lock is only
            // released when the last handle is gone.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(trees) => {
                        tokio::task::spawn_blocking(move || drop(trees))
                            .await
                            .map_err(join_error)?;
                        break;
                    }
                    Err(still) if std::time::Instant::now() < deadline => {
                        old = still;
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    Err(still) => {
                        *self.shared.trees.write().unwrap_or_else(|p| p.into_inner()) = Some(still);
                        return Err(CatalogError::Unwritable(CatalogFault::Unavailable));
                    }
                }
            }
        }
        let (dir, cache_mb) = (self.shared.dir.clone(), self.shared.cache_mb);
        let opened = tokio::task::spawn_blocking(move || {
            let trees = Trees::open(&dir, cache_mb)?;
            // Probe: a write that must reach the disk.
            let probe = trees
                .meta
                .insert("write_probe", chrono::Utc::now().to_rfc3339().as_bytes())
                .and_then(|_| trees.db.flush());
            Ok::<_, CatalogError>((trees, probe))
        })
        .await
        .map_err(join_error)?;
        let (trees, probe) = match opened {
            Ok(v) => v,
            Err(e) => {
                self.mark_unwritable(&e);
                return Err(e);
            }
        };
        *self.shared.trees.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(trees));
        match probe {
            Ok(_) => {
                *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.shared.writable.store(true, SeqCst);
                tracing::info!("the catalog writes durably again");
                Ok(())
            }
            Err(e) => {
                let e = CatalogError::from(e);
                self.mark_unwritable(&e);
                Err(e)
            }
        }
    }

    /// Keeps the catalog's health current until `cancel`: flushes every second (sled writes
    /// in the background too, and a failure there must be seen) and, while writes fail,
    /// tries to reopen the database every second.
    pub async fn watch(self, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if self.fault().is_some() {
                if let Err(e) = self.recover().await {
                    tracing::debug!(error = %e, "catalog still unwritable");
                }
            } else {
                let _ = self.flush().await;
            }
        }
    }

    /// Prometheus text: flushes done and whether writes are durable now.
    pub fn render_metrics(&self) -> String {
        let done = self.shared.flushes.flushed.load(SeqCst);
        let writable = u8::from(self.fault().is_none());
        format!(
            "# HELP fwrepo_catalog_flushes_total Catalog flushes that reached the disk (group commits).\n# TYPE fwrepo_catalog_flushes_total counter\nfwrepo_catalog_flushes_total {done}\n# HELP fwrepo_catalog_writable 1 while catalog writes are durable; 0 while they are refused.\n# TYPE fwrepo_catalog_writable gauge\nfwrepo_catalog_writable {writable}\n"
        )
    }

    /// Flushes synchronously (offline tools).
    pub fn flush_blocking(&self) -> Result<(), CatalogError> {
        self.trees()?.db.flush()?;
        Ok(())
    }

    /// Proves the database answers and writes durably (readiness).
    pub fn check(&self) -> Result<(), CatalogError> {
        self.writable_or_fault()?;
        self.trees()?.meta.get("instance_id")?;
        Ok(())
    }

    /// The instance id kept in the data directory, created on first use.
    pub fn instance_id(&self) -> Result<String, CatalogError> {
        let t = self.trees()?;
        if let Some(v) = t.meta.get("instance_id")? {
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        let id = crate::domain::ids::next().to_lowercase();
        let _ =
            t.meta
                .compare_and_swap("instance_id", None as Option<&[u8]>, Some(id.as_bytes()))?;
        let v = t.meta.get("instance_id")?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&v).into_owned())
    }
}

#[async_trait::async_trait]
impl crate::store::Durability for Catalog {
    async fn flush(&self) -> StoreResult<()> {
        Catalog::flush(self).await
    }

    fn fault(&self) -> Option<CatalogFault> {
        Catalog::fault(self)
    }

    async fn check(&self) -> StoreResult<()> {
        Catalog::check(self)
    }

    fn render_metrics(&self) -> String {
        Catalog::render_metrics(self)
    }

    async fn watch(&self, cancel: tokio_util::sync::CancellationToken) {
        self.clone().watch(cancel).await
    }
}

/// Every value of `tree` in key order, decoded.
fn all_of<T: serde::de::DeserializeOwned>(tree: &sled::Tree) -> StoreResult<Vec<T>> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
        .collect()
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

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;

// The storage conformance suite against sled (each test gets its own temp dir) and, when
// FWREPO_TEST_POSTGRES_URL names a server, PostgreSQL (each test gets its own database).
#[cfg(test)]
conformance::conformance_suite!(sled_conformance, || {
    Box::pin(async {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path(), 8).unwrap();
        let store: Arc<dyn Store> = Arc::new(catalog);
        Some((store, Box::new(dir) as Box<dyn std::any::Any + Send>))
    })
});
#[cfg(test)]
conformance::conformance_suite!(postgres_conformance, || {
    Box::pin(async {
        let db = postgres::testing::TestDatabase::create().await?;
        let store: Arc<dyn Store> = Arc::new(db.catalog().await);
        Some((store, Box::new(db) as Box<dyn std::any::Any + Send>))
    })
});
