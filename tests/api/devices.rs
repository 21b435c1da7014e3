//! The device registry over MQTT: topology, state and osd in both dialects, replies, bad
//! messages counted, and the devices API.

use std::time::Duration;

use rumqttc::QoS;
use serde_json::{Value, json};

use crate::helpers::*;

/// A dock and its aircraft (M30, also known as m30t) as the registry learned them from a
/// scripted dock: its `update_topo`, the aircraft's state (10.01.0205, inconsistent), the
/// dock's osd and an event that needs a reply. The test client is subscribed to the dock's
/// `status_reply` and `events_reply`; its inbox holds what the server answered.
struct LearnedPair {
    app: TestApp,
    dock: String,
    aircraft: String,
    /// The scripted dock: bind it for the whole test (`client: _client`), or its connection
    /// and subscriptions end with the setup.
    client: TestClient,
    inbox: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

async fn publish(client: &TestClient, topic: String, qos: QoS, body: String) {
    client.publish(topic, qos, false, body).await.unwrap();
}

async fn learned_pair() -> LearnedPair {
    let app = spawn_with(|s| {
        s.models = fwrepo::devices::ModelMap::from_table(Some(
            &toml::from_str("\"3-1-0\" = \"Dock\"\n\"0-67-0\" = [\"M30\", \"m30t\"]\n").unwrap(),
        ))
        .unwrap();
    })
    .await;
    app.wait_mqtt_subscribed().await;
    let (dock, aircraft) = (sn("DOCK"), sn("AC"));
    let (client, inbox) = mqtt_client(&app.mqtt_addr(), "devices").await;
    client
        .subscribe_acked(format!("sys/product/{dock}/status_reply"))
        .await;
    client
        .subscribe_acked(format!("thing/product/{dock}/events_reply"))
        .await;
    let topo = json!({"tid":"t1","bid":"b1","timestamp":1,"method":"update_topo","gateway":dock,
        "data":{"domain":"3","type":1,"sub_type":0,"thing_version":"1.1.2",
            "sub_devices":[{"sn":aircraft,"domain":"0","type":67,"sub_type":0,"index":"A"}]}});
    let state = json!({"tid":"t2","bid":"b2","timestamp":"2","gateway":dock,
        "data":{"firmware_version":"10.01.0205","compatible_status":1,"firmware_upgrade_status":0}});
    let osd = json!({"tid":"t3","bid":"b3","timestamp":3,"data":{"mode_code":0}});
    let event =
        json!({"tid":"t4","bid":"b4","timestamp":4,"method":"hms","need_reply":1,"data":{}});
    for (topic, qos, body) in [
        (format!("sys/product/{dock}/status"), QoS::AtLeastOnce, topo),
        (
            format!("thing/product/{aircraft}/state"),
            QoS::AtLeastOnce,
            state,
        ),
        (format!("thing/product/{dock}/osd"), QoS::AtMostOnce, osd),
        (
            format!("thing/product/{dock}/events"),
            QoS::AtLeastOnce,
            event,
        ),
    ] {
        publish(&client, topic, qos, body.to_string()).await;
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let (_, d) = app.get_json(&format!("/api/v1/devices/{aircraft}")).await;
            d["firmware_version"] == "10.01.0205"
        })
        .await,
        "the aircraft's state was never learned"
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.1["mode_code"] == 0
        })
        .await,
        "the dock's osd was never learned"
    );
    LearnedPair {
        app,
        dock,
        aircraft,
        client,
        inbox,
    }
}

#[tokio::test]
async fn an_aircraft_is_learned_from_the_topology_and_its_state() {
    let LearnedPair {
        app,
        dock,
        aircraft,
        client: _client,
        ..
    } = learned_pair().await;
    let (_, d) = app.get_json(&format!("/api/v1/devices/{aircraft}")).await;
    assert_eq!(d["firmware_version"], "10.01.0205", "{d}");
    assert_eq!(d["gateway_sn"], dock.as_str());
    assert_eq!(d["model_key"], "0-67-0");
    assert_eq!(d["model"], "M30");
    assert_eq!(d["compatible_status"], 1);
    assert_eq!(d["online"], true);
}

#[tokio::test]
async fn a_dock_is_learned_from_its_topology_and_osd() {
    let LearnedPair {
        app,
        dock,
        aircraft,
        client: _client,
        ..
    } = learned_pair().await;
    let (_, g) = app.get_json(&format!("/api/v1/devices/{dock}")).await;
    assert_eq!(g["mode_code"], 0, "{g}");
    assert_eq!(g["child_sn"], aircraft.as_str());
    assert_eq!(g["model"], "Dock");
    assert_eq!(g["dialect"], "dji");
}

#[tokio::test]
async fn update_topo_and_events_that_need_a_reply_are_answered() {
    let LearnedPair {
        mut inbox,
        client: _client,
        ..
    } = learned_pair().await;
    // Replies: status_reply to update_topo, events_reply to need_reply = 1.
    let mut replies: Vec<(String, Value)> = Vec::new();
    while replies.len() < 2 {
        let (topic, payload) = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .unwrap()
            .unwrap();
        replies.push((topic, serde_json::from_slice(&payload).unwrap()));
    }
    let status = replies
        .iter()
        .find(|(t, _)| t.ends_with("status_reply"))
        .unwrap();
    assert_eq!(status.1["tid"], "t1");
    assert_eq!(status.1["method"], "update_topo");
    assert_eq!(status.1["data"]["result"], 0);
    let ev = replies
        .iter()
        .find(|(t, _)| t.ends_with("events_reply"))
        .unwrap();
    assert_eq!(ev.1["bid"], "b4");
}

#[tokio::test]
async fn devices_are_listed_by_gateway_and_filtered_by_model_alias_and_version() {
    let LearnedPair {
        app,
        dock,
        client: _client,
        ..
    } = learned_pair().await;
    let (_, list) = app
        .get_json(&format!("/api/v1/devices?gateway_sn={dock}"))
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
    let (_, list) = app
        .get_json("/api/v1/devices?model=m30&version=10.1.2.5")
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test]
async fn devices_are_filtered_by_serial_and_kind_and_paged() {
    let LearnedPair {
        app,
        dock,
        aircraft,
        client: _client,
        ..
    } = learned_pair().await;
    let ids = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["sn"].as_str().unwrap().to_string())
            .collect()
    };
    // A part of the serial, in any case (the dock's serial differs only at its ends).
    let part = aircraft[1..].to_ascii_lowercase();
    let (_, list) = app
        .get_json(&format!("/api/v1/devices?sn_contains={part}"))
        .await;
    assert_eq!(ids(&list), std::slice::from_ref(&aircraft), "{list}");
    for (kind, expected) in [("gateway", &dock), ("sub_device", &aircraft)] {
        let (status, list) = app
            .get_json(&format!("/api/v1/devices?gateway_sn={dock}&kind={kind}"))
            .await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(ids(&list), std::slice::from_ref(expected), "{kind}: {list}");
    }
    let (status, body) = app.get_json("/api/v1/devices?kind=drone").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    // Pages of a filtered list: every device once, newest first, then the end.
    let prefix = sn("PAGE");
    let made: Vec<String> = (0..5).map(|i| format!("{prefix}-{i}")).collect();
    for d in &made {
        let resp = app
            .client
            .put(app.url(&format!("/api/v1/devices/{d}")))
            .json(&json!({"model": "Dock"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let (mut seen, mut cursor) = (Vec::new(), String::new());
    for _ in 0..3 {
        let (_, page) = app
            .get_json(&format!(
                "/api/v1/devices?sn_contains={prefix}&kind=gateway&limit=2{cursor}"
            ))
            .await;
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => cursor.clear(),
        }
    }
    assert!(cursor.is_empty(), "a fourth page was announced");
    let newest_first: Vec<String> = made.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
}

#[tokio::test]
async fn a_seen_within_window_beyond_i64_means_ever_seen() {
    let LearnedPair {
        app,
        dock,
        client: _client,
        ..
    } = learned_pair().await;
    // Any u64 window is valid; one beyond i64 means "ever seen", never "every device".
    let never_seen = sn("NEVER");
    app.client
        .put(app.url(&format!("/api/v1/devices/{never_seen}")))
        .json(&json!({"model": "Dock"}))
        .send()
        .await
        .unwrap();
    for window in ["9223372036854775808", "18446744073709551615"] {
        let (status, list) = app
            .get_json(&format!(
                "/api/v1/devices?gateway_sn={dock}&seen_within_s={window}"
            ))
            .await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
        let (_, all) = app
            .get_json(&format!("/api/v1/devices?seen_within_s={window}&limit=500"))
            .await;
        assert!(
            all["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["sn"] != never_seen.as_str()),
            "{all}"
        );
    }
}

#[tokio::test]
async fn malformed_messages_are_counted_and_never_fatal() {
    let app = spawn_app().await;
    app.wait_mqtt_subscribed().await;
    let dock = sn("DOCK");
    let (client, _inbox) = mqtt_client(&app.mqtt_addr(), "malformed").await;
    // Bad input: counted, never fatal.
    for (topic, payload) in [
        (
            format!("thing/product/{dock}/state"),
            "not json".to_string(),
        ),
        (format!("thing/product/{dock}/osd/extra"), "{}".to_string()),
    ] {
        publish(&client, topic, QoS::AtLeastOnce, payload).await;
    }
    // A good report after them on the same topic and connection: once it is learned, the bad
    // ones before it have been handled, and the registry still works.
    let good = json!({"tid":"t5","bid":"b5","timestamp":5,"data":{"firmware_version":"1.2.3"}});
    publish(
        &client,
        format!("thing/product/{dock}/state"),
        QoS::AtLeastOnce,
        good.to_string(),
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.1["firmware_version"] == "1.2.3"
        })
        .await,
        "a good report after malformed ones was never learned"
    );
    let text = app.metrics().await;
    assert!(text.contains("fwrepo_mqtt_connected 1"), "{text}");
    assert!(text.contains("fwrepo_mqtt_malformed_total "), "{text}");
    assert!(!text.contains("fwrepo_mqtt_malformed_total 0"), "{text}");
    let (_, ready) = app.get_json("/readyz").await;
    assert_eq!(ready["mqtt"], "connected");
}

#[tokio::test]
async fn devices_api_put_get_delete() {
    let app = spawn_app().await;
    let dock = sn("DOCK");
    let aircraft = sn("AC");
    let resp = app
        .client
        .put(app.url(&format!("/api/v1/devices/{aircraft}")))
        .json(&json!({"model": "M3D", "gateway_sn": dock}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let d: Value = resp.json().await.unwrap();
    assert_eq!(d["model"], "M3D");
    assert_eq!(d["online"], false);
    let (_, g) = app.get_json(&format!("/api/v1/devices/{dock}")).await;
    assert_eq!(g["child_sn"], aircraft.as_str());
    let resp = app
        .client
        .put(app.url(&format!("/api/v1/devices/{aircraft}")))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
    let (status, _) = app
        .delete_json(&format!("/api/v1/devices/{aircraft}"))
        .await;
    assert_eq!(status, 200);
    let (status, body) = app.get_json(&format!("/api/v1/devices/{aircraft}")).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, _) = app
        .delete_json(&format!("/api/v1/devices/{aircraft}"))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn replies_none_sends_no_replies_but_still_learns() {
    let app = spawn_with(|s| s.mqtt.replies = false).await;
    let dock = sn("DOCK");
    let (client, mut inbox) = mqtt_client(&app.mqtt_addr(), "noreplies").await;
    for t in [
        format!("sys/product/{dock}/status_reply"),
        format!("thing/product/{dock}/events_reply"),
    ] {
        client.subscribe_acked(t).await;
    }
    let messages = [
        (
            format!("sys/product/{dock}/status"),
            json!({"tid":"t1","bid":"b1","timestamp":1,"method":"update_topo",
                "data":{"domain":"3","type":1,"sub_type":0,"sub_devices":[]}}),
        ),
        (
            format!("thing/product/{dock}/events"),
            json!({"tid":"t2","bid":"b2","timestamp":2,"method":"hms","need_reply":1,"data":{}}),
        ),
        (
            format!("thing/product/{dock}/events"),
            json!({"tid":"t3","bid":"b3","timestamp":3,"method":"ota_progress",
                "data":{"output":{"status":"in_progress","progress":{"percent":5}}}}),
        ),
        (
            format!("thing/product/{dock}/state"),
            json!({"tid":"t4","bid":"b4","timestamp":4,"data":{"firmware_version":"1.2.3"}}),
        ),
    ];
    for (topic, body) in &messages {
        client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
            .unwrap();
    }
    // The state message comes last on the same connection: once it is learned, the events
    // before it have been handled (and, with replies on, answered at once).
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.1["firmware_version"] == "1.2.3"
        })
        .await
    );
    let got = tokio::time::timeout(Duration::from_millis(1500), inbox.recv()).await;
    assert!(got.is_err(), "a reply was sent: {got:?}");
}
