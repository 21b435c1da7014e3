//! API tokens and the audit log.

use super::*;

impl Catalog {
    /// Stores an API token record (only the token's hash is in it) under its id.
    pub fn put_token<T: serde::Serialize>(&self, id: &str, token: &T) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.tokens.insert(id.as_bytes(), encode(token))?;
        Ok(())
    }

    /// Every API token record.
    pub fn all_tokens<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, CatalogError> {
        let t = self.trees()?;
        t.tokens
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Newest-first page of API token records.
    pub fn list_tokens<T: serde::de::DeserializeOwned>(
        &self,
        page: &PageRequest,
    ) -> Result<Page<T>, CatalogError> {
        let t = self.trees()?;
        page_desc(&t.tokens, page, |_: &T| true)
    }

    /// Appends an audit entry under its (time-ordered) id.
    pub fn put_audit<T: serde::Serialize>(&self, id: &str, entry: &T) -> Result<(), CatalogError> {
        let t = self.trees()?;
        t.audit.insert(id.as_bytes(), encode(entry))?;
        Ok(())
    }

    /// Newest-first page of audit entries whose id sorts at or after `since_key`.
    pub fn list_audit<T: serde::de::DeserializeOwned>(
        &self,
        page: &PageRequest,
        since_key: Option<&str>,
    ) -> Result<Page<T>, CatalogError> {
        let t = self.trees()?;
        let Some(since) = since_key else {
            return page_desc(&t.audit, page, |_: &T| true);
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

    /// Removes audit entries whose id sorts before `before_key`; returns how many.
    pub fn prune_audit(&self, before_key: &str) -> Result<usize, CatalogError> {
        let t = self.trees()?;
        let mut removed = 0;
        for kv in t.audit.range(..before_key.as_bytes()) {
            let (k, _) = kv?;
            t.audit.remove(&k)?;
            removed += 1;
        }
        Ok(removed)
    }
}
