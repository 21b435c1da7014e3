//! Joining the deployment of replicas and following what the others commit.

use super::*;
use chrono::{DateTime, Utc};

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

/// The lease whose holder takes over the broker sessions of dead replicas.
pub const SESSIONS_LEASE: &str = "mqtt-sessions";

/// Takes over the broker session of each replica whose heartbeat stopped or whose will
/// arrived (see [`crate::mqtt::adopt`]), while this replica holds [`SESSIONS_LEASE`]; it
/// looks after every heartbeat, and at once after a will. The messages a
/// replica killed -9 had received but not acknowledged, and its share of those sent since,
/// are handled here instead of being lost. Once they are all recorded, the `ota_create` the
/// dead replica stored but no gateway answered are sent again
/// ([`crate::ota::OtaService::resend_unanswered`]).
pub(super) fn adopt_dead_sessions(
    cluster: &crate::cluster::Cluster,
    mqtt: crate::mqtt::MqttSettings,
    devices: DeviceRegistry,
    (ota, service): (crate::ota::OtaSender, crate::ota::OtaService),
    stop: &CancellationToken,
) {
    let (cluster, stop) = (cluster.clone(), stop.clone());
    let lease = cluster.lease(SESSIONS_LEASE);
    tokio::spawn(async move {
        let mut adopted: std::collections::HashSet<(String, DateTime<Utc>)> = Default::default();
        let mut renewed = cluster.renewed();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = renewed.changed() => if changed.is_err() { break },
            }
            if !lease.held() {
                continue;
            }
            let Ok(view) = cluster.view().await else {
                continue;
            };
            for r in view.replicas.into_iter().filter(|r| !r.alive) {
                // Once per death (a replica that came back and died again is adopted again).
                let death = (r.record.id.clone(), r.record.last_heartbeat);
                if r.record.id == view.replica_id
                    || r.record.broker != "external"
                    || adopted.contains(&death)
                {
                    continue;
                }
                let id = &r.record.id;
                // Others hand it messages while its heartbeat looks alive to them (a will
                // may reach them later than here): the session stays until then.
                let routed_for = (r.record.last_heartbeat + crate::cluster::ALIVE_WITHIN
                    - chrono::Utc::now())
                .to_std()
                .unwrap_or_default();
                let keep_until = tokio::time::Instant::now() + routed_for;
                let parts = (devices.clone(), ota.clone());
                // A later run of it (started after this) sends its own tasks.
                let began = Utc::now();
                match crate::mqtt::adopt(&mqtt, id, parts, keep_until, stop.clone()).await {
                    Ok(held) => {
                        tracing::info!(replica_id = %id, messages = held, "took over the MQTT session of a replica that died");
                        adopted.insert(death);
                        service.resend_unanswered(id, began).await;
                    }
                    Err(e) => {
                        tracing::warn!(replica_id = %id, error = %e, "taking over the MQTT session of a dead replica failed; trying again")
                    }
                }
            }
        }
    });
}

/// A replica that comes back sends again the unanswered `ota_create` its previous run stored
/// (it may have died, or stopped, with them queued), as the replica adopting its session would
/// have: once the broker passed its probe (what its session held has been delivered) and its
/// start is [`crate::cluster::ALIVE_WITHIN`] old (as late as an adoption would, so that the
/// answers of gateways that did get them have come in).
pub(super) fn resend_after_restart(
    cluster: &crate::cluster::Cluster,
    mqtt: &crate::mqtt::MqttHandle,
    ota: &crate::ota::OtaService,
    stop: &CancellationToken,
) {
    let (me, started_at) = (cluster.id(), cluster.started_at());
    let (mqtt, ota, stop) = (mqtt.clone(), ota.clone(), stop.clone());
    let after = (started_at + crate::cluster::ALIVE_WITHIN - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::spawn(async move {
        let due = tokio::time::Instant::now() + after;
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = check.tick() => {}
            }
            if mqtt.probed() && tokio::time::Instant::now() >= due {
                break;
            }
        }
        let sent = ota.resend_unanswered(&me, started_at).await;
        if sent > 0 {
            tracing::warn!(
                sent,
                "sent again the unanswered ota_create of this replica's previous run"
            );
        }
    });
}
