//! Configuration: the TOML file as written (`Raw*` serde structs, unknown fields refused), and
//! the validated [`Config`] the gateway runs on. Validation collects every problem with the
//! path of the field it concerns (`keys[3].account: must not be empty`), so `tollgate
//! check-config` can print them all at once and a bad file never half-applies.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

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
/// Default path of the usage journal.
pub const DEFAULT_JOURNAL_PATH: &str = "data/usage.jsonl";
/// Default capacity of the channel between the request path and the journal writer.
pub const DEFAULT_JOURNAL_CHANNEL_CAPACITY: usize = 65_536;
/// Default grace period for in-flight requests at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    /// Journal file (JSON lines). Default `data/usage.jsonl`, relative to the working directory.
    path: Option<PathBuf>,
    /// Records buffered between requests and the writer. Default 65 536.
    channel_capacity: Option<usize>,
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
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_request_body_bytes: usize,
    pub max_metered_response_bytes: usize,
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub path: PathBuf,
    pub channel_capacity: usize,
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

#[derive(Clone, Debug)]
pub struct KeyConfig {
    pub id: String,
    pub sha256: [u8; 32],
    pub account: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub disabled: bool,
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
    let server = ServerConfig {
        listen,
        max_request_body_bytes,
        max_metered_response_bytes,
        shutdown_grace: Duration::from_millis(
            raw.server
                .shutdown_grace_ms
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS),
        ),
    };

    let channel_capacity = raw
        .journal
        .channel_capacity
        .unwrap_or(DEFAULT_JOURNAL_CHANNEL_CAPACITY);
    if channel_capacity == 0 {
        problems.push("journal.channel_capacity: must be positive".into());
    }
    let journal = JournalConfig {
        path: raw
            .journal
            .path
            .unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL_PATH)),
        channel_capacity,
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
        if timeout_ms == 0 {
            problems.push(format!("{at}.timeout_ms: must be positive"));
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
        keys.push(KeyConfig {
            id: k.id,
            sha256,
            account: k.account,
            labels: k.labels,
            disabled: k.disabled,
        });
    }

    if problems.is_empty() {
        Ok(Config {
            server,
            journal,
            upstreams,
            routes,
            keys,
        })
    } else {
        Err(ConfigError { problems })
    }
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
            [[upstreams]]
            name = "a"
            dialect = "grpc"
            base_url = "ftp://x"
            api_key_env = "MISSING"
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
            "upstreams[0].dialect",
            "upstreams[0].base_url",
            "upstreams[0].api_key_env: environment variable `MISSING` is not set",
            "routes[0].upstream: no upstream is named `b`",
            "keys[0].id",
            "keys[0].sha256",
            "keys[0].account",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
        assert_eq!(err.problems.len(), 8, "{text}");
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
        ]);
        Config::parse(EMBEDDED_CONFIG, &env).unwrap();
    }
}
