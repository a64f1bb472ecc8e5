//! The admin listener, on its own address and behind a bearer token compared in constant
//! time: account balances, grants and period usage; adding grants (top-ups); Prometheus
//! metrics; config reload. Every endpoint answers JSON except `/metrics`.
//!
//! | Method and path | |
//! |---|---|
//! | `GET /admin/accounts/{id}` | balance, grants, period usage and limits |
//! | `POST /admin/accounts/{id}/grants` | add a grant: `{"amount":"10.00","id"?,"kind"?,"priority"?,"expires_at"?,"rollover"?}` |
//! | `POST /admin/reload[?dry_run=true]` | re-read the config file: apply it (or only validate and diff it) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | liveness, no token needed |

use std::sync::Arc;

use crate::server::RequestBody;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::balance::{AccountPolicy, GrantKind, GrantSpec};
use crate::config::Secret;
use crate::pricing::to_nanos;
use crate::proxy::Gateway;
use crate::reload::Reloader;

/// Largest admin request body accepted.
const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

/// The admin API's state.
pub struct Admin {
    pub gateway: Arc<Gateway>,
    reloader: Arc<Reloader>,
    token_digest: [u8; 32],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantRequest {
    /// Defaults to `admin-<uuid>`.
    id: Option<String>,
    amount: Decimal,
    kind: Option<String>,
    priority: Option<i32>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    rollover: Option<String>,
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({"error": {"message": message}}))
}

/// Constant-time equality of two digests.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Admin {
    pub fn new(gateway: Arc<Gateway>, reloader: Arc<Reloader>, token: &Secret) -> Admin {
        Admin {
            gateway,
            reloader,
            token_digest: Sha256::digest(token.expose().as_bytes()).into(),
        }
    }

    fn authorised(&self, req: &Request<RequestBody>) -> bool {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Comparing digests keeps the comparison constant-time and length-independent.
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digests_equal(&digest, &self.token_digest)
    }

    pub async fn handle(self: Arc<Self>, req: Request<RequestBody>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if req.method() == Method::GET && path == "/healthz" {
            return json(StatusCode::OK, &serde_json::json!({"status": "ok"}));
        }
        if !self.authorised(&req) {
            return error(
                StatusCode::UNAUTHORIZED,
                "admin token required: Authorization: Bearer <token>",
            );
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method().clone(), segments.as_slice()) {
            (Method::GET, ["metrics"]) => self.metrics(),
            (Method::POST, ["admin", "reload"]) => {
                let dry_run = req.uri().query().is_some_and(|q| {
                    q.split('&')
                        .any(|p| p == "dry_run=true" || p == "dry_run=1")
                });
                self.reload(dry_run).await
            }
            (Method::GET, ["admin", "accounts", id]) => {
                let id = id.to_string();
                self.account(&id)
            }
            (Method::POST, ["admin", "accounts", id, "grants"]) => {
                let id = id.to_string();
                self.add_grant(&id, req).await
            }
            _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
        }
    }

    /// The account's policy: configured, or the implicit one of an account keys refer to.
    fn policy(&self, id: &str) -> Option<Arc<AccountPolicy>> {
        let snapshot = self.gateway.snapshot.load();
        if let Some(p) = snapshot.config.accounts.get(id) {
            return Some(p.clone());
        }
        snapshot
            .config
            .keys
            .iter()
            .any(|k| k.account == id)
            .then(|| Arc::new(AccountPolicy::unlimited(id)))
    }

    fn account(&self, id: &str) -> Response<Full<Bytes>> {
        let Some(policy) = self.policy(id) else {
            return error(StatusCode::NOT_FOUND, &format!("no account `{id}`"));
        };
        let state = self.gateway.balances.account(&policy, chrono::Utc::now());
        json(StatusCode::OK, &state.view(&policy))
    }

    async fn add_grant(&self, id: &str, req: Request<RequestBody>) -> Response<Full<Bytes>> {
        let Some(policy) = self.policy(id) else {
            return error(StatusCode::NOT_FOUND, &format!("no account `{id}`"));
        };
        if !policy.prepaid {
            return error(
                StatusCode::CONFLICT,
                &format!("account `{id}` is not prepaid (set `prepaid = true` in its config)"),
            );
        }
        let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
        };
        let grant: GrantRequest = match serde_json::from_slice(&body) {
            Ok(g) => g,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("grant: {e}")),
        };
        let amount = match to_nanos(grant.amount) {
            Ok(a) if a > 0 => a,
            Ok(_) => return error(StatusCode::BAD_REQUEST, "amount: must be positive"),
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("amount: {e}")),
        };
        let kind = match GrantKind::parse(grant.kind.as_deref().unwrap_or("paid")) {
            Ok(k) => k,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("kind: {e}")),
        };
        let expires_at_period_end =
            match crate::balance::parse_rollover(grant.rollover.as_deref().unwrap_or("keep")) {
                Ok(r) => r,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("rollover: {e}")),
            };
        let spec = GrantSpec {
            id: grant
                .id
                .unwrap_or_else(|| format!("admin-{}", uuid::Uuid::now_v7())),
            amount,
            kind,
            priority: grant
                .priority
                .unwrap_or(crate::config::DEFAULT_GRANT_PRIORITY),
            expires_at: grant.expires_at,
            expires_at_period_end,
        };
        let now = chrono::Utc::now();
        let state = self.gateway.balances.account(&policy, now);
        match state.add_grant(&policy, spec.clone(), now) {
            Ok(()) => {
                tracing::info!(account = %id, grant = %spec.id, amount = %grant.amount, "grant added by admin");
                // Reply only once the grant is in the journal: a crash cannot lose a grant
                // the caller was told about.
                let written = self
                    .gateway
                    .ledger
                    .submit_acked(crate::ledger::GrantEntry::new(
                        id,
                        &policy.unit,
                        &spec,
                        crate::ledger::GrantSource::Admin,
                        now,
                    ));
                if written.await.is_err() {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the grant was applied but the journal is shutting down",
                    );
                }
                json(StatusCode::CREATED, &state.view(&policy))
            }
            Err(e) if e.contains("already exists") => error(StatusCode::CONFLICT, &e),
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        }
    }

    async fn reload(&self, dry_run: bool) -> Response<Full<Bytes>> {
        let result = if dry_run {
            self.reloader.dry_run()
        } else {
            self.reloader.reload_file().await
        };
        match result {
            Ok(changes) => json(
                StatusCode::OK,
                &serde_json::json!({"applied": !dry_run, "changes": changes}),
            ),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({
                    "applied": false,
                    "error": {"message": "config refused; the running config is unchanged", "problems": e.problems()}
                }),
            ),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let ledger = &self.gateway.ledger;
        let mut extra = vec![
            (
                "tollgate_journal_entries_submitted_total",
                "Journal entries (usage records, grants) handed to the journal writer.",
                ledger.submitted(),
            ),
            (
                "tollgate_journal_entries_written_total",
                "Journal entries appended to the journal.",
                ledger.written(),
            ),
        ];
        extra.push((
            "tollgate_config_reloads_applied_total",
            "Config reloads applied.",
            self.reloader.applied(),
        ));
        extra.push((
            "tollgate_config_reloads_failed_total",
            "Config reloads refused (invalid config); the previous config kept serving.",
            self.reloader.failed(),
        ));
        if let Some(a) = &self.gateway.alerter {
            extra.push((
                "tollgate_alerts_delivered_total",
                "Alert webhooks accepted by their receiver.",
                a.delivered(),
            ));
            extra.push((
                "tollgate_alerts_failed_total",
                "Alert webhooks given up after all retries.",
                a.failed(),
            ));
            extra.push((
                "tollgate_alerts_dropped_total",
                "Alerts dropped because the delivery queue was full.",
                a.dropped(),
            ));
        }
        extra.push((
            "tollgate_journal_bytes",
            "Size of the usage journal on disk.",
            ledger.journal_bytes(),
        ));
        let mut text = self.gateway.metrics.render(&extra);
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering;
        let progress = self.gateway.sink_progress.load();
        if !progress.is_empty() {
            text.push_str("# HELP tollgate_sink_lag_entries Journal entries a sink has not accepted yet.\n# TYPE tollgate_sink_lag_entries gauge\n");
            for p in progress.iter() {
                let lag = ledger
                    .last_seq()
                    .saturating_sub(p.cursor.load(Ordering::Acquire));
                let _ = writeln!(
                    text,
                    "tollgate_sink_lag_entries{{sink=\"{}\"}} {lag}",
                    p.name
                );
            }
            text.push_str("# HELP tollgate_sink_lag_seconds Age of the oldest entry a sink has not accepted.\n# TYPE tollgate_sink_lag_seconds gauge\n");
            let now = chrono::Utc::now().timestamp_millis();
            for p in progress.iter() {
                let oldest = p.oldest_pending_ms.load(Ordering::Acquire);
                let lag = if oldest == 0 {
                    0.0
                } else {
                    (now - oldest).max(0) as f64 / 1000.0
                };
                let _ = writeln!(
                    text,
                    "tollgate_sink_lag_seconds{{sink=\"{}\"}} {lag}",
                    p.name
                );
            }
            text.push_str("# HELP tollgate_sink_failures_total Failed delivery attempts per sink.\n# TYPE tollgate_sink_failures_total counter\n");
            for p in progress.iter() {
                let _ = writeln!(
                    text,
                    "tollgate_sink_failures_total{{sink=\"{}\"}} {}",
                    p.name,
                    p.failures.load(Ordering::Relaxed)
                );
            }
        }
        let mut r = Response::new(Full::new(Bytes::from(text)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    }
}
