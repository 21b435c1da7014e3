//! `fwrepo serve`'s options as one struct that clap (flags and `FWREPO_*` variables) and TOML
//! (`--config`) both fill, layered flag > environment > file > default.

use super::*;

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
    /// Catalog: sled (in the data directory, one process) or a postgres:// URL (TLS through
    /// sslmode; several processes may share it) [default: sled].
    #[arg(long, env = "FWREPO_CATALOG")]
    pub catalog: Option<String>,
    /// PostgreSQL catalog: connections in the pool [default: 16].
    #[arg(long, env = "FWREPO_CATALOG_MAX_CONNECTIONS")]
    pub catalog_max_connections: Option<u32>,
    /// PostgreSQL catalog: seconds to connect or to wait for a free connection [default: 5].
    #[arg(long, env = "FWREPO_CATALOG_CONNECT_TIMEOUT")]
    pub catalog_connect_timeout: Option<u64>,
    /// PostgreSQL catalog: seconds a statement may run [default: 30].
    #[arg(long, env = "FWREPO_CATALOG_STATEMENT_TIMEOUT")]
    pub catalog_statement_timeout: Option<u64>,
    /// This replica's id in a deployment of several [default: the instance id kept in the
    /// data directory].
    #[arg(long, env = "FWREPO_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// File with the key that signs download URLs (at least 32 bytes, hex; created when
    /// missing; `<file>.previous` is still accepted). Replicas of one deployment must read the
    /// same key [default: `<data-dir>/url-signing.key`].
    #[arg(long, env = "FWREPO_URL_SIGNING_KEY_FILE")]
    pub url_signing_key_file: Option<std::path::PathBuf>,
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
    /// Embedded broker: gateway connections accepted at once; more are refused with a CONNACK
    /// "server unavailable" [default: 50000].
    #[arg(long, env = "FWREPO_MQTT_MAX_CONNECTIONS")]
    pub mqtt_max_connections: Option<u64>,
    /// Reply to update_topo and events: all or none [default: all].
    #[arg(long, env = "FWREPO_MQTT_REPLIES")]
    pub mqtt_replies: Option<String>,
    /// Shared-subscription group of the replicas of one deployment: on a PostgreSQL catalog
    /// with an external broker, the up topics are subscribed as `$share/<group>/…` so that
    /// each gateway message reaches one replica; `none` subscribes plainly [default: fwrepo].
    #[arg(long, env = "FWREPO_MQTT_SHARE_GROUP")]
    pub mqtt_share_group: Option<String>,
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
    pub(super) fn over(self, lower: ServeOptions) -> ServeOptions {
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
            catalog,
            catalog_max_connections,
            catalog_connect_timeout,
            catalog_statement_timeout,
            replica_id,
            url_signing_key_file,
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
            mqtt_max_connections,
            mqtt_replies,
            mqtt_share_group,
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
