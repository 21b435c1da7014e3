//! The catalog on PostgreSQL (`--catalog postgres://…`): the same ports as sled, on a
//! database several fwrepo processes can share. Versioned migrations (`migrations/postgres/`)
//! are embedded and run at start under sqlx's advisory lock, so processes starting together
//! migrate once; a database migrated by a newer fwrepo is refused. Every atomic operation of
//! the ports is one transaction; lists are keyset pages on the id (ULIDs sort by time).

mod admin;
mod devices;
mod firmware;
mod rollouts;
mod tasks;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::store::{CatalogError, CatalogFault, Page, PageRequest, StoreResult, cursor_for};

/// Connection settings of the PostgreSQL catalog.
#[derive(Clone, Debug)]
pub struct PgSettings {
    /// `postgres://user:pass@host:port/db?sslmode=…`.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Connect (and pool acquire) timeout.
    pub connect_timeout: Duration,
    /// Statement timeout.
    pub statement_timeout: Duration,
}

/// Connections of the background writers' pool (beside `--catalog-max-connections`).
const BACKGROUND_CONNECTIONS: u32 = 2;
/// Connections of the control pool (health probe, heartbeat, leases).
const CONTROL_CONNECTIONS: u32 = 2;

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The PostgreSQL catalog. Cheap to clone.
#[derive(Clone)]
pub struct Postgres {
    pool: PgPool,
    /// Connections of their own for the background writers (the OTA worker's batches, the
    /// download-session and device flushers): a burst of API requests waiting for `pool`
    /// never delays the recording of gateway events.
    background: PgPool,
    /// Connections of their own for what must never wait behind a busy replica's work: the
    /// health probe (a full pool is not a database that does not answer), the heartbeat and
    /// the leases (a replica that cannot renew in time loses its leases to another).
    control: PgPool,
    /// False while the database does not answer (the watcher's last probe failed).
    healthy: Arc<AtomicBool>,
    /// Probes that found the database answering.
    probes: Arc<std::sync::atomic::AtomicU64>,
    /// The replica this process is, named in the change notifications its writes send
    /// (`ClusterStore::changes`); none until it joined the deployment.
    origin: Arc<std::sync::OnceLock<String>>,
}

/// The channel on which writes announce what they changed to the other replicas.
const CHANGES_CHANNEL: &str = "fwrepo_changes";

/// Announces, when committed with `conn`'s transaction, that this replica changed the
/// records `ids` of `kind` (`task`, `rollout`): `<origin>\t<kind>\t<id>,<id>…`, in
/// payloads under PostgreSQL's 8,000-byte limit. Nothing before the replica joined.
async fn announce(
    origin: &std::sync::OnceLock<String>,
    kind: &str,
    ids: &[&str],
    conn: &mut sqlx::PgConnection,
) -> StoreResult<()> {
    let Some(origin) = origin.get() else {
        return Ok(());
    };
    let mut payloads = Vec::new();
    let mut current = String::new();
    for id in ids {
        if !current.is_empty() && current.len() + id.len() > 7000 {
            payloads.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(',');
        }
        current.push_str(id);
    }
    if !current.is_empty() {
        payloads.push(current);
    }
    if payloads.is_empty() {
        return Ok(());
    }
    let payloads: Vec<String> = payloads
        .into_iter()
        .map(|ids| format!("{origin}\t{kind}\t{ids}"))
        .collect();
    sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
        .bind(CHANGES_CHANNEL)
        .bind(&payloads)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

fn db(e: sqlx::Error) -> CatalogError {
    match e {
        sqlx::Error::RowNotFound => CatalogError::NotFound,
        other => CatalogError::Storage(Box::new(other)),
    }
}

/// Why retrying cannot mend a failed start, if it cannot: the schema is not one this version
/// can use, or the server refuses the login or the database (SQLSTATE classes 28 and 3D,
/// 42501).
fn permanent(e: &sqlx::migrate::MigrateError) -> Option<String> {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::Execute(sqlx::Error::Database(d)) | M::ExecuteMigration(sqlx::Error::Database(d), _) => {
            let code = d.code()?;
            (code.starts_with("28") || code.starts_with("3D") || code == "42501")
                .then(|| format!("PostgreSQL refuses: {} (SQLSTATE {code})", d.message()))
        }
        M::VersionMismatch(_) | M::Dirty(_) | M::VersionTooOld(..) | M::VersionTooNew(..) => Some(
            format!("the database's migrations do not match this fwrepo: {e}"),
        ),
        _ => None,
    }
}

/// A snake_case enum as its name.
fn text<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// A name back into its snake_case enum.
fn parse<T: DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|source| {
        CatalogError::Decode {
            key: s.to_string(),
            source,
        }
    })
}

/// The id a page starts after, checked as a cursor this catalog issued.
fn after(page: &PageRequest) -> StoreResult<Option<String>> {
    Ok(page
        .after_key()?
        .map(|k| String::from_utf8_lossy(&k).into_owned()))
}

/// The page of `rows` (fetched with `LIMIT limit + 1`), newest first.
fn page_of<T>(mut rows: Vec<T>, limit: usize, id: impl Fn(&T) -> &str) -> Page<T> {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = more
        .then(|| rows.last().map(|r| cursor_for(id(r))))
        .flatten();
    Page {
        items: rows,
        next_cursor,
    }
}

/// `col = EXCLUDED.col` for every column of `columns` but the first (the key): the `SET` of
/// an upsert.
fn excluded(columns: &str) -> String {
    columns
        .split(", ")
        .skip(1)
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows into records, failing on the first that does not decode.
fn records<R, T>(rows: Vec<R>, record: impl Fn(R) -> StoreResult<T>) -> StoreResult<Vec<T>> {
    rows.into_iter().map(record).collect()
}

fn limit_of(page: &PageRequest) -> i64 {
    i64::try_from(page.limit()).unwrap_or(500) + 1
}

impl Postgres {
    /// Connects and migrates, retrying with backoff (at most 10 s apart) while the database
    /// does not answer: until `give_up` passes, or for ever when it is `None`. Each failed
    /// attempt is logged and told to `waiting`. Errors no retry can mend end it at once: a
    /// database migrated by a newer fwrepo, a refused login, a missing database.
    pub async fn open(
        settings: &PgSettings,
        give_up: Option<Duration>,
        waiting: &(dyn Fn(&str) + Sync),
    ) -> Result<Postgres, CatalogError> {
        let options: PgConnectOptions = settings
            .url
            .parse()
            .map_err(|e: sqlx::Error| CatalogError::Storage(Box::new(e)))?;
        let statement_ms = settings.statement_timeout.as_millis().max(1);
        let options = options
            .application_name("fwrepo")
            .options([("statement_timeout", statement_ms.to_string())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(settings.connect_timeout)
            .connect_lazy_with(options.clone());
        let background = PgPoolOptions::new()
            .max_connections(BACKGROUND_CONNECTIONS)
            .acquire_timeout(settings.connect_timeout)
            .connect_lazy_with(options.clone());
        let control = PgPoolOptions::new()
            .max_connections(CONTROL_CONNECTIONS)
            .acquire_timeout(settings.connect_timeout)
            .connect_lazy_with(options);
        let deadline = give_up.map(|d| std::time::Instant::now() + d);
        let mut wait = Duration::from_millis(200);
        for attempt in 1u32.. {
            let e = match MIGRATOR.run(&pool).await {
                Ok(()) => break,
                Err(sqlx::migrate::MigrateError::VersionMissing(v)) => {
                    return Err(CatalogError::Storage(
                        format!(
                            "the database was migrated by a newer fwrepo (migration {v} is \
                             unknown to this version); upgrade fwrepo"
                        )
                        .into(),
                    ));
                }
                Err(e) => match permanent(&e) {
                    Some(why) => return Err(CatalogError::Storage(why.into())),
                    None => e,
                },
            };
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Err(CatalogError::Storage(Box::new(e)));
            }
            let reason = e.to_string();
            tracing::warn!(
                attempt,
                error = %reason,
                retry_in_ms = wait.as_millis() as u64,
                "the PostgreSQL catalog does not answer yet; retrying (/readyz answers 503 until it does)"
            );
            waiting(&reason);
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
        Ok(Postgres {
            pool,
            background,
            control,
            healthy: Arc::new(AtomicBool::new(true)),
            probes: Arc::default(),
            origin: Arc::default(),
        })
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.control)
            .await
            .map(|_| ())
            .map_err(db)
    }
}

#[async_trait::async_trait]
impl crate::store::Durability for Postgres {
    /// A committed transaction is durable (`synchronous_commit`): nothing to wait for.
    async fn flush(&self) -> StoreResult<()> {
        match self.fault() {
            None => Ok(()),
            Some(f) => Err(CatalogError::Unwritable(f)),
        }
    }

    fn fault(&self) -> Option<CatalogFault> {
        (!self.healthy.load(SeqCst)).then_some(CatalogFault::Unavailable)
    }

    async fn check(&self) -> StoreResult<()> {
        self.ping().await
    }

    fn render_metrics(&self) -> String {
        let size = self.pool.size();
        let idle = self.pool.num_idle();
        let up = u8::from(self.healthy.load(SeqCst));
        let probes = self.probes.load(SeqCst);
        format!(
            "# HELP fwrepo_catalog_flushes_total Points at which every write before is durable (PostgreSQL: health probes passed; a commit is durable when it returns).\n# TYPE fwrepo_catalog_flushes_total counter\nfwrepo_catalog_flushes_total {probes}\n# HELP fwrepo_catalog_writable 1 while the catalog answers; 0 while it does not.\n# TYPE fwrepo_catalog_writable gauge\nfwrepo_catalog_writable {up}\n# HELP fwrepo_catalog_pool_connections Connections of the PostgreSQL pool, by state.\n# TYPE fwrepo_catalog_pool_connections gauge\nfwrepo_catalog_pool_connections{{state=\"idle\"}} {idle}\nfwrepo_catalog_pool_connections{{state=\"busy\"}} {}\n",
            (size as usize).saturating_sub(idle)
        )
    }

    async fn watch(&self, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let ok = self.ping().await;
            if ok.is_ok() {
                self.probes.fetch_add(1, SeqCst);
            }
            let was = self.healthy.swap(ok.is_ok(), SeqCst);
            match (was, ok) {
                (true, Err(e)) => {
                    tracing::error!(error = %e, "the PostgreSQL catalog does not answer; writes are refused until it does")
                }
                (false, Ok(())) => tracing::info!("the PostgreSQL catalog answers again"),
                _ => {}
            }
        }
    }
}

/// Throwaway databases for tests: one per test on the server `FWREPO_TEST_POSTGRES_URL`
/// names, dropped when the test ends.
#[doc(hidden)]
pub mod testing {
    use super::*;
    use crate::catalog::redact;

    /// A database made for one test.
    pub struct TestDatabase {
        admin: String,
        name: String,
        url: String,
    }

    impl TestDatabase {
        /// A fresh, empty database; `None` (with a SKIP line) when no server is configured.
        pub async fn create() -> Option<TestDatabase> {
            let Ok(admin) = std::env::var("FWREPO_TEST_POSTGRES_URL") else {
                eprintln!("SKIP: FWREPO_TEST_POSTGRES_URL is not set (PostgreSQL catalog tests)");
                return None;
            };
            let name = format!("fwrepo_test_{}", crate::domain::ids::next().to_lowercase());
            let pool = PgPool::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("FWREPO_TEST_POSTGRES_URL {}: {e}", redact(&admin)));
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("creating {name}: {e}"));
            pool.close().await;
            let mut url = url::Url::parse(&admin).unwrap_or_else(|e| panic!("{e}"));
            url.set_path(&format!("/{name}"));
            Some(TestDatabase {
                admin,
                name,
                url: url.to_string(),
            })
        }

        /// Its URL.
        pub fn url(&self) -> &str {
            &self.url
        }

        /// The catalog on it, migrated.
        pub async fn catalog(&self) -> Postgres {
            let settings = PgSettings {
                url: self.url.clone(),
                max_connections: 8,
                connect_timeout: Duration::from_secs(10),
                statement_timeout: Duration::from_secs(30),
            };
            Postgres::open(&settings, Some(Duration::from_secs(10)), &|_| {})
                .await
                .unwrap_or_else(|e| panic!("opening {}: {e}", self.name))
        }
    }

    impl Drop for TestDatabase {
        fn drop(&mut self) {
            let (admin, name) = (self.admin.clone(), self.name.clone());
            // Dropped outside any runtime the test may be shutting down.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        if let Ok(pool) = PgPool::connect(&admin).await {
                            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                            let _ = sqlx::query(AssertSqlSafe(sql)).execute(&pool).await;
                        }
                    });
                }
            })
            .join();
        }
    }
}
