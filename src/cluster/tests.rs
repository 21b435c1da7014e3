//! Joining a deployment: who may share a catalog with whom.

use super::*;
use crate::store::CatalogError;

/// A catalog's heartbeats in memory.
#[derive(Default)]
struct Beats(std::sync::Mutex<Vec<ReplicaRecord>>);

#[async_trait::async_trait]
impl ClusterStore for Beats {
    async fn heartbeat(&self, r: &ReplicaRecord, forget_before: DateTime<Utc>) -> StoreResult<()> {
        let mut all = self.0.lock().unwrap();
        all.retain(|x| x.id != r.id && x.last_heartbeat >= forget_before);
        all.push(r.clone());
        Ok(())
    }

    async fn replicas(&self) -> Result<Vec<ReplicaRecord>, CatalogError> {
        Ok(self.0.lock().unwrap().clone())
    }

    async fn take_lease(&self, _: &str, _: &str, _: Duration) -> StoreResult<bool> {
        Ok(true)
    }

    async fn drop_lease(&self, _: &str, _: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn end_leases(&self, _: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn changes(&self, _: &str) -> StoreResult<Option<ChangeFeed>> {
        Ok(None)
    }
}

fn replica(id: &str, blob_store: &str, broker: &str) -> ReplicaRecord {
    ReplicaRecord {
        id: id.into(),
        version: "test".into(),
        started_at: Utc::now(),
        last_heartbeat: Utc::now(),
        blob_store: blob_store.into(),
        broker: broker.into(),
        leases: Vec::new(),
    }
}

#[tokio::test]
async fn replicas_share_a_catalog_only_with_shared_packages_and_broker() {
    let store: Arc<dyn ClusterStore> = Arc::new(Beats::default());
    let clock = Clock::default();
    let join = |r, shared| Cluster::join(Arc::clone(&store), r, shared, clock.clone());
    // Alone, anything goes.
    let a = join(replica("a", "local", "embedded"), true).await.unwrap();
    // Not beside a live replica that keeps packages to itself, whatever this one uses…
    let refused = join(replica("b", "s3", "external"), true).await;
    assert!(
        matches!(&refused, Err(ClusterError::NotShareable { other, who: "that one", .. }) if other == "a"),
        "{:?}",
        refused.err()
    );
    // …and the same replica coming back (a restart) is not another one.
    join(replica("a", "local", "embedded"), true).await.unwrap();
    // A catalog that is not shared (sled) never refuses.
    join(replica("c", "local", "embedded"), false)
        .await
        .unwrap();
    let view = a.view().await.unwrap();
    assert_eq!(view.replica_id, "a");
    let ids: Vec<&str> = view.replicas.iter().map(|r| r.record.id.as_str()).collect();
    assert_eq!(ids, ["a", "c"]);
    assert!(view.replicas.iter().all(|r| r.alive));
}

#[tokio::test]
async fn shared_replicas_join_each_other_and_a_silent_one_is_gone() {
    let store: Arc<dyn ClusterStore> = Arc::new(Beats::default());
    let clock = Clock::default();
    let join = |r| Cluster::join(Arc::clone(&store), r, true, clock.clone());
    let a = join(replica("a", "s3", "external")).await.unwrap();
    join(replica("b", "s3", "external")).await.unwrap();
    // This one keeps packages locally: refused beside a and b.
    let refused = join(replica("c", "local", "external")).await;
    assert!(
        matches!(&refused, Err(ClusterError::NotShareable { who: "it", .. })),
        "{:?}",
        refused.err()
    );
    // b stops renewing; once its heartbeat is old it is listed as gone.
    let mut old = replica("b", "s3", "external");
    old.last_heartbeat = Utc::now() - ALIVE_WITHIN - chrono::Duration::seconds(1);
    store
        .heartbeat(&old, Utc::now() - FORGET_AFTER)
        .await
        .unwrap();
    let view = a.view().await.unwrap();
    let alive: Vec<(&str, bool)> = view
        .replicas
        .iter()
        .map(|r| (r.record.id.as_str(), r.alive))
        .collect();
    assert_eq!(alive, [("a", true), ("b", false)]);
    // A replica gone that long is forgotten at the next heartbeat.
    old.last_heartbeat = Utc::now() - FORGET_AFTER - chrono::Duration::seconds(1);
    store
        .heartbeat(&old, Utc::now() - FORGET_AFTER)
        .await
        .unwrap();
    store
        .heartbeat(&replica("a", "s3", "external"), Utc::now() - FORGET_AFTER)
        .await
        .unwrap();
    let ids: Vec<String> = a
        .view()
        .await
        .unwrap()
        .replicas
        .into_iter()
        .map(|r| r.record.id)
        .collect();
    assert_eq!(ids, ["a"]);
}

#[test]
fn change_notifications_name_their_origin_and_records() {
    assert_eq!(
        Changed::parse("r2\ttask\tA,B", "r1"),
        Some(Changed::Tasks(vec!["A".into(), "B".into()]))
    );
    assert_eq!(
        Changed::parse("r2\trollout\tR", "r1"),
        Some(Changed::Rollout("R".into()))
    );
    assert_eq!(Changed::parse("r1\ttask\tA", "r1"), None, "its own");
    for junk in ["", "r2", "r2\ttask", "r2\ttask\t", "r2\tdevice\tD"] {
        assert_eq!(Changed::parse(junk, "r1"), None, "{junk:?}");
    }
}
