//! Operations endpoints and the JSON error shape of framework errors.

use futures::StreamExt;

use crate::helpers::*;

#[tokio::test]
async fn health_ready_metrics_openapi() {
    let app = spawn_app().await;
    let resp = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert!(resp.headers().contains_key("x-request-id"));
    let (status, body) = app.get_json("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["catalog"], "ok");
    assert_eq!(body["blob_store"], "ok");
    assert!(body["mqtt"].is_string());
    app.upload_ok("dock_1.0.zip", payload(1000, 1)).await;
    let text = app.metrics().await;
    assert!(text.contains("fwrepo_uploads_created_total 1"), "{text}");
    assert!(text.contains("fwrepo_bytes_in_total 1000"));
    assert!(text.contains("fwrepo_active_downloads"));
    let (status, spec) = app.get_json("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    // Bearer tokens everywhere except the open endpoints, whose security is empty.
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(spec["security"][0]["bearer"], serde_json::json!([]));
    assert_eq!(
        spec["paths"]["/healthz"]["get"]["security"],
        serde_json::json!([{}])
    );
    assert!(spec["paths"]["/api/v1/firmware"]["post"]["responses"]["401"].is_object());
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/firmware",
        "/api/v1/firmware/{id}",
        "/api/v1/downloads",
        "/files/{id}/{file_name}",
        "/readyz",
        "/api/v1/ota",
        "/api/v1/ota/{id}/events",
        "/dl/{task_id}/{sn}/{file_name}",
        "/api/v1/devices/{sn}",
        "/api/v1/rollouts",
        "/api/v1/rollouts/{id}",
        "/api/v1/rollouts/{id}/{action}",
        "/api/v1/rollouts/{id}/devices",
        "/api/v1/rollouts/{id}/timeline",
        "/api/v1/rollouts/{id}/events",
        "/api/v1/tokens",
        "/api/v1/tokens/{id}",
        "/api/v1/audit",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    // Every schema reference resolves (an OpenAPI client or fuzzer needs them all).
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    out.push(r.to_string());
                }
                m.values().for_each(|x| refs(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    // Operation ids are unique (OpenAPI requires it; code generators key on them).
    let mut ids = std::collections::HashSet::new();
    for item in spec["paths"].as_object().unwrap().values() {
        for op in item.as_object().unwrap().values() {
            if let Some(id) = op["operationId"].as_str() {
                assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
            }
        }
    }
    let mut all = Vec::new();
    refs(&spec, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or(&r);
        assert!(
            spec["components"]["schemas"][name].is_object(),
            "unresolved {r}"
        );
    }
}

#[tokio::test]
async fn framework_errors_are_json() {
    let app = spawn_app().await;
    let (status, body) = app.get_json("/api/v1/nothing-here").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let resp = app
        .client
        .patch(app.url("/api/v1/firmware"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    // RFC 9110: a 405 lists what the resource does allow.
    assert_eq!(resp.headers()["allow"], "POST, PUT, GET");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    // A route with one method answers the others the same way (not 404).
    let resp = app
        .client
        .request(reqwest::Method::TRACE, app.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET");
}

#[tokio::test]
async fn a_burst_from_one_client_is_rate_limited_others_are_not() {
    let app = spawn_with(|s| {
        s.api_rate_limit = 1;
        s.api_burst = 20;
        // The test client is a trusted proxy: X-Forwarded-For names the client.
        s.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let a = app.create_token("client-a", &["read"]).await;
    let b = app.create_token("client-b", &["read"]).await;
    let client = reqwest::Client::new();
    let get = |token: Option<String>, ip: &'static str| {
        let url = app.url("/api/v1/firmware");
        let client = client.clone();
        async move {
            let mut rb = client.get(url).header("x-forwarded-for", ip);
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            rb.send().await.unwrap()
        }
    };
    // 1,000 at once with one token: the burst passes, the rest get 429 with Retry-After.
    let answers: Vec<reqwest::Response> = futures::stream::iter(0..1000)
        .map(|_| get(Some(a.clone()), "203.0.113.7"))
        .buffer_unordered(100)
        .collect()
        .await;
    let ok = answers.iter().filter(|r| r.status() == 200).count();
    let limited: Vec<_> = answers.iter().filter(|r| r.status() == 429).collect();
    assert!((20..=22).contains(&ok), "{ok} answered");
    assert_eq!(ok + limited.len(), 1000);
    let retry: u64 = limited[0].headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body: serde_json::Value = get(Some(a.clone()), "203.0.113.7")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["error"], "rate_limited");
    // Another token (even from the same address) is unaffected.
    assert_eq!(get(Some(b.clone()), "203.0.113.7").await.status(), 200);
    // Requests without a token spend their address's budget: 401s, then 429s.
    let answers = futures::future::join_all((0..30).map(|_| get(None, "198.51.100.9"))).await;
    let unauthorized = answers.iter().filter(|r| r.status() == 401).count();
    let limited = answers.iter().filter(|r| r.status() == 429).count();
    assert!(
        (20..=22).contains(&unauthorized),
        "{unauthorized} unauthorized"
    );
    assert_eq!(unauthorized + limited, 30);
    // Health checks are unaffected; the server stays healthy.
    let (status, _) = app.get_json("/healthz").await;
    assert_eq!(status, 200);
}
