//! tollgate: a metering gateway for LLM traffic.
//!
//! [`GatewayBuilder`] starts the whole gateway in-process (tests bind port 0):
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = tollgate::config::Config::load("config/tollgate.toml".as_ref(), &tollgate::config::ProcessEnv)?;
//! let gateway = tollgate::GatewayBuilder::new(config).start().await?;
//! println!("listening on {}", gateway.addr());
//! gateway.shutdown().await;
//! # Ok(()) }
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod admin;
pub mod alert;
pub mod alloc;
pub mod balance;
pub mod config;
pub mod error;
pub mod http_client;
pub mod ledger;
pub mod meter;
pub mod metrics;
pub mod mock;
pub mod pricing;
pub mod provider;
pub mod proxy;
pub mod reload;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use config::Config;
use ledger::{Ledger, SegmentJournal};
use proxy::Gateway;
use proxy::snapshot::Snapshot;

/// The hasher of the maps the request path looks up (keys, accounts, throttles, metrics):
/// foldhash, several times cheaper than the standard SipHash on short keys and still seeded
/// per process. Their keys come from config, never from clients.
pub type FastHash = foldhash::fast::RandomState;

/// A concurrent map with [`FastHash`].
pub type FastDashMap<K, V> = dashmap::DashMap<K, V, FastHash>;

/// Locks a mutex, taking the data even if a thread panicked holding it: every mutex in
/// tollgate guards state that stays consistent between statements (queues, pools, the
/// journal), so a poisoned one is still usable, and the gateway must not stop over it.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long shutdown waits for pending alert deliveries.
const ALERT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Builds a gateway from a validated config.
pub struct GatewayBuilder {
    config: Config,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    config_path: Option<std::path::PathBuf>,
    env: Arc<dyn config::Env + Send + Sync>,
    watch: bool,
}

impl GatewayBuilder {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            listen: None,
            admin_listen: None,
            config_path: None,
            env: Arc::new(config::ProcessEnv),
            watch: false,
        }
    }

    /// The file the config came from: reloads (SIGHUP, admin, file watch) read it again.
    pub fn config_path(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config_path = Some(path.into());
        self
    }

    /// Where reloads read provider credentials (default: the process environment).
    pub fn env(mut self, env: Arc<dyn config::Env + Send + Sync>) -> Self {
        self.env = env;
        self
    }

    /// Reload when the config file changes on disk.
    pub fn watch(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }

    /// Overrides `admin.listen` (tests pass `127.0.0.1:0`); needs an `[admin]` section.
    pub fn admin_listen(mut self, addr: SocketAddr) -> Self {
        self.admin_listen = Some(addr);
        self
    }

    /// Overrides `server.listen` (tests pass `127.0.0.1:0`).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Opens the journal, binds the listener and starts serving.
    pub async fn start(self) -> anyhow::Result<RunningGateway> {
        let journal_config = self.config.journal.clone();
        let checkpoint = ledger::checkpoint::load(&journal_config.dir).map_err(|e| {
            anyhow::anyhow!(
                "journal checkpoint in `{}` is unreadable: {e}",
                journal_config.dir.display()
            )
        })?;
        let (journal, recovery, balances, shadow) =
            open_and_recover(&self.config, &journal_config, checkpoint)?;
        if recovery.truncated_bytes > 0 || recovery.quarantined > 0 {
            tracing::warn!(
                truncated_bytes = recovery.truncated_bytes,
                quarantined = recovery.quarantined,
                "journal recovered from damage"
            );
        }
        let ledger = Ledger::start(
            Box::new(journal),
            journal_config.channel_capacity,
            journal_config.fsync,
        )?;
        let listen = self.listen.unwrap_or(self.config.server.listen);
        let grace = self.config.server.shutdown_grace;
        let idle_timeout = self.config.server.client_idle_timeout;
        let admin_config = self.config.admin.clone();
        let snapshot = Snapshot::build(self.config)?;
        // Build the tokenizer before serving, so no request waits for it (~150 ms, once).
        if let Err(e) = tokio::task::spawn_blocking(meter::tokenizer::warm_up).await {
            tracing::warn!(error = %e, "tokenizer warm-up failed");
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let addr = server::local_addr(&listener)?;
        let alerter = snapshot.config.alerts.signing_secret.clone().map(|secret| {
            let mut config = alert::AlerterConfig::new(secret);
            if let Some(n) = snapshot.config.alerts.max_attempts {
                config.max_attempts = n;
            }
            alert::Alerter::start(config)
        });
        let gateway = Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            ledger: ledger.clone(),
            balances,
            throttles: FastDashMap::default(),
            alerter,
            clock: std::time::Instant::now(),
            metrics: Arc::new(metrics::Metrics::default()),
            sink_progress: ArcSwap::from_pointee(Vec::new()),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let sinks = ledger::sinks::build(&gateway.snapshot.load().config.sinks).await;
        let flusher =
            ledger::flusher::Flusher::start(&journal_config.dir, sinks, ledger.shared().clone());
        gateway
            .sink_progress
            .store(Arc::new(flusher.progress.clone()));
        let policy_gateway = gateway.clone();
        let policies: ledger::checkpoint::PolicySource = Arc::new(move |account: &str| {
            policy_gateway
                .snapshot
                .load()
                .config
                .accounts
                .get(account)
                .cloned()
                .unwrap_or_else(|| Arc::new(balance::AccountPolicy::unlimited(account)))
        });
        ledger.install_shadow(ledger::Shadow {
            balances: shadow,
            policies,
        });
        let checkpointer = ledger::checkpoint::spawn(
            &journal_config.dir,
            ledger.clone(),
            flusher.progress.clone(),
            journal_config.checkpoint_interval,
            stop_rx.clone(),
        );
        let data_plane = server::spawn_data_plane(
            listener,
            gateway.clone(),
            grace,
            idle_timeout,
            stop_rx.clone(),
        );
        let reloader = Arc::new(reload::Reloader::new(
            gateway.clone(),
            self.config_path.clone(),
            self.env.clone(),
        ));
        let watcher = match (&self.config_path, self.watch) {
            (Some(path), true) => Some(
                reload::watch(reloader.clone(), path)
                    .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", path.display()))?,
            ),
            _ => None,
        };
        let (admin_addr, admin_task) = match admin_config {
            Some(admin_config) => {
                let at = self.admin_listen.unwrap_or(admin_config.listen);
                let admin_listener = tokio::net::TcpListener::bind(at)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {at} (admin): {e}"))?;
                let admin_addr = server::local_addr(&admin_listener)?;
                let admin = Arc::new(admin::Admin::new(
                    gateway.clone(),
                    reloader.clone(),
                    &admin_config.token,
                ));
                let task = server::spawn_listener(
                    admin_listener,
                    grace,
                    idle_timeout,
                    stop_rx,
                    move |req| admin.clone().handle(req),
                );
                (Some(admin_addr), Some(task))
            }
            None => (None, None),
        };
        Ok(RunningGateway {
            addr,
            admin_addr,
            gateway,
            stop: stop_tx,
            data_plane,
            admin_task,
            reloader,
            _watcher: watcher,
            flusher,
            grace,
            checkpointer,
        })
    }
}

/// Opens the journal and rebuilds balances from the last checkpoint and the journal entries
/// after it, replayed as they are read (a long journal is never in memory whole). Also returns
/// the journal writer's shadow copy (the same state, kept apart from the live one).
fn open_and_recover(
    config: &Config,
    journal_config: &config::JournalConfig,
    checkpoint: Option<ledger::checkpoint::Checkpoint>,
) -> anyhow::Result<(
    SegmentJournal,
    ledger::journal::Recovery,
    balance::Balances,
    balance::Balances,
)> {
    let now = chrono::Utc::now();
    let policy_for = |account: &str| {
        config
            .accounts
            .get(account)
            .cloned()
            .unwrap_or_else(|| Arc::new(balance::AccountPolicy::unlimited(account)))
    };
    let (from, accounts) = checkpoint.map_or((0, Vec::new()), |c| (c.seq, c.accounts));
    let live = balance::Balances::import(&accounts);
    let shadow = balance::Balances::import(&accounts);
    let (journal, recovery) = SegmentJournal::open_replaying(
        &journal_config.dir,
        journal_config.segment_bytes,
        from,
        |_, entry| {
            live.apply_entry(&entry, &policy_for, now);
            shadow.apply_entry(&entry, &policy_for, now);
        },
    )
    .map_err(|e| anyhow::anyhow!("journal.dir `{}`: {e}", journal_config.dir.display()))?;
    if recovery.replayed > 0 || from > 0 {
        tracing::info!(
            checkpoint_seq = from,
            replayed = recovery.replayed,
            "balances rebuilt from the journal"
        );
    }
    // Grants added to config since the checkpoint reach the restored accounts.
    for policy in config.accounts.values() {
        for b in [&live, &shadow] {
            if let Some(state) = b.get(&policy.id) {
                state.sync_grants(policy, now);
            }
        }
    }
    Ok((journal, recovery, live, shadow))
}

/// A started gateway.
pub struct RunningGateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    data_plane: JoinHandle<()>,
    admin_task: Option<JoinHandle<()>>,
    reloader: Arc<reload::Reloader>,
    _watcher: Option<notify::RecommendedWatcher>,
    flusher: ledger::flusher::Flusher,
    grace: std::time::Duration,
    checkpointer: JoinHandle<()>,
}

impl RunningGateway {
    /// The data-plane address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.gateway.ledger
    }

    /// Applies config changes (SIGHUP, tests).
    pub fn reloader(&self) -> &Arc<reload::Reloader> {
        &self.reloader
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stops accepting, waits for in-flight requests (bounded by the grace period), and syncs
    /// the journal.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.data_plane.await {
            tracing::error!(error = %e, "data plane task failed");
        }
        if let Some(task) = self.admin_task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "admin task failed");
        }
        self.gateway.ledger.close().await;
        // A last, bounded flush to the sinks; what is left resumes from the cursors.
        self.flusher.shutdown(self.grace).await;
        let _ = self.checkpointer.await;
        if let Some(alerter) = &self.gateway.alerter
            && !alerter.drain(ALERT_DRAIN_TIMEOUT).await
        {
            tracing::warn!("alert deliveries still pending at shutdown");
        }
    }
}
