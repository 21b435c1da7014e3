//! `fwrepo export` / `fwrepo import`: a catalog as JSON lines, every record kind (see
//! `catalog::transfer`), from and into any backend. A sled catalog must be stopped (sled locks
//! its directory); a PostgreSQL one may be live. Blobs are not included: copy `storage/blobs`
//! (or the bucket) alongside.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};

use crate::catalog::transfer::{self, Counts, Exported};
use crate::catalog::{CatalogBackend, open_store};

/// "firmware 2, token 1" (for the summary line).
pub fn describe(counts: &Counts) -> String {
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    match parts.is_empty() {
        true => "nothing".into(),
        false => parts.join(", "),
    }
}

async fn open(backend: &CatalogBackend) -> Result<std::sync::Arc<dyn crate::catalog::Store>> {
    open_store(backend).await.with_context(|| {
        format!(
            "opening the catalog ({}); a sled catalog must be stopped first",
            backend.describe()
        )
    })
}

/// Writes every record, one JSON object per line. Returns the count per kind.
pub async fn export(backend: &CatalogBackend, out: &mut dyn Write) -> Result<Counts> {
    let store = open(backend).await?;
    let counts = transfer::export(store.as_ref(), |e| {
        serde_json::to_writer(&mut *out, &e)?;
        out.write_all(b"\n")
    })
    .await?;
    out.flush()?;
    store.flush().await?;
    Ok(counts)
}

/// Reads records written by [`export`] (or a firmware-only export of an earlier release).
/// Returns (imported per kind, skipped: firmware already there by id or version, tasks whose
/// serials another open task holds).
pub async fn import(backend: &CatalogBackend, input: &mut dyn BufRead) -> Result<(Counts, usize)> {
    let store = open(backend).await?;
    let (mut imported, mut skipped) = (Counts::new(), 0);
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record = Exported::parse(&line)
            .with_context(|| format!("line {}: not an exported record", i + 1))?;
        let kind = record.kind();
        if transfer::import(store.as_ref(), record).await? {
            *imported.entry(kind).or_default() += 1;
        } else {
            skipped += 1;
        }
    }
    store.flush().await?;
    Ok((imported, skipped))
}
