//! The device registry (contract §5): docks and their aircraft, learned from `update_topo`,
//! state and osd messages (DJI and Autel spellings), or declared by an operator. Every record
//! lives in memory; changes to topology, versions and declarations are written at once, while
//! last-seen times (osd is high volume) are written by the flusher every 30 s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

mod flusher;
mod merge;
mod reports;
mod store;
pub use store::{ChangeCursor, ChangedDevices, DeviceStore};

use crate::store::{CatalogError, Page, PageRequest, cursor_for};

/// Interval of the last-seen flusher.
pub const FLUSH_EVERY: Duration = Duration::from_secs(30);
/// How long a change that should be stored now (topology, state) waits for others to join
/// its batch.
const KICK_COALESCE: Duration = Duration::from_millis(200);

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Unknown serial number.
    #[error("device not found")]
    NotFound,
    /// Malformed input.
    #[error("{0}")]
    Invalid(String),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// A device as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceRecord {
    /// Serial number.
    pub sn: String,
    /// Ordering key (ULID of first sight): lists are newest first.
    #[serde(default)]
    pub order: String,
    /// The dock this device hangs off (aircraft), if any.
    pub gateway_sn: Option<String>,
    /// The aircraft currently attached (docks).
    pub child_sn: Option<String>,
    /// The aircraft the dock's own osd names in `sub_device.device_sn` (docks; cross-checks the
    /// topology in preflight).
    #[serde(default)]
    pub osd_child_sn: Option<String>,
    /// `domain-type-sub_type` from the topology, e.g. `3-1-0`.
    pub model_key: Option<String>,
    /// Firmware model: declared by PUT, else mapped from `model_key` by `[models]`.
    pub model: Option<String>,
    /// Whether `model` was declared by an operator.
    #[serde(default)]
    pub model_declared: bool,
    /// Running firmware version (state).
    pub firmware_version: Option<String>,
    /// 1 = consistency upgrade needed (state).
    pub compatible_status: Option<i64>,
    /// 1 = upgrading (state).
    pub firmware_upgrade_status: Option<i64>,
    /// osd `mode_code` (dock 0 idle, 3 upgrading; aircraft 13 upgrading).
    pub mode_code: Option<i64>,
    /// Thing-model version from the topology.
    pub thing_version: Option<String>,
    /// `dji` (payloads carry `gateway`) or `autel`.
    pub dialect: Option<String>,
    /// First message or declaration.
    pub first_seen_at: DateTime<Utc>,
    /// Latest message from the device.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Latest osd message.
    pub last_osd_at: Option<DateTime<Utc>>,
    /// Latest state message.
    pub last_state_at: Option<DateTime<Utc>>,
    /// Latest change of the gateway link, aircraft, model or dialect (replicas merge copies
    /// of a device by it).
    #[serde(default)]
    pub topology_at: Option<DateTime<Utc>>,
    /// Whether a message arrived within the online window (computed, not stored).
    #[serde(default)]
    pub online: bool,
}

/// What fwrepo reads from an osd message.
#[derive(Clone, Debug, Default)]
pub struct OsdReport {
    /// `mode_code` (dock 0 idle, 3 upgrading; aircraft 13 upgrading).
    pub mode_code: Option<i64>,
    /// A dock's `sub_device.device_sn`: the aircraft paired with it.
    pub sub_device_sn: Option<String>,
}

/// A sub-device in a topology report.
#[derive(Clone, Debug, Default)]
pub struct SubDeviceReport {
    /// Serial.
    pub sn: String,
    /// `domain-type-sub_type`.
    pub model_key: Option<String>,
    /// Thing-model version.
    pub thing_version: Option<String>,
}

/// An `update_topo` from a gateway.
#[derive(Clone, Debug, Default)]
pub struct TopologyReport {
    /// `domain-type-sub_type` of the gateway.
    pub model_key: Option<String>,
    /// Thing-model version (`thing_version` or Autel's `version`).
    pub thing_version: Option<String>,
    /// Attached devices (0 or 1 aircraft).
    pub sub_devices: Vec<SubDeviceReport>,
}

/// What a state message carries.
#[derive(Clone, Debug, Default)]
pub struct StateReport {
    /// Running firmware version.
    pub firmware_version: Option<String>,
    /// 1 = consistency upgrade needed.
    pub compatible_status: Option<i64>,
    /// 1 = upgrading.
    pub firmware_upgrade_status: Option<i64>,
}

/// Model key → firmware model table (`[models]` in config), case-insensitive.
#[derive(Clone, Debug, Default)]
pub struct ModelMap(HashMap<String, String>);

impl ModelMap {
    /// From the config table: `"3-1-0" = "Dock"` or `"3-1-0" = ["Dock", "dock1"]` (first wins).
    pub fn from_table(table: Option<&toml::Table>) -> Result<ModelMap, String> {
        let mut map = HashMap::new();
        for (key, value) in table.into_iter().flatten() {
            let model = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(a) => a
                    .first()
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| format!("[models] {key}: empty alias list"))?,
                _ => {
                    return Err(format!(
                        "[models] {key}: expected a string or a list of strings"
                    ));
                }
            };
            map.insert(key.to_lowercase(), model);
        }
        Ok(ModelMap(map))
    }

    fn model_of(&self, key: &str) -> Option<String> {
        self.0.get(&key.to_lowercase()).cloned()
    }
}

struct Inner {
    devices: Mutex<HashMap<String, DeviceRecord>>,
    dirty: Mutex<std::collections::HashSet<String>>,
    /// Stored devices only heard since their last write (last seen, osd times): written every
    /// [`FLUSH_EVERY`] with [`DeviceStore::touch_devices`], not with every kick.
    heard: Mutex<std::collections::HashSet<String>>,
    /// Wakes the flusher for a change that should be stored now (topology, state).
    kick: tokio::sync::Notify,
    /// API writes one at a time: memory changes in the order the store took them.
    writes: tokio::sync::Mutex<()>,
    store: Arc<dyn DeviceStore>,
    models: ModelMap,
    online_window: chrono::Duration,
}

/// The registry. Cheap to clone.
#[derive(Clone)]
pub struct DeviceRegistry {
    inner: Arc<Inner>,
}

use crate::lock;

/// Filters of the device list.
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    /// Devices of this gateway (the gateway itself included).
    pub gateway_sn: Option<String>,
    /// Firmware model (case-insensitive).
    pub model: Option<String>,
    /// Running version.
    pub version: Option<String>,
    /// Seen within this many seconds.
    pub seen_within_s: Option<u64>,
    /// Serial numbers containing this text (case-insensitive).
    pub sn_contains: Option<String>,
    /// Only gateways (`Some(true)`) or only sub-devices (`Some(false)`).
    pub gateways: Option<bool>,
}

impl DeviceFilter {
    /// Whether `d` passes every filter set; `sn_contains` is the lowercased serial filter.
    fn matches(&self, d: &DeviceRecord, sn_contains: Option<&str>, now: DateTime<Utc>) -> bool {
        let gateway = self
            .gateway_sn
            .as_deref()
            .is_none_or(|g| d.sn == g || d.gateway_sn.as_deref() == Some(g));
        let model = self.model.as_deref().is_none_or(|m| {
            d.model
                .as_deref()
                .is_some_and(|dm| dm.eq_ignore_ascii_case(m))
        });
        let version = self.version.as_deref().is_none_or(|v| {
            d.firmware_version.as_deref() == Some(v)
                || matches!(
                    (
                        d.firmware_version
                            .as_deref()
                            .map(crate::domain::ProductVersion::parse),
                        crate::domain::ProductVersion::parse(v)
                    ),
                    (Some(Ok(a)), Ok(b)) if a == b
                )
        });
        // Compared as unsigned: any u64 window is valid (a huge one means "ever").
        let seen = self.seen_within_s.is_none_or(|s| {
            d.last_seen_at
                .is_some_and(|t| (now - t).num_seconds().max(0).unsigned_abs() <= s)
        });
        let sn = sn_contains.is_none_or(|text| d.sn.to_ascii_lowercase().contains(text));
        let kind = self
            .gateways
            .is_none_or(|gateways| gateways == d.gateway_sn.is_none());
        gateway && model && version && seen && sn && kind
    }
}

impl DeviceRegistry {
    /// Loads every stored device.
    pub async fn load(
        store: Arc<dyn DeviceStore>,
        models: ModelMap,
        online_window: Duration,
    ) -> Result<DeviceRegistry, CatalogError> {
        let devices = store
            .all_devices()
            .await?
            .into_iter()
            .map(|d: DeviceRecord| (d.sn.clone(), d))
            .collect();
        Ok(DeviceRegistry {
            inner: Arc::new(Inner {
                devices: Mutex::new(devices),
                dirty: Mutex::default(),
                heard: Mutex::default(),
                kick: tokio::sync::Notify::new(),
                writes: tokio::sync::Mutex::new(()),
                store,
                models,
                online_window: chrono::Duration::from_std(online_window)
                    .unwrap_or(chrono::Duration::seconds(60)),
            }),
        })
    }

    /// Changes a device and stores it before the change becomes visible: a failed write
    /// changes nothing (API writes, which must be durable when answered).
    async fn store_device<R>(
        &self,
        sn: &str,
        now: DateTime<Utc>,
        f: impl FnOnce(&mut DeviceRecord) -> R,
    ) -> Result<R, CatalogError> {
        let _one = self.inner.writes.lock().await;
        let mut d = lock(&self.inner.devices)
            .get(sn)
            .cloned()
            .unwrap_or_else(|| new_device(sn, now));
        let before = d.clone();
        let r = f(&mut d);
        d.stamp_topology(&before, now);
        self.inner
            .store
            .put_devices(std::slice::from_ref(&d))
            .await?;
        lock(&self.inner.dirty).remove(sn);
        lock(&self.inner.devices).insert(sn.to_string(), d);
        Ok(r)
    }

    /// Applies `f` to a known device that was only heard from (its last seen and osd times;
    /// nothing a reader acts on): written with the periodic batch. An unknown device is new
    /// and stored as any change is.
    fn heard<R>(&self, sn: &str, now: DateTime<Utc>, f: impl FnOnce(&mut DeviceRecord) -> R) -> R {
        {
            let mut devices = lock(&self.inner.devices);
            if let Some(d) = devices.get_mut(sn) {
                let r = f(d);
                drop(devices);
                lock(&self.inner.heard).insert(sn.to_string());
                return r;
            }
        }
        self.with_device(sn, now, false, f)
    }

    /// Marks a device changed in something readers act on (stored with the next batch).
    fn changed(&self, sn: &str) {
        lock(&self.inner.dirty).insert(sn.to_string());
    }

    fn with_device<R>(
        &self,
        sn: &str,
        now: DateTime<Utc>,
        persist_now: bool,
        f: impl FnOnce(&mut DeviceRecord) -> R,
    ) -> R {
        let r = {
            let mut devices = lock(&self.inner.devices);
            let d = devices
                .entry(sn.to_string())
                .or_insert_with(|| new_device(sn, now));
            f(d)
        };
        lock(&self.inner.dirty).insert(sn.to_string());
        if persist_now {
            // Stored by the flusher right away, in one batch with whatever else changed.
            self.inner.kick.notify_one();
        }
        r
    }

    fn map_model(&self, d: &mut DeviceRecord) {
        if !d.model_declared
            && let Some(key) = &d.model_key
        {
            d.model = self.inner.models.model_of(key);
        }
    }

    fn present(&self, mut d: DeviceRecord, now: DateTime<Utc>) -> DeviceRecord {
        d.online = d
            .last_seen_at
            .is_some_and(|t| now - t <= self.inner.online_window);
        d
    }

    /// One device.
    pub fn get(&self, sn: &str) -> Result<DeviceRecord, DeviceError> {
        let d = lock(&self.inner.devices).get(sn).cloned();
        d.map(|d| self.present(d, Utc::now()))
            .ok_or(DeviceError::NotFound)
    }

    /// Declares (or corrects) a device's model and gateway.
    pub async fn put(
        &self,
        sn: &str,
        model: Option<String>,
        gateway_sn: Option<String>,
    ) -> Result<DeviceRecord, DeviceError> {
        if sn.is_empty() || sn.len() > 128 || sn.contains(['/', '+', '#']) {
            return Err(DeviceError::Invalid("invalid serial number".into()));
        }
        let now = Utc::now();
        let d = self
            .store_device(sn, now, |d| {
                if let Some(m) = model.filter(|m| !m.trim().is_empty()) {
                    d.model = Some(m.trim().to_string());
                    d.model_declared = true;
                }
                if let Some(g) = gateway_sn.filter(|g| !g.is_empty() && g != sn) {
                    d.gateway_sn = Some(g);
                }
                d.clone()
            })
            .await?;
        if let Some(g) = &d.gateway_sn {
            self.store_device(g, now, |gw| gw.child_sn = Some(sn.to_string()))
                .await?;
        }
        Ok(self.present(d, now))
    }

    /// Every device, as `get` presents it (online computed now).
    pub fn all(&self) -> Vec<DeviceRecord> {
        let now = Utc::now();
        let devices: Vec<DeviceRecord> = lock(&self.inner.devices).values().cloned().collect();
        devices.into_iter().map(|d| self.present(d, now)).collect()
    }

    /// Forgets a device.
    pub async fn delete(&self, sn: &str) -> Result<DeviceRecord, DeviceError> {
        let _one = self.inner.writes.lock().await;
        if !lock(&self.inner.devices).contains_key(sn) {
            return Err(DeviceError::NotFound);
        }
        self.inner.store.delete_device(sn).await?;
        lock(&self.inner.dirty).remove(sn);
        lock(&self.inner.heard).remove(sn);
        lock(&self.inner.devices)
            .remove(sn)
            .ok_or(DeviceError::NotFound)
    }

    /// Newest-first page of devices matching the filter.
    pub fn list(
        &self,
        filter: &DeviceFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceRecord>, DeviceError> {
        let after = page.after_key()?;
        let now = Utc::now();
        let sn_contains = filter.sn_contains.as_deref().map(str::to_ascii_lowercase);
        let limit = page.limit();
        // Filtered and ordered by reference; only the page is copied out of the lock (a
        // fleet of 20,000 devices is listed page by page in well under a millisecond each).
        let (items, next_cursor) = {
            let devices = lock(&self.inner.devices);
            let mut found: Vec<&DeviceRecord> = devices
                .values()
                .filter(|d| after.as_deref().is_none_or(|a| d.order.as_bytes() < a))
                .filter(|d| filter.matches(d, sn_contains.as_deref(), now))
                .collect();
            let by_order = |a: &&DeviceRecord, b: &&DeviceRecord| b.order.cmp(&a.order);
            if found.len() > limit + 1 {
                found.select_nth_unstable_by(limit, by_order);
                found.truncate(limit + 1);
            }
            found.sort_unstable_by(by_order);
            let next_cursor = (found.len() > limit).then(|| cursor_for(&found[limit - 1].order));
            found.truncate(limit);
            let items: Vec<DeviceRecord> = found.into_iter().cloned().collect();
            (items, next_cursor)
        };
        Ok(Page {
            items: items.into_iter().map(|d| self.present(d, now)).collect(),
            next_cursor,
        })
    }
}

impl crate::firmware::UsageGuard for DeviceRegistry {
    /// Devices of the firmware's model that run its version (consistency upgrades need it).
    fn in_use(&self, fw: &crate::store::FirmwareRecord) -> Option<String> {
        let version = crate::domain::ProductVersion::parse(&fw.product_version).ok()?;
        let devices = lock(&self.inner.devices);
        let n = devices
            .values()
            .filter(|d| {
                d.model
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(&fw.model))
            })
            .filter(|d| {
                d.firmware_version
                    .as_deref()
                    .and_then(|v| crate::domain::ProductVersion::parse(v).ok())
                    .is_some_and(|v| v == version)
            })
            .count();
        (n > 0).then(|| {
            format!(
                "{n} registered device(s) run {} {}",
                fw.model, fw.product_version
            )
        })
    }
}

pub(crate) fn new_device(sn: &str, now: DateTime<Utc>) -> DeviceRecord {
    DeviceRecord {
        sn: sn.to_string(),
        order: crate::domain::ids::next(),
        gateway_sn: None,
        child_sn: None,
        osd_child_sn: None,
        model_key: None,
        model: None,
        model_declared: false,
        firmware_version: None,
        compatible_status: None,
        firmware_upgrade_status: None,
        mode_code: None,
        thing_version: None,
        dialect: None,
        first_seen_at: now,
        last_seen_at: None,
        last_osd_at: None,
        last_state_at: None,
        topology_at: None,
        online: false,
    }
}
