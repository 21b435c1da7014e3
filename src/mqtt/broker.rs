//! The embedded broker (rumqttd), started when no external broker is configured. rumqttd binds
//! its listener itself and cannot report a port chosen from 0, so the port is chosen (and
//! proven free) here first. Limits are explicit: its defaults either panic or let one topic
//! filter hold about 1 GiB.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest publish payload the embedded broker accepts (contract §5: up to 1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Connections the embedded broker accepts.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Router log segment size per topic filter, and segments kept (8 MiB × 4 = 32 MiB at most).
pub const SEGMENT_SIZE: usize = 8 << 20;
/// See [`SEGMENT_SIZE`].
pub const SEGMENT_COUNT: usize = 4;

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The address cannot be bound.
    #[error("embedded MQTT broker cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The broker did not accept connections in time.
    #[error("embedded MQTT broker did not start on {0}")]
    NotStarted(SocketAddr),
}

fn config(addr: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "fwrepo-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_SIZE,
            max_segment_count: SEGMENT_COUNT,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts the broker on `listen` (port 0: a free port) and waits until it accepts
/// connections. Returns the bound address.
pub fn start(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let probe = TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    let addr = probe.local_addr().map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    drop(probe);
    let mut broker = Broker::new(config(addr));
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|source| BrokerError::Bind { addr, source })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotStarted(addr))
}
