//! The blob store: package bytes. Any S3-compatible bucket through object_store (multipart
//! writes whose upload id the caller records before the first part; ranged `get_opts` reads),
//! or the local filesystem by default, where object_store's `LocalFileSystem` serves metadata
//! and deletes while reads and writes take two paths of our own, both measured: reads are
//! large positioned reads (object_store's local stream yields small chunks and reaches a
//! fraction of the disk's speed), writes sync while the upload is still arriving (object_store
//! syncs only at the end, which on our disks added a third to an upload's time).
//!
//! Invariants: a blob appears under its key only when its writer `finish`es; an aborted or
//! dropped writer leaves no object (local staging files that a crash leaves behind are removed
//! by [`BlobStore::sweep_local`], S3 uploads by [`BlobStore::abort_multipart`]).

mod local_write;
mod read;

pub use read::{ByteStream, ConnectionGuard, ReadBudget};

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, PutPayloadMut};
use tokio::task::JoinHandle;

use local_write::LocalWriter;

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

impl BlobError {
    /// Whether the cause is a full file system (the answer is 507, not 502).
    pub fn is_no_space(&self) -> bool {
        match self {
            BlobError::Io(e) => crate::domain::io_no_space(e),
            _ => false,
        }
    }
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

/// Where blobs live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobBackend {
    /// A directory on the local filesystem.
    Local {
        /// The directory.
        dir: PathBuf,
    },
    /// An S3-compatible bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix (no leading or trailing `/`), may be empty.
        prefix: String,
        /// Endpoint URL for non-AWS servers.
        endpoint: Option<String>,
    },
}

impl BlobBackend {
    /// Parses `--blob-store` (`file://DIR` or `s3://bucket/prefix`; none: `DATA_DIR/blobs`).
    pub fn parse(
        raw: Option<&str>,
        data_dir: &FsPath,
        endpoint: Option<String>,
    ) -> Result<BlobBackend, String> {
        let Some(raw) = raw else {
            return Ok(BlobBackend::Local {
                dir: data_dir.join("blobs"),
            });
        };
        if let Some(dir) = raw.strip_prefix("file://") {
            if dir.is_empty() {
                return Err("blob_store file:// needs a directory".into());
            }
            return Ok(BlobBackend::Local {
                dir: PathBuf::from(dir),
            });
        }
        if let Some(rest) = raw.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.len() < 3 {
                return Err("blob_store s3:// needs a bucket name of at least 3 characters".into());
            }
            return Ok(BlobBackend::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
                endpoint,
            });
        }
        Err(format!(
            "blob_store {raw:?} must be file://DIR or s3://bucket/prefix"
        ))
    }
}

/// Timeouts of a remote (S3) store. object_store's defaults let one request to a frozen
/// server retry for three minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobTimeouts {
    /// To establish a connection.
    pub connect: std::time::Duration,
    /// Between two reads of one response, and for all retries of one request.
    pub request: std::time::Duration,
}

impl Default for BlobTimeouts {
    fn default() -> Self {
        BlobTimeouts {
            connect: std::time::Duration::from_secs(5),
            request: std::time::Duration::from_secs(30),
        }
    }
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
    pub fn open(backend: &BlobBackend, timeouts: &BlobTimeouts) -> Result<BlobStore, BlobError> {
        let backend = match backend {
            BlobBackend::Local { dir } => {
                std::fs::create_dir_all(dir)?;
                let dir = std::fs::canonicalize(dir)?;
                let store = LocalFileSystem::new_with_prefix(&dir)?;
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
                // A read timeout instead of a total one: a multi-GiB download to a slow dock
                // may take hours, but a server that stops answering is noticed at once.
                let client = object_store::ClientOptions::new()
                    .with_connect_timeout(timeouts.connect)
                    .with_read_timeout(timeouts.request)
                    .with_timeout_disabled();
                let retry = object_store::RetryConfig {
                    max_retries: 3,
                    retry_timeout: timeouts.request,
                    ..Default::default()
                };
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(client)
                    .with_retry(retry);
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
        let (kind, part_size) = match &self.backend {
            Backend::Local { dir, .. } => (
                WriterKind::Local(LocalWriter::create(dir.join(key)).await?),
                LOCAL_PART,
            ),
            Backend::S3 { store, .. } => {
                let path = self.path(key);
                let id = store.create_multipart(&path).await?;
                let kind = WriterKind::S3 {
                    store: Arc::clone(store),
                    path,
                    id,
                    parts: Vec::new(),
                    in_flight: VecDeque::new(),
                };
                (kind, S3_PART)
            }
        };
        Ok(BlobWriter {
            kind: Some(kind),
            buf: PutPayloadMut::new(),
            part_size,
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

    /// Removes everything an unfinished upload of `key` may have left: its S3 multipart upload
    /// (`multipart_id`), the object, and a local staging file.
    pub async fn discard_partial(
        &self,
        key: &str,
        multipart_id: Option<&str>,
    ) -> Result<(), BlobError> {
        if let Some(id) = multipart_id {
            self.abort_multipart(key, id).await?;
        }
        if let Backend::Local { dir, .. } = &self.backend {
            let staging = local_write::staging_path(&dir.join(key));
            match tokio::fs::remove_file(&staging).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.delete(key).await
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
                let written = tokio::fs::write(&probe, b"ok").await;
                // Removed whether the write worked or not (a full disk leaves it empty).
                let removed = tokio::fs::remove_file(&probe).await;
                written?;
                removed?;
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
    Local(LocalWriter),
    S3 {
        store: Arc<AmazonS3>,
        path: Path,
        id: String,
        parts: Vec<PartId>,
        in_flight: VecDeque<JoinHandle<Result<PartId, object_store::Error>>>,
    },
}

/// Writes one blob in parts, with bounded parts in flight (backpressure). Dropping it without
/// [`finish`](Self::finish) leaves no local file behind; on S3 the caller aborts with the
/// recorded upload id.
pub struct BlobWriter {
    kind: Option<WriterKind>,
    buf: PutPayloadMut,
    part_size: usize,
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

    /// Appends a batch of chunks (no copy); waits when too many parts are in flight.
    pub async fn write(&mut self, batch: Vec<Bytes>) -> Result<(), BlobError> {
        for chunk in batch {
            self.buf.push(chunk);
        }
        while self.buf.content_length() >= self.part_size {
            let full = std::mem::take(&mut self.buf).freeze();
            let (part, rest) = split_payload(full, self.part_size);
            self.buf = rest;
            self.put_part(part).await?;
        }
        Ok(())
    }

    async fn put_part(&mut self, payload: PutPayload) -> Result<(), BlobError> {
        let idx = self.next_idx;
        self.next_idx += 1;
        match self.kind.as_mut() {
            Some(WriterKind::Local(w)) => w.write(payload.iter().cloned().collect()).await?,
            Some(WriterKind::S3 {
                store,
                path,
                id,
                parts,
                in_flight,
            }) => {
                while in_flight.len() >= PARTS_IN_FLIGHT {
                    collect_part(in_flight, parts).await?;
                }
                let (store, id, path) = (Arc::clone(store), id.clone(), path.clone());
                in_flight.push_back(tokio::spawn(async move {
                    store.put_part(&path, &id, idx, payload).await
                }));
            }
            None => return Err(BlobError::Task("writer already finished".into())),
        }
        Ok(())
    }

    /// Writes what is buffered, waits for every part and publishes the blob under its key
    /// (durably: synced locally).
    pub async fn finish(mut self) -> Result<(), BlobError> {
        if self.buf.content_length() > 0 || self.next_idx == 0 {
            let rest = std::mem::take(&mut self.buf).freeze();
            self.put_part(rest).await?;
        }
        match self.kind.take() {
            Some(WriterKind::Local(w)) => w.finish().await?,
            Some(WriterKind::S3 {
                store,
                path,
                id,
                mut parts,
                mut in_flight,
            }) => {
                while !in_flight.is_empty() {
                    collect_part(&mut in_flight, &mut parts).await?;
                }
                store.complete_multipart(&path, &id, parts).await?;
            }
            None => return Err(BlobError::Task("writer already finished".into())),
        }
        Ok(())
    }

    /// Abandons the blob: removes the staging file or aborts the S3 upload.
    pub async fn abort(mut self) -> Result<(), BlobError> {
        match self.kind.take() {
            Some(WriterKind::Local(w)) => w.abort().await?,
            Some(WriterKind::S3 {
                store,
                path,
                id,
                in_flight,
                ..
            }) => {
                for task in in_flight {
                    task.abort();
                }
                store.abort_multipart(&path, &id).await?;
            }
            None => {}
        }
        Ok(())
    }
}

async fn collect_part(
    in_flight: &mut VecDeque<JoinHandle<Result<PartId, object_store::Error>>>,
    parts: &mut Vec<PartId>,
) -> Result<(), BlobError> {
    if let Some(task) = in_flight.pop_front() {
        parts.push(task.await.map_err(|e| BlobError::Task(e.to_string()))??);
    }
    Ok(())
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
