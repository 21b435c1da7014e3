//! The `fwrepo` binary: parse the command line, set up logging, dispatch.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::io::{BufReader, Write};
use std::process::ExitCode;

use clap::Parser;
use fwrepo::cli::{Cli, Command};
use fwrepo::config::{ServeOptions, Settings};
use fwrepo::startup::{Application, Listener};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    limit_malloc_arenas();
    // One rustls crypto provider for HTTPS, mqtts:// and the HTTP client, chosen here.
    fwrepo::tls::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fwrepo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwrepo: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause left out when the message before already says it
/// (many errors repeat their source in their own message).
fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

/// One glibc malloc arena (unless `MALLOC_ARENA_MAX` is set). By default glibc gives threads
/// up to 8 arenas per core; download chunks read on the blocking pool and freed on the HTTP
/// workers left their free memory spread over them: in the OTA benchmark (1000 concurrent
/// downloads) peak RSS was 252 MiB with 2 arenas and 177 MiB with one, on Mosquitto
/// (BENCHMARKS.md). Small allocations still go through glibc's per-thread caches. Called
/// before any thread exists.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread runs yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// The catalog an offline tool works on: `raw` (sled or a postgres:// URL) under `data_dir`.
fn tool_catalog(
    raw: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<fwrepo::catalog::CatalogBackend> {
    fwrepo::catalog::CatalogBackend::parse(raw, data_dir, 16, Default::default())
        .map_err(anyhow::Error::msg)
}

fn settings(options: ServeOptions) -> anyhow::Result<(Settings, ServeOptions)> {
    let layered = options.layered()?;
    Ok((Settings::from_options(layered.clone())?, layered))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(options) => serve(options).await,
        Command::Upload(args) => fwrepo::client::upload(args).await,
        Command::List(args) => fwrepo::client::list(args).await,
        Command::Token(cmd) => fwrepo::client::token(cmd).await,
        Command::MqttPassword(args) => {
            let key = args.data_dir.join(fwrepo::mqtt::credentials::KEY_FILE);
            let credentials = fwrepo::mqtt::credentials::GatewayCredentials::load(&key)?;
            for sn in &args.sn {
                println!("{sn} {}", credentials.password(sn));
            }
            Ok(())
        }
        Command::Simulate(cfg) => simulate(cfg).await,
        Command::Export(args) => {
            let backend = tool_catalog(args.catalog.as_deref(), &args.data_dir)?;
            let counts = match &args.output {
                Some(path) => {
                    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
                    fwrepo::backup::export(&backend, &mut f).await?
                }
                None => {
                    let mut out = std::io::BufWriter::new(std::io::stdout());
                    fwrepo::backup::export(&backend, &mut out).await?
                }
            };
            eprintln!("exported {}", fwrepo::backup::describe(&counts));
            Ok(())
        }
        Command::Import(args) => {
            std::fs::create_dir_all(&args.data_dir)?;
            let backend = tool_catalog(args.catalog.as_deref(), &args.data_dir)?;
            let (imported, skipped) = match &args.input {
                Some(path) => {
                    let mut f = BufReader::new(std::fs::File::open(path)?);
                    fwrepo::backup::import(&backend, &mut f).await?
                }
                None => {
                    let mut input = BufReader::new(std::io::stdin());
                    fwrepo::backup::import(&backend, &mut input).await?
                }
            };
            eprintln!(
                "imported {}; skipped {skipped} already present",
                fwrepo::backup::describe(&imported)
            );
            Ok(())
        }
        Command::Migrate(args) => {
            let backend = tool_catalog(Some(&args.catalog), std::path::Path::new("storage"))?;
            if !matches!(backend, fwrepo::catalog::CatalogBackend::Postgres(_)) {
                anyhow::bail!("fwrepo migrate takes a postgres:// URL (sled needs no migrations)");
            }
            fwrepo::catalog::open_store(&backend).await?;
            eprintln!("catalog {} is migrated", backend.describe());
            Ok(())
        }
        Command::CheckConfig(options) => {
            settings(options)?;
            println!("configuration OK");
            Ok(())
        }
        Command::PrintConfig(options) => {
            let (_, mut layered) = settings(options)?;
            if layered.mqtt_password.is_some() {
                layered.mqtt_password = Some("***".into());
            }
            layered.catalog = layered.catalog.as_deref().map(fwrepo::catalog::redact);
            let text = toml::to_string_pretty(&layered)?;
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(())
        }
    }
}

async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let (settings, _) = settings(options)?;
    fwrepo::telemetry::init(settings.log_format);
    let embedded = matches!(
        settings.mqtt.target,
        fwrepo::mqtt::BrokerTarget::Embedded(_)
    );
    // The port answers from here on: 503 while a PostgreSQL catalog is waited for. The
    // address lines below come once everything is up (the admin token written).
    let bound = Application::bind(settings)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_to(shutdown.clone()));
    let app = tokio::select! {
        app = bound.open() => app?,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped while waiting for the catalog");
            return Ok(());
        }
    };
    let addr = app.http_addr();
    let mqtt = app.state().mqtt.clone();
    let scheme = if app.is_https() { "https" } else { "http" };
    print_line(&format!("HTTP listening on {scheme}://{addr}"))?;
    let extra = [
        ("Downloads", Listener::Downloads),
        ("Metrics", Listener::Metrics),
    ]
    .into_iter()
    .filter_map(|(name, role)| app.listener_addr(role).map(|a| (name, a)))
    .collect::<Vec<_>>();
    if embedded {
        print_line(&mqtt.address_line)?;
        if let Some(line) = &mqtt.tls_address_line {
            print_line(line)?;
        }
    }
    for (name, a) in extra {
        print_line(&format!("{name} listening on http://{a}"))?;
    }
    if !embedded {
        // An external broker's line is printed once the session is up.
        tokio::spawn(async move {
            while !mqtt
                .status
                .connected
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let _ = print_line(&mqtt.address_line);
        });
    }
    tracing::info!(%addr, public_url = %app.state().public_url, "fwrepo serving");
    app.run_until_stopped(shutdown).await?;
    tracing::info!("fwrepo stopped");
    Ok(())
}

async fn simulate(cfg: fwrepo::simulator::SimConfig) -> anyhow::Result<()> {
    fwrepo::telemetry::init(fwrepo::config::LogFormat::Text);
    let cancel = CancellationToken::new();
    let stats = fwrepo::simulator::run(cfg.clone(), cancel.clone()).await?;
    println!(
        "simulating {} docks ({}0001…) with aircraft on {}; Ctrl-C to stop",
        cfg.gateways, cfg.sn_prefix, cfg.mqtt_url
    );
    let stop = CancellationToken::new();
    tokio::spawn(signal_to(stop.clone()));
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut last = (0, 0, 0, 0);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                use std::sync::atomic::Ordering::Relaxed;
                let now = (stats.jobs.load(Relaxed), stats.ok.load(Relaxed), stats.failed.load(Relaxed), stats.reconnects.load(Relaxed));
                if now != last {
                    println!("jobs {} ok {} failed {} bytes {} reconnects {}", now.0, now.1, now.2, stats.bytes.load(Relaxed), now.3);
                    last = now;
                }
            }
        }
    }
    cancel.cancel();
    Ok(())
}

fn print_line(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn signal_to(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    token.cancel();
}
