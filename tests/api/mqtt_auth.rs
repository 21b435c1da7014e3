//! The embedded broker with `--mqtt-auth on` and a TLS listener: a dock connects only as
//! itself (user name = client id, its derived password), fwrepo's own session and the simulator
//! carry credentials, and an OTA task runs end to end; a client trusting another CA is refused.

use std::time::Duration;

use fwrepo::mqtt::credentials::{GatewayCredentials, KEY_FILE};
use serde_json::{Value, json};

use crate::helpers::*;

/// Connects with these options; `Ok` once the broker accepted the CONNECT.
async fn connect(
    addr: &str,
    client_id: &str,
    login: Option<(&str, &str)>,
    tls_ca: Option<&str>,
) -> Result<(), String> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut opts = rumqttc::MqttOptions::new(client_id, host, port.parse().unwrap());
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    if let Some(ca) = tls_ca {
        opts.set_transport(rumqttc::Transport::tls(ca.as_bytes().to_vec(), None, None));
    }
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    return if a.code == rumqttc::ConnectReturnCode::Success {
                        Ok(())
                    } else {
                        Err(format!("{:?}", a.code))
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    outcome.unwrap_or_else(|_| Err("timed out".into()))
}

#[tokio::test]
async fn embedded_broker_credentials_bind_the_client_id_and_tls_listener_works() {
    let certs_dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates();
    let (cert_path, key_path) = (
        certs_dir.path().join("cert.pem"),
        certs_dir.path().join("key.pem"),
    );
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let app = spawn_with(|s| {
        s.models = fwrepo::devices::ModelMap::from_table(Some(
            &toml::from_str("\"3-1-0\" = \"Dock\"\n\"0-67-0\" = \"M30\"\n").unwrap(),
        ))
        .unwrap();
        s.mqtt.embedded.auth = true;
        s.mqtt.embedded.tls = Some(("127.0.0.1:0".parse().unwrap(), cert_path, key_path));
    })
    .await;
    // fwrepo's own session authenticated like any client.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json("/readyz").await.1["mqtt"] == "connected"
        })
        .await,
        "fwrepo's session never connected"
    );
    let key_file = app.dir.path().join(KEY_FILE);
    let credentials = GatewayCredentials::load(&key_file).unwrap();
    let mqtt = app.mqtt_addr();
    let sn = crate::helpers::sn("MA");
    let other = format!("{sn}X");
    let password = credentials.password(&sn);
    assert!(
        connect(&mqtt, &sn, Some((&sn, &password)), None)
            .await
            .is_ok()
    );
    // No credentials, a wrong password, another dock's identity: refused.
    assert!(connect(&mqtt, &sn, None, None).await.is_err());
    assert!(
        connect(&mqtt, &sn, Some((&sn, "wrong")), None)
            .await
            .is_err()
    );
    assert!(
        connect(&mqtt, &other, Some((&sn, &password)), None)
            .await
            .is_err(),
        "a dock's credentials must not open another client id"
    );
    assert!(
        connect(&mqtt, &other, Some((&other, &password)), None)
            .await
            .is_err()
    );

    // The TLS listener: the same credentials; a client trusting another CA is refused.
    let tls_line = app.state.mqtt.tls_address_line.clone().unwrap();
    let tls_addr = tls_line.rsplit("mqtts://").next().unwrap().to_string();
    let tls_addr = tls_addr.replace("127.0.0.1", "localhost");
    connect(&tls_addr, &sn, Some((&sn, &password)), Some(&ca))
        .await
        .unwrap();
    let (other_ca, _, _) = certificates();
    assert!(
        connect(&tls_addr, &sn, Some((&sn, &password)), Some(&other_ca))
            .await
            .is_err()
    );

    // `fwrepo mqtt-password` prints the same password.
    let out = std::process::Command::new(bin())
        .args(["mqtt-password", "--data-dir"])
        .arg(app.dir.path())
        .arg(&sn)
        .env_remove("FWREPO_DATA_DIR")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{sn} {password}")
    );

    // The simulator with the key: its dock comes online and an OTA task ends ok.
    let key_arg = key_file.to_str().unwrap().to_string();
    let (prefix, cancel) = fleet(&mqtt, 1, &["--mqtt-credentials-key", &key_arg]).await;
    let dock = format!("{prefix}0001");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.1["online"] == true
        })
        .await,
        "the simulated dock never came online"
    );
    let fw = app.upload_ok("Dock_9.0.zip", payload(50_000, 9)).await;
    let resp = app
        .client
        .post(app.url("/api/v1/ota"))
        .json(&json!({"gateway_sn": dock, "devices": [{"sn": dock, "firmware_id": fw["id"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let task: Value = resp.json().await.unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["status"] == "ok"
        })
        .await,
        "{}",
        app.get_json(&format!("/api/v1/ota/{id}")).await.1
    );
    cancel.cancel();
}

/// A raw MQTT 3.1.1 connection as `client_id` (keep-alive 60 s): the stream, held open, and
/// the CONNACK's return code.
async fn raw_connect(addr: &str, client_id: &str) -> (tokio::net::TcpStream, u8) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(&packet).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack))
        .await
        .expect("no CONNACK within 10 s")
        .unwrap();
    assert_eq!(connack[..2], [0x20, 0x02], "not a CONNACK: {connack:?}");
    (stream, connack[3])
}

#[tokio::test]
async fn the_embedded_broker_refuses_connections_beyond_its_limit_with_a_connack() {
    let app = spawn_with(|s| s.mqtt.embedded.max_connections = Some(2)).await;
    // fwrepo's own session does not take a gateway's place.
    app.wait_mqtt_subscribed().await;
    let addr = app.mqtt_addr();
    let id = |n: &str| format!("limit-{n}-{}", sn(""));
    let (first, code) = raw_connect(&addr, &id("a")).await;
    assert_eq!(code, 0);
    let (_second, code) = raw_connect(&addr, &id("b")).await;
    assert_eq!(code, 0);
    // The third: "server unavailable", which clients report as such.
    let (_, code) = raw_connect(&addr, &id("c")).await;
    assert_eq!(code, 3);
    let refused = connect(&addr, &id("d"), None, None).await.unwrap_err();
    assert!(refused.contains("ServiceUnavailable"), "{refused}");
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "fwrepo_mqtt_broker_refused_total"),
        2
    );
    assert_eq!(metric_value(&metrics, "fwrepo_mqtt_broker_connections"), 2);
    // A place that frees up is taken again.
    drop(first);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            metric_value(&app.metrics().await, "fwrepo_mqtt_broker_connections") == 1
        })
        .await,
        "the closed connection was never counted out"
    );
    let (_third, code) = raw_connect(&addr, &id("e")).await;
    assert_eq!(code, 0);
}
