//! OTA tasks (contract §5): validate a request, choose each device's upgrade type by policy,
//! run the preflight checks, store the task (flushed to disk) and publish one `ota_create`;
//! then follow `services_reply` (by tid) and `ota_progress` (by bid, else the gateway's single
//! open task) to a final state, time out what goes silent, and verify each device by its next
//! reports. Free of MQTT and HTTP types: messages arrive as [`OtaMessage`], publishing goes
//! through the [`Publisher`] trait.

mod cache;
mod create;
pub mod machine;
pub mod policy;
mod reads;
mod replicas;
pub mod store;
pub mod task;
mod tracking;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::devices::DeviceRegistry;
use crate::domain::{FileName, FirmwareId, ProductVersion};
use crate::store::{
    CatalogError, Durability, FirmwareQuery, FirmwareRecord, FirmwareStatus, FirmwareStore,
    IdempotencyStore, Page, PageRequest,
};
use policy::{Decision, DeviceFacts};
use store::{TaskKey, TaskQuery, TaskStore};
pub use task::{OtaTask, Outcome, Progress, TaskDevice, TaskStatus};

/// Errors of the OTA layer.
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    /// Unknown task, firmware or device.
    #[error("{0}")]
    NotFound(String),
    /// Well-formed but invalid.
    #[error("{0}")]
    Validation(String),
    /// Malformed.
    #[error("{0}")]
    Invalid(String),
    /// Firmware model does not fit the device.
    #[error("{0}")]
    ModelMismatch(String),
    /// Target older than the running version.
    #[error("{0}")]
    DowngradeRefused(String),
    /// Every device already runs the target.
    #[error("every requested device already runs the target")]
    AlreadyUpToDate,
    /// The gateway has an open task.
    #[error("gateway has an open task {0}")]
    GatewayBusy(String),
    /// A device has an open task.
    #[error("device has an open task {0}")]
    DeviceBusy(String),
    /// A preflight check failed.
    #[error("preflight check {check} failed: {reason}")]
    Preflight {
        /// The check.
        check: &'static str,
        /// Why.
        reason: String,
    },
    /// The broker is unreachable.
    #[error("the MQTT broker is unreachable; nothing was stored")]
    BrokerUnavailable,
    /// Deleted firmware.
    #[error("firmware {0} was deleted")]
    FirmwareDeleted(String),
    /// Corrupt firmware.
    #[error("firmware {0} failed verification")]
    FirmwareCorrupt(String),
    /// Same Idempotency-Key, other body.
    #[error("Idempotency-Key reused with a different body")]
    IdempotencyReused,
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The preflight checks, each switchable with `--preflight-skip`.
pub const PREFLIGHT_CHECKS: [&str; 3] = ["gateway_online", "not_upgrading", "aircraft_attached"];

/// The lease whose holder runs the OTA timers of a deployment of several replicas.
pub const TIMERS_LEASE: &str = "ota-timers";

/// How long an open task must be quiet before device reports may close it.
const RECONCILE_AFTER: chrono::Duration = chrono::Duration::seconds(10);
/// How long a device whose outcome is `unverified` may still become verified (late).
const LATE_VERIFY: chrono::Duration = chrono::Duration::hours(24);

/// Where `ota_create` goes (implemented by the MQTT adapter, which owns the wire format).
pub trait Publisher: Send + Sync {
    /// Whether the broker session is up.
    fn connected(&self) -> bool;
    /// The message `cmd` becomes on the wire: its topic and its JSON.
    fn render(&self, cmd: &OtaCreate) -> (String, Value);
    /// Queues a QoS 1 publish; false if it could not be queued.
    fn publish(&self, topic: String, payload: Vec<u8>) -> bool;
}

/// The `ota_create` command for one gateway, typed; the MQTT adapter renders it.
#[derive(Clone, Debug, PartialEq)]
pub struct OtaCreate {
    /// The gateway whose `services` topic gets it.
    pub gateway_sn: String,
    /// Transaction id.
    pub tid: String,
    /// Business id, kept for the whole job.
    pub bid: String,
    /// The devices to upgrade (skipped ones are left out).
    pub devices: Vec<OtaCreateDevice>,
}

/// One device of an [`OtaCreate`].
#[derive(Clone, Debug, PartialEq)]
pub struct OtaCreateDevice {
    /// Serial.
    pub sn: String,
    /// Target version as stored.
    pub product_version: String,
    /// This device's own signed download URL.
    pub file_url: String,
    /// MD5, lowercase hex.
    pub md5: String,
    /// Size in bytes.
    pub file_size: u64,
    /// Package file name.
    pub file_name: String,
    /// 2 = consistency, 3 = normal.
    pub upgrade_type: u8,
}

impl OtaCreate {
    /// The command a task sends.
    pub fn for_task(task: &OtaTask) -> OtaCreate {
        OtaCreate {
            gateway_sn: task.gateway_sn.clone(),
            tid: task.tid.clone(),
            bid: task.bid.clone(),
            devices: task
                .devices
                .iter()
                .filter(|d| d.outcome != Outcome::SkippedUpToDate)
                .map(|d| OtaCreateDevice {
                    sn: d.sn.clone(),
                    product_version: d.product_version.clone(),
                    file_url: d.file_url.clone(),
                    md5: d.md5.clone(),
                    file_size: d.file_size,
                    file_name: d.file_name.clone(),
                    upgrade_type: d.upgrade_type.unwrap_or(3),
                })
                .collect(),
        }
    }
}

/// An OTA-related message from a gateway.
#[derive(Clone, Debug)]
pub struct OtaMessage {
    /// `services_reply` (true) or `events` (false).
    pub is_reply: bool,
    /// SN in the topic.
    pub topic_sn: String,
    /// tid.
    pub tid: Option<String>,
    /// bid.
    pub bid: Option<String>,
    /// method.
    pub method: Option<String>,
    /// What `data` reported, parsed by the MQTT adapter.
    pub report: machine::Report,
    /// The whole payload, for the history.
    pub raw: task::RawJson,
    /// Acknowledged once the message is recorded (never when storing it failed).
    pub ack: crate::domain::Ack,
}

/// Where the MQTT adapter hands gateway messages to the OTA service. Unbounded so that the
/// session never stops polling its connection (which also carries fwrepo's own publishes,
/// acknowledgements and pings); bounded in practice by the broker's in-flight window: a
/// message is acknowledged only once recorded, and acknowledgements go in order, so no more
/// than the window's worth of unrecorded QoS 1 messages can wait here per session.
pub type OtaSender = tokio::sync::mpsc::UnboundedSender<OtaMessage>;

/// The OTA service's end of [`OtaSender`].
pub type OtaInbox = tokio::sync::mpsc::UnboundedReceiver<OtaMessage>;

/// A new hand-off between the MQTT adapter and the OTA service.
pub fn inbox() -> (OtaSender, OtaInbox) {
    tokio::sync::mpsc::unbounded_channel()
}

/// Timeouts and modes.
#[derive(Clone, Debug)]
pub struct OtaSettings {
    /// Wait for `services_reply`.
    pub reply_timeout: Duration,
    /// Wait between `ota_progress` events.
    pub progress_timeout: Duration,
    /// Window after `ok` to verify each device.
    pub verify_window: Duration,
    /// `normal`, `strict` or `off`.
    pub preflight: String,
    /// Checks switched off (see [`PREFLIGHT_CHECKS`]).
    pub preflight_skip: Vec<String>,
    /// Online window of the registry.
    pub online_window: Duration,
    /// Finished tasks older than this are removed (`--retention-days`).
    pub retention: Duration,
    /// The catalog is shared with other replicas (PostgreSQL): tasks another replica created
    /// or changed are read from it, and memory's copies are synchronized every few seconds.
    pub shared: bool,
    /// This replica's route tag (see [`crate::cluster::route_tag`]), which the tid and bid of
    /// each `ota_create` it sends begin with; none for a single process.
    pub route_tag: Option<String>,
}

/// One device of a request.
#[derive(Clone, Debug, Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct RequestDevice {
    /// Serial.
    pub sn: String,
    /// Firmware by id.
    pub firmware_id: Option<String>,
    /// Or by model …
    pub model: Option<String>,
    /// … and version.
    pub product_version: Option<String>,
}

/// `POST /api/v1/ota`.
#[derive(Clone, Debug, Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct OtaRequest {
    /// The dock.
    pub gateway_sn: String,
    /// 1–2 devices: the dock and/or its current aircraft.
    pub devices: Vec<RequestDevice>,
    /// Explicit type for every device (2 or 3).
    pub firmware_upgrade_type: Option<u8>,
    /// Ignore model mismatch; send even when up to date.
    #[serde(default)]
    pub force: bool,
    /// Allow an older target.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Decide and answer, store and publish nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What `create` did.
pub enum Created {
    /// Stored and published (202).
    Task(Box<OtaTask>),
    /// Dry run: what would be sent and why (200).
    DryRun(Value),
    /// The answer of an earlier request with the same Idempotency-Key.
    Replay(Value),
}

#[derive(Default)]
struct Open {
    tasks: HashMap<String, OtaTask>,
    by_tid: HashMap<String, String>,
    by_bid: HashMap<String, String>,
    by_gateway: HashMap<String, String>,
    by_device: HashMap<String, String>,
    /// Settled tasks with `unverified` devices that may still report the target late.
    late: HashMap<String, DateTime<Utc>>,
    /// tid → task id (and bid) of recently settled tasks (oldest first, bounded): a `services_reply`
    /// can arrive after the task's last progress event (rumqttd delivers topic filters in
    /// turn, not in publish order) and is still recorded.
    settled_tids: std::collections::VecDeque<(String, String, String)>,
    /// The bids of the same tasks: an `ota_progress` that arrives after its task settled
    /// (handed over by another replica, it may overtake an earlier one) is absorbed by the
    /// final state, without a catalog read.
    settled_bids: std::collections::HashSet<String>,
}

/// Settled tasks whose late `services_reply` is still recorded.
const SETTLED_TIDS: usize = 10_000;

impl Open {
    fn index(&mut self, t: &OtaTask) {
        self.by_tid.insert(t.tid.clone(), t.id.clone());
        self.by_bid.insert(t.bid.clone(), t.id.clone());
        if !t.status.is_final() {
            self.by_gateway.insert(t.gateway_sn.clone(), t.id.clone());
            for d in &t.devices {
                if d.outcome != Outcome::SkippedUpToDate {
                    self.by_device.insert(d.sn.clone(), t.id.clone());
                }
            }
        }
        self.tasks.insert(t.id.clone(), t.clone());
    }

    fn release(&mut self, t: &OtaTask) {
        if self.by_gateway.get(&t.gateway_sn) == Some(&t.id) {
            self.by_gateway.remove(&t.gateway_sn);
        }
        for d in &t.devices {
            if self.by_device.get(&d.sn) == Some(&t.id) {
                self.by_device.remove(&d.sn);
            }
        }
    }

    fn forget(&mut self, t: &OtaTask) {
        self.release(t);
        if self.by_tid.remove(&t.tid).is_some() {
            if self.settled_tids.len() == SETTLED_TIDS
                && let Some((_, _, bid)) = self.settled_tids.pop_front()
            {
                self.settled_bids.remove(&bid);
            }
            self.settled_tids
                .push_back((t.tid.clone(), t.id.clone(), t.bid.clone()));
            self.settled_bids.insert(t.bid.clone());
        }
        self.by_bid.remove(&t.bid);
        self.tasks.remove(&t.id);
    }
}

/// Task counters for `/metrics`.
#[derive(Debug, Default)]
pub struct OtaCounters {
    /// Tasks published.
    pub created: std::sync::atomic::AtomicU64,
    /// Tasks that ended, by final status: ok, failed, canceled, rejected, timeout.
    pub finished: [std::sync::atomic::AtomicU64; 5],
}

impl OtaCounters {
    fn finish(&self, status: TaskStatus) {
        let i = match status {
            TaskStatus::Ok => 0,
            TaskStatus::Failed => 1,
            TaskStatus::Canceled => 2,
            TaskStatus::Rejected => 3,
            _ => 4,
        };
        self.finished[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Inner {
    counters: OtaCounters,
    stores: OtaStores,
    devices: DeviceRegistry,
    publisher: Arc<dyn Publisher>,
    public_url: Arc<str>,
    settings: OtaSettings,
    signer: crate::download::signing::UrlSigner,
    clock: crate::domain::Clock,
    open: Mutex<Open>,
    changes: broadcast::Sender<OtaTask>,
    /// The deployment's lease on the timers (timeouts, reconciliation, verification): they
    /// run on the replica holding it; without one (a single process), here.
    timers: std::sync::OnceLock<crate::cluster::Lease>,
}

/// What the OTA service stores and reads, whichever backend.
#[derive(Clone)]
pub struct OtaStores {
    /// Tasks.
    pub tasks: Arc<dyn TaskStore>,
    /// Firmware records (resolving a request's firmware).
    pub firmware: Arc<dyn FirmwareStore>,
    /// Idempotency-Key answers.
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// Made durable before a task is published.
    pub durability: Arc<dyn Durability>,
}

/// The OTA service. Cheap to clone.
#[derive(Clone)]
pub struct OtaService {
    inner: Arc<Inner>,
}

use crate::lock;

/// A UUID v4 text; its first 8 hex digits are `tag` if given (a replica's route tag).
fn uuid_like(tag: Option<&str>) -> String {
    let h = sha2::Sha256::digest(crate::domain::ids::next().as_bytes());
    let mut x = hex::encode(&h[..16]);
    if let Some(tag) = tag.filter(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit())) {
        x.replace_range(..8, &tag.to_ascii_lowercase());
    }
    format!(
        "{}-{}-4{}-a{}-{}",
        &x[0..8],
        &x[8..12],
        &x[13..16],
        &x[17..20],
        &x[20..32]
    )
}

impl OtaService {
    /// Loads open and recently finished tasks; open ones get a fresh grace period.
    pub async fn load(
        stores: OtaStores,
        devices: DeviceRegistry,
        publisher: Arc<dyn Publisher>,
        public_url: Arc<str>,
        settings: OtaSettings,
        signer: crate::download::signing::UrlSigner,
        clock: crate::domain::Clock,
    ) -> Result<OtaService, CatalogError> {
        let mut open = Open::default();
        let now = clock.now();
        for mut t in stores.tasks.recent_tasks(now - LATE_VERIFY).await? {
            if !t.settled() {
                if !t.status.is_final() {
                    // A fresh grace period: timeouts count from the restart.
                    t.last_event_at = Some(now);
                }
                open.index(&t);
            } else if let Some(since) = t
                .devices
                .iter()
                .filter(|d| d.outcome == Outcome::Unverified)
                .map(|d| d.outcome_at.unwrap_or(t.updated_at))
                .max()
                .filter(|since| now - *since <= LATE_VERIFY)
            {
                // The late-verification watch survives a restart.
                open.late.insert(t.id.clone(), since);
            }
        }
        let (changes, _) = broadcast::channel(1024);
        Ok(OtaService {
            inner: Arc::new(Inner {
                counters: OtaCounters::default(),
                stores,
                devices,
                publisher,
                public_url,
                settings,
                signer,
                clock,
                open: Mutex::new(open),
                changes,
                timers: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Prometheus text: tasks created, open by status, finished by status.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.inner.counters;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP fwrepo_ota_tasks_created_total OTA tasks published.\n# TYPE fwrepo_ota_tasks_created_total counter\nfwrepo_ota_tasks_created_total {}",
            c.created.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP fwrepo_ota_tasks_finished_total OTA tasks that ended, by status.\n# TYPE fwrepo_ota_tasks_finished_total counter"
        );
        for (i, name) in ["ok", "failed", "canceled", "rejected", "timeout"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "fwrepo_ota_tasks_finished_total{{status=\"{name}\"}} {}",
                c.finished[i].load(Relaxed)
            );
        }
        let mut open: HashMap<&'static str, usize> = HashMap::new();
        for t in lock(&self.inner.open)
            .tasks
            .values()
            .filter(|t| !t.status.is_final())
        {
            let k = match t.status {
                TaskStatus::Pending => "pending",
                TaskStatus::Sent => "sent",
                TaskStatus::Paused => "paused",
                _ => "in_progress",
            };
            *open.entry(k).or_default() += 1;
        }
        let _ = writeln!(
            out,
            "# HELP fwrepo_ota_tasks_open OTA tasks not final, by status.\n# TYPE fwrepo_ota_tasks_open gauge"
        );
        for k in ["pending", "sent", "in_progress", "paused"] {
            let _ = writeln!(
                out,
                "fwrepo_ota_tasks_open{{status=\"{k}\"}} {}",
                open.get(k).copied().unwrap_or(0)
            );
        }
        out
    }

    /// Runs the timers only while this replica holds `lease` (several replicas share the
    /// catalog: one of them times out and verifies tasks).
    pub fn time_under(&self, lease: crate::cluster::Lease) {
        let _ = self.inner.timers.set(lease);
    }

    /// Whether this replica runs the timers now.
    fn runs_timers(&self) -> bool {
        self.inner.timers.get().is_none_or(|l| l.held())
    }

    /// Subscribes to task changes (SSE).
    pub fn subscribe(&self) -> broadcast::Receiver<OtaTask> {
        self.inner.changes.subscribe()
    }
}

impl crate::firmware::UsageGuard for OtaService {
    fn in_use(&self, fw: &FirmwareRecord) -> Option<String> {
        let open = lock(&self.inner.open);
        open.tasks
            .values()
            .filter(|t| !t.status.is_final())
            .find(|t| t.devices.iter().any(|d| d.firmware_id == fw.id.as_str()))
            .map(|t| format!("open OTA task {} uses it", t.id))
    }
}

#[cfg(test)]
mod tests;
