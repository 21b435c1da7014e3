//! The JSON envelope of the gateway protocol (protocol.md §1), parsed leniently: `timestamp`
//! and `need_reply` as int or numeric string, unknown fields ignored, `""` as absent. Replies
//! are built here with fwrepo's own millisecond timestamp.

use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

pub use crate::domain::lenient::{int_of, now_ms, str_of};

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

#[cfg(test)]
mod tests {
    use super::*;

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
