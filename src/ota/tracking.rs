//! Following tasks: gateway messages and timers go through the state machine; device reports
//! settle outcomes (verification, late verification) and close tasks whose final progress was
//! lost.

use super::*;

/// The history source of an `ota_create` sent again.
pub(super) const RESENT: &str = "publish_again";

/// The most gateway messages recorded together (one catalog transaction).
const BATCH: usize = 256;
/// How often devices left `unverified` are checked for a late report of the target.
const LATE_EVERY: Duration = Duration::from_secs(5);
/// How often memory takes in the open tasks of a shared catalog.
const SYNC_EVERY: Duration = Duration::from_secs(5);

/// What became of one message of a batch.
enum Staged {
    /// Recorded (or nothing to record): acknowledge it.
    Recorded,
    /// It changed this task (the change waits in the batch): acknowledge it once the batch
    /// is stored.
    Changed(String),
    /// Its change could not be stored: leave it unacknowledged.
    Failed,
}

/// What finds a message's task.
struct Keys {
    is_reply: bool,
    topic_sn: String,
    tid: Option<String>,
    bid: Option<String>,
}

/// Messages waiting for their task to be stored, with the task's id.
type Waiting = Vec<(String, crate::domain::Ack)>;

/// A batch's changes not stored yet: the tasks, the messages behind them, and the tasks
/// another replica changed first.
struct Unsettled {
    changes: Changes,
    waiting: Waiting,
    stale: Vec<String>,
}

/// How often a batch is applied again to fresh copies of tasks another replica changed first
/// (replicas handling events of one gateway at the same moment), each time after a jittered
/// pause that doubles from [`CONFLICT_PAUSE`] up to 1 s: together about 10 s at most, for
/// contention that clears in milliseconds.
const CONFLICT_RETRIES: u32 = 12;
/// The first pause before a batch is applied again.
const CONFLICT_PAUSE: Duration = Duration::from_millis(5);

/// Tasks a batch changed, each once (its latest copy), and the events that changed them (to
/// apply again to a fresh copy when another writer changed a task first).
#[derive(Default)]
struct Changes {
    tasks: Vec<OtaTask>,
    events: Vec<(String, machine::TaskEvent, DateTime<Utc>)>,
}

impl Changes {
    fn get(&self, id: &str) -> Option<&OtaTask> {
        self.tasks.iter().find(|t| t.id == id)
    }

    fn keep(&mut self, task: OtaTask) {
        match self.tasks.iter_mut().find(|t| t.id == task.id) {
            Some(slot) => *slot = task,
            None => self.tasks.push(task),
        }
    }

    fn all(&self) -> Vec<&OtaTask> {
        self.tasks.iter().collect()
    }
}

impl OtaService {
    /// Applies a gateway message and acknowledges it once recorded; a message whose change
    /// could not be stored stays unacknowledged, so the broker delivers it again.
    pub async fn on_message(&self, msg: OtaMessage) {
        self.on_messages(vec![msg]).await;
    }

    /// Applies gateway messages in order, stores what they changed in one write, and then
    /// acknowledges them. A task another replica changed first is read again and the batch's
    /// events for it applied to the fresh copy (the state machine does not depend on order).
    /// What could not be stored is not acknowledged (the broker delivers it again) and memory
    /// stays as it was.
    pub async fn on_messages(&self, batch: Vec<OtaMessage>) {
        let mut changes = Changes::default();
        let mut waiting: Waiting = Vec::new();
        for mut msg in batch {
            let ack = std::mem::take(&mut msg.ack);
            match self.stage(msg, &mut changes).await {
                Staged::Recorded => ack.done(),
                Staged::Changed(id) => waiting.push((id, ack)),
                Staged::Failed => {
                    tracing::warn!("OTA message not recorded; left unacknowledged for redelivery")
                }
            }
        }
        let unsettled = Unsettled {
            changes,
            waiting,
            stale: Vec::new(),
        };
        // The first write and one immediate retry here; a task still contended (replicas
        // handling one gateway's burst of events) is retried in the background with pauses,
        // so that the messages after this batch are not held up by it.
        if let Some(unsettled) = self.settle(unsettled, 2, false).await {
            let this = self.clone();
            tokio::spawn(async move {
                this.settle(unsettled, CONFLICT_RETRIES, true).await;
            });
        }
    }

    /// Stores `u`'s tasks and acknowledges the messages behind them, reading again each task
    /// another replica changed first and applying its events to the fresh copy, `attempts`
    /// times at most (after a jittered pause doubling from [`CONFLICT_PAUSE`] when `pause`).
    /// Returns what is still not stored; what cannot be stored stays unacknowledged.
    async fn settle(&self, mut u: Unsettled, attempts: u32, pause: bool) -> Option<Unsettled> {
        for attempt in 0..attempts {
            if !u.stale.is_empty() {
                if pause {
                    let pause = CONFLICT_PAUSE.saturating_mul(1 << attempt.min(8));
                    tokio::time::sleep(crate::domain::jittered(pause.min(Duration::from_secs(1))))
                        .await;
                }
                if pause {
                    // The copies read when the write was refused may be old by now.
                    self.refresh(&u.stale).await;
                }
                match self.replay(&u.changes, &u.stale).await {
                    Ok(fresh) => u.changes = fresh,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading tasks changed elsewhere failed");
                        break;
                    }
                }
            }
            let Ok(stale) = self.save_all(&u.changes.all()).await else {
                break;
            };
            let (done, rest): (Vec<_>, Vec<_>) = u
                .waiting
                .into_iter()
                .partition(|(id, _)| !stale.contains(id));
            done.into_iter().for_each(|(_, ack)| ack.done());
            u.waiting = rest;
            u.stale = stale;
            if u.stale.is_empty() {
                return None;
            }
            if attempt + 1 == attempts && !pause {
                return Some(u);
            }
        }
        if !u.waiting.is_empty() {
            tracing::warn!(
                messages = u.waiting.len(),
                "OTA messages not recorded; left unacknowledged for redelivery"
            );
        }
        None
    }

    /// Fresh copies of the `stale` tasks (memory's: the refused write read them again) with
    /// the batch's events for them applied again.
    async fn replay(&self, batch: &Changes, stale: &[String]) -> Result<Changes, CatalogError> {
        let mut fresh = Changes::default();
        for id in stale {
            let in_memory = lock(&self.inner.open).tasks.get(id).cloned();
            // A task that settled is no longer in memory.
            let task = match in_memory {
                Some(task) => Some(task),
                None => self.inner.stores.tasks.task(id).await?,
            };
            let Some(mut task) = task else {
                continue;
            };
            let mut changed = false;
            for (_, event, at) in batch.events.iter().filter(|(t, _, _)| t == id) {
                changed |= self.step(&mut task, event.clone(), *at);
                fresh.events.push((id.clone(), event.clone(), *at));
            }
            if changed {
                fresh.keep(task);
            } else {
                // Nothing left to store: the fresh copy is what memory should hold.
                self.remember(&task);
            }
        }
        Ok(fresh)
    }

    /// The task a message names: in memory (the batch's copy if the batch changed it
    /// already), else — when the catalog is shared with other replicas — in the catalog.
    async fn task_of(
        &self,
        msg: &Keys,
        changes: &Changes,
    ) -> Result<Option<OtaTask>, CatalogError> {
        let in_memory = {
            let open = lock(&self.inner.open);
            let by_id = |id: Option<&String>| {
                let id = id?;
                changes.get(id).or_else(|| open.tasks.get(id)).cloned()
            };
            if msg.is_reply {
                msg.tid.as_ref().and_then(|tid| by_id(open.by_tid.get(tid)))
            } else {
                msg.bid
                    .as_ref()
                    .and_then(|bid| by_id(open.by_bid.get(bid)))
                    .or_else(|| by_id(open.by_gateway.get(&msg.topic_sn)))
                    .or_else(|| {
                        let parent = self.inner.devices.get(&msg.topic_sn).ok()?.gateway_sn?;
                        by_id(open.by_gateway.get(&parent))
                    })
            }
        };
        if in_memory.is_some() || !self.inner.settings.shared {
            return Ok(in_memory);
        }
        let tasks = &self.inner.stores.tasks;
        if msg.is_reply {
            let Some(tid) = msg.tid.as_deref() else {
                return Ok(None);
            };
            let found = tasks.find_task(TaskKey::Tid(tid)).await?;
            // A settled task takes the late-reply path (below, in `stage`).
            return Ok(found.filter(|t| !t.status.is_final()));
        }
        // A task found by bid is the one, final or not (a final state absorbs a late event);
        // only an unknown bid falls back on the gateway's open task.
        if let Some(bid) = msg.bid.as_deref()
            && let Some(found) = tasks.find_task(TaskKey::Bid(bid)).await?
        {
            return Ok(Some(found));
        }
        let found = tasks.find_task(TaskKey::OpenFor(&msg.topic_sn)).await?;
        Ok(found.filter(|t| !t.status.is_final()))
    }

    /// Applies a gateway message to its task (the batch's copy if the batch changed it
    /// already) and keeps the change in `changes`.
    async fn stage(&self, msg: OtaMessage, changes: &mut Changes) -> Staged {
        let now = self.inner.clock.now();
        let keys = Keys {
            is_reply: msg.is_reply,
            topic_sn: msg.topic_sn.clone(),
            tid: msg.tid.clone(),
            bid: msg.bid.clone(),
        };
        if !msg.is_reply
            && msg
                .bid
                .as_ref()
                .is_some_and(|bid| lock(&self.inner.open).settled_bids.contains(bid))
        {
            // A late event of a task that settled here: its final state absorbs it.
            return Staged::Recorded;
        }
        let task = match self.task_of(&keys, changes).await {
            Ok(task) => task,
            Err(e) => {
                tracing::warn!(error = %e, "finding the task of an OTA message failed");
                return Staged::Failed;
            }
        };
        let task = match task {
            Some(task) => Some(task),
            // A reply that arrives after its task ended (its progress came first).
            None if msg.is_reply => self.settled_task(msg.tid.as_deref()).await,
            None => None,
        };
        let Some(mut task) = task else {
            return self.orphan(msg, now).await;
        };
        let msg_is_reply = msg.is_reply;
        let event = if msg.is_reply {
            machine::TaskEvent::Reply(msg.report, Some(msg.raw))
        } else {
            machine::TaskEvent::Progress(msg.report, Some(msg.raw))
        };
        changes.events.push((task.id.clone(), event.clone(), now));
        let was_final = task.status.is_final();
        if self.step(&mut task, event, now) {
            if was_final {
                tracing::info!(task_id = %task.id, "services_reply recorded after the task ended");
            }
            let id = task.id.clone();
            changes.keep(task);
            Staged::Changed(id)
        } else {
            if was_final && msg_is_reply {
                tracing::info!(task_id = %task.id, "repeated services_reply for a finished task ignored");
            }
            Staged::Recorded
        }
    }

    /// Keeps a message that matches no task.
    async fn orphan(&self, msg: OtaMessage, now: DateTime<Utc>) -> Staged {
        tracing::info!(topic_sn = %msg.topic_sn, tid = ?msg.tid, bid = ?msg.bid, method = ?msg.method, "OTA message matches no open task (orphan)");
        let orphan = json!({"at": now, "topic_sn": msg.topic_sn, "tid": msg.tid, "bid": msg.bid,
            "method": msg.method, "raw": msg.raw});
        drop(msg);
        match self.inner.stores.tasks.put_orphan(&orphan).await {
            Ok(()) => Staged::Recorded,
            Err(e) => {
                tracing::warn!(error = %e, "storing an orphan OTA message failed");
                Staged::Failed
            }
        }
    }

    /// Runs the state machine on `task` and carries out its effects in memory: settle devices
    /// and count a task that just ended. Returns whether the task changed (to be stored).
    fn step(&self, task: &mut OtaTask, event: machine::TaskEvent, now: DateTime<Utc>) -> bool {
        let fx = machine::apply(task, event, now);
        if let Some(status) = fx.finished {
            self.inner.counters.finish(status);
            self.finish_devices(task, now);
            tracing::info!(task_id = %task.id, status = ?status, "OTA task finished");
        }
        fx.save
    }

    /// A recently settled task by the tid of its `ota_create`, from the catalog (any task
    /// with that tid when the catalog is shared: another replica may have settled it).
    async fn settled_task(&self, tid: Option<&str>) -> Option<OtaTask> {
        let tid = tid?;
        let id = lock(&self.inner.open)
            .settled_tids
            .iter()
            .rev()
            .find(|(t, _, _)| t == tid)
            .map(|(_, id, _)| id.clone());
        let tasks = &self.inner.stores.tasks;
        match id {
            Some(id) => tasks.task(&id).await.ok()?,
            None if self.inner.settings.shared => tasks.find_task(TaskKey::Tid(tid)).await.ok()?,
            None => None,
        }
    }

    fn finish_devices(&self, task: &mut OtaTask, now: DateTime<Utc>) {
        if task.status != TaskStatus::Ok {
            for d in &mut task.devices {
                if d.outcome == Outcome::Pending {
                    // Not upgraded, unless the device later reports the target (late verify).
                    d.outcome = Outcome::Pending;
                }
            }
        }
        self.verify(task, now);
    }

    /// Whether `d`'s device has reported since the task began, runs the target, and (for a
    /// consistency upgrade) is consistent again: (reported since, on target, verified).
    fn check_device(
        &self,
        task_created: DateTime<Utc>,
        d: &TaskDevice,
    ) -> Option<(bool, bool, bool)> {
        let dev = self.inner.devices.get(&d.sn).ok()?;
        let reported_after = dev.last_state_at.is_some_and(|t| t >= task_created);
        let on_target = dev.firmware_version.as_deref().is_some_and(|v| {
            v == d.product_version
                || matches!((ProductVersion::parse(v), ProductVersion::parse(&d.product_version)), (Ok(a), Ok(b)) if a == b)
        });
        let consistent = d.upgrade_type != Some(2) || dev.compatible_status == Some(0);
        Some((
            reported_after,
            on_target,
            reported_after && on_target && consistent,
        ))
    }

    /// Settles device outcomes from the registry's latest reports.
    fn verify(&self, task: &mut OtaTask, now: DateTime<Utc>) -> bool {
        let mut changed = false;
        let finished = task.finished_at.unwrap_or(now);
        let window = chrono::Duration::from_std(self.inner.settings.verify_window)
            .unwrap_or(chrono::Duration::seconds(900));
        for d in task
            .devices
            .iter_mut()
            .filter(|d| d.outcome == Outcome::Pending)
        {
            let Some((reported_after, on_target, verified)) = self.check_device(task.created_at, d)
            else {
                continue;
            };
            if verified {
                d.outcome = Outcome::Verified;
                d.outcome_at = Some(now);
                changed = true;
            } else if task.status.is_final() && now - finished > window {
                d.outcome = if task.status == TaskStatus::Ok && reported_after && !on_target {
                    Outcome::Mismatch
                } else {
                    Outcome::Unverified
                };
                d.outcome_at = Some(now);
                changed = true;
            }
        }
        changed
    }

    /// One pass of the timers: reply and progress timeouts, device verification.
    pub async fn tick(&self) {
        let now = self.inner.clock.now();
        let tasks: Vec<OtaTask> = lock(&self.inner.open).tasks.values().cloned().collect();
        let s = &self.inner.settings;
        let mut changes = Changes::default();
        for mut t in tasks {
            let due = machine::due(&t, now, s.reply_timeout, s.progress_timeout);
            let event = if self.devices_on_target(&t, now, due.is_some()) {
                tracing::info!(task_id = %t.id, gateway_sn = %t.gateway_sn, "OTA task closed from device reports (its final ota_progress never arrived)");
                Some(machine::TaskEvent::DevicesOnTarget)
            } else {
                due
            };
            let mut changed = false;
            if let Some(event) = event {
                if !matches!(event, machine::TaskEvent::DevicesOnTarget) {
                    tracing::warn!(task_id = %t.id, gateway_sn = %t.gateway_sn, "OTA task timed out");
                }
                changed |= self.step(&mut t, event, now);
            }
            if t.status.is_final() {
                changed |= self.verify(&mut t, now);
            }
            if changed {
                if t.devices.iter().any(|d| d.outcome != Outcome::Pending) {
                    t.updated_at = now;
                }
                changes.keep(t);
            }
        }
        let _ = self.save_all(&changes.all()).await;
    }

    /// Whether an open task's final `ota_progress` was lost (published while the broker was
    /// restarting, or while fwrepo was): it has been quiet for a while — or is about to time
    /// out (`timing_out`): a timeout never fails a task whose devices run its target — and
    /// every device still pending reports, since the task began, the task's target (and
    /// consistency, for a consistency upgrade) while not upgrading.
    fn devices_on_target(&self, task: &OtaTask, now: DateTime<Utc>, timing_out: bool) -> bool {
        // The normal path (the gateway's final ota_progress) goes first.
        let quiet = now - task.last_event_at.unwrap_or(task.created_at);
        if task.status.is_final() || (quiet < RECONCILE_AFTER && !timing_out) {
            return false;
        }
        let mut pending = task
            .devices
            .iter()
            .filter(|d| d.outcome == Outcome::Pending)
            .peekable();
        pending.peek().is_some()
            && pending.all(|d| {
                let upgrading = self.inner.devices.get(&d.sn).ok().is_none_or(|x| {
                    let busy_mode = if d.sn == task.gateway_sn { 3 } else { 13 };
                    x.firmware_upgrade_status == Some(1) || x.mode_code == Some(busy_mode)
                });
                !upgrading
                    && self
                        .check_device(task.created_at, d)
                        .is_some_and(|(_, _, verified)| verified)
            })
    }

    /// Devices left `unverified` that report the target within a day still become verified
    /// (late) and count as upgraded.
    async fn verify_late(&self, now: DateTime<Utc>) {
        let late: Vec<(String, DateTime<Utc>)> = lock(&self.inner.open)
            .late
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (id, since) in late {
            let task = match self.inner.stores.tasks.task(&id).await {
                Ok(Some(t)) if now - since <= LATE_VERIFY => t,
                _ => {
                    lock(&self.inner.open).late.remove(&id);
                    continue;
                }
            };
            let mut task = task;
            let mut changed = false;
            let created = task.created_at;
            for d in task
                .devices
                .iter_mut()
                .filter(|d| d.outcome == Outcome::Unverified)
            {
                if self
                    .check_device(created, d)
                    .is_some_and(|(_, _, verified)| verified)
                {
                    d.outcome = Outcome::Verified;
                    d.outcome_at = Some(now);
                    changed = true;
                }
            }
            if changed {
                task.note("verify_late", None, now);
                tracing::info!(task_id = %task.id, "device verified late");
                self.save(&task).await;
            }
        }
    }

    /// Runs the timers and consumes gateway messages until `cancel`.
    pub async fn run(self, mut inbox: super::OtaInbox, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(Duration::from_secs(3600));
        let mut late = tokio::time::interval(LATE_EVERY);
        late.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sync = tokio::time::interval(SYNC_EVERY);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = prune.tick() => {
                    let cutoff = self.inner.clock.now()
                        - chrono::Duration::from_std(self.inner.settings.retention).unwrap_or_default();
                    match self.inner.stores.tasks.prune_tasks(cutoff).await {
                        Ok(n) if n > 0 => tracing::info!(removed = n, "pruned OTA tasks past retention"),
                        Err(e) => tracing::warn!(error = %e, "pruning OTA tasks failed"),
                        _ => {}
                    }
                }
                _ = sync.tick(), if self.inner.settings.shared => self.sync_open().await,
                _ = tick.tick(), if self.runs_timers() => self.tick().await,
                // Each reads its tasks from the catalog: not twice a second.
                _ = late.tick(), if self.runs_timers() => {
                    self.verify_late(self.inner.clock.now()).await;
                }
                Some(msg) = inbox.recv() => {
                    // What else waits is recorded with it, in one write.
                    let mut batch = vec![msg];
                    while batch.len() < BATCH {
                        match inbox.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(_) => break,
                        }
                    }
                    self.on_messages(batch).await;
                }
            }
        }
    }
}
