//! API tokens and the audit log in PostgreSQL.

use chrono::{DateTime, Utc};

use super::*;
use crate::audit::{AuditEntry, AuditStore};
use crate::auth::{TokenRecord, TokenStore};

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: String,
    name: String,
    scopes: Vec<String>,
    created_at: DateTime<Utc>,
    created_by: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    hash: String,
}

impl TokenRow {
    fn record(self) -> StoreResult<TokenRecord> {
        Ok(TokenRecord {
            id: self.id,
            name: self.name,
            scopes: self
                .scopes
                .iter()
                .map(|s| parse(s))
                .collect::<StoreResult<_>>()?,
            created_at: self.created_at,
            created_by: self.created_by,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            revoked_at: self.revoked_at,
            hash: self.hash,
        })
    }
}

const TOKEN_COLUMNS: &str =
    "id, name, scopes, created_at, created_by, expires_at, last_used_at, revoked_at, hash";

/// Writes a token's row (insert, or update what may change).
async fn insert_token(t: &TokenRecord, conn: &mut sqlx::PgConnection) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO api_tokens (id, name, scopes, created_at, created_by, expires_at, \
         last_used_at, revoked_at, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (id) DO UPDATE SET name = $2, scopes = $3, expires_at = $6, \
         last_used_at = GREATEST(api_tokens.last_used_at, $7), \
         revoked_at = COALESCE(api_tokens.revoked_at, $8)",
    )
    .bind(&t.id)
    .bind(&t.name)
    .bind(t.scopes.iter().map(text).collect::<Vec<_>>())
    .bind(t.created_at)
    .bind(&t.created_by)
    .bind(t.expires_at)
    .bind(t.last_used_at)
    .bind(t.revoked_at)
    .bind(&t.hash)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

#[async_trait::async_trait]
impl TokenStore for Postgres {
    async fn put_tokens(&self, tokens: &[TokenRecord]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        for t in tokens {
            insert_token(t, &mut tx).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn insert_first_token(&self, t: &TokenRecord, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // Replicas starting together take turns here; the first one's token stays.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('fwrepo: first admin token'))")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let usable: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $1))",
        )
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if usable {
            return Ok(false);
        }
        insert_token(t, &mut tx).await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn all_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY id");
        let rows: Vec<TokenRow> = sqlx::query_as(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        records(rows, TokenRow::record)
    }

    async fn list_tokens(&self, page: &PageRequest) -> StoreResult<Page<TokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE ($1::text IS NULL OR id < $1) \
             ORDER BY id DESC LIMIT $2"
        );
        let rows: Vec<TokenRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(after(page)?)
            .bind(limit_of(page))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let records = records(rows, TokenRow::record)?;
        Ok(page_of(records, page.limit(), |t| t.id.as_str()))
    }
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: String,
    at: DateTime<Utc>,
    who: Option<String>,
    token_id: Option<String>,
    client: String,
    method: String,
    path: String,
    status: i32,
    error: Option<String>,
}

impl From<AuditRow> for AuditEntry {
    fn from(r: AuditRow) -> AuditEntry {
        AuditEntry {
            id: r.id,
            at: r.at,
            who: r.who,
            token_id: r.token_id,
            client: r.client,
            method: r.method,
            path: r.path,
            status: r.status as u16,
            error: r.error,
        }
    }
}

#[async_trait::async_trait]
impl AuditStore for Postgres {
    async fn put_audit(&self, e: &AuditEntry) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit (id, at, who, token_id, client, method, path, status, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&e.id)
        .bind(e.at)
        .bind(&e.who)
        .bind(&e.token_id)
        .bind(&e.client)
        .bind(&e.method)
        .bind(&e.path)
        .bind(i32::from(e.status))
        .bind(&e.error)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn list_audit(
        &self,
        page: &PageRequest,
        since_key: Option<&str>,
    ) -> StoreResult<Page<AuditEntry>> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT id, at, who, token_id, client, method, path, status, error FROM audit \
             WHERE ($1::text IS NULL OR id < $1) AND ($2::text IS NULL OR id >= $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(after(page)?)
        .bind(since_key)
        .bind(limit_of(page))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let entries = rows.into_iter().map(AuditEntry::from).collect();
        Ok(page_of(entries, page.limit(), |e| e.id.as_str()))
    }

    async fn prune_audit(&self, before_key: &str) -> StoreResult<usize> {
        let done = sqlx::query("DELETE FROM audit WHERE id < $1")
            .bind(before_key)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(done.rows_affected() as usize)
    }
}

#[derive(sqlx::FromRow)]
struct ReplicaRow {
    id: String,
    version: String,
    started_at: DateTime<Utc>,
    last_heartbeat: DateTime<Utc>,
    blob_store: String,
    broker: String,
    leases: Vec<String>,
}

#[async_trait::async_trait]
impl crate::cluster::ClusterStore for Postgres {
    async fn heartbeat(
        &self,
        r: &crate::cluster::ReplicaRecord,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.control.begin().await.map_err(db)?;
        sqlx::query(
            "INSERT INTO replicas (id, version, started_at, last_heartbeat, blob_store, broker, \
             leases) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET \
             version = $2, started_at = $3, last_heartbeat = $4, blob_store = $5, broker = $6, \
             leases = $7",
        )
        .bind(&r.id)
        .bind(&r.version)
        .bind(r.started_at)
        .bind(r.last_heartbeat)
        .bind(&r.blob_store)
        .bind(&r.broker)
        .bind(&r.leases)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("DELETE FROM replicas WHERE last_heartbeat < $1")
            .bind(forget_before)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<bool> {
        // Renewed by its holder, or taken over once it expired (the database's clock, so
        // the replicas' clocks do not matter).
        let held: Option<String> = sqlx::query_scalar(
            "INSERT INTO leases (name, holder, expires_at, acquired_at) \
             VALUES ($1, $2, now() + make_interval(secs => $3), now()) \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
             expires_at = EXCLUDED.expires_at, acquired_at = CASE \
             WHEN leases.holder = EXCLUDED.holder THEN leases.acquired_at \
             ELSE EXCLUDED.acquired_at END \
             WHERE leases.holder = EXCLUDED.holder OR leases.expires_at < now() \
             RETURNING holder",
        )
        .bind(name)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&self.control)
        .await
        .map_err(db)?;
        Ok(held.is_some())
    }

    async fn changes(&self, me: &str) -> StoreResult<Option<crate::cluster::ChangeFeed>> {
        use futures::StreamExt;
        let _ = self.origin.set(me.to_string());
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(db)?;
        listener.listen(CHANGES_CHANNEL).await.map_err(db)?;
        let me = me.to_string();
        // A lost connection is re-established by the listener (what was announced meanwhile
        // is missed; the periodic synchronization covers it).
        let feed = listener.into_stream().filter_map(move |n| {
            let changed = match n {
                Ok(n) => crate::cluster::Changed::parse(n.payload(), &me),
                Err(e) => {
                    tracing::warn!(error = %e, "listening for other replicas' changes failed");
                    None
                }
            };
            std::future::ready(changed)
        });
        Ok(Some(Box::pin(feed)))
    }

    async fn drop_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.control)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn end_leases(&self, holder: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM leases WHERE holder = $1")
            .bind(holder)
            .execute(&self.control)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn replicas(&self) -> StoreResult<Vec<crate::cluster::ReplicaRecord>> {
        let rows: Vec<ReplicaRow> = sqlx::query_as(
            "SELECT id, version, started_at, last_heartbeat, blob_store, broker, leases \
             FROM replicas ORDER BY id",
        )
        .fetch_all(&self.control)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|r| crate::cluster::ReplicaRecord {
                id: r.id,
                version: r.version,
                started_at: r.started_at,
                last_heartbeat: r.last_heartbeat,
                blob_store: r.blob_store,
                broker: r.broker,
                leases: r.leases,
            })
            .collect())
    }
}
