//! The one place errors become HTTP answers: every layer's error maps to an [`ApiError`] with
//! the status and stable code of contract §2 and the body `{"error", "message"}`. 5xx answers
//! carry a generic message; their whole cause is logged here, once, in the request's span.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::download::DownloadError;
use crate::firmware::FirmwareError;
use crate::store::CatalogError;
use crate::upload::UploadError;

/// The JSON body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable snake_case code (contract §2).
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
    /// Related record, where there is one (e.g. the existing firmware of a conflict).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware_id: Option<String>,
    /// The open task that blocks the request (`gateway_busy`, `device_busy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The preflight check that failed (`preflight_failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    detail: Option<Box<Detail>>,
    unsatisfiable_len: Option<u64>,
    retry_after: Option<u64>,
}

/// Context some errors carry in their body.
#[derive(Debug, Default)]
struct Detail {
    firmware_id: Option<String>,
    task_id: Option<String>,
    check: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ApiError {
    /// An error with status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            unsatisfiable_len: None,
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry after `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 400 invalid_request.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 not_found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 416 with `Content-Range: bytes */len`.
    pub fn range_not_satisfiable(len: u64) -> Self {
        let mut e = Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
            format!(
                "no requested range is satisfiable for a file of {len} bytes (or too many ranges)"
            ),
        );
        e.unsatisfiable_len = Some(len);
        e
    }

    /// 5xx with a generic message; the cause is logged.
    fn internal(status: StatusCode, code: &'static str, cause: &dyn std::error::Error) -> Self {
        let mut chain = cause.to_string();
        let mut source = cause.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error.code = code, error.cause = %chain, "request failed");
        Self::new(
            status,
            code,
            "the server failed to complete the request; see its log",
        )
    }

    fn detail_mut(&mut self) -> &mut Detail {
        self.detail.get_or_insert_with(Box::default)
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status);
        if let Some(len) = self.unsatisfiable_len {
            resp.insert_header((header::CONTENT_RANGE, format!("bytes */{len}")));
            resp.insert_header((header::ACCEPT_RANGES, "bytes"));
        }
        if let Some(secs) = self.retry_after {
            resp.insert_header((header::RETRY_AFTER, HeaderValue::from(secs)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"fwrepo\""));
        }
        resp.json(ErrorBody {
            error: self.code.to_string(),
            message: self.message.clone(),
            firmware_id: self.detail.as_ref().and_then(|d| d.firmware_id.clone()),
            task_id: self.detail.as_ref().and_then(|d| d.task_id.clone()),
            check: self.detail.as_ref().and_then(|d| d.check.clone()),
        })
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotFound => ApiError::not_found("not found"),
            CatalogError::InvalidCursor => ApiError::invalid_request("invalid cursor"),
            e if e.is_no_space() => {
                let mut a = ApiError::internal(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    &e,
                );
                a.message = "the catalog's disk is full; nothing was stored".into();
                a.retry_after = Some(30);
                a
            }
            e @ (CatalogError::Unwritable(_) | CatalogError::Storage(_)) => {
                let mut a =
                    ApiError::internal(StatusCode::SERVICE_UNAVAILABLE, "catalog_unavailable", &e);
                a.message = "the catalog cannot store changes now; nothing was stored".into();
                a.retry_after = Some(5);
                a
            }
            other => {
                ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", &other)
            }
        }
    }
}

impl ApiError {
    /// 429 `rate_limited`, retry after `wait` (at least a second).
    pub fn rate_limited(wait: std::time::Duration) -> ApiError {
        let mut a = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many API requests from this client; retry later",
        );
        a.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        a
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        use UploadError as U;
        let msg = e.to_string();
        match e {
            U::TooMany(_) => {
                let mut a = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_uploads", msg);
                a.retry_after = Some(5);
                a
            }
            U::TooLarge(_) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", msg),
            U::InsufficientStorage { .. } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                msg,
            ),
            U::InvalidRequest(_) | U::BodyAborted(_) | U::IdleTimeout(_) => {
                ApiError::invalid_request(msg)
            }
            U::InvalidVersion(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_version", msg),
            U::VersionRequired(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "version_required", msg)
            }
            U::ValidationFailed(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", msg)
            }
            U::ChecksumMismatch { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "checksum_mismatch", msg)
            }
            U::VersionConflict { existing, .. } => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "version_conflict", msg);
                a.detail_mut().firmware_id = Some(existing.to_string());
                a
            }
            U::Blob(b) if b.is_no_space() => {
                let mut a = ApiError::internal(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    &b,
                );
                a.message =
                    "the blob store's disk filled during the upload; nothing was kept".into();
                a
            }
            U::Blob(b) => ApiError::internal(StatusCode::BAD_GATEWAY, "blob_store_error", &b),
            U::Catalog(c) => ApiError::from(c),
            U::Checksum(c) => {
                ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", &c)
            }
        }
    }
}

impl From<FirmwareError> for ApiError {
    fn from(e: FirmwareError) -> Self {
        use FirmwareError as F;
        let msg = e.to_string();
        match e {
            F::NotFound => ApiError::not_found(msg),
            F::Deleted(_) => ApiError::new(StatusCode::GONE, "firmware_deleted", msg),
            F::Corrupt(_) => ApiError::new(StatusCode::CONFLICT, "firmware_corrupt", msg),
            F::InUse(_) => ApiError::new(StatusCode::CONFLICT, "firmware_in_use", msg),
            F::InvalidRequest(_) => ApiError::invalid_request(msg),
            F::InvalidVersion(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_version", msg),
            F::Catalog(c) => ApiError::from(c),
            F::Blob(b) => ApiError::internal(StatusCode::BAD_GATEWAY, "blob_store_error", &b),
        }
    }
}

impl From<DownloadError> for ApiError {
    fn from(e: DownloadError) -> Self {
        use DownloadError as D;
        let msg = e.to_string();
        match e {
            D::NotFound => ApiError::not_found(msg),
            D::Deleted(_) => ApiError::new(StatusCode::GONE, "firmware_deleted", msg),
            D::Corrupt(_) => ApiError::new(StatusCode::BAD_GATEWAY, "firmware_corrupt", msg),
            D::BlobMissing(ref id) => {
                tracing::error!(firmware_id = %id, "blob missing behind a catalog record");
                ApiError::new(StatusCode::BAD_GATEWAY, "blob_missing", msg)
            }
            D::Blob(b) => ApiError::internal(StatusCode::BAD_GATEWAY, "blob_store_error", &b),
            D::Catalog(c) => ApiError::from(c),
        }
    }
}

/// The code and message for a framework-generated error status (unknown route, wrong method,
/// extractor failure), so those answers carry the same JSON body.
pub fn for_status(status: StatusCode) -> ApiError {
    match status.as_u16() {
        404 => ApiError::not_found("no such resource"),
        405 => ApiError::new(
            status,
            "invalid_request",
            "method not allowed on this resource",
        ),
        413 => ApiError::new(status, "too_large", "request body too large"),
        415 => ApiError::new(status, "unsupported_media_type", "unsupported media type"),
        s if s < 500 => ApiError::new(status, "invalid_request", "malformed request"),
        _ => ApiError::new(
            status,
            "internal_error",
            "the server failed to complete the request",
        ),
    }
}

impl From<crate::ota::OtaError> for ApiError {
    fn from(e: crate::ota::OtaError) -> Self {
        use crate::ota::OtaError as O;
        let msg = e.to_string();
        match e {
            O::NotFound(_) => ApiError::not_found(msg),
            O::Validation(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", msg)
            }
            O::Invalid(_) => ApiError::invalid_request(msg),
            O::ModelMismatch(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "model_mismatch", msg)
            }
            O::DowngradeRefused(_) => ApiError::new(StatusCode::CONFLICT, "downgrade_refused", msg),
            O::AlreadyUpToDate => ApiError::new(StatusCode::CONFLICT, "already_up_to_date", msg),
            O::GatewayBusy(t) => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "gateway_busy", msg);
                a.detail_mut().task_id = Some(t);
                a
            }
            O::DeviceBusy(t) => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "device_busy", msg);
                a.detail_mut().task_id = Some(t);
                a
            }
            O::Preflight { check, .. } => {
                let mut a = ApiError::new(StatusCode::CONFLICT, "preflight_failed", msg);
                a.detail_mut().check = Some(check.to_string());
                a
            }
            O::BrokerUnavailable => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", msg)
            }
            O::FirmwareDeleted(_) => ApiError::new(StatusCode::GONE, "firmware_deleted", msg),
            O::FirmwareCorrupt(_) => ApiError::new(StatusCode::CONFLICT, "firmware_corrupt", msg),
            O::IdempotencyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                msg,
            ),
            O::Catalog(c) => c.into(),
        }
    }
}

impl From<crate::rollout::RolloutError> for ApiError {
    fn from(e: crate::rollout::RolloutError) -> Self {
        use crate::rollout::RolloutError as R;
        let msg = e.to_string();
        match e {
            R::NotFound(_) => ApiError::not_found(msg),
            R::Validation(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", msg)
            }
            R::Invalid(_) => ApiError::invalid_request(msg),
            R::InvalidTransition(_) => {
                ApiError::new(StatusCode::CONFLICT, "invalid_transition", msg)
            }
            R::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "rollout_conflict", msg),
            R::IdempotencyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                msg,
            ),
            R::Ota(o) => o.into(),
            R::Catalog(c) => c.into(),
        }
    }
}

impl From<crate::download::signing::SignatureError> for ApiError {
    fn from(e: crate::download::signing::SignatureError) -> Self {
        use crate::download::signing::SignatureError as S;
        let msg = e.to_string();
        match e {
            S::Invalid => ApiError::new(StatusCode::FORBIDDEN, "signature_invalid", msg),
            S::Expired => ApiError::new(StatusCode::FORBIDDEN, "url_expired", msg),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError as A;
        let msg = e.to_string();
        match e {
            A::Missing | A::Malformed | A::Unknown | A::Revoked | A::Expired => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
            }
            A::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", msg),
            A::Invalid(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", msg)
            }
            A::NotFound(_) => ApiError::not_found(msg),
            A::Catalog(c) => c.into(),
            A::Io { .. } => {
                ApiError::internal(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", &e)
            }
        }
    }
}

impl ApiError {
    /// 429 `rate_limited` for a client running too many downloads at once.
    pub fn too_many_downloads() -> ApiError {
        let mut a = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many concurrent downloads from this client address; retry later",
        );
        a.retry_after = Some(5);
        a
    }
}
