//! Authentication and abuse limits as callers meet them: the bootstrap admin token, scoped
//! tokens that separate release engineers from operators, every write endpoint refusing a
//! missing, malformed, unknown, revoked, expired or too-small token (and changing nothing), the
//! open and token-only endpoints, the audit log, the per-address download cap, `--auth off`,
//! and HTTPS with a plain-HTTP download listener and a token-free metrics listener.

use std::time::Duration;

use fwrepo::config::Settings;
use fwrepo::startup::{Application, Listener};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Sends `method path` with an optional `Authorization` value (and a small body for writes).
async fn call(app: &TestApp, method: &str, path: &str, auth: Option<&str>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut rb = client.request(method.parse().unwrap(), app.url(path));
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    if path.starts_with("/api/v1/firmware?") {
        rb = rb
            .header("content-type", "application/octet-stream")
            .body(payload(1000, 77));
    } else if method == "POST" || method == "PUT" {
        rb = rb.json(&json!({}));
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn create_token_with(app: &TestApp, body: Value) -> (String, String) {
    let resp = app
        .client
        .post(app.url("/api/v1/tokens"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn a_fresh_data_dir_gets_a_private_admin_token_and_scopes_separate_the_work() {
    let app = spawn_with(|s| s.ota.preflight = "off".into()).await;
    let path = app.dir.path().join("admin.token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(app.token.starts_with("fwr_"));
    let upload = app.create_token("release engineer", &["upload"]).await;
    let operate = app.create_token("operator", &["operate"]).await;
    let bearer = |t: &str| format!("Bearer {t}");

    // The release engineer uploads; the operator may not.
    let (status, fw) = call(
        &app,
        "POST",
        "/api/v1/firmware?file_name=Dock_7.0.zip",
        Some(&bearer(&upload)),
    )
    .await;
    assert_eq!(status, 201, "{fw}");
    let (status, e) = call(
        &app,
        "POST",
        "/api/v1/firmware?file_name=Dock_7.1.zip",
        Some(&bearer(&operate)),
    )
    .await;
    assert_eq!((status, e["error"].as_str()), (403, Some("forbidden")));
    assert!(e["message"].as_str().unwrap().contains("upload"));

    // The operator starts a rollout and an OTA task; the release engineer may not.
    let sn = format!("AUTH{}", fwrepo::domain::ids::next());
    let rollout = json!({"name": "r", "firmware": [{"firmware_id": fw["id"]}],
        "target": {"gateway_sns": [sn]}, "stages": [{"percent": 100}]});
    let ota = json!({"gateway_sn": sn, "devices": [{"sn": sn, "firmware_id": fw["id"]}]});
    for (token, want) in [(&upload, 403), (&operate, 201)] {
        let resp = reqwest::Client::new()
            .post(app.url("/api/v1/rollouts"))
            .bearer_auth(token)
            .json(&rollout)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want, "{}", resp.text().await.unwrap());
    }
    for (token, want) in [(&upload, 403), (&operate, 202)] {
        let resp = reqwest::Client::new()
            .post(app.url("/api/v1/ota"))
            .bearer_auth(token)
            .json(&ota)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want, "{}", resp.text().await.unwrap());
    }
    // Both read; neither deletes nor manages tokens; the admin does.
    let id = fw["id"].as_str().unwrap();
    for token in [&upload, &operate] {
        let (status, _) = call(&app, "GET", "/api/v1/firmware", Some(&bearer(token))).await;
        assert_eq!(status, 200);
        let (status, _) = call(
            &app,
            "DELETE",
            &format!("/api/v1/firmware/{id}?force=true"),
            Some(&bearer(token)),
        )
        .await;
        assert_eq!(status, 403);
        let (status, _) = call(&app, "GET", "/api/v1/tokens", Some(&bearer(token))).await;
        assert_eq!(status, 403);
    }
    let (status, body) = app
        .delete_json(&format!("/api/v1/firmware/{id}?force=true"))
        .await;
    assert_eq!(status, 200, "{body}");
    // Tokens are listed without their secret; last use is recorded.
    let (_, list) = app.get_json("/api/v1/tokens").await;
    let text = list.to_string();
    assert!(!text.contains(&upload) && !text.contains(&app.token));
    let engineer = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "release engineer")
        .unwrap();
    assert_eq!(engineer["scopes"], json!(["upload"]));
    assert!(engineer["last_used_at"].is_string());
    assert!(engineer.get("hash").is_none());
}

#[tokio::test]
async fn every_write_endpoint_refuses_bad_tokens_and_changes_nothing() {
    let app = spawn_app().await;
    let fw = app.upload_ok("Dock_1.0.zip", payload(1000, 1)).await;
    let id = fw["id"].as_str().unwrap().to_string();
    let read = app.create_token("reader", &["read"]).await;
    let (revoked_id, revoked) =
        create_token_with(&app, json!({"name": "gone", "scopes": ["admin"]})).await;
    let (status, _) = app
        .delete_json(&format!("/api/v1/tokens/{revoked_id}"))
        .await;
    assert_eq!(status, 200);
    let soon = chrono::Utc::now() + chrono::Duration::seconds(2);
    let (_, expiring) = create_token_with(
        &app,
        json!({"name": "brief", "scopes": ["admin"], "expires_at": soon}),
    )
    .await;
    app.state.clock.advance(Duration::from_secs(3));
    let writes = [
        (
            "POST",
            "/api/v1/firmware?file_name=Dock_2.0.zip".to_string(),
        ),
        ("PUT", "/api/v1/firmware?file_name=Dock_2.0.zip".to_string()),
        ("POST", format!("/api/v1/firmware/{id}/disable")),
        ("POST", format!("/api/v1/firmware/{id}/enable")),
        ("POST", format!("/api/v1/firmware/{id}/verify")),
        ("DELETE", format!("/api/v1/firmware/{id}?force=true")),
        ("POST", "/api/v1/ota".to_string()),
        ("POST", "/api/v1/rollouts".to_string()),
        (
            "POST",
            "/api/v1/rollouts/01J00000000000000000000000/start".to_string(),
        ),
        ("PUT", "/api/v1/devices/AUTHSN1".to_string()),
        ("DELETE", "/api/v1/devices/AUTHSN1".to_string()),
        ("POST", "/api/v1/tokens".to_string()),
        ("DELETE", format!("/api/v1/tokens/{revoked_id}")),
    ];
    let unauthorized = [
        None,
        Some("Basic dXNlcjpwYXNz".to_string()),
        Some("Bearer".to_string()),
        Some("Bearer fwr_not-a-token".to_string()),
        Some(format!("Bearer {revoked}")),
        Some(format!("Bearer {expiring}")),
    ];
    for (method, path) in &writes {
        for auth in &unauthorized {
            let (status, body) = call(&app, method, path, auth.as_deref()).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} with {auth:?}: {body}"
            );
            assert!(body["message"].is_string());
        }
        let (status, body) = call(&app, method, path, Some(&format!("Bearer {read}"))).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("forbidden")),
            "{method} {path} with a read token: {body}"
        );
    }
    // Nothing changed.
    assert_eq!(app.firmware_count().await, 1);
    let (_, fw_now) = app.get_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(fw_now["status"], "ready");
    let (_, tokens) = app.get_json("/api/v1/tokens").await;
    assert_eq!(tokens["items"].as_array().unwrap().len(), 4);
    let (_, devices) = app.get_json("/api/v1/devices").await;
    assert!(devices["items"].as_array().unwrap().is_empty());
    let (_, tasks) = app.get_json("/api/v1/ota").await;
    assert!(tasks["items"].as_array().unwrap().is_empty());
    // A 401 says how to authenticate.
    let resp = reqwest::Client::new()
        .get(app.url("/api/v1/firmware"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
}

#[tokio::test]
async fn open_endpoints_token_only_endpoints_and_the_audit_log() {
    let app = spawn_app().await;
    let fw = app.upload_ok("Dock_3.0.zip", payload(5000, 3)).await;
    let anonymous = reqwest::Client::new();
    for path in [
        "/healthz",
        "/readyz",
        "/api/v1/openapi.json",
        "/",
        "/ui/app.js",
        "/ui/app.css",
    ] {
        let resp = anonymous.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    // The dashboard is one embedded page; it loads nothing from elsewhere.
    let page = anonymous.get(app.url("/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    let etag = page.headers()["etag"].to_str().unwrap().to_string();
    let html = page.text().await.unwrap();
    assert!(
        html.contains("/ui/app.js") && !html.contains("http"),
        "{html}"
    );
    let again = anonymous
        .get(app.url("/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let file_url = fw["file_url"].as_str().unwrap();
    for url in [app.url("/metrics"), file_url.to_string()] {
        let resp = anonymous.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{url}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
    }
    let read = app.create_token("scraper", &["read"]).await;
    let resp = anonymous
        .get(app.url("/metrics"))
        .bearer_auth(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = anonymous
        .get(file_url)
        .bearer_auth(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 5000);

    // The audit log: who did what, refused tokens too; admin only; newest first; since.
    let operate = app.create_token("operator", &["operate"]).await;
    let (status, _) = call(
        &app,
        "POST",
        "/api/v1/firmware?file_name=Dock_3.1.zip",
        Some(&format!("Bearer {operate}")),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &app,
        "POST",
        "/api/v1/firmware?file_name=Dock_3.1.zip",
        Some("Bearer fwr_wrong"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = call(
        &app,
        "GET",
        "/api/v1/audit",
        Some(&format!("Bearer {operate}")),
    )
    .await;
    assert_eq!(status, 403);
    let (status, log) = app.get_json("/api/v1/audit?limit=500").await;
    assert_eq!(status, 200, "{log}");
    let items = log["items"].as_array().unwrap();
    let find = |pred: &dyn Fn(&Value) -> bool| items.iter().find(|e| pred(e)).cloned();
    let upload =
        find(&|e| e["method"] == "POST" && e["status"] == 201 && e["path"] == "/api/v1/firmware")
            .expect("the upload is audited");
    assert_eq!(upload["who"], "admin (bootstrap)");
    assert_eq!(upload["client"], "127.0.0.1");
    let forbidden = find(&|e| e["error"] == "forbidden").expect("a refused scope is audited");
    assert_eq!(
        (forbidden["who"].as_str(), forbidden["status"].as_u64()),
        (Some("operator"), Some(403))
    );
    let unknown = find(&|e| e["error"] == "unauthorized").expect("a refused token is audited");
    assert!(unknown["who"].is_null());
    assert!(find(&|e| e["path"] == "/api/v1/tokens" && e["status"] == 201).is_some());
    // Reads are not audited; newest first.
    assert!(find(&|e| e["method"] == "GET" && e["status"] == 200).is_none());
    let times: Vec<&str> = items.iter().map(|e| e["at"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let later = (chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc3339();
    let resp = app
        .client
        .get(app.url("/api/v1/audit"))
        .query(&[("since", later.as_str())])
        .send()
        .await
        .unwrap();
    let later_log: Value = resp.json().await.unwrap();
    assert!(
        later_log["items"].as_array().unwrap().is_empty(),
        "{later_log}"
    );
    let (status, body) = app.get_json("/api/v1/audit?since=yesterday").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn downloads_per_client_address_are_capped() {
    let app = spawn_with(|s| s.max_downloads_per_ip = 2).await;
    let fw = app
        .upload_ok("Dock_4.0.zip", payload(32 * 1024 * 1024, 4))
        .await;
    let url = fw["file_url"].as_str().unwrap().to_string();
    // Two downloads held open (bodies unread), each on its own connection.
    let held: Vec<reqwest::Response> = futures::future::join_all((0..2).map(|_| {
        let c = authed_client(&app.token);
        let url = url.clone();
        async move { c.get(&url).send().await.unwrap() }
    }))
    .await;
    assert!(held.iter().all(|r| r.status() == 200));
    let third = app.client.get(&url).send().await.unwrap();
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // HEAD and the API are not downloads.
    let head = app.client.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(app.get_json("/api/v1/firmware").await.0, 200);
    // A finished (here: abandoned) download frees its slot.
    drop(held);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let r = app
                .client
                .get(&url)
                .header("range", "bytes=0-9")
                .send()
                .await
                .unwrap();
            r.status() == 206
        })
        .await
    );
}

#[tokio::test]
async fn auth_off_needs_no_token_and_still_audits() {
    let app = spawn_with(|s| s.auth_enabled = false).await;
    let anonymous = reqwest::Client::new();
    let resp = anonymous
        .post(app.url("/api/v1/firmware?file_name=Dock_5.0.zip"))
        .body(payload(100, 5))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let (status, log) = {
        let resp = anonymous
            .get(app.url("/api/v1/audit"))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200);
    assert_eq!(log["items"][0]["who"], "anonymous (auth off)");
    assert_eq!(log["items"][0]["status"], 201);
}

#[tokio::test]
async fn https_api_with_plain_download_and_metrics_listeners() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let data = dir.path().join("data");
    let mut settings = Settings::for_data_dir(&data);
    settings.tls = Some((cert_path.clone(), key_path.clone()));
    settings.download_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let app = Application::build(settings).await.unwrap();
    assert!(app.is_https());
    let api = format!("https://localhost:{}", app.http_addr().port());
    let downloads = app.listener_addr(Listener::Downloads).unwrap();
    let metrics = app.listener_addr(Listener::Metrics).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    let token = admin_token(&data);

    let tls_client = |root: &str| {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(root.as_bytes()).unwrap()])
            .build()
            .unwrap()
    };
    let client = tls_client(&ca);
    let resp = client
        .post(format!("{api}/api/v1/firmware?file_name=Dock_6.0.zip"))
        .bearer_auth(&token)
        .body(payload(4096, 6))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let fw: Value = resp.json().await.unwrap();
    // file_url points at the plain-HTTP download listener; it serves downloads only.
    let file_url = fw["file_url"].as_str().unwrap();
    assert!(
        file_url.starts_with(&format!("http://{downloads}/files/")),
        "{file_url}"
    );
    let plain = authed_client(&token);
    let resp = plain.get(file_url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 4096);
    let resp = reqwest::Client::new().get(file_url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = plain
        .get(format!("http://{downloads}/api/v1/firmware"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // The metrics listener needs no token and serves nothing else.
    let anonymous = reqwest::Client::new();
    let resp = anonymous
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("fwrepo_uploads_created_total 1")
    );
    let resp = anonymous
        .get(format!("http://{metrics}/api/v1/firmware"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // A client that trusts another CA refuses the server; plain HTTP on the TLS port fails.
    let (other_ca, _, _) = certificates();
    let err = tls_client(&other_ca)
        .get(format!("{api}/healthz"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");
    let plain_on_tls = anonymous
        .get(format!(
            "http://localhost:{}/healthz",
            api.rsplit(':').next().unwrap()
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain_on_tls.map_or(true, |r| !r.status().is_success()));
    stop.cancel();
}

#[tokio::test]
async fn bad_tls_material_fails_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let mut settings = Settings::for_data_dir(&dir.path().join("data"));
    settings.tls = Some((cert.clone(), cert));
    let err = Application::build(settings).await.err().expect("refused");
    assert!(err.to_string().contains("TLS"), "{err}");
}

#[tokio::test]
async fn oversized_headers_and_json_bodies_are_refused_and_the_server_stays_up() {
    let app = spawn_app().await;
    // actix-http caps a request head at 128 KiB (and 96 headers).
    let big = "x".repeat(200 * 1024);
    let req = format!(
        "GET /api/v1/firmware HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Big: {big}\r\nConnection: close\r\n\r\n",
        app.token
    );
    let addr = app.addr;
    let answer = tokio::task::spawn_blocking(move || raw_request(addr, req.as_bytes()))
        .await
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.starts_with("HTTP/1.1 400"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_json_error(&answer);
    // Its own client: the server closes a connection whose body it refused unread.
    let resp = authed_client(&app.token)
        .post(app.url("/api/v1/rollouts"))
        .header("content-type", "application/json")
        .body(format!("{{\"name\": \"{}\"}}", "n".repeat(2 << 20)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "too_large");
    assert_eq!(app.get_json("/healthz").await.0, 200);
    let (_, list) = app.get_json("/api/v1/rollouts").await;
    assert!(list["items"].as_array().unwrap().is_empty());
}

/// The body of a raw answer is the contract's JSON error.
fn assert_json_error(answer: &str) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{answer}"));
    assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
}

#[tokio::test]
async fn requests_refused_before_routing_get_the_json_error_body() {
    let app = spawn_app().await;
    let addr = app.addr;
    let long_url = format!(
        "GET /api/v1/firmware/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(100_000)
    );
    let negative = "POST /api/v1/devices/X HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n";
    let bad_header = "GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n";
    for req in [long_url.as_str(), negative, bad_header] {
        let req = req.to_string();
        let answer = tokio::task::spawn_blocking(move || raw_request(addr, req.as_bytes()))
            .await
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{}",
            &answer[..answer.len().min(200)]
        );
        assert_json_error(&answer);
    }
    // The server is unharmed and the answers of the application are unchanged.
    let (status, body) = app.get_json("/api/v1/firmware/nope").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}

/// The scope each route declares where it is registered, seen from outside: without a token
/// → 401; with a `read` token → 403 when the route needs more; open routes need nothing.
#[tokio::test]
async fn routes_need_the_scope_of_their_work() {
    let app = spawn_app().await;
    let read = app.create_token("route-reader", &["read"]).await;
    let anonymous = reqwest::Client::new();
    let reader = authed_client(&read);
    // (method, path, needs a token, needs more than read)
    let cases = [
        ("GET", "/healthz", false, false),
        ("GET", "/readyz", false, false),
        ("GET", "/api/v1/openapi.json", false, false),
        ("GET", "/", false, false),
        ("GET", "/metrics", true, false),
        ("GET", "/files/01ABC/a.bin", true, false),
        ("HEAD", "/dl/t/sn/a.bin", true, false),
        ("GET", "/dl/t/sn/123-abc/a.bin", false, false),
        ("GET", "/dl/t/sn/123-abc/a.bin/extra", true, false),
        ("GET", "/api/v1/firmware", true, false),
        ("POST", "/api/v1/firmware?file_name=x_1.zip", true, true),
        ("PUT", "/api/v1/firmware?file_name=x_1.zip", true, true),
        ("POST", "/api/v1/firmware/x/disable", true, true),
        ("DELETE", "/api/v1/firmware/x", true, true),
        ("POST", "/api/v1/ota", true, true),
        ("POST", "/api/v1/rollouts/x/pause", true, true),
        ("PUT", "/api/v1/devices/sn", true, true),
        ("DELETE", "/api/v1/devices/sn", true, true),
        ("GET", "/api/v1/tokens", true, true),
        ("GET", "/api/v1/audit", true, true),
        ("GET", "/api/v2/anything", true, false),
    ];
    for (method, path, token, more) in cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let status = anonymous
            .request(m.clone(), app.url(path))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(
            status == 401,
            token,
            "{method} {path} without a token: {status}"
        );
        let status = reader
            .request(m, app.url(path))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(
            status == 403,
            more,
            "{method} {path} with a read token: {status}"
        );
        assert_ne!(status, 401, "{method} {path} with a read token");
    }
}
