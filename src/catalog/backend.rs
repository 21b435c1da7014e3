//! Which catalog backend to open (`--catalog`), and opening it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::Store;
use super::postgres::{PgSettings, Postgres};
use crate::store::CatalogError;

/// The catalog a server uses.
#[derive(Clone, Debug)]
pub enum CatalogBackend {
    /// sled under the data directory (one process).
    Sled {
        /// Its directory.
        dir: PathBuf,
        /// Page cache in MiB.
        cache_mb: u64,
    },
    /// A PostgreSQL database (several processes may share it).
    Postgres(PgSettings),
}

/// Limits of the PostgreSQL pool (flags `--catalog-*`).
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    /// Connections at most.
    pub max_connections: u32,
    /// Seconds to connect or to wait for a free connection.
    pub connect_timeout_secs: u64,
    /// Seconds a statement may run.
    pub statement_timeout_secs: u64,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_connections: 16,
            connect_timeout_secs: 5,
            statement_timeout_secs: 30,
        }
    }
}

impl CatalogBackend {
    /// `sled` (the default, under `data_dir/catalog`) or `postgres://…` / `postgresql://…`.
    pub fn parse(
        raw: Option<&str>,
        data_dir: &Path,
        cache_mb: u64,
        limits: PoolLimits,
    ) -> Result<CatalogBackend, String> {
        match raw.map(str::trim) {
            None | Some("") | Some("sled") => Ok(CatalogBackend::Sled {
                dir: data_dir.join("catalog"),
                cache_mb,
            }),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(CatalogBackend::Postgres(PgSettings {
                    url: url.to_string(),
                    max_connections: limits.max_connections,
                    connect_timeout: Duration::from_secs(limits.connect_timeout_secs),
                    statement_timeout: Duration::from_secs(limits.statement_timeout_secs),
                }))
            }
            Some(other) => Err(format!(
                "catalog must be sled or a postgres:// URL, not {:?}",
                redact(other)
            )),
        }
    }

    /// For logs: the backend without its password.
    pub fn describe(&self) -> String {
        match self {
            CatalogBackend::Sled { dir, .. } => format!("sled in {}", dir.display()),
            CatalogBackend::Postgres(s) => format!("PostgreSQL {}", redact(&s.url)),
        }
    }
}

/// A URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// An open catalog, whichever backend, and this process's instance id (the MQTT client id
/// is derived from it: kept in the sled catalog, or in the data directory beside a shared
/// database, so each replica has its own). PostgreSQL that does not answer is waited for
/// without end, each failed attempt told to `waiting` (the server answers 503 meanwhile).
pub async fn open(
    backend: &CatalogBackend,
    data_dir: &Path,
    waiting: &(dyn Fn(&str) + Sync),
) -> Result<(Arc<dyn Store>, String), CatalogError> {
    match backend {
        CatalogBackend::Sled { dir, cache_mb } => {
            let catalog = super::Catalog::open(dir, *cache_mb)?;
            let id = catalog.instance_id()?;
            Ok((Arc::new(catalog), id))
        }
        CatalogBackend::Postgres(settings) => {
            let store = Arc::new(Postgres::open(settings, None, waiting).await?);
            let id = file_instance_id(data_dir).map_err(|e| CatalogError::Storage(Box::new(e)))?;
            Ok((store, id))
        }
    }
}

/// An open catalog (tools: export, import, migrate). A PostgreSQL catalog is migrated; one
/// that does not answer within a minute is given up.
pub async fn open_store(backend: &CatalogBackend) -> Result<Arc<dyn Store>, CatalogError> {
    Ok(match backend {
        CatalogBackend::Sled { dir, cache_mb } => Arc::new(super::Catalog::open(dir, *cache_mb)?),
        CatalogBackend::Postgres(settings) => {
            Arc::new(Postgres::open(settings, Some(Duration::from_secs(60)), &|_| {}).await?)
        }
    })
}

fn file_instance_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = crate::domain::ids::next().to_lowercase();
    std::fs::write(&path, format!("{id}\n"))?;
    Ok(id)
}
