//! The storage conformance suite: what every catalog backend must do, as generic test
//! functions over a backend constructor, expanded into `#[test]`s per backend by
//! [`conformance_suite!`] (the quickwit metastore pattern). sled runs it in plain `cargo test`;
//! a new backend is one macro line.

use std::collections::HashSet;

use serde_json::json;

use super::*;
use crate::domain::{FirmwareId, ProductVersion};

/// A backend under test and whatever keeps it alive (a temp dir, a database).
pub(crate) type Backend = (Catalog, Box<dyn std::any::Any + Send>);

fn version(v: &str) -> ProductVersion {
    ProductVersion::parse(v).unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn page(limit: usize, cursor: Option<String>) -> PageRequest {
    PageRequest {
        limit: Some(limit),
        cursor,
    }
}

/// Create, read, update (status), tombstone: the tombstone keeps the record and frees its
/// model + version.
pub(crate) fn firmware_create_read_update(make: fn() -> Backend) {
    let (cat, _keep) = make();
    let a = FirmwareRecord::new_for_test("Dock", "1.2.3", "aa");
    assert!(matches!(
        cat.commit_firmware(&a, &version("1.2.3"), "u1").unwrap(),
        CommitOutcome::Created(_)
    ));
    let read = cat.firmware(&a.id).unwrap();
    assert_eq!((read.id, read.sha256), (a.id.clone(), "aa".to_string()));
    let disabled = cat
        .update_firmware(&a.id, |r| r.status = FirmwareStatus::Disabled)
        .unwrap();
    assert_eq!(disabled.status, FirmwareStatus::Disabled);
    assert_eq!(
        cat.firmware(&a.id).unwrap().status,
        FirmwareStatus::Disabled
    );
    cat.update_firmware(&a.id, |r| r.status = FirmwareStatus::Deleted)
        .unwrap();
    assert_eq!(cat.firmware(&a.id).unwrap().status, FirmwareStatus::Deleted);
    let again = FirmwareRecord::new_for_test("DOCK", "01.2.3", "bb");
    assert!(matches!(
        cat.commit_firmware(&again, &version("1.2.3"), "u2")
            .unwrap(),
        CommitOutcome::Created(_)
    ));
    assert!(matches!(
        cat.firmware(&FirmwareId::generate()),
        Err(CatalogError::NotFound)
    ));
}

/// A refused write changes nothing: a conflicting commit adds no record and leaves the
/// version with its owner; an update of an unknown record creates none.
pub(crate) fn refused_writes_change_nothing(make: fn() -> Backend) {
    let (cat, _keep) = make();
    let a = FirmwareRecord::new_for_test("Dock", "2.0", "aa");
    cat.commit_firmware(&a, &version("2.0"), "u1").unwrap();
    let b = FirmwareRecord::new_for_test("dock", "2.0.0", "bb");
    cat.put_pending_upload(&PendingUpload {
        v: SCHEMA_VERSION,
        id: "u2".into(),
        blob_key: "u2".into(),
        multipart_id: Some("mpu".into()),
        started_at: chrono::Utc::now(),
    })
    .unwrap();
    assert!(
        matches!(cat.commit_firmware(&b, &version("2.0.0"), "u2").unwrap(), CommitOutcome::Conflict(r) if r.id == a.id)
    );
    assert!(matches!(cat.firmware(&b.id), Err(CatalogError::NotFound)));
    assert_eq!(cat.all_firmware().count(), 1);
    // The pending row stays for the caller's cleanup (it holds the S3 upload id).
    let pending = cat.pending_uploads().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].multipart_id.as_deref(), Some("mpu"));
    let missing = FirmwareId::generate();
    assert!(matches!(
        cat.update_firmware(&missing, |r| r.status = FirmwareStatus::Disabled),
        Err(CatalogError::NotFound)
    ));
    assert!(matches!(
        cat.firmware(&missing),
        Err(CatalogError::NotFound)
    ));
}

/// Two writers racing for one model + version: exactly one wins, the others see its record.
pub(crate) fn concurrent_commits_have_one_winner(make: fn() -> Backend) {
    let (cat, _keep) = make();
    let winners: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let cat = cat.clone();
                s.spawn(move || {
                    let r = FirmwareRecord::new_for_test("Dock", "3.0", &format!("sha{i}"));
                    matches!(
                        cat.commit_firmware(&r, &version("3.0"), &format!("u{i}"))
                            .unwrap(),
                        CommitOutcome::Created(_)
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(winners.iter().filter(|w| **w).count(), 1, "{winners:?}");
    assert_eq!(cat.all_firmware().count(), 1);
}

/// Every list is newest first, pages follow their cursor, and a record inserted between two
/// pages shifts nothing; a foreign cursor is refused.
pub(crate) fn lists_are_newest_first_and_stable_under_inserts(make: fn() -> Backend) {
    let (cat, _keep) = make();
    let id = || crate::domain::ids::next();
    // One list per kind; each returns the ids of a page.
    type Lister = fn(&Catalog, PageRequest) -> (Vec<String>, Option<String>);
    type Kind = (&'static str, fn(&Catalog, &str), Lister);
    let kinds: [Kind; 5] = [
        (
            "firmware",
            |c, _| {
                let r = FirmwareRecord::new_for_test(
                    "m",
                    &format!("1.{}", c.all_firmware().count()),
                    "x",
                );
                let v = version(&r.product_version);
                c.commit_firmware(&r, &v, "u").unwrap();
            },
            |c, p| {
                let pg = c.list_firmware(&p, |_| true).unwrap();
                (
                    pg.items.iter().map(|r| r.id.to_string()).collect(),
                    pg.next_cursor,
                )
            },
        ),
        (
            "tasks",
            |c, k| c.put_task(k, &json!({"id": k})).unwrap(),
            |c, p| {
                let pg = c.list_tasks::<serde_json::Value>(&p, |_| true).unwrap();
                (ids_of(&pg.items), pg.next_cursor)
            },
        ),
        (
            "rollouts",
            |c, k| c.put_rollout(k, &json!({"id": k})).unwrap(),
            |c, p| {
                let pg = c.list_rollouts::<serde_json::Value>(&p, |_| true).unwrap();
                (ids_of(&pg.items), pg.next_cursor)
            },
        ),
        (
            "tokens",
            |c, k| c.put_token(k, &json!({"id": k})).unwrap(),
            |c, p| {
                let pg = c.list_tokens::<serde_json::Value>(&p).unwrap();
                (ids_of(&pg.items), pg.next_cursor)
            },
        ),
        (
            "audit",
            |c, k| c.put_audit(k, &json!({"id": k})).unwrap(),
            |c, p| {
                let pg = c.list_audit::<serde_json::Value>(&p, None).unwrap();
                (ids_of(&pg.items), pg.next_cursor)
            },
        ),
    ];
    for (kind, insert, list) in kinds {
        for _ in 0..5 {
            insert(&cat, &id());
        }
        let (all, none) = list(&cat, page(500, None));
        assert_eq!((all.len(), none), (5, None), "{kind}");
        let mut sorted = all.clone();
        sorted.sort();
        sorted.reverse();
        assert_eq!(all, sorted, "{kind}: newest first");
        let (p1, c1) = list(&cat, page(2, None));
        assert_eq!(p1, all[..2], "{kind}");
        insert(&cat, &id());
        let (p2, c2) = list(&cat, page(2, c1));
        assert_eq!(
            p2,
            all[2..4],
            "{kind}: an insert between pages shifts nothing"
        );
        let (p3, c3) = list(&cat, page(2, c2));
        assert_eq!((p3.as_slice(), c3), (&all[4..], None), "{kind}");
    }
    assert!(matches!(
        cat.list_tasks::<serde_json::Value>(&page(5, Some("!!".into())), |_| true),
        Err(CatalogError::InvalidCursor)
    ));
}

fn ids_of(items: &[serde_json::Value]) -> Vec<String> {
    items
        .iter()
        .map(|v| v["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Retention removes exactly what is older than its cut-off, for every kind that has one.
pub(crate) fn retention_prunes_only_the_old(make: fn() -> Backend) {
    let (cat, _keep) = make();
    let now = chrono::Utc::now();
    let day = chrono::Duration::days(1);
    cat.put_task("old", &json!({"finished_at": now - day * 200}))
        .unwrap();
    cat.put_task("recent", &json!({"finished_at": now - day}))
        .unwrap();
    cat.put_task("open", &json!({"finished_at": null})).unwrap();
    assert_eq!(cat.prune_tasks(now - day * 180).unwrap(), 1);
    assert_eq!(cat.all_tasks::<serde_json::Value>().unwrap().len(), 2);

    // Ids are monotonic: old < cut < new.
    let old_audit = crate::domain::ids::next();
    let cut = crate::domain::ids::next();
    let new_audit = crate::domain::ids::next();
    cat.put_audit(&old_audit, &json!({"id": old_audit}))
        .unwrap();
    cat.put_audit(&new_audit, &json!({"id": new_audit}))
        .unwrap();
    assert_eq!(cat.prune_audit(&cut).unwrap(), 1);
    let left = cat
        .list_audit::<serde_json::Value>(&page(10, None), None)
        .unwrap();
    assert_eq!(ids_of(&left.items), vec![new_audit]);

    cat.put_idempotent("fresh", "h", &json!({"n": 1})).unwrap();
    assert_eq!(cat.prune_idempotency().unwrap(), 0);
    let first = cat.idempotent("fresh").unwrap().unwrap();
    assert_eq!(
        (first.body_hash.as_str(), first.answer),
        ("h", json!({"n": 1}))
    );
    assert!(cat.idempotent("unknown").unwrap().is_none());
}

/// What is written is read back as written: devices, tokens, rollout members (in key order),
/// download sessions (batched), pending uploads.
pub(crate) fn every_kind_round_trips(make: fn() -> Backend) {
    let (cat, _keep) = make();
    cat.put_device("DOCK1", &json!({"sn": "DOCK1", "model": "Dock"}))
        .unwrap();
    cat.put_device("AC1", &json!({"sn": "AC1"})).unwrap();
    let devices: Vec<serde_json::Value> = cat.all_devices().unwrap();
    let sns: HashSet<&str> = devices.iter().filter_map(|d| d["sn"].as_str()).collect();
    assert_eq!(sns, HashSet::from(["DOCK1", "AC1"]));
    cat.delete_device("AC1").unwrap();
    assert_eq!(cat.all_devices::<serde_json::Value>().unwrap().len(), 1);

    cat.put_token("t1", &json!({"id": "t1", "name": "ci"}))
        .unwrap();
    let tokens: Vec<serde_json::Value> = cat.all_tokens().unwrap();
    assert_eq!(tokens, vec![json!({"id": "t1", "name": "ci"})]);

    let (m1, m2) = (json!({"gw": "A"}), json!({"gw": "B"}));
    cat.put_members("R1", &[("b".into(), &m2), ("a".into(), &m1)])
        .unwrap();
    cat.put_members("R2", &[("a".into(), &json!({"gw": "X"}))])
        .unwrap();
    let members: Vec<serde_json::Value> = cat.members("R1").unwrap();
    assert_eq!(members, vec![m1, m2]);

    let task = json!({"id": "T1", "status": "sent"});
    cat.put_task("T1", &task).unwrap();
    assert_eq!(cat.task::<serde_json::Value>("T1").unwrap(), Some(task));
    cat.delete_task("T1").unwrap();
    assert_eq!(cat.task::<serde_json::Value>("T1").unwrap(), None);
}

/// Export (every firmware record, oldest first) into a fresh backend and back: the same
/// records; importing twice adds nothing.
pub(crate) fn export_import_round_trips(make: fn() -> Backend) {
    let (from, _keep_from) = make();
    for (i, v) in ["1.0", "1.1", "2.0"].iter().enumerate() {
        let r = FirmwareRecord::new_for_test("Dock", v, &format!("sha{i}"));
        from.commit_firmware(&r, &version(v), "u").unwrap();
    }
    let gone = from.all_firmware().next().unwrap().unwrap();
    from.update_firmware(&gone.id, |r| r.status = FirmwareStatus::Deleted)
        .unwrap();
    let exported: Vec<FirmwareRecord> = from.all_firmware().map(Result::unwrap).collect();
    let (to, _keep_to) = make();
    for r in &exported {
        assert!(to.import_firmware(r).unwrap());
    }
    for r in &exported {
        assert!(!to.import_firmware(r).unwrap(), "imported twice");
    }
    let back: Vec<FirmwareRecord> = to.all_firmware().map(Result::unwrap).collect();
    let key = |r: &FirmwareRecord| (r.id.to_string(), r.sha256.clone(), r.status);
    assert_eq!(
        back.iter().map(key).collect::<Vec<_>>(),
        exported.iter().map(key).collect::<Vec<_>>()
    );
    // The tombstone's version is free in the copy too; the live ones are taken.
    let again = FirmwareRecord::new_for_test("Dock", &gone.product_version, "new");
    assert!(matches!(
        to.commit_firmware(&again, &version(&gone.product_version), "u")
            .unwrap(),
        CommitOutcome::Created(_)
    ));
}

/// Expands the suite into `#[test]`s for one backend: `conformance_suite!(name, constructor)`.
macro_rules! conformance_suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::conformance as c;
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn firmware_create_read_update() {
                c::firmware_create_read_update($make);
            }
            #[test]
            fn refused_writes_change_nothing() {
                c::refused_writes_change_nothing($make);
            }
            #[test]
            fn concurrent_commits_have_one_winner() {
                c::concurrent_commits_have_one_winner($make);
            }
            #[test]
            fn lists_are_newest_first_and_stable_under_inserts() {
                c::lists_are_newest_first_and_stable_under_inserts($make);
            }
            #[test]
            fn retention_prunes_only_the_old() {
                c::retention_prunes_only_the_old($make);
            }
            #[test]
            fn every_kind_round_trips() {
                c::every_kind_round_trips($make);
            }
            #[test]
            fn export_import_round_trips() {
                c::export_import_round_trips($make);
            }
        }
    };
}
pub(crate) use conformance_suite;
