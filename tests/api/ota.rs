//! OTA tasks end to end with a scripted dock on the embedded broker: policy, preflight,
//! `ota_create` checked field by field against the seed, the per-device download, replies and
//! progress to `ok`, verification, SSE, and the error paths.

use std::time::Duration;

use futures::StreamExt;
use rumqttc::QoS;
use serde_json::{Value, json};

use crate::helpers::*;

async fn app_with_models(reply_timeout: u64) -> TestApp {
    spawn_with(|s| {
        s.models = fwrepo::devices::ModelMap::from_table(Some(
            &toml::from_str("\"3-1-0\" = \"Dock\"\n\"0-67-0\" = \"M30\"\n").unwrap(),
        ))
        .unwrap();
        s.ota.reply_timeout = Duration::from_secs(reply_timeout);
    })
    .await
}

/// A dock announcing itself (and an aircraft), running `version`.
async fn announce(
    client: &rumqttc::AsyncClient,
    dock: &str,
    aircraft: &str,
    version: &str,
    cs: i64,
) {
    let topo = json!({"tid":"t","bid":"b","timestamp":1,"method":"update_topo",
        "data":{"domain":3,"type":1,"sub_type":0,"version":"1.0",
            "sub_devices":[{"sn":aircraft,"domain":0,"type":67,"sub_type":0,"index":"A"}]}});
    client
        .publish(
            format!("sys/product/{dock}/status"),
            QoS::AtLeastOnce,
            false,
            topo.to_string(),
        )
        .await
        .unwrap();
    let state = json!({"tid":"t","bid":"b","timestamp":2,"data":{"firmware_version":version,"compatible_status":cs,"firmware_upgrade_status":0}});
    client
        .publish(
            format!("thing/product/{dock}/state"),
            QoS::AtLeastOnce,
            false,
            state.to_string(),
        )
        .await
        .unwrap();
    let osd = json!({"tid":"t","bid":"b","timestamp":3,"data":{"mode_code":0}});
    client
        .publish(
            format!("thing/product/{dock}/osd"),
            QoS::AtLeastOnce,
            false,
            osd.to_string(),
        )
        .await
        .unwrap();
}

/// The gateway is free again and runs the firmware now: a new task for it is 409.
async fn assert_up_to_date(app: &TestApp, dock: &str, fw_id: &str) {
    let (status, e) = post_ota(
        app,
        json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw_id}]}),
        None,
    )
    .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (409, Some("already_up_to_date")),
        "{e}"
    );
}

pub(crate) async fn post_ota(app: &TestApp, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut rb = app.client.post(app.url("/api/v1/ota")).json(&body);
    if let Some(k) = key {
        rb = rb.header("idempotency-key", k);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn next_on(
    inbox: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    suffix: &str,
) -> Value {
    loop {
        let (topic, payload) = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .unwrap()
            .unwrap();
        if topic.ends_with(suffix) {
            return serde_json::from_slice(&payload).unwrap();
        }
    }
}

/// A dock (running 10.01.0205) and its aircraft announced on the embedded broker, a Dock
/// 10.01.0300 package uploaded, and a test client subscribed to the dock's `services`.
struct UpgradeStory {
    app: TestApp,
    data: Vec<u8>,
    fw_id: String,
    dock: String,
    client: TestClient,
    inbox: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

async fn upgrade_story() -> UpgradeStory {
    let app = app_with_models(30).await;
    let data = payload(3_000_000, 31);
    let fw = app.upload_ok("Dock_10.01.0300.zip", data.clone()).await;
    let fw_id = fw["id"].as_str().unwrap().to_string();
    let (dock, aircraft) = (sn("DOCK"), sn("AC"));
    let (client, inbox) = mqtt_client(&app.mqtt_addr(), "ota").await;
    client
        .subscribe_acked(format!("thing/product/{dock}/services"))
        .await;
    app.wait_mqtt_subscribed().await;
    announce(&client, &dock, &aircraft, "10.01.0205", 0).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let d = app.get_json(&format!("/api/v1/devices/{dock}")).await.1;
            d["mode_code"] == 0 && d["firmware_version"] == "10.01.0205"
        })
        .await
    );
    UpgradeStory {
        app,
        data,
        fw_id,
        dock,
        client,
        inbox,
    }
}

#[tokio::test]
async fn ota_create_is_planned_signed_and_idempotent() {
    let UpgradeStory {
        app,
        data,
        fw_id,
        dock,

        client: _client,
        mut inbox,
    } = upgrade_story().await;
    let fw_id = fw_id.as_str();
    // Dry run: decided, nothing stored or published.
    let body = json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw_id}], "dry_run": true});
    let (status, plan) = post_ota(&app, body, None).await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["task"]["devices"][0]["upgrade_type"], 3);
    assert_eq!(plan["task"]["devices"][0]["policy_rule"], 3);
    let (_, tasks) = app.get_json("/api/v1/ota").await;
    assert_eq!(tasks["items"].as_array().unwrap().len(), 0);

    // The real request, with an Idempotency-Key.
    let body = json!({"gateway_sn": dock, "devices": [{"sn": dock, "model": "dock", "product_version": "10.1.3"}]});
    let (status, task) = post_ota(&app, body.clone(), Some("k1")).await;
    assert_eq!(status, 202, "{task}");
    assert_eq!(task["status"], "sent");
    let id = task["id"].as_str().unwrap().to_string();
    let (status, again) = post_ota(&app, body.clone(), Some("k1")).await;
    assert_eq!((status, again["id"].as_str()), (202, Some(id.as_str())));
    let (status, e) = post_ota(
        &app,
        json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw_id}]}),
        Some("k1"),
    )
    .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    let (status, e) = post_ota(&app, body, None).await;
    assert_eq!((status, e["error"].as_str()), (409, Some("gateway_busy")));
    assert_eq!(e["task_id"], id.as_str());

    // The ota_create, field by field against the seed's example shape.
    let create = next_on(&mut inbox, "/services").await;
    let keys: Vec<&str> = create
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for k in ["bid", "tid", "timestamp", "method", "data"] {
        assert!(keys.contains(&k), "{create}");
    }
    assert_eq!(create["method"], "ota_create");
    assert!(create["timestamp"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(create["tid"], task["tid"]);
    assert_eq!(create["bid"], task["bid"]);
    let dev = &create["data"]["devices"][0];
    let mut dev_keys: Vec<&str> = dev
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    dev_keys.sort();
    assert_eq!(
        dev_keys,
        [
            "file_name",
            "file_size",
            "file_url",
            "firmware_upgrade_type",
            "md5",
            "product_version",
            "sn"
        ]
    );
    assert_eq!(dev["sn"], dock.as_str());
    assert_eq!(dev["product_version"], "10.01.0300");
    assert_eq!(dev["md5"], md5_hex(&data));
    assert_eq!(dev["file_size"], data.len());
    assert_eq!(dev["file_name"], "Dock_10.01.0300.zip");
    assert_eq!(dev["firmware_upgrade_type"], 3);
    let url = dev["file_url"].as_str().unwrap();
    // `/dl/{task}/{sn}/{expiry}-{signature}/{file_name}`: signed for this task, device and
    // firmware, valid 7 days by default, the file name last (wget/curl -O save under it).
    let prefix = format!("{}/dl/{id}/{dock}/", app.base);
    let signature = url
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix("/Dock_10.01.0300.zip"))
        .unwrap_or_else(|| panic!("unexpected file_url {url}"));
    let (expiry, _) = signature.split_once('-').unwrap();
    let days = (expiry.parse::<i64>().unwrap() - chrono::Utc::now().timestamp()) / 86_400;
    assert!((6..=7).contains(&days), "{url}");
    // Tampered URLs are refused with 403 and JSON; nothing is served.
    let mut flipped: Vec<char> = signature.chars().collect();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == 'A' { 'B' } else { 'A' };
    let flipped: String = flipped.into_iter().collect();
    let later = format!(
        "{}-{}",
        expiry.parse::<i64>().unwrap() + 86_400,
        &signature[expiry.len() + 1..]
    );
    for (bad, code) in [
        (url.replace(signature, &flipped), "signature_invalid"),
        (url.replace(signature, &later), "signature_invalid"),
        (url.replace(signature, "garbage"), "signature_invalid"),
    ] {
        let resp = app.client.get(&bad).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{bad}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"], code, "{bad}");
    }
}

#[tokio::test]
async fn a_dock_downloads_reports_ok_and_is_verified() {
    let UpgradeStory {
        app,
        data,
        fw_id,
        dock,
        client,
        mut inbox,
    } = upgrade_story().await;
    let fw_id = fw_id.as_str();
    let body = json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw_id}]});
    let (status, task) = post_ota(&app, body, None).await;
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap().to_string();
    let sse_task = watch_task(&app, &id).await;
    let create = next_on(&mut inbox, "/services").await;
    download_and_finish(&app, &client, &dock, &create, &data).await;
    let task_of = || async { app.get_json(&format!("/api/v1/ota/{id}")).await.1 };
    assert!(
        wait_until(Duration::from_secs(10), || async {
            task_of().await["status"] == "ok"
        })
        .await
    );
    // A late event never reopens it; the version the dock reports then verifies it.
    let late = json!({"bid": create["bid"], "method": "ota_progress", "data": {"output": {"status": "in_progress", "progress": {"percent": 10}}}});
    let state =
        json!({"timestamp": 5, "data": {"firmware_version": "10.01.0300", "compatible_status": 0}});
    for (topic, msg) in [("events", late), ("state", state)] {
        let topic = format!("thing/product/{dock}/{topic}");
        client
            .publish(topic, QoS::AtLeastOnce, false, msg.to_string())
            .await
            .unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            task_of().await["devices"][0]["outcome"] == "verified"
        })
        .await
    );
    let t = task_of().await;
    assert_eq!(t["status"], "ok");
    assert_eq!(t["progress"]["percent"], 100);
    assert_eq!(t["progress"]["sub_status"], "UPGRADE_SUCCESS");
    let session = &t["devices"][0]["download_session"];
    assert_eq!(session["sn"], dock.as_str());
    assert_eq!(session["percent"], 100.0, "{t}");
    // History: the repeated DOWNLOADING 50 % is counted, not stored twice.
    let hist = t["history"].as_array().unwrap();
    assert!(hist.iter().any(|h| h["repeats"] == 1), "{t}");
    let text = tokio::time::timeout(Duration::from_secs(10), sse_task)
        .await
        .unwrap()
        .unwrap();
    assert!(text.matches("event: task").count() >= 3, "{text}");
    assert!(text.contains("\"verified\""));
    // The gateway is free again; the device is up to date now → 409.
    assert_up_to_date(&app, &dock, fw_id).await;
    let (_, list) = app
        .get_json(&format!("/api/v1/ota?gateway_sn={dock}&status=ok"))
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

/// The task's live view (SSE), collected from now until the stream ends.
async fn watch_task(app: &TestApp, id: &str) -> tokio::task::JoinHandle<String> {
    let sse = app
        .client
        .get(app.url(&format!("/api/v1/ota/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    tokio::spawn(async move {
        let mut body = sse.bytes_stream();
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        text
    })
}

/// The dock's side of `create`: it accepts, downloads its `file_url` in two ranges (the
/// bytes are `data`), reports progress (one report twice) and ends ok; it subscribes to its
/// `events_reply` (an events_reply acknowledges ota_progress without a need_reply field).
async fn download_and_finish(
    app: &TestApp,
    client: &TestClient,
    dock: &str,
    create: &Value,
    data: &[u8],
) {
    let url = create["data"]["devices"][0]["file_url"].as_str().unwrap();
    let reply = json!({"tid": create["tid"], "bid": create["bid"], "timestamp": 1, "method": "ota_create",
        "data": {"result": 0, "output": {"status": "sent", "sub_status": "", "progress": {"percent": 0, "step": 1, "step_key": ""}}}});
    let topic = format!("thing/product/{dock}/services_reply");
    client
        .publish(topic, QoS::AtLeastOnce, false, reply.to_string())
        .await
        .unwrap();
    let mut got = Vec::new();
    for range in ["bytes=0-1499999", "bytes=1500000-"] {
        got.extend(
            app.get_with(url, &[("range", range)])
                .await
                .bytes()
                .await
                .unwrap(),
        );
    }
    assert_eq!(md5_hex(&got), md5_hex(data));
    for (status, sub, pct, step) in [
        ("in_progress", "DOWNLOADING", 50, "download_firmware"),
        ("in_progress", "DOWNLOADING", 50, "download_firmware"),
        ("in_progress", "UPGRADING", 80, "upgrade_firmware"),
        ("ok", "UPGRADE_SUCCESS", 100, "upgrade_firmware"),
    ] {
        let ev = json!({"tid": "x", "bid": create["bid"], "timestamp": "1707048089244", "method": "ota_progress",
            "data": {"result": 0, "output": {"status": status, "sub_status": sub, "progress": {"percent": pct, "step_key": step}}}});
        let topic = format!("thing/product/{dock}/events");
        client
            .publish(topic, QoS::AtLeastOnce, false, ev.to_string())
            .await
            .unwrap();
    }
    let topic = format!("thing/product/{dock}/events_reply");
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
}

/// A dock (running 10.01.0300 but inconsistent, so a consistency upgrade) and its aircraft
/// announced on a server whose tasks time out after 1 s without a reply; a Dock 10.01.0300 and
/// an M30 package uploaded; a test client subscribed to the dock's `services`.
struct PolicyStory {
    app: TestApp,
    fw_id: String,
    m30_id: String,
    dock: String,
    aircraft: String,
    /// The scripted dock: bind it for the whole test (`client: _client`), or its connection
    /// and subscription end with the setup.
    client: TestClient,
    inbox: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

async fn policy_story() -> PolicyStory {
    let app = app_with_models(1).await;
    let fw = app.upload_ok("Dock_10.01.0300.zip", payload(1000, 3)).await;
    let m30 = app.upload_ok("M30_07.01.0000.zip", payload(1000, 4)).await;
    app.wait_mqtt_subscribed().await;
    let (dock, aircraft) = (sn("DOCK"), sn("AC"));
    let (client, inbox) = mqtt_client(&app.mqtt_addr(), "policy").await;
    client
        .subscribe_acked(format!("thing/product/{dock}/services"))
        .await;
    announce(&client, &dock, &aircraft, "10.01.0300", 1).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let d = app.get_json(&format!("/api/v1/devices/{dock}")).await.1;
            d["compatible_status"] == 1 && d["mode_code"] == 0
        })
        .await,
        "the dock was never learned"
    );
    PolicyStory {
        fw_id: fw["id"].as_str().unwrap().to_string(),
        m30_id: m30["id"].as_str().unwrap().to_string(),
        app,
        dock,
        aircraft,
        client,
        inbox,
    }
}

/// One device of an OTA request, by firmware id.
fn dev(sn: &str, id: &str) -> Value {
    json!({"sn": sn, "firmware_id": id})
}

#[tokio::test]
async fn a_same_version_inconsistent_dock_gets_a_consistency_upgrade() {
    let PolicyStory {
        app,
        fw_id,
        dock,
        client: _client,
        ..
    } = policy_story().await;
    let (status, plan) = post_ota(
        &app,
        json!({"gateway_sn": dock, "devices": [dev(&dock, &fw_id)], "dry_run": true}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["task"]["devices"][0]["upgrade_type"], 2);
    assert_eq!(plan["task"]["devices"][0]["policy_rule"], 4);
}

#[tokio::test]
async fn firmware_of_another_model_is_refused() {
    let PolicyStory {
        app,
        fw_id,
        dock,
        aircraft,

        client: _client,
        ..
    } = policy_story().await;
    // Dock firmware for the aircraft.
    let (status, e) = post_ota(
        &app,
        json!({"gateway_sn": dock, "devices": [dev(&aircraft, &fw_id)]}),
        None,
    )
    .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (422, Some("model_mismatch")),
        "{e}"
    );
}

#[tokio::test]
async fn bad_ota_requests_are_refused() {
    let PolicyStory {
        app,
        fw_id,
        dock,
        aircraft,

        client: _client,
        ..
    } = policy_story().await;
    let three = json!({"gateway_sn": dock, "devices": [dev(&dock, &fw_id), dev(&aircraft, &fw_id), dev("X", &fw_id)]});
    assert_eq!(
        post_ota(&app, three, None).await.1["error"],
        "validation_failed"
    );
    let unknown =
        json!({"gateway_sn": dock, "devices": [dev(&dock, "01ARZ3NDEKTSV4RRFFQ69G5FAV")]});
    assert_eq!(post_ota(&app, unknown, None).await.0, 404);
    let resp = app
        .client
        .post(app.url("/api/v1/ota"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let (status, _) = app.get_json("/api/v1/ota/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_device_not_attached_to_the_gateway_fails_preflight() {
    let PolicyStory {
        app,
        m30_id,
        dock,
        client: _client,
        ..
    } = policy_story().await;
    let other = json!({"gateway_sn": dock, "devices": [dev("SOMEONE-ELSE", &m30_id)]});
    let (status, e) = post_ota(&app, other, None).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (409, Some("preflight_failed")),
        "{e}"
    );
    assert_eq!(e["check"], "aircraft_attached");
}

#[tokio::test]
async fn a_stale_topology_fails_preflight_until_the_osd_agrees_again() {
    let PolicyStory {
        app,
        fw_id,
        m30_id,
        dock,
        aircraft,
        client,
        ..
    } = policy_story().await;
    // The dock's osd names another aircraft than the topology: stale topology, refused.
    let osd_naming = |child: &str| {
        json!({"tid":"t","bid":"b","timestamp":4,"data":{"mode_code":0,"sub_device":{"device_sn":child,"device_online_status":1}}})
            .to_string()
    };
    let osd_topic = format!("thing/product/{dock}/osd");
    client
        .publish(&osd_topic, QoS::AtLeastOnce, false, osd_naming("AC-STALE"))
        .await
        .unwrap();
    let pair = json!({"gateway_sn": dock, "devices": [dev(&dock, &fw_id), dev(&aircraft, &m30_id)], "dry_run": true});
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let (status, e) = post_ota(&app, pair.clone(), None).await;
            status == 409 && e["message"].to_string().contains("AC-STALE")
        })
        .await
    );
    let (_, e) = post_ota(&app, pair.clone(), None).await;
    assert_eq!(
        (e["error"].as_str(), e["check"].as_str()),
        (Some("preflight_failed"), Some("aircraft_attached")),
        "{e}"
    );
    // The osd names the topology's aircraft again: accepted.
    client
        .publish(&osd_topic, QoS::AtLeastOnce, false, osd_naming(&aircraft))
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            post_ota(&app, pair.clone(), None).await.0 == 200
        })
        .await
    );
}

#[tokio::test]
async fn an_unseen_gateway_passes_preflight_with_a_warning() {
    let PolicyStory {
        app,
        fw_id,
        client: _client,
        ..
    } = policy_story().await;
    let never = sn("DOCK");
    let (status, e) = post_ota(
        &app,
        json!({"gateway_sn": never, "devices": [dev(&never, &fw_id)]}),
        None,
    )
    .await;
    assert_eq!(
        status, 202,
        "an unseen gateway passes with a warning in normal mode: {e}"
    );
}

#[tokio::test]
async fn an_unanswered_task_times_out_and_frees_the_gateway() {
    let PolicyStory {
        app,
        fw_id,
        dock,
        mut inbox,

        client: _client,
        ..
    } = policy_story().await;
    let task_for_dock = json!({"gateway_sn": dock, "devices": [dev(&dock, &fw_id)]});
    let (status, task) = post_ota(&app, task_for_dock.clone(), None).await;
    assert_eq!(status, 202, "{task}");
    let create = next_on(&mut inbox, "/services").await;
    assert_eq!(create["data"]["devices"][0]["firmware_upgrade_type"], 2);
    // No reply: the task times out (reply timeout 1 s here)…
    let id = task["id"].as_str().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["status"] == "timeout"
        })
        .await
    );
    // …and frees the gateway for the next task.
    let (status, next) = post_ota(&app, task_for_dock, None).await;
    assert_eq!(status, 202, "{next}");
    assert_ne!(next["id"], task["id"], "{next}");
}

#[tokio::test]
async fn a_rejected_task_keeps_the_code_and_explains_it() {
    let PolicyStory {
        app,
        fw_id,
        dock,
        client,
        mut inbox,
        ..
    } = policy_story().await;
    let (status, task) = post_ota(
        &app,
        json!({"gateway_sn": dock, "devices": [dev(&dock, &fw_id)], "firmware_upgrade_type": 3}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{task}");
    let create = next_on(&mut inbox, "/services").await;
    let reply = json!({"tid": create["tid"], "bid": create["bid"], "timestamp": 1, "method": "ota_create", "data": {"result": 312014}});
    client
        .publish(
            format!("thing/product/{dock}/services_reply"),
            QoS::AtLeastOnce,
            false,
            reply.to_string(),
        )
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["status"] == "rejected"
        })
        .await
    );
    let (_, t) = app.get_json(&format!("/api/v1/ota/{id}")).await;
    assert_eq!(t["result_code"], 312014);
    assert!(
        t["result_reason"]
            .as_str()
            .unwrap()
            .contains("already updating")
    );
}

#[tokio::test]
async fn broker_down_is_503_and_nothing_is_stored() {
    let port = free_port();
    let app = spawn_with(|s| {
        s.mqtt.target = fwrepo::mqtt::BrokerTarget::External {
            host: "127.0.0.1".into(),
            port,
            tls: None,
            user: None,
            password: None,
        };
    })
    .await;
    let fw = app.upload_ok("Dock_1.0.zip", payload(1000, 1)).await;
    let (status, e) = post_ota(
        &app,
        json!({"gateway_sn": "DOCKX", "devices": [{"sn": "DOCKX", "firmware_id": fw["id"]}]}),
        None,
    )
    .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (503, Some("broker_unavailable"))
    );
    let (_, list) = app.get_json("/api/v1/ota").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    // Downloads go on without MQTT: ready, with the broker's state in the body.
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 200);
    assert_ne!(ready["mqtt"], "connected");
    let text = app.metrics().await;
    assert!(text.contains("fwrepo_mqtt_connected 0"));
    assert!(text.contains("fwrepo_ota_tasks_created_total 0"));
}

#[tokio::test]
async fn late_verification_and_switchable_preflight() {
    let app = spawn_with(|s| {
        s.ota.verify_window = Duration::from_secs(1);
        s.ota.preflight_skip = vec!["aircraft_attached".into()];
    })
    .await;
    let fw = app.upload_ok("Dock_3.0.zip", payload(1000, 9)).await;
    let dock = sn("DOCK");
    let (client, mut inbox) = mqtt_client(&app.mqtt_addr(), "late").await;
    client
        .subscribe_acked(format!("thing/product/{dock}/services"))
        .await;
    // With aircraft_attached switched off, an unlinked second device passes preflight.
    let other = sn("AC");
    let (status, plan) = post_ota(&app, json!({"gateway_sn": dock, "devices": [{"sn": other, "firmware_id": fw["id"]}], "dry_run": true}), None).await;
    assert_eq!(status, 200, "{plan}");
    assert!(plan["warnings"].to_string().contains("aircraft_attached"));
    let (status, task) = post_ota(
        &app,
        json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw["id"]}]}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{task}");
    let create = next_on(&mut inbox, "/services").await;
    let ok = json!({"bid": create["bid"], "method": "ota_progress", "data": {"result": 0, "output": {"status": "ok", "progress": {"percent": 100}}}});
    client
        .publish(
            format!("thing/product/{dock}/events"),
            QoS::AtLeastOnce,
            false,
            ok.to_string(),
        )
        .await
        .unwrap();
    let id = task["id"].as_str().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["devices"][0]["outcome"]
                == "unverified"
        })
        .await
    );
    // The device reports the target after the window: verified late.
    let state =
        json!({"timestamp": 5, "data": {"firmware_version": "3.0", "compatible_status": 0}});
    client
        .publish(
            format!("thing/product/{dock}/state"),
            QoS::AtLeastOnce,
            false,
            state.to_string(),
        )
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["devices"][0]["outcome"]
                == "verified"
        })
        .await
    );
    // An event for no task is kept as an orphan, never fatal.
    let orphan = json!({"bid": "nobody", "method": "ota_progress", "data": {"output": {"status": "in_progress", "progress": {"percent": "150"}}}});
    client
        .publish(
            format!("thing/product/{}/events", sn("NONE")),
            QoS::AtLeastOnce,
            false,
            orphan.to_string(),
        )
        .await
        .unwrap();
    let (status, _) = app.get_json("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn firmware_in_use_by_a_task_or_by_devices() {
    let app = spawn_with(|s| {
        s.models = fwrepo::devices::ModelMap::from_table(Some(
            &toml::from_str("\"3-1-0\" = \"Dock\"\n").unwrap(),
        ))
        .unwrap();
    })
    .await;
    let old = app.upload_ok("Dock_1.0.zip", payload(1000, 1)).await;
    let new = app.upload_ok("Dock_2.0.zip", payload(1000, 2)).await;
    let (dock, aircraft) = (sn("DOCK"), sn("AC"));
    let (client, _inbox) = mqtt_client(&app.mqtt_addr(), "inuse").await;
    announce(&client, &dock, &aircraft, "1.0", 0).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.1["model"] == "Dock"
                && app.get_json(&format!("/api/v1/devices/{dock}")).await.1["firmware_version"]
                    == "1.0"
        })
        .await
    );
    // The dock runs 1.0: its package stays (consistency upgrades re-send it).
    let old_id = old["id"].as_str().unwrap();
    let (status, e) = app.delete_json(&format!("/api/v1/firmware/{old_id}")).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (409, Some("firmware_in_use")),
        "{e}"
    );
    // An open task uses 2.0.
    let (status, _) = post_ota(
        &app,
        json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": new["id"]}]}),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let new_id = new["id"].as_str().unwrap();
    let (status, e) = app
        .post_json(&format!("/api/v1/firmware/{new_id}/disable"))
        .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (409, Some("firmware_in_use")),
        "{e}"
    );
    let (status, _) = app
        .delete_json(&format!("/api/v1/firmware/{new_id}?force=true"))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn signed_urls_are_bound_to_task_device_and_firmware_and_expire() {
    let app = spawn_with(|s| {
        s.ota.preflight = "off".into();
        s.download_url_ttl_secs = 3;
    })
    .await;
    let dock_fw = app.upload_ok("Dock_4.0.zip", payload(10_000, 31)).await;
    let ac_fw = app.upload_ok("M30_4.0.zip", payload(10_000, 32)).await;
    let (g1, g2) = (sn("SIGA"), sn("SIGB"));
    let ac = format!("{g1}-AC");
    let (status, t1) = post_ota(
        &app,
        json!({"gateway_sn": g1, "devices": [
        {"sn": g1, "firmware_id": dock_fw["id"]}, {"sn": ac, "firmware_id": ac_fw["id"]}]}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{t1}");
    let dock_url = t1["devices"][0]["file_url"].as_str().unwrap().to_string();
    let ac_url = t1["devices"][1]["file_url"].as_str().unwrap().to_string();
    let sig = |u: &str| u.rsplit('/').nth(1).unwrap().to_string();
    // Signed URLs need no token (docks have none).
    let anonymous = reqwest::Client::new();
    let get = |u: String| {
        let c = anonymous.clone();
        async move {
            let r = c
                .get(&u)
                .header("range", "bytes=0-99")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(get(dock_url.clone()).await.0, 206);
    assert_eq!(get(ac_url.clone()).await.0, 206);
    // The unsigned form of the same URL needs a read token.
    let unsigned = dock_url.replace(&format!("/{}/", sig(&dock_url)), "/");
    let (status, e) = get(unsigned.clone()).await;
    assert_eq!((status, e["error"].as_str()), (401, Some("unauthorized")));
    let resp = app.client.get(&unsigned).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // The dock's signature on the aircraft's URL: other device, other firmware.
    let swapped = ac_url.replace(&sig(&ac_url), &sig(&dock_url));
    let (status, e) = get(swapped).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (403, Some("signature_invalid"))
    );
    // Another task's signature for the same firmware.
    let (_, t2) = post_ota(
        &app,
        json!({"gateway_sn": g2, "devices": [{"sn": g2, "firmware_id": dock_fw["id"]}]}),
        None,
    )
    .await;
    let other = t2["devices"][0]["file_url"].as_str().unwrap().to_string();
    let (status, e) = get(dock_url.replace(&sig(&dock_url), &sig(&other))).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (403, Some("signature_invalid"))
    );
    // Past its lifetime (3 s here) a resume fails cleanly; a new task signs a fresh URL.
    app.state.clock.advance(Duration::from_secs(4));
    let resp = anonymous
        .get(&dock_url)
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "url_expired");
    let g3 = sn("SIGC");
    let (_, t3) = post_ota(
        &app,
        json!({"gateway_sn": g3, "devices": [{"sn": g3, "firmware_id": dock_fw["id"]}]}),
        None,
    )
    .await;
    assert_eq!(
        get(t3["devices"][0]["file_url"].as_str().unwrap().to_string())
            .await
            .0,
        206
    );
}

/// A dock's final `ota_progress` is lost (a broker gap): the task still ends `ok`, verified,
/// once the dock's state reports show the target version while not upgrading.
#[tokio::test]
async fn a_lost_final_progress_is_closed_from_state_reports() {
    let app = app_with_models(30).await;
    let fw = app
        .upload_ok("Dock_10.01.0400.zip", payload(200_000, 41))
        .await;
    let fw_id = fw["id"].as_str().unwrap();
    let (dock, aircraft) = (sn("DOCK"), sn("AC"));
    let (client, mut inbox) = mqtt_client(&app.mqtt_addr(), "reconcile").await;
    client
        .subscribe(format!("thing/product/{dock}/services"), QoS::AtLeastOnce)
        .await
        .unwrap();
    announce(&client, &dock, &aircraft, "10.01.0205", 0).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.1["firmware_version"]
                == "10.01.0205"
        })
        .await
    );
    let (status, task) = post_ota(
        &app,
        json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw_id}]}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap().to_string();
    let create = next_on(&mut inbox, "/services").await;
    let publish = |topic: String, msg: Value| {
        let client = client.clone();
        async move {
            client
                .publish(topic, QoS::AtLeastOnce, false, msg.to_string())
                .await
                .unwrap()
        }
    };
    publish(
        format!("thing/product/{dock}/services_reply"),
        json!({"tid": create["tid"], "bid": create["bid"], "timestamp": 1, "method": "ota_create",
            "data": {"result": 0, "output": {"status": "in_progress", "progress": {"percent": 90}}}}),
    )
    .await;
    let path = format!("/api/v1/ota/{id}");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&path).await.1["status"] == "in_progress"
        })
        .await
    );
    // Still upgrading on the old version: nothing is concluded from that.
    let state = |version: &str, upgrading: i64| {
        json!({"tid":"t","bid":"b","timestamp":5,"data":{"firmware_version":version,
            "compatible_status":0,"firmware_upgrade_status":upgrading}})
    };
    publish(
        format!("thing/product/{dock}/state"),
        state("10.01.0205", 1),
    )
    .await;
    // The final progress is never delivered; the dock comes back on the target version.
    publish(
        format!("thing/product/{dock}/state"),
        state("10.01.0400", 0),
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            app.get_json(&path).await.1["status"] == "ok"
        })
        .await,
        "{}",
        app.get_json(&path).await.1
    );
    let (_, t) = app.get_json(&path).await;
    assert_eq!(t["devices"][0]["outcome"], "verified", "{t}");
    let sources: Vec<&str> = t["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["source"].as_str())
        .collect();
    assert_eq!(sources.last(), Some(&"reconcile"), "{t}");
    // The gateway is free for the next task.
    assert_up_to_date(&app, &dock, fw_id).await;
}

/// Two requests for one gateway at the same moment: exactly one task is created.
#[tokio::test]
async fn concurrent_requests_for_one_gateway_create_one_task() {
    let app = app_with_models(30).await;
    let fw = app.upload_ok("Dock_11.0.zip", payload(1000, 51)).await;
    let dock = sn("RACE");
    let body = json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw["id"]}]});
    let answers =
        futures::future::join_all((0..8).map(|_| post_ota(&app, body.clone(), None))).await;
    let created: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, t)| t)
        .collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    for (status, e) in answers.iter().filter(|(s, _)| *s != 202) {
        assert_eq!(
            (*status, e["error"].as_str()),
            (409, Some("gateway_busy")),
            "{e}"
        );
        assert_eq!(e["task_id"], created[0]["id"], "{e}");
    }
    let (_, list) = app
        .get_json(&format!("/api/v1/ota?gateway_sn={dock}"))
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    // A refused or dry-run request holds nothing: after the task ends the gateway is free.
    let g = sn("DRY");
    let dry =
        json!({"gateway_sn": g, "devices": [{"sn": g, "firmware_id": fw["id"]}], "dry_run": true});
    assert_eq!(post_ota(&app, dry.clone(), None).await.0, 200);
    assert_eq!(post_ota(&app, dry, None).await.0, 200);
}
