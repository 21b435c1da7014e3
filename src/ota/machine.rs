//! The OTA task state machine, pure: a typed event and the time go in, the task changes and
//! the effects the caller must carry out come out ([`apply`]). No I/O, no clock, no MQTT or
//! HTTP types: the MQTT adapter turns messages into [`TaskEvent`]s, the service persists and
//! publishes what [`Effects`] says.
//!
//! Invariants (several replicas may consume one gateway's messages, and MQTT orders messages
//! only per topic, never across `services_reply` and `events`):
//! - Status only moves forward: `pending` < `sent` < `in_progress` = `paused` < final.
//!   An `ota_progress` before the `services_reply` means the gateway accepted; a reply that
//!   arrives later records `replied_at` without moving the status back.
//! - A final status absorbs every later event (a late first `services_reply` is only noted in
//!   the history).
//! - Within a step, percent never goes backwards; an event of an earlier step is stale.
//! - Duplicates change nothing but the history's repeat count.
//!
//! | state \ event        | reply ok            | reply result≠0 | progress (status s)        | progress result≠0 | reply timeout | progress timeout | devices on target |
//! |----------------------|---------------------|----------------|----------------------------|-------------------|---------------|------------------|-------------------|
//! | pending, sent        | max(sent, s)        | rejected       | max(in_progress, s)        | failed            | timeout¹      | timeout          | ok                |
//! | in_progress, paused  | replied_at only     | rejected       | s (paused ⇄ in_progress)   | failed            | –             | timeout          | ok                |
//! | final                | history once²       | history once²  | –                          | –                 | –             | –                | –                 |
//!
//! ¹ only while no reply has arrived. ² only the first reply of a task. `published` moves
//! `pending` to `sent` and changes nothing else.

use chrono::{DateTime, Utc};

use super::task::{OtaTask, RawJson, TaskStatus};

/// What a gateway's `services_reply` or `ota_progress` carried, parsed leniently.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// `data.result` (0 = success).
    pub result: i64,
    /// `output.status`, if known.
    pub status: Option<TaskStatus>,
    /// `output.progress.percent` (0–100).
    pub percent: Option<i64>,
    /// The step (`download_firmware` / `upgrade_firmware` or what the gateway sent).
    pub step_key: Option<String>,
    /// Autel `sub_status`.
    pub sub_status: Option<String>,
    /// `output.ext.rate`.
    pub rate: Option<i64>,
}

/// An event for one task.
#[derive(Clone, Debug)]
pub enum TaskEvent {
    /// The `ota_create` left (with the JSON sent).
    Published(Option<RawJson>),
    /// The gateway's `services_reply` to the `ota_create`.
    Reply(Report, Option<RawJson>),
    /// An `ota_progress` event.
    Progress(Report, Option<RawJson>),
    /// No `services_reply` within the reply timeout.
    ReplyTimeout,
    /// No event within the progress timeout.
    ProgressTimeout,
    /// Every pending device reports the target while not upgrading (the final progress was
    /// lost).
    DevicesOnTarget,
}

impl TaskEvent {
    fn source(&self) -> &'static str {
        match self {
            TaskEvent::Published(_) => "publish",
            TaskEvent::Reply(..) => "services_reply",
            TaskEvent::Progress(..) => "ota_progress",
            TaskEvent::ReplyTimeout | TaskEvent::ProgressTimeout => "timeout",
            TaskEvent::DevicesOnTarget => "reconcile",
        }
    }
}

/// What the caller must do after [`apply`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// The task changed: persist it (before any side effect) and notify watchers.
    pub save: bool,
    /// The task became final now with this status: count it and settle its devices.
    pub finished: Option<TaskStatus>,
}

/// Forward order of the statuses (`in_progress` and `paused` share a rank).
fn rank(s: TaskStatus) -> u8 {
    match s {
        TaskStatus::Pending => 0,
        TaskStatus::Sent => 1,
        TaskStatus::InProgress | TaskStatus::Paused => 2,
        _ => 3,
    }
}

/// Order of the known steps; an unknown step ranks with the download.
fn step_rank(step: Option<&str>) -> u8 {
    match step {
        None => 0,
        Some("upgrade_firmware") => 2,
        Some(_) => 1,
    }
}

/// Moves the status to `to` if that is forward, or (with `lateral`, for progress events)
/// between `in_progress` and `paused`.
fn advance(task: &mut OtaTask, to: TaskStatus, lateral: bool) -> bool {
    let from = task.status;
    if from == to || from.is_final() {
        return false;
    }
    if rank(to) > rank(from) || lateral && rank(to) == 2 && rank(from) == 2 {
        task.status = to;
        return true;
    }
    false
}

/// Merges a report's progress: a later step replaces an earlier one, percent only grows
/// within a step, and a report of an earlier step is stale.
fn merge_progress(task: &mut OtaTask, r: &Report) -> bool {
    let p = &mut task.progress;
    let before = p.clone();
    let (have, got) = (
        step_rank(p.step_key.as_deref()),
        step_rank(r.step_key.as_deref()),
    );
    if r.step_key.is_some() && got < have {
        return false;
    }
    let new_step = r.step_key.is_some() && r.step_key != p.step_key;
    if new_step {
        p.step_key = r.step_key.clone();
        p.percent = r.percent.map(|x| x.clamp(0, 100));
    } else if let Some(x) = r.percent.map(|x| x.clamp(0, 100)) {
        p.percent = Some(p.percent.map_or(x, |old| old.max(x)));
    }
    if r.sub_status.is_some() {
        p.sub_status = r.sub_status.clone();
    }
    if r.rate.is_some() {
        p.rate = r.rate;
    }
    *p != before
}

fn fail_with(task: &mut OtaTask, result: i64) {
    let (reason, retry) = super::task::explain(result);
    task.result_code = Some(result);
    task.result_reason = Some(reason);
    task.retryable = Some(retry);
}

/// Applies `event` at `now` to `task`; returns what the caller must carry out.
pub fn apply(task: &mut OtaTask, event: TaskEvent, now: DateTime<Utc>) -> Effects {
    let source = event.source();
    let was_final = task.status.is_final();
    let mut changed = false;
    let raw = match event {
        TaskEvent::Published(raw) => {
            changed |= advance(task, TaskStatus::Sent, false);
            if !changed {
                return Effects::default();
            }
            raw
        }
        TaskEvent::Reply(r, raw) => {
            if was_final {
                // A reply that only arrives after the task ended is noted once.
                if task.replied_at.is_some() {
                    return Effects::default();
                }
                task.replied_at = Some(now);
                task.note(source, raw, now);
                return Effects {
                    save: true,
                    finished: None,
                };
            }
            task.last_event_at = Some(now);
            if task.replied_at.is_none() {
                task.replied_at = Some(now);
                changed = true;
            }
            let to = match r.status {
                _ if r.result != 0 => TaskStatus::Rejected,
                Some(s) if s.is_final() || rank(s) >= 1 => s,
                _ => TaskStatus::Sent,
            };
            if r.result != 0 {
                fail_with(task, r.result);
            }
            changed |= advance(task, to, false);
            changed |= merge_progress(task, &r);
            raw
        }
        TaskEvent::Progress(r, raw) => {
            if was_final {
                return Effects::default();
            }
            task.last_event_at = Some(now);
            let to = match r.status {
                Some(s) if r.result != 0 && !s.is_final() => Some(TaskStatus::Failed),
                None if r.result != 0 => Some(TaskStatus::Failed),
                // A progress event means the gateway accepted, whatever its status says.
                Some(TaskStatus::Pending | TaskStatus::Sent) | None => Some(TaskStatus::InProgress),
                Some(s) => Some(s),
            };
            if r.result != 0 {
                fail_with(task, r.result);
            }
            if let Some(to) = to {
                changed |= advance(task, to, true);
            }
            changed |= merge_progress(task, &r);
            raw
        }
        TaskEvent::ReplyTimeout => {
            if task.replied_at.is_some() || rank(task.status) >= 2 {
                return Effects::default();
            }
            changed |= advance(task, TaskStatus::Timeout, false);
            None
        }
        TaskEvent::ProgressTimeout => {
            changed |= advance(task, TaskStatus::Timeout, false);
            None
        }
        TaskEvent::DevicesOnTarget => {
            changed |= advance(task, TaskStatus::Ok, false);
            if changed {
                task.last_event_at = Some(now);
            }
            None
        }
    };
    let finished = (!was_final && task.status.is_final()).then_some(task.status);
    if finished.is_some() {
        task.finished_at = Some(now);
    }
    // Messages always enter the history (a duplicate counts as a repeat there); timer events
    // only when they changed something.
    let is_message = matches!(source, "services_reply" | "ota_progress");
    if changed || is_message {
        task.note(source, raw, now);
    }
    Effects {
        save: changed || is_message,
        finished,
    }
}

/// The timer event due for `task` at `now`, if any: no reply within `reply_timeout` of the
/// last event while `sent`, or no event within `progress_timeout` while open.
pub fn due(
    task: &OtaTask,
    now: DateTime<Utc>,
    reply_timeout: std::time::Duration,
    progress_timeout: std::time::Duration,
) -> Option<TaskEvent> {
    if task.status.is_final() {
        return None;
    }
    let last = task.last_event_at.unwrap_or(task.created_at);
    let silent = (now - last).to_std().unwrap_or_default();
    if task.replied_at.is_none() && rank(task.status) <= 1 {
        (silent > reply_timeout).then_some(TaskEvent::ReplyTimeout)
    } else {
        (silent > progress_timeout).then_some(TaskEvent::ProgressTimeout)
    }
}

#[cfg(test)]
mod tests;
