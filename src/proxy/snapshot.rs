//! The config snapshot a request runs under: the validated config and everything derived from
//! it (key table, route table, upstream clients). It is swapped whole through one `ArcSwap`,
//! so a request sees the old snapshot or the new one, never a mix; long-lived state (balances,
//! counters, the ledger) lives outside it.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderValue;

use crate::balance::AccountPolicy;
use crate::config::{Config, Dialect, ModelMatch, UpstreamConfig};

pub type UpstreamClient = Arc<crate::http_client::OriginPool>;

/// A client key as the request path sees it.
#[derive(Debug)]
pub struct ApiKey {
    pub id: Arc<str>,
    pub account: Arc<str>,
    pub disabled: bool,
    /// The account's limits and billing rules (unlimited when config does not list it).
    pub policy: Arc<AccountPolicy>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub owner_webhook: Option<String>,
}

/// An upstream with its connection pool and ready-made credential header.
pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    pub client: UpstreamClient,
    /// The path prefix requests are sent under (no trailing slash; often empty).
    pub path_prefix: String,
    /// The credential header (`authorization` or `x-api-key`), marked sensitive.
    pub credential: Option<(http::HeaderName, HeaderValue)>,
}

pub struct Snapshot {
    pub config: Config,
    keys: HashMap<[u8; 32], Arc<ApiKey>, crate::FastHash>,
    upstreams: Vec<Arc<Upstream>>,
    defaults: HashMap<Dialect, usize, crate::FastHash>,
}

#[derive(Debug, thiserror::Error)]
#[error("upstreams[{index}] ({name}): {reason}")]
pub struct UpstreamBuildError {
    index: usize,
    name: String,
    reason: String,
}

impl Snapshot {
    pub fn build(config: Config) -> Result<Snapshot, UpstreamBuildError> {
        Self::build_reusing(config, None)
    }

    /// Builds a snapshot, keeping the connection pools of `previous`'s upstreams whose
    /// connection settings did not change (a reload then costs no reconnects).
    pub fn build_reusing(
        config: Config,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, UpstreamBuildError> {
        // Keys of unlisted accounts share one unlimited policy per account (a million keys
        // over ten thousand accounts must not carry a million policies).
        let mut implicit: HashMap<&str, Arc<AccountPolicy>> = HashMap::new();
        let mut keys =
            HashMap::with_capacity_and_hasher(config.keys.len(), crate::FastHash::default());
        for k in &config.keys {
            let policy = match config.accounts.get(&k.account) {
                Some(p) => p.clone(),
                None => implicit
                    .entry(k.account.as_str())
                    .or_insert_with(|| Arc::new(AccountPolicy::unlimited(&k.account)))
                    .clone(),
            };
            keys.insert(
                k.sha256,
                Arc::new(ApiKey {
                    id: Arc::from(k.id.as_str()),
                    account: policy.id.clone(),
                    disabled: k.disabled,
                    policy,
                    rpm: k.rpm,
                    tpm: k.tpm,
                    owner_webhook: k.owner_webhook.clone(),
                }),
            );
        }
        drop(implicit);
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        let mut defaults = HashMap::default();
        for (index, u) in config.upstreams.iter().enumerate() {
            let fail = |reason: String| UpstreamBuildError {
                index,
                name: u.name.clone(),
                reason,
            };
            if u.default {
                defaults.insert(u.dialect, index);
            }
            let reusable = previous.and_then(|p| {
                p.upstreams.iter().find(|old| {
                    let o = &old.config;
                    o.name == u.name
                        && o.origin == u.origin
                        && o.ca_file == u.ca_file
                        && o.connect_timeout == u.connect_timeout
                        && o.pool_max_idle_per_host == u.pool_max_idle_per_host
                })
            });
            let client = match reusable {
                Some(old) => old.client.clone(),
                None => crate::http_client::OriginPool::new(
                    &u.config_origin(),
                    &crate::http_client::ClientOptions {
                        ca_file: u.ca_file.as_deref(),
                        connect_timeout: u.connect_timeout,
                        pool_max_idle_per_host: u.pool_max_idle_per_host,
                    },
                )
                .map_err(fail)?,
            };
            let credential = match &u.credential {
                None => None,
                Some(secret) => {
                    let (name, value) = match u.dialect {
                        Dialect::OpenAi => (
                            http::header::AUTHORIZATION,
                            format!("Bearer {}", secret.expose()),
                        ),
                        Dialect::Anthropic => (
                            http::HeaderName::from_static("x-api-key"),
                            secret.expose().to_string(),
                        ),
                    };
                    let mut value = HeaderValue::from_str(&value).map_err(|_| {
                        fail("the credential holds characters not allowed in a header".into())
                    })?;
                    value.set_sensitive(true);
                    Some((name, value))
                }
            };
            upstreams.push(Arc::new(Upstream {
                name: Arc::from(u.name.as_str()),
                path_prefix: u.path_prefix.clone(),
                config: u.clone(),
                client,
                credential,
            }));
        }
        // With no explicit default, a dialect served by a single upstream defaults to it.
        for dialect in [Dialect::OpenAi, Dialect::Anthropic] {
            let mut of_dialect = config
                .upstreams
                .iter()
                .enumerate()
                .filter(|(_, u)| u.dialect == dialect);
            if let (Some((i, _)), None) = (of_dialect.next(), of_dialect.next()) {
                defaults.entry(dialect).or_insert(i);
            }
        }
        Ok(Snapshot {
            config,
            keys,
            upstreams,
            defaults,
        })
    }

    /// Looks a presented client key up by its SHA-256.
    pub fn key(&self, presented: &str) -> Option<&Arc<ApiKey>> {
        self.keys.get(&crate::config::hash_key(presented))
    }

    /// The upstream for `model` on an endpoint of `dialect`: the first route that matches and
    /// whose upstream speaks the dialect, else the dialect's default upstream.
    pub fn route(&self, dialect: Dialect, model: Option<&str>) -> Option<&Arc<Upstream>> {
        if let Some(model) = model {
            for r in &self.config.routes {
                let upstream = &self.upstreams[r.upstream];
                if upstream.config.dialect != dialect {
                    continue;
                }
                let hit = match &r.matcher {
                    ModelMatch::Exact(m) => m == model,
                    ModelMatch::Prefix(p) => model.starts_with(p.as_str()),
                };
                if hit {
                    return Some(upstream);
                }
            }
        }
        self.defaults.get(&dialect).map(|&i| &self.upstreams[i])
    }
}

impl UpstreamConfig {
    /// `scheme://authority` without the trailing slash `Uri` adds.
    fn config_origin(&self) -> String {
        self.origin.to_string().trim_end_matches('/').to_string()
    }
}
