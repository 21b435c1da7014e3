//! API tokens and the audit log in sled.

use super::*;
use crate::audit::{AuditEntry, AuditStore};
use crate::auth::{TokenRecord, TokenStore};

#[async_trait::async_trait]
impl TokenStore for Catalog {
    async fn put_tokens(&self, tokens: &[TokenRecord]) -> StoreResult<()> {
        let t = self.trees()?;
        let mut batch = sled::Batch::default();
        for token in tokens {
            // As on PostgreSQL: a revocation is never undone, a last use never moves back.
            let mut token = token.clone();
            if let Some(v) = t.tokens.get(token.id.as_bytes())? {
                let stored: TokenRecord = decode(token.id.as_bytes(), &v)?;
                token.revoked_at = stored.revoked_at.or(token.revoked_at);
                token.last_used_at = stored.last_used_at.max(token.last_used_at);
            }
            batch.insert(token.id.as_bytes(), encode(&token));
        }
        t.tokens.apply_batch(batch)?;
        Ok(())
    }

    async fn all_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        all_of(&self.trees()?.tokens)
    }

    async fn list_tokens(&self, page: &PageRequest) -> StoreResult<Page<TokenRecord>> {
        page_desc(&self.trees()?.tokens, page, |_: &TokenRecord| true)
    }

    async fn insert_first_token(
        &self,
        token: &TokenRecord,
        now: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<bool> {
        // One process owns a sled catalog, and it bootstraps once: no other writer to race.
        let t = self.trees()?;
        let existing: Vec<TokenRecord> = all_of(&t.tokens)?;
        if existing.iter().any(|e| e.usable(now)) {
            return Ok(false);
        }
        t.tokens.insert(token.id.as_bytes(), encode(token))?;
        Ok(true)
    }
}

#[async_trait::async_trait]
impl AuditStore for Catalog {
    async fn put_audit(&self, entry: &AuditEntry) -> StoreResult<()> {
        let t = self.trees()?;
        t.audit.insert(entry.id.as_bytes(), encode(entry))?;
        Ok(())
    }

    async fn list_audit(
        &self,
        page: &PageRequest,
        since_key: Option<&str>,
    ) -> StoreResult<Page<AuditEntry>> {
        let t = self.trees()?;
        let Some(since) = since_key else {
            return page_desc(&t.audit, page, |_: &AuditEntry| true);
        };
        let limit = page.limit();
        let upper = page.after_key()?;
        let iter = match &upper {
            Some(after) => t.audit.range(since.as_bytes()..after.as_slice()),
            None => t.audit.range(since.as_bytes()..),
        };
        let mut items = Vec::with_capacity(limit);
        let mut last_key: Option<sled::IVec> = None;
        for kv in iter.rev() {
            let (k, v) = kv?;
            if items.len() == limit {
                return Ok(Page {
                    items,
                    next_cursor: last_key.map(|k| cursor_for(&String::from_utf8_lossy(&k))),
                });
            }
            items.push(decode(&k, &v)?);
            last_key = Some(k);
        }
        Ok(Page {
            items,
            next_cursor: None,
        })
    }

    async fn prune_audit(&self, before_key: &str) -> StoreResult<usize> {
        let before = before_key.as_bytes().to_vec();
        self.blocking(move |t| {
            let mut removed = 0;
            for kv in t.audit.range(..before) {
                let (k, _) = kv?;
                t.audit.remove(&k)?;
                removed += 1;
            }
            Ok(removed)
        })
        .await
    }
}

#[async_trait::async_trait]
impl crate::cluster::ClusterStore for Catalog {
    async fn heartbeat(
        &self,
        replica: &crate::cluster::ReplicaRecord,
        forget_before: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<()> {
        let t = self.trees()?;
        let stale = self.replicas().await?;
        let mut batch = sled::Batch::default();
        for r in stale.iter().filter(|r| r.last_heartbeat < forget_before) {
            batch.remove(r.id.as_bytes());
        }
        batch.insert(replica.id.as_bytes(), encode(replica));
        t.replicas.apply_batch(batch)?;
        Ok(())
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<bool> {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Held {
            holder: String,
            expires_at: chrono::DateTime<chrono::Utc>,
        }
        let t = self.trees()?;
        let key = format!("lease/{name}");
        let now = chrono::Utc::now();
        let mine = Held {
            holder: holder.to_string(),
            expires_at: now + chrono::Duration::from_std(ttl).unwrap_or_default(),
        };
        let current = t.replicas.get(&key)?;
        if let Some(v) = &current {
            let other: Held = decode(key.as_bytes(), v)?;
            if other.holder != holder && other.expires_at >= now {
                return Ok(false);
            }
        }
        // Taken only if nobody changed it since it was read.
        let taken = t
            .replicas
            .compare_and_swap(&key, current, Some(encode(&mine)))?;
        Ok(taken.is_ok())
    }

    async fn changes(&self, _me: &str) -> StoreResult<Option<crate::cluster::ChangeFeed>> {
        // One process writes a sled catalog: nobody else changes it.
        Ok(None)
    }

    async fn drop_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        let t = self.trees()?;
        let key = format!("lease/{name}");
        if let Some(v) = t.replicas.get(&key)? {
            drop_if_held(&t.replicas, key.as_bytes(), v, holder)?;
        }
        Ok(())
    }

    async fn end_leases(&self, holder: &str) -> StoreResult<()> {
        let t = self.trees()?;
        for kv in t.replicas.scan_prefix(b"lease/") {
            let (key, v) = kv?;
            drop_if_held(&t.replicas, &key, v, holder)?;
        }
        Ok(())
    }

    async fn replicas(&self) -> StoreResult<Vec<crate::cluster::ReplicaRecord>> {
        let t = self.trees()?;
        t.replicas
            .iter()
            .filter(|kv| kv.as_ref().map_or(true, |(k, _)| !k.starts_with(b"lease/")))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }
}

/// Removes the lease stored as `v` under `key` if `holder` has it (unless it changed since).
fn drop_if_held(tree: &sled::Tree, key: &[u8], v: sled::IVec, holder: &str) -> StoreResult<()> {
    let held: serde_json::Value = decode(key, &v)?;
    if held["holder"] == holder {
        let _ = tree.compare_and_swap(key, Some(v), None::<Vec<u8>>)?;
    }
    Ok(())
}
