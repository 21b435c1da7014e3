//! Conformance of what replicas sharing a catalog rely on: tasks found by message keys, the
//! first admin token stored once, merged device writes, leases, heartbeats.

use super::*;

/// A gateway message finds its task by tid, by bid (the newest of each), or as the open task
/// holding a serial; a final task holds nothing.
pub(crate) async fn tasks_are_found_by_message_keys(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let dock = format!("FIND-{}", id());
    let t = task(&id(), &dock, &[&dock, "FIND-AC"]);
    assert_eq!(cat.insert_task(&t).await.unwrap(), Claimed::Inserted);
    let found = |key| {
        let cat = Arc::clone(&cat);
        async move { cat.find_task(key).await.unwrap().map(|t| t.id) }
    };
    assert_eq!(found(TaskKey::Tid(&t.tid)).await, Some(t.id.clone()));
    assert_eq!(found(TaskKey::Bid(&t.bid)).await, Some(t.id.clone()));
    assert_eq!(found(TaskKey::OpenFor(&dock)).await, Some(t.id.clone()));
    assert_eq!(found(TaskKey::OpenFor("FIND-AC")).await, Some(t.id.clone()));
    assert_eq!(found(TaskKey::Tid("no-such-tid")).await, None);
    assert_eq!(found(TaskKey::OpenFor("NOBODY")).await, None);
    let done = bumped(finished(t.clone(), TaskStatus::Ok, Utc::now()));
    assert!(cat.save_task(&done).await.unwrap());
    assert_eq!(
        found(TaskKey::OpenFor(&dock)).await,
        None,
        "final holds nothing"
    );
    assert_eq!(
        found(TaskKey::Tid(&t.tid)).await,
        Some(t.id.clone()),
        "still by tid"
    );
    let stored = cat.find_task(TaskKey::Bid(&t.bid)).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.revision), (TaskStatus::Ok, 1));
}

/// The deployment's first admin token is stored once: of two concurrent attempts on an empty
/// catalog exactly one wins; none while a usable token exists; again once every token is
/// revoked.
pub(crate) async fn the_first_token_is_stored_once(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let now = Utc::now();
    let (a, b) = (token("A"), token("B"));
    let (x, y) = tokio::join!(
        cat.insert_first_token(&a, now),
        cat.insert_first_token(&b, now)
    );
    assert_eq!(u8::from(x.unwrap()) + u8::from(y.unwrap()), 1);
    let mut stored = cat.all_tokens().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert!(!cat.insert_first_token(&token("C"), now).await.unwrap());
    stored[0].revoked_at = Some(now);
    cat.put_tokens(&stored).await.unwrap();
    assert!(cat.insert_first_token(&token("D"), now).await.unwrap());
    assert_eq!(cat.all_tokens().await.unwrap().len(), 2);
}

/// Replicas' heartbeats: one row per replica (the latest), listed by id; a replica silent
/// since before the cut is forgotten at the next heartbeat.
/// Copies of a device written by different replicas are merged (each field group from the
/// copy that saw it last), and a reader finds the devices changed since it last looked.
pub(crate) async fn device_writes_merge_and_changes_are_found(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let t = |s: i64| {
        Some(chrono::SubsecRound::trunc_subsecs(Utc::now(), 6) + chrono::Duration::seconds(s))
    };
    let sn = format!("MERGE-{}", id());
    let first = cat.changed_devices(None).await.unwrap();
    let mut a = device(&sn);
    a.firmware_version = Some("2.0".into());
    a.last_state_at = t(10);
    cat.put_devices(&[a.clone()]).await.unwrap();
    let found = cat.changed_devices(first.next).await.unwrap();
    assert!(
        found.devices.iter().any(|d| d.sn == sn),
        "a new device is a change"
    );
    // Another replica's copy: older state, newer topology and osd.
    let mut b = device(&sn);
    b.firmware_version = Some("1.0".into());
    b.last_state_at = t(1);
    b.child_sn = Some("AC".into());
    b.topology_at = t(5);
    b.mode_code = Some(3);
    b.last_osd_at = t(5);
    cat.put_devices(&[b]).await.unwrap();
    let stored = cat
        .all_devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.sn == sn)
        .unwrap();
    assert_eq!(
        stored.firmware_version.as_deref(),
        Some("2.0"),
        "newer state kept"
    );
    assert_eq!(stored.child_sn.as_deref(), Some("AC"));
    assert_eq!(stored.mode_code, Some(3));
    let changed = cat.changed_devices(found.next).await.unwrap();
    let copy = changed.devices.iter().find(|d| d.sn == sn);
    assert_eq!(
        copy.and_then(|d| d.child_sn.as_deref()),
        Some("AC"),
        "{changed:?}"
    );
    // Read by serial: what the others saw of it, last seen included.
    let mut seen = device(&sn);
    let at = t(30);
    seen.last_seen_at = at;
    cat.put_devices(&[seen]).await.unwrap();
    let read = cat
        .devices_by_sn(&[sn.clone(), "NO-SUCH-DEVICE".into()])
        .await
        .unwrap();
    assert_eq!(read.len(), 1, "{read:?}");
    assert_eq!(read[0].last_seen_at, at);
    assert_eq!(read[0].firmware_version.as_deref(), Some("2.0"));
    assert!(cat.devices_by_sn(&[]).await.unwrap().is_empty());
    // Last seen alone: moved on, never back.
    let mut later = read[0].clone();
    later.last_seen_at = t(90);
    let later_at = later.last_seen_at;
    cat.touch_devices(&[later]).await.unwrap();
    let mut earlier = read[0].clone();
    earlier.last_seen_at = t(60);
    cat.touch_devices(&[earlier]).await.unwrap();
    let read = cat.devices_by_sn(std::slice::from_ref(&sn)).await.unwrap();
    assert_eq!(read[0].last_seen_at, later_at);
    changes_are_read_once_where_ordered(&cat, read[0].clone()).await;
}

/// Where the backend keeps its changes in order, a reader that caught up does not read a
/// device again until it changes in something a reader acts on (not its seen times).
async fn changes_are_read_once_where_ordered(
    cat: &Arc<dyn Store>,
    mut d: crate::devices::DeviceRecord,
) {
    let sn = d.sn.clone();
    let mentions = |c: &crate::devices::ChangedDevices| c.devices.iter().any(|x| x.sn == sn);
    let Some(mut cursor) = cat.changed_devices(None).await.unwrap().next else {
        return; // No order: every device, every time.
    };
    // Caught up once no transaction older than the last change still runs (another test's).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let read = cat.changed_devices(Some(cursor)).await.unwrap();
        if !mentions(&read) {
            break;
        }
        cursor = read.next.unwrap_or(cursor);
        assert!(std::time::Instant::now() < deadline, "never caught up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    d.last_seen_at = d.last_seen_at.map(|t| t + chrono::Duration::seconds(60));
    cat.touch_devices(std::slice::from_ref(&d)).await.unwrap();
    assert!(
        !mentions(&cat.changed_devices(Some(cursor)).await.unwrap()),
        "seen times alone are no change"
    );
    d.mode_code = Some(9);
    d.last_osd_at = d.last_seen_at;
    cat.put_devices(std::slice::from_ref(&d)).await.unwrap();
    let read = cat.changed_devices(Some(cursor)).await.unwrap();
    let copy = read.devices.iter().find(|x| x.sn == sn);
    assert_eq!(copy.and_then(|x| x.mode_code), Some(9), "{read:?}");
}

/// A lease has one holder: renewed by it, refused to others until it expires, then taken
/// over; given up only by its holder, or ended with all of its holder's; leases are not
/// listed as replicas.
pub(crate) async fn leases_have_one_holder_until_they_expire(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let ttl = std::time::Duration::from_millis(600);
    let take = |holder: &'static str| {
        let cat = Arc::clone(&cat);
        async move { cat.take_lease("work", holder, ttl).await.unwrap() }
    };
    assert!(take("a").await);
    assert!(!take("b").await, "held by a");
    assert!(take("a").await, "renewed by its holder");
    assert!(
        cat.replicas().await.unwrap().is_empty(),
        "a lease is no replica"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !take("b").await {
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!take("a").await, "taken over by b");
    cat.drop_lease("work", "a").await.unwrap();
    assert!(!take("a").await, "only its holder gives it up");
    cat.drop_lease("work", "b").await.unwrap();
    assert!(take("a").await, "free once given up");
    // A holder known to have died (its will) loses every lease at once.
    let long = std::time::Duration::from_secs(60);
    for name in ["work", "other"] {
        assert!(cat.take_lease(name, "a", long).await.unwrap());
    }
    assert!(cat.take_lease("third", "c", long).await.unwrap());
    cat.end_leases("a").await.unwrap();
    for name in ["work", "other"] {
        assert!(cat.take_lease(name, "b", long).await.unwrap(), "{name}");
    }
    assert!(
        !cat.take_lease("third", "b", long).await.unwrap(),
        "another holder's lease stays"
    );
}

pub(crate) async fn replicas_heartbeat_and_are_forgotten(make: Make) {
    use crate::cluster::ReplicaRecord;
    let Some((cat, _keep)) = make().await else {
        return;
    };
    let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
    let replica = |id: &str, at: DateTime<Utc>| ReplicaRecord {
        id: id.into(),
        version: "1".into(),
        started_at: at,
        last_heartbeat: at,
        blob_store: "s3".into(),
        broker: "external".into(),
        leases: vec!["rollouts".into()],
    };
    let long_ago = now - chrono::Duration::hours(2);
    cat.heartbeat(&replica("b", long_ago), long_ago)
        .await
        .unwrap();
    cat.heartbeat(&replica("a", now), long_ago).await.unwrap();
    let mut b = replica("b", now - chrono::Duration::seconds(5));
    b.started_at = long_ago;
    cat.heartbeat(&b, long_ago).await.unwrap();
    assert_eq!(
        cat.replicas().await.unwrap(),
        vec![replica("a", now), b.clone()]
    );
    // b falls silent; a's next heartbeat forgets it once it is older than the cut.
    cat.heartbeat(
        &replica("a", now),
        b.last_heartbeat + chrono::Duration::seconds(1),
    )
    .await
    .unwrap();
    assert_eq!(cat.replicas().await.unwrap(), vec![replica("a", now)]);
}
