//! Lenient reading of gateway JSON (protocol.md §1, §8): ints that may come as numeric strings,
//! strings where `""` means absent. Only the MQTT adapter reads gateway JSON.

use serde_json::Value;

/// An int-like value: a number or a numeric string.
pub fn int_of(v: &Value) -> Option<i64> {
    match v {
        // A float counts only when it is a whole number inside i64 (`1e300` is malformed,
        // not i64::MAX).
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A non-empty string (numbers rendered as text); `""` and anything else are absent.
pub fn str_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Milliseconds since the epoch, now (the protocol's `timestamp`).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
