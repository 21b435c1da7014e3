//! Offline backup of the catalog as JSON lines (`fwrepo export` / `fwrepo import`). Runs on the
//! data directory of a stopped server (sled locks its directory). Blobs are not included: back
//! up `storage/` (or the bucket) by stopping the server and copying it.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};

use futures::executor::{block_on, block_on_stream};

use crate::catalog::Catalog;
use crate::store::{FirmwareRecord, FirmwareStore};

fn open(data_dir: &Path) -> Result<Catalog> {
    let dir = data_dir.join("catalog");
    if !dir.exists() {
        anyhow::bail!("no catalog in {}", data_dir.display());
    }
    Catalog::open(&dir, 16).with_context(|| {
        format!(
            "opening the catalog in {} (is the server still running? stop it first)",
            dir.display()
        )
    })
}

/// Writes every firmware record, oldest first, one JSON object per line. Returns the count.
pub fn export(data_dir: &Path, out: &mut dyn Write) -> Result<usize> {
    let catalog = open(data_dir)?;
    let mut n = 0;
    for record in block_on_stream(catalog.all_firmware()) {
        serde_json::to_writer(&mut *out, &record?)?;
        out.write_all(b"\n")?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// Reads records written by [`export`]; records whose id or model+version exists are skipped.
/// Returns (imported, skipped).
pub fn import(data_dir: &Path, input: &mut dyn BufRead) -> Result<(usize, usize)> {
    std::fs::create_dir_all(data_dir)?;
    let dir = data_dir.join("catalog");
    let catalog = Catalog::open(&dir, 16).with_context(|| {
        format!(
            "opening the catalog in {} (stop the server first)",
            dir.display()
        )
    })?;
    let (mut imported, mut skipped) = (0, 0);
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record: FirmwareRecord = serde_json::from_str(&line)
            .with_context(|| format!("line {}: not a firmware record", i + 1))?;
        if block_on(catalog.import_firmware(&record))? {
            imported += 1;
        } else {
            skipped += 1;
        }
    }
    catalog.flush_blocking()?;
    Ok((imported, skipped))
}
