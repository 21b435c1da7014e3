//! `/api/v1/firmware`: upload, list, get, disable/enable, delete, verify (contract §3).

use actix_web::http::Method;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::Access;
use super::dto::{FirmwareDto, FirmwarePage};
use super::error::ErrorBody;
use super::upload_body::{UploadQuery, receive};
use super::{ApiError, AppState, PageQuery, resource};
use crate::firmware::FirmwareFilter;
use crate::store::FirmwareStatus;
use crate::upload::UploadOutcome;

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/api/v1/firmware",
        [
            (Method::POST, Access::UPLOAD, web::to(upload)),
            (Method::PUT, Access::UPLOAD, web::to(upload)),
            (Method::GET, Access::READ, web::to(list)),
        ],
    ))
    .service(resource(
        "/api/v1/firmware/{id}",
        [
            (Method::GET, Access::READ, web::to(get)),
            (Method::DELETE, Access::ADMIN, web::to(delete)),
        ],
    ))
    .service(resource(
        "/api/v1/firmware/{id}/disable",
        [(Method::POST, Access::UPLOAD, web::to(disable))],
    ))
    .service(resource(
        "/api/v1/firmware/{id}/enable",
        [(Method::POST, Access::UPLOAD, web::to(enable))],
    ))
    .service(resource(
        "/api/v1/firmware/{id}/verify",
        [(Method::POST, Access::UPLOAD, web::to(verify))],
    ));
}

fn dto(state: &AppState, r: crate::store::FirmwareRecord) -> FirmwareDto {
    FirmwareDto::from_record(&state.public_url, r)
}

/// Upload a firmware package (`POST` and `PUT` are the same).
#[utoipa::path(method(post, put), path = "/api/v1/firmware", tag = "firmware",
    params(UploadQuery),
    request_body(description = "The raw package (at least one byte) as application/octet-stream, with `file_name` and the other fields in the query. Also accepted: multipart/form-data with part `file` and optional text parts model, product_version, md5, sha256, release_note (the query then gives defaults).", content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = FirmwareDto),
        (status = 200, description = "Identical package already stored", body = FirmwareDto),
        (status = 400, description = "invalid_request, invalid_version", body = ErrorBody),
        (status = 409, description = "version_conflict", body = ErrorBody),
        (status = 411, description = "chunked raw body without md5/sha256", body = ErrorBody),
        (status = 413, description = "too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 422, description = "checksum_mismatch, version_required, validation_failed", body = ErrorBody),
        (status = 429, description = "too_many_uploads", body = ErrorBody),
        (status = 502, description = "blob_store_error", body = ErrorBody),
        (status = 507, description = "insufficient_storage", body = ErrorBody),
    ))]
pub(super) async fn upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<UploadQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    Ok(
        match receive(&state, &req, payload, query.into_inner()).await? {
            UploadOutcome::Created(r) => HttpResponse::Created().json(dto(&state, r)),
            UploadOutcome::Existing(r) => HttpResponse::Ok().json(dto(&state, r)),
        },
    )
}

/// Filters of the firmware list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Model (case-insensitive).
    model: Option<String>,
    /// Version (compared numerically); one that is not a version is refused (400
    /// `invalid_version`).
    product_version: Option<String>,
    /// ready, corrupt, disabled or deleted.
    status: Option<FirmwareStatus>,
}

/// List firmware, newest first.
#[utoipa::path(get, path = "/api/v1/firmware", tag = "firmware", params(ListQuery, PageQuery),
    responses((status = 200, body = FirmwarePage),
        (status = 400, description = "invalid_version, invalid_request (a malformed query or an invalid cursor)", body = ErrorBody)))]
pub(super) async fn list(
    state: web::Data<AppState>,
    filter: web::Query<ListQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let f = filter.into_inner();
    let filter = FirmwareFilter {
        model: f.model,
        product_version: f.product_version,
        status: f.status,
    };
    let page = state.firmware.list(&filter, &page.to_request()).await?;
    Ok(HttpResponse::Ok().json(FirmwarePage::from_page(&state.public_url, page)))
}

/// One firmware record.
#[utoipa::path(get, path = "/api/v1/firmware/{id}", tag = "firmware",
    responses((status = 200, body = FirmwareDto), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let r = state.firmware.get(&id).await?;
    Ok(HttpResponse::Ok().json(dto(&state, r)))
}

/// `?force=true` overrides the firmware_in_use guard.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ForceQuery {
    /// Override the firmware_in_use guard.
    #[serde(default)]
    force: bool,
}

/// Delete a firmware: remove its blob, keep the record as a tombstone.
#[utoipa::path(delete, path = "/api/v1/firmware/{id}", tag = "firmware", params(ForceQuery),
    responses((status = 200, body = FirmwareDto), (status = 404, body = ErrorBody),
        (status = 409, description = "firmware_in_use", body = ErrorBody),
        (status = 410, description = "firmware_deleted", body = ErrorBody)))]
pub(super) async fn delete(
    state: web::Data<AppState>,
    id: web::Path<String>,
    q: web::Query<ForceQuery>,
) -> Result<HttpResponse, ApiError> {
    let r = state.firmware.delete(&id, q.force).await?;
    Ok(HttpResponse::Ok().json(dto(&state, r)))
}

/// Disable: no new tasks; downloads continue.
#[utoipa::path(post, path = "/api/v1/firmware/{id}/disable", tag = "firmware", params(ForceQuery),
    responses((status = 200, body = FirmwareDto), (status = 404, body = ErrorBody),
        (status = 409, description = "firmware_in_use, firmware_corrupt", body = ErrorBody),
        (status = 410, description = "firmware_deleted", body = ErrorBody)))]
pub(super) async fn disable(
    state: web::Data<AppState>,
    id: web::Path<String>,
    q: web::Query<ForceQuery>,
) -> Result<HttpResponse, ApiError> {
    let r = state.firmware.disable(&id, q.force).await?;
    Ok(HttpResponse::Ok().json(dto(&state, r)))
}

/// Enable a disabled firmware.
#[utoipa::path(post, path = "/api/v1/firmware/{id}/enable", tag = "firmware",
    responses((status = 200, body = FirmwareDto), (status = 404, body = ErrorBody),
        (status = 409, description = "firmware_corrupt", body = ErrorBody),
        (status = 410, description = "firmware_deleted", body = ErrorBody)))]
pub(super) async fn enable(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let r = state.firmware.enable(&id).await?;
    Ok(HttpResponse::Ok().json(dto(&state, r)))
}

/// Re-hash the stored blob in the background; a mismatch marks the firmware corrupt.
#[utoipa::path(post, path = "/api/v1/firmware/{id}/verify", tag = "firmware",
    responses((status = 202, description = "Verification started", body = FirmwareDto),
        (status = 404, body = ErrorBody), (status = 410, description = "firmware_deleted", body = ErrorBody)))]
pub(super) async fn verify(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let r = state.firmware.start_verify(&id).await?;
    Ok(HttpResponse::Accepted().json(dto(&state, r)))
}
