//! The rollout record, its members and the pure rules (contract §6): validation, stable stage
//! membership, counts and thresholds. No I/O here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::Digest;

mod phase;
pub use phase::{Phase, PhaseFields};

/// One package of a release: a firmware per device model.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct FirmwareRef {
    /// By id …
    pub firmware_id: Option<String>,
    /// … or by model …
    pub model: Option<String>,
    /// … and version.
    pub product_version: Option<String>,
}

/// Which gateways a rollout covers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Target {
    /// These gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_sns: Option<Vec<String>>,
    /// Or every gateway of this (firmware) model …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// … seen within this many seconds (default 604800, a week).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_within_s: Option<u64>,
}

/// A stage: the first `percent` of the eligible gateways (cumulative).
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct StageDef {
    /// 1–100, strictly increasing, the last one 100.
    pub percent: f64,
}

fn d_true() -> bool {
    true
}
fn d_stages() -> Vec<StageDef> {
    [10.0, 50.0, 100.0]
        .into_iter()
        .map(|percent| StageDef { percent })
        .collect()
}
fn d_success() -> f64 {
    95.0
}
fn d_error() -> f64 {
    10.0
}
fn d_min_sample() -> u32 {
    5
}
fn d_in_flight() -> u32 {
    50
}
fn d_rate() -> Option<f64> {
    Some(100.0)
}
fn d_timeout() -> u64 {
    3600
}
fn d_retries() -> u32 {
    2
}
fn d_backoff() -> u64 {
    60
}

/// `POST /api/v1/rollouts` (contract §6); also the stored definition.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// Name shown to operators.
    pub name: String,
    /// One package per device model (e.g. dock and aircraft).
    pub firmware: Vec<FirmwareRef>,
    /// Gateways by list, or by model seen recently.
    pub target: Target,
    /// Only gateways whose dock and aircraft both have a package (else skipped).
    #[serde(default)]
    pub require_pair: bool,
    /// Stages (default 10 %, 50 %, 100 %).
    #[serde(default = "d_stages")]
    pub stages: Vec<StageDef>,
    /// Percent of a stage's devices that must end `ok` to go on (default 95).
    #[serde(default = "d_success")]
    pub success_threshold: f64,
    /// Percent of failed devices that pauses the rollout (default 10).
    #[serde(default = "d_error")]
    pub error_threshold: f64,
    /// Final devices needed before the thresholds are judged (default 5).
    #[serde(default = "d_min_sample")]
    pub min_sample: u32,
    /// Gateways upgrading at once (default 50).
    #[serde(default = "d_in_flight")]
    pub max_in_flight: u32,
    /// Dispatches per minute (default 100; `null` = unlimited).
    #[serde(default = "d_rate")]
    pub rate_per_minute: Option<f64>,
    /// A gateway that is neither done nor reachable within this is given up (default 3600).
    #[serde(default = "d_timeout")]
    pub device_timeout_s: u64,
    /// Retries after a failure (default 2).
    #[serde(default = "d_retries")]
    pub max_retries: u32,
    /// First retry delay, doubling each time (default 60).
    #[serde(default = "d_backoff")]
    pub retry_backoff_s: u64,
    /// Start the next stage by itself when one succeeds (default true).
    #[serde(default = "d_true")]
    pub auto_advance: bool,
    /// Add gateways that join the target while it runs, to the last stage (default false).
    #[serde(default)]
    pub include_new_devices: bool,
    /// Allow an older target.
    #[serde(default)]
    pub allow_downgrade: bool,
}

impl RolloutRequest {
    /// Checks the values that need no lookup.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err("name must be 1–200 characters".into());
        }
        if self.firmware.is_empty() {
            return Err("firmware must name at least one package".into());
        }
        match (&self.target.gateway_sns, &self.target.model) {
            (Some(sns), None) if !sns.is_empty() => {
                if sns
                    .iter()
                    .any(|s| s.is_empty() || s.contains(['/', '+', '#']))
                {
                    return Err("target.gateway_sns holds an invalid serial number".into());
                }
            }
            (None, Some(m)) if !m.trim().is_empty() => {}
            _ => {
                return Err(
                    "target needs a non-empty gateway_sns list, or a model (not both)".into(),
                );
            }
        }
        if self.stages.is_empty() {
            return Err("stages must not be empty".into());
        }
        let mut last = 0.0;
        for s in &self.stages {
            if !(s.percent > last && s.percent <= 100.0) {
                return Err("stage percents must be strictly increasing within 1–100".into());
            }
            last = s.percent;
        }
        if last != 100.0 {
            return Err("the last stage must be 100 percent".into());
        }
        for (name, v) in [
            ("success_threshold", self.success_threshold),
            ("error_threshold", self.error_threshold),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{name} must be within 0–100"));
            }
        }
        if self.max_in_flight == 0 {
            return Err("max_in_flight must be at least 1".into());
        }
        if self.rate_per_minute.is_some_and(|r| r.is_nan() || r <= 0.0) {
            return Err("rate_per_minute must be positive (or null for unlimited)".into());
        }
        if self.device_timeout_s == 0 {
            return Err("device_timeout_s must be positive".into());
        }
        Ok(())
    }
}

/// Rollout states (contract §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Created, not started.
    Draft,
    /// Dispatching.
    Running,
    /// A stage succeeded; `approve` starts the next.
    WaitingApproval,
    /// Stopped by an operator or a threshold; `resume` goes on.
    Paused,
    /// Every stage done.
    Completed,
    /// Stopped for good.
    Canceled,
}

impl RolloutStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Draft => "draft",
            RolloutStatus::Running => "running",
            RolloutStatus::WaitingApproval => "waiting_approval",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Completed => "completed",
            RolloutStatus::Canceled => "canceled",
        }
    }

    /// Whether the rollout still holds its devices.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RolloutStatus::Running | RolloutStatus::WaitingApproval | RolloutStatus::Paused
        )
    }
}

/// Device states (contract §6).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Its stage has not reached it.
    Pending,
    /// Its gateway is offline or busy: dispatched when it comes back.
    WaitingEligible,
    /// An OTA task is open for it.
    InFlight,
    /// Upgraded.
    Ok,
    /// Failed after its retries, or permanently.
    Failed,
    /// Failed; retried after the backoff.
    Retrying,
    /// Its task timed out; retried only when the dock is seen idle and not on the target.
    Timeout,
    /// Never online within `device_timeout_s`.
    Unreachable,
    /// Already runs the target.
    SkippedUpToDate,
    /// Runs a newer version (downgrades not allowed).
    SkippedNewer,
    /// The rollout was canceled before it was dispatched.
    Canceled,
}

impl DeviceState {
    /// No further change.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeviceState::Ok
                | DeviceState::Failed
                | DeviceState::Unreachable
                | DeviceState::SkippedUpToDate
                | DeviceState::SkippedNewer
                | DeviceState::Canceled
        )
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::WaitingEligible => "waiting_eligible",
            DeviceState::InFlight => "in_flight",
            DeviceState::Ok => "ok",
            DeviceState::Failed => "failed",
            DeviceState::Retrying => "retrying",
            DeviceState::Timeout => "timeout",
            DeviceState::Unreachable => "unreachable",
            DeviceState::SkippedUpToDate => "skipped_up_to_date",
            DeviceState::SkippedNewer => "skipped_newer",
            DeviceState::Canceled => "canceled",
        }
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<DeviceState> {
        ALL_STATES.into_iter().find(|d| d.as_str() == s)
    }
}

/// Every device state, in display order.
pub const ALL_STATES: [DeviceState; 11] = [
    DeviceState::Pending,
    DeviceState::WaitingEligible,
    DeviceState::InFlight,
    DeviceState::Ok,
    DeviceState::Failed,
    DeviceState::Retrying,
    DeviceState::Timeout,
    DeviceState::Unreachable,
    DeviceState::SkippedUpToDate,
    DeviceState::SkippedNewer,
    DeviceState::Canceled,
];

/// A package resolved at creation.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Package {
    /// Firmware model.
    pub model: String,
    /// Firmware id.
    pub firmware_id: String,
    /// Its version.
    pub product_version: String,
}

/// One device of a member gateway.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct MemberDevice {
    /// Serial.
    pub sn: String,
    /// Firmware model.
    pub model: String,
    /// Package for it.
    pub firmware_id: String,
    /// Target version.
    pub product_version: String,
    /// State.
    pub state: DeviceState,
}

/// A gateway of a rollout with its dock and aircraft: one `ota_create` per attempt.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Member {
    /// Dock serial.
    pub gateway_sn: String,
    /// Stable order key (hash of rollout id + sn).
    pub order: String,
    /// First stage (0-based) that holds it.
    pub stage: usize,
    /// The dock and its aircraft, those with a package.
    pub devices: Vec<MemberDevice>,
    /// The gateway's state (the devices follow it, except skipped ones).
    pub state: DeviceState,
    /// Dispatch attempts so far.
    pub attempts: u32,
    /// The OTA task of the latest attempt.
    pub task_id: Option<String>,
    /// Idempotency-Key of the latest attempt: a restart re-sends it, never a new attempt.
    pub dispatch_key: Option<String>,
    /// Why it failed last.
    pub last_error: Option<String>,
    /// When the current wait (eligibility, timeout) began.
    pub waiting_since: Option<DateTime<Utc>>,
    /// First dispatch.
    pub first_dispatch_at: Option<DateTime<Utc>>,
    /// Latest dispatch.
    pub dispatched_at: Option<DateTime<Utc>>,
    /// Not before this (retry backoff).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When it became final.
    pub finished_at: Option<DateTime<Utc>>,
}

impl Member {
    /// Sets the gateway state and every device that is not skipped.
    pub fn set_state(&mut self, state: DeviceState, now: DateTime<Utc>) {
        self.state = state;
        for d in &mut self.devices {
            if !matches!(
                d.state,
                DeviceState::SkippedUpToDate | DeviceState::SkippedNewer
            ) {
                d.state = state;
            }
        }
        if state.is_final() {
            self.finished_at = Some(now);
        }
    }

    /// The devices still to upgrade.
    pub fn to_upgrade(&self) -> impl Iterator<Item = &MemberDevice> {
        self.devices.iter().filter(|d| {
            !matches!(
                d.state,
                DeviceState::SkippedUpToDate | DeviceState::SkippedNewer
            )
        })
    }
}

/// Counts per device state.
pub type Counts = BTreeMap<DeviceState, u64>;

/// Device counts of `members`.
pub fn count<'a>(members: impl Iterator<Item = &'a Member>) -> Counts {
    let mut c = Counts::new();
    for m in members {
        for d in &m.devices {
            *c.entry(d.state).or_default() += 1;
        }
    }
    c
}

/// What the thresholds see of a set of devices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Judgement {
    /// Devices counted (not skipped, not unreachable).
    pub denominator: u64,
    /// Of them final.
    pub final_count: u64,
    /// Failed after retries (and timeouts given up).
    pub failed: u64,
    /// Ok.
    pub ok: u64,
}

impl Judgement {
    /// From counts.
    pub fn of(c: &Counts) -> Judgement {
        let get = |s| c.get(&s).copied().unwrap_or(0);
        let total: u64 = c.values().sum();
        let excluded = get(DeviceState::SkippedUpToDate)
            + get(DeviceState::SkippedNewer)
            + get(DeviceState::Unreachable)
            + get(DeviceState::Canceled);
        Judgement {
            denominator: total - excluded,
            final_count: get(DeviceState::Ok) + get(DeviceState::Failed),
            failed: get(DeviceState::Failed),
            ok: get(DeviceState::Ok),
        }
    }

    /// Error rate in percent, once `min_sample` are final.
    pub fn error_rate(&self, min_sample: u32) -> Option<f64> {
        (self.final_count >= u64::from(min_sample.max(1)) && self.denominator > 0)
            .then(|| self.failed as f64 * 100.0 / self.denominator as f64)
    }

    /// Success rate in percent (100 when nothing counts).
    pub fn success_rate(&self) -> f64 {
        if self.denominator == 0 {
            100.0
        } else {
            self.ok as f64 * 100.0 / self.denominator as f64
        }
    }
}

/// The stable order key of a gateway in a rollout.
pub fn order_key(rollout_id: &str, sn: &str) -> String {
    let h = sha2::Sha256::digest(format!("{rollout_id}/{sn}").as_bytes());
    hex::encode(&h[..12])
}

/// Cumulative gateway counts per stage: stage k holds the first ceil(percent × n), at least 1.
pub fn stage_sizes(stages: &[StageDef], n: usize) -> Vec<usize> {
    stages
        .iter()
        .map(|s| (((s.percent / 100.0) * n as f64).ceil() as usize).clamp(1.min(n), n))
        .collect()
}

/// The event a replica notes when it starts driving a running rollout that another replica
/// (or none) drove before: the handover after a replica died shows in the rollout's events.
pub const DRIVEN_BY: &str = "driven_by";

/// One point of the timeline.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct TimelinePoint {
    /// When.
    pub at: DateTime<Utc>,
    /// Device counts by state.
    #[schema(value_type = Object)]
    pub counts: BTreeMap<String, u64>,
}

/// A state change of the rollout.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct RolloutEvent {
    /// When.
    pub at: DateTime<Utc>,
    /// What (`created`, `start`, `stage_started`, `paused`, `driven_by`, …).
    pub action: String,
    /// Why, when it is not an operator's action (for `driven_by`, on a deployment of several
    /// replicas: the replica that drives the rollout from then on).
    pub reason: Option<String>,
}

/// A rollout as stored.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Rollout {
    /// Id (ULID).
    pub id: String,
    /// Name.
    pub name: String,
    /// State, with its data (`status`, `pause_reason`, `finished_at` when stored).
    #[serde(flatten)]
    #[schema(inline, value_type = PhaseFields)]
    pub(in crate::rollout) phase: Phase,
    /// The definition as posted (defaults filled in).
    pub definition: RolloutRequest,
    /// Packages by model.
    pub packages: Vec<Package>,
    /// Current stage (0-based).
    pub current_stage: usize,
    /// Cumulative gateway counts per stage (known once started).
    pub stage_sizes: Vec<usize>,
    /// Failed devices when an operator last resumed: they no longer count against the
    /// thresholds (else a rollout paused by them would pause again at once).
    #[serde(default)]
    pub acknowledged_failed: u64,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Started.
    pub started_at: Option<DateTime<Utc>>,
    /// Counts over time.
    pub timeline: Vec<TimelinePoint>,
    /// State changes.
    pub events: Vec<RolloutEvent>,
    /// How many times the stored record was written after its creation: a writer's copy is
    /// stored only while the stored one has the revision it was made from (an action taken
    /// through one replica is never overwritten by the scheduler on another).
    #[serde(default)]
    pub revision: u64,
}

impl Rollout {
    /// Its state's name.
    pub fn status(&self) -> RolloutStatus {
        self.phase.status()
    }

    /// Its state, with the state's data.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Notes a state change.
    pub fn event(&mut self, action: &str, reason: Option<String>, now: DateTime<Utc>) {
        self.updated_at = now;
        self.events.push(RolloutEvent {
            at: now,
            action: action.to_string(),
            reason,
        });
    }

    /// The replica that drove it last, by its `driven_by` events.
    pub fn driver(&self) -> Option<&str> {
        self.events
            .iter()
            .rev()
            .find(|e| e.action == DRIVEN_BY)
            .and_then(|e| e.reason.as_deref())
    }

    /// Adds a timeline point (at most 2,000 kept: the older half is thinned).
    pub fn sample(&mut self, counts: &Counts, now: DateTime<Utc>) {
        let counts: BTreeMap<String, u64> = counts
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), *v))
            .collect();
        if self.timeline.last().is_some_and(|p| p.counts == counts) {
            return;
        }
        if self.timeline.len() >= 2000 {
            let mut i = 0;
            self.timeline.retain(|_| {
                i += 1;
                i > 1000 || i % 2 == 0
            });
        }
        self.timeline.push(TimelinePoint { at: now, counts });
    }
}

#[cfg(test)]
mod tests;
