//! Response bodies of the HTTP API.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::FileName;
use crate::store::{DownloadSessionRecord, FirmwareRecord, FirmwareStatus, Page, VerifyStatus};

/// A firmware record as the API shows it (contract §3).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FirmwareDto {
    /// Id.
    pub id: String,
    /// Package file name.
    pub file_name: String,
    /// Model.
    pub model: String,
    /// Version as stored.
    pub product_version: String,
    /// Size in bytes.
    pub file_size: u64,
    /// MD5, lowercase hex.
    pub md5: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// `{public_url}/files/{id}/{file_name}`.
    pub file_url: String,
    /// Release note.
    pub release_note: Option<String>,
    /// Build time parsed from the file name.
    pub build_time: Option<DateTime<Utc>>,
    /// Upload time.
    pub created_at: DateTime<Utc>,
    /// ready, corrupt, disabled or deleted.
    pub status: FirmwareStatus,
    /// Result of the last re-verification.
    pub verify_status: Option<VerifyStatus>,
    /// When the last re-verification finished.
    pub verified_at: Option<DateTime<Utc>>,
    /// When the record was deleted.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// `{public_url}/files/{id}/{file_name}` with the name percent-encoded.
pub fn file_url(base: &str, r: &FirmwareRecord) -> String {
    let segment = FileName::parse(&r.file_name)
        .map(|n| n.url_segment())
        .unwrap_or_else(|_| r.file_name.clone());
    format!("{base}/files/{}/{segment}", r.id)
}

impl FirmwareDto {
    /// From a record, with URLs under `base`.
    pub fn from_record(base: &str, r: FirmwareRecord) -> Self {
        FirmwareDto {
            file_url: file_url(base, &r),
            id: r.id.to_string(),
            file_name: r.file_name,
            model: r.model,
            product_version: r.product_version,
            file_size: r.file_size,
            md5: r.md5,
            sha256: r.sha256,
            release_note: r.release_note,
            build_time: r.build_time,
            created_at: r.created_at,
            status: r.status,
            verify_status: r.verify_status,
            verified_at: r.verified_at,
            deleted_at: r.deleted_at,
        }
    }
}

/// A page of firmware records.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FirmwarePage {
    /// Records, newest first.
    pub items: Vec<FirmwareDto>,
    /// Cursor of the next page, null on the last.
    pub next_cursor: Option<String>,
}

impl FirmwarePage {
    /// From a catalog page.
    pub fn from_page(base: &str, p: Page<FirmwareRecord>) -> Self {
        FirmwarePage {
            items: p
                .items
                .into_iter()
                .map(|r| FirmwareDto::from_record(base, r))
                .collect(),
            next_cursor: p.next_cursor,
        }
    }
}

/// A page of download sessions.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionPage {
    /// Sessions, newest first.
    pub items: Vec<DownloadSessionRecord>,
    /// Cursor of the next page, null on the last.
    pub next_cursor: Option<String>,
}

impl From<Page<DownloadSessionRecord>> for SessionPage {
    fn from(p: Page<DownloadSessionRecord>) -> Self {
        SessionPage {
            items: p.items,
            next_cursor: p.next_cursor,
        }
    }
}
