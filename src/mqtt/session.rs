//! The client session: the one task that owns rumqttc's event loop. It resubscribes on every
//! CONNACK, reconnects with backoff, routes gateway messages to the device registry and the
//! OTA service, answers what the protocol expects answered, and acknowledges in order.

use super::*;
use crate::domain::jittered;
use crate::lock;
use reports::{osd_of, state_of, topology_of};
use rumqttc::Outgoing;
use topics::Inbound;
use wire::Envelope;

/// First reconnect delay after the connection drops.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// Longest reconnect delay: a broker that restarts is back within a second or two, and the
/// docks reconnect that fast too; messages published meanwhile are lost on a broker without
/// persistence, so the gap must stay short.
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// The topic (after the handed prefix) of the probe a replica sends itself.
const PROBE: &str = "probe";

/// How often the session reconnects while OTA messages wait, unacknowledged, for redelivery.
const REDELIVER_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Session {
    pub(super) handle: MqttHandle,
    pub(super) registry: DeviceRegistry,
    pub(super) ota: OtaSender,
    pub(super) replies: bool,
    /// Shared-subscription group, if the up topics are shared.
    pub(super) share_group: Option<String>,
    /// The other replicas of the group, to hand each a task's messages it holds (the main
    /// session of a replica in a group; none for an adopted session).
    pub(super) peers: Option<crate::cluster::Peers>,
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
            if let Ok(ev) = &event {
                self.confirm(ev);
            }
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = RECONNECT_FIRST;
                    self.acks.reset();
                    let status = &self.handle.status;
                    status.subscribed.store(false, Ordering::Relaxed);
                    let filters = self.filters();
                    status
                        .pending_subacks
                        .store(filters.len() as u64, Ordering::Relaxed);
                    status.connected.store(true, Ordering::Relaxed);
                    tracing::info!("MQTT session up; subscribing");
                    self.subscribe(filters);
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
                    self.connection_failed(&eventloop);
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
        // A DISCONNECT on the wire, so the broker drops this session's will: a replica that
        // stops is not dead (it gave its leases up, and takes its session back when it
        // returns).
        if self.handle.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }

    /// Keeps the confirmations of fwrepo's own publishes in step with the event loop: packet
    /// ids taken, PUBACKs, and a new broker session (what it forgot is dropped unconfirmed, so
    /// what waited on it is done again).
    pub(super) fn confirm(&self, event: &Event) {
        // Only these events concern them: the lock stays off the path of incoming messages.
        let confirms = || lock(&self.handle.confirms);
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => confirms().sent(*pkid),
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => confirms().collided(*pkid),
            Event::Incoming(Packet::PubAck(a)) => {
                let done = confirms().acked(a.pkid);
                if let Some(ack) = done {
                    ack.done();
                }
            }
            Event::Incoming(Packet::ConnAck(c)) => {
                let lost = confirms().connected(c.session_present);
                drop(lost);
            }
            _ => {}
        }
    }

    /// The connection failed: rumqttc moved what it had not sent into its own queue.
    pub(super) fn connection_failed(&self, eventloop: &rumqttc::EventLoop) {
        let unsent = eventloop
            .pending
            .iter()
            .filter(|r| matches!(r, rumqttc::Request::Publish(p) if p.pkid == 0))
            .count();
        lock(&self.handle.confirms).failed(unsent);
    }

    /// The subscription to the messages other replicas hand this one, in a group.
    fn handed_filter(&self) -> Option<String> {
        let (group, peers) = (self.share_group.as_deref()?, self.peers.as_ref()?);
        Some(topics::handed_filter(group, peers.me()))
    }

    /// Every subscription of the session: the up topics (shared in a group) and, for a
    /// replica's main session in a group, the other replicas' wills and what they hand it.
    fn filters(&self) -> Vec<(String, QoS)> {
        let group = self.share_group.as_deref();
        let mut filters: Vec<(String, QoS)> = topics::QOS1_FILTERS
            .iter()
            .map(|f| (topics::shared(group, f), QoS::AtLeastOnce))
            .chain(
                topics::QOS0_FILTERS
                    .iter()
                    .map(|f| (topics::shared(group, f), QoS::AtMostOnce)),
            )
            .collect();
        if let (Some(group), Some(handed)) = (group, self.handed_filter()) {
            filters.push((topics::gone_filter(group), QoS::AtLeastOnce));
            filters.push((handed, QoS::AtLeastOnce));
        }
        filters
    }

    fn subscribe(&self, filters: Vec<(String, QoS)>) {
        let handed = self.handed_filter();
        for (f, qos) in filters {
            if let Err(e) = self.handle.client.try_subscribe(&f, qos) {
                tracing::error!(filter = f, error = %e, "MQTT subscribe not queued");
            } else if handed.as_ref() == Some(&f) {
                // Handing over starts once the broker passes a probe to this replica: an ACL
                // that denies the topics would drop handed messages silently.
                self.handle.publish(f.replace('#', PROBE), b"{}".to_vec());
            }
        }
    }

    /// Handles one message; gives its acknowledgement back unless the message went to the
    /// OTA service, which acknowledges it once recorded.
    fn on_publish(&self, p: &rumqttc::Publish, ack: crate::domain::Ack) -> Handled {
        if let Some(replica) = topics::gone_replica(&p.topic) {
            // A replica's will: the broker lost its connection.
            if let Some(peers) = &self.peers
                && peers.depart(replica, &p.payload)
            {
                tracing::info!(
                    replica_id = replica,
                    "the broker lost a replica's connection (its will)"
                );
            }
            return Handled::Done(ack);
        }
        // A message another replica handed over: it answered and noted the gateway already.
        let (topic, handed) = match topics::unhand(&p.topic) {
            Some(inner) => (inner, true),
            None => (p.topic.as_str(), false),
        };
        let payload = p.payload.as_ref();
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
        if handed && topic == PROBE {
            if !status.handing_over.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "the broker passes messages between replicas: each task's messages go to the replica holding it"
                );
            }
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
        if handed {
            status.handed_in.fetch_add(1, Ordering::Relaxed);
            return match inbound {
                // The gateway is online here too (the replica driving a rollout checks it).
                Inbound::Events(sn) if env.method.as_deref() == Some("ota_progress") => {
                    self.registry.on_seen(&sn);
                    self.forward(false, sn, env, p, ack)
                }
                Inbound::ServicesReply(sn) => {
                    self.registry.on_seen(&sn);
                    self.forward(true, sn, env, p, ack)
                }
                _ => Handled::Done(ack),
            };
        }
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
                    return match self.holder_topic(env.bid.as_deref(), topic) {
                        Some(to) => self.hand_over(to, p, ack),
                        None => self.forward(false, sn, env, p, ack),
                    };
                }
            }
            Inbound::ServicesReply(sn) => {
                self.registry.on_seen(&sn);
                if env.method.as_deref().is_none_or(|m| m == "ota_create") {
                    return match self.holder_topic(env.tid.as_deref(), topic) {
                        Some(to) => self.hand_over(to, p, ack),
                        None => self.forward(true, sn, env, p, ack),
                    };
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

    /// Where to hand a message on `topic` for the task `key` (a tid or bid) names, when a
    /// live replica other than this one holds it.
    fn holder_topic(&self, key: Option<&str>, topic: &str) -> Option<String> {
        let group = self.share_group.as_deref()?;
        if !self.handle.status.handing_over.load(Ordering::Relaxed) {
            return None;
        }
        let holder = self.peers.as_ref()?.holder(key?)?;
        Some(topics::handed(group, &holder, topic))
    }

    /// Hands a task's message to the replica holding the task (on `to`); the gateway's
    /// message is acknowledged once the broker has taken the handed copy (PUBACK).
    fn hand_over(&self, to: String, p: &rumqttc::Publish, ack: crate::domain::Ack) -> Handled {
        if self.handle.publish_confirmed(to, p.payload.to_vec(), ack) {
            self.handle
                .status
                .handed_over
                .fetch_add(1, Ordering::Relaxed);
        }
        Handled::Forwarded
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
