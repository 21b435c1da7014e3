//! The audit log against the sled catalog.

use super::*;
use crate::catalog::Catalog;

fn entry(path: &str) -> AuditEntry {
    AuditEntry {
        id: String::new(),
        at: Utc::now(),
        who: Some("ci".into()),
        token_id: None,
        client: "127.0.0.1".into(),
        method: "POST".into(),
        path: path.into(),
        status: 201,
        error: None,
    }
}

#[tokio::test]
async fn newest_first_since_and_paging() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::new(std::sync::Arc::new(
        Catalog::open(&dir.path().join("c"), 8).unwrap(),
    ));
    log.record(entry("/a")).await;
    std::thread::sleep(std::time::Duration::from_millis(5));
    let middle = Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(5));
    log.record(entry("/b")).await;
    log.record(entry("/c")).await;
    let all = log.list(&PageRequest::default(), None).await.unwrap();
    let paths: Vec<_> = all.items.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/c", "/b", "/a"]);
    let since = log
        .list(&PageRequest::default(), Some(middle))
        .await
        .unwrap();
    assert_eq!(since.items.len(), 2);
    let first = log
        .list(
            &PageRequest {
                limit: Some(1),
                cursor: None,
            },
            Some(middle),
        )
        .await
        .unwrap();
    assert_eq!(first.items[0].path, "/c");
    let next = log
        .list(
            &PageRequest {
                limit: Some(1),
                cursor: first.next_cursor,
            },
            Some(middle),
        )
        .await
        .unwrap();
    assert_eq!(next.items[0].path, "/b");
    assert!(next.next_cursor.is_none());
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_eq!(log.prune(chrono::Duration::zero()).await.unwrap(), 3);
}
