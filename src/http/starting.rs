//! What fwrepo answers while it waits for its catalog at start (a PostgreSQL server that does
//! not answer yet): `/healthz` 200 (the process lives), `/readyz` 503 with the reason, and
//! every other request 503 `catalog_unavailable` with `Retry-After`, so a load balancer or
//! Kubernetes keeps traffic away until the server is ready. The listeners stay bound the whole
//! time: the full server takes them over once the catalog answers.

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::http::StatusCode;
use actix_web::{App, HttpResponse, web};
use tokio::sync::watch;

use super::error::ApiError;
use super::ops::Readiness;

/// Why the server is not ready yet (the last error of the catalog's connection attempts).
type Reason = watch::Receiver<String>;

/// Serves the waiting answers on `listeners` (each HTTPS with its TLS configuration) until the
/// returned server is stopped.
pub fn serve(
    listeners: Vec<(TcpListener, Option<rustls::ServerConfig>)>,
    reason: Reason,
) -> std::io::Result<Server> {
    let mut server = actix_web::HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(reason.clone()))
            .route("/healthz", web::get().to(super::ops::healthz))
            .route("/readyz", web::get().to(readyz))
            .default_service(web::to(unavailable))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1);
    for (listener, tls) in listeners {
        server = match tls {
            None => server.listen(listener)?,
            Some(config) => server.listen_rustls_0_23(listener, config)?,
        };
    }
    Ok(server.run())
}

async fn readyz(reason: web::Data<Reason>) -> HttpResponse {
    let catalog = format!("connecting: {}", reason.borrow().as_str());
    HttpResponse::ServiceUnavailable().json(Readiness::starting(catalog))
}

async fn unavailable(reason: web::Data<Reason>) -> Result<HttpResponse, ApiError> {
    let message = format!(
        "fwrepo is starting and waits for its catalog ({}); nothing was done",
        reason.borrow().as_str()
    );
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "catalog_unavailable",
        message,
    )
    .retry_after(5))
}
