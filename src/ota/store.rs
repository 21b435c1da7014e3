//! The storage port of OTA tasks: what the OTA service needs from any catalog backend.

use chrono::{DateTime, Utc};

use super::{OtaTask, TaskStatus};
use crate::store::{Page, PageRequest, StoreResult};

/// Which tasks a list wants.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    /// Of this gateway.
    pub gateway_sn: Option<String>,
    /// In this status.
    pub status: Option<TaskStatus>,
}

impl TaskQuery {
    /// Whether `t` is wanted.
    pub fn matches(&self, t: &OtaTask) -> bool {
        self.gateway_sn.as_deref().is_none_or(|g| t.gateway_sn == g)
            && self.status.is_none_or(|s| t.status == s)
    }
}

/// Result of [`TaskStore::insert_task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The task is stored and holds its gateway and devices until it is final.
    Inserted,
    /// `sn` (the gateway or one of the devices) is held by the open task `task_id`; nothing
    /// was stored.
    Busy {
        /// The serial number held.
        sn: String,
        /// The open task holding it.
        task_id: String,
    },
}

/// The serial numbers a task holds while open: its gateway and the devices it upgrades.
pub fn held_serials(t: &OtaTask) -> Vec<String> {
    let mut sns = vec![t.gateway_sn.clone()];
    for d in &t.devices {
        if d.outcome != super::Outcome::SkippedUpToDate && !sns.contains(&d.sn) {
            sns.push(d.sn.clone());
        }
    }
    sns
}

/// Whether a stored task may be replaced by `next`: status only moves forward
/// (`pending < sent < in_progress = paused < final`), and a final task changes only while its
/// devices settle.
pub fn is_forward(stored: TaskStatus, next: &OtaTask) -> bool {
    let rank = |s: TaskStatus| match s {
        TaskStatus::Pending => 0,
        TaskStatus::Sent => 1,
        TaskStatus::InProgress | TaskStatus::Paused => 2,
        _ => 3,
    };
    rank(next.status) >= rank(stored) && (!stored.is_final() || next.status == stored)
}

/// What a save compares of a stored task.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    /// Its status.
    pub status: TaskStatus,
    /// Its revision.
    pub revision: u64,
}

impl Stored {
    /// Whether `next` may replace this stored task: it was made from this revision (the
    /// writer bumped its copy's `revision` by one before saving) and moves forward
    /// ([`is_forward`]).
    pub fn admits(&self, next: &OtaTask) -> bool {
        next.revision == self.revision + 1 && is_forward(self.status, next)
    }
}

/// How a gateway message finds its task in the catalog (a replica that did not create it).
#[derive(Debug, Clone, Copy)]
pub enum TaskKey<'a> {
    /// The newest task whose `ota_create` had this `tid`.
    Tid(&'a str),
    /// The newest task whose `ota_create` had this `bid`.
    Bid(&'a str),
    /// The open task holding this gateway or device.
    OpenFor(&'a str),
}

/// OTA tasks and the messages that matched none.
#[async_trait::async_trait]
pub trait TaskStore: Send + Sync {
    /// One task.
    async fn task(&self, id: &str) -> StoreResult<Option<OtaTask>>;
    /// Tasks not finished, or finished at or after `since` (start-up).
    async fn recent_tasks(&self, since: DateTime<Utc>) -> StoreResult<Vec<OtaTask>>;
    /// The ids of the tasks not final (a shared catalog's replicas compare them with memory).
    async fn open_task_ids(&self) -> StoreResult<Vec<String>> {
        let far = DateTime::<Utc>::MAX_UTC;
        Ok(self
            .recent_tasks(far)
            .await?
            .into_iter()
            .filter(|t| !t.status.is_final())
            .map(|t| t.id)
            .collect())
    }
    /// The tasks of `ids` that exist, in no particular order.
    async fn tasks_by_id(&self, ids: &[String]) -> StoreResult<Vec<OtaTask>> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.extend(self.task(id).await?);
        }
        Ok(found)
    }
    /// The firmware id and package file name task `id` sends device `sn`, if both exist:
    /// what a `/dl/` URL serves (on a replica that does not hold the task in memory).
    async fn device_package(&self, id: &str, sn: &str) -> StoreResult<Option<(String, String)>> {
        Ok(self.task(id).await?.and_then(|t| {
            t.devices
                .into_iter()
                .find(|d| d.sn == sn)
                .map(|d| (d.firmware_id, d.file_name))
        }))
    }
    /// The status of each task of `ids` that exists, in no particular order.
    async fn task_statuses(&self, ids: &[String]) -> StoreResult<Vec<(String, TaskStatus)>> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.extend(self.task(id).await?.map(|t| (t.id, t.status)));
        }
        Ok(found)
    }
    /// The task a gateway message names (see [`TaskKey`]).
    async fn find_task(&self, key: TaskKey<'_>) -> StoreResult<Option<OtaTask>>;
    /// Newest-first page of the tasks `query` wants.
    async fn list_tasks(&self, query: &TaskQuery, page: &PageRequest)
    -> StoreResult<Page<OtaTask>>;
    /// Stores a new task unless its gateway or one of its devices is held by another task
    /// that is not final: the check and the insert are one atomic step, so of two concurrent
    /// creations for one gateway exactly one wins.
    async fn insert_task(&self, task: &OtaTask) -> StoreResult<Claimed>;
    /// Stores changed tasks, all or none: each one not stored yet, or made from the stored
    /// revision and forward of it ([`Stored::admits`]); returns, in order, whether each was
    /// written (false: another writer changed it first, or it would move back). A final task
    /// frees what it held. One call is one transaction (the OTA worker saves what one pass
    /// over its inbox changed together).
    async fn save_tasks(&self, tasks: &[&OtaTask]) -> StoreResult<Vec<bool>>;
    /// [`save_tasks`](TaskStore::save_tasks) for one task.
    async fn save_task(&self, task: &OtaTask) -> StoreResult<bool> {
        Ok(self
            .save_tasks(&[task])
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }
    /// Removes a task (one whose publish failed) and frees what it held.
    async fn delete_task(&self, id: &str) -> StoreResult<()>;
    /// Removes tasks that finished before `cutoff`; returns how many.
    async fn prune_tasks(&self, cutoff: DateTime<Utc>) -> StoreResult<usize>;
    /// Keeps an OTA message that matched no task (bounded; the oldest go first).
    async fn put_orphan(&self, msg: &serde_json::Value) -> StoreResult<()>;
}
