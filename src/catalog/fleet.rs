//! Devices, Idempotency-Key answers, rollouts and their members in sled.

use chrono::{DateTime, Utc};
use sled::transaction::Transactional;

use super::*;
use crate::devices::{DeviceRecord, DeviceStore};
use crate::rollout::model::{Member, Rollout, RolloutStatus};
use crate::rollout::store::RolloutStore;
use crate::store::{IDEMPOTENCY_WINDOW, IdempotencyStore, IdempotentAnswer};

#[async_trait::async_trait]
impl DeviceStore for Catalog {
    async fn put_devices(&self, devices: &[DeviceRecord]) -> StoreResult<()> {
        let t = self.trees()?;
        let mut batch = sled::Batch::default();
        for d in devices {
            // One process writes a sled catalog, so the stored copy is rarely newer; merged
            // all the same, as every backend does.
            let stored = match t.devices.get(d.sn.as_bytes())? {
                Some(v) => Some(decode::<DeviceRecord>(d.sn.as_bytes(), &v)?),
                None => None,
            };
            batch.insert(d.sn.as_bytes(), encode(&d.merged_over(stored.as_ref()).0));
        }
        t.devices.apply_batch(batch)?;
        Ok(())
    }

    async fn changed_devices(
        &self,
        _since: Option<crate::devices::ChangeCursor>,
    ) -> StoreResult<crate::devices::ChangedDevices> {
        // No change order in sled (one process has every report in memory): every device.
        Ok(crate::devices::ChangedDevices {
            devices: all_of(&self.trees()?.devices)?,
            next: None,
        })
    }

    async fn delete_device(&self, sn: &str) -> StoreResult<()> {
        self.trees()?.devices.remove(sn.as_bytes())?;
        Ok(())
    }

    async fn all_devices(&self) -> StoreResult<Vec<DeviceRecord>> {
        all_of(&self.trees()?.devices)
    }
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
    ) -> StoreResult<bool> {
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
            return Ok(true);
        };
        let revision = rollout.map_or(0, |r| r.revision);
        (&t.rollouts, &t.rollout_members)
            .transaction(|(rollouts, member_tree)| {
                if let Some(v) = rollouts.get(rollout_id.as_bytes())? {
                    #[derive(serde::Deserialize)]
                    struct Stored {
                        #[serde(default)]
                        revision: u64,
                    }
                    let stored: Stored = decode(rollout_id.as_bytes(), &v)
                        .map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                    if stored.revision + 1 != revision {
                        return Ok(false);
                    }
                }
                for (k, v) in &rows {
                    member_tree.insert(k.as_slice(), v.as_slice())?;
                }
                rollouts.insert(rollout_id.as_bytes(), record.as_slice())?;
                Ok(true)
            })
            .map_err(tx_abort)
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
