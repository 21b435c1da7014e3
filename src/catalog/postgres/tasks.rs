//! OTA tasks (with their devices, appended history and claims) in PostgreSQL.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::*;
use crate::ota::store::{Claimed, Stored, TaskKey, TaskQuery, TaskStore, held_serials};
use crate::ota::task::HistoryEntry;
use crate::ota::{OtaTask, Progress, TaskDevice, TaskStatus};

const TASK_COLUMNS: &str = "id, gateway_sn, tid, bid, status, created_at, updated_at, percent, \
    step_key, sub_status, rate, result_code, result_reason, retryable, replied_at, \
    last_event_at, finished_at, revision";

#[derive(sqlx::FromRow)]
struct TaskRow {
    id: String,
    gateway_sn: String,
    tid: String,
    bid: String,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    percent: Option<i64>,
    step_key: Option<String>,
    sub_status: Option<String>,
    rate: Option<i64>,
    result_code: Option<i64>,
    result_reason: Option<String>,
    retryable: Option<bool>,
    replied_at: Option<DateTime<Utc>>,
    last_event_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    revision: i64,
}

#[derive(sqlx::FromRow)]
struct TaskDeviceRow {
    task_id: String,
    sn: String,
    firmware_id: String,
    product_version: String,
    upgrade_type: Option<i16>,
    policy_rule: i16,
    policy_reason: String,
    file_url: String,
    file_name: String,
    md5: String,
    file_size: i64,
    outcome: String,
    outcome_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct HistoryRow {
    task_id: String,
    at: DateTime<Utc>,
    source: String,
    status: String,
    percent: Option<i64>,
    step_key: Option<String>,
    sub_status: Option<String>,
    rate: Option<i64>,
    raw: Option<String>,
    repeats: i64,
}

impl Postgres {
    /// Whole tasks from their rows: devices and history in one statement each.
    async fn assemble(
        &self,
        rows: Vec<TaskRow>,
        conn: &mut sqlx::PgConnection,
    ) -> StoreResult<Vec<OtaTask>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let devices: Vec<TaskDeviceRow> = sqlx::query_as(
            "SELECT task_id, sn, firmware_id, product_version, upgrade_type, policy_rule, \
             policy_reason, file_url, file_name, md5, file_size, outcome, outcome_at \
             FROM ota_task_devices WHERE task_id = ANY($1) ORDER BY task_id, position",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        let history: Vec<HistoryRow> = sqlx::query_as(
            "SELECT task_id, at, source, status, percent, step_key, sub_status, rate, \
             raw::text AS raw, repeats FROM ota_task_history WHERE task_id = ANY($1) \
             ORDER BY task_id, seq",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        let mut by_task: HashMap<String, OtaTask> = HashMap::new();
        let mut order = Vec::with_capacity(rows.len());
        for r in rows {
            order.push(r.id.clone());
            let task = OtaTask {
                status: parse(&r.status)?,
                id: r.id,
                gateway_sn: r.gateway_sn,
                tid: r.tid,
                bid: r.bid,
                created_at: r.created_at,
                updated_at: r.updated_at,
                devices: Vec::new(),
                progress: Progress {
                    percent: r.percent,
                    step_key: r.step_key,
                    sub_status: r.sub_status,
                    rate: r.rate,
                },
                result_code: r.result_code,
                result_reason: r.result_reason,
                retryable: r.retryable,
                history: Vec::new(),
                replied_at: r.replied_at,
                last_event_at: r.last_event_at,
                finished_at: r.finished_at,
                revision: r.revision as u64,
            };
            by_task.insert(task.id.clone(), task);
        }
        for d in devices {
            if let Some(t) = by_task.get_mut(&d.task_id) {
                t.devices.push(TaskDevice {
                    sn: d.sn,
                    firmware_id: d.firmware_id,
                    product_version: d.product_version,
                    upgrade_type: d.upgrade_type.map(|u| u as u8),
                    policy_rule: d.policy_rule as u8,
                    policy_reason: d.policy_reason,
                    file_url: d.file_url,
                    file_name: d.file_name,
                    md5: d.md5,
                    file_size: d.file_size as u64,
                    download_session: None,
                    outcome: parse(&d.outcome)?,
                    outcome_at: d.outcome_at,
                });
            }
        }
        for h in history {
            if let Some(t) = by_task.get_mut(&h.task_id) {
                t.history.push(HistoryEntry {
                    at: h.at,
                    source: h.source,
                    status: parse(&h.status)?,
                    progress: Progress {
                        percent: h.percent,
                        step_key: h.step_key,
                        sub_status: h.sub_status,
                        rate: h.rate,
                    },
                    raw: h.raw.and_then(|text| RawValue::from_string(text).ok()),
                    repeats: h.repeats as u64,
                });
            }
        }
        Ok(order
            .into_iter()
            .filter_map(|id| by_task.remove(&id))
            .collect())
    }

    /// Tasks whose rows `sql` (with `$1…` bound by `bind`) selects.
    async fn tasks_where(
        &self,
        sql: &str,
        bind: impl FnOnce(
            sqlx::query::QueryAs<'_, sqlx::Postgres, TaskRow, sqlx::postgres::PgArguments>,
        ) -> sqlx::query::QueryAs<
            '_,
            sqlx::Postgres,
            TaskRow,
            sqlx::postgres::PgArguments,
        >,
    ) -> StoreResult<Vec<OtaTask>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        let rows: Vec<TaskRow> = bind(sqlx::query_as(AssertSqlSafe(sql.to_string())))
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
        self.assemble(rows, &mut conn).await
    }
}

/// The values of `f` for every element of `items`, as one array parameter.
fn column<T, V>(items: &[T], f: impl Fn(&T) -> V) -> Vec<V> {
    items.iter().map(f).collect()
}

/// Writes the task rows (insert or update), one statement for all.
async fn write_tasks(tasks: &[&OtaTask], conn: &mut sqlx::PgConnection) -> StoreResult<()> {
    let updates = excluded(TASK_COLUMNS);
    let sql = format!(
        "INSERT INTO ota_tasks ({TASK_COLUMNS}, final) SELECT * FROM UNNEST($1::text[], \
         $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[], \
         $8::int8[], $9::text[], $10::text[], $11::int8[], $12::int8[], $13::text[], \
         $14::bool[], $15::timestamptz[], $16::timestamptz[], $17::timestamptz[], $18::int8[], \
         $19::bool[]) \
         ON CONFLICT (id) DO UPDATE SET {updates}, final = EXCLUDED.final"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(column(tasks, |t| t.id.clone()))
        .bind(column(tasks, |t| t.gateway_sn.clone()))
        .bind(column(tasks, |t| t.tid.clone()))
        .bind(column(tasks, |t| t.bid.clone()))
        .bind(column(tasks, |t| text(&t.status)))
        .bind(column(tasks, |t| t.created_at))
        .bind(column(tasks, |t| t.updated_at))
        .bind(column(tasks, |t| t.progress.percent))
        .bind(column(tasks, |t| t.progress.step_key.clone()))
        .bind(column(tasks, |t| t.progress.sub_status.clone()))
        .bind(column(tasks, |t| t.progress.rate))
        .bind(column(tasks, |t| t.result_code))
        .bind(column(tasks, |t| t.result_reason.clone()))
        .bind(column(tasks, |t| t.retryable))
        .bind(column(tasks, |t| t.replied_at))
        .bind(column(tasks, |t| t.last_event_at))
        .bind(column(tasks, |t| t.finished_at))
        .bind(column(tasks, |t| t.revision as i64))
        .bind(column(tasks, |t| t.status.is_final()))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Writes the tasks' devices (at most two rows each), one statement for all.
async fn write_devices(tasks: &[&OtaTask], conn: &mut sqlx::PgConnection) -> StoreResult<()> {
    let rows: Vec<(&OtaTask, usize, &TaskDevice)> = tasks
        .iter()
        .flat_map(|t| t.devices.iter().enumerate().map(move |(i, d)| (*t, i, d)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO ota_task_devices (task_id, position, sn, firmware_id, product_version, \
         upgrade_type, policy_rule, policy_reason, file_url, file_name, md5, file_size, \
         outcome, outcome_at) SELECT * FROM UNNEST($1::text[], $2::int4[], $3::text[], \
         $4::text[], $5::text[], $6::int2[], $7::int2[], $8::text[], $9::text[], $10::text[], \
         $11::text[], $12::int8[], $13::text[], $14::timestamptz[]) \
         ON CONFLICT (task_id, position) DO UPDATE SET outcome = EXCLUDED.outcome, \
         outcome_at = EXCLUDED.outcome_at",
    )
    .bind(column(&rows, |(t, _, _)| t.id.clone()))
    .bind(column(&rows, |(_, i, _)| *i as i32))
    .bind(column(&rows, |(_, _, d)| d.sn.clone()))
    .bind(column(&rows, |(_, _, d)| d.firmware_id.clone()))
    .bind(column(&rows, |(_, _, d)| d.product_version.clone()))
    .bind(column(&rows, |(_, _, d)| d.upgrade_type.map(i16::from)))
    .bind(column(&rows, |(_, _, d)| i16::from(d.policy_rule)))
    .bind(column(&rows, |(_, _, d)| d.policy_reason.clone()))
    .bind(column(&rows, |(_, _, d)| d.file_url.clone()))
    .bind(column(&rows, |(_, _, d)| d.file_name.clone()))
    .bind(column(&rows, |(_, _, d)| d.md5.clone()))
    .bind(column(&rows, |(_, _, d)| d.file_size as i64))
    .bind(column(&rows, |(_, _, d)| text(&d.outcome)))
    .bind(column(&rows, |(_, _, d)| d.outcome_at))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Appends each task's history entries from its stored count on (the entry before them may
/// have counted a repeat since, and is rewritten with them), one statement for all.
async fn append_history(
    tasks: &[(&OtaTask, usize)],
    conn: &mut sqlx::PgConnection,
) -> StoreResult<()> {
    let rows: Vec<(&str, usize, &HistoryEntry)> = tasks
        .iter()
        .flat_map(|(t, stored)| {
            let from = stored.saturating_sub(1).min(t.history.len());
            t.history[from..]
                .iter()
                .enumerate()
                .map(move |(i, h)| (t.id.as_str(), from + i, h))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO ota_task_history (task_id, seq, at, source, status, percent, step_key, \
         sub_status, rate, raw, repeats) SELECT u.task_id, u.seq, u.at, u.source, u.status, \
         u.percent, u.step_key, u.sub_status, u.rate, u.raw::json, u.repeats FROM \
         UNNEST($1::text[], $2::int4[], $3::timestamptz[], $4::text[], $5::text[], $6::int8[], \
         $7::text[], $8::text[], $9::int8[], $10::text[], $11::int8[]) AS u(task_id, seq, at, \
         source, status, percent, step_key, sub_status, rate, raw, repeats) \
         ON CONFLICT (task_id, seq) DO UPDATE SET repeats = EXCLUDED.repeats",
    )
    .bind(column(&rows, |(id, _, _)| id.to_string()))
    .bind(column(&rows, |(_, seq, _)| *seq as i32))
    .bind(column(&rows, |(_, _, h)| h.at))
    .bind(column(&rows, |(_, _, h)| h.source.clone()))
    .bind(column(&rows, |(_, _, h)| text(&h.status)))
    .bind(column(&rows, |(_, _, h)| h.progress.percent))
    .bind(column(&rows, |(_, _, h)| h.progress.step_key.clone()))
    .bind(column(&rows, |(_, _, h)| h.progress.sub_status.clone()))
    .bind(column(&rows, |(_, _, h)| h.progress.rate))
    .bind(column(&rows, |(_, _, h)| {
        h.raw.as_ref().map(|r| r.get().to_string())
    }))
    .bind(column(&rows, |(_, _, h)| h.repeats as i64))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

#[async_trait::async_trait]
impl TaskStore for Postgres {
    async fn task(&self, id: &str) -> StoreResult<Option<OtaTask>> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM ota_tasks WHERE id = $1");
        let mut found = self.tasks_where(&sql, |q| q.bind(id.to_string())).await?;
        Ok(found.pop())
    }

    async fn recent_tasks(&self, since: DateTime<Utc>) -> StoreResult<Vec<OtaTask>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM ota_tasks WHERE NOT final OR finished_at >= $1 ORDER BY id"
        );
        self.tasks_where(&sql, |q| q.bind(since)).await
    }

    async fn open_task_ids(&self) -> StoreResult<Vec<String>> {
        sqlx::query_scalar("SELECT id FROM ota_tasks WHERE NOT final")
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    async fn tasks_by_id(&self, ids: &[String]) -> StoreResult<Vec<OtaTask>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!("SELECT {TASK_COLUMNS} FROM ota_tasks WHERE id = ANY($1)");
        self.tasks_where(&sql, |q| q.bind(ids.to_vec())).await
    }

    async fn device_package(&self, id: &str, sn: &str) -> StoreResult<Option<(String, String)>> {
        sqlx::query_as(
            "SELECT firmware_id, file_name FROM ota_task_devices WHERE task_id = $1 AND sn = $2",
        )
        .bind(id)
        .bind(sn)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)
    }

    async fn task_statuses(&self, ids: &[String]) -> StoreResult<Vec<(String, TaskStatus)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, status FROM ota_tasks WHERE id = ANY($1)")
                .bind(ids)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|(id, status)| Ok((id, parse(&status)?)))
            .collect()
    }

    async fn find_task(&self, key: TaskKey<'_>) -> StoreResult<Option<OtaTask>> {
        let (sql, value) = match key {
            TaskKey::Tid(tid) => ("tid = $1 ORDER BY id DESC LIMIT 1", tid),
            TaskKey::Bid(bid) => ("bid = $1 ORDER BY id DESC LIMIT 1", bid),
            TaskKey::OpenFor(sn) => (
                "id = (SELECT task_id FROM ota_claims WHERE sn = $1) AND NOT final",
                sn,
            ),
        };
        let sql = format!("SELECT {TASK_COLUMNS} FROM ota_tasks WHERE {sql}");
        let mut found = self
            .tasks_where(&sql, |q| q.bind(value.to_string()))
            .await?;
        Ok(found.pop())
    }

    async fn list_tasks(
        &self,
        query: &TaskQuery,
        page: &PageRequest,
    ) -> StoreResult<Page<OtaTask>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM ota_tasks WHERE ($1::text IS NULL OR id < $1) \
             AND ($2::text IS NULL OR gateway_sn = $2) AND ($3::text IS NULL OR status = $3) \
             ORDER BY id DESC LIMIT $4"
        );
        let (cursor, limit) = (after(page)?, limit_of(page));
        let gateway = query.gateway_sn.clone();
        let status = query.status.as_ref().map(text);
        let tasks = self
            .tasks_where(&sql, |q| {
                q.bind(cursor).bind(gateway).bind(status).bind(limit)
            })
            .await?;
        Ok(page_of(tasks, page.limit(), |t| t.id.as_str()))
    }

    async fn insert_task(&self, task: &OtaTask) -> StoreResult<Claimed> {
        let sns = held_serials(task);
        let mut tx = self.pool.begin().await.map_err(db)?;
        write_tasks(&[task], &mut tx).await?;
        write_devices(&[task], &mut tx).await?;
        append_history(&[(task, 0)], &mut tx).await?;
        // One row per serial: a concurrent creation waits here for this one and then finds
        // the serial held. A claim left by a task that is final is taken over.
        let claimed: Vec<String> = sqlx::query_scalar(
            "INSERT INTO ota_claims (sn, task_id) SELECT unnest($1::text[]), $2 \
             ON CONFLICT (sn) DO UPDATE SET task_id = EXCLUDED.task_id \
             WHERE (SELECT final FROM ota_tasks WHERE id = ota_claims.task_id) \
             RETURNING sn",
        )
        .bind(&sns)
        .bind(&task.id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        if let Some(sn) = sns.iter().find(|sn| !claimed.contains(sn)) {
            let holder: String = sqlx::query_scalar("SELECT task_id FROM ota_claims WHERE sn = $1")
                .bind(sn)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
            tx.rollback().await.map_err(db)?;
            return Ok(Claimed::Busy {
                sn: sn.clone(),
                task_id: holder,
            });
        }
        announce(&self.origin, "task", &[task.id.as_str()], &mut tx).await?;
        tx.commit().await.map_err(db)?;
        Ok(Claimed::Inserted)
    }

    async fn save_tasks(&self, batch: &[&OtaTask]) -> StoreResult<Vec<bool>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let ids = column(batch, |t| t.id.clone());
        let mut tx = self.background.begin().await.map_err(db)?;
        // Locked in id order, as every writer does: concurrent batches cannot deadlock.
        let stored: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT t.id, t.status, t.revision, (SELECT count(*) FROM ota_task_history h \
             WHERE h.task_id = t.id) FROM ota_tasks t WHERE t.id = ANY($1) ORDER BY t.id \
             FOR UPDATE OF t",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let stored: HashMap<String, (Stored, usize)> = stored
            .into_iter()
            .map(|(id, status, revision, n)| {
                let stored = Stored {
                    status: parse(&status)?,
                    revision: revision as u64,
                };
                Ok((id, (stored, n as usize)))
            })
            .collect::<StoreResult<_>>()?;
        // The last copy of a task in the batch is the one written.
        let mut written = vec![false; batch.len()];
        let mut writes: Vec<(&OtaTask, usize)> = Vec::new();
        for (i, task) in batch.iter().enumerate() {
            if batch[i + 1..].iter().any(|later| later.id == task.id) {
                continue;
            }
            match stored.get(&task.id) {
                Some((stored, _)) if !stored.admits(task) => {}
                found => {
                    written[i] = true;
                    writes.push((task, found.map_or(0, |(_, n)| *n)));
                }
            }
        }
        if writes.is_empty() {
            return Ok(written);
        }
        let tasks: Vec<&OtaTask> = writes.iter().map(|(t, _)| *t).collect();
        write_tasks(&tasks, &mut tx).await?;
        write_devices(&tasks, &mut tx).await?;
        append_history(&writes, &mut tx).await?;
        let finals: Vec<String> = column(&tasks, |t| t.id.clone())
            .into_iter()
            .zip(&tasks)
            .filter(|(_, t)| t.status.is_final())
            .map(|(id, _)| id)
            .collect();
        if !finals.is_empty() {
            sqlx::query("DELETE FROM ota_claims WHERE task_id = ANY($1)")
                .bind(&finals)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
        announce(&self.origin, "task", &ids, &mut tx).await?;
        tx.commit().await.map_err(db)?;
        Ok(written)
    }

    async fn delete_task(&self, id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM ota_tasks WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn prune_tasks(&self, cutoff: DateTime<Utc>) -> StoreResult<usize> {
        let done = sqlx::query("DELETE FROM ota_tasks WHERE final AND finished_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(done.rows_affected() as usize)
    }

    async fn put_orphan(&self, msg: &serde_json::Value) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("INSERT INTO ota_orphans (id, msg) VALUES ($1, $2)")
            .bind(crate::domain::ids::next())
            .bind(sqlx::types::Json(msg))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        // At most 10,000 are kept; the oldest go first.
        sqlx::query(
            "DELETE FROM ota_orphans WHERE id <= (SELECT id FROM ota_orphans ORDER BY id DESC \
             OFFSET 10000 LIMIT 1)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }
}
