//! Devices, OTA tasks (and orphan messages), Idempotency-Key answers, rollouts and their members.

use super::*;

/// What an Idempotency-Key answered the first time.
#[derive(Clone, Debug, PartialEq)]
pub struct IdempotentAnswer {
    /// SHA-256 of the first request's body: another body with the same key is refused.
    pub body_hash: String,
    /// The first answer, replayed.
    pub answer: serde_json::Value,
}

impl Catalog {
    /// Stores a device record under its serial number.
    pub fn put_device<T: serde::Serialize>(
        &self,
        sn: &str,
        device: &T,
    ) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.devices.insert(sn.as_bytes(), encode(device))?;
        Ok(())
    }

    /// Removes a device record.
    pub fn delete_device(&self, sn: &str) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.devices.remove(sn.as_bytes())?;
        Ok(())
    }

    /// Every stored device record.
    pub fn all_devices<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, CatalogError> {
        let t = self.trees()?;
        t.devices
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }
}

impl Catalog {
    /// Stores an OTA task.
    pub fn put_task<T: serde::Serialize>(&self, id: &str, task: &T) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.tasks.insert(id.as_bytes(), encode(task))?;
        Ok(())
    }

    /// Keeps an OTA message that matched no task (at most 10,000; the oldest go first).
    pub fn put_orphan(&self, msg: &serde_json::Value) -> Result<(), CatalogError> {
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

    /// Removes OTA tasks that finished before `cutoff`; returns how many.
    pub fn prune_tasks(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, CatalogError> {
        let t = self.trees()?;
        #[derive(serde::Deserialize)]
        struct Finished {
            finished_at: Option<chrono::DateTime<chrono::Utc>>,
        }
        let mut removed = 0;
        for kv in t.tasks.iter() {
            let (k, v) = kv?;
            let old = serde_json::from_slice::<Finished>(&v)
                .ok()
                .and_then(|t| t.finished_at)
                .is_some_and(|f| f < cutoff);
            if old {
                t.tasks.remove(&k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes an OTA task (one whose publish failed).
    pub fn delete_task(&self, id: &str) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.tasks.remove(id.as_bytes())?;
        Ok(())
    }

    /// One OTA task.
    pub fn task<T: serde::de::DeserializeOwned>(
        &self,
        id: &str,
    ) -> Result<Option<T>, CatalogError> {
        let t = self.trees()?;
        t.tasks
            .get(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    /// Every OTA task.
    pub fn all_tasks<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, CatalogError> {
        let t = self.trees()?;
        t.tasks
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Newest-first page of OTA tasks.
    pub fn list_tasks<T: serde::de::DeserializeOwned>(
        &self,
        page: &PageRequest,
        filter: impl Fn(&T) -> bool,
    ) -> Result<Page<T>, CatalogError> {
        let t = self.trees()?;
        page_desc(&t.tasks, page, filter)
    }

    /// The stored answer of an Idempotency-Key seen within 24 h.
    pub fn idempotent(&self, key: &str) -> Result<Option<IdempotentAnswer>, CatalogError> {
        let t = self.trees()?;
        let Some(v) = t.idempotency.get(key.as_bytes())? else {
            return Ok(None);
        };
        let rec: serde_json::Value = decode(key.as_bytes(), &v)?;
        let at = rec["at"].as_i64().unwrap_or(0);
        if chrono::Utc::now().timestamp() - at > 86_400 {
            t.idempotency.remove(key.as_bytes())?;
            return Ok(None);
        }
        Ok(Some(IdempotentAnswer {
            body_hash: rec["hash"].as_str().unwrap_or_default().to_string(),
            answer: rec["answer"].clone(),
        }))
    }

    /// Removes the Idempotency-Key answers older than 24 h; returns how many.
    pub fn prune_idempotency(&self) -> Result<usize, CatalogError> {
        let t = self.trees()?;
        let cutoff = chrono::Utc::now().timestamp() - 86_400;
        let mut removed = 0;
        for kv in t.idempotency.iter() {
            let (k, v) = kv?;
            let at = serde_json::from_slice::<serde_json::Value>(&v)
                .ok()
                .and_then(|rec| rec["at"].as_i64())
                .unwrap_or(0);
            if at < cutoff {
                t.idempotency.remove(&k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Remembers the answer to an Idempotency-Key (with the hash of the request body).
    pub fn put_idempotent(
        &self,
        key: &str,
        hash: &str,
        answer: &serde_json::Value,
    ) -> Result<(), CatalogError> {
        let t = self.trees()?;
        let rec = serde_json::json!({"hash": hash, "answer": answer,
            "at": chrono::Utc::now().timestamp()});
        t.idempotency.insert(key.as_bytes(), encode(&rec))?;
        Ok(())
    }
}

impl Catalog {
    /// Stores a rollout.
    pub fn put_rollout<T: serde::Serialize>(&self, id: &str, r: &T) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.rollouts.insert(id.as_bytes(), encode(r))?;
        Ok(())
    }

    /// One rollout.
    pub fn rollout<T: serde::de::DeserializeOwned>(
        &self,
        id: &str,
    ) -> Result<Option<T>, CatalogError> {
        let t = self.trees()?;
        t.rollouts
            .get(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    /// Every rollout.
    pub fn all_rollouts<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, CatalogError> {
        let t = self.trees()?;
        t.rollouts
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Newest-first page of rollouts.
    pub fn list_rollouts<T: serde::de::DeserializeOwned>(
        &self,
        page: &PageRequest,
        filter: impl Fn(&T) -> bool,
    ) -> Result<Page<T>, CatalogError> {
        let t = self.trees()?;
        page_desc(&t.rollouts, page, filter)
    }

    /// Stores rollout members (one gateway each) under `rollout_id/key`.
    pub fn put_members<T: serde::Serialize>(
        &self,
        rollout_id: &str,
        members: &[(String, &T)],
    ) -> Result<(), CatalogError> {
        let t = self.trees()?;
        let mut batch = sled::Batch::default();
        for (key, m) in members {
            batch.insert(format!("{rollout_id}/{key}").into_bytes(), encode(m));
        }
        t.rollout_members.apply_batch(batch)?;
        Ok(())
    }

    /// A rollout's members in key order.
    pub fn members<T: serde::de::DeserializeOwned>(
        &self,
        rollout_id: &str,
    ) -> Result<Vec<T>, CatalogError> {
        let t = self.trees()?;
        t.rollout_members
            .scan_prefix(format!("{rollout_id}/").as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }
}
