//! The sled catalog: commits, paging, retention, recovery after a failed write.

use super::*;

fn record(model: &str, version: &str, sha: &str) -> FirmwareRecord {
    FirmwareRecord::new_for_test(model, version, sha)
}

#[tokio::test]
async fn an_unwritable_catalog_refuses_until_recover_reopens_it() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(dir.path(), 8).unwrap();
    cat.put_task("kept", &serde_json::json!({"n": 1})).unwrap();
    cat.flush().await.unwrap();
    assert!(cat.check().is_ok() && cat.fault().is_none());

    // As a failed flush does (ENOSPC): every later flush and readiness check fails.
    let full = CatalogError::Storage(sled::Error::Io(std::io::Error::from_raw_os_error(
        libc::ENOSPC,
    )));
    assert!(full.is_no_space());
    cat.mark_unwritable(&full);
    assert_eq!(cat.fault(), Some(CatalogFault::NoSpace));
    assert!(matches!(
        cat.flush().await,
        Err(CatalogError::Unwritable(CatalogFault::NoSpace))
    ));
    assert!(cat.check().is_err());

    // Recovery drops sled (releasing its file lock, even with a clone of the handle
    // alive), reopens it and proves a write reaches the disk.
    let other = cat.clone();
    cat.recover().await.unwrap();
    assert!(other.fault().is_none() && other.check().is_ok());
    let kept: Option<serde_json::Value> = other.task("kept").unwrap();
    assert_eq!(kept, Some(serde_json::json!({"n": 1})));
    other
        .put_task("after", &serde_json::json!({"n": 2}))
        .unwrap();
    other.flush().await.unwrap();
    assert!(cat.task::<serde_json::Value>("after").unwrap().is_some());
}

#[test]
fn idempotency_answers_expire_after_a_day() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(dir.path(), 8).unwrap();
    cat.put_idempotent("fresh", "h", &serde_json::json!({}))
        .unwrap();
    let old = serde_json::json!({"hash": "h", "status": 201, "answer": {},
        "at": chrono::Utc::now().timestamp() - 90_000});
    cat.trees()
        .unwrap()
        .idempotency
        .insert("old", encode(&old))
        .unwrap();
    assert_eq!(cat.prune_idempotency().unwrap(), 1);
    assert!(cat.idempotent("fresh").unwrap().is_some());
    assert!(
        cat.trees()
            .unwrap()
            .idempotency
            .get("old")
            .unwrap()
            .is_none()
    );
}

#[test]
fn commit_detects_duplicates_and_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(dir.path(), 8).unwrap();
    let a = record("Dock", "1.2", "aa");
    let v = ProductVersion::parse("1.2").unwrap();
    assert!(matches!(
        cat.commit_firmware(&a, &v, "u1").unwrap(),
        CommitOutcome::Created(_)
    ));
    let same = record("dock", "1.2.0", "aa");
    let v2 = ProductVersion::parse("1.2.0").unwrap();
    assert!(
        matches!(cat.commit_firmware(&same, &v2, "u2").unwrap(), CommitOutcome::Duplicate(r) if r.id == a.id)
    );
    let other = record("DOCK", "01.02", "bb");
    assert!(matches!(
        cat.commit_firmware(&other, &v, "u3").unwrap(),
        CommitOutcome::Conflict(_)
    ));
    cat.update_firmware(&a.id, |r| r.status = FirmwareStatus::Deleted)
        .unwrap();
    assert!(matches!(
        cat.commit_firmware(&other, &v, "u4").unwrap(),
        CommitOutcome::Created(_)
    ));
}
