//! Conformance of moving records: every kind round-trips, and export → import.

use super::*;

/// What is written is read back as written: devices, tokens, rollouts and members (in key
/// order), pending uploads; sessions merge their coverage whatever the order of the writes.
pub(crate) async fn every_kind_round_trips(make: Make) {
    let Some((cat, _keep)) = make().await else {
        return;
    };
    cat.put_devices(&[device("DOCK1"), device("AC1")])
        .await
        .unwrap();
    let sns: HashSet<String> = cat
        .all_devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.sn)
        .collect();
    assert_eq!(sns, HashSet::from(["DOCK1".into(), "AC1".into()]));
    cat.delete_device("AC1").await.unwrap();
    let left = cat.all_devices().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].sn, "DOCK1");

    let mut t = token("t1");
    cat.put_tokens(std::slice::from_ref(&t)).await.unwrap();
    t.revoked_at = Some(Utc::now());
    cat.put_tokens(std::slice::from_ref(&t)).await.unwrap();
    let tokens = cat.all_tokens().await.unwrap();
    assert_eq!(tokens.len(), 1);
    // Backends keep at least microseconds.
    let micros = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros());
    assert_eq!(micros(tokens[0].revoked_at), micros(t.revoked_at));
    // An older copy (another replica's, with a last use) neither undoes the revocation nor
    // moves the last use back.
    let mut stale = token("t1");
    stale.last_used_at = Some(Utc::now());
    cat.put_tokens(std::slice::from_ref(&stale)).await.unwrap();
    stale.last_used_at = Some(Utc::now() - chrono::Duration::hours(1));
    cat.put_tokens(std::slice::from_ref(&stale)).await.unwrap();
    let tokens = cat.all_tokens().await.unwrap();
    assert_eq!(micros(tokens[0].revoked_at), micros(t.revoked_at));
    assert!(tokens[0].last_used_at.unwrap() > Utc::now() - chrono::Duration::minutes(1));

    let mut r = rollout("R1");
    let (m1, m2) = (member("A", "a"), member("B", "b"));
    assert!(cat.save_rollout("R1", Some(&r), &[&m2, &m1]).await.unwrap());
    // A copy made from an older revision (another replica wrote first) changes nothing.
    let mut behind = r.clone();
    r.revision = 1;
    r.name = "renamed".into();
    assert!(cat.save_rollout("R1", Some(&r), &[]).await.unwrap());
    behind.revision = 1;
    behind.name = "stale".into();
    let m3 = member("C", "c");
    assert!(!cat.save_rollout("R1", Some(&behind), &[&m3]).await.unwrap());
    let stored = cat.rollout("R1").await.unwrap().unwrap();
    assert_eq!((stored.name.as_str(), stored.revision), ("renamed", 1));
    r.name = "r".into();
    r.revision = 2;
    assert!(cat.save_rollout("R1", Some(&r), &[]).await.unwrap());
    cat.save_rollout("R2", None, &[&member("X", "a")])
        .await
        .unwrap();
    let members = cat.members("R1").await.unwrap();
    let gws: Vec<String> = members.into_iter().map(|m| m.gateway_sn).collect();
    assert_eq!(gws, vec!["A", "B"]);
    assert_eq!(cat.rollout("R1").await.unwrap().unwrap().name, "r");
    assert!(cat.rollout("R2").await.unwrap().is_none());
    let all: Vec<String> = cat
        .all_rollouts()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(all, vec!["R1"]);

    let now = Utc::now();
    let (a, b) = (
        session("S", &[(0, 30)], now),
        session("S", &[(50, 100)], now),
    );
    cat.merge_sessions(std::slice::from_ref(&a)).await.unwrap();
    cat.merge_sessions(std::slice::from_ref(&b)).await.unwrap();
    cat.merge_sessions(&[a]).await.unwrap();
    let q = SessionQuery {
        task_device: Some(("T".into(), "SN".into())),
        ..Default::default()
    };
    let got = cat.list_sessions(&q, &page(10, None)).await.unwrap().items;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].covered, vec![(0, 30), (50, 100)]);
    assert_eq!((got[0].bytes_covered, got[0].percent), (80, 80.0));
    cat.merge_sessions(&[session("S", &[(20, 60)], now)])
        .await
        .unwrap();
    let got = cat.list_sessions(&q, &page(10, None)).await.unwrap().items;
    assert_eq!(got[0].state, SessionState::Complete);
    assert_eq!(got[0].percent, 100.0);
}

/// Export (every firmware record, oldest first) into a fresh backend and back: the same
/// records; importing twice adds nothing.
pub(crate) async fn export_import_round_trips(make: Make) {
    let Some((from, _keep_from)) = make().await else {
        return;
    };
    for (i, v) in ["1.0", "1.1", "2.0"].iter().enumerate() {
        let r = FirmwareRecord::new_for_test("Dock", v, &format!("sha{i}"));
        from.commit_firmware(&r, "u").await.unwrap();
    }
    let first: Vec<FirmwareRecord> = from.all_firmware().try_collect().await.unwrap();
    let gone = first[0].clone();
    let delete = |r: &mut FirmwareRecord| r.status = FirmwareStatus::Deleted;
    from.update_firmware(&gone.id, &delete).await.unwrap();
    let exported: Vec<FirmwareRecord> = from.all_firmware().try_collect().await.unwrap();
    let Some((to, _keep_to)) = make().await else {
        return;
    };
    for r in &exported {
        assert!(to.import_firmware(r).await.unwrap());
    }
    for r in &exported {
        assert!(!to.import_firmware(r).await.unwrap(), "imported twice");
    }
    let back: Vec<FirmwareRecord> = to.all_firmware().try_collect().await.unwrap();
    let key = |r: &FirmwareRecord| (r.id.to_string(), r.sha256.clone(), r.status);
    assert_eq!(
        back.iter().map(key).collect::<Vec<_>>(),
        exported.iter().map(key).collect::<Vec<_>>()
    );
    // The tombstone's version is free in the copy too; the live ones are taken.
    let again = FirmwareRecord::new_for_test("Dock", &gone.product_version, "new");
    let created = to.commit_firmware(&again, "u").await.unwrap();
    assert!(matches!(created, CommitOutcome::Created(_)));
}
