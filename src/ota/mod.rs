//! OTA tasks (contract §5): validate a request, choose each device's upgrade type by policy,
//! run the preflight checks, store the task (flushed to disk) and publish one `ota_create`;
//! then follow `services_reply` (by tid) and `ota_progress` (by bid, else the gateway's single
//! open task) to a final state, time out what goes silent, and verify each device by its next
//! reports. Free of MQTT and HTTP types: messages arrive as [`OtaMessage`], publishing goes
//! through the [`Publisher`] trait.

pub mod machine;
pub mod policy;
pub mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, CatalogError, FirmwareRecord, FirmwareStatus, Page, PageRequest};
use crate::devices::DeviceRegistry;
use crate::domain::{FileName, FirmwareId, ProductVersion};
use policy::{Decision, DeviceFacts};
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
    Replay(u16, Value),
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
    /// tid → task id of recently settled tasks (oldest first, bounded): a `services_reply`
    /// can arrive after the task's last progress event (rumqttd delivers topic filters in
    /// turn, not in publish order) and is still recorded.
    settled_tids: std::collections::VecDeque<(String, String)>,
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
            if self.settled_tids.len() == SETTLED_TIDS {
                self.settled_tids.pop_front();
            }
            self.settled_tids.push_back((t.tid.clone(), t.id.clone()));
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
    catalog: Catalog,
    devices: DeviceRegistry,
    publisher: Arc<dyn Publisher>,
    public_url: Arc<str>,
    settings: OtaSettings,
    signer: crate::download::signing::UrlSigner,
    open: Mutex<Open>,
    changes: broadcast::Sender<OtaTask>,
}

/// The OTA service. Cheap to clone.
#[derive(Clone)]
pub struct OtaService {
    inner: Arc<Inner>,
}

use crate::lock;

fn uuid_like() -> String {
    let h = sha2::Sha256::digest(crate::domain::ids::next().as_bytes());
    let x = hex::encode(&h[..16]);
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
    pub fn load(
        catalog: Catalog,
        devices: DeviceRegistry,
        publisher: Arc<dyn Publisher>,
        public_url: Arc<str>,
        settings: OtaSettings,
        signer: crate::download::signing::UrlSigner,
    ) -> Result<OtaService, CatalogError> {
        let mut open = Open::default();
        let now = Utc::now();
        for mut t in catalog.all_tasks::<OtaTask>()? {
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
                catalog,
                devices,
                publisher,
                public_url,
                settings,
                signer,
                open: Mutex::new(open),
                changes,
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

    /// Subscribes to task changes (SSE).
    pub fn subscribe(&self) -> broadcast::Receiver<OtaTask> {
        self.inner.changes.subscribe()
    }

    /// The firmware a request entry names (by id, or model + version), if usable.
    pub fn resolve_firmware(&self, d: &RequestDevice) -> Result<FirmwareRecord, OtaError> {
        let fw = match (&d.firmware_id, &d.model, &d.product_version) {
            (Some(id), _, _) => {
                let id = FirmwareId::parse(id)
                    .ok_or_else(|| OtaError::NotFound(format!("firmware {id} not found")))?;
                self.inner.catalog.firmware(&id).map_err(|e| match e {
                    CatalogError::NotFound => {
                        OtaError::NotFound(format!("firmware {id} not found"))
                    }
                    other => other.into(),
                })?
            }
            (None, Some(model), Some(version)) => {
                let v =
                    ProductVersion::parse(version).map_err(|e| OtaError::Invalid(e.to_string()))?;
                let page = self.inner.catalog.list_firmware(
                    &PageRequest {
                        limit: Some(1),
                        cursor: None,
                    },
                    |r| {
                        r.status != FirmwareStatus::Deleted
                            && r.model.eq_ignore_ascii_case(model)
                            && ProductVersion::parse(&r.product_version).is_ok_and(|rv| rv == v)
                    },
                )?;
                page.items
                    .into_iter()
                    .next()
                    .ok_or_else(|| OtaError::NotFound(format!("no firmware {model} {version}")))?
            }
            _ => {
                return Err(OtaError::Invalid(format!(
                    "device {}: give firmware_id, or model and product_version",
                    d.sn
                )));
            }
        };
        match fw.status {
            FirmwareStatus::Deleted => Err(OtaError::FirmwareDeleted(fw.id.to_string())),
            FirmwareStatus::Corrupt => Err(OtaError::FirmwareCorrupt(fw.id.to_string())),
            FirmwareStatus::Disabled => Err(OtaError::Validation(format!(
                "firmware {} is disabled",
                fw.id
            ))),
            FirmwareStatus::Ready => Ok(fw),
        }
    }

    fn preflight(&self, req: &OtaRequest) -> Result<Vec<String>, OtaError> {
        let skip = &self.inner.settings.preflight_skip;
        match self.preflight_checks(req) {
            Err(OtaError::Preflight { check, reason }) if skip.iter().any(|s| s == check) => {
                Ok(vec![format!(
                    "preflight check {check} skipped by configuration: {reason}"
                )])
            }
            other => other,
        }
    }

    fn preflight_checks(&self, req: &OtaRequest) -> Result<Vec<String>, OtaError> {
        let mode = self.inner.settings.preflight.as_str();
        let mut warnings = Vec::new();
        if mode == "off" {
            return Ok(warnings);
        }
        let gw = self.inner.devices.get(&req.gateway_sn).ok();
        match &gw {
            None if mode == "strict" => {
                return Err(OtaError::Preflight {
                    check: "gateway_online",
                    reason: format!("gateway {} was never seen", req.gateway_sn),
                });
            }
            None => warnings.push(format!(
                "gateway {} was never seen; sent without preflight",
                req.gateway_sn
            )),
            Some(g) => {
                if g.last_osd_at.is_none() && g.last_seen_at.is_none() {
                    if mode == "strict" {
                        return Err(OtaError::Preflight {
                            check: "gateway_online",
                            reason: "the gateway never sent osd".into(),
                        });
                    }
                    warnings.push("the gateway never sent osd".into());
                } else if !g.online {
                    return Err(OtaError::Preflight {
                        check: "gateway_online",
                        reason: format!("gateway {} is offline", g.sn),
                    });
                }
                if g.mode_code == Some(3) || g.firmware_upgrade_status == Some(1) {
                    return Err(OtaError::Preflight {
                        check: "not_upgrading",
                        reason: "the gateway reports an upgrade in progress".into(),
                    });
                }
            }
        }
        for d in req.devices.iter().filter(|d| d.sn != req.gateway_sn) {
            let child = gw.as_ref().and_then(|g| g.child_sn.clone());
            let dev = self.inner.devices.get(&d.sn).ok();
            let linked = child.as_deref() == Some(d.sn.as_str())
                || dev
                    .as_ref()
                    .is_some_and(|x| x.gateway_sn.as_deref() == Some(req.gateway_sn.as_str()));
            if !linked {
                return Err(OtaError::Preflight {
                    check: "aircraft_attached",
                    reason: format!("{} is not the current aircraft of {}", d.sn, req.gateway_sn),
                });
            }
            // The dock's own osd names its paired aircraft even when that one is off: a
            // different serial there means the topology fwrepo holds is stale.
            if let Some(osd_child) = gw.as_ref().and_then(|g| g.osd_child_sn.as_deref()) {
                if osd_child != d.sn {
                    return Err(OtaError::Preflight {
                        check: "aircraft_attached",
                        reason: format!(
                            "the osd of {} reports aircraft {osd_child}, not {}",
                            req.gateway_sn, d.sn
                        ),
                    });
                }
            }
            if let Some(x) = dev {
                if x.mode_code == Some(13) || x.firmware_upgrade_status == Some(1) {
                    return Err(OtaError::Preflight {
                        check: "not_upgrading",
                        reason: format!("{} reports an upgrade in progress", d.sn),
                    });
                }
            }
        }
        Ok(warnings)
    }

    /// Handles `POST /api/v1/ota`.
    pub async fn create(
        &self,
        req: OtaRequest,
        idempotency_key: Option<String>,
    ) -> Result<Created, OtaError> {
        let body_hash = hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(&req).unwrap_or_default(),
        ));
        if let Some(key) = &idempotency_key {
            if let Some((hash, status, answer)) = self.inner.catalog.idempotent(key)? {
                if hash != body_hash {
                    return Err(OtaError::IdempotencyReused);
                }
                return Ok(Created::Replay(status, answer));
            }
        }
        if req.gateway_sn.is_empty() || req.gateway_sn.contains(['/', '+', '#']) {
            return Err(OtaError::Invalid("invalid gateway_sn".into()));
        }
        if req.devices.is_empty() || req.devices.len() > 2 {
            return Err(OtaError::Validation("a task takes 1 or 2 devices".into()));
        }
        if req.devices.len() == 2 && req.devices[0].sn == req.devices[1].sn {
            return Err(OtaError::Validation("the devices must differ".into()));
        }
        if req
            .devices
            .iter()
            .filter(|d| d.sn != req.gateway_sn)
            .count()
            > 1
        {
            return Err(OtaError::Validation(
                "the devices are the gateway and its current aircraft".into(),
            ));
        }
        // Devices of another gateway.
        for d in req.devices.iter().filter(|d| d.sn != req.gateway_sn) {
            if let Ok(dev) = self.inner.devices.get(&d.sn) {
                if let Some(g) = dev.gateway_sn.as_deref().filter(|g| *g != req.gateway_sn) {
                    return Err(OtaError::Validation(format!(
                        "{} belongs to gateway {g}",
                        d.sn
                    )));
                }
            }
        }
        {
            let open = lock(&self.inner.open);
            if let Some(t) = open.by_gateway.get(&req.gateway_sn) {
                return Err(OtaError::GatewayBusy(t.clone()));
            }
            for d in &req.devices {
                if let Some(t) = open.by_device.get(&d.sn) {
                    return Err(OtaError::DeviceBusy(t.clone()));
                }
            }
        }
        let id = crate::domain::ids::next();
        let mut devices = Vec::new();
        for d in &req.devices {
            let fw = self.resolve_firmware(d)?;
            let target = ProductVersion::parse(&fw.product_version)
                .map_err(|e| OtaError::Invalid(e.to_string()))?;
            let facts = self
                .inner
                .devices
                .get(&d.sn)
                .map(|x| DeviceFacts {
                    model: x.model,
                    running: x.firmware_version,
                    compatible_status: x.compatible_status,
                })
                .unwrap_or_default();
            let decision = policy::decide(
                &fw.model,
                &target,
                &facts,
                &policy::Request {
                    upgrade_type: req.firmware_upgrade_type,
                    force: req.force,
                    allow_downgrade: req.allow_downgrade,
                    default_type: None,
                },
            );
            let segment = FileName::parse(&fw.file_name)
                .map(|n| n.url_segment())
                .unwrap_or_else(|_| fw.file_name.clone());
            let (upgrade_type, rule, reason, outcome) = match decision {
                Decision::Send {
                    upgrade_type,
                    rule,
                    reason,
                } => (Some(upgrade_type), rule, reason, Outcome::Pending),
                Decision::Skip { reason } => (None, 5, reason, Outcome::SkippedUpToDate),
                Decision::Refuse { code, reason } => {
                    let reason = format!("{}: {reason}", d.sn);
                    return Err(match code {
                        "model_mismatch" => OtaError::ModelMismatch(reason),
                        "downgrade_refused" => OtaError::DowngradeRefused(reason),
                        _ => OtaError::Validation(reason),
                    });
                }
            };
            devices.push(TaskDevice {
                sn: d.sn.clone(),
                firmware_id: fw.id.to_string(),
                product_version: fw.product_version.clone(),
                upgrade_type,
                policy_rule: rule,
                policy_reason: reason,
                // Signed for this task, device and firmware (see download::signing).
                file_url: format!(
                    "{}/dl/{id}/{}/{}/{segment}",
                    self.inner.public_url,
                    d.sn,
                    self.inner
                        .signer
                        .sign(&id, &d.sn, fw.id.as_str(), Utc::now())
                ),
                file_name: fw.file_name.clone(),
                md5: fw.md5.clone(),
                file_size: fw.file_size,
                download_session: None,
                outcome,
                outcome_at: None,
            });
        }
        if devices
            .iter()
            .all(|d| d.outcome == Outcome::SkippedUpToDate)
        {
            return Err(OtaError::AlreadyUpToDate);
        }
        let warnings = self.preflight(&req)?;
        let now = Utc::now();
        let mut task = OtaTask {
            id: id.clone(),
            gateway_sn: req.gateway_sn.clone(),
            tid: uuid_like(),
            bid: uuid_like(),
            status: TaskStatus::Pending,
            created_at: now,
            updated_at: now,
            devices,
            progress: Progress::default(),
            result_code: None,
            result_reason: None,
            retryable: None,
            history: Vec::new(),
            replied_at: None,
            last_event_at: Some(now),
            finished_at: None,
        };
        let (topic, message) = self.inner.publisher.render(&OtaCreate::for_task(&task));
        if req.dry_run {
            return Ok(Created::DryRun(json!({
                "dry_run": true,
                "task": task,
                "ota_create": message,
                "topic": topic,
                "warnings": warnings,
            })));
        }
        if !self.inner.publisher.connected() {
            return Err(OtaError::BrokerUnavailable);
        }
        task.note("api", None, now);
        self.inner.catalog.put_task(&task.id, &task)?;
        self.inner.catalog.flush().await?;
        let payload = serde_json::to_vec(&message).unwrap_or_default();
        let raw = String::from_utf8(payload.clone())
            .ok()
            .and_then(|text| serde_json::value::RawValue::from_string(text).ok());
        // The task is open (findable by tid and bid) before the message leaves: a gateway may
        // answer faster than this function returns, and its services_reply must not be an
        // orphan.
        task.status = TaskStatus::Sent;
        task.note("publish", raw, Utc::now());
        self.save(&task);
        if !self.inner.publisher.publish(topic, payload) {
            lock(&self.inner.open).forget(&task);
            self.inner.catalog.delete_task(&task.id)?;
            return Err(OtaError::BrokerUnavailable);
        }
        self.inner
            .counters
            .created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for w in &warnings {
            tracing::warn!(task_id = %task.id, gateway_sn = %task.gateway_sn, "{w}");
        }
        tracing::info!(task_id = %task.id, gateway_sn = %task.gateway_sn, tid = %task.tid, bid = %task.bid, "ota_create published");
        if let Some(key) = idempotency_key {
            let answer = serde_json::to_value(&task).unwrap_or_default();
            self.inner
                .catalog
                .put_idempotent(&key, &body_hash, 202, &answer)?;
        }
        Ok(Created::Task(Box::new(task)))
    }

    fn save(&self, task: &OtaTask) {
        {
            let mut open = lock(&self.inner.open);
            if task.status.is_final() {
                open.release(task);
            }
            if task.settled() {
                open.forget(task);
                if task
                    .devices
                    .iter()
                    .any(|d| d.outcome == Outcome::Unverified)
                {
                    open.late.entry(task.id.clone()).or_insert(Utc::now());
                } else {
                    open.late.remove(&task.id);
                }
            } else {
                open.index(task);
            }
        }
        if let Err(e) = self.inner.catalog.put_task(&task.id, task) {
            tracing::error!(task_id = %task.id, error = %e, "storing task failed");
        }
        let _ = self.inner.changes.send(task.clone());
    }

    /// One task, with each device's download session.
    pub fn get(
        &self,
        id: &str,
        sessions: impl Fn(&str, &str) -> Option<Value>,
    ) -> Result<OtaTask, OtaError> {
        let open = lock(&self.inner.open).tasks.get(id).cloned();
        let mut t = match open {
            Some(t) => t,
            None => self
                .inner
                .catalog
                .task::<OtaTask>(id)?
                .ok_or_else(|| OtaError::NotFound(format!("task {id} not found")))?,
        };
        for d in &mut t.devices {
            d.download_session = sessions(&t.id, &d.sn);
        }
        Ok(t)
    }

    /// A task's status without copying it (open tasks from memory).
    pub fn status(&self, id: &str) -> Option<TaskStatus> {
        if let Some(t) = lock(&self.inner.open).tasks.get(id) {
            return Some(t.status);
        }
        self.inner
            .catalog
            .task::<OtaTask>(id)
            .ok()
            .flatten()
            .map(|t| t.status)
    }

    /// Newest-first page of tasks.
    pub fn list(
        &self,
        gateway_sn: Option<&str>,
        status: Option<TaskStatus>,
        page: &PageRequest,
    ) -> Result<Page<OtaTask>, OtaError> {
        Ok(self.inner.catalog.list_tasks(page, |t: &OtaTask| {
            gateway_sn.is_none_or(|g| t.gateway_sn == g) && status.is_none_or(|s| t.status == s)
        })?)
    }

    /// The firmware and file name behind a per-task URL, if the task and device exist.
    /// Runs on every request to a `/dl/` URL: open tasks are read in place, not copied.
    pub fn download_target(&self, task_id: &str, sn: &str) -> Option<(String, String)> {
        let of = |t: &OtaTask| {
            t.devices
                .iter()
                .find(|d| d.sn == sn)
                .map(|d| (d.firmware_id.clone(), d.file_name.clone()))
        };
        if let Some(t) = lock(&self.inner.open).tasks.get(task_id) {
            return of(t);
        }
        of(&self.inner.catalog.task::<OtaTask>(task_id).ok()??)
    }

    /// Applies a gateway message.
    pub fn on_message(&self, msg: OtaMessage) {
        let now = Utc::now();
        let task = {
            let open = lock(&self.inner.open);
            let by_id = |id: Option<&String>| id.and_then(|i| open.tasks.get(i)).cloned();
            if msg.is_reply {
                msg.tid.as_ref().and_then(|tid| by_id(open.by_tid.get(tid)))
            } else {
                msg.bid
                    .as_ref()
                    .and_then(|bid| by_id(open.by_bid.get(bid)))
                    .or_else(|| by_id(open.by_gateway.get(&msg.topic_sn)))
                    .or_else(|| {
                        let parent = self.inner.devices.get(&msg.topic_sn).ok()?.gateway_sn?;
                        by_id(open.by_gateway.get(&parent))
                    })
            }
        };
        if msg.is_reply {
            let settled = match &task {
                Some(t) if t.status.is_final() => Some(t.clone()),
                Some(_) => None,
                None => self.settled_task(msg.tid.as_deref()),
            };
            if let Some(t) = settled {
                let event = machine::TaskEvent::Reply(msg.report, Some(msg.raw));
                self.late_reply(t, event, now);
                return;
            }
        }
        let Some(mut task) = task else {
            tracing::info!(topic_sn = %msg.topic_sn, tid = ?msg.tid, bid = ?msg.bid, method = ?msg.method, "OTA message matches no open task (orphan)");
            let orphan = json!({"at": now, "topic_sn": msg.topic_sn, "tid": msg.tid, "bid": msg.bid,
                "method": msg.method, "raw": msg.raw});
            if let Err(e) = self.inner.catalog.put_orphan(&orphan) {
                tracing::warn!(error = %e, "storing an orphan OTA message failed");
            }
            return;
        };
        let event = if msg.is_reply {
            machine::TaskEvent::Reply(msg.report, Some(msg.raw))
        } else {
            machine::TaskEvent::Progress(msg.report, Some(msg.raw))
        };
        self.apply(&mut task, event, now);
    }

    /// Runs the state machine on `task` and carries out its effects: settle devices and count
    /// a task that just ended, then persist and notify.
    fn apply(&self, task: &mut OtaTask, event: machine::TaskEvent, now: DateTime<Utc>) {
        let fx = machine::apply(task, event, now);
        if let Some(status) = fx.finished {
            self.inner.counters.finish(status);
            self.finish_devices(task, now);
            tracing::info!(task_id = %task.id, status = ?status, "OTA task finished");
        }
        if fx.save {
            self.save(task);
        }
    }

    /// A recently settled task by the tid of its `ota_create`, from the catalog.
    fn settled_task(&self, tid: Option<&str>) -> Option<OtaTask> {
        let tid = tid?;
        let id = lock(&self.inner.open)
            .settled_tids
            .iter()
            .rev()
            .find(|(t, _)| t == tid)
            .map(|(_, id)| id.clone())?;
        self.inner.catalog.task::<OtaTask>(&id).ok()?
    }

    /// Records a `services_reply` that came after the task ended (its progress events were
    /// delivered first): the history and `replied_at` get it; the outcome stays.
    fn late_reply(&self, mut task: OtaTask, event: machine::TaskEvent, now: DateTime<Utc>) {
        if !machine::apply(&mut task, event, now).save {
            tracing::info!(task_id = %task.id, "repeated services_reply for a finished task ignored");
            return;
        }
        tracing::info!(task_id = %task.id, "services_reply recorded after the task ended");
        let open = lock(&self.inner.open).tasks.contains_key(&task.id);
        if open {
            self.save(&task);
        } else if let Err(e) = self.inner.catalog.put_task(&task.id, &task) {
            tracing::error!(task_id = %task.id, error = %e, "storing task failed");
        }
    }

    fn finish_devices(&self, task: &mut OtaTask, now: DateTime<Utc>) {
        if task.status != TaskStatus::Ok {
            for d in &mut task.devices {
                if d.outcome == Outcome::Pending {
                    // Not upgraded, unless the device later reports the target (late verify).
                    d.outcome = Outcome::Pending;
                }
            }
        }
        self.verify(task, now);
    }

    /// Whether `d`'s device has reported since the task began, runs the target, and (for a
    /// consistency upgrade) is consistent again: (reported since, on target, verified).
    fn check_device(
        &self,
        task_created: DateTime<Utc>,
        d: &TaskDevice,
    ) -> Option<(bool, bool, bool)> {
        let dev = self.inner.devices.get(&d.sn).ok()?;
        let reported_after = dev.last_state_at.is_some_and(|t| t >= task_created);
        let on_target = dev.firmware_version.as_deref().is_some_and(|v| {
            v == d.product_version
                || matches!((ProductVersion::parse(v), ProductVersion::parse(&d.product_version)), (Ok(a), Ok(b)) if a == b)
        });
        let consistent = d.upgrade_type != Some(2) || dev.compatible_status == Some(0);
        Some((
            reported_after,
            on_target,
            reported_after && on_target && consistent,
        ))
    }

    /// Settles device outcomes from the registry's latest reports.
    fn verify(&self, task: &mut OtaTask, now: DateTime<Utc>) -> bool {
        let mut changed = false;
        let finished = task.finished_at.unwrap_or(now);
        let window = chrono::Duration::from_std(self.inner.settings.verify_window)
            .unwrap_or(chrono::Duration::seconds(900));
        for d in task
            .devices
            .iter_mut()
            .filter(|d| d.outcome == Outcome::Pending)
        {
            let Some((reported_after, on_target, verified)) = self.check_device(task.created_at, d)
            else {
                continue;
            };
            if verified {
                d.outcome = Outcome::Verified;
                d.outcome_at = Some(now);
                changed = true;
            } else if task.status.is_final() && now - finished > window {
                d.outcome = if task.status == TaskStatus::Ok && reported_after && !on_target {
                    Outcome::Mismatch
                } else {
                    Outcome::Unverified
                };
                d.outcome_at = Some(now);
                changed = true;
            }
        }
        changed
    }

    /// One pass of the timers: reply and progress timeouts, device verification.
    pub fn tick(&self) {
        let now = Utc::now();
        let tasks: Vec<OtaTask> = lock(&self.inner.open).tasks.values().cloned().collect();
        let s = &self.inner.settings;
        for mut t in tasks {
            let event = if self.devices_on_target(&t, now) {
                tracing::info!(task_id = %t.id, gateway_sn = %t.gateway_sn, "OTA task closed from device reports (its final ota_progress never arrived)");
                Some(machine::TaskEvent::DevicesOnTarget)
            } else {
                machine::due(&t, now, s.reply_timeout, s.progress_timeout)
            };
            let mut changed = false;
            if let Some(event) = event {
                if !matches!(event, machine::TaskEvent::DevicesOnTarget) {
                    tracing::warn!(task_id = %t.id, gateway_sn = %t.gateway_sn, "OTA task timed out");
                }
                let fx = machine::apply(&mut t, event, now);
                if let Some(status) = fx.finished {
                    self.inner.counters.finish(status);
                    self.finish_devices(&mut t, now);
                }
                changed |= fx.save;
            }
            if t.status.is_final() {
                changed |= self.verify(&mut t, now);
            }
            if changed {
                if t.devices.iter().any(|d| d.outcome != Outcome::Pending) {
                    t.updated_at = now;
                }
                self.save(&t);
            }
        }
    }

    /// Whether an open task's final `ota_progress` was lost (published while the broker was
    /// restarting, or while fwrepo was): it has been quiet for a while and every device still
    /// pending reports, since the task began, the task's target (and consistency, for a
    /// consistency upgrade) while not upgrading.
    fn devices_on_target(&self, task: &OtaTask, now: DateTime<Utc>) -> bool {
        // The normal path (the gateway's final ota_progress) goes first.
        let quiet = now - task.last_event_at.unwrap_or(task.created_at);
        if task.status.is_final() || quiet < RECONCILE_AFTER {
            return false;
        }
        let mut pending = task
            .devices
            .iter()
            .filter(|d| d.outcome == Outcome::Pending)
            .peekable();
        pending.peek().is_some()
            && pending.all(|d| {
                let upgrading = self.inner.devices.get(&d.sn).ok().is_none_or(|x| {
                    let busy_mode = if d.sn == task.gateway_sn { 3 } else { 13 };
                    x.firmware_upgrade_status == Some(1) || x.mode_code == Some(busy_mode)
                });
                !upgrading
                    && self
                        .check_device(task.created_at, d)
                        .is_some_and(|(_, _, verified)| verified)
            })
    }

    /// Devices left `unverified` that report the target within a day still become verified
    /// (late) and count as upgraded.
    fn verify_late(&self, now: DateTime<Utc>) {
        let late: Vec<(String, DateTime<Utc>)> = lock(&self.inner.open)
            .late
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (id, since) in late {
            let task = match self.inner.catalog.task::<OtaTask>(&id) {
                Ok(Some(t)) if now - since <= LATE_VERIFY => t,
                _ => {
                    lock(&self.inner.open).late.remove(&id);
                    continue;
                }
            };
            let mut task = task;
            let mut changed = false;
            let created = task.created_at;
            for d in task
                .devices
                .iter_mut()
                .filter(|d| d.outcome == Outcome::Unverified)
            {
                if self
                    .check_device(created, d)
                    .is_some_and(|(_, _, verified)| verified)
                {
                    d.outcome = Outcome::Verified;
                    d.outcome_at = Some(now);
                    changed = true;
                }
            }
            if changed {
                task.note("verify_late", None, now);
                tracing::info!(task_id = %task.id, "device verified late");
                self.save(&task);
            }
        }
    }

    /// Runs the timers and consumes gateway messages until `cancel`.
    pub async fn run(self, mut inbox: mpsc::Receiver<OtaMessage>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = prune.tick() => {
                    let cutoff = Utc::now()
                        - chrono::Duration::from_std(self.inner.settings.retention).unwrap_or_default();
                    let catalog = self.inner.catalog.clone();
                    match tokio::task::spawn_blocking(move || catalog.prune_tasks(cutoff)).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "pruned OTA tasks past retention"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "pruning OTA tasks failed"),
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    self.tick();
                    self.verify_late(Utc::now());
                }
                Some(msg) = inbox.recv() => self.on_message(msg),
            }
        }
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
mod tests {
    use super::*;

    /// A broker and gateway in one: `publish` delivers the gateway's `services_reply` to the
    /// service before it returns — the fastest answer a gateway can give.
    struct InstantReply {
        service: std::sync::OnceLock<OtaService>,
        /// Deliver the gateway's whole upgrade (progress to `ok`) before its reply, as rumqttd
        /// may (it serves topic filters in turn).
        progress_first: bool,
    }

    impl Publisher for InstantReply {
        fn connected(&self) -> bool {
            true
        }

        fn render(&self, cmd: &OtaCreate) -> (String, Value) {
            let topic = format!("gw/{}", cmd.gateway_sn);
            (topic, json!({"tid": cmd.tid, "bid": cmd.bid}))
        }

        fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
            let msg: Value = serde_json::from_slice(&payload).unwrap();
            let sn = topic.split('/').nth(1).unwrap().to_string();
            let reply = json!({"tid": msg["tid"], "bid": msg["bid"], "method": "ota_create",
                "data": {"result": 0}});
            let raw = serde_json::value::RawValue::from_string(reply.to_string()).unwrap();
            let service = self.service.get().unwrap();
            if self.progress_first {
                let event = json!({"bid": msg["bid"], "method": "ota_progress", "data": {"result": 0,
                    "output": {"status": "ok", "progress": {"percent": 100, "step_key": "upgrade_firmware"}}}});
                service.on_message(OtaMessage {
                    is_reply: false,
                    topic_sn: sn.clone(),
                    tid: None,
                    bid: msg["bid"].as_str().map(str::to_string),
                    method: Some("ota_progress".into()),
                    report: machine::Report {
                        status: Some(TaskStatus::Ok),
                        percent: Some(100),
                        step_key: Some("upgrade_firmware".into()),
                        ..machine::Report::default()
                    },
                    raw: serde_json::value::RawValue::from_string(event.to_string()).unwrap(),
                });
            }
            service.on_message(OtaMessage {
                is_reply: true,
                topic_sn: sn,
                tid: msg["tid"].as_str().map(str::to_string),
                bid: msg["bid"].as_str().map(str::to_string),
                method: Some("ota_create".into()),
                report: machine::Report::default(),
                raw,
            });
            true
        }
    }

    #[tokio::test]
    async fn a_reply_that_arrives_before_create_returns_is_not_an_orphan() {
        let (service, task, _dir) = run_one(false).await;
        let stored = service.get(&task.id, |_, _| None).unwrap();
        let sources: Vec<&str> = stored.history.iter().map(|h| h.source.as_str()).collect();
        assert_eq!(sources, ["api", "publish", "services_reply"], "{sources:?}");
        assert!(stored.replied_at.is_some());
    }

    #[tokio::test]
    async fn a_reply_after_the_last_progress_event_is_still_recorded() {
        let (service, task, _dir) = run_one(true).await;
        let stored = service.get(&task.id, |_, _| None).unwrap();
        assert_eq!(stored.status, TaskStatus::Ok);
        let sources: Vec<&str> = stored.history.iter().map(|h| h.source.as_str()).collect();
        assert_eq!(
            sources,
            ["api", "publish", "ota_progress", "services_reply"],
            "{sources:?}"
        );
        assert!(stored.replied_at.is_some());
    }

    /// One task for one device, answered by an [`InstantReply`] gateway.
    async fn run_one(progress_first: bool) -> (OtaService, Box<OtaTask>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("c"), 8).unwrap();
        let fw = crate::catalog::FirmwareRecord::new_for_test("Dock", "2.0", &"a".repeat(64));
        assert!(catalog.import_firmware(&fw).unwrap());
        let devices =
            DeviceRegistry::load(catalog.clone(), Default::default(), Duration::from_secs(60))
                .unwrap();
        let publisher = Arc::new(InstantReply {
            service: std::sync::OnceLock::new(),
            progress_first,
        });
        let settings = OtaSettings {
            reply_timeout: Duration::from_secs(30),
            progress_timeout: Duration::from_secs(60),
            verify_window: Duration::from_secs(60),
            preflight: "off".into(),
            preflight_skip: vec![],
            online_window: Duration::from_secs(60),
            retention: Duration::from_secs(86_400),
        };
        let signer =
            crate::download::signing::UrlSigner::new(vec![vec![7; 32]], Duration::from_secs(3600));
        let service = OtaService::load(
            catalog,
            devices,
            publisher.clone(),
            "http://127.0.0.1:1".into(),
            settings,
            signer,
        )
        .unwrap();
        assert!(publisher.service.set(service.clone()).is_ok());
        let req: OtaRequest = serde_json::from_value(json!({"gateway_sn": "RACE1",
            "devices": [{"sn": "RACE1", "firmware_id": fw.id.as_str()}]}))
        .unwrap();
        let Created::Task(task) = service.create(req, None).await.unwrap() else {
            panic!("not a task");
        };
        (service, task, dir)
    }
}
