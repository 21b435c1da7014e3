//! Building and running the server: open the catalog and blob store, sweep what a crash left,
//! bind HTTP (port 0 allowed; the bound address is reported), start the background workers, and
//! on shutdown stop accepting, flush progress and the catalog, and drain within the grace.

mod listeners;
mod replicas;
pub use crate::http::access::Listener;
use listeners::{bind, serve};
use replicas::{adopt_dead_sessions, follow_changes, join_cluster, resend_after_restart};

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, web};
use tokio_util::sync::CancellationToken;
use tracing_actix_web::TracingLogger;
use url::Url;

use crate::blobs::{BlobStore, ReadBudget};
use crate::catalog::Store;
use crate::config::Settings;
use crate::devices::DeviceRegistry;
use crate::download::DownloadService;
use crate::firmware::FirmwareService;
use crate::http::{self, AppState, conn as http_conn};
use crate::metrics::Metrics;
use crate::progress::DownloadTracker;
use crate::store::FirmwareStatus;
use crate::upload::UploadService;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The catalog could not be opened (another process holds it?).
    #[error("cannot open the catalog ({dir}): {source}")]
    Catalog {
        /// Catalog directory.
        dir: String,
        /// The cause.
        source: crate::store::CatalogError,
    },
    /// The catalog failed during start-up work.
    #[error(transparent)]
    CatalogOp(#[from] crate::store::CatalogError),
    /// The blob store could not be opened.
    #[error("cannot open the blob store: {0}")]
    Blobs(#[from] crate::blobs::BlobError),
    /// Binding or serving failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The public URL could not be formed.
    #[error("invalid public URL: {0}")]
    PublicUrl(String),
    /// MQTT could not start.
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    /// This replica may not join the deployment.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The TLS certificate or key could not be used.
    #[error("cannot use the TLS certificate: {0}")]
    Tls(String),
    /// The token store could not be prepared.
    #[error("cannot prepare API tokens: {0}")]
    Auth(String),
    /// A file in the data directory could not be read or written.
    #[error("cannot prepare {what}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

/// A built server, bound and ready to run.
pub struct Application {
    http_addr: SocketAddr,
    extra: Vec<(Listener, SocketAddr)>,
    servers: Vec<Server>,
    state: AppState,
    grace: Duration,
    workers: CancellationToken,
}

/// A server whose ports are bound, its catalog not open yet ([`Application::bind`]).
pub struct Bound {
    settings: Settings,
    tls: Option<rustls::ServerConfig>,
    main: (TcpListener, SocketAddr),
    downloads: Option<(TcpListener, SocketAddr)>,
    metrics: Option<(TcpListener, SocketAddr)>,
}

impl Application {
    /// Binds, opens storage, sweeps crash leftovers and prepares the workers.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        Application::bind(settings)?.open().await
    }

    /// Reads the TLS material (bad files fail the start) and binds every port (port 0
    /// allowed), so the addresses are known before the catalog is opened.
    pub fn bind(settings: Settings) -> Result<Bound, StartupError> {
        crate::tls::install_crypto_provider();
        let tls = match &settings.tls {
            Some((cert, key)) => {
                Some(crate::tls::server_config(cert, key).map_err(StartupError::Tls)?)
            }
            None => None,
        };
        Ok(Bound {
            main: bind(settings.listen)?,
            downloads: settings.download_listen.map(bind).transpose()?,
            metrics: settings.metrics_listen.map(bind).transpose()?,
            tls,
            settings,
        })
    }
}

impl Bound {
    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.main.1
    }

    /// Whether the main listener speaks HTTPS.
    pub fn is_https(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens the catalog (PostgreSQL that does not answer yet is waited for while every port
    /// answers 503, see [`http::starting`]), opens the blob store, sweeps crash leftovers and
    /// prepares the workers.
    pub async fn open(self) -> Result<Application, StartupError> {
        let settings = &self.settings;
        std::fs::create_dir_all(&settings.data_dir).map_err(|e| StartupError::Catalog {
            dir: settings.data_dir.display().to_string(),
            source: crate::store::CatalogError::Storage(e.into()),
        })?;
        let (catalog, instance_id) = self.open_catalog().await?;
        tracing::info!(catalog = %settings.catalog.describe(), "catalog open");
        let Bound {
            settings,
            tls,
            main: (main_listener, http_addr),
            downloads: download_listener,
            metrics: metrics_listener,
        } = self;
        let blobs = BlobStore::open(&settings.blob_backend, &settings.blob_timeouts)?;
        let clock = crate::domain::Clock::default();
        let cluster = join_cluster(&settings, &catalog, &instance_id, &clock).await?;
        // Replicas share a PostgreSQL catalog; a sled one belongs to this process alone.
        let shared = matches!(
            settings.catalog,
            crate::catalog::CatalogBackend::Postgres(_)
        );
        let metrics = Arc::new(Metrics::default());
        let uploads = UploadService::new(
            catalog.clone(),
            catalog.clone(),
            blobs.clone(),
            Arc::clone(&metrics),
            settings.max_concurrent_uploads,
            settings.max_upload_bytes,
            Duration::from_secs(settings.idle_timeout_secs),
        );
        uploads.discard_unfinished().await;
        sweep(&catalog, &blobs).await?;

        let public_url = match &settings.public_url {
            Some(u) => u.clone(),
            None => {
                let (scheme, addr) = match (&download_listener, &tls) {
                    (Some((_, addr)), _) => ("http", *addr),
                    (None, Some(_)) => ("https", http_addr),
                    (None, None) => ("http", http_addr),
                };
                Url::parse(&format!("{scheme}://{addr}"))
                    .map_err(|e| StartupError::PublicUrl(e.to_string()))?
            }
        };

        let workers = CancellationToken::new();
        let devices = DeviceRegistry::load(
            catalog.clone(),
            settings.models.clone(),
            Duration::from_secs(settings.online_window_secs),
        )
        .await?;
        let (ota_tx, ota_rx) = crate::ota::inbox();
        let credentials = match (&settings.mqtt.target, settings.mqtt.embedded.auth) {
            (crate::mqtt::BrokerTarget::Embedded(_), true) => Some(
                crate::mqtt::credentials::GatewayCredentials::load_or_create(&settings.data_dir)
                    .map_err(|source| StartupError::Io {
                        what: "the MQTT credentials key",
                        source,
                    })?,
            ),
            _ => None,
        };
        // Replicas share the up topics only when they share the catalog.
        let mqtt_settings = crate::mqtt::MqttSettings {
            share_group: settings.mqtt.share_group.clone().filter(|_| shared),
            ..settings.mqtt.clone()
        };
        let adopt_tx = ota_tx.clone();
        let mqtt = crate::mqtt::start(
            &mqtt_settings,
            &cluster.peers(),
            devices.clone(),
            ota_tx,
            workers.clone(),
            credentials,
        )?;

        let key_file = match &settings.url_signing_key_file {
            Some(path) => path.clone(),
            None => settings.data_dir.join(crate::download::signing::KEY_FILE),
        };
        let signer = crate::download::signing::UrlSigner::from_file(
            &key_file,
            Duration::from_secs(settings.download_url_ttl_secs),
        )
        .map_err(|source| StartupError::Io {
            what: "the download URL signing key",
            source,
        })?;
        let ota = crate::ota::OtaService::load(
            crate::catalog::ota_stores(&catalog),
            devices.clone(),
            Arc::new(mqtt.clone()),
            AppState::base_url(&public_url),
            crate::ota::OtaSettings {
                shared,
                route_tag: shared.then(|| crate::cluster::route_tag(&cluster.id())),
                ..settings.ota.clone()
            },
            signer.clone(),
            clock.clone(),
        )
        .await?;
        if shared {
            // One replica of the deployment times out and verifies tasks.
            ota.time_under(cluster.lease(crate::ota::TIMERS_LEASE));
        }
        tokio::spawn(ota.clone().run(ota_rx, workers.clone()));
        if mqtt_settings.share_group.is_some()
            && matches!(
                mqtt_settings.target,
                crate::mqtt::BrokerTarget::External { .. }
            )
        {
            // What this replica's previous run left unsent.
            resend_after_restart(&cluster, &mqtt, &ota, &workers);
            // The sessions of replicas that die are taken over by one of the live ones.
            adopt_dead_sessions(
                &cluster,
                mqtt_settings.clone(),
                devices.clone(),
                (adopt_tx, ota.clone()),
                &workers,
            );
        }
        let rollouts = crate::rollout::RolloutService::load(
            crate::catalog::rollout_stores(&catalog),
            devices.clone(),
            ota.clone(),
        )
        .await?;
        if shared {
            // One replica of the deployment drives the rollouts.
            rollouts.schedule_under(cluster.lease(crate::rollout::SCHEDULING_LEASE));
        }
        tokio::spawn(rollouts.clone().run(workers.clone()));
        if shared {
            follow_changes(&cluster, &ota, &rollouts, &workers).await;
        }

        let tokens = crate::auth::TokenService::load(catalog.clone())
            .await
            .map_err(|e| StartupError::Auth(e.to_string()))?
            .with_clock(clock.clone());
        if let Some(path) = tokens
            .bootstrap(&settings.data_dir)
            .await
            .map_err(|e| StartupError::Auth(e.to_string()))?
        {
            tracing::info!(path = %path.display(), "no API token existed: created an admin token");
        }
        if !settings.auth_enabled {
            tracing::warn!("--auth off: the API and downloads need no token; for demos only");
        }
        let audit = crate::audit::AuditLog::new(catalog.clone());
        let budget = ReadBudget::new(settings.download_buffer_mb << 20);
        let tracker = DownloadTracker::load(catalog.clone()).await?;
        let state = AppState {
            public_url: AppState::base_url(&public_url),
            uploads,
            firmware: FirmwareService::new(catalog.clone(), blobs.clone(), budget.clone()),
            downloads: DownloadService::new(
                catalog.clone(),
                blobs.clone(),
                budget.clone(),
                tracker.clone(),
                Arc::clone(&metrics),
            ),
            tracker,
            budget,
            metrics,
            devices,
            mqtt,
            ota,
            rollouts,
            catalog,
            blobs,
            settings: Arc::new(settings.clone()),
            stopping: workers.clone(),
            signer,
            api_limiter: crate::http::ApiLimiter::new(settings.api_rate_limit, settings.api_burst),
            download_slots: crate::http::limits::DownloadSlots::new(settings.max_downloads_per_ip),
            tokens,
            audit,
            clock,
            cluster,
        };
        // Firmware an open task uses, or that registered devices run, is not deleted lightly.
        state.firmware.add_guard(Arc::new(state.ota.clone()));
        state.firmware.add_guard(Arc::new(state.devices.clone()));
        state.firmware.add_guard(Arc::new(state.rollouts.clone()));
        let grace = Duration::from_secs(settings.shutdown_grace_secs);
        let data = web::Data::new(state.clone());
        let mut servers = vec![serve(&data, Listener::Main, main_listener, tls, grace)?];
        let mut extra = Vec::new();
        for (role, listener) in [
            (Listener::Downloads, download_listener),
            (Listener::Metrics, metrics_listener),
        ] {
            if let Some((listener, addr)) = listener {
                servers.push(serve(&data, role, listener, None, grace)?);
                extra.push((role, addr));
            }
        }
        Ok(Application {
            http_addr,
            extra,
            servers,
            state,
            grace,
            workers,
        })
    }

    /// The catalog, waiting for a PostgreSQL server that does not answer yet: meanwhile the
    /// bound ports answer 503 (`/healthz` 200), and each failed attempt is the reason given.
    async fn open_catalog(&self) -> Result<(Arc<dyn Store>, String), StartupError> {
        let settings = &self.settings;
        let failed = |source| StartupError::Catalog {
            dir: settings.catalog.describe(),
            source,
        };
        if !matches!(
            settings.catalog,
            crate::catalog::CatalogBackend::Postgres(_)
        ) {
            return crate::catalog::open(&settings.catalog, &settings.data_dir, &|_| {})
                .await
                .map_err(failed);
        }
        let io = |source| StartupError::Bind {
            addr: self.main.1,
            source,
        };
        let mut listeners = vec![(self.main.0.try_clone().map_err(io)?, self.tls.clone())];
        for (listener, _) in [&self.downloads, &self.metrics].into_iter().flatten() {
            listeners.push((listener.try_clone().map_err(io)?, None));
        }
        let (reason, waiting) = tokio::sync::watch::channel("the first attempt".to_string());
        let note = |why: &str| {
            reason.send_replace(why.to_string());
        };
        let opening = crate::catalog::open(&settings.catalog, &settings.data_dir, &note);
        tokio::pin!(opening);
        // Usually open at once; the 503 server only for a database that keeps us waiting
        // (stopping an actix server right after starting it can hang).
        if let Ok(opened) = tokio::time::timeout(ANSWER_503_AFTER, &mut opening).await {
            return opened.map_err(failed);
        }
        let server = http::starting::serve(listeners, waiting).map_err(io)?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        tracing::info!(
            "opening the PostgreSQL catalog; until it is open {scheme}://{} answers 503",
            self.main.1
        );
        let handle = server.handle();
        let running = tokio::spawn(server);
        let opened = opening.await;
        handle.stop(true).await;
        let _ = running.await;
        opened.map_err(failed)
    }
}

/// How long a PostgreSQL catalog may take to open before every port answers 503 meanwhile.
const ANSWER_503_AFTER: Duration = Duration::from_secs(2);

impl Application {
    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Whether the main listener speaks HTTPS.
    pub fn is_https(&self) -> bool {
        self.state.settings.tls.is_some()
    }

    /// The bound address of the extra listener `role` (`--download-listen`,
    /// `--metrics-listen`), if configured.
    pub fn listener_addr(&self, role: Listener) -> Option<SocketAddr> {
        self.extra.iter().find(|(r, _)| *r == role).map(|(_, a)| *a)
    }

    /// The shared state (tests and tools call services directly).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` fires, then stops accepting, flushes, and drains in-flight
    /// requests within the grace period.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let Application {
            servers,
            state,
            grace,
            workers,
            ..
        } = self;
        // Replicas sharing the catalog take in each other's device reports every second.
        let shared = matches!(
            state.settings.catalog,
            crate::catalog::CatalogBackend::Postgres(_)
        );
        let device_flusher = tokio::spawn(
            state
                .devices
                .clone()
                .run(workers.clone(), shared.then_some(Duration::from_secs(1))),
        );
        tokio::spawn(state.cluster.clone().run(workers.clone()));
        // Catalog health: sees a failed background write, reopens sled once the disk recovers.
        let catalog = state.catalog.clone();
        let stop = workers.clone();
        tokio::spawn(async move { catalog.watch(stop).await });
        // Rate-limit buckets of clients gone quiet are forgotten (bounded memory).
        let (limiter, stop) = (state.api_limiter.clone(), workers.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => limiter.forget_idle(),
                }
            }
        });
        let token_writer = tokio::spawn(state.tokens.clone().run(workers.clone()));
        // Audit entries older than the retention go, hourly.
        let (audit, stop) = (state.audit.clone(), workers.clone());
        let retention = chrono::Duration::days(state.settings.retention_days as i64);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => {}
                }
                match audit.prune(retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "pruned old audit entries"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune the audit log"),
                }
            }
        });
        let flusher = tokio::spawn(state.tracker.clone().run(
            Duration::from_secs(state.settings.progress_flush_secs),
            Duration::from_secs(state.settings.retention_days * 86_400),
            workers.clone(),
        ));
        let handles: Vec<_> = servers.iter().map(Server::handle).collect();
        let servers: Vec<_> = servers.into_iter().map(tokio::spawn).collect();
        shutdown.cancelled().await;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: no new connections, draining"
        );
        let stopping = tokio::spawn(async move {
            futures::future::join_all(handles.iter().map(|h| h.stop(true))).await
        });
        workers.cancel();
        let _ = flusher.await;
        let _ = device_flusher.await;
        let _ = token_writer.await;
        let final_flush = state.catalog.flush().await;
        let _ = stopping.await;
        // Uploads cut by the shutdown leave nothing behind (their handlers are gone now).
        state.uploads.discard_unfinished().await;
        for server in servers {
            server.await.map_err(std::io::Error::other)??;
        }
        // Changes that could not be made durable: the exit status says so.
        final_flush.map_err(|e| std::io::Error::other(format!("final catalog flush failed: {e}")))
    }
}

/// Removes what interrupted uploads left: recorded S3 multipart uploads are aborted and their
/// keys deleted; the local blob directory is walked and every file that is not the blob of a
/// live record (object_store staging files included) is removed.
async fn sweep(catalog: &Arc<dyn Store>, blobs: &BlobStore) -> Result<(), StartupError> {
    use futures::TryStreamExt;
    let mut keep = HashSet::new();
    // Pending uploads that could not be cleaned (S3 unreachable) keep their files for now.
    for pending in catalog.pending_uploads().await? {
        keep.insert(pending.blob_key.clone());
        keep.insert(format!("{}.part", pending.blob_key));
    }
    let mut records = catalog.all_firmware();
    while let Some(record) = records.try_next().await? {
        if record.status != FirmwareStatus::Deleted {
            keep.insert(record.blob_key);
        }
    }
    let blobs2 = blobs.clone();
    let removed = tokio::task::spawn_blocking(move || blobs2.sweep_local(&keep))
        .await
        .map_err(|e| crate::blobs::BlobError::Task(e.to_string()))??;
    for path in removed {
        tracing::info!(path = %path.display(), "swept a leftover blob file");
    }
    catalog.flush().await?;
    Ok(())
}
