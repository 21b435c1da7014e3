//! Who may call what. Every request passes the app-wide [`gate`] before routing; its steps are
//! separate functions: [`authenticate`] (the bearer token, if any), [`rate_limit`] (`/api/`),
//! [`download_slot`] (`/files/`, `/dl/`), the catalog's write check, then — after the handler
//! — [`audit`] (every state-changing API call and every refused token) and [`commit`] (a
//! state-changing call's effects are durable before its success is answered).
//!
//! The scope a route needs is declared where the route is registered (`http::resource`, one
//! [`Access`] per method) and checked by [`authorize`], which wraps that route: a new route is
//! added in one place. Unknown paths under the token-only prefixes answer 401 before 404
//! ([`not_found`]), so paths are not disclosed to callers without a token.

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError, web};

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

/// What a route needs to be let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing (health checks, the OpenAPI document, signed download URLs, the dashboard).
    Open,
    /// A token with this scope.
    Token(Scope),
}

impl Access {
    /// `read` (every token has it).
    pub const READ: Access = Access::Token(Scope::Read);
    /// `upload`.
    pub const UPLOAD: Access = Access::Token(Scope::Upload);
    /// `operate`.
    pub const OPERATE: Access = Access::Token(Scope::Operate);
    /// `admin`.
    pub const ADMIN: Access = Access::Token(Scope::Admin);
}

/// What the request's `Authorization` header proved (set by [`gate`] for every request).
#[derive(Debug, Clone)]
pub enum Authn {
    /// No header.
    Anonymous,
    /// A usable token (or `--auth off`).
    Valid(Principal),
    /// A header that proves nothing.
    Refused(Refusal),
}

/// Why a presented token proves nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not `Bearer <token>`.
    Malformed,
    /// Unknown.
    Unknown,
    /// Revoked.
    Revoked,
    /// Expired.
    Expired,
}

impl From<Refusal> for AuthError {
    fn from(r: Refusal) -> AuthError {
        match r {
            Refusal::Malformed => AuthError::Malformed,
            Refusal::Unknown => AuthError::Unknown,
            Refusal::Revoked => AuthError::Revoked,
            Refusal::Expired => AuthError::Expired,
        }
    }
}

impl Authn {
    fn principal(&self) -> Option<&Principal> {
        match self {
            Authn::Valid(p) => Some(p),
            _ => None,
        }
    }
}

/// The caller of a request that passed [`authorize`] with a token.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(
            req.extensions()
                .get::<Authn>()
                .and_then(Authn::principal)
                .cloned()
                .map(Caller)
                .ok_or_else(|| AuthError::Missing.into()),
        )
    }
}

fn is_download(path: &str) -> bool {
    path.starts_with("/files/") || path.starts_with("/dl/")
}

fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Step 1: what the bearer token proves.
pub fn authenticate(state: &AppState, req: &ServiceRequest) -> Authn {
    if !state.settings.auth_enabled {
        return Authn::Valid(Principal::anonymous_admin());
    }
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match header {
        None => Authn::Anonymous,
        Some(h) => match state.tokens.authenticate(Some(h)) {
            Ok(p) => Authn::Valid(p),
            Err(AuthError::Revoked) => Authn::Refused(Refusal::Revoked),
            Err(AuthError::Expired) => Authn::Refused(Refusal::Expired),
            Err(AuthError::Malformed | AuthError::Missing) => Authn::Refused(Refusal::Malformed),
            Err(_) => Authn::Refused(Refusal::Unknown),
        },
    }
}

/// Step 2: the caller's API budget, keyed by token when it is valid, else by client address.
pub fn rate_limit(
    state: &AppState,
    path: &str,
    authn: &Authn,
    client: std::net::IpAddr,
) -> Result<(), ApiError> {
    if !path.starts_with("/api/") {
        return Ok(());
    }
    let key = match authn.principal() {
        Some(p) if !p.token_id.is_empty() => RateKey::Token(p.token_id.clone()),
        _ => RateKey::Client(client),
    };
    state
        .api_limiter
        .check(&key)
        .map_err(ApiError::rate_limited)
}

/// Step 3: one of the client address's concurrent download slots (held until the body ends).
pub fn download_slot(
    state: &AppState,
    req: &ServiceRequest,
    client: std::net::IpAddr,
) -> Result<(), ApiError> {
    if is_download(req.path()) && req.method() == Method::GET {
        let slot = state
            .download_slots
            .acquire(client)
            .ok_or_else(ApiError::too_many_downloads)?;
        req.extensions_mut().insert(slot);
    }
    Ok(())
}

/// Step 5: the audit entry of a state-changing API call or a refused token.
pub async fn audit(
    state: &AppState,
    req: &RequestFacts,
    authn: &Authn,
    status: u16,
    error: Option<&str>,
) {
    let refused_token =
        matches!(error, Some("unauthorized" | "forbidden")) && !matches!(authn, Authn::Anonymous);
    if !(req.audited || refused_token) {
        return;
    }
    let who = match authn {
        Authn::Valid(p) => Some(p),
        _ => None,
    };
    state
        .audit
        .record(AuditEntry {
            id: String::new(),
            at: chrono::Utc::now(),
            who: who.map(|p| p.name.clone()),
            token_id: who.map(|p| p.token_id.clone()).filter(|t| !t.is_empty()),
            client: req.client.to_string(),
            method: req.method.to_string(),
            path: req.path.clone(),
            status,
            error: error.map(str::to_string),
        })
        .await;
}

/// A refusal after authentication, audited.
async fn refused(
    state: &AppState,
    facts: &RequestFacts,
    authn: &Authn,
    e: ApiError,
) -> actix_web::Error {
    audit(
        state,
        facts,
        authn,
        e.status_code().as_u16(),
        Some(e.code()),
    )
    .await;
    e.into()
}

/// Step 6: durable before acknowledged — a success is answered only once the change (and its
/// audit entry) is on disk. Concurrent requests share one flush.
pub async fn commit(state: &AppState) -> Result<(), ApiError> {
    state.catalog.flush().await.map_err(ApiError::from)
}

/// What the gate keeps of a request for the steps after the handler.
pub struct RequestFacts {
    method: Method,
    path: String,
    client: std::net::IpAddr,
    /// A state-changing `/api/` call.
    audited: bool,
}

/// The status and error code of an answer.
fn outcome<B>(res: &Result<ServiceResponse<B>, actix_web::Error>) -> (u16, Option<&'static str>) {
    match res {
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
    }
}

/// The gate (use with `actix_web::middleware::from_fn`).
pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return next.call(req).await;
    };
    let facts = RequestFacts {
        audited: req.path().starts_with("/api/") && is_write(req.method()),
        method: req.method().clone(),
        path: req.path().to_string(),
        client: state.client_ip(req.request()),
    };
    let authn = authenticate(&state, &req);
    rate_limit(&state, &facts.path, &authn, facts.client)?;
    download_slot(&state, &req, facts.client)?;
    // A catalog that cannot make writes durable refuses them before anything changes.
    if let Some(fault) = state.catalog.fault().filter(|_| facts.audited) {
        let e = crate::store::CatalogError::Unwritable(fault).into();
        return Err(refused(&state, &facts, &authn, e).await);
    }
    req.extensions_mut().insert(authn.clone());
    let res = next.call(req).await;
    let (status, code) = outcome(&res);
    audit(&state, &facts, &authn, status, code).await;
    if facts.audited
        && (200..300).contains(&status)
        && let Err(e) = commit(&state).await
    {
        return Err(refused(&state, &facts, &authn, e).await);
    }
    res
}

/// Step 4, per route: lets the request through if its token has the scope `access` names
/// (401 without a usable token, 403 with one that lacks the scope).
pub async fn authorize(
    access: Access,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Access::Token(scope) = access else {
        return next.call(req).await;
    };
    if !token_allows(req.request(), Some(scope))? {
        return Err(ApiError::from(AuthError::Forbidden(scope.as_str())).into());
    }
    next.call(req).await
}

/// Whether a request's usable token has `scope` (any usable token for `None`), or why it has
/// no usable token (401). Range requests pass here: nothing is copied.
fn token_allows(req: &HttpRequest, scope: Option<Scope>) -> Result<bool, ApiError> {
    match req.extensions().get::<Authn>() {
        Some(Authn::Valid(p)) => Ok(scope.is_none_or(|s| p.allows(s))),
        Some(Authn::Refused(r)) => Err(AuthError::from(*r).into()),
        _ => Err(AuthError::Missing.into()),
    }
}

/// The answer for a path no route serves: 401 first under the token-only prefixes of the main
/// listener (no path is disclosed to a caller without a token), else 404.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let main = !matches!(
        req.app_data::<Listener>(),
        Some(Listener::Downloads | Listener::Metrics)
    );
    let guarded = ["/api/", "/files/", "/dl/", "/metrics"]
        .iter()
        .any(|p| req.path().starts_with(p));
    if main && guarded {
        token_allows(&req, None)?;
    }
    Err(ApiError::not_found("no such resource"))
}
