//! Server configuration: the flags of contract §1, layered (highest first) flag, environment
//! (`FWREPO_<FLAG>`), TOML file (`--config`), built-in default. [`ServeOptions`] is the raw, all-optional layer
//! (one struct serves clap and serde, so a flag, its variable and its TOML key cannot drift);
//! [`Settings`] is the validated result. Invalid configuration fails here, before any port is
//! bound.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use url::Url;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The `--config` file is not valid TOML for fwrepo.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Every `fwrepo serve` setting, each optional; clap fills flags and `FWREPO_*` variables, serde
/// fills the TOML file. Doc comments double as `--help`.
#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeOptions {
    /// TOML configuration file (keys are the flag names with `_`).
    #[arg(long, env = "FWREPO_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HTTP listen address (port 0 picks one) [default: 127.0.0.1:8080].
    #[arg(long, env = "FWREPO_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory for the catalog and local blobs [default: storage].
    #[arg(long, env = "FWREPO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Base URL of every file_url [default: the bound HTTP address; required off loopback].
    #[arg(long, env = "FWREPO_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Blob store: file://DIR or s3://bucket/prefix [default: file://<data-dir>/blobs].
    #[arg(long, env = "FWREPO_BLOB_STORE")]
    pub blob_store: Option<String>,
    /// Endpoint of an S3-compatible server (MinIO, Ceph, moto, …); AWS_* variables give
    /// credentials and region.
    #[arg(long, env = "FWREPO_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Seconds to connect to the S3 server before the attempt fails [default: 5].
    #[arg(long, env = "FWREPO_BLOB_CONNECT_TIMEOUT")]
    pub blob_connect_timeout: Option<u64>,
    /// Seconds an S3 request may wait for its next bytes (per read, so long downloads go on)
    /// and may spend on retries before it fails; /readyz waits at most 1.5 s [default: 30].
    #[arg(long, env = "FWREPO_BLOB_TIMEOUT")]
    pub blob_timeout: Option<u64>,
    /// Largest accepted upload in bytes [default: 8 GiB].
    #[arg(long, env = "FWREPO_MAX_UPLOAD_BYTES")]
    pub max_upload_bytes: Option<u64>,
    /// Uploads accepted at once; more get 429 too_many_uploads [default: 2].
    #[arg(long, env = "FWREPO_MAX_CONCURRENT_UPLOADS")]
    pub max_concurrent_uploads: Option<usize>,
    /// Days to keep finished tasks, download sessions and audit entries [default: 180].
    #[arg(long, env = "FWREPO_RETENTION_DAYS")]
    pub retention_days: Option<u64>,
    /// Seconds between flushes of download progress to disk [default: 5].
    #[arg(long, env = "FWREPO_PROGRESS_FLUSH_SECS")]
    pub progress_flush_secs: Option<u64>,
    /// Proxies whose X-Forwarded-For is believed, as CIDRs [default: none].
    #[arg(long, env = "FWREPO_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<IpNet>>,
    /// sled page cache in MiB [default: 64].
    #[arg(long, env = "FWREPO_SLED_CACHE_MB")]
    pub sled_cache_mb: Option<u64>,
    /// Budget in MiB for download read buffers in flight across all clients [default: 64].
    #[arg(long, env = "FWREPO_DOWNLOAD_BUFFER_MB")]
    pub download_buffer_mb: Option<u64>,
    /// API requests per second per client after the burst; 0 = no limit [default: 200].
    #[arg(long, env = "FWREPO_API_RATE_LIMIT")]
    pub api_rate_limit: Option<u32>,
    /// API requests a client may make at once before the rate limit applies [default: 1000].
    #[arg(long, env = "FWREPO_API_BURST")]
    pub api_burst: Option<u32>,
    /// API authentication: on (every /api/ call needs a token) or off (demos only; logs a
    /// warning) [default: on].
    #[arg(long, env = "FWREPO_AUTH")]
    pub auth: Option<String>,
    /// PEM certificate chain: serve HTTPS on --listen (with --tls-key) [default: plain HTTP].
    #[arg(long, env = "FWREPO_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FWREPO_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Extra plain-HTTP listener serving only downloads (/files/, /dl/) and /healthz, for docks
    /// that trust only public CAs while the API is HTTPS; file_url then points at it unless
    /// --public-url says otherwise [default: none].
    #[arg(long, env = "FWREPO_DOWNLOAD_LISTEN")]
    pub download_listen: Option<SocketAddr>,
    /// Extra plain-HTTP listener serving only /metrics, without a token (for a scraper on a
    /// private network) [default: none; /metrics on the main listener needs a token].
    #[arg(long, env = "FWREPO_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Downloads (/files/, /dl/) one client address may run at once; more get 429
    /// rate_limited. Docks behind a carrier NAT share an address, so the default is high: it
    /// stops one address from holding unbounded connections, never a fleet [default: 1024].
    #[arg(long, env = "FWREPO_MAX_DOWNLOADS_PER_IP")]
    pub max_downloads_per_ip: Option<usize>,
    /// Lifetime in seconds of the signed /dl/ URLs sent in ota_create [default: 604800, 7 days].
    #[arg(long, env = "FWREPO_DOWNLOAD_URL_TTL")]
    pub download_url_ttl: Option<u64>,
    /// Seconds an upload body may stall before it is aborted [default: 300].
    #[arg(long, env = "FWREPO_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Seconds to drain in-flight requests on SIGTERM/SIGINT [default: 20].
    #[arg(long, env = "FWREPO_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<u64>,
    /// Log format on stderr: text or json [default: text].
    #[arg(long, env = "FWREPO_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// External MQTT broker, mqtt://[user:pass@]host:port [default: the embedded broker].
    #[arg(long, env = "FWREPO_MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// Embedded broker listen address; port 0 picks one [default: 127.0.0.1:1883].
    #[arg(long, env = "FWREPO_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,
    /// MQTT client id [default: fwrepo-<instance id kept in the data dir>].
    #[arg(long, env = "FWREPO_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,
    /// MQTT user name for the external broker.
    #[arg(long, env = "FWREPO_MQTT_USER")]
    pub mqtt_user: Option<String>,
    /// MQTT password for the external broker.
    #[arg(long, env = "FWREPO_MQTT_PASSWORD")]
    pub mqtt_password: Option<String>,
    /// PEM CA bundle that signs the mqtts:// broker's certificate [default: the system's roots].
    #[arg(long, env = "FWREPO_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// PEM client certificate for an mqtts:// broker that requires one (with --mqtt-client-key).
    #[arg(long, env = "FWREPO_MQTT_CLIENT_CERT")]
    pub mqtt_client_cert: Option<PathBuf>,
    /// PEM private key of --mqtt-client-cert.
    #[arg(long, env = "FWREPO_MQTT_CLIENT_KEY")]
    pub mqtt_client_key: Option<PathBuf>,
    /// Embedded broker: require per-gateway credentials (user name = client id, password from
    /// `fwrepo mqtt-password SN`): on or off [default: off].
    #[arg(long, env = "FWREPO_MQTT_AUTH")]
    pub mqtt_auth: Option<String>,
    /// Embedded broker: an extra MQTT-over-TLS listener (with --mqtt-tls-cert/--mqtt-tls-key)
    /// [default: none].
    #[arg(long, env = "FWREPO_MQTT_TLS_LISTEN")]
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of --mqtt-tls-listen.
    #[arg(long, env = "FWREPO_MQTT_TLS_CERT")]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// PEM private key of --mqtt-tls-listen.
    #[arg(long, env = "FWREPO_MQTT_TLS_KEY")]
    pub mqtt_tls_key: Option<PathBuf>,
    /// Reply to update_topo and events: all or none [default: all].
    #[arg(long, env = "FWREPO_MQTT_REPLIES")]
    pub mqtt_replies: Option<String>,
    /// Seconds after the last message a device counts as online [default: 60].
    #[arg(long, env = "FWREPO_ONLINE_WINDOW")]
    pub online_window: Option<u64>,
    /// Seconds after `ok` to verify the reported version [default: 900].
    #[arg(long, env = "FWREPO_VERIFY_WINDOW")]
    pub verify_window: Option<u64>,
    /// Preflight mode normal|strict|off [default: normal].
    #[arg(long, env = "FWREPO_PREFLIGHT")]
    pub preflight: Option<String>,
    /// Preflight checks to skip: gateway_online, not_upgrading, aircraft_attached.
    #[arg(long, env = "FWREPO_PREFLIGHT_SKIP", value_delimiter = ',')]
    pub preflight_skip: Option<Vec<String>>,
    /// Seconds to wait for services_reply [default: 30].
    #[arg(long, env = "FWREPO_OTA_REPLY_TIMEOUT")]
    pub ota_reply_timeout: Option<u64>,
    /// Seconds without ota_progress before a task times out [default: 1800].
    #[arg(long, env = "FWREPO_OTA_PROGRESS_TIMEOUT")]
    pub ota_progress_timeout: Option<u64>,
    /// Model key → firmware model table (TOML only).
    #[arg(skip)]
    pub models: Option<toml::Table>,
}

macro_rules! layer {
    ($hi:expr, $lo:expr, $($f:ident),* $(,)?) => {
        ServeOptions { config: $hi.config.or($lo.config), $( $f: $hi.$f.or($lo.$f), )* }
    };
}

impl ServeOptions {
    /// `self` wins where set; `lower` fills the rest.
    fn over(self, lower: ServeOptions) -> ServeOptions {
        layer!(
            self,
            lower,
            listen,
            data_dir,
            public_url,
            blob_store,
            s3_endpoint,
            blob_connect_timeout,
            blob_timeout,
            max_upload_bytes,
            max_concurrent_uploads,
            retention_days,
            progress_flush_secs,
            trusted_proxies,
            sled_cache_mb,
            download_buffer_mb,
            download_url_ttl,
            api_rate_limit,
            api_burst,
            auth,
            tls_cert,
            tls_key,
            download_listen,
            metrics_listen,
            max_downloads_per_ip,
            idle_timeout_secs,
            shutdown_grace,
            log_format,
            mqtt_url,
            mqtt_listen,
            mqtt_client_id,
            mqtt_user,
            mqtt_password,
            mqtt_ca_file,
            mqtt_client_cert,
            mqtt_client_key,
            mqtt_auth,
            mqtt_tls_listen,
            mqtt_tls_cert,
            mqtt_tls_key,
            mqtt_replies,
            online_window,
            verify_window,
            preflight,
            preflight_skip,
            ota_reply_timeout,
            ota_progress_timeout,
            models,
        )
    }

    /// Reads the TOML file named by `--config` (if any) under these flag/env values.
    pub fn layered(self) -> Result<ServeOptions, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let file: ServeOptions = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path,
            source: Box::new(source),
        })?;
        Ok(self.over(file))
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

pub use crate::blobs::BlobBackend;

/// Validated server settings. `Settings::default()` is the zero-configuration setup.
#[derive(Clone, Debug)]
pub struct Settings {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Base of file URLs; `None` = the bound HTTP address.
    pub public_url: Option<Url>,
    /// Blob backend.
    pub blob_backend: BlobBackend,
    /// Timeouts of a remote blob store.
    pub blob_timeouts: crate::blobs::BlobTimeouts,
    /// Largest upload in bytes.
    pub max_upload_bytes: u64,
    /// Concurrent uploads.
    pub max_concurrent_uploads: usize,
    /// Retention of download sessions, in days.
    pub retention_days: u64,
    /// Seconds between progress flushes.
    pub progress_flush_secs: u64,
    /// Proxies whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// sled cache in MiB.
    pub sled_cache_mb: u64,
    /// Download buffer budget in MiB.
    pub download_buffer_mb: u64,
    /// Lifetime of signed `/dl/` URLs in seconds.
    pub download_url_ttl_secs: u64,
    /// API requests per second per client (0 = no limit).
    pub api_rate_limit: u32,
    /// API burst per client.
    pub api_burst: u32,
    /// Whether `/api/` calls need a token.
    pub auth_enabled: bool,
    /// Token-free `/metrics` listener.
    pub metrics_listen: Option<SocketAddr>,
    /// HTTPS on the main listener: (certificate chain, key) PEM files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Plain-HTTP download listener.
    pub download_listen: Option<SocketAddr>,
    /// Concurrent downloads per client address.
    pub max_downloads_per_ip: usize,
    /// Upload idle timeout in seconds.
    pub idle_timeout_secs: u64,
    /// Graceful shutdown budget in seconds.
    pub shutdown_grace_secs: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// MQTT session.
    pub mqtt: crate::mqtt::MqttSettings,
    /// Seconds after the last message a device counts as online.
    pub online_window_secs: u64,
    /// Model key → firmware model table.
    pub models: crate::devices::ModelMap,
    /// OTA timeouts and preflight mode.
    pub ota: crate::ota::OtaSettings,
}

impl Default for Settings {
    fn default() -> Self {
        let data_dir = PathBuf::from("storage");
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            blob_backend: BlobBackend::Local {
                dir: data_dir.join("blobs"),
            },
            blob_timeouts: crate::blobs::BlobTimeouts::default(),
            data_dir,
            public_url: None,
            max_upload_bytes: 8 << 30,
            max_concurrent_uploads: 2,
            retention_days: 180,
            progress_flush_secs: 5,
            trusted_proxies: Vec::new(),
            sled_cache_mb: 64,
            download_buffer_mb: 64,
            download_url_ttl_secs: 7 * 86_400,
            api_rate_limit: 200,
            api_burst: 1000,
            auth_enabled: true,
            metrics_listen: None,
            tls: None,
            download_listen: None,
            max_downloads_per_ip: 1024,
            idle_timeout_secs: 300,
            shutdown_grace_secs: 20,
            log_format: LogFormat::Text,
            mqtt: crate::mqtt::MqttSettings {
                target: crate::mqtt::BrokerTarget::Embedded(SocketAddr::from((
                    [127, 0, 0, 1],
                    1883,
                ))),
                client_id: None,
                replies: true,
                embedded: Default::default(),
            },
            online_window_secs: 60,
            models: crate::devices::ModelMap::default(),
            ota: crate::ota::OtaSettings {
                reply_timeout: std::time::Duration::from_secs(30),
                progress_timeout: std::time::Duration::from_secs(1800),
                verify_window: std::time::Duration::from_secs(900),
                preflight: "normal".into(),
                preflight_skip: Vec::new(),
                online_window: std::time::Duration::from_secs(60),
                retention: std::time::Duration::from_secs(180 * 86_400),
            },
        }
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

fn positive(name: &str, v: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match v {
        Some(0) => Err(invalid(format!("{name} must be at least 1"))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

impl Settings {
    /// Validates layered options into settings.
    pub fn from_options(o: ServeOptions) -> Result<Settings, ConfigError> {
        let d = Settings::default();
        let data_dir = o.data_dir.unwrap_or(d.data_dir);
        let listen = o.listen.unwrap_or(d.listen);
        // file_url points at the download listener when there is one.
        let file_host = o.download_listen.unwrap_or(listen);
        let public_url = match o.public_url.as_deref() {
            Some(raw) => Some(parse_public_url(raw)?),
            None if !file_host.ip().is_loopback() => {
                return Err(invalid(format!(
                    "listening on {file_host} needs --public-url: a loopback or unspecified address in file_url only makes gateways fail their download"
                )));
            }
            None => None,
        };
        let tls = match (o.tls_cert.clone(), o.tls_key.clone()) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(invalid("tls_cert and tls_key go together")),
        };
        let blob_backend = BlobBackend::parse(o.blob_store.as_deref(), &data_dir, o.s3_endpoint)
            .map_err(invalid)?;
        let max_concurrent_uploads = match o.max_concurrent_uploads {
            Some(0) => return Err(invalid("max_concurrent_uploads must be at least 1")),
            Some(n) => n,
            None => d.max_concurrent_uploads,
        };
        if let Some(v) = o.mqtt_replies.as_deref() {
            if !matches!(v, "all" | "none") {
                return Err(invalid("mqtt_replies must be all or none"));
            }
        }
        for check in o.preflight_skip.iter().flatten() {
            if !crate::ota::PREFLIGHT_CHECKS.contains(&check.as_str()) {
                return Err(invalid(format!(
                    "preflight_skip: unknown check {check:?} (known: {})",
                    crate::ota::PREFLIGHT_CHECKS.join(", ")
                )));
            }
        }
        if let Some(v) = o.preflight.as_deref() {
            if !matches!(v, "normal" | "strict" | "off") {
                return Err(invalid("preflight must be normal, strict or off"));
            }
        }
        let target = match o.mqtt_url.as_deref() {
            Some(u) => {
                let tls = crate::mqtt::tls::MqttTls {
                    ca_file: o.mqtt_ca_file.clone(),
                    client_cert: o.mqtt_client_cert.clone(),
                    client_key: o.mqtt_client_key.clone(),
                };
                parse_mqtt_url(u, o.mqtt_user.clone(), o.mqtt_password.clone(), tls)?
            }
            None => crate::mqtt::BrokerTarget::Embedded(
                o.mqtt_listen
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1883))),
            ),
        };
        let models = crate::devices::ModelMap::from_table(o.models.as_ref()).map_err(invalid)?;
        let embedded = crate::mqtt::broker::EmbeddedOptions {
            auth: match o.mqtt_auth.as_deref().map(str::trim) {
                None | Some("off") => false,
                Some("on") => true,
                Some(other) => {
                    return Err(invalid(format!(
                        "mqtt_auth must be on or off, not {other:?}"
                    )));
                }
            },
            tls: match (
                o.mqtt_tls_listen,
                o.mqtt_tls_cert.clone(),
                o.mqtt_tls_key.clone(),
            ) {
                (Some(addr), Some(cert), Some(key)) => Some((addr, cert, key)),
                (None, None, None) => None,
                _ => {
                    return Err(invalid(
                        "mqtt_tls_listen, mqtt_tls_cert and mqtt_tls_key go together",
                    ));
                }
            },
        };
        let embedded_only = embedded.auth || embedded.tls.is_some();
        if embedded_only && !matches!(target, crate::mqtt::BrokerTarget::Embedded(_)) {
            return Err(invalid(
                "mqtt_auth and mqtt_tls_* configure the embedded broker; an external broker has its own (see deploy/mosquitto)",
            ));
        }
        Ok(Settings {
            listen,
            public_url,
            blob_backend,
            blob_timeouts: crate::blobs::BlobTimeouts {
                connect: Duration::from_secs(positive(
                    "blob_connect_timeout",
                    o.blob_connect_timeout,
                    d.blob_timeouts.connect.as_secs(),
                )?),
                request: Duration::from_secs(positive(
                    "blob_timeout",
                    o.blob_timeout,
                    d.blob_timeouts.request.as_secs(),
                )?),
            },
            max_upload_bytes: positive("max_upload_bytes", o.max_upload_bytes, d.max_upload_bytes)?,
            max_concurrent_uploads,
            retention_days: positive("retention_days", o.retention_days, d.retention_days)?,
            progress_flush_secs: positive(
                "progress_flush_secs",
                o.progress_flush_secs,
                d.progress_flush_secs,
            )?,
            trusted_proxies: o.trusted_proxies.unwrap_or_default(),
            sled_cache_mb: positive("sled_cache_mb", o.sled_cache_mb, d.sled_cache_mb)?,
            api_rate_limit: o.api_rate_limit.unwrap_or(d.api_rate_limit),
            api_burst: positive(
                "api_burst",
                o.api_burst.map(u64::from),
                u64::from(d.api_burst),
            )?
            .try_into()
            .map_err(|_| invalid("api_burst is too large"))?,
            auth_enabled: match o.auth.as_deref().map(str::trim) {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(invalid(format!("auth must be on or off, not {other:?}")));
                }
            },
            metrics_listen: o.metrics_listen,
            tls,
            download_listen: o.download_listen,
            max_downloads_per_ip: positive(
                "max_downloads_per_ip",
                o.max_downloads_per_ip.map(|n| n as u64),
                d.max_downloads_per_ip as u64,
            )? as usize,
            download_url_ttl_secs: positive(
                "download_url_ttl",
                o.download_url_ttl,
                d.download_url_ttl_secs,
            )?,
            download_buffer_mb: positive(
                "download_buffer_mb",
                o.download_buffer_mb,
                d.download_buffer_mb,
            )?,
            idle_timeout_secs: positive(
                "idle_timeout_secs",
                o.idle_timeout_secs,
                d.idle_timeout_secs,
            )?,
            shutdown_grace_secs: o.shutdown_grace.unwrap_or(d.shutdown_grace_secs),
            log_format: o.log_format.unwrap_or_default(),
            mqtt: crate::mqtt::MqttSettings {
                target,
                client_id: o.mqtt_client_id.filter(|c| !c.is_empty()),
                replies: o.mqtt_replies.as_deref() != Some("none"),
                embedded,
            },
            online_window_secs: positive("online_window", o.online_window, d.online_window_secs)?,
            ota: crate::ota::OtaSettings {
                reply_timeout: std::time::Duration::from_secs(positive(
                    "ota_reply_timeout",
                    o.ota_reply_timeout,
                    30,
                )?),
                progress_timeout: std::time::Duration::from_secs(positive(
                    "ota_progress_timeout",
                    o.ota_progress_timeout,
                    1800,
                )?),
                verify_window: std::time::Duration::from_secs(positive(
                    "verify_window",
                    o.verify_window,
                    900,
                )?),
                preflight: o.preflight.clone().unwrap_or_else(|| "normal".into()),
                preflight_skip: o.preflight_skip.clone().unwrap_or_default(),
                online_window: std::time::Duration::from_secs(
                    o.online_window.unwrap_or(d.online_window_secs),
                ),
                retention: std::time::Duration::from_secs(
                    o.retention_days.unwrap_or(d.retention_days) * 86_400,
                ),
            },
            models,
            data_dir,
        })
    }

    /// Settings for a fresh data directory with HTTP and the embedded broker on OS-chosen
    /// loopback ports (tests).
    pub fn for_data_dir(data_dir: &Path) -> Settings {
        let d = Settings::default();
        Settings {
            mqtt: crate::mqtt::MqttSettings {
                target: crate::mqtt::BrokerTarget::Embedded(SocketAddr::from(([127, 0, 0, 1], 0))),
                ..d.mqtt
            },
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_path_buf(),
            blob_backend: BlobBackend::Local {
                dir: data_dir.join("blobs"),
            },
            ..Settings::default()
        }
    }

    /// Whether `peer` is a proxy whose X-Forwarded-For is believed.
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }
}

fn parse_mqtt_url(
    raw: &str,
    user: Option<String>,
    password: Option<String>,
    tls_files: crate::mqtt::tls::MqttTls,
) -> Result<crate::mqtt::BrokerTarget, ConfigError> {
    let url = Url::parse(raw).map_err(|e| invalid(format!("mqtt_url {raw:?}: {e}")))?;
    let tls = match url.scheme() {
        "mqtt" if tls_files == crate::mqtt::tls::MqttTls::default() => None,
        "mqtt" => {
            return Err(invalid(
                "mqtt_ca_file, mqtt_client_cert and mqtt_client_key need an mqtts:// mqtt_url",
            ));
        }
        "mqtts" => {
            // Read and check the files now: bad TLS material fails before any port is bound.
            tls_files.client_config().map_err(invalid)?;
            Some(tls_files)
        }
        _ => return Err(invalid("mqtt_url must start with mqtt:// or mqtts://")),
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid("mqtt_url needs a host"))?
        .to_string();
    let port = url
        .port()
        .unwrap_or(if tls.is_some() { 8883 } else { 1883 });
    let url_user = (!url.username().is_empty()).then(|| url.username().to_string());
    Ok(crate::mqtt::BrokerTarget::External {
        host,
        port,
        tls,
        user: user.or(url_user),
        password: password.or(url.password().map(str::to_string)),
    })
}

fn parse_public_url(raw: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw).map_err(|e| invalid(format!("public_url {raw:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            "public_url must be an http:// or https:// URL with a host",
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_zero_config() {
        let s = Settings::from_options(ServeOptions::default()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.data_dir, PathBuf::from("storage"));
        assert_eq!(s.max_upload_bytes, 8 << 30);
    }

    #[test]
    fn non_loopback_needs_public_url() {
        let o = ServeOptions {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            ..Default::default()
        };
        assert!(Settings::from_options(o.clone()).is_err());
        let o = ServeOptions {
            public_url: Some("https://fw.example.com".into()),
            ..o
        };
        assert!(Settings::from_options(o).is_ok());
    }

    #[test]
    fn flag_beats_file() {
        let file: ServeOptions =
            toml::from_str("listen = \"127.0.0.1:9000\"\nmax_concurrent_uploads = 4\n").unwrap();
        let flags = ServeOptions {
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Default::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.listen.unwrap().port(), 9001);
        assert_eq!(merged.max_concurrent_uploads, Some(4));
        assert!(toml::from_str::<ServeOptions>("no_such_key = 1").is_err());
    }

    #[test]
    fn blob_store_urls() {
        let b = BlobBackend::parse(Some("s3://bucket/a/b/"), Path::new("x"), None).unwrap();
        assert_eq!(
            b,
            BlobBackend::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into(),
                endpoint: None
            }
        );
        assert!(BlobBackend::parse(Some("ftp://x"), Path::new("x"), None).is_err());
    }
}
