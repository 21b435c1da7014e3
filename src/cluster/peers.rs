//! Which replica holds a task, from the task's own ids. Each replica stamps the tid and bid of
//! the `ota_create` it sends with its route tag (the first 8 hex digits of the SHA-256 of its
//! id, in place of the first 8 random digits of the UUID); a gateway echoes them in its
//! `services_reply` and `ota_progress`. A replica that receives such a message for a task
//! another live replica holds hands it to that replica (through the broker) instead of
//! reading and writing the task in the catalog: the holder applies it to its copy in memory.
//! The tag outlives a restart (the id is the same), so a replica that comes back gets its
//! tasks' messages again.
//!
//! Each replica's broker session also carries a will naming the replica and when it started;
//! the broker publishes it when the session's connection drops without a DISCONNECT (a kill
//! -9 closes it at once). Every replica follows the wills: a replica whose will arrived is
//! routed nothing more, and its leases and broker session are taken over at once instead of
//! after its heartbeat went silent ([`super::Cluster::run`]).

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

/// The other live replicas by route tag, and those whose will arrived. Cheap to clone.
#[derive(Clone)]
pub struct Peers {
    me: Arc<str>,
    /// When this replica started: what its will says.
    started_at: DateTime<Utc>,
    by_tag: Arc<RwLock<HashMap<String, String>>>,
    /// Replicas whose will arrived: id → when the one that died had started.
    departed: Arc<RwLock<HashMap<String, DateTime<Utc>>>>,
    /// Bumped when a will arrives.
    departures: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Peers {
    /// The peers of replica `me`, started at `started_at` (none known yet).
    pub fn new(me: &str, started_at: DateTime<Utc>) -> Peers {
        Peers {
            me: me.into(),
            started_at,
            by_tag: Arc::default(),
            departed: Arc::default(),
            departures: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// This replica's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The payload of this replica's will: when it started (RFC 3339, milliseconds).
    pub fn will(&self) -> String {
        self.started_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    /// Takes in the will of replica `id` (`payload` as [`Peers::will`] made it): it is routed
    /// nothing more, and [`Peers::departures`] wakes. Ignored for this replica's own (a will
    /// queued in its session while it was down) and when unreadable; true when taken.
    pub fn depart(&self, id: &str, payload: &[u8]) -> bool {
        let started = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
        let Some(started) = started else {
            return false;
        };
        if id == &*self.me {
            return false;
        }
        write(&self.departed).insert(id.to_string(), started.with_timezone(&Utc));
        write(&self.by_tag).retain(|_, holder| holder != id);
        self.departures.send_modify(|n| *n += 1);
        true
    }

    /// Whether `r`'s will arrived (the run of it the catalog lists: not one that died before
    /// and came back).
    pub fn departed(&self, r: &ReplicaRecord) -> bool {
        read(&self.departed).get(&r.id) == Some(&r.started_at)
    }

    /// The replicas whose will arrived, with when each had started.
    pub fn departed_list(&self) -> Vec<(String, DateTime<Utc>)> {
        read(&self.departed)
            .iter()
            .map(|(id, at)| (id.clone(), *at))
            .collect()
    }

    /// Wakes when a will arrives.
    pub fn departures(&self) -> tokio::sync::watch::Receiver<u64> {
        self.departures.subscribe()
    }

    /// Takes in the replicas the catalog lists: those alive within [`ROUTE_WITHIN`] of `now`,
    /// other than this one. Two replicas with one tag get nothing (messages stay where they
    /// arrive).
    pub fn update(&self, replicas: &[ReplicaRecord], now: DateTime<Utc>) {
        let mine = route_tag(&self.me);
        // A will is kept while the catalog lists the run of the replica that left it.
        write(&self.departed)
            .retain(|id, at| replicas.iter().any(|r| &r.id == id && r.started_at == *at));
        let mut by_tag: HashMap<String, String> = HashMap::new();
        // This replica's own tag, and a tag two replicas share, route nowhere.
        let mut clashing = vec![mine.clone()];
        for r in replicas
            .iter()
            .filter(|r| now - r.last_heartbeat <= ROUTE_WITHIN && !self.departed(r))
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
        read(&self.by_tag).get(tag).cloned()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
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
            started_at: chrono::SubsecRound::trunc_subsecs(seen - chrono::Duration::hours(1), 3),
            last_heartbeat: seen,
            blob_store: "s3".into(),
            broker: "external".into(),
            leases: Vec::new(),
        }
    }

    #[test]
    fn a_key_names_the_live_replica_whose_tag_it_carries() {
        let now = Utc::now();
        let peers = Peers::new("r1", now);
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

    #[test]
    fn a_replica_whose_will_arrived_is_routed_nothing_until_it_runs_again() {
        let now = Utc::now();
        let peers = Peers::new("r1", now);
        let (r2, r3) = (replica("r2", now), replica("r3", now));
        peers.update(&[r2.clone(), r3.clone()], now);
        let key = |id: &str| format!("{}-1234-4abc-a123-0123456789ab", route_tag(id));
        let will_of = |r: &ReplicaRecord| Peers::new(&r.id, r.started_at).will();
        let woken = peers.departures();
        assert!(!peers.depart("r2", b"not a time"));
        assert!(!peers.depart("r1", peers.will().as_bytes()), "its own");
        assert!(!woken.has_changed().unwrap());
        assert!(peers.depart("r2", will_of(&r2).as_bytes()));
        assert!(woken.has_changed().unwrap());
        assert_eq!(peers.holder(&key("r2")), None, "routed nothing at once");
        assert!(peers.departed(&r2) && !peers.departed(&r3));
        peers.update(&[r2.clone(), r3.clone()], now);
        assert_eq!(
            peers.holder(&key("r2")),
            None,
            "its heartbeat is still recent"
        );
        assert_eq!(peers.holder(&key("r3")).as_deref(), Some("r3"));
        assert_eq!(
            peers.departed_list(),
            vec![("r2".to_string(), r2.started_at)]
        );
        // It runs again (a new start): its old will counts no more.
        let mut back = r2.clone();
        back.started_at = now + chrono::Duration::seconds(1);
        peers.update(&[back.clone(), r3.clone()], now);
        assert!(!peers.departed(&back));
        assert_eq!(peers.holder(&key("r2")).as_deref(), Some("r2"));
        // A will of a run that is not the one listed is kept out of routing only while listed.
        assert!(peers.depart("r2", will_of(&r2).as_bytes()));
        peers.update(&[back, r3], now);
        assert_eq!(peers.holder(&key("r2")).as_deref(), Some("r2"));
        assert!(peers.departed_list().is_empty());
    }
}
