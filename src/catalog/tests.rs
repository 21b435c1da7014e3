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

/// Every record kind survives sled → PostgreSQL → sled: the two sled exports are the same
/// lines (when FWREPO_TEST_POSTGRES_URL names a server; sled → sled otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_moves_between_backends_and_back() {
    use crate::catalog::transfer;
    use crate::store::{DownloadSessionRecord, FirmwareRecord};
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a: Arc<dyn Store> = Arc::new(Catalog::open(a_dir.path(), 8).unwrap());
    let now = chrono::Utc::now();
    let fw = FirmwareRecord::new_for_test("Dock", "1.0", "aa");
    a.commit_firmware(&fw, "u").await.unwrap();
    let mut done = conformance::task("T-done", "G1", &["G1"]);
    done.status = crate::ota::TaskStatus::Ok;
    done.finished_at = Some(now);
    done.note("api", None, now);
    a.insert_task(&done).await.unwrap();
    done.revision = 1;
    a.save_task(&done).await.unwrap();
    a.insert_task(&conformance::task("T-open", "G2", &["G2", "A2"]))
        .await
        .unwrap();
    let session = DownloadSessionRecord::new_for_test(&crate::domain::ids::next(), &[(0, 40)], now);
    a.merge_sessions(&[session]).await.unwrap();
    let dump = |store: Arc<dyn Store>| async move {
        let mut lines = Vec::new();
        transfer::export(store.as_ref(), |e| {
            lines.push(serde_json::to_string(&e).unwrap());
            Ok(())
        })
        .await
        .unwrap();
        lines
    };
    let pg = postgres::testing::TestDatabase::create().await;
    let middle: Arc<dyn Store> = match &pg {
        Some(db) => Arc::new(db.catalog().await),
        None => Arc::new(Catalog::open(&b_dir.path().join("m"), 8).unwrap()),
    };
    transfer::copy(a.as_ref(), middle.as_ref()).await.unwrap();
    let back: Arc<dyn Store> = Arc::new(Catalog::open(&b_dir.path().join("b"), 8).unwrap());
    transfer::copy(middle.as_ref(), back.as_ref())
        .await
        .unwrap();
    let (before, after) = (dump(a).await, dump(back.clone()).await);
    assert_eq!(before.len(), 4, "{before:#?}");
    // PostgreSQL keeps microseconds: compare times at that precision.
    fn micros(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => {
                if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
                    *s = t.timestamp_micros().to_string();
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(micros),
            serde_json::Value::Object(map) => map.values_mut().for_each(micros),
            _ => {}
        }
    }
    let normal = |lines: Vec<String>| -> Vec<serde_json::Value> {
        lines
            .iter()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                micros(&mut v);
                v
            })
            .collect()
    };
    assert_eq!(normal(after), normal(before));
    // The open task still holds its serials in the copy.
    let busy = back
        .insert_task(&conformance::task("T-new", "G3", &["A2"]))
        .await
        .unwrap();
    assert_eq!(
        busy,
        Claimed::Busy {
            sn: "A2".into(),
            task_id: "T-open".into()
        }
    );
    let _ = back.firmware(&fw.id).await.unwrap();
}

/// Task records written before the history moved out of the record keep it inline: they
/// read back whole, and the next save moves it into `ota_task_history`.
#[tokio::test]
async fn a_task_with_its_history_inline_reads_back_and_moves_out_on_save() {
    use crate::ota::{OtaTask, TaskStatus};
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open(dir.path(), 8).unwrap();
    let history = |t: &OtaTask| serde_json::to_value(&t.history).unwrap();
    let mut t = conformance::task("OLD", "G1", &["G1"]);
    t.note("api", None, chrono::Utc::now());
    t.status = TaskStatus::InProgress;
    t.note("services_reply", None, chrono::Utc::now());
    let trees = cat.trees().unwrap();
    trees.tasks.insert("OLD", encode(&t)).unwrap();
    assert_eq!(
        history(&cat.task("OLD").await.unwrap().unwrap()),
        history(&t)
    );

    t.progress.percent = Some(50);
    t.note("ota_progress", None, chrono::Utc::now());
    t.revision += 1;
    assert!(cat.save_task(&t).await.unwrap());
    let head: OtaTask = decode(b"OLD", &trees.tasks.get("OLD").unwrap().unwrap()).unwrap();
    assert!(head.history.is_empty());
    assert_eq!(trees.task_history.scan_prefix("OLD/").count(), 3);
    assert_eq!(
        history(&cat.task("OLD").await.unwrap().unwrap()),
        history(&t)
    );
}
