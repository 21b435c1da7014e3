//! Operations endpoints and the JSON error shape of framework errors.

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
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("fwrepo_uploads_created_total 1"), "{text}");
    assert!(text.contains("fwrepo_bytes_in_total 1000"));
    assert!(text.contains("fwrepo_active_downloads"));
    let (status, spec) = app.get_json("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/firmware",
        "/api/v1/firmware/{id}",
        "/api/v1/downloads",
        "/files/{id}/{file_name}",
        "/readyz",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
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
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
}
