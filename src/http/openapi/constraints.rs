//! Validation keywords the server enforces, as JSON Schema (ECMA-262 patterns that Python's
//! `re` and Rust's `regex` read the same way). Byte limits are given as `maxLength`, which
//! counts characters: the same for ASCII, and the description says bytes.

use serde_json::{Value, json};

/// What `str::trim` removes (Unicode White_Space), as the inside of a character class.
const WS: &str = r"\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";
/// What `char::is_control` is (Unicode Cc), as the inside of a character class.
const CC: &str = r"\x00-\x1F\x7F-\x9F";

/// One part of a version: 1–18 decimal digits.
const PART: &str = "[0-9]{1,18}";

/// `ProductVersion::parse` without the surrounding whitespace it trims: dot-separated parts
/// of 1–18 digits, at most 16 parts where a third part of exactly four digits counts two.
fn version_core() -> String {
    format!(
        r"(?:{p}(?:\.{p})?|{p}\.{p}\.(?:[0-9]{{1,3}}|[0-9]{{5,18}})(?:\.{p}){{0,13}}|{p}\.{p}\.[0-9]{{4}}(?:\.{p}){{0,12}})",
        p = PART
    )
}

/// A version as `ProductVersion::parse` accepts it.
fn version() -> String {
    format!("^[{WS}]*{}[{WS}]*$", version_core())
}

/// A version, or blank (then it is taken from the file name).
fn version_or_blank() -> String {
    format!("^[{WS}]*(?:{})?[{WS}]*$", version_core())
}

/// A serial number in MQTT topics: not empty, no `/`, `+` or `#`.
const SERIAL: &str = "^[^/+#]+$";

/// Text that is not only whitespace.
fn not_blank() -> String {
    format!("[^{WS}]")
}

/// After trimming: 1–`max` characters, none a control character.
fn trimmed_printable(max: usize, blank_ok: bool) -> String {
    let core = format!("[^{WS}{CC}](?:[^{CC}]{{0,{}}}[^{WS}{CC}])?", max - 2);
    let core = if blank_ok {
        format!("(?:{core})?")
    } else {
        core
    };
    format!("^[{WS}]*{core}[{WS}]*$")
}

/// `FileName::parse`: no `/`, `\`, `..` or control characters, no whitespace at either end.
fn file_name() -> String {
    // A character of a name other than `.`; the same that is not whitespace either.
    let x = format!(r"[^/\\.{CC}]");
    let n = format!(r"[^/\\.{WS}{CC}]");
    // Dots never adjacent; the first and last characters a dot or not whitespace.
    format!(r"^(?:(?:\.|{n}{x}*\.)(?:{x}+\.)*(?:{x}*{n})?|{n}(?:{x}*{n})?)$")
}

/// A hex digest of `len` characters (any case), or blank (then none is checked).
fn hex_or_blank(len: usize) -> String {
    format!("^[{WS}]*(?:[0-9a-fA-F]{{{len}}})?[{WS}]*$")
}

/// Firmware by id, or by model and version (`resolve_firmware`); `null` is absent.
fn firmware_choice() -> Value {
    json!([
        {"required": ["firmware_id"], "properties": {"firmware_id": {"type": "string"}}},
        {
            "required": ["model", "product_version"],
            "properties": {
                "model": {"type": "string"},
                "product_version": {"type": "string", "pattern": version()}
            }
        }
    ])
}

/// An unsigned integer up to `max`. No `format`: `int32`/`int64` name signed ranges, and
/// a u32 or u64 takes values above them.
fn unsigned(min: u64, max: u64) -> Value {
    json!({"minimum": min, "maximum": max, "format": null})
}

/// The rollout device states, and the empty string (no filter).
fn device_states() -> Vec<&'static str> {
    std::iter::once("")
        .chain(crate::rollout::model::ALL_STATES.iter().map(|s| s.as_str()))
        .collect()
}

/// The patches: `(JSON pointer, keywords merged into the schema there)`.
fn patches() -> Vec<(String, Value)> {
    let param = |path: &str, method: &str, name: &str| {
        format!(
            "/paths/{}/{method}/parameters/{name}",
            path.replace('~', "~0").replace('/', "~1")
        )
    };
    let prop = |schema: &str, name: &str| format!("/components/schemas/{schema}/properties/{name}");
    let schema = |schema: &str| format!("/components/schemas/{schema}");
    let mut out = Vec::new();
    for method in ["post", "put"] {
        let p = |name| param("/api/v1/firmware", method, name);
        out.extend([
            (
                format!(
                    "/paths/~1api~1v1~1firmware/{method}/requestBody/content/application~1octet-stream/schema"
                ),
                json!({"type": "string", "format": "binary", "minLength": 1, "items": null}),
            ),
            (
                p("file_name"),
                json!({"required": true, "schema": {"maxLength": 255, "pattern": file_name()}}),
            ),
            (p("product_version"), json!({"schema": {"pattern": version_or_blank()}})),
            (p("model"), json!({"schema": {"pattern": trimmed_printable(128, true)}})),
            (p("md5"), json!({"schema": {"pattern": hex_or_blank(32)}})),
            (p("sha256"), json!({"schema": {"pattern": hex_or_blank(64)}})),
            (p("release_note"), json!({"schema": {"maxLength": 16384}})),
        ]);
    }
    out.extend([
        (
            param("/api/v1/firmware", "get", "product_version"),
            json!({"schema": {"pattern": version()}}),
        ),
        (
            param("/api/v1/rollouts/{id}/{action}", "post", "action"),
            json!({"schema": {"enum": ["start", "pause", "resume", "cancel", "approve"]}}),
        ),
        (
            param("/api/v1/rollouts/{id}/devices", "get", "state"),
            json!({"schema": {"enum": device_states()}}),
        ),
        (
            param("/api/v1/devices", "get", "seen_within_s"),
            json!({"schema": unsigned(0, u64::MAX)}),
        ),
        (
            param("/api/v1/devices/{sn}", "put", "sn"),
            json!({"schema": {"minLength": 1, "maxLength": 128, "pattern": "^[^/+#]*$"}}),
        ),
        // OTA tasks (crate::ota::OtaRequest).
        (prop("OtaRequest", "gateway_sn"), json!({"pattern": SERIAL})),
        (
            prop("OtaRequest", "devices"),
            json!({"minItems": 1, "maxItems": 2}),
        ),
        (
            prop("OtaRequest", "firmware_upgrade_type"),
            json!({"enum": [2, 3, null], "minimum": null, "format": null}),
        ),
        (schema("RequestDevice"), json!({"anyOf": firmware_choice()})),
        // Rollouts (crate::rollout::RolloutRequest).
        (
            prop("RolloutRequest", "name"),
            json!({"maxLength": 200, "pattern": not_blank()}),
        ),
        (prop("RolloutRequest", "firmware"), json!({"minItems": 1})),
        (prop("RolloutRequest", "stages"), json!({"minItems": 1})),
        (
            prop("RolloutRequest", "success_threshold"),
            json!({"minimum": 0, "maximum": 100}),
        ),
        (
            prop("RolloutRequest", "error_threshold"),
            json!({"minimum": 0, "maximum": 100}),
        ),
        (
            prop("RolloutRequest", "min_sample"),
            unsigned(0, u32::MAX.into()),
        ),
        (
            prop("RolloutRequest", "max_in_flight"),
            unsigned(1, u32::MAX.into()),
        ),
        (
            prop("RolloutRequest", "max_retries"),
            unsigned(0, u32::MAX.into()),
        ),
        (
            prop("RolloutRequest", "rate_per_minute"),
            json!({"exclusiveMinimum": 0}),
        ),
        (
            prop("RolloutRequest", "device_timeout_s"),
            unsigned(1, u64::MAX),
        ),
        (
            prop("RolloutRequest", "retry_backoff_s"),
            unsigned(0, u64::MAX),
        ),
        (schema("FirmwareRef"), json!({"anyOf": firmware_choice()})),
        (
            prop("StageDef", "percent"),
            json!({"exclusiveMinimum": 0, "maximum": 100}),
        ),
        (prop("Target", "seen_within_s"), unsigned(0, u64::MAX)),
        // A list of gateways or a model, not both (`null` is absent).
        (
            schema("Target"),
            json!({"anyOf": [
                {
                    "required": ["gateway_sns"],
                    "properties": {
                        "gateway_sns": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "pattern": SERIAL}
                        },
                        "model": {"type": "null"}
                    }
                },
                {
                    "required": ["model"],
                    "properties": {
                        "model": {"type": "string", "pattern": not_blank()},
                        "gateway_sns": {"type": "null"}
                    }
                }
            ]}),
        ),
        // Tokens (crate::auth::NewToken).
        (
            prop("NewToken", "name"),
            json!({"pattern": trimmed_printable(64, false)}),
        ),
        (prop("NewToken", "scopes"), json!({"minItems": 1})),
    ]);
    out
}

/// Applies every patch; adds to `missing` the pointers that name nothing.
pub(super) fn apply(doc: &mut Value, missing: &mut Vec<String>) {
    for (pointer, patch) in patches() {
        match resolve(doc, &pointer) {
            Some(target) => merge(target, patch),
            None => missing.push(pointer),
        }
    }
}

/// Like `Value::pointer_mut`, except that the last segment of `…/parameters/{name}` picks
/// the parameter by name.
fn resolve<'a>(doc: &'a mut Value, pointer: &str) -> Option<&'a mut Value> {
    match pointer.rsplit_once("/parameters/") {
        Some((op, name)) => doc
            .pointer_mut(&format!("{op}/parameters"))?
            .as_array_mut()?
            .iter_mut()
            .find(|p| p["name"] == name),
        None => doc.pointer_mut(pointer),
    }
}

/// Merges `patch` into `target` (objects key by key; `null` removes a key).
fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}
