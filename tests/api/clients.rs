//! Third-party download clients as gateways use them: `curl -C -` and `wget -c` resuming an
//! interrupted download, `aria2c -x4 -s4` fetching in segments with an MD5 check. Runs when
//! FWREPO_TEST_CLIENTS is set (`.ci/run` installs aria2 and sets it); otherwise prints a skip line.

use std::process::Command;

use serde_json::Value;

use crate::helpers::*;

fn enabled() -> bool {
    if std::env::var("FWREPO_TEST_CLIENTS").is_ok_and(|v| !v.is_empty()) {
        return true;
    }
    eprintln!(
        "SKIP third-party client tests: FWREPO_TEST_CLIENTS not set (needs curl, wget, aria2c)"
    );
    false
}

async fn sh(cmd: Command) -> std::process::Output {
    let mut cmd = cmd;
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn curl_wget_and_aria2c_fetch_intact_and_sessions_reach_100() {
    if !enabled() {
        return;
    }
    let app = spawn_app().await;
    let data = payload(24 * 1024 * 1024 + 17, 21);
    let r = app.upload_ok("Dock2_10.01.0205.zip", data.clone()).await;
    let url = r["file_url"].as_str().unwrap().to_string();
    let md5 = md5_hex(&data);
    let dir = tempfile::tempdir().unwrap();
    // Unsigned download URLs need a read token: each client sends it as a header.
    let auth = format!("Authorization: Bearer {}", app.token);

    // curl: an interrupted first part (fetched as a range), then `-C -` resumes.
    let out = dir.path().join("curl.zip");
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "-f",
        "-H",
        &auth,
        "-r",
        "0-9999999",
        "-A",
        "curl-resume",
        "-o",
    ])
    .arg(&out)
    .arg(&url);
    assert!(sh(c).await.status.success());
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 10_000_000);
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "-f",
        "-H",
        &auth,
        "-C",
        "-",
        "-A",
        "curl-resume",
        "-o",
    ])
    .arg(&out)
    .arg(&url);
    let o = sh(c).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(md5_hex(&std::fs::read(&out).unwrap()), md5);

    // wget -c resumes a partial file the same way.
    let wdir = dir.path().join("wget");
    std::fs::create_dir(&wdir).unwrap();
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "-f",
        "-H",
        &auth,
        "-r",
        "0-4999999",
        "-A",
        "wget-resume",
        "-o",
    ])
    .arg(wdir.join("Dock2_10.01.0205.zip"))
    .arg(&url);
    assert!(sh(c).await.status.success());
    let mut c = Command::new("wget");
    c.arg(format!("--header={auth}"))
        .args(["-q", "-c", "-U", "wget-resume", "-P"])
        .arg(&wdir)
        .arg(&url);
    let o = sh(c).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        md5_hex(&std::fs::read(wdir.join("Dock2_10.01.0205.zip")).unwrap()),
        md5
    );

    // aria2c: four connections, four segments, checksum checked by aria2 itself.
    let adir = dir.path().join("aria");
    let mut c = Command::new("aria2c");
    c.args([
        "-q",
        "-x4",
        "-s4",
        "-k1M",
        "--allow-overwrite=true",
        "-U",
        "aria2-seg",
    ])
    .arg(format!("--checksum=md5={md5}"))
    .arg(format!("--header={auth}"))
    .arg("-d")
    .arg(&adir)
    .arg(&url);
    let o = sh(c).await;
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        md5_hex(&std::fs::read(adir.join("Dock2_10.01.0205.zip")).unwrap()),
        md5
    );

    // Each client is one session, and each has every byte.
    let id = r["id"].as_str().unwrap();
    let (_, list) = app
        .get_json(&format!("/api/v1/firmware/{id}/downloads"))
        .await;
    let items = list["items"].as_array().unwrap();
    for ua in ["curl-resume", "wget-resume", "aria2-seg"] {
        let s: &Value = items
            .iter()
            .find(|s| s["user_agent"] == ua)
            .unwrap_or_else(|| panic!("{ua}: {list}"));
        assert_eq!(s["percent"], 100.0, "{ua}: {s}");
        assert_eq!(s["state"], "complete", "{ua}");
    }
    let curl = items
        .iter()
        .find(|s| s["user_agent"] == "curl-resume")
        .unwrap();
    // The resume fetched only the missing part: no byte was sent twice.
    assert_eq!(curl["bytes_sent"], data.len());
    assert_eq!(curl["requests"], 2);
}
