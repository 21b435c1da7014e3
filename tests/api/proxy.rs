//! A TCP proxy whose link a test switches (pass, cut, frozen): S3 and PostgreSQL outages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// What the proxy does with the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Forwards both ways.
    Pass,
    /// Closes every open connection and each new one at once.
    Cut,
    /// Accepts and reads, but forwards and answers nothing (a hung server or network).
    Frozen,
}

/// A TCP proxy in front of a server whose link the test switches.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    link: watch::Sender<Link>,
    /// Bytes forwarded from fwrepo to the server.
    pub upstream_bytes: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, rx) = watch::channel(Link::Pass);
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&upstream_bytes);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(proxy_conn(
                    conn,
                    upstream.clone(),
                    rx.clone(),
                    Arc::clone(&counter),
                ));
            }
        });
        Proxy {
            addr,
            link,
            upstream_bytes,
            accept,
        }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Link::Cut);
        self.accept.abort();
    }
}

async fn proxy_conn(
    client: tokio::net::TcpStream,
    upstream: String,
    mut link: watch::Receiver<Link>,
    counter: Arc<AtomicU64>,
) {
    // A connection accepted while frozen waits, unanswered, for the link to change.
    let now = match link.wait_for(|l| *l != Link::Frozen).await {
        Ok(l) => *l,
        Err(_) => return,
    };
    if now == Link::Cut {
        return; // closed at once
    }
    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(
        pipe(cr, sw, link.clone(), Some(counter)),
        pipe(sr, cw, link, None)
    );
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    counter: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = link.wait_for(|l| *l == Link::Cut) => return,
        };
        // Frozen: hold the bytes, forward nothing, until the link changes.
        loop {
            let now = *link.borrow_and_update();
            match now {
                Link::Pass => break,
                Link::Cut => return,
                Link::Frozen => {
                    if link.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        let failed = tokio::select! {
            r = to.write_all(&buf[..n]) => r.is_err(),
            _ = link.wait_for(|l| *l == Link::Cut) => true,
        };
        if failed {
            return;
        }
        if let Some(c) = &counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    let _ = to.shutdown().await;
}
