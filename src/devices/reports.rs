//! What the registry learns from each kind of gateway message (topology, state, osd, any
//! other), and which of those changes are stored at once.

use super::*;

impl DeviceRegistry {
    /// Learns a gateway's topology: the gateway, its aircraft and the link between them.
    pub fn on_topology(&self, gateway_sn: &str, report: &TopologyReport, dialect: &str) {
        let now = Utc::now();
        let child = report.sub_devices.first().map(|s| s.sn.clone());
        let previous_child = self.with_device(gateway_sn, now, true, |d| {
            let before = d.clone();
            let previous = Self::learn_topology(d, report, dialect, child.clone());
            self.map_model(d);
            d.stamp_topology(&before, now);
            d.last_seen_at = Some(now);
            previous
        });
        for sub in &report.sub_devices {
            self.with_device(&sub.sn, now, true, |d| {
                let before = d.clone();
                d.gateway_sn = Some(gateway_sn.to_string());
                d.dialect = Some(dialect.to_string());
                if sub.model_key.is_some() {
                    d.model_key = sub.model_key.clone();
                }
                if sub.thing_version.is_some() {
                    d.thing_version = sub.thing_version.clone();
                }
                self.map_model(d);
                d.stamp_topology(&before, now);
                d.last_seen_at = Some(now);
            });
            // The aircraft moved: detach it from any other dock.
            let others: Vec<String> = lock(&self.inner.devices)
                .values()
                .filter(|d| d.sn != gateway_sn && d.child_sn.as_deref() == Some(&sub.sn))
                .map(|d| d.sn.clone())
                .collect();
            for other in others {
                self.with_device(&other, now, true, |d| {
                    d.child_sn = None;
                    d.topology_at = Some(now);
                });
            }
        }
        if previous_child != child && child.is_some() {
            tracing::info!(gateway_sn, child_sn = ?child, "topology changed");
        }
    }

    /// A gateway's own fields from its topology report; returns its previous aircraft.
    fn learn_topology(
        d: &mut DeviceRecord,
        report: &TopologyReport,
        dialect: &str,
        child: Option<String>,
    ) -> Option<String> {
        d.dialect = Some(dialect.to_string());
        d.gateway_sn = None;
        if report.model_key.is_some() {
            d.model_key = report.model_key.clone();
        }
        if report.thing_version.is_some() {
            d.thing_version = report.thing_version.clone();
        }
        let previous = d.child_sn.clone();
        // An empty list means the aircraft went offline: the link stays.
        if child.is_some() {
            d.child_sn = child;
        }
        previous
    }

    /// Learns versions and upgrade flags from a state message on `sn`'s topic.
    pub fn on_state(&self, sn: &str, gateway: Option<&str>, report: &StateReport) {
        let now = Utc::now();
        self.with_device(sn, now, true, |d| {
            d.last_seen_at = Some(now);
            d.last_state_at = Some(now);
            if let Some(g) = gateway.filter(|g| *g != sn)
                && d.gateway_sn.as_deref() != Some(g)
            {
                d.gateway_sn = Some(g.to_string());
                d.topology_at = Some(now);
            }
            if report.firmware_version.is_some() {
                d.firmware_version = report.firmware_version.clone();
            }
            if report.compatible_status.is_some() {
                d.compatible_status = report.compatible_status;
            }
            if report.firmware_upgrade_status.is_some() {
                d.firmware_upgrade_status = report.firmware_upgrade_status;
            }
        });
    }

    /// Notes an osd message (last-seen, mode code and the dock's `sub_device`; written by the
    /// flusher).
    pub fn on_osd(&self, sn: &str, gateway: Option<&str>, report: &OsdReport) {
        let now = Utc::now();
        let changed = self.heard(sn, now, |d| {
            d.last_seen_at = Some(now);
            d.last_osd_at = Some(now);
            let mut changed = false;
            if let Some(g) = gateway.filter(|g| *g != sn)
                && d.gateway_sn.as_deref() != Some(g)
            {
                d.gateway_sn = Some(g.to_string());
                d.topology_at = Some(now);
                changed = true;
            }
            if report.mode_code.is_some() && d.mode_code != report.mode_code {
                d.mode_code = report.mode_code;
                changed = true;
            }
            if report.sub_device_sn.is_some() && d.osd_child_sn != report.sub_device_sn {
                d.osd_child_sn = report.sub_device_sn.clone();
                changed = true;
            }
            changed
        });
        if changed {
            // A mode or link change is stored at once (replicas act on it), not with the
            // periodic last-seen batch.
            self.changed(sn);
            self.inner.kick.notify_one();
        }
    }

    /// Notes any other message from a device (events, replies).
    pub fn on_seen(&self, sn: &str) {
        let now = Utc::now();
        self.heard(sn, now, |d| d.last_seen_at = Some(now));
    }
}
