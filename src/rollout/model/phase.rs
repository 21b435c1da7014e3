//! A rollout's state with the data that belongs to it: only a paused rollout has a pause
//! reason, only a finished one a finish time. Stored and shown flat, as `status`,
//! `pause_reason` and `finished_at`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::RolloutStatus;

/// The state of a rollout. Changed only by `rollout::machine::apply`.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// Created, not started.
    Draft,
    /// Dispatching.
    Running,
    /// A stage succeeded; `approve` starts the next.
    WaitingApproval,
    /// Stopped by an operator or a threshold; `resume` goes on.
    Paused {
        /// Why.
        reason: String,
    },
    /// Every stage done.
    Completed {
        /// When.
        at: DateTime<Utc>,
    },
    /// Stopped for good.
    Canceled {
        /// When.
        at: DateTime<Utc>,
    },
}

impl Phase {
    /// The state's name.
    pub fn status(&self) -> RolloutStatus {
        match self {
            Phase::Draft => RolloutStatus::Draft,
            Phase::Running => RolloutStatus::Running,
            Phase::WaitingApproval => RolloutStatus::WaitingApproval,
            Phase::Paused { .. } => RolloutStatus::Paused,
            Phase::Completed { .. } => RolloutStatus::Completed,
            Phase::Canceled { .. } => RolloutStatus::Canceled,
        }
    }

    /// The state `status` names, with its data.
    pub fn of(status: RolloutStatus, reason: Option<String>, at: DateTime<Utc>) -> Phase {
        match status {
            RolloutStatus::Draft => Phase::Draft,
            RolloutStatus::Running => Phase::Running,
            RolloutStatus::WaitingApproval => Phase::WaitingApproval,
            RolloutStatus::Paused => Phase::Paused {
                reason: reason.unwrap_or_else(|| "paused".into()),
            },
            RolloutStatus::Completed => Phase::Completed { at },
            RolloutStatus::Canceled => Phase::Canceled { at },
        }
    }
}

/// A rollout's state and its data, as stored and shown.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseFields {
    /// State.
    pub status: RolloutStatus,
    /// Why it is paused.
    #[serde(default)]
    pub pause_reason: Option<String>,
    /// Completed or canceled.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}

impl Serialize for Phase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (pause_reason, finished_at) = match self {
            Phase::Paused { reason } => (Some(reason.clone()), None),
            Phase::Completed { at } | Phase::Canceled { at } => (None, Some(*at)),
            _ => (None, None),
        };
        PhaseFields {
            status: self.status(),
            pause_reason,
            finished_at,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Phase, D::Error> {
        let f = PhaseFields::deserialize(d)?;
        Ok(Phase::of(
            f.status,
            f.pause_reason,
            f.finished_at.unwrap_or_default(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_flat_and_read_back() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        for phase in [
            Phase::Draft,
            Phase::Running,
            Phase::WaitingApproval,
            Phase::Paused {
                reason: "error rate 30 %".into(),
            },
            Phase::Completed { at },
            Phase::Canceled { at },
        ] {
            let json = serde_json::to_value(&phase).unwrap();
            assert_eq!(
                json["status"],
                serde_json::to_value(phase.status()).unwrap()
            );
            assert_eq!(serde_json::from_value::<Phase>(json).unwrap(), phase);
        }
        let paused = serde_json::json!({"status": "paused", "pause_reason": "why"});
        let paused: Phase = serde_json::from_value(paused).unwrap();
        assert_eq!(
            paused,
            Phase::Paused {
                reason: "why".into()
            }
        );
    }
}
