//! The deployment's replicas: `GET /api/v1/cluster`, who may share a PostgreSQL catalog, and
//! tokens made or revoked on one replica counting on the others.
//! The several-replica tests need PostgreSQL, the S3 server (`FWREPO_TEST_POSTGRES_URL`,
//! `FWREPO_TEST_S3_ENDPOINT`/`_BUCKET`) and `mosquitto` on PATH: each runs a broker of its own,
//! since every replica on a broker answers every gateway's events (tests running at once on
//! one broker would see each other's replies).

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
    /// This test's shared-subscription group.
    group: String,
    _broker: Broker,
}

impl Shared {
    async fn new(test: &str, root: &std::path::Path) -> Option<Shared> {
        let vars = [
            "FWREPO_TEST_POSTGRES_URL",
            "FWREPO_TEST_S3_ENDPOINT",
            "FWREPO_TEST_S3_BUCKET",
        ];
        if let Some(missing) = vars.iter().find(|v| std::env::var(v).is_err()) {
            println!("SKIP cluster::{test}: {missing} not set");
            return None;
        }
        if !have_mosquitto() {
            println!("SKIP cluster::{test}: no mosquitto on PATH");
            return None;
        }
        let port = free_port();
        let broker = Broker::start(root, port);
        let env = |v: &str| std::env::var(v).unwrap();
        Some(Shared {
            db: TestDatabase::create().await?,
            s3_endpoint: env("FWREPO_TEST_S3_ENDPOINT"),
            blob_store: format!(
                "s3://{}/c{}",
                env("FWREPO_TEST_S3_BUCKET"),
                fwrepo::domain::ids::next().to_lowercase()
            ),
            mqtt_url: format!("mqtt://127.0.0.1:{port}"),
            key_file: root.join("url-signing.key"),
            group: format!("t{}", fwrepo::domain::ids::next().to_lowercase()),
            _broker: broker,
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
            "--mqtt-share-group",
            &self.group,
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
    let mut r1 = ServerProcess::start(&root.path().join("r1"), &shared.args("r1"));
    // The deployment's admin token is made once, by r1; r2 finds it in the catalog (the
    // operator hands it on; the helper reads it from r2's data dir).
    std::fs::create_dir_all(root.path().join("r2")).unwrap();
    std::fs::copy(
        root.path().join("r1").join("admin.token"),
        root.path().join("r2").join("admin.token"),
    )
    .unwrap();
    let mut r2 = ServerProcess::start(&root.path().join("r2"), &shared.args("r2"));
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
    let log = root.path().join("r3.stderr");
    let mut r3 = tokio::process::Command::new(bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(root.path().join("r3"))
        .args(["--listen", "127.0.0.1:0"])
        .args(&args)
        .env_remove("FWREPO_LISTEN")
        .env("RUST_LOG", "info,sqlx=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), r3.wait()).await;
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|_| panic!("r3 neither started nor stopped: {stderr}"));
    assert!(!status.unwrap().success());
    assert!(
        stderr.contains("would share its PostgreSQL catalog with replica r1")
            && stderr.contains("local directory"),
        "{stderr}"
    );
    assert_eq!(listed().await, ["r1", "r2"]);

    // A replica that stops cleanly leaves no will; one killed -9 does, at once.
    let (watcher, mut wills) = mqtt_client(&r1.mqtt, "wills").await;
    let gone = |id: &str| format!("fwrepo/{}/gone/{id}", shared.group);
    watcher.subscribe_acked(&gone("+")).await;
    assert!(r2.sigterm().success());
    r1.kill9();
    let first = tokio::time::timeout(Duration::from_secs(30), wills.recv()).await;
    let (topic, _) = first.expect("no will").unwrap();
    assert_eq!(topic, gone("r1"), "the first will");
}

/// Uploads a package through `r`; returns its id.
async fn upload_to(r: &ServerProcess, name: &str, seed: u64) -> String {
    let resp = r
        .client()
        .post(format!("{}/api/v1/firmware", r.base))
        .query(&[("file_name", name)])
        .body(payload(300_000, seed))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

impl Shared {
    /// Starts replica `id` (its data directory under `root`, the admin token of the first
    /// replica copied in) with the simulator's model map.
    fn start(&self, root: &std::path::Path, id: &str, extra: &[&str]) -> ServerProcess {
        let config = root.join("models.toml");
        std::fs::write(
            &config,
            "[models]\n\"3-1-0\" = \"Dock\"\n\"0-67-0\" = \"M30\"\n",
        )
        .unwrap();
        let dir = root.join(id);
        let first = root.join("r1").join("admin.token");
        if id != "r1" && first.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(first, dir.join("admin.token")).unwrap();
        }
        let mut args = self.args(id);
        args.extend(["--config", config.to_str().unwrap()]);
        args.extend_from_slice(extra);
        ServerProcess::start(&dir, &args)
    }
}

/// The broker hands each gateway message to one replica (`$share/fwrepo/…`): a task created
/// through r1 completes, and its devices are verified, while r2 and r3 handle part of its
/// events and of the devices' reports; each replica shows the same task, and a live view
/// (SSE) of it on r3 follows it to its end.
#[tokio::test]
async fn an_ota_task_created_on_one_replica_completes_through_the_others() {
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(
        "an_ota_task_created_on_one_replica_completes_through_the_others",
        root.path(),
    )
    .await
    else {
        return;
    };
    let r1 = shared.start(root.path(), "r1", &[]);
    let r2 = shared.start(root.path(), "r2", &[]);
    let r3 = shared.start(root.path(), "r3", &[]);
    let (dock_fw, ac_fw) = (
        upload_to(&r1, "Dock_2.0.0.zip", 1).await,
        upload_to(&r1, "M30_2.0.0.zip", 2).await,
    );
    let (prefix, sim) = fleet(&r1.mqtt, 2, &[]).await;
    let gw = format!("{prefix}0001");
    for r in [&r1, &r2, &r3] {
        assert!(
            wait_until(Duration::from_secs(20), || async {
                let d = get_json_at(&r.base, &format!("/api/v1/devices/{gw}")).await;
                d["online"] == true && d["mode_code"] == 0 && d["child_sn"].is_string()
            })
            .await,
            "{} never saw {gw} online with its aircraft: {}",
            r.base,
            get_json_at(&r.base, &format!("/api/v1/devices/{gw}")).await
        );
    }
    let (observer, mut replies_rx) = mqtt_client(&r1.mqtt, "replies").await;
    observer
        .subscribe_acked(format!("thing/product/{gw}/events_reply"))
        .await;
    let created: Value = r1
        .client()
        .post(format!("{}/api/v1/ota", r1.base))
        .json(&serde_json::json!({"gateway_sn": gw, "devices": [
            {"sn": gw, "firmware_id": dock_fw}, {"sn": format!("{gw}-AC"), "firmware_id": ac_fw}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("task created").to_string();
    let sse = r3
        .client()
        .get(format!("{}/api/v1/ota/{id}/events", r3.base))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut stream = Box::pin(sse.bytes_stream());
    let task_on = |base: String| {
        let id = id.clone();
        async move { get_json_at(&base, &format!("/api/v1/ota/{id}")).await }
    };
    assert!(
        wait_until(Duration::from_secs(60), || async {
            let t = task_on(r2.base.clone()).await;
            t["status"] == "ok"
                && t["devices"]
                    .as_array()
                    .is_some_and(|ds| ds.iter().all(|d| d["outcome"] == "verified"))
        })
        .await,
        "task on r2: {}",
        task_on(r2.base.clone()).await
    );
    let (t1, t2, t3) = (
        task_on(r1.base.clone()).await,
        task_on(r2.base.clone()).await,
        task_on(r3.base.clone()).await,
    );
    assert_eq!(t1["status"], "ok");
    assert!(
        t1["revision"] == t2["revision"] && t2["revision"] == t3["revision"],
        "one stored task: {t1} / {t2} / {t3}"
    );
    read_until(&mut stream, &mut String::new(), "\"status\":\"ok\"").await;
    // Each replica handled part of the gateway traffic, none all of it.
    let mut handled = Vec::new();
    for r in [&r1, &r2, &r3] {
        handled.push(counter(&r.base, "fwrepo_mqtt_messages_in_total").await);
    }
    assert!(handled.iter().all(|n| *n > 0), "messages in: {handled:?}");
    // r2 and r3 handed the task's messages they received to r1, which holds the task (its
    // tid and bid carry r1's route tag), instead of writing the task themselves.
    let handed_over = [
        counter(&r2.base, "fwrepo_mqtt_handed_over_total").await,
        counter(&r3.base, "fwrepo_mqtt_handed_over_total").await,
    ];
    let handed_in = counter(&r1.base, "fwrepo_mqtt_handed_in_total").await;
    assert!(
        handed_over.iter().sum::<u64>() > 0 && handed_in > 0,
        "handed over by r2, r3: {handed_over:?}; handed in to r1: {handed_in}"
    );
    assert_eq!(counter(&r1.base, "fwrepo_mqtt_handed_over_total").await, 0);
    // Each ota_progress was handled by one replica: the gateway got one events_reply per
    // event, from whichever replica handled it.
    let mut replies: std::collections::HashMap<String, usize> = Default::default();
    while let Ok((_, payload)) = replies_rx.try_recv() {
        let reply: Value = serde_json::from_slice(&payload).unwrap();
        if reply["method"] == "ota_progress" {
            *replies
                .entry(reply["tid"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert!(replies.len() >= 5, "events_reply: {replies:?}");
    assert!(
        replies.values().all(|n| *n == 1),
        "events_reply: {replies:?}"
    );
    sim.cancel();
}

/// The replica holding the OTA timers' lease is killed: another takes the lease within 15 s
/// and times out the task the dead one would have.
#[tokio::test]
async fn the_ota_timers_move_to_another_replica_when_their_holder_dies() {
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(
        "the_ota_timers_move_to_another_replica_when_their_holder_dies",
        root.path(),
    )
    .await
    else {
        return;
    };
    let timeout = ["--ota-reply-timeout", "3"];
    let mut replicas = [
        shared.start(root.path(), "r1", &timeout),
        shared.start(root.path(), "r2", &timeout),
    ];
    // Who holds the lease by their own latest heartbeat (a dead one's row still lists it).
    let holders = |base: String| async move { holders_of(&base, "ota-timers").await };
    let holder_of = |base: String| async move { holders(base).await.pop() };
    let base = replicas[1].base.clone();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            holder_of(base.clone()).await.is_some()
        })
        .await,
        "nobody took the lease"
    );
    let holder = holder_of(base).await.unwrap();
    let (dead, alive) = if holder == "r1" { (0, 1) } else { (1, 0) };
    let survivor = replicas[alive].base.clone();
    let (survivor_id, gw) = (if alive == 0 { "r1" } else { "r2" }, sn("GHOST"));
    // A task for a gateway that never answers, created on the survivor.
    let fw = upload_to(&replicas[alive], "Dock_9.9.9.zip", 3).await;
    let resp = replicas[alive]
        .client()
        .post(format!("{survivor}/api/v1/ota"))
        .json(&serde_json::json!({"gateway_sn": gw, "devices": [{"sn": gw, "firmware_id": fw}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    let task = body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("task not created: {status} {body}"))
        .to_string();
    let killed = std::time::Instant::now();
    replicas[dead].kill9();
    // The broker publishes its will at once: the survivor counts it dead while its last
    // heartbeat is still recent (silence alone takes 8 s).
    let dead_id = if dead == 0 { "r1" } else { "r2" };
    let heartbeat_age = std::sync::Mutex::new(None);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            let view = get_json_at(&survivor, "/api/v1/cluster").await;
            let listed = view["replicas"].as_array().cloned().unwrap_or_default();
            let Some(r) = listed.iter().find(|r| r["id"] == dead_id) else {
                return false;
            };
            let beat = r["last_heartbeat"].as_str().unwrap_or_default();
            let beat = chrono::DateTime::parse_from_rfc3339(beat).unwrap();
            let age = chrono::Utc::now() - beat.with_timezone(&chrono::Utc);
            *heartbeat_age.lock().unwrap() = Some(age);
            r["alive"] == false
        })
        .await,
        "the dead replica stayed alive"
    );
    let age = heartbeat_age.lock().unwrap().unwrap();
    assert!(
        age < chrono::Duration::seconds(8),
        "counted dead only once silent ({age}): its will did not arrive"
    );
    assert!(
        wait_until(Duration::from_secs(20), || async {
            holders(survivor.clone())
                .await
                .contains(&survivor_id.to_string())
        })
        .await,
        "the lease stayed with the dead replica"
    );
    let handover = killed.elapsed();
    assert!(
        handover <= Duration::from_secs(15),
        "handover took {handover:?}"
    );
    assert!(
        wait_until(Duration::from_secs(30), || async {
            get_json_at(&survivor, &format!("/api/v1/ota/{task}")).await["status"] == "timeout"
        })
        .await,
        "the survivor never timed the task out"
    );
    println!("ota-timers handover after kill -9: {handover:?}");
}

/// `POST` of `body` to `path` on replica `r`; the status and the JSON answer.
async fn post_to(r: &ServerProcess, path: &str, body: Value) -> (u16, Value) {
    let resp = r
        .client()
        .post(format!("{}{path}", r.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The replicas that list `lease` in their latest heartbeat, as `base` reports them.
async fn holders_of(base: &str, lease: &str) -> Vec<String> {
    let body = get_json_at(base, "/api/v1/cluster").await;
    body["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter(|r| {
                    r["leases"]
                        .as_array()
                        .is_some_and(|l| l.contains(&Value::from(lease)))
                })
                .filter_map(|r| r["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The acceptance story of several replicas: three replicas behind nginx (round robin;
/// `file_url` points at it), a rollout over 30 simulated docks created and started through a
/// replica that does not drive rollouts. The driving one is killed -9 mid-rollout; another
/// takes the scheduling over (the rollout's events show the handover), the downloads cut by
/// the kill resume through nginx on the survivors, and the killed replica is started again
/// while the rollout goes on. The rollout completes, every device is ok and every gateway got
/// exactly one `ota_create`.
#[tokio::test]
async fn a_rollout_over_three_replicas_completes_when_the_one_driving_it_is_killed() {
    let test = "a_rollout_over_three_replicas_completes_when_the_one_driving_it_is_killed";
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(test, root.path()).await else {
        return;
    };
    if !crate::balancer::have_nginx() {
        println!("SKIP cluster::{test}: no nginx on PATH");
        return;
    }
    let lb_port = free_port();
    let public = format!("http://127.0.0.1:{lb_port}");
    // An ota_create the killed replica stored but never got out times out after 20 s and is
    // retried after 1 s (the defaults, 30 s and 60 s, would outlast the test); a reply the
    // broker had routed to the killed replica arrives well within it (its session is taken
    // over, or it comes back).
    let extra = ["--public-url", &public, "--ota-reply-timeout", "20"];
    let ids = ["r1", "r2", "r3"];
    let mut replicas: Vec<ServerProcess> = ids
        .iter()
        .map(|id| shared.start(root.path(), id, &extra))
        .collect();
    let upstreams: Vec<String> = replicas
        .iter()
        .map(|r| r.base.trim_start_matches("http://").to_string())
        .collect();
    let upstreams: Vec<&str> = upstreams.iter().map(String::as_str).collect();
    let _lb = crate::balancer::Nginx::start(root.path(), lb_port, &upstreams);
    let (dock_fw, ac_fw) = (
        upload_to(&replicas[0], "Dock_2.0.0.zip", 1).await,
        upload_to(&replicas[0], "M30_2.0.0.zip", 2).await,
    );
    let driver = lease_holder(&replicas[1].base, "rollouts", None).await;
    let dead = ids.iter().position(|id| *id == driver).unwrap();
    let front = (dead + 1) % 3;
    let (observer, creates) = mqtt_client(&replicas[0].mqtt, "creates").await;
    observer.subscribe_acked("thing/product/+/services").await;
    // Downloads at 150 kB/s: each dock takes a few seconds, so the kill lands mid-rollout.
    let (prefix, sim) = fleet(&replicas[0].mqtt, 30, &["--rate", "150000"]).await;
    let gateways: Vec<String> = (1..=30).map(|i| format!("{prefix}{i:04}")).collect();
    for r in &replicas {
        for gw in &gateways {
            assert!(
                wait_until(Duration::from_secs(30), || async {
                    get_json_at(&r.base, &format!("/api/v1/devices/{gw}")).await["child_sn"]
                        .is_string()
                })
                .await,
                "{} never saw {gw} with its aircraft",
                r.base
            );
        }
    }
    let front_base = replicas[front].base.clone();
    let (status, created) = post_to(
        &replicas[front],
        "/api/v1/rollouts",
        serde_json::json!({"name": "handover", "target": {"gateway_sns": gateways},
            "firmware": [{"firmware_id": dock_fw}, {"firmware_id": ac_fw}],
            "stages": [{"percent": 50}, {"percent": 100}], "max_in_flight": 6,
            "rate_per_minute": null, "retry_backoff_s": 1}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    // Started through a replica that does not drive: the driver picks it up.
    let start = format!("/api/v1/rollouts/{id}/start");
    let (status, started) = post_to(&replicas[front], &start, serde_json::json!({})).await;
    assert_eq!(status, 200, "{started}");
    let rollout = || async { get_json_at(&front_base, &format!("/api/v1/rollouts/{id}")).await };
    let ok = || async { rollout().await["counts"]["ok"].as_u64().unwrap_or(0) };
    assert!(
        wait_until(Duration::from_secs(60), || async { ok().await >= 6 }).await,
        "no progress: {}",
        rollout().await
    );
    replicas[dead].kill9();
    let killed = std::time::Instant::now();
    let successor = lease_holder(&front_base, "rollouts", Some(driver.as_str())).await;
    println!(
        "rollouts lease handover after kill -9: {:?}",
        killed.elapsed()
    );
    // The killed replica comes back while the rollout goes on, and joins as a follower.
    let mid = ok().await;
    let dead_log = replicas[dead].stderr();
    replicas[dead] = shared.start(root.path(), &driver, &extra);
    let done = wait_until(Duration::from_secs(180), || async {
        rollout().await["status"] == "completed"
    })
    .await;
    let last = rollout().await;
    if !done {
        let stuck = in_flight_tasks(&front_base, &id).await;
        let gws: Vec<&str> = stuck
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["member"]["gateway_sn"].as_str())
            .collect();
        let mut logs = vec![dead_log];
        logs.extend(replicas.iter().map(|r| r.stderr()));
        for (i, log) in logs.iter().enumerate() {
            for l in log.lines().filter(|l| {
                l.contains("WARN") || l.contains("ERROR") || gws.iter().any(|g| l.contains(g))
            }) {
                println!("log{i}: {l}");
            }
        }
        panic!("the rollout did not complete after the handover: {last}\nin flight: {stuck:#}");
    }
    assert!(mid < 60, "the restart came after the rollout's end: {last}");
    assert_eq!(last["counts"]["ok"], 60, "{last}");
    // The events show who drove it: the killed replica, then its successor.
    let drivers: Vec<&str> = last["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == fwrepo::rollout::DRIVEN_BY)
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert_eq!(drivers, [driver.as_str(), successor.as_str()], "{last}");
    let again = get_json_at(&replicas[dead].base, &format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(again["status"], "completed");
    assert_one_ota_create_each(creates, &gateways, &front_base, &last).await;
    sim.cancel();
}

/// The members of rollout `id` in flight, each with its task (if it has one).
async fn in_flight_tasks(base: &str, id: &str) -> Value {
    let rows = get_json_at(
        base,
        &format!("/api/v1/rollouts/{id}/devices?state=in_flight"),
    )
    .await;
    let mut out = Vec::new();
    for row in rows["items"].as_array().into_iter().flatten() {
        let task = match row["task_id"].as_str() {
            Some(t) => get_json_at(base, &format!("/api/v1/ota/{t}")).await,
            None => Value::Null,
        };
        out.push(serde_json::json!({"member": row, "task": task}));
    }
    Value::from(out)
}

/// The replica holding `lease` by its own latest heartbeat, as `base` reports it, once it is
/// not `not` (a dead replica's row still lists the lease): waits up to 20 s.
async fn lease_holder(base: &str, lease: &str, not: Option<&str>) -> String {
    let holder = || async {
        let mut holders = holders_of(base, lease).await;
        holders.retain(|h| Some(h.as_str()) != not);
        holders.pop()
    };
    assert!(
        wait_until(Duration::from_secs(20), || async {
            holder().await.is_some()
        })
        .await,
        "nobody (but {not:?}) holds {lease}"
    );
    holder().await.unwrap()
}

/// Every gateway got exactly one `ota_create` (as `creates` saw them); else the tasks of a
/// gateway that got several are shown with their history.
async fn assert_one_ota_create_each(
    mut creates: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    gateways: &[String],
    base: &str,
    rollout: &Value,
) {
    let mut per_gateway: std::collections::HashMap<String, usize> = Default::default();
    while let Ok((topic, payload)) = creates.try_recv() {
        let msg: Value = serde_json::from_slice(&payload).unwrap();
        if msg["method"] == "ota_create" {
            let gw = topic.split('/').nth(2).unwrap().to_string();
            *per_gateway.entry(gw).or_default() += 1;
        }
    }
    assert_eq!(per_gateway.len(), gateways.len(), "{per_gateway:?}");
    if let Some((gw, n)) = per_gateway.iter().find(|(_, n)| **n != 1) {
        let tasks = get_json_at(base, &format!("/api/v1/ota?gateway_sn={gw}")).await;
        let brief: Vec<String> = tasks["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let sources: Vec<String> = t["history"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| format!("{}:{}", h["source"], h["status"]))
                    .collect();
                format!("{} {} {:?}", t["id"], t["status"], sources)
            })
            .collect();
        panic!("{gw} got {n} ota_create: {brief:#?}\nrollout: {rollout}");
    }
}

/// Two replicas started at the same moment on an empty database: both come up, and each
/// migration ran once (sqlx's advisory lock makes the second wait for the first).
#[tokio::test]
async fn two_replicas_starting_at_once_on_an_empty_database_migrate_it_once() {
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(
        "two_replicas_starting_at_once_on_an_empty_database_migrate_it_once",
        root.path(),
    )
    .await
    else {
        return;
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| ServerProcess::start(&root.path().join("a"), &shared.args("a")));
        let b = s.spawn(|| ServerProcess::start(&root.path().join("b"), &shared.args("b")));
        (a.join().unwrap(), b.join().unwrap())
    });
    for r in [&a, &b] {
        let resp = client_for(&r.base)
            .get(format!("{}/readyz", r.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", r.base);
    }
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(shared.db.url())
        .await
        .unwrap();
    let (runs, versions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT version) FROM _sqlx_migrations WHERE success",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    let embedded = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count() as i64;
    assert_eq!((runs, versions), (embedded, embedded));
}

/// A rollout's live view (SSE) on the replica that does not drive rollouts shows an action
/// taken through the one that does, within a few seconds (LISTEN/NOTIFY: without it, that
/// replica would never announce the change).
#[tokio::test]
async fn an_sse_stream_on_one_replica_shows_a_change_made_through_another() {
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(
        "an_sse_stream_on_one_replica_shows_a_change_made_through_another",
        root.path(),
    )
    .await
    else {
        return;
    };
    let replicas = [
        shared.start(root.path(), "r1", &[]),
        shared.start(root.path(), "r2", &[]),
    ];
    let fw = upload_to(&replicas[0], "Dock_2.0.0.zip", 4).await;
    let base = replicas[0].base.clone();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            holders_of(&base, "rollouts").await.len() == 1
        })
        .await
    );
    let driver = holders_of(&base, "rollouts").await.pop().unwrap();
    let (driving, watching) = if driver == "r1" {
        (&replicas[0], &replicas[1])
    } else {
        (&replicas[1], &replicas[0])
    };
    let (status, created) = post_to(
        driving,
        "/api/v1/rollouts",
        serde_json::json!({"name": "watched", "target": {"gateway_sns": [sn("WATCH")]},
            "firmware": [{"firmware_id": fw}], "stages": [{"percent": 100}]}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let sse = watching
        .client()
        .get(format!("{}/api/v1/rollouts/{id}/events", watching.base))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut stream = Box::pin(sse.bytes_stream());
    let mut seen = String::new();
    // The snapshot first (a draft), then the start made through the other replica.
    read_until(&mut stream, &mut seen, "\"status\":\"draft\"").await;
    let (status, started) = post_to(
        driving,
        &format!("/api/v1/rollouts/{id}/start"),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 200, "{started}");
    read_until(&mut stream, &mut seen, "\"status\":\"running\"").await;
}

/// Reads an SSE stream into `seen` until it holds `want`, for at most 5 s.
async fn read_until(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    seen: &mut String,
    want: &str,
) {
    use futures::StreamExt;
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        while !seen.contains(want) {
            match stream.next().await {
                Some(Ok(chunk)) => seen.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return false,
            }
        }
        true
    })
    .await;
    assert!(matches!(found, Ok(true)), "no {want} on the stream: {seen}");
}

/// A segmented download (`aria2c -x4 -s4`) of a task's `file_url` through nginx: its ranged
/// requests land on both replicas, and the task shows one download session at 100 % on
/// either.
#[tokio::test]
async fn a_segmented_download_through_the_balancer_is_one_session_at_100_percent() {
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(
        "a_segmented_download_through_the_balancer_is_one_session_at_100_percent",
        root.path(),
    )
    .await
    else {
        return;
    };
    let aria2 = std::process::Command::new("aria2c")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok();
    if !crate::balancer::have_nginx() || !aria2 {
        println!(
            "SKIP cluster::a_segmented_download_through_the_balancer_is_one_session_at_100_percent: needs nginx and aria2c on PATH"
        );
        return;
    }
    let lb_port = free_port();
    let public = format!("http://127.0.0.1:{lb_port}");
    let extra = ["--public-url", &public, "--progress-flush-secs", "1"];
    let replicas = [
        shared.start(root.path(), "r1", &extra),
        shared.start(root.path(), "r2", &extra),
    ];
    let upstreams: Vec<String> = replicas
        .iter()
        .map(|r| r.base.trim_start_matches("http://").to_string())
        .collect();
    let upstreams: Vec<&str> = upstreams.iter().map(String::as_str).collect();
    let _lb = crate::balancer::Nginx::start(root.path(), lb_port, &upstreams);
    let data = payload(8 * 1024 * 1024 + 5, 9);
    let resp = replicas[0]
        .client()
        .post(format!("{}/api/v1/firmware", replicas[0].base))
        .query(&[("file_name", "Dock_3.0.0.zip")])
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let fw: Value = resp.json().await.unwrap();
    // A gateway never seen passes preflight with a warning; the task's URL is what matters.
    let gw = sn("SEG");
    let (status, task) = post_to(
        &replicas[1],
        "/api/v1/ota",
        serde_json::json!({"gateway_sn": gw, "devices": [{"sn": gw, "firmware_id": fw["id"]}]}),
    )
    .await;
    assert_eq!(status, 202, "{task}");
    let url = task["devices"][0]["file_url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&public), "{url}");
    let dir = root.path().join("aria");
    let out = tokio::process::Command::new("aria2c")
        .args(["-q", "-x4", "-s4", "-k1M", "--allow-overwrite=true"])
        .arg(format!("--checksum=md5={}", md5_hex(&data)))
        .arg("-d")
        .arg(&dir)
        .arg(&url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let id = task["id"].as_str().unwrap();
    for r in &replicas {
        assert!(
            wait_until(Duration::from_secs(20), || async {
                let t = get_json_at(&r.base, &format!("/api/v1/ota/{id}")).await;
                t["devices"][0]["download_session"]["percent"] == 100.0
            })
            .await,
            "{}: {}",
            r.base,
            get_json_at(&r.base, &format!("/api/v1/ota/{id}")).await["devices"][0]
        );
    }
    // Both replicas served part of it: each counted requests.
    for r in &replicas {
        let served = counter(&r.base, "fwrepo_download_requests_total").await;
        assert!(served > 0, "{} served nothing", r.base);
    }
}

/// A replica dies (kill -9) while the broker had sent it messages it had not acknowledged —
/// it was frozen (SIGSTOP) while the gateways sent them — and the broker goes on routing its
/// share of the group's messages to its session: the live replica takes that session over and
/// handles every one of them. Nothing a gateway sent is lost.
#[tokio::test]
async fn messages_sent_to_a_replica_that_dies_are_handled_by_another() {
    let test = "messages_sent_to_a_replica_that_dies_are_handled_by_another";
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(test, root.path()).await else {
        return;
    };
    let r1 = shared.start(root.path(), "r1", &[]);
    let mut r2 = shared.start(root.path(), "r2", &[]);
    for r in [&r1, &r2] {
        let base = r.base.clone();
        assert!(
            wait_until(Duration::from_secs(20), || async {
                get_json_at(&base, "/readyz").await["mqtt"] == "connected"
            })
            .await,
            "{base} never subscribed"
        );
    }
    let (gateways, _inbox) = mqtt_client(&r1.mqtt, "gateways").await;
    let prefix = sn("ADOPT");
    // Gateways `range` announce themselves (update_topo, QoS 1).
    let announce = |range: std::ops::Range<usize>| {
        let (gateways, prefix) = (&gateways, &prefix);
        async move {
            for i in range {
                let gw = format!("{prefix}{i:03}");
                let topo = serde_json::json!({"tid": "t", "bid": "b", "timestamp": 1,
                    "method": "update_topo", "gateway": gw,
                    "data": {"domain": "3", "type": 1, "sub_type": 0, "sub_devices": []}});
                let topic = format!("sys/product/{gw}/status");
                gateways
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, topo.to_string())
                    .await
                    .unwrap();
            }
        }
    };
    let known_on_r1 = |n: usize| {
        let (base, prefix) = (r1.base.clone(), prefix.clone());
        async move {
            let mut known = 0;
            for i in 0..n {
                let d = get_json_at(&base, &format!("/api/v1/devices/{prefix}{i:03}")).await;
                known += usize::from(d["sn"].is_string());
            }
            known
        }
    };
    // r2 stops reading: the broker's deliveries to it wait unacknowledged.
    r2.signal("STOP");
    announce(0..40).await;
    // r1 handled its share: the rest went to r2.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            known_on_r1(40).await >= 10
        })
        .await,
        "r1 handled {} of 40",
        known_on_r1(40).await
    );
    let on_r1_before = known_on_r1(40).await;
    assert!(on_r1_before < 40, "the broker sent r2 nothing");
    r2.kill9();
    let killed = std::time::Instant::now();
    // Sent after the death: the broker still routes part of them to r2's session.
    announce(40..60).await;
    assert!(
        wait_until(Duration::from_secs(60), || async {
            known_on_r1(60).await == 60
        })
        .await,
        "r1 knows {} of 60 gateways after r2 died ({on_r1_before} of the first 40 before); \
         stderr of r1: {}",
        known_on_r1(60).await,
        r1.stderr()
    );
    println!(
        "the dead replica's messages were handled {:?} after the kill",
        killed.elapsed()
    );
}

mod resend;
