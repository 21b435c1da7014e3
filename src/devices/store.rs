//! The storage port of the device registry.

use super::DeviceRecord;
use crate::store::StoreResult;

/// Where a reader of the devices' changes is in the catalog's order of changes: the backend's
/// own position, opaque to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChangeCursor(pub i64);

/// Devices whose stored copy changed, and where to read on from.
#[derive(Debug, Default)]
pub struct ChangedDevices {
    /// The changed records.
    pub devices: Vec<DeviceRecord>,
    /// Where the next read starts (`None`: where this one did). A change that was still being
    /// committed when this read was taken is at or after it.
    pub next: Option<ChangeCursor>,
}

/// Device records, keyed by serial number.
#[async_trait::async_trait]
pub trait DeviceStore: Send + Sync {
    /// Stores devices in one batch (the last-seen flusher, API writes), each merged with the
    /// stored copy ([`DeviceRecord::merged_over`]): a field group the stored copy saw later
    /// (another replica's report) is kept.
    async fn put_devices(&self, devices: &[DeviceRecord]) -> StoreResult<()>;
    /// Stores when known devices were last seen (nothing else of them changed since their
    /// last write). A backend may skip a move of a few seconds (replicas each flush the
    /// devices they heard) and need not store a device it does not have; it never moves
    /// last seen backwards.
    async fn touch_devices(&self, devices: &[DeviceRecord]) -> StoreResult<()> {
        self.put_devices(devices).await
    }
    /// Removes a device record.
    async fn delete_device(&self, sn: &str) -> StoreResult<()>;
    /// Every stored device (start-up).
    async fn all_devices(&self) -> StoreResult<Vec<DeviceRecord>>;
    /// Devices whose stored copy changed in something a reader acts on (not only the seen
    /// times) at or after `since` (every device for `None`), in commit order: replicas take
    /// in each other's reports, each change read about once. A backend without a change
    /// order may return every device.
    async fn changed_devices(&self, since: Option<ChangeCursor>) -> StoreResult<ChangedDevices>;
    /// The stored devices of `sns` (those that exist, in no particular order), last-seen
    /// times included: what other replicas saw of them.
    async fn devices_by_sn(&self, sns: &[String]) -> StoreResult<Vec<DeviceRecord>> {
        let wanted: std::collections::HashSet<&str> = sns.iter().map(String::as_str).collect();
        let all = self.all_devices().await?;
        Ok(all
            .into_iter()
            .filter(|d| wanted.contains(d.sn.as_str()))
            .collect())
    }
}
