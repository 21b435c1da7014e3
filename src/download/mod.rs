//! Serving package bytes (contract §4): resolve the firmware behind a URL, decide the answer
//! from the conditional and range headers ([`range`]), and stream the bytes with each chunk
//! counted into the download session. Free of HTTP types: the adapter turns a [`Served`] into
//! a response.

// A list of byte ranges that holds one range is the common case here, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

pub mod range;
pub mod signing;

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use futures::{StreamExt, TryStreamExt};

use crate::blobs::{BlobError, BlobStore, ByteStream, ReadBudget};
use crate::domain::FirmwareId;
use crate::metrics::Metrics;
use crate::progress::{ClientInfo, DownloadTracker, SessionHandle, SessionKey};
use crate::store::{CatalogError, FirmwareRecord, FirmwareStatus, FirmwareStore};
use range::{Conditions, Plan, Validators};

/// Errors of the download layer.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Unknown firmware, or a file name that is not its name.
    #[error("no such file")]
    NotFound,
    /// The firmware was deleted.
    #[error("firmware {0} was deleted")]
    Deleted(FirmwareId),
    /// The firmware failed verification.
    #[error("firmware {0} failed verification; downloads are refused")]
    Corrupt(FirmwareId),
    /// The blob behind the record is gone.
    #[error("the blob of firmware {0} is missing from storage")]
    BlobMissing(FirmwareId),
    /// The blob store failed.
    #[error(transparent)]
    Blob(BlobError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(CatalogError),
}

/// A download request, as the adapter extracted it.
#[derive(Debug)]
pub struct DownloadRequest<'a> {
    /// Firmware id from the URL.
    pub firmware_id: &'a str,
    /// File name from the URL.
    pub file_name: &'a str,
    /// GET (true) or HEAD.
    pub is_get: bool,
    /// Conditional and range headers.
    pub conditions: Conditions<'a>,
    /// Who asks.
    pub client: ClientInfo,
    /// `(task_id, sn)` for per-task URLs.
    pub task: Option<(String, String)>,
}

/// The kind of answer.
#[derive(Debug, PartialEq, Eq)]
pub enum ServedKind {
    /// 200, whole file.
    Full,
    /// 206, one range.
    Single(Range<u64>),
    /// 206, `multipart/byteranges` with this boundary.
    Multi {
        /// The boundary string.
        boundary: String,
    },
    /// 304.
    NotModified,
    /// 416.
    Unsatisfiable,
}

/// What to send back.
pub struct Served {
    /// The kind of answer.
    pub kind: ServedKind,
    /// The firmware served.
    pub firmware: FirmwareRecord,
    /// Strong ETag, quoted.
    pub etag: String,
    /// Last-Modified.
    pub last_modified: DateTime<Utc>,
    /// Exact body length.
    pub content_length: u64,
    /// The body (GET with bytes to send only).
    pub body: Option<ByteStream>,
}

/// Download resolution and streaming. Cheap to clone.
#[derive(Clone)]
pub struct DownloadService {
    firmware: Arc<dyn FirmwareStore>,
    blobs: BlobStore,
    budget: ReadBudget,
    tracker: DownloadTracker,
    metrics: Arc<Metrics>,
}

impl DownloadService {
    /// A service over the catalog, blob store, read budget and session tracker.
    pub fn new(
        firmware: Arc<dyn FirmwareStore>,
        blobs: BlobStore,
        budget: ReadBudget,
        tracker: DownloadTracker,
        metrics: Arc<Metrics>,
    ) -> Self {
        DownloadService {
            firmware,
            blobs,
            budget,
            tracker,
            metrics,
        }
    }

    /// Resolves a firmware for download: known, named so, not deleted, not corrupt.
    pub async fn resolve(
        &self,
        id: &str,
        file_name: &str,
    ) -> Result<FirmwareRecord, DownloadError> {
        let id = FirmwareId::parse(id).ok_or(DownloadError::NotFound)?;
        let fw = self.firmware.firmware(&id).await.map_err(|e| match e {
            CatalogError::NotFound => DownloadError::NotFound,
            other => DownloadError::Catalog(other),
        })?;
        if fw.file_name != file_name {
            return Err(DownloadError::NotFound);
        }
        match fw.status {
            FirmwareStatus::Deleted => Err(DownloadError::Deleted(fw.id)),
            FirmwareStatus::Corrupt => Err(DownloadError::Corrupt(fw.id)),
            FirmwareStatus::Ready | FirmwareStatus::Disabled => Ok(fw),
        }
    }

    /// Answers one GET or HEAD.
    pub async fn serve(&self, req: DownloadRequest<'_>) -> Result<Served, DownloadError> {
        Metrics::add(&self.metrics.download_requests, 1);
        let fw = self.resolve(req.firmware_id, req.file_name).await?;
        let validators = Validators {
            etag: format!("\"{}\"", fw.sha256),
            last_modified: fw.created_at.trunc_subsecs(0),
        };
        let len = fw.file_size;
        let plan = range::plan(len, &validators, &req.conditions, req.is_get);
        let (kind, ranges, content_length) = match plan {
            Plan::NotModified => (ServedKind::NotModified, vec![], 0),
            Plan::Unsatisfiable => (ServedKind::Unsatisfiable, vec![], 0),
            Plan::Full => (ServedKind::Full, vec![0..len], len),
            Plan::Partial(r) if r.len() == 1 => {
                let n = r[0].end - r[0].start;
                (ServedKind::Single(r[0].clone()), r, n)
            }
            Plan::Partial(r) => {
                let boundary = format!("fwrepo-{}", crate::domain::ids::next().to_lowercase());
                let total = multipart_length(&boundary, &r, len);
                (ServedKind::Multi { boundary }, r, total)
            }
        };
        let mut served = Served {
            kind,
            etag: validators.etag,
            last_modified: validators.last_modified,
            content_length,
            body: None,
            firmware: fw,
        };
        let sends_body = req.is_get
            && matches!(
                served.kind,
                ServedKind::Full | ServedKind::Single(_) | ServedKind::Multi { .. }
            );
        if !sends_body {
            return Ok(served);
        }
        let fw = &served.firmware;
        // Open the first range before answering, so a missing blob is a clean 502.
        let first = self.open(fw, ranges[0].clone()).await?;
        let key = match req.task {
            Some((task_id, sn)) => SessionKey::Task {
                task_id,
                sn,
                firmware_id: fw.id.clone(),
            },
            None => SessionKey::Client {
                firmware_id: fw.id.clone(),
                client: req.client.client.clone(),
                user_agent: req.client.user_agent.clone(),
            },
        };
        let session = self.tracker.begin(key, &req.client, len);
        served.body = Some(match &served.kind {
            ServedKind::Multi { boundary } => {
                self.multipart_body(fw, boundary.clone(), ranges, first, session)
            }
            _ => counted(first, ranges[0].start, session, Arc::clone(&self.metrics)),
        });
        Ok(served)
    }

    async fn open(&self, fw: &FirmwareRecord, r: Range<u64>) -> Result<ByteStream, DownloadError> {
        self.blobs
            .read(&fw.blob_key, r, &self.budget)
            .await
            .map_err(|e| {
                Metrics::add(&self.metrics.download_errors, 1);
                match e {
                    BlobError::Missing(_) => DownloadError::BlobMissing(fw.id.clone()),
                    other => DownloadError::Blob(other),
                }
            })
    }

    fn multipart_body(
        &self,
        fw: &FirmwareRecord,
        boundary: String,
        ranges: Vec<Range<u64>>,
        first: ByteStream,
        session: SessionHandle,
    ) -> ByteStream {
        let len = fw.file_size;
        let tail = multipart_tail(&boundary);
        let this = self.clone();
        let fw = fw.clone();
        let mut first = Some(first);
        let parts = futures::stream::iter(ranges.into_iter().enumerate()).then(move |(i, r)| {
            let head = part_header(&boundary, i == 0, &r, len);
            let opened = first.take();
            let (this, fw, session) = (this.clone(), fw.clone(), session.clone());
            async move {
                let data = match opened {
                    Some(s) => s,
                    None => this
                        .open(&fw, r.clone())
                        .await
                        .map_err(std::io::Error::other)?,
                };
                let head = futures::stream::once(async move { Ok(Bytes::from(head)) });
                Ok::<_, std::io::Error>(head.chain(counted(
                    data,
                    r.start,
                    session,
                    Arc::clone(&this.metrics),
                )))
            }
        });
        let tail = futures::stream::once(async move { Ok(Bytes::from(tail)) });
        Box::pin(parts.try_flatten().chain(tail))
    }
}

fn part_header(boundary: &str, first: bool, r: &Range<u64>, len: u64) -> String {
    format!(
        "{}--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {}-{}/{len}\r\n\r\n",
        if first { "" } else { "\r\n" },
        r.start,
        r.end - 1
    )
}

fn multipart_tail(boundary: &str) -> String {
    format!("\r\n--{boundary}--\r\n")
}

/// Exact length of a `multipart/byteranges` body.
fn multipart_length(boundary: &str, ranges: &[Range<u64>], len: u64) -> u64 {
    let parts: u64 = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| part_header(boundary, i == 0, r, len).len() as u64 + (r.end - r.start))
        .sum();
    parts + multipart_tail(boundary).len() as u64
}

/// Counts each chunk into the session and the byte counter as it is handed to the client.
fn counted(
    stream: ByteStream,
    start: u64,
    session: SessionHandle,
    metrics: Arc<Metrics>,
) -> ByteStream {
    let mut offset = start;
    Box::pin(stream.inspect_ok(move |chunk| {
        let n = chunk.len() as u64;
        session.record(offset, n);
        Metrics::add(&metrics.bytes_out, n);
        offset += n;
    }))
}
