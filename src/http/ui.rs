//! The web dashboard: a small single-page app (HTML, CSS, vanilla JS) embedded in the binary at
//! build time and served at `/` — no separate server, no build step, no CDN at run time. It
//! uses the same API and tokens as every other client (the token is kept in the browser's
//! session storage), so these routes need no token themselves.

use super::Access;
use actix_web::http::{Method, header};
use actix_web::{HttpRequest, HttpResponse, web};

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(super::resource(
        "/",
        [(Method::GET, Access::Open, web::to(index))],
    ))
    .service(super::resource(
        "/ui/app.js",
        [(Method::GET, Access::Open, web::to(app_js))],
    ))
    .service(super::resource(
        "/ui/app.css",
        [(Method::GET, Access::Open, web::to(app_css))],
    ));
}

/// An embedded asset and its ETag (a content hash, computed once).
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Asset {
        use sha2::Digest;
        let hash = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        Asset {
            body,
            content_type,
            etag: format!("\"{}\"", &hash[..32]),
        }
    }
}

static ASSETS: std::sync::LazyLock<[Asset; 3]> = std::sync::LazyLock::new(|| {
    [
        Asset::new(INDEX, "text/html; charset=utf-8"),
        Asset::new(APP_JS, "text/javascript; charset=utf-8"),
        Asset::new(APP_CSS, "text/css; charset=utf-8"),
    ]
});

/// Serves an embedded asset, revalidated on every load (`no-cache` + ETag) so a new binary's
/// dashboard is picked up at once.
fn asset(req: &HttpRequest, a: &Asset) -> HttpResponse {
    let matches = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == a.etag));
    let mut resp = if matches {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    resp.insert_header((header::ETAG, a.etag.as_str()))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; frame-ancestors 'none'",
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if matches {
        return resp.finish();
    }
    resp.content_type(a.content_type).body(a.body)
}

async fn index(req: HttpRequest) -> HttpResponse {
    asset(&req, &ASSETS[0])
}

async fn app_js(req: HttpRequest) -> HttpResponse {
    asset(&req, &ASSETS[1])
}

async fn app_css(req: HttpRequest) -> HttpResponse {
    asset(&req, &ASSETS[2])
}
