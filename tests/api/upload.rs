//! Uploads: both forms, parsing, checksums, duplicates and conflicts, and every bad input of
//! the issue — each answered with the contract's JSON error and leaving nothing behind.

use std::time::Duration;

use bytes::Bytes;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn raw_upload_parses_name_and_hashes() {
    let app = spawn_app().await;
    let data = payload(3_000_001, 1);
    let r = app.upload_ok("WM265E_07.01.10.05.zip", data.clone()).await;
    assert_eq!(r["model"], "WM265E");
    assert_eq!(r["product_version"], "07.01.10.05");
    assert_eq!(r["file_size"], 3_000_001);
    assert_eq!(r["md5"], md5_hex(&data));
    assert_eq!(r["sha256"], sha256_hex(&data));
    assert_eq!(r["status"], "ready");
    let id = r["id"].as_str().unwrap();
    assert_eq!(
        r["file_url"],
        format!("{}/files/{id}/WM265E_07.01.10.05.zip", app.base)
    );
    let (status, got) = app.get_json(&format!("/api/v1/firmware/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["md5"], r["md5"]);
    app.assert_blob_count(1).await;
}

#[tokio::test]
async fn autel_name_gives_build_time_and_put_without_content_type_works() {
    let app = spawn_app().await;
    let resp = app
        .client
        .put(app.url("/api/v1/firmware"))
        .query(&[("file_name", "EvoNest-V1.2.0.69-20231215094829.Encrypt.uav")])
        .body(payload(1000, 2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["model"], "EvoNest");
    assert_eq!(r["product_version"], "1.2.0.69");
    assert_eq!(r["build_time"], "2023-12-15T09:48:29Z");
}

#[tokio::test]
async fn multipart_with_text_parts_before_and_after_file() {
    let app = spawn_app().await;
    let data = payload(2_000_000, 3);
    let form = Form::new()
        .text("model", "Dock3")
        .part("file", Part::bytes(data.clone()).file_name("package.bin"))
        .text("product_version", "10.01.0205")
        .text("md5", md5_hex(&data).to_uppercase())
        .text("release_note", "fixes");
    let resp = app
        .client
        .post(app.url("/api/v1/firmware"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["model"], "Dock3");
    assert_eq!(r["product_version"], "10.01.0205");
    assert_eq!(r["file_name"], "package.bin");
    assert_eq!(r["release_note"], "fixes");
    assert_eq!(r["md5"], md5_hex(&data));
}

#[tokio::test]
async fn duplicate_is_200_and_conflict_is_409() {
    let app = spawn_app().await;
    let data = payload(5000, 4);
    let first = app.upload_ok("dock_1.2.zip", data.clone()).await;
    // Same model (other case) and the same normalized version, same bytes: the existing record.
    let resp = app.upload_raw("DOCK_1.2.0.zip", data.clone(), &[]).await;
    assert_eq!(resp.status(), 200);
    let again: Value = resp.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    // Other bytes: conflict.
    let resp = app
        .upload_raw("dock_01.02.zip", payload(5000, 5), &[])
        .await;
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "version_conflict");
    assert_eq!(app.firmware_count().await, 1);
    app.assert_blob_count(1).await;
}

async fn expect_error(resp: reqwest::Response, status: u16, code: &str) {
    assert_eq!(resp.status().as_u16(), status, "expected {status} {code}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn bad_inputs_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let data = payload(1000, 6);
    let md5 = md5_hex(&data);
    // Bad file names.
    for name in [
        "../x_1.0.zip",
        "a/b_1.0.zip",
        "x\u{1}_1.0.zip",
        "a..b_1.0.zip",
        "",
    ] {
        expect_error(
            app.upload_raw(name, data.clone(), &[]).await,
            400,
            "invalid_request",
        )
        .await;
    }
    // No version anywhere.
    expect_error(
        app.upload_raw("firmware.bin", data.clone(), &[]).await,
        422,
        "version_required",
    )
    .await;
    // Non-numeric version.
    expect_error(
        app.upload_raw(
            "firmware.bin",
            data.clone(),
            &[("product_version", "1.2b"), ("model", "m")],
        )
        .await,
        400,
        "invalid_version",
    )
    .await;
    // Malformed checksums.
    for (k, v) in [
        ("md5", "xyz"),
        ("md5", &md5[..31]),
        ("sha256", "00"),
        ("sha256", &"g".repeat(64)),
    ] {
        expect_error(
            app.upload_raw("m_1.0.zip", data.clone(), &[(k, v)]).await,
            400,
            "invalid_request",
        )
        .await;
    }
    // Checksum mismatch, in both forms.
    let wrong = "0".repeat(32);
    expect_error(
        app.upload_raw("m_1.0.zip", data.clone(), &[("md5", &wrong)])
            .await,
        422,
        "checksum_mismatch",
    )
    .await;
    let form = Form::new()
        .part("file", Part::bytes(data.clone()).file_name("m_1.0.zip"))
        .text("sha256", "0".repeat(64));
    let resp = app
        .client
        .post(app.url("/api/v1/firmware"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    expect_error(resp, 422, "checksum_mismatch").await;
    // Empty file.
    expect_error(
        app.upload_raw("m_1.0.zip", Vec::new(), &[]).await,
        400,
        "invalid_request",
    )
    .await;
    // Raw body without a file name.
    let resp = app
        .client
        .post(app.url("/api/v1/firmware"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
    // Unsupported media type.
    let resp = app
        .client
        .post(app.url("/api/v1/firmware?file_name=m_1.0.zip"))
        .header("content-type", "text/plain")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, 415, "unsupported_media_type").await;
    // Multipart without a file part, with two file parts, with a garbage body.
    let form = Form::new().text("model", "m");
    let resp = app
        .client
        .post(app.url("/api/v1/firmware"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
    let form = Form::new()
        .part("file", Part::bytes(data.clone()).file_name("m_1.0.zip"))
        .part("file", Part::bytes(data.clone()).file_name("m_1.1.zip"));
    let resp = app
        .client
        .post(app.url("/api/v1/firmware"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
    let resp = app
        .client
        .post(app.url("/api/v1/firmware"))
        .header("content-type", "multipart/form-data; boundary=xyz")
        .body("this is not multipart")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
    // Nothing was stored.
    assert_eq!(app.firmware_count().await, 0);
    app.assert_blob_count(0).await;
}

#[tokio::test]
async fn size_limit_is_413_before_and_while_reading() {
    let app = spawn_with(|s| s.max_upload_bytes = 10_000).await;
    // Declared too large.
    expect_error(
        app.upload_raw("m_1.0.zip", payload(20_000, 7), &[]).await,
        413,
        "too_large",
    )
    .await;
    // Chunked body, no declared length: refused as the bytes arrive.
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        (0..4).map(|i| Ok(Bytes::from(payload(4000, i)))).collect();
    let resp = app
        .client
        .post(app.url(&format!(
            "/api/v1/firmware?file_name=m_1.0.zip&md5={}",
            "0".repeat(32)
        )))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    expect_error(resp, 413, "too_large").await;
    // Exactly at the limit is fine.
    app.upload_ok("m_1.1.zip", payload(10_000, 8)).await;
    app.assert_blob_count(1).await;
}

#[tokio::test]
async fn declared_length_beyond_free_space_is_507() {
    let app = spawn_with(|s| s.max_upload_bytes = u64::MAX / 2).await;
    let req = "POST /api/v1/firmware?file_name=m_1.0.zip HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000000000000000\r\nConnection: close\r\n\r\nabc";
    let req = req.replace(
        "Host: x\r\n",
        &format!("Host: x\r\nAuthorization: Bearer {}\r\n", app.token),
    );
    let addr = app.addr;
    let answer = tokio::task::spawn_blocking(move || raw_request(addr, req.as_bytes()))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(answer.contains("\"insufficient_storage\""), "{answer}");
    app.assert_blob_count(0).await;
}

#[tokio::test]
async fn too_many_concurrent_uploads_is_429() {
    let app = spawn_with(|s| s.max_concurrent_uploads = 1).await;
    let (tx, body) = held_body();
    let first_data = payload(1000, 9);
    let url = app.url(&format!(
        "/api/v1/firmware?file_name=m_1.0.zip&md5={}",
        md5_hex(&first_data)
    ));
    let client = app.client.clone();
    let first = tokio::spawn(async move {
        client
            .post(url)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .unwrap()
    });
    tx.send(Ok(Bytes::from(first_data))).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.state.uploads.in_progress() == 1
        })
        .await
    );
    let resp = app.upload_raw("m_1.1.zip", payload(100, 10), &[]).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "too_many_uploads");
    drop(tx);
    assert_eq!(first.await.unwrap().status(), 201);
}

/// Sends a request head and part of its body, then closes the connection.
fn send_partial(addr: std::net::SocketAddr, head: String, chunks: usize) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    for i in 0..chunks {
        let data = payload(1 << 20, i as u64);
        if head.contains("chunked") {
            s.write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .unwrap();
            s.write_all(&data).unwrap();
            s.write_all(b"\r\n").unwrap();
        } else {
            s.write_all(&data).unwrap();
        }
    }
    s.flush().unwrap();
    // The client dies mid-body.
    drop(s);
}

#[tokio::test]
async fn client_disconnect_mid_upload_leaves_nothing() {
    let app = spawn_app().await;
    let heads = [
        "POST /api/v1/firmware?file_name=m_1.0.zip HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 20000000\r\n\r\n",
        "POST /api/v1/firmware?file_name=m_1.0.zip HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST /api/v1/firmware HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 20000000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m_1.0.zip\"\r\n\r\n",
    ];
    for head in heads {
        let head = head.replace(
            "m_1.0.zip",
            "m_1.0.zip&md5=00112233445566778899aabbccddeeff",
        );
        let addr = app.addr;
        let head = head.replace(
            "Host: x\r\n",
            &format!("Host: x\r\nAuthorization: Bearer {}\r\n", app.token),
        );
        tokio::task::spawn_blocking(move || send_partial(addr, head, 6))
            .await
            .unwrap();
        app.assert_blob_count(0).await;
        assert!(app.state.uploads.pending().await.unwrap().is_empty());
    }
    assert_eq!(app.firmware_count().await, 0);
}

#[tokio::test]
async fn concurrent_identical_uploads_keep_one_record() {
    let app = spawn_with(|s| s.max_concurrent_uploads = 4).await;
    let data = payload(300_000, 11);
    let mut handles = Vec::new();
    for _ in 0..3 {
        let (client, url, data) = (
            app.client.clone(),
            app.url("/api/v1/firmware?file_name=race_2.0.zip"),
            data.clone(),
        );
        handles.push(tokio::spawn(async move {
            client
                .post(url)
                .body(data)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for h in handles {
        statuses.push(h.await.unwrap());
    }
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(statuses.iter().all(|s| *s == 200 || *s == 201));
    assert_eq!(app.firmware_count().await, 1);
    app.assert_blob_count(1).await;
}

#[tokio::test]
async fn chunked_raw_upload_needs_a_checksum() {
    let app = spawn_app().await;
    let data = payload(3_000_000, 12);
    let chunks = |d: &[u8]| -> Vec<Result<Bytes, std::io::Error>> {
        d.chunks(100_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    };
    let send = |q: String, d: Vec<u8>| {
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1/firmware?{q}"));
        async move {
            client
                .post(url)
                .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks(
                    &d,
                ))))
                .send()
                .await
                .unwrap()
        }
    };
    let resp = send("file_name=m_1.0.zip".into(), data[..2000].to_vec()).await;
    assert_eq!(resp.status(), 411);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
    let resp = send(
        format!("file_name=m_1.0.zip&sha256={}", sha256_hex(&data)),
        data.clone(),
    )
    .await;
    assert_eq!(resp.status(), 201);
    app.assert_blob_count(1).await;
}
