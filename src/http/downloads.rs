//! Download sessions: `GET /api/v1/downloads` and `GET /api/v1/firmware/{id}/downloads`.

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::dto::SessionPage;
use super::error::ErrorBody;
use super::{ApiError, AppState, PageQuery};
use crate::catalog::SessionState;

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/downloads", web::get().to(list)).route(
        "/api/v1/firmware/{id}/downloads",
        web::get().to(for_firmware),
    );
}

/// Filters of the session list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct SessionQuery {
    /// Only sessions in state `active`.
    #[serde(default)]
    active: bool,
    /// Only sessions in this state.
    #[param(value_type = Option<String>)]
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
    let page = state
        .tracker
        .list(&page.to_request(), |s| wanted.is_none_or(|w| s.state == w))?;
    Ok(HttpResponse::Ok().json(SessionPage::from(page)))
}

/// Download sessions of one firmware, newest first.
#[utoipa::path(get, path = "/api/v1/firmware/{id}/downloads", tag = "downloads",
    params(SessionQuery, PageQuery),
    responses((status = 200, body = SessionPage), (status = 404, body = ErrorBody)))]
pub(super) async fn for_firmware(
    state: web::Data<AppState>,
    id: web::Path<String>,
    q: web::Query<SessionQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let fw = state.firmware.get(&id)?;
    let wanted = if q.active {
        Some(SessionState::Active)
    } else {
        q.state
    };
    let page = state.tracker.list(&page.to_request(), |s| {
        s.firmware_id == fw.id && wanted.is_none_or(|w| s.state == w)
    })?;
    Ok(HttpResponse::Ok().json(SessionPage::from(page)))
}
