//! The storage port of the device registry.

use super::DeviceRecord;
use crate::store::StoreResult;

/// Device records, keyed by serial number.
#[async_trait::async_trait]
pub trait DeviceStore: Send + Sync {
    /// Stores devices in one batch (the last-seen flusher, API writes).
    async fn put_devices(&self, devices: &[DeviceRecord]) -> StoreResult<()>;
    /// Removes a device record.
    async fn delete_device(&self, sn: &str) -> StoreResult<()>;
    /// Every stored device (start-up).
    async fn all_devices(&self) -> StoreResult<Vec<DeviceRecord>>;
}
