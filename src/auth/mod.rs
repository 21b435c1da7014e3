//! API tokens and their scopes. A token is 256 random bits shown once at creation
//! (`fwr_` + base64url); only its SHA-256 is stored (sled tree `api_tokens`) with a name, the
//! scopes, creation, last use (kept in memory and written at most once a minute per token, never
//! per request), an optional expiry and the revocation time. Tokens are high-entropy, so a plain
//! hash is enough: there is nothing to brute-force.
//!
//! Scopes: `read` (every GET, unsigned downloads, `/metrics`), `upload` (release engineers:
//! upload, disable/enable, verify), `operate` (OTA tasks, rollouts, device registry), `admin`
//! (tokens, audit, deletes, and everything else). Every scope includes `read`; `admin` includes
//! every scope.
//!
//! When no usable token exists at start-up (a new data directory, or one from before tokens),
//! an admin token is created and written to `<data-dir>/admin.token` (mode 0600); its path is
//! logged, never the token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod store;
pub use store::TokenStore;

use crate::store::{CatalogError, Page, PageRequest};

/// The file the bootstrap admin token is written to, in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Prefix of every token (lets secret scanners recognise a leaked one).
const PREFIX: &str = "fwr_";

/// What a token may do.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read the API, download unsigned URLs, scrape `/metrics`.
    Read,
    /// Upload firmware; disable, enable and verify it.
    Upload,
    /// Create OTA tasks and rollouts and act on them; edit the device registry.
    Operate,
    /// Everything, including tokens, the audit log and deletes.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Upload, Scope::Operate, Scope::Admin];

    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Upload => "upload",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
        }
    }

    /// Parses a scope name.
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s.trim())
    }
}

/// A stored token: never the token itself.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenRecord {
    /// Id (ULID).
    pub id: String,
    /// Who or what holds it.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// The name of the token that created it (`null` for the bootstrap token).
    pub created_by: Option<String>,
    /// Not accepted after this time.
    pub expires_at: Option<DateTime<Utc>>,
    /// Last accepted (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Revoked: never accepted again.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Hex SHA-256 of the token.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    #[schema(ignore)]
    pub hash: String,
}

impl TokenRecord {
    pub(crate) fn usable(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }

    /// The record as shown by the API (without its hash).
    pub fn public(&self) -> TokenRecord {
        TokenRecord {
            hash: String::new(),
            ..self.clone()
        }
    }
}

/// The caller behind an accepted token.
#[derive(Clone, Debug)]
pub struct Principal {
    /// Token id.
    pub token_id: String,
    /// Token name.
    pub name: String,
    /// Its scopes.
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// The principal used when authentication is off.
    pub fn anonymous_admin() -> Principal {
        Principal {
            token_id: String::new(),
            name: "anonymous (auth off)".into(),
            scopes: vec![Scope::Admin],
        }
    }

    /// Whether this caller may do what `needed` allows.
    pub fn allows(&self, needed: Scope) -> bool {
        needed == Scope::Read
            || self
                .scopes
                .iter()
                .any(|&s| s == Scope::Admin || s == needed)
    }
}

/// Why a request was not authenticated or a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No Authorization header.
    #[error("this endpoint needs an API token: send Authorization: Bearer <token>")]
    Missing,
    /// Not `Bearer <token>`.
    #[error("the Authorization header is not of the form Bearer <token>")]
    Malformed,
    /// Unknown token.
    #[error("the token is not known")]
    Unknown,
    /// Revoked token.
    #[error("the token was revoked")]
    Revoked,
    /// Expired token.
    #[error("the token expired")]
    Expired,
    /// The token lacks the scope.
    #[error("the token lacks the `{0}` scope")]
    Forbidden(&'static str),
    /// Bad input to a token operation.
    #[error("{0}")]
    Invalid(String),
    /// No such token.
    #[error("token {0} not found")]
    NotFound(String),
    /// Storage failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The admin token file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a new token should be.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Who or what holds it (1–64 printable characters).
    pub name: String,
    /// At least one of `read`, `upload`, `operate`, `admin`.
    pub scopes: Vec<Scope>,
    /// Expiry (RFC 3339, in the future); none = never.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// How soon a token created or revoked by another replica sharing the catalog counts here.
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Default)]
struct Tokens {
    by_hash: HashMap<String, TokenRecord>,
    /// Ids whose `last_used_at` changed since the last write.
    dirty: Vec<String>,
}

/// The token store. Cheap to clone.
#[derive(Clone)]
pub struct TokenService {
    store: Arc<dyn TokenStore>,
    tokens: Arc<RwLock<Tokens>>,
    clock: crate::domain::Clock,
}

fn hash_of(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Extracts the token from an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

impl TokenService {
    /// The same service reading time from `clock` (expiry checks).
    pub fn with_clock(mut self, clock: crate::domain::Clock) -> TokenService {
        self.clock = clock;
        self
    }

    /// Loads every stored token.
    pub async fn load(store: Arc<dyn TokenStore>) -> Result<TokenService, AuthError> {
        let mut tokens = Tokens::default();
        for t in store.all_tokens().await? {
            tokens.by_hash.insert(t.hash.clone(), t);
        }
        Ok(TokenService {
            store,
            tokens: Arc::new(RwLock::new(tokens)),
            clock: crate::domain::Clock::default(),
        })
    }

    /// Creates an admin token in `<data_dir>/admin.token` when no usable token exists.
    /// Returns the file's path when it did. Once per deployment: of replicas starting
    /// together on one catalog, one creates it (in its data directory) and the others load it.
    pub async fn bootstrap(&self, data_dir: &Path) -> Result<Option<PathBuf>, AuthError> {
        let now = Utc::now();
        if read(&self.tokens).by_hash.values().any(|t| t.usable(now)) {
            return Ok(None);
        }
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        let (record, secret) = new_token(
            NewToken {
                name: "admin (bootstrap)".into(),
                scopes: vec![Scope::Admin],
                expires_at: None,
            },
            None,
            now,
        )?;
        if !self.store.insert_first_token(&record, now).await? {
            // Another replica was first: its token is the deployment's.
            let stored = self.store.all_tokens().await?;
            let mut tokens = write(&self.tokens);
            for t in stored {
                tokens.by_hash.insert(t.hash.clone(), t);
            }
            return Ok(None);
        }
        write(&self.tokens)
            .by_hash
            .insert(record.hash.clone(), record);
        let io = |source| AuthError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        crate::secrets::write_private(&path, &format!("{secret}\n")).map_err(io)?;
        Ok(Some(path))
    }

    /// Creates a token; returns its record and the token itself (shown once).
    pub async fn create(
        &self,
        new: NewToken,
        created_by: Option<&Principal>,
    ) -> Result<(TokenRecord, String), AuthError> {
        let (record, secret) = new_token(new, created_by, Utc::now())?;
        self.store.put_tokens(std::slice::from_ref(&record)).await?;
        write(&self.tokens)
            .by_hash
            .insert(record.hash.clone(), record.clone());
        Ok((record.public(), secret))
    }

    /// The caller behind `Authorization` header value `header`.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let hash = hash_of(bearer(header)?);
        let now = self.clock.now();
        {
            let tokens = read(&self.tokens);
            let t = tokens.by_hash.get(&hash).ok_or(AuthError::Unknown)?;
            if t.revoked_at.is_some() {
                return Err(AuthError::Revoked);
            }
            if t.expires_at.is_some_and(|e| e <= now) {
                return Err(AuthError::Expired);
            }
            let fresh = t
                .last_used_at
                .is_some_and(|u| now.signed_duration_since(u).num_seconds() < 60);
            if fresh {
                return Ok(principal(t));
            }
        }
        let mut tokens = write(&self.tokens);
        let Tokens { by_hash, dirty } = &mut *tokens;
        let t = by_hash.get_mut(&hash).ok_or(AuthError::Unknown)?;
        t.last_used_at = Some(now);
        dirty.push(t.id.clone());
        Ok(principal(t))
    }

    /// Writes the last-use times that changed (call now and then, and at shutdown).
    pub async fn persist_last_used(&self) -> Result<(), AuthError> {
        let changed: Vec<TokenRecord> = {
            let mut tokens = write(&self.tokens);
            let ids = std::mem::take(&mut tokens.dirty);
            tokens
                .by_hash
                .values()
                .filter(|t| ids.contains(&t.id))
                .cloned()
                .collect()
        };
        if let Err(e) = self.store.put_tokens(&changed).await {
            // Written next time.
            write(&self.tokens)
                .dirty
                .extend(changed.into_iter().map(|t| t.id));
            return Err(e.into());
        }
        Ok(())
    }

    /// Newest-first page of tokens.
    pub async fn list(&self, page: &PageRequest) -> Result<Page<TokenRecord>, AuthError> {
        let mut page = self.store.list_tokens(page).await?;
        let tokens = read(&self.tokens);
        for item in &mut page.items {
            // The in-memory last use is newer than the stored one.
            if let Some(t) = tokens.by_hash.get(&item.hash) {
                item.last_used_at = t.last_used_at;
            }
            *item = item.public();
        }
        Ok(page)
    }

    /// One token.
    pub fn get(&self, id: &str) -> Result<TokenRecord, AuthError> {
        read(&self.tokens)
            .by_hash
            .values()
            .find(|t| t.id == id)
            .map(TokenRecord::public)
            .ok_or_else(|| AuthError::NotFound(id.to_string()))
    }

    /// Revokes a token (idempotent); returns its record.
    pub async fn revoke(&self, id: &str) -> Result<TokenRecord, AuthError> {
        let mut t = read(&self.tokens)
            .by_hash
            .values()
            .find(|t| t.id == id)
            .cloned()
            .ok_or_else(|| AuthError::NotFound(id.to_string()))?;
        if t.revoked_at.is_none() {
            // Stored first: memory changes only once the revocation is durable.
            t.revoked_at = Some(Utc::now());
            self.store.put_tokens(std::slice::from_ref(&t)).await?;
            if let Some(m) = write(&self.tokens).by_hash.get_mut(&t.hash) {
                m.revoked_at = t.revoked_at;
            }
        }
        Ok(t.public())
    }

    /// Takes in what other replicas sharing the catalog changed: tokens they created, and
    /// revocations (a revocation is never undone). Last-use times stay the newest known.
    pub async fn refresh(&self) -> Result<(), AuthError> {
        let stored = self.store.all_tokens().await?;
        let mut tokens = write(&self.tokens);
        for s in stored {
            match tokens.by_hash.get_mut(&s.hash) {
                Some(known) => {
                    known.revoked_at = known.revoked_at.or(s.revoked_at);
                    known.last_used_at = known.last_used_at.max(s.last_used_at);
                    known.expires_at = s.expires_at;
                }
                None => {
                    tokens.by_hash.insert(s.hash.clone(), s);
                }
            }
        }
        Ok(())
    }

    /// Takes in other replicas' changes every [`REFRESH_EVERY`] and writes last-use times
    /// every 30 s until `stop`, then once more.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let mut persist = tokio::time::interval(std::time::Duration::from_secs(30));
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = refresh.tick() => {
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(error = %e, "cannot read the tokens other replicas changed");
                    }
                    continue;
                }
                _ = persist.tick() => {}
            }
            if let Err(e) = self.persist_last_used().await {
                tracing::warn!(error = %e, "cannot record token last use");
            }
        }
        if let Err(e) = self.persist_last_used().await {
            tracing::warn!(error = %e, "cannot record token last use");
        }
    }
}

fn principal(t: &TokenRecord) -> Principal {
    Principal {
        token_id: t.id.clone(),
        name: t.name.clone(),
        scopes: t.scopes.clone(),
    }
}

#[cfg(test)]
mod tests;

/// A new token's record and the token itself, checked.
fn new_token(
    new: NewToken,
    created_by: Option<&Principal>,
    now: DateTime<Utc>,
) -> Result<(TokenRecord, String), AuthError> {
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(AuthError::Invalid(
            "name must be 1-64 printable characters".into(),
        ));
    }
    if new.scopes.is_empty() {
        return Err(AuthError::Invalid(
            "scopes must name at least one of read, upload, operate, admin".into(),
        ));
    }
    if new.expires_at.is_some_and(|e| e <= now) {
        return Err(AuthError::Invalid(
            "expires_at must be in the future".into(),
        ));
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| AuthError::Invalid(format!("no randomness available: {e}")))?;
    let secret = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let mut scopes = new.scopes;
    scopes.sort();
    scopes.dedup();
    let record = TokenRecord {
        id: crate::domain::ids::next(),
        name: name.to_string(),
        scopes,
        created_at: now,
        created_by: created_by.map(|p| p.name.clone()),
        expires_at: new.expires_at,
        last_used_at: None,
        revoked_at: None,
        hash: hash_of(&secret),
    };
    Ok((record, secret))
}
