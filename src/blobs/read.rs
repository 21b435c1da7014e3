//! Reading blobs as byte streams. Local blobs: positioned reads (`read_exact_at`, so a range at
//! offset 600 MB costs what one at 0 does) on the blocking pool, each chunk backed by permits of
//! one global [`ReadBudget`] that are released only when the chunk's bytes are dropped, so the
//! bytes all downloads hold in flight stay bounded. Chunks shrink as more streams share the
//! budget (1 MiB for a lone client, the measured sweet spot; down to 16 KiB under load). The
//! share counts open HTTP connections too, not only streams: the HTTP layer copies each chunk
//! into its connection's write buffer, which keeps that size (or twice it) for the
//! connection's life, so chunk size times connections is memory held outside the budget. Each
//! sharer therefore gets half its share of the budget per chunk: chunks in flight plus write
//! buffers stay around the budget (1000 concurrent downloads: 32 KiB chunks).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::BlobError;

/// A stream of blob bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Budget unit, and the smallest chunk.
const UNIT: usize = 16 << 10;
/// Largest chunk read at once.
const MAX_CHUNK: usize = 1 << 20;

/// The global budget of bytes that local reads may hold in flight. Cheap to clone.
#[derive(Clone)]
pub struct ReadBudget {
    sem: Arc<Semaphore>,
    units: usize,
    active: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

/// Counts an open connection for as long as it lives (see [`ReadBudget::connection_guard`]).
pub struct ConnectionGuard(Arc<AtomicUsize>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ReadBudget {
    /// A budget of `bytes` (at least one full chunk).
    pub fn new(bytes: u64) -> ReadBudget {
        let units = (bytes as usize / UNIT).max(MAX_CHUNK / UNIT);
        ReadBudget {
            sem: Arc::new(Semaphore::new(units)),
            units,
            active: Arc::new(AtomicUsize::new(0)),
            connections: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Registers an open client connection; keep the guard with the connection.
    pub fn connection_guard(&self) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(Arc::clone(&self.connections))
    }

    /// Chunk size for the next read: half an equal share of the budget among the streams and
    /// open connections (the other half is the copy in the connection's write buffer),
    /// 16 KiB to 1 MiB.
    fn chunk_size(&self) -> usize {
        let sharers = self
            .active
            .load(Ordering::Relaxed)
            .max(self.connections.load(Ordering::Relaxed))
            .max(1);
        let share = (self.units / (2 * sharers)).clamp(1, MAX_CHUNK / UNIT);
        share * UNIT
    }

    /// Open client connections.
    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Streams reading local blobs right now.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a stream as active for as long as it lives.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Chunk memory that returns its budget permits when dropped.
struct BudgetedBuf {
    buf: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for BudgetedBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

struct LocalRead {
    file: Arc<File>,
    /// Next offset to schedule.
    pos: u64,
    end: u64,
    budget: ReadBudget,
    /// The next chunk, read ahead while the current one is being sent.
    ahead: Option<JoinHandle<std::io::Result<Bytes>>>,
    _active: ActiveGuard,
}

/// Opens a local blob and streams `range` of it.
pub(super) async fn local_range(
    path: PathBuf,
    key: &str,
    range: Range<u64>,
    budget: ReadBudget,
) -> Result<ByteStream, BlobError> {
    let opened = tokio::task::spawn_blocking(move || File::open(path))
        .await
        .map_err(|e| BlobError::Task(e.to_string()))?;
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BlobError::Missing(key.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    budget.active.fetch_add(1, Ordering::Relaxed);
    let state = LocalRead {
        file: Arc::new(file),
        pos: range.start,
        end: range.end,
        ahead: None,
        _active: ActiveGuard(Arc::clone(&budget.active)),
        budget,
    };
    Ok(Box::pin(futures::stream::try_unfold(state, read_next)))
}

async fn read_next(mut st: LocalRead) -> Result<Option<(Bytes, LocalRead)>, std::io::Error> {
    let current = match st.ahead.take() {
        Some(pending) => pending,
        None => {
            let Some(len) = st.next_len() else {
                return Ok(None);
            };
            let permit = Arc::clone(&st.budget.sem)
                .acquire_many_owned(len.div_ceil(UNIT) as u32)
                .await
                .map_err(std::io::Error::other)?;
            st.spawn_read(len, permit)
        }
    };
    let bytes = current.await.map_err(std::io::Error::other)??;
    // Read ahead only with budget to spare: waiting for it here, while holding the current
    // chunk, could starve every stream at once.
    if let Some(len) = st.next_len()
        && let Ok(permit) =
            Arc::clone(&st.budget.sem).try_acquire_many_owned(len.div_ceil(UNIT) as u32)
    {
        st.ahead = Some(st.spawn_read(len, permit));
    }
    Ok(Some((bytes, st)))
}

impl LocalRead {
    fn next_len(&self) -> Option<usize> {
        (self.pos < self.end)
            .then(|| (self.end - self.pos).min(self.budget.chunk_size() as u64) as usize)
    }

    /// Reads `len` bytes at the next offset on the blocking pool. The file handle is this
    /// stream's own and reads are sequential: seek, then read into spare capacity (no zeroing).
    fn spawn_read(
        &mut self,
        len: usize,
        permit: OwnedSemaphorePermit,
    ) -> JoinHandle<std::io::Result<Bytes>> {
        let (file, pos) = (Arc::clone(&self.file), self.pos);
        self.pos += len as u64;
        // Allocated here, on the runtime's worker, where the chunk will also be freed: buffers
        // made on blocking-pool threads land in those threads' malloc arenas and strand free
        // memory there (BENCHMARKS.md, OTA benchmark).
        let mut buf = Vec::with_capacity(len);
        tokio::task::spawn_blocking(move || {
            let mut f = &*file;
            f.seek(SeekFrom::Start(pos))?;
            f.take(len as u64).read_to_end(&mut buf)?;
            if buf.len() != len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob shorter than its record",
                ));
            }
            Ok(Bytes::from_owner(BudgetedBuf {
                buf,
                _permit: permit,
            }))
        })
    }
}

/// Adapts an object_store stream.
pub(super) fn s3_stream(
    s: futures::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
) -> ByteStream {
    s.map_err(std::io::Error::other).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_shrink_with_load() {
        let b = ReadBudget::new(64 << 20);
        assert_eq!(b.chunk_size(), MAX_CHUNK);
        b.active.store(200, Ordering::Relaxed);
        assert_eq!(b.chunk_size(), 160 << 10);
        b.active.store(100_000, Ordering::Relaxed);
        assert_eq!(b.chunk_size(), UNIT);
        b.active.store(0, Ordering::Relaxed);
        let guards: Vec<ConnectionGuard> = (0..128).map(|_| b.connection_guard()).collect();
        assert_eq!(b.chunk_size(), 256 << 10);
        drop(guards);
        assert_eq!(b.chunk_size(), MAX_CHUNK);
    }

    #[tokio::test]
    async fn reads_exact_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let budget = ReadBudget::new(1 << 20);
        let s = local_range(p.clone(), "blob", 1_000_000..2_500_001, budget.clone())
            .await
            .unwrap();
        // Chunks are consumed (and their budget returned) one by one, as a response does.
        let got: Vec<u8> = s
            .try_fold(Vec::new(), |mut acc, chunk| async move {
                acc.extend_from_slice(&chunk);
                Ok(acc)
            })
            .await
            .unwrap();
        assert_eq!(got, &data[1_000_000..2_500_001]);
        assert_eq!(budget.active_streams(), 0);
        assert!(matches!(
            local_range(dir.path().join("nope"), "nope", 0..1, budget).await,
            Err(BlobError::Missing(_))
        ));
    }
}
