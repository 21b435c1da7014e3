//! Storing the registry and taking in what other replicas stored: the flusher's batches (what
//! changed now, and every [`FLUSH_EVERY`] when the devices only heard from were last seen),
//! the pull of the devices others changed, and looking devices up by serial.

use super::*;

impl DeviceRegistry {
    /// Writes the devices that changed since the last flush, and (`heard`: the periodic
    /// flush) when those only heard from were last seen.
    pub async fn flush(&self, heard: bool) -> Result<usize, CatalogError> {
        let dirty: Vec<String> = lock(&self.inner.dirty).drain().collect();
        let devices = self.copies(&dirty);
        if !devices.is_empty()
            && let Err(e) = self.inner.store.put_devices(&devices).await
        {
            // Written next time.
            lock(&self.inner.dirty).extend(dirty);
            return Err(e);
        }
        if !heard {
            return Ok(devices.len());
        }
        let written: std::collections::HashSet<&String> = dirty.iter().collect();
        let only_heard: Vec<String> = {
            let mut h = lock(&self.inner.heard);
            h.drain().filter(|sn| !written.contains(sn)).collect()
        };
        let touched = self.copies(&only_heard);
        if !touched.is_empty()
            && let Err(e) = self.inner.store.touch_devices(&touched).await
        {
            lock(&self.inner.heard).extend(only_heard);
            return Err(e);
        }
        Ok(devices.len() + touched.len())
    }

    /// Memory's copies of `sns` (those it still has).
    fn copies(&self, sns: &[String]) -> Vec<DeviceRecord> {
        let all = lock(&self.inner.devices);
        sns.iter().filter_map(|sn| all.get(sn).cloned()).collect()
    }

    /// Takes in the devices other replicas stored changes of at or after `since` (each
    /// field group from the copy that saw it last); returns where the next pull starts.
    pub async fn pull(
        &self,
        since: Option<ChangeCursor>,
    ) -> Result<Option<ChangeCursor>, CatalogError> {
        let changed = self.inner.store.changed_devices(since).await?;
        self.take_in(changed.devices);
        Ok(changed.next.or(since))
    }

    /// Takes in what the catalog holds of `sns`, last-seen times included: on a shared
    /// catalog each replica hears only its share of a gateway's messages, and the others
    /// flush when they last heard it every [`FLUSH_EVERY`].
    pub async fn recheck(&self, sns: &[String]) -> Result<(), CatalogError> {
        let stored = self.inner.store.devices_by_sn(sns).await?;
        self.take_in(stored);
        Ok(())
    }

    /// Merges stored copies into memory (each field group from the copy that saw it last).
    fn take_in(&self, stored: Vec<DeviceRecord>) {
        let mut devices = lock(&self.inner.devices);
        for d in stored {
            match devices.get_mut(&d.sn) {
                Some(mine) => {
                    mine.merge_from(&d);
                }
                None => {
                    devices.insert(d.sn.clone(), d);
                }
            }
        }
    }

    /// Runs the flusher until `cancel`, then flushes once more. With `pull_every` (replicas
    /// sharing the catalog), also takes in what the others stored that often.
    pub async fn run(self, cancel: CancellationToken, pull_every: Option<Duration>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pull = tokio::time::interval(pull_every.unwrap_or(FLUSH_EVERY));
        pull.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = pull.tick(), if pull_every.is_some() => {
                    match self.pull(since).await {
                        Ok(next) => since = next,
                        Err(e) => tracing::warn!(error = %e, "reading other replicas' device reports failed"),
                    }
                    continue;
                }
                _ = tick.tick() => {
                    if let Err(e) = self.flush(true).await {
                        tracing::error!(error = %e, "device flush failed");
                    }
                    continue;
                }
                _ = self.inner.kick.notified() => {
                    // A burst of reports (a fleet upgrading) becomes one batch.
                    tokio::time::sleep(KICK_COALESCE).await;
                }
            }
            if let Err(e) = self.flush(false).await {
                tracing::error!(error = %e, "device flush failed");
            }
        }
        if let Err(e) = self.flush(true).await {
            tracing::error!(error = %e, "final device flush failed");
        }
    }
}
