//! The gateway simulator (`fwrepo simulate`): N docks, each with an aircraft, that speak the
//! protocol as real ones do — topology, osd every 2 s, state with versions — answer
//! `ota_create`, download `file_url` by HTTP Range with resume, check size and MD5, report
//! `ota_progress` through the seed's sub_status sequence and then their new version. Failure
//! modes make them fail where real docks fail. Two dialects: the seed's (Autel: `sub_status`,
//! `step` + `step_key`, no `gateway` field) and DJI's (`gateway`, `need_reply: 1`,
//! `current_step`, `thing_version`).

use crate::mqtt::topics;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use md5::Digest;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// A simulated dock's first reconnect delay after losing its connection.
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
/// Its longest reconnect delay.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Where a simulated job fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailMode {
    /// The download fails (DOWNLOAD_FAILED).
    Download,
    /// The package check fails (VERIFY_FAILED).
    Verify,
    /// The installation fails (UPGRADE_FAIL).
    Upgrade,
    /// `services_reply` with result 312014.
    Reject,
    /// No reply and no progress at all.
    Silent,
}

/// Message shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    /// The seed's (Autel EVO Nest).
    Autel,
    /// DJI Cloud API.
    Dji,
}

/// `fwrepo simulate` options.
#[derive(clap::Args, Clone, Debug)]
pub struct SimConfig {
    /// Broker URL.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: String,
    /// Number of docks (each with one aircraft).
    #[arg(long, default_value_t = 1)]
    pub gateways: usize,
    /// Serial prefix: docks are PREFIX0001…, aircraft PREFIX0001-AC.
    #[arg(long, default_value = "SIM")]
    pub sn_prefix: String,
    /// Failure mode.
    #[arg(long)]
    pub fail: Option<FailMode>,
    /// Fraction of jobs that fail (with --fail).
    #[arg(long, default_value_t = 1.0)]
    pub fail_rate: f64,
    /// Drop the download connection once at this fraction, then resume with a Range request.
    #[arg(long)]
    pub interrupt_at: Option<f64>,
    /// Download rate limit in bytes per second.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Message shapes.
    #[arg(long, value_enum, default_value = "autel")]
    pub dialect: Dialect,
    /// Dock firmware version at start.
    #[arg(long, default_value = "1.0.0")]
    pub dock_version: String,
    /// Aircraft firmware version at start.
    #[arg(long, default_value = "1.0.0")]
    pub aircraft_version: String,
    /// Dock model key (domain-type-sub_type).
    #[arg(long, default_value = "3-1-0")]
    pub dock_model_key: String,
    /// Aircraft model key.
    #[arg(long, default_value = "0-67-0")]
    pub aircraft_model_key: String,
    /// Seconds between osd messages.
    #[arg(long, default_value_t = 2)]
    pub osd_every: u64,
    /// The embedded broker's `mqtt-credentials.key` (with `--mqtt-auth on`): each dock connects
    /// with user name = its serial and the password derived from it.
    #[arg(long)]
    pub mqtt_credentials_key: Option<std::path::PathBuf>,
}

/// Totals over all simulated docks.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Jobs received.
    pub jobs: AtomicU64,
    /// Jobs ended ok.
    pub ok: AtomicU64,
    /// Jobs ended failed or rejected.
    pub failed: AtomicU64,
    /// Bytes downloaded.
    pub bytes: AtomicU64,
    /// MQTT connection errors (each followed by a reconnect).
    pub reconnects: AtomicU64,
}

struct Dock {
    cfg: SimConfig,
    index: usize,
    sn: String,
    aircraft: String,
    versions: Mutex<(String, String)>,
    upgrading: std::sync::atomic::AtomicBool,
    /// `ota_create` jobs this dock took (which of them fail depends on it, not on timing).
    jobs: std::sync::atomic::AtomicU64,
    http: reqwest::Client,
    stats: Arc<SimStats>,
}

fn ts() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn uuid() -> String {
    crate::domain::ids::next().to_lowercase()
}

/// Starts every simulated dock; they run until `cancel`.
pub async fn run(cfg: SimConfig, cancel: CancellationToken) -> anyhow::Result<Arc<SimStats>> {
    let url = url::Url::parse(&cfg.mqtt_url)?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(1883);
    let stats = Arc::new(SimStats::default());
    let credentials = match &cfg.mqtt_credentials_key {
        Some(path) => Some(crate::mqtt::credentials::GatewayCredentials::load(path)?),
        None => None,
    };
    let http = reqwest::Client::builder()
        .user_agent("fwrepo-simulator")
        .build()?;
    for i in 1..=cfg.gateways {
        let sn = format!("{}{i:04}", cfg.sn_prefix);
        let dock = Arc::new(Dock {
            aircraft: format!("{sn}-AC"),
            versions: Mutex::new((cfg.dock_version.clone(), cfg.aircraft_version.clone())),
            upgrading: Default::default(),
            jobs: Default::default(),
            cfg: cfg.clone(),
            index: i,
            sn,
            http: http.clone(),
            stats: Arc::clone(&stats),
        });
        let mut opts = MqttOptions::new(dock.sn.clone(), host.clone(), port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some(c) = &credentials {
            opts.set_credentials(dock.sn.clone(), c.password(&dock.sn));
        } else if !url.username().is_empty() {
            opts.set_credentials(url.username(), url.password().unwrap_or(""));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // A broker that is busy accepting a whole fleet may take more than rumqttc's default
        // 5 s to answer CONNECT; giving up early makes every dock reconnect, again and again.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_connection_timeout(30);
        eventloop.set_network_options(net);
        tokio::spawn(Arc::clone(&dock).session(client, eventloop, cancel.clone()));
    }
    Ok(stats)
}

impl Dock {
    fn envelope(&self, method: Option<&str>, data: Value) -> Value {
        let mut m = json!({"tid": uuid(), "bid": uuid(), "timestamp": ts(), "data": data});
        if let Some(method) = method {
            m["method"] = json!(method);
        }
        if self.cfg.dialect == Dialect::Dji {
            m["gateway"] = json!(self.sn);
        }
        m
    }

    async fn send(&self, client: &AsyncClient, topic: String, msg: Value) {
        let _ = client
            .publish(topic, QoS::AtLeastOnce, false, msg.to_string())
            .await;
    }

    async fn announce(&self, client: &AsyncClient) {
        let key = |k: &str| -> Vec<i64> { k.split('-').filter_map(|p| p.parse().ok()).collect() };
        let (d, a) = (
            key(&self.cfg.dock_model_key),
            key(&self.cfg.aircraft_model_key),
        );
        let version_key = if self.cfg.dialect == Dialect::Dji {
            "thing_version"
        } else {
            "version"
        };
        let domain = |v: &[i64]| -> Value {
            let x = v.first().copied().unwrap_or(0);
            if self.cfg.dialect == Dialect::Dji {
                json!(x.to_string())
            } else {
                json!(x)
            }
        };
        let topo = json!({
            "domain": domain(&d), "type": d.get(1).copied().unwrap_or(0), "sub_type": d.get(2).copied().unwrap_or(0),
            version_key: "1.0",
            "sub_devices": [{"sn": self.aircraft, "domain": domain(&a), "type": a.get(1).copied().unwrap_or(0),
                "sub_type": a.get(2).copied().unwrap_or(0), "index": "A", version_key: "1.0"}],
        });
        self.send(
            client,
            topics::status(&self.sn),
            self.envelope(Some("update_topo"), topo),
        )
        .await;
        self.report_state(client).await;
    }

    async fn report_state(&self, client: &AsyncClient) {
        let (dv, av) = self.versions.lock().await.clone();
        let up = i64::from(self.upgrading.load(Ordering::Relaxed));
        for (sn, v) in [(&self.sn, dv), (&self.aircraft, av)] {
            let data = json!({"firmware_version": v, "compatible_status": 0, "firmware_upgrade_status": up});
            self.send(client, topics::state(sn), self.envelope(None, data))
                .await;
        }
    }

    async fn osd(&self, client: &AsyncClient) {
        let up = self.upgrading.load(Ordering::Relaxed);
        let dock = json!({"mode_code": if up { 3 } else { 0 }, "sub_device": {"device_sn": self.aircraft, "device_online_status": 1}});
        let ac = json!({"mode_code": if up { 13 } else { 0 }});
        for (sn, data) in [(&self.sn, dock), (&self.aircraft, ac)] {
            let _ = client
                .publish(
                    topics::osd(sn),
                    QoS::AtMostOnce,
                    false,
                    self.envelope(None, data).to_string(),
                )
                .await;
        }
    }

    async fn session(
        self: Arc<Self>,
        client: AsyncClient,
        mut eventloop: rumqttc::EventLoop,
        cancel: CancellationToken,
    ) {
        // Docks do not all power up in the same millisecond: spread the first connects.
        tokio::time::sleep(Duration::from_millis(self.index as u64 % 2000)).await;
        // osd on its own task: the event loop is only ever interrupted by `cancel` (a poll
        // dropped half-way for a timer tick can lose the connection's state).
        let (me, c, stop) = (Arc::clone(&self), client.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut osd = tokio::time::interval(Duration::from_secs(me.cfg.osd_every.max(1)));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = osd.tick() => me.osd(&c).await,
                }
            }
        });
        // Reconnects back off (jittered, doubling to 30 s) as a fleet must: a broker that
        // refuses connections (at its limit) is not hammered by the docks it refused.
        let mut backoff = RECONNECT_FIRST;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = RECONNECT_FIRST;
                        let c = client.clone();
                        let me = Arc::clone(&self);
                        tokio::spawn(async move {
                            let _ = c.subscribe(topics::services(&me.sn), QoS::AtLeastOnce).await;
                            me.announce(&c).await;
                        });
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with("/services") => {
                        if let Ok(msg) = serde_json::from_slice::<Value>(&p.payload)
                            && msg["method"] == "ota_create" {
                                let (me, c) = (Arc::clone(&self), client.clone());
                                tokio::spawn(async move { me.job(c, msg).await });
                            }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(sn = %self.sn, error = %e, "simulated dock lost its MQTT connection");
                        tokio::time::sleep(crate::domain::jittered(backoff)).await;
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
            }
        }
    }

    /// Whether this job fails (deterministic per dock and job count).
    fn fails(&self, mode: FailMode) -> bool {
        self.cfg.fail == Some(mode) && {
            // About `fail_rate` of the docks fail a given job, the same ones every run.
            let n = self.jobs.load(Ordering::Relaxed) as usize + self.index;
            ((n * 619) % 1000) as f64 / 1000.0 < self.cfg.fail_rate
        }
    }

    async fn progress(
        &self,
        client: &AsyncClient,
        bid: &str,
        status: &str,
        sub: &str,
        pct: u64,
        step: u8,
    ) {
        let step_key = if step == 1 {
            "download_firmware"
        } else {
            "upgrade_firmware"
        };
        let progress = match self.cfg.dialect {
            Dialect::Autel => json!({"percent": pct, "step": step, "step_key": step_key}),
            Dialect::Dji => json!({"percent": pct, "current_step": step_key}),
        };
        let mut m = self.envelope(Some("ota_progress"), json!({"result": 0, "output": {"status": status, "sub_status": sub, "progress": progress}}));
        m["bid"] = json!(bid);
        if self.cfg.dialect == Dialect::Dji {
            m["need_reply"] = json!(1);
        }
        self.send(client, topics::events(&self.sn), m).await;
    }

    async fn job(self: Arc<Self>, client: AsyncClient, msg: Value) {
        self.stats.jobs.fetch_add(1, Ordering::Relaxed);
        self.jobs.fetch_add(1, Ordering::Relaxed);
        let (tid, bid) = (
            msg["tid"].clone(),
            msg["bid"].as_str().unwrap_or_default().to_string(),
        );
        if self.fails(FailMode::Silent) {
            return;
        }
        let result = if self.fails(FailMode::Reject) {
            312014
        } else {
            0
        };
        let reply = json!({"tid": tid, "bid": bid, "timestamp": ts(), "method": "ota_create",
            "data": {"result": result, "output": {"status": if result == 0 { "sent" } else { "rejected" }, "sub_status": "", "progress": {"percent": 0, "step": 1, "step_key": ""}}}});
        self.send(&client, topics::services_reply(&self.sn), reply)
            .await;
        if result != 0 {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.upgrading.store(true, Ordering::Relaxed);
        let devices = msg["data"]["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let outcome = self.run_job(&client, &bid, &devices).await;
        self.upgrading.store(false, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                self.progress(&client, &bid, "ok", "UPGRADE_SUCCESS", 100, 2)
                    .await;
                {
                    let mut v = self.versions.lock().await;
                    for d in &devices {
                        let target = d["product_version"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        if d["sn"] == self.sn.as_str() {
                            v.0 = target
                        } else {
                            v.1 = target
                        }
                    }
                }
                self.report_state(&client).await;
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((sub, pct, step)) => {
                self.progress(&client, &bid, "failed", sub, pct, step).await;
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn run_job(
        &self,
        client: &AsyncClient,
        bid: &str,
        devices: &[Value],
    ) -> Result<(), (&'static str, u64, u8)> {
        for d in devices {
            let url = d["file_url"].as_str().unwrap_or_default();
            let size = d["file_size"].as_u64().unwrap_or(0);
            let md5 = d["md5"].as_str().unwrap_or_default();
            if self.fails(FailMode::Download) {
                return Err(("DOWNLOAD_FAILED", 0, 1));
            }
            let got = self
                .download(client, bid, url, size)
                .await
                .map_err(|_| ("DOWNLOAD_FAILED", 0, 1))?;
            self.progress(client, bid, "in_progress", "DOWNLOAD_SUCCESS", 100, 1)
                .await;
            self.progress(client, bid, "in_progress", "VERIFY", 100, 1)
                .await;
            if got.0 != size || got.1 != md5 || self.fails(FailMode::Verify) {
                return Err(("VERIFY_FAILED", 100, 1));
            }
            self.progress(client, bid, "in_progress", "VERIFY_SUCCESS", 100, 1)
                .await;
            if d["sn"] != self.sn.as_str() {
                self.progress(client, bid, "in_progress", "UPLOADING_DRONE", 0, 2)
                    .await;
            }
            self.progress(client, bid, "in_progress", "UPGRADING", 50, 2)
                .await;
            if self.fails(FailMode::Upgrade) {
                return Err(("UPGRADE_FAIL", 50, 2));
            }
        }
        Ok(())
    }

    /// Downloads by Range in 1 MiB steps, resuming after an interruption; returns size and MD5.
    async fn download(
        &self,
        client: &AsyncClient,
        bid: &str,
        url: &str,
        size: u64,
    ) -> anyhow::Result<(u64, String)> {
        use futures::StreamExt;
        let mut md5 = md5::Md5::new();
        let mut have = 0u64;
        let mut interrupted = false;
        let mut last_decile = 0;
        let started = std::time::Instant::now();
        // A lost connection (server restart, network) is resumed from where it stopped, as a
        // dock does: up to 20 tries, half a second apart.
        let mut failures = 0;
        while have < size {
            let resp = match self
                .http
                .get(url)
                .header("range", format!("bytes={have}-"))
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) if failures < 20 => {
                    failures += 1;
                    tracing::debug!(error = %e, "download request failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if !resp.status().is_success() {
                anyhow::bail!("download answered {}", resp.status());
            }
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) if failures < 20 => {
                        failures += 1;
                        tracing::debug!(error = %e, "download interrupted; resuming");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                md5.update(&chunk);
                have += chunk.len() as u64;
                self.stats
                    .bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if let Some(rate) = self.cfg.rate {
                    let due = Duration::from_secs_f64(have as f64 / rate.max(1) as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let decile = have * 10 / size.max(1);
                if decile > last_decile {
                    last_decile = decile;
                    self.progress(client, bid, "in_progress", "DOWNLOADING", decile * 10, 1)
                        .await;
                }
                if let Some(at) = self.cfg.interrupt_at
                    && !interrupted
                    && have as f64 >= at * size as f64
                    && have < size
                {
                    interrupted = true;
                    break; // drop the connection; the next request resumes with Range
                }
            }
        }
        Ok((have, hex::encode(md5.finalize())))
    }
}
