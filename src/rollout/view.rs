//! What the API shows of a rollout: counts per stage and state, the ETA, device rows.

use super::*;

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

pub(super) fn str_counts(c: &Counts) -> BTreeMap<String, u64> {
    c.iter()
        .map(|(k, v)| (k.as_str().to_string(), *v))
        .collect()
}

/// A copy of the rollout without its timeline (it has its own endpoint; up to 2,000 points).
pub(super) fn without_timeline(r: &Rollout) -> Rollout {
    Rollout {
        id: r.id.clone(),
        name: r.name.clone(),
        phase: r.phase.clone(),
        definition: r.definition.clone(),
        packages: r.packages.clone(),
        current_stage: r.current_stage,
        stage_sizes: r.stage_sizes.clone(),
        acknowledged_failed: r.acknowledged_failed,
        created_at: r.created_at,
        updated_at: r.updated_at,
        started_at: r.started_at,
        timeline: Vec::new(),
        events: r.events.clone(),
        revision: r.revision,
    }
}

pub(super) fn view_of(rollout: &Rollout, members: &[Member], now: DateTime<Utc>) -> RolloutView {
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
    let eta_s = match (rollout.status(), rollout.started_at) {
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
