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

mod options;

pub use options::ServeOptions;

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
    /// The catalog backend.
    pub catalog: crate::catalog::CatalogBackend,
    /// This replica's id (`None`: the instance id).
    pub replica_id: Option<String>,
    /// The URL signing key (`None`: `<data-dir>/url-signing.key`).
    pub url_signing_key_file: Option<PathBuf>,
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
            catalog: crate::catalog::CatalogBackend::Sled {
                dir: PathBuf::from("storage").join("catalog"),
                cache_mb: 64,
            },
            replica_id: None,
            url_signing_key_file: None,
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
                share_group: None,
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
                shared: false,
                route_tag: None,
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
        let sled_cache_mb = positive("sled_cache_mb", o.sled_cache_mb, d.sled_cache_mb)?;
        let pool = crate::catalog::PoolLimits::default();
        let limits = crate::catalog::PoolLimits {
            max_connections: match o.catalog_max_connections {
                Some(0) => return Err(invalid("catalog_max_connections must be at least 1")),
                Some(n) => n,
                None => pool.max_connections,
            },
            connect_timeout_secs: positive(
                "catalog_connect_timeout",
                o.catalog_connect_timeout,
                pool.connect_timeout_secs,
            )?,
            statement_timeout_secs: positive(
                "catalog_statement_timeout",
                o.catalog_statement_timeout,
                pool.statement_timeout_secs,
            )?,
        };
        let catalog = crate::catalog::CatalogBackend::parse(
            o.catalog.as_deref(),
            &data_dir,
            sled_cache_mb,
            limits,
        )
        .map_err(invalid)?;
        let max_concurrent_uploads = match o.max_concurrent_uploads {
            Some(0) => return Err(invalid("max_concurrent_uploads must be at least 1")),
            Some(n) => n,
            None => d.max_concurrent_uploads,
        };
        if let Some(v) = o.mqtt_replies.as_deref()
            && !matches!(v, "all" | "none")
        {
            return Err(invalid("mqtt_replies must be all or none"));
        }
        let share_group = match o.mqtt_share_group.as_deref().map(str::trim) {
            None => Some("fwrepo".to_string()),
            Some("none") => None,
            Some(g) if !g.is_empty() && !g.contains(['/', '+', '#']) => Some(g.to_string()),
            Some(_) => {
                return Err(invalid(
                    "mqtt_share_group must be a name without '/', '+' or '#' (or none)",
                ));
            }
        };
        for check in o.preflight_skip.iter().flatten() {
            if !crate::ota::PREFLIGHT_CHECKS.contains(&check.as_str()) {
                return Err(invalid(format!(
                    "preflight_skip: unknown check {check:?} (known: {})",
                    crate::ota::PREFLIGHT_CHECKS.join(", ")
                )));
            }
        }
        if let Some(v) = o.preflight.as_deref()
            && !matches!(v, "normal" | "strict" | "off")
        {
            return Err(invalid("preflight must be normal, strict or off"));
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
            max_connections: match o.mqtt_max_connections {
                Some(0) => return Err(invalid("mqtt_max_connections must be at least 1")),
                n => n,
            },
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
        let embedded_only =
            embedded.auth || embedded.tls.is_some() || o.mqtt_max_connections.is_some();
        if embedded_only && !matches!(target, crate::mqtt::BrokerTarget::Embedded(_)) {
            return Err(invalid(
                "mqtt_auth, mqtt_tls_* and mqtt_max_connections configure the embedded broker; an external broker has its own (see deploy/mosquitto)",
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
            sled_cache_mb,
            catalog,
            replica_id: o.replica_id.filter(|id| !id.trim().is_empty()),
            url_signing_key_file: o.url_signing_key_file,
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
                share_group,
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
                shared: false,
                route_tag: None,
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
            catalog: crate::catalog::CatalogBackend::Sled {
                dir: data_dir.join("catalog"),
                cache_mb: d.sled_cache_mb,
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
mod tests;
