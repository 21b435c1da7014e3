//! Test harness: spawn the server in-process (or the real binary), typed helpers per endpoint.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fwrepo::config::Settings;
use fwrepo::startup::Application;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A running in-process server.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    /// A client that sends the bootstrap admin token.
    pub client: reqwest::Client,
    /// The bootstrap admin token (`<data-dir>/admin.token`).
    pub token: String,
    pub dir: tempfile::TempDir,
    pub shutdown: CancellationToken,
    pub state: fwrepo::http::AppState,
}

/// The bootstrap admin token a server wrote into `data_dir`.
pub fn admin_token(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("admin.token"))
        .expect("admin.token in the data dir")
        .trim()
        .to_string()
}

/// An HTTP client that sends `token` with every request.
pub fn authed_client(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Admin tokens of the servers started as processes, by base URL (a restarted server keeps
/// its data dir, so its token).
static TOKENS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

type Databases = Vec<(PathBuf, fwrepo::catalog::postgres::testing::TestDatabase)>;

/// Test databases by data directory (a restarted server process gets its database back). An
/// in-process server's database goes with it (see `Drop for TestApp`); a process's stays for the
/// whole run.
static DATABASES: std::sync::Mutex<Databases> = std::sync::Mutex::new(Vec::new());

/// With `FWREPO_TEST_CATALOG=postgres` (and `FWREPO_TEST_POSTGRES_URL`), every test server
/// keeps its catalog in a PostgreSQL database of its own: `.ci/run` runs the integration
/// suite a second time so. Returns the URL of `data_dir`'s database, or `None` for sled.
pub fn test_catalog(data_dir: &Path) -> Option<String> {
    if std::env::var("FWREPO_TEST_CATALOG").ok()?.as_str() != "postgres" {
        return None;
    }
    let mut dbs = DATABASES.lock().unwrap();
    if let Some((_, db)) = dbs.iter().find(|(d, _)| d == data_dir) {
        return Some(db.url().to_string());
    }
    // Made on a thread of its own: callers may be inside a runtime or not.
    let db = std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(fwrepo::catalog::postgres::testing::TestDatabase::create())
    })
    .join()
    .unwrap()
    .expect("FWREPO_TEST_CATALOG=postgres needs FWREPO_TEST_POSTGRES_URL");
    let url = db.url().to_string();
    dbs.push((data_dir.to_path_buf(), db));
    Some(url)
}

/// A client with the admin token of the server process at `base`.
pub fn client_for(base: &str) -> reqwest::Client {
    let tokens = TOKENS.lock().unwrap();
    let token = tokens
        .iter()
        .rev()
        .find(|(b, _)| b == base)
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| panic!("no server process at {base}"));
    authed_client(&token)
}

pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok() {
        fwrepo::telemetry::init(fwrepo::config::LogFormat::Text);
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

pub async fn spawn_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::for_data_dir(dir.path());
    settings.progress_flush_secs = 1;
    if let Some(url) = test_catalog(dir.path()) {
        settings.catalog =
            fwrepo::catalog::CatalogBackend::parse(Some(&url), dir.path(), 8, Default::default())
                .unwrap();
    }
    adjust(&mut settings);
    spawn_settings(settings, dir).await
}

pub async fn spawn_settings(settings: Settings, dir: tempfile::TempDir) -> TestApp {
    let app = Application::build(settings).await.expect("build app");
    let addr = app.http_addr();
    let state = app.state().clone();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let token = admin_token(dir.path());
    TestApp {
        addr,
        base: format!("http://{addr}"),
        client: authed_client(&token),
        token,
        dir,
        shutdown,
        state,
    }
}

/// Random-ish bytes (deterministic per seed).
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(data))
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Waits until the server process at `base` has put on disk everything written before the
/// call: two more catalog flushes (the first may have begun before), seen in its metrics.
pub async fn wait_for_catalog_flush(base: &str) {
    wait_for_counter(base, "fwrepo_catalog_flushes_total").await;
}

/// The value of the counter `name` in the metrics of the server process at `base` (0 when
/// absent).
pub async fn counter(base: &str, name: &str) -> u64 {
    let text = client_for(base)
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_value(&text, name)
}

/// The value of `name` in Prometheus text (0 when absent).
pub fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the counter `name` in the metrics of the server process at `base` has grown by
/// two (a pass that began after the call has ended).
pub async fn wait_for_counter(base: &str, name: &str) {
    let read = || counter(base, name);
    let start = read().await;
    assert!(
        wait_until(Duration::from_secs(15), || async {
            read().await >= start + 2
        })
        .await,
        "{name} did not grow within 15 s"
    );
}

/// A serial number no other test uses: `prefix` and the random tail of a fresh ULID.
pub fn sn(prefix: &str) -> String {
    format!("{prefix}{}", &fwrepo::domain::ids::next()[16..])
}

/// Polls `cond` until true or the timeout (no sleeps as synchronisation).
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

impl Drop for TestApp {
    /// Stops the server and drops its test database. Its HTTP workers run on threads of their
    /// own that outlive the test's runtime, so without this every in-process server would keep
    /// its catalog connections open until the run ends (and a long run exhausts the
    /// PostgreSQL server's connection slots). `DROP DATABASE … WITH (FORCE)` ends them.
    fn drop(&mut self) {
        self.shutdown.cancel();
        let mut dbs = DATABASES.lock().unwrap_or_else(|e| e.into_inner());
        dbs.retain(|(dir, _)| dir != self.dir.path());
    }
}

impl TestApp {
    /// Creates a token with `scopes` (as the admin) and returns it.
    pub async fn create_token(&self, name: &str, scopes: &[&str]) -> String {
        let resp = self
            .client
            .post(self.url("/api/v1/tokens"))
            .json(&serde_json::json!({"name": name, "scopes": scopes}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let v: Value = resp.json().await.unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn blob_dir(&self) -> PathBuf {
        self.dir.path().join("blobs")
    }

    /// Raw-body upload with query parameters.
    pub async fn upload_raw(
        &self,
        file_name: &str,
        data: Vec<u8>,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut q = vec![("file_name", file_name)];
        q.extend_from_slice(extra);
        self.client
            .post(self.url("/api/v1/firmware"))
            .query(&q)
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .await
            .unwrap()
    }

    /// Uploads and asserts success; returns the record.
    pub async fn upload_ok(&self, file_name: &str, data: Vec<u8>) -> Value {
        let resp = self.upload_raw(file_name, data, &[]).await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "upload failed: {status} {body}");
        body
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn post_json(&self, path: &str) -> (u16, Value) {
        let resp = self.client.post(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn delete_json(&self, path: &str) -> (u16, Value) {
        let resp = self.client.delete(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// GET with headers; returns the response.
    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut rb = self.client.get(url);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        rb.send().await.unwrap()
    }

    /// Files in the blob directory (staging files included).
    pub fn blob_files(&self) -> Vec<String> {
        list_files(&self.blob_dir())
    }

    /// Waits until the blob directory holds exactly `n` files and no upload is pending.
    pub async fn assert_blob_count(&self, n: usize) {
        let ok = wait_until(Duration::from_secs(10), || async {
            self.blob_files().len() == n && self.state.uploads.in_progress() == 0
        })
        .await;
        assert!(
            ok,
            "blob dir should hold {n} files, has {:?}",
            self.blob_files()
        );
    }

    pub async fn firmware_count(&self) -> usize {
        let (_, body) = self.get_json("/api/v1/firmware?limit=500").await;
        body["items"].as_array().map_or(0, Vec::len)
    }
}

pub fn list_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(list_files(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

/// Sends raw bytes over TCP and returns the whole answer as text (for requests a normal client
/// refuses to make: lying Content-Length, half bodies).
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (and close) before reading everything: that is the answer.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The real binary, for restart and CLI tests.
pub struct ServerProcess {
    pub child: Child,
    pub base: String,
    /// The broker as "host:port".
    pub mqtt: String,
    pub stderr_path: PathBuf,
    /// The bootstrap admin token.
    pub token: String,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fwrepo")
}

impl ServerProcess {
    /// Starts `fwrepo serve` on `data_dir` with port 0 and reads the bound address.
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        let stderr_path = data_dir.with_extension(format!("stderr.{}", std::process::id()));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("serve").arg("--data-dir").arg(data_dir);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--mqtt-listen") && !extra.contains(&"--mqtt-url") {
            cmd.args(["--mqtt-listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--catalog")
            && let Some(url) = test_catalog(data_dir)
        {
            cmd.args(["--catalog", &url]);
        }
        let mut child = cmd
            .args(extra)
            .env_remove("FWREPO_LISTEN")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let line = String::from_utf8(line).unwrap();
        let mut mqtt_line = Vec::new();
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            mqtt_line.push(byte[0]);
        }
        let mqtt = String::from_utf8(mqtt_line)
            .unwrap()
            .rsplit("mqtt://")
            .next()
            .unwrap_or_default()
            .to_string();
        let base = line
            .strip_prefix("HTTP listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; stderr: {}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                )
            })
            .to_string();
        // Keep draining stdout so the child never blocks on it.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
        });
        // A replica joining a deployment whose token another replica made has none of its own.
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        TOKENS.lock().unwrap().push((base.clone(), token.clone()));
        ServerProcess {
            child,
            base,
            mqtt,
            stderr_path,
            token,
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends `signal` (a name `kill` knows: STOP, CONT, …) to the server process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// A request body the test feeds by hand, to hold an upload open or cut it off.
pub fn held_body() -> (
    tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    reqwest::Body,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) });
    (tx, reqwest::Body::wrap_stream(stream))
}

/// A raw upload of `file_name` to the server process at `base` whose body stays open until
/// the returned sender is dropped (chunked, so it carries an MD5 that will never match):
/// the sender of its chunks and the pending answer.
pub fn held_upload(
    base: &str,
    file_name: &str,
) -> (
    tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let (tx, body) = held_body();
    let url = format!(
        "{base}/api/v1/firmware?file_name={file_name}&md5={}",
        "0".repeat(32)
    );
    let client = client_for(base);
    let pending = tokio::spawn(async move {
        client
            .post(url)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
    });
    (tx, pending)
}

impl ServerProcess {
    /// A client that sends this server's admin token.
    pub fn client(&self) -> reqwest::Client {
        authed_client(&self.token)
    }
}

/// GET a JSON document (with the admin token) from a server started as a process.
pub async fn get_json_at(base: &str, path: &str) -> Value {
    client_for(base)
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// An MQTT client of the test's own (unique client id), connected to `addr` ("host:port").
pub async fn mqtt_client(
    addr: &str,
    tag: &str,
) -> (
    TestClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let id = format!("test-{tag}-{}", fwrepo::domain::ids::next().to_lowercase());
    let mut opts = rumqttc::MqttOptions::new(id, host, port.parse().unwrap());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let subacks = Arc::new((AtomicU64::new(0), tokio::sync::Notify::new()));
    let acks = Arc::clone(&subacks);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    acks.0.fetch_add(1, Ordering::SeqCst);
                    acks.1.notify_waiters();
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .unwrap()
        .unwrap();
    (TestClient { client, subacks }, rx)
}

/// A test's MQTT client: an `AsyncClient` (by deref) that can wait for its SUBACKs.
pub struct TestClient {
    client: rumqttc::AsyncClient,
    subacks: Arc<(AtomicU64, tokio::sync::Notify)>,
}

impl std::ops::Deref for TestClient {
    type Target = rumqttc::AsyncClient;
    fn deref(&self) -> &rumqttc::AsyncClient {
        &self.client
    }
}

impl TestClient {
    /// Subscribes at QoS 1 and returns once the broker has acknowledged it (no sleeping for
    /// the subscription to land).
    pub async fn subscribe_acked(&self, topic: impl Into<String>) {
        let before = self.subacks.0.load(Ordering::SeqCst);
        let acked = self.subacks.1.notified();
        tokio::pin!(acked);
        acked.as_mut().enable();
        self.client
            .subscribe(topic, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.subacks.0.load(Ordering::SeqCst) <= before {
            assert!(
                tokio::time::timeout_at(deadline, acked.as_mut())
                    .await
                    .is_ok(),
                "no SUBACK within 10 s"
            );
            acked.set(self.subacks.1.notified());
            acked.as_mut().enable();
        }
    }
}

impl TestApp {
    /// Waits until the server's MQTT session is up and the broker has acknowledged every one
    /// of its subscriptions: a message published before that may never reach the server.
    pub async fn wait_mqtt_subscribed(&self) {
        assert!(
            wait_until(Duration::from_secs(10), || async {
                self.state.mqtt.status.subscribed.load(Ordering::Relaxed)
            })
            .await,
            "the server's MQTT subscriptions were not acknowledged within 10 s"
        );
    }

    /// The embedded broker's address as "host:port".
    pub fn mqtt_addr(&self) -> String {
        self.state
            .mqtt
            .address_line
            .rsplit("mqtt://")
            .next()
            .unwrap()
            .to_string()
    }
}

/// A free loopback port (for a broker that must come back on the same port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and a server certificate for 127.0.0.1 / localhost, as PEM (ca, cert, key).
pub fn certificates() -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fwrepo test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[derive(clap::Parser)]
struct SimArgs {
    #[command(flatten)]
    sim: fwrepo::simulator::SimConfig,
}

/// Starts `gateways` simulated docks (each with an aircraft) on the app's broker.
pub async fn fleet(
    mqtt_addr: &str,
    gateways: usize,
    extra: &[&str],
) -> (String, CancellationToken) {
    let prefix = sn("R")[..9].to_string();
    let url = format!("mqtt://{mqtt_addr}");
    let n = gateways.to_string();
    let mut argv = vec![
        "sim",
        "--mqtt-url",
        &url,
        "--sn-prefix",
        &prefix,
        "--gateways",
        &n,
        "--osd-every",
        "1",
    ];
    argv.extend_from_slice(extra);
    let cancel = CancellationToken::new();
    fwrepo::simulator::run(
        <SimArgs as clap::Parser>::parse_from(argv).sim,
        cancel.clone(),
    )
    .await
    .unwrap();
    (prefix, cancel)
}

/// Whether `mosquitto` is on PATH.
pub fn have_mosquitto() -> bool {
    std::process::Command::new("mosquitto")
        .arg("-h")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// A mosquitto of the test's own on a loopback port.
pub struct Broker(std::process::Child);

impl Broker {
    pub fn start(dir: &Path, port: u16) -> Broker {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto on PATH");
        let up = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                up.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Broker(child)
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
