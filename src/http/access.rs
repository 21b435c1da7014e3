//! Who may call what: the gate every request passes before its handler. It names the scope a
//! route needs ([`required`]), checks the bearer token, spends the caller's rate-limit budget
//! (`/api/`), takes a download slot for the client address (`/files/`, `/dl/`), writes the
//! audit entry of every state-changing API call and every refused token, and makes a
//! state-changing call's effects durable before its success is answered (or refuses it while
//! the catalog cannot write).

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, ResponseError, web};

use super::limits::RateKey;
use super::{ApiError, AppState};
use crate::audit::AuditEntry;
use crate::auth::{AuthError, Principal, Scope};

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Everything (`--listen`).
    Main,
    /// Downloads and `/healthz` only, plain HTTP (`--download-listen`).
    Downloads,
    /// `/metrics` and `/healthz` only, without a token (`--metrics-listen`).
    Metrics,
}

/// What a request needs to be let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing (health checks, the OpenAPI document, signed download URLs, unknown paths).
    Open,
    /// A token with this scope.
    Token(Scope),
}

/// The scope `method` on `path` needs.
pub fn required(method: &Method, path: &str) -> Access {
    // Every request passes here (range requests too): the first segments on the stack.
    let mut parts = [""; 6];
    let mut n = 0;
    for (i, p) in path.trim_start_matches('/').split('/').enumerate() {
        if let Some(slot) = parts.get_mut(i) {
            *slot = p;
        }
        n = i + 1;
    }
    let write = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    match &parts[..n.min(parts.len())] {
        ["files", ..] => Access::Token(Scope::Read),
        // The signed form, /dl/{task}/{sn}/{expiry-hmac}/{file}, carries its own proof.
        ["dl", _, _, _, _] => Access::Open,
        ["dl", ..] => Access::Token(Scope::Read),
        ["metrics"] => Access::Token(Scope::Read),
        ["api", "v1", "openapi.json"] => Access::Open,
        ["api", "v1", "tokens" | "audit", ..] => Access::Token(Scope::Admin),
        ["api", ..] if !write => Access::Token(Scope::Read),
        ["api", ..] if *method == Method::DELETE => Access::Token(Scope::Admin),
        ["api", "v1", "firmware", ..] => Access::Token(Scope::Upload),
        ["api", ..] => Access::Token(Scope::Operate),
        _ => Access::Open,
    }
}

/// The caller of a request that passed the gate with a token.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(
            req.extensions()
                .get::<Principal>()
                .cloned()
                .map(Caller)
                .ok_or_else(|| AuthError::Missing.into()),
        )
    }
}

fn is_download(path: &str) -> bool {
    path.starts_with("/files/") || path.starts_with("/dl/")
}

/// The gate (use with `actix_web::middleware::from_fn`).
pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return next.call(req).await;
    };
    let method = req.method().clone();
    let path = req.path().to_string();
    let client = state.client_ip(req.request());
    // The extra listeners serve a few routes; everything else there is a plain 404.
    let access = match req.app_data::<Listener>() {
        Some(Listener::Metrics) => Access::Open,
        Some(Listener::Downloads) if !is_download(&path) => Access::Open,
        _ => required(&method, &path),
    };
    let auth = match access {
        Access::Open => Ok(None),
        Access::Token(_) if !state.settings.auth_enabled => Ok(Some(Principal::anonymous_admin())),
        Access::Token(scope) => {
            let header = req
                .headers()
                .get(actix_web::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match state.tokens.authenticate(header) {
                Ok(p) if p.allows(scope) => Ok(Some(p)),
                Ok(p) => Err((Some(p), AuthError::Forbidden(scope.as_str()))),
                Err(e) => Err((None, e)),
            }
        }
    };
    if path.starts_with("/api/") {
        let key = match &auth {
            Ok(Some(p)) | Err((Some(p), _)) if !p.token_id.is_empty() => {
                RateKey::Token(p.token_id.clone())
            }
            _ => RateKey::Client(client),
        };
        if let Err(wait) = state.api_limiter.check(&key) {
            return Err(ApiError::rate_limited(wait).into());
        }
    }
    let audit = |who: Option<&Principal>, status: u16, error: Option<&str>| {
        state.audit.record(AuditEntry {
            id: String::new(),
            at: chrono::Utc::now(),
            who: who.map(|p| p.name.clone()),
            token_id: who.map(|p| p.token_id.clone()).filter(|t| !t.is_empty()),
            client: client.to_string(),
            method: method.to_string(),
            path: path.clone(),
            status,
            error: error.map(str::to_string),
        })
    };
    let principal = match auth {
        Ok(p) => p,
        Err((who, e)) => {
            let e = ApiError::from(e);
            audit(who.as_ref(), e.status_code().as_u16(), Some(e.code()));
            return Err(e.into());
        }
    };
    if is_download(&path) && method == Method::GET {
        match state.download_slots.acquire(client) {
            Some(slot) => {
                req.extensions_mut().insert(slot);
            }
            None => return Err(ApiError::too_many_downloads().into()),
        }
    }
    let audited = path.starts_with("/api/")
        && !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if let Some(p) = &principal {
        req.extensions_mut().insert(p.clone());
    }
    // A catalog that cannot make writes durable refuses them before anything changes.
    if audited {
        if let Some(fault) = state.catalog.fault() {
            let e = ApiError::from(crate::catalog::CatalogError::Unwritable(fault));
            audit(principal.as_ref(), e.status_code().as_u16(), Some(e.code()));
            return Err(e.into());
        }
    }
    let res = next.call(req).await;
    if audited {
        let (status, code) = match &res {
            Ok(r) => (
                r.status().as_u16(),
                r.response()
                    .error()
                    .and_then(|e| e.as_error::<ApiError>())
                    .map(ApiError::code),
            ),
            Err(e) => (
                e.as_response_error().status_code().as_u16(),
                e.as_error::<ApiError>().map(ApiError::code),
            ),
        };
        audit(principal.as_ref(), status, code);
        // Durable before acknowledged: a success is answered only once the change (and its
        // audit entry) is on disk. Concurrent requests share one flush.
        if (200..300).contains(&status) {
            if let Err(e) = state.catalog.flush().await {
                let e = ApiError::from(e);
                audit(principal.as_ref(), e.status_code().as_u16(), Some(e.code()));
                return Err(e.into());
            }
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_scope_of_their_work() {
        use Access::*;
        use Scope::*;
        let cases = [
            (Method::GET, "/healthz", Open),
            (Method::GET, "/readyz", Open),
            (Method::GET, "/api/v1/openapi.json", Open),
            (Method::GET, "/metrics", Token(Read)),
            (Method::GET, "/files/01ABC/a.bin", Token(Read)),
            (Method::HEAD, "/dl/t/sn/a.bin", Token(Read)),
            (Method::GET, "/dl/t/sn/123-abc/a.bin", Open),
            (Method::GET, "/dl/t/sn/123-abc/a.bin/extra", Token(Read)),
            (Method::GET, "/api/v1/firmware", Token(Read)),
            (Method::POST, "/api/v1/firmware", Token(Upload)),
            (Method::PUT, "/api/v1/firmware", Token(Upload)),
            (Method::POST, "/api/v1/firmware/x/disable", Token(Upload)),
            (Method::DELETE, "/api/v1/firmware/x", Token(Admin)),
            (Method::POST, "/api/v1/ota", Token(Operate)),
            (Method::POST, "/api/v1/rollouts/x/pause", Token(Operate)),
            (Method::PUT, "/api/v1/devices/sn", Token(Operate)),
            (Method::DELETE, "/api/v1/devices/sn", Token(Admin)),
            (Method::GET, "/api/v1/tokens", Token(Admin)),
            (Method::GET, "/api/v1/audit", Token(Admin)),
            (Method::GET, "/api/v2/anything", Token(Read)),
            (Method::GET, "/", Open),
        ];
        for (m, p, want) in cases {
            assert_eq!(required(&m, p), want, "{m} {p}");
        }
    }
}
