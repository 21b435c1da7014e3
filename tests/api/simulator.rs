//! The gateway simulator against the real server: a dock and its aircraft upgraded together
//! in both dialects, and the failure modes.

use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    sim: fwrepo::simulator::SimConfig,
}

fn sim(app: &TestApp, extra: &[&str]) -> (fwrepo::simulator::SimConfig, String) {
    let prefix = sn("S")[..9].to_string();
    let url = format!("mqtt://{}", app.mqtt_addr());
    let mut argv = vec![
        "sim",
        "--mqtt-url",
        &url,
        "--sn-prefix",
        &prefix,
        "--osd-every",
        "1",
    ];
    argv.extend_from_slice(extra);
    (Args::parse_from(argv).sim, prefix)
}

async fn setup() -> (TestApp, String, String) {
    let app = spawn_with(|s| {
        s.models = fwrepo::devices::ModelMap::from_table(Some(
            &toml::from_str("\"3-1-0\" = \"Dock\"\n\"0-67-0\" = \"M30\"\n").unwrap(),
        ))
        .unwrap();
        s.ota.reply_timeout = Duration::from_secs(3);
    })
    .await;
    let dock = app.upload_ok("Dock_2.0.0.zip", payload(2_000_000, 1)).await;
    let ac = app.upload_ok("M30_2.0.0.zip", payload(1_500_000, 2)).await;
    (
        app,
        dock["id"].as_str().unwrap().to_string(),
        ac["id"].as_str().unwrap().to_string(),
    )
}

async fn wait_online(app: &TestApp, sn: &str) {
    assert!(
        wait_until(Duration::from_secs(15), || async {
            let (_, d) = app.get_json(&format!("/api/v1/devices/{sn}")).await;
            d["online"] == true && d["mode_code"] == 0 && d["child_sn"].is_string()
        })
        .await,
        "{sn} never came online"
    );
}

async fn start_task(app: &TestApp, gw: &str, dock_fw: &str, ac_fw: &str) -> String {
    let body = json!({"gateway_sn": gw, "devices": [{"sn": gw, "firmware_id": dock_fw}, {"sn": format!("{gw}-AC"), "firmware_id": ac_fw}]});
    let resp = app
        .client
        .post(app.url("/api/v1/ota"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn final_task(app: &TestApp, id: &str) -> Value {
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let (_, t) = app.get_json(&format!("/api/v1/ota/{id}")).await;
            t["status"] != "sent" && t["status"] != "in_progress"
        })
        .await
    );
    app.get_json(&format!("/api/v1/ota/{id}")).await.1
}

#[tokio::test]
async fn dock_and_aircraft_upgrade_in_both_dialects() {
    let (app, dock_fw, ac_fw) = setup().await;
    for dialect in ["autel", "dji"] {
        let cancel = CancellationToken::new();
        let (cfg, prefix) = sim(&app, &["--dialect", dialect, "--interrupt-at", "0.5"]);
        fwrepo::simulator::run(cfg, cancel.clone()).await.unwrap();
        let gw = format!("{prefix}0001");
        wait_online(&app, &gw).await;
        let id = start_task(&app, &gw, &dock_fw, &ac_fw).await;
        let t = final_task(&app, &id).await;
        assert_eq!(t["status"], "ok", "{dialect}: {t}");
        assert!(
            wait_until(Duration::from_secs(15), || async {
                let (_, t) = app.get_json(&format!("/api/v1/ota/{id}")).await;
                t["devices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|d| d["outcome"] == "verified")
            })
            .await,
            "{dialect}: devices not verified"
        );
        let (_, t) = app.get_json(&format!("/api/v1/ota/{id}")).await;
        for d in t["devices"].as_array().unwrap() {
            assert_eq!(d["download_session"]["percent"], 100.0, "{dialect}: {d}");
            assert_eq!(d["download_session"]["requests"], 2, "resumed once: {d}");
        }
        let (_, dev) = app.get_json(&format!("/api/v1/devices/{gw}")).await;
        assert_eq!(dev["firmware_version"], "2.0.0");
        assert_eq!(dev["dialect"], dialect);
        cancel.cancel();
    }
}

#[tokio::test]
async fn failure_modes_end_in_the_matching_status() {
    let (app, dock_fw, ac_fw) = setup().await;
    for (mode, status, sub) in [
        ("download", "failed", Some("DOWNLOAD_FAILED")),
        ("verify", "failed", Some("VERIFY_FAILED")),
        ("upgrade", "failed", Some("UPGRADE_FAIL")),
        ("reject", "rejected", None),
        ("silent", "timeout", None),
    ] {
        let cancel = CancellationToken::new();
        let (cfg, prefix) = sim(&app, &["--fail", mode]);
        fwrepo::simulator::run(cfg, cancel.clone()).await.unwrap();
        let gw = format!("{prefix}0001");
        wait_online(&app, &gw).await;
        let id = start_task(&app, &gw, &dock_fw, &ac_fw).await;
        let t = final_task(&app, &id).await;
        assert_eq!(t["status"], status, "{mode}: {t}");
        if let Some(sub) = sub {
            assert_eq!(t["progress"]["sub_status"], sub, "{mode}");
        }
        cancel.cancel();
    }
}
