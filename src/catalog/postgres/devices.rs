//! Device records in PostgreSQL: merged writes (each field group from the copy that saw it
//! last) and the devices changed since a replica last looked.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::*;
use crate::devices::{ChangeCursor, ChangedDevices, DeviceRecord, DeviceStore};

const DEVICE_COLUMNS: &str = "sn, order_key, gateway_sn, child_sn, osd_child_sn, model_key, \
    model, model_declared, firmware_version, compatible_status, firmware_upgrade_status, \
    mode_code, thing_version, dialect, first_seen_at, last_seen_at, last_osd_at, last_state_at, \
    topology_at";

#[derive(sqlx::FromRow)]
struct DeviceRow {
    sn: String,
    order_key: String,
    gateway_sn: Option<String>,
    child_sn: Option<String>,
    osd_child_sn: Option<String>,
    model_key: Option<String>,
    model: Option<String>,
    model_declared: bool,
    firmware_version: Option<String>,
    compatible_status: Option<i64>,
    firmware_upgrade_status: Option<i64>,
    mode_code: Option<i64>,
    thing_version: Option<String>,
    dialect: Option<String>,
    first_seen_at: DateTime<Utc>,
    last_seen_at: Option<DateTime<Utc>>,
    last_osd_at: Option<DateTime<Utc>>,
    last_state_at: Option<DateTime<Utc>>,
    topology_at: Option<DateTime<Utc>>,
}

impl From<DeviceRow> for DeviceRecord {
    fn from(r: DeviceRow) -> DeviceRecord {
        DeviceRecord {
            sn: r.sn,
            order: r.order_key,
            gateway_sn: r.gateway_sn,
            child_sn: r.child_sn,
            osd_child_sn: r.osd_child_sn,
            model_key: r.model_key,
            model: r.model,
            model_declared: r.model_declared,
            firmware_version: r.firmware_version,
            compatible_status: r.compatible_status,
            firmware_upgrade_status: r.firmware_upgrade_status,
            mode_code: r.mode_code,
            thing_version: r.thing_version,
            dialect: r.dialect,
            first_seen_at: r.first_seen_at,
            last_seen_at: r.last_seen_at,
            last_osd_at: r.last_osd_at,
            last_state_at: r.last_state_at,
            topology_at: r.topology_at,
            online: false,
        }
    }
}

/// Writes device rows whole, one statement: inserts them (`overwrite` false: a serial that
/// has a row is left alone) or inserts or updates them. `changed` says, per row, whether
/// readers act on the change (its `changed_at` moves to the clock's now, past any earlier
/// change, which stamps the row with this transaction: migration 0004). Returns the serials
/// written.
async fn write_device_rows(
    devices: &[DeviceRecord],
    changed: &[bool],
    overwrite: bool,
    conn: &mut sqlx::PgConnection,
) -> StoreResult<Vec<String>> {
    let col = |f: fn(&DeviceRecord) -> Option<String>| -> Vec<Option<String>> {
        devices.iter().map(f).collect()
    };
    let num = |f: fn(&DeviceRecord) -> Option<i64>| -> Vec<Option<i64>> {
        devices.iter().map(f).collect()
    };
    let at = |f: fn(&DeviceRecord) -> Option<DateTime<Utc>>| -> Vec<Option<DateTime<Utc>>> {
        devices.iter().map(f).collect()
    };
    let updates = excluded(DEVICE_COLUMNS);
    let values = DEVICE_COLUMNS
        .split(", ")
        .map(|c| format!("u.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO devices ({DEVICE_COLUMNS}, changed_at) SELECT {values}, \
         CASE WHEN u.changed THEN clock_timestamp() ELSE '-infinity' END FROM UNNEST($1::text[], \
         $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bool[], \
         $9::text[], $10::int8[], $11::int8[], $12::int8[], $13::text[], $14::text[], \
         $15::timestamptz[], $16::timestamptz[], $17::timestamptz[], $18::timestamptz[], \
         $19::timestamptz[], $20::bool[]) AS u({DEVICE_COLUMNS}, changed) {{conflict}} \
         RETURNING sn"
    );
    let conflict = match overwrite {
        true => format!(
            "ON CONFLICT (sn) DO UPDATE SET {updates}, \
             changed_at = GREATEST(devices.changed_at, EXCLUDED.changed_at)"
        ),
        false => "ON CONFLICT (sn) DO NOTHING".to_string(),
    };
    let sql = sql.replace("{conflict}", &conflict);
    sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(devices.iter().map(|d| d.sn.clone()).collect::<Vec<_>>())
        .bind(devices.iter().map(|d| d.order.clone()).collect::<Vec<_>>())
        .bind(col(|d| d.gateway_sn.clone()))
        .bind(col(|d| d.child_sn.clone()))
        .bind(col(|d| d.osd_child_sn.clone()))
        .bind(col(|d| d.model_key.clone()))
        .bind(col(|d| d.model.clone()))
        .bind(devices.iter().map(|d| d.model_declared).collect::<Vec<_>>())
        .bind(col(|d| d.firmware_version.clone()))
        .bind(num(|d| d.compatible_status))
        .bind(num(|d| d.firmware_upgrade_status))
        .bind(num(|d| d.mode_code))
        .bind(col(|d| d.thing_version.clone()))
        .bind(col(|d| d.dialect.clone()))
        .bind(devices.iter().map(|d| d.first_seen_at).collect::<Vec<_>>())
        .bind(at(|d| d.last_seen_at))
        .bind(at(|d| d.last_osd_at))
        .bind(at(|d| d.last_state_at))
        .bind(at(|d| d.topology_at))
        .bind(changed.to_vec())
        .fetch_all(&mut *conn)
        .await
        .map_err(db)
}

#[async_trait::async_trait]
impl DeviceStore for Postgres {
    async fn put_devices(&self, devices: &[DeviceRecord]) -> StoreResult<()> {
        if devices.is_empty() {
            return Ok(());
        }
        // The last copy of a serial in the batch is the one written.
        let mut latest: HashMap<&str, &DeviceRecord> = HashMap::new();
        for d in devices {
            latest.insert(d.sn.as_str(), d);
        }
        let mut sns: Vec<String> = latest.keys().map(|s| s.to_string()).collect();
        sns.sort();
        let mut tx = self.background.begin().await.map_err(db)?;
        // New serials are inserted as they are (a replica inserting the same serial at once
        // makes this wait for it, and the row is then merged below), in serial order, as every
        // writer locks: concurrent batches cannot deadlock.
        let fresh: Vec<DeviceRecord> = sns.iter().map(|sn| latest[sn.as_str()].clone()).collect();
        let inserted = write_device_rows(&fresh, &vec![true; fresh.len()], false, &mut tx).await?;
        sns.retain(|sn| !inserted.contains(sn));
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE sn = ANY($1) ORDER BY sn FOR UPDATE"
        );
        let stored: Vec<DeviceRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(&sns)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let stored: HashMap<String, DeviceRecord> = stored
            .into_iter()
            .map(|r| (r.sn.clone(), DeviceRecord::from(r)))
            .collect();
        let (rows, changed): (Vec<DeviceRecord>, Vec<bool>) = sns
            .iter()
            .map(|sn| latest[sn.as_str()].merged_over(stored.get(sn)))
            .unzip();
        if !rows.is_empty() {
            write_device_rows(&rows, &changed, true, &mut tx).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn changed_devices(&self, since: Option<ChangeCursor>) -> StoreResult<ChangedDevices> {
        // The oldest transaction still running when the rows were read: every change stamped
        // before it is committed, and read here; the next read starts from it.
        let sql = format!(
            "SELECT {DEVICE_COLUMNS}, \
             pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS next FROM devices \
             WHERE changed_xid >= $1::int8::text::xid8"
        );
        #[derive(sqlx::FromRow)]
        struct Changed {
            #[sqlx(flatten)]
            row: DeviceRow,
            next: i64,
        }
        let rows: Vec<Changed> = sqlx::query_as(AssertSqlSafe(sql))
            // From the first transaction for a first read: every device (one statement, so
            // that the index serves the later ones).
            .bind(since.map_or(0, |c| c.0))
            .fetch_all(&self.background)
            .await
            .map_err(db)?;
        let next = rows.first().map(|r| ChangeCursor(r.next));
        Ok(ChangedDevices {
            devices: rows
                .into_iter()
                .map(|r| DeviceRecord::from(r.row))
                .collect(),
            next,
        })
    }

    async fn delete_device(&self, sn: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM devices WHERE sn = $1")
            .bind(sn)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn all_devices(&self) -> StoreResult<Vec<DeviceRecord>> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY sn");
        let rows: Vec<DeviceRow> = sqlx::query_as(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        Ok(rows.into_iter().map(DeviceRecord::from).collect())
    }

    async fn touch_devices(&self, devices: &[DeviceRecord]) -> StoreResult<()> {
        let (sns, seen): (Vec<String>, Vec<DateTime<Utc>>) = devices
            .iter()
            .filter_map(|d| Some((d.sn.clone(), d.last_seen_at?)))
            .unzip();
        if sns.is_empty() {
            return Ok(());
        }
        // One column, no merge: a row another replica moved on within 10 s stays as it is.
        // Rows are locked in serial order first, as every writer of devices locks them (two
        // replicas' touches locking in join order deadlocked in the benchmark).
        sqlx::query(
            "WITH moved AS (SELECT d.sn, u.seen FROM devices d \
             JOIN UNNEST($1::text[], $2::timestamptz[]) AS u(sn, seen) ON d.sn = u.sn \
             WHERE d.last_seen_at IS NULL OR d.last_seen_at < u.seen - interval '10 seconds' \
             ORDER BY d.sn FOR UPDATE OF d) \
             UPDATE devices d SET last_seen_at = m.seen FROM moved m WHERE d.sn = m.sn",
        )
        .bind(&sns)
        .bind(&seen)
        .execute(&self.background)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn devices_by_sn(&self, sns: &[String]) -> StoreResult<Vec<DeviceRecord>> {
        if sns.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE sn = ANY($1)");
        let rows: Vec<DeviceRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(sns)
            .fetch_all(&self.background)
            .await
            .map_err(db)?;
        Ok(rows.into_iter().map(DeviceRecord::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::postgres::testing::TestDatabase;

    /// A change made by a transaction that was still running when a reader read is found by
    /// that reader's next read, whichever transactions committed meanwhile; and a change
    /// written the way the previous release writes it (`changed_at` alone) is found too.
    #[tokio::test]
    async fn a_change_committed_after_a_read_is_found_by_the_next() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let cat = db.catalog().await;
        let dock = crate::devices::new_device("FEED-DOCK", Utc::now());
        let other = crate::devices::new_device("FEED-OTHER", Utc::now());
        cat.put_devices(&[dock, other]).await.unwrap();
        let first = cat.changed_devices(None).await.unwrap();
        assert_eq!(first.devices.len(), 2);
        // A writer that began first, then another that commits before it.
        let mut slow = cat.pool.begin().await.unwrap();
        sqlx::query(
            "UPDATE devices SET mode_code = 4, changed_at = GREATEST(changed_at, now()) \
             WHERE sn = 'FEED-DOCK'",
        )
        .execute(&mut *slow)
        .await
        .unwrap();
        let mut quick = crate::devices::new_device("FEED-OTHER", Utc::now());
        quick.firmware_version = Some("2.0".into());
        quick.last_state_at = Some(Utc::now());
        cat.put_devices(&[quick]).await.unwrap();
        let read = cat.changed_devices(first.next).await.unwrap();
        // (The dock's first write may be read again if another test's transaction ran.)
        let found = |sn: &str| read.devices.iter().find(|d| d.sn == sn).cloned();
        assert!(found("FEED-OTHER").is_some(), "{read:?}");
        assert_eq!(
            found("FEED-DOCK").and_then(|d| d.mode_code),
            None,
            "the running change is not visible yet"
        );
        slow.commit().await.unwrap();
        let read = cat.changed_devices(read.next).await.unwrap();
        let dock = read.devices.iter().find(|d| d.sn == "FEED-DOCK");
        assert_eq!(dock.and_then(|d| d.mode_code), Some(4), "{read:?}");
    }

    /// Two replicas storing when they last heard the same devices at once, in opposite
    /// orders, do not deadlock.
    #[tokio::test]
    async fn touches_of_the_same_devices_at_once_do_not_deadlock() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let cat = std::sync::Arc::new(db.catalog().await);
        let start = Utc::now();
        let devices: Vec<DeviceRecord> = (0..2000)
            .map(|i| crate::devices::new_device(&format!("TOUCH-{i:05}"), start))
            .collect();
        cat.put_devices(&devices).await.unwrap();
        for round in 1..=5 {
            let seen = |reverse: bool| {
                let mut batch: Vec<DeviceRecord> = devices.clone();
                for d in &mut batch {
                    d.last_seen_at = Some(start + chrono::Duration::seconds(60 * round));
                }
                if reverse {
                    batch.reverse();
                }
                let cat = std::sync::Arc::clone(&cat);
                tokio::spawn(async move { cat.touch_devices(&batch).await })
            };
            let (a, b) = (seen(false), seen(true));
            a.await.unwrap().unwrap();
            b.await.unwrap().unwrap();
        }
    }
}
