//! Firmware lifecycle (contract §3): lookup and listing, disable/enable, delete as a tombstone,
//! re-verification of stored blobs, and the `firmware_in_use` guard that the OTA and rollout
//! layers register into.

use std::sync::{Arc, RwLock};

use chrono::Utc;
use futures::TryStreamExt;

use crate::blobs::{BlobError, BlobStore, ReadBudget};
use crate::checksum::Checksummer;
use crate::domain::{FirmwareId, ProductVersion};
use crate::store::{
    CatalogError, FirmwareQuery, FirmwareRecord, FirmwareStatus, FirmwareStore, Page, PageRequest,
    VerifyStatus,
};

/// Errors of the firmware lifecycle layer.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// Unknown id.
    #[error("firmware not found")]
    NotFound,
    /// The firmware is a tombstone.
    #[error("firmware {0} was deleted")]
    Deleted(FirmwareId),
    /// The firmware failed verification.
    #[error("firmware {0} failed verification")]
    Corrupt(FirmwareId),
    /// A guard reports the firmware in use.
    #[error("firmware is in use: {0}")]
    InUse(String),
    /// Malformed filter or query.
    #[error("{0}")]
    InvalidRequest(String),
    /// A version filter with a non-numeric part.
    #[error(transparent)]
    InvalidVersion(#[from] crate::domain::VersionError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(CatalogError),
    /// The blob store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
}

impl From<CatalogError> for FirmwareError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotFound => FirmwareError::NotFound,
            CatalogError::InvalidCursor => FirmwareError::InvalidRequest("invalid cursor".into()),
            other => FirmwareError::Catalog(other),
        }
    }
}

/// Something that can tell whether a firmware may not be deleted or disabled (active OTA tasks,
/// running rollouts, devices running the version). Registered by later layers.
pub trait UsageGuard: Send + Sync {
    /// `Some(reason)` when `fw` is in use.
    fn in_use(&self, fw: &FirmwareRecord) -> Option<String>;

    /// `Some(reason)` when `fw` may not be disabled (by default: when it is in use). Running
    /// rollouts do not block it: they pause when their firmware is disabled.
    fn blocks_disable(&self, fw: &FirmwareRecord) -> Option<String> {
        self.in_use(fw)
    }
}

/// Filter of `GET /api/v1/firmware`.
#[derive(Clone, Debug, Default)]
pub struct FirmwareFilter {
    /// Model (case-insensitive).
    pub model: Option<String>,
    /// Version (compared numerically).
    pub product_version: Option<String>,
    /// Status.
    pub status: Option<FirmwareStatus>,
}

/// Firmware lifecycle operations. Cheap to clone.
#[derive(Clone)]
pub struct FirmwareService {
    store: Arc<dyn FirmwareStore>,
    blobs: BlobStore,
    budget: ReadBudget,
    guards: Arc<RwLock<Vec<Arc<dyn UsageGuard>>>>,
}

impl FirmwareService {
    /// A service over the catalog and blob store.
    pub fn new(store: Arc<dyn FirmwareStore>, blobs: BlobStore, budget: ReadBudget) -> Self {
        FirmwareService {
            store,
            blobs,
            budget,
            guards: Arc::default(),
        }
    }

    /// Registers a `firmware_in_use` guard.
    pub fn add_guard(&self, guard: Arc<dyn UsageGuard>) {
        match self.guards.write() {
            Ok(mut g) => g.push(guard),
            Err(p) => p.into_inner().push(guard),
        }
    }

    fn in_use(&self, fw: &FirmwareRecord) -> Option<String> {
        let guards = match self.guards.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guards.iter().find_map(|g| g.in_use(fw))
    }

    fn blocks_disable(&self, fw: &FirmwareRecord) -> Option<String> {
        let guards = match self.guards.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guards.iter().find_map(|g| g.blocks_disable(fw))
    }

    /// One record (tombstones included).
    pub async fn get(&self, id: &str) -> Result<FirmwareRecord, FirmwareError> {
        let id = FirmwareId::parse(id).ok_or(FirmwareError::NotFound)?;
        Ok(self.store.firmware(&id).await?)
    }

    /// Newest-first page.
    pub async fn list(
        &self,
        filter: &FirmwareFilter,
        page: &PageRequest,
    ) -> Result<Page<FirmwareRecord>, FirmwareError> {
        let query = FirmwareQuery {
            model: filter.model.clone(),
            version: filter
                .product_version
                .as_deref()
                .map(ProductVersion::parse)
                .transpose()?,
            status: filter.status,
            live_only: false,
        };
        Ok(self.store.list_firmware(&query, page).await?)
    }

    async fn live(&self, id: &str) -> Result<FirmwareRecord, FirmwareError> {
        let fw = self.get(id).await?;
        if fw.status == FirmwareStatus::Deleted {
            return Err(FirmwareError::Deleted(fw.id));
        }
        Ok(fw)
    }

    /// Disables new use of a firmware (downloads continue).
    pub async fn disable(&self, id: &str, force: bool) -> Result<FirmwareRecord, FirmwareError> {
        let fw = self.live(id).await?;
        if fw.status == FirmwareStatus::Corrupt {
            return Err(FirmwareError::Corrupt(fw.id));
        }
        if !force && let Some(reason) = self.blocks_disable(&fw) {
            return Err(FirmwareError::InUse(reason));
        }
        Ok(self
            .store
            .update_firmware(&fw.id, &|r| r.status = FirmwareStatus::Disabled)
            .await?)
    }

    /// Re-enables a disabled firmware.
    pub async fn enable(&self, id: &str) -> Result<FirmwareRecord, FirmwareError> {
        let fw = self.live(id).await?;
        if fw.status == FirmwareStatus::Corrupt {
            return Err(FirmwareError::Corrupt(fw.id));
        }
        Ok(self
            .store
            .update_firmware(&fw.id, &|r| r.status = FirmwareStatus::Ready)
            .await?)
    }

    /// Tombstones a firmware and removes its blob.
    pub async fn delete(&self, id: &str, force: bool) -> Result<FirmwareRecord, FirmwareError> {
        let fw = self.live(id).await?;
        if !force && let Some(reason) = self.in_use(&fw) {
            return Err(FirmwareError::InUse(reason));
        }
        // The tombstone first: from here on downloads answer 410 and nothing new starts; a
        // failed blob delete leaves only an orphan the start-up sweep removes.
        let now = Utc::now();
        let record = self
            .store
            .update_firmware(&fw.id, &|r| {
                r.status = FirmwareStatus::Deleted;
                r.deleted_at = Some(now);
            })
            .await?;
        if let Err(e) = self.blobs.delete(&fw.blob_key).await {
            tracing::error!(firmware_id = %fw.id, error = %e, "blob of deleted firmware not removed; the start-up sweep will");
        }
        tracing::info!(firmware_id = %fw.id, "firmware deleted");
        Ok(record)
    }

    /// Starts re-verification in the background; returns the record marked `running`.
    pub async fn start_verify(&self, id: &str) -> Result<FirmwareRecord, FirmwareError> {
        let fw = self.live(id).await?;
        let record = self
            .store
            .update_firmware(&fw.id, &|r| r.verify_status = Some(VerifyStatus::Running))
            .await?;
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.verify_blob(&fw).await;
            this.record_verify(&fw, result).await;
        });
        Ok(record)
    }

    async fn verify_blob(&self, fw: &FirmwareRecord) -> Result<bool, BlobError> {
        let size = self.blobs.size(&fw.blob_key).await?;
        if size != fw.file_size {
            return Ok(false);
        }
        let mut stream = self.blobs.read(&fw.blob_key, 0..size, &self.budget).await?;
        let mut sums = Checksummer::new();
        while let Some(chunk) = stream.try_next().await? {
            sums.update(vec![chunk])
                .await
                .map_err(|e| BlobError::Task(e.to_string()))?;
        }
        let d = sums
            .finish()
            .await
            .map_err(|e| BlobError::Task(e.to_string()))?;
        Ok(d.size == fw.file_size && d.md5.as_str() == fw.md5 && d.sha256.as_str() == fw.sha256)
    }

    async fn record_verify(&self, fw: &FirmwareRecord, result: Result<bool, BlobError>) {
        let status = match &result {
            Ok(true) => VerifyStatus::Ok,
            Ok(false) => VerifyStatus::Mismatch,
            Err(BlobError::Missing(_)) => VerifyStatus::BlobMissing,
            Err(_) => VerifyStatus::Error,
        };
        match &result {
            Ok(true) => tracing::info!(firmware_id = %fw.id, "firmware verified"),
            Ok(false) => {
                tracing::error!(firmware_id = %fw.id, "firmware blob does not match its record: marked corrupt")
            }
            Err(e) => {
                tracing::error!(firmware_id = %fw.id, error = %e, "firmware verification failed")
            }
        }
        let now = Utc::now();
        let edit = move |r: &mut FirmwareRecord| {
            r.verify_status = Some(status);
            r.verified_at = Some(now);
            match status {
                VerifyStatus::Mismatch | VerifyStatus::BlobMissing
                    if r.status != FirmwareStatus::Deleted =>
                {
                    r.status = FirmwareStatus::Corrupt
                }
                VerifyStatus::Ok if r.status == FirmwareStatus::Corrupt => {
                    r.status = FirmwareStatus::Ready
                }
                _ => {}
            }
        };
        if let Err(e) = self.store.update_firmware(&fw.id, &edit).await {
            tracing::error!(firmware_id = %fw.id, error = %e, "recording verification result failed");
        }
    }
}
