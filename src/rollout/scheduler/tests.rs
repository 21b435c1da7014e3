//! The scheduler's pure parts: backoff, spacing, and what a dispatch's answer makes of its
//! member.

use super::*;

fn in_flight(attempts: u32) -> Member {
    Member {
        order: "0".into(),
        gateway_sn: "G".into(),
        stage: 0,
        devices: vec![MemberDevice {
            sn: "G".into(),
            model: "Dock".into(),
            firmware_id: "f".into(),
            product_version: "2.0.0".into(),
            state: DeviceState::InFlight,
        }],
        state: DeviceState::InFlight,
        attempts,
        task_id: None,
        dispatch_key: Some(format!("rollout:r:G:{attempts}")),
        last_error: None,
        waiting_since: None,
        first_dispatch_at: None,
        dispatched_at: None,
        next_attempt_at: None,
        finished_at: None,
    }
}

/// Answers that did not ask the gateway give the attempt back (the next one has the same
/// dispatch key, so it replays this one if it was stored after all) and look again soon;
/// an answer about the request itself fails the member.
#[test]
fn answers_that_did_not_ask_the_gateway_are_tried_again_not_failed() {
    let now = Utc::now();
    let cases: Vec<(OtaError, DeviceState, u32)> = vec![
        (
            OtaError::Catalog(crate::store::CatalogError::Storage("pool timed out".into())),
            DeviceState::WaitingEligible,
            0,
        ),
        (OtaError::BrokerUnavailable, DeviceState::WaitingEligible, 0),
        (
            OtaError::GatewayBusy("t".into()),
            DeviceState::WaitingEligible,
            0,
        ),
        (OtaError::AlreadyUpToDate, DeviceState::SkippedUpToDate, 0),
        (OtaError::Validation("bad".into()), DeviceState::Failed, 1),
    ];
    for (error, state, attempts) in cases {
        let what = error.to_string();
        let mut m = in_flight(1);
        answered(&mut m, Err(error), None, now);
        assert_eq!((m.state, m.attempts), (state, attempts), "{what}");
        if state == DeviceState::WaitingEligible {
            assert_eq!(m.next_attempt_at, Some(now + RECHECK), "{what}");
            assert_eq!(m.last_error.as_deref(), Some(what.as_str()));
        }
    }
}

#[test]
fn backoff_doubles_with_bounded_jitter() {
    let b1 = backoff(60, 1, "A").num_milliseconds();
    let b2 = backoff(60, 2, "A").num_milliseconds();
    assert!((54_000..=66_000).contains(&b1), "{b1}");
    assert!((108_000..=132_000).contains(&b2), "{b2}");
    let s = spacing(60.0, "k").num_milliseconds();
    assert!((800..=1200).contains(&s), "{s}");
}
