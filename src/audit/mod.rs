//! The audit log: every state-changing API call and every refused token, with who (the token's
//! name), what (method and path), when, from which address and the result. Kept in the catalog
//! (ids are time-ordered ULIDs) for `--retention-days`, and written as a structured log
//! line (target `fwrepo::audit`) at the same time.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::store::{CatalogError, Page, PageRequest, StoreResult};

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

/// The storage port of the audit log. Entry ids are time-ordered ULIDs.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends an entry.
    async fn put_audit(&self, entry: &AuditEntry) -> StoreResult<()>;
    /// Newest-first page of entries whose id sorts at or after `since_key`.
    async fn list_audit(
        &self,
        page: &PageRequest,
        since_key: Option<&str>,
    ) -> StoreResult<Page<AuditEntry>>;
    /// Removes entries whose id sorts before `before_key`; returns how many.
    async fn prune_audit(&self, before_key: &str) -> StoreResult<usize>;
}

/// The audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    store: Arc<dyn AuditStore>,
}

impl AuditLog {
    /// The log kept in `store`.
    pub fn new(store: Arc<dyn AuditStore>) -> AuditLog {
        AuditLog { store }
    }

    /// Records an entry (its id and time are set here) and logs it.
    pub async fn record(&self, mut entry: AuditEntry) {
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
        if let Err(e) = self.store.put_audit(&entry).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Newest-first page of entries at or after `since`.
    pub async fn list(
        &self,
        page: &PageRequest,
        since: Option<DateTime<Utc>>,
    ) -> Result<Page<AuditEntry>, CatalogError> {
        let since_key = since.map(key_at);
        self.store.list_audit(page, since_key.as_deref()).await
    }

    /// Removes entries older than `retention`; returns how many.
    pub async fn prune(&self, retention: chrono::Duration) -> Result<usize, CatalogError> {
        self.store
            .prune_audit(&key_at(Utc::now() - retention))
            .await
    }
}

/// The smallest ULID of the millisecond `t` (ids at or after `t` sort at or after it).
fn key_at(t: DateTime<Utc>) -> String {
    let ms = u64::try_from(t.timestamp_millis()).unwrap_or(0);
    ulid::Ulid::from_parts(ms, 0).to_string()
}

#[cfg(test)]
mod tests;
