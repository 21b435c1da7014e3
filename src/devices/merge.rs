//! Combining two copies of one device record, field group by field group, each from the copy
//! that saw it last: replicas sharing a catalog each hear part of a device's messages, so a
//! write or a read merges instead of replacing (the catalog keeps what any replica learned
//! last, and each replica takes in what the others learned).

use chrono::{DateTime, Utc};

use super::DeviceRecord;

/// The fields an identity or topology change sets (topology report, operator declaration, a
/// message naming another gateway), stamped by `topology_at`.
fn topology(d: &DeviceRecord) -> impl PartialEq + '_ {
    (
        &d.gateway_sn,
        &d.child_sn,
        &d.model_key,
        &d.model,
        d.model_declared,
        &d.thing_version,
        &d.dialect,
    )
}

/// The fields a state message sets, stamped by `last_state_at`.
fn state(d: &DeviceRecord) -> impl PartialEq + '_ {
    (
        &d.firmware_version,
        d.compatible_status,
        d.firmware_upgrade_status,
        d.last_state_at,
    )
}

impl DeviceRecord {
    /// Stamps `topology_at` with `now` if the identity or topology fields differ from
    /// `before` (the record as it was before a change).
    pub fn stamp_topology(&mut self, before: &DeviceRecord, now: DateTime<Utc>) {
        if topology(self) != topology(before) {
            self.topology_at = Some(now);
        }
    }

    /// Takes from `other` each field group it saw after this copy did: the state fields (by
    /// `last_state_at`), the osd fields (by `last_osd_at`), the identity and topology fields
    /// (by `topology_at`); the latest `last_seen_at` and the earliest first sighting.
    /// Returns whether anything a reader acts on changed (more than the seen times).
    pub fn merge_from(&mut self, other: &DeviceRecord) -> bool {
        let mut significant = false;
        if other.last_state_at > self.last_state_at {
            significant |= state(self) != state(other);
            self.firmware_version = other.firmware_version.clone();
            self.compatible_status = other.compatible_status;
            self.firmware_upgrade_status = other.firmware_upgrade_status;
            self.last_state_at = other.last_state_at;
        }
        if other.last_osd_at > self.last_osd_at {
            significant |=
                self.mode_code != other.mode_code || self.osd_child_sn != other.osd_child_sn;
            self.mode_code = other.mode_code;
            self.osd_child_sn = other.osd_child_sn.clone();
            self.last_osd_at = other.last_osd_at;
        }
        if other.topology_at > self.topology_at {
            significant |= topology(self) != topology(other);
            self.gateway_sn = other.gateway_sn.clone();
            self.child_sn = other.child_sn.clone();
            self.model_key = other.model_key.clone();
            self.model = other.model.clone();
            self.model_declared = other.model_declared;
            self.thing_version = other.thing_version.clone();
            self.dialect = other.dialect.clone();
            self.topology_at = other.topology_at;
        }
        self.last_seen_at = self.last_seen_at.max(other.last_seen_at);
        if (other.first_seen_at, &other.order) < (self.first_seen_at, &self.order) {
            self.first_seen_at = other.first_seen_at;
            self.order = other.order.clone();
        }
        significant
    }

    /// What a writer stores over `stored`: this copy, with the groups `stored` saw later.
    /// Also whether that differs from `stored` in anything a reader acts on.
    pub fn merged_over(&self, stored: Option<&DeviceRecord>) -> (DeviceRecord, bool) {
        let mut next = self.clone();
        let Some(stored) = stored else {
            return (next, true);
        };
        next.merge_from(stored);
        let mut probe = stored.clone();
        let significant = probe.merge_from(&next);
        (next, significant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(1_800_000_000 + s, 0)
    }

    fn device() -> DeviceRecord {
        let mut d = super::super::new_device("DOCK", at(0).unwrap());
        d.last_seen_at = at(0);
        d
    }

    #[test]
    fn each_group_comes_from_the_copy_that_saw_it_last() {
        // Replica A heard a state message at 10 and osd at 20; B a topology at 15 and osd at 12.
        let mut a = device();
        a.firmware_version = Some("2.0".into());
        a.last_state_at = at(10);
        a.mode_code = Some(0);
        a.last_osd_at = at(20);
        a.last_seen_at = at(20);
        let mut b = device();
        b.firmware_version = Some("1.0".into());
        b.last_state_at = at(1);
        b.child_sn = Some("AC".into());
        b.topology_at = at(15);
        b.mode_code = Some(3);
        b.last_osd_at = at(12);
        b.last_seen_at = at(15);

        let (ab, _) = a.merged_over(Some(&b));
        let (ba, _) = b.merged_over(Some(&a));
        for m in [&ab, &ba] {
            assert_eq!(m.firmware_version.as_deref(), Some("2.0"));
            assert_eq!(m.mode_code, Some(0));
            assert_eq!(m.child_sn.as_deref(), Some("AC"));
            assert_eq!(m.last_seen_at, at(20));
        }
        assert_eq!(ab, ba, "merging commutes");
    }

    #[test]
    fn only_changes_a_reader_acts_on_are_significant() {
        let stored = device();
        let mut seen = stored.clone();
        seen.last_seen_at = at(30);
        assert!(!seen.merged_over(Some(&stored)).1, "last seen only");
        let mut state = stored.clone();
        state.firmware_version = Some("3.0".into());
        state.last_state_at = at(30);
        assert!(state.merged_over(Some(&stored)).1);
        let mut older = stored.clone();
        older.firmware_version = Some("0.1".into());
        older.last_state_at = at(30);
        let (kept, significant) = stored.merged_over(Some(&older));
        assert_eq!(
            kept.firmware_version.as_deref(),
            Some("0.1"),
            "the newer report wins"
        );
        assert!(!significant, "the stored copy has it already");
        assert!(stored.merged_over(None).1, "a new device");
    }

    #[test]
    fn a_topology_change_is_stamped() {
        let before = device();
        let mut d = before.clone();
        d.stamp_topology(&before, at(5).unwrap());
        assert_eq!(d.topology_at, None);
        d.child_sn = Some("AC".into());
        d.stamp_topology(&before, at(5).unwrap());
        assert_eq!(d.topology_at, at(5));
    }
}
