//! Client commands that talk to a running server over its HTTP API: `fwrepo upload` (streamed
//! from disk with a progress bar; bounded memory whatever the file size) and `fwrepo list`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio_util::io::ReaderStream;

use crate::cli::{ListArgs, ServerArgs, UploadArgs};

fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")
}

fn authorized(rb: reqwest::RequestBuilder, server: &ServerArgs) -> reqwest::RequestBuilder {
    match &server.token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    }
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
