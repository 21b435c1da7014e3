//! Firmware records, pending uploads, download sessions and idempotency answers in
//! PostgreSQL.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;

use super::*;
use crate::domain::{FirmwareId, ProductVersion};
use crate::store::{
    CommitOutcome, DownloadSessionRecord, Edit, FirmwareQuery, FirmwareRecord, FirmwareStore,
    IDEMPOTENCY_WINDOW, IdempotencyStore, IdempotentAnswer, PendingUpload, SCHEMA_VERSION,
    SessionQuery, SessionStore, UploadStore,
};

const FIRMWARE_COLUMNS: &str = "id, file_name, model, product_version, file_size, md5, sha256, \
    release_note, build_time, created_at, status, verify_status, verified_at, deleted_at, blob_key";

#[derive(sqlx::FromRow)]
struct FirmwareRow {
    id: String,
    file_name: String,
    model: String,
    product_version: String,
    file_size: i64,
    md5: String,
    sha256: String,
    release_note: Option<String>,
    build_time: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    status: String,
    verify_status: Option<String>,
    verified_at: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
    blob_key: String,
}

impl FirmwareRow {
    fn record(self) -> StoreResult<FirmwareRecord> {
        let id = FirmwareId::parse(&self.id).ok_or_else(|| {
            CatalogError::Storage(format!("firmware id {} is not an id", self.id).into())
        })?;
        Ok(FirmwareRecord {
            v: SCHEMA_VERSION,
            id,
            file_name: self.file_name,
            model: self.model,
            product_version: self.product_version,
            file_size: self.file_size as u64,
            md5: self.md5,
            sha256: self.sha256,
            release_note: self.release_note,
            build_time: self.build_time,
            created_at: self.created_at,
            status: parse(&self.status)?,
            verify_status: self.verify_status.as_deref().map(parse).transpose()?,
            verified_at: self.verified_at,
            deleted_at: self.deleted_at,
            blob_key: self.blob_key,
        })
    }
}

/// Lower-cased model and the normalized version's sort key: the live-version index.
fn version_of(r: &FirmwareRecord) -> StoreResult<(String, Vec<u8>)> {
    let v = ProductVersion::parse(&r.product_version)
        .map_err(|e| CatalogError::Storage(e.to_string().into()))?;
    Ok((r.model.to_lowercase(), v.sort_key()))
}

/// `INSERT` of a whole record; `$1…$17`.
const INSERT_FIRMWARE: &str = "INSERT INTO firmware (id, file_name, model, model_key, \
    product_version, version_key, file_size, md5, sha256, release_note, build_time, created_at, \
    status, verify_status, verified_at, deleted_at, blob_key) VALUES ($1, $2, $3, $4, $5, $6, $7, \
    $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) ON CONFLICT DO NOTHING";

fn bind_firmware<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    r: &'q FirmwareRecord,
    model_key: String,
    version_key: Vec<u8>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(r.id.as_str())
        .bind(&r.file_name)
        .bind(&r.model)
        .bind(model_key)
        .bind(&r.product_version)
        .bind(version_key)
        .bind(r.file_size as i64)
        .bind(&r.md5)
        .bind(&r.sha256)
        .bind(&r.release_note)
        .bind(r.build_time)
        .bind(r.created_at)
        .bind(text(&r.status))
        .bind(r.verify_status.as_ref().map(text))
        .bind(r.verified_at)
        .bind(r.deleted_at)
        .bind(&r.blob_key)
}

#[async_trait::async_trait]
impl FirmwareStore for Postgres {
    async fn firmware(&self, id: &FirmwareId) -> StoreResult<FirmwareRecord> {
        let sql = format!("SELECT {FIRMWARE_COLUMNS} FROM firmware WHERE id = $1");
        let row: FirmwareRow = sqlx::query_as(AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        row.record()
    }

    async fn list_firmware(
        &self,
        query: &FirmwareQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<FirmwareRecord>> {
        let sql = format!(
            "SELECT {FIRMWARE_COLUMNS} FROM firmware WHERE ($1::text IS NULL OR id < $1) \
             AND ($2::text IS NULL OR model_key = $2) AND ($3::bytea IS NULL OR version_key = $3) \
             AND ($4::text IS NULL OR status = $4) AND (NOT $5 OR status <> 'deleted') \
             ORDER BY id DESC LIMIT $6"
        );
        let rows: Vec<FirmwareRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(after(page)?)
            .bind(query.model.as_ref().map(|m| m.to_lowercase()))
            .bind(query.version.as_ref().map(ProductVersion::sort_key))
            .bind(query.status.as_ref().map(text))
            .bind(query.live_only)
            .bind(limit_of(page))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let records = records(rows, FirmwareRow::record)?;
        Ok(page_of(records, page.limit(), |r| r.id.as_str()))
    }

    fn all_firmware(&self) -> BoxStream<'_, StoreResult<FirmwareRecord>> {
        let sql = format!("SELECT {FIRMWARE_COLUMNS} FROM firmware ORDER BY id");
        Box::pin(
            futures::stream::once(async move {
                sqlx::query_as::<_, FirmwareRow>(AssertSqlSafe(sql))
                    .fetch(&self.pool)
                    .map(|r| r.map_err(db).and_then(FirmwareRow::record))
            })
            .flatten(),
        )
    }

    async fn commit_firmware(
        &self,
        record: &FirmwareRecord,
        upload_id: &str,
    ) -> StoreResult<CommitOutcome> {
        let (model_key, version_key) = version_of(record)?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        let q = sqlx::query(INSERT_FIRMWARE);
        let inserted = bind_firmware(q, record, model_key.clone(), version_key.clone())
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        if inserted == 0 {
            let sql = format!(
                "SELECT {FIRMWARE_COLUMNS} FROM firmware WHERE model_key = $1 \
                 AND version_key = $2 AND status <> 'deleted'"
            );
            let existing: FirmwareRow = sqlx::query_as(AssertSqlSafe(sql))
                .bind(&model_key)
                .bind(&version_key)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
            let existing = existing.record()?;
            return Ok(
                if existing.sha256 == record.sha256 && existing.file_size == record.file_size {
                    CommitOutcome::Duplicate(existing)
                } else {
                    CommitOutcome::Conflict(existing)
                },
            );
        }
        sqlx::query("DELETE FROM pending_uploads WHERE id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(CommitOutcome::Created(record.clone()))
    }

    async fn update_firmware(
        &self,
        id: &FirmwareId,
        edit: Edit<'_, FirmwareRecord>,
    ) -> StoreResult<FirmwareRecord> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let sql = format!("SELECT {FIRMWARE_COLUMNS} FROM firmware WHERE id = $1 FOR UPDATE");
        let row: FirmwareRow = sqlx::query_as(AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let mut record = row.record()?;
        edit(&mut record);
        sqlx::query(
            "UPDATE firmware SET file_name = $2, release_note = $3, status = $4, \
             verify_status = $5, verified_at = $6, deleted_at = $7 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(&record.file_name)
        .bind(&record.release_note)
        .bind(text(&record.status))
        .bind(record.verify_status.as_ref().map(text))
        .bind(record.verified_at)
        .bind(record.deleted_at)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(record)
    }

    async fn import_firmware(&self, record: &FirmwareRecord) -> StoreResult<bool> {
        let (model_key, version_key) = version_of(record)?;
        let q = sqlx::query(INSERT_FIRMWARE);
        let inserted = bind_firmware(q, record, model_key, version_key)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected();
        Ok(inserted == 1)
    }
}

#[derive(sqlx::FromRow)]
struct PendingRow {
    id: String,
    blob_key: String,
    multipart_id: Option<String>,
    started_at: DateTime<Utc>,
}

#[async_trait::async_trait]
impl UploadStore for Postgres {
    async fn put_pending_upload(&self, upload: &PendingUpload) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO pending_uploads (id, blob_key, multipart_id, started_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET blob_key = $2, \
             multipart_id = $3, started_at = $4",
        )
        .bind(&upload.id)
        .bind(&upload.blob_key)
        .bind(&upload.multipart_id)
        .bind(upload.started_at)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn remove_pending_upload(&self, id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM pending_uploads WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn pending_uploads(&self) -> StoreResult<Vec<PendingUpload>> {
        let rows: Vec<PendingRow> = sqlx::query_as(
            "SELECT id, blob_key, multipart_id, started_at FROM pending_uploads ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|r| PendingUpload {
                v: SCHEMA_VERSION,
                id: r.id,
                blob_key: r.blob_key,
                multipart_id: r.multipart_id,
                started_at: r.started_at,
            })
            .collect())
    }
}

const SESSION_COLUMNS: &str = "id, firmware_id, task_id, sn, client, user_agent, file_size, \
    bytes_sent, bytes_covered, percent, requests, state, started_at, last_seen_at, covered";

#[derive(sqlx::FromRow)]
struct SessionRow {
    id: String,
    firmware_id: String,
    task_id: Option<String>,
    sn: Option<String>,
    client: String,
    user_agent: String,
    file_size: i64,
    bytes_sent: i64,
    bytes_covered: i64,
    percent: f64,
    requests: i64,
    state: String,
    started_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
    covered: sqlx::types::Json<Vec<(u64, u64)>>,
}

impl SessionRow {
    fn record(self) -> StoreResult<DownloadSessionRecord> {
        let firmware_id = FirmwareId::parse(&self.firmware_id).ok_or_else(|| {
            CatalogError::Storage(format!("session {}: bad firmware id", self.id).into())
        })?;
        Ok(DownloadSessionRecord {
            v: SCHEMA_VERSION,
            id: self.id,
            firmware_id,
            task_id: self.task_id,
            sn: self.sn,
            client: self.client,
            user_agent: self.user_agent,
            file_size: self.file_size as u64,
            bytes_sent: self.bytes_sent as u64,
            bytes_covered: self.bytes_covered as u64,
            percent: self.percent,
            requests: self.requests as u64,
            state: parse(&self.state)?,
            started_at: self.started_at,
            last_seen_at: self.last_seen_at,
            covered: self.covered.0,
        })
    }
}

/// Sessions as column arrays, for one `UNNEST` statement per batch.
#[derive(Default)]
struct SessionColumns {
    id: Vec<String>,
    firmware_id: Vec<String>,
    task_id: Vec<Option<String>>,
    sn: Vec<Option<String>>,
    client: Vec<String>,
    user_agent: Vec<String>,
    file_size: Vec<i64>,
    bytes_sent: Vec<i64>,
    bytes_covered: Vec<i64>,
    percent: Vec<f64>,
    requests: Vec<i64>,
    state: Vec<String>,
    started_at: Vec<DateTime<Utc>>,
    last_seen_at: Vec<DateTime<Utc>>,
    covered: Vec<String>,
}

impl SessionColumns {
    fn of(sessions: &[DownloadSessionRecord]) -> SessionColumns {
        let mut c = SessionColumns::default();
        for s in sessions {
            c.id.push(s.id.clone());
            c.firmware_id.push(s.firmware_id.to_string());
            c.task_id.push(s.task_id.clone());
            c.sn.push(s.sn.clone());
            c.client.push(s.client.clone());
            c.user_agent.push(s.user_agent.clone());
            c.file_size.push(s.file_size as i64);
            c.bytes_sent.push(s.bytes_sent as i64);
            c.bytes_covered.push(s.bytes_covered as i64);
            c.percent.push(s.percent);
            c.requests.push(s.requests as i64);
            c.state.push(text(&s.state));
            c.started_at.push(s.started_at);
            c.last_seen_at.push(s.last_seen_at);
            c.covered
                .push(serde_json::to_string(&s.covered).unwrap_or_else(|_| "[]".into()));
        }
        c
    }

    /// `sql` with `$1…$15` bound to the columns.
    async fn execute(&self, sql: &str, tx: &mut sqlx::PgConnection) -> StoreResult<()> {
        sqlx::query(AssertSqlSafe(sql.to_string()))
            .bind(&self.id)
            .bind(&self.firmware_id)
            .bind(&self.task_id)
            .bind(&self.sn)
            .bind(&self.client)
            .bind(&self.user_agent)
            .bind(&self.file_size)
            .bind(&self.bytes_sent)
            .bind(&self.bytes_covered)
            .bind(&self.percent)
            .bind(&self.requests)
            .bind(&self.state)
            .bind(&self.started_at)
            .bind(&self.last_seen_at)
            .bind(&self.covered)
            .execute(tx)
            .await
            .map_err(db)?;
        Ok(())
    }
}

const SESSIONS_UNNEST: &str = "SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], \
    $4::text[], $5::text[], $6::text[], $7::int8[], $8::int8[], $9::int8[], $10::float8[], \
    $11::int8[], $12::text[], $13::timestamptz[], $14::timestamptz[], $15::text[])";

#[async_trait::async_trait]
impl SessionStore for Postgres {
    async fn merge_sessions(&self, sessions: &[DownloadSessionRecord]) -> StoreResult<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let mut tx = self.background.begin().await.map_err(db)?;
        // New sessions are inserted as they are; then every row of the batch is locked, so a
        // concurrent writer of the same session merges after this one, never over it.
        let insert = format!(
            "INSERT INTO download_sessions ({SESSION_COLUMNS}) SELECT u.column1, u.column2, \
             u.column3, u.column4, u.column5, u.column6, u.column7, u.column8, u.column9, \
             u.column10, u.column11, u.column12, u.column13, u.column14, u.column15::jsonb \
             FROM ({SESSIONS_UNNEST}) AS u(column1, column2, column3, column4, column5, column6, \
             column7, column8, column9, column10, column11, column12, column13, column14, column15) \
             ON CONFLICT (id) DO NOTHING"
        );
        SessionColumns::of(sessions)
            .execute(&insert, &mut tx)
            .await?;
        let ids: Vec<String> = sessions.iter().map(|s| s.id.clone()).collect();
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM download_sessions WHERE id = ANY($1) FOR UPDATE"
        );
        let stored: Vec<SessionRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let mut stored: std::collections::HashMap<String, DownloadSessionRecord> = stored
            .into_iter()
            .map(|r| r.record().map(|s| (s.id.clone(), s)))
            .collect::<StoreResult<_>>()?;
        let merged: Vec<DownloadSessionRecord> = sessions
            .iter()
            .map(|s| match stored.remove(&s.id) {
                Some(old) => old.merged(s),
                None => s.clone(),
            })
            .collect();
        let update = format!(
            "UPDATE download_sessions AS d SET bytes_sent = u.column8, bytes_covered = u.column9, \
             percent = u.column10, requests = u.column11, state = u.column12, \
             started_at = u.column13, last_seen_at = u.column14, covered = u.column15::jsonb \
             FROM ({SESSIONS_UNNEST}) AS u(column1, column2, column3, column4, column5, column6, \
             column7, column8, column9, column10, column11, column12, column13, column14, column15) \
             WHERE d.id = u.column1"
        );
        SessionColumns::of(&merged)
            .execute(&update, &mut tx)
            .await?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn list_sessions(
        &self,
        query: &SessionQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<DownloadSessionRecord>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM download_sessions WHERE ($1::text IS NULL OR id < $1) \
             AND ($2::text IS NULL OR state = $2) AND ($3::text IS NULL OR firmware_id = $3) \
             AND ($4::text IS NULL OR (task_id = $4 AND sn = $5)) ORDER BY id DESC LIMIT $6"
        );
        let (task, sn) = query.task_device.clone().unzip();
        let rows: Vec<SessionRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(after(page)?)
            .bind(query.state.as_ref().map(text))
            .bind(query.firmware_id.as_ref().map(|f| f.to_string()))
            .bind(task)
            .bind(sn)
            .bind(limit_of(page))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let records = records(rows, SessionRow::record)?;
        Ok(page_of(records, page.limit(), |s| s.id.as_str()))
    }

    async fn recent_sessions(
        &self,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<DownloadSessionRecord>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM download_sessions WHERE last_seen_at >= $1 ORDER BY id"
        );
        let rows: Vec<SessionRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        records(rows, SessionRow::record)
    }

    async fn prune_sessions(&self, cutoff: DateTime<Utc>) -> StoreResult<usize> {
        let done = sqlx::query("DELETE FROM download_sessions WHERE last_seen_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(done.rows_affected() as usize)
    }
}

#[derive(sqlx::FromRow)]
struct AnswerRow {
    body_hash: String,
    answer: sqlx::types::Json<serde_json::Value>,
    at: DateTime<Utc>,
}

impl AnswerRow {
    fn answer(self) -> IdempotentAnswer {
        IdempotentAnswer {
            body_hash: self.body_hash,
            answer: self.answer.0,
            at: self.at,
        }
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for Postgres {
    async fn idempotent(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<IdempotentAnswer>> {
        let row: Option<AnswerRow> = sqlx::query_as(
            "SELECT body_hash, answer, at FROM idempotency WHERE key = $1 AND at >= $2",
        )
        .bind(key)
        .bind(now - IDEMPOTENCY_WINDOW)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(row.map(AnswerRow::answer))
    }

    async fn record_idempotent(
        &self,
        key: &str,
        answer: &IdempotentAnswer,
    ) -> StoreResult<Option<IdempotentAnswer>> {
        // Inserted, or replacing an answer past the window; a live one is kept.
        let recorded = sqlx::query(
            "INSERT INTO idempotency (key, body_hash, answer, at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (key) DO UPDATE SET body_hash = $2, answer = $3, at = $4 \
             WHERE idempotency.at < $5",
        )
        .bind(key)
        .bind(&answer.body_hash)
        .bind(sqlx::types::Json(&answer.answer))
        .bind(answer.at)
        .bind(answer.at - IDEMPOTENCY_WINDOW)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        if recorded == 1 {
            return Ok(None);
        }
        let first: AnswerRow =
            sqlx::query_as("SELECT body_hash, answer, at FROM idempotency WHERE key = $1")
                .bind(key)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
        Ok(Some(first.answer()))
    }

    async fn prune_idempotency(&self, now: DateTime<Utc>) -> StoreResult<usize> {
        let done = sqlx::query("DELETE FROM idempotency WHERE at < $1")
            .bind(now - IDEMPOTENCY_WINDOW)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(done.rows_affected() as usize)
    }
}
