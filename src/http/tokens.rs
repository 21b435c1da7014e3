//! `/api/v1/tokens` (API tokens, admin) and `/api/v1/audit` (the audit log, admin).

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::Access;
use super::access::Caller;
use super::error::ErrorBody;
use super::{ApiError, AppState, JsonBody, PageQuery, resource};
use crate::auth::{NewToken, TokenRecord};

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/api/v1/tokens",
        [
            (Method::POST, Access::ADMIN, web::to(create)),
            (Method::GET, Access::ADMIN, web::to(list)),
        ],
    ))
    .service(resource(
        "/api/v1/tokens/{id}",
        [
            (Method::GET, Access::ADMIN, web::to(get)),
            (Method::DELETE, Access::ADMIN, web::to(revoke)),
        ],
    ))
    .service(resource(
        "/api/v1/audit",
        [(Method::GET, Access::ADMIN, web::to(audit))],
    ));
}

/// A new token: its record and, this once, the token itself.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct CreatedToken {
    #[serde(flatten)]
    record: TokenRecord,
    /// The token (send as `Authorization: Bearer <token>`). Shown only in this answer.
    token: String,
}

/// Create a token (admin). The answer is the only place the token is ever shown.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "auth", request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, description = "validation_failed", body = ErrorBody)))]
pub(super) async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewToken>,
) -> Result<HttpResponse, ApiError> {
    let (record, token) = state.tokens.create(body, Some(&caller.0)).await?;
    Ok(HttpResponse::Created().json(CreatedToken { record, token }))
}

/// Tokens, newest first (never the tokens themselves).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "auth", params(PageQuery),
    responses((status = 200, description = "{items: [TokenRecord], next_cursor}"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn list(
    state: web::Data<AppState>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let p = state.tokens.list(&page.to_request()).await?;
    Ok(
        HttpResponse::Ok()
            .json(serde_json::json!({"items": p.items, "next_cursor": p.next_cursor})),
    )
}

/// One token.
#[utoipa::path(get, path = "/api/v1/tokens/{id}", tag = "auth",
    responses((status = 200, body = TokenRecord), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.tokens.get(&id)?))
}

/// Revoke a token: it is refused from now on (401). Idempotent.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "auth",
    responses((status = 200, body = TokenRecord), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.tokens.revoke(&id).await?))
}

/// Filter of the audit log.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditQuery {
    /// Entries at or after this time (RFC 3339).
    since: Option<chrono::DateTime<chrono::Utc>>,
}

/// The audit log, newest first: state-changing API calls and refused tokens.
#[utoipa::path(get, path = "/api/v1/audit", tag = "auth", params(AuditQuery, PageQuery),
    responses((status = 200, description = "{items: [AuditEntry], next_cursor}"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn audit(
    state: web::Data<AppState>,
    q: web::Query<AuditQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let p = state.audit.list(&page.to_request(), q.since).await?;
    Ok(
        HttpResponse::Ok()
            .json(serde_json::json!({"items": p.items, "next_cursor": p.next_cursor})),
    )
}
