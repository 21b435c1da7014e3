//! Rollouts and their members in PostgreSQL. A rollout's definition, timeline and events are
//! documents read and written whole (JSONB); members are rows, one per gateway.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::*;
use crate::rollout::model::{Member, Phase, Rollout, RolloutStatus};
use crate::rollout::store::RolloutStore;

const ROLLOUT_COLUMNS: &str = "id, name, status, pause_reason, finished_at, definition, \
    packages, current_stage, stage_sizes, acknowledged_failed, created_at, updated_at, \
    started_at, timeline, events, revision";

#[derive(sqlx::FromRow)]
struct RolloutRow {
    id: String,
    name: String,
    status: String,
    pause_reason: Option<String>,
    finished_at: Option<DateTime<Utc>>,
    definition: sqlx::types::Json<Value>,
    packages: sqlx::types::Json<Value>,
    current_stage: i32,
    stage_sizes: Vec<i64>,
    acknowledged_failed: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    timeline: sqlx::types::Json<Value>,
    events: sqlx::types::Json<Value>,
    revision: i64,
}

impl RolloutRow {
    /// The record, through its serde form (the state and its data are one value there).
    fn record(self) -> StoreResult<Rollout> {
        let key = self.id.clone();
        serde_json::from_value(json!({
            "id": self.id, "name": self.name, "status": self.status,
            "pause_reason": self.pause_reason, "finished_at": self.finished_at,
            "definition": self.definition.0, "packages": self.packages.0,
            "current_stage": self.current_stage, "stage_sizes": self.stage_sizes,
            "acknowledged_failed": self.acknowledged_failed, "created_at": self.created_at,
            "updated_at": self.updated_at, "started_at": self.started_at,
            "timeline": self.timeline.0, "events": self.events.0, "revision": self.revision,
        }))
        .map_err(|source| CatalogError::Decode { key, source })
    }
}

const MEMBER_COLUMNS: &str = "order_key, gateway_sn, stage, state, devices, attempts, task_id, \
    dispatch_key, last_error, waiting_since, first_dispatch_at, dispatched_at, next_attempt_at, \
    finished_at";

#[derive(sqlx::FromRow)]
struct MemberRow {
    order_key: String,
    gateway_sn: String,
    stage: i32,
    state: String,
    devices: sqlx::types::Json<Value>,
    attempts: i64,
    task_id: Option<String>,
    dispatch_key: Option<String>,
    last_error: Option<String>,
    waiting_since: Option<DateTime<Utc>>,
    first_dispatch_at: Option<DateTime<Utc>>,
    dispatched_at: Option<DateTime<Utc>>,
    next_attempt_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl MemberRow {
    fn record(self) -> StoreResult<Member> {
        Ok(Member {
            gateway_sn: self.gateway_sn,
            order: self.order_key,
            stage: self.stage as usize,
            devices: serde_json::from_value(self.devices.0).map_err(|source| {
                CatalogError::Decode {
                    key: "rollout member devices".into(),
                    source,
                }
            })?,
            state: parse(&self.state)?,
            attempts: self.attempts as u32,
            task_id: self.task_id,
            dispatch_key: self.dispatch_key,
            last_error: self.last_error,
            waiting_since: self.waiting_since,
            first_dispatch_at: self.first_dispatch_at,
            dispatched_at: self.dispatched_at,
            next_attempt_at: self.next_attempt_at,
            finished_at: self.finished_at,
        })
    }
}

async fn write_rollout(r: &Rollout, conn: &mut sqlx::PgConnection) -> StoreResult<()> {
    let v = serde_json::to_value(r).unwrap_or_default();
    let updates = excluded(ROLLOUT_COLUMNS);
    let sql = format!(
        "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
         $10, $11, $12, $13, $14, $15, $16) ON CONFLICT (id) DO UPDATE SET {updates}"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(&r.id)
        .bind(&r.name)
        .bind(text(&r.status()))
        .bind(v["pause_reason"].as_str())
        .bind(match r.phase() {
            Phase::Completed { at } | Phase::Canceled { at } => Some(*at),
            _ => None,
        })
        .bind(sqlx::types::Json(&v["definition"]))
        .bind(sqlx::types::Json(&v["packages"]))
        .bind(r.current_stage as i32)
        .bind(r.stage_sizes.iter().map(|&s| s as i64).collect::<Vec<_>>())
        .bind(r.acknowledged_failed as i64)
        .bind(r.created_at)
        .bind(r.updated_at)
        .bind(r.started_at)
        .bind(sqlx::types::Json(&v["timeline"]))
        .bind(sqlx::types::Json(&v["events"]))
        .bind(r.revision as i64)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

async fn write_members(
    rollout_id: &str,
    members: &[&Member],
    conn: &mut sqlx::PgConnection,
) -> StoreResult<()> {
    if members.is_empty() {
        return Ok(());
    }
    let updates = excluded(MEMBER_COLUMNS);
    let sql = format!(
        "INSERT INTO rollout_members (rollout_id, {MEMBER_COLUMNS}) SELECT $1, u.order_key, \
         u.gateway_sn, u.stage, u.state, u.devices::jsonb, u.attempts, u.task_id, \
         u.dispatch_key, u.last_error, u.waiting_since, u.first_dispatch_at, u.dispatched_at, \
         u.next_attempt_at, u.finished_at FROM UNNEST($2::text[], $3::text[], $4::int4[], \
         $5::text[], $6::text[], $7::int8[], $8::text[], $9::text[], $10::text[], \
         $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], \
         $15::timestamptz[]) AS u(order_key, gateway_sn, stage, state, devices, attempts, \
         task_id, dispatch_key, last_error, waiting_since, first_dispatch_at, dispatched_at, \
         next_attempt_at, finished_at) ON CONFLICT (rollout_id, order_key) DO UPDATE SET {updates}"
    );
    let at = |f: fn(&Member) -> Option<DateTime<Utc>>| -> Vec<Option<DateTime<Utc>>> {
        members.iter().map(|m| f(m)).collect()
    };
    let opt = |f: fn(&Member) -> Option<String>| -> Vec<Option<String>> {
        members.iter().map(|m| f(m)).collect()
    };
    sqlx::query(AssertSqlSafe(sql))
        .bind(rollout_id)
        .bind(members.iter().map(|m| m.order.clone()).collect::<Vec<_>>())
        .bind(
            members
                .iter()
                .map(|m| m.gateway_sn.clone())
                .collect::<Vec<_>>(),
        )
        .bind(members.iter().map(|m| m.stage as i32).collect::<Vec<_>>())
        .bind(members.iter().map(|m| text(&m.state)).collect::<Vec<_>>())
        .bind(
            members
                .iter()
                .map(|m| serde_json::to_string(&m.devices).unwrap_or_else(|_| "[]".into()))
                .collect::<Vec<_>>(),
        )
        .bind(
            members
                .iter()
                .map(|m| i64::from(m.attempts))
                .collect::<Vec<_>>(),
        )
        .bind(opt(|m| m.task_id.clone()))
        .bind(opt(|m| m.dispatch_key.clone()))
        .bind(opt(|m| m.last_error.clone()))
        .bind(at(|m| m.waiting_since))
        .bind(at(|m| m.first_dispatch_at))
        .bind(at(|m| m.dispatched_at))
        .bind(at(|m| m.next_attempt_at))
        .bind(at(|m| m.finished_at))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

#[async_trait::async_trait]
impl RolloutStore for Postgres {
    async fn rollout(&self, id: &str) -> StoreResult<Option<Rollout>> {
        let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1");
        let row: Option<RolloutRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(RolloutRow::record).transpose()
    }

    async fn all_rollouts(&self) -> StoreResult<Vec<Rollout>> {
        let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id");
        let rows: Vec<RolloutRow> = sqlx::query_as(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        records(rows, RolloutRow::record)
    }

    async fn list_rollouts(
        &self,
        status: Option<RolloutStatus>,
        page: &PageRequest,
    ) -> StoreResult<Page<Rollout>> {
        let sql = format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE ($1::text IS NULL OR id < $1) \
             AND ($2::text IS NULL OR status = $2) ORDER BY id DESC LIMIT $3"
        );
        let rows: Vec<RolloutRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(after(page)?)
            .bind(status.as_ref().map(text))
            .bind(limit_of(page))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let records = records(rows, RolloutRow::record)?;
        Ok(page_of(records, page.limit(), |r| r.id.as_str()))
    }

    async fn save_rollout(
        &self,
        rollout_id: &str,
        rollout: Option<&Rollout>,
        members: &[&Member],
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        if let Some(r) = rollout {
            let stored: Option<i64> =
                sqlx::query_scalar("SELECT revision FROM rollouts WHERE id = $1 FOR UPDATE")
                    .bind(rollout_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            if stored.is_some_and(|s| s as u64 + 1 != r.revision) {
                return Ok(false);
            }
            write_rollout(r, &mut tx).await?;
        }
        write_members(rollout_id, members, &mut tx).await?;
        announce(&self.origin, "rollout", &[rollout_id], &mut tx).await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn members(&self, rollout_id: &str) -> StoreResult<Vec<Member>> {
        let sql = format!(
            "SELECT {MEMBER_COLUMNS} FROM rollout_members WHERE rollout_id = $1 ORDER BY order_key"
        );
        let rows: Vec<MemberRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(rollout_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        records(rows, MemberRow::record)
    }
}
