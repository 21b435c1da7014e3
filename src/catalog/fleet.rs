//! Devices, OTA tasks (their claims on gateways and devices, orphan messages), Idempotency-Key
//! answers, rollouts and their members in sled.

use chrono::{DateTime, Utc};
use sled::transaction::{ConflictableTransactionError, Transactional};

use super::*;
use crate::devices::{DeviceRecord, DeviceStore};
use crate::ota::store::{Claimed, TaskQuery, TaskStore, held_serials, is_forward};
use crate::ota::{OtaTask, TaskStatus};
use crate::rollout::model::{Member, Rollout, RolloutStatus};
use crate::rollout::store::RolloutStore;
use crate::store::{IDEMPOTENCY_WINDOW, IdempotencyStore, IdempotentAnswer};

#[async_trait::async_trait]
impl DeviceStore for Catalog {
    async fn put_devices(&self, devices: &[DeviceRecord]) -> StoreResult<()> {
        let t = self.trees()?;
        let mut batch = sled::Batch::default();
        for d in devices {
            batch.insert(d.sn.as_bytes(), encode(d));
        }
        t.devices.apply_batch(batch)?;
        Ok(())
    }

    async fn delete_device(&self, sn: &str) -> StoreResult<()> {
        self.trees()?.devices.remove(sn.as_bytes())?;
        Ok(())
    }

    async fn all_devices(&self) -> StoreResult<Vec<DeviceRecord>> {
        all_of(&self.trees()?.devices)
    }
}

/// The status of a stored task, read alone (a task with its history is large).
fn stored_status(key: &[u8], v: &[u8]) -> StoreResult<TaskStatus> {
    #[derive(serde::Deserialize)]
    struct Stored {
        status: TaskStatus,
    }
    Ok(decode::<Stored>(key, v)?.status)
}

/// Removes the claims that point at `id`.
fn release(
    claims: &sled::transaction::TransactionalTree,
    task: &OtaTask,
) -> Result<(), ConflictableTransactionError<CatalogError>> {
    for sn in held_serials(task) {
        if claims.get(sn.as_bytes())?.as_deref() == Some(task.id.as_bytes()) {
            claims.remove(sn.as_bytes())?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl TaskStore for Catalog {
    async fn task(&self, id: &str) -> StoreResult<Option<OtaTask>> {
        let t = self.trees()?;
        t.tasks
            .get(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    async fn recent_tasks(&self, since: DateTime<Utc>) -> StoreResult<Vec<OtaTask>> {
        let all: Vec<OtaTask> = all_of(&self.trees()?.tasks)?;
        Ok(all
            .into_iter()
            .filter(|t| t.finished_at.is_none_or(|f| f >= since) || !t.status.is_final())
            .collect())
    }

    async fn list_tasks(
        &self,
        query: &TaskQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<OtaTask>> {
        page_desc(&self.trees()?.tasks, page, |t| query.matches(t))
    }

    async fn insert_task(&self, task: &OtaTask) -> StoreResult<Claimed> {
        let t = self.trees()?;
        let sns = held_serials(task);
        let value = encode(task);
        (&t.tasks, &t.claims)
            .transaction(|(tasks, claims)| {
                for sn in &sns {
                    let Some(holder) = claims.get(sn.as_bytes())? else {
                        continue;
                    };
                    if holder.as_ref() == task.id.as_bytes() {
                        continue;
                    }
                    let open = match tasks.get(&holder)? {
                        Some(v) => !stored_status(&holder, &v)
                            .map_err(ConflictableTransactionError::Abort)?
                            .is_final(),
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
                tasks.insert(task.id.as_bytes(), value.as_slice())?;
                Ok(Claimed::Inserted)
            })
            .map_err(tx_abort)
    }

    async fn save_task(&self, task: &OtaTask) -> StoreResult<bool> {
        let t = self.trees()?;
        let value = encode(task);
        let key = task.id.as_bytes();
        if !task.status.is_final() {
            // Most saves (progress) touch the task alone: a compare-and-swap, no transaction.
            loop {
                let current = t.tasks.get(key)?;
                if let Some(v) = &current
                    && !is_forward(stored_status(key, v)?, task)
                {
                    return Ok(false);
                }
                let swapped = t
                    .tasks
                    .compare_and_swap(key, current, Some(value.as_slice()))?;
                if swapped.is_ok() {
                    return Ok(true);
                }
            }
        }
        (&t.tasks, &t.claims)
            .transaction(|(tasks, claims)| {
                if let Some(v) = tasks.get(key)? {
                    let stored =
                        stored_status(key, &v).map_err(ConflictableTransactionError::Abort)?;
                    if !is_forward(stored, task) {
                        return Ok(false);
                    }
                }
                tasks.insert(task.id.as_bytes(), value.as_slice())?;
                if task.status.is_final() {
                    release(claims, task)?;
                }
                Ok(true)
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
                    release(claims, &stored)?;
                }
                Ok(())
            })
            .map_err(tx_abort)
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

/// Removes tasks that finished before `cutoff`.
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
            removed += 1;
        }
    }
    Ok(removed)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAnswer {
    hash: String,
    answer: serde_json::Value,
    /// Unix seconds.
    at: i64,
}

impl StoredAnswer {
    fn answer(self) -> IdempotentAnswer {
        IdempotentAnswer {
            body_hash: self.hash,
            answer: self.answer,
            at: DateTime::from_timestamp(self.at, 0).unwrap_or_default(),
        }
    }
}

fn live_answer(
    key: &[u8],
    v: Option<sled::IVec>,
    now: DateTime<Utc>,
) -> StoreResult<Option<IdempotentAnswer>> {
    let Some(v) = v else { return Ok(None) };
    let a = decode::<StoredAnswer>(key, &v)?.answer();
    Ok((now - a.at <= IDEMPOTENCY_WINDOW).then_some(a))
}

#[async_trait::async_trait]
impl IdempotencyStore for Catalog {
    async fn idempotent(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<IdempotentAnswer>> {
        let t = self.trees()?;
        live_answer(key.as_bytes(), t.idempotency.get(key.as_bytes())?, now)
    }

    async fn record_idempotent(
        &self,
        key: &str,
        answer: &IdempotentAnswer,
    ) -> StoreResult<Option<IdempotentAnswer>> {
        let t = self.trees()?;
        let value = encode(&StoredAnswer {
            hash: answer.body_hash.clone(),
            answer: answer.answer.clone(),
            at: answer.at.timestamp(),
        });
        loop {
            let current = t.idempotency.get(key.as_bytes())?;
            if let Some(first) = live_answer(key.as_bytes(), current.clone(), answer.at)? {
                return Ok(Some(first));
            }
            let swapped =
                t.idempotency
                    .compare_and_swap(key.as_bytes(), current, Some(value.as_slice()))?;
            if swapped.is_ok() {
                return Ok(None);
            }
        }
    }

    async fn prune_idempotency(&self, now: DateTime<Utc>) -> StoreResult<usize> {
        self.blocking(move |t| {
            let mut removed = 0;
            for kv in t.idempotency.iter() {
                let (k, v) = kv?;
                if live_answer(&k, Some(v), now).ok().flatten().is_none() {
                    t.idempotency.remove(&k)?;
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
    }
}

fn member_key(rollout_id: &str, order: &str) -> Vec<u8> {
    format!("{rollout_id}/{order}").into_bytes()
}

#[async_trait::async_trait]
impl RolloutStore for Catalog {
    async fn rollout(&self, id: &str) -> StoreResult<Option<Rollout>> {
        let t = self.trees()?;
        t.rollouts
            .get(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    async fn all_rollouts(&self) -> StoreResult<Vec<Rollout>> {
        all_of(&self.trees()?.rollouts)
    }

    async fn list_rollouts(
        &self,
        status: Option<RolloutStatus>,
        page: &PageRequest,
    ) -> StoreResult<Page<Rollout>> {
        page_desc(&self.trees()?.rollouts, page, |r: &Rollout| {
            status.is_none_or(|s| r.status() == s)
        })
    }

    async fn save_rollout(
        &self,
        rollout_id: &str,
        rollout: Option<&Rollout>,
        members: &[&Member],
    ) -> StoreResult<()> {
        let t = self.trees()?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> = members
            .iter()
            .map(|m| (member_key(rollout_id, &m.order), encode(m)))
            .collect();
        let Some(record) = rollout.map(encode) else {
            // Members alone: one tree, and a sled batch is atomic within a tree.
            let mut batch = sled::Batch::default();
            for (k, v) in rows {
                batch.insert(k, v);
            }
            t.rollout_members.apply_batch(batch)?;
            return Ok(());
        };
        (&t.rollouts, &t.rollout_members)
            .transaction(|(rollouts, member_tree)| {
                for (k, v) in &rows {
                    member_tree.insert(k.as_slice(), v.as_slice())?;
                }
                rollouts.insert(rollout_id.as_bytes(), record.as_slice())?;
                Ok(())
            })
            .map_err(tx_abort::<std::convert::Infallible>)
    }

    async fn members(&self, rollout_id: &str) -> StoreResult<Vec<Member>> {
        self.trees()?
            .rollout_members
            .scan_prefix(format!("{rollout_id}/").as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }
}
