//! The S3 blob store against a real S3-compatible server (moto, MinIO, …). Runs when
//! FWREPO_TEST_S3_ENDPOINT and FWREPO_TEST_S3_BUCKET are set (with AWS_ACCESS_KEY_ID,
//! AWS_SECRET_ACCESS_KEY, AWS_REGION for the server); otherwise prints a skip line.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

fn s3_env() -> Option<(String, String)> {
    match (
        std::env::var("FWREPO_TEST_S3_ENDPOINT"),
        std::env::var("FWREPO_TEST_S3_BUCKET"),
    ) {
        (Ok(e), Ok(b)) if !e.is_empty() && !b.is_empty() => Some((e, b)),
        _ => {
            eprintln!("SKIP s3 tests: FWREPO_TEST_S3_ENDPOINT / FWREPO_TEST_S3_BUCKET not set");
            None
        }
    }
}

fn prefix() -> String {
    format!("t{}", fwrepo::domain::ids::next().to_lowercase())
}

#[tokio::test]
async fn s3_upload_download_and_failures() {
    let Some((endpoint, bucket)) = s3_env() else {
        return;
    };
    let p = prefix();
    let app = spawn_with(|s| {
        s.blob_backend = fwrepo::config::BlobBackend::S3 {
            bucket: bucket.clone(),
            prefix: p.clone(),
            endpoint: Some(endpoint.clone()),
        };
    })
    .await;
    // Large enough for several multipart parts.
    let data = payload(20 * 1024 * 1024 + 123, 77);
    let r = app.upload_ok("dock_7.0.zip", data.clone()).await;
    assert_eq!(r["md5"], md5_hex(&data));
    let url = r["file_url"].as_str().unwrap();
    let resp = app
        .get_with(url, &[("range", "bytes=10000000-10000099")])
        .await;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap(), &data[10_000_000..10_000_100]);
    let full = app.get_with(url, &[]).await.bytes().await.unwrap();
    assert_eq!(md5_hex(&full), md5_hex(&data));
    // A checksum mismatch leaves no object.
    let resp = app
        .upload_raw(
            "dock_8.0.zip",
            payload(9 * 1024 * 1024, 1),
            &[("md5", &"0".repeat(32))],
        )
        .await;
    assert_eq!(resp.status(), 422);
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    // Verify re-reads from the bucket.
    let id = r["id"].as_str().unwrap();
    app.post_json(&format!("/api/v1/firmware/{id}/verify"))
        .await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            app.get_json(&format!("/api/v1/firmware/{id}")).await.1["verify_status"] == "ok"
        })
        .await
    );
    assert!(app.state.blobs.size(id).await.is_ok());
    let (status, _) = app.delete_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(status, 200);
    assert!(app.state.blobs.size(id).await.is_err());
    let list = app.state.uploads.pending().await.unwrap();
    assert!(list.is_empty());
    let _: Value = app.get_json("/api/v1/firmware").await.1;
}

#[tokio::test]
async fn s3_crash_mid_upload_is_swept_on_restart() {
    let Some((endpoint, bucket)) = s3_env() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let store = format!("s3://{bucket}/{}", prefix());
    let args = [
        "--blob-store",
        store.as_str(),
        "--s3-endpoint",
        endpoint.as_str(),
    ];
    let mut server = ServerProcess::start(&data_dir, &args);
    let (tx, pending) = held_upload(&server.base, "dock_9.0.zip");
    for i in 0..12 {
        tx.send(Ok(bytes::Bytes::from(payload(1 << 20, i))))
            .await
            .unwrap();
    }
    // Parts are on their way to the bucket (the server has all 12 MiB: more than one 8 MiB
    // part) and the pending upload with its S3 upload id is on disk; then the server dies.
    let base = server.base.clone();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            counter(&base, "fwrepo_bytes_in_total").await >= 12 << 20
        })
        .await,
        "the server never received the 12 MiB sent"
    );
    wait_for_catalog_flush(&base).await;
    server.kill9();
    drop(tx);
    let _ = pending.await;
    let server = ServerProcess::start(&data_dir, &args);
    assert!(
        server.stderr().contains("swept an interrupted upload"),
        "{}",
        server.stderr()
    );
    let list = get_json_at(&server.base, "/api/v1/firmware").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
}
