//! Staged rollouts (contract §6): a release (one package per device model) moves across a fleet
//! of gateways stage by stage, through ordinary OTA tasks ([`crate::ota`]): every dispatch
//! goes through the same policy and preflight as `POST /api/v1/ota` and shows in its list.
//!
//! One scheduler task drives every active rollout: it follows the tasks it created, retries
//! failures with exponential backoff, waits for offline or busy gateways, respects the
//! in-flight cap and the dispatch rate (with jitter), judges the thresholds and moves stages.
//! Rollouts and their members (one row per gateway) live in sled; a member's attempt and
//! Idempotency-Key are stored before its `ota_create` is published (the OTA layer flushes the
//! catalog first), so a restart re-sends the same attempt and never dispatches a second one.

mod actions;
mod driving;
pub mod machine;
pub mod model;
mod scheduler;
mod storage;
pub mod store;
mod view;

pub use storage::RolloutStores;
use storage::Write;
use view::view_of;
pub use view::{DeviceRow, RolloutView, StageView};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use sha2::Digest;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::devices::{DeviceRecord, DeviceRegistry};
use crate::lock;
use crate::ota::{
    Created, OtaError, OtaRequest, OtaService, OtaTask, Outcome, RequestDevice, TaskStatus,
};
use crate::store::{
    CatalogError, FirmwareRecord, FirmwareStatus, FirmwareStore, IdempotencyStore,
    IdempotentAnswer, Page, PageRequest,
};
use machine::{Action, Input, Verdict};
use model::{Counts, Judgement};
pub use model::{
    DRIVEN_BY, DeviceState, Member, MemberDevice, Package, Rollout, RolloutRequest, RolloutStatus,
    TimelinePoint,
};
use store::RolloutStore;

/// Errors of the rollout layer.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// Unknown rollout.
    #[error("rollout {0} not found")]
    NotFound(String),
    /// Well-formed but invalid.
    #[error("{0}")]
    Validation(String),
    /// Malformed (e.g. a bad cursor or state filter).
    #[error("{0}")]
    Invalid(String),
    /// Action not allowed in the current state.
    #[error(transparent)]
    InvalidTransition(#[from] machine::Refused),
    /// Another running rollout holds a device.
    #[error("{0}")]
    Conflict(String),
    /// Same Idempotency-Key, other body.
    #[error("Idempotency-Key reused with a different body")]
    IdempotencyReused,
    /// A package could not be resolved.
    #[error(transparent)]
    Ota(#[from] OtaError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The lease whose holder drives the rollouts of a deployment of several replicas.
pub const SCHEDULING_LEASE: &str = "rollouts";

/// A dispatch to make: member index, request, Idempotency-Key.
type Dispatch = (usize, OtaRequest, String);

/// How recently a dock must have reported for a timed-out task to be judged (issue: 60 s).
const FRESH: chrono::Duration = chrono::Duration::seconds(60);
/// How often gateways that joined the target are looked for (`include_new_devices`).
const REFRESH_TARGET: chrono::Duration = chrono::Duration::seconds(15);
/// `ota_create`s of one round in progress at once on sled (their flushes are shared).
const DISPATCH_CONCURRENCY: usize = 64;
/// … and on PostgreSQL, where each holds one of the API pool's connections at a time: a
/// takeover's burst of hundreds of dispatches must leave connections to downloads and the
/// API (`--catalog-max-connections`, 16 by default).
const DISPATCH_CONCURRENCY_SHARED: usize = 6;
/// How soon a gateway that failed preflight (busy, not attached, …) is looked at again.
const RECHECK: chrono::Duration = chrono::Duration::seconds(5);
/// Timeline resolution.
const SAMPLE_EVERY: chrono::Duration = chrono::Duration::seconds(2);

/// A rollout the scheduler drives, with its members in stage order.
struct Active {
    rollout: Rollout,
    members: Vec<Member>,
    /// Earliest next dispatch (rate limit).
    next_slot: DateTime<Utc>,
    last_refresh: DateTime<Utc>,
    last_sample: DateTime<Utc>,
}

impl Active {
    fn counts(&self) -> Counts {
        model::count(self.members.iter())
    }

    fn holds(&self) -> impl Iterator<Item = &str> {
        self.members
            .iter()
            .filter(|m| !m.state.is_final())
            .flat_map(|m| {
                std::iter::once(m.gateway_sn.as_str())
                    .chain(m.devices.iter().map(|d| d.sn.as_str()))
            })
    }
}

struct Inner {
    stores: RolloutStores,
    /// Writes made under the `active` lock, stored in order by [`RolloutService::store_writes`].
    writes: Mutex<Vec<Write>>,
    /// One drainer at a time, so writes of one rollout reach the store in order.
    storing: tokio::sync::Mutex<()>,
    devices: DeviceRegistry,
    ota: OtaService,
    active: Mutex<HashMap<String, Active>>,
    changes: broadcast::Sender<RolloutView>,
    wake: Notify,
    /// When this process started driving rollouts: a gateway is only dispatched once it has
    /// been heard from since (after a restart with the embedded broker, docks reconnect and
    /// resubscribe first; an `ota_create` sent before that is lost).
    since: DateTime<Utc>,
    /// The last revision of each rollout this replica stored or read.
    revisions: Mutex<HashMap<String, u64>>,
    /// Firmware of the active rollouts, as the catalog listed them (a replica that does not
    /// drive rollouts guards against deleting it by this).
    packages_in_use: Mutex<HashSet<String>>,
    /// The deployment's lease on rollout scheduling: rollouts are driven by the replica
    /// holding it; without one (a single process), here.
    lease: std::sync::OnceLock<crate::cluster::Lease>,
    /// One operator action at a time on a replica that does not drive rollouts (each loads
    /// the active rollouts for its checks).
    acting: tokio::sync::Mutex<()>,
    /// When gateways waiting to be dispatched were last looked up in the catalog.
    rechecked: Mutex<Option<DateTime<Utc>>>,
}

/// The rollout service. Cheap to clone.
#[derive(Clone)]
pub struct RolloutService {
    inner: Arc<Inner>,
}

impl RolloutService {
    /// Loads every rollout; active ones (and canceled ones with tasks in flight) are driven
    /// again by [`RolloutService::run`].
    pub async fn load(
        stores: RolloutStores,
        devices: DeviceRegistry,
        ota: OtaService,
    ) -> Result<RolloutService, CatalogError> {
        let now = Utc::now();
        let active = Self::load_active(&stores).await?;
        let (changes, _) = broadcast::channel(256);
        Ok(RolloutService {
            inner: Arc::new(Inner {
                stores,
                writes: Mutex::default(),
                storing: tokio::sync::Mutex::new(()),
                devices,
                ota,
                active: Mutex::new(active),
                changes,
                wake: Notify::new(),
                since: now,
                revisions: Mutex::default(),
                packages_in_use: Mutex::default(),
                lease: std::sync::OnceLock::new(),
                acting: tokio::sync::Mutex::new(()),
                rechecked: Mutex::default(),
            }),
        })
    }

    /// Drives rollouts only while this replica holds `lease` (several replicas share the
    /// catalog: one of them schedules).
    pub fn schedule_under(&self, lease: crate::cluster::Lease) {
        let _ = self.inner.lease.set(lease);
    }

    /// Whether this replica drives rollouts now.
    fn drives(&self) -> bool {
        self.inner.lease.get().is_none_or(|l| l.held())
    }

    /// Prometheus text: rollouts the scheduler drives, by status, and their devices by state.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let active = lock(&self.inner.active);
        let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
        let mut devices = Counts::new();
        for a in active.values() {
            *by_status.entry(a.rollout.status().as_str()).or_default() += 1;
            for (k, v) in a.counts() {
                *devices.entry(k).or_default() += v;
            }
        }
        let mut out = String::from(
            "# HELP fwrepo_rollouts_active Rollouts the scheduler drives, by status.\n# TYPE fwrepo_rollouts_active gauge\n",
        );
        for s in ["running", "waiting_approval", "paused", "canceled"] {
            let _ = writeln!(
                out,
                "fwrepo_rollouts_active{{status=\"{s}\"}} {}",
                by_status.get(s).copied().unwrap_or(0)
            );
        }
        out.push_str("# HELP fwrepo_rollout_devices Devices of the active rollouts, by state.\n# TYPE fwrepo_rollout_devices gauge\n");
        for state in model::ALL_STATES {
            let _ = writeln!(
                out,
                "fwrepo_rollout_devices{{state=\"{}\"}} {}",
                state.as_str(),
                devices.get(&state).copied().unwrap_or(0)
            );
        }
        out
    }

    /// Change notifications (rollout views) for SSE.
    pub fn subscribe(&self) -> broadcast::Receiver<RolloutView> {
        self.inner.changes.subscribe()
    }

    async fn resolve_packages(&self, req: &RolloutRequest) -> Result<Vec<Package>, RolloutError> {
        let mut packages: Vec<Package> = Vec::new();
        for f in &req.firmware {
            let request = RequestDevice {
                sn: String::new(),
                firmware_id: f.firmware_id.clone(),
                model: f.model.clone(),
                product_version: f.product_version.clone(),
            };
            let fw: FirmwareRecord = self.inner.ota.resolve_firmware(&request).await?;
            if packages
                .iter()
                .any(|p| p.model.eq_ignore_ascii_case(&fw.model))
            {
                return Err(RolloutError::Validation(format!(
                    "two packages for model {}: one per device model",
                    fw.model
                )));
            }
            packages.push(Package {
                model: fw.model.clone(),
                firmware_id: fw.id.to_string(),
                product_version: fw.product_version.clone(),
            });
        }
        Ok(packages)
    }

    /// `POST /api/v1/rollouts`: validates, resolves the packages and stores a draft.
    /// Returns the new rollout's view (a replayed Idempotency-Key returns the original).
    pub async fn create(
        &self,
        req: RolloutRequest,
        idempotency_key: Option<String>,
    ) -> Result<Value, RolloutError> {
        let body_hash = hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(&req).unwrap_or_default(),
        ));
        let key = idempotency_key.map(|k| format!("rollout:{k}"));
        if let Some(k) = &key {
            let first = self
                .inner
                .stores
                .idempotency
                .idempotent(k, Utc::now())
                .await?;
            if let Some(first) = first {
                if first.body_hash != body_hash {
                    return Err(RolloutError::IdempotencyReused);
                }
                return Ok(first.answer);
            }
        }
        req.validate().map_err(RolloutError::Validation)?;
        let packages = self.resolve_packages(&req).await?;
        let now = Utc::now();
        let mut rollout = Rollout {
            id: crate::domain::ids::next(),
            name: req.name.trim().to_string(),
            phase: model::Phase::Draft,
            definition: req,
            packages,
            current_stage: 0,
            stage_sizes: Vec::new(),
            acknowledged_failed: 0,
            created_at: now,
            updated_at: now,
            started_at: None,
            timeline: Vec::new(),
            events: Vec::new(),
            revision: 0,
        };
        rollout.event("created", None, now);
        self.inner
            .stores
            .rollouts
            .save_rollout(&rollout.id, Some(&rollout), &[])
            .await?;
        let answer = serde_json::to_value(view_of(&rollout, &[], now)).unwrap_or_default();
        if let Some(k) = &key {
            let first = IdempotentAnswer {
                body_hash,
                answer: answer.clone(),
                at: now,
            };
            self.inner
                .stores
                .idempotency
                .record_idempotent(k, &first)
                .await?;
        }
        tracing::info!(rollout_id = %rollout.id, name = %rollout.name, "rollout created");
        Ok(answer)
    }

    async fn stored(&self, id: &str) -> Result<Rollout, RolloutError> {
        self.inner
            .stores
            .rollouts
            .rollout(id)
            .await?
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    /// One rollout with its counts.
    pub async fn get(&self, id: &str) -> Result<RolloutView, RolloutError> {
        if let Some(a) = lock(&self.inner.active).get(id) {
            return Ok(view_of(&a.rollout, &a.members, Utc::now()));
        }
        let r = self.stored(id).await?;
        let members: Vec<Member> = self.inner.stores.rollouts.members(id).await?;
        Ok(view_of(&r, &members, Utc::now()))
    }

    /// Its timeline (device counts over time).
    pub async fn timeline(&self, id: &str) -> Result<Vec<TimelinePoint>, RolloutError> {
        if let Some(a) = lock(&self.inner.active).get(id) {
            return Ok(a.rollout.timeline.clone());
        }
        Ok(self.stored(id).await?.timeline)
    }

    /// Newest-first page of rollouts.
    pub async fn list(
        &self,
        status: Option<RolloutStatus>,
        page: &PageRequest,
    ) -> Result<Page<RolloutView>, RolloutError> {
        let p = self
            .inner
            .stores
            .rollouts
            .list_rollouts(status, page)
            .await?;
        let mut items = Vec::with_capacity(p.items.len());
        for r in &p.items {
            items.push(self.get(&r.id).await?);
        }
        Ok(Page {
            items,
            next_cursor: p.next_cursor,
        })
    }

    /// A page of the rollout's devices, in stage order, optionally of one state.
    pub async fn devices(
        &self,
        id: &str,
        state: Option<DeviceState>,
        page: &PageRequest,
    ) -> Result<Page<DeviceRow>, RolloutError> {
        let held = lock(&self.inner.active).get(id).map(|a| a.members.clone());
        let members = match held {
            Some(members) => members,
            None => {
                self.stored(id).await?;
                self.inner.stores.rollouts.members(id).await?
            }
        };
        let offset = match page.cursor.as_deref() {
            None | Some("") => 0,
            Some(c) => URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok()?.parse::<usize>().ok())
                .ok_or_else(|| RolloutError::Invalid("invalid cursor".into()))?,
        };
        let mut members = members;
        members.sort_by(|a, b| (a.stage, &a.order).cmp(&(b.stage, &b.order)));
        let rows: Vec<DeviceRow> = members
            .iter()
            .flat_map(|m| {
                m.devices.iter().map(|d| DeviceRow {
                    sn: d.sn.clone(),
                    gateway_sn: m.gateway_sn.clone(),
                    model: d.model.clone(),
                    product_version: d.product_version.clone(),
                    stage: m.stage,
                    state: d.state,
                    attempts: m.attempts,
                    task_id: m.task_id.clone(),
                    last_error: m.last_error.clone(),
                })
            })
            .filter(|r| state.is_none_or(|s| r.state == s))
            .collect();
        let limit = page.limit();
        let items: Vec<DeviceRow> = rows.iter().skip(offset).take(limit).cloned().collect();
        let next = offset + items.len();
        Ok(Page {
            next_cursor: (next < rows.len()).then(|| URL_SAFE_NO_PAD.encode(next.to_string())),
            items,
        })
    }

    /// The gateways the target names now (not in `existing`), each with the devices that have
    /// a package.
    fn resolve_members(&self, r: &Rollout, existing: &HashSet<String>) -> Vec<Member> {
        let all = self.inner.devices.all();
        let by_sn: HashMap<&str, &DeviceRecord> = all.iter().map(|d| (d.sn.as_str(), d)).collect();
        let def = &r.definition;
        let now = Utc::now();
        let gateways: Vec<String> = match (&def.target.gateway_sns, &def.target.model) {
            (Some(sns), _) => {
                let mut seen = HashSet::new();
                sns.iter().filter(|s| seen.insert(*s)).cloned().collect()
            }
            (None, Some(model)) => {
                let within =
                    i64::try_from(def.target.seen_within_s.unwrap_or(604_800)).unwrap_or(i64::MAX);
                all.iter()
                    .filter(|d| d.gateway_sn.is_none())
                    .filter(|d| {
                        d.model
                            .as_deref()
                            .is_some_and(|m| m.eq_ignore_ascii_case(model))
                    })
                    .filter(|d| {
                        d.last_seen_at
                            .is_some_and(|t| (now - t).num_seconds() <= within)
                    })
                    .map(|d| d.sn.clone())
                    .collect()
            }
            (None, None) => Vec::new(),
        };
        gateways
            .into_iter()
            .filter(|g| !existing.contains(g))
            .filter_map(|gw| {
                let dock = by_sn.get(gw.as_str()).copied();
                let child = dock
                    .and_then(|d| d.child_sn.as_deref())
                    .and_then(|c| by_sn.get(c).copied());
                member_for(r, gw, dock, child)
            })
            .collect()
    }

    /// Names a device another active rollout holds, if any.
    fn conflict(
        &self,
        active: &HashMap<String, Active>,
        id: &str,
        sns: &HashSet<&str>,
    ) -> Option<String> {
        active
            .values()
            .filter(|a| a.rollout.id != id && a.rollout.status().is_active())
            .find_map(|a| {
                a.holds()
                    .find(|sn| sns.contains(sn))
                    .map(|sn| format!("device {sn} is held by running rollout {}", a.rollout.id))
            })
    }

    fn publish(&self, a: &Active) {
        let _ = self
            .inner
            .changes
            .send(view_of(&a.rollout, &a.members, Utc::now()));
    }
}

impl crate::firmware::UsageGuard for RolloutService {
    /// Disabling is allowed: the rollouts that use the firmware pause (contract §3).
    fn blocks_disable(&self, _fw: &FirmwareRecord) -> Option<String> {
        None
    }

    fn in_use(&self, fw: &FirmwareRecord) -> Option<String> {
        let active = lock(&self.inner.active);
        let driven = active
            .values()
            .filter(|a| a.rollout.status().is_active())
            .find(|a| {
                a.rollout
                    .packages
                    .iter()
                    .any(|p| p.firmware_id == fw.id.as_str())
            })
            .map(|a| format!("rollout {} uses it", a.rollout.id));
        driven.or_else(|| {
            lock(&self.inner.packages_in_use)
                .contains(fw.id.as_str())
                .then(|| "an active rollout uses it".to_string())
        })
    }
}

/// The member for gateway `gw` given what the registry knows of its dock and aircraft: the
/// devices whose model has a package. `None` if none has, or `require_pair` is not met.
fn member_for(
    r: &Rollout,
    gw: String,
    dock: Option<&DeviceRecord>,
    child: Option<&DeviceRecord>,
) -> Option<Member> {
    let package = |model: Option<&str>| {
        model.and_then(|m| r.packages.iter().find(|p| p.model.eq_ignore_ascii_case(m)))
    };
    let entry = |sn: &str, p: Option<&Package>| MemberDevice {
        sn: sn.to_string(),
        model: p.map(|p| p.model.clone()).unwrap_or_default(),
        firmware_id: p.map(|p| p.firmware_id.clone()).unwrap_or_default(),
        product_version: p.map(|p| p.product_version.clone()).unwrap_or_default(),
        state: DeviceState::Pending,
    };
    let mut devices = Vec::new();
    let mut unpaired = false;
    match dock {
        // Never seen: one entry for the dock, resolved when it shows up.
        None => devices.push(entry(&gw, None)),
        Some(d) => {
            match package(d.model.as_deref()) {
                Some(p) => devices.push(entry(&gw, Some(p))),
                None => unpaired = true,
            }
            match child.and_then(|c| package(c.model.as_deref()).map(|p| (c, p))) {
                Some((c, p)) => devices.push(entry(&c.sn, Some(p))),
                None => unpaired = true,
            }
        }
    }
    if devices.is_empty() || (r.definition.require_pair && unpaired) {
        return None;
    }
    Some(Member {
        order: model::order_key(&r.id, &gw),
        gateway_sn: gw,
        stage: 0,
        devices,
        state: DeviceState::Pending,
        attempts: 0,
        task_id: None,
        dispatch_key: None,
        last_error: None,
        waiting_since: None,
        first_dispatch_at: None,
        dispatched_at: None,
        next_attempt_at: None,
        finished_at: None,
    })
}
