//! Creating a task: resolve each device's firmware, decide the upgrade type by policy, run the
//! preflight checks, store the task (flushed) and publish its `ota_create`.

use super::*;
use crate::store::IdempotentAnswer;
use store::Claimed;

impl OtaService {
    /// The firmware a request entry names (by id, or model + version), if usable.
    pub async fn resolve_firmware(&self, d: &RequestDevice) -> Result<FirmwareRecord, OtaError> {
        let fw = match (&d.firmware_id, &d.model, &d.product_version) {
            (Some(id), _, _) => {
                let id = FirmwareId::parse(id)
                    .ok_or_else(|| OtaError::NotFound(format!("firmware {id} not found")))?;
                let found = self.inner.stores.firmware.firmware(&id).await;
                found.map_err(|e| match e {
                    CatalogError::NotFound => {
                        OtaError::NotFound(format!("firmware {id} not found"))
                    }
                    other => other.into(),
                })?
            }
            (None, Some(model), Some(version)) => {
                let v =
                    ProductVersion::parse(version).map_err(|e| OtaError::Invalid(e.to_string()))?;
                let query = FirmwareQuery {
                    model: Some(model.clone()),
                    version: Some(v),
                    status: None,
                    live_only: true,
                };
                let one = PageRequest {
                    limit: Some(1),
                    cursor: None,
                };
                let page = self
                    .inner
                    .stores
                    .firmware
                    .list_firmware(&query, &one)
                    .await?;
                page.items
                    .into_iter()
                    .next()
                    .ok_or_else(|| OtaError::NotFound(format!("no firmware {model} {version}")))?
            }
            _ => {
                return Err(OtaError::Invalid(format!(
                    "device {}: give firmware_id, or model and product_version",
                    d.sn
                )));
            }
        };
        match fw.status {
            FirmwareStatus::Deleted => Err(OtaError::FirmwareDeleted(fw.id.to_string())),
            FirmwareStatus::Corrupt => Err(OtaError::FirmwareCorrupt(fw.id.to_string())),
            FirmwareStatus::Disabled => Err(OtaError::Validation(format!(
                "firmware {} is disabled",
                fw.id
            ))),
            FirmwareStatus::Ready => Ok(fw),
        }
    }

    fn preflight(&self, req: &OtaRequest) -> Result<Vec<String>, OtaError> {
        let skip = &self.inner.settings.preflight_skip;
        match self.preflight_checks(req) {
            Err(OtaError::Preflight { check, reason }) if skip.iter().any(|s| s == check) => {
                Ok(vec![format!(
                    "preflight check {check} skipped by configuration: {reason}"
                )])
            }
            other => other,
        }
    }

    fn preflight_checks(&self, req: &OtaRequest) -> Result<Vec<String>, OtaError> {
        let mode = self.inner.settings.preflight.as_str();
        let mut warnings = Vec::new();
        if mode == "off" {
            return Ok(warnings);
        }
        let gw = self.inner.devices.get(&req.gateway_sn).ok();
        match &gw {
            None if mode == "strict" => {
                return Err(OtaError::Preflight {
                    check: "gateway_online",
                    reason: format!("gateway {} was never seen", req.gateway_sn),
                });
            }
            None => warnings.push(format!(
                "gateway {} was never seen; sent without preflight",
                req.gateway_sn
            )),
            Some(g) => {
                if g.last_osd_at.is_none() && g.last_seen_at.is_none() {
                    if mode == "strict" {
                        return Err(OtaError::Preflight {
                            check: "gateway_online",
                            reason: "the gateway never sent osd".into(),
                        });
                    }
                    warnings.push("the gateway never sent osd".into());
                } else if !g.online {
                    return Err(OtaError::Preflight {
                        check: "gateway_online",
                        reason: format!("gateway {} is offline", g.sn),
                    });
                }
                if g.mode_code == Some(3) || g.firmware_upgrade_status == Some(1) {
                    return Err(OtaError::Preflight {
                        check: "not_upgrading",
                        reason: "the gateway reports an upgrade in progress".into(),
                    });
                }
            }
        }
        for d in req.devices.iter().filter(|d| d.sn != req.gateway_sn) {
            let child = gw.as_ref().and_then(|g| g.child_sn.clone());
            let dev = self.inner.devices.get(&d.sn).ok();
            let linked = child.as_deref() == Some(d.sn.as_str())
                || dev
                    .as_ref()
                    .is_some_and(|x| x.gateway_sn.as_deref() == Some(req.gateway_sn.as_str()));
            if !linked {
                return Err(OtaError::Preflight {
                    check: "aircraft_attached",
                    reason: format!("{} is not the current aircraft of {}", d.sn, req.gateway_sn),
                });
            }
            // The dock's own osd names its paired aircraft even when that one is off: a
            // different serial there means the topology fwrepo holds is stale.
            if let Some(osd_child) = gw.as_ref().and_then(|g| g.osd_child_sn.as_deref())
                && osd_child != d.sn
            {
                return Err(OtaError::Preflight {
                    check: "aircraft_attached",
                    reason: format!(
                        "the osd of {} reports aircraft {osd_child}, not {}",
                        req.gateway_sn, d.sn
                    ),
                });
            }
            if let Some(x) = dev
                && (x.mode_code == Some(13) || x.firmware_upgrade_status == Some(1))
            {
                return Err(OtaError::Preflight {
                    check: "not_upgrading",
                    reason: format!("{} reports an upgrade in progress", d.sn),
                });
            }
        }
        Ok(warnings)
    }

    /// Handles `POST /api/v1/ota`.
    pub async fn create(
        &self,
        req: OtaRequest,
        idempotency_key: Option<String>,
    ) -> Result<Created, OtaError> {
        let body_hash = hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(&req).unwrap_or_default(),
        ));
        if let Some(key) = &idempotency_key {
            let now = self.inner.clock.now();
            if let Some(first) = self.inner.stores.idempotency.idempotent(key, now).await? {
                if first.body_hash != body_hash {
                    return Err(OtaError::IdempotencyReused);
                }
                return Ok(Created::Replay(first.answer));
            }
        }
        if req.gateway_sn.is_empty() || req.gateway_sn.contains(['/', '+', '#']) {
            return Err(OtaError::Invalid("invalid gateway_sn".into()));
        }
        if req.devices.is_empty() || req.devices.len() > 2 {
            return Err(OtaError::Validation("a task takes 1 or 2 devices".into()));
        }
        if req.devices.len() == 2 && req.devices[0].sn == req.devices[1].sn {
            return Err(OtaError::Validation("the devices must differ".into()));
        }
        if req
            .devices
            .iter()
            .filter(|d| d.sn != req.gateway_sn)
            .count()
            > 1
        {
            return Err(OtaError::Validation(
                "the devices are the gateway and its current aircraft".into(),
            ));
        }
        // Devices of another gateway.
        for d in req.devices.iter().filter(|d| d.sn != req.gateway_sn) {
            if let Ok(dev) = self.inner.devices.get(&d.sn)
                && let Some(g) = dev.gateway_sn.as_deref().filter(|g| *g != req.gateway_sn)
            {
                return Err(OtaError::Validation(format!(
                    "{} belongs to gateway {g}",
                    d.sn
                )));
            }
        }
        let id = crate::domain::ids::next();
        // Checked and claimed under one lock: of two concurrent requests for one gateway,
        // exactly one gets it. The claim is released on every way out but a registered task.
        let mut claim = {
            let mut open = lock(&self.inner.open);
            if let Some(t) = open.by_gateway.get(&req.gateway_sn) {
                return Err(OtaError::GatewayBusy(t.clone()));
            }
            for d in &req.devices {
                if let Some(t) = open.by_device.get(&d.sn) {
                    return Err(OtaError::DeviceBusy(t.clone()));
                }
            }
            Claim::take(&mut open, &self.inner.open, &id, &req, !req.dry_run)
        };
        let mut devices = Vec::new();
        for d in &req.devices {
            let fw = self.resolve_firmware(d).await?;
            let target = ProductVersion::parse(&fw.product_version)
                .map_err(|e| OtaError::Invalid(e.to_string()))?;
            let facts = self
                .inner
                .devices
                .get(&d.sn)
                .map(|x| DeviceFacts {
                    model: x.model,
                    running: x.firmware_version,
                    compatible_status: x.compatible_status,
                })
                .unwrap_or_default();
            let decision = policy::decide(
                &fw.model,
                &target,
                &facts,
                &policy::Request {
                    upgrade_type: req.firmware_upgrade_type,
                    force: req.force,
                    allow_downgrade: req.allow_downgrade,
                    default_type: None,
                },
            );
            let segment = FileName::parse(&fw.file_name)
                .map(|n| n.url_segment())
                .unwrap_or_else(|_| fw.file_name.clone());
            let (upgrade_type, rule, reason, outcome) = match decision {
                Decision::Send {
                    upgrade_type,
                    rule,
                    reason,
                } => (Some(upgrade_type), rule, reason, Outcome::Pending),
                Decision::Skip { reason } => (None, 5, reason, Outcome::SkippedUpToDate),
                Decision::Refuse { code, reason } => {
                    let reason = format!("{}: {reason}", d.sn);
                    return Err(match code {
                        "model_mismatch" => OtaError::ModelMismatch(reason),
                        "downgrade_refused" => OtaError::DowngradeRefused(reason),
                        _ => OtaError::Validation(reason),
                    });
                }
            };
            devices.push(TaskDevice {
                sn: d.sn.clone(),
                firmware_id: fw.id.to_string(),
                product_version: fw.product_version.clone(),
                upgrade_type,
                policy_rule: rule,
                policy_reason: reason,
                // Signed for this task, device and firmware (see download::signing).
                file_url: crate::download::signing::signed_url(
                    &self.inner.public_url,
                    &id,
                    &d.sn,
                    &self
                        .inner
                        .signer
                        .sign(&id, &d.sn, fw.id.as_str(), self.inner.clock.now()),
                    &segment,
                ),
                file_name: fw.file_name.clone(),
                md5: fw.md5.clone(),
                file_size: fw.file_size,
                download_session: None,
                outcome,
                outcome_at: None,
            });
        }
        if devices
            .iter()
            .all(|d| d.outcome == Outcome::SkippedUpToDate)
        {
            return Err(OtaError::AlreadyUpToDate);
        }
        let warnings = self.preflight(&req)?;
        let now = self.inner.clock.now();
        let mut task = OtaTask {
            id: id.clone(),
            gateway_sn: req.gateway_sn.clone(),
            tid: uuid_like(self.inner.settings.route_tag.as_deref()),
            bid: uuid_like(self.inner.settings.route_tag.as_deref()),
            status: TaskStatus::Pending,
            created_at: now,
            updated_at: now,
            devices,
            progress: Progress::default(),
            result_code: None,
            result_reason: None,
            retryable: None,
            history: Vec::new(),
            replied_at: None,
            last_event_at: Some(now),
            finished_at: None,
            revision: 0,
        };
        let (topic, message) = self.inner.publisher.render(&OtaCreate::for_task(&task));
        if req.dry_run {
            return Ok(Created::DryRun(json!({
                "dry_run": true,
                "task": task,
                "ota_create": message,
                "topic": topic,
                "warnings": warnings,
            })));
        }
        if !self.inner.publisher.connected() {
            return Err(OtaError::BrokerUnavailable);
        }
        task.note("api", None, now);
        let payload = serde_json::to_vec(&message).unwrap_or_default();
        let raw = String::from_utf8(payload.clone())
            .ok()
            .and_then(|text| serde_json::value::RawValue::from_string(text).ok());
        // Stored as published in the one write that claims the gateway, and open (findable by
        // tid and bid) before the message leaves: a gateway may answer faster than this
        // function returns, and its services_reply must not be an orphan. Should the message
        // never leave (a crash now), the reply timeout ends the task.
        machine::apply(
            &mut task,
            machine::TaskEvent::Published(raw),
            self.inner.clock.now(),
        );
        // The store's claim is the one that holds across processes sharing a catalog.
        match self.inner.stores.tasks.insert_task(&task).await? {
            Claimed::Inserted => {}
            Claimed::Busy { sn, task_id } if sn == task.gateway_sn => {
                return Err(OtaError::GatewayBusy(task_id));
            }
            Claimed::Busy { task_id, .. } => return Err(OtaError::DeviceBusy(task_id)),
        }
        self.inner.stores.durability.flush().await?;
        self.remember(&task);
        claim.keep();
        if !self.inner.publisher.publish(topic, payload) {
            lock(&self.inner.open).forget(&task);
            self.inner.stores.tasks.delete_task(&task.id).await?;
            return Err(OtaError::BrokerUnavailable);
        }
        self.inner
            .counters
            .created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for w in &warnings {
            tracing::warn!(task_id = %task.id, gateway_sn = %task.gateway_sn, "{w}");
        }
        tracing::info!(task_id = %task.id, gateway_sn = %task.gateway_sn, tid = %task.tid, bid = %task.bid, "ota_create published");
        if let Some(key) = idempotency_key {
            let answer = IdempotentAnswer {
                body_hash,
                answer: serde_json::to_value(&task).unwrap_or_default(),
                at: self.inner.clock.now(),
            };
            self.inner
                .stores
                .idempotency
                .record_idempotent(&key, &answer)
                .await?;
        }
        Ok(Created::Task(Box::new(task)))
    }
}

/// A gateway and its devices reserved for a task being created. Dropped without
/// [`Claim::keep`] (an error, a dry run, a dropped request), it frees them again.
struct Claim<'a> {
    open: &'a Mutex<Open>,
    id: String,
    gateway: Option<String>,
    devices: Vec<String>,
}

impl<'a> Claim<'a> {
    /// Reserves `req`'s gateway and devices for task `id` (nothing when `!reserve`); `open` is
    /// the locked content of `lock`.
    fn take(
        open: &mut Open,
        lock: &'a Mutex<Open>,
        id: &str,
        req: &OtaRequest,
        reserve: bool,
    ) -> Claim<'a> {
        let mut claim = Claim {
            open: lock,
            id: id.to_string(),
            gateway: None,
            devices: Vec::new(),
        };
        if reserve {
            open.by_gateway
                .insert(req.gateway_sn.clone(), id.to_string());
            claim.gateway = Some(req.gateway_sn.clone());
            for d in &req.devices {
                open.by_device.insert(d.sn.clone(), id.to_string());
                claim.devices.push(d.sn.clone());
            }
        }
        claim
    }

    /// The task is registered: its own entries replace the claim.
    fn keep(&mut self) {
        self.gateway = None;
        self.devices.clear();
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.gateway.is_none() && self.devices.is_empty() {
            return;
        }
        let mut open = lock(self.open);
        if let Some(g) = &self.gateway
            && open.by_gateway.get(g) == Some(&self.id)
        {
            open.by_gateway.remove(g);
        }
        for d in &self.devices {
            if open.by_device.get(d) == Some(&self.id) {
                open.by_device.remove(d);
            }
        }
    }
}
