//! The command line as users run it: upload with checksums, list, export/import, configuration
//! layering and validation.

use std::process::{Command, Output};

use serde_json::Value;

use crate::helpers::*;

async fn run(args: Vec<String>, envs: Vec<(String, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(bin());
        cmd.args(&args);
        for k in [
            "FWREPO_SERVER",
            "FWREPO_TOKEN",
            "FWREPO_LISTEN",
            "FWREPO_CONFIG",
            "FWREPO_DATA_DIR",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test]
async fn upload_and_list_commands() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("WM245_1.00.223.zip");
    let data = payload(2_000_000, 5);
    std::fs::write(&file, &data).unwrap();
    let md5 = md5_hex(&data);
    let out = run(
        s(&[
            "upload",
            file.to_str().unwrap(),
            "--server",
            &app.base,
            "--md5",
            &md5,
            "--release-note",
            "n1",
        ]),
        vec![("FWREPO_TOKEN".into(), app.token.clone())],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["md5"], md5);
    assert_eq!(r["model"], "WM245");
    assert_eq!(r["release_note"], "n1");
    assert!(r["file_url"].as_str().unwrap().starts_with(&app.base));
    // A wrong checksum: refused, exit status 1, the code on stderr.
    let out = run(
        s(&[
            "upload",
            file.to_str().unwrap(),
            "--product-version",
            "2.0",
            "--md5",
            &"0".repeat(32),
            "-q",
            "--token",
            &app.token,
        ]),
        vec![("FWREPO_SERVER".into(), app.base.clone())],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum_mismatch"), "{err}");
    // Without a token: refused with the contract's code.
    let out = run(s(&["list", "--server", &app.base]), vec![]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("unauthorized"), "{err}");
    // A local server's admin.token is the fallback (by --data-dir or FWREPO_DATA_DIR).
    let data_dir = app.dir.path().to_str().unwrap().to_string();
    let out = run(
        s(&["list", "--server", &app.base, "--data-dir", &data_dir]),
        vec![],
    )
    .await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("WM245") && text.contains(&md5), "{text}");
    let out = run(
        s(&["list", "--server", &app.base, "--json"]),
        vec![("FWREPO_DATA_DIR".into(), data_dir)],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[tokio::test]
async fn token_commands_create_list_and_revoke() {
    let app = spawn_app().await;
    let data_dir = app.dir.path().to_str().unwrap().to_string();
    let local = vec![
        ("FWREPO_SERVER".to_string(), app.base.clone()),
        ("FWREPO_DATA_DIR".to_string(), data_dir),
    ];
    let out = run(
        s(&[
            "token",
            "create",
            "--name",
            "ci uploader",
            "--scope",
            "upload",
        ]),
        local.clone(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("fwr_") && token.len() >= 40, "{token}");
    // The new token uploads; it may not create tokens.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("WM245_1.00.224.zip");
    std::fs::write(&file, payload(1000, 3)).unwrap();
    let upload = |token: String| {
        let file = file.to_str().unwrap().to_string();
        let base = app.base.clone();
        async move {
            run(
                s(&["upload", &file, "--server", &base, "-q"]),
                vec![("FWREPO_TOKEN".into(), token)],
            )
            .await
        }
    };
    let out = upload(token.clone()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut as_uploader = local.clone();
    as_uploader.push(("FWREPO_TOKEN".into(), token.clone()));
    let out = run(
        s(&["token", "create", "--name", "x", "--scope", "admin"]),
        as_uploader,
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    // Listed (never the token itself), then revoked: refused from then on.
    let out = run(s(&["token", "list", "--json"]), local.clone()).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("ci uploader") && !text.contains(&token),
        "{text}"
    );
    let id = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|t| t["name"] == "ci uploader")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = run(s(&["token", "revoke", &id]), local.clone()).await;
    assert!(out.status.success());
    let out = run(s(&["token", "list"]), local).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("ci uploader") && l.ends_with("revoked")),
        "{table}"
    );
    let out = upload(token).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unauthorized"));
}

#[tokio::test]
async fn export_and_import_offline() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    // The offline tools on sled (tests/api/postgres.rs moves a catalog into PostgreSQL).
    let mut server = ServerProcess::start(&data_dir, &["--catalog", "sled"]);
    let client = server.client();
    for name in ["dock_1.0.zip", "dock_2.0.zip"] {
        let resp = client
            .post(format!("{}/api/v1/firmware?file_name={name}", server.base))
            .body(payload(1000, name.len() as u64))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    // While the server runs, the data dir is locked: export says so.
    let out = run(
        s(&["export", "--data-dir", data_dir.to_str().unwrap()]),
        vec![],
    )
    .await;
    assert!(!out.status.success());
    tokio::task::spawn_blocking(move || server.sigterm())
        .await
        .unwrap();
    let dump = root.path().join("catalog.jsonl");
    let out = run(
        s(&[
            "export",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "-o",
            dump.to_str().unwrap(),
        ]),
        vec![],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every kind: the two packages, the bootstrap token, the audit entries of the uploads.
    let dump_text = std::fs::read_to_string(&dump).unwrap();
    let kinds: Vec<String> = dump_text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].to_string())
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "\"firmware\"").count(), 2);
    assert_eq!(kinds.iter().filter(|k| *k == "\"token\"").count(), 1);
    assert_eq!(kinds.iter().filter(|k| *k == "\"audit\"").count(), 2);
    let other = root.path().join("other");
    let out = run(
        s(&[
            "import",
            "--data-dir",
            other.to_str().unwrap(),
            "-i",
            dump.to_str().unwrap(),
        ]),
        vec![],
    )
    .await;
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        said.contains("firmware 2") && said.contains("token 1"),
        "{said}"
    );
    // Importing again skips what is there.
    let out = run(
        s(&[
            "import",
            "--data-dir",
            other.to_str().unwrap(),
            "-i",
            dump.to_str().unwrap(),
        ]),
        vec![],
    )
    .await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 2"));
    // The tokens came along: the old admin token works on the copy (no new one is made).
    std::fs::copy(data_dir.join("admin.token"), other.join("admin.token")).unwrap();
    let server = ServerProcess::start(&other, &["--catalog", "sled"]);
    let list = get_json_at(&server.base, "/api/v1/firmware").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn configuration_layering_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fwrepo.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:9001\"\nmax_concurrent_uploads = 3\nretention_days = 7\n",
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap().to_string();
    // File < env < flag.
    let out = run(
        s(&["print-config", "--config", &cfg_s, "--retention-days", "9"]),
        vec![("FWREPO_MAX_CONCURRENT_UPLOADS".into(), "5".into())],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:9001\""), "{text}");
    assert!(text.contains("max_concurrent_uploads = 5"), "{text}");
    assert!(text.contains("retention_days = 9"), "{text}");
    // Non-loopback without a public URL fails before binding, as does a bad file.
    let out = run(
        s(&[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
        ]),
        vec![],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("public-url"));
    assert!(out.stdout.is_empty());
    let out = run(
        s(&[
            "check-config",
            "--listen",
            "0.0.0.0:8080",
            "--public-url",
            "https://fw.example.com",
        ]),
        vec![],
    )
    .await;
    assert!(out.status.success());
    std::fs::write(&cfg, "no_such_key = 1\n").unwrap();
    let out = run(s(&["check-config", "--config", &cfg_s]), vec![]).await;
    assert!(!out.status.success());
    let out = run(s(&["check-config", "--blob-store", "ftp://x"]), vec![]).await;
    assert!(!out.status.success());
    // Reserved names are not server configuration.
    let out = run(
        s(&["check-config"]),
        vec![("FWREPO_TOKEN".into(), "x".into())],
    )
    .await;
    assert!(out.status.success());
}

/// A newcomer's first start: `serve` with no configuration, a gateway that connects to the
/// embedded broker, publishes and goes away (one cleanly, one by dropping its socket), then
/// SIGTERM. Nothing on stderr is an ERROR or a WARN.
#[tokio::test]
async fn a_normal_start_and_stop_logs_no_error_or_warning() {
    if std::env::var_os("RUST_LOG").is_some() {
        println!("SKIP cli::a_normal_start_and_stop_logs_no_error_or_warning: RUST_LOG is set");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&root.path().join("storage"), &[]);
    let gw = sn("CLEAN");
    for clean in [true, false] {
        let (client, _inbox) = mqtt_client(&server.mqtt, &gw).await;
        client
            .subscribe_acked(format!("thing/product/{gw}/services"))
            .await;
        if clean {
            client.disconnect().await.unwrap();
        }
    }
    assert_eq!(
        get_json_at(&server.base, "/readyz").await["status"],
        "ready"
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = server.sigterm();
        (status, server.stderr())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{}", status.1);
    let noisy: Vec<&str> = status
        .1
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    assert!(
        noisy.is_empty(),
        "a normal start and stop logged: {noisy:#?}"
    );
}
