//! Client commands that talk to a running server over its HTTP API: `fwrepo upload` (streamed
//! from disk with a progress bar; bounded memory whatever the file size), `fwrepo list` and
//! `fwrepo token create|list|revoke`. The token is `--token`, else `FWREPO_TOKEN`, else (for a
//! server on this machine) `<data-dir>/admin.token`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio_util::io::ReaderStream;

use crate::cli::{ListArgs, ServerArgs, TokenCommand, UploadArgs};

fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")
}

/// The token to send: given, or the admin token file of a server on this machine.
fn token_for(server: &ServerArgs) -> Option<String> {
    if let Some(t) = server.token.as_ref().filter(|t| !t.is_empty()) {
        return Some(t.clone());
    }
    let local = url::Url::parse(&server.server)
        .ok()
        .is_some_and(|u| match u.host() {
            Some(url::Host::Domain(d)) => d == "localhost",
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        });
    if !local {
        return None;
    }
    std::fs::read_to_string(server.data_dir.join(crate::auth::ADMIN_TOKEN_FILE))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn authorized(rb: reqwest::RequestBuilder, server: &ServerArgs) -> reqwest::RequestBuilder {
    match token_for(server) {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    }
}

fn api_url(server: &ServerArgs, path: &str) -> String {
    format!("{}{path}", server.server.trim_end_matches('/'))
}

/// Sends `rb` (with the token) and returns the JSON answer, or the server's error.
async fn call(rb: reqwest::RequestBuilder, server: &ServerArgs) -> Result<Value> {
    let resp = authorized(rb, server)
        .send()
        .await
        .with_context(|| format!("calling {}", server.server))?;
    if !resp.status().is_success() {
        return Err(fail(resp).await);
    }
    resp.json().await.context("reading the server's answer")
}

/// `fwrepo token create|list|revoke`.
pub async fn token(cmd: TokenCommand) -> Result<()> {
    let http = client()?;
    match cmd {
        TokenCommand::Create(args) => {
            let expires_at = args
                .expires_in_days
                .map(|d| chrono::Utc::now() + chrono::Duration::days(i64::from(d)));
            let body = serde_json::json!({
                "name": args.name,
                "scopes": args.scopes,
                "expires_at": expires_at,
            });
            let url = api_url(&args.server, "/api/v1/tokens");
            let created = call(http.post(&url).json(&body), &args.server).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                eprintln!(
                    "created token {} ({}); it is shown only now:",
                    created["id"].as_str().unwrap_or(""),
                    created["name"].as_str().unwrap_or("")
                );
                println!("{}", created["token"].as_str().unwrap_or(""));
            }
        }
        TokenCommand::List(args) => {
            let url = api_url(&args.server, "/api/v1/tokens");
            let mut cursor: Option<String> = None;
            if !args.json {
                println!(
                    "{:<26}  {:<24}  {:<22}  {:<20}  {:<20}  STATE",
                    "ID", "NAME", "SCOPES", "CREATED", "LAST USED"
                );
            }
            loop {
                let mut q = vec![("limit", "500".to_string())];
                if let Some(c) = &cursor {
                    q.push(("cursor", c.clone()));
                }
                let page = call(http.get(&url).query(&q), &args.server).await?;
                for t in page["items"].as_array().into_iter().flatten() {
                    if args.json {
                        println!("{t}");
                        continue;
                    }
                    let scopes: Vec<&str> = t["scopes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let state = if !t["revoked_at"].is_null() {
                        "revoked"
                    } else if t["expires_at"]
                        .as_str()
                        .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
                        .is_some_and(|e| e <= chrono::Utc::now())
                    {
                        "expired"
                    } else {
                        "active"
                    };
                    let short = |v: &Value| {
                        v.as_str()
                            .unwrap_or("-")
                            .chars()
                            .take(19)
                            .collect::<String>()
                    };
                    println!(
                        "{:<26}  {:<24}  {:<22}  {:<20}  {:<20}  {state}",
                        t["id"].as_str().unwrap_or(""),
                        t["name"].as_str().unwrap_or(""),
                        scopes.join(","),
                        short(&t["created_at"]),
                        short(&t["last_used_at"]),
                    );
                }
                cursor = page["next_cursor"].as_str().map(str::to_string);
                if cursor.is_none() {
                    break;
                }
            }
        }
        TokenCommand::Revoke(args) => {
            let url = api_url(&args.server, &format!("/api/v1/tokens/{}", args.id));
            let t = call(http.delete(&url), &args.server).await?;
            eprintln!(
                "revoked token {} ({})",
                t["id"].as_str().unwrap_or(""),
                t["name"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

async fn fail(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&body) {
        Ok(v) => anyhow::anyhow!(
            "server answered {status}: {} ({})",
            v["error"].as_str().unwrap_or("?"),
            v["message"].as_str().unwrap_or("")
        ),
        Err(_) => anyhow::anyhow!("server answered {status}: {body}"),
    }
}

/// `fwrepo upload FILE`: streams the file as a raw body and prints the stored record as JSON.
pub async fn upload(args: UploadArgs) -> Result<()> {
    let file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("opening {}", args.file.display()))?;
    let size = file.metadata().await?.len();
    let file_name = match &args.file_name {
        Some(n) => n.clone(),
        None => args
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the path has no file name")?,
    };
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(file_name.clone());
    let counting = bar.clone();
    let stream = ReaderStream::with_capacity(file, 1 << 20).inspect(move |chunk| {
        if let Ok(c) = chunk {
            counting.inc(c.len() as u64);
        }
    });
    let mut query = vec![("file_name", file_name)];
    for (k, v) in [
        ("model", &args.model),
        ("product_version", &args.product_version),
        ("md5", &args.md5),
        ("sha256", &args.sha256),
        ("release_note", &args.release_note),
    ] {
        if let Some(v) = v {
            query.push((k, v.clone()));
        }
    }
    let url = format!(
        "{}/api/v1/firmware",
        args.server.server.trim_end_matches('/')
    );
    let rb = client()?
        .post(&url)
        .query(&query)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream));
    let resp = authorized(rb, &args.server)
        .send()
        .await
        .with_context(|| format!("uploading to {url}"))?;
    bar.finish_and_clear();
    if !resp.status().is_success() {
        return Err(fail(resp).await);
    }
    let existed = resp.status() == reqwest::StatusCode::OK;
    let record: Value = resp.json().await.context("reading the server's answer")?;
    if existed {
        eprintln!("identical package already stored; existing record:");
    }
    println!("{}", serde_json::to_string_pretty(&record)?);
    Ok(())
}

/// `fwrepo list`: prints a table (or JSON lines) of firmware, newest first.
pub async fn list(args: ListArgs) -> Result<()> {
    let http = client()?;
    let url = format!(
        "{}/api/v1/firmware",
        args.server.server.trim_end_matches('/')
    );
    let mut cursor: Option<String> = None;
    let mut printed = 0usize;
    if !args.json {
        println!(
            "{:<26}  {:<16}  {:<16}  {:>12}  {:<32}  {:<8}  FILE",
            "ID", "MODEL", "VERSION", "SIZE", "MD5", "STATUS"
        );
    }
    loop {
        let mut query: Vec<(&str, String)> =
            vec![("limit", (args.limit - printed).min(500).to_string())];
        for (k, v) in [
            ("model", &args.model),
            ("product_version", &args.product_version),
            ("status", &args.status),
            ("cursor", &cursor),
        ] {
            if let Some(v) = v {
                query.push((k, v.clone()));
            }
        }
        let resp = authorized(http.get(&url).query(&query), &args.server)
            .send()
            .await
            .with_context(|| format!("listing {url}"))?;
        if !resp.status().is_success() {
            return Err(fail(resp).await);
        }
        let page: Value = resp.json().await?;
        let Some(items) = page["items"].as_array() else {
            bail!("unexpected answer: {page}");
        };
        for r in items {
            if args.json {
                println!("{r}");
            } else {
                println!(
                    "{:<26}  {:<16}  {:<16}  {:>12}  {:<32}  {:<8}  {}",
                    r["id"].as_str().unwrap_or(""),
                    r["model"].as_str().unwrap_or(""),
                    r["product_version"].as_str().unwrap_or(""),
                    r["file_size"].as_u64().unwrap_or(0),
                    r["md5"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    r["file_name"].as_str().unwrap_or(""),
                );
            }
        }
        printed += items.len();
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() || printed >= args.limit {
            return Ok(());
        }
    }
}
