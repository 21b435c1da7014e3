//! The embedded broker (rumqttd), started when no external broker is configured. rumqttd binds
//! its listener itself and cannot report a port chosen from 0, so the port is chosen (and
//! proven free) here first. Limits are explicit: its defaults either panic or let one topic
//! filter hold about 1 GiB.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use super::credentials::GatewayCredentials;

/// Largest publish payload the embedded broker accepts (contract §5: up to 1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Gateway connections the embedded broker accepts by default (`--mqtt-max-connections`):
/// a fleet of 25,000 docks with their remote controllers, or 50,000 gateways.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 50_000;
/// Open files a relayed gateway connection takes: the client's socket and the relay's to
/// rumqttd in fwrepo's front door, and rumqttd's end of that.
const FILES_PER_CONNECTION: u64 = 3;
/// Open files kept for everything else: HTTP clients, downloads, the catalog, the logs.
const FILES_RESERVED: u64 = 1024;
/// Connections the broker's router takes beyond the gateways' limit: fwrepo's own session,
/// the readiness probe, and the TLS listener's clients that arrive while the plain
/// listener is full (they are counted by rumqttd alone).
const ROUTER_SLACK: u64 = 64;
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
    /// The TLS listener's certificate or key is unusable.
    #[error("embedded MQTT broker TLS: {0}")]
    Tls(String),
    /// The broker did not accept connections in time.
    #[error("embedded MQTT broker did not start on {0}")]
    NotStarted(SocketAddr),
}

/// The embedded broker's options beyond its plain listener.
#[derive(Clone, Debug, Default)]
pub struct EmbeddedOptions {
    /// Gateway connections accepted at once; more are refused with a CONNACK. `None`: the
    /// default, [`DEFAULT_MAX_CONNECTIONS`] or what the open-files limit allows if less.
    pub max_connections: Option<u64>,
    /// `--mqtt-auth on`: per-gateway credentials (user name = client id) are required.
    pub auth: bool,
    /// A TLS listener next to the plain one: (address, certificate chain, key) PEM files.
    pub tls: Option<(SocketAddr, std::path::PathBuf, std::path::PathBuf)>,
}

fn server(
    name: &str,
    addr: SocketAddr,
    tls: Option<rumqttd::TlsConfig>,
    credentials: Option<&GatewayCredentials>,
) -> ServerSettings {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(c) = credentials.cloned() {
        connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let ok = c.check(&client_id, &user, &pass);
            if !ok {
                tracing::warn!(%client_id, %user, "embedded broker refused a CONNECT: bad credentials");
            }
            async move { ok }
        });
    }
    ServerSettings {
        name: name.into(),
        listen: addr,
        tls,
        next_connection_delay_ms: 1,
        connections,
    }
}

/// A running embedded broker.
pub struct Embedded {
    /// Where gateways connect (fwrepo's front door: [`super::front`]).
    pub addr: SocketAddr,
    /// The TLS listener (rumqttd's own).
    pub tls_addr: Option<SocketAddr>,
    /// rumqttd's plain listener on loopback, behind the front door: fwrepo's own session
    /// connects here, so it never takes a gateway's place.
    pub inner_addr: SocketAddr,
    /// The front door's counters.
    pub front: std::sync::Arc<super::front::FrontStats>,
}

fn config(
    addr: SocketAddr,
    tls: Option<(SocketAddr, &std::path::Path, &std::path::Path)>,
    credentials: Option<&GatewayCredentials>,
    max_connections: u64,
) -> Config {
    let mut servers = HashMap::from([(
        "1".to_string(),
        server("fwrepo-v4", addr, None, credentials),
    )]);
    if let Some((tls_addr, cert, key)) = tls {
        let tls = rumqttd::TlsConfig::Rustls {
            capath: None,
            certpath: cert.display().to_string(),
            keypath: key.display().to_string(),
        };
        servers.insert(
            "2".to_string(),
            server("fwrepo-v4-tls", tls_addr, Some(tls), credentials),
        );
    }
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: usize::try_from(max_connections.saturating_add(ROUTER_SLACK))
                .unwrap_or(usize::MAX),
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_SIZE,
            max_segment_count: SEGMENT_COUNT,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(servers),
        ..Default::default()
    }
}

/// A free address for `listen` (port 0: one the OS picks).
fn pick(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let probe = TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    probe.local_addr().map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })
}

/// Starts the broker: its front door on `listen` (port 0: a free port), rumqttd behind it
/// on a loopback port, plus its TLS listener if configured, and waits until rumqttd answers
/// (probed directly: this thread may be the one the front door's task would run on). Needs a
/// Tokio runtime (the front door is a task of it).
pub fn start(
    listen: SocketAddr,
    options: &EmbeddedOptions,
    credentials: Option<&GatewayCredentials>,
) -> Result<Embedded, BrokerError> {
    if let Some((_, cert, key)) = &options.tls {
        // rumqttd reads these only when a client connects: prove them now.
        crate::tls::server_config(cert, key).map_err(BrokerError::Tls)?;
    }
    let front_listener = TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    let addr = front_listener
        .local_addr()
        .map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
    let inner_addr = pick(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let tls = match &options.tls {
        Some((tls_listen, cert, key)) => Some((pick(*tls_listen)?, cert.as_path(), key.as_path())),
        None => None,
    };
    let tls_addr = tls.map(|(a, _, _)| a);
    let max_connections = connection_limit(options.max_connections, open_files_limit());
    let mut broker = Broker::new(config(inner_addr, tls, credentials, max_connections));
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|source| BrokerError::Bind { addr, source })?;
    let front = super::front::spawn(front_listener, inner_addr, max_connections);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if answers(inner_addr, credentials) {
            return Ok(Embedded {
                addr,
                tls_addr,
                inner_addr,
                front,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotStarted(addr))
}

/// The open-files limit of this process, raised first to the hard limit (a soft limit of
/// 1,024 is common and would hold about 300 gateways).
fn open_files_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return FILES_RESERVED;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        limit.rlim_cur
    }
    #[cfg(not(unix))]
    {
        u64::MAX
    }
}

/// Gateway connections the broker takes: `configured`, else the default or as many as
/// `open_files` allows if fewer. A configured limit beyond what the open files allow is kept
/// (the operator may know better) but warned about.
fn connection_limit(configured: Option<u64>, open_files: u64) -> u64 {
    let allowed = open_files.saturating_sub(FILES_RESERVED) / FILES_PER_CONNECTION;
    match configured {
        Some(n) => {
            if n > allowed {
                tracing::warn!(
                    max_connections = n,
                    open_files,
                    allowed,
                    "--mqtt-max-connections is beyond what the open-files limit allows (3 files \
                     a connection, 1,024 kept): raise it (ulimit -n, LimitNOFILE) or lower the setting"
                );
            }
            n
        }
        None => {
            let n = DEFAULT_MAX_CONNECTIONS.min(allowed.max(1));
            if n < DEFAULT_MAX_CONNECTIONS {
                tracing::info!(
                    max_connections = n,
                    open_files,
                    "the embedded broker takes as many gateways as the open-files limit allows \
                     (3 files a connection); raise the limit for more"
                );
            }
            n
        }
    }
}

/// Whether the broker at `addr` answers an MQTT 3.1.1 CONNECT with a CONNACK. The probe
/// then says DISCONNECT, as a well-behaved client does: a bare TCP connect that goes away
/// makes rumqttd log an ERROR on every start.
fn answers(addr: SocketAddr, credentials: Option<&GatewayCredentials>) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut exchange = |send: &[u8]| -> Option<[u8; 2]> {
        stream.write_all(send).ok()?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).ok()?;
        let mut rest = vec![0u8; usize::from(head[1])];
        stream.read_exact(&mut rest).ok()?;
        Some([head[0], rest.get(1).copied().unwrap_or(0)])
    };
    // CONNACK (accepted), then a ping answered once the router knows the connection (a
    // DISCONNECT before that makes rumqttd log an ERROR too), then goodbye; the broker closes.
    let up = exchange(&connect_packet(credentials)) == Some([0x20, 0])
        && exchange(&[0xC0, 0x00]).is_some_and(|[kind, _]| kind == 0xD0);
    let _ = stream.write_all(&[0xE0, 0x00]);
    let _ = stream.read(&mut [0u8; 1]);
    up
}

/// A CONNECT of the readiness probe: clean session, and the probe's own credentials when
/// the broker requires them.
fn connect_packet(credentials: Option<&GatewayCredentials>) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let client_id = format!("fwrepo-probe-{}", std::process::id());
    let mut flags = 0x02;
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4);
    let password = credentials.map(|c| c.password(&client_id));
    if password.is_some() {
        flags |= 0xC0;
    }
    body.push(flags);
    body.extend_from_slice(&10u16.to_be_bytes());
    string(&mut body, &client_id);
    if let Some(password) = &password {
        string(&mut body, &client_id);
        string(&mut body, password);
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limit_fits_the_open_files_and_a_setting_is_kept() {
        assert_eq!(connection_limit(None, 1 << 20), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(connection_limit(None, 20_000), (20_000 - 1024) / 3);
        assert_eq!(connection_limit(None, 100), 1);
        assert_eq!(connection_limit(Some(7), 100), 7);
        assert_eq!(connection_limit(Some(100_000), 1 << 20), 100_000);
    }
}
