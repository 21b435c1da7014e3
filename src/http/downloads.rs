//! Download sessions: `GET /api/v1/downloads` and `GET /api/v1/firmware/{id}/downloads`.

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::Access;
use super::dto::SessionPage;
use super::error::ErrorBody;
use super::{ApiError, AppState, PageQuery, resource};
use crate::store::SessionState;

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/api/v1/downloads",
        [(Method::GET, Access::READ, web::to(list))],
    ))
    .service(resource(
        "/api/v1/firmware/{id}/downloads",
        [(Method::GET, Access::READ, web::to(for_firmware))],
    ));
}

/// Filters of the session list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SessionQuery {
    /// Only sessions in state `active` (overrides `state`).
    #[serde(default)]
    active: bool,
    /// Only sessions in this state.
    state: Option<SessionState>,
}

/// Download sessions, newest first.
#[utoipa::path(get, path = "/api/v1/downloads", tag = "downloads", params(SessionQuery, PageQuery),
    responses((status = 200, body = SessionPage), (status = 400, body = ErrorBody)))]
pub(super) async fn list(
    state: web::Data<AppState>,
    q: web::Query<SessionQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let wanted = if q.active {
        Some(SessionState::Active)
    } else {
        q.state
    };
    let query = crate::store::SessionQuery {
        state: wanted,
        ..Default::default()
    };
    let page = state.tracker.list(&query, &page.to_request()).await?;
    Ok(HttpResponse::Ok().json(SessionPage::from(page)))
}

/// Download sessions of one firmware, newest first.
#[utoipa::path(get, path = "/api/v1/firmware/{id}/downloads", tag = "downloads",
    params(SessionQuery, PageQuery),
    responses((status = 200, body = SessionPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn for_firmware(
    state: web::Data<AppState>,
    id: web::Path<String>,
    q: web::Query<SessionQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let fw = state.firmware.get(&id).await?;
    let wanted = if q.active {
        Some(SessionState::Active)
    } else {
        q.state
    };
    let query = crate::store::SessionQuery {
        state: wanted,
        firmware_id: Some(fw.id),
        task_device: None,
    };
    let page = state.tracker.list(&query, &page.to_request()).await?;
    Ok(HttpResponse::Ok().json(SessionPage::from(page)))
}
