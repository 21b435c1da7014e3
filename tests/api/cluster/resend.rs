//! An `ota_create` that never left the replica that stored it (killed -9 first) is sent again,
//! with the same tid and bid, by the replica that takes over the dead one's broker session,
//! once every message that session held is recorded, or by the replica itself when it comes
//! back first.

use super::*;

/// The gateway is not listening when replica 1 sends its `ota_create` (the broker drops it, as
/// if it had never left r1), then r1 is killed -9: r2 sends the same message again, and the
/// task goes on when the gateway answers it.
#[tokio::test]
async fn an_ota_create_lost_with_its_sender_is_sent_again_by_another_replica() {
    let root = tempfile::tempdir().unwrap();
    let Some(shared) = Shared::new(
        "an_ota_create_lost_with_its_sender_is_sent_again_by_another_replica",
        root.path(),
    )
    .await
    else {
        return;
    };
    let reply_timeout = ["--ota-reply-timeout", "60"];
    let mut r1 = shared.start(root.path(), "r1", &reply_timeout);
    let r2 = shared.start(root.path(), "r2", &reply_timeout);
    let (gw, task) = task_nobody_hears(&r1, "LOST").await;
    let id = task["id"].as_str().unwrap().to_string();
    // r2 knows the task before r1 goes (it reads the open tasks every 5 s).
    assert!(
        wait_until(Duration::from_secs(20), || async {
            get_json_at(&r2.base, &format!("/api/v1/ota/{id}")).await["status"] == "sent"
        })
        .await
    );
    let (gateway, mut inbox) = mqtt_client(&r1.mqtt, "lost-gateway").await;
    gateway
        .subscribe_acked(format!("thing/product/{gw}/services"))
        .await;
    r1.kill9();
    sent_again_and_answered(&gateway, &mut inbox, &task, &r2.base).await;
}

/// The same with one replica, which comes back at once after the kill -9 (nobody adopts its
/// session): it sends the message itself once it is back, and only once.
#[tokio::test]
async fn an_ota_create_lost_with_its_sender_is_sent_again_when_it_comes_back() {
    let root = tempfile::tempdir().unwrap();
    let test = "an_ota_create_lost_with_its_sender_is_sent_again_when_it_comes_back";
    let Some(shared) = Shared::new(test, root.path()).await else {
        return;
    };
    let reply_timeout = ["--ota-reply-timeout", "60"];
    let mut r1 = shared.start(root.path(), "r1", &reply_timeout);
    let (gw, task) = task_nobody_hears(&r1, "BACK").await;
    let (gateway, mut inbox) = mqtt_client(&r1.mqtt, "back-gateway").await;
    gateway
        .subscribe_acked(format!("thing/product/{gw}/services"))
        .await;
    r1.kill9();
    let r1 = shared.start(root.path(), "r1", &reply_timeout);
    sent_again_and_answered(&gateway, &mut inbox, &task, &r1.base).await;
}

/// An OTA task created through `r` for a new gateway (serial from `prefix`) that is not
/// listening: the broker drops its `ota_create`, as if it had never left `r`.
async fn task_nobody_hears(r: &ServerProcess, prefix: &str) -> (String, Value) {
    let gw = sn(prefix);
    let fw = upload_to(r, "Dock_3.0.0.zip", 4).await;
    let (status, task) = post_to(
        r,
        "/api/v1/ota",
        serde_json::json!({"gateway_sn": gw, "devices": [{"sn": gw, "firmware_id": fw}]}),
    )
    .await;
    assert_eq!(status, 202, "{task}");
    (gw, task)
}

/// The gateway (listening on `inbox`) gets `task`'s `ota_create` again, with the same tid and
/// bid and `publish_again` in the task's history as `base` shows it; its answer is recorded,
/// and nothing is sent a third time.
async fn sent_again_and_answered(
    gateway: &TestClient,
    inbox: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: &Value,
    base: &str,
) {
    let (id, gw) = (
        task["id"].as_str().unwrap(),
        task["gateway_sn"].as_str().unwrap(),
    );
    let resent = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let (topic, payload) = inbox.recv().await.expect("gateway client alive");
            let msg: Value = serde_json::from_slice(&payload).unwrap();
            if topic.ends_with("/services") && msg["method"] == "ota_create" {
                return msg;
            }
        }
    })
    .await
    .expect("no replica sent the lost ota_create again");
    assert_eq!(resent["tid"], task["tid"], "{resent}");
    assert_eq!(resent["bid"], task["bid"], "{resent}");
    let stored = get_json_at(base, &format!("/api/v1/ota/{id}")).await;
    let sources: Vec<&str> = stored["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["source"].as_str())
        .collect();
    assert!(sources.contains(&"publish_again"), "{stored}");
    let reply = serde_json::json!({"tid": task["tid"], "bid": task["bid"], "timestamp": 1,
        "method": "ota_create", "data": {"result": 0}});
    gateway
        .publish(
            format!("thing/product/{gw}/services_reply"),
            rumqttc::QoS::AtLeastOnce,
            false,
            reply.to_string(),
        )
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            get_json_at(base, &format!("/api/v1/ota/{id}")).await["replied_at"].is_string()
        })
        .await,
        "the gateway's answer to the message sent again was not recorded: {}",
        get_json_at(base, &format!("/api/v1/ota/{id}")).await
    );
    // Sent again once.
    let again = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some((topic, _)) = inbox.recv().await {
            if topic.ends_with("/services") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(again.is_err() || again == Ok(false), "sent a third time");
}
