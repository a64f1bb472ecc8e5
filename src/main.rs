//! The `tollgate` command: parse the CLI, build, run.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tollgate::config::{Config, EMBEDDED_CONFIG, ProcessEnv};

/// mimalloc: the request path allocates and frees many small buffers (headers, body chunks,
/// records); it is markedly cheaper at that than the system allocator. See `tollgate::alloc`.
#[global_allocator]
static GLOBAL: tollgate::alloc::Allocator = tollgate::alloc::Allocator;

/// A metering gateway for LLM traffic: proxies OpenAI-compatible and Anthropic APIs, meters
/// every call in-line and journals a usage record per request.
#[derive(Parser)]
#[command(name = "tollgate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (TOML). Without it, the example config compiled into the binary is
        /// used (the one in `config/tollgate.toml`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address, overriding `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Runtime worker threads (default: one per CPU). With 1, the whole gateway runs on
        /// one thread (tokio's current-thread scheduler), besides the journal writer.
        #[arg(long)]
        worker_threads: Option<usize>,
    },
    /// Validate a config file and print every problem with the path of its field.
    /// Exits 0 when valid, 1 when not.
    CheckConfig {
        /// Config file (TOML).
        file: PathBuf,
        /// Also report what reloading FILE over this config would change (keys, accounts,
        /// prices, upstreams, routes).
        #[arg(long)]
        against: Option<PathBuf>,
        /// Do not read the environment: every variable a `*_env` field names counts as set.
        /// For checking a config where its secrets are not available (e.g. in CI); the
        /// gateway itself still needs them.
        #[arg(long)]
        without_env: bool,
    },
    /// Print the SHA-256 of a client key, as `keys[].sha256` stores it. Reads the key from
    /// standard input when not given (keeps it out of shell history).
    HashKey { key: Option<String> },
    /// Print the journal's entries (usage records, grants) as JSON lines, oldest first.
    Journal {
        /// Journal directory (`journal.dir`).
        #[arg(default_value = tollgate::config::DEFAULT_JOURNAL_DIR)]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            log_format,
            worker_threads,
        } => serve(config, listen, log_format, worker_threads),
        Command::CheckConfig {
            file,
            against,
            without_env,
        } => {
            let env: &dyn tollgate::config::Env = if without_env {
                &PlaceholderEnv
            } else {
                &ProcessEnv
            };
            return check_config(&file, against.as_deref(), env);
        }
        Command::HashKey { key } => hash_key(key),
        Command::Journal { dir } => print_journal(&dir),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `check-config --without-env`: every variable is set, to a stand-in long enough for the
/// admin token's minimum length; formats (a PostgreSQL URL) are not checked.
struct PlaceholderEnv;

impl tollgate::config::Env for PlaceholderEnv {
    fn var(&self, _name: &str) -> Option<String> {
        Some("placeholder-for-check-config".into())
    }

    fn is_placeholder(&self) -> bool {
        true
    }
}

fn check_config(
    file: &std::path::Path,
    against: Option<&std::path::Path>,
    env: &dyn tollgate::config::Env,
) -> std::process::ExitCode {
    match Config::load(file, env) {
        Ok(c) => {
            println!(
                "{}: valid ({} upstreams, {} routes, {} keys, {} accounts, {} prices)",
                file.display(),
                c.upstreams.len(),
                c.routes.len(),
                c.keys.len(),
                c.accounts.len(),
                c.prices.models.len()
            );
            if let Some(old) = against {
                match Config::load(old, env) {
                    Ok(old_config) => {
                        let diff = tollgate::reload::ConfigDiff::between(&old_config, &c);
                        match serde_json::to_string_pretty(&diff) {
                            Ok(text) => println!("changes against {}:\n{text}", old.display()),
                            Err(e) => eprintln!("cannot render the changes: {e}"),
                        }
                    }
                    Err(e) => {
                        eprintln!("{}: {e}", old.display());
                        return std::process::ExitCode::FAILURE;
                    }
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_journal(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    let entries = tollgate::ledger::journal::read_entries(dir)
        .with_context(|| format!("reading the journal in {}", dir.display()))?;
    let mut out = std::io::stdout().lock();
    for entry in entries {
        serde_json::to_writer(&mut out, &entry)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn hash_key(key: Option<String>) -> anyhow::Result<()> {
    let key = match key {
        Some(k) => k,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    anyhow::ensure!(!key.is_empty(), "the key is empty");
    println!("{}", hex::encode(tollgate::config::hash_key(&key)));
    Ok(())
}

fn serve(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    log_format: LogFormat,
    worker_threads: Option<usize>,
) -> anyhow::Result<()> {
    init_logging(log_format);
    let config_path = config.clone();
    let config = match &config {
        Some(path) => Config::load(path, &ProcessEnv)?,
        None => Config::parse(EMBEDDED_CONFIG, &ProcessEnv)
            .context("the embedded example config (set the environment variables it names)")?,
    };
    let threads = worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // One thread: tokio's single-threaded scheduler, which skips the work-stealing
    // machinery (atomics, cross-thread wake-ups) that a lone worker cannot use anyway.
    let mut runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime.worker_threads(threads);
        runtime
    };
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        let mut builder = tollgate::GatewayBuilder::new(config);
        if let Some(addr) = listen {
            builder = builder.listen(addr);
        }
        if let Some(path) = &config_path {
            builder = builder.config_path(path).watch(true);
        }
        let gateway = builder.start().await?;
        tracing::info!(addr = %gateway.addr(), admin = ?gateway.admin_addr(), "tollgate listening");
        #[cfg(unix)]
        {
            let reloader = gateway.reloader().clone();
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the config file");
                    let _ = reloader.reload_file().await;
                }
            });
        }
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        gateway.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
