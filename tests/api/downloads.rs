//! Downloads: RFC 9110 ranges and conditionals on the /files/ URL, error answers, and the
//! download sessions that follow each client.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

async fn setup(len: usize) -> (TestApp, Vec<u8>, String, Value) {
    let app = spawn_app().await;
    let data = payload(len, 42);
    let r = app.upload_ok("dock_3.1.4.zip", data.clone()).await;
    let url = r["file_url"].as_str().unwrap().to_string();
    (app, data, url, r)
}

#[tokio::test]
async fn full_get_and_head() {
    let (app, data, url, r) = setup(2_500_000).await;
    let resp = app.get_with(&url, &[]).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["etag"], format!("\"{}\"", r["sha256"].as_str().unwrap()));
    assert!(h.contains_key("last-modified"));
    assert_eq!(h["content-length"], data.len().to_string());
    assert_eq!(resp.bytes().await.unwrap(), data);
    let head = app.client.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], data.len().to_string());
    assert_eq!(head.headers()["etag"], h["etag"]);
}

#[tokio::test]
async fn single_ranges() {
    let (app, data, url, _) = setup(1_000_000).await;
    for (range, lo, hi) in [
        ("bytes=0-99", 0usize, 99usize),
        ("bytes=999000-", 999_000, 999_999),
        ("bytes=-500", 999_500, 999_999),
        ("bytes=600000-2000000", 600_000, 999_999),
    ] {
        let resp = app.get_with(&url, &[("range", range)]).await;
        assert_eq!(resp.status(), 206, "{range}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {lo}-{hi}/1000000")
        );
        assert_eq!(resp.bytes().await.unwrap(), &data[lo..=hi], "{range}");
    }
}

#[tokio::test]
async fn multiple_ranges_are_multipart_byteranges() {
    let (app, data, url, _) = setup(100_000).await;
    let resp = app
        .get_with(&url, &[("range", "bytes=0-9,50000-50009,-5")])
        .await;
    assert_eq!(resp.status(), 206);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap()
        .to_string();
    let declared: usize = resp.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), declared);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("Content-Range: bytes 0-9/100000"));
    assert!(text.contains("Content-Range: bytes 50000-50009/100000"));
    assert!(text.contains("Content-Range: bytes 99995-99999/100000"));
    assert!(text.ends_with(&format!("--{boundary}--\r\n")));
    // The parts carry the right bytes.
    let find = |needle: &[u8]| {
        body.windows(needle.len())
            .position(|w| w == needle)
            .is_some()
    };
    assert!(find(&data[0..10]));
    assert!(find(&data[50000..50010]));
    assert!(find(&data[99995..100000]));
    // Overlapping ranges are coalesced, never amplified.
    let resp = app
        .get_with(&url, &[("range", "bytes=0-999,500-1499,0-")])
        .await;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-range"], "bytes 0-99999/100000");
    assert_eq!(resp.bytes().await.unwrap().len(), 100_000);
}

#[tokio::test]
async fn unsatisfiable_malformed_and_abusive_ranges() {
    let (app, data, url, _) = setup(1000).await;
    let resp = app.get_with(&url, &[("range", "bytes=1000-")]).await;
    assert_eq!(resp.status(), 416);
    assert_eq!(resp.headers()["content-range"], "bytes */1000");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "range_not_satisfiable");
    // Malformed: ignored, the whole file.
    for bad in ["bytes=abc", "bytes=5-1", "pages=1-2", "bytes="] {
        let resp = app.get_with(&url, &[("range", bad)]).await;
        assert_eq!(resp.status(), 200, "{bad}");
        assert_eq!(resp.bytes().await.unwrap(), data);
    }
    // More than 100 ranges.
    let many: Vec<String> = (0..101).map(|i| format!("{i}-{i}")).collect();
    let resp = app
        .get_with(&url, &[("range", &format!("bytes={}", many.join(",")))])
        .await;
    assert_eq!(resp.status(), 416);
    assert_eq!(resp.headers()["content-range"], "bytes */1000");
}

#[tokio::test]
async fn conditional_requests() {
    let (app, data, url, r) = setup(10_000).await;
    let etag = format!("\"{}\"", r["sha256"].as_str().unwrap());
    let resp = app.get_with(&url, &[("if-none-match", &etag)]).await;
    assert_eq!(resp.status(), 304);
    let resp = app
        .get_with(&url, &[("range", "bytes=0-9"), ("if-range", &etag)])
        .await;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap(), &data[..10]);
    let resp = app
        .get_with(&url, &[("range", "bytes=0-9"), ("if-range", "\"stale\"")])
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), data);
    let lm = app.client.head(&url).send().await.unwrap().headers()["last-modified"]
        .to_str()
        .unwrap()
        .to_string();
    let resp = app
        .get_with(&url, &[("range", "bytes=5-9"), ("if-range", &lm)])
        .await;
    assert_eq!(resp.status(), 206);
    let resp = app
        .get_with(
            &url,
            &[
                ("range", "bytes=5-9"),
                ("if-range", "Mon, 01 Jan 2001 00:00:00 GMT"),
            ],
        )
        .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn unknown_deleted_missing_and_corrupt() {
    let (app, _, url, r) = setup(10_000).await;
    let id = r["id"].as_str().unwrap().to_string();
    let resp = app
        .get_with(&app.url("/files/01ARZ3NDEKTSV4RRFFQ69G5FAV/x.zip"), &[])
        .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "not_found");
    let resp = app
        .get_with(&app.url(&format!("/files/{id}/other.zip")), &[])
        .await;
    assert_eq!(resp.status(), 404);
    let resp = app.get_with(&app.url("/files/not-an-id/x.zip"), &[]).await;
    assert_eq!(resp.status(), 404);

    // The blob vanishes behind the record: a clear 502.
    let blob = app.blob_dir().join(&id);
    let saved = std::fs::read(&blob).unwrap();
    std::fs::remove_file(&blob).unwrap();
    let resp = app.get_with(&url, &[]).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "blob_missing");

    // A changed blob: verification marks the firmware corrupt; downloads refuse it.
    let mut bad = saved.clone();
    bad[100] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();
    let (status, body) = app
        .post_json(&format!("/api/v1/firmware/{id}/verify"))
        .await;
    assert_eq!(status, 202);
    assert_eq!(body["verify_status"], "running");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/firmware/{id}")).await.1["status"] == "corrupt"
        })
        .await
    );
    let (_, rec) = app.get_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(rec["verify_status"], "mismatch");
    assert!(rec["verified_at"].is_string());
    let resp = app.get_with(&url, &[]).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "firmware_corrupt"
    );

    // Restored bytes verify again.
    std::fs::write(&blob, &saved).unwrap();
    app.post_json(&format!("/api/v1/firmware/{id}/verify"))
        .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/firmware/{id}")).await.1["status"] == "ready"
        })
        .await
    );

    // Deleted: 410.
    let (status, body) = app.delete_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "deleted");
    let resp = app.get_with(&url, &[]).await;
    assert_eq!(resp.status(), 410);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "firmware_deleted"
    );
    app.assert_blob_count(0).await;
}

#[tokio::test]
async fn segmented_download_is_one_session_at_100_percent() {
    let (app, data, url, r) = setup(4_000_000).await;
    let id = r["id"].as_str().unwrap();
    // Four segments, out of order, one overlapping, by one client.
    for range in [
        "bytes=3000000-",
        "bytes=0-999999",
        "bytes=1000000-1999999",
        "bytes=1500000-2999999",
    ] {
        let resp = app
            .get_with(&url, &[("range", range), ("user-agent", "aria2/1.36")])
            .await;
        assert_eq!(resp.status(), 206);
        resp.bytes().await.unwrap();
    }
    // Another client: its own session.
    let resp = app
        .get_with(&url, &[("range", "bytes=0-99"), ("user-agent", "wget")])
        .await;
    resp.bytes().await.unwrap();
    // HEAD and 304 open none.
    app.client.head(&url).send().await.unwrap();
    let (_, list) = app
        .get_json(&format!("/api/v1/firmware/{id}/downloads"))
        .await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    let aria = items
        .iter()
        .find(|s| s["user_agent"] == "aria2/1.36")
        .unwrap();
    assert_eq!(aria["requests"], 4);
    assert_eq!(aria["bytes_covered"], data.len());
    assert_eq!(aria["bytes_sent"], 4_500_000);
    assert_eq!(aria["percent"], 100.0);
    assert_eq!(aria["state"], "complete");
    assert_eq!(aria["client"], "127.0.0.1");
    assert_eq!(aria["file_size"], data.len());
    let wget = items.iter().find(|s| s["user_agent"] == "wget").unwrap();
    assert_eq!(wget["state"], "active");
    assert_eq!(wget["bytes_covered"], 100);
    // active=true filters; the global list shows both.
    let (_, active) = app.get_json("/api/v1/downloads?active=true").await;
    assert_eq!(active["items"].as_array().unwrap().len(), 1);
    let (_, all) = app.get_json("/api/v1/downloads?limit=1").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1);
    let cursor = all["next_cursor"].as_str().unwrap();
    let (_, next) = app
        .get_json(&format!("/api/v1/downloads?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(next["items"].as_array().unwrap().len(), 1);
    assert_ne!(next["items"][0]["id"], all["items"][0]["id"]);
    // Unknown firmware.
    let (status, _) = app
        .get_json("/api/v1/firmware/01ARZ3NDEKTSV4RRFFQ69G5FAV/downloads")
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn forwarded_for_only_from_trusted_proxies() {
    let app = spawn_with(|s| s.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let r = app.upload_ok("dock_1.0.zip", payload(1000, 1)).await;
    let url = r["file_url"].as_str().unwrap();
    app.get_with(url, &[("x-forwarded-for", "203.0.113.7, 127.0.0.5")])
        .await
        .bytes()
        .await
        .unwrap();
    let (_, list) = app.get_json("/api/v1/downloads").await;
    assert_eq!(list["items"][0]["client"], "203.0.113.7");

    let untrusting = spawn_app().await;
    let r = untrusting.upload_ok("dock_1.0.zip", payload(1000, 1)).await;
    let url = r["file_url"].as_str().unwrap();
    untrusting
        .get_with(url, &[("x-forwarded-for", "203.0.113.7")])
        .await
        .bytes()
        .await
        .unwrap();
    let (_, list) = untrusting.get_json("/api/v1/downloads").await;
    assert_eq!(list["items"][0]["client"], "127.0.0.1");
}
