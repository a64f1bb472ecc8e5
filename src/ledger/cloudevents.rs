//! The CloudEvents sink: POSTs each batch as a JSON array of CloudEvents 1.0
//! (`content-type: application/cloudevents-batch+json`), the batched format of the CloudEvents
//! JSON event format, which usage-billing systems such as OpenMeter ingest directly
//! (`POST /api/v1/events`).
//!
//! Every entry becomes one event:
//!
//! | attribute | value |
//! |---|---|
//! | `specversion` | `"1.0"` |
//! | `id` | the entry's UUIDv7: receivers deduplicate on (`source`, `id`), so replays are harmless |
//! | `source` | configured; default [`DEFAULT_CLOUDEVENTS_SOURCE`] |
//! | `type` | `tollgate.usage` or `tollgate.grant` |
//! | `subject` | the account |
//! | `time` | the entry's timestamp, RFC 3339 in UTC |
//! | `datacontenttype` | `application/json` |
//! | `data` | the [`UsageRecord`](super::UsageRecord) or [`GrantEntry`](super::GrantEntry) as JSON (amounts as decimal strings) |
//!
//! A 2xx answer means delivered. 408, 429, any other non-2xx outside 4xx, timeouts and
//! connection errors are [`SinkError::Retryable`]; other 4xx are [`SinkError::Rejected`].
//! The optional `authorization` header value comes from an environment variable and is
//! never logged.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use uuid::Uuid;

use super::LedgerEntry;
use super::sink::{BoxFuture, Sink, SinkError};
use crate::config::Secret;

/// Default `source` attribute of every event.
pub const DEFAULT_CLOUDEVENTS_SOURCE: &str = "tollgate";
/// Default time allowed for one delivery: connect, send, and the whole response.
pub const DEFAULT_CLOUDEVENTS_TIMEOUT_MS: u64 = 10_000;
/// The batched JSON format's media type.
pub const CLOUDEVENTS_BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// `type` of a usage event.
pub const USAGE_EVENT_TYPE: &str = "tollgate.usage";
/// `type` of a grant event.
pub const GRANT_EVENT_TYPE: &str = "tollgate.grant";

/// How much of an error response's body is quoted in the error, bytes.
const ERROR_BODY_QUOTE_BYTES: usize = 512;
/// How much of a response body is read at most, bytes.
const MAX_RESPONSE_BODY_BYTES: usize = 64 * 1024;
/// Idle pooled connections kept per receiver host.
const POOL_MAX_IDLE_PER_HOST: usize = 4;

/// Settings of a [`CloudEventsSink`].
#[derive(Clone, Debug)]
pub struct CloudEventsSinkConfig {
    /// Where batches are POSTed (`http://` or `https://`).
    pub url: http::Uri,
    /// The whole `authorization` header value (`Bearer …`), when the receiver wants one.
    pub authorization: Option<Secret>,
    /// The `source` attribute.
    pub source: String,
    /// Time allowed for one delivery.
    pub timeout: Duration,
}

impl CloudEventsSinkConfig {
    /// The defaults with this URL: no authorization, source [`DEFAULT_CLOUDEVENTS_SOURCE`],
    /// timeout [`DEFAULT_CLOUDEVENTS_TIMEOUT_MS`].
    pub fn new(url: http::Uri) -> Self {
        Self {
            url,
            authorization: None,
            source: DEFAULT_CLOUDEVENTS_SOURCE.to_string(),
            timeout: Duration::from_millis(DEFAULT_CLOUDEVENTS_TIMEOUT_MS),
        }
    }
}

/// One event in the CloudEvents 1.0 JSON format.
#[derive(Serialize)]
struct Event<'a, T: Serialize> {
    specversion: &'static str,
    id: Uuid,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'static str,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    data: &'a T,
}

/// The events of a batch, in order, as one `application/cloudevents-batch+json` body.
pub fn encode_batch(source: &str, batch: &[LedgerEntry]) -> Result<Vec<u8>, serde_json::Error> {
    fn event<'a, T: Serialize>(
        source: &'a str,
        event_type: &'static str,
        id: Uuid,
        subject: &'a str,
        time: DateTime<Utc>,
        data: &'a T,
    ) -> Event<'a, T> {
        Event {
            specversion: "1.0",
            id,
            source,
            event_type,
            subject,
            time: time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            datacontenttype: "application/json",
            data,
        }
    }
    let mut values = Vec::with_capacity(batch.len());
    for entry in batch {
        let value = match entry {
            LedgerEntry::Usage(r) => serde_json::to_value(event(
                source,
                USAGE_EVENT_TYPE,
                r.id,
                &r.account,
                r.timestamp,
                r,
            ))?,
            LedgerEntry::Grant(g) => serde_json::to_value(event(
                source,
                GRANT_EVENT_TYPE,
                g.id,
                &g.account,
                g.timestamp,
                g,
            ))?,
        };
        values.push(value);
    }
    serde_json::to_vec(&values)
}

type EventsClient = crate::http_client::HttpsClient;

/// An HTTP(S) client trusting the system roots.
fn build_client(timeout: Duration) -> Result<EventsClient, String> {
    crate::http_client::build(&crate::http_client::ClientOptions {
        ca_file: None,
        connect_timeout: timeout,
        pool_max_idle_per_host: POOL_MAX_IDLE_PER_HOST,
    })
}

/// Delivers ledger entries as CloudEvents over HTTP. See the module docs.
pub struct CloudEventsSink {
    name: String,
    config: CloudEventsSinkConfig,
    /// The client, or why it could not be built (every delivery then fails).
    client: Result<EventsClient, String>,
}

impl CloudEventsSink {
    /// A sink POSTing to `config.url`; it does not connect until the first delivery.
    pub fn new(name: impl Into<String>, config: CloudEventsSinkConfig) -> Self {
        let name = name.into();
        let client = build_client(config.timeout);
        if let Err(e) = &client {
            tracing::error!(sink = %name, error = %e, "cloudevents sink: TLS setup failed; every delivery will fail");
        }
        Self {
            name,
            config,
            client,
        }
    }

    /// `scheme://host[:port]` of the receiver, for logs and errors: URLs often carry tokens.
    fn origin(&self) -> String {
        let uri = &self.config.url;
        let scheme = uri.scheme_str().unwrap_or("?");
        let host = uri.host().unwrap_or("?");
        match uri.port_u16() {
            Some(port) => format!("{scheme}://{host}:{port}"),
            None => format!("{scheme}://{host}"),
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), SinkError> {
        let client = self.client.as_ref().map_err(|e| {
            SinkError::Retryable(format!(
                "cloudevents sink `{}`: no HTTP client: {e}",
                self.name
            ))
        })?;
        let mut request = http::Request::post(self.config.url.clone())
            .header(http::header::CONTENT_TYPE, CLOUDEVENTS_BATCH_CONTENT_TYPE)
            .header(
                http::header::USER_AGENT,
                concat!("tollgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SinkError::Rejected(format!("cloudevents sink `{}`: {e}", self.name)))?;
        if let Some(secret) = &self.config.authorization {
            let mut value = http::HeaderValue::from_str(secret.expose()).map_err(|_| {
                SinkError::Rejected(format!(
                    "cloudevents sink `{}`: the authorization value is not a valid header value",
                    self.name
                ))
            })?;
            value.set_sensitive(true);
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value);
        }
        let response = client.request(request).await.map_err(|e| {
            SinkError::Retryable(format!(
                "cloudevents sink `{}` ({}): {}",
                self.name,
                self.origin(),
                crate::http_client::error_chain(&e)
            ))
        })?;
        let status = response.status();
        // Read the body (bounded) so the connection can be reused, and to quote errors.
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            return Ok(());
        }
        let quoted = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_QUOTE_BYTES)])
            .trim()
            .to_string();
        let message = format!(
            "cloudevents sink `{}` ({}) answered {status}: {quoted}",
            self.name,
            self.origin()
        );
        Err(classify_status(status, message))
    }
}

/// 408 and 429 are worth retrying; any other 4xx is not; everything else (5xx, odd 1xx/3xx)
/// is taken as a receiver problem that may pass.
pub fn classify_status(status: http::StatusCode, message: String) -> SinkError {
    match status.as_u16() {
        408 | 429 => SinkError::Retryable(message),
        400..=499 => SinkError::Rejected(message),
        _ => SinkError::Retryable(message),
    }
}

impl Sink for CloudEventsSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [LedgerEntry]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(());
            }
            let body = encode_batch(&self.config.source, batch).map_err(|e| {
                SinkError::Rejected(format!(
                    "cloudevents sink `{}`: cannot encode the batch: {e}",
                    self.name
                ))
            })?;
            match tokio::time::timeout(self.config.timeout, self.post(body)).await {
                Ok(result) => result,
                Err(_) => Err(SinkError::Retryable(format!(
                    "cloudevents sink `{}` ({}): no answer within {} ms",
                    self.name,
                    self.origin(),
                    self.config.timeout.as_millis()
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let retryable = |s: u16| {
            matches!(
                classify_status(http::StatusCode::from_u16(s).unwrap(), String::new()),
                SinkError::Retryable(_)
            )
        };
        for s in [500, 502, 503, 504, 408, 429, 302] {
            assert!(retryable(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 422] {
            assert!(!retryable(s), "{s}");
        }
    }
}
