//! The storage port of API tokens (records hold only the token's hash).

use chrono::{DateTime, Utc};

use super::TokenRecord;
use crate::store::{Page, PageRequest, StoreResult};

/// API token records, keyed by id.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync {
    /// Stores tokens (created, revoked, last use changed) in one batch. A stored revocation
    /// is kept and a stored last use never moves back (another replica may write an older
    /// copy of the same token).
    async fn put_tokens(&self, tokens: &[TokenRecord]) -> StoreResult<()>;
    /// Every token record (start-up).
    async fn all_tokens(&self) -> StoreResult<Vec<TokenRecord>>;
    /// Newest-first page of token records.
    async fn list_tokens(&self, page: &PageRequest) -> StoreResult<Page<TokenRecord>>;
    /// Stores `token` only if no usable token (not revoked, not expired at `now`) exists:
    /// the deployment's first admin token. Of replicas starting together on one catalog,
    /// exactly one stores it. Returns whether it was stored.
    async fn insert_first_token(
        &self,
        token: &TokenRecord,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
}
