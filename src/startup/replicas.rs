//! Joining the deployment of replicas and following what the others commit.

use super::*;

/// Follows what the other replicas commit (PostgreSQL LISTEN/NOTIFY): live views (SSE) and the
/// rollout scheduler see it within about a second.
pub(super) async fn follow_changes(
    cluster: &crate::cluster::Cluster,
    ota: &crate::ota::OtaService,
    rollouts: &crate::rollout::RolloutService,
    stop: &CancellationToken,
) {
    use futures::StreamExt;
    let mut feed = match cluster.changes().await {
        Ok(Some(feed)) => feed,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow other replicas' changes; live views follow every few seconds");
            return;
        }
    };
    let (ota, rollouts, stop) = (ota.clone(), rollouts.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let changed = tokio::select! {
                _ = stop.cancelled() => break,
                changed = feed.next() => changed,
            };
            match changed {
                Some(crate::cluster::Changed::Tasks(ids)) => ota.changed_elsewhere(&ids).await,
                Some(crate::cluster::Changed::Rollout(id)) => rollouts.changed_elsewhere(&id).await,
                None => break,
            }
        }
    });
}

/// Registers this replica (its heartbeat) in the catalog: refused when it would share a
/// PostgreSQL catalog while it or a live other replica keeps packages or gateways to itself.
pub(super) async fn join_cluster(
    settings: &Settings,
    catalog: &Arc<dyn Store>,
    instance_id: &str,
    clock: &crate::domain::Clock,
) -> Result<crate::cluster::Cluster, StartupError> {
    let now = clock.now();
    let me = crate::cluster::ReplicaRecord {
        id: settings
            .replica_id
            .clone()
            .unwrap_or_else(|| instance_id.to_string()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: now,
        last_heartbeat: now,
        blob_store: match settings.blob_backend {
            crate::blobs::BlobBackend::Local { .. } => "local",
            crate::blobs::BlobBackend::S3 { .. } => "s3",
        }
        .to_string(),
        broker: match settings.mqtt.target {
            crate::mqtt::BrokerTarget::Embedded(_) => "embedded",
            crate::mqtt::BrokerTarget::External { .. } => "external",
        }
        .to_string(),
        leases: Vec::new(),
    };
    let shared = matches!(
        settings.catalog,
        crate::catalog::CatalogBackend::Postgres(_)
    );
    let cluster = crate::cluster::Cluster::join(catalog.clone(), me, shared, clock.clone()).await?;
    tracing::info!(replica_id = %cluster.id(), "joined the deployment");
    Ok(cluster)
}
