//! Turning an upload request into an upload: the raw-body form (`application/octet-stream` or
//! no Content-Type, fields in the query) and the `multipart/form-data` form (part `file` plus
//! text parts before or after it). Hands the bytes to [`crate::upload`] as they arrive.

use actix_multipart::Multipart;
use actix_web::http::header;
use actix_web::{HttpRequest, web};
use futures::{StreamExt, TryStreamExt};

use super::{ApiError, AppState};
use crate::upload::{UploadError, UploadMeta, UploadOutcome, UploadSession};

/// Largest text part accepted in a multipart upload.
const MAX_TEXT_PART: usize = 64 << 10;
/// Multipart framing allowance when comparing Content-Length with the size limit.
const MULTIPART_OVERHEAD: u64 = 1 << 20;

/// Query parameters of an upload (the raw-body form's fields; defaults for multipart).
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Package file name (required for a raw body): 1–255 bytes, no `/`, `\`, `..`, control
    /// characters or whitespace at either end.
    pub file_name: Option<String>,
    /// Model, at most 128 bytes without control characters (blank: parsed from the file name).
    pub model: Option<String>,
    /// Version (blank: parsed from the file name).
    pub product_version: Option<String>,
    /// Expected MD5, 32 hex digits in any case (blank: not checked).
    pub md5: Option<String>,
    /// Expected SHA-256, 64 hex digits in any case (blank: not checked).
    pub sha256: Option<String>,
    /// Release note, at most 16 KiB.
    pub release_note: Option<String>,
}

impl From<UploadQuery> for UploadMeta {
    fn from(q: UploadQuery) -> Self {
        UploadMeta {
            file_name: q.file_name,
            model: q.model,
            product_version: q.product_version,
            md5: q.md5,
            sha256: q.sha256,
            release_note: q.release_note,
        }
    }
}

fn declared_length(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Receives an upload in either form and commits it.
pub async fn receive(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    query: UploadQuery,
) -> Result<UploadOutcome, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase());
    match content_type.as_deref() {
        None => receive_raw(state, req, payload, query.into()).await,
        Some(ct) if ct.starts_with("application/octet-stream") => {
            receive_raw(state, req, payload, query.into()).await
        }
        Some(ct) if ct.starts_with("multipart/form-data") => {
            receive_multipart(state, req, payload, query.into()).await
        }
        Some(ct) => Err(ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("uploads are multipart/form-data or application/octet-stream, not {ct}"),
        )),
    }
}

async fn receive_raw(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    meta: UploadMeta,
) -> Result<UploadOutcome, ApiError> {
    if meta.file_name.is_none() {
        return Err(ApiError::invalid_request(
            "a raw upload needs ?file_name=… (or use multipart/form-data with a file part)",
        ));
    }
    // Everything knowable before the body is checked before reading it.
    meta.resolve()?;
    let declared = declared_length(req);
    let chunked = req
        .headers()
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked && meta.md5.is_none() && meta.sha256.is_none() {
        // actix-http ends a chunked body cleanly when the connection drops, so a truncated
        // upload would look complete: without a length, a checksum must prove the end.
        return Err(ApiError::new(
            actix_web::http::StatusCode::LENGTH_REQUIRED,
            "invalid_request",
            "a raw upload needs Content-Length, or md5/sha256 to verify a chunked body (or use multipart/form-data)",
        ));
    }
    let admission = state.uploads.admit(declared, 0)?;
    let mut session = state.uploads.begin(admission).await?;
    if let Err(e) = session.write_stream(payload, declared).await {
        session.abort(&e).await;
        return Err(e.into());
    }
    Ok(session.commit(&meta).await?)
}

async fn read_text(field: &mut actix_multipart::Field) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid_request(format!("multipart: {e}")))?;
        if buf.len() + chunk.len() > MAX_TEXT_PART {
            return Err(ApiError::invalid_request(
                "a text part is longer than 64 KiB",
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| ApiError::invalid_request("a text part is not UTF-8"))
}

async fn receive_multipart(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    mut meta: UploadMeta,
) -> Result<UploadOutcome, ApiError> {
    let mut parts = Multipart::new(req.headers(), payload);
    let mut session: Option<UploadSession> = None;
    let fail = |e: UploadError| -> ApiError { e.into() };
    loop {
        let next = parts.try_next().await;
        let mut field = match next {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                let err = UploadError::InvalidRequest(format!("multipart: {e}"));
                if let Some(s) = session.take() {
                    s.abort(&err).await;
                }
                return Err(fail(err));
            }
        };
        let name = field.name().unwrap_or("").to_string();
        let result = match name.as_str() {
            "file" if session.is_some() => {
                Err(ApiError::invalid_request("more than one file part"))
            }
            "file" => {
                let file_name = field
                    .content_disposition()
                    .and_then(|cd| cd.get_filename())
                    .map(str::to_string);
                if file_name.as_deref().is_none_or(str::is_empty) && meta.file_name.is_none() {
                    Err(ApiError::invalid_request("the file part has no filename"))
                } else {
                    if let Some(n) = file_name.filter(|n| !n.is_empty()) {
                        meta.file_name = Some(n);
                    }
                    start_file(state, req, &meta, &mut field, &mut session).await
                }
            }
            "model" | "product_version" | "md5" | "sha256" | "release_note" | "file_name" => {
                match read_text(&mut field).await {
                    Ok(text) => {
                        let slot = match name.as_str() {
                            "model" => &mut meta.model,
                            "product_version" => &mut meta.product_version,
                            "md5" => &mut meta.md5,
                            "sha256" => &mut meta.sha256,
                            "release_note" => &mut meta.release_note,
                            _ => &mut meta.file_name,
                        };
                        *slot = Some(text);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            // Unknown parts are drained and ignored.
            _ => read_text(&mut field).await.map(drop),
        };
        if let Err(e) = result {
            if let Some(s) = session.take() {
                s.abort(&UploadError::InvalidRequest(e.to_string())).await;
            }
            return Err(e);
        }
    }
    let Some(session) = session else {
        return Err(ApiError::invalid_request(
            "the multipart body has no file part",
        ));
    };
    Ok(session.commit(&meta).await?)
}

async fn start_file(
    state: &AppState,
    req: &HttpRequest,
    meta: &UploadMeta,
    field: &mut actix_multipart::Field,
    session: &mut Option<UploadSession>,
) -> Result<(), ApiError> {
    if let Some(name) = &meta.file_name {
        crate::domain::FileName::parse(name)
            .map_err(|e| ApiError::invalid_request(e.to_string()))?;
    }
    let admission = state
        .uploads
        .admit(declared_length(req), MULTIPART_OVERHEAD)?;
    let mut s = state.uploads.begin(admission).await?;
    let written = s.write_stream(field.map_err(|e| e.to_string()), None).await;
    *session = Some(s);
    written.map_err(ApiError::from)
}
