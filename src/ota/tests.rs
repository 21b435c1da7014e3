//! The service with a publisher that answers at once (ordering races).

use super::*;
use crate::catalog::Catalog;
use futures::executor::block_on;

/// A broker and gateway in one: `publish` delivers the gateway's `services_reply` to the
/// service before it returns — the fastest answer a gateway can give.
struct InstantReply {
    service: std::sync::OnceLock<OtaService>,
    /// Deliver the gateway's whole upgrade (progress to `ok`) before its reply, as rumqttd
    /// may (it serves topic filters in turn).
    progress_first: bool,
    /// Deliver progress, the final progress, the reply and a repeat of the final progress in
    /// one batch (as the worker takes what waits in its inbox), noting each acknowledgement.
    batched: Option<Arc<std::sync::Mutex<Vec<bool>>>>,
}

/// The `services_reply` to the `ota_create` `msg`.
fn reply_to(sn: &str, msg: &Value, raw: Box<serde_json::value::RawValue>) -> OtaMessage {
    OtaMessage {
        is_reply: true,
        topic_sn: sn.to_string(),
        tid: msg["tid"].as_str().map(str::to_string),
        bid: msg["bid"].as_str().map(str::to_string),
        method: Some("ota_create".into()),
        report: machine::Report::default(),
        raw,
        ack: Default::default(),
    }
}

/// An `ota_progress` message for `bid`.
fn progress(sn: &str, bid: &Value, status: TaskStatus, percent: i64) -> OtaMessage {
    let event = json!({"bid": bid, "method": "ota_progress", "data": {"result": 0,
        "output": {"status": status, "progress": {"percent": percent, "step_key": "upgrade_firmware"}}}});
    OtaMessage {
        is_reply: false,
        topic_sn: sn.to_string(),
        tid: None,
        bid: bid.as_str().map(str::to_string),
        method: Some("ota_progress".into()),
        report: machine::Report {
            status: Some(status),
            percent: Some(percent),
            step_key: Some("upgrade_firmware".into()),
            ..machine::Report::default()
        },
        raw: serde_json::value::RawValue::from_string(event.to_string()).unwrap(),
        ack: Default::default(),
    }
}

impl Publisher for InstantReply {
    fn connected(&self) -> bool {
        true
    }

    fn render(&self, cmd: &OtaCreate) -> (String, Value) {
        let topic = format!("gw/{}", cmd.gateway_sn);
        (topic, json!({"tid": cmd.tid, "bid": cmd.bid}))
    }

    fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        let msg: Value = serde_json::from_slice(&payload).unwrap();
        let sn = topic.split('/').nth(1).unwrap().to_string();
        let reply = json!({"tid": msg["tid"], "bid": msg["bid"], "method": "ota_create",
            "data": {"result": 0}});
        let raw = serde_json::value::RawValue::from_string(reply.to_string()).unwrap();
        let service = self.service.get().unwrap();
        if self.progress_first {
            block_on(service.on_message(progress(&sn, &msg["bid"], TaskStatus::Ok, 100)));
        }
        if let Some(acks) = &self.batched {
            let mut batch = vec![
                progress(&sn, &msg["bid"], TaskStatus::InProgress, 50),
                progress(&sn, &msg["bid"], TaskStatus::Ok, 100),
                reply_to(&sn, &msg, raw.clone()),
                progress(&sn, &msg["bid"], TaskStatus::Ok, 100),
            ];
            for m in &mut batch {
                let acks = Arc::clone(acks);
                m.ack = crate::domain::Ack::new(move |done| acks.lock().unwrap().push(done));
            }
            // Not on this thread's runtime: the store's writes run there.
            std::thread::scope(|s| {
                s.spawn(|| block_on(service.on_messages(batch)));
            });
            return true;
        }
        block_on(service.on_message(reply_to(&sn, &msg, raw)));
        true
    }
}

#[tokio::test]
async fn a_reply_that_arrives_before_create_returns_is_not_an_orphan() {
    let (service, task, _dir) = run_one(false, None).await;
    let stored = service.get(&task.id).await.unwrap();
    let sources: Vec<&str> = stored.history.iter().map(|h| h.source.as_str()).collect();
    assert_eq!(sources, ["api", "publish", "services_reply"], "{sources:?}");
    assert!(stored.replied_at.is_some());
}

#[tokio::test]
async fn a_reply_after_the_last_progress_event_is_still_recorded() {
    let (service, task, _dir) = run_one(true, None).await;
    let stored = service.get(&task.id).await.unwrap();
    assert_eq!(stored.status, TaskStatus::Ok);
    let sources: Vec<&str> = stored.history.iter().map(|h| h.source.as_str()).collect();
    assert_eq!(
        sources,
        ["api", "publish", "ota_progress", "services_reply"],
        "{sources:?}"
    );
    assert!(stored.replied_at.is_some());
}

/// Messages of one task taken from the inbox together are applied in order, stored in one
/// write, and acknowledged after it: the reply behind the final progress is still recorded,
/// the repeat after it changes nothing (a final task absorbs it).
#[tokio::test]
async fn a_batch_of_messages_is_applied_in_order_and_acknowledged_once_stored() {
    let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (service, task, _dir) = run_one(false, Some(Arc::clone(&acks))).await;
    let stored = service.get(&task.id).await.unwrap();
    assert_eq!(stored.status, TaskStatus::Ok);
    let sources: Vec<&str> = stored.history.iter().map(|h| h.source.as_str()).collect();
    assert_eq!(
        sources,
        [
            "api",
            "publish",
            "ota_progress",
            "ota_progress",
            "services_reply"
        ],
        "{sources:?}"
    );
    assert_eq!(*acks.lock().unwrap(), [true; 4]);
    let from_catalog = service
        .inner
        .stores
        .tasks
        .task(&task.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::to_value(&from_catalog.history).unwrap(),
        serde_json::to_value(&stored.history).unwrap()
    );
}

/// Another writer (a replica sharing the catalog) stores a change first: the service's copy
/// is refused, read again, and the message applied to the fresh copy, keeping both changes;
/// the message is acknowledged only after that.
#[tokio::test]
async fn a_task_changed_by_another_writer_first_is_read_again_and_the_message_reapplied() {
    let (service, task, _dir) = run_one(false, None).await;
    let tasks = Arc::clone(&service.inner.stores.tasks);
    let mut theirs = tasks.task(&task.id).await.unwrap().unwrap();
    let bid = json!(theirs.bid);
    let early = progress("RACE1", &bid, TaskStatus::InProgress, 40);
    let now = Utc::now();
    machine::apply(
        &mut theirs,
        machine::TaskEvent::Progress(early.report, Some(early.raw)),
        now,
    );
    theirs.revision += 1;
    assert!(tasks.save_task(&theirs).await.unwrap());

    let (last, acks) = noting_ack(progress("RACE1", &bid, TaskStatus::Ok, 100));
    service.on_message(last).await;
    assert_eq!(*acks.lock().unwrap(), [true]);

    let stored = tasks.task(&task.id).await.unwrap().unwrap();
    assert_eq!(stored.status, TaskStatus::Ok);
    assert_eq!(stored.revision, theirs.revision + 1);
    let percents: Vec<Option<i64>> = stored
        .history
        .iter()
        .filter(|h| h.source == "ota_progress")
        .map(|h| h.progress.percent)
        .collect();
    assert_eq!(
        percents,
        [Some(40), Some(100)],
        "both writers' changes kept"
    );
    let in_memory = service.get(&task.id).await.unwrap();
    assert_eq!(
        (in_memory.status, in_memory.revision),
        (stored.status, stored.revision)
    );
}

/// An `ota_progress` that arrives after its task settled (handed over by another replica, it
/// can overtake an earlier one) is absorbed by the final state: acknowledged, the task
/// unchanged, and not kept as an orphan.
#[tokio::test]
async fn a_progress_event_after_its_task_settled_is_absorbed_not_kept_as_an_orphan() {
    let (service, task, _dir, catalog) = run_one_in(false, None).await;
    let bid = json!(task.bid);
    // The dock reports the target, so the final event settles the task at once.
    service.inner.devices.on_state(
        "RACE1",
        None,
        &crate::devices::StateReport {
            firmware_version: Some("2.0".into()),
            ..Default::default()
        },
    );
    service
        .on_message(progress("RACE1", &bid, TaskStatus::Ok, 100))
        .await;
    assert!(!lock(&service.inner.open).tasks.contains_key(&task.id));
    let settled = service.get(&task.id).await.unwrap();
    assert_eq!(settled.status, TaskStatus::Ok);

    let (late, acks) = noting_ack(progress("RACE1", &bid, TaskStatus::InProgress, 60));
    service.on_message(late).await;
    assert_eq!(*acks.lock().unwrap(), [true]);
    assert_eq!(catalog.orphan_count(), 0);
    let after = service.get(&task.id).await.unwrap();
    assert_eq!(
        (after.status, after.revision, after.history.len()),
        (settled.status, settled.revision, settled.history.len())
    );
}

/// One task for one device, answered by an [`InstantReply`] gateway.
async fn run_one(
    progress_first: bool,
    batched: Option<Arc<std::sync::Mutex<Vec<bool>>>>,
) -> (OtaService, Box<OtaTask>, tempfile::TempDir) {
    let (service, task, dir, _) = run_one_in(progress_first, batched).await;
    (service, task, dir)
}

/// [`run_one`], with its catalog.
async fn run_one_in(
    progress_first: bool,
    batched: Option<Arc<std::sync::Mutex<Vec<bool>>>>,
) -> (OtaService, Box<OtaTask>, tempfile::TempDir, Arc<Catalog>) {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Arc::new(Catalog::open(&dir.path().join("c"), 8).unwrap());
    let fw = crate::store::FirmwareRecord::new_for_test("Dock", "2.0", &"a".repeat(64));
    assert!(catalog.import_firmware(&fw).await.unwrap());
    let devices =
        DeviceRegistry::load(catalog.clone(), Default::default(), Duration::from_secs(60))
            .await
            .unwrap();
    let publisher = Arc::new(InstantReply {
        service: std::sync::OnceLock::new(),
        progress_first,
        batched,
    });
    let settings = OtaSettings {
        reply_timeout: Duration::from_secs(30),
        progress_timeout: Duration::from_secs(60),
        verify_window: Duration::from_secs(60),
        preflight: "off".into(),
        preflight_skip: vec![],
        online_window: Duration::from_secs(60),
        retention: Duration::from_secs(86_400),
        shared: false,
        route_tag: None,
    };
    let signer =
        crate::download::signing::UrlSigner::new(vec![vec![7; 32]], Duration::from_secs(3600));
    let store: Arc<dyn crate::catalog::Store> = catalog.clone();
    let service = OtaService::load(
        crate::catalog::ota_stores(&store),
        devices,
        publisher.clone(),
        "http://127.0.0.1:1".into(),
        settings,
        signer,
        crate::domain::Clock::default(),
    )
    .await
    .unwrap();
    assert!(publisher.service.set(service.clone()).is_ok());
    let req: OtaRequest = serde_json::from_value(json!({"gateway_sn": "RACE1",
        "devices": [{"sn": "RACE1", "firmware_id": fw.id.as_str()}]}))
    .unwrap();
    let Created::Task(task) = service.create(req, None).await.unwrap() else {
        panic!("not a task");
    };
    (service, task, dir, catalog)
}

/// `msg` with an acknowledgement that notes, in the list returned, whether it was done.
fn noting_ack(mut msg: OtaMessage) -> (OtaMessage, Arc<std::sync::Mutex<Vec<bool>>>) {
    let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let noted = Arc::clone(&acks);
    msg.ack = crate::domain::Ack::new(move |done| noted.lock().unwrap().push(done));
    (msg, acks)
}
