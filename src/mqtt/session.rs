//! The client session: the one task that owns rumqttc's event loop. It resubscribes on every
//! CONNACK, reconnects with backoff, routes gateway messages to the device registry and the
//! OTA service, answers what the protocol expects answered, and acknowledges in order.

use super::*;
use crate::domain::jittered;
use reports::{osd_of, state_of, topology_of};
use topics::Inbound;
use wire::Envelope;

/// First reconnect delay after the connection drops.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// Longest reconnect delay: a broker that restarts is back within a second or two, and the
/// docks reconnect that fast too; messages published meanwhile are lost on a broker without
/// persistence, so the gap must stay short.
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// How often the session reconnects while OTA messages wait, unacknowledged, for redelivery.
const REDELIVER_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Session {
    pub(super) handle: MqttHandle,
    pub(super) registry: DeviceRegistry,
    pub(super) ota: OtaSender,
    pub(super) replies: bool,
    /// Shared-subscription group, if the up topics are shared.
    pub(super) share_group: Option<String>,
    pub(super) acks: acks::Acks,
}

impl Session {
    pub(super) async fn run(self, mut eventloop: rumqttc::EventLoop, cancel: CancellationToken) {
        let mut backoff = RECONNECT_FIRST;
        // Not at once: a poll dropped half-way through the first connect for a timer tick
        // closes the connection before its CONNECT.
        let mut redeliver = tokio::time::interval_at(
            tokio::time::Instant::now() + REDELIVER_EVERY,
            REDELIVER_EVERY,
        );
        redeliver.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => break,
                ev = eventloop.poll() => ev,
                _ = redeliver.tick() => {
                    // The broker sends unacknowledged messages again when the (persistent)
                    // session reconnects.
                    let withheld = self.handle.status.withheld.swap(0, Ordering::Relaxed);
                    if withheld > 0 {
                        tracing::warn!(withheld, "reconnecting to receive the OTA messages that could not be recorded again");
                        let _ = self.handle.client.try_disconnect();
                    }
                    continue;
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = RECONNECT_FIRST;
                    self.acks.reset();
                    let status = &self.handle.status;
                    status.subscribed.store(false, Ordering::Relaxed);
                    status.pending_subacks.store(
                        (topics::QOS1_FILTERS.len() + topics::QOS0_FILTERS.len()) as u64,
                        Ordering::Relaxed,
                    );
                    status.connected.store(true, Ordering::Relaxed);
                    tracing::info!("MQTT session up; subscribing");
                    self.subscribe();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let status = &self.handle.status;
                    let left = status
                        .pending_subacks
                        .fetch_sub(1, Ordering::Relaxed)
                        .saturating_sub(1);
                    if left == 0 {
                        status.subscribed.store(true, Ordering::Relaxed);
                        tracing::debug!("MQTT subscriptions acknowledged");
                    }
                }
                // An OTA message carries its acknowledgement to the OTA service; any other
                // is done here.
                Ok(Event::Incoming(Packet::Publish(p))) => self.take(&p),
                Ok(_) => {}
                Err(e) => {
                    let status = &self.handle.status;
                    status.subscribed.store(false, Ordering::Relaxed);
                    if status.connected.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "MQTT connection lost; reconnecting");
                    }
                    status.connect_errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut g) = status.last_error.lock() {
                        *g = Some(e.to_string());
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(jittered(backoff)) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
        let _ = self.handle.client.try_disconnect();
    }

    fn subscribe(&self) {
        for (filters, qos) in [
            (&topics::QOS1_FILTERS[..], QoS::AtLeastOnce),
            (&topics::QOS0_FILTERS[..], QoS::AtMostOnce),
        ] {
            for f in filters {
                let f = topics::shared(self.share_group.as_deref(), f);
                if let Err(e) = self.handle.client.try_subscribe(&f, qos) {
                    tracing::error!(filter = f, error = %e, "MQTT subscribe not queued");
                }
            }
        }
    }

    /// Handles one message; gives its acknowledgement back unless the message went to the
    /// OTA service, which acknowledges it once recorded.
    fn on_publish(&self, p: &rumqttc::Publish, ack: crate::domain::Ack) -> Handled {
        let (topic, payload) = (p.topic.as_str(), p.payload.as_ref());
        let status = &self.handle.status;
        status.messages_in.fetch_add(1, Ordering::Relaxed);
        if payload.len() > MAX_ACCEPTED_PAYLOAD {
            status.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                topic,
                bytes = payload.len(),
                "oversized MQTT payload dropped"
            );
            return Handled::Done(ack);
        }
        let Some(inbound) = topics::parse(topic) else {
            status.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, "message on an unexpected topic");
            return Handled::Done(ack);
        };
        let env = match Envelope::parse(payload) {
            Ok(env) => env,
            Err(e) => {
                status.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic, error = %e, "malformed MQTT payload");
                return Handled::Done(ack);
            }
        };
        let dialect = if env.gateway.is_some() {
            "dji"
        } else {
            "autel"
        };
        match inbound {
            Inbound::Status(sn) => {
                if env.method.as_deref() == Some("update_topo") {
                    self.registry
                        .on_topology(&sn, &topology_of(&env.data), dialect);
                    if self.replies {
                        self.handle
                            .publish(topics::status_reply(&sn), wire::reply(&env, "update_topo"));
                    }
                } else {
                    self.registry.on_seen(&sn);
                }
            }
            Inbound::State(sn) => match state_of(&env.data) {
                Ok(report) => self.registry.on_state(&sn, env.gateway.as_deref(), &report),
                Err(field) => {
                    status.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        topic,
                        field,
                        "malformed state report: not an integer; ignored"
                    );
                }
            },
            Inbound::Osd(sn) => {
                self.registry
                    .on_osd(&sn, env.gateway.as_deref(), &osd_of(&env.data));
            }
            Inbound::Events(sn) => {
                self.registry.on_seen(&sn);
                let method = env.method.clone().unwrap_or_default();
                let reply = env.need_reply == Some(1)
                    || (method == "ota_progress" && env.need_reply.is_none());
                if reply && self.replies {
                    self.handle
                        .publish(topics::events_reply(&sn), wire::reply(&env, &method));
                }
                if method == "ota_progress" {
                    return self.forward(false, sn, env, p, ack);
                }
            }
            Inbound::ServicesReply(sn) => {
                self.registry.on_seen(&sn);
                if env.method.as_deref().is_none_or(|m| m == "ota_create") {
                    return self.forward(true, sn, env, p, ack);
                }
            }
        }
        Handled::Done(ack)
    }
}

/// What became of a gateway message.
enum Handled {
    /// Done here: acknowledge it.
    Done(crate::domain::Ack),
    /// Handed to the OTA service, which acknowledges it once recorded.
    Forwarded,
}

impl Session {
    /// Takes one message in without waiting: the event loop must keep being polled, since it
    /// also carries fwrepo's own publishes, acknowledgements and pings. What waits for the
    /// OTA service is bounded by the broker's in-flight window (see [`OtaSender`]).
    pub(super) fn take(&self, p: &rumqttc::Publish) {
        let ack = self.acks.track(p);
        match self.on_publish(p, ack) {
            Handled::Done(ack) => ack.done(),
            Handled::Forwarded => {}
        }
    }

    fn forward(
        &self,
        is_reply: bool,
        topic_sn: String,
        env: Envelope,
        p: &rumqttc::Publish,
        ack: crate::domain::Ack,
    ) -> Handled {
        // The envelope parsed, so the payload is JSON text.
        let raw = std::str::from_utf8(&p.payload)
            .ok()
            .and_then(|text| serde_json::value::RawValue::from_string(text.to_string()).ok())
            .unwrap_or_default();
        let msg = OtaMessage {
            is_reply,
            topic_sn,
            tid: env.tid,
            bid: env.bid,
            method: env.method,
            report: wire::report_of(&env.data),
            raw,
            ack,
        };
        // An error means the service stopped: the message stays unacknowledged.
        let _ = self.ota.send(msg);
        Handled::Forwarded
    }
}
