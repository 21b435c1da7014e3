//! The scheduler's loop: a round every 500 ms and on every task change or action, under the
//! scheduling lease when several replicas share the catalog, and the hourly pruning of
//! Idempotency-Key answers.

use super::*;

impl RolloutService {
    /// Drives every active rollout until `cancel`: a round every 500 ms, and at once after an
    /// OTA task changes or an operator acts. Under a lease (several replicas), only while
    /// this replica holds it: taking it over loads the active rollouts from the catalog, and
    /// every 2 s the rollouts other replicas started or acted on are read again.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tasks = self.inner.ota.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.inner.lease.get().is_some();
        let mut discover = tokio::time::interval(Duration::from_secs(2));
        discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut led = self.drives();
        if !led {
            // Another replica (or none yet) holds the lease: reads go to the catalog.
            lock(&self.inner.active).clear();
        }
        // Idempotency-Key answers (API requests and every rollout dispatch) are kept 24 h.
        let mut prune = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = prune.tick() => {
                    match self.inner.stores.idempotency.prune_idempotency(Utc::now()).await {
                        Ok(n) if n > 0 => tracing::info!(removed = n, "expired Idempotency-Key answers pruned"),
                        Err(e) => tracing::warn!(error = %e, "pruning Idempotency-Key answers failed"),
                        _ => {}
                    }
                    continue;
                }
                _ = tick.tick() => {}
                _ = discover.tick(), if shared => {
                    if let Err(e) = self.discover().await {
                        tracing::warn!(error = %e, "reading rollouts changed elsewhere failed");
                    }
                }
                _ = self.inner.wake.notified() => {}
                t = tasks.recv() => {
                    match t {
                        Ok(t) if !t.status.is_final() => continue,
                        Err(broadcast::error::RecvError::Closed) => break,
                        _ => {}
                    }
                }
            }
            let drives = self.drives();
            if drives != led {
                if drives {
                    match Self::load_active(&self.inner.stores).await {
                        Ok(loaded) => {
                            let mut active = lock(&self.inner.active);
                            for a in loaded.into_values() {
                                Self::take_in(&mut active, a);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "loading the active rollouts failed");
                            continue;
                        }
                    }
                    tracing::info!("this replica drives the rollouts now");
                } else {
                    lock(&self.inner.active).clear();
                    tracing::warn!("another replica drives the rollouts now");
                }
                led = drives;
            }
            if !drives {
                continue;
            }
            // Coalesce a burst of task changes (a fleet finishing together) into one round.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = tasks.try_recv() {}
            self.round().await;
        }
    }
}
