//! What the rollout service reads before a round and writes after it: its storage ports,
//! the facts a round decides on (read before it takes the lock) and the writes made under the
//! lock, stored in order before anything depends on them (a dispatch, an answer).

use super::*;

/// A write of a rollout's members (and the rollout itself) waiting to be stored.
pub(super) struct Write {
    rollout: Option<Rollout>,
    rollout_id: String,
    members: Vec<Member>,
}

/// What the rollout service stores and reads, whichever backend.
#[derive(Clone)]
pub struct RolloutStores {
    /// Rollouts and members.
    pub rollouts: Arc<dyn RolloutStore>,
    /// Firmware records (a running rollout pauses when its firmware becomes unusable).
    pub firmware: Arc<dyn FirmwareStore>,
    /// Idempotency-Key answers of `POST /api/v1/rollouts`.
    pub idempotency: Arc<dyn IdempotencyStore>,
}

/// The most waiting gateways looked up in the catalog at once.
const RECHECK_AT_ONCE: usize = 5_000;

/// What a round read before it decides (the decisions themselves take no I/O).
#[derive(Default)]
pub(super) struct Facts {
    /// Final tasks of in-flight members, by id.
    pub(super) finished: HashMap<String, OtaTask>,
    /// Status of every package's firmware, by id.
    pub(super) firmware: HashMap<String, FirmwareStatus>,
}

impl RolloutService {
    /// What the next round needs to know: the final tasks of in-flight members and the
    /// status of every package's firmware.
    pub(super) async fn facts(&self) -> Facts {
        if self.inner.lease.get().is_some() {
            self.recheck_presence().await;
        }
        let (tasks, packages): (Vec<String>, HashSet<String>) = {
            let active = lock(&self.inner.active);
            let tasks = active
                .values()
                .flat_map(|a| a.members.iter())
                .filter(|m| m.state == DeviceState::InFlight)
                .filter_map(|m| m.task_id.clone())
                .collect();
            let packages = active
                .values()
                .filter(|a| a.rollout.status() == RolloutStatus::Running)
                .flat_map(|a| a.rollout.packages.iter().map(|p| p.firmware_id.clone()))
                .collect();
            (tasks, packages)
        };
        let mut facts = Facts::default();
        // One read for every in-flight task's status, one for the final ones whole.
        let statuses = self.inner.ota.statuses(&tasks).await;
        let finished: Vec<String> = tasks
            .into_iter()
            .filter(|id| statuses.get(id).is_some_and(|s| s.is_final()))
            .collect();
        match self.inner.ota.tasks(&finished).await {
            Ok(found) => facts
                .finished
                .extend(found.into_iter().map(|t| (t.id.clone(), t))),
            Err(e) => tracing::warn!(error = %e, "reading finished tasks failed"),
        }
        for id in packages {
            let Some(fid) = crate::domain::FirmwareId::parse(&id) else {
                continue;
            };
            if let Ok(fw) = self.inner.stores.firmware.firmware(&fid).await {
                facts.firmware.insert(id, fw.status);
            }
        }
        facts
    }

    /// On a deployment of several replicas each hears only its share of a gateway's messages:
    /// the gateways running rollouts wait to dispatch that look offline here are looked up in
    /// the catalog (when the others last heard them), every [`RECHECK`] at most.
    async fn recheck_presence(&self) {
        let now = Utc::now();
        {
            let mut last = lock(&self.inner.rechecked);
            if last.is_some_and(|t| now - t < RECHECK) {
                return;
            }
            *last = Some(now);
        }
        let waiting: Vec<String> = {
            let active = lock(&self.inner.active);
            active
                .values()
                .filter(|a| a.rollout.status() == RolloutStatus::Running)
                .flat_map(|a| {
                    let stage = a.rollout.current_stage;
                    a.members.iter().filter(move |m| match m.state {
                        DeviceState::Pending => m.stage <= stage,
                        DeviceState::WaitingEligible => true,
                        _ => false,
                    })
                })
                .filter(|m| {
                    !self
                        .inner
                        .devices
                        .get(&m.gateway_sn)
                        .is_ok_and(|g| g.online)
                })
                .map(|m| m.gateway_sn.clone())
                .take(RECHECK_AT_ONCE)
                .collect()
        };
        if waiting.is_empty() {
            return;
        }
        if let Err(e) = self.inner.devices.recheck(&waiting).await {
            tracing::warn!(error = %e, "looking up waiting gateways in the catalog failed");
        }
    }

    /// Queues member rows, and the rollout record itself when `with_rollout` (its status,
    /// events or timeline changed: it is the larger write), for [`Self::store_writes`]. Called
    /// under the `active` lock; the caller stores the queue once it has let go of the lock and
    /// before anything that depends on the write (a dispatch, an answer) happens.
    pub(super) fn persist(&self, rollout: &Rollout, members: &[&Member], with_rollout: bool) {
        lock(&self.inner.writes).push(Write {
            rollout: with_rollout.then(|| rollout.clone()),
            rollout_id: rollout.id.clone(),
            members: members.iter().map(|m| (*m).clone()).collect(),
        });
    }

    /// Stores the queued writes in order, each rollout record one revision past the last
    /// one stored. Returns the rollouts another writer changed first (another replica): their
    /// remaining writes are dropped and memory gets their stored copies. On a failure, it and
    /// the writes after it go back to the front of the queue (tried again by the next call)
    /// and the error is returned.
    pub(super) async fn store_writes(&self) -> Result<Vec<String>, CatalogError> {
        let _turn = self.inner.storing.lock().await;
        let mut writes = std::mem::take(&mut *lock(&self.inner.writes)).into_iter();
        let mut stale: Vec<String> = Vec::new();
        while let Some(mut w) = writes.next() {
            if stale.contains(&w.rollout_id) {
                continue;
            }
            // One past the last revision stored (a write queued before an earlier one of
            // the same rollout was stored carries an older one).
            if let Some(r) = &mut w.rollout {
                let known = lock(&self.inner.revisions).get(&r.id).copied();
                r.revision = known.unwrap_or(0).max(r.revision) + 1;
            }
            let members: Vec<&Member> = w.members.iter().collect();
            let stored = self
                .inner
                .stores
                .rollouts
                .save_rollout(&w.rollout_id, w.rollout.as_ref(), &members)
                .await;
            match stored {
                Ok(true) => {
                    if let Some(r) = &w.rollout {
                        lock(&self.inner.revisions).insert(r.id.clone(), r.revision);
                        if let Some(a) = lock(&self.inner.active).get_mut(&r.id) {
                            a.rollout.revision = a.rollout.revision.max(r.revision);
                        }
                    }
                }
                Ok(false) => {
                    tracing::info!(rollout_id = %w.rollout_id, "rollout changed by another replica first; reading it again");
                    stale.push(w.rollout_id.clone());
                }
                Err(e) => {
                    tracing::error!(rollout_id = %w.rollout_id, error = %e, "storing rollout failed");
                    if let Some(r) = &mut w.rollout {
                        r.revision -= 1;
                    }
                    let mut queue = lock(&self.inner.writes);
                    let later = std::mem::take(&mut *queue);
                    queue.extend(std::iter::once(w).chain(writes).chain(later));
                    return Err(e);
                }
            }
        }
        for id in &stale {
            self.reload(id).await?;
        }
        Ok(stale)
    }

    /// The rollouts this replica drives: every active one, and canceled ones with tasks in
    /// flight (start-up, or when it takes over the scheduling lease).
    pub(super) async fn load_active(
        stores: &RolloutStores,
    ) -> Result<HashMap<String, Active>, CatalogError> {
        let mut active = HashMap::new();
        for r in stores.rollouts.all_rollouts().await? {
            if let Some(a) = Self::load_one(stores, r).await? {
                active.insert(a.rollout.id.clone(), a);
            }
        }
        Ok(active)
    }

    /// `r` with its members, if it is to be driven.
    async fn load_one(stores: &RolloutStores, r: Rollout) -> Result<Option<Active>, CatalogError> {
        if !(r.status().is_active() || r.status() == RolloutStatus::Canceled) {
            return Ok(None);
        }
        let members: Vec<Member> = stores.rollouts.members(&r.id).await?;
        let busy = members
            .iter()
            .any(|m| matches!(m.state, DeviceState::InFlight));
        if !r.status().is_active() && !busy {
            return Ok(None);
        }
        let now = Utc::now();
        Ok(Some(Active {
            rollout: r,
            members,
            next_slot: now,
            last_refresh: now,
            last_sample: now,
        }))
    }

    /// Replaces memory's copy of rollout `id` with the stored one (dropped when it is no
    /// longer driven, or when this replica does not drive rollouts).
    pub(super) async fn reload(&self, id: &str) -> Result<(), CatalogError> {
        let stored = match self.inner.stores.rollouts.rollout(id).await? {
            Some(r) => {
                lock(&self.inner.revisions).insert(r.id.clone(), r.revision);
                match self.drives() {
                    true => Self::load_one(&self.inner.stores, r).await?,
                    false => None,
                }
            }
            None => None,
        };
        let mut active = lock(&self.inner.active);
        match stored {
            Some(a) => Self::take_in(&mut active, a),
            None => {
                active.remove(id);
            }
        }
        Ok(())
    }

    /// Puts a copy read from the catalog into memory unless memory's is as new (a write made
    /// while it was being read); pacing continues where it was.
    pub(super) fn take_in(active: &mut HashMap<String, Active>, mut a: Active) {
        if let Some(old) = active.get(&a.rollout.id) {
            if old.rollout.revision >= a.rollout.revision {
                return;
            }
            a.next_slot = old.next_slot;
            a.last_refresh = old.last_refresh;
            a.last_sample = old.last_sample;
        }
        active.insert(a.rollout.id.clone(), a);
    }

    /// A rollout another replica just changed: the driving replica reads it again; any
    /// replica with someone watching (SSE) announces its stored view.
    pub async fn changed_elsewhere(&self, id: &str) {
        if self.drives() {
            if let Err(e) = self.reload(id).await {
                tracing::warn!(rollout_id = %id, error = %e, "reading a rollout changed elsewhere failed");
            }
            self.inner.wake.notify_one();
        }
        if self.inner.changes.receiver_count() > 0
            && let Ok(view) = self.get(id).await
        {
            let _ = self.inner.changes.send(view);
        }
    }

    /// Takes in what other replicas changed (on the replica that drives rollouts: rollouts
    /// started, or acted on, elsewhere) and notes the firmware the active rollouts use.
    pub(super) async fn discover(&self) -> Result<(), CatalogError> {
        let all = self.inner.stores.rollouts.all_rollouts().await?;
        let in_use: HashSet<String> = all
            .iter()
            .filter(|r| r.status().is_active())
            .flat_map(|r| r.packages.iter().map(|p| p.firmware_id.clone()))
            .collect();
        *lock(&self.inner.packages_in_use) = in_use;
        if !self.drives() {
            return Ok(());
        }
        let changed: Vec<String> = {
            let active = lock(&self.inner.active);
            all.iter()
                .filter(|r| match active.get(&r.id) {
                    Some(a) => r.revision > a.rollout.revision,
                    None => r.status().is_active(),
                })
                .map(|r| r.id.clone())
                .collect()
        };
        for id in changed {
            tracing::info!(rollout_id = %id, "rollout changed through another replica; reading it again");
            self.reload(&id).await?;
        }
        Ok(())
    }
}
