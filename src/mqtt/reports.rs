//! Reading device reports — topology (`update_topo`), `state`, `osd` — in the DJI and Autel
//! spellings, leniently: a missing field is absent; a present one of the wrong kind makes a
//! state report malformed.

use super::*;

pub(super) fn model_key_of(v: &Value) -> Option<String> {
    let domain = int_of(&v["domain"])?;
    let ty = int_of(&v["type"])?;
    let sub = int_of(&v["sub_type"]).unwrap_or(0);
    Some(format!("{domain}-{ty}-{sub}"))
}

pub(super) fn topology_of(data: &Value) -> TopologyReport {
    let version = |v: &Value| str_of(&v["thing_version"]).or_else(|| str_of(&v["version"]));
    TopologyReport {
        model_key: model_key_of(data),
        thing_version: version(data),
        sub_devices: data["sub_devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                Some(SubDeviceReport {
                    sn: str_of(&s["sn"])?,
                    model_key: model_key_of(s),
                    thing_version: version(s),
                })
            })
            .take(1)
            .collect(),
    }
}

/// The state report, or the name of a field that is present but not an integer.
pub(super) fn state_of(data: &Value) -> Result<StateReport, &'static str> {
    let int = |a: &'static str, b: &str| {
        let v = field(data, a, b);
        match int_of(v) {
            Some(i) => Ok(Some(i)),
            None if v.is_null() => Ok(None),
            None => Err(a),
        }
    };
    Ok(StateReport {
        firmware_version: str_of(field(data, "firmware_version", "firmwareVersion")),
        compatible_status: int("compatible_status", "compatibleStatus")?,
        firmware_upgrade_status: int("firmware_upgrade_status", "firmwareUpgradeStatus")?,
    })
}

/// `v[a]`, else `v[b]` (snake_case, else camelCase), without copying.
fn field<'a>(v: &'a Value, a: &str, b: &str) -> &'a Value {
    match &v[a] {
        Value::Null => &v[b],
        x => x,
    }
}

/// Reads `mode_code` and a dock's `sub_device.device_sn` (DJI spelling, or camelCase). osd
/// is the high-volume topic: nothing is copied but the serial.
pub(super) fn osd_of(data: &Value) -> OsdReport {
    let sub = field(data, "sub_device", "subDevice");
    OsdReport {
        mode_code: int_of(field(data, "mode_code", "modeCode")),
        sub_device_sn: str_of(field(sub, "device_sn", "deviceSn")).filter(|s| !s.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn osd_both_spellings() {
        let dji = json!({"mode_code": 0, "sub_device": {"device_sn": "AC1", "device_paired": 1}});
        let r = osd_of(&dji);
        assert_eq!(
            (r.mode_code, r.sub_device_sn.as_deref()),
            (Some(0), Some("AC1"))
        );
        let camel = json!({"modeCode": "3", "subDevice": {"deviceSn": ""}});
        let r = osd_of(&camel);
        assert_eq!((r.mode_code, r.sub_device_sn), (Some(3), None));
        assert_eq!(osd_of(&json!({})).mode_code, None);
    }

    #[test]
    fn topology_both_dialects() {
        let dji = json!({"domain":"3","type":1,"sub_type":0,"thing_version":"1.1.2",
            "sub_devices":[{"sn":"AC1","domain":"0","type":67,"sub_type":0,"index":"A"}]});
        let t = topology_of(&dji);
        assert_eq!(t.model_key.as_deref(), Some("3-1-0"));
        assert_eq!(t.sub_devices[0].sn, "AC1");
        assert_eq!(t.sub_devices[0].model_key.as_deref(), Some("0-67-0"));
        let autel = json!({"domain":3,"type":1,"sub_type":0,"version":"2.0","sub_devices":[]});
        let t = topology_of(&autel);
        assert_eq!(t.thing_version.as_deref(), Some("2.0"));
        assert!(t.sub_devices.is_empty());
        let s =
            state_of(&json!({"firmware_version":"10.01.0205","compatible_status":"1"})).unwrap();
        assert_eq!(s.firmware_version.as_deref(), Some("10.01.0205"));
        assert_eq!(s.compatible_status, Some(1));
    }

    #[test]
    fn out_of_range_integers_make_a_state_report_malformed() {
        assert_eq!(
            state_of(&json!({"compatible_status": 1e300})).err(),
            Some("compatible_status")
        );
        assert_eq!(
            state_of(&json!({"firmwareUpgradeStatus": 0.5})).err(),
            Some("firmware_upgrade_status")
        );
        let s = state_of(&json!({"compatible_status": 1.0, "firmware_upgrade_status": null}));
        assert_eq!(s.map(|s| s.compatible_status), Ok(Some(1)));
    }
}
