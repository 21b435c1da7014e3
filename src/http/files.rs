//! `GET|HEAD /files/{firmware_id}/{file_name}`: package bytes with full RFC 9110 range and
//! conditional support (contract §4).

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};

use super::Access;
use super::error::ErrorBody;
use super::{ApiError, AppState, resource};
use crate::download::range::Conditions;
use crate::download::{DownloadRequest, Served, ServedKind};

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/files/{id}/{file_name}",
        [
            (Method::GET, Access::READ, web::to(file)),
            (Method::HEAD, Access::READ, web::to(file)),
        ],
    ));
}

fn header_str(req: &HttpRequest, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A download request for `firmware_id`/`file_name` from the request's method and headers.
pub(super) fn download_request<'a>(
    state: &AppState,
    req: &'a HttpRequest,
    firmware_id: &'a str,
    file_name: &'a str,
    task: Option<(String, String)>,
) -> DownloadRequest<'a> {
    DownloadRequest {
        firmware_id,
        file_name,
        is_get: req.method() == Method::GET,
        conditions: Conditions {
            range: header_str(req, header::RANGE),
            if_range: header_str(req, header::IF_RANGE),
            if_none_match: header_str(req, header::IF_NONE_MATCH),
            if_modified_since: header_str(req, header::IF_MODIFIED_SINCE),
        },
        client: state.client_info(req),
        task,
    }
}

/// Download a package (GET and HEAD; Range, If-Range, If-None-Match).
#[utoipa::path(get, path = "/files/{id}/{file_name}", tag = "downloads",
    params(("id" = String, Path, description = "Firmware id"), ("file_name" = String, Path, description = "Package file name")),
    responses(
        (status = 200, description = "The whole package", content_type = "application/octet-stream"),
        (status = 206, description = "One range, or multipart/byteranges"),
        (status = 304, description = "If-None-Match matched"),
        (status = 404, body = ErrorBody), (status = 410, description = "firmware_deleted", body = ErrorBody),
        (status = 416, description = "range_not_satisfiable (Content-Range: bytes */LEN)", body = ErrorBody),
        (status = 502, description = "firmware_corrupt, blob_missing, blob_store_error", body = ErrorBody)))]
pub(super) async fn file(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, file_name) = path.into_inner();
    let served = state
        .downloads
        .serve(download_request(&state, &req, &id, &file_name, None))
        .await?;
    respond(&req, served)
}

/// Builds the HTTP answer for a served download (shared by every download URL). The client's
/// download slot (taken by the access gate) lives as long as the body.
pub(super) fn respond(req: &HttpRequest, served: Served) -> Result<HttpResponse, ApiError> {
    let len = served.firmware.file_size;
    let status = match &served.kind {
        ServedKind::Full => StatusCode::OK,
        ServedKind::Single(_) | ServedKind::Multi { .. } => StatusCode::PARTIAL_CONTENT,
        ServedKind::NotModified => StatusCode::NOT_MODIFIED,
        ServedKind::Unsatisfiable => return Err(ApiError::range_not_satisfiable(len)),
    };
    let mut resp = HttpResponse::build(status);
    resp.insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((header::ETAG, served.etag.as_str()))
        .insert_header((
            header::LAST_MODIFIED,
            httpdate::fmt_http_date(served.last_modified.into()),
        ))
        .insert_header((header::CACHE_CONTROL, "no-cache"));
    let content_type = match &served.kind {
        ServedKind::Multi { boundary } => format!("multipart/byteranges; boundary={boundary}"),
        _ => "application/octet-stream".to_string(),
    };
    if let ServedKind::Single(r) = &served.kind {
        resp.insert_header((
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{len}", r.start, r.end - 1),
        ));
    }
    if status == StatusCode::NOT_MODIFIED {
        return Ok(resp.finish());
    }
    resp.insert_header((
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    ));
    let body = served
        .body
        .unwrap_or_else(|| Box::pin(futures::stream::empty()));
    let slot = req.extensions_mut().remove::<super::limits::DownloadSlot>();
    let body: crate::blobs::ByteStream = match slot {
        Some(slot) => Box::pin(futures::StreamExt::map(body, move |chunk| {
            let _held = &slot;
            chunk
        })),
        None => body,
    };
    Ok(resp.body(SizedStream::new(served.content_length, body)))
}
