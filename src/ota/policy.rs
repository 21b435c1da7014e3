//! The per-device upgrade-type policy (contract §5, protocol.md §6): the first rule that
//! applies decides. Pure: facts in, a decision out.

use crate::domain::ProductVersion;

/// What is known about the device.
#[derive(Clone, Debug, Default)]
pub struct DeviceFacts {
    /// Firmware model of the device (declared or mapped), if known.
    pub model: Option<String>,
    /// Running version, if reported.
    pub running: Option<String>,
    /// 1 = consistency upgrade needed.
    pub compatible_status: Option<i64>,
}

/// What the operator asked for.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Explicit `firmware_upgrade_type`.
    pub upgrade_type: Option<u8>,
    /// Ignore a model mismatch; send even when up to date.
    pub force: bool,
    /// Allow an older target.
    pub allow_downgrade: bool,
    /// Per-model default type for devices whose version is unknown.
    pub default_type: Option<u8>,
}

/// The decision for one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send with this type (2 consistency, 3 normal).
    Send {
        /// `firmware_upgrade_type`.
        upgrade_type: u8,
        /// Which rule decided (1–6).
        rule: u8,
        /// Why.
        reason: String,
    },
    /// Nothing to do: up to date.
    Skip {
        /// Why.
        reason: String,
    },
    /// Refused.
    Refuse {
        /// Error code: `model_mismatch`, `downgrade_refused`, `validation_failed`.
        code: &'static str,
        /// Why.
        reason: String,
    },
}

/// Applies the six rules in order.
pub fn decide(
    target_model: &str,
    target: &ProductVersion,
    dev: &DeviceFacts,
    req: &Request,
) -> Decision {
    // 1. Model mismatch (a device of unknown model skips this rule).
    if let Some(model) = &dev.model
        && !model.eq_ignore_ascii_case(target_model)
        && !req.force
    {
        return Decision::Refuse {
            code: "model_mismatch",
            reason: format!("firmware is for {target_model}, the device is a {model}"),
        };
    }
    let running = dev
        .running
        .as_deref()
        .and_then(|r| ProductVersion::parse(r).ok());
    // 2. Explicit type.
    match req.upgrade_type {
        Some(3) => {
            return Decision::Send {
                upgrade_type: 3,
                rule: 2,
                reason: "normal upgrade requested explicitly".into(),
            };
        }
        Some(2) => {
            return match &running {
                Some(r) if r == target => Decision::Send {
                    upgrade_type: 2,
                    rule: 2,
                    reason: "consistency upgrade requested explicitly".into(),
                },
                _ => Decision::Refuse {
                    code: "validation_failed",
                    reason: "a consistency upgrade (2) must re-send the running version; the device does not run the target (a dock answers 312001)".into(),
                },
            };
        }
        Some(other) => {
            return Decision::Refuse {
                code: "validation_failed",
                reason: format!("firmware_upgrade_type must be 2 or 3, not {other}"),
            };
        }
        None => {}
    }
    let Some(running) = running else {
        // 6. Version unknown.
        let t = req.default_type.unwrap_or(3);
        return Decision::Send {
            upgrade_type: t,
            rule: 6,
            reason: format!("running version unknown: type {t} by default"),
        };
    };
    // 3. Newer / older.
    if &running < target {
        return Decision::Send {
            upgrade_type: 3,
            rule: 3,
            reason: format!("runs {} < target {}", running.as_str(), target.as_str()),
        };
    }
    if &running > target {
        return if req.allow_downgrade {
            Decision::Send {
                upgrade_type: 3,
                rule: 3,
                reason: format!("downgrade from {} allowed", running.as_str()),
            }
        } else {
            Decision::Refuse {
                code: "downgrade_refused",
                reason: format!(
                    "runs {} > target {} (allow_downgrade not set)",
                    running.as_str(),
                    target.as_str()
                ),
            }
        };
    }
    // 4. Same version, inconsistent.
    if dev.compatible_status == Some(1) {
        return Decision::Send {
            upgrade_type: 2,
            rule: 4,
            reason: "runs the target but reports compatible_status 1: consistency upgrade".into(),
        };
    }
    // 5. Up to date.
    if req.force {
        return Decision::Send {
            upgrade_type: 3,
            rule: 5,
            reason: "up to date; sent anyway (force)".into(),
        };
    }
    Decision::Skip {
        reason: format!("already runs {}", running.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(model: Option<&str>, running: Option<&str>, cs: Option<i64>) -> DeviceFacts {
        DeviceFacts {
            model: model.map(str::to_string),
            running: running.map(str::to_string),
            compatible_status: cs,
        }
    }

    #[test]
    fn rules_in_order() {
        let t = ProductVersion::parse("10.01.0205").unwrap();
        let r = Request::default();
        assert!(matches!(
            decide("Dock", &t, &facts(Some("M30"), None, None), &r),
            Decision::Refuse {
                code: "model_mismatch",
                ..
            }
        ));
        assert!(matches!(
            decide(
                "Dock",
                &t,
                &facts(Some("dock"), Some("10.01.0100"), None),
                &r
            ),
            Decision::Send {
                upgrade_type: 3,
                rule: 3,
                ..
            }
        ));
        assert!(matches!(
            decide("Dock", &t, &facts(None, Some("10.01.0300"), None), &r),
            Decision::Refuse {
                code: "downgrade_refused",
                ..
            }
        ));
        let down = Request {
            allow_downgrade: true,
            ..Default::default()
        };
        assert!(matches!(
            decide("Dock", &t, &facts(None, Some("10.01.0300"), None), &down),
            Decision::Send {
                upgrade_type: 3,
                ..
            }
        ));
        assert!(matches!(
            decide("Dock", &t, &facts(None, Some("10.1.2.5"), Some(1)), &r),
            Decision::Send {
                upgrade_type: 2,
                rule: 4,
                ..
            }
        ));
        assert!(matches!(
            decide("Dock", &t, &facts(None, Some("10.1.2.5"), Some(0)), &r),
            Decision::Skip { .. }
        ));
        assert!(matches!(
            decide("Dock", &t, &facts(None, None, None), &r),
            Decision::Send {
                upgrade_type: 3,
                rule: 6,
                ..
            }
        ));
        let two = Request {
            upgrade_type: Some(2),
            ..Default::default()
        };
        assert!(matches!(
            decide("Dock", &t, &facts(None, Some("1.0"), None), &two),
            Decision::Refuse {
                code: "validation_failed",
                ..
            }
        ));
        assert!(matches!(
            decide("Dock", &t, &facts(None, Some("10.01.0205"), None), &two),
            Decision::Send {
                upgrade_type: 2,
                rule: 2,
                ..
            }
        ));
        let forced = Request {
            force: true,
            ..Default::default()
        };
        assert!(matches!(
            decide(
                "Dock",
                &t,
                &facts(Some("M30"), Some("10.1.2.5"), Some(0)),
                &forced
            ),
            Decision::Send { rule: 5, .. }
        ));
    }
}
