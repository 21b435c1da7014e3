//! Stored record types. Every value carries `v` (its schema version) so later releases can read
//! what earlier ones wrote.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::FirmwareId;

/// Schema version of the records below.
pub const SCHEMA_VERSION: u32 = 1;

fn schema_version() -> u32 {
    SCHEMA_VERSION
}

/// Lifecycle state of a firmware record (contract §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FirmwareStatus {
    /// Downloadable, usable for new tasks.
    Ready,
    /// Re-verification found the blob differs from the record; downloads refused.
    Corrupt,
    /// No new tasks; downloads continue.
    Disabled,
    /// Tombstone: blob removed, downloads answer 410.
    Deleted,
}

/// Result of the last re-verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerifyStatus {
    /// A verification is running.
    Running,
    /// Size, MD5 and SHA-256 match the record.
    Ok,
    /// The stored bytes differ from the record.
    Mismatch,
    /// The blob is gone from storage.
    BlobMissing,
    /// The blob store failed while reading.
    Error,
}

/// A committed firmware package.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FirmwareRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// Id (ULID).
    pub id: FirmwareId,
    /// Package file name, the last segment of its URLs.
    pub file_name: String,
    /// Model as given or parsed.
    pub model: String,
    /// Version as given or parsed (sent on the wire as stored).
    pub product_version: String,
    /// Size in bytes.
    pub file_size: u64,
    /// MD5, lowercase hex.
    pub md5: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Free text from the release engineer.
    pub release_note: Option<String>,
    /// Build time from the file name, if it carried one.
    pub build_time: Option<DateTime<Utc>>,
    /// When the upload was committed.
    pub created_at: DateTime<Utc>,
    /// Lifecycle state.
    pub status: FirmwareStatus,
    /// Last re-verification result.
    #[serde(default)]
    pub verify_status: Option<VerifyStatus>,
    /// When the last re-verification finished.
    #[serde(default)]
    pub verified_at: Option<DateTime<Utc>>,
    /// When the record was tombstoned.
    #[serde(default)]
    pub deleted_at: Option<DateTime<Utc>>,
    /// Key of the blob in the blob store.
    pub blob_key: String,
}

impl FirmwareRecord {
    /// A minimal record for unit tests.
    #[doc(hidden)]
    pub fn new_for_test(model: &str, version: &str, sha256: &str) -> Self {
        let id = FirmwareId::generate();
        FirmwareRecord {
            v: SCHEMA_VERSION,
            blob_key: id.to_string(),
            id,
            file_name: format!("{model}_{version}.zip"),
            model: model.into(),
            product_version: version.into(),
            file_size: 1,
            md5: "0".repeat(32),
            sha256: sha256.into(),
            release_note: None,
            build_time: None,
            created_at: Utc::now(),
            status: FirmwareStatus::Ready,
            verify_status: None,
            verified_at: None,
            deleted_at: None,
        }
    }
}

/// An upload that has started but not committed: what the start-up sweep must undo.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingUpload {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// Upload id (also the firmware id it would get).
    pub id: String,
    /// Blob key being written.
    pub blob_key: String,
    /// S3 multipart upload id, recorded before the first part.
    pub multipart_id: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
}

/// State of a download session (contract §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Requests within the last 120 s and bytes still missing.
    Active,
    /// Every byte of the file was sent at least once.
    Complete,
    /// No request for 120 s.
    Stalled,
}

/// A download session as stored and as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DownloadSessionRecord {
    /// Schema version.
    #[serde(default = "schema_version", skip_serializing)]
    #[schema(ignore)]
    pub v: u32,
    /// Session id (ULID).
    pub id: String,
    /// The firmware downloaded.
    #[schema(value_type = String)]
    pub firmware_id: FirmwareId,
    /// OTA task of a `/dl/` URL.
    pub task_id: Option<String>,
    /// Device serial of a `/dl/` URL.
    pub sn: Option<String>,
    /// Client address (X-Forwarded-For only from trusted proxies).
    pub client: String,
    /// Client User-Agent.
    pub user_agent: String,
    /// File size in bytes.
    pub file_size: u64,
    /// Bytes sent, repeats included.
    pub bytes_sent: u64,
    /// Distinct bytes of the file sent at least once.
    pub bytes_covered: u64,
    /// bytes_covered as a percentage of file_size (one decimal).
    pub percent: f64,
    /// GET requests that sent data.
    pub requests: u64,
    /// active, complete or stalled.
    pub state: SessionState,
    /// First request.
    pub started_at: DateTime<Utc>,
    /// Latest request.
    pub last_seen_at: DateTime<Utc>,
    /// Byte intervals covered, `[start, end)`, merged and sorted.
    #[serde(default)]
    #[schema(value_type = Vec<Vec<u64>>)]
    pub covered: Vec<(u64, u64)>,
}

/// Percent of `size` that `covered` bytes are, rounded down to a tenth.
pub fn percent(covered: u64, size: u64) -> f64 {
    if size == 0 {
        return 100.0;
    }
    ((covered as u128 * 1000 / size as u128) as f64) / 10.0
}

/// Adds `[start, end)` to sorted, merged intervals; returns the bytes newly covered.
pub fn cover(intervals: &mut Vec<(u64, u64)>, start: u64, end: u64) -> u64 {
    if start >= end {
        return 0;
    }
    let before: u64 = intervals.iter().map(|(a, b)| b - a).sum();
    let idx = intervals.partition_point(|&(_, b)| b < start);
    let mut new = (start, end);
    let mut j = idx;
    while j < intervals.len() && intervals[j].0 <= new.1 {
        new.0 = new.0.min(intervals[j].0);
        new.1 = new.1.max(intervals[j].1);
        j += 1;
    }
    intervals.splice(idx..j, [new]);
    let after: u64 = intervals.iter().map(|(a, b)| b - a).sum();
    after - before
}

impl DownloadSessionRecord {
    #[doc(hidden)]
    pub fn new_for_test(id: &str, covered: &[(u64, u64)], seen: DateTime<Utc>) -> Self {
        let mut s = DownloadSessionRecord {
            v: SCHEMA_VERSION,
            id: id.into(),
            firmware_id: FirmwareId::generate(),
            task_id: Some("T".into()),
            sn: Some("SN".into()),
            client: "127.0.0.1".into(),
            user_agent: "curl".into(),
            file_size: 100,
            bytes_sent: 0,
            bytes_covered: 0,
            percent: 0.0,
            requests: 1,
            state: SessionState::Active,
            started_at: seen,
            last_seen_at: seen,
            covered: Vec::new(),
        };
        for &(a, b) in covered {
            s.bytes_sent += b - a;
            s.bytes_covered += cover(&mut s.covered, a, b);
        }
        s.percent = percent(s.bytes_covered, s.file_size);
        s
    }

    /// This stored session merged with a newer write of it: covered ranges united, counters
    /// and times the larger, the state of the newer write unless the union is complete.
    /// Commutative in the coverage, so writers of one session may flush in any order.
    pub fn merged(&self, newer: &DownloadSessionRecord) -> DownloadSessionRecord {
        let mut out = newer.clone();
        for &(a, b) in &self.covered {
            cover(&mut out.covered, a, b);
        }
        out.bytes_covered = out.covered.iter().map(|(a, b)| b - a).sum();
        out.percent = percent(out.bytes_covered, out.file_size);
        out.bytes_sent = self.bytes_sent.max(newer.bytes_sent);
        out.requests = self.requests.max(newer.requests);
        out.started_at = self.started_at.min(newer.started_at);
        out.last_seen_at = self.last_seen_at.max(newer.last_seen_at);
        if out.bytes_covered >= out.file_size {
            out.state = SessionState::Complete;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_merge() {
        let mut iv = Vec::new();
        assert_eq!(cover(&mut iv, 10, 20), 10);
        assert_eq!(cover(&mut iv, 30, 40), 10);
        assert_eq!(cover(&mut iv, 15, 35), 10);
        assert_eq!(iv, vec![(10, 40)]);
        assert_eq!(cover(&mut iv, 0, 5), 5);
        assert_eq!(cover(&mut iv, 5, 10), 5);
        assert_eq!(iv, vec![(0, 40)]);
        assert_eq!(cover(&mut iv, 0, 40), 0);
        assert_eq!(cover(&mut iv, 50, 50), 0);
    }

    fn session(covered: &[(u64, u64)]) -> DownloadSessionRecord {
        DownloadSessionRecord::new_for_test("S", covered, Utc::now())
    }

    proptest::proptest! {
        /// Writers of one session may flush in any order: the merged coverage is the union.
        #[test]
        fn merging_is_a_commutative_union(
            a in proptest::collection::vec((0u64..100, 0u64..30), 0..6),
            b in proptest::collection::vec((0u64..100, 0u64..30), 0..6),
        ) {
            let span = |v: &Vec<(u64, u64)>| -> Vec<(u64, u64)> {
                v.iter().map(|&(s, l)| (s, (s + l).min(100))).collect()
            };
            let (x, y) = (session(&span(&a)), session(&span(&b)));
            let (xy, yx) = (x.merged(&y), y.merged(&x));
            proptest::prop_assert_eq!(&xy.covered, &yx.covered);
            proptest::prop_assert_eq!(xy.bytes_covered, yx.bytes_covered);
            let mut union = Vec::new();
            for &(s, e) in span(&a).iter().chain(span(&b).iter()) {
                cover(&mut union, s, e);
            }
            proptest::prop_assert_eq!(&xy.covered, &union);
            proptest::prop_assert_eq!(
                xy.state == SessionState::Complete,
                xy.bytes_covered >= 100
            );
        }
    }
}
