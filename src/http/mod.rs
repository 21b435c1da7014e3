//! The HTTP adapter: routes, shared state, request-to-domain conversion and the JSON error
//! shape for everything, framework errors included. Handlers are thin: extract, call one
//! service, map the result.

pub mod access;
pub mod conn;
mod devices;
mod downloads;
mod dto;
pub mod error;
mod files;
mod firmware;
pub mod limits;
pub mod openapi;
mod ops;
mod ota;
mod rollouts;
mod sse;
pub mod starting;
mod tokens;
mod ui;
mod upload_body;

use std::net::IpAddr;
use std::sync::Arc;

use actix_web::body::EitherBody;
use actix_web::dev::{Payload, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, Route, web};
use url::Url;

use crate::blobs::{BlobStore, ReadBudget};
use crate::config::Settings;
use crate::download::DownloadService;
use crate::firmware::FirmwareService;
use crate::metrics::Metrics;
use crate::progress::{ClientInfo, DownloadTracker};
use crate::upload::UploadService;
pub use access::Access;
pub use error::ApiError;
pub use limits::ApiLimiter;

/// Everything handlers need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// Base of every file_url (no trailing slash).
    pub public_url: Arc<str>,
    /// The catalog.
    pub catalog: Arc<dyn crate::store::Durability>,
    /// The blob store.
    pub blobs: BlobStore,
    /// Uploads.
    pub uploads: UploadService,
    /// Firmware lifecycle.
    pub firmware: FirmwareService,
    /// Downloads.
    pub downloads: DownloadService,
    /// Download sessions.
    pub tracker: DownloadTracker,
    /// Read buffer budget.
    pub budget: ReadBudget,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Device registry.
    pub devices: crate::devices::DeviceRegistry,
    /// The MQTT session.
    pub mqtt: crate::mqtt::MqttHandle,
    /// OTA tasks.
    pub ota: crate::ota::OtaService,
    /// Staged rollouts.
    pub rollouts: crate::rollout::RolloutService,
    /// Cancelled when shutdown begins: long-lived streams (SSE) end then instead of holding
    /// the drain for its whole grace period.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Signs and checks the per-device `/dl/` URLs.
    pub signer: crate::download::signing::UrlSigner,
    /// Per-caller API rate limit.
    pub api_limiter: limits::ApiLimiter,
    /// Concurrent downloads per client address.
    pub download_slots: limits::DownloadSlots,
    /// API tokens.
    pub tokens: crate::auth::TokenService,
    /// The audit log.
    pub audit: crate::audit::AuditLog,
    /// The clock expiries and timeouts are read from (tests advance it).
    pub clock: crate::domain::Clock,
    /// This replica's membership of the deployment.
    pub cluster: crate::cluster::Cluster,
}

impl AppState {
    /// The public base URL as text without a trailing slash.
    pub fn base_url(url: &Url) -> Arc<str> {
        url.as_str().trim_end_matches('/').into()
    }

    /// The client's address: X-Forwarded-For believed only from trusted proxies.
    pub fn client_ip(&self, req: &HttpRequest) -> IpAddr {
        match req.peer_addr().map(|a| a.ip()) {
            Some(ip) if self.settings.is_trusted_proxy(ip) => {
                forwarded_client(req, |a| self.settings.is_trusted_proxy(a)).unwrap_or(ip)
            }
            Some(ip) => ip,
            None => IpAddr::from([0, 0, 0, 0]),
        }
    }

    /// Client address (X-Forwarded-For believed only from trusted proxies) and User-Agent.
    pub fn client_info(&self, req: &HttpRequest) -> ClientInfo {
        let client = self.client_ip(req);
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(256)
            .collect();
        ClientInfo {
            client: client.to_string(),
            user_agent,
        }
    }
}

/// The right-most X-Forwarded-For address that is not a trusted proxy.
fn forwarded_client(req: &HttpRequest, trusted: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in req.headers().get_all("x-forwarded-for") {
        let text = value.to_str().ok()?;
        for part in text.split(',') {
            hops.push(part.trim().parse().ok()?);
        }
    }
    let mut last = None;
    for ip in hops.into_iter().rev() {
        last = Some(ip);
        if !trusted(ip) {
            break;
        }
    }
    last
}

/// Registers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(json_config())
        .app_data(query_config())
        .app_data(path_config())
        .configure(ops::routes)
        .configure(firmware::routes)
        .configure(downloads::routes)
        .configure(devices::routes)
        .configure(ota::routes)
        .configure(rollouts::routes)
        .configure(tokens::routes)
        .configure(ui::routes)
        .configure(files::routes);
}

/// Routes of the plain-HTTP `--download-listen` listener: downloads and `/healthz`.
pub fn download_routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(path_config())
        .configure(ops::health_routes)
        .configure(ota::download_routes)
        .configure(files::routes);
}

/// Routes of the token-free `--metrics-listen` listener.
pub fn metrics_routes(cfg: &mut web::ServiceConfig) {
    cfg.configure(ops::metrics_routes);
}

/// Largest JSON request body (task and rollout requests are far smaller).
pub const JSON_LIMIT: usize = 1 << 20;

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(JSON_LIMIT)
        .error_handler(|e, _| match e {
            actix_web::error::JsonPayloadError::Overflow { .. }
            | actix_web::error::JsonPayloadError::OverflowKnownLength { .. } => ApiError::new(
                actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("JSON bodies are limited to {JSON_LIMIT} bytes"),
            )
            .into(),
            e => ApiError::invalid_request(format!("invalid JSON body: {e}")).into(),
        })
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|e, _| ApiError::invalid_request(format!("invalid query: {e}")).into())
}

fn path_config() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|e, _| ApiError::invalid_request(format!("invalid path: {e}")).into())
}

/// A resource serving `routes`, each on its method and open to callers with the [`Access`] it
/// declares (the one place a route's scope is stated; [`access::authorize`] checks it). Any
/// other method is answered 405 with an `Allow` header listing the methods it serves (RFC 9110
/// §15.5.6) and the JSON error body.
pub(crate) fn resource<const N: usize>(
    path: &str,
    routes: [(Method, Access, Route); N],
) -> actix_web::Resource {
    let allow: Vec<&str> = routes.iter().map(|(m, _, _)| m.as_str()).collect();
    // Method names are tokens, always a valid header value.
    let allow = HeaderValue::from_str(&allow.join(", ")).ok();
    let mut resource = web::resource(path);
    for (method, needs, route) in routes {
        resource = resource.route(route.method(method).wrap(actix_web::middleware::from_fn(
            move |req, next| access::authorize(needs, req, next),
        )));
    }
    resource.default_service(web::to(move || {
        let allow = allow.clone();
        async move { method_not_allowed(allow) }
    }))
}

/// 405 with `Allow`.
fn method_not_allowed(allow: Option<HeaderValue>) -> HttpResponse {
    let mut res = error::for_status(StatusCode::METHOD_NOT_ALLOWED).error_response();
    if let Some(allow) = allow {
        res.headers_mut().insert(header::ALLOW, allow);
    }
    res
}

/// A JSON request body as `T` (a struct), read under [`json_config`]'s limit and error
/// mapping. The body must be a JSON object: serde would also take an array of the fields in
/// order, which no client means. JSON has one number type and JSON Schema agrees: `3.0` and
/// `3e0` are the integer 3, so integral numbers written with a fraction or an exponent are
/// accepted where an integer is expected (serde alone refuses them); `3.5` still is not.
pub(crate) struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = actix_web::Error;
    type Future = futures::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = web::Json::<serde_json::Value>::from_request(req, payload);
        Box::pin(async move {
            let mut value = body.await?.into_inner();
            if !value.is_object() {
                return Err(
                    ApiError::invalid_request("invalid JSON body: expected a JSON object").into(),
                );
            }
            integral_numbers(&mut value);
            serde_json::from_value(value)
                .map(JsonBody)
                .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")).into())
        })
    }
}

/// Rewrites every integral floating-point number (`3.0`) within the u64/i64 range as an integer.
fn integral_numbers(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                // `as` saturates; the range checks keep only exact conversions.
                if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                    *v = Value::from(f as u64);
                } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                    *v = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// Middleware that gives framework-generated errors (unknown route, wrong method, payload
/// errors) the JSON error body.
pub fn json_errors<B: 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(|res: ServiceResponse<B>| {
        let is_json = res
            .response()
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if is_json {
            return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
        }
        let replaced = error::for_status(res.status()).error_response();
        let (req, _) = res.into_parts();
        let res = ServiceResponse::new(req, replaced).map_into_right_body();
        Ok(ErrorHandlerResponse::Response(res))
    })
}

/// Response body type after [`json_errors`].
pub type JsonErrorBody<B> = EitherBody<B>;

/// Query parameters of every list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, default 50. Any non-negative integer is accepted and clamped to 1–500.
    #[param(minimum = 0, maximum = 18_446_744_073_709_551_615_usize)]
    pub limit: Option<usize>,
    /// Opaque cursor from a previous page's `next_cursor`; empty = the first page. Any other
    /// value is refused with 400 `invalid_request` ("invalid cursor").
    pub cursor: Option<String>,
}

impl PageQuery {
    fn to_request(&self) -> crate::store::PageRequest {
        crate::store::PageRequest {
            limit: self.limit,
            cursor: self.cursor.clone(),
        }
    }
}
