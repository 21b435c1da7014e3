//! What a replica of several does besides following its own tasks: it takes in the open
//! tasks the others created (and drops or reads again those that ended elsewhere), and, once
//! it adopted a dead replica's broker session (or came back itself), sends again the
//! `ota_create` that replica's previous run stored but no gateway answered.

use super::*;
use tracking::RESENT;

impl OtaService {
    /// Sends again, once and with the same tid and bid (as a QoS 1 redelivery would), the
    /// `ota_create` of the open tasks replica `sender` stored before `created_before` that no
    /// gateway answered. Called once that run of the replica died (or stopped) and every
    /// message its broker session held is recorded: such a message was stored and queued,
    /// but may never have reached the broker. Tasks created after `created_before` are a
    /// later run's. The history notes `publish_again` first, in a write checked against the
    /// stored revision, so a reply stored meanwhile prevents it. Returns how many were sent
    /// again.
    pub async fn resend_unanswered(&self, sender: &str, created_before: DateTime<Utc>) -> usize {
        let tag = crate::cluster::route_tag(sender);
        let due = |t: &OtaTask| {
            t.tid.starts_with(&tag)
                && t.created_at < created_before
                && t.status == TaskStatus::Sent
                && t.replied_at.is_none()
                && !t.history.iter().any(|h| h.source == RESENT)
        };
        // The tasks memory does not know yet, then fresh copies of the candidates.
        self.sync_open().await;
        let ids: Vec<String> = {
            let open = lock(&self.inner.open);
            open.tasks
                .values()
                .filter(|t| due(t))
                .map(|t| t.id.clone())
                .collect()
        };
        if ids.is_empty() {
            return 0;
        }
        self.refresh(&ids).await;
        let now = self.inner.clock.now();
        let mut tasks: Vec<OtaTask> = {
            let open = lock(&self.inner.open);
            ids.iter()
                .filter_map(|id| open.tasks.get(id))
                .filter(|t| due(t))
                .cloned()
                .collect()
        };
        for t in &mut tasks {
            t.note(RESENT, None, now);
            t.last_event_at = Some(now);
        }
        let Ok(stale) = self.save_all(&tasks.iter().collect::<Vec<_>>()).await else {
            return 0;
        };
        let mut sent = 0;
        for t in tasks.iter().filter(|t| !stale.contains(&t.id)) {
            let (topic, message) = self.inner.publisher.render(&OtaCreate::for_task(t));
            let payload = serde_json::to_vec(&message).unwrap_or_default();
            if self.inner.publisher.publish(topic, payload) {
                sent += 1;
            }
            tracing::warn!(task_id = %t.id, gateway_sn = %t.gateway_sn, tid = %t.tid, replica_id = sender, "ota_create sent again (same tid and bid): the replica that sent it died or stopped, and the gateway never answered");
        }
        sent
    }

    /// Takes into memory the open tasks other replicas created, and the stored copies of
    /// tasks memory holds open that ended (or went) in the catalog (a shared catalog; on the
    /// replica running the timers, elsewhere they are dropped). Only those are read whole: a copy another replica changed is read when this replica next
    /// writes it (the write is refused), and reads of the API go to the catalog.
    pub(super) async fn sync_open(&self) {
        let ids = match self.inner.stores.tasks.open_task_ids().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "reading open OTA tasks failed");
                return;
            }
        };
        let open: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        let (unknown, gone) = {
            let memory = lock(&self.inner.open);
            let unknown: Vec<String> = ids
                .iter()
                .filter(|id| !memory.tasks.contains_key(id.as_str()))
                .cloned()
                .collect();
            let gone: Vec<String> = memory
                .tasks
                .values()
                .filter(|t| !t.status.is_final() && !open.contains(t.id.as_str()))
                .map(|t| t.id.clone())
                .collect();
            (unknown, gone)
        };
        match self.inner.stores.tasks.tasks_by_id(&unknown).await {
            Ok(stored) => stored.iter().for_each(|task| self.learn(task)),
            Err(e) => tracing::warn!(error = %e, "reading new OTA tasks failed"),
        }
        if self.runs_timers() {
            // Their final copies: late verification watches them here.
            self.refresh(&gone).await;
        } else {
            // Nothing here follows a task that ended elsewhere: reading it whole (its whole
            // history) only to drop it is the largest read a replica would make.
            let mut open = lock(&self.inner.open);
            for id in &gone {
                if let Some(t) = open.tasks.get(id).cloned() {
                    open.forget(&t);
                }
            }
        }
    }
}
