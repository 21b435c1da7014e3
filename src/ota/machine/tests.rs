//! Table tests per (state, event) and property tests over interleavings and duplicates.

use super::*;
use crate::ota::task::Progress;
use proptest::prelude::*;

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
}

fn task(status: TaskStatus, replied: bool) -> OtaTask {
    OtaTask {
        id: "T".into(),
        gateway_sn: "DOCK".into(),
        tid: "tid".into(),
        bid: "bid".into(),
        status,
        created_at: at(0),
        updated_at: at(0),
        devices: Vec::new(),
        progress: Progress::default(),
        result_code: None,
        result_reason: None,
        retryable: None,
        history: Vec::new(),
        replied_at: replied.then(|| at(1)),
        last_event_at: Some(at(1)),
        finished_at: status.is_final().then(|| at(1)),
        revision: 0,
    }
}

fn report(result: i64, status: Option<TaskStatus>, step: Option<&str>, pct: Option<i64>) -> Report {
    Report {
        result,
        status,
        percent: pct,
        step_key: step.map(str::to_string),
        ..Report::default()
    }
}

fn reply(result: i64, status: TaskStatus) -> TaskEvent {
    TaskEvent::Reply(report(result, Some(status), None, None), None)
}

fn progress(result: i64, status: Option<TaskStatus>) -> TaskEvent {
    TaskEvent::Progress(report(result, status, None, None), None)
}

/// An event and its name in the table.
type NamedEvent = (&'static str, fn() -> TaskEvent);

#[test]
fn every_state_and_event() {
    use TaskStatus::*;
    let states: [(TaskStatus, bool); 10] = [
        (Pending, false),
        (Sent, false),
        (Sent, true),
        (InProgress, false),
        (Paused, true),
        (Ok, true),
        (Failed, true),
        (Canceled, true),
        (Rejected, true),
        (Timeout, false),
    ];
    let events: [NamedEvent; 12] = [
        ("published", || TaskEvent::Published(None)),
        ("reply sent", || reply(0, Sent)),
        ("reply in_progress", || reply(0, InProgress)),
        ("reply rejected", || reply(312014, Sent)),
        ("progress in_progress", || progress(0, Some(InProgress))),
        ("progress paused", || progress(0, Some(Paused))),
        ("progress ok", || progress(0, Some(Ok))),
        ("progress result≠0", || progress(312016, Some(InProgress))),
        ("progress canceled", || progress(0, Some(Canceled))),
        ("reply timeout", || TaskEvent::ReplyTimeout),
        ("progress timeout", || TaskEvent::ProgressTimeout),
        ("devices on target", || TaskEvent::DevicesOnTarget),
    ];
    // Expected status per state (rows) and event (columns, in the order above).
    let expected: [[TaskStatus; 12]; 10] = [
        // pending
        [
            Sent, Sent, InProgress, Rejected, InProgress, Paused, Ok, Failed, Canceled, Timeout,
            Timeout, Ok,
        ],
        // sent, no reply yet
        [
            Sent, Sent, InProgress, Rejected, InProgress, Paused, Ok, Failed, Canceled, Timeout,
            Timeout, Ok,
        ],
        // sent, replied
        [
            Sent, Sent, InProgress, Rejected, InProgress, Paused, Ok, Failed, Canceled, Sent,
            Timeout, Ok,
        ],
        // in_progress (progress came before the reply)
        [
            InProgress, InProgress, InProgress, Rejected, InProgress, Paused, Ok, Failed, Canceled,
            InProgress, Timeout, Ok,
        ],
        // paused
        [
            Paused, Paused, Paused, Rejected, InProgress, Paused, Ok, Failed, Canceled, Paused,
            Timeout, Ok,
        ],
        // final states absorb everything
        [Ok; 12],
        [Failed; 12],
        [Canceled; 12],
        [Rejected; 12],
        [Timeout; 12],
    ];
    for (row, (state, replied)) in states.iter().enumerate() {
        for (col, (name, event)) in events.iter().enumerate() {
            let mut t = task(*state, *replied);
            let fx = apply(&mut t, event(), at(5));
            let want = expected[row][col];
            assert_eq!(t.status, want, "{state:?} (replied {replied}) + {name}");
            let became_final = !state.is_final() && want.is_final();
            assert_eq!(
                fx.finished,
                became_final.then_some(want),
                "{state:?} + {name}"
            );
            if became_final {
                assert_eq!(t.finished_at, Some(at(5)), "{state:?} + {name}");
            }
            if state.is_final() {
                assert_eq!(t.finished_at, Some(at(1)), "{state:?} + {name}");
            }
            if want != *state {
                assert!(fx.save, "{state:?} + {name}: a change must be saved");
            }
        }
    }
}

#[test]
fn result_codes_are_explained_and_replies_recorded() {
    let mut t = task(TaskStatus::Sent, false);
    apply(&mut t, reply(312015, TaskStatus::Sent), at(2));
    assert_eq!(t.result_code, Some(312015));
    assert_eq!(t.retryable, Some(true));
    assert_eq!(t.replied_at, Some(at(2)));

    // A first reply after the end is noted once; a second changes nothing.
    let mut t = task(TaskStatus::Ok, false);
    let fx = apply(&mut t, reply(0, TaskStatus::Sent), at(3));
    assert!(fx.save && fx.finished.is_none());
    assert_eq!((t.status, t.replied_at), (TaskStatus::Ok, Some(at(3))));
    assert_eq!(t.history.len(), 1);
    let fx = apply(&mut t, reply(0, TaskStatus::Sent), at(4));
    assert_eq!(fx, Effects::default());
    assert_eq!(t.history.len(), 1);
}

#[test]
fn percent_never_goes_back_within_a_step() {
    let mut t = task(TaskStatus::InProgress, true);
    let step = |s: &str, p: i64| {
        TaskEvent::Progress(
            report(0, Some(TaskStatus::InProgress), Some(s), Some(p)),
            None,
        )
    };
    apply(&mut t, step("download_firmware", 40), at(2));
    apply(&mut t, step("download_firmware", 30), at(3));
    assert_eq!(t.progress.percent, Some(40));
    apply(&mut t, step("upgrade_firmware", 5), at(4));
    assert_eq!(
        (t.progress.step_key.as_deref(), t.progress.percent),
        (Some("upgrade_firmware"), Some(5))
    );
    // A download report after the upgrade began is stale.
    apply(&mut t, step("download_firmware", 90), at(5));
    assert_eq!(
        (t.progress.step_key.as_deref(), t.progress.percent),
        (Some("upgrade_firmware"), Some(5))
    );
    // Without a step, percent still only grows.
    apply(&mut t, progress(0, Some(TaskStatus::InProgress)), at(6));
    assert_eq!(t.progress.percent, Some(5));
}

#[test]
fn timers_fall_due_by_silence() {
    let s = std::time::Duration::from_secs;
    let t = task(TaskStatus::Sent, false);
    assert!(due(&t, at(20), s(30), s(600)).is_none());
    assert!(matches!(
        due(&t, at(40), s(30), s(600)),
        Some(TaskEvent::ReplyTimeout)
    ));
    let t = task(TaskStatus::InProgress, true);
    assert!(due(&t, at(40), s(30), s(600)).is_none());
    assert!(matches!(
        due(&t, at(700), s(30), s(600)),
        Some(TaskEvent::ProgressTimeout)
    ));
    assert!(due(&task(TaskStatus::Ok, true), at(9_999), s(30), s(600)).is_none());
}

/// The events of one successful upgrade, in the order the gateway sends them.
fn one_upgrade() -> Vec<TaskEvent> {
    let mut events = vec![TaskEvent::Reply(
        report(0, Some(TaskStatus::Sent), None, Some(0)),
        None,
    )];
    for (step, pcts) in [
        ("download_firmware", [0, 25, 50, 100]),
        ("upgrade_firmware", [0, 40, 80, 99]),
    ] {
        for p in pcts {
            events.push(TaskEvent::Progress(
                report(0, Some(TaskStatus::InProgress), Some(step), Some(p)),
                None,
            ));
        }
    }
    events.push(TaskEvent::Progress(
        report(0, Some(TaskStatus::Ok), Some("upgrade_firmware"), Some(100)),
        None,
    ));
    events
}

fn final_state(events: Vec<TaskEvent>) -> (TaskStatus, Progress, bool) {
    let mut t = task(TaskStatus::Sent, false);
    t.last_event_at = None;
    for (i, e) in events.into_iter().enumerate() {
        apply(&mut t, e, at(10 + i as i64));
    }
    (t.status, t.progress, t.replied_at.is_some())
}

proptest! {
    /// Any order of one upgrade's events, with any of them repeated anywhere, ends in the same
    /// state as the gateway's own order.
    #[test]
    fn any_interleaving_with_duplicates_ends_the_same(
        order in Just((0..10usize).collect::<Vec<_>>()).prop_shuffle(),
        dups in proptest::collection::vec((0..10usize, 0..20usize), 0..8),
    ) {
        let all = one_upgrade();
        let mut events: Vec<TaskEvent> = order.iter().map(|&i| all[i].clone()).collect();
        for (which, at) in dups {
            let at = at.min(events.len());
            events.insert(at, all[which].clone());
        }
        let want = final_state(one_upgrade());
        prop_assert_eq!(&want.0, &TaskStatus::Ok);
        prop_assert_eq!(final_state(events), want);
    }

    /// Replies and progress arrive on different topics: the reply anywhere among the progress
    /// events (in their own order) never moves the status back.
    #[test]
    fn a_reply_anywhere_never_moves_the_status_back(pos in 0..10usize) {
        let mut events = one_upgrade();
        let reply = events.remove(0);
        events.insert(pos.min(events.len()), reply);
        let mut t = task(TaskStatus::Sent, false);
        let mut last_rank = rank(t.status);
        for (i, e) in events.into_iter().enumerate() {
            apply(&mut t, e, at(10 + i as i64));
            prop_assert!(rank(t.status) >= last_rank);
            last_rank = rank(t.status);
        }
        prop_assert_eq!(t.status, TaskStatus::Ok);
    }
}
