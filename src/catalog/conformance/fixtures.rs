//! Records for the conformance suite, built through their public types (or serde, for those
//! whose state only their service changes).

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::audit::AuditEntry;
use crate::auth::TokenRecord;
use crate::devices::DeviceRecord;
use crate::ota::{OtaTask, Outcome, Progress, TaskDevice, TaskStatus};
use crate::rollout::model::{Member, Rollout};
use crate::store::{DownloadSessionRecord, PendingUpload, SCHEMA_VERSION};

pub(super) fn id() -> String {
    crate::domain::ids::next()
}

/// An open task of `gateway` upgrading `devices`.
pub(crate) fn task(id: &str, gateway: &str, devices: &[&str]) -> OtaTask {
    let now = Utc::now();
    OtaTask {
        id: id.into(),
        gateway_sn: gateway.into(),
        tid: format!("tid-{id}"),
        bid: format!("bid-{id}"),
        status: TaskStatus::Sent,
        created_at: now,
        updated_at: now,
        devices: devices
            .iter()
            .map(|sn| TaskDevice {
                sn: (*sn).into(),
                firmware_id: "F".into(),
                product_version: "1.0".into(),
                upgrade_type: Some(3),
                policy_rule: 1,
                policy_reason: "test".into(),
                file_url: "http://127.0.0.1/x".into(),
                file_name: "x.zip".into(),
                md5: "0".repeat(32),
                file_size: 1,
                download_session: None,
                outcome: Outcome::Pending,
                outcome_at: None,
            })
            .collect(),
        progress: Progress::default(),
        result_code: None,
        result_reason: None,
        retryable: None,
        history: Vec::new(),
        replied_at: None,
        last_event_at: Some(now),
        finished_at: None,
        revision: 0,
    }
}

/// `t` as its writer saves it: one revision past the stored copy it was made from.
pub(crate) fn bumped(mut t: OtaTask) -> OtaTask {
    t.revision += 1;
    t
}

pub(super) fn finished(mut t: OtaTask, status: TaskStatus, at: DateTime<Utc>) -> OtaTask {
    t.status = status;
    t.finished_at = Some(at);
    t
}

pub(super) fn rollout(id: &str) -> Rollout {
    serde_json::from_value(json!({
        "id": id, "name": "r", "status": "draft",
        "definition": {"name": "r", "firmware": [], "target": {"gateway_sns": ["G"]}},
        "packages": [], "current_stage": 0, "stage_sizes": [], "pause_reason": null,
        "created_at": Utc::now(), "updated_at": Utc::now(), "started_at": null,
        "finished_at": null, "timeline": [], "events": []
    }))
    .unwrap_or_else(|e| panic!("rollout fixture: {e}"))
}

pub(super) fn member(gateway: &str, order: &str) -> Member {
    serde_json::from_value(json!({
        "gateway_sn": gateway, "order": order, "stage": 0, "devices": [], "state": "pending",
        "attempts": 0, "task_id": null, "dispatch_key": null, "last_error": null,
        "waiting_since": null, "first_dispatch_at": null, "dispatched_at": null,
        "next_attempt_at": null, "finished_at": null
    }))
    .unwrap_or_else(|e| panic!("member fixture: {e}"))
}

pub(super) fn device(sn: &str) -> DeviceRecord {
    serde_json::from_value(json!({
        "sn": sn, "order": id(), "gateway_sn": null, "child_sn": null, "model_key": null,
        "model": "Dock", "firmware_version": "1.0", "compatible_status": null,
        "firmware_upgrade_status": null, "mode_code": null, "thing_version": null,
        "dialect": null, "first_seen_at": Utc::now(), "last_seen_at": null,
        "last_osd_at": null, "last_state_at": null
    }))
    .unwrap_or_else(|e| panic!("device fixture: {e}"))
}

pub(super) fn token(id: &str) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        name: "ci".into(),
        scopes: vec![crate::auth::Scope::Read],
        created_at: Utc::now(),
        created_by: None,
        expires_at: None,
        last_used_at: None,
        revoked_at: None,
        hash: format!("hash-{id}"),
    }
}

pub(super) fn audit(id: &str) -> AuditEntry {
    AuditEntry {
        id: id.into(),
        at: Utc::now(),
        who: None,
        token_id: None,
        client: "127.0.0.1".into(),
        method: "POST".into(),
        path: "/api/v1/x".into(),
        status: 201,
        error: None,
    }
}

pub(super) fn session(
    id: &str,
    covered: &[(u64, u64)],
    seen: DateTime<Utc>,
) -> DownloadSessionRecord {
    DownloadSessionRecord::new_for_test(id, covered, seen)
}

pub(super) fn pending(id: &str) -> PendingUpload {
    PendingUpload {
        v: SCHEMA_VERSION,
        id: id.into(),
        blob_key: id.into(),
        multipart_id: Some("mpu".into()),
        started_at: Utc::now(),
    }
}
