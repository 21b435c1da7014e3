//! The scheduler: every round it follows each running rollout's OTA tasks, judges its stage
//! (thresholds, stage moves through the state machine) and dispatches the next gateways at the
//! rate limit and in-flight cap.

use super::*;
use storage::Facts;

impl RolloutService {
    /// On a deployment of several replicas, notes in a running rollout's events that this
    /// replica drives it, when another one (or none) did before. Returns whether it did.
    fn note_driver(&self, a: &mut Active, now: DateTime<Utc>) -> bool {
        let Some(me) = self.inner.lease.get().map(|l| l.holder()) else {
            return false;
        };
        if a.rollout.status() != RolloutStatus::Running || a.rollout.driver() == Some(me) {
            return false;
        }
        a.rollout.event(DRIVEN_BY, Some(me.to_string()), now);
        true
    }

    /// Follows the tasks of one rollout and decides what to dispatch, from `facts` read
    /// before (no I/O here: writes are queued). Returns the dispatches to make.
    fn step(&self, a: &mut Active, facts: &Facts, now: DateTime<Utc>) -> Vec<Dispatch> {
        let def = a.rollout.definition.clone();
        let mut changed: Vec<usize> = Vec::new();
        let canceled = a.rollout.status() == RolloutStatus::Canceled;
        for (i, m) in a.members.iter_mut().enumerate() {
            let mut moved = self.follow(m, &def, facts, now);
            // A canceled rollout only sees its in-flight tasks to their end: no retries.
            if canceled && !m.state.is_final() && m.state != DeviceState::InFlight {
                m.set_state(DeviceState::Canceled, now);
                moved = true;
            }
            if moved {
                changed.push(i);
            }
        }
        // Look for gateways that joined the target now and then, and always before the last
        // stage is judged complete.
        let finishing = a.rollout.current_stage + 1 >= def.stages.len()
            && a.members.iter().all(|m| m.state.is_final());
        if a.rollout.status() == RolloutStatus::Running
            && def.include_new_devices
            && def.target.model.is_some()
            && (finishing || now - a.last_refresh >= REFRESH_TARGET)
        {
            a.last_refresh = now;
            let existing: HashSet<String> =
                a.members.iter().map(|m| m.gateway_sn.clone()).collect();
            let last = def.stages.len() - 1;
            for mut m in self.resolve_members(&a.rollout, &existing) {
                m.stage = last;
                tracing::info!(rollout_id = %a.rollout.id, gateway_sn = %m.gateway_sn, "gateway joined the rollout's target");
                a.members.push(m);
                changed.push(a.members.len() - 1);
            }
        }
        let mut status_changed = self.check_packages(a, facts, now) || self.judge(a, now);
        status_changed |= self.note_driver(a, now);
        let mut dispatches = Vec::new();
        if a.rollout.status() == RolloutStatus::Running {
            let mut in_flight = a
                .members
                .iter()
                .filter(|m| m.state == DeviceState::InFlight)
                .count() as u32;
            // Members cut short by a restart between storing the attempt and the answer.
            for (i, m) in a.members.iter().enumerate() {
                if m.state == DeviceState::InFlight
                    && m.task_id.is_none()
                    && let Some(key) = &m.dispatch_key
                {
                    dispatches.push((i, self.request(m, &def), key.clone()));
                }
            }
            let stage = a.rollout.current_stage;
            for i in 0..a.members.len() {
                if in_flight >= def.max_in_flight {
                    break;
                }
                let m = &a.members[i];
                let due = match m.state {
                    DeviceState::Pending => m.stage <= stage,
                    DeviceState::WaitingEligible => m.next_attempt_at.is_none_or(|t| t <= now),
                    DeviceState::Retrying => m.next_attempt_at.is_none_or(|t| t <= now),
                    _ => false,
                };
                if !due {
                    continue;
                }
                if def.rate_per_minute.is_some() && a.next_slot > now {
                    break;
                }
                // Only known gateways online since this process started are dispatched; the
                // others wait (preflight).
                let online = self.inner.devices.get(&m.gateway_sn).is_ok_and(|g| {
                    g.online && g.last_seen_at.is_some_and(|t| t >= self.inner.since)
                });
                let m = &mut a.members[i];
                if !online {
                    if m.state != DeviceState::WaitingEligible {
                        m.set_state(DeviceState::WaitingEligible, now);
                        m.waiting_since.get_or_insert(now);
                        changed.push(i);
                    }
                    continue;
                }
                self.refresh_devices(m, &a.rollout);
                m.attempts += 1;
                let key = format!("rollout:{}:{}:{}", a.rollout.id, m.gateway_sn, m.attempts);
                m.dispatch_key = Some(key.clone());
                m.task_id = None;
                m.dispatched_at = Some(now);
                m.first_dispatch_at.get_or_insert(now);
                m.next_attempt_at = None;
                m.set_state(DeviceState::InFlight, now);
                changed.push(i);
                in_flight += 1;
                if let Some(rate) = def.rate_per_minute {
                    a.next_slot = a.next_slot.max(now) + spacing(rate, &key);
                }
                dispatches.push((i, self.request(&a.members[i], &def), key));
            }
        }
        status_changed |= self.sample(a, now);
        if !changed.is_empty() || status_changed {
            changed.sort_unstable();
            changed.dedup();
            let rows: Vec<&Member> = changed.iter().map(|&i| &a.members[i]).collect();
            self.persist(&a.rollout, &rows, status_changed);
            self.publish(a);
        }
        dispatches
    }

    fn sample(&self, a: &mut Active, now: DateTime<Utc>) -> bool {
        if now - a.last_sample < SAMPLE_EVERY {
            return false;
        }
        a.last_sample = now;
        let before = a.rollout.timeline.len();
        a.rollout.sample(&a.counts(), now);
        a.rollout.timeline.len() != before
    }

    /// Re-reads the gateway's devices at its first dispatch: a never-seen dock gets its
    /// packages, a new aircraft replaces the old one (the registry is read for this gateway
    /// only).
    fn refresh_devices(&self, m: &mut Member, r: &Rollout) {
        if m.attempts > 0 {
            return;
        }
        let dock = self.inner.devices.get(&m.gateway_sn).ok();
        let child = dock
            .as_ref()
            .and_then(|d| d.child_sn.as_deref())
            .and_then(|c| self.inner.devices.get(c).ok());
        if let Some(f) = member_for(r, m.gateway_sn.clone(), dock.as_ref(), child.as_ref()) {
            m.devices = f.devices;
        }
    }

    fn request(&self, m: &Member, def: &RolloutRequest) -> OtaRequest {
        OtaRequest {
            gateway_sn: m.gateway_sn.clone(),
            devices: m
                .to_upgrade()
                .filter(|d| !d.firmware_id.is_empty())
                .map(|d| RequestDevice {
                    sn: d.sn.clone(),
                    firmware_id: Some(d.firmware_id.clone()),
                    model: None,
                    product_version: None,
                })
                .collect(),
            firmware_upgrade_type: None,
            force: false,
            allow_downgrade: def.allow_downgrade,
            dry_run: false,
        }
    }

    /// Moves one member along from its task and the registry. True if it changed.
    fn follow(
        &self,
        m: &mut Member,
        def: &RolloutRequest,
        facts: &Facts,
        now: DateTime<Utc>,
    ) -> bool {
        match m.state {
            DeviceState::InFlight => {
                let Some(task) = m.task_id.as_ref().and_then(|t| facts.finished.get(t)) else {
                    return false;
                };
                self.finish_attempt(m, task, def, now);
                true
            }
            DeviceState::Timeout => {
                let dock = self.inner.devices.get(&m.gateway_sn).ok();
                let on_target = m.to_upgrade().all(|d| {
                    self.inner.devices.get(&d.sn).is_ok_and(|x| {
                        x.firmware_version.as_deref() == Some(d.product_version.as_str())
                            && x.compatible_status != Some(1)
                    })
                });
                let fresh_idle = dock.as_ref().is_some_and(|g| {
                    g.last_seen_at.is_some_and(|t| now - t <= FRESH)
                        && g.mode_code.is_none_or(|c| c == 0)
                        && g.firmware_upgrade_status != Some(1)
                });
                let since = m.first_dispatch_at.unwrap_or(now);
                if on_target {
                    m.set_state(DeviceState::Ok, now);
                } else if fresh_idle {
                    if m.attempts <= def.max_retries {
                        m.set_state(DeviceState::Retrying, now);
                        m.next_attempt_at = Some(now);
                    } else {
                        m.set_state(DeviceState::Failed, now);
                    }
                } else if (now - since).num_seconds() > def.device_timeout_s as i64 {
                    let seen = dock
                        .and_then(|g| g.last_seen_at)
                        .is_some_and(|t| m.dispatched_at.is_some_and(|d| t >= d));
                    let state = if seen {
                        DeviceState::Failed
                    } else {
                        DeviceState::Unreachable
                    };
                    m.last_error
                        .get_or_insert_with(|| "timed out without an answer".into());
                    m.set_state(state, now);
                } else {
                    return false;
                }
                true
            }
            DeviceState::WaitingEligible => {
                let since = m.waiting_since.unwrap_or(now);
                if (now - since).num_seconds() > def.device_timeout_s as i64 {
                    m.last_error = Some(format!(
                        "not eligible within device_timeout_s ({} s)",
                        def.device_timeout_s
                    ));
                    m.set_state(DeviceState::Unreachable, now);
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    /// A task of this member ended.
    fn finish_attempt(
        &self,
        m: &mut Member,
        task: &OtaTask,
        def: &RolloutRequest,
        now: DateTime<Utc>,
    ) {
        for d in &mut m.devices {
            if task
                .devices
                .iter()
                .any(|t| t.sn == d.sn && t.outcome == Outcome::SkippedUpToDate)
            {
                d.state = DeviceState::SkippedUpToDate;
            }
        }
        match task.status {
            TaskStatus::Ok => {
                m.last_error = None;
                m.set_state(DeviceState::Ok, now);
            }
            TaskStatus::Timeout => {
                m.last_error = Some(format!("task {} timed out", task.id));
                m.waiting_since = Some(now);
                m.set_state(DeviceState::Timeout, now);
            }
            _ => {
                let why = task
                    .result_reason
                    .clone()
                    .unwrap_or_else(|| format!("task {} ended {:?}", task.id, task.status));
                m.last_error = Some(why);
                if task.retryable != Some(false) && m.attempts <= def.max_retries {
                    m.next_attempt_at =
                        Some(now + backoff(def.retry_backoff_s, m.attempts, &m.gateway_sn));
                    m.set_state(DeviceState::Retrying, now);
                } else {
                    m.set_state(DeviceState::Failed, now);
                }
            }
        }
    }

    /// Thresholds and stage moves for a running rollout. True if its status changed.
    fn judge(&self, a: &mut Active, now: DateTime<Utc>) -> bool {
        match self.verdict(a) {
            Some(v) => self.conclude(a, v, now),
            None => false,
        }
    }

    /// What the counts of a running rollout's current stage say, if anything.
    fn verdict(&self, a: &Active) -> Option<Verdict> {
        if a.rollout.status() != RolloutStatus::Running {
            return None;
        }
        let def = &a.rollout.definition;
        let stage = a.rollout.current_stage;
        let held: Vec<&Member> = a.members.iter().filter(|m| m.stage <= stage).collect();
        let mut j = Judgement::of(&model::count(held.iter().copied()));
        // Failures an operator saw and resumed past count in neither threshold again.
        let acknowledged = a.rollout.acknowledged_failed.min(j.failed);
        j.failed -= acknowledged;
        j.final_count -= acknowledged;
        j.denominator -= acknowledged;
        if let Some(rate) = j.error_rate(def.min_sample)
            && rate > def.error_threshold
        {
            return Some(Verdict::Stop(format!(
                "error rate {rate:.1} % in stage {} is above error_threshold {} % ({} of {} devices failed)",
                stage + 1,
                def.error_threshold,
                j.failed,
                j.denominator
            )));
        }
        if !held.iter().all(|m| m.state.is_final()) {
            return None;
        }
        let success = j.success_rate();
        if success < def.success_threshold {
            return Some(Verdict::Stop(format!(
                "success rate {success:.1} % in stage {} is below success_threshold {} %",
                stage + 1,
                def.success_threshold
            )));
        }
        if stage + 1 < def.stages.len() {
            Some(Verdict::StageDone(success))
        } else if a.members.iter().all(|m| m.state.is_final()) {
            Some(Verdict::AllDone)
        } else {
            None
        }
    }

    /// Carries a verdict out through the state machine. True if the status changed.
    fn conclude(&self, a: &mut Active, verdict: Verdict, now: DateTime<Utc>) -> bool {
        let Ok(Some(step)) = machine::next_for(&a.rollout, Input::Judged(verdict)) else {
            return false;
        };
        match step.to {
            RolloutStatus::Paused => {
                let why = step.reason.clone().unwrap_or_default();
                tracing::warn!(rollout_id = %a.rollout.id, reason = %why, "rollout paused");
            }
            RolloutStatus::Completed => {
                tracing::info!(rollout_id = %a.rollout.id, "rollout completed");
            }
            _ if step.next_stage => {
                let n = a.rollout.current_stage + 2;
                tracing::info!(rollout_id = %a.rollout.id, stage = n, "rollout stage started");
            }
            _ => {}
        }
        machine::apply(&mut a.rollout, &step, now);
        true
    }

    /// A running rollout whose firmware was disabled (or deleted, or found corrupt) pauses.
    fn check_packages(&self, a: &mut Active, facts: &Facts, now: DateTime<Utc>) -> bool {
        if a.rollout.status() != RolloutStatus::Running {
            return false;
        }
        let unusable = a.rollout.packages.iter().find_map(|p| {
            let status = *facts.firmware.get(&p.firmware_id)?;
            (status != FirmwareStatus::Ready).then(|| {
                let status = serde_json::to_value(status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                format!(
                    "firmware {} ({} {}) is {status}",
                    p.firmware_id, p.model, p.product_version
                )
            })
        });
        match unusable {
            Some(why) => self.conclude(a, Verdict::Stop(why), now),
            None => false,
        }
    }

    /// Applies the answer of one dispatch.
    /// `holder` is the task named by a busy answer, read before.
    fn dispatched(
        &self,
        a: &mut Active,
        i: usize,
        result: Result<Created, OtaError>,
        holder: Option<OtaTask>,
    ) {
        let Some(m) = a.members.get_mut(i) else {
            return;
        };
        answered(m, result, holder, Utc::now());
        let row = a.members[i].clone();
        self.persist(&a.rollout, &[&row], false);
    }

    /// One round over every active rollout.
    pub(super) async fn round(&self) {
        let facts = self.facts().await;
        let now = Utc::now();
        let work: Vec<(String, Vec<Dispatch>)> = {
            let mut active = lock(&self.inner.active);
            let ids: Vec<String> = active.keys().cloned().collect();
            let mut work = Vec::new();
            for id in ids {
                if let Some(a) = active.get_mut(&id) {
                    let d = self.step(a, &facts, now);
                    if !d.is_empty() {
                        work.push((id.clone(), d));
                    }
                    let idle = !a.rollout.status().is_active()
                        && !a.members.iter().any(|m| m.state == DeviceState::InFlight);
                    if idle {
                        self.persist(&a.rollout, &[], true);
                        active.remove(&id);
                    }
                }
            }
            work
        };
        // Each attempt is stored before its ota_create is sent: a restart re-sends the same
        // attempt (its dispatch key), never a second one. A rollout another replica changed
        // first (an operator's action) is read again and dispatches nothing this round.
        let Ok(stale) = self.store_writes().await else {
            return;
        };
        let work: Vec<(String, Vec<Dispatch>)> = work
            .into_iter()
            .filter(|(id, _)| !stale.contains(id))
            .collect();
        // Dispatches go out concurrently, as concurrent API requests would: their catalog
        // flushes (one before each publish) are shared instead of queued one after another.
        for (id, dispatches) in work {
            let ota = self.inner.ota.clone();
            let mut results = futures::stream::iter(dispatches.into_iter().map(|(i, req, key)| {
                let ota = ota.clone();
                async move { (i, ota.create(req, Some(key)).await) }
            }))
            .buffer_unordered(if self.inner.lease.get().is_some() {
                DISPATCH_CONCURRENCY_SHARED
            } else {
                DISPATCH_CONCURRENCY
            });
            while let Some((i, result)) = results.next().await {
                if let Err(e) = &result {
                    tracing::info!(rollout_id = %id, error = %e, "rollout dispatch not sent");
                }
                let holder = match &result {
                    Err(OtaError::GatewayBusy(t) | OtaError::DeviceBusy(t)) => {
                        self.inner.ota.get(t).await.ok()
                    }
                    _ => None,
                };
                if let Some(a) = lock(&self.inner.active).get_mut(&id) {
                    self.dispatched(a, i, result, holder);
                }
            }
            if let Some(a) = lock(&self.inner.active).get(&id) {
                self.publish(a);
            }
        }
        let _ = self.store_writes().await;
    }
}

/// What the answer of one dispatch makes of its member (`holder`: the task named by a busy
/// answer, read before).
fn answered(
    m: &mut Member,
    result: Result<Created, OtaError>,
    holder: Option<OtaTask>,
    now: DateTime<Utc>,
) {
    let retry_later = |m: &mut Member, why: String| {
        // Not an attempt: the gateway was not asked. Look again in a few seconds.
        m.attempts = m.attempts.saturating_sub(1);
        m.dispatch_key = None;
        m.last_error = Some(why);
        m.waiting_since.get_or_insert(now);
        m.next_attempt_at = Some(now + RECHECK);
        m.set_state(DeviceState::WaitingEligible, now);
    };
    match result {
        Ok(Created::Task(t)) => {
            m.task_id = Some(t.id.clone());
            m.waiting_since = None;
            for d in &mut m.devices {
                if t.devices
                    .iter()
                    .any(|x| x.sn == d.sn && x.outcome == Outcome::SkippedUpToDate)
                {
                    d.state = DeviceState::SkippedUpToDate;
                }
            }
        }
        Ok(Created::Replay(answer)) => {
            m.task_id = answer["id"].as_str().map(str::to_string);
        }
        Ok(Created::DryRun(_)) => {}
        Err(OtaError::AlreadyUpToDate) => {
            m.attempts = m.attempts.saturating_sub(1);
            m.set_state(DeviceState::SkippedUpToDate, now);
        }
        Err(OtaError::DowngradeRefused(why)) => {
            m.attempts = m.attempts.saturating_sub(1);
            m.last_error = Some(why);
            m.set_state(DeviceState::SkippedNewer, now);
        }
        // Restarted after storing the attempt: the task of this attempt already exists
        // (made at or after the attempt was stored).
        Err(OtaError::GatewayBusy(task_id) | OtaError::DeviceBusy(task_id))
            if holder.as_ref().is_some_and(|t| {
                t.id == task_id && m.dispatched_at.is_some_and(|d| t.created_at >= d)
            }) =>
        {
            m.task_id = Some(task_id);
        }
        Err(
            e @ (OtaError::Preflight { .. } | OtaError::GatewayBusy(_) | OtaError::DeviceBusy(_)),
        ) => {
            retry_later(m, e.to_string());
        }
        // Not the device's fault either: the broker, or the catalog (a pool exhausted by a
        // new driver catching up, a statement cancelled). The next attempt has the same
        // dispatch key (the attempt count is given back), so it replays this one if it
        // was stored after all.
        Err(e @ (OtaError::BrokerUnavailable | OtaError::Catalog(_))) => {
            retry_later(m, e.to_string());
        }
        Err(e) => {
            m.last_error = Some(e.to_string());
            m.set_state(DeviceState::Failed, now);
        }
    }
}

/// A member's backoff before attempt `attempts + 1`: `base × 2^(attempts-1)`, ±10 % jitter
/// from the serial (so a fleet does not come back at once).
pub(super) fn backoff(base_s: u64, attempts: u32, sn: &str) -> chrono::Duration {
    let factor = 1u64 << attempts.saturating_sub(1).min(16);
    let ms = base_s.saturating_mul(1000).saturating_mul(factor);
    let jitter = (sha2::Sha256::digest(sn.as_bytes())[0] as i64 - 128) * ms as i64 / 1280;
    chrono::Duration::milliseconds(ms as i64 + jitter)
}

/// The spacing between two dispatches at `rate` per minute, ±20 % jitter from `salt`.
pub(super) fn spacing(rate: f64, salt: &str) -> chrono::Duration {
    let ms = 60_000.0 / rate;
    let j = (sha2::Sha256::digest(salt.as_bytes())[0] as f64 / 255.0 - 0.5) * 0.4;
    chrono::Duration::milliseconds((ms * (1.0 + j)).max(0.0) as i64)
}

#[cfg(test)]
mod tests;
