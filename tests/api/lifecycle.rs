//! Firmware lifecycle: listing with filters and paging, disable/enable, delete as a tombstone.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn list_filters_and_pages_newest_first() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for (i, name) in [
        "dock_1.0.zip",
        "dock_1.10.zip",
        "uav_1.2.zip",
        "dock_1.9.zip",
    ]
    .iter()
    .enumerate()
    {
        ids.push(
            app.upload_ok(name, payload(100 + i, i as u64)).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (_, all) = app.get_json("/api/v1/firmware").await;
    let got: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![&ids[3], &ids[2], &ids[1], &ids[0]]);
    assert!(all["next_cursor"].is_null());
    let (_, docks) = app.get_json("/api/v1/firmware?model=DOCK").await;
    assert_eq!(docks["items"].as_array().unwrap().len(), 3);
    let (_, v) = app
        .get_json("/api/v1/firmware?model=dock&product_version=1.10.0")
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["id"], ids[1].as_str());
    // Paging with an insert between pages.
    let (_, p1) = app.get_json("/api/v1/firmware?limit=2").await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 2);
    let cursor = p1["next_cursor"].as_str().unwrap().to_string();
    app.upload_ok("dock_2.0.zip", payload(10, 99)).await;
    let (_, p2) = app
        .get_json(&format!("/api/v1/firmware?limit=2&cursor={cursor}"))
        .await;
    let got: Vec<&str> = p2["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![&ids[1], &ids[0]]);
    assert!(p2["next_cursor"].is_null());
    // Bad inputs.
    for q in [
        "cursor=!!!",
        "limit=abc",
        "status=bogus",
        "product_version=1.x",
    ] {
        let (status, body) = app.get_json(&format!("/api/v1/firmware?{q}")).await;
        assert_eq!(status, 400, "{q}");
        assert!(
            body["error"] == "invalid_request" || body["error"] == "invalid_version",
            "{body}"
        );
    }
    let (status, body) = app
        .get_json("/api/v1/firmware/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, _) = app.get_json("/api/v1/firmware/nonsense").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn disable_enable_delete() {
    let app = spawn_app().await;
    let r = app.upload_ok("dock_1.0.zip", payload(1000, 1)).await;
    let id = r["id"].as_str().unwrap();
    let url = r["file_url"].as_str().unwrap();
    let (status, body) = app
        .post_json(&format!("/api/v1/firmware/{id}/disable"))
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("disabled")));
    // Disabled firmware still downloads (tasks in flight need it).
    assert_eq!(app.get_with(url, &[]).await.status(), 200);
    let (_, disabled) = app.get_json("/api/v1/firmware?status=disabled").await;
    assert_eq!(disabled["items"].as_array().unwrap().len(), 1);
    let (status, body) = app
        .post_json(&format!("/api/v1/firmware/{id}/enable"))
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    let (status, body) = app.delete_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "deleted");
    assert!(body["deleted_at"].is_string());
    // The tombstone stays visible; further changes answer 410.
    let (status, body) = app.get_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("deleted")));
    for path in ["disable", "enable", "verify"] {
        let (status, body) = app
            .post_json(&format!("/api/v1/firmware/{id}/{path}"))
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (410, Some("firmware_deleted")),
            "{path}"
        );
    }
    let (status, _) = app.delete_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(status, 410);
    // The version is free again.
    let again = app.upload_ok("dock_1.0.zip", payload(1000, 2)).await;
    assert_ne!(again["id"], r["id"]);
    let (status, body) = app
        .delete_json("/api/v1/firmware/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}

struct AlwaysInUse;
impl fwrepo::firmware::UsageGuard for AlwaysInUse {
    fn in_use(&self, _: &fwrepo::store::FirmwareRecord) -> Option<String> {
        Some("task T1 is running it".into())
    }
}

#[tokio::test]
async fn firmware_in_use_guard_blocks_delete_unless_forced() {
    let app = spawn_app().await;
    app.state
        .firmware
        .add_guard(std::sync::Arc::new(AlwaysInUse));
    let r = app.upload_ok("dock_1.0.zip", payload(1000, 1)).await;
    let id = r["id"].as_str().unwrap();
    let (status, body) = app.delete_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("firmware_in_use"))
    );
    let (status, body) = app
        .post_json(&format!("/api/v1/firmware/{id}/disable"))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("firmware_in_use"))
    );
    let (_, rec) = app.get_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(rec["status"], "ready");
    let (status, _) = app
        .delete_json(&format!("/api/v1/firmware/{id}?force=true"))
        .await;
    assert_eq!(status, 200);
    let _: Value = app.get_json(&format!("/api/v1/firmware/{id}")).await.1;
}
