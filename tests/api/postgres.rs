//! fwrepo on a PostgreSQL catalog (`FWREPO_TEST_POSTGRES_URL`): the database lost and back
//! while the server runs, and a sled catalog moved into PostgreSQL with the CLI. (The rest
//! of the integration suite runs on PostgreSQL too with `FWREPO_TEST_CATALOG=postgres`.)

use std::process::Command;
use std::time::Duration;

use fwrepo::catalog::postgres::testing::TestDatabase;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::proxy::{Link, Proxy};

/// A fresh database, or a SKIP line.
async fn database(test: &str) -> Option<TestDatabase> {
    let db = TestDatabase::create().await;
    if db.is_none() {
        println!("SKIP postgres::{test}: FWREPO_TEST_POSTGRES_URL not set");
    }
    db
}

fn catalog(url: &str, dir: &std::path::Path) -> fwrepo::catalog::CatalogBackend {
    fwrepo::catalog::CatalogBackend::parse(Some(url), dir, 8, Default::default()).unwrap()
}

async fn put_device(app: &TestApp, sn: &str) -> (u16, Value) {
    let resp = app
        .client
        .put(format!("{}/api/v1/devices/{sn}", app.base))
        .json(&json!({"model": "Dock"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn ready(app: &TestApp) -> u16 {
    app.client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_lost_database_is_503_and_writes_work_again_once_it_is_back() {
    let Some(db) = database("a_lost_database_is_503_and_writes_work_again_once_it_is_back").await
    else {
        return;
    };
    let (proxy, app) = proxied_app(&db).await;
    let before = sn("PGDOCK");
    assert_eq!(put_device(&app, &before).await.0, 200);

    proxy.set(Link::Cut);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            ready(&app).await == 503
        })
        .await,
        "/readyz stayed ready with the database gone"
    );
    let during = sn("PGDOCK");
    let (status, body) = put_device(&app, &during).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "catalog_unavailable", "{body}");

    proxy.set(Link::Pass);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            ready(&app).await == 200
        })
        .await,
        "/readyz did not recover with the database back"
    );
    let after = sn("PGDOCK");
    assert_eq!(put_device(&app, &after).await.0, 200);
    // What was acknowledged before the outage is there; the refused write is not.
    for (sn, there) in [(before, true), (after, true), (during, false)] {
        let (status, _) = app.get_json(&format!("/api/v1/devices/{sn}")).await;
        assert_eq!(status == 200, there, "{sn}");
    }
}

/// The real binary, started while its database does not answer: the port answers at once
/// (`/healthz` 200, `/readyz` and the API 503 `catalog_unavailable`), and the server becomes
/// ready by itself once the database is there.
#[tokio::test]
async fn a_database_down_at_start_is_waited_for_while_the_port_answers_503() {
    use tokio::io::AsyncBufReadExt;
    let Some(db) =
        database("a_database_down_at_start_is_waited_for_while_the_port_answers_503").await
    else {
        return;
    };
    let (proxy, proxied) = proxy_to(&db).await;
    proxy.set(Link::Cut);
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve_on(dir.path(), &proxied)
        .args(["--catalog-connect-timeout", "2", "--log-format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The address lines come once the server is up; meanwhile the log names the port.
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = log.next_line().await.unwrap().expect("the log ended");
        let Ok(entry) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let message = entry["fields"]["message"].as_str().unwrap_or_default();
        if let Some(rest) = message.split("until it is open ").nth(1) {
            break rest.split(' ').next().unwrap().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{base}{path}")).send();

    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let resp = get("/readyz").await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "not_ready", "{body}");
    assert!(
        body["catalog"].as_str().unwrap().starts_with("connecting"),
        "{body}"
    );
    let resp = get("/api/v1/firmware").await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "catalog_unavailable", "{body}");
    assert!(
        !dir.path().join("admin.token").exists(),
        "nothing is set up before the catalog"
    );

    proxy.set(Link::Pass);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            get("/readyz").await.is_ok_and(|r| r.status() == 200)
        })
        .await,
        "the server did not become ready once the database answered"
    );
    let token = admin_token(dir.path());
    let resp = authed_client(&token)
        .get(format!("{base}/api/v1/firmware"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The address lines come once the rest has started.
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap_or_default();
    assert_eq!(first, format!("HTTP listening on {base}"));
    child.kill().await.unwrap();
}

/// What no retry can mend ends the start at once, with the reason: here a database that
/// does not exist.
#[tokio::test]
async fn a_missing_database_fails_the_start_with_the_reason() {
    let Some(db) = database("a_missing_database_fails_the_start_with_the_reason").await else {
        return;
    };
    let mut url = url::Url::parse(db.url()).unwrap();
    url.set_path("/fwrepo_no_such_database");
    let dir = tempfile::tempdir().unwrap();
    let out = serve_on(dir.path(), url.as_str())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the start was retried instead of failing")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fwrepo_no_such_database"), "{stderr}");
}

#[tokio::test]
async fn a_sled_catalog_moves_into_postgres_with_export_and_import() {
    let Some(db) = database("a_sled_catalog_moves_into_postgres_with_export_and_import").await
    else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let sled_dir = root.path().join("sled");
    let mut server = ServerProcess::start(&sled_dir, &["--catalog", "sled"]);
    let client = server.client();
    let data = payload(4096, 7);
    let fw: Value = client
        .post(format!(
            "{}/api/v1/firmware?file_name=Dock_3.0.zip",
            server.base
        ))
        .body(data.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dock = sn("MVDOCK");
    let resp = client
        .put(format!("{}/api/v1/devices/{dock}", server.base))
        .json(&json!({"model": "Dock"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::task::spawn_blocking(move || server.sigterm())
        .await
        .unwrap();

    // Export from the stopped sled catalog, import into PostgreSQL.
    let dump = root.path().join("catalog.jsonl");
    let sled = sled_dir.to_str().unwrap().to_string();
    let (dump_s, url) = (dump.to_str().unwrap().to_string(), db.url().to_string());
    let out = tokio::task::spawn_blocking(move || {
        let export = Command::new(bin())
            .args([
                "export",
                "--data-dir",
                &sled,
                "--catalog",
                "sled",
                "-o",
                &dump_s,
            ])
            .env_remove("FWREPO_CATALOG")
            .output()
            .unwrap();
        assert!(export.status.success(), "{export:?}");
        Command::new(bin())
            .args(["import", "--catalog", &url, "-i", &dump_s])
            .env_remove("FWREPO_CATALOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("firmware 1") && said.contains("device 1"),
        "{said}"
    );

    // A server on PostgreSQL (blobs copied along) serves the same catalog and bytes, and the
    // old admin token works there.
    let pg_dir = root.path().join("pg");
    std::fs::create_dir_all(&pg_dir).unwrap();
    std::fs::copy(sled_dir.join("admin.token"), pg_dir.join("admin.token")).unwrap();
    copy_dir(&sled_dir.join("blobs"), &pg_dir.join("blobs"));
    let server = ServerProcess::start(&pg_dir, &["--catalog", db.url()]);
    let id = fw["id"].as_str().unwrap();
    let got = get_json_at(&server.base, &format!("/api/v1/firmware/{id}")).await;
    assert_eq!(got["sha256"], fw["sha256"]);
    let device = get_json_at(&server.base, &format!("/api/v1/devices/{dock}")).await;
    assert_eq!(device["model"], "Dock");
    let bytes = server
        .client()
        .get(format!("{}/files/{id}/Dock_3.0.zip", server.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), data.as_slice());
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `fwrepo serve` on `data_dir` and the catalog `url`, ports chosen by the system.
fn serve_on(data_dir: &std::path::Path, url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(data_dir)
    .args(["--catalog", url])
    .env_remove("FWREPO_LISTEN");
    cmd
}

/// A proxy in front of `db`'s server, and the URL of `db` through it.
async fn proxy_to(db: &TestDatabase) -> (Proxy, String) {
    let mut url = url::Url::parse(db.url()).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let proxy = Proxy::start(upstream).await;
    url.set_port(Some(proxy.addr.port())).unwrap();
    (proxy, url.to_string())
}

/// fwrepo on PostgreSQL through a proxy the test cuts: the proxy, and the server.
async fn proxied_app(db: &TestDatabase) -> (Proxy, TestApp) {
    let (proxy, proxied) = proxy_to(db).await;
    let app = spawn_with(|s| {
        s.catalog = catalog(&proxied, &s.data_dir);
        if let fwrepo::catalog::CatalogBackend::Postgres(pg) = &mut s.catalog {
            pg.connect_timeout = Duration::from_secs(2);
        }
    })
    .await;
    (proxy, app)
}

#[tokio::test]
async fn an_ota_event_that_could_not_be_recorded_is_delivered_again() {
    use rumqttc::QoS;
    let Some(db) = database("an_ota_event_that_could_not_be_recorded_is_delivered_again").await
    else {
        return;
    };
    let (proxy, app) = proxied_app(&db).await;
    let fw = app.upload_ok("Dock_4.0.zip", payload(1000, 4)).await;
    let dock = sn("ACKDOCK");
    let (client, mut inbox) = mqtt_client(&app.mqtt_addr(), "ack").await;
    client
        .subscribe_acked(format!("thing/product/{dock}/services"))
        .await;
    app.wait_mqtt_subscribed().await;
    let body = json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw["id"]}]});
    let (status, task) = crate::ota::post_ota(&app, body, None).await;
    assert_eq!(status, 202, "{task}");
    let create = crate::ota::next_on(&mut inbox, "/services").await;

    // The gateway's final progress arrives while the database is gone: not recorded, so not
    // acknowledged.
    proxy.set(Link::Cut);
    let ok = json!({"bid": create["bid"], "method": "ota_progress",
        "data": {"result": 0, "output": {"status": "ok", "progress": {"percent": 100}}}});
    client
        .publish(
            format!("thing/product/{dock}/events"),
            QoS::AtLeastOnce,
            false,
            ok.to_string(),
        )
        .await
        .unwrap();
    let withheld =
        || async { metric_value(&app.metrics().await, "fwrepo_mqtt_unacknowledged_total") };
    assert!(
        wait_until(Duration::from_secs(20), || async { withheld().await >= 1 }).await,
        "the event was acknowledged although it could not be stored"
    );

    // The database is back: the broker delivers the event again and the task ends ok.
    proxy.set(Link::Pass);
    let id = task["id"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(40), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["status"] == "ok"
        })
        .await,
        "the unacknowledged event was not delivered again"
    );
}
