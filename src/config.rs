//! Configuration: the TOML file as written (`Raw*` serde structs, unknown fields refused), and
//! the validated [`Config`] the gateway runs on. Validation collects every problem with the
//! path of the field it concerns (`keys[3].account: must not be empty`), so `tollgate
//! check-config` can print them all at once and a bad file never half-applies.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::balance::{AccountPolicy, AutoTopUp, GrantKind, GrantSpec, OverageRule, Slowdown};
use crate::pricing::{Conversion, ModelPrice, Period, Plan, PriceBook, Tier, to_nanos, to_ppb};

/// The example configuration shipped in `config/`, compiled in so `tollgate serve` runs with
/// no arguments.
pub const EMBEDDED_CONFIG: &str = include_str!("../config/tollgate.toml");

/// Default listen address of the data plane.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default limit on a request body: 10 MiB, comfortably above real chat payloads.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Default limit on a non-streaming response body that is buffered to read its usage.
pub const DEFAULT_MAX_METERED_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Default time allowed to open a connection to an upstream.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default time allowed from sending a request until the upstream's response headers arrive.
/// LLM calls are slow; ten minutes matches the official SDKs' default.
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 600_000;
/// Default idle connections kept per upstream host.
pub const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// Default journal directory.
pub const DEFAULT_JOURNAL_DIR: &str = "data/journal";
/// Default group-commit interval.
pub const DEFAULT_FSYNC_INTERVAL_MS: u64 = 5;
/// Default journal segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default interval between journal checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 10_000;
/// Default journal disk budget: 10 GiB.
pub const DEFAULT_JOURNAL_MAX_BYTES: u64 = 10 * 1024 * 1024 * 1024;
/// Default capacity of the channel between the request path and the journal writer.
pub const DEFAULT_JOURNAL_CHANNEL_CAPACITY: usize = 65_536;
/// Default grace period for in-flight requests at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Default of `server.client_idle_timeout_ms` (idle client connections go after 30 to 60 s).
pub const DEFAULT_CLIENT_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Default output tokens reserved when a request sets no `max_tokens`.
pub const DEFAULT_OUTPUT_RESERVATION_TOKENS: u64 = 4_096;
/// Default prompt bytes per token for the cheap admission estimate (conservative: real text
/// averages about four bytes a token, JSON framing adds more bytes than tokens).
pub const DEFAULT_PROMPT_BYTES_PER_TOKEN: u64 = 3;
/// Default alert thresholds, fractions of the hard cap and of the plan allowance.
pub const DEFAULT_ALERT_THRESHOLDS: [&str; 4] = ["0.5", "0.75", "0.9", "1"];
/// Default seconds between two automatic top-ups.
pub const DEFAULT_TOPUP_COOLDOWN_S: u64 = 3_600;
/// Default grant priority (lower is drawn first).
pub const DEFAULT_GRANT_PRIORITY: i32 = 10;

// ---------------------------------------------------------------------------------------------
// Raw: the file as written.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    journal: RawJournal,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    keys: Vec<RawKey>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    reservation: RawReservation,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    prices: Vec<RawPrice>,
    #[serde(default)]
    outcome_prices: Vec<RawOutcomePrice>,
    #[serde(default)]
    plans: Vec<RawPlan>,
    #[serde(default)]
    accounts: Vec<RawAccount>,
    #[serde(default)]
    sinks: Vec<crate::ledger::sinks::RawSinkConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// Admin listener address (balances, grants, metrics, reload). Keep it private.
    listen: String,
    /// Environment variable holding the admin bearer token.
    token_env: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReservation {
    /// Output tokens reserved for a request that sets no `max_tokens`. Default 4 096.
    default_output_tokens: Option<u64>,
    /// Prompt bytes per token assumed by the cheap admission estimate. Default 3.
    prompt_bytes_per_token: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    /// Environment variable holding the webhook signing secret (HMAC-SHA256).
    signing_secret_env: Option<String>,
    /// Delivery attempts per webhook before giving up. Default 8.
    max_attempts: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    model: Option<String>,
    model_prefix: Option<String>,
    /// Per million uncached input tokens.
    input_per_mtok: Decimal,
    /// Per million cached input tokens. Default: `input_per_mtok`.
    cached_input_per_mtok: Option<Decimal>,
    /// Per million input tokens written to the prompt cache. Default: `input_per_mtok`.
    cache_write_per_mtok: Option<Decimal>,
    /// Per million output tokens.
    output_per_mtok: Decimal,
    /// Per million reasoning tokens. Default: `output_per_mtok`.
    reasoning_per_mtok: Option<Decimal>,
    /// Per call. Default 0.
    per_call: Option<Decimal>,
    /// Per second of upstream time. Default 0.
    per_compute_second: Option<Decimal>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutcomePrice {
    name: String,
    price: Decimal,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    id: String,
    /// `month` (default), `week` (ISO, from Monday) or `day`; UTC calendar-aligned.
    period: Option<String>,
    #[serde(default)]
    base_fee: Decimal,
    #[serde(default)]
    seat_fee: Decimal,
    /// Rated usage included per period, in the account's unit.
    #[serde(default)]
    included_usage: Decimal,
    /// Graduated overage tiers; default one tier at 1×.
    #[serde(default)]
    tiers: Vec<RawTier>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    /// Overage (beyond the allowance) covered up to here; omitted on the last tier.
    up_to: Option<Decimal>,
    multiplier: Decimal,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    id: String,
    /// `USD` (default) or any currency code, or `credits`.
    unit: Option<String>,
    /// Credits per price-book currency unit (required when `unit = "credits"`).
    credits_per_unit: Option<Decimal>,
    plan: Option<String>,
    #[serde(default)]
    seats: u32,
    /// Spend per period beyond which requests are refused (402).
    hard_cap: Option<Decimal>,
    /// Spend per period beyond which an alert fires; requests continue.
    soft_cap: Option<Decimal>,
    /// Draw usage from prepaid grants.
    #[serde(default)]
    prepaid: bool,
    /// `block` (default), `allow` (down to -overage_limit) or `require_topup`.
    overage: Option<String>,
    overage_limit: Option<Decimal>,
    #[serde(default)]
    grants: Vec<RawGrant>,
    auto_topup: Option<RawAutoTopUp>,
    /// Fractions of the hard cap / allowance that alert. Default 0.5, 0.75, 0.9, 1.
    alert_thresholds: Option<Vec<Decimal>>,
    /// Balance at or below which a low-balance alert fires.
    low_balance: Option<Decimal>,
    /// The account admin's webhook URL.
    admin_webhook: Option<String>,
    slowdown: Option<RawSlowdown>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    id: String,
    amount: Decimal,
    /// `paid` or `promotional` (default).
    kind: Option<String>,
    /// Lower is drawn first. Default 10.
    priority: Option<i32>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `keep` (default: carries over until `expires_at`) or `expire` (forfeited at the end of
    /// the period it was granted in).
    rollover: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoTopUp {
    threshold: Decimal,
    amount: Decimal,
    /// Minimum seconds between two automatic top-ups. Default 3 600.
    cooldown_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlowdown {
    /// Fraction of the hard cap at which the slow-down starts.
    at: Decimal,
    /// Requests per minute per key beyond it.
    rpm: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    /// Data-plane listen address. Default `127.0.0.1:8080`.
    listen: Option<String>,
    /// Largest accepted request body, bytes. Default 10 MiB.
    max_request_body_bytes: Option<usize>,
    /// Largest non-streaming response body buffered for metering, bytes. Default 64 MiB.
    max_metered_response_bytes: Option<usize>,
    /// Grace period for in-flight requests at shutdown, milliseconds. Default 10 000.
    shutdown_grace_ms: Option<u64>,
    /// A client connection with nothing in progress for this long is closed (after between
    /// one and two of these), milliseconds. Default 30 000.
    client_idle_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    /// Journal directory (segment files, sink cursors). Default `data/journal`.
    dir: Option<PathBuf>,
    /// Records buffered between requests and the writer. Default 65 536.
    channel_capacity: Option<usize>,
    /// `always` (every batch synced before it counts), `interval` (group commit; default) or
    /// `never` (left to the OS).
    fsync: Option<String>,
    /// Group-commit interval, milliseconds. Default 5.
    fsync_interval_ms: Option<u64>,
    /// Segment size before rotation, bytes. Default 64 MiB.
    segment_bytes: Option<u64>,
    /// Disk budget of the journal, bytes. Default 10 GiB.
    max_bytes: Option<u64>,
    /// When the budget is exhausted: `refuse` new metered requests (503, default) or `serve`
    /// and alarm (log + metric).
    on_full: Option<String>,
    /// How often delivered segments are checkpointed and deleted, milliseconds. Default 10 000.
    checkpoint_interval_ms: Option<u64>,
    /// Hold the end of each response until its record is written to the journal (default
    /// true: a response a client received survives a crash of the process).
    wait_for_write: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    /// `openai` or `anthropic`.
    dialect: String,
    /// `https://api.openai.com` — scheme, host, optional port and path prefix.
    base_url: String,
    /// Name of the environment variable holding the provider credential.
    api_key_env: Option<String>,
    /// Extra PEM CA bundle trusted for this upstream (besides the system roots).
    ca_file: Option<PathBuf>,
    /// Connect timeout, milliseconds. Default 5 000.
    connect_timeout_ms: Option<u64>,
    /// Time to response headers, milliseconds. Default 600 000.
    timeout_ms: Option<u64>,
    /// Longest wait for more of a response body, milliseconds. Default 600 000.
    read_timeout_ms: Option<u64>,
    /// Idle pooled connections per host. Default 1 024.
    pool_max_idle_per_host: Option<usize>,
    /// Serves models no route names, for its dialect. At most one per dialect.
    #[serde(default)]
    default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    /// Exact model name.
    model: Option<String>,
    /// Model name prefix.
    model_prefix: Option<String>,
    upstream: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    /// Name of the key, safe to log and journal (never the key itself).
    id: String,
    /// Lowercase hex SHA-256 of the key (`tollgate hash-key`).
    sha256: String,
    /// Account (customer) the key belongs to.
    account: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    disabled: bool,
    /// Requests per minute. Default: unlimited.
    rpm: Option<u64>,
    /// Tokens per minute (prompt estimate + output reservation at admission). Default: unlimited.
    tpm: Option<u64>,
    /// The key owner's webhook URL for alerts.
    owner_webhook: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated.
// ---------------------------------------------------------------------------------------------

/// A provider credential. Its `Debug` and `Display` never show the value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }
    /// The credential itself, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The API dialect an endpoint or upstream speaks; it decides usage parsing and error shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub journal: JournalConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub keys: Vec<KeyConfig>,
    pub admin: Option<AdminConfig>,
    pub reservation: ReservationConfig,
    pub alerts: AlertsConfig,
    pub prices: PriceBook,
    /// Account policies by id; keys of unlisted accounts are metered without limits.
    pub accounts: HashMap<String, Arc<AccountPolicy>, crate::FastHash>,
    /// Upstream ledgers the journal is flushed to.
    pub sinks: Vec<crate::ledger::sinks::SinkConfig>,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Secret,
}

#[derive(Clone, Debug)]
pub struct ReservationConfig {
    pub default_output_tokens: u64,
    pub prompt_bytes_per_token: u64,
}

#[derive(Clone, Debug, Default)]
pub struct AlertsConfig {
    pub signing_secret: Option<Secret>,
    pub max_attempts: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_request_body_bytes: usize,
    pub max_metered_response_bytes: usize,
    pub shutdown_grace: Duration,
    pub client_idle_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub dir: PathBuf,
    pub channel_capacity: usize,
    pub fsync: crate::ledger::FsyncPolicy,
    pub segment_bytes: u64,
    pub max_bytes: u64,
    /// Refuse new metered requests when the journal is over budget (else serve and alarm).
    pub refuse_when_full: bool,
    pub checkpoint_interval: Duration,
    pub wait_for_write: bool,
}

#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    pub dialect: Dialect,
    /// Scheme + authority, e.g. `https://api.openai.com`.
    pub origin: http::uri::Uri,
    /// Path prefix without trailing slash (often empty).
    pub path_prefix: String,
    pub credential: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// A response body with no new bytes for this long (checked every this long, so after
    /// one to two of these) ends with an error.
    pub read_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub default: bool,
}

#[derive(Clone, Debug)]
pub enum ModelMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub matcher: ModelMatch,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyConfig {
    pub id: String,
    pub sha256: [u8; 32],
    pub account: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub disabled: bool,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub owner_webhook: Option<String>,
}

/// Every problem found in a config file, each with the path of the field it concerns.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config ({} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str("):")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(problem: String) -> Self {
        Self {
            problems: vec![problem],
        }
    }
}

/// Where provider credentials come from; tests pass a map instead of the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    /// Whether every value is a stand-in (`check-config --without-env`): values are then
    /// not checked for their format (e.g. a PostgreSQL URL), only for being set.
    fn is_placeholder(&self) -> bool {
        false
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// SHA-256 of a client key, as stored in config.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
        Self::parse(&text, env)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            ConfigError::one(format!(
                "TOML: {}",
                e.to_string().trim_end().replace('\n', "\n    ")
            ))
        })?;
        validate(raw, env)
    }
}

fn validate(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();

    let listen_text = raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|_| {
        problems.push(format!(
            "server.listen: `{listen_text}` is not an address like 127.0.0.1:8080"
        ));
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let max_request_body_bytes = raw
        .server
        .max_request_body_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES);
    if max_request_body_bytes == 0 {
        problems.push("server.max_request_body_bytes: must be positive".into());
    }
    let max_metered_response_bytes = raw
        .server
        .max_metered_response_bytes
        .unwrap_or(DEFAULT_MAX_METERED_RESPONSE_BYTES);
    if max_metered_response_bytes == 0 {
        problems.push("server.max_metered_response_bytes: must be positive".into());
    }
    let client_idle_timeout_ms = raw
        .server
        .client_idle_timeout_ms
        .unwrap_or(DEFAULT_CLIENT_IDLE_TIMEOUT_MS);
    if client_idle_timeout_ms == 0 {
        problems.push("server.client_idle_timeout_ms: must be positive".into());
    }
    let server = ServerConfig {
        listen,
        max_request_body_bytes,
        max_metered_response_bytes,
        shutdown_grace: Duration::from_millis(
            raw.server
                .shutdown_grace_ms
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS),
        ),
        client_idle_timeout: Duration::from_millis(client_idle_timeout_ms),
    };

    let channel_capacity = raw
        .journal
        .channel_capacity
        .unwrap_or(DEFAULT_JOURNAL_CHANNEL_CAPACITY);
    if channel_capacity == 0 {
        problems.push("journal.channel_capacity: must be positive".into());
    }
    let fsync = match raw.journal.fsync.as_deref().unwrap_or("interval") {
        "always" => crate::ledger::FsyncPolicy::Always,
        "never" => crate::ledger::FsyncPolicy::Never,
        "interval" => crate::ledger::FsyncPolicy::Interval(Duration::from_millis(
            raw.journal
                .fsync_interval_ms
                .unwrap_or(DEFAULT_FSYNC_INTERVAL_MS)
                .max(1),
        )),
        other => {
            problems.push(format!(
                "journal.fsync: `{other}` is not one of always, interval, never"
            ));
            crate::ledger::FsyncPolicy::Always
        }
    };
    let refuse_when_full = match raw.journal.on_full.as_deref().unwrap_or("refuse") {
        "refuse" => true,
        "serve" => false,
        other => {
            problems.push(format!(
                "journal.on_full: `{other}` is not one of refuse, serve"
            ));
            true
        }
    };
    let journal = JournalConfig {
        dir: raw
            .journal
            .dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL_DIR)),
        channel_capacity,
        fsync,
        segment_bytes: raw.journal.segment_bytes.unwrap_or(DEFAULT_SEGMENT_BYTES),
        max_bytes: raw.journal.max_bytes.unwrap_or(DEFAULT_JOURNAL_MAX_BYTES),
        refuse_when_full,
        checkpoint_interval: Duration::from_millis(
            raw.journal
                .checkpoint_interval_ms
                .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL_MS)
                .max(10),
        ),
        wait_for_write: raw.journal.wait_for_write.unwrap_or(true),
    };

    let mut upstreams = Vec::with_capacity(raw.upstreams.len());
    let mut upstream_index = HashMap::new();
    let mut defaults: HashMap<Dialect, String> = HashMap::new();
    if raw.upstreams.is_empty() {
        problems.push("upstreams: at least one upstream is required".into());
    }
    for (i, u) in raw.upstreams.into_iter().enumerate() {
        let at = format!("upstreams[{i}]");
        if u.name.trim().is_empty() {
            problems.push(format!("{at}.name: must not be empty"));
        } else if upstream_index.insert(u.name.clone(), i).is_some() {
            problems.push(format!(
                "{at}.name: `{}` is used by another upstream",
                u.name
            ));
        }
        let dialect = match u.dialect.as_str() {
            "openai" => Dialect::OpenAi,
            "anthropic" => Dialect::Anthropic,
            other => {
                problems.push(format!(
                    "{at}.dialect: `{other}` is not one of `openai`, `anthropic`"
                ));
                Dialect::OpenAi
            }
        };
        let (origin, path_prefix) = match parse_base_url(&u.base_url) {
            Ok(parts) => parts,
            Err(why) => {
                problems.push(format!("{at}.base_url: {why}"));
                (http::uri::Uri::from_static("http://invalid"), String::new())
            }
        };
        let credential = match &u.api_key_env {
            None => None,
            Some(var) if var.trim().is_empty() => {
                problems.push(format!(
                    "{at}.api_key_env: must name an environment variable"
                ));
                None
            }
            Some(var) => match env.var(var) {
                Some(v) if !v.is_empty() => Some(Secret::new(v)),
                _ => {
                    problems.push(format!(
                        "{at}.api_key_env: environment variable `{var}` is not set"
                    ));
                    None
                }
            },
        };
        if let Some(ca) = &u.ca_file
            && !ca.is_file()
        {
            problems.push(format!(
                "{at}.ca_file: `{}` is not a readable file",
                ca.display()
            ));
        }
        let timeout_ms = u.timeout_ms.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_MS);
        let connect_timeout_ms = u.connect_timeout_ms.unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS);
        let read_timeout_ms = u.read_timeout_ms.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_MS);
        if timeout_ms == 0 {
            problems.push(format!("{at}.timeout_ms: must be positive"));
        }
        if read_timeout_ms == 0 {
            problems.push(format!("{at}.read_timeout_ms: must be positive"));
        }
        if connect_timeout_ms == 0 {
            problems.push(format!("{at}.connect_timeout_ms: must be positive"));
        }
        if u.default
            && let Some(other) = defaults.insert(dialect, u.name.clone())
        {
            problems.push(format!(
                "{at}.default: upstream `{other}` is already the default for dialect {}",
                dialect.as_str()
            ));
        }
        upstreams.push(UpstreamConfig {
            name: u.name,
            dialect,
            origin,
            path_prefix,
            credential,
            ca_file: u.ca_file,
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            timeout: Duration::from_millis(timeout_ms),
            read_timeout: Duration::from_millis(read_timeout_ms),
            pool_max_idle_per_host: u
                .pool_max_idle_per_host
                .unwrap_or(DEFAULT_POOL_MAX_IDLE_PER_HOST),
            default: u.default,
        });
    }

    let mut routes = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        let matcher = match (r.model, r.model_prefix) {
            (Some(m), None) if !m.is_empty() => Some(ModelMatch::Exact(m)),
            (None, Some(p)) if !p.is_empty() => Some(ModelMatch::Prefix(p)),
            (Some(_), Some(_)) => {
                problems.push(format!("{at}: set `model` or `model_prefix`, not both"));
                None
            }
            _ => {
                problems.push(format!(
                    "{at}: one of `model` or `model_prefix` is required and must not be empty"
                ));
                None
            }
        };
        let upstream = upstream_index.get(&r.upstream).copied();
        if upstream.is_none() {
            problems.push(format!(
                "{at}.upstream: no upstream is named `{}`",
                r.upstream
            ));
        }
        if let (Some(matcher), Some(upstream)) = (matcher, upstream) {
            routes.push(RouteConfig { matcher, upstream });
        }
    }

    let mut keys = Vec::with_capacity(raw.keys.len());
    let mut key_ids = HashSet::new();
    let mut key_hashes = HashSet::new();
    for (i, k) in raw.keys.into_iter().enumerate() {
        let at = format!("keys[{i}]");
        if k.id.trim().is_empty() {
            problems.push(format!("{at}.id: must not be empty"));
        } else if !key_ids.insert(k.id.clone()) {
            problems.push(format!("{at}.id: `{}` is used by another key", k.id));
        }
        if k.account.trim().is_empty() {
            problems.push(format!("{at}.account: must not be empty"));
        }
        let mut sha256 = [0u8; 32];
        if hex::decode_to_slice(k.sha256.trim(), &mut sha256).is_err() {
            problems.push(format!(
                "{at}.sha256: must be 64 hex characters (see `tollgate hash-key`)"
            ));
        } else if !key_hashes.insert(sha256) {
            problems.push(format!("{at}.sha256: the same key is configured twice"));
        }
        if k.rpm == Some(0) {
            problems.push(format!("{at}.rpm: must be positive (omit it for no limit)"));
        }
        if k.tpm == Some(0) {
            problems.push(format!("{at}.tpm: must be positive (omit it for no limit)"));
        }
        if let Some(url) = &k.owner_webhook {
            check_url(url, &format!("{at}.owner_webhook"), &mut problems);
        }
        keys.push(KeyConfig {
            id: k.id,
            sha256,
            account: k.account,
            labels: k.labels,
            disabled: k.disabled,
            rpm: k.rpm,
            tpm: k.tpm,
            owner_webhook: k.owner_webhook,
        });
    }

    let admin = raw.admin.and_then(|a| {
        let listen = match a.listen.parse::<SocketAddr>() {
            Ok(l) => Some(l),
            Err(_) => {
                problems.push(format!(
                    "admin.listen: `{}` is not an address like 127.0.0.1:9090",
                    a.listen
                ));
                None
            }
        };
        let token = match env.var(&a.token_env) {
            Some(t) if t.len() >= 16 => Some(Secret::new(t)),
            Some(_) => {
                problems.push(format!(
                    "admin.token_env: the token in `{}` must be at least 16 characters",
                    a.token_env
                ));
                None
            }
            None => {
                problems.push(format!(
                    "admin.token_env: environment variable `{}` is not set",
                    a.token_env
                ));
                None
            }
        };
        Some(AdminConfig {
            listen: listen?,
            token: token?,
        })
    });

    let reservation = ReservationConfig {
        default_output_tokens: raw
            .reservation
            .default_output_tokens
            .unwrap_or(DEFAULT_OUTPUT_RESERVATION_TOKENS),
        prompt_bytes_per_token: raw
            .reservation
            .prompt_bytes_per_token
            .unwrap_or(DEFAULT_PROMPT_BYTES_PER_TOKEN)
            .max(1),
    };

    let alerts =
        AlertsConfig {
            signing_secret: raw.alerts.signing_secret_env.as_ref().and_then(|var| {
                match env.var(var) {
                    Some(s) if !s.is_empty() => Some(Secret::new(s)),
                    _ => {
                        problems.push(format!(
                            "alerts.signing_secret_env: environment variable `{var}` is not set"
                        ));
                        None
                    }
                }
            }),
            max_attempts: raw.alerts.max_attempts,
        };

    let sinks = crate::ledger::sinks::validate(raw.sinks, env, &mut problems);
    let prices = validate_prices(raw.prices, raw.outcome_prices, &mut problems);
    let plans = validate_plans(raw.plans, &mut problems);
    let accounts = validate_accounts(raw.accounts, &plans, &mut problems);
    if alerts.signing_secret.is_none()
        && (accounts.values().any(|a| !a.webhooks.is_empty())
            || keys.iter().any(|k| k.owner_webhook.is_some()))
    {
        problems.push(
            "alerts.signing_secret_env: webhooks are configured, so a signing secret is required"
                .into(),
        );
    }

    if problems.is_empty() {
        Ok(Config {
            server,
            journal,
            upstreams,
            routes,
            keys,
            admin,
            reservation,
            alerts,
            prices,
            accounts,
            sinks,
        })
    } else {
        Err(ConfigError { problems })
    }
}

fn check_url(url: &str, at: &str, problems: &mut Vec<String>) {
    match url.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
        _ => problems.push(format!("{at}: `{url}` is not an http(s) URL")),
    }
}

fn nanos(d: Decimal, at: &str, problems: &mut Vec<String>) -> i64 {
    match to_nanos(d) {
        Ok(n) if n >= 0 => n,
        Ok(_) => {
            problems.push(format!("{at}: must not be negative"));
            0
        }
        Err(e) => {
            problems.push(format!("{at}: {e}"));
            0
        }
    }
}

fn ppb(d: Decimal, at: &str, problems: &mut Vec<String>) -> i128 {
    match to_ppb(d) {
        Ok(n) if n >= 0 => n,
        Ok(_) => {
            problems.push(format!("{at}: must not be negative"));
            0
        }
        Err(e) => {
            problems.push(format!("{at}: {e}"));
            0
        }
    }
}

fn validate_prices(
    raw: Vec<RawPrice>,
    outcomes: Vec<RawOutcomePrice>,
    problems: &mut Vec<String>,
) -> PriceBook {
    let mut book = PriceBook::default();
    for (i, p) in raw.into_iter().enumerate() {
        let at = format!("prices[{i}]");
        let matcher = match (p.model, p.model_prefix) {
            (Some(m), None) if !m.is_empty() => ModelMatch::Exact(m),
            // An empty prefix is the catch-all price.
            (None, Some(prefix)) => ModelMatch::Prefix(prefix),
            _ => {
                problems.push(format!(
                    "{at}: set exactly one of `model` or `model_prefix`"
                ));
                continue;
            }
        };
        let label: Arc<str> = match &matcher {
            ModelMatch::Exact(m) => Arc::from(m.as_str()),
            ModelMatch::Prefix(p) => Arc::from(format!("{p}*").as_str()),
        };
        let input = ppb(p.input_per_mtok, &format!("{at}.input_per_mtok"), problems);
        let output = ppb(
            p.output_per_mtok,
            &format!("{at}.output_per_mtok"),
            problems,
        );
        let price = ModelPrice {
            input_per_mtok: input,
            cached_input_per_mtok: p.cached_input_per_mtok.map_or(input, |d| {
                ppb(d, &format!("{at}.cached_input_per_mtok"), problems)
            }),
            cache_write_per_mtok: p.cache_write_per_mtok.map_or(input, |d| {
                ppb(d, &format!("{at}.cache_write_per_mtok"), problems)
            }),
            output_per_mtok: output,
            reasoning_per_mtok: p.reasoning_per_mtok.map_or(output, |d| {
                ppb(d, &format!("{at}.reasoning_per_mtok"), problems)
            }),
            per_call: p
                .per_call
                .map_or(0, |d| nanos(d, &format!("{at}.per_call"), problems)),
            per_compute_second: p
                .per_compute_second
                .map_or(0, |d| ppb(d, &format!("{at}.per_compute_second"), problems)),
            label,
        };
        book.models.push((matcher, price));
    }
    for (i, o) in outcomes.into_iter().enumerate() {
        let at = format!("outcome_prices[{i}]");
        if o.name.trim().is_empty() {
            problems.push(format!("{at}.name: must not be empty"));
        }
        let price = nanos(o.price, &format!("{at}.price"), problems);
        if book.outcomes.insert(o.name.clone(), price).is_some() {
            problems.push(format!("{at}.name: `{}` is priced twice", o.name));
        }
    }
    book
}

fn validate_plans(raw: Vec<RawPlan>, problems: &mut Vec<String>) -> HashMap<String, Plan> {
    let mut plans = HashMap::new();
    for (i, p) in raw.into_iter().enumerate() {
        let at = format!("plans[{i}]");
        let period = match p.period.as_deref().unwrap_or("month") {
            "month" => Period::Month,
            "week" => Period::Week,
            "day" => Period::Day,
            other => {
                problems.push(format!(
                    "{at}.period: `{other}` is not one of month, week, day"
                ));
                Period::Month
            }
        };
        let mut tiers = Vec::new();
        let mut last_bound = 0;
        let count = p.tiers.len();
        for (j, t) in p.tiers.into_iter().enumerate() {
            let tat = format!("{at}.tiers[{j}]");
            let up_to = t.up_to.map(|u| nanos(u, &format!("{tat}.up_to"), problems));
            match up_to {
                Some(u) if u <= last_bound => problems.push(format!(
                    "{tat}.up_to: must be greater than the previous tier's"
                )),
                Some(u) => last_bound = u,
                None if j + 1 != count => problems.push(format!(
                    "{tat}.up_to: only the last tier may omit its upper bound"
                )),
                None => {}
            }
            tiers.push(Tier {
                up_to,
                multiplier_ppb: ppb(t.multiplier, &format!("{tat}.multiplier"), problems),
            });
        }
        if tiers.last().is_some_and(|t| t.up_to.is_some()) {
            problems.push(format!("{at}.tiers: the last tier must omit `up_to`"));
        }
        if tiers.is_empty() {
            tiers = Plan::pay_as_you_go(period).tiers;
        }
        let plan = Plan {
            id: p.id.clone(),
            period,
            base_fee: nanos(p.base_fee, &format!("{at}.base_fee"), problems),
            seat_fee: nanos(p.seat_fee, &format!("{at}.seat_fee"), problems),
            included: nanos(p.included_usage, &format!("{at}.included_usage"), problems),
            tiers,
        };
        if plans.insert(p.id.clone(), plan).is_some() {
            problems.push(format!("{at}.id: `{}` is used by another plan", p.id));
        }
    }
    plans
}

fn validate_accounts(
    raw: Vec<RawAccount>,
    plans: &HashMap<String, Plan>,
    problems: &mut Vec<String>,
) -> HashMap<String, Arc<AccountPolicy>, crate::FastHash> {
    let mut accounts = HashMap::default();
    for (i, a) in raw.into_iter().enumerate() {
        let at = format!("accounts[{i}]");
        if a.id.trim().is_empty() {
            problems.push(format!("{at}.id: must not be empty"));
        }
        let unit = a.unit.clone().unwrap_or_else(|| "USD".into());
        let conversion = match (unit.as_str(), a.credits_per_unit) {
            ("credits", Some(rate)) => {
                let rate_ppb = ppb(rate, &format!("{at}.credits_per_unit"), problems);
                if rate_ppb == 0 {
                    problems.push(format!("{at}.credits_per_unit: must be positive"));
                }
                Conversion { rate_ppb }
            }
            ("credits", None) => {
                problems.push(format!(
                    "{at}.credits_per_unit: required when unit = \"credits\""
                ));
                Conversion::IDENTITY
            }
            (_, Some(_)) => {
                problems.push(format!(
                    "{at}.credits_per_unit: only applies when unit = \"credits\""
                ));
                Conversion::IDENTITY
            }
            (_, None) => Conversion::IDENTITY,
        };
        let plan = match &a.plan {
            Some(id) => plans.get(id).cloned().unwrap_or_else(|| {
                problems.push(format!("{at}.plan: no plan is named `{id}`"));
                Plan::pay_as_you_go(Period::Month)
            }),
            None => Plan::pay_as_you_go(Period::Month),
        };
        let money = |d: Option<Decimal>, field: &str, problems: &mut Vec<String>| {
            d.map(|d| nanos(d, &format!("{at}.{field}"), problems))
        };
        let hard_cap = money(a.hard_cap, "hard_cap", problems);
        let soft_cap = money(a.soft_cap, "soft_cap", problems);
        if let (Some(h), Some(s)) = (hard_cap, soft_cap)
            && s > h
        {
            problems.push(format!("{at}.soft_cap: must not exceed hard_cap"));
        }
        let overage = match (a.overage.as_deref().unwrap_or("block"), a.overage_limit) {
            ("block", None) => OverageRule::Block,
            ("require_topup", None) => OverageRule::RequireTopUp,
            ("allow", Some(limit)) => OverageRule::Allow {
                limit: nanos(limit, &format!("{at}.overage_limit"), problems),
            },
            ("allow", None) => {
                problems.push(format!(
                    "{at}.overage_limit: required when overage = \"allow\""
                ));
                OverageRule::Block
            }
            ("block" | "require_topup", Some(_)) => {
                problems.push(format!(
                    "{at}.overage_limit: only applies when overage = \"allow\""
                ));
                OverageRule::Block
            }
            (other, _) => {
                problems.push(format!(
                    "{at}.overage: `{other}` is not one of block, allow, require_topup"
                ));
                OverageRule::Block
            }
        };
        let mut grant_ids = HashSet::new();
        let mut grants = Vec::new();
        for (j, g) in a.grants.into_iter().enumerate() {
            let gat = format!("{at}.grants[{j}]");
            if !grant_ids.insert(g.id.clone()) {
                problems.push(format!("{gat}.id: `{}` is used by another grant", g.id));
            }
            let amount = nanos(g.amount, &format!("{gat}.amount"), problems);
            if amount == 0 {
                problems.push(format!("{gat}.amount: must be positive"));
            }
            let kind =
                GrantKind::parse(g.kind.as_deref().unwrap_or("promotional")).unwrap_or_else(|e| {
                    problems.push(format!("{gat}.kind: {e}"));
                    GrantKind::Promotional
                });
            let expires_at_period_end =
                crate::balance::parse_rollover(g.rollover.as_deref().unwrap_or("keep"))
                    .unwrap_or_else(|e| {
                        problems.push(format!("{gat}.rollover: {e}"));
                        false
                    });
            grants.push(GrantSpec {
                id: g.id,
                amount,
                kind,
                priority: g.priority.unwrap_or(DEFAULT_GRANT_PRIORITY),
                expires_at: g.expires_at,
                expires_at_period_end,
            });
        }
        if !grants.is_empty() && !a.prepaid {
            problems.push(format!("{at}.grants: grants need `prepaid = true`"));
        }
        let auto_topup = a.auto_topup.map(|t| AutoTopUp {
            threshold: nanos(t.threshold, &format!("{at}.auto_topup.threshold"), problems),
            amount: nanos(t.amount, &format!("{at}.auto_topup.amount"), problems),
            cooldown: Duration::from_secs(t.cooldown_s.unwrap_or(DEFAULT_TOPUP_COOLDOWN_S)),
        });
        if auto_topup.as_ref().is_some_and(|t| t.amount == 0) {
            problems.push(format!("{at}.auto_topup.amount: must be positive"));
        }
        let alert_fractions = match a.alert_thresholds {
            Some(list) => list,
            None => DEFAULT_ALERT_THRESHOLDS
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
        };
        for (j, f) in alert_fractions.iter().enumerate() {
            if *f <= Decimal::ZERO || *f > Decimal::from(10) {
                problems.push(format!("{at}.alert_thresholds[{j}]: must be in (0, 10]"));
            }
        }
        let mut webhooks = Vec::new();
        if let Some(url) = a.admin_webhook {
            check_url(&url, &format!("{at}.admin_webhook"), problems);
            webhooks.push(url);
        }
        let slowdown = a.slowdown.map(|s| {
            if hard_cap.is_none() {
                problems.push(format!(
                    "{at}.slowdown: needs a hard_cap to be a fraction of"
                ));
            }
            if s.rpm == 0 {
                problems.push(format!("{at}.slowdown.rpm: must be positive"));
            }
            Slowdown {
                at_ppb: ppb(s.at, &format!("{at}.slowdown.at"), problems),
                rpm: s.rpm,
            }
        });
        let policy = AccountPolicy {
            id: Arc::from(a.id.as_str()),
            unit: unit.into(),
            conversion,
            plan,
            seats: a.seats,
            hard_cap,
            soft_cap,
            prepaid: a.prepaid,
            overage,
            grants,
            auto_topup,
            alert_fractions,
            low_balance: money(a.low_balance, "low_balance", problems),
            webhooks,
            slowdown,
        };
        if accounts.insert(a.id.clone(), Arc::new(policy)).is_some() {
            problems.push(format!("{at}.id: `{}` is used by another account", a.id));
        }
    }
    accounts
}

fn parse_base_url(text: &str) -> Result<(http::uri::Uri, String), String> {
    let uri: http::uri::Uri = text
        .parse()
        .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(|| format!("`{text}` needs a scheme (http:// or https://)"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("`{text}`: scheme must be http or https"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{text}` needs a host"))?;
    if uri.query().is_some() {
        return Err(format!("`{text}` must not have a query"));
    }
    let origin = http::uri::Uri::builder()
        .scheme(scheme)
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| format!("`{text}`: {e}"))?;
    let prefix = uri.path().trim_end_matches('/').to_string();
    Ok((origin, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HashMap<String, String> {
        HashMap::from([("OPENAI_KEY".to_string(), "sk-up".to_string())])
    }

    const GOOD: &str = r#"
        [[upstreams]]
        name = "openai"
        dialect = "openai"
        base_url = "https://api.openai.com/"
        api_key_env = "OPENAI_KEY"
        default = true

        [[routes]]
        model_prefix = "gpt-"
        upstream = "openai"

        [[keys]]
        id = "k1"
        sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        account = "acme"
    "#;

    #[test]
    fn valid_config_parses_with_defaults() {
        let c = Config::parse(GOOD, &env()).unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstreams[0].origin.to_string(), "https://api.openai.com/");
        assert_eq!(c.upstreams[0].path_prefix, "");
        assert_eq!(
            c.upstreams[0].credential.as_ref().unwrap().expose(),
            "sk-up"
        );
        assert_eq!(c.keys[0].sha256, hash_key("test"));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let bad = r#"
            [server]
            listen = "nowhere"
            client_idle_timeout_ms = 0
            [[upstreams]]
            name = "a"
            dialect = "grpc"
            base_url = "ftp://x"
            api_key_env = "MISSING"
            read_timeout_ms = 0
            [[routes]]
            model = "m"
            upstream = "b"
            [[keys]]
            id = ""
            sha256 = "zz"
            account = ""
        "#;
        let err = Config::parse(bad, &env()).unwrap_err();
        let text = err.to_string();
        for needle in [
            "server.listen",
            "server.client_idle_timeout_ms: must be positive",
            "upstreams[0].dialect",
            "upstreams[0].base_url",
            "upstreams[0].api_key_env: environment variable `MISSING` is not set",
            "upstreams[0].read_timeout_ms: must be positive",
            "routes[0].upstream: no upstream is named `b`",
            "keys[0].id",
            "keys[0].sha256",
            "keys[0].account",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
        assert_eq!(err.problems.len(), 10, "{text}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("[server]\nlisten_addr = \"x\"\n", &env()).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `listen_addr`"),
            "{err}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-very-secret".into());
        assert!(!format!("{s:?} {s}").contains("very-secret"));
        let c = Config::parse(GOOD, &env()).unwrap();
        assert!(!format!("{c:?}").contains("sk-up"));
    }

    #[test]
    fn embedded_config_is_valid_given_its_env() {
        let env = HashMap::from([
            ("TOLLGATE_OPENAI_KEY".to_string(), "x".to_string()),
            ("TOLLGATE_ANTHROPIC_KEY".to_string(), "y".to_string()),
            (
                "TOLLGATE_ADMIN_TOKEN".to_string(),
                "an-admin-token-of-length".to_string(),
            ),
        ]);
        let c = Config::parse(EMBEDDED_CONFIG, &env).unwrap();
        assert_eq!(c.accounts.len(), 2);
        assert!(c.prices.price_for("gpt-4o-mini-2024").is_some());
    }
}
