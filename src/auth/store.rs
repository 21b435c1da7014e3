//! The storage port of API tokens (records hold only the token's hash).

use super::TokenRecord;
use crate::store::{Page, PageRequest, StoreResult};

/// API token records, keyed by id.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync {
    /// Stores tokens (created, revoked, last use changed) in one batch.
    async fn put_tokens(&self, tokens: &[TokenRecord]) -> StoreResult<()>;
    /// Every token record (start-up).
    async fn all_tokens(&self) -> StoreResult<Vec<TokenRecord>>;
    /// Newest-first page of token records.
    async fn list_tokens(&self, page: &PageRequest) -> StoreResult<Page<TokenRecord>>;
}
