//! OTA tasks in sled, with their claims on gateways and devices and the orphan messages.
//!
//! A task is stored in two parts: its head (the record without its history, plus
//! `history_len`) in `ota_tasks`, and each history entry under `<id>/<index>` in
//! `ota_task_history`. A change rewrites the head and the entries from the last stored one on
//! (its `repeats` may have grown), never the whole history: written whole, every progress
//! event appended a copy of the record to sled's log. Heads written before this layout keep
//! their history inline; the next save moves it out.

use chrono::{DateTime, Utc};
use sled::transaction::{ConflictableTransactionError, Transactional, TransactionalTree};

use super::*;
use crate::ota::store::{Claimed, Stored, TaskKey, TaskQuery, TaskStore, held_serials};
use crate::ota::task::HistoryEntry;
use crate::ota::{OtaTask, TaskStatus};

type TxError = ConflictableTransactionError<CatalogError>;

/// What a save needs of a stored head, read without its history.
#[derive(serde::Deserialize)]
struct StoredHead {
    status: TaskStatus,
    #[serde(default)]
    revision: u64,
    /// Entries in `ota_task_history`; absent in a head that keeps its history inline.
    #[serde(default)]
    history_len: Option<usize>,
}

fn stored_head(key: &[u8], v: &[u8]) -> Result<StoredHead, TxError> {
    decode(key, v).map_err(ConflictableTransactionError::Abort)
}

/// The head of `task`: the record without its history, and how long the history is.
fn encode_head(task: &OtaTask) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Head<'a> {
        #[serde(flatten)]
        task: &'a OtaTask,
        history_len: usize,
    }
    let head = OtaTask {
        id: task.id.clone(),
        gateway_sn: task.gateway_sn.clone(),
        tid: task.tid.clone(),
        bid: task.bid.clone(),
        status: task.status,
        created_at: task.created_at,
        updated_at: task.updated_at,
        devices: task.devices.clone(),
        progress: task.progress.clone(),
        result_code: task.result_code,
        result_reason: task.result_reason.clone(),
        retryable: task.retryable,
        history: Vec::new(),
        replied_at: task.replied_at,
        last_event_at: task.last_event_at,
        finished_at: task.finished_at,
        revision: task.revision,
    };
    encode(&Head {
        task: &head,
        history_len: task.history.len(),
    })
}

fn history_prefix(id: &str) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.push(b'/');
    key
}

fn history_key(id: &str, index: usize) -> Vec<u8> {
    let mut key = history_prefix(id);
    key.extend((index as u32).to_be_bytes());
    key
}

/// Writes `task` (head and the history from `stored_len - 1` on) inside a transaction.
fn write(
    tasks: &TransactionalTree,
    history: &TransactionalTree,
    task: &OtaTask,
    stored_len: usize,
) -> Result<(), TxError> {
    for (i, entry) in task
        .history
        .iter()
        .enumerate()
        .skip(stored_len.saturating_sub(1))
    {
        history.insert(history_key(&task.id, i), encode(entry))?;
    }
    tasks.insert(task.id.as_bytes(), encode_head(task))?;
    Ok(())
}

/// Removes the claims that point at `task`.
fn release(claims: &TransactionalTree, task_id: &str, sns: &[String]) -> Result<(), TxError> {
    for sn in sns {
        if claims.get(sn.as_bytes())?.as_deref() == Some(task_id.as_bytes()) {
            claims.remove(sn.as_bytes())?;
        }
    }
    Ok(())
}

impl Trees {
    /// A stored task whole: its head, and its history from `ota_task_history` (or inline).
    fn load_task(&self, key: &[u8], v: &[u8]) -> StoreResult<OtaTask> {
        self.with_history(decode(key, v)?)
    }

    /// `head` with its history (a head from before this layout has it inline already).
    fn with_history(&self, mut task: OtaTask) -> StoreResult<OtaTask> {
        if task.history.is_empty() {
            task.history = self
                .task_history
                .scan_prefix(history_prefix(&task.id))
                .map(|kv| {
                    let (k, v) = kv?;
                    decode::<HistoryEntry>(&k, &v)
                })
                .collect::<StoreResult<_>>()?;
        }
        Ok(task)
    }

    /// Removes a task's history entries.
    fn remove_history(&self, id: &str) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for k in self.task_history.scan_prefix(history_prefix(id)).keys() {
            batch.remove(k?);
        }
        self.task_history.apply_batch(batch)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl TaskStore for Catalog {
    async fn task(&self, id: &str) -> StoreResult<Option<OtaTask>> {
        let t = self.trees()?;
        t.tasks
            .get(id.as_bytes())?
            .map(|v| t.load_task(id.as_bytes(), &v))
            .transpose()
    }

    async fn recent_tasks(&self, since: DateTime<Utc>) -> StoreResult<Vec<OtaTask>> {
        let t = self.trees()?;
        let mut recent = Vec::new();
        for kv in t.tasks.iter() {
            let (k, v) = kv?;
            #[derive(serde::Deserialize)]
            struct Finished {
                status: TaskStatus,
                finished_at: Option<DateTime<Utc>>,
            }
            let f: Finished = decode(&k, &v)?;
            if f.finished_at.is_none_or(|f| f >= since) || !f.status.is_final() {
                recent.push(t.load_task(&k, &v)?);
            }
        }
        Ok(recent)
    }

    async fn find_task(&self, key: TaskKey<'_>) -> StoreResult<Option<OtaTask>> {
        let t = self.trees()?;
        if let TaskKey::OpenFor(sn) = key {
            let Some(id) = t.claims.get(sn.as_bytes())? else {
                return Ok(None);
            };
            let Some(v) = t.tasks.get(&id)? else {
                return Ok(None);
            };
            let task = t.load_task(&id, &v)?;
            return Ok((!task.status.is_final()).then_some(task));
        }
        // By tid or bid: newest first through the heads (a single process keeps its open
        // tasks in memory, so this runs only for messages that match none of them).
        #[derive(serde::Deserialize)]
        struct Ids {
            tid: String,
            bid: String,
        }
        for kv in t.tasks.iter().rev() {
            let (k, v) = kv?;
            let ids: Ids = decode(&k, &v)?;
            let hit = match key {
                TaskKey::Tid(tid) => ids.tid == tid,
                TaskKey::Bid(bid) => ids.bid == bid,
                TaskKey::OpenFor(_) => false,
            };
            if hit {
                return t.load_task(&k, &v).map(Some);
            }
        }
        Ok(None)
    }

    async fn list_tasks(
        &self,
        query: &TaskQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<OtaTask>> {
        let t = self.trees()?;
        let heads = page_desc(&t.tasks, page, |t: &OtaTask| query.matches(t))?;
        let items = heads
            .items
            .into_iter()
            .map(|head| t.with_history(head))
            .collect::<StoreResult<_>>()?;
        Ok(Page {
            items,
            next_cursor: heads.next_cursor,
        })
    }

    async fn insert_task(&self, task: &OtaTask) -> StoreResult<Claimed> {
        let t = self.trees()?;
        let sns = held_serials(task);
        (&t.tasks, &t.claims, &t.task_history)
            .transaction(|(tasks, claims, history)| {
                for sn in &sns {
                    let Some(holder) = claims.get(sn.as_bytes())? else {
                        continue;
                    };
                    if holder.as_ref() == task.id.as_bytes() {
                        continue;
                    }
                    let open = match tasks.get(&holder)? {
                        Some(v) => !stored_head(&holder, &v)?.status.is_final(),
                        None => false,
                    };
                    if open {
                        return Ok(Claimed::Busy {
                            sn: sn.clone(),
                            task_id: String::from_utf8_lossy(&holder).into_owned(),
                        });
                    }
                }
                for sn in &sns {
                    claims.insert(sn.as_bytes(), task.id.as_bytes())?;
                }
                write(tasks, history, task, 0)?;
                Ok(Claimed::Inserted)
            })
            .map_err(tx_abort)
    }

    async fn save_tasks(&self, batch: &[&OtaTask]) -> StoreResult<Vec<bool>> {
        let t = self.trees()?;
        let held: Vec<Vec<String>> = batch.iter().map(|task| held_serials(task)).collect();
        (&t.tasks, &t.claims, &t.task_history)
            .transaction(|(tasks, claims, history)| {
                let mut written = Vec::with_capacity(batch.len());
                for (task, sns) in batch.iter().zip(&held) {
                    let key = task.id.as_bytes();
                    let mut stored_len = 0;
                    if let Some(v) = tasks.get(key)? {
                        let stored = stored_head(key, &v)?;
                        let head = Stored {
                            status: stored.status,
                            revision: stored.revision,
                        };
                        if !head.admits(task) {
                            written.push(false);
                            continue;
                        }
                        stored_len = stored.history_len.unwrap_or(0);
                    }
                    write(tasks, history, task, stored_len)?;
                    if task.status.is_final() {
                        release(claims, &task.id, sns)?;
                    }
                    written.push(true);
                }
                Ok(written)
            })
            .map_err(tx_abort)
    }

    async fn delete_task(&self, id: &str) -> StoreResult<()> {
        let t = self.trees()?;
        (&t.tasks, &t.claims)
            .transaction(|(tasks, claims)| {
                if let Some(v) = tasks.remove(id.as_bytes())? {
                    let stored: OtaTask =
                        decode(id.as_bytes(), &v).map_err(ConflictableTransactionError::Abort)?;
                    release(claims, id, &held_serials(&stored))?;
                }
                Ok(())
            })
            .map_err(tx_abort)?;
        t.remove_history(id)
    }

    async fn prune_tasks(&self, cutoff: DateTime<Utc>) -> StoreResult<usize> {
        self.blocking(move |t| prune_tasks(t, cutoff)).await
    }

    async fn put_orphan(&self, msg: &serde_json::Value) -> StoreResult<()> {
        let t = self.trees()?;
        while t.orphans.len() >= 10_000 {
            if t.orphans.pop_min()?.is_none() {
                break;
            }
        }
        t.orphans
            .insert(crate::domain::ids::next().as_bytes(), encode(msg))?;
        Ok(())
    }
}

/// Removes tasks that finished before `cutoff`, with their history.
fn prune_tasks(t: &Trees, cutoff: DateTime<Utc>) -> StoreResult<usize> {
    #[derive(serde::Deserialize)]
    struct Finished {
        finished_at: Option<DateTime<Utc>>,
        status: TaskStatus,
    }
    let mut removed = 0;
    for kv in t.tasks.iter() {
        let (k, v) = kv?;
        let old = serde_json::from_slice::<Finished>(&v)
            .ok()
            .filter(|f| f.status.is_final())
            .and_then(|f| f.finished_at)
            .is_some_and(|f| f < cutoff);
        if old {
            t.tasks.remove(&k)?;
            t.remove_history(&String::from_utf8_lossy(&k))?;
            removed += 1;
        }
    }
    Ok(removed)
}
