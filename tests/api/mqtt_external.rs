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
                tls: None,
                user: None,
                password: None,
            },
            client_id: Some(format!("fwrepo-test-{tag}")),
            replies: true,
            share_group: None,
            embedded: Default::default(),
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
    // The broker acknowledged every subscription.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.state.mqtt.status.subscribed.load(Ordering::Relaxed)
        })
        .await
    );
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

fn external(host: &str, port: u16, tag: &str) -> fwrepo::mqtt::MqttSettings {
    fwrepo::mqtt::MqttSettings {
        target: fwrepo::mqtt::BrokerTarget::External {
            host: host.to_string(),
            port,
            tls: None,
            user: None,
            password: None,
        },
        client_id: Some(format!("fwrepo-test-{tag}")),
        replies: true,
        share_group: None,
        embedded: Default::default(),
    }
}

async fn app_on(host: &str, port: u16) -> TestApp {
    let tag = fwrepo::domain::ids::next().to_lowercase();
    spawn_with(|s| {
        s.mqtt = external(host, port, &tag);
        s.models = fwrepo::devices::ModelMap::from_table(Some(
            &toml::from_str("\"3-1-0\" = \"Dock\"\n").unwrap(),
        ))
        .unwrap();
    })
    .await
}

async fn upgrade_one(
    app: &TestApp,
    mqtt_url: &str,
    extra: &[&str],
) -> (String, String, tokio_util::sync::CancellationToken) {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        sim: fwrepo::simulator::SimConfig,
    }
    let prefix = sn("X")[..9].to_string();
    let mut argv = vec![
        "sim",
        "--mqtt-url",
        mqtt_url,
        "--sn-prefix",
        &prefix,
        "--osd-every",
        "1",
    ];
    argv.extend_from_slice(extra);
    let cancel = tokio_util::sync::CancellationToken::new();
    fwrepo::simulator::run(Args::parse_from(argv).sim, cancel.clone())
        .await
        .unwrap();
    let gw = format!("{prefix}0001");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            let (_, d) = app.get_json(&format!("/api/v1/devices/{gw}")).await;
            d["online"] == true && d["mode_code"] == 0
        })
        .await
    );
    let fw = app.upload_ok("Dock_2.0.zip", payload(3_000_000, 5)).await;
    let resp = app
        .client
        .post(app.url("/api/v1/ota"))
        .json(&json!({"gateway_sn": gw, "devices": [{"sn": gw, "firmware_id": fw["id"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    (id, gw, cancel)
}

#[tokio::test]
async fn ota_through_an_external_broker_with_the_simulator() {
    let Some((host, port)) = broker() else { return };
    let app = app_on(&host, port).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.state.mqtt.status.connected.load(Ordering::Relaxed)
        })
        .await
    );
    let (id, _, cancel) = upgrade_one(
        &app,
        &format!("mqtt://{host}:{port}"),
        &["--dialect", "dji"],
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["status"] == "ok"
        })
        .await
    );
    cancel.cancel();
}

struct Mosquitto(std::process::Child);

impl Mosquitto {
    fn start(dir: &std::path::Path, port: u16) -> Mosquitto {
        Mosquitto::start_with(dir, port, "")
    }

    /// With extra configuration lines for the listener (TLS).
    fn start_with(dir: &std::path::Path, port: u16, extra: &str) -> Mosquitto {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{extra}{}persistence false\n",
                if extra.contains("allow_anonymous") {
                    ""
                } else {
                    "allow_anonymous true\n"
                }
            ),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto on PATH");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Mosquitto(child)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn broker_restart_mid_task_reconnects_and_completes() {
    // Needs a mosquitto binary; .ci/run provides one together with FWREPO_TEST_MQTT_URL.
    if broker().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Mosquitto::start(dir.path(), port);
    let app = app_on("127.0.0.1", port).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.state.mqtt.status.connected.load(Ordering::Relaxed)
        })
        .await
    );
    let (id, _, cancel) = upgrade_one(
        &app,
        &format!("mqtt://127.0.0.1:{port}"),
        &["--rate", "1000000"],
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["status"] == "in_progress"
        })
        .await
    );
    drop(broker);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !app.state.mqtt.status.connected.load(Ordering::Relaxed)
        })
        .await
    );
    let _broker = Mosquitto::start(dir.path(), port);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            app.state.mqtt.status.connected.load(Ordering::Relaxed)
        })
        .await,
        "fwrepo did not reconnect"
    );
    assert!(
        wait_until(Duration::from_secs(40), || async {
            app.get_json(&format!("/api/v1/ota/{id}")).await.1["status"] == "ok"
        })
        .await,
        "the task did not complete after the broker restart: {}",
        app.get_json(&format!("/api/v1/ota/{id}")).await.1
    );
    cancel.cancel();
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl on PATH");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fwrepo test CA",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for name in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
    }
}

#[tokio::test]
async fn mqtts_with_a_private_ca_and_a_client_certificate() {
    // Needs mosquitto and openssl; .ci/run provides them together with FWREPO_TEST_MQTT_URL.
    if broker().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let port = free_port();
    // `user root`: a Mosquitto started as root would otherwise read the (0600) key file as
    // the `mosquitto` user and fail; the option does nothing for a non-root user.
    let tls_conf = format!(
        "user root\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        d.join("ca.pem").display(),
        d.join("server.pem").display(),
        d.join("server.key").display()
    );
    let _broker = Mosquitto::start_with(d, port, &tls_conf);
    let tls = |client_cert: bool| fwrepo::mqtt::tls::MqttTls {
        ca_file: Some(d.join("ca.pem")),
        client_cert: client_cert.then(|| d.join("client.pem")),
        client_key: client_cert.then(|| d.join("client.key")),
    };
    let settings = |client_cert: bool| {
        let mut m = external(
            "127.0.0.1",
            port,
            &fwrepo::domain::ids::next().to_lowercase(),
        );
        if let fwrepo::mqtt::BrokerTarget::External { tls: t, .. } = &mut m.target {
            *t = Some(tls(client_cert));
        }
        m
    };
    // Without the client certificate the broker refuses the handshake: never connected.
    let refused = spawn_with(|s| s.mqtt = settings(false)).await;
    let app = spawn_with(|s| s.mqtt = settings(true)).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.state.mqtt.status.connected.load(Ordering::Relaxed)
        })
        .await,
        "no TLS session: {:?}",
        app.state.mqtt.status.last_error.lock().unwrap()
    );
    // A dock on the same TLS listener is learned.
    let dock = sn("TLSDOCK");
    let topo = json!({"tid":"t","bid":"b","timestamp":1,"method":"update_topo",
        "data":{"domain":"3","type":1,"sub_type":0,"sub_devices":[]}});
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .arg("--cafile")
        .arg(d.join("ca.pem"))
        .arg("--cert")
        .arg(d.join("client.pem"))
        .arg("--key")
        .arg(d.join("client.key"))
        .args([
            "-t",
            &format!("sys/product/{dock}/status"),
            "-m",
            &topo.to_string(),
        ])
        .output()
        .expect("mosquitto_pub on PATH");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.0 == 200
        })
        .await
    );
    assert!(!refused.state.mqtt.status.connected.load(Ordering::Relaxed));
    assert!(
        refused
            .state
            .mqtt
            .status
            .connect_errors
            .load(Ordering::Relaxed)
            >= 1
    );
}

/// Publishes one message with `mosquitto_pub` as `user` (client id = user name); whether the
/// broker accepted the connection.
fn pub_as(port: u16, user: &str, password: &str, topic: &str, payload: &str) -> bool {
    std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args([
            "-i", user, "-u", user, "-P", password, "-t", topic, "-m", payload,
        ])
        .output()
        .expect("mosquitto_pub on PATH")
        .status
        .success()
}

#[tokio::test]
async fn mosquitto_with_the_deploy_password_file_and_acl() {
    // Needs mosquitto and mosquitto_passwd; .ci/run provides them with FWREPO_TEST_MQTT_URL.
    if broker().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The ACL shipped in deploy/ (fwrepo's user, the dock patterns, dock 4TADK000000001 with
    // its aircraft), and a password file made as deploy/mosquitto/README.md says.
    let acl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mosquitto/acl");
    let passwd = d.join("passwd");
    let dock = "4TADK000000001";
    for (user, password) in [("fwrepo", "server-secret"), (dock, "dock-secret")] {
        let mut cmd = std::process::Command::new("mosquitto_passwd");
        if !passwd.exists() {
            cmd.arg("-c");
        }
        let out = cmd
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .output()
            .expect("mosquitto_passwd on PATH");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let port = free_port();
    let conf = format!(
        "user root\nallow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwd.display(),
        acl.display()
    );
    let _broker = Mosquitto::start_with(d, port, &conf);
    let app = spawn_with(|s| {
        s.mqtt = external("127.0.0.1", port, "unused");
        s.mqtt.client_id = Some(format!("fwrepo-acl-{}", fwrepo::domain::ids::next()));
        if let fwrepo::mqtt::BrokerTarget::External { user, password, .. } = &mut s.mqtt.target {
            *user = Some("fwrepo".into());
            *password = Some("server-secret".into());
        }
    })
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.state.mqtt.status.connected.load(Ordering::Relaxed)
        })
        .await,
        "fwrepo could not log in: {:?}",
        app.state.mqtt.status.last_error.lock().unwrap()
    );
    let topo = |sn: &str| {
        json!({"tid": "t", "bid": "b", "timestamp": 1, "method": "update_topo",
            "data": {"domain": "3", "type": 1, "sub_type": 0, "sub_devices": []}, "gateway": sn})
        .to_string()
    };
    // The dock logs in and speaks for itself: fwrepo learns it.
    assert!(pub_as(
        port,
        dock,
        "dock-secret",
        &format!("sys/product/{dock}/status"),
        &topo(dock)
    ));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.0 == 200
        })
        .await
    );
    // Speaking for another dock is dropped by the ACL; bad or no credentials are refused.
    let other = "4TADK000000002";
    pub_as(
        port,
        dock,
        "dock-secret",
        &format!("sys/product/{other}/status"),
        &topo(other),
    );
    assert!(!pub_as(
        port,
        other,
        "dock-secret",
        &format!("sys/product/{other}/status"),
        &topo(other)
    ));
    assert!(!pub_as(
        port,
        dock,
        "wrong",
        &format!("sys/product/{dock}/status"),
        &topo(dock)
    ));
    // A sentinel from the dock, published after all of those: once fwrepo has it, anything
    // the broker had let through before it would have arrived too.
    let sentinel = json!({"tid": "t", "bid": "b", "timestamp": 2,
        "data": {"firmware_version": "9.9.9.9", "compatible_status": 0}});
    assert!(pub_as(
        port,
        dock,
        "dock-secret",
        &format!("thing/product/{dock}/state"),
        &sentinel.to_string()
    ));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            app.get_json(&format!("/api/v1/devices/{dock}")).await.1["firmware_version"]
                == "9.9.9.9"
        })
        .await
    );
    assert_eq!(
        app.get_json(&format!("/api/v1/devices/{other}")).await.0,
        404
    );
}
