//! The sled catalog itself: recovery after a failed write, stored formats it must keep reading.

use super::*;
use crate::ota::store::{Claimed, TaskStore};
use crate::store::{IdempotencyStore, IdempotentAnswer};

#[tokio::test]
async fn an_unwritable_catalog_refuses_until_recover_reopens_it() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(dir.path(), 8).unwrap();
    let kept = conformance::task("kept", "G1", &[]);
    assert_eq!(cat.insert_task(&kept).await.unwrap(), Claimed::Inserted);
    cat.flush().await.unwrap();
    assert!(cat.check().is_ok() && cat.fault().is_none());

    // As a failed flush does (ENOSPC): every later flush and readiness check fails.
    let full = CatalogError::from(sled::Error::Io(std::io::Error::from_raw_os_error(
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
    assert!(other.task("kept").await.unwrap().is_some());
    let after = conformance::task("after", "G2", &[]);
    assert_eq!(other.insert_task(&after).await.unwrap(), Claimed::Inserted);
    other.flush().await.unwrap();
    assert!(cat.task("after").await.unwrap().is_some());
}

/// Answers stored by earlier releases (with a `status` field, seconds since the epoch) are
/// still read, and expire after a day.
#[tokio::test]
async fn stored_idempotency_answers_expire_after_a_day() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(dir.path(), 8).unwrap();
    let now = chrono::Utc::now();
    let fresh = IdempotentAnswer {
        body_hash: "h".into(),
        answer: serde_json::json!({}),
        at: now,
    };
    cat.record_idempotent("fresh", &fresh).await.unwrap();
    let old = serde_json::json!({"hash": "h", "status": 201, "answer": {},
        "at": now.timestamp() - 90_000});
    cat.trees()
        .unwrap()
        .idempotency
        .insert("old", encode(&old))
        .unwrap();
    assert!(cat.idempotent("old", now).await.unwrap().is_none());
    assert_eq!(cat.prune_idempotency(now).await.unwrap(), 1);
    assert!(cat.idempotent("fresh", now).await.unwrap().is_some());
    assert!(
        cat.trees()
            .unwrap()
            .idempotency
            .get("old")
            .unwrap()
            .is_none()
    );
}
