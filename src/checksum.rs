//! One-pass checksumming of a byte stream: MD5 and SHA-256 each on its own blocking thread, fed
//! through bounded channels, so the caller keeps receiving while both digests run in parallel
//! (MD5 cannot be parallelised within one stream; it alone keeps one core busy). Memory stays
//! bounded: at most `DEPTH` blocks wait per digest.

use std::sync::Arc;

use bytes::Bytes;
use md5::Md5;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::domain::{Md5Hex, Sha256Hex};

/// Batches queued per digest before `update` waits.
const DEPTH: usize = 8;

/// The digests of a finished stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digests {
    /// MD5, lowercase hex.
    pub md5: Md5Hex,
    /// SHA-256, lowercase hex.
    pub sha256: Sha256Hex,
    /// Bytes hashed.
    pub size: u64,
}

/// A digest thread died (panicked); the stream's digests are unknown.
#[derive(Debug, thiserror::Error)]
#[error("checksum worker failed")]
pub struct ChecksumError;

/// Running MD5 + SHA-256 + size of a stream.
pub struct Checksummer {
    md5_tx: mpsc::Sender<Batch>,
    sha_tx: mpsc::Sender<Batch>,
    md5: JoinHandle<Vec<u8>>,
    sha: JoinHandle<Vec<u8>>,
    size: u64,
}

/// Chunks handed to both digests at once (shared, never copied).
type Batch = Arc<Vec<Bytes>>;

fn spawn_digest<D: Digest + Send + 'static>(mut rx: mpsc::Receiver<Batch>) -> JoinHandle<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let mut d = D::new();
        while let Some(batch) = rx.blocking_recv() {
            for chunk in batch.iter() {
                d.update(chunk);
            }
        }
        d.finalize().to_vec()
    })
}

impl Checksummer {
    /// Starts both digest threads. Must be called within a tokio runtime.
    pub fn new() -> Self {
        let (md5_tx, md5_rx) = mpsc::channel(DEPTH);
        let (sha_tx, sha_rx) = mpsc::channel(DEPTH);
        Checksummer {
            md5_tx,
            sha_tx,
            md5: spawn_digest::<Md5>(md5_rx),
            sha: spawn_digest::<Sha256>(sha_rx),
            size: 0,
        }
    }

    /// Feeds the next batch of chunks (cheap: `Bytes` are reference counted). Waits while a
    /// digest is `DEPTH` batches behind. Batches of about a MiB keep the hand-over cost low.
    pub async fn update(&mut self, batch: Vec<Bytes>) -> Result<(), ChecksumError> {
        self.size += batch.iter().map(|b| b.len() as u64).sum::<u64>();
        let batch = Arc::new(batch);
        self.md5_tx
            .send(Arc::clone(&batch))
            .await
            .map_err(|_| ChecksumError)?;
        self.sha_tx.send(batch).await.map_err(|_| ChecksumError)
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Closes the stream and returns its digests.
    pub async fn finish(self) -> Result<Digests, ChecksumError> {
        let Checksummer {
            md5_tx,
            sha_tx,
            md5,
            sha,
            size,
        } = self;
        drop(md5_tx);
        drop(sha_tx);
        let (md5, sha) = tokio::join!(md5, sha);
        Ok(Digests {
            md5: Md5Hex::from_digest(&md5.map_err(|_| ChecksumError)?),
            sha256: Sha256Hex::from_digest(&sha.map_err(|_| ChecksumError)?),
            size,
        })
    }
}

impl Default for Checksummer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn matches_one_shot_digests() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut c = Checksummer::new();
        for batch in data.chunks(200_003) {
            let chunks = batch.chunks(65_537).map(Bytes::copy_from_slice).collect();
            c.update(chunks).await.unwrap();
        }
        let d = c.finish().await.unwrap();
        assert_eq!(d.size, data.len() as u64);
        assert_eq!(d.md5.as_str(), hex::encode(Md5::digest(&data)));
        assert_eq!(d.sha256.as_str(), hex::encode(Sha256::digest(&data)));
    }

    #[tokio::test]
    async fn empty_stream() {
        let d = Checksummer::new().finish().await.unwrap();
        assert_eq!(d.md5.as_str(), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(d.size, 0);
    }
}
