//! The rollout state machine, pure: an operator's [`Action`] or the scheduler's [`Verdict`] and
//! the rollout's stage position go in, the [`Step`] to take comes out (or the refusal). Every
//! change of a rollout's status goes through [`next`] and [`apply`]; the service carries out
//! what the step says about members (cancel the undispatched ones, acknowledge failures).
//!
//! | status \ input     | start   | pause  | resume  | approve                | cancel   | threshold or unusable package | stage done                              | all done  |
//! |--------------------|---------|--------|---------|------------------------|----------|-------------------------------|-----------------------------------------|-----------|
//! | draft              | running | –      | –       | –                      | –        | –                             | –                                       | –         |
//! | running            | –       | paused | –       | –                      | canceled | paused (with the reason)      | next stage (auto) or waiting_approval   | completed |
//! | waiting_approval   | –       | paused | –       | running, next stage    | canceled | –                             | –                                       | –         |
//! | paused             | –       | –      | running | –                      | canceled | –                             | –                                       | –         |
//! | completed, canceled| –       | –      | –       | –                      | –        | –                             | –                                       | –         |
//!
//! "–" for an operator's action is 409 `invalid_transition`; for a verdict it is ignored.

use chrono::{DateTime, Utc};

use super::model::{Phase, Rollout, RolloutStatus};

/// An operator's action (`POST /api/v1/rollouts/{id}/{action}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Resolve the target and begin stage 1.
    Start,
    /// Stop dispatching (in-flight tasks go on).
    Pause,
    /// Go on after a pause.
    Resume,
    /// Begin the next stage after a successful one.
    Approve,
    /// Stop for good; undispatched devices become `canceled`.
    Cancel,
}

impl Action {
    /// Every action, in the order of the API's documentation.
    pub const ALL: [Action; 5] = [
        Action::Start,
        Action::Pause,
        Action::Resume,
        Action::Cancel,
        Action::Approve,
    ];

    /// The action named in a URL, if it is one.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Its name in URLs and in the rollout's events.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Approve => "approve",
            Action::Cancel => "cancel",
        }
    }
}

/// What the scheduler concluded about a running rollout.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The error rate is above the threshold, the stage's success rate below it, or a package
    /// became unusable: pause, saying why.
    Stop(String),
    /// Every device of the current stage is final and the stage succeeded (success rate in %).
    StageDone(f64),
    /// Every device of the last stage is final.
    AllDone,
}

/// An input to the machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// From an operator.
    Act(Action),
    /// From the scheduler.
    Judged(Verdict),
}

/// A transition to carry out.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The new status.
    pub to: RolloutStatus,
    /// Entries for the rollout's events: (action, reason).
    pub events: Vec<(&'static str, Option<String>)>,
    /// The stage index moves one forward.
    pub next_stage: bool,
    /// Why, when the step pauses the rollout.
    pub reason: Option<String>,
    /// Undispatched members become `canceled` (cancel).
    pub cancel_members: bool,
    /// Failed members so far stop counting against the thresholds (resume).
    pub acknowledge_failures: bool,
}

/// Why an operator's action is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a rollout that is {}", action.as_str(), status.as_str())]
pub struct Refused {
    /// The action.
    pub action: Action,
    /// The status it was refused in.
    pub status: RolloutStatus,
}

fn step(to: RolloutStatus) -> Step {
    Step {
        to,
        events: Vec::new(),
        next_stage: false,
        reason: None,
        cancel_members: false,
        acknowledge_failures: false,
    }
}

/// The step `input` causes for a rollout in `status` at 0-based `stage` of `stages`, with
/// `auto_advance`. `Ok(None)`: a verdict that does not apply in this status (ignored).
pub fn next(
    status: RolloutStatus,
    stage: usize,
    stages: usize,
    auto_advance: bool,
    input: Input,
) -> Result<Option<Step>, Refused> {
    use RolloutStatus as S;
    let stage_started = |n: usize| ("stage_started", Some(format!("stage {n}")));
    let out = match (status, input) {
        (S::Draft, Input::Act(Action::Start)) => {
            let mut s = step(S::Running);
            s.events = vec![("start", None), stage_started(1)];
            s
        }
        (S::Running | S::WaitingApproval, Input::Act(Action::Pause)) => {
            let mut s = step(S::Paused);
            s.events = vec![("pause", None)];
            s.reason = Some("paused by an operator".into());
            s
        }
        (S::Paused, Input::Act(Action::Resume)) => {
            let mut s = step(S::Running);
            s.events = vec![("resume", None)];
            s.acknowledge_failures = true;
            s
        }
        (S::WaitingApproval, Input::Act(Action::Approve)) => {
            let mut s = step(S::Running);
            s.events = vec![stage_started(stage + 2), ("approve", None)];
            s.next_stage = true;
            s
        }
        (S::Running | S::WaitingApproval | S::Paused, Input::Act(Action::Cancel)) => {
            let mut s = step(S::Canceled);
            s.events = vec![("cancel", None)];
            s.cancel_members = true;
            s
        }
        (status, Input::Act(action)) => return Err(Refused { action, status }),
        (S::Running, Input::Judged(Verdict::Stop(why))) => {
            let mut s = step(S::Paused);
            s.events = vec![("paused", Some(why.clone()))];
            s.reason = Some(why);
            s
        }
        (S::Running, Input::Judged(Verdict::AllDone)) if stage + 1 >= stages => {
            let mut s = step(S::Completed);
            s.events = vec![("completed", None)];
            s
        }
        (S::Running, Input::Judged(Verdict::StageDone(_)))
            if stage + 1 < stages && auto_advance =>
        {
            let mut s = step(S::Running);
            s.events = vec![stage_started(stage + 2)];
            s.next_stage = true;
            s
        }
        (S::Running, Input::Judged(Verdict::StageDone(success))) if stage + 1 < stages => {
            let mut s = step(S::WaitingApproval);
            s.events = vec![(
                "waiting_approval",
                Some(format!("stage {} succeeded ({success:.1} %)", stage + 1)),
            )];
            s
        }
        (_, Input::Judged(_)) => return Ok(None),
    };
    Ok(Some(out))
}

/// [`next`] for `rollout` as it stands.
pub fn next_for(rollout: &Rollout, input: Input) -> Result<Option<Step>, Refused> {
    next(
        rollout.status(),
        rollout.current_stage,
        rollout.definition.stages.len(),
        rollout.definition.auto_advance,
        input,
    )
}

/// Carries a step out on the rollout record (state and its data, stage, events, times): the
/// only place a rollout's state changes.
pub fn apply(rollout: &mut Rollout, step: &Step, now: DateTime<Utc>) {
    rollout.phase = Phase::of(step.to, step.reason.clone(), now);
    if step.next_stage {
        rollout.current_stage += 1;
    }
    if step.to == RolloutStatus::Running && rollout.started_at.is_none() {
        rollout.started_at = Some(now);
    }
    for (action, reason) in &step.events {
        rollout.event(action, reason.clone(), now);
    }
    rollout.updated_at = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use RolloutStatus as S;

    fn inputs() -> Vec<(&'static str, Input)> {
        let mut v: Vec<(&'static str, Input)> = Action::ALL
            .into_iter()
            .map(|a| (a.as_str(), Input::Act(a)))
            .collect();
        v.push(("stop", Input::Judged(Verdict::Stop("why".into()))));
        v.push(("stage done", Input::Judged(Verdict::StageDone(100.0))));
        v.push(("all done", Input::Judged(Verdict::AllDone)));
        v
    }

    /// Expected status per (status, input), in the order of `inputs()` (start, pause, resume,
    /// cancel, approve, stop, stage done, all done); `None` = refused (actions) or ignored
    /// (verdicts), for a rollout in stage 1 of 3 without auto-advance.
    #[test]
    fn every_status_and_input() {
        let table: [(S, [Option<S>; 8]); 6] = [
            (
                S::Draft,
                [Some(S::Running), None, None, None, None, None, None, None],
            ),
            (
                S::Running,
                [
                    None,
                    Some(S::Paused),
                    None,
                    Some(S::Canceled),
                    None,
                    Some(S::Paused),
                    Some(S::WaitingApproval),
                    None,
                ],
            ),
            (
                S::WaitingApproval,
                [
                    None,
                    Some(S::Paused),
                    None,
                    Some(S::Canceled),
                    Some(S::Running),
                    None,
                    None,
                    None,
                ],
            ),
            (
                S::Paused,
                [
                    None,
                    None,
                    Some(S::Running),
                    Some(S::Canceled),
                    None,
                    None,
                    None,
                    None,
                ],
            ),
            (S::Completed, [None; 8]),
            (S::Canceled, [None; 8]),
        ];
        for (status, row) in table {
            for ((name, input), want) in inputs().into_iter().zip(row) {
                let is_action = matches!(input, Input::Act(_));
                let got = next(status, 0, 3, false, input);
                match (want, got) {
                    (Some(w), Ok(Some(s))) => assert_eq!(s.to, w, "{status:?} + {name}"),
                    (None, Err(r)) if is_action => assert_eq!(r.status, status),
                    (None, Ok(None)) if !is_action => {}
                    (w, g) => panic!("{status:?} + {name}: want {w:?}, got {g:?}"),
                }
            }
        }
    }

    #[test]
    fn stages_advance_by_approval_or_automatically_and_end_at_the_last() {
        let done = || Input::Judged(Verdict::StageDone(97.5));
        let s = next(S::Running, 0, 3, true, done()).unwrap().unwrap();
        assert_eq!((s.to, s.next_stage), (S::Running, true));
        assert_eq!(s.events, vec![("stage_started", Some("stage 2".into()))]);
        let s = next(S::Running, 1, 3, false, done()).unwrap().unwrap();
        assert_eq!((s.to, s.next_stage), (S::WaitingApproval, false));
        assert_eq!(s.events[0].1.as_deref(), Some("stage 2 succeeded (97.5 %)"));
        // The last stage does not wait for approval: it completes once all are done.
        assert_eq!(next(S::Running, 2, 3, false, done()), Ok(None));
        let all = Input::Judged(Verdict::AllDone);
        assert_eq!(
            next(S::Running, 2, 3, false, all.clone())
                .unwrap()
                .unwrap()
                .to,
            S::Completed
        );
        assert_eq!(next(S::Running, 1, 3, false, all), Ok(None));
        let s = next(S::WaitingApproval, 1, 3, false, Input::Act(Action::Approve))
            .unwrap()
            .unwrap();
        assert!(s.next_stage);
        assert_eq!(s.events[0], ("stage_started", Some("stage 3".into())));
    }

    #[test]
    fn actions_parse_from_their_names_only() {
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        assert_eq!(Action::parse("Start"), None);
        assert_eq!(Action::parse("delete"), None);
        let refused = next(S::Completed, 0, 1, false, Input::Act(Action::Resume)).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "cannot resume a rollout that is completed"
        );
    }
}
