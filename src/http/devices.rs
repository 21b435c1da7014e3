//! `/api/v1/devices`: the registry of docks and aircraft (contract §5).

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::Access;
use super::error::ErrorBody;
use super::{ApiError, AppState, JsonBody, PageQuery, resource};
use crate::devices::{DeviceError, DeviceFilter, DeviceRecord};

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/api/v1/devices",
        [(Method::GET, Access::READ, web::to(list))],
    ))
    .service(resource(
        "/api/v1/devices/{sn}",
        [
            (Method::GET, Access::READ, web::to(get)),
            (Method::PUT, Access::OPERATE, web::to(put)),
            (Method::DELETE, Access::ADMIN, web::to(delete)),
        ],
    ));
}

impl From<DeviceError> for ApiError {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::NotFound => ApiError::not_found("device not found"),
            DeviceError::Invalid(m) => ApiError::invalid_request(m),
            DeviceError::Catalog(c) => c.into(),
        }
    }
}

/// Filters of the device list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeviceQuery {
    /// A gateway and its devices.
    gateway_sn: Option<String>,
    /// Firmware model (case-insensitive).
    model: Option<String>,
    /// Running version (compared numerically).
    version: Option<String>,
    /// Seen within this many seconds (any u64; a huge window means "ever").
    seen_within_s: Option<u64>,
    /// Serial numbers containing this text (case-insensitive).
    sn_contains: Option<String>,
    /// Only gateways (docks, remote controllers) or only their sub-devices (aircraft).
    #[param(inline)]
    kind: Option<DeviceKind>,
}

/// A device's place in its gateway.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum DeviceKind {
    /// A gateway: a dock or a remote controller.
    Gateway,
    /// A gateway's sub-device: its aircraft.
    SubDevice,
}

/// A page of devices.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct DevicePage {
    /// Devices, newest first.
    items: Vec<DeviceRecord>,
    /// Cursor of the next page, null on the last.
    next_cursor: Option<String>,
}

/// Devices, newest first.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(DeviceQuery, PageQuery),
    responses((status = 200, body = DevicePage), (status = 400, body = ErrorBody)))]
pub(super) async fn list(
    state: web::Data<AppState>,
    q: web::Query<DeviceQuery>,
    page: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let filter = DeviceFilter {
        gateway_sn: q.gateway_sn,
        model: q.model,
        version: q.version,
        seen_within_s: q.seen_within_s,
        sn_contains: q.sn_contains.filter(|t| !t.is_empty()),
        gateways: q.kind.map(|k| matches!(k, DeviceKind::Gateway)),
    };
    let p = state.devices.list(&filter, &page.to_request())?;
    Ok(HttpResponse::Ok().json(DevicePage {
        items: p.items,
        next_cursor: p.next_cursor,
    }))
}

/// One device.
#[utoipa::path(get, path = "/api/v1/devices/{sn}", tag = "devices",
    responses((status = 200, body = DeviceRecord), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    state: web::Data<AppState>,
    sn: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.devices.get(&sn)?))
}

/// What an operator declares about a device.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct DeviceDeclaration {
    /// Firmware model.
    model: Option<String>,
    /// The dock it belongs to (aircraft).
    gateway_sn: Option<String>,
}

/// Declare or correct a device's model and gateway. A blank model or gateway changes nothing.
#[utoipa::path(put, path = "/api/v1/devices/{sn}", tag = "devices", request_body = DeviceDeclaration,
    params(("sn" = String, Path, description = "Serial number: 1–128 bytes, no `/`, `+` or `#` (400 `invalid_request` otherwise)")),
    responses((status = 200, body = DeviceRecord), (status = 400, description = "invalid_request: an invalid serial number or a malformed body", body = ErrorBody)))]
pub(super) async fn put(
    state: web::Data<AppState>,
    sn: web::Path<String>,
    JsonBody(b): JsonBody<DeviceDeclaration>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.devices.put(&sn, b.model, b.gateway_sn).await?))
}

/// Forget a device.
#[utoipa::path(delete, path = "/api/v1/devices/{sn}", tag = "devices",
    responses((status = 200, body = DeviceRecord), (status = 404, body = ErrorBody)))]
pub(super) async fn delete(
    state: web::Data<AppState>,
    sn: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.devices.delete(&sn).await?))
}
