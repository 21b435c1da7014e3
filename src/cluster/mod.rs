//! The replicas of one deployment. Each `fwrepo serve` registers itself under its replica id
//! (`--replica-id`, by default the instance id kept in its data directory) and renews a
//! heartbeat in the catalog every [`HEARTBEAT_EVERY`]; a replica whose heartbeat is older than
//! [`ALIVE_WITHIN`] is counted as gone, one silent for [`FORGET_AFTER`] is forgotten.
//! On sled there is one replica; on PostgreSQL, as many as share the database.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::Clock;
use crate::store::StoreResult;

mod peers;
pub use peers::{Peers, ROUTE_WITHIN, route_tag};

/// How often a replica renews its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A replica whose last heartbeat is older than this (four heartbeats) is gone: its broker
/// session is taken over by a live replica.
pub const ALIVE_WITHIN: chrono::Duration = chrono::Duration::seconds(8);
/// A replica silent for this long is no longer listed.
pub const FORGET_AFTER: chrono::Duration = chrono::Duration::hours(1);

/// One replica as the catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaRecord {
    /// Replica id.
    pub id: String,
    /// fwrepo version it runs.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_heartbeat: DateTime<Utc>,
    /// `local` or `s3`.
    pub blob_store: String,
    /// `embedded` or `external`.
    pub broker: String,
    /// The leases it holds (work it owns for the deployment).
    #[serde(default)]
    pub leases: Vec<String>,
}

impl ReplicaRecord {
    /// Whether its heartbeat is recent at `now`.
    pub fn alive(&self, now: DateTime<Utc>) -> bool {
        now - self.last_heartbeat <= ALIVE_WITHIN
    }

    /// Why it cannot share a catalog with other replicas, if it cannot: its packages are on
    /// its own disk, or its gateways on its own broker.
    pub fn private_parts(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.blob_store == "local" {
            parts.push("keeps packages in a local directory");
        }
        if self.broker == "embedded" {
            parts.push("runs the embedded MQTT broker");
        }
        (!parts.is_empty()).then(|| parts.join(" and "))
    }
}

/// Where the replicas' heartbeats are kept.
#[async_trait::async_trait]
pub trait ClusterStore: Send + Sync {
    /// Stores `replica`'s row (its heartbeat) and forgets replicas silent since before
    /// `forget_before`.
    async fn heartbeat(
        &self,
        replica: &ReplicaRecord,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// Every replica listed, by id.
    async fn replicas(&self) -> StoreResult<Vec<ReplicaRecord>>;
    /// Takes lease `name` for `holder` for `ttl` (by the catalog's clock), or renews it if
    /// `holder` has it; true when `holder` holds it now. A lease its holder let expire is
    /// taken over; of replicas trying at once, one gets it.
    async fn take_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool>;
    /// Gives up lease `name` if `holder` has it (a replica that stops hands its work over at
    /// once).
    async fn drop_lease(&self, name: &str, holder: &str) -> StoreResult<()>;
    /// Ends every lease `holder` holds (its will says it died): the others may take them at
    /// once.
    async fn end_leases(&self, holder: &str) -> StoreResult<()>;
    /// What other replicas change from now on, as they commit it (this replica, `me`, is left
    /// out); `None` when no other process can change the catalog.
    async fn changes(&self, me: &str) -> StoreResult<Option<ChangeFeed>>;
}

/// Records another replica changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// OTA tasks, by id.
    Tasks(Vec<String>),
    /// A rollout, by id.
    Rollout(String),
}

impl Changed {
    /// A change notification `<origin>\t<kind>\t<id>,<id>…`; `None` for this replica's own
    /// (`me`) and for anything malformed.
    pub fn parse(payload: &str, me: &str) -> Option<Changed> {
        let mut parts = payload.splitn(3, '\t');
        let (origin, kind, ids) = (parts.next()?, parts.next()?, parts.next()?);
        if origin == me || ids.is_empty() {
            return None;
        }
        match kind {
            "task" => Some(Changed::Tasks(ids.split(',').map(str::to_string).collect())),
            "rollout" => Some(Changed::Rollout(ids.to_string())),
            _ => None,
        }
    }
}

/// A stream of [`Changed`] records.
pub type ChangeFeed = std::pin::Pin<Box<dyn futures::Stream<Item = Changed> + Send>>;

/// How long a lease lasts unless renewed: a replica that dies (kill -9) loses its leases this
/// long after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(8);
/// How often a replica renews the leases it holds and tries to take the others.
pub const LEASE_EVERY: Duration = Duration::from_secs(2);

/// Work one replica of the deployment does at a time (e.g. OTA timers). Cheap to clone.
#[derive(Clone)]
pub struct Lease {
    name: &'static str,
    /// The replica that takes it (this one).
    holder: Arc<str>,
    /// Until when this replica may act on it (its own clock, from before the last renewal).
    until: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Lease {
    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// This replica's id: who holds it while [`Lease::held`].
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether this replica holds it now.
    pub fn held(&self) -> bool {
        crate::lock(&self.until).is_some_and(|t| std::time::Instant::now() < t)
    }
}

/// Why a replica may not join.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Replicas sharing a catalog must share packages and gateways too.
    #[error(
        "replica {me} would share its PostgreSQL catalog with replica {other}, but {who} {what}; \
         several replicas need S3-compatible storage (--blob-store s3://…) and an external \
         broker (--mqtt-url) (README: Running several replicas)"
    )]
    NotShareable {
        /// This replica.
        me: String,
        /// The live replica it would share with.
        other: String,
        /// `it` (this replica) or `that one`.
        who: &'static str,
        /// What it keeps to itself.
        what: String,
    },
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] crate::store::CatalogError),
}

/// This replica's membership: its heartbeat and the view of the others.
#[derive(Clone)]
pub struct Cluster {
    store: Arc<dyn ClusterStore>,
    me: Arc<std::sync::Mutex<ReplicaRecord>>,
    peers: Peers,
    clock: Clock,
    leases: Arc<std::sync::Mutex<Vec<Lease>>>,
    /// Bumped after each heartbeat.
    renewed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The deployment as one replica sees it (`GET /api/v1/cluster`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// The replica that answered.
    pub replica_id: String,
    /// Every replica listed, by id.
    pub replicas: Vec<ReplicaView>,
}

/// One replica in a [`ClusterView`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReplicaView {
    /// Its record.
    #[serde(flatten)]
    pub record: ReplicaRecord,
    /// Whether its heartbeat is recent (and no will of it arrived).
    pub alive: bool,
}

impl Cluster {
    /// Joins the deployment as `me`: refused when this replica or a live other one keeps
    /// packages or gateways to itself while `shared` (the catalog is one several processes
    /// can use). Stores the first heartbeat.
    pub async fn join(
        store: Arc<dyn ClusterStore>,
        mut me: ReplicaRecord,
        shared: bool,
        clock: Clock,
    ) -> Result<Cluster, ClusterError> {
        let now = clock.now();
        if shared {
            for other in store.replicas().await? {
                if other.id == me.id || !other.alive(now) {
                    continue;
                }
                let refused = |who, what| ClusterError::NotShareable {
                    me: me.id.clone(),
                    other: other.id.clone(),
                    who,
                    what,
                };
                if let Some(what) = me.private_parts() {
                    return Err(refused("it", what));
                }
                if let Some(what) = other.private_parts() {
                    return Err(refused("that one", what));
                }
            }
        }
        me.last_heartbeat = now;
        // What its will says, to the millisecond, and what the catalog keeps match.
        me.started_at = chrono::SubsecRound::trunc_subsecs(me.started_at, 3);
        store.heartbeat(&me, now - FORGET_AFTER).await?;
        Ok(Cluster {
            store,
            peers: Peers::new(&me.id, me.started_at),
            me: Arc::new(std::sync::Mutex::new(me)),
            clock,
            leases: Arc::default(),
            renewed: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// This replica's id.
    pub fn id(&self) -> String {
        crate::lock(&self.me).id.clone()
    }

    /// When this run of the replica started.
    pub fn started_at(&self) -> DateTime<Utc> {
        crate::lock(&self.me).started_at
    }

    /// The other live replicas, by route tag (renewed with the heartbeat).
    pub fn peers(&self) -> Peers {
        self.peers.clone()
    }

    /// The lease `name`, which this replica tries to take and renews from now on (see
    /// [`Cluster::run`]); the work it names runs where [`Lease::held`].
    pub fn lease(&self, name: &'static str) -> Lease {
        let mut leases = crate::lock(&self.leases);
        if let Some(l) = leases.iter().find(|l| l.name == name) {
            return l.clone();
        }
        let lease = Lease {
            name,
            holder: self.id().into(),
            until: Arc::default(),
        };
        leases.push(lease.clone());
        lease
    }

    /// Takes or renews every lease once; returns the names held.
    pub async fn renew_leases(&self) -> Vec<String> {
        let id = self.id();
        let leases = crate::lock(&self.leases).clone();
        let mut held = Vec::new();
        for lease in leases {
            let asked = std::time::Instant::now();
            let had = lease.held();
            let until = match self.store.take_lease(lease.name, &id, LEASE_TTL).await {
                // Counted from before the request: this replica stops acting on it before
                // the catalog lets another take it.
                Ok(true) => Some(asked + LEASE_TTL - LEASE_EVERY),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(lease = lease.name, error = %e, "cannot renew a lease");
                    *crate::lock(&lease.until)
                }
            };
            *crate::lock(&lease.until) = until;
            match (had, lease.held()) {
                (false, true) => tracing::info!(
                    lease = lease.name,
                    "took the lease: this replica does its work"
                ),
                (true, false) => tracing::warn!(
                    lease = lease.name,
                    "lost the lease: another replica does its work"
                ),
                _ => {}
            }
            if lease.held() {
                held.push(lease.name.to_string());
            }
        }
        held
    }

    /// What the other replicas change from now on (see [`ClusterStore::changes`]).
    pub async fn changes(&self) -> StoreResult<Option<ChangeFeed>> {
        self.store.changes(&self.id()).await
    }

    /// Renews the heartbeat every [`HEARTBEAT_EVERY`] and the leases every [`LEASE_EVERY`]
    /// until `stop`; then gives up the leases held. When a replica's will arrives, ends its
    /// leases and takes what it can of them at once.
    pub async fn run(self, stop: CancellationToken) {
        let mut every = tokio::time::interval(HEARTBEAT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leases = tokio::time::interval(LEASE_EVERY);
        leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wills = self.peers.departures();
        let mut ended: Vec<(String, DateTime<Utc>)> = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Ok(()) = wills.changed() => {
                    self.end_departed(&mut ended).await;
                    self.renew_and_note().await;
                }
                _ = leases.tick() => {
                    if !self.renew_and_note().await {
                        continue;
                    }
                    // The replicas list shows a handover at once.
                }
                _ = every.tick() => {}
            }
            let now = self.clock.now();
            let me = {
                let mut me = crate::lock(&self.me);
                me.last_heartbeat = now;
                me.clone()
            };
            if let Err(e) = self.store.heartbeat(&me, now - FORGET_AFTER).await {
                tracing::warn!(error = %e, "cannot renew this replica's heartbeat");
            }
            match self.store.replicas().await {
                Ok(replicas) => self.peers.update(&replicas, self.clock.now()),
                Err(e) => tracing::warn!(error = %e, "cannot read the other replicas"),
            }
            self.renewed.send_modify(|n| *n += 1);
        }
        let id = self.id();
        let leases = crate::lock(&self.leases).clone();
        for lease in leases.iter().filter(|l| l.held()) {
            *crate::lock(&lease.until) = None;
            if let Err(e) = self.store.drop_lease(lease.name, &id).await {
                tracing::warn!(lease = lease.name, error = %e, "cannot give up a lease");
            }
        }
    }

    /// Takes or renews every lease once, and notes the ones held in this replica's record;
    /// true when they changed.
    async fn renew_and_note(&self) -> bool {
        let held = self.renew_leases().await;
        let mut me = crate::lock(&self.me);
        std::mem::replace(&mut me.leases, held) != me.leases
    }

    /// Ends the leases of each replica whose will arrived, once per run of it, if the
    /// catalog lists that run (a will the broker kept for long is of a run that may have
    /// come back since).
    async fn end_departed(&self, ended: &mut Vec<(String, DateTime<Utc>)>) {
        let departed = self.peers.departed_list();
        // Those Peers forgot (the replica came back, or is no longer listed) are done with.
        ended.retain(|d| departed.contains(d));
        let gone: Vec<_> = departed
            .into_iter()
            .filter(|d| !ended.contains(d))
            .collect();
        if gone.is_empty() {
            return;
        }
        let listed = match self.store.replicas().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the other replicas");
                return;
            }
        };
        for (id, started_at) in gone {
            if !listed
                .iter()
                .any(|r| r.id == id && r.started_at == started_at)
            {
                continue;
            }
            match self.store.end_leases(&id).await {
                Ok(()) => {
                    tracing::warn!(replica_id = %id, "a replica's broker connection dropped (its will): its leases and broker session are taken over now");
                    ended.push((id, started_at));
                }
                Err(e) => {
                    tracing::warn!(replica_id = %id, error = %e, "cannot end a dead replica's leases")
                }
            }
        }
    }

    /// Wakes after each heartbeat and each renewal of the leases that a will set off: the
    /// work on dead replicas (the adoption of their broker sessions) looks again.
    pub fn renewed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.renewed.subscribe()
    }

    /// The deployment as the catalog lists it.
    pub async fn view(&self) -> StoreResult<ClusterView> {
        let now = self.clock.now();
        let replicas = self
            .store
            .replicas()
            .await?
            .into_iter()
            .map(|record| ReplicaView {
                alive: record.alive(now) && !self.peers.departed(&record),
                record,
            })
            .collect();
        Ok(ClusterView {
            replica_id: self.id(),
            replicas,
        })
    }
}

#[cfg(test)]
mod tests;
