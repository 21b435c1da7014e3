//! The storage port of rollouts and their members.

use super::model::{Member, Rollout, RolloutStatus};
use crate::store::{Page, PageRequest, StoreResult};

/// Rollouts and their members (one per gateway).
#[async_trait::async_trait]
pub trait RolloutStore: Send + Sync {
    /// One rollout.
    async fn rollout(&self, id: &str) -> StoreResult<Option<Rollout>>;
    /// Every rollout (start-up).
    async fn all_rollouts(&self) -> StoreResult<Vec<Rollout>>;
    /// Newest-first page of rollouts, of one status if given.
    async fn list_rollouts(
        &self,
        status: Option<RolloutStatus>,
        page: &PageRequest,
    ) -> StoreResult<Page<Rollout>>;
    /// Stores changed members of `rollout_id` and, when given, the rollout record, in one
    /// atomic write (a member's dispatch key is recorded with the state that made it). A
    /// given record is stored only if none is stored yet or it was made from the stored one
    /// (its `revision` one past the stored revision); otherwise nothing is written and the
    /// answer is false (another writer changed the rollout first).
    async fn save_rollout(
        &self,
        rollout_id: &str,
        rollout: Option<&Rollout>,
        members: &[&Member],
    ) -> StoreResult<bool>;
    /// A rollout's members in their order key's order.
    async fn members(&self, rollout_id: &str) -> StoreResult<Vec<Member>>;
}
