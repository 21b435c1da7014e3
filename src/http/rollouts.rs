//! `/api/v1/rollouts`: staged rollouts across a fleet (contract §6).

use actix_web::http::Method;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::Access;
use super::error::ErrorBody;
use super::{ApiError, AppState, JsonBody, PageQuery, resource};
use crate::rollout::{DeviceState, RolloutRequest, RolloutStatus, RolloutView};

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/api/v1/rollouts",
        [
            (Method::POST, Access::OPERATE, web::to(create)),
            (Method::GET, Access::READ, web::to(list)),
        ],
    ))
    .service(resource(
        "/api/v1/rollouts/{id}",
        [(Method::GET, Access::READ, web::to(get))],
    ))
    .service(resource(
        "/api/v1/rollouts/{id}/devices",
        [(Method::GET, Access::READ, web::to(devices))],
    ))
    .service(resource(
        "/api/v1/rollouts/{id}/timeline",
        [(Method::GET, Access::READ, web::to(timeline))],
    ))
    .service(resource(
        "/api/v1/rollouts/{id}/events",
        [(Method::GET, Access::READ, web::to(events))],
    ))
    // Only the actions are this resource: another last segment is an unknown path (404).
    .service(resource(
        "/api/v1/rollouts/{id}/{action:start|pause|resume|cancel|approve}",
        [(Method::POST, Access::OPERATE, web::to(action))],
    ));
}

/// Create a rollout (status `draft`).
#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", request_body = RolloutRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and body within 24 h: the original answer")),
    responses(
        (status = 201, description = "Created (draft)", body = RolloutView),
        (status = 400, body = ErrorBody), (status = 404, description = "unknown firmware", body = ErrorBody),
        (status = 409, description = "firmware_corrupt", body = ErrorBody),
        (status = 410, description = "firmware_deleted", body = ErrorBody),
        (status = 422, description = "validation_failed (also: stages not strictly increasing to 100, two packages for one model, a disabled firmware), idempotency_key_reused", body = ErrorBody)))]
pub(super) async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    JsonBody(body): JsonBody<RolloutRequest>,
) -> Result<HttpResponse, ApiError> {
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(HttpResponse::Created().json(state.rollouts.create(body, key).await?))
}

/// Filters of the rollout list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct RolloutQuery {
    /// Rollouts in this state.
    status: Option<RolloutStatus>,
}

/// Rollouts, newest first.
#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts", params(RolloutQuery, PageQuery),
    responses((status = 200, description = "{items, next_cursor}"), (status = 400, body = ErrorBody)))]
pub(super) async fn list(
    state: web::Data<AppState>,
    q: web::Query<RolloutQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let p = state.rollouts.list(q.status, &page.to_request()).await?;
    Ok(
        HttpResponse::Ok()
            .json(serde_json::json!({"items": p.items, "next_cursor": p.next_cursor})),
    )
}

/// One rollout: per-stage and total device counts, current stage, ETA.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts",
    responses((status = 200, body = RolloutView), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.rollouts.get(&id).await?))
}

/// Filter of the device list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeviceQuery {
    /// Devices in this state (`pending`, `in_flight`, `ok`, `failed`, …); empty = all.
    state: Option<String>,
}

/// The rollout's devices in stage order, paged.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/devices", tag = "rollouts", params(DeviceQuery, PageQuery),
    responses((status = 200, description = "{items, next_cursor}"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn devices(
    state: web::Data<AppState>,
    id: web::Path<String>,
    q: web::Query<DeviceQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let filter = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            DeviceState::parse(s)
                .ok_or_else(|| ApiError::invalid_request(format!("unknown device state {s:?}")))?,
        ),
    };
    let p = state
        .rollouts
        .devices(&id, filter, &page.to_request())
        .await?;
    Ok(
        HttpResponse::Ok()
            .json(serde_json::json!({"items": p.items, "next_cursor": p.next_cursor})),
    )
}

/// Device counts by state over time (for charts).
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/timeline", tag = "rollouts",
    responses((status = 200, description = "{items: [{at, counts}]}"), (status = 404, body = ErrorBody)))]
pub(super) async fn timeline(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(serde_json::json!({"items": state.rollouts.timeline(&id).await?})))
}

/// `start`, `pause`, `resume`, `cancel` or `approve`.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts",
    params(("action" = String, Path, description = "start | pause | resume | cancel | approve")),
    responses((status = 200, body = RolloutView), (status = 404, body = ErrorBody),
        (status = 409, description = "invalid_transition, rollout_conflict", body = ErrorBody),
        (status = 422, description = "validation_failed (start: the target holds no gateway)", body = ErrorBody)))]
pub(super) async fn action(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, action) = path.into_inner();
    let Some(action) = crate::rollout::machine::Action::parse(&action) else {
        return Err(ApiError::not_found("no such resource"));
    };
    Ok(HttpResponse::Ok().json(state.rollouts.action(&id, action).await?))
}

impl super::sse::Tracked for RolloutView {
    const EVENT: &'static str = "rollout";
    fn is(&self, id: &str) -> bool {
        self.rollout.id == id
    }
    /// Completed or canceled with nothing in flight.
    fn done(&self) -> bool {
        matches!(
            self.rollout.status(),
            RolloutStatus::Completed | RolloutStatus::Canceled
        ) && !self.counts.contains_key("in_flight")
    }
    fn data(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Server-Sent Events: the rollout now, then each change, until it is completed or canceled
/// with nothing in flight.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/events", tag = "rollouts",
    responses((status = 200, description = "text/event-stream of rollout snapshots", content_type = "text/event-stream"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn events(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let rx = state.rollouts.subscribe();
    let first = state.rollouts.get(&id).await?;
    Ok(super::sse::stream(first, id, rx, state.stopping.clone()))
}
