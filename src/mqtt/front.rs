//! The embedded broker's front door. rumqttd at its connection limit neither answers nor
//! closes a new connection (it waits for a CONNACK that never comes, times out and
//! reconnects: a churn). So fwrepo accepts the broker's plain TCP connections itself and
//! counts them: under the limit each is relayed to rumqttd on a private loopback port; at the
//! limit it is refused with the CONNACK a client understands ("server unavailable"), and a
//! warning (at most one a minute) says what to do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a refused client has to send its CONNECT.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// At most one warning about refused connections per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The front door's counters, read by the metrics.
#[derive(Debug, Default)]
pub struct FrontStats {
    /// Connections relayed to the broker now.
    pub connections: AtomicU64,
    /// Connections refused at the limit.
    pub refused: AtomicU64,
    /// When (seconds since the front started) the last refusal was logged, plus one.
    warned_at: AtomicU64,
}

/// Accepts on `listener` until the runtime ends: relays to `broker`, at most `max` at once.
pub fn spawn(listener: std::net::TcpListener, broker: SocketAddr, max: u64) -> Arc<FrontStats> {
    let stats = Arc::new(FrontStats::default());
    let front = Arc::clone(&stats);
    tokio::spawn(async move {
        let Ok(listener) = listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
        else {
            tracing::error!("the embedded broker's listener cannot be used");
            return;
        };
        let started = tokio::time::Instant::now();
        loop {
            let (client, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, mostly: let some close.
                    tracing::warn!(error = %e, "embedded broker: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let stats = Arc::clone(&front);
            if stats.connections.fetch_add(1, Ordering::AcqRel) >= max {
                stats.connections.fetch_sub(1, Ordering::AcqRel);
                stats.refused.fetch_add(1, Ordering::Relaxed);
                let now = started.elapsed().as_secs() + 1;
                let last = stats.warned_at.load(Ordering::Relaxed);
                if (last == 0 || now >= last + WARN_EVERY.as_secs())
                    && stats
                        .warned_at
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        limit = max,
                        refused = stats.refused.load(Ordering::Relaxed),
                        "embedded MQTT broker at its connection limit: new connections are refused \
                         (CONNACK server unavailable); raise --mqtt-max-connections or use an \
                         external broker (README: Fleet size)"
                    );
                }
                tokio::spawn(refuse(client));
                continue;
            }
            tokio::spawn(async move {
                relay(client, broker).await;
                stats.connections.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
    stats
}

/// Copies bytes both ways between a client and the broker until either side closes.
async fn relay(mut client: TcpStream, broker: SocketAddr) {
    let Ok(mut upstream) = TcpStream::connect(broker).await else {
        return;
    };
    // MQTT packets are small and latency matters more than segment count.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Answers the client's CONNECT with "server unavailable" and closes.
async fn refuse(mut client: TcpStream) {
    let mut head = [0u8; 16];
    let read = tokio::time::timeout(CONNECT_WITHIN, async {
        let mut n = 0;
        while n < head.len() {
            match client.read(&mut head[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
            if protocol_level(&head[..n]).is_some() {
                break;
            }
        }
        n
    })
    .await
    .unwrap_or(0);
    let _ = client.write_all(&connack_unavailable(&head[..read])).await;
    let _ = client.shutdown().await;
}

/// The protocol level of a CONNECT that starts with `bytes`, once enough of it is there.
fn protocol_level(bytes: &[u8]) -> Option<u8> {
    if bytes.first()? >> 4 != 1 {
        return None;
    }
    // Fixed header: type, then a remaining length of 1 to 4 bytes (high bit: more follow).
    let len_bytes = bytes[1..].iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let name = 1 + len_bytes;
    let name_len = usize::from(u16::from_be_bytes([
        *bytes.get(name)?,
        *bytes.get(name + 1)?,
    ]));
    bytes.get(name + 2 + name_len).copied()
}

/// CONNACK refusing a connection because the server cannot take it, in the client's dialect:
/// MQTT 5 "server unavailable" (0x88, no properties), else 3.1.1 "server unavailable" (3).
fn connack_unavailable(connect: &[u8]) -> Vec<u8> {
    match protocol_level(connect) {
        Some(5) => vec![0x20, 0x03, 0x00, 0x88, 0x00],
        _ => vec![0x20, 0x02, 0x00, 0x03],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_speaks_the_clients_protocol_version() {
        // CONNECT, remaining length 16, "MQTT", level 4 / 5.
        let v4 = [0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02];
        let v5 = [0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02];
        assert_eq!(protocol_level(&v4), Some(4));
        assert_eq!(connack_unavailable(&v4), [0x20, 0x02, 0x00, 0x03]);
        assert_eq!(connack_unavailable(&v5), [0x20, 0x03, 0x00, 0x88, 0x00]);
        // A two-byte remaining length.
        let long = [0x10, 0x80, 0x01, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05];
        assert_eq!(protocol_level(&long), Some(5));
        // Not (yet) a CONNECT: the 3.1.1 answer.
        assert_eq!(protocol_level(&[0x10, 0x10, 0x00]), None);
        assert_eq!(protocol_level(&[0x30, 0x02]), None);
        assert_eq!(connack_unavailable(&[]), [0x20, 0x02, 0x00, 0x03]);
    }
}
