//! `/api/v1/ota`: create OTA tasks, read them, follow them live (SSE); `/dl/…`: each device's
//! own download URL.

use actix_web::http::Method;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::Access;
use super::error::ErrorBody;
use super::{ApiError, AppState, JsonBody, PageQuery, resource};
use crate::ota::{Created, OtaRequest, OtaTask, TaskStatus};

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/api/v1/ota",
        [
            (Method::POST, Access::OPERATE, web::to(create)),
            (Method::GET, Access::READ, web::to(list)),
        ],
    ))
    .service(resource(
        "/api/v1/ota/{id}",
        [(Method::GET, Access::READ, web::to(get))],
    ))
    .service(resource(
        "/api/v1/ota/{id}/events",
        [(Method::GET, Access::READ, web::to(events))],
    ))
    .configure(download_routes);
}

/// The per-device `/dl/` URLs (also served by `--download-listen`).
pub(super) fn download_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        crate::download::signing::UNSIGNED_ROUTE,
        [
            (Method::GET, Access::READ, web::to(download)),
            (Method::HEAD, Access::READ, web::to(download)),
        ],
    ))
    .service(resource(
        crate::download::signing::SIGNED_ROUTE,
        [
            (Method::GET, Access::Open, web::to(download_signed)),
            (Method::HEAD, Access::Open, web::to(download_signed)),
        ],
    ));
}

/// Task `id` with each device's download session.
async fn with_sessions(state: &AppState, id: &str) -> Result<OtaTask, ApiError> {
    let mut task = state.ota.get(id).await?;
    for d in &mut task.devices {
        let query = crate::store::SessionQuery {
            task_device: Some((task.id.clone(), d.sn.clone())),
            ..Default::default()
        };
        let page = state
            .tracker
            .list(&query, &crate::store::PageRequest::default())
            .await?;
        d.download_session = page
            .items
            .into_iter()
            .next()
            .and_then(|s| serde_json::to_value(s).ok());
    }
    Ok(task)
}

/// Create an OTA task: one `ota_create` to the gateway for 1–2 devices.
#[utoipa::path(post, path = "/api/v1/ota", tag = "ota", request_body = OtaRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and body within 24 h: the original answer")),
    responses(
        (status = 202, description = "Stored and published", body = OtaTask),
        (status = 200, description = "dry_run: what would be sent and why"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "gateway_busy, device_busy, already_up_to_date, preflight_failed, downgrade_refused, firmware_corrupt", body = ErrorBody),
        (status = 410, description = "firmware_deleted", body = ErrorBody),
        (status = 422, description = "validation_failed, model_mismatch, idempotency_key_reused", body = ErrorBody),
        (status = 503, description = "broker_unavailable", body = ErrorBody)))]
pub(super) async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    JsonBody(body): JsonBody<OtaRequest>,
) -> Result<HttpResponse, ApiError> {
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(match state.ota.create(body, key).await? {
        Created::Task(t) => HttpResponse::Accepted().json(t),
        Created::DryRun(v) => HttpResponse::Ok().json(v),
        // The first answer again, with its status.
        Created::Replay(v) => HttpResponse::Accepted().json(v),
    })
}

/// Filters of the task list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct TaskQuery {
    /// Tasks of this gateway.
    gateway_sn: Option<String>,
    /// Tasks in this status.
    status: Option<TaskStatus>,
}

/// OTA tasks, newest first.
#[utoipa::path(get, path = "/api/v1/ota", tag = "ota", params(TaskQuery, PageQuery),
    responses((status = 200, description = "{items, next_cursor}"), (status = 400, body = ErrorBody)))]
pub(super) async fn list(
    state: web::Data<AppState>,
    q: web::Query<TaskQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = crate::ota::store::TaskQuery {
        gateway_sn: q.gateway_sn.clone(),
        status: q.status,
    };
    let p = state.ota.list(&query, &page.to_request()).await?;
    Ok(
        HttpResponse::Ok()
            .json(serde_json::json!({"items": p.items, "next_cursor": p.next_cursor})),
    )
}

/// One task, with each device's download session.
#[utoipa::path(get, path = "/api/v1/ota/{id}", tag = "ota",
    responses((status = 200, body = OtaTask), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(with_sessions(&state, &id).await?))
}

impl super::sse::Tracked for OtaTask {
    const EVENT: &'static str = "task";
    fn is(&self, id: &str) -> bool {
        self.id == id
    }
    fn done(&self) -> bool {
        self.settled()
    }
    fn data(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Server-Sent Events: the task now, then each change, until it is final and every device's
/// outcome is settled.
#[utoipa::path(get, path = "/api/v1/ota/{id}/events", tag = "ota",
    responses((status = 200, description = "text/event-stream of task snapshots", content_type = "text/event-stream"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn events(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let rx = state.ota.subscribe();
    let first = with_sessions(&state, &id).await?;
    Ok(super::sse::stream(first, id, rx, state.stopping.clone()))
}

/// A device's own download URL: the same bytes as `/files/`, counted as this device's session.
#[utoipa::path(get, path = "/dl/{task_id}/{sn}/{file_name}", tag = "downloads",
    params(("task_id" = String, Path, description = "OTA task"), ("sn" = String, Path, description = "Device"), ("file_name" = String, Path, description = "Package file name")),
    responses((status = 200, description = "The package"), (status = 206, description = "Ranges"),
        (status = 404, body = ErrorBody), (status = 416, body = ErrorBody)))]
pub(super) async fn download(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (task_id, sn, file_name) = path.into_inner();
    serve_device(&state, &req, task_id, sn, file_name, None).await
}

/// The signed form of a device's URL, as `ota_create` carries it: the signature binds task,
/// device, firmware and expiry (403 `signature_invalid` / `url_expired` otherwise).
#[utoipa::path(get, path = "/dl/{task_id}/{sn}/{signature}/{file_name}", tag = "downloads", security(()),
    params(("task_id" = String, Path, description = "OTA task"), ("sn" = String, Path, description = "Device"),
        ("signature" = String, Path, description = "`{expiry}-{hmac}` from the file_url"), ("file_name" = String, Path, description = "Package file name")),
    responses((status = 200, description = "The package"), (status = 206, description = "Ranges"),
        (status = 403, description = "signature_invalid, url_expired", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 416, body = ErrorBody),
        (status = 429, description = "rate_limited: too many concurrent downloads from this client address (Retry-After)", body = ErrorBody)))]
pub(super) async fn download_signed(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (task_id, sn, signature, file_name) = path.into_inner();
    serve_device(&state, &req, task_id, sn, file_name, Some(signature)).await
}

async fn serve_device(
    state: &AppState,
    req: &HttpRequest,
    task_id: String,
    sn: String,
    file_name: String,
    signature: Option<String>,
) -> Result<HttpResponse, ApiError> {
    let (firmware_id, name) = state
        .ota
        .download_target(&task_id, &sn)
        .await
        .ok_or_else(|| ApiError::not_found("no such task download"))?;
    if let Some(sig) = signature {
        state
            .signer
            .verify(&task_id, &sn, &firmware_id, &sig, state.clock.now())?;
    }
    if name != file_name {
        return Err(ApiError::not_found("no such file"));
    }
    let task = Some((task_id, sn));
    let served = state
        .downloads
        .serve(super::files::download_request(
            state,
            req,
            &firmware_id,
            &file_name,
            task,
        ))
        .await?;
    super::files::respond(req, served)
}
