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
        for id in tasks {
            if !self
                .inner
                .ota
                .status(&id)
                .await
                .is_some_and(TaskStatus::is_final)
            {
                continue;
            }
            if let Ok(task) = self.inner.ota.get(&id).await {
                facts.finished.insert(id, task);
            }
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

    /// Stores the queued writes in order. On a failure, it and the writes after it go back
    /// to the front of the queue (tried again by the next call) and the error is returned.
    pub(super) async fn store_writes(&self) -> Result<(), CatalogError> {
        let _turn = self.inner.storing.lock().await;
        let mut writes = std::mem::take(&mut *lock(&self.inner.writes)).into_iter();
        while let Some(w) = writes.next() {
            let members: Vec<&Member> = w.members.iter().collect();
            let stored = self
                .inner
                .stores
                .rollouts
                .save_rollout(&w.rollout_id, w.rollout.as_ref(), &members)
                .await;
            if let Err(e) = stored {
                tracing::error!(rollout_id = %w.rollout_id, error = %e, "storing rollout failed");
                let mut queue = lock(&self.inner.writes);
                let later = std::mem::take(&mut *queue);
                queue.extend(std::iter::once(w).chain(writes).chain(later));
                return Err(e);
            }
        }
        Ok(())
    }
}
