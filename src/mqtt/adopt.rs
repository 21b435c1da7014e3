//! Taking over the broker session of a replica that died. Members of a shared-subscription
//! group keep persistent sessions, so a broker holds what it had sent a replica but not seen
//! acknowledged when the replica was killed, and goes on queueing the replica's share of new
//! messages until the session is gone. The replica holding the `mqtt-sessions` lease connects
//! as the dead one (same client id, session kept), unsubscribes it from the group (the broker
//! stops routing to it), handles and acknowledges everything the session held, then deletes
//! the session (a clean connect). If the dead replica comes back meanwhile, it takes its
//! session back (the broker closes the adopter's connection) and the adoption ends.

use super::*;

/// How long the adopted session must stay quiet (and every message be acknowledged) before
/// it is deleted.
const QUIET: Duration = Duration::from_secs(2);
/// The longest an adoption may take.
const LONGEST: Duration = Duration::from_secs(120);

/// Adopts the session of the dead replica `replica_id` in `settings`' shared-subscription
/// group: its messages go to `registry` and `ota` as this replica's own do. The session is
/// deleted once quiet, and not before `keep_until`: until then other replicas may still hand
/// it messages. Returns how many messages it held; an error when the adoption was cut short
/// (tried again later).
pub async fn adopt(
    settings: &MqttSettings,
    replica_id: &str,
    (registry, ota): (DeviceRegistry, OtaSender),
    keep_until: tokio::time::Instant,
    cancel: CancellationToken,
) -> Result<u64, String> {
    let client_id = group_client_id(replica_id);
    let mut options =
        external_options(settings, client_id.clone(), false).map_err(|e| e.to_string())?;
    session_options(&mut options);
    let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    let status = Arc::new(MqttStatus::default());
    let session = Session {
        acks: acks::Acks::new(client.clone(), Arc::clone(&status)),
        handle: MqttHandle {
            client,
            confirms: Arc::default(),
            status,
            address_line: String::new(),
            tls_address_line: None,
        },
        registry,
        ota,
        replies: settings.replies,
        share_group: settings.share_group.clone(),
        peers: None,
    };
    let held = tokio::time::timeout(LONGEST, session.drain(eventloop, keep_until, &cancel))
        .await
        .map_err(|_| format!("the session of {client_id} did not drain in {LONGEST:?}"))??;
    // The session has no subscription and nothing in flight now: delete it.
    let mut options =
        external_options(settings, client_id.clone(), true).map_err(|e| e.to_string())?;
    session_options(&mut options);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let deleted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_disconnect();
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match deleted {
        Ok(Ok(())) => Ok(held),
        Ok(Err(e)) => Err(format!("deleting the session of {client_id}: {e}")),
        Err(_) => Err(format!("deleting the session of {client_id} timed out")),
    }
}

impl Session {
    /// Handles what the adopted session holds until it is quiet and acknowledged, then
    /// disconnects. Returns the number of messages handled.
    async fn drain(
        self,
        mut eventloop: rumqttc::EventLoop,
        keep_until: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Result<u64, String> {
        let mut held = 0u64;
        let mut unsubscribing = 0usize;
        let mut connected = false;
        // Quiet and acknowledged at two checks in a row: the last PUBACK left before the
        // DISCONNECT (a message unacknowledged when the session is deleted would be lost).
        let mut idle_checks = 0;
        let quiet = tokio::time::sleep(QUIET);
        tokio::pin!(quiet);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return Err("stopping".into()),
                ev = eventloop.poll() => ev,
                _ = &mut quiet, if connected => {
                    idle_checks = if unsubscribing == 0 && self.acks.idle() { idle_checks + 1 } else { 0 };
                    if idle_checks >= 2 && tokio::time::Instant::now() >= keep_until {
                        let _ = self.handle.client.try_disconnect();
                    }
                    quiet.as_mut().reset(tokio::time::Instant::now() + QUIET / 4);
                    continue;
                }
            };
            match &event {
                Ok(ev) => self.confirm(ev),
                Err(_) => self.connection_failed(&eventloop),
            }
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    // The broker stops routing the group's messages to this session; what it
                    // queued and sent already is delivered (again) below.
                    for filter in topics::QOS1_FILTERS.iter().chain(&topics::QOS0_FILTERS) {
                        let f = topics::shared(self.share_group.as_deref(), filter);
                        if self.handle.client.try_unsubscribe(f).is_ok() {
                            unsubscribing += 1;
                        }
                    }
                    quiet.as_mut().reset(tokio::time::Instant::now() + QUIET);
                }
                Ok(Event::Incoming(Packet::UnsubAck(_))) => {
                    unsubscribing = unsubscribing.saturating_sub(1);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    held += 1;
                    self.take(&p);
                    quiet.as_mut().reset(tokio::time::Instant::now() + QUIET);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(held),
                Ok(_) => {}
                // Refused, cut, or taken back by the replica itself (it came back).
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
