//! The audit log: every state-changing API call and every refused token, with who (the token's
//! name), what (method and path), when, from which address and the result. Kept in sled (tree
//! `audit`, keys are time-ordered ULIDs) for `--retention-days`, and written as a structured log
//! line (target `fwrepo::audit`) at the same time.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, CatalogError, Page, PageRequest};

/// One audited request.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Id (ULID, time-ordered).
    pub id: String,
    /// When the answer was sent.
    pub at: DateTime<Utc>,
    /// Name of the token used (`null` when none was accepted).
    pub who: Option<String>,
    /// Id of the token used.
    pub token_id: Option<String>,
    /// Client address.
    pub client: String,
    /// HTTP method.
    pub method: String,
    /// Request path (without the query).
    pub path: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// The error code of a failed request (`unauthorized`, `forbidden`, …).
    pub error: Option<String>,
}

/// The audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    catalog: Catalog,
}

impl AuditLog {
    /// The log kept in `catalog`.
    pub fn new(catalog: Catalog) -> AuditLog {
        AuditLog { catalog }
    }

    /// Records an entry (its id and time are set here) and logs it.
    pub fn record(&self, mut entry: AuditEntry) {
        entry.id = crate::domain::ids::next();
        entry.at = Utc::now();
        tracing::info!(
            target: "fwrepo::audit",
            who = entry.who.as_deref().unwrap_or("-"),
            client = %entry.client,
            method = %entry.method,
            path = %entry.path,
            status = entry.status,
            error = entry.error.as_deref().unwrap_or("-"),
            "audit"
        );
        if let Err(e) = self.catalog.put_audit(&entry.id, &entry) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Newest-first page of entries at or after `since`.
    pub fn list(
        &self,
        page: &PageRequest,
        since: Option<DateTime<Utc>>,
    ) -> Result<Page<AuditEntry>, CatalogError> {
        let since_key = since.map(key_at);
        self.catalog.list_audit(page, since_key.as_deref())
    }

    /// Removes entries older than `retention`; returns how many.
    pub fn prune(&self, retention: chrono::Duration) -> Result<usize, CatalogError> {
        self.catalog.prune_audit(&key_at(Utc::now() - retention))
    }
}

/// The smallest ULID of the millisecond `t` (ids at or after `t` sort at or after it).
fn key_at(t: DateTime<Utc>) -> String {
    let ms = u64::try_from(t.timestamp_millis()).unwrap_or(0);
    ulid::Ulid::from_parts(ms, 0).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn newest_first_since_and_paging() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(Catalog::open(&dir.path().join("c"), 8).unwrap());
        log.record(entry("/a"));
        std::thread::sleep(std::time::Duration::from_millis(5));
        let middle = Utc::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        log.record(entry("/b"));
        log.record(entry("/c"));
        let all = log.list(&PageRequest::default(), None).unwrap();
        let paths: Vec<_> = all.items.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/c", "/b", "/a"]);
        let since = log.list(&PageRequest::default(), Some(middle)).unwrap();
        assert_eq!(since.items.len(), 2);
        let first = log
            .list(
                &PageRequest {
                    limit: Some(1),
                    cursor: None,
                },
                Some(middle),
            )
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
            .unwrap();
        assert_eq!(next.items[0].path, "/b");
        assert!(next.next_cursor.is_none());
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(log.prune(chrono::Duration::zero()).unwrap(), 3);
    }
}
