//! The storage conformance suite: what every catalog backend must do, as generic async test
//! functions over a backend constructor, expanded into `#[tokio::test]`s per backend by
//! [`conformance_suite!`] (the quickwit metastore pattern). It speaks only the storage ports
//! ([`Store`]), never a backend's own API. sled runs it in plain `cargo test`; a new backend
//! is one macro line.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use futures::future::BoxFuture;
use serde_json::json;

mod fixtures;
mod replicas;
mod transfer;

pub(crate) use fixtures::task;
use fixtures::*;
pub(crate) use replicas::*;
pub(crate) use transfer::*;

use super::Store;
use crate::domain::FirmwareId;
use crate::ota::store::{Claimed, TaskKey, TaskQuery};
use crate::ota::{OtaTask, TaskStatus};
use crate::store::{
    CatalogError, CommitOutcome, FirmwareQuery, FirmwareRecord, FirmwareStatus, IdempotentAnswer,
    PageRequest, SessionQuery, SessionState,
};

/// A backend under test and whatever keeps it alive (a temp dir, a database).
pub(crate) type Backend = (Arc<dyn Store>, Box<dyn std::any::Any + Send>);
/// Makes a fresh, empty backend; `None` when the backend's service is not configured (the
/// constructor prints a SKIP line).
pub(crate) type Make = fn() -> BoxFuture<'static, Option<Backend>>;

fn page(limit: usize, cursor: Option<String>) -> PageRequest {
    PageRequest {
        limit: Some(limit),
        cursor,
    }
}

/// Create, read, update (status), tombstone: the tombstone keeps the record and frees its
/// model + version.
pub(crate) async fn firmware_create_read_update(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let a = FirmwareRecord::new_for_test("Dock", "1.2.3", "aa");
    let created = cat.commit_firmware(&a, "u1").await.unwrap();
    assert!(matches!(created, CommitOutcome::Created(_)));
    let read = cat.firmware(&a.id).await.unwrap();
    assert_eq!((read.id, read.sha256), (a.id.clone(), "aa".to_string()));
    let disable = |r: &mut FirmwareRecord| r.status = FirmwareStatus::Disabled;
    let disabled = cat.update_firmware(&a.id, &disable).await.unwrap();
    assert_eq!(disabled.status, FirmwareStatus::Disabled);
    let read = cat.firmware(&a.id).await.unwrap();
    assert_eq!(read.status, FirmwareStatus::Disabled);
    let delete = |r: &mut FirmwareRecord| r.status = FirmwareStatus::Deleted;
    cat.update_firmware(&a.id, &delete).await.unwrap();
    let read = cat.firmware(&a.id).await.unwrap();
    assert_eq!(read.status, FirmwareStatus::Deleted);
    // Model case and version spelling do not matter: the tombstone freed 1.2.3.
    let again = FirmwareRecord::new_for_test("DOCK", "01.2.3", "bb");
    let created = cat.commit_firmware(&again, "u2").await.unwrap();
    assert!(matches!(created, CommitOutcome::Created(_)));
    let same = FirmwareRecord::new_for_test("dock", "1.2.3.0", "bb");
    let dup = cat.commit_firmware(&same, "u3").await.unwrap();
    assert!(matches!(dup, CommitOutcome::Duplicate(r) if r.id == again.id));
    let missing = cat.firmware(&FirmwareId::generate()).await;
    assert!(matches!(missing, Err(CatalogError::NotFound)));
    // Queries: live records of one model and version.
    let query = FirmwareQuery {
        model: Some("dock".into()),
        version: Some(crate::domain::ProductVersion::parse("1.2.3").unwrap()),
        status: None,
        live_only: true,
    };
    let found = cat.list_firmware(&query, &page(10, None)).await.unwrap();
    let ids: Vec<_> = found.items.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, vec![again.id.clone()]);
}

/// A refused write changes nothing: a conflicting commit adds no record, leaves the version
/// with its owner and keeps the pending row; an update of an unknown record creates none.
pub(crate) async fn refused_writes_change_nothing(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let a = FirmwareRecord::new_for_test("Dock", "2.0", "aa");
    cat.put_pending_upload(&pending("u1")).await.unwrap();
    cat.commit_firmware(&a, "u1").await.unwrap();
    assert!(cat.pending_uploads().await.unwrap().is_empty(), "committed");
    let b = FirmwareRecord::new_for_test("dock", "2.0.0", "bb");
    cat.put_pending_upload(&pending("u2")).await.unwrap();
    let outcome = cat.commit_firmware(&b, "u2").await.unwrap();
    assert!(matches!(outcome, CommitOutcome::Conflict(r) if r.id == a.id));
    let read = cat.firmware(&b.id).await;
    assert!(matches!(read, Err(CatalogError::NotFound)));
    let all: Vec<_> = cat.all_firmware().try_collect().await.unwrap();
    assert_eq!(all.len(), 1);
    // The pending row stays for the caller's cleanup (it holds the S3 upload id).
    let rows = cat.pending_uploads().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].multipart_id.as_deref(), Some("mpu"));
    cat.remove_pending_upload("u2").await.unwrap();
    assert!(cat.pending_uploads().await.unwrap().is_empty());
    let missing = FirmwareId::generate();
    let disable = |r: &mut FirmwareRecord| r.status = FirmwareStatus::Disabled;
    let updated = cat.update_firmware(&missing, &disable).await;
    assert!(matches!(updated, Err(CatalogError::NotFound)));
    let read = cat.firmware(&missing).await;
    assert!(matches!(read, Err(CatalogError::NotFound)));
}

/// Writers racing for one model + version: exactly one wins, the others see its record.
pub(crate) async fn concurrent_commits_have_one_winner(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let racers = (0..8).map(|i| {
        let cat = cat.clone();
        tokio::spawn(async move {
            let r = FirmwareRecord::new_for_test("Dock", "3.0", &format!("sha{i}"));
            let outcome = cat.commit_firmware(&r, &format!("u{i}")).await.unwrap();
            matches!(outcome, CommitOutcome::Created(_))
        })
    });
    let winners: Vec<bool> = futures::future::try_join_all(racers).await.unwrap();
    assert_eq!(winners.iter().filter(|w| **w).count(), 1, "{winners:?}");
    let all: Vec<_> = cat.all_firmware().try_collect().await.unwrap();
    assert_eq!(all.len(), 1);
}

/// Two creations racing for one gateway (or a shared device): exactly one task is stored;
/// a final or deleted task frees what it held.
pub(crate) async fn task_claims_have_one_winner(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let racers = (0..8).map(|i| {
        let cat = cat.clone();
        tokio::spawn(async move {
            let t = task(&format!("T{i}"), "DOCK", &["DOCK", "AC"]);
            cat.insert_task(&t).await.unwrap()
        })
    });
    let outcomes = futures::future::try_join_all(racers).await.unwrap();
    let winners: Vec<_> = outcomes
        .iter()
        .filter(|o| **o == Claimed::Inserted)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let all = cat.list_tasks(&TaskQuery::default(), &page(50, None)).await;
    let all = all.unwrap().items;
    assert_eq!(all.len(), 1);
    let holder = all[0].clone();
    // Another gateway with the same aircraft is refused too.
    let other = task(&id(), "DOCK2", &["AC"]);
    let busy = cat.insert_task(&other).await.unwrap();
    assert_eq!(
        busy,
        Claimed::Busy {
            sn: "AC".into(),
            task_id: holder.id.clone()
        }
    );
    // Final: the gateway is free.
    let done = bumped(finished(holder.clone(), TaskStatus::Ok, Utc::now()));
    assert!(cat.save_task(&done).await.unwrap());
    assert_eq!(cat.insert_task(&other).await.unwrap(), Claimed::Inserted);
    // Deleted (its publish failed): free as well.
    cat.delete_task(&other.id).await.unwrap();
    assert!(cat.task(&other.id).await.unwrap().is_none());
    let third = task(&id(), "DOCK3", &["AC"]);
    assert_eq!(cat.insert_task(&third).await.unwrap(), Claimed::Inserted);
}

/// A task's stored status never moves back, and a final one keeps its status; a change at
/// the same rank (progress, history) is stored.
pub(crate) async fn tasks_only_move_forward(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let mut t = task(&id(), "DOCK", &["DOCK"]);
    assert_eq!(cat.insert_task(&t).await.unwrap(), Claimed::Inserted);
    t.status = TaskStatus::InProgress;
    t.progress.percent = Some(10);
    t.revision = 1;
    assert!(cat.save_task(&t).await.unwrap());
    // Another writer's copy, made from the revision just replaced: refused, even forward.
    let mut behind = t.clone();
    behind.progress.percent = Some(90);
    t.progress.percent = Some(40);
    t.revision = 2;
    assert!(cat.save_task(&t).await.unwrap(), "same rank, newer data");
    behind.revision = 2;
    assert!(
        !cat.save_task(&behind).await.unwrap(),
        "made from an old revision"
    );
    let mut stale = bumped(t.clone());
    stale.status = TaskStatus::Sent;
    assert!(!cat.save_task(&stale).await.unwrap(), "backwards");
    let done = bumped(finished(t.clone(), TaskStatus::Failed, Utc::now()));
    assert!(cat.save_task(&done).await.unwrap());
    let mut late = bumped(done.clone());
    late.result_reason = Some("late reply".into());
    assert!(
        cat.save_task(&late).await.unwrap(),
        "a final task still settles"
    );
    let other_final = bumped(finished(late.clone(), TaskStatus::Ok, Utc::now()));
    assert!(!cat.save_task(&other_final).await.unwrap(), "final absorbs");
    let stored = cat.task(&t.id).await.unwrap().unwrap();
    assert_eq!(stored.status, TaskStatus::Failed);
    assert_eq!(stored.result_reason.as_deref(), Some("late reply"));
    assert_eq!(stored.progress.percent, Some(40));
    assert_eq!(stored.revision, 4);

    // A batch: each task judged on its own, written together.
    let mut u = task(&id(), "DOCK2", &["DOCK2"]);
    assert_eq!(cat.insert_task(&u).await.unwrap(), Claimed::Inserted);
    u.status = TaskStatus::InProgress;
    u.revision = 1;
    let mut v = task(&id(), "DOCK3", &["DOCK3"]);
    assert_eq!(cat.insert_task(&v).await.unwrap(), Claimed::Inserted);
    v = bumped(finished(v, TaskStatus::Ok, Utc::now()));
    let written = cat.save_tasks(&[&u, &other_final, &v]).await.unwrap();
    assert_eq!(written, vec![true, false, true]);
    assert_eq!(
        cat.task(&u.id).await.unwrap().unwrap().status,
        TaskStatus::InProgress
    );
    assert_eq!(
        cat.task(&v.id).await.unwrap().unwrap().status,
        TaskStatus::Ok
    );
    assert_eq!(
        cat.task(&t.id).await.unwrap().unwrap().status,
        TaskStatus::Failed
    );
    // v's final save freed its dock.
    let again = task(&id(), "DOCK3", &["DOCK3"]);
    assert_eq!(cat.insert_task(&again).await.unwrap(), Claimed::Inserted);
}

/// A task's history reads back whole after each save: entries appended one by one, the last
/// one's `repeats` counted up in place, raw messages kept as received; a stale save adds
/// nothing.
pub(crate) async fn task_history_grows_and_reads_back_whole(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let history = |t: &OtaTask| serde_json::to_value(&t.history).unwrap();
    let raw = |pct: i64| {
        serde_json::value::RawValue::from_string(format!(r#"{{"percent": {pct}, "x": [1,2]}}"#))
            .unwrap()
    };
    // Backends keep at least microseconds.
    let at = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
    let mut t = task(&id(), "HIST", &["HIST"]);
    t.note("api", None, at);
    assert_eq!(cat.insert_task(&t).await.unwrap(), Claimed::Inserted);
    t.status = TaskStatus::InProgress;
    for pct in [5, 5, 5, 30, 60] {
        t.progress.percent = Some(pct);
        t.note("ota_progress", Some(raw(pct)), at);
        t.revision += 1;
        assert!(cat.save_task(&t).await.unwrap());
        let stored = cat.task(&t.id).await.unwrap().unwrap();
        assert_eq!(history(&stored), history(&t), "after {pct} %");
    }
    assert_eq!(t.history.len(), 4);
    assert_eq!(t.history[1].repeats, 2);
    let mut stale = bumped(t.clone());
    stale.status = TaskStatus::Sent;
    stale.note("services_reply", None, at);
    assert!(!cat.save_task(&stale).await.unwrap());
    let done = bumped(finished(t.clone(), TaskStatus::Ok, at));
    assert!(cat.save_task(&done).await.unwrap());
    let listed = cat
        .list_tasks(&TaskQuery::default(), &page(10, None))
        .await
        .unwrap()
        .items;
    assert_eq!(history(&listed[0]), history(&t));
    let recent = cat
        .recent_tasks(at - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(history(&recent[0]), history(&t));
    cat.delete_task(&t.id).await.unwrap();
    assert!(cat.task(&t.id).await.unwrap().is_none());
}

/// Every list is newest first, pages follow their cursor, and a record inserted between two
/// pages shifts nothing; a foreign cursor is refused.
pub(crate) async fn lists_are_newest_first_and_stable_under_inserts(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let kinds = [
        "firmware", "tasks", "rollouts", "tokens", "audit", "sessions",
    ];
    for kind in kinds {
        let insert = |cat: Arc<dyn Store>, n: usize| async move {
            let key = id();
            match kind {
                "firmware" => {
                    let r = FirmwareRecord::new_for_test("m", &format!("1.{n}"), "x");
                    cat.commit_firmware(&r, "u").await.unwrap();
                }
                "tasks" => {
                    let t = task(&key, &format!("G{n}"), &[]);
                    cat.insert_task(&t).await.unwrap();
                }
                "rollouts" => {
                    let r = rollout(&key);
                    cat.save_rollout(&key, Some(&r), &[]).await.unwrap();
                }
                "tokens" => cat.put_tokens(&[token(&key)]).await.unwrap(),
                "audit" => cat.put_audit(&audit(&key)).await.unwrap(),
                _ => {
                    let s = session(&key, &[(0, 1)], Utc::now());
                    cat.merge_sessions(&[s]).await.unwrap()
                }
            }
        };
        let list = |cat: Arc<dyn Store>, p: PageRequest| async move {
            let (ids, next): (Vec<String>, _) = match kind {
                "firmware" => {
                    let q = FirmwareQuery::default();
                    let pg = cat.list_firmware(&q, &p).await.unwrap();
                    let ids = pg.items.iter().map(|r| r.id.to_string()).collect();
                    (ids, pg.next_cursor)
                }
                "tasks" => {
                    let pg = cat.list_tasks(&TaskQuery::default(), &p).await.unwrap();
                    (pg.items.into_iter().map(|t| t.id).collect(), pg.next_cursor)
                }
                "rollouts" => {
                    let pg = cat.list_rollouts(None, &p).await.unwrap();
                    (pg.items.into_iter().map(|r| r.id).collect(), pg.next_cursor)
                }
                "tokens" => {
                    let pg = cat.list_tokens(&p).await.unwrap();
                    (pg.items.into_iter().map(|t| t.id).collect(), pg.next_cursor)
                }
                "audit" => {
                    let pg = cat.list_audit(&p, None).await.unwrap();
                    (pg.items.into_iter().map(|e| e.id).collect(), pg.next_cursor)
                }
                _ => {
                    let q = SessionQuery::default();
                    let pg = cat.list_sessions(&q, &p).await.unwrap();
                    (pg.items.into_iter().map(|s| s.id).collect(), pg.next_cursor)
                }
            };
            (ids, next)
        };
        for n in 0..5 {
            insert(cat.clone(), n).await;
        }
        let (all, none) = list(cat.clone(), page(500, None)).await;
        assert_eq!((all.len(), none), (5, None), "{kind}");
        let mut sorted = all.clone();
        sorted.sort();
        sorted.reverse();
        assert_eq!(all, sorted, "{kind}: newest first");
        let (p1, c1) = list(cat.clone(), page(2, None)).await;
        assert_eq!(p1, all[..2], "{kind}");
        insert(cat.clone(), 5).await;
        let (p2, c2) = list(cat.clone(), page(2, c1)).await;
        assert_eq!(
            p2,
            all[2..4],
            "{kind}: an insert between pages shifts nothing"
        );
        let (p3, c3) = list(cat.clone(), page(2, c2)).await;
        assert_eq!((p3.as_slice(), c3), (&all[4..], None), "{kind}");
    }
    let foreign = page(5, Some("!!".into()));
    let refused = cat.list_tasks(&TaskQuery::default(), &foreign).await;
    assert!(matches!(refused, Err(CatalogError::InvalidCursor)));
}

/// Retention removes exactly what is older than its cut-off, for every kind that has one.
pub(crate) async fn retention_prunes_only_the_old(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let now = Utc::now();
    let day = chrono::Duration::days(1);
    let old = finished(task(&id(), "A", &[]), TaskStatus::Ok, now - day * 200);
    let recent = finished(task(&id(), "B", &[]), TaskStatus::Ok, now - day);
    let open = task(&id(), "C", &["C"]);
    for t in [&old, &recent, &open] {
        cat.insert_task(t).await.unwrap();
    }
    assert_eq!(cat.prune_tasks(now - day * 180).await.unwrap(), 1);
    assert!(cat.task(&old.id).await.unwrap().is_none());
    let kept = cat.recent_tasks(now - day * 7).await.unwrap();
    let kept: HashSet<String> = kept.into_iter().map(|t| t.id).collect();
    assert_eq!(kept, HashSet::from([recent.id.clone(), open.id.clone()]));
    // What a replica compares with memory: the open ids, then whole tasks by id.
    let open_ids = cat.open_task_ids().await.unwrap();
    assert!(open_ids.contains(&open.id) && !open_ids.contains(&recent.id));
    let wanted = [open.id.clone(), recent.id.clone(), old.id.clone()];
    let read = cat.tasks_by_id(&wanted).await.unwrap();
    let read: HashSet<String> = read.into_iter().map(|t| t.id).collect();
    assert_eq!(read, HashSet::from([recent.id.clone(), open.id.clone()]));
    assert!(cat.tasks_by_id(&[]).await.unwrap().is_empty());
    // What a rollout's driver follows: the status of each task by id, in one read.
    let mut statuses = cat.task_statuses(&wanted).await.unwrap();
    statuses.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected = vec![
        (open.id.clone(), open.status),
        (recent.id.clone(), TaskStatus::Ok),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(statuses, expected);
    assert!(cat.task_statuses(&[]).await.unwrap().is_empty());
    // What a download URL serves: one device's package, without the task's history.
    let d = &open.devices[0];
    assert_eq!(
        cat.device_package(&open.id, &d.sn).await.unwrap(),
        Some((d.firmware_id.clone(), d.file_name.clone()))
    );
    assert_eq!(cat.device_package(&open.id, "NO-SUCH").await.unwrap(), None);
    assert_eq!(
        cat.device_package("no-such-task", &d.sn).await.unwrap(),
        None
    );

    // Ids are monotonic: old < cut < new.
    let (old_audit, cut, new_audit) = (id(), id(), id());
    cat.put_audit(&audit(&old_audit)).await.unwrap();
    cat.put_audit(&audit(&new_audit)).await.unwrap();
    assert_eq!(cat.prune_audit(&cut).await.unwrap(), 1);
    let left = cat.list_audit(&page(10, None), None).await.unwrap();
    let left: Vec<String> = left.items.into_iter().map(|e| e.id).collect();
    assert_eq!(left, vec![new_audit.clone()]);
    let since = cat.list_audit(&page(10, None), Some(&cut)).await.unwrap();
    assert_eq!(since.items.len(), 1);

    let answer = |at| IdempotentAnswer {
        body_hash: "h".into(),
        answer: json!({"n": 1}),
        at,
    };
    cat.record_idempotent("fresh", &answer(now)).await.unwrap();
    cat.record_idempotent("stale", &answer(now - day * 2))
        .await
        .unwrap();
    assert_eq!(cat.prune_idempotency(now).await.unwrap(), 1);
    let first = cat.idempotent("fresh", now).await.unwrap().unwrap();
    assert_eq!(
        (first.body_hash.as_str(), first.answer),
        ("h", json!({"n": 1}))
    );
    assert!(cat.idempotent("stale", now).await.unwrap().is_none());
    assert!(cat.idempotent("unknown", now).await.unwrap().is_none());

    let gone = session(&id(), &[(0, 10)], now - day * 40);
    let live = session(&id(), &[(0, 10)], now);
    cat.merge_sessions(&[gone, live.clone()]).await.unwrap();
    assert_eq!(cat.prune_sessions(now - day * 30).await.unwrap(), 1);
    let left = cat.recent_sessions(now - day * 365).await.unwrap();
    assert_eq!(
        left.into_iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![live.id]
    );
}

/// An Idempotency-Key's answer is recorded once: the first writer wins.
pub(crate) async fn idempotent_answers_are_recorded_once(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let now = Utc::now();
    let racers = (0..8).map(|i| {
        let cat = cat.clone();
        tokio::spawn(async move {
            let a = IdempotentAnswer {
                body_hash: format!("h{i}"),
                answer: json!({ "i": i }),
                at: now,
            };
            cat.record_idempotent("k", &a).await.unwrap().is_none()
        })
    });
    let firsts: Vec<bool> = futures::future::try_join_all(racers).await.unwrap();
    assert_eq!(firsts.iter().filter(|f| **f).count(), 1, "{firsts:?}");
    let kept = cat.idempotent("k", now).await.unwrap().unwrap();
    let i = kept.answer["i"].as_i64().unwrap();
    assert_eq!(kept.body_hash, format!("h{i}"));
}

/// Expands the suite into `#[tokio::test]`s for one backend:
/// `conformance_suite!(name, constructor)`.
macro_rules! conformance_suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::conformance as c;
            #[allow(unused_imports)]
            use super::*;

            super::conformance::conformance_suite!(@tests $make;
                firmware_create_read_update,
                refused_writes_change_nothing,
                concurrent_commits_have_one_winner,
                task_claims_have_one_winner,
                tasks_only_move_forward,
                tasks_are_found_by_message_keys,
                task_history_grows_and_reads_back_whole,
                lists_are_newest_first_and_stable_under_inserts,
                retention_prunes_only_the_old,
                idempotent_answers_are_recorded_once,
                replicas_heartbeat_and_are_forgotten,
                leases_have_one_holder_until_they_expire,
                device_writes_merge_and_changes_are_found,
                the_first_token_is_stored_once,
                every_kind_round_trips,
                export_import_round_trips);
        }
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                c::$name($make).await;
            }
        )*
    };
}
pub(crate) use conformance_suite;
