//! The OTA task record (contract §5) and how events change it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// A message exactly as received (JSON text): cheap to clone and written out verbatim.
pub type RawJson = Box<RawValue>;

/// Task status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Stored, not yet published.
    Pending,
    /// Published (not necessarily delivered).
    Sent,
    /// The gateway reports progress.
    InProgress,
    /// The gateway paused it.
    Paused,
    /// Final: success.
    Ok,
    /// Final: failure.
    Failed,
    /// Final: canceled.
    Canceled,
    /// Final: refused by the gateway.
    Rejected,
    /// Final: no reply or no progress in time.
    Timeout,
}

impl TaskStatus {
    /// Whether no event can change it any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Ok
                | TaskStatus::Failed
                | TaskStatus::Canceled
                | TaskStatus::Rejected
                | TaskStatus::Timeout
        )
    }

    /// From the wire's `output.status`; `None` for absent or unknown values.
    pub fn from_wire(s: &str) -> Option<TaskStatus> {
        Some(match s {
            "sent" => TaskStatus::Sent,
            "in_progress" => TaskStatus::InProgress,
            "paused" => TaskStatus::Paused,
            "ok" => TaskStatus::Ok,
            "failed" => TaskStatus::Failed,
            "canceled" => TaskStatus::Canceled,
            "rejected" => TaskStatus::Rejected,
            "timeout" => TaskStatus::Timeout,
            _ => return None,
        })
    }
}

/// A device's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Not settled yet.
    Pending,
    /// The device reported the target (or consistency) after `ok`.
    Verified,
    /// The verify window passed without the report.
    Unverified,
    /// The device reported another version after `ok`.
    Mismatch,
    /// Nothing was sent: already up to date.
    SkippedUpToDate,
}

/// One device of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskDevice {
    /// Serial.
    pub sn: String,
    /// Firmware sent.
    pub firmware_id: String,
    /// Target version as stored.
    pub product_version: String,
    /// `firmware_upgrade_type` sent (null when skipped).
    pub upgrade_type: Option<u8>,
    /// Which policy rule decided (1–6).
    pub policy_rule: u8,
    /// Why.
    pub policy_reason: String,
    /// This device's own download URL.
    pub file_url: String,
    /// Package file name.
    pub file_name: String,
    /// MD5.
    pub md5: String,
    /// Size in bytes.
    pub file_size: u64,
    /// The device's download session (bytes fwrepo served through `file_url`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub download_session: Option<Value>,
    /// Outcome.
    pub outcome: Outcome,
    /// When the outcome was settled.
    #[serde(default)]
    pub outcome_at: Option<DateTime<Utc>>,
}

/// Latest progress reported by the gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// 0–100.
    pub percent: Option<i64>,
    /// `download_firmware` / `upgrade_firmware` (or what the gateway sent).
    pub step_key: Option<String>,
    /// Autel `sub_status`.
    pub sub_status: Option<String>,
    /// Download rate (`output.ext.rate`).
    pub rate: Option<i64>,
}

/// One entry of the task history.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// Server receive time.
    pub at: DateTime<Utc>,
    /// `api`, `publish`, `services_reply`, `ota_progress`, `timeout`, `verify`.
    pub source: String,
    /// Status after the entry.
    pub status: TaskStatus,
    /// Progress at the entry.
    pub progress: Progress,
    /// The raw message, if any.
    #[schema(value_type = Object)]
    pub raw: Option<RawJson>,
    /// Identical messages received after this one.
    #[serde(default)]
    pub repeats: u64,
}

/// An OTA task.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OtaTask {
    /// Id (ULID).
    pub id: String,
    /// The gateway (dock).
    pub gateway_sn: String,
    /// `tid` of the `ota_create`.
    pub tid: String,
    /// `bid` of the `ota_create`, kept for the whole job.
    pub bid: String,
    /// Status.
    pub status: TaskStatus,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Devices.
    pub devices: Vec<TaskDevice>,
    /// Latest progress.
    pub progress: Progress,
    /// `result` of the reply or event that failed it.
    pub result_code: Option<i64>,
    /// What the result code means, when known.
    pub result_reason: Option<String>,
    /// Whether retrying can help (DJI 312xxx table).
    pub retryable: Option<bool>,
    /// Changes, with the raw messages.
    pub history: Vec<HistoryEntry>,
    /// When `services_reply` arrived.
    #[serde(default)]
    pub replied_at: Option<DateTime<Utc>>,
    /// Last message for this task (server time).
    #[serde(default)]
    pub last_event_at: Option<DateTime<Utc>>,
    /// When it became final.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// How many times the stored task was written after its creation: a writer's copy is
    /// stored only while the stored one has the same revision (replicas sharing a catalog
    /// never overwrite each other's changes).
    #[serde(default)]
    pub revision: u64,
}

impl OtaTask {
    /// Whether every device's outcome is settled (the SSE stream may end).
    pub fn settled(&self) -> bool {
        self.status.is_final() && self.devices.iter().all(|d| d.outcome != Outcome::Pending)
    }

    /// Records a change in the history: a new entry for a change of status, sub_status or
    /// step, or a move of percent by at least 1; otherwise the last entry counts a repeat.
    pub fn note(&mut self, source: &str, raw: Option<RawJson>, at: DateTime<Utc>) {
        self.updated_at = at;
        if let Some(last) = self.history.last_mut() {
            let same = last.status == self.status
                && last.progress.sub_status == self.progress.sub_status
                && last.progress.step_key == self.progress.step_key
                && (last.progress.percent.unwrap_or(0) - self.progress.percent.unwrap_or(0)).abs()
                    < 1;
            if same && source == last.source {
                last.repeats += 1;
                return;
            }
        }
        self.history.push(HistoryEntry {
            at,
            source: source.to_string(),
            status: self.status,
            progress: self.progress.clone(),
            raw,
            repeats: 0,
        });
    }
}

/// What a DJI result code means and whether a retry can help (protocol.md §4).
pub fn explain(code: i64) -> (String, bool) {
    let (text, retry) = match code {
        312001 => (
            "consistency upgrade sent but the device did not ask for one",
            false,
        ),
        312010 => ("request does not match the API", false),
        312012 => ("bad parameters", false),
        312014 => ("already updating", false),
        312015 => ("cannot upgrade during flight", true),
        312016 => ("dock-aircraft transmission error", true),
        312017 => ("version check failed", false),
        312022 => ("aircraft failed to power on or is not connected", true),
        312023 => ("driving rods stuck or emergency stop pressed", false),
        312025 => ("cannot delete the old package", true),
        312026 => ("decompression failed", true),
        312027 => ("no aircraft in the dock", false),
        312028 | 312029 => ("device restarted during the update or is restarting", true),
        312030 => ("4G enhanced transmission is on", false),
        312704 => ("aircraft battery below 20 %", true),
        312002 | 312003 | 312004 | 312013 | 312018..=312021 | 312024 => ("try again", true),
        _ => ("unknown result code", false),
    };
    (format!("{code}: {text}"), retry)
}
