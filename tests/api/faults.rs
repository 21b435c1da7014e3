//! Fault injection against the real binary: a full disk under the catalog and the blob store,
//! SIGTERM in the middle of an upload, an S3 server that freezes or drops its connections, and
//! an MQTT broker that dies mid-task. Each test checks that nothing acknowledged was lost and
//! that the service recovers by itself (no restart, no operator).
//!
//! Runs when FWREPO_TEST_FAULTS=1 (root: the full-disk test mounts a tmpfs; `.ci/run` sets it);
//! the S3 test also needs FWREPO_TEST_S3_ENDPOINT / FWREPO_TEST_S3_BUCKET (and AWS_* for the
//! server), the broker test a `mosquitto` on PATH. Otherwise each test prints a SKIP line.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;
use crate::proxy::{Link, Proxy};

/// Straight to the process's stderr: libtest captures `eprintln!` of passing tests, and a
/// skipped fault test must be visible in the run's output.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn enabled(name: &str) -> bool {
    if std::env::var("FWREPO_TEST_FAULTS").as_deref() == Ok("1") {
        return true;
    }
    say(&format!(
        "SKIP faults::{name}: set FWREPO_TEST_FAULTS=1 (needs root for tmpfs)"
    ));
    false
}

fn tag() -> String {
    sn("")
}

/// `/readyz` (no token) as (status, body).
async fn readyz(base: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("{base}/readyz")).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Status and body of an answer; the body must be JSON (errors included).
async fn answer(what: &str, resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{what}: answer {status} is not JSON: {text:?}"));
    (status, body)
}

/// A write refused because the catalog cannot store it: 507 `insufficient_storage` or 503
/// `catalog_unavailable`, with a message.
fn assert_storage_refusal(what: &str, status: u16, body: &Value) {
    let pair = (status, body["error"].as_str().unwrap_or_default());
    assert!(
        matches!(
            pair,
            (507, "insufficient_storage") | (503, "catalog_unavailable")
        ),
        "{what}: expected 507 insufficient_storage or 503 catalog_unavailable, got {status} {body}"
    );
    assert!(body["message"].is_string(), "{what}: no message: {body}");
}

/// Files under the blob directory, the readiness probe's scratch file aside (a probe that fails
/// on a full disk leaves it, empty, until the next one succeeds).
fn blob_leftovers(data_dir: &Path) -> Vec<String> {
    list_files(&data_dir.join("blobs"))
        .into_iter()
        .filter(|f| !f.ends_with("/.readyz-probe"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Full disk
// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted for the test; lazily unmounted when dropped (a process may still hold it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// A tmpfs of `size` mounted in a fresh temp dir: (the temp dir, the mount, its path).
    /// Drop the mount before the temp dir (the order of the tuple's bindings does).
    fn scratch(size: &str) -> (tempfile::TempDir, Tmpfs, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let mnt = root.path().join("mnt");
        let fs = Tmpfs::mount(&mnt, size);
        (root, fs, mnt)
    }

    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount on PATH");
        assert!(
            out.status.success(),
            "mount -t tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 1 << 20];
    let mut total = 0u64;
    // Big blocks, then smaller ones for what is left of the last pages.
    for size in [1 << 20, 64 << 10, 4 << 10, 512, 1] {
        loop {
            match f.write(&block[..size]) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let _ = f.sync_all();
    total
}

/// A raw-body upload over a plain socket, reading the answer while the body is still being
/// written: a server refusing an upload answers before reading it all and then closes, which
/// an HTTP client reports as a broken pipe instead of the answer.
async fn raw_upload(server: &ServerProcess, file_name: &str, body: Vec<u8>) -> (u16, Value) {
    let addr = server.base.strip_prefix("http://").unwrap().to_string();
    let head = format!(
        "POST /api/v1/firmware?file_name={file_name} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        server.token,
        body.len()
    );
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_ok() {
            let _ = wr.write_all(&body).await;
        }
        wr
    });
    let read = async {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if let Some(done) = http_answer(&got) {
                return Some(done);
            }
        }
        http_answer(&got)
    };
    let answer = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("no answer to the upload within 60 s");
    writer.abort();
    answer.unwrap_or_else(|| panic!("upload {file_name}: no complete HTTP answer"))
}

/// Status and JSON body of a complete HTTP/1.1 answer with a Content-Length.
fn http_answer(raw: &[u8]) -> Option<(u16, Value)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    let body = raw.get(end + 4..end + 4 + len)?;
    let text = String::from_utf8_lossy(body);
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("answer {status} is not JSON: {text:?}"));
    Some((status, json))
}

/// What the test has been told was stored.
#[derive(Default)]
struct Acked {
    tokens: Vec<String>,
    devices: Vec<String>,
}

/// Sends an API call; when no answer comes, says whether the server process is gone.
async fn exchange(
    server: &mut ServerProcess,
    what: &str,
    request: reqwest::RequestBuilder,
) -> (u16, Value) {
    let e = match request.send().await {
        Ok(resp) => return answer(what, resp).await,
        Err(e) => e,
    };
    let child = std::cell::RefCell::new(&mut server.child);
    wait_until(Duration::from_secs(3), || async {
        matches!(child.borrow_mut().try_wait(), Ok(Some(_)))
    })
    .await;
    let exited = child.borrow_mut().try_wait();
    match exited {
        Ok(Some(status)) => panic!(
            "{what}: no answer; the server exited ({status}); stderr tail: {}",
            tail(&server.stderr())
        ),
        _ => panic!(
            "{what}: no answer from the (still running) server: {e}; stderr tail: {}",
            tail(&server.stderr())
        ),
    }
}

fn tail(log: &str) -> &str {
    let mut cut = log.len().saturating_sub(4000);
    while !log.is_char_boundary(cut) {
        cut += 1;
    }
    &log[cut..]
}

async fn create_token(server: &mut ServerProcess, name: &str) -> (u16, Value) {
    let request = server
        .client()
        .post(format!("{}/api/v1/tokens", server.base))
        .json(&json!({"name": name, "scopes": ["read"]}));
    exchange(server, &format!("POST /api/v1/tokens {name}"), request).await
}

async fn put_device(server: &mut ServerProcess, sn: &str) -> (u16, Value) {
    let request = server
        .client()
        .put(format!("{}/api/v1/devices/{sn}", server.base))
        .json(&json!({"model": "Dock"}));
    exchange(server, &format!("PUT /api/v1/devices/{sn}"), request).await
}

#[tokio::test]
async fn full_disk_refuses_writes_then_recovers_without_restart() {
    if !enabled("full_disk_refuses_writes_then_recovers_without_restart") {
        return;
    }
    let (_root, _fs, mnt) = Tmpfs::scratch("32m");
    // The data directory is on the tmpfs, and so is the server's stderr file (beside it): a
    // log on the disk that fills is the usual case, and must not take the server down.
    let data_dir = mnt.join("data");
    let mut server = ServerProcess::start(&data_dir, &[]);
    let t = tag();
    let mut acked = Acked::default();
    write_while_there_is_room(&mut server, &t, &mut acked).await;
    let fillers = [mnt.join("filler"), mnt.join("filler2")];
    let refused = fill_the_disk(&mut server, &data_dir, &fillers, &t, &mut acked).await;
    not_ready_while_full(&mut server, &data_dir).await;
    // Room again: the service comes back by itself.
    for f in &fillers {
        std::fs::remove_file(f).unwrap();
    }
    let fw = recover_without_restart(&mut server, &t, &mut acked).await;
    // A crash now loses nothing that was acknowledged, before, during or after the fault.
    server.kill9();
    let server = ServerProcess::start(&data_dir, &[]);
    nothing_acknowledged_is_lost(&server, &acked, &refused, &fw).await;
}

/// Some writes while there is room: acknowledged, so they must survive everything after.
async fn write_while_there_is_room(server: &mut ServerProcess, t: &str, acked: &mut Acked) {
    for i in 0..5 {
        let (status, body) = create_token(server, &format!("before-{i}")).await;
        assert_eq!(status, 201, "{body}");
        acked.tokens.push(body["id"].as_str().unwrap().to_string());
        let sn = format!("FULLA{t}{i:03}");
        let (status, body) = put_device(server, &sn).await;
        assert_eq!(status, 200, "{body}");
        acked.devices.push(sn);
    }
    assert_eq!(readyz(&server.base).await.0, 200);
}

/// Fills the file system the catalog and the blobs live on: first but for 2 MiB (an upload
/// bigger than that is refused and leaves nothing), then to the last byte, and writes on:
/// each is acknowledged (then durable) or refused as a storage fault. Returns the refused.
async fn fill_the_disk(
    server: &mut ServerProcess,
    data_dir: &std::path::Path,
    fillers: &[std::path::PathBuf; 2],
    t: &str,
    acked: &mut Acked,
) -> Vec<String> {
    let filled = fill(&fillers[0]);
    assert!(filled > 4 << 20, "the tmpfs was nearly full from the start");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fillers[0])
        .unwrap()
        .set_len(filled - (2 << 20))
        .unwrap();
    // An upload bigger than what is left: the catalog takes its pending row, the blob write
    // hits ENOSPC. 507, and nothing of it stays behind.
    let (status, body) = raw_upload(server, "x_1.0.zip", payload(6 << 20, 11)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (507, Some("insufficient_storage")),
        "upload bigger than the free space: {body}"
    );
    assert_no_leftovers(data_dir, "the failed upload").await;
    // Now full to the last byte.
    let filled = filled - (2 << 20) + fill(&fillers[1]);
    let mut refused = Vec::new();
    for i in 0..100 {
        let name = format!("full-{i}");
        let (status, body) = create_token(server, &name).await;
        if (200..300).contains(&status) {
            acked.tokens.push(body["id"].as_str().unwrap().to_string());
        } else {
            assert_storage_refusal(&format!("token {name}"), status, &body);
            refused.push(name);
        }
        let sn = format!("FULLB{t}{i:03}");
        let (status, body) = put_device(server, &sn).await;
        if (200..300).contains(&status) {
            acked.devices.push(sn);
        } else {
            assert_storage_refusal(&format!("device {sn}"), status, &body);
            refused.push(sn);
        }
    }
    say(&format!(
        "faults::full_disk: {filled} filler bytes; {} refused of 200 writes while full",
        refused.len()
    ));
    refused
}

/// The background watcher notices the catalog cannot write: `/readyz` 503, writes refused
/// with the cause (507), reads go on, an upload is refused and leaves nothing.
async fn not_ready_while_full(server: &mut ServerProcess, data_dir: &std::path::Path) {
    let base = server.base.clone();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            readyz(&base).await.0 == 503
        })
        .await,
        "/readyz stayed {:?} on a full disk; stderr: {}",
        readyz(&base).await,
        server.stderr()
    );
    let (_, ready) = readyz(&base).await;
    assert_eq!(ready["status"], "not_ready", "{ready}");
    let (status, body) = create_token(server, "while-not-ready").await;
    assert_storage_refusal("token while /readyz is 503", status, &body);
    assert_eq!(
        (status, body["error"].as_str()),
        (507, Some("insufficient_storage")),
        "{body}"
    );
    // Reads go on: the tokens acknowledged so far are listed.
    let page = get_json_at(&base, "/api/v1/tokens?limit=500").await;
    assert!(
        page["items"].as_array().is_some_and(|i| !i.is_empty()),
        "{page}"
    );
    // An upload is refused too (by the catalog, before any blob write).
    let (status, body) = raw_upload(server, "x_1.0.zip", payload(4 << 20, 12)).await;
    assert_storage_refusal("upload on a full disk", status, &body);
    assert_no_leftovers(data_dir, "the refused upload").await;
}

async fn assert_no_leftovers(data_dir: &std::path::Path, what: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || async {
            blob_leftovers(data_dir).is_empty()
        })
        .await,
        "{what} left {:?}",
        blob_leftovers(data_dir)
    );
}

/// Once the disk has room, `/readyz` comes back and writes work again without a restart.
/// Returns the firmware uploaded afterwards.
async fn recover_without_restart(server: &mut ServerProcess, t: &str, acked: &mut Acked) -> Value {
    let base = server.base.clone();
    assert!(
        wait_until(Duration::from_secs(15), || async {
            readyz(&base).await.0 == 200
        })
        .await,
        "/readyz did not come back after the disk was freed: {:?}; stderr: {}",
        readyz(&base).await,
        server.stderr()
    );
    // The upload refused on the full disk left no record.
    let list = get_json_at(&base, "/api/v1/firmware").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
    let (status, body) = create_token(server, "after").await;
    assert_eq!(status, 201, "token after recovery: {body}");
    acked.tokens.push(body["id"].as_str().unwrap().to_string());
    let sn = format!("FULLC{t}000");
    let (status, body) = put_device(server, &sn).await;
    assert_eq!(status, 200, "device after recovery: {body}");
    acked.devices.push(sn);
    let resp = server
        .client()
        .post(format!("{base}/api/v1/firmware?file_name=x_1.0.zip"))
        .header("content-type", "application/octet-stream")
        .body(payload(1 << 20, 12))
        .send()
        .await
        .unwrap();
    let (status, fw) = answer("upload after recovery", resp).await;
    assert_eq!(status, 201, "{fw}");
    fw
}

/// After kill -9 and a restart, every acknowledged token, device and the firmware are there.
async fn nothing_acknowledged_is_lost(
    server: &ServerProcess,
    acked: &Acked,
    refused: &[String],
    fw: &Value,
) {
    let client = server.client();
    let get = |path: String| {
        let client = client.clone();
        let url = format!("{}{path}", server.base);
        async move { answer("GET", client.get(url).send().await.unwrap()).await }
    };
    for id in &acked.tokens {
        let (status, body) = get(format!("/api/v1/tokens/{id}")).await;
        assert_eq!(status, 200, "acknowledged token {id} lost: {body}");
    }
    for sn in &acked.devices {
        let (status, body) = get(format!("/api/v1/devices/{sn}")).await;
        assert_eq!(status, 200, "acknowledged device {sn} lost: {body}");
        assert_eq!(body["model"], "Dock", "{body}");
    }
    // Refused writes should not have come back either ("nothing was stored"); reported, not
    // asserted: only what was acknowledged is promised.
    let mut resurrected = 0;
    for sn in refused.iter().filter(|r| r.starts_with("FULLB")) {
        resurrected += usize::from(get(format!("/api/v1/devices/{sn}")).await.0 == 200);
    }
    say(&format!(
        "faults::full_disk: {resurrected} refused device writes present after the restart"
    ));
    let list = get_json_at(&server.base, "/api/v1/firmware").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["id"], fw["id"]);
    say(&format!(
        "faults::full_disk: {} tokens and {} devices acknowledged, all present after kill -9",
        acked.tokens.len(),
        acked.devices.len()
    ));
}

// ---------------------------------------------------------------------------------------------
// 2. SIGTERM mid-upload
// ---------------------------------------------------------------------------------------------

/// A shutdown whose final catalog flush fails says so: the exit status is not success.
#[tokio::test]
async fn sigterm_on_a_full_disk_exits_non_zero() {
    if !enabled("sigterm_on_a_full_disk_exits_non_zero") {
        return;
    }
    let (_root, _fs, mnt) = Tmpfs::scratch("24m");
    let data_dir = mnt.join("data");
    let mut server = ServerProcess::start(&data_dir, &["--shutdown-grace", "5"]);
    let base = server.base.clone();
    let (status, body) = create_token(&mut server, "before").await;
    assert_eq!(status, 201, "{body}");
    fill(&mnt.join("filler"));
    // Writes now fail; the catalog knows it cannot make them durable.
    for i in 0..20 {
        let (status, body) = put_device(&mut server, &format!("FULLS{}{i:03}", tag())).await;
        if status != 200 {
            assert_storage_refusal("device on a full disk", status, &body);
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            readyz(&base).await.0 == 503
        })
        .await
    );
    let status = tokio::task::spawn_blocking(move || server.sigterm())
        .await
        .unwrap();
    assert!(
        !status.success(),
        "a shutdown that could not flush the catalog exited {status:?}"
    );
}

fn part_files(data_dir: &Path) -> Vec<String> {
    list_files(&data_dir.join("blobs"))
        .into_iter()
        .filter(|f| f.ends_with(".part"))
        .collect()
}

#[tokio::test]
async fn sigterm_mid_upload_removes_the_partial_file() {
    if !enabled("sigterm_mid_upload_removes_the_partial_file") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let mut server = ServerProcess::start(&data_dir, &["--shutdown-grace", "2"]);
    let (tx, pending) = held_upload(&server.base, "dock_4.0.zip");
    for i in 0..3 {
        tx.send(Ok(Bytes::from(payload(1 << 20, i)))).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !part_files(&data_dir).is_empty()
        })
        .await,
        "no staging file appeared: {:?}",
        list_files(&data_dir.join("blobs"))
    );
    // The body stays open (tx is alive): the shutdown has to cut the upload itself.
    let (status, server) = tokio::task::spawn_blocking(move || {
        let status = server.sigterm();
        (status, server)
    })
    .await
    .unwrap();
    let leftovers = part_files(&data_dir);
    assert!(
        leftovers.is_empty(),
        "the process exited leaving {leftovers:?}; stderr: {}",
        server.stderr()
    );
    assert!(status.success(), "{status:?}; stderr: {}", server.stderr());
    drop(tx);
    // The cut upload was not acknowledged.
    if let Ok(Ok(resp)) = pending.await {
        assert!(
            !resp.status().is_success(),
            "a cut upload answered {}",
            resp.status()
        );
    }
    drop(server);
    let server = ServerProcess::start(&data_dir, &[]);
    let list = get_json_at(&server.base, "/api/v1/firmware").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
}

// ---------------------------------------------------------------------------------------------
// 3. S3 that freezes or drops connections
// ---------------------------------------------------------------------------------------------

fn s3_env(name: &str) -> Option<(String, String)> {
    if !enabled(name) {
        return None;
    }
    match (
        std::env::var("FWREPO_TEST_S3_ENDPOINT"),
        std::env::var("FWREPO_TEST_S3_BUCKET"),
    ) {
        (Ok(e), Ok(b)) if !e.is_empty() && !b.is_empty() => Some((e, b)),
        _ => {
            say(&format!(
                "SKIP faults::{name}: FWREPO_TEST_S3_ENDPOINT / FWREPO_TEST_S3_BUCKET not set"
            ));
            None
        }
    }
}

/// fwrepo on the S3 server through `proxy`, with short blob timeouts.
fn s3_server(data_dir: &Path, bucket: &str, proxy: &Proxy) -> ServerProcess {
    let store = format!(
        "s3://{bucket}/f{}",
        fwrepo::domain::ids::next().to_lowercase()
    );
    let endpoint = proxy.endpoint();
    ServerProcess::start(
        data_dir,
        &[
            "--blob-store",
            &store,
            "--s3-endpoint",
            &endpoint,
            "--blob-timeout",
            "3",
            "--blob-connect-timeout",
            "2",
        ],
    )
}

fn host_port(endpoint: &str) -> String {
    let u = url::Url::parse(endpoint).expect("FWREPO_TEST_S3_ENDPOINT is a URL");
    format!(
        "{}:{}",
        u.host_str().unwrap(),
        u.port_or_known_default().unwrap()
    )
}

#[tokio::test]
async fn s3_frozen_readiness_answers_and_downloads_end() {
    let Some((endpoint, bucket)) = s3_env("s3_frozen_readiness_answers_and_downloads_end") else {
        return;
    };
    let proxy = Proxy::start(host_port(&endpoint)).await;
    let root = tempfile::tempdir().unwrap();
    let server = s3_server(&root.path().join("data"), &bucket, &proxy);
    let client = server.client();
    let data = payload(2 << 20, 21);
    let resp = client
        .post(format!(
            "{}/api/v1/firmware?file_name=dock_2.0.zip",
            server.base
        ))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    let (status, fw) = answer("upload through the proxy", resp).await;
    assert_eq!(status, 201, "{fw}");
    let url = fw["file_url"].as_str().unwrap().to_string();
    let body = client
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(md5_hex(&body), md5_hex(&data));
    assert_eq!(readyz(&server.base).await.0, 200);

    proxy.set(Link::Frozen);
    // Readiness answers in time whatever S3 does.
    let started = Instant::now();
    let (status, ready) = readyz(&server.base).await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{ready}");
    assert!(
        took < Duration::from_millis(2500),
        "/readyz took {took:?} with a frozen S3 server"
    );
    assert!(ready["blob_store"] != "ok", "{ready}");

    // A download ends with an error instead of hanging: a 5xx JSON answer, or (headers already
    // sent) a body that breaks off.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        let resp = match client.get(&url).send().await {
            Ok(r) => r,
            Err(e) => return format!("request error: {e}"),
        };
        let status = resp.status().as_u16();
        if status >= 500 {
            let (_, body) = answer("download from a frozen S3", resp).await;
            assert!(body["error"].is_string(), "{body}");
            return format!("{status} {body}");
        }
        assert!(
            (200..300).contains(&status),
            "download from a frozen S3 answered {status}"
        );
        match resp.bytes().await {
            Ok(b) => panic!(
                "download from a frozen S3 answered {status} with a complete body of {} bytes",
                b.len()
            ),
            Err(e) => format!("{status}, then the body broke off: {e}"),
        }
    })
    .await;
    let took = started.elapsed();
    let how = ended.unwrap_or_else(|_| panic!("the download still hangs after 60 s"));
    say(&format!(
        "faults::s3_frozen: download ended after {took:?}: {how}"
    ));
    assert!(
        took < Duration::from_secs(15),
        "the download took {took:?} to fail ({how})"
    );

    // The store comes back: so does readiness.
    proxy.set(Link::Pass);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            readyz(&server.base).await.0 == 200
        })
        .await,
        "{:?}",
        readyz(&server.base).await
    );
}

#[tokio::test]
async fn s3_cut_mid_upload_leaves_nothing_and_cleans_up_later() {
    let Some((endpoint, bucket)) = s3_env("s3_cut_mid_upload_leaves_nothing_and_cleans_up_later")
    else {
        return;
    };
    let proxy = Proxy::start(host_port(&endpoint)).await;
    let root = tempfile::tempdir().unwrap();
    let server = s3_server(&root.path().join("data"), &bucket, &proxy);
    // 12 MiB (more than one 8 MiB part), sent as a chunked body with its real MD5: only the
    // cut can make it fail.
    let chunks: Vec<Vec<u8>> = (0..12).map(|i| payload(1 << 20, 100 + i)).collect();
    let md5 = md5_hex(&chunks.concat());
    let (tx, body) = held_body();
    let url = format!(
        "{}/api/v1/firmware?file_name=dock_3.0.zip&md5={md5}",
        server.base
    );
    let client = server.client();
    let pending = tokio::spawn(async move {
        client
            .post(url)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
    });
    // The first 8 MiB part goes to the bucket while the body still flows.
    let before = proxy.upstream_bytes.load(Ordering::Relaxed);
    for c in &chunks[..9] {
        tx.send(Ok(Bytes::from(c.clone()))).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(20), || async {
            proxy.upstream_bytes.load(Ordering::Relaxed) - before >= 1 << 20
        })
        .await,
        "no part reached the proxy"
    );
    proxy.set(Link::Cut);
    for c in &chunks[9..] {
        if tx.send(Ok(Bytes::from(c.clone()))).await.is_err() {
            break;
        }
    }
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("the upload still hangs 60 s after the cut")
        .unwrap()
        .expect("the upload got no answer");
    let (status, body) = answer("upload cut off from S3", resp).await;
    say(&format!(
        "faults::s3_cut: the cut upload answered {status} {body}"
    ));
    assert!(status >= 500, "{status} {body}");
    assert!(body["error"].is_string(), "{body}");
    let list = get_json_at(&server.base, "/api/v1/firmware").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");

    // S3 comes back; the interrupted multipart upload is aborted without anyone's help.
    proxy.set(Link::Pass);
    let restored = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let log = server.stderr();
            log.contains("cleaned up an interrupted upload")
                || log.contains("swept an interrupted upload")
        })
        .await,
        "no clean-up within 30 s; stderr: {}",
        server.stderr()
    );
    say(&format!(
        "faults::s3_cut: cleaned up {:?} after S3 came back",
        restored.elapsed()
    ));
    let list = get_json_at(&server.base, "/api/v1/firmware").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
}

// ---------------------------------------------------------------------------------------------
// 4. Broker gap mid-task
// ---------------------------------------------------------------------------------------------

/// What this test proves: the broker dies (SIGKILL) while the dock is downloading — the task
/// `in_progress`, at least 10 % reported, the package not through yet — and is back on the same
/// port as soon as fwrepo has seen it go (well within half a second). What the broker held dies
/// with it (no persistence); fwrepo's session and the dock's both reconnect by themselves,
/// readiness reports the broker connected within 5 s of its return, and the task still ends
/// `ok` (from the dock's final progress, or by reconciliation from its state reports if that
/// progress was lost) with the dock verified on the new version.
#[tokio::test]
async fn broker_gap_mid_task_reconnects_and_the_task_ends_ok() {
    if !enabled("broker_gap_mid_task_reconnects_and_the_task_ends_ok") {
        return;
    }
    if !have_mosquitto() {
        say(
            "SKIP faults::broker_gap_mid_task_reconnects_and_the_task_ends_ok: no mosquitto on PATH",
        );
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Broker::start(root.path(), port);
    let conf = root.path().join("fwrepo.toml");
    std::fs::write(&conf, "[models]\n\"3-1-0\" = \"Dock\"\n").unwrap();
    let mqtt_url = format!("mqtt://127.0.0.1:{port}");
    let server = ServerProcess::start(
        &root.path().join("data"),
        &["--config", conf.to_str().unwrap(), "--mqtt-url", &mqtt_url],
    );
    let base = server.base.clone();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            readyz(&base).await.1["mqtt"] == "connected"
        })
        .await,
        "{:?}",
        readyz(&base).await
    );
    // One dock downloading at 600 kB/s: about 8 s for the package, progress every 10 %.
    let (prefix, sim) = fleet(&format!("127.0.0.1:{port}"), 1, &["--rate", "600000"]).await;
    let gw = format!("{prefix}0001");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            let d = get_json_at(&base, &format!("/api/v1/devices/{gw}")).await;
            d["online"] == true && d["mode_code"] == 0
        })
        .await,
        "the simulated dock never came online"
    );
    let client = server.client();
    let resp = client
        .post(format!("{base}/api/v1/firmware?file_name=Dock_2.0.zip"))
        .header("content-type", "application/octet-stream")
        .body(payload(5_000_000, 41))
        .send()
        .await
        .unwrap();
    let (status, fw) = answer("upload", resp).await;
    assert_eq!(status, 201, "{fw}");
    let resp = client
        .post(format!("{base}/api/v1/ota"))
        .json(&json!({"gateway_sn": gw, "devices": [{"sn": gw, "firmware_id": fw["id"]}]}))
        .send()
        .await
        .unwrap();
    let (status, task) = answer("POST /api/v1/ota", resp).await;
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap().to_string();
    let task_path = format!("/api/v1/ota/{id}");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            let t = get_json_at(&base, &task_path).await;
            t["status"] == "in_progress" && t["progress"]["percent"].as_i64().unwrap_or(0) >= 10
        })
        .await,
        "the task never got going: {}",
        get_json_at(&base, &task_path).await
    );
    let at_kill = get_json_at(&base, &task_path).await;

    broker.kill();
    // fwrepo sees the broker go, then it comes back on the same port.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            readyz(&base).await.1["mqtt"] != "connected"
        })
        .await,
        "fwrepo never noticed the broker was gone"
    );
    let broker = Broker::start(root.path(), port);
    let back = Instant::now();
    // The gap happened mid-download: the package was not through yet.
    assert!(
        at_kill["progress"]["percent"].as_i64().unwrap_or(100) < 100
            && at_kill["progress"]["step_key"] == "download_firmware",
        "{at_kill}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            readyz(&base).await.1["mqtt"] == "connected"
        })
        .await,
        "fwrepo not connected 5 s after the broker came back: {:?}",
        readyz(&base).await
    );
    say(&format!(
        "faults::broker_gap: fwrepo reconnected {:?} after the broker came back",
        back.elapsed()
    ));
    assert!(
        wait_until(Duration::from_secs(60), || async {
            get_json_at(&base, &task_path).await["status"] == "ok"
        })
        .await,
        "the task did not end ok: {}",
        get_json_at(&base, &task_path).await
    );
    assert!(
        wait_until(Duration::from_secs(20), || async {
            get_json_at(&base, &task_path).await["devices"][0]["outcome"] == "verified"
        })
        .await,
        "{}",
        get_json_at(&base, &task_path).await
    );
    let t = get_json_at(&base, &task_path).await;
    let sources: Vec<&str> = t["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["source"].as_str())
        .collect();
    say(&format!("faults::broker_gap: task history {sources:?}"));
    sim.cancel();
    drop(broker);
}
