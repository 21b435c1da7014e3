//! The JSON envelope of the gateway protocol (protocol.md §1), parsed leniently: `timestamp`
//! and `need_reply` as int or numeric string, unknown fields ignored, `""` as absent. Replies
//! are built here with fwrepo's own millisecond timestamp.

use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

pub use super::lenient::{int_of, now_ms, str_of};

/// Why a payload was not understood.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not JSON, or not an object.
    #[error("payload is not a JSON object: {0}")]
    NotJson(String),
}

fn lenient_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(int_of(&Value::deserialize(d)?))
}

fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(str_of(&Value::deserialize(d)?))
}

/// The common envelope of every message.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Envelope {
    /// Transaction id.
    #[serde(default, deserialize_with = "non_empty")]
    pub tid: Option<String>,
    /// Business id.
    #[serde(default, deserialize_with = "non_empty")]
    pub bid: Option<String>,
    /// Sender's time in ms.
    #[serde(default, deserialize_with = "lenient_int")]
    pub timestamp: Option<i64>,
    /// Method.
    #[serde(default, deserialize_with = "non_empty")]
    pub method: Option<String>,
    /// Gateway SN (DJI dialect).
    #[serde(default, deserialize_with = "non_empty")]
    pub gateway: Option<String>,
    /// 1 = the cloud must answer.
    #[serde(default, deserialize_with = "lenient_int")]
    pub need_reply: Option<i64>,
    /// Payload.
    #[serde(default)]
    pub data: Value,
}

impl Envelope {
    /// Parses a payload.
    pub fn parse(payload: &[u8]) -> Result<Envelope, WireError> {
        let value: Value =
            serde_json::from_slice(payload).map_err(|e| WireError::NotJson(e.to_string()))?;
        if !value.is_object() {
            return Err(WireError::NotJson("not an object".into()));
        }
        serde_json::from_value(value).map_err(|e| WireError::NotJson(e.to_string()))
    }
}

/// A `*_reply` echoing tid and bid with `data.result` 0.
pub fn reply(env: &Envelope, method: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "tid": env.tid,
        "bid": env.bid,
        "timestamp": now_ms(),
        "method": method,
        "data": {"result": 0},
    }))
    .unwrap_or_default()
}

/// The `ota_create` service call of a typed command (protocol.md §3): `devices[]` with `sn,
/// product_version, file_url, md5, file_size, file_name, firmware_upgrade_type`.
pub fn ota_create(cmd: &crate::ota::OtaCreate) -> Value {
    let devices: Vec<Value> = cmd
        .devices
        .iter()
        .map(|d| {
            json!({
                "sn": d.sn,
                "product_version": d.product_version,
                "file_url": d.file_url,
                "md5": d.md5,
                "file_size": d.file_size,
                "file_name": d.file_name,
                "firmware_upgrade_type": d.upgrade_type,
            })
        })
        .collect();
    json!({
        "bid": cmd.bid,
        "tid": cmd.tid,
        "timestamp": now_ms(),
        "method": "ota_create",
        "data": {"devices": devices},
    })
}

/// The lenient reading of a `services_reply` or `ota_progress` `data` (DJI and Autel shapes:
/// `output.status`, or the older shape with it directly under `data`; `""` is absent; the step
/// from `step_key`, `current_step` or `step`, 1/2 meaning download/upgrade).
pub fn report_of(data: &Value) -> crate::ota::machine::Report {
    let output = if data["output"].is_object() {
        &data["output"]
    } else {
        data
    };
    let progress = &output["progress"];
    let step = str_of(&progress["step_key"])
        .or_else(|| str_of(&progress["current_step"]))
        .or_else(|| str_of(&progress["step"]))
        .map(|s| match s.as_str() {
            "1" => "download_firmware".to_string(),
            "2" => "upgrade_firmware".to_string(),
            _ => s,
        });
    crate::ota::machine::Report {
        result: int_of(&data["result"]).unwrap_or(0),
        status: str_of(&output["status"])
            .as_deref()
            .and_then(crate::ota::task::TaskStatus::from_wire),
        percent: int_of(&progress["percent"]),
        step_key: step,
        sub_status: str_of(&output["sub_status"]),
        rate: int_of(&output["ext"]["rate"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol's own examples (tests/fixtures/protocol, from protocol.md).
    fn fixture(name: &str) -> Value {
        let text = match name {
            "ota_progress" => include_str!("../../tests/fixtures/protocol/ota_progress.json"),
            "ota_create" => include_str!("../../tests/fixtures/protocol/ota_create.json"),
            _ => include_str!("../../tests/fixtures/protocol/ota_create_reply.json"),
        };
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn the_protocol_examples_parse_and_render() {
        use crate::ota::task::TaskStatus;
        let progress = fixture("ota_progress");
        let env = Envelope::parse(progress.to_string().as_bytes()).unwrap();
        assert_eq!(env.method.as_deref(), Some("ota_progress"));
        assert_eq!(env.timestamp, Some(1_707_048_089_244));
        let r = report_of(&env.data);
        assert_eq!((r.result, r.status), (0, Some(TaskStatus::Failed)));
        assert_eq!(r.step_key.as_deref(), Some("download_firmware"));
        assert_eq!(
            (r.percent, r.sub_status.as_deref()),
            (Some(0), Some("DOWNLOAD_FAILED"))
        );
        let reply = report_of(&fixture("ota_create_reply")["data"]);
        assert_eq!((reply.result, reply.status), (0, Some(TaskStatus::Sent)));
        // `step_key: ""` is absent; `step: 1` names the download.
        assert_eq!(reply.step_key.as_deref(), Some("download_firmware"));
        assert_eq!(reply.sub_status, None);

        // ota_create renders exactly the example's shape and values (timestamp aside).
        let want = fixture("ota_create");
        let d = &want["data"]["devices"][0];
        let cmd = crate::ota::OtaCreate {
            gateway_sn: "GW".into(),
            tid: want["tid"].as_str().unwrap().into(),
            bid: want["bid"].as_str().unwrap().into(),
            devices: vec![crate::ota::OtaCreateDevice {
                sn: d["sn"].as_str().unwrap().into(),
                product_version: d["product_version"].as_str().unwrap().into(),
                file_url: d["file_url"].as_str().unwrap().into(),
                md5: d["md5"].as_str().unwrap().into(),
                file_size: d["file_size"].as_u64().unwrap(),
                file_name: d["file_name"].as_str().unwrap().into(),
                upgrade_type: 3,
            }],
        };
        let mut got = ota_create(&cmd);
        assert!(got["timestamp"].as_i64().unwrap() > want["timestamp"].as_i64().unwrap());
        got["timestamp"] = want["timestamp"].clone();
        assert_eq!(got, want);
    }

    #[test]
    fn reports_in_every_shape() {
        use crate::ota::task::TaskStatus;
        let dji = report_of(&json!({"result": 0, "output": {"status": "in_progress",
            "progress": {"percent": "42", "step_key": "download_firmware"}, "ext": {"rate": 10}}}));
        assert_eq!(dji.status, Some(TaskStatus::InProgress));
        assert_eq!((dji.percent, dji.rate), (Some(42), Some(10)));
        assert_eq!(dji.step_key.as_deref(), Some("download_firmware"));
        let autel = report_of(&json!({"result": "312016", "status": "failed",
            "progress": {"percent": 3, "current_step": 2}, "sub_status": "x"}));
        assert_eq!(
            (autel.result, autel.status),
            (312_016, Some(TaskStatus::Failed))
        );
        assert_eq!(autel.step_key.as_deref(), Some("upgrade_firmware"));
        assert_eq!(autel.sub_status.as_deref(), Some("x"));
        let empty = report_of(&json!({"output": {"status": "", "progress": {"step": "1"}}}));
        assert_eq!((empty.result, empty.status), (0, None));
        assert_eq!(empty.step_key.as_deref(), Some("download_firmware"));
    }

    #[test]
    fn lenient_envelope() {
        let e = Envelope::parse(br#"{"tid":"t","bid":"","timestamp":"1707048089244","method":"ota_progress","need_reply":1,"data":{}}"#).unwrap();
        assert_eq!(e.timestamp, Some(1_707_048_089_244));
        assert_eq!(e.bid, None);
        assert_eq!(e.need_reply, Some(1));
        assert!(Envelope::parse(b"not json").is_err());
        assert!(Envelope::parse(b"[1]").is_err());
        assert!(
            Envelope::parse(br#"{"timestamp":{}}"#)
                .unwrap()
                .timestamp
                .is_none()
        );
        let r: Value = serde_json::from_slice(&reply(&e, "ota_progress")).unwrap();
        assert_eq!(r["tid"], "t");
        assert_eq!(r["data"]["result"], 0);
        assert!(r["timestamp"].is_i64());
    }
}
