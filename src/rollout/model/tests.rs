//! Definitions, stage sizes and thresholds.

use super::*;

fn req() -> RolloutRequest {
    serde_json::from_value(serde_json::json!({
        "name": "r", "firmware": [{"firmware_id": "x"}], "target": {"gateway_sns": ["A"]}
    }))
    .unwrap()
}

#[test]
fn defaults_and_validation() {
    let r = req();
    assert_eq!(r.stages.len(), 3);
    assert_eq!(r.rate_per_minute, Some(100.0));
    assert!(r.validate().is_ok());
    let unlimited: RolloutRequest = serde_json::from_value(serde_json::json!({
        "name": "r", "firmware": [{"firmware_id": "x"}], "target": {"model": "Dock"},
        "rate_per_minute": null
    }))
    .unwrap();
    assert_eq!(unlimited.rate_per_minute, None);
    let bad = |f: &dyn Fn(&mut RolloutRequest)| {
        let mut r = req();
        f(&mut r);
        r.validate().unwrap_err()
    };
    assert!(
        bad(&|r| r.stages = vec![StageDef { percent: 50.0 }, StageDef { percent: 50.0 }])
            .contains("increasing")
    );
    assert!(bad(&|r| r.stages = vec![StageDef { percent: 50.0 }]).contains("100"));
    assert!(bad(&|r| r.error_threshold = 101.0).contains("error_threshold"));
    assert!(bad(&|r| r.rate_per_minute = Some(0.0)).contains("rate_per_minute"));
    assert!(bad(&|r| r.target = Target::default()).contains("target"));
    assert!(bad(&|r| r.firmware.clear()).contains("firmware"));
}

#[test]
fn stages_are_cumulative_and_at_least_one() {
    let st = |p: &[f64]| {
        p.iter()
            .map(|&percent| StageDef { percent })
            .collect::<Vec<_>>()
    };
    assert_eq!(stage_sizes(&st(&[10.0, 50.0, 100.0]), 20), vec![2, 10, 20]);
    assert_eq!(stage_sizes(&st(&[10.0, 100.0]), 3), vec![1, 3]);
    assert_eq!(stage_sizes(&st(&[1.0, 100.0]), 0), vec![0, 0]);
    assert_eq!(order_key("r1", "A"), order_key("r1", "A"));
    assert_ne!(order_key("r1", "A"), order_key("r2", "A"));
}

#[test]
fn thresholds_use_the_contract_denominator() {
    let mut c = Counts::new();
    c.insert(DeviceState::Ok, 1);
    c.insert(DeviceState::Failed, 1);
    c.insert(DeviceState::Unreachable, 5);
    c.insert(DeviceState::SkippedUpToDate, 3);
    let j = Judgement::of(&c);
    assert_eq!(j.denominator, 2);
    // One failure out of two never pauses a fleet: min_sample not reached.
    assert_eq!(j.error_rate(5), None);
    assert_eq!(j.error_rate(2), Some(50.0));
    assert_eq!(j.success_rate(), 50.0);
}
