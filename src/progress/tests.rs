//! The session table against the sled catalog.

use super::*;
use crate::catalog::Catalog;

#[tokio::test]
async fn sessions_progress_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Arc::new(Catalog::open(dir.path(), 8).unwrap());
    let t = DownloadTracker::load(cat.clone()).await.unwrap();
    let fw = FirmwareId::generate();
    let key = SessionKey::Client {
        firmware_id: fw.clone(),
        client: "127.0.0.1".into(),
        user_agent: "curl".into(),
    };
    let ci = ClientInfo {
        client: "127.0.0.1".into(),
        user_agent: "curl".into(),
    };
    let h = t.begin(key.clone(), &ci, 100);
    h.record(50, 50);
    let h2 = t.begin(key, &ci, 100);
    assert_eq!(h.id(), h2.id());
    h2.record(0, 60);
    assert_eq!(t.flush().await.unwrap(), 1);
    let all = SessionQuery::default();
    let page = t.list(&all, &PageRequest::default()).await.unwrap();
    let s = &page.items[0];
    assert_eq!((s.bytes_sent, s.bytes_covered, s.requests), (110, 100, 2));
    assert_eq!(s.state, SessionState::Complete);
    assert_eq!(s.percent, 100.0);
    // Reloaded after a restart, the session continues.
    let t2 = DownloadTracker::load(cat).await.unwrap();
    let page = t2.list(&all, &PageRequest::default()).await.unwrap();
    assert_eq!(page.items.len(), 1);
}
