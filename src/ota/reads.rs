//! What the API, downloads and rollouts read of tasks: from memory where this process's copy
//! is the truth, else from the catalog (a shared one, or a task that settled).

use super::*;

impl OtaService {
    /// One task (its devices' `download_session` is for the caller to fill).
    pub async fn get(&self, id: &str) -> Result<OtaTask, OtaError> {
        let open = (!self.inner.settings.shared)
            .then(|| lock(&self.inner.open).tasks.get(id).cloned())
            .flatten();
        let t = match open {
            Some(t) => t,
            None => self
                .inner
                .stores
                .tasks
                .task(id)
                .await?
                .ok_or_else(|| OtaError::NotFound(format!("task {id} not found")))?,
        };
        Ok(t)
    }

    /// A task's status without copying it (open tasks from memory).
    pub async fn status(&self, id: &str) -> Option<TaskStatus> {
        if !self.inner.settings.shared
            && let Some(t) = lock(&self.inner.open).tasks.get(id)
        {
            return Some(t.status);
        }
        let stored = self.inner.stores.tasks.task(id).await;
        stored.ok().flatten().map(|t| t.status)
    }

    /// The status of each task of `ids` that exists, in one read (open tasks from memory
    /// when the catalog is this process's own).
    pub async fn statuses(&self, ids: &[String]) -> HashMap<String, TaskStatus> {
        let mut found = HashMap::new();
        let mut rest = Vec::new();
        {
            let open = lock(&self.inner.open);
            for id in ids {
                match open.tasks.get(id).filter(|_| !self.inner.settings.shared) {
                    Some(t) => {
                        found.insert(id.clone(), t.status);
                    }
                    None => rest.push(id.clone()),
                }
            }
        }
        match self.inner.stores.tasks.task_statuses(&rest).await {
            Ok(stored) => found.extend(stored),
            Err(e) => tracing::warn!(error = %e, "reading task statuses failed"),
        }
        found
    }

    /// The tasks of `ids` that exist, whole, in one read (their devices' `download_session`
    /// is for the caller to fill).
    pub async fn tasks(&self, ids: &[String]) -> Result<Vec<OtaTask>, OtaError> {
        Ok(self.inner.stores.tasks.tasks_by_id(ids).await?)
    }

    /// Newest-first page of tasks.
    pub async fn list(
        &self,
        query: &TaskQuery,
        page: &PageRequest,
    ) -> Result<Page<OtaTask>, OtaError> {
        Ok(self.inner.stores.tasks.list_tasks(query, page).await?)
    }

    /// The firmware and file name behind a per-task URL, if the task and device exist.
    /// Runs on every request to a `/dl/` URL: open tasks are read in place, not copied.
    pub async fn download_target(&self, task_id: &str, sn: &str) -> Option<(String, String)> {
        let of = |t: &OtaTask| {
            t.devices
                .iter()
                .find(|d| d.sn == sn)
                .map(|d| (d.firmware_id.clone(), d.file_name.clone()))
        };
        if let Some(t) = lock(&self.inner.open).tasks.get(task_id) {
            return of(t);
        }
        // Only the device's row: a task's history is no business of a download.
        let stored = self.inner.stores.tasks.device_package(task_id, sn).await;
        stored.ok().flatten()
    }
}
