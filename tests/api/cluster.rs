//! The deployment's replicas: `GET /api/v1/cluster`, who may share a PostgreSQL catalog, and
//! tokens made or revoked on one replica counting on the others.
//! The several-replica test needs PostgreSQL, the S3 server and an external broker
//! (`FWREPO_TEST_POSTGRES_URL`, `FWREPO_TEST_S3_ENDPOINT`/`_BUCKET`, `FWREPO_TEST_MQTT_URL`).

use std::time::Duration;

use fwrepo::catalog::postgres::testing::TestDatabase;
use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn the_cluster_lists_this_replica_to_admins() {
    let app = spawn_app().await;
    let (status, body) = app.get_json("/api/v1/cluster").await;
    assert_eq!(status, 200, "{body}");
    let replicas = body["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{body}");
    let me = &replicas[0];
    assert_eq!(me["id"], body["replica_id"]);
    assert_eq!(me["alive"], true);
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    assert!(me["last_heartbeat"].is_string() && me["started_at"].is_string());
    if std::env::var("FWREPO_TEST_CATALOG").is_err() {
        assert_eq!(
            (me["blob_store"].as_str(), me["broker"].as_str()),
            (Some("local"), Some("embedded"))
        );
    }
    let reader = app.create_token("reader", &["read"]).await;
    let resp = authed_client(&reader)
        .get(app.url("/api/v1/cluster"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

/// What a replica on the shared database, the S3 server and the external broker is started
/// with.
struct Shared {
    db: TestDatabase,
    s3_endpoint: String,
    blob_store: String,
    mqtt_url: String,
    key_file: std::path::PathBuf,
}

impl Shared {
    async fn new(test: &str, root: &std::path::Path) -> Option<Shared> {
        let vars = [
            "FWREPO_TEST_POSTGRES_URL",
            "FWREPO_TEST_S3_ENDPOINT",
            "FWREPO_TEST_S3_BUCKET",
            "FWREPO_TEST_MQTT_URL",
        ];
        if let Some(missing) = vars.iter().find(|v| std::env::var(v).is_err()) {
            println!("SKIP cluster::{test}: {missing} not set");
            return None;
        }
        let env = |v: &str| std::env::var(v).unwrap();
        Some(Shared {
            db: TestDatabase::create().await?,
            s3_endpoint: env("FWREPO_TEST_S3_ENDPOINT"),
            blob_store: format!(
                "s3://{}/c{}",
                env("FWREPO_TEST_S3_BUCKET"),
                fwrepo::domain::ids::next().to_lowercase()
            ),
            mqtt_url: env("FWREPO_TEST_MQTT_URL"),
            key_file: root.join("url-signing.key"),
        })
    }

    fn args<'a>(&'a self, replica: &'a str) -> Vec<&'a str> {
        vec![
            "--catalog",
            self.db.url(),
            "--blob-store",
            &self.blob_store,
            "--s3-endpoint",
            &self.s3_endpoint,
            "--mqtt-url",
            &self.mqtt_url,
            "--replica-id",
            replica,
            "--url-signing-key-file",
            self.key_file.to_str().unwrap(),
        ]
    }
}

#[tokio::test]
async fn replicas_on_one_database_list_each_other_and_one_keeping_packages_locally_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(
        "replicas_on_one_database_list_each_other_and_one_keeping_packages_locally_is_refused",
        root.path(),
    )
    .await
    else {
        return;
    };
    let r1 = ServerProcess::start(&root.path().join("r1"), &shared.args("r1"));
    // The deployment's admin token is made once, by r1; r2 finds it in the catalog (the
    // operator hands it on; the helper reads it from r2's data dir).
    std::fs::create_dir_all(root.path().join("r2")).unwrap();
    std::fs::copy(
        root.path().join("r1").join("admin.token"),
        root.path().join("r2").join("admin.token"),
    )
    .unwrap();
    let r2 = ServerProcess::start(&root.path().join("r2"), &shared.args("r2"));
    let listed = || async {
        let body: Value = get_json_at(&r1.base, "/api/v1/cluster").await;
        body["replicas"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter(|r| r["alive"] == true)
                    .map(|r| r["id"].as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(20), || async {
            listed().await == ["r1", "r2"]
        })
        .await,
        "r1 lists {:?}",
        listed().await
    );
    let body = get_json_at(&r2.base, "/api/v1/cluster").await;
    assert_eq!(body["replica_id"], "r2");
    assert!(
        body["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["blob_store"] == "s3" && r["broker"] == "external")
    );

    // A token made on r1 works on r2 within a few seconds, and so does its revocation.
    let made: Value = r1
        .client()
        .post(format!("{}/api/v1/tokens", r1.base))
        .json(&serde_json::json!({"name": "ci", "scopes": ["read"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = made["token"].as_str().unwrap().to_string();
    let on_r2 = || async {
        authed_client(&token)
            .get(format!("{}/api/v1/firmware", r2.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert!(wait_until(Duration::from_secs(15), || async { on_r2().await == 200 }).await);
    let revoked = r1
        .client()
        .delete(format!(
            "{}/api/v1/tokens/{}",
            r1.base,
            made["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    assert!(wait_until(Duration::from_secs(15), || async { on_r2().await == 401 }).await);

    // A third one keeping packages on its own disk would serve gateways files the others
    // cannot: it does not start, and says why.
    let mut args = shared.args("r3");
    args.truncate(2);
    args.extend(["--mqtt-url", &shared.mqtt_url, "--replica-id", "r3"]);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(root.path().join("r3"))
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .env_remove("FWREPO_LISTEN")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("r3 neither started nor stopped")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("would share its PostgreSQL catalog with replica r1")
            && stderr.contains("local directory"),
        "{stderr}"
    );
    assert_eq!(listed().await, ["r1", "r2"]);
}
