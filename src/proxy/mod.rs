//! The request lifecycle, top to bottom:
//! authenticate → read and inspect the body → resolve the route → start the meter → forward
//! → meter the response as it streams → (the meter) settle and journal.
//!
//! Errors before the meter starts (bad key, bad body, no route) are answered by tollgate in
//! the caller's dialect and never reach the upstream. From the meter on, every path — success,
//! upstream error, broken stream, client gone — ends in exactly one usage record.

pub mod snapshot;

use std::sync::Arc;

use crate::server::RequestBody;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};

use std::time::Instant;

use crate::alert::Alerter;
use crate::balance::throttle::{Admitted, KeyThrottle};
use crate::balance::{AccountState, Balances, Refusal};
use crate::config::Dialect;
use crate::error::GatewayError;
use crate::http_client::{UpstreamBody, UpstreamError};
use crate::ledger::{Dimensions, Ledger, Outcome};
use crate::meter::{
    AlertRoute, Billing, Gathered, Meter, MeterStart, MeteredBody, estimate_prompt,
};
use crate::metrics::{Metrics, RefusalReason};
use crate::provider::{Endpoint, RequestFacts, openai};
use snapshot::{ApiKey, Snapshot, Upstream};

/// Request header naming the product feature a call serves (breakdown dimension).
pub const HEADER_FEATURE: &str = "x-tollgate-feature";
/// Request header naming the workflow a call belongs to (breakdown dimension).
pub const HEADER_WORKFLOW: &str = "x-tollgate-workflow";
/// Request header naming the application's end user (breakdown dimension).
pub const HEADER_END_USER: &str = "x-tollgate-end-user";
/// Prefix of the request headers tollgate reads and never forwards.
const TOLLGATE_HEADER_PREFIX: &str = "x-tollgate-";
/// Anthropic's API-key header.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Response header carrying the id of the usage record the call produced.
pub const HEADER_RECORD_ID: &str = "x-tollgate-record-id";
const RECORD_ID: HeaderName = HeaderName::from_static(HEADER_RECORD_ID);
/// Longest dimension value kept; longer values are cut (on a character boundary).
const MAX_DIMENSION_BYTES: usize = 256;

/// Longest `model` accepted. Real names (fine-tunes, deployment ARNs) are far shorter; the
/// name goes into the usage record, error messages and sinks, and a body-sized one would make
/// a journal entry larger than the journal accepts.
const MAX_MODEL_BYTES: usize = 1024;

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those tollgate
/// sets itself.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The gateway's shared state: the swappable config snapshot and the long-lived parts.
pub struct Gateway {
    pub snapshot: ArcSwap<Snapshot>,
    pub ledger: Arc<Ledger>,
    pub balances: Balances,
    pub throttles: crate::FastDashMap<Arc<str>, Arc<KeyThrottle>>,
    pub alerter: Option<Arc<Alerter>>,
    /// Origin of the monotonic clock the throttles run on.
    pub clock: Instant,
    pub metrics: Arc<Metrics>,
    /// Each sink's flush progress (cursor, failures, lag), for metrics.
    pub sink_progress: ArcSwap<Vec<Arc<crate::ledger::flusher::SinkProgress>>>,
}

/// The response body type of the data plane.
pub enum GatewayBody {
    Full(Full<Bytes>),
    /// A forwarded response, with the first frame when it was read before the head was
    /// handed to the server (see [`Gateway::proxy`]). Boxed: the metered body is about a
    /// kilobyte, which the response would otherwise be copied with at each move through the
    /// server (one allocation costs less).
    Metered(
        Box<MeteredBody<UpstreamBody>>,
        Option<Result<Frame<Bytes>, UpstreamError>>,
    ),
}

impl GatewayBody {
    fn full(bytes: Bytes) -> Self {
        GatewayBody::Full(Full::new(bytes))
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        match self.get_mut() {
            GatewayBody::Full(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            GatewayBody::Metered(b, first) => match first.take() {
                Some(frame) => std::task::Poll::Ready(Some(frame)),
                None => std::pin::Pin::new(&mut **b).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(b) => b.is_end_stream(),
            GatewayBody::Metered(b, first) => first.is_none() && b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(b) => b.size_hint(),
            GatewayBody::Metered(b, first) => {
                let rest = b.size_hint();
                let first = match first {
                    Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
                    _ => return rest,
                };
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + first);
                }
                hint.set_lower(rest.lower() + first);
                hint
            }
        }
    }
}

impl Gateway {
    /// Serves one request; never fails (errors become dialect-shaped responses).
    pub async fn handle(self: Arc<Self>, req: Request<RequestBody>) -> Response<GatewayBody> {
        let endpoint = Endpoint::classify(req.method(), req.uri().path());
        let dialect = endpoint
            .dialect()
            .unwrap_or_else(|| dialect_from_headers(req.headers()));
        match self.proxy(req, endpoint, dialect).await {
            Ok(response) => response,
            Err(e) => {
                if let Some(reason) = refusal_reason(&e) {
                    self.metrics.refused(reason);
                }
                error_response(&e, dialect)
            }
        }
    }

    async fn proxy(
        &self,
        req: Request<RequestBody>,
        endpoint: Endpoint,
        dialect: Dialect,
    ) -> Result<Response<GatewayBody>, GatewayError> {
        let timestamp = chrono::Utc::now();
        let snapshot = self.snapshot.load_full();

        // Authenticate: nothing is read or forwarded for an unknown key.
        let key = authenticate(&snapshot, req.headers(), dialect)?;

        // Read the body within the limit and pick out the few fields tollgate needs.
        let (parts, body) = req.into_parts();
        let limit = snapshot.config.server.max_request_body_bytes;
        let body = read_body(body, &parts.headers, limit).await?;
        if endpoint == Endpoint::Outcomes {
            return self
                .report_outcome(&snapshot, &key, &parts.headers, &body, timestamp)
                .await;
        }
        let facts = if endpoint == Endpoint::Other {
            RequestFacts::parse(&body).unwrap_or_default()
        } else {
            let facts = RequestFacts::parse(&body).map_err(|e| {
                // Valid JSON of another kind (an array, a string): say what is wanted.
                if e.is_data() && body.trim_ascii_start().first() != Some(&b'{') {
                    GatewayError::NotAnObject
                } else {
                    GatewayError::MalformedJson(e.to_string())
                }
            })?;
            if facts.model.is_none() {
                return Err(GatewayError::MissingModel);
            }
            facts
        };
        if let Some(model) = &facts.model
            && model.len() > MAX_MODEL_BYTES
        {
            return Err(GatewayError::ModelTooLong {
                len: model.len(),
                max: MAX_MODEL_BYTES,
            });
        }

        // Resolve the route.
        let upstream = snapshot
            .route(dialect, facts.model.as_deref())
            .cloned()
            .ok_or_else(|| match &facts.model {
                Some(model) => GatewayError::NoRoute {
                    model: model.clone(),
                },
                None => GatewayError::NoDefaultUpstream {
                    dialect: dialect.as_str(),
                },
            })?;

        // Ask chat/completions streams for usage when the client did not.
        let mut hide_usage_chunk = false;
        let mut upstream_body = body.clone();
        if facts.stream
            && dialect == Dialect::OpenAi
            && openai::needs_usage_request(endpoint)
            && facts.include_usage != Some(true)
            && let Some(rewritten) = openai::with_include_usage(&body, facts.has_stream_options)
        {
            upstream_body = rewritten;
            hide_usage_chunk = true;
        }

        let upstream_req = build_upstream_request(&parts, &upstream, upstream_body, endpoint)?;

        // The journal is the record of what is owed: over its disk budget, refuse new work
        // (or, when configured to keep serving, say so loudly).
        let journal = &snapshot.config.journal;
        if self.ledger.journal_bytes() > journal.max_bytes {
            if journal.refuse_when_full {
                return Err(GatewayError::JournalFull);
            }
            tracing::error!(
                bytes = self.ledger.journal_bytes(),
                budget = journal.max_bytes,
                "usage journal is over its disk budget; serving anyway (journal.on_full = serve)"
            );
        }

        // Admit: throttle, then reserve the worst-case cost before the upstream is paid.
        let billing = self
            .admit(&snapshot, &key, endpoint, dialect, &facts, &body, timestamp)
            .await?;

        // From here on, every path ends in exactly one usage record.
        let mut meter = Meter::new(MeterStart {
            ledger: self.ledger.clone(),
            record_id: uuid::Uuid::now_v7(),
            timestamp,
            key_id: key.id.clone(),
            account: key.account.clone(),
            upstream: upstream.name.clone(),
            model: facts.model,
            endpoint,
            dialect,
            streamed: facts.stream,
            dimensions: dimensions(&parts.headers),
            request_body: body,
            max_metered_response_bytes: snapshot.config.server.max_metered_response_bytes,
            hide_usage_chunk,
            wait_for_journal: snapshot.config.journal.wait_for_write,
            billing,
        });
        drop(snapshot);

        let timeout = upstream.config.timeout;
        let response = match tokio::time::timeout(timeout, upstream.client.send(upstream_req)).await
        {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                meter.on_no_response(StatusCode::BAD_GATEWAY, Outcome::UpstreamUnreachable);
                return Err(GatewayError::UpstreamUnreachable {
                    upstream: upstream.name.to_string(),
                    reason: crate::http_client::error_chain(&*e),
                });
            }
            Err(_) => {
                meter.on_no_response(StatusCode::GATEWAY_TIMEOUT, Outcome::UpstreamTimeout);
                return Err(GatewayError::UpstreamTimeout {
                    upstream: upstream.name.to_string(),
                    timeout_ms: timeout.as_millis(),
                });
            }
        };

        let (mut head, body) = response.into_parts();
        let is_event_stream = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        let rewrites_length = meter.on_response_head(head.status, is_event_stream);
        strip_hop_by_hop(&mut head.headers);
        if rewrites_length {
            head.headers.remove(header::CONTENT_LENGTH);
        }
        if let Some(id) = meter.record_id() {
            insert_record_id(&mut head.headers, id);
        }
        let mut body = Box::new(MeteredBody::new(body, meter, upstream.config.read_timeout));
        // A response that is not an event stream usually arrives whole with its head, and
        // its last bytes wait for the usage record's journal write. Reading the first frame
        // before handing the head to the server keeps head and body in one write to the
        // client: were the head handed over first, the server would send it alone while the
        // body waits for the journal.
        let first = if is_event_stream {
            None
        } else {
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        };
        Ok(Response::from_parts(
            head,
            GatewayBody::Metered(body, first),
        ))
    }
}

/// The body of `POST /v1/outcomes`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeReport {
    /// The outcome's name, as priced in `[[outcome_prices]]`.
    outcome: String,
    /// How many; default 1.
    #[serde(default = "one")]
    quantity: u64,
}

fn one() -> u64 {
    1
}

impl Gateway {
    /// Prices and journals an application-reported outcome like any metered call: reserved
    /// and refused (402) when the account cannot afford it, settled, recorded.
    async fn report_outcome(
        &self,
        snapshot: &Snapshot,
        key: &Arc<ApiKey>,
        headers: &HeaderMap,
        body: &Bytes,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Response<GatewayBody>, GatewayError> {
        let report: OutcomeReport =
            serde_json::from_slice(body).map_err(|e| GatewayError::MalformedJson(e.to_string()))?;
        let unit_price = *snapshot
            .config
            .prices
            .outcomes
            .get(&report.outcome)
            .ok_or_else(|| GatewayError::UnknownOutcome(report.outcome.clone()))?;
        let rated = unit_price
            .checked_mul(i64::try_from(report.quantity).unwrap_or(i64::MAX))
            .ok_or_else(|| {
                GatewayError::MalformedJson(
                    "`quantity` times the outcome price does not fit".into(),
                )
            })?;
        let policy = key.policy.clone();
        let account = self.balances.account(&policy, now);
        let charge = self.throttle(key, &account, 0)?;
        let reservation = if policy.is_limited() {
            Some(account.reserve(&policy, policy.reservation_for(rated), now)?)
        } else {
            None
        };
        charge.keep();
        let mut record = crate::ledger::UsageRecord {
            id: uuid::Uuid::now_v7(),
            timestamp: now,
            key_id: key.id.clone(),
            account: key.account.clone(),
            model: None,
            upstream: Arc::from(""),
            endpoint: Endpoint::Outcomes,
            streamed: false,
            status: 200,
            outcome: Outcome::Reported,
            usage: Default::default(),
            estimated: false,
            upstream_ttfb_us: None,
            upstream_total_us: 0,
            dimensions: dimensions(headers),
            cost: None,
            rated_cost: None,
            unit: None,
            metric: Some(report.outcome.clone()),
            quantity: Some(report.quantity),
        };
        let settlement = match reservation {
            Some(r) => r.settle(rated, now),
            None => crate::balance::settle_account(&account, &policy, rated, 0, 0, 0, now),
        };
        record.cost = Some(crate::pricing::from_nanos(settlement.charge));
        record.rated_cost = Some(crate::pricing::from_nanos(settlement.rated));
        record.unit = Some(policy.unit.clone());
        if let Some(route) = self.alert_route(key) {
            route.announce(&policy, &account, settlement.crossings);
        }
        self.metrics.observe(
            &record,
            &Arc::from(format!("outcome:{}", report.outcome).as_str()),
            settlement.charge,
        );
        let reply = serde_json::json!({
            "id": record.id,
            "outcome": report.outcome,
            "quantity": report.quantity,
            "cost": record.cost,
            "unit": record.unit,
        });
        let id = record.id;
        // As for a metered call: the top-up first, and the answer only once the record is
        // journaled (`journal.wait_for_write`).
        if let Some(grant) = settlement.topup {
            self.ledger.submit(crate::ledger::GrantEntry::new(
                &policy.id,
                &policy.unit,
                &grant,
                crate::ledger::GrantSource::AutoTopUp,
                now,
            ));
        }
        let written = self.ledger.submit_acked(record);
        if snapshot.config.journal.wait_for_write {
            let _ = written.await;
        }
        let mut response = Response::new(GatewayBody::full(Bytes::from(reply.to_string())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        insert_record_id(response.headers_mut(), id);
        Ok(response)
    }

    /// Admission: rate limits, slow-down near the cap, and the worst-case reservation.
    #[allow(clippy::too_many_arguments)]
    async fn admit(
        &self,
        snapshot: &Snapshot,
        key: &Arc<ApiKey>,
        endpoint: Endpoint,
        dialect: Dialect,
        facts: &RequestFacts,
        body: &Bytes,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Billing, GatewayError> {
        let policy = key.policy.clone();
        let account = self.balances.account(&policy, now);
        let price = facts
            .model
            .as_deref()
            .and_then(|m| snapshot.config.prices.price_for(m))
            .cloned();
        let output_tokens = match endpoint {
            Endpoint::Embeddings | Endpoint::Other => 0,
            _ => facts
                .max_output_tokens
                .unwrap_or(snapshot.config.reservation.default_output_tokens),
        };
        let cheap_input =
            body.len() as u64 / snapshot.config.reservation.prompt_bytes_per_token + 1;
        // Refunded if admission fails further down (or this future is dropped).
        let mut charge = self.throttle(key, &account, cheap_input + output_tokens)?;

        let mut reservation = None;
        let mut reserved_output_tokens = None;
        if policy.is_limited() && endpoint != Endpoint::Other && price.is_none() {
            // A limited account cannot be charged for a model the price book does not know:
            // forwarding it would let the provider bill what no cap or wallet accounts for.
            return Err(GatewayError::Unpriced {
                model: facts.model.clone().unwrap_or_default(),
                account: policy.id.to_string(),
            });
        }
        if policy.is_limited()
            && endpoint != Endpoint::Other
            && let Some(price) = &price
        {
            let amount = policy.reservation_for(price.worst_case(cheap_input, output_tokens));
            let reserved = match account.reserve(&policy, amount, now) {
                Ok(r) => r,
                Err(refusal @ (Refusal::HardCap { .. } | Refusal::InsufficientBalance { .. })) => {
                    // Close to the limit the cheap estimate may refuse a request the account
                    // can afford: count the prompt exactly (off the runtime threads) and retry.
                    charge.keep_requests();
                    let model = facts.model.clone().unwrap_or_default();
                    let request = body.clone();
                    let exact = tokio::task::spawn_blocking(move || {
                        estimate_prompt(endpoint, dialect, &model, &request)
                    })
                    .await
                    .map_err(|e| GatewayError::Internal(e.to_string()))?;
                    if exact >= cheap_input {
                        return Err(refusal.into());
                    }
                    let amount = policy.reservation_for(price.worst_case(exact, output_tokens));
                    account.reserve(&policy, amount, now)?
                }
                Err(refusal) => return Err(refusal.into()),
            };
            reservation = Some(reserved);
            reserved_output_tokens = Some(output_tokens);
        }
        let alerts = self.alert_route(key);
        charge.keep();
        Ok(Billing {
            price,
            account,
            policy,
            reservation,
            reserved_output_tokens,
            alerts,
            metrics: self.metrics.clone(),
        })
    }

    /// Where alerts about `key`'s account go: the account admin's and the key owner's hooks.
    fn alert_route(&self, key: &ApiKey) -> Option<AlertRoute> {
        self.alerter.as_ref().map(|alerter| AlertRoute {
            alerter: alerter.clone(),
            key_id: key.id.clone(),
            targets: key
                .policy
                .webhooks
                .iter()
                .cloned()
                .chain(key.owner_webhook.clone())
                .collect(),
        })
    }

    /// Per-key request and token rates, and the slow-down near the account's cap. What it
    /// takes is given back if the request is refused later (see [`ThrottleCharge`]); a limit
    /// that refuses gives back what the limits before it took.
    fn throttle(
        &self,
        key: &ApiKey,
        account: &AccountState,
        tokens: u64,
    ) -> Result<ThrottleCharge, GatewayError> {
        let slowdown = key
            .policy
            .slowdown
            .as_ref()
            .filter(|s| account.cap_used_ppb(&key.policy) >= s.at_ppb);
        if key.rpm.is_none() && key.tpm.is_none() && slowdown.is_none() {
            return Ok(ThrottleCharge::default());
        }
        let throttle = match self.throttles.get(&key.id) {
            Some(t) => t.clone(),
            None => self
                .throttles
                .entry(key.id.clone())
                .or_insert_with(|| Arc::new(KeyThrottle::default()))
                .clone(),
        };
        let now = u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let limited = |limit: String, wait: std::time::Duration| GatewayError::RateLimited {
            limit,
            retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
        };
        // Built before the checks: a limit that refuses drops it, refunding the ones before.
        let mut charge = ThrottleCharge {
            limits: Some((throttle.clone(), self.clock)),
            ..ThrottleCharge::default()
        };
        if let Some(rpm) = key.rpm {
            charge.requests = Some(
                throttle
                    .requests
                    .check(now, rpm, 1)
                    .map_err(|w| limited(format!("{rpm} requests per minute for this key"), w))?,
            );
        }
        if let Some(tpm) = key.tpm {
            charge.tokens = Some(
                throttle
                    .tokens
                    .check(now, tpm, tokens)
                    .map_err(|w| limited(format!("{tpm} tokens per minute for this key"), w))?,
            );
        }
        if let Some(s) = slowdown {
            charge.slowdown = Some(throttle.slowdown.check(now, u64::from(s.rpm), 1).map_err(
                |w| {
                    limited(
                        format!(
                            "{} requests per minute while spend is near the account's cap",
                            s.rpm
                        ),
                        w,
                    )
                },
            )?);
        }
        Ok(charge)
    }
}

/// What [`Gateway::throttle`] took from a key's limiters. Dropped without [`keep`]
/// (a refusal further on in admission, a 402 or an unpriced model, or a client gone before
/// the request went upstream), it gives back what has not run out yet: a request the gateway
/// refused does not use up the key's rates. A request whose prompt tollgate counted before
/// refusing it keeps its request charges ([`keep_requests`]): that work is what the
/// requests-per-minute limits bound.
///
/// [`keep`]: ThrottleCharge::keep
/// [`keep_requests`]: ThrottleCharge::keep_requests
#[derive(Default)]
#[must_use]
struct ThrottleCharge {
    /// The key's limiters and the origin of the clock they run on; `None` once kept.
    limits: Option<(Arc<KeyThrottle>, Instant)>,
    requests: Option<Admitted>,
    tokens: Option<Admitted>,
    slowdown: Option<Admitted>,
}

impl ThrottleCharge {
    /// The request was admitted: what was taken stays taken.
    fn keep(mut self) {
        self.limits = None;
    }

    /// Whatever happens next, the request counts against the requests-per-minute limits
    /// (its tokens are still given back if it is refused).
    fn keep_requests(&mut self) {
        self.requests = None;
        self.slowdown = None;
    }
}

impl Drop for ThrottleCharge {
    fn drop(&mut self) {
        let Some((throttle, clock)) = self.limits.take() else {
            return;
        };
        let now = u64::try_from(clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for (limit, admitted) in [
            (&throttle.requests, self.requests),
            (&throttle.tokens, self.tokens),
            (&throttle.slowdown, self.slowdown),
        ] {
            if let Some(admitted) = admitted {
                limit.refund(admitted, now);
            }
        }
    }
}

fn refusal_reason(e: &GatewayError) -> Option<RefusalReason> {
    match e {
        GatewayError::MissingKey | GatewayError::UnknownKey | GatewayError::DisabledKey => {
            Some(RefusalReason::Auth)
        }
        GatewayError::Refused(Refusal::HardCap { .. }) => Some(RefusalReason::Cap),
        GatewayError::Refused(Refusal::InsufficientBalance { .. } | Refusal::TopUpRequired) => {
            Some(RefusalReason::Balance)
        }
        GatewayError::RateLimited { .. } => Some(RefusalReason::RateLimit),
        GatewayError::MalformedJson(_)
        | GatewayError::NotAnObject
        | GatewayError::MissingModel
        | GatewayError::ModelTooLong { .. }
        | GatewayError::BodyTooLarge { .. }
        | GatewayError::BodyRead(_)
        | GatewayError::NoRoute { .. }
        | GatewayError::NoDefaultUpstream { .. }
        | GatewayError::UnknownOutcome(_) => Some(RefusalReason::BadRequest),
        GatewayError::Unpriced { .. } => Some(RefusalReason::Balance),
        GatewayError::UpstreamUnreachable { .. }
        | GatewayError::UpstreamTimeout { .. }
        | GatewayError::JournalFull
        | GatewayError::Internal(_) => None,
    }
}

fn error_response(e: &GatewayError, dialect: Dialect) -> Response<GatewayBody> {
    let (status, body) = e.render(dialect);
    let mut response = Response::new(GatewayBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let GatewayError::RateLimited { retry_after_ms, .. } = e
        && let Ok(v) = HeaderValue::from_str(&retry_after_ms.div_ceil(1000).to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// Requests to pass-through paths carry no dialect in their path; Anthropic clients always
/// send `anthropic-version`.
fn dialect_from_headers(headers: &HeaderMap) -> Dialect {
    if headers.contains_key("anthropic-version") {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    }
}

fn authenticate(
    snapshot: &Snapshot,
    headers: &HeaderMap,
    dialect: Dialect,
) -> Result<Arc<ApiKey>, GatewayError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let x_api_key = || {
        headers
            .get(X_API_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let presented = match dialect {
        Dialect::Anthropic => x_api_key().or(bearer),
        Dialect::OpenAi => bearer.or_else(x_api_key),
    }
    .filter(|k| !k.is_empty())
    .ok_or(GatewayError::MissingKey)?;
    let key = snapshot.key(presented).ok_or(GatewayError::UnknownKey)?;
    if key.disabled {
        return Err(GatewayError::DisabledKey);
    }
    Ok(key.clone())
}

async fn read_body(
    body: RequestBody,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    // Gathered rather than `collect()`ed: a body that arrives in one frame (most do) is kept
    // as that frame, with no queue of buffers built around it.
    let mut body = Limited::new(body, limit);
    let mut gathered = Gathered::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                GatewayError::BodyTooLarge { limit }
            } else {
                GatewayError::BodyRead(e.to_string())
            }
        })?;
        if let Ok(data) = frame.into_data() {
            gathered.push(data); // (trailers are dropped)
        }
    }
    Ok(gathered.into_bytes().unwrap_or_default())
}

fn build_upstream_request(
    parts: &http::request::Parts,
    upstream: &Upstream,
    body: Bytes,
    endpoint: Endpoint,
) -> Result<Request<Bytes>, GatewayError> {
    // Origin form (path and query); the pool adds what the connection's protocol needs.
    let path_and_query = parts.uri.path_and_query();
    let uri = match (upstream.path_prefix.is_empty(), path_and_query) {
        (true, Some(pq)) => http::Uri::from(pq.clone()),
        (_, pq) => {
            let pq = pq.map_or("/", http::uri::PathAndQuery::as_str);
            format!("{}{pq}", upstream.path_prefix)
                .parse()
                .map_err(|e| GatewayError::Internal(format!("upstream URI: {e}")))?
        }
    };

    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 2);
    for (name, value) in &parts.headers {
        if is_forwardable(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if endpoint != Endpoint::Other {
        // Usage must be readable: no compressed responses on metered endpoints.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    if let Some((name, value)) = &upstream.credential {
        headers.insert(name.clone(), value.clone());
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Whether a client header goes upstream. Not: hop-by-hop headers, those tollgate sets
/// (host, length, credentials) or reads (`x-tollgate-*`), and `expect`: the body is read
/// whole (and `100 Continue` answered) before the request leaves, so an upstream asked to
/// confirm it would only add an interim response.
fn is_forwardable(name: &HeaderName) -> bool {
    !(HOP_BY_HOP.contains(name)
        || name == header::EXPECT
        || name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::AUTHORIZATION
        || name == X_API_KEY
        || name.as_str().starts_with(TOLLGATE_HEADER_PREFIX))
}

/// Puts the record id header on a response (formatted without a `String` on the way).
fn insert_record_id(headers: &mut HeaderMap, id: uuid::Uuid) {
    let mut buf = uuid::Uuid::encode_buffer();
    if let Ok(v) = HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf)) {
        headers.insert(RECORD_ID, v);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few headers a response has, rather than a lookup per name.
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

/// The breakdown dimensions the request names (the first of each header), in one pass over
/// its headers.
fn dimensions(headers: &HeaderMap) -> Dimensions {
    let mut dims = Dimensions::default();
    for (name, value) in headers {
        let slot = match name.as_str() {
            HEADER_FEATURE => &mut dims.feature,
            HEADER_WORKFLOW => &mut dims.workflow,
            HEADER_END_USER => &mut dims.end_user,
            _ => continue,
        };
        if slot.is_some() {
            continue;
        }
        *slot = value
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| {
                let mut end = v.len().min(MAX_DIMENSION_BYTES);
                while !v.is_char_boundary(end) {
                    end -= 1;
                }
                v[..end].to_string()
            });
    }
    dims
}
