//! Moving a catalog between backends (`fwrepo export` / `fwrepo import`): every record kind
//! as JSON lines, read and written only through the storage ports, so any backend exports
//! to any other. Pending uploads and Idempotency-Key answers are transient and not carried.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::Store;
use crate::audit::AuditEntry;
use crate::auth::TokenRecord;
use crate::devices::DeviceRecord;
use crate::ota::OtaTask;
use crate::ota::store::Claimed;
use crate::rollout::model::{Member, Rollout};
use crate::store::{CatalogError, DownloadSessionRecord, FirmwareRecord, PageRequest, StoreResult};

/// One line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Exported {
    /// A firmware record (tombstones included).
    Firmware {
        /// The record.
        record: FirmwareRecord,
    },
    /// A device.
    Device {
        /// The record.
        record: DeviceRecord,
    },
    /// An API token (its hash only).
    Token {
        /// The record.
        record: TokenRecord,
    },
    /// A rollout with its members.
    Rollout {
        /// The record.
        record: Rollout,
        /// Its members.
        members: Vec<Member>,
    },
    /// An OTA task with its devices and history.
    Task {
        /// The record.
        record: OtaTask,
    },
    /// A download session.
    Session {
        /// The record.
        record: DownloadSessionRecord,
    },
    /// An audit entry.
    Audit {
        /// The record.
        record: AuditEntry,
    },
}

impl Exported {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Exported::Firmware { .. } => "firmware",
            Exported::Device { .. } => "device",
            Exported::Token { .. } => "token",
            Exported::Rollout { .. } => "rollout",
            Exported::Task { .. } => "task",
            Exported::Session { .. } => "session",
            Exported::Audit { .. } => "audit",
        }
    }

    /// A line of an export: tagged, or (from releases before every kind was exported) a bare
    /// firmware record.
    pub fn parse(line: &str) -> Result<Exported, serde_json::Error> {
        let value: serde_json::Value = serde_json::from_str(line)?;
        if value.get("kind").is_some() {
            serde_json::from_value(value)
        } else {
            Ok(Exported::Firmware {
                record: serde_json::from_value(value)?,
            })
        }
    }
}

/// Records per kind.
pub type Counts = BTreeMap<&'static str, usize>;

/// Hands every record of `from` to `sink`, kind by kind (firmware first, audit last).
pub async fn export(
    from: &dyn Store,
    mut sink: impl FnMut(Exported) -> std::io::Result<()>,
) -> Result<Counts, CatalogError> {
    let mut counts = Counts::new();
    let mut put = |e: Exported| {
        *counts.entry(e.kind()).or_default() += 1;
        sink(e).map_err(|e| CatalogError::Storage(Box::new(e)))
    };
    let mut firmware = from.all_firmware();
    while let Some(record) = firmware.try_next().await? {
        put(Exported::Firmware { record })?;
    }
    drop(firmware);
    for record in from.all_devices().await? {
        put(Exported::Device { record })?;
    }
    for record in from.all_tokens().await? {
        put(Exported::Token { record })?;
    }
    for record in from.all_rollouts().await? {
        let members = from.members(&record.id).await?;
        put(Exported::Rollout { record, members })?;
    }
    let ever = DateTime::<Utc>::UNIX_EPOCH;
    for record in from.recent_tasks(ever).await? {
        put(Exported::Task { record })?;
    }
    for record in from.recent_sessions(ever).await? {
        put(Exported::Session { record })?;
    }
    let mut page = PageRequest {
        limit: Some(500),
        cursor: None,
    };
    loop {
        let p = from.list_audit(&page, None).await?;
        for record in p.items {
            put(Exported::Audit { record })?;
        }
        match p.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    Ok(counts)
}

/// Stores one exported record in `to`. False when it was already there (firmware by id or
/// live version; tasks holding a serial another open task holds); everything else is
/// written over.
pub async fn import(to: &dyn Store, e: Exported) -> StoreResult<bool> {
    match e {
        Exported::Firmware { record } => to.import_firmware(&record).await,
        Exported::Device { record } => to.put_devices(&[record]).await.map(|()| true),
        Exported::Token { record } => to.put_tokens(&[record]).await.map(|()| true),
        Exported::Rollout { record, members } => {
            let members: Vec<&Member> = members.iter().collect();
            to.save_rollout(&record.id, Some(&record), &members).await
        }
        Exported::Task { record } if !record.status.is_final() => {
            Ok(to.insert_task(&record).await? == Claimed::Inserted)
        }
        Exported::Task { record } => to.save_task(&record).await,
        Exported::Session { record } => to.merge_sessions(&[record]).await.map(|()| true),
        Exported::Audit { record } => to.put_audit(&record).await.map(|()| true),
    }
}

/// Copies every record of `from` into `to`; returns the records written per kind.
pub async fn copy(from: &dyn Store, to: &dyn Store) -> Result<Counts, CatalogError> {
    let mut records = Vec::new();
    export(from, |e| {
        records.push(e);
        Ok(())
    })
    .await?;
    let mut written = Counts::new();
    for e in records {
        let kind = e.kind();
        if import(to, e).await? {
            *written.entry(kind).or_default() += 1;
        }
    }
    Ok(written)
}
