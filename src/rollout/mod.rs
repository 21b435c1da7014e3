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

pub mod machine;
pub mod model;

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

use crate::catalog::{Catalog, CatalogError, FirmwareRecord, Page, PageRequest};
use crate::devices::{DeviceRecord, DeviceRegistry};
use crate::ota::{
    Created, OtaError, OtaRequest, OtaService, OtaTask, Outcome, RequestDevice, TaskStatus,
};
use machine::{Action, Input, Verdict};
use model::{Counts, Judgement};
pub use model::{
    DeviceState, Member, MemberDevice, Package, Rollout, RolloutRequest, RolloutStatus,
    TimelinePoint,
};

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

/// A dispatch to make: member index, request, Idempotency-Key.
type Dispatch = (usize, OtaRequest, String);

/// How recently a dock must have reported for a timed-out task to be judged (issue: 60 s).
const FRESH: chrono::Duration = chrono::Duration::seconds(60);
/// How often gateways that joined the target are looked for (`include_new_devices`).
const REFRESH_TARGET: chrono::Duration = chrono::Duration::seconds(15);
/// `ota_create`s of one round in progress at once.
const DISPATCH_CONCURRENCY: usize = 64;
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
    catalog: Catalog,
    devices: DeviceRegistry,
    ota: OtaService,
    active: Mutex<HashMap<String, Active>>,
    changes: broadcast::Sender<RolloutView>,
    wake: Notify,
    /// When this process started driving rollouts: a gateway is only dispatched once it has
    /// been heard from since (after a restart with the embedded broker, docks reconnect and
    /// resubscribe first; an `ota_create` sent before that is lost).
    since: DateTime<Utc>,
}

/// The rollout service. Cheap to clone.
#[derive(Clone)]
pub struct RolloutService {
    inner: Arc<Inner>,
}

/// Device counts of one stage.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct StageView {
    /// 0-based.
    pub index: usize,
    /// Its percent.
    pub percent: f64,
    /// Gateways it holds (cumulative).
    pub gateways: usize,
    /// Device counts by state of the gateways it adds.
    #[schema(value_type = Object)]
    pub counts: BTreeMap<String, u64>,
}

/// A rollout as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RolloutView {
    /// The stored rollout (the timeline has its own endpoint).
    #[serde(flatten)]
    pub rollout: Rollout,
    /// Device counts by state, all stages.
    #[schema(value_type = Object)]
    pub counts: BTreeMap<String, u64>,
    /// Per stage.
    pub stages: Vec<StageView>,
    /// Gateways in the rollout.
    pub gateways: usize,
    /// Seconds to completion at the rate observed so far.
    pub eta_s: Option<u64>,
}

/// A device row of `GET /api/v1/rollouts/{id}/devices`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceRow {
    /// Serial.
    pub sn: String,
    /// Its gateway.
    pub gateway_sn: String,
    /// Firmware model.
    pub model: String,
    /// Target version.
    pub product_version: String,
    /// First stage that holds it (0-based).
    pub stage: usize,
    /// State.
    pub state: DeviceState,
    /// Dispatch attempts.
    pub attempts: u32,
    /// Latest OTA task.
    pub task_id: Option<String>,
    /// Why it failed last.
    pub last_error: Option<String>,
}

use crate::lock;

fn str_counts(c: &Counts) -> BTreeMap<String, u64> {
    c.iter()
        .map(|(k, v)| (k.as_str().to_string(), *v))
        .collect()
}

/// A copy of the rollout without its timeline (it has its own endpoint; up to 2,000 points).
fn without_timeline(r: &Rollout) -> Rollout {
    Rollout {
        id: r.id.clone(),
        name: r.name.clone(),
        status: r.status,
        definition: r.definition.clone(),
        packages: r.packages.clone(),
        current_stage: r.current_stage,
        stage_sizes: r.stage_sizes.clone(),
        pause_reason: r.pause_reason.clone(),
        acknowledged_failed: r.acknowledged_failed,
        created_at: r.created_at,
        updated_at: r.updated_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        timeline: Vec::new(),
        events: r.events.clone(),
    }
}

fn view_of(rollout: &Rollout, members: &[Member], now: DateTime<Utc>) -> RolloutView {
    let counts = model::count(members.iter());
    let stages = rollout
        .definition
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| StageView {
            index: i,
            percent: s.percent,
            gateways: rollout.stage_sizes.get(i).copied().unwrap_or(0),
            counts: str_counts(&model::count(members.iter().filter(|m| m.stage == i))),
        })
        .collect();
    let total: u64 = counts.values().sum();
    let done: u64 = counts
        .iter()
        .filter(|(k, _)| k.is_final())
        .map(|(_, v)| *v)
        .sum();
    let eta_s = match (rollout.status, rollout.started_at) {
        (RolloutStatus::Running, Some(start)) if done > 0 && done < total => {
            let elapsed = (now - start).num_milliseconds().max(1) as f64 / 1000.0;
            Some(((total - done) as f64 * elapsed / done as f64).ceil() as u64)
        }
        _ => None,
    };
    RolloutView {
        rollout: without_timeline(rollout),
        counts: str_counts(&counts),
        stages,
        gateways: members.len(),
        eta_s,
    }
}

/// A member's backoff before attempt `attempts + 1`: `base × 2^(attempts-1)`, ±10 % jitter
/// from the serial (so a fleet does not come back at once).
fn backoff(base_s: u64, attempts: u32, sn: &str) -> chrono::Duration {
    let factor = 1u64 << attempts.saturating_sub(1).min(16);
    let ms = base_s.saturating_mul(1000).saturating_mul(factor);
    let jitter = (sha2::Sha256::digest(sn.as_bytes())[0] as i64 - 128) * ms as i64 / 1280;
    chrono::Duration::milliseconds(ms as i64 + jitter)
}

/// The spacing between two dispatches at `rate` per minute, ±20 % jitter from `salt`.
fn spacing(rate: f64, salt: &str) -> chrono::Duration {
    let ms = 60_000.0 / rate;
    let j = (sha2::Sha256::digest(salt.as_bytes())[0] as f64 / 255.0 - 0.5) * 0.4;
    chrono::Duration::milliseconds((ms * (1.0 + j)).max(0.0) as i64)
}

impl RolloutService {
    /// Loads every rollout; active ones (and canceled ones with tasks in flight) are driven
    /// again by [`RolloutService::run`].
    pub fn load(
        catalog: Catalog,
        devices: DeviceRegistry,
        ota: OtaService,
    ) -> Result<RolloutService, CatalogError> {
        let now = Utc::now();
        let mut active = HashMap::new();
        for r in catalog.all_rollouts::<Rollout>()? {
            let members: Vec<Member> = catalog.members(&r.id)?;
            let busy = members
                .iter()
                .any(|m| matches!(m.state, DeviceState::InFlight));
            if r.status.is_active() || (r.status == RolloutStatus::Canceled && busy) {
                active.insert(
                    r.id.clone(),
                    Active {
                        rollout: r,
                        members,
                        next_slot: now,
                        last_refresh: now,
                        last_sample: now,
                    },
                );
            }
        }
        let (changes, _) = broadcast::channel(256);
        Ok(RolloutService {
            inner: Arc::new(Inner {
                catalog,
                devices,
                ota,
                active: Mutex::new(active),
                changes,
                wake: Notify::new(),
                since: now,
            }),
        })
    }

    /// Prometheus text: rollouts the scheduler drives, by status, and their devices by state.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let active = lock(&self.inner.active);
        let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
        let mut devices = Counts::new();
        for a in active.values() {
            *by_status.entry(a.rollout.status.as_str()).or_default() += 1;
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

    fn resolve_packages(&self, req: &RolloutRequest) -> Result<Vec<Package>, RolloutError> {
        let mut packages: Vec<Package> = Vec::new();
        for f in &req.firmware {
            let fw: FirmwareRecord = self.inner.ota.resolve_firmware(&RequestDevice {
                sn: String::new(),
                firmware_id: f.firmware_id.clone(),
                model: f.model.clone(),
                product_version: f.product_version.clone(),
            })?;
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
    /// Returns the HTTP status and body (a replayed Idempotency-Key returns the original).
    pub fn create(
        &self,
        req: RolloutRequest,
        idempotency_key: Option<String>,
    ) -> Result<(u16, Value), RolloutError> {
        let body_hash = hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(&req).unwrap_or_default(),
        ));
        let key = idempotency_key.map(|k| format!("rollout:{k}"));
        if let Some(k) = &key {
            if let Some((hash, status, answer)) = self.inner.catalog.idempotent(k)? {
                if hash != body_hash {
                    return Err(RolloutError::IdempotencyReused);
                }
                return Ok((status, answer));
            }
        }
        req.validate().map_err(RolloutError::Validation)?;
        let packages = self.resolve_packages(&req)?;
        let now = Utc::now();
        let mut rollout = Rollout {
            id: crate::domain::ids::next(),
            name: req.name.trim().to_string(),
            status: RolloutStatus::Draft,
            definition: req,
            packages,
            current_stage: 0,
            stage_sizes: Vec::new(),
            pause_reason: None,
            acknowledged_failed: 0,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            timeline: Vec::new(),
            events: Vec::new(),
        };
        rollout.event("created", None, now);
        self.inner.catalog.put_rollout(&rollout.id, &rollout)?;
        let answer = serde_json::to_value(view_of(&rollout, &[], now)).unwrap_or_default();
        if let Some(k) = &key {
            self.inner
                .catalog
                .put_idempotent(k, &body_hash, 201, &answer)?;
        }
        tracing::info!(rollout_id = %rollout.id, name = %rollout.name, "rollout created");
        Ok((201, answer))
    }

    fn stored(&self, id: &str) -> Result<Rollout, RolloutError> {
        self.inner
            .catalog
            .rollout::<Rollout>(id)?
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    /// One rollout with its counts.
    pub fn get(&self, id: &str) -> Result<RolloutView, RolloutError> {
        if let Some(a) = lock(&self.inner.active).get(id) {
            return Ok(view_of(&a.rollout, &a.members, Utc::now()));
        }
        let r = self.stored(id)?;
        let members: Vec<Member> = self.inner.catalog.members(id)?;
        Ok(view_of(&r, &members, Utc::now()))
    }

    /// Its timeline (device counts over time).
    pub fn timeline(&self, id: &str) -> Result<Vec<TimelinePoint>, RolloutError> {
        if let Some(a) = lock(&self.inner.active).get(id) {
            return Ok(a.rollout.timeline.clone());
        }
        Ok(self.stored(id)?.timeline)
    }

    /// Newest-first page of rollouts.
    pub fn list(
        &self,
        status: Option<RolloutStatus>,
        page: &PageRequest,
    ) -> Result<Page<RolloutView>, RolloutError> {
        let p = self
            .inner
            .catalog
            .list_rollouts(page, |r: &Rollout| status.is_none_or(|s| r.status == s))?;
        let items = p
            .items
            .iter()
            .map(|r| self.get(&r.id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page {
            items,
            next_cursor: p.next_cursor,
        })
    }

    /// A page of the rollout's devices, in stage order, optionally of one state.
    pub fn devices(
        &self,
        id: &str,
        state: Option<DeviceState>,
        page: &PageRequest,
    ) -> Result<Page<DeviceRow>, RolloutError> {
        let members = match lock(&self.inner.active).get(id) {
            Some(a) => a.members.clone(),
            None => {
                self.stored(id)?;
                self.inner.catalog.members(id)?
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
            .filter(|a| a.rollout.id != id && a.rollout.status.is_active())
            .find_map(|a| {
                a.holds()
                    .find(|sn| sns.contains(sn))
                    .map(|sn| format!("device {sn} is held by running rollout {}", a.rollout.id))
            })
    }

    /// Stores member rows, and the rollout record itself when `with_rollout` (its status,
    /// events or timeline changed: it is the larger write).
    fn persist(&self, rollout: &Rollout, members: &[&Member], with_rollout: bool) {
        let rows: Vec<(String, &Member)> = members.iter().map(|m| (m.order.clone(), *m)).collect();
        let stored = self
            .inner
            .catalog
            .put_members(&rollout.id, &rows)
            .and_then(|()| match with_rollout {
                true => self.inner.catalog.put_rollout(&rollout.id, rollout),
                false => Ok(()),
            });
        if let Err(e) = stored {
            tracing::error!(rollout_id = %rollout.id, error = %e, "storing rollout failed");
        }
    }

    fn publish(&self, a: &Active) {
        let _ = self
            .inner
            .changes
            .send(view_of(&a.rollout, &a.members, Utc::now()));
    }

    /// An operator's action; the state machine decides whether it applies.
    pub async fn action(&self, id: &str, action: Action) -> Result<RolloutView, RolloutError> {
        let now = Utc::now();
        let view = {
            let mut active = lock(&self.inner.active);
            if action == Action::Start {
                let mut r = match active.get(id) {
                    Some(a) => a.rollout.clone(),
                    None => self.stored(id)?,
                };
                let step = machine::next(
                    r.status,
                    r.current_stage,
                    r.definition.stages.len(),
                    r.definition.auto_advance,
                    Input::Act(action),
                )?;
                let mut members = self.resolve_members(&r, &HashSet::new());
                if members.is_empty() {
                    return Err(RolloutError::Validation(
                        "the target holds no gateway with a device that has a package".into(),
                    ));
                }
                let sns: HashSet<&str> = members
                    .iter()
                    .flat_map(|m| {
                        std::iter::once(m.gateway_sn.as_str())
                            .chain(m.devices.iter().map(|d| d.sn.as_str()))
                    })
                    .collect();
                if let Some(c) = self.conflict(&active, id, &sns) {
                    return Err(RolloutError::Conflict(c));
                }
                members.sort_by(|a, b| a.order.cmp(&b.order));
                let sizes = model::stage_sizes(&r.definition.stages, members.len());
                for (i, m) in members.iter_mut().enumerate() {
                    m.stage = sizes.iter().position(|&s| i < s).unwrap_or(sizes.len() - 1);
                }
                r.stage_sizes = sizes;
                if let Some(step) = &step {
                    machine::apply(&mut r, step, now);
                }
                let mut a = Active {
                    rollout: r,
                    members,
                    next_slot: now,
                    last_refresh: now,
                    last_sample: now,
                };
                a.rollout.sample(&a.counts(), now);
                self.persist(&a.rollout, &a.members.iter().collect::<Vec<_>>(), true);
                let view = view_of(&a.rollout, &a.members, now);
                active.insert(id.to_string(), a);
                view
            } else {
                if action == Action::Resume {
                    // Another rollout may have taken some of its devices meanwhile.
                    let held: Vec<String> = active
                        .get(id)
                        .map(|a| a.holds().map(str::to_string).collect())
                        .unwrap_or_default();
                    let set: HashSet<&str> = held.iter().map(String::as_str).collect();
                    if let Some(c) = self.conflict(&active, id, &set) {
                        return Err(RolloutError::Conflict(c));
                    }
                }
                let Some(a) = active.get_mut(id) else {
                    let r = self.stored(id)?;
                    return Err(machine::Refused {
                        action,
                        status: r.status,
                    }
                    .into());
                };
                let r = &a.rollout;
                let step = machine::next(
                    r.status,
                    r.current_stage,
                    r.definition.stages.len(),
                    r.definition.auto_advance,
                    Input::Act(action),
                )?
                .ok_or(machine::Refused {
                    action,
                    status: r.status,
                })?;
                if step.acknowledge_failures {
                    a.rollout.acknowledged_failed = model::count(a.members.iter())
                        .get(&DeviceState::Failed)
                        .copied()
                        .unwrap_or(0);
                }
                if step.cancel_members {
                    for m in a
                        .members
                        .iter_mut()
                        .filter(|m| !m.state.is_final() && m.state != DeviceState::InFlight)
                    {
                        m.set_state(DeviceState::Canceled, now);
                    }
                }
                machine::apply(&mut a.rollout, &step, now);
                a.rollout.sample(&model::count(a.members.iter()), now);
                self.persist(&a.rollout, &a.members.iter().collect::<Vec<_>>(), true);
                view_of(&a.rollout, &a.members, now)
            }
        };
        tracing::info!(rollout_id = %id, action = action.as_str(), status = ?view.rollout.status, "rollout action");
        let _ = self.inner.changes.send(view.clone());
        self.inner.wake.notify_one();
        Ok(view)
    }

    /// Follows the tasks of one rollout and decides what to dispatch (no I/O but sled).
    /// Returns the dispatches to make.
    fn step(&self, a: &mut Active, now: DateTime<Utc>) -> Vec<Dispatch> {
        let def = a.rollout.definition.clone();
        let mut changed: Vec<usize> = Vec::new();
        let canceled = a.rollout.status == RolloutStatus::Canceled;
        for (i, m) in a.members.iter_mut().enumerate() {
            let mut moved = self.follow(m, &def, now);
            // A canceled rollout only sees its in-flight tasks to their end: no retries.
            if canceled && !m.state.is_final() && m.state != DeviceState::InFlight {
                m.set_state(DeviceState::Canceled, now);
                moved = true;
            }
            if moved {
                changed.push(i);
            }
        }
        // Look for gateways that joined the target now and then, and always before the last
        // stage is judged complete.
        let finishing = a.rollout.current_stage + 1 >= def.stages.len()
            && a.members.iter().all(|m| m.state.is_final());
        if a.rollout.status == RolloutStatus::Running
            && def.include_new_devices
            && def.target.model.is_some()
            && (finishing || now - a.last_refresh >= REFRESH_TARGET)
        {
            a.last_refresh = now;
            let existing: HashSet<String> =
                a.members.iter().map(|m| m.gateway_sn.clone()).collect();
            let last = def.stages.len() - 1;
            for mut m in self.resolve_members(&a.rollout, &existing) {
                m.stage = last;
                tracing::info!(rollout_id = %a.rollout.id, gateway_sn = %m.gateway_sn, "gateway joined the rollout's target");
                a.members.push(m);
                changed.push(a.members.len() - 1);
            }
        }
        let mut status_changed = self.check_packages(a, now) || self.judge(a, now);
        let mut dispatches = Vec::new();
        if a.rollout.status == RolloutStatus::Running {
            let mut in_flight = a
                .members
                .iter()
                .filter(|m| m.state == DeviceState::InFlight)
                .count() as u32;
            // Members cut short by a restart between storing the attempt and the answer.
            for (i, m) in a.members.iter().enumerate() {
                if m.state == DeviceState::InFlight && m.task_id.is_none() {
                    if let Some(key) = &m.dispatch_key {
                        dispatches.push((i, self.request(m, &def), key.clone()));
                    }
                }
            }
            let stage = a.rollout.current_stage;
            for i in 0..a.members.len() {
                if in_flight >= def.max_in_flight {
                    break;
                }
                let m = &a.members[i];
                let due = match m.state {
                    DeviceState::Pending => m.stage <= stage,
                    DeviceState::WaitingEligible => m.next_attempt_at.is_none_or(|t| t <= now),
                    DeviceState::Retrying => m.next_attempt_at.is_none_or(|t| t <= now),
                    _ => false,
                };
                if !due {
                    continue;
                }
                if def.rate_per_minute.is_some() && a.next_slot > now {
                    break;
                }
                // Only known gateways online since this process started are dispatched; the
                // others wait (preflight).
                let online = self.inner.devices.get(&m.gateway_sn).is_ok_and(|g| {
                    g.online && g.last_seen_at.is_some_and(|t| t >= self.inner.since)
                });
                let m = &mut a.members[i];
                if !online {
                    if m.state != DeviceState::WaitingEligible {
                        m.set_state(DeviceState::WaitingEligible, now);
                        m.waiting_since.get_or_insert(now);
                        changed.push(i);
                    }
                    continue;
                }
                self.refresh_devices(m, &a.rollout);
                m.attempts += 1;
                let key = format!("rollout:{}:{}:{}", a.rollout.id, m.gateway_sn, m.attempts);
                m.dispatch_key = Some(key.clone());
                m.task_id = None;
                m.dispatched_at = Some(now);
                m.first_dispatch_at.get_or_insert(now);
                m.next_attempt_at = None;
                m.set_state(DeviceState::InFlight, now);
                changed.push(i);
                in_flight += 1;
                if let Some(rate) = def.rate_per_minute {
                    a.next_slot = a.next_slot.max(now) + spacing(rate, &key);
                }
                dispatches.push((i, self.request(&a.members[i], &def), key));
            }
        }
        status_changed |= self.sample(a, now);
        if !changed.is_empty() || status_changed {
            changed.sort_unstable();
            changed.dedup();
            let rows: Vec<&Member> = changed.iter().map(|&i| &a.members[i]).collect();
            self.persist(&a.rollout, &rows, status_changed);
            self.publish(a);
        }
        dispatches
    }

    fn sample(&self, a: &mut Active, now: DateTime<Utc>) -> bool {
        if now - a.last_sample < SAMPLE_EVERY {
            return false;
        }
        a.last_sample = now;
        let before = a.rollout.timeline.len();
        a.rollout.sample(&a.counts(), now);
        a.rollout.timeline.len() != before
    }

    /// Re-reads the gateway's devices at its first dispatch: a never-seen dock gets its
    /// packages, a new aircraft replaces the old one (the registry is read for this gateway
    /// only).
    fn refresh_devices(&self, m: &mut Member, r: &Rollout) {
        if m.attempts > 0 {
            return;
        }
        let dock = self.inner.devices.get(&m.gateway_sn).ok();
        let child = dock
            .as_ref()
            .and_then(|d| d.child_sn.as_deref())
            .and_then(|c| self.inner.devices.get(c).ok());
        if let Some(f) = member_for(r, m.gateway_sn.clone(), dock.as_ref(), child.as_ref()) {
            m.devices = f.devices;
        }
    }

    fn request(&self, m: &Member, def: &RolloutRequest) -> OtaRequest {
        OtaRequest {
            gateway_sn: m.gateway_sn.clone(),
            devices: m
                .to_upgrade()
                .filter(|d| !d.firmware_id.is_empty())
                .map(|d| RequestDevice {
                    sn: d.sn.clone(),
                    firmware_id: Some(d.firmware_id.clone()),
                    model: None,
                    product_version: None,
                })
                .collect(),
            firmware_upgrade_type: None,
            force: false,
            allow_downgrade: def.allow_downgrade,
            dry_run: false,
        }
    }

    /// Moves one member along from its task and the registry. True if it changed.
    fn follow(&self, m: &mut Member, def: &RolloutRequest, now: DateTime<Utc>) -> bool {
        match m.state {
            DeviceState::InFlight => {
                let Some(task_id) = m.task_id.clone() else {
                    return false;
                };
                if !self
                    .inner
                    .ota
                    .status(&task_id)
                    .is_some_and(TaskStatus::is_final)
                {
                    return false;
                }
                let Ok(task) = self.inner.ota.get(&task_id, |_, _| None) else {
                    return false;
                };
                self.finish_attempt(m, &task, def, now);
                true
            }
            DeviceState::Timeout => {
                let dock = self.inner.devices.get(&m.gateway_sn).ok();
                let on_target = m.to_upgrade().all(|d| {
                    self.inner.devices.get(&d.sn).is_ok_and(|x| {
                        x.firmware_version.as_deref() == Some(d.product_version.as_str())
                            && x.compatible_status != Some(1)
                    })
                });
                let fresh_idle = dock.as_ref().is_some_and(|g| {
                    g.last_seen_at.is_some_and(|t| now - t <= FRESH)
                        && g.mode_code.is_none_or(|c| c == 0)
                        && g.firmware_upgrade_status != Some(1)
                });
                let since = m.first_dispatch_at.unwrap_or(now);
                if on_target {
                    m.set_state(DeviceState::Ok, now);
                } else if fresh_idle {
                    if m.attempts <= def.max_retries {
                        m.set_state(DeviceState::Retrying, now);
                        m.next_attempt_at = Some(now);
                    } else {
                        m.set_state(DeviceState::Failed, now);
                    }
                } else if (now - since).num_seconds() > def.device_timeout_s as i64 {
                    let seen = dock
                        .and_then(|g| g.last_seen_at)
                        .is_some_and(|t| m.dispatched_at.is_some_and(|d| t >= d));
                    let state = if seen {
                        DeviceState::Failed
                    } else {
                        DeviceState::Unreachable
                    };
                    m.last_error
                        .get_or_insert_with(|| "timed out without an answer".into());
                    m.set_state(state, now);
                } else {
                    return false;
                }
                true
            }
            DeviceState::WaitingEligible => {
                let since = m.waiting_since.unwrap_or(now);
                if (now - since).num_seconds() > def.device_timeout_s as i64 {
                    m.last_error = Some(format!(
                        "not eligible within device_timeout_s ({} s)",
                        def.device_timeout_s
                    ));
                    m.set_state(DeviceState::Unreachable, now);
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    /// A task of this member ended.
    fn finish_attempt(
        &self,
        m: &mut Member,
        task: &OtaTask,
        def: &RolloutRequest,
        now: DateTime<Utc>,
    ) {
        for d in &mut m.devices {
            if task
                .devices
                .iter()
                .any(|t| t.sn == d.sn && t.outcome == Outcome::SkippedUpToDate)
            {
                d.state = DeviceState::SkippedUpToDate;
            }
        }
        match task.status {
            TaskStatus::Ok => {
                m.last_error = None;
                m.set_state(DeviceState::Ok, now);
            }
            TaskStatus::Timeout => {
                m.last_error = Some(format!("task {} timed out", task.id));
                m.waiting_since = Some(now);
                m.set_state(DeviceState::Timeout, now);
            }
            _ => {
                let why = task
                    .result_reason
                    .clone()
                    .unwrap_or_else(|| format!("task {} ended {:?}", task.id, task.status));
                m.last_error = Some(why);
                if task.retryable != Some(false) && m.attempts <= def.max_retries {
                    m.next_attempt_at =
                        Some(now + backoff(def.retry_backoff_s, m.attempts, &m.gateway_sn));
                    m.set_state(DeviceState::Retrying, now);
                } else {
                    m.set_state(DeviceState::Failed, now);
                }
            }
        }
    }

    /// Thresholds and stage moves for a running rollout. True if its status changed.
    fn judge(&self, a: &mut Active, now: DateTime<Utc>) -> bool {
        match self.verdict(a) {
            Some(v) => self.conclude(a, v, now),
            None => false,
        }
    }

    /// What the counts of a running rollout's current stage say, if anything.
    fn verdict(&self, a: &Active) -> Option<Verdict> {
        if a.rollout.status != RolloutStatus::Running {
            return None;
        }
        let def = &a.rollout.definition;
        let stage = a.rollout.current_stage;
        let held: Vec<&Member> = a.members.iter().filter(|m| m.stage <= stage).collect();
        let mut j = Judgement::of(&model::count(held.iter().copied()));
        // Failures an operator saw and resumed past count in neither threshold again.
        let acknowledged = a.rollout.acknowledged_failed.min(j.failed);
        j.failed -= acknowledged;
        j.final_count -= acknowledged;
        j.denominator -= acknowledged;
        if let Some(rate) = j.error_rate(def.min_sample) {
            if rate > def.error_threshold {
                return Some(Verdict::Stop(format!(
                    "error rate {rate:.1} % in stage {} is above error_threshold {} % ({} of {} devices failed)",
                    stage + 1,
                    def.error_threshold,
                    j.failed,
                    j.denominator
                )));
            }
        }
        if !held.iter().all(|m| m.state.is_final()) {
            return None;
        }
        let success = j.success_rate();
        if success < def.success_threshold {
            return Some(Verdict::Stop(format!(
                "success rate {success:.1} % in stage {} is below success_threshold {} %",
                stage + 1,
                def.success_threshold
            )));
        }
        if stage + 1 < def.stages.len() {
            Some(Verdict::StageDone(success))
        } else if a.members.iter().all(|m| m.state.is_final()) {
            Some(Verdict::AllDone)
        } else {
            None
        }
    }

    /// Carries a verdict out through the state machine. True if the status changed.
    fn conclude(&self, a: &mut Active, verdict: Verdict, now: DateTime<Utc>) -> bool {
        let r = &a.rollout;
        let step = machine::next(
            r.status,
            r.current_stage,
            r.definition.stages.len(),
            r.definition.auto_advance,
            Input::Judged(verdict),
        );
        let Ok(Some(step)) = step else {
            return false;
        };
        match step.to {
            RolloutStatus::Paused => {
                let why = step.pause_reason.clone().flatten().unwrap_or_default();
                tracing::warn!(rollout_id = %a.rollout.id, reason = %why, "rollout paused");
            }
            RolloutStatus::Completed => {
                tracing::info!(rollout_id = %a.rollout.id, "rollout completed");
            }
            _ if step.next_stage => {
                let n = a.rollout.current_stage + 2;
                tracing::info!(rollout_id = %a.rollout.id, stage = n, "rollout stage started");
            }
            _ => {}
        }
        machine::apply(&mut a.rollout, &step, now);
        true
    }

    /// A running rollout whose firmware was disabled (or deleted, or found corrupt) pauses.
    fn check_packages(&self, a: &mut Active, now: DateTime<Utc>) -> bool {
        if a.rollout.status != RolloutStatus::Running {
            return false;
        }
        let unusable = a.rollout.packages.iter().find_map(|p| {
            let id = crate::domain::FirmwareId::parse(&p.firmware_id)?;
            let fw = self.inner.catalog.firmware(&id).ok()?;
            (fw.status != crate::catalog::FirmwareStatus::Ready).then(|| {
                let status = serde_json::to_value(fw.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                format!(
                    "firmware {} ({} {}) is {status}",
                    p.firmware_id, p.model, p.product_version
                )
            })
        });
        match unusable {
            Some(why) => self.conclude(a, Verdict::Stop(why), now),
            None => false,
        }
    }

    /// Applies the answer of one dispatch.
    fn dispatched(&self, a: &mut Active, i: usize, result: Result<Created, OtaError>) {
        let now = Utc::now();
        let Some(m) = a.members.get_mut(i) else {
            return;
        };
        let retry_later = |m: &mut Member, why: String| {
            // Not an attempt: the gateway was not asked. Look again in a few seconds.
            m.attempts = m.attempts.saturating_sub(1);
            m.dispatch_key = None;
            m.last_error = Some(why);
            m.waiting_since.get_or_insert(now);
            m.next_attempt_at = Some(now + RECHECK);
            m.set_state(DeviceState::WaitingEligible, now);
        };
        match result {
            Ok(Created::Task(t)) => {
                m.task_id = Some(t.id.clone());
                m.waiting_since = None;
                for d in &mut m.devices {
                    if t.devices
                        .iter()
                        .any(|x| x.sn == d.sn && x.outcome == Outcome::SkippedUpToDate)
                    {
                        d.state = DeviceState::SkippedUpToDate;
                    }
                }
            }
            Ok(Created::Replay(_, answer)) => {
                m.task_id = answer["id"].as_str().map(str::to_string);
            }
            Ok(Created::DryRun(_)) => {}
            Err(OtaError::AlreadyUpToDate) => {
                m.attempts = m.attempts.saturating_sub(1);
                m.set_state(DeviceState::SkippedUpToDate, now);
            }
            Err(OtaError::DowngradeRefused(why)) => {
                m.attempts = m.attempts.saturating_sub(1);
                m.last_error = Some(why);
                m.set_state(DeviceState::SkippedNewer, now);
            }
            // Restarted after storing the attempt: the task of this attempt already exists
            // (made at or after the attempt was stored).
            Err(OtaError::GatewayBusy(task_id) | OtaError::DeviceBusy(task_id))
                if self
                    .inner
                    .ota
                    .get(&task_id, |_, _| None)
                    .is_ok_and(|t| m.dispatched_at.is_some_and(|d| t.created_at >= d)) =>
            {
                m.task_id = Some(task_id);
            }
            Err(
                e @ (OtaError::Preflight { .. }
                | OtaError::GatewayBusy(_)
                | OtaError::DeviceBusy(_)),
            ) => {
                retry_later(m, e.to_string());
            }
            Err(OtaError::BrokerUnavailable) => {
                retry_later(m, OtaError::BrokerUnavailable.to_string());
            }
            Err(e) => {
                m.last_error = Some(e.to_string());
                m.set_state(DeviceState::Failed, now);
            }
        }
        let row = a.members[i].clone();
        self.persist(&a.rollout, &[&row], false);
    }

    /// One round over every active rollout.
    async fn round(&self) {
        let now = Utc::now();
        let work: Vec<(String, Vec<Dispatch>)> = {
            let mut active = lock(&self.inner.active);
            let ids: Vec<String> = active.keys().cloned().collect();
            let mut work = Vec::new();
            for id in ids {
                if let Some(a) = active.get_mut(&id) {
                    let d = self.step(a, now);
                    if !d.is_empty() {
                        work.push((id.clone(), d));
                    }
                    let idle = !a.rollout.status.is_active()
                        && !a.members.iter().any(|m| m.state == DeviceState::InFlight);
                    if idle {
                        self.persist(&a.rollout, &[], true);
                        active.remove(&id);
                    }
                }
            }
            work
        };
        // Dispatches go out concurrently, as concurrent API requests would: their catalog
        // flushes (one before each publish) are shared instead of queued one after another.
        for (id, dispatches) in work {
            let ota = self.inner.ota.clone();
            let mut results = futures::stream::iter(dispatches.into_iter().map(|(i, req, key)| {
                let ota = ota.clone();
                async move { (i, ota.create(req, Some(key)).await) }
            }))
            .buffer_unordered(DISPATCH_CONCURRENCY);
            while let Some((i, result)) = results.next().await {
                if let Err(e) = &result {
                    tracing::info!(rollout_id = %id, error = %e, "rollout dispatch not sent");
                }
                if let Some(a) = lock(&self.inner.active).get_mut(&id) {
                    self.dispatched(a, i, result);
                }
            }
            if let Some(a) = lock(&self.inner.active).get(&id) {
                self.publish(a);
            }
        }
    }

    /// Drives every active rollout until `cancel`: a round every 500 ms, and at once after an
    /// OTA task changes or an operator acts.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tasks = self.inner.ota.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Idempotency-Key answers (API requests and every rollout dispatch) are kept 24 h.
        let mut prune = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = prune.tick() => {
                    let catalog = self.inner.catalog.clone();
                    match tokio::task::spawn_blocking(move || catalog.prune_idempotency()).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "expired Idempotency-Key answers pruned"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "pruning Idempotency-Key answers failed"),
                        _ => {}
                    }
                    continue;
                }
                _ = tick.tick() => {}
                _ = self.inner.wake.notified() => {}
                t = tasks.recv() => {
                    match t {
                        Ok(t) if !t.status.is_final() => continue,
                        Err(broadcast::error::RecvError::Closed) => break,
                        _ => {}
                    }
                }
            }
            // Coalesce a burst of task changes (a fleet finishing together) into one round.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = tasks.try_recv() {}
            self.round().await;
        }
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

impl crate::firmware::UsageGuard for RolloutService {
    /// Disabling is allowed: the rollouts that use the firmware pause (contract §3).
    fn blocks_disable(&self, _fw: &FirmwareRecord) -> Option<String> {
        None
    }

    fn in_use(&self, fw: &FirmwareRecord) -> Option<String> {
        let active = lock(&self.inner.active);
        active
            .values()
            .filter(|a| a.rollout.status.is_active())
            .find(|a| {
                a.rollout
                    .packages
                    .iter()
                    .any(|p| p.firmware_id == fw.id.as_str())
            })
            .map(|a| format!("rollout {} uses it", a.rollout.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        let b1 = backoff(60, 1, "A").num_milliseconds();
        let b2 = backoff(60, 2, "A").num_milliseconds();
        assert!((54_000..=66_000).contains(&b1), "{b1}");
        assert!((108_000..=132_000).contains(&b2), "{b2}");
        let s = spacing(60.0, "k").num_milliseconds();
        assert!((800..=1200).contains(&s), "{s}");
    }
}
