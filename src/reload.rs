//! Hot reload: a new config is read, validated whole and swapped in as one snapshot, or
//! refused with every problem and the old snapshot keeps serving.
//!
//! Triggers: the config file changing on disk (watched through its directory, so editors that
//! write a temporary file and rename it into place are seen; bursts of events are debounced),
//! SIGHUP (`main`), and `POST /admin/reload`. Reloads are serialised; each one reports what it
//! changed (keys, accounts, prices, plans, upstreams, routes) so operators can review a change
//! with a dry run first.
//!
//! What a reload does not touch: balances, reservations, period usage, throttle and alert
//! state live outside the snapshot and carry on; requests in flight finish with the snapshot
//! they started with. Settings bound at start (listen addresses, journal) are reported as
//! needing a restart and otherwise ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigError, Env, KeyConfig};
use crate::proxy::Gateway;
use crate::proxy::snapshot::Snapshot;

/// Quiet time after the last file event before a reload starts.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(200);
/// Pause between two reads that must agree before a watched file is reloaded.
const STABLE_READ_PAUSE: Duration = Duration::from_millis(50);
const STABLE_READ_ATTEMPTS: usize = 20;

/// What a reload changed (or, for a dry run, would change).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    pub keys_added: Vec<String>,
    pub keys_removed: Vec<String>,
    pub keys_changed: Vec<String>,
    pub accounts_added: Vec<String>,
    pub accounts_removed: Vec<String>,
    pub accounts_changed: Vec<String>,
    pub prices_changed: Vec<String>,
    pub upstreams_changed: Vec<String>,
    pub routes_changed: bool,
    /// Settings that only apply after a restart.
    pub needs_restart: Vec<String>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        *self == ConfigDiff::default()
    }

    /// Compares two configs by name; secrets are compared but never shown.
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        fn diff<V: PartialEq>(
            old: &BTreeMap<String, V>,
            new: &BTreeMap<String, V>,
        ) -> (Vec<String>, Vec<String>, Vec<String>) {
            let added = new
                .keys()
                .filter(|k| !old.contains_key(*k))
                .cloned()
                .collect();
            let removed = old
                .keys()
                .filter(|k| !new.contains_key(*k))
                .cloned()
                .collect();
            let changed = new
                .iter()
                .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
                .map(|(k, _)| k.clone())
                .collect();
            (added, removed, changed)
        }
        let accounts = |c: &Config| -> BTreeMap<String, String> {
            c.accounts
                .iter()
                .map(|(id, p)| (id.clone(), format!("{p:?}")))
                .collect()
        };
        let prices = |c: &Config| -> BTreeMap<String, String> {
            let mut m: BTreeMap<String, String> = c
                .prices
                .models
                .iter()
                .map(|(_, p)| (p.label.to_string(), format!("{p:?}")))
                .collect();
            m.extend(
                c.prices
                    .outcomes
                    .iter()
                    .map(|(name, p)| (format!("outcome:{name}"), p.to_string())),
            );
            m
        };
        let upstreams = |c: &Config| -> BTreeMap<String, String> {
            c.upstreams
                .iter()
                .map(|u| {
                    let credential = u
                        .credential
                        .as_ref()
                        .map(|s| hex::encode(Sha256::digest(s.expose().as_bytes())));
                    (
                        u.name.clone(),
                        format!(
                            "{:?}|{}|{}|{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}",
                            u.dialect,
                            u.origin,
                            u.path_prefix,
                            u.ca_file,
                            u.connect_timeout,
                            u.timeout,
                            u.pool_max_idle_per_host,
                            u.default,
                            credential.is_some(),
                            credential
                        ),
                    )
                })
                .collect()
        };
        // Keys can number in the hundreds of thousands: compare the structs by id, no strings.
        let old_keys: HashMap<&str, &KeyConfig> =
            old.keys.iter().map(|k| (k.id.as_str(), k)).collect();
        let new_keys: HashMap<&str, &KeyConfig> =
            new.keys.iter().map(|k| (k.id.as_str(), k)).collect();
        let keys_added = new
            .keys
            .iter()
            .filter(|k| !old_keys.contains_key(k.id.as_str()))
            .map(|k| k.id.clone())
            .collect();
        let keys_removed = old
            .keys
            .iter()
            .filter(|k| !new_keys.contains_key(k.id.as_str()))
            .map(|k| k.id.clone())
            .collect();
        let keys_changed = new
            .keys
            .iter()
            .filter(|k| old_keys.get(k.id.as_str()).is_some_and(|o| *o != *k))
            .map(|k| k.id.clone())
            .collect();
        let (accounts_added, accounts_removed, accounts_changed) =
            diff(&accounts(old), &accounts(new));
        let (p_added, p_removed, p_changed) = diff(&prices(old), &prices(new));
        let prices_changed: BTreeSet<String> = p_added
            .into_iter()
            .chain(p_removed)
            .chain(p_changed)
            .collect();
        let (u_added, u_removed, u_changed) = diff(&upstreams(old), &upstreams(new));
        let upstreams_changed: BTreeSet<String> = u_added
            .into_iter()
            .chain(u_removed)
            .chain(u_changed)
            .collect();
        let mut needs_restart = Vec::new();
        if old.server.listen != new.server.listen {
            needs_restart.push("server.listen".to_string());
        }
        if old.journal.dir != new.journal.dir {
            needs_restart.push("journal.dir".to_string());
        }
        if old.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen) {
            needs_restart.push("admin.listen".to_string());
        }
        let digest = |s: Option<&crate::config::Secret>| {
            s.map(|s| <[u8; 32]>::from(Sha256::digest(s.expose().as_bytes())))
        };
        if digest(old.admin.as_ref().map(|a| &a.token))
            != digest(new.admin.as_ref().map(|a| &a.token))
        {
            needs_restart.push("admin.token_env".to_string());
        }
        if digest(old.alerts.signing_secret.as_ref()) != digest(new.alerts.signing_secret.as_ref())
            || old.alerts.max_attempts != new.alerts.max_attempts
        {
            needs_restart.push("alerts".to_string());
        }
        if old.server.shutdown_grace != new.server.shutdown_grace {
            needs_restart.push("server.shutdown_grace_ms".to_string());
        }
        if old.server.client_idle_timeout != new.server.client_idle_timeout {
            needs_restart.push("server.client_idle_timeout_ms".to_string());
        }
        if old.journal.channel_capacity != new.journal.channel_capacity {
            needs_restart.push("journal.channel_capacity".to_string());
        }
        ConfigDiff {
            keys_added,
            keys_removed,
            keys_changed,
            accounts_added,
            accounts_removed,
            accounts_changed,
            prices_changed: prices_changed.into_iter().collect(),
            upstreams_changed: upstreams_changed.into_iter().collect(),
            routes_changed: format!("{:?}", old.routes) != format!("{:?}", new.routes),
            needs_restart,
        }
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{0}")]
    Upstream(#[from] crate::proxy::snapshot::UpstreamBuildError),
    #[error("no config file to reload from (the gateway runs on the embedded config)")]
    NoFile,
}

impl ReloadError {
    /// Every problem, one per entry.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ReloadError::Invalid(e) => e.problems.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// Applies config changes to a running gateway.
pub struct Reloader {
    gateway: Arc<Gateway>,
    path: Option<PathBuf>,
    env: Arc<dyn Env + Send + Sync>,
    serial: tokio::sync::Mutex<()>,
    applied: AtomicU64,
    failed: AtomicU64,
    /// SHA-256 of the file text last applied, to skip file events that changed nothing.
    last_digest: std::sync::Mutex<[u8; 32]>,
}

impl Reloader {
    pub fn new(
        gateway: Arc<Gateway>,
        path: Option<PathBuf>,
        env: Arc<dyn Env + Send + Sync>,
    ) -> Reloader {
        let digest = path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|text| Sha256::digest(&text).into())
            .unwrap_or([0; 32]);
        Reloader {
            gateway,
            path,
            env,
            serial: tokio::sync::Mutex::new(()),
            applied: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_digest: std::sync::Mutex::new(digest),
        }
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    fn read(&self) -> Result<(Config, [u8; 32]), ReloadError> {
        let path = self.path.as_deref().ok_or(ReloadError::NoFile)?;
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("{}: cannot read: {e}", path.display())],
        })?;
        self.parse(&text)
    }

    fn parse(&self, text: &str) -> Result<(Config, [u8; 32]), ReloadError> {
        let digest = Sha256::digest(text.as_bytes()).into();
        Ok((Config::parse(text, self.env.as_ref())?, digest))
    }

    /// Validates the config file and reports what applying it would change.
    pub fn dry_run(&self) -> Result<ConfigDiff, ReloadError> {
        let (config, _) = self.read()?;
        Ok(ConfigDiff::between(
            &self.gateway.snapshot.load().config,
            &config,
        ))
    }

    /// Reads, validates and applies the config file.
    pub async fn reload_file(&self) -> Result<ConfigDiff, ReloadError> {
        let _serial = self.serial.lock().await;
        let result = self.read().and_then(|parsed| self.swap_file(parsed));
        self.count(&result);
        result
    }

    /// Applies `text`, the config file's content as the watcher saw it hold still, unless it
    /// is what was last applied. The file is not read again: a writer that truncates and
    /// rewrites it could be caught half-way by a second read.
    async fn reload_watched(&self, text: &str) {
        let _serial = self.serial.lock().await;
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if *crate::lock(&self.last_digest) == digest {
            return;
        }
        let result = self.parse(text).and_then(|parsed| self.swap_file(parsed));
        self.count(&result);
    }

    /// Swaps in a config read from the file and remembers its digest.
    fn swap_file(&self, (config, digest): (Config, [u8; 32])) -> Result<ConfigDiff, ReloadError> {
        let diff = self.swap(config)?;
        *crate::lock(&self.last_digest) = digest;
        Ok(diff)
    }

    /// Applies an already-validated config (tests, embedders).
    pub async fn apply(&self, config: Config) -> Result<ConfigDiff, ReloadError> {
        let _serial = self.serial.lock().await;
        let result = self.swap(config);
        self.count(&result);
        result
    }

    fn count(&self, result: &Result<ConfigDiff, ReloadError>) {
        match result {
            Ok(diff) => {
                self.applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(changes = ?diff, "config reloaded");
                if !diff.needs_restart.is_empty() {
                    tracing::warn!(settings = ?diff.needs_restart, "these settings only apply after a restart");
                }
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "config reload refused; the previous config keeps serving");
            }
        }
    }

    fn swap(&self, config: Config) -> Result<ConfigDiff, ReloadError> {
        let current = self.gateway.snapshot.load_full();
        let diff = ConfigDiff::between(&current.config, &config);
        let next = Snapshot::build_reusing(config, Some(&current))?;
        // New configured grants reach live accounts (grant ids make this idempotent).
        let now = chrono::Utc::now();
        for policy in next.config.accounts.values() {
            if let Some(state) = self.gateway.balances.get(&policy.id) {
                state.sync_grants(policy, now);
            }
        }
        self.gateway.snapshot.store(Arc::new(next));
        // The old snapshot (its key table can be large) is freed off the caller's thread once
        // in-flight requests release it.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || drop(current));
            }
            Err(_) => drop(current),
        }
        Ok(diff)
    }

    /// The file's current content (None when unreadable).
    fn file_text(&self) -> Option<String> {
        std::fs::read_to_string(self.path.as_deref()?).ok()
    }
}

/// What says a file's content may have changed without reading it: the file the path
/// resolves to (a swapped symlink changes it), its size, and its modification and change
/// times (every write moves the change time, which no tool can set back). File times tick
/// coarsely (a few ms), so two writes close together can leave the same stamp: a stamp is
/// only trusted once it is [`FileStamp::SETTLE`] old.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    const SETTLE: Duration = Duration::from_secs(1);

    /// Whether the file was last changed long enough ago that a later write must show.
    fn settled(&self) -> bool {
        let changed = std::time::UNIX_EPOCH
            + Duration::new(
                u64::try_from(self.ctime.0).unwrap_or(0),
                u32::try_from(self.ctime.1).unwrap_or(0),
            );
        changed
            .elapsed()
            .is_ok_and(|since| since >= FileStamp::SETTLE)
    }

    /// `None` when the file cannot be examined (or not on Unix): then it is always read.
    fn of(path: &Path) -> Option<FileStamp> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(path).ok()?;
            Some(FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            None
        }
    }
}

/// Watches the config file and reloads on change. Keep the returned watcher alive.
pub fn watch(reloader: Arc<Reloader>, path: &Path) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // Any event in the directory triggers a check, not only events naming the file: a
    // symlinked config (Kubernetes ConfigMaps swap a `..data` link) changes without one.
    // `reload_watched` compares content digests, so unrelated events cost one read. Reads and
    // opens change nothing (and a journal kept beside the config would otherwise cause a
    // re-read of the config file many times a second under load).
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let file = path.to_path_buf();
    tokio::spawn(async move {
        // The file as it was when last read: events that leave it as it was (a log or a
        // journal written beside it) cost a `stat`, not a read and a digest of the whole file.
        let mut last_read = None;
        while rx.recv().await.is_some() {
            // Debounce: wait until events stop for a moment (editors write in bursts).
            loop {
                match tokio::time::timeout(WATCH_DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let seen = FileStamp::of(&file);
            if seen.is_some_and(|s| s.settled()) && seen == last_read {
                continue;
            }
            last_read = seen;
            // An editor may still be writing (truncate, then write): reload only once the
            // content holds still across a short pause, so a half-written file is not
            // mistaken for an invalid config.
            let mut previous = reloader.file_text();
            for _ in 0..STABLE_READ_ATTEMPTS {
                tokio::time::sleep(STABLE_READ_PAUSE).await;
                let now = reloader.file_text();
                if now == previous {
                    break;
                }
                previous = now;
            }
            if let Some(text) = previous {
                reloader.reload_watched(&text).await;
            }
        }
    });
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_stamp_changes_with_the_file_and_not_with_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tollgate.toml");
        std::fs::write(&config, "a = 1\n").unwrap();
        let first = FileStamp::of(&config).unwrap();
        assert!(!first.settled(), "just written");
        // A log beside the config: same stamp.
        std::fs::write(dir.path().join("tollgate.log"), "line\n").unwrap();
        assert_eq!(FileStamp::of(&config), Some(first));
        // Rewritten with the same size, after the clock ticked: a new stamp.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&config, "a = 2\n").unwrap();
        let rewritten = FileStamp::of(&config).unwrap();
        assert_ne!(rewritten, first);
        // A symlink swapped to another file (as Kubernetes does): a new stamp.
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "a = 2\n").unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&config, &link).unwrap();
        let before = FileStamp::of(&link).unwrap();
        let tmp = dir.path().join("link.tmp");
        std::os::unix::fs::symlink(&other, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        assert_ne!(FileStamp::of(&link).unwrap(), before);
        assert_eq!(FileStamp::of(&dir.path().join("missing")), None);
    }

    #[test]
    fn a_stamp_is_trusted_only_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tollgate.toml");
        std::fs::write(&config, "a = 1\n").unwrap();
        let mut stamp = FileStamp::of(&config).unwrap();
        assert!(!stamp.settled());
        stamp.ctime.0 -= 2;
        assert!(stamp.settled());
    }
}
