//! fwrepo on an external broker (Mosquitto, EMQX). Runs when FWREPO_TEST_MQTT_URL
//! (`mqtt://127.0.0.1:PORT`) is set — `.ci/run` starts a Mosquitto for it; otherwise prints a
//! skip line.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::json;

use crate::helpers::*;

fn broker() -> Option<(String, u16)> {
    let Ok(url) = std::env::var("FWREPO_TEST_MQTT_URL") else {
        eprintln!("SKIP external broker tests: FWREPO_TEST_MQTT_URL not set");
        return None;
    };
    let u = url::Url::parse(&url).expect("FWREPO_TEST_MQTT_URL is a URL");
    Some((u.host_str()?.to_string(), u.port().unwrap_or(1883)))
}

#[tokio::test]
async fn external_broker_learns_devices_and_survives_an_oversized_publish() {
    let Some((host, port)) = broker() else { return };
    let tag = fwrepo::domain::ids::next().to_lowercase();
    let app = spawn_with(|s| {
        s.mqtt = fwrepo::mqtt::MqttSettings {
            target: fwrepo::mqtt::BrokerTarget::External {
                host: host.clone(),
                port,
                tls: false,
                user: None,
                password: None,
            },
            client_id: Some(format!("fwrepo-test-{tag}")),
            replies: true,
        };
    })
    .await;
    assert!(
        app.state
            .mqtt
            .address_line
            .starts_with("MQTT connected to mqtt://")
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.state.mqtt.status.connected.load(Ordering::Relaxed)
        })
        .await
    );
    // Let the subscriptions land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errors_before = app.state.mqtt.status.connect_errors.load(Ordering::Relaxed);
    let (client, _inbox) = mqtt_client(&format!("{host}:{port}"), "ext").await;
    let dock = format!("EXT{}", &tag[16..]);
    // A 2 MiB publish on a subscribed topic: dropped by fwrepo, the session stays up.
    let big = vec![b'x'; 2 << 20];
    client
        .publish(
            format!("thing/product/{dock}/state"),
            QoS::AtLeastOnce,
            false,
            big,
        )
        .await
        .unwrap();
    let topo = json!({"tid":"t","bid":"b","timestamp":1,"method":"update_topo",
        "data":{"domain":3,"type":1,"sub_type":0,"version":"1.0","sub_devices":[]}});
    client
        .publish(
            format!("sys/product/{dock}/status"),
            QoS::AtLeastOnce,
            false,
            topo.to_string(),
        )
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.0 == 200
        })
        .await,
        "the device published after the oversized message was not learned"
    );
    let (_, d) = app.get_json(&format!("/api/v1/devices/{dock}")).await;
    assert_eq!(d["dialect"], "autel");
    assert_eq!(d["model_key"], "3-1-0");
    assert!(app.state.mqtt.status.connected.load(Ordering::Relaxed));
    assert_eq!(
        app.state.mqtt.status.connect_errors.load(Ordering::Relaxed),
        errors_before,
        "the session must not have reconnected"
    );
    assert!(app.state.mqtt.status.dropped.load(Ordering::Relaxed) >= 1);
}
