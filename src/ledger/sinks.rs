//! Sink configuration (`[[sinks]]` in the config file) and construction.
//!
//! ```toml
//! [[sinks]]
//! kind = "postgres"
//! url_env = "TOLLGATE_PG_URL"          # env var holding postgres://user:pw@host/db
//!
//! [[sinks]]
//! kind = "cloudevents"
//! name = "openmeter"
//! url = "https://openmeter.cloud/api/v1/events"
//! auth_header_env = "OPENMETER_AUTH"   # env var holding the whole value: "Bearer om_…"
//! source = "tollgate-eu"               # default "tollgate"
//! timeout_ms = 10000
//!
//! [[sinks]]
//! kind = "file"
//! path = "data/ledger-export.jsonl"
//! ```
//!
//! A sink's name (default: its kind) names its delivery cursor and its metrics, so it must be
//! unique and is limited to ASCII letters, digits, `-` and `_`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::cloudevents::{
    CloudEventsSink, CloudEventsSinkConfig, DEFAULT_CLOUDEVENTS_SOURCE,
    DEFAULT_CLOUDEVENTS_TIMEOUT_MS,
};
use super::file_sink::FileSink;
use super::postgres::{PostgresSink, PostgresSinkConfig, parse_url};
use super::sink::Sink;
use crate::config::{Env, Secret};

/// Longest sink name accepted, characters.
pub const MAX_SINK_NAME_CHARS: usize = 64;

/// One `[[sinks]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSinkConfig {
    Postgres {
        name: Option<String>,
        /// Environment variable holding the libpq-style connection URL.
        url_env: String,
    },
    Cloudevents {
        name: Option<String>,
        url: String,
        /// Environment variable holding the whole `authorization` header value.
        auth_header_env: Option<String>,
        /// The events' `source` attribute. Default `tollgate`.
        source: Option<String>,
        /// Time allowed per delivery. Default 10 000.
        timeout_ms: Option<u64>,
    },
    File {
        name: Option<String>,
        path: PathBuf,
    },
}

/// A validated sink. `Debug` shows no credential.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
}

#[derive(Clone, Debug)]
pub enum SinkKind {
    Postgres(PostgresSinkConfig),
    CloudEvents(CloudEventsSinkConfig),
    File { path: PathBuf },
}

impl SinkKind {
    /// The `kind` as written in config, which is also the default name.
    pub fn as_str(&self) -> &'static str {
        match self {
            SinkKind::Postgres(_) => "postgres",
            SinkKind::CloudEvents(_) => "cloudevents",
            SinkKind::File { .. } => "file",
        }
    }
}

/// Validates `[[sinks]]`, appending every problem to `problems` with its path
/// (`sinks[1].url: …`). Sinks with problems are left out of the result.
pub fn validate(
    raw: Vec<RawSinkConfig>,
    env: &dyn Env,
    problems: &mut Vec<String>,
) -> Vec<SinkConfig> {
    let mut out = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    for (i, sink) in raw.into_iter().enumerate() {
        let at = format!("sinks[{i}]");
        let before = problems.len();
        let (name, kind) = match sink {
            RawSinkConfig::Postgres { name, url_env } => {
                let url = secret_from_env(&url_env, &format!("{at}.url_env"), env, problems);
                if let Some(url) = &url
                    && !env.is_placeholder()
                    && let Err(e) = parse_url(url.expose())
                {
                    problems.push(format!("{at}.url_env: the value of `{url_env}` is {e}"));
                }
                (
                    name,
                    url.map(|u| SinkKind::Postgres(PostgresSinkConfig::new(u))),
                )
            }
            RawSinkConfig::Cloudevents {
                name,
                url,
                auth_header_env,
                source,
                timeout_ms,
            } => {
                let uri = parse_http_url(&url, &format!("{at}.url"), problems);
                let authorization = auth_header_env.and_then(|var| {
                    let path = format!("{at}.auth_header_env");
                    let secret = secret_from_env(&var, &path, env, problems)?;
                    if http::HeaderValue::from_str(secret.expose()).is_err() {
                        problems.push(format!(
                            "{path}: the value of `{var}` is not a valid header value"
                        ));
                        return None;
                    }
                    Some(secret)
                });
                let source = source.unwrap_or_else(|| DEFAULT_CLOUDEVENTS_SOURCE.to_string());
                if source.trim().is_empty() {
                    problems.push(format!("{at}.source: must not be empty"));
                }
                let timeout_ms = timeout_ms.unwrap_or(DEFAULT_CLOUDEVENTS_TIMEOUT_MS);
                if timeout_ms == 0 {
                    problems.push(format!("{at}.timeout_ms: must be positive"));
                }
                let kind = uri.map(|url| {
                    SinkKind::CloudEvents(CloudEventsSinkConfig {
                        url,
                        authorization,
                        source,
                        timeout: Duration::from_millis(timeout_ms),
                    })
                });
                (name, kind)
            }
            RawSinkConfig::File { name, path } => {
                if path.as_os_str().is_empty() {
                    problems.push(format!("{at}.path: must not be empty"));
                } else if path.is_dir() {
                    problems.push(format!("{at}.path: `{}` is a directory", path.display()));
                }
                (name, Some(SinkKind::File { path }))
            }
        };
        let Some(kind) = kind else {
            continue;
        };
        let name_given = name.is_some();
        let name = name.unwrap_or_else(|| kind.as_str().to_string());
        if let Err(why) = check_name(&name) {
            problems.push(format!("{at}.name: {why}"));
        } else if !names.insert(name.clone()) {
            problems.push(if name_given {
                format!("{at}.name: `{name}` is used by another sink")
            } else {
                format!("{at}.name: another sink is already named `{name}`; give this one a `name`")
            });
        }
        if problems.len() == before {
            out.push(SinkConfig { name, kind });
        }
    }
    out
}

/// Builds the sinks. Never fails and never waits for a sink: one that is down at start is
/// retried by the flusher. PostgreSQL sinks connect and migrate in the background.
pub async fn build(configs: &[SinkConfig]) -> Vec<Arc<dyn Sink>> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::with_capacity(configs.len());
    for config in configs {
        match &config.kind {
            SinkKind::Postgres(pg) => {
                let sink = Arc::new(PostgresSink::new(config.name.clone(), pg));
                let warm = sink.clone();
                tokio::spawn(async move {
                    if let Err(e) = warm.connect_and_migrate().await {
                        tracing::warn!(sink = %warm.name(), error = %e, "postgres sink not reachable yet; deliveries will retry");
                    }
                });
                sinks.push(sink);
            }
            SinkKind::CloudEvents(ce) => {
                sinks.push(Arc::new(CloudEventsSink::new(
                    config.name.clone(),
                    ce.clone(),
                )));
            }
            SinkKind::File { path } => {
                sinks.push(Arc::new(FileSink::new(config.name.clone(), path.clone())));
            }
        }
    }
    sinks
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > MAX_SINK_NAME_CHARS {
        return Err(format!("must be at most {MAX_SINK_NAME_CHARS} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "`{name}` may only hold ASCII letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

fn secret_from_env(
    var: &str,
    path: &str,
    env: &dyn Env,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    if var.trim().is_empty() {
        problems.push(format!("{path}: must name an environment variable"));
        return None;
    }
    match env.var(var) {
        Some(v) if !v.is_empty() => Some(Secret::new(v)),
        _ => {
            problems.push(format!("{path}: environment variable `{var}` is not set"));
            None
        }
    }
}

fn parse_http_url(url: &str, at: &str, problems: &mut Vec<String>) -> Option<http::Uri> {
    match url.parse::<http::Uri>() {
        Ok(u)
            if matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty()) =>
        {
            Some(u)
        }
        _ => {
            problems.push(format!("{at}: `{url}` is not an http(s) URL"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("openmeter-eu_1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("..").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
    }
}
