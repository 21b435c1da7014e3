//! Per-download progress (contract §4): sessions keyed by (task, sn) for per-task URLs, else by
//! (firmware, client, User-Agent); distinct bytes covered as merged intervals; `active`,
//! `complete` or `stalled`. Kept in memory and written to the catalog only by the flusher, every
//! `--progress-flush-secs` and at shutdown, never once per request. Log lines at start, each
//! 10 %, completion and stall.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::domain::FirmwareId;
use crate::store::{
    CatalogError, DownloadSessionRecord, Page, PageRequest, SessionQuery, SessionState,
    SessionStore, cover, cursor_for, percent,
};

/// A session with no request for this long is `stalled`.
pub const STALL_AFTER: Duration = Duration::from_secs(120);
/// A stalled session resumes on a request within this window; after it a new session starts.
pub const RESUME_WITHIN: Duration = Duration::from_secs(24 * 3600);

/// Who is downloading what: the identity of a session.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SessionKey {
    /// A per-task URL: exactly one device's download.
    Task {
        /// OTA task id.
        task_id: String,
        /// Device serial.
        sn: String,
        /// Firmware served.
        firmware_id: FirmwareId,
    },
    /// A plain firmware URL.
    Client {
        /// Firmware served.
        firmware_id: FirmwareId,
        /// Client address.
        client: String,
        /// User-Agent.
        user_agent: String,
    },
}

/// Where a request comes from (for the session record).
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// Client address.
    pub client: String,
    /// User-Agent.
    pub user_agent: String,
}

struct Live {
    rec: DownloadSessionRecord,
    key: SessionKey,
    dirty: bool,
    logged_decile: u8,
}

#[derive(Default)]
struct Sessions {
    by_id: HashMap<String, Live>,
    by_key: HashMap<SessionKey, String>,
}

struct Inner {
    sessions: Mutex<Sessions>,
    store: Arc<dyn SessionStore>,
    /// Flush passes of the background flusher that succeeded.
    flushes: std::sync::atomic::AtomicU64,
}

/// The in-memory session table. Cheap to clone.
#[derive(Clone)]
pub struct DownloadTracker {
    inner: Arc<Inner>,
}

/// A handle a response stream uses to report the bytes it sends.
#[derive(Clone)]
pub struct SessionHandle {
    inner: Arc<Inner>,
    id: String,
}

fn seconds_since(t: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - t).to_std().unwrap_or_default()
}

/// The id of a new session for `key`. A task device's download is one session wherever its
/// ranged requests land: its id follows from the task, device and firmware (the task id's
/// time, then a hash), so replicas serving parts of it write one record whose coverage the
/// catalog unites. Other downloads get a fresh id.
fn session_id(key: &SessionKey) -> String {
    let SessionKey::Task {
        task_id,
        sn,
        firmware_id,
    } = key
    else {
        return crate::domain::ids::next();
    };
    use sha2::Digest;
    const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let hash = sha2::Sha256::digest(format!("{task_id}\n{sn}\n{firmware_id}").as_bytes());
    let mut id: String = task_id.chars().take(10).collect();
    id.extend(
        hash.iter()
            .take(16)
            .map(|b| CROCKFORD[usize::from(b % 32)] as char),
    );
    id
}

impl DownloadTracker {
    /// A tracker over `catalog`, reloading sessions seen within the resume window so a
    /// restarted server continues them.
    pub async fn load(store: Arc<dyn SessionStore>) -> Result<DownloadTracker, CatalogError> {
        let since = Utc::now() - chrono::Duration::from_std(RESUME_WITHIN).unwrap_or_default();
        let mut sessions = Sessions::default();
        for rec in store.recent_sessions(since).await? {
            let key = match (&rec.task_id, &rec.sn) {
                (Some(task_id), Some(sn)) => SessionKey::Task {
                    task_id: task_id.clone(),
                    sn: sn.clone(),
                    firmware_id: rec.firmware_id.clone(),
                },
                _ => SessionKey::Client {
                    firmware_id: rec.firmware_id.clone(),
                    client: rec.client.clone(),
                    user_agent: rec.user_agent.clone(),
                },
            };
            sessions.by_key.insert(key.clone(), rec.id.clone());
            let logged_decile = (rec.percent / 10.0) as u8;
            sessions.by_id.insert(
                rec.id.clone(),
                Live {
                    rec,
                    key,
                    dirty: false,
                    logged_decile,
                },
            );
        }
        Ok(DownloadTracker {
            inner: Arc::new(Inner {
                sessions: Mutex::new(sessions),
                store,
                flushes: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Opens or continues the session for a GET that will send data.
    pub fn begin(&self, key: SessionKey, client: &ClientInfo, file_size: u64) -> SessionHandle {
        let now = Utc::now();
        let mut s = self.inner.lock();
        let existing = s.by_key.get(&key).cloned().filter(|id| {
            s.by_id
                .get(id)
                .is_some_and(|l| seconds_since(l.rec.last_seen_at, now) <= RESUME_WITHIN)
        });
        let id = match existing {
            Some(id) => {
                if let Some(live) = s.by_id.get_mut(&id) {
                    live.rec.requests += 1;
                    live.rec.last_seen_at = now;
                    live.rec.client = client.client.clone();
                    if live.rec.state == SessionState::Stalled {
                        live.rec.state = SessionState::Active;
                        tracing::info!(session_id = %id, firmware_id = %live.rec.firmware_id, client = %live.rec.client, "download resumed");
                    }
                    live.dirty = true;
                }
                id
            }
            None => {
                let id = session_id(&key);
                let (firmware_id, task_id, sn) = match &key {
                    SessionKey::Task {
                        task_id,
                        sn,
                        firmware_id,
                    } => (firmware_id.clone(), Some(task_id.clone()), Some(sn.clone())),
                    SessionKey::Client { firmware_id, .. } => (firmware_id.clone(), None, None),
                };
                let rec = DownloadSessionRecord {
                    v: crate::store::SCHEMA_VERSION,
                    id: id.clone(),
                    firmware_id,
                    task_id,
                    sn,
                    client: client.client.clone(),
                    user_agent: client.user_agent.clone(),
                    file_size,
                    bytes_sent: 0,
                    bytes_covered: 0,
                    percent: 0.0,
                    requests: 1,
                    state: SessionState::Active,
                    started_at: now,
                    last_seen_at: now,
                    covered: Vec::new(),
                };
                tracing::info!(session_id = %id, firmware_id = %rec.firmware_id, client = %rec.client, user_agent = %rec.user_agent, sn = ?rec.sn, file_size, "download started");
                if let Some(old) = s.by_key.insert(key.clone(), id.clone()) {
                    // The previous session of this key is past the resume window: it stays
                    // stored but leaves memory.
                    s.by_id.remove(&old);
                }
                s.by_id.insert(
                    id.clone(),
                    Live {
                        rec,
                        key,
                        dirty: true,
                        logged_decile: 0,
                    },
                );
                id
            }
        };
        SessionHandle {
            inner: Arc::clone(&self.inner),
            id,
        }
    }

    /// Marks idle sessions stalled and writes changed sessions to the catalog; drops from
    /// memory sessions past the resume window. Returns how many were written.
    pub async fn flush(&self) -> Result<usize, CatalogError> {
        let now = Utc::now();
        let dirty: Vec<DownloadSessionRecord> = {
            let mut s = self.inner.lock();
            for live in s.by_id.values_mut() {
                if live.rec.state == SessionState::Active
                    && seconds_since(live.rec.last_seen_at, now) >= STALL_AFTER
                {
                    live.rec.state = SessionState::Stalled;
                    live.dirty = true;
                    tracing::warn!(session_id = %live.rec.id, firmware_id = %live.rec.firmware_id, client = %live.rec.client, percent = live.rec.percent, "download stalled");
                }
            }
            let out = s
                .by_id
                .values_mut()
                .filter(|l| l.dirty)
                .map(|l| {
                    l.dirty = false;
                    l.rec.clone()
                })
                .collect();
            let expired: Vec<(String, SessionKey)> = s
                .by_id
                .values()
                .filter(|l| seconds_since(l.rec.last_seen_at, now) > RESUME_WITHIN)
                .map(|l| (l.rec.id.clone(), l.key.clone()))
                .collect();
            for (id, key) in expired {
                s.by_id.remove(&id);
                if s.by_key.get(&key) == Some(&id) {
                    s.by_key.remove(&key);
                }
            }
            out
        };
        if dirty.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.inner.store.merge_sessions(&dirty).await {
            // Keep them dirty for the next round.
            let mut s = self.inner.lock();
            for rec in &dirty {
                if let Some(l) = s.by_id.get_mut(&rec.id) {
                    l.dirty = true;
                }
            }
            return Err(e);
        }
        Ok(dirty.len())
    }

    /// Prometheus text of the flusher: its successful passes.
    pub fn render_metrics(&self) -> String {
        let n = self
            .inner
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "# HELP fwrepo_download_progress_flushes_total Passes of the download-session flusher that wrote to the catalog.\n# TYPE fwrepo_download_progress_flushes_total counter\nfwrepo_download_progress_flushes_total {n}\n"
        )
    }

    /// Runs the flusher until `cancel`, then flushes once more.
    pub async fn run(self, every: Duration, retention: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = std::time::Instant::now() - Duration::from_secs(3600);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.flush().await {
                Err(e) => tracing::error!(error = %e, "download progress flush failed"),
                Ok(_) => {
                    self.inner
                        .flushes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            if last_prune.elapsed() >= Duration::from_secs(3600) {
                last_prune = std::time::Instant::now();
                let cutoff = Utc::now() - chrono::Duration::from_std(retention).unwrap_or_default();
                match self.inner.store.prune_sessions(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "pruned download sessions past retention"),
                    Err(e) => tracing::error!(error = %e, "pruning download sessions failed"),
                }
            }
        }
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "final download progress flush failed");
        }
    }

    /// Newest-first page of sessions (memory overlaid on the catalog), filtered.
    pub async fn list(
        &self,
        query: &SessionQuery,
        page: &PageRequest,
    ) -> Result<Page<DownloadSessionRecord>, CatalogError> {
        let filter = |r: &DownloadSessionRecord| query.matches(r);
        let after = page.after_key()?;
        let limit = page.limit();
        let live: HashMap<String, DownloadSessionRecord> = {
            let s = self.inner.lock();
            s.by_id
                .iter()
                .map(|(id, l)| (id.clone(), l.rec.clone()))
                .collect()
        };
        // Stored sessions, with the fresher in-memory state where there is one.
        // The store filters by its copy; the fresher in-memory state decides below.
        let mut stored = self.inner.store.list_sessions(query, page).await?;
        stored
            .items
            .retain(|rec| filter(live.get(&rec.id).unwrap_or(rec)));
        for item in &mut stored.items {
            if let Some(l) = live.get(&item.id) {
                // The stored copy may hold ranges another replica served.
                *item = item.merged(l);
            }
        }
        // Sessions not flushed yet.
        let stored_ids: std::collections::HashSet<String> =
            stored.items.iter().map(|r| r.id.clone()).collect();
        let mut merged: Vec<DownloadSessionRecord> = stored.items;
        merged.extend(live.into_values().filter(|r| {
            !stored_ids.contains(&r.id)
                && after.as_deref().is_none_or(|a| r.id.as_bytes() < a)
                && filter(r)
        }));
        merged.sort_by(|a, b| b.id.cmp(&a.id));
        let next_cursor = if merged.len() > limit || stored.next_cursor.is_some() {
            merged.truncate(limit);
            merged.last().map(|r| cursor_for(&r.id))
        } else {
            None
        };
        Ok(Page {
            items: merged,
            next_cursor,
        })
    }

    /// Sessions in state `active` right now.
    pub fn active_count(&self) -> usize {
        let s = self.inner.lock();
        s.by_id
            .values()
            .filter(|l| l.rec.state == SessionState::Active)
            .count()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Sessions> {
        match self.sessions.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl SessionHandle {
    /// Records that `len` bytes starting at `offset` of the file were sent.
    pub fn record(&self, offset: u64, len: u64) {
        let mut s = self.inner.lock();
        let Some(live) = s.by_id.get_mut(&self.id) else {
            return;
        };
        let rec = &mut live.rec;
        rec.bytes_sent += len;
        rec.bytes_covered += cover(&mut rec.covered, offset, offset.saturating_add(len));
        rec.percent = percent(rec.bytes_covered, rec.file_size);
        rec.last_seen_at = Utc::now();
        live.dirty = true;
        let decile = (rec.bytes_covered * 10 / rec.file_size.max(1)).min(10) as u8;
        if rec.bytes_covered >= rec.file_size && rec.state != SessionState::Complete {
            rec.state = SessionState::Complete;
            live.logged_decile = 10;
            tracing::info!(session_id = %rec.id, firmware_id = %rec.firmware_id, client = %rec.client, sn = ?rec.sn, bytes_sent = rec.bytes_sent, requests = rec.requests, "download complete");
        } else if decile > live.logged_decile && decile < 10 {
            live.logged_decile = decile;
            tracing::info!(session_id = %rec.id, firmware_id = %rec.firmware_id, client = %rec.client, percent = rec.percent, "download progress");
        }
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests;
