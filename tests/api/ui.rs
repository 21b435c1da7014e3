//! The web dashboard in a real browser: headless Chromium driven through chromedriver
//! (fantoccini), against the real server and the simulator. Runs when FWREPO_TEST_BROWSER is
//! set (`.ci/run` installs chromium and chromium-driver and sets it); otherwise prints a skip
//! line. Screenshots of each page at 1280×800 go to `target/tmp/screenshots/` (README.md links
//! the copies in `docs/screenshots/`).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::helpers::*;

fn enabled() -> bool {
    if std::env::var("FWREPO_TEST_BROWSER").is_err() {
        eprintln!(
            "SKIP browser tests: FWREPO_TEST_BROWSER not set (needs chromium and chromedriver)"
        );
        return false;
    }
    true
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver and the browsers it started share a process group: a failed test must
        // not leave Chromium running.
        // SAFETY: kill(2) on our own child's process group; no memory is involved.
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

async fn browser() -> (Client, Driver) {
    let port = free_port();
    let driver =
        Command::new(std::env::var("FWREPO_CHROMEDRIVER").unwrap_or("chromedriver".into()))
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver on PATH");
    let driver = Driver(driver);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await,
        "chromedriver did not start"
    );
    let mut caps = serde_json::Map::new();
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
    ];
    let chrome = std::env::var("FWREPO_CHROMIUM").unwrap_or_default();
    let mut options = json!({ "args": args });
    if !chrome.is_empty() {
        options["binary"] = json!(chrome);
    }
    caps.insert("goog:chromeOptions".into(), options);
    let client = ClientBuilder::rustls()
        .expect("rustls connector")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session");
    // Make the viewport (what screenshots show) 1280×800, whatever the browser's frame takes.
    let frame = client
        .execute("return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]", vec![])
        .await
        .unwrap();
    let (dw, dh) = (
        frame[0].as_u64().unwrap_or(0),
        frame[1].as_u64().unwrap_or(0),
    );
    client
        .set_window_size(1280 + dw as u32, 800 + dh as u32)
        .await
        .unwrap();
    (client, driver)
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// The text of `css` once `pred` holds for it (polling), or a panic naming what was seen.
async fn wait_text(c: &Client, css: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
        {
            if pred(&t) {
                return t;
            }
            last = t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{css}: never matched; last text {last:?}");
}

async fn click(c: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(_) => return,
                Err(err) if Instant::now() > deadline => panic!("click {css}: {err}"),
                Err(_) => {}
            },
            Err(err) if Instant::now() > deadline => panic!("find {css}: {err}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Picks `path` in the firmware page's file input (the upload starts at once).
async fn choose_file(c: &Client, path: &std::path::Path) {
    let input = c.find(Locator::Css("#file-input")).await.unwrap();
    input.send_keys(path.to_str().unwrap()).await.unwrap();
}

/// Types `text` into `css` once the page shows it (a route renders after `goto` returns).
async fn fill(c: &Client, css: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let e = loop {
        match c.find(Locator::Css(css)).await {
            Ok(e) => break e,
            Err(err) if Instant::now() > deadline => panic!("find {css}: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

#[tokio::test]
async fn dashboard_login_upload_upgrade_and_rollout_in_a_browser() {
    if !enabled() {
        return;
    }
    let app = spawn_with(|s| {
        s.models = fwrepo::devices::ModelMap::from_table(Some(
            &toml::from_str("\"3-1-0\" = \"Dock\"\n\"0-67-0\" = \"M30\"\n").unwrap(),
        ))
        .unwrap();
        s.ota.reply_timeout = Duration::from_secs(10);
    })
    .await;
    let (prefix, sim) = fleet(&app.mqtt_addr(), 3, &["--rate", "2000000"]).await;
    let (c, _driver) = browser().await;

    // A wrong token: a clear message, still on the login page.
    c.goto(&app.url("/")).await.unwrap();
    fill(&c, "#token", "fwr_wrong").await;
    click(&c, "#login-btn").await;
    wait_text(&c, "#login-error", 10, |t| t.contains("not accepted")).await;
    shot(&c, "login").await;

    // Sign in; upload a package and see it listed with its MD5.
    fill(&c, "#token", &app.token).await;
    click(&c, "#login-btn").await;
    wait_text(&c, "#fw-table", 10, |t| t.contains("No firmware yet")).await;
    let dir = tempfile::tempdir().unwrap();
    let data = payload(3_000_000, 61);
    let md5 = md5_hex(&data);
    let file = dir.path().join("Dock_2.0.0.zip");
    std::fs::write(&file, &data).unwrap();
    choose_file(&c, &file).await;
    wait_text(&c, "#upload-md5", 30, |t| t == md5).await;
    wait_text(&c, "#fw-table", 10, |t| t.contains(&md5)).await;
    let ac = dir.path().join("M30_2.0.0.zip");
    std::fs::write(&ac, payload(1_000_000, 62)).unwrap();
    choose_file(&c, &ac).await;
    wait_text(&c, "#upload-ok", 30, |t| t.contains("M30")).await;
    // The same model and version with other bytes: the conflict in words.
    let conflict = dir.path().join("conflict").join("Dock_2.0.0.zip");
    std::fs::create_dir_all(conflict.parent().unwrap()).unwrap();
    std::fs::write(&conflict, payload(1000, 63)).unwrap();
    choose_file(&c, &conflict).await;
    wait_text(&c, "#upload-error", 30, |t| t.contains("already exist")).await;
    shot(&c, "firmware").await;
    let (_, list) = app.get_json("/api/v1/firmware?model=Dock").await;
    let dock_fw = list["items"][0]["id"].as_str().unwrap().to_string();

    // Devices: upgrade the first dock, see the policy's choice first, then follow it to ok.
    let dock = format!("{prefix}0001");
    c.goto(&app.url("/#/devices")).await.unwrap();
    wait_text(&c, "#dev-table", 30, |t| {
        (1..=3).all(|i| t.contains(&format!("{prefix}{i:04}")))
    })
    .await;
    // Filtered by serial: one dock left; then every dock again.
    fill(&c, "#dev-filter", &format!("{prefix}0002")).await;
    wait_text(&c, "#dev-table", 10, |t| {
        t.contains(&format!("{prefix}0002")) && !t.contains(&dock)
    })
    .await;
    fill(&c, "#dev-filter", "").await;
    wait_text(&c, "#dev-table", 10, |t| t.contains(&dock)).await;
    click(&c, &format!("button.upgrade[data-sn='{dock}']")).await;
    click(&c, &format!("#fw-dock option[value='{dock_fw}']")).await;
    click(&c, "#dry-run").await;
    wait_text(&c, "#plan-table", 10, |t| t.contains("upgrade")).await;
    shot(&c, "devices").await;
    click(&c, "#start-upgrade").await;
    wait_text(&c, "#task-status", 60, |t| t == "ok").await;
    wait_text(&c, "#task-history", 10, |t| t.contains("ota_progress")).await;
    // Served bytes (the download session) next to the MQTT percent.
    wait_text(&c, "#task", 10, |t| t.contains("100.0 %")).await;
    shot(&c, "ota-task").await;
    c.goto(&app.url("/#/ota")).await.unwrap();
    wait_text(&c, "#ota-table", 10, |t| t.contains(&dock)).await;
    c.goto(&app.url("/#/downloads")).await.unwrap();
    wait_text(&c, "#dl-table", 10, |t| {
        t.contains(&dock) && t.contains("100.0 %")
    })
    .await;
    shot(&c, "downloads").await;

    // A rollout over the other two docks: stage 1 (one dock) waits for approval; approve it.
    c.goto(&app.url("/#/rollouts/new")).await.unwrap();
    fill(&c, "#r-name", "ui rollout").await;
    click(&c, &format!("#r-firmware option[value='{dock_fw}']")).await;
    fill(&c, "#r-sns", &format!("{prefix}0002, {prefix}0003")).await;
    fill(&c, "#r-stages", "50, 100").await;
    fill(&c, "#r-rate", "0").await;
    click(&c, "#r-create").await;
    wait_text(&c, "#rollout-status", 10, |t| t == "draft").await;
    click(&c, "button[data-action='start']").await;
    click(&c, "#confirm-yes").await;
    wait_text(&c, "#rollout-status", 60, |t| t == "waiting_approval").await;
    click(&c, "button[data-action='approve']").await;
    click(&c, "#confirm-yes").await;
    wait_text(&c, "#rollout-status", 60, |t| t == "completed").await;
    wait_text(&c, "#chart-box", 10, |t| t.contains("devices over time")).await;
    c.find(Locator::Css("#rollout-chart")).await.unwrap();
    shot(&c, "rollout").await;
    let (_, rollouts) = app.get_json("/api/v1/rollouts").await;
    let r: &Value = &rollouts["items"][0];
    assert_eq!(r["status"], "completed", "{r}");

    c.close().await.unwrap();
    sim.cancel();
}
