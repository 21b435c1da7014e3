//! Durable local blob writes. The blob is written to `<key>.part` beside its final name with
//! positioned writes on the blocking pool, while a syncer flushes what has been written so far
//! (`fdatasync` every `SYNC_EVERY` bytes) so the disk works during the upload instead of after
//! it; `finish` syncs the tail, renames the file into place and syncs the directory. A dropped
//! or aborted writer removes its staging file; one a crash leaves is removed by the start-up
//! sweep.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::task::JoinHandle;

/// Start a background sync after this many new bytes.
const SYNC_EVERY: u64 = 64 << 20;
/// Write batches in flight.
const IN_FLIGHT: usize = 1;

fn join_err(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(e)
}

/// A blob being written on the local filesystem.
pub(super) struct LocalWriter {
    file: Arc<File>,
    staging: PathBuf,
    dest: PathBuf,
    offset: u64,
    unsynced: u64,
    in_flight: VecDeque<JoinHandle<io::Result<()>>>,
    syncer: Option<JoinHandle<io::Result<()>>>,
    done: bool,
}

/// The staging name of a blob.
pub(super) fn staging_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

impl LocalWriter {
    /// Creates the staging file (it must not exist).
    pub(super) async fn create(dest: PathBuf) -> io::Result<LocalWriter> {
        let staging = staging_path(&dest);
        let path = staging.clone();
        let file = tokio::task::spawn_blocking(move || {
            OpenOptions::new().write(true).create_new(true).open(path)
        })
        .await
        .map_err(join_err)??;
        Ok(LocalWriter {
            file: Arc::new(file),
            staging,
            dest,
            offset: 0,
            unsynced: 0,
            in_flight: VecDeque::new(),
            syncer: None,
            done: false,
        })
    }

    /// Appends a batch of chunks; waits while `IN_FLIGHT` batches are being written.
    pub(super) async fn write(&mut self, batch: Vec<Bytes>) -> io::Result<()> {
        while self.in_flight.len() >= IN_FLIGHT {
            self.collect_one().await?;
        }
        let len: u64 = batch.iter().map(|b| b.len() as u64).sum();
        let (file, mut at) = (Arc::clone(&self.file), self.offset);
        self.offset += len;
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || {
                for chunk in &batch {
                    file.write_all_at(chunk, at)?;
                    at += chunk.len() as u64;
                }
                Ok(())
            }));
        self.unsynced += len;
        let idle = self.syncer.as_ref().is_none_or(JoinHandle::is_finished);
        if self.unsynced >= SYNC_EVERY && idle {
            if let Some(previous) = self.syncer.take() {
                previous.await.map_err(join_err)??;
            }
            self.unsynced = 0;
            let file = Arc::clone(&self.file);
            self.syncer = Some(tokio::task::spawn_blocking(move || file.sync_data()));
        }
        Ok(())
    }

    async fn collect_one(&mut self) -> io::Result<()> {
        if let Some(task) = self.in_flight.pop_front() {
            task.await.map_err(join_err)??;
        }
        Ok(())
    }

    /// Waits for every write, syncs, and publishes the blob under its final name.
    pub(super) async fn finish(mut self) -> io::Result<()> {
        while !self.in_flight.is_empty() {
            self.collect_one().await?;
        }
        if let Some(s) = self.syncer.take() {
            s.await.map_err(join_err)??;
        }
        let (file, staging, dest) = (
            Arc::clone(&self.file),
            self.staging.clone(),
            self.dest.clone(),
        );
        tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            std::fs::rename(&staging, &dest)?;
            if let Some(dir) = dest.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok::<_, io::Error>(())
        })
        .await
        .map_err(join_err)??;
        self.done = true;
        Ok(())
    }

    /// Stops writing and removes the staging file.
    pub(super) async fn abort(mut self) -> io::Result<()> {
        for task in self.in_flight.drain(..) {
            let _ = task.await;
        }
        if let Some(s) = self.syncer.take() {
            let _ = s.await;
        }
        self.done = true;
        let staging = self.staging.clone();
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
        .map_err(join_err)?
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if !self.done {
            // Writes still in flight hold the file open; removing the name is enough.
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_publish_and_abort_cleans() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let mut w = LocalWriter::create(dest.clone()).await.unwrap();
        w.write(vec![
            Bytes::from_static(b"hello "),
            Bytes::from_static(b"world"),
        ])
        .await
        .unwrap();
        assert!(!dest.exists());
        w.finish().await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello world");
        assert!(!staging_path(&dest).exists());

        let dest2 = dir.path().join("blob2");
        let mut w = LocalWriter::create(dest2.clone()).await.unwrap();
        w.write(vec![Bytes::from_static(b"x")]).await.unwrap();
        w.abort().await.unwrap();
        assert!(!dest2.exists() && !staging_path(&dest2).exists());

        let w = LocalWriter::create(dir.path().join("blob3")).await.unwrap();
        drop(w);
        assert!(!staging_path(&dir.path().join("blob3")).exists());
    }
}
