//! The MQTT adapter: the embedded broker ([`broker`]), the one client session fwrepo keeps
//! (rumqttc; its event loop is owned by one task here), topic and payload parsing
//! ([`topics`], [`wire`]), and the replies the protocol expects. Inbound messages are turned
//! into registry updates; publishing never blocks the caller (a full queue counts as dropped).

mod acks;
mod adopt;
pub mod broker;
mod confirms;
pub mod credentials;
pub mod front;
pub mod lenient;
mod reports;
mod session;
pub mod tls;
pub mod topics;
pub mod wire;

pub use adopt::adopt;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::devices::{DeviceRegistry, OsdReport, StateReport, SubDeviceReport, TopologyReport};
use crate::ota::{OtaMessage, OtaSender};
use session::Session;
use wire::{int_of, str_of};

/// Payloads above this are dropped unparsed (contract §5 accepts up to 1 MiB).
pub const MAX_ACCEPTED_PAYLOAD: usize = 1 << 20;
/// The client's packet limit: far above any broker's message limit, so an oversized publish
/// is dropped by fwrepo instead of breaking the connection (and, with a persistent session,
/// looping on reconnect).
pub const CLIENT_PACKET_LIMIT: usize = 16 << 20;

/// Where the broker is.
#[derive(Clone, Debug)]
pub enum BrokerTarget {
    /// Start the embedded broker on this address.
    Embedded(std::net::SocketAddr),
    /// Connect to an external broker.
    External {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// `mqtts`: how to check the broker (and what to present).
        tls: Option<tls::MqttTls>,
        /// User name.
        user: Option<String>,
        /// Password.
        password: Option<String>,
    },
}

/// MQTT session settings.
#[derive(Clone, Debug)]
pub struct MqttSettings {
    /// The broker.
    pub target: BrokerTarget,
    /// Client id (default `fwrepo-<instance id>`).
    pub client_id: Option<String>,
    /// Send `status_reply` / `events_reply` (false: another platform replies).
    pub replies: bool,
    /// Shared-subscription group: the up topics are subscribed as `$share/<group>/…`
    /// (replicas of one deployment on an external broker; `startup` clears it otherwise).
    pub share_group: Option<String>,
    /// The embedded broker's credentials and TLS listener (ignored with an external broker).
    pub embedded: broker::EmbeddedOptions,
}

/// Counters and connection state, shared with `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct MqttStatus {
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// Every subscription of the current session acknowledged (SUBACK) by the broker.
    pub subscribed: AtomicBool,
    /// SUBACKs still awaited in the current session.
    pending_subacks: AtomicU64,
    /// Messages received.
    pub messages_in: AtomicU64,
    /// Messages published.
    pub messages_out: AtomicU64,
    /// Messages that could not be understood.
    pub malformed: AtomicU64,
    /// Messages dropped (oversized inbound, or a full outbound queue).
    pub dropped: AtomicU64,
    /// The broker passed this replica's probe of the handed topic: task messages go to the
    /// replica holding the task.
    pub handing_over: AtomicBool,
    /// Task messages handed to the replica holding the task.
    pub handed_over: AtomicU64,
    /// Task messages other replicas handed to this one.
    pub handed_in: AtomicU64,
    /// OTA messages left unacknowledged because they could not be recorded (or queued) since
    /// the session last reconnected to have them delivered again.
    pub withheld: AtomicU64,
    /// OTA messages left unacknowledged, in all.
    pub withheld_total: AtomicU64,
    /// When (Unix seconds) a dropped publish was last logged.
    pub dropped_warned_at: AtomicU64,
    /// Connection attempts that failed.
    pub connect_errors: AtomicU64,
    /// The last connection error.
    pub last_error: Mutex<Option<String>>,
    /// The embedded broker's front door (none with an external broker).
    pub front: Option<Arc<front::FrontStats>>,
}

impl MqttStatus {
    /// Prometheus text of the MQTT counters.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let up = u64::from(self.connected.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP fwrepo_mqtt_connected 1 while the MQTT session is up.\n# TYPE fwrepo_mqtt_connected gauge\nfwrepo_mqtt_connected {up}"
        );
        let subscribed = u64::from(self.subscribed.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP fwrepo_mqtt_subscribed 1 once the broker acknowledged every subscription of the session.\n# TYPE fwrepo_mqtt_subscribed gauge\nfwrepo_mqtt_subscribed {subscribed}"
        );
        if let Some(front) = &self.front {
            let _ = writeln!(
                out,
                "# HELP fwrepo_mqtt_broker_connections Gateway connections to the embedded broker.\n# TYPE fwrepo_mqtt_broker_connections gauge\nfwrepo_mqtt_broker_connections {}\n# HELP fwrepo_mqtt_broker_refused_total Connections the embedded broker refused at --mqtt-max-connections.\n# TYPE fwrepo_mqtt_broker_refused_total counter\nfwrepo_mqtt_broker_refused_total {}",
                front.connections.load(Ordering::Relaxed),
                front.refused.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "fwrepo_mqtt_messages_in_total",
                "MQTT messages received.",
                &self.messages_in,
            ),
            (
                "fwrepo_mqtt_messages_out_total",
                "MQTT messages published.",
                &self.messages_out,
            ),
            (
                "fwrepo_mqtt_malformed_total",
                "MQTT messages not understood.",
                &self.malformed,
            ),
            (
                "fwrepo_mqtt_dropped_total",
                "MQTT messages dropped (oversized or queue full).",
                &self.dropped,
            ),
            (
                "fwrepo_mqtt_unacknowledged_total",
                "OTA messages left unacknowledged for redelivery (not recorded: the catalog failed).",
                &self.withheld_total,
            ),
            (
                "fwrepo_mqtt_handed_over_total",
                "Task messages handed to the replica holding the task (several replicas).",
                &self.handed_over,
            ),
            (
                "fwrepo_mqtt_handed_in_total",
                "Task messages other replicas handed to this one (several replicas).",
                &self.handed_in,
            ),
            (
                "fwrepo_mqtt_connect_errors_total",
                "Failed MQTT connection attempts.",
                &self.connect_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }

    /// `connected` or `disconnected: <last error>`.
    pub fn describe(&self) -> String {
        if self.connected.load(Ordering::Relaxed) {
            return if self.subscribed.load(Ordering::Relaxed) {
                "connected".into()
            } else {
                "connected, subscribing".into()
            };
        }
        let last = match self.last_error.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        match last {
            Some(e) => format!("disconnected: {e}"),
            None => "connecting".into(),
        }
    }
}

/// A handle to publish through the session. Cheap to clone.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    /// Which publishes the broker acknowledged (see [`confirms`]).
    confirms: Arc<Mutex<confirms::Confirms<crate::domain::Ack>>>,
    /// State and counters.
    pub status: Arc<MqttStatus>,
    /// What to print on stdout once up (`MQTT listening on …` / `MQTT connected to …`).
    pub address_line: String,
    /// The embedded broker's TLS listener line (`MQTT listening on mqtts://…`), if any.
    pub tls_address_line: Option<String>,
}

impl crate::ota::Publisher for MqttHandle {
    fn connected(&self) -> bool {
        self.status.connected.load(Ordering::Relaxed)
    }

    fn render(&self, cmd: &crate::ota::OtaCreate) -> (String, Value) {
        (topics::services(&cmd.gateway_sn), wire::ota_create(cmd))
    }

    fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        MqttHandle::publish(self, topic, payload)
    }
}

impl MqttHandle {
    /// Whether the broker passed this replica's probe of its handed topic (in a group): what
    /// its persistent session held when it connected has been delivered before it.
    pub fn probed(&self) -> bool {
        self.status.handing_over.load(Ordering::Relaxed)
    }

    /// Queues a QoS 1, non-retained publish without waiting. False when it could not be queued.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        self.publish_with(topic, payload, None)
    }

    /// Queues a QoS 1 publish whose PUBACK completes `confirm` (dropped undone when the
    /// publish is lost: not queued, or forgotten by a new broker session).
    pub(crate) fn publish_confirmed(
        &self,
        topic: String,
        payload: Vec<u8>,
        confirm: crate::domain::Ack,
    ) -> bool {
        self.publish_with(topic, payload, Some(confirm))
    }

    fn publish_with(
        &self,
        topic: String,
        payload: Vec<u8>,
        confirm: Option<crate::domain::Ack>,
    ) -> bool {
        // Queued and entered together: the entries take packet ids in the queue's order.
        let queued = {
            let mut confirms = crate::lock(&self.confirms);
            let queued = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, payload);
            if queued.is_ok() {
                confirms.queued(confirm);
            }
            queued
        };
        match queued {
            Ok(()) => {
                self.status.messages_out.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                let dropped = self.status.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // At most one line every 10 s: a burst would otherwise write one per message.
                let now = std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs());
                let last = self.status.dropped_warned_at.load(Ordering::Relaxed);
                if now >= last + 10
                    && self
                        .status
                        .dropped_warned_at
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(error = %e, dropped_total = dropped, "MQTT publish not queued");
                }
                false
            }
        }
    }
}

/// Why MQTT could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The embedded broker failed.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// The TLS material for `mqtts://` is unusable.
    #[error("{0}")]
    Tls(String),
    /// A session of another replica on the embedded broker was asked for.
    #[error("the embedded broker is this process's own: no other replica has a session on it")]
    NotExternal,
    /// A member of a shared-subscription group has a client id of its own choosing.
    #[error(
        "--mqtt-client-id cannot be set on a replica of a shared-subscription group: its client \
         id is fwrepo-<replica id>, so that another replica can take over its session when it \
         dies (set --replica-id instead)"
    )]
    ClientIdInGroup,
}

/// The client id of replica `replica_id`'s session in a shared-subscription group.
pub fn group_client_id(replica_id: &str) -> String {
    format!("fwrepo-{replica_id}")
}

/// Starts the embedded broker if configured, and the client session with its event loop task.
pub fn start(
    settings: &MqttSettings,
    peers: &crate::cluster::Peers,
    registry: DeviceRegistry,
    ota: OtaSender,
    cancel: CancellationToken,
    credentials: Option<credentials::GatewayCredentials>,
) -> Result<MqttHandle, MqttError> {
    let grouped =
        settings.share_group.is_some() && matches!(settings.target, BrokerTarget::External { .. });
    if grouped && settings.client_id.is_some() {
        return Err(MqttError::ClientIdInGroup);
    }
    let client_id = settings
        .client_id
        .clone()
        .unwrap_or_else(|| group_client_id(peers.me()));
    let mut tls_address_line = None;
    let mut front = None;
    let (address_line, mut options) = match &settings.target {
        BrokerTarget::Embedded(listen) => {
            let embedded = broker::start(*listen, &settings.embedded, credentials.as_ref())?;
            tls_address_line = embedded
                .tls_addr
                .map(|a| format!("MQTT listening on mqtts://{a}"));
            front = Some(embedded.front);
            let (addr, inner) = (embedded.addr, embedded.inner_addr);
            let mut o = MqttOptions::new(client_id.clone(), inner.ip().to_string(), inner.port());
            o.set_clean_session(false);
            // fwrepo's own session carries credentials like any other client.
            if let Some(c) = &credentials {
                o.set_credentials(client_id.clone(), c.password(&client_id));
            }
            (format!("MQTT listening on mqtt://{addr}"), o)
        }
        BrokerTarget::External {
            host, port, tls, ..
        } => {
            let scheme = if tls.is_some() { "mqtts" } else { "mqtt" };
            (
                format!("MQTT connected to {scheme}://{host}:{port}"),
                external_options(settings, client_id, false)?,
            )
        }
    };
    // Only replicas on one external broker share subscriptions.
    let share_group = grouped.then(|| settings.share_group.clone()).flatten();
    if let Some(group) = &share_group {
        // Published by the broker if this session's connection drops without a DISCONNECT:
        // the other replicas take over this one's work at once.
        options.set_last_will(rumqttc::LastWill::new(
            topics::gone(group, peers.me()),
            peers.will(),
            QoS::AtLeastOnce,
            false,
        ));
    }
    session_options(&mut options);
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    // rumqttc gives CONNECT 5 s by default; a broker busy with a reconnecting fleet may need
    // longer, and giving up early only adds to its load.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(20);
    eventloop.set_network_options(net);
    let status = Arc::new(MqttStatus {
        front,
        ..MqttStatus::default()
    });
    let handle = MqttHandle {
        client: client.clone(),
        confirms: Arc::default(),
        status: Arc::clone(&status),
        address_line,
        tls_address_line,
    };
    let session = Session {
        acks: acks::Acks::new(client.clone(), Arc::clone(&status)),
        handle: handle.clone(),
        registry,
        ota,
        replies: settings.replies,
        share_group,
        peers: Some(peers.clone()),
    };
    tokio::spawn(session.run(eventloop, cancel));
    Ok(handle)
}

/// The options of a session with the external broker as `client_id`; `clean` or persistent.
/// Every session is persistent, those of a shared-subscription group included: a broker
/// keeps what it had sent but not yet seen acknowledged when a replica died, and another
/// replica takes that session over (`adopt`).
fn external_options(
    settings: &MqttSettings,
    client_id: String,
    clean: bool,
) -> Result<MqttOptions, MqttError> {
    let BrokerTarget::External {
        host,
        port,
        tls,
        user,
        password,
    } = &settings.target
    else {
        return Err(MqttError::NotExternal);
    };
    let mut options = MqttOptions::new(client_id, host.clone(), *port);
    options.set_clean_session(clean);
    if let Some(u) = user {
        options.set_credentials(u.clone(), password.clone().unwrap_or_default());
    }
    if let Some(t) = tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(t.client_config().map_err(MqttError::Tls)?),
        ));
    }
    Ok(options)
}

/// What every session fwrepo opens shares: keep-alive, packet limits, window, manual acks.
fn session_options(options: &mut MqttOptions) {
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(CLIENT_PACKET_LIMIT, CLIENT_PACKET_LIMIT)
        // rumqttc stops taking requests (PUBACKs included) while its outgoing window is
        // full, and a broker that holds this session's deliveries until they are acknowledged
        // (rumqttd) would then wait on it: a window larger than any burst of ota_create keeps
        // acknowledgements flowing.
        .set_inflight(OUTGOING_WINDOW)
        // A gateway's OTA message is acknowledged once recorded (ota::OtaService::on_message);
        // one that could not be is delivered again after the next reconnect.
        .set_manual_acks(true);
}

/// Requests (publishes, acknowledgements) queued for the event loop: a fleet's burst of
/// replies and `ota_create` fits (the loop never waits for the OTA service). 16,384 dropped
/// 2,770 `status_reply` when 10,000 docks came online at once (fleet benchmark).
const REQUEST_QUEUE: usize = 65_536;

/// Outgoing QoS 1 messages in flight at once.
const OUTGOING_WINDOW: u16 = 10_000;
