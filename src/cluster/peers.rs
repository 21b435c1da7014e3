//! Which replica holds a task, from the task's own ids. Each replica stamps the tid and bid of
//! the `ota_create` it sends with its route tag (the first 8 hex digits of the SHA-256 of its
//! id, in place of the first 8 random digits of the UUID); a gateway echoes them in its
//! `services_reply` and `ota_progress`. A replica that receives such a message for a task
//! another live replica holds hands it to that replica (through the broker) instead of
//! reading and writing the task in the catalog: the holder applies it to its copy in memory.
//! The tag outlives a restart (the id is the same), so a replica that comes back gets its
//! tasks' messages again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use sha2::Digest;

use super::ReplicaRecord;

/// A replica is sent messages only while its heartbeat is this recent: well before the
/// others take over its broker session ([`super::ALIVE_WITHIN`]), so nothing is sent to a
/// session after it was taken over and deleted.
pub const ROUTE_WITHIN: chrono::Duration = chrono::Duration::seconds(5);

/// The route tag of replica `id`: 8 lowercase hex digits.
pub fn route_tag(id: &str) -> String {
    hex::encode(&sha2::Sha256::digest(id.as_bytes())[..4])
}

/// The other live replicas by route tag. Cheap to clone.
#[derive(Clone, Default)]
pub struct Peers {
    me: Arc<str>,
    by_tag: Arc<RwLock<HashMap<String, String>>>,
}

impl Peers {
    /// The peers of replica `me` (none known yet).
    pub fn new(me: &str) -> Peers {
        Peers {
            me: me.into(),
            by_tag: Arc::default(),
        }
    }

    /// This replica's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Takes in the replicas the catalog lists: those alive within [`ROUTE_WITHIN`] of `now`,
    /// other than this one. Two replicas with one tag get nothing (messages stay where they
    /// arrive).
    pub fn update(&self, replicas: &[ReplicaRecord], now: DateTime<Utc>) {
        let mine = route_tag(&self.me);
        let mut by_tag: HashMap<String, String> = HashMap::new();
        // This replica's own tag, and a tag two replicas share, route nowhere.
        let mut clashing = vec![mine.clone()];
        for r in replicas
            .iter()
            .filter(|r| now - r.last_heartbeat <= ROUTE_WITHIN)
        {
            let tag = route_tag(&r.id);
            if tag == mine || by_tag.insert(tag.clone(), r.id.clone()).is_some() {
                clashing.push(tag);
            }
        }
        for tag in clashing {
            by_tag.remove(&tag);
        }
        *write(&self.by_tag) = by_tag;
    }

    /// The live replica other than this one that holds the task whose tid or bid is `key`.
    pub fn holder(&self, key: &str) -> Option<String> {
        let tag = key.get(..8)?;
        let g = match self.by_tag.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.get(tag).cloned()
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, seen: DateTime<Utc>) -> ReplicaRecord {
        ReplicaRecord {
            id: id.into(),
            version: "0".into(),
            started_at: seen - chrono::Duration::hours(1),
            last_heartbeat: seen,
            blob_store: "s3".into(),
            broker: "external".into(),
            leases: Vec::new(),
        }
    }

    #[test]
    fn a_key_names_the_live_replica_whose_tag_it_carries() {
        let now = Utc::now();
        let peers = Peers::new("r1");
        let old = now - chrono::Duration::seconds(6);
        peers.update(
            &[replica("r1", now), replica("r2", now), replica("r3", old)],
            now,
        );
        let key = |id: &str| format!("{}-1234-4abc-a123-0123456789ab", route_tag(id));
        assert_eq!(peers.holder(&key("r2")).as_deref(), Some("r2"));
        assert_eq!(peers.holder(&key("r1")), None, "this replica's own tasks");
        assert_eq!(
            peers.holder(&key("r3")),
            None,
            "a silent replica gets nothing"
        );
        assert_eq!(
            peers.holder("149878685687484417"),
            None,
            "a gateway's own bid"
        );
        assert_eq!(peers.holder("short"), None);
        assert_eq!(route_tag("r2").len(), 8);
        assert_ne!(route_tag("r1"), route_tag("r2"));
    }
}
