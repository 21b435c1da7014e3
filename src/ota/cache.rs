//! Memory's copies of tasks: each change stored first (one revision past the copy it was made
//! from), then indexed and announced; copies another replica changed are read again.

use super::*;

impl OtaService {
    /// Stores, indexes and announces a changed task; false if it was not stored.
    pub(super) async fn save(&self, task: &OtaTask) -> bool {
        matches!(self.save_all(&[task]).await, Ok(stale) if stale.is_empty())
    }

    /// Stores changed tasks in one write (each copy one revision past the one it was made
    /// from), then indexes and announces each. Returns the ids of the tasks the store
    /// refused because another writer changed them first (another replica, when the catalog
    /// is shared): memory gets their stored copies. `Err` when the write failed: memory stays
    /// as it was, so the events that caused the changes (delivered again) or the next timer
    /// pass make them again.
    pub(super) async fn save_all(&self, tasks: &[&OtaTask]) -> Result<Vec<String>, ()> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let next: Vec<OtaTask> = tasks
            .iter()
            .map(|t| {
                let mut t = (*t).clone();
                t.revision += 1;
                t
            })
            .collect();
        let refs: Vec<&OtaTask> = next.iter().collect();
        let written = match self.inner.stores.tasks.save_tasks(&refs).await {
            Ok(written) => written,
            Err(e) => {
                tracing::error!(tasks = tasks.len(), error = %e, "storing tasks failed");
                return Err(());
            }
        };
        let mut stale = Vec::new();
        for (task, written) in next.iter().zip(written) {
            if written {
                self.remember(task);
            } else {
                tracing::info!(task_id = %task.id, "task changed by another writer first; reading it again");
                stale.push(task.id.clone());
            }
        }
        if !stale.is_empty() {
            self.refresh(&stale).await;
        }
        Ok(stale)
    }

    /// Replaces memory's copies of `ids` with the stored ones (announcing those that
    /// changed).
    pub(super) async fn refresh(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        match self.inner.stores.tasks.tasks_by_id(ids).await {
            Ok(stored) => stored.iter().for_each(|task| self.learn(task)),
            Err(e) => tracing::warn!(tasks = ids.len(), error = %e, "reading tasks failed"),
        }
    }

    /// Tasks another replica just changed: their stored copies are taken in (and announced)
    /// while someone watches (an SSE stream besides the rollout scheduler's subscription);
    /// otherwise the periodic synchronization is soon enough.
    pub async fn changed_elsewhere(&self, ids: &[String]) {
        if self.inner.changes.receiver_count() > 1 {
            self.refresh(ids).await;
        }
    }

    /// Takes a stored copy into memory unless memory has that revision already.
    pub(super) fn learn(&self, task: &OtaTask) {
        let known = lock(&self.inner.open)
            .tasks
            .get(&task.id)
            .map(|t| t.revision);
        if known != Some(task.revision) {
            self.remember(task);
        }
    }

    /// Indexes a stored task in memory and announces it.
    pub(super) fn remember(&self, task: &OtaTask) {
        {
            let mut open = lock(&self.inner.open);
            if task.status.is_final() {
                open.release(task);
            }
            if task.settled() {
                open.forget(task);
                if task
                    .devices
                    .iter()
                    .any(|d| d.outcome == Outcome::Unverified)
                {
                    open.late.entry(task.id.clone()).or_insert(Utc::now());
                } else {
                    open.late.remove(&task.id);
                }
            } else {
                open.index(task);
            }
        }
        let _ = self.inner.changes.send((*task).clone());
    }
}
