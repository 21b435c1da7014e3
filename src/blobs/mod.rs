//! The blob store: package bytes, through object_store. Local filesystem by default (writes via
//! `LocalFileSystem` with fsync; reads through a large positioned-read path, since
//! object_store's local stream yields small chunks and reaches a fraction of the disk's speed),
//! or any S3-compatible bucket (multipart writes whose upload id the caller records before the
//! first part; ranged `get_opts` reads).
//!
//! Invariants: a blob appears under its key only when its writer `finish`es; an aborted or
//! dropped writer leaves no object (local staging files that a crash leaves behind are removed
//! by [`BlobStore::sweep_local`], S3 uploads by [`BlobStore::abort_multipart`]).

mod read;

pub use read::{ByteStream, ReadBudget};

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload, PutPayloadMut,
};
use tokio::task::JoinHandle;

use crate::config::BlobBackend;

/// Errors of the blob layer.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob is not in the store.
    #[error("blob {0} is missing from the blob store")]
    Missing(String),
    /// The store failed.
    #[error("blob store error: {0}")]
    Store(#[from] object_store::Error),
    /// Local I/O failed.
    #[error("blob store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A background write task failed.
    #[error("blob write task failed: {0}")]
    Task(String),
}

fn missing_or(key: &str, e: object_store::Error) -> BlobError {
    match e {
        object_store::Error::NotFound { .. } => BlobError::Missing(key.to_string()),
        other => BlobError::Store(other),
    }
}

#[derive(Clone)]
enum Backend {
    Local {
        store: Arc<LocalFileSystem>,
        dir: PathBuf,
    },
    S3 {
        store: Arc<AmazonS3>,
        prefix: String,
    },
}

/// Handle on the configured blob store. Cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    backend: Backend,
}

/// Local parts are handed to the writer in blocks of this size.
const LOCAL_PART: usize = 4 << 20;
/// S3 parts: fixed size (some S3 servers need equal parts), above the 5 MiB minimum.
const S3_PART: usize = 8 << 20;
/// Parts written concurrently per upload.
const PARTS_IN_FLIGHT: usize = 2;

impl BlobStore {
    /// Opens the configured backend (creating the local directory).
    pub fn open(backend: &BlobBackend) -> Result<BlobStore, BlobError> {
        let backend = match backend {
            BlobBackend::Local { dir } => {
                std::fs::create_dir_all(dir)?;
                let dir = std::fs::canonicalize(dir)?;
                let store = LocalFileSystem::new_with_prefix(&dir)?.with_fsync(true);
                Backend::Local {
                    store: Arc::new(store),
                    dir,
                }
            }
            BlobBackend::S3 {
                bucket,
                prefix,
                endpoint,
            } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                if let Some(ep) = endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_allow_http(ep.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                Backend::S3 {
                    store: Arc::new(b.build()?),
                    prefix: prefix.clone(),
                }
            }
        };
        Ok(BlobStore { backend })
    }

    /// A store for tests and tools over an already-open local directory.
    fn path(&self, key: &str) -> Path {
        match &self.backend {
            Backend::Local { .. } => Path::from(key),
            Backend::S3 { prefix, .. } if prefix.is_empty() => Path::from(key),
            Backend::S3 { prefix, .. } => Path::from(format!("{prefix}/{key}")),
        }
    }

    /// The directory of a local store.
    pub fn local_dir(&self) -> Option<&FsPath> {
        match &self.backend {
            Backend::Local { dir, .. } => Some(dir),
            Backend::S3 { .. } => None,
        }
    }

    /// Free bytes where local blobs are written (`None` for S3).
    pub fn free_space(&self) -> Option<u64> {
        self.local_dir().and_then(|d| fs4::available_space(d).ok())
    }

    /// Starts writing `key`. For S3 the multipart upload is created here: record
    /// [`BlobWriter::multipart_id`] before writing.
    pub async fn writer(&self, key: &str) -> Result<BlobWriter, BlobError> {
        let path = self.path(key);
        let kind = match &self.backend {
            Backend::Local { store, .. } => WriterKind::Local(store.put_multipart(&path).await?),
            Backend::S3 { store, .. } => {
                let id = store.create_multipart(&path).await?;
                WriterKind::S3 {
                    store: Arc::clone(store),
                    id,
                    parts: Vec::new(),
                }
            }
        };
        let part_size = match kind {
            WriterKind::Local(_) => LOCAL_PART,
            WriterKind::S3 { .. } => S3_PART,
        };
        Ok(BlobWriter {
            path,
            kind: Some(kind),
            buf: PutPayloadMut::new(),
            part_size,
            in_flight: VecDeque::new(),
            next_idx: 0,
        })
    }

    /// Size of a stored blob.
    pub async fn size(&self, key: &str) -> Result<u64, BlobError> {
        let path = self.path(key);
        let meta = match &self.backend {
            Backend::Local { store, .. } => store.head(&path).await,
            Backend::S3 { store, .. } => store.head(&path).await,
        };
        Ok(meta.map_err(|e| missing_or(key, e))?.size)
    }

    /// Streams `range` of a blob. Local blobs are read with positioned reads sized by `budget`;
    /// S3 blobs with one ranged GET. A missing blob fails here, before any byte is sent.
    pub async fn read(
        &self,
        key: &str,
        range: Range<u64>,
        budget: &ReadBudget,
    ) -> Result<ByteStream, BlobError> {
        match &self.backend {
            Backend::Local { store, .. } => {
                let file_path = store
                    .path_to_filesystem(&self.path(key))
                    .map_err(|e| missing_or(key, e))?;
                read::local_range(file_path, key, range, budget.clone()).await
            }
            Backend::S3 { store, .. } => {
                if range.is_empty() {
                    return Ok(Box::pin(futures::stream::empty()));
                }
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(range)),
                    ..Default::default()
                };
                let got = store
                    .get_opts(&self.path(key), opts)
                    .await
                    .map_err(|e| missing_or(key, e))?;
                Ok(read::s3_stream(got.into_stream()))
            }
        }
    }

    /// Removes a blob; a missing blob is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        let path = self.path(key);
        let r = match &self.backend {
            Backend::Local { store, .. } => store.delete(&path).await,
            Backend::S3 { store, .. } => store.delete(&path).await,
        };
        match r {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Aborts an S3 multipart upload recorded by a crashed or failed upload (no-op locally).
    pub async fn abort_multipart(&self, key: &str, id: &str) -> Result<(), BlobError> {
        if let Backend::S3 { store, .. } = &self.backend {
            match store
                .abort_multipart(&self.path(key), &id.to_string())
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Removes every file in a local blob directory whose name is not in `keep` — staging
    /// files (`<key>#<n>`, which object_store's `list()` hides) and blobs with no committed
    /// record. Run at start-up, before any upload starts. Returns the removed paths.
    pub fn sweep_local(&self, keep: &HashSet<String>) -> Result<Vec<PathBuf>, BlobError> {
        let Some(dir) = self.local_dir() else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(dir)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if !keep.contains(&rel) {
                    std::fs::remove_file(&path)?;
                    removed.push(path);
                }
            }
        }
        Ok(removed)
    }

    /// Proves the store answers (readiness): the local directory is writable, or the bucket
    /// can be listed.
    pub async fn check(&self) -> Result<(), BlobError> {
        match &self.backend {
            Backend::Local { dir, .. } => {
                let probe = dir.join(".readyz-probe");
                tokio::fs::write(&probe, b"ok").await?;
                tokio::fs::remove_file(&probe).await?;
                Ok(())
            }
            Backend::S3 { store, prefix } => {
                use futures::StreamExt;
                let p = (!prefix.is_empty()).then(|| Path::from(prefix.as_str()));
                match store.list(p.as_ref()).next().await {
                    None | Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => Err(e.into()),
                }
            }
        }
    }

    /// Whether this is an S3 store.
    pub fn is_s3(&self) -> bool {
        matches!(self.backend, Backend::S3 { .. })
    }
}

enum WriterKind {
    Local(Box<dyn MultipartUpload>),
    S3 {
        store: Arc<AmazonS3>,
        id: String,
        parts: Vec<PartId>,
    },
}

type PartTask = JoinHandle<Result<Option<PartId>, object_store::Error>>;

/// Writes one blob in parts, at most `PARTS_IN_FLIGHT` parts at once (backpressure).
/// Dropping it without [`finish`](Self::finish) leaves no object behind locally (object_store
/// removes its staging file); on S3 the caller aborts with the recorded upload id.
pub struct BlobWriter {
    path: Path,
    kind: Option<WriterKind>,
    buf: PutPayloadMut,
    part_size: usize,
    in_flight: VecDeque<PartTask>,
    next_idx: usize,
}

impl BlobWriter {
    /// The S3 multipart upload id (to record for the crash sweep).
    pub fn multipart_id(&self) -> Option<String> {
        match &self.kind {
            Some(WriterKind::S3 { id, .. }) => Some(id.clone()),
            _ => None,
        }
    }

    /// Appends bytes; waits when too many parts are in flight.
    pub async fn write(&mut self, data: Bytes) -> Result<(), BlobError> {
        self.buf.push(data);
        while self.buf.content_length() >= self.part_size {
            let full = std::mem::take(&mut self.buf).freeze();
            let (part, rest) = split_payload(full, self.part_size);
            self.buf = rest;
            self.spawn_part(part).await?;
        }
        Ok(())
    }

    async fn spawn_part(&mut self, payload: PutPayload) -> Result<(), BlobError> {
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.collect_one().await?;
        }
        let idx = self.next_idx;
        self.next_idx += 1;
        let task: PartTask = match self.kind.as_mut() {
            Some(WriterKind::Local(upload)) => {
                let fut = upload.put_part(payload);
                tokio::spawn(async move { fut.await.map(|()| None) })
            }
            Some(WriterKind::S3 { store, id, .. }) => {
                let (store, id, path) = (Arc::clone(store), id.clone(), self.path.clone());
                tokio::spawn(
                    async move { store.put_part(&path, &id, idx, payload).await.map(Some) },
                )
            }
            None => return Err(BlobError::Task("writer already finished".into())),
        };
        self.in_flight.push_back(task);
        Ok(())
    }

    async fn collect_one(&mut self) -> Result<(), BlobError> {
        let Some(task) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let part = task.await.map_err(|e| BlobError::Task(e.to_string()))??;
        if let (Some(part), Some(WriterKind::S3 { parts, .. })) = (part, self.kind.as_mut()) {
            parts.push(part);
        }
        Ok(())
    }

    /// Writes what is buffered, waits for every part and publishes the blob under its key
    /// (durably: fsync locally).
    pub async fn finish(mut self) -> Result<(), BlobError> {
        if self.buf.content_length() > 0 || self.next_idx == 0 {
            let rest = std::mem::take(&mut self.buf).freeze();
            self.spawn_part(rest).await?;
        }
        while !self.in_flight.is_empty() {
            self.collect_one().await?;
        }
        match self.kind.take() {
            Some(WriterKind::Local(mut upload)) => {
                upload.complete().await?;
            }
            Some(WriterKind::S3 { store, id, parts }) => {
                store.complete_multipart(&self.path, &id, parts).await?;
            }
            None => return Err(BlobError::Task("writer already finished".into())),
        }
        Ok(())
    }

    /// Abandons the blob: waits for parts in flight, then removes the staging file or aborts
    /// the S3 upload.
    pub async fn abort(mut self) -> Result<(), BlobError> {
        for task in self.in_flight.drain(..) {
            task.abort();
        }
        match self.kind.take() {
            Some(WriterKind::Local(mut upload)) => upload.abort().await?,
            Some(WriterKind::S3 { store, id, .. }) => {
                store.abort_multipart(&self.path, &id).await?
            }
            None => {}
        }
        Ok(())
    }
}

/// Splits a payload after `at` bytes without copying.
fn split_payload(payload: PutPayload, at: usize) -> (PutPayload, PutPayloadMut) {
    let mut head = Vec::new();
    let mut rest = PutPayloadMut::new();
    let mut taken = 0;
    for b in payload.iter() {
        if taken >= at {
            rest.push(b.clone());
        } else if taken + b.len() <= at {
            taken += b.len();
            head.push(b.clone());
        } else {
            let cut = at - taken;
            head.push(b.slice(..cut));
            rest.push(b.slice(cut..));
            taken = at;
        }
    }
    (head.into_iter().collect(), rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_payload_is_exact() {
        let p: PutPayload = vec![Bytes::from(vec![1u8; 3]), Bytes::from(vec![2u8; 5])]
            .into_iter()
            .collect();
        let (head, rest) = split_payload(p, 4);
        assert_eq!(head.content_length(), 4);
        assert_eq!(rest.content_length(), 4);
        let head: Vec<u8> = head.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(head, vec![1, 1, 1, 2]);
    }
}
