//! Operations endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document.

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use serde::Serialize;

use super::Access;
use super::{AppState, resource};
use crate::metrics::Gauges;

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.configure(health_routes)
        .service(resource(
            "/readyz",
            [(Method::GET, Access::Open, web::to(readyz))],
        ))
        .service(resource(
            "/metrics",
            [(Method::GET, Access::READ, web::to(metrics))],
        ))
        .service(resource(
            "/api/v1/cluster",
            [(Method::GET, Access::ADMIN, web::to(cluster))],
        ))
        .service(resource(
            "/api/v1/openapi.json",
            [(Method::GET, Access::Open, web::to(openapi))],
        ));
}

/// `/metrics` and `/healthz`, for the token-free `--metrics-listen` listener.
pub(super) fn metrics_routes(cfg: &mut web::ServiceConfig) {
    cfg.configure(health_routes).service(resource(
        "/metrics",
        [(Method::GET, Access::Open, web::to(metrics))],
    ));
}

/// `/healthz` alone (the extra listeners).
pub(super) fn health_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/healthz",
        [(Method::GET, Access::Open, web::to(healthz))],
    ));
}

/// Liveness.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// Readiness and the state of each dependency.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Readiness {
    /// `ready` or `not_ready`.
    status: &'static str,
    /// `ok` or the catalog's error.
    catalog: String,
    /// `ok` or the blob store's error.
    blob_store: String,
    /// The broker's state (does not affect readiness; downloads go on without MQTT).
    mqtt: String,
}

impl Readiness {
    /// While the server waits for its catalog at start: nothing else is checked yet.
    pub(super) fn starting(catalog: String) -> Readiness {
        Readiness {
            status: "not_ready",
            catalog,
            blob_store: "not checked until the catalog answers".into(),
            mqtt: "not started until the catalog answers".into(),
        }
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()), responses((status = 200, body = Health)))]
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// How long `/readyz` waits for the blob store.
const READY_PROBE: std::time::Duration = std::time::Duration::from_millis(1500);

/// Readiness: the catalog writes durably and the blob store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub(super) async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let catalog = match state.catalog.check().await {
        Ok(()) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    // Readiness answers within 2 s whatever the blob store does (a frozen S3 server).
    let blob_store = match tokio::time::timeout(READY_PROBE, state.blobs.check()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {} ms", READY_PROBE.as_millis()),
    };
    let ready = catalog == "ok" && blob_store == "ok";
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        catalog,
        blob_store,
        mqtt: state.mqtt.status.describe(),
    };
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(super) async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let gauges = Gauges {
        active_downloads: state.tracker.active_count(),
        read_streams: state.budget.active_streams(),
        uploads_in_progress: state.uploads.in_progress(),
        open_connections: state.budget.open_connections(),
    };
    let mut text = state.metrics.render(&gauges);
    text.push_str(&state.catalog.render_metrics());
    text.push_str(&state.tracker.render_metrics());
    text.push_str(&state.mqtt.status.render());
    text.push_str(&state.ota.render_metrics());
    text.push_str(&state.rollouts.render_metrics());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}

/// The deployment: every replica the catalog lists (one on sled), its version, last
/// heartbeat, whether it is alive and the leases it holds.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "operations",
    responses((status = 200, body = crate::cluster::ClusterView), (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub(super) async fn cluster(state: web::Data<AppState>) -> Result<HttpResponse, super::ApiError> {
    Ok(HttpResponse::Ok().json(state.cluster.view().await?))
}

/// This API's OpenAPI 3 document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "OpenAPI document", content_type = "application/json")))]
pub(super) async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(super::openapi::document())
}
