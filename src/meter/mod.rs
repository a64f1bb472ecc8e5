//! In-line metering of a response as it streams to the client.
//!
//! A [`Meter`] is created when a request reaches the metering stage (key known, route
//! resolved) and is finished exactly once: when the response body ends, when it breaks, when
//! the upstream could not be reached, or — through `Drop` — when the client goes away. That
//! one completion path builds the [`UsageRecord`] and submits it to the ledger, so no path can
//! skip metering or meter twice.
//!
//! Per chunk the work is small and synchronous: non-streaming bodies are kept (by reference
//! count when they arrive in one frame) to read `usage` at the end; streams run through the
//! incremental SSE parser, which only parses the JSON of events that can carry usage. When
//! usage is missing, the tokenizer fallback runs on a blocking task after the response.

pub mod sse;
pub mod tokenizer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::alert::{AlertEvent, AlertKind, Alerter};
use crate::balance::{AccountPolicy, AccountState, Crossing, Reservation};
use crate::config::Dialect;
use crate::http_client::UpstreamError;
use crate::ledger::{Dimensions, GrantEntry, GrantSource, Ledger, Outcome, UsageRecord};
use crate::metrics::Metrics;
use crate::pricing::{ModelPrice, from_nanos};
use crate::provider::{self, Endpoint, ErrorKind, StreamUsage, TokenUsage, anthropic, openai};
use sse::{SseBlock, SseParser};

/// Stream bytes kept for the tokenizer fallback, at most; beyond it the rest of the output is
/// estimated at four bytes a token.
const MAX_RETAINED_STREAM_BYTES: usize = 16 * 1024 * 1024;
/// Bytes per token assumed for output beyond the retained part.
const BYTES_PER_TOKEN_ESTIMATE: u64 = 4;

/// What the meter knows about the request before it is forwarded.
pub struct MeterStart {
    pub ledger: Arc<Ledger>,
    pub record_id: uuid::Uuid,
    pub timestamp: chrono::DateTime<chrono::Utc>,
    pub key_id: Arc<str>,
    pub account: Arc<str>,
    pub upstream: Arc<str>,
    pub model: Option<String>,
    pub endpoint: Endpoint,
    pub dialect: Dialect,
    pub streamed: bool,
    pub dimensions: Dimensions,
    /// The body as the client sent it, for the prompt fallback (a reference-counted handle).
    pub request_body: Bytes,
    pub max_metered_response_bytes: usize,
    /// tollgate asked the stream for usage the client did not ask for: hide that chunk.
    pub hide_usage_chunk: bool,
    /// Hold the end of the response until the record is journaled (`journal.wait_for_write`).
    pub wait_for_journal: bool,
    /// Pricing and the account to charge.
    pub billing: Billing,
}

/// What settlement needs: the price, the account, and the reservation admission made.
pub struct Billing {
    pub price: Option<ModelPrice>,
    pub account: Arc<AccountState>,
    pub policy: Arc<AccountPolicy>,
    pub reservation: Option<Reservation>,
    /// Output tokens the reservation covers; a stream past it must extend the reservation or
    /// be cut (None when nothing limits the account).
    pub reserved_output_tokens: Option<u64>,
    pub alerts: Option<AlertRoute>,
    pub metrics: Arc<Metrics>,
}

/// Where an account's alerts go.
pub struct AlertRoute {
    pub alerter: Arc<Alerter>,
    pub key_id: Arc<str>,
    pub targets: Vec<String>,
}

impl Billing {
    /// Prices the record's usage, settles the account, fills the record's cost fields and
    /// announces crossed thresholds. Returns the journal entry of an automatic top-up it
    /// triggered.
    pub fn settle(
        mut self,
        record: &mut UsageRecord,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<GrantEntry> {
        let rated_book = match (&self.price, record.outcome.is_billable()) {
            (Some(price), true) => price.rate(&record.usage, record.upstream_total_us),
            _ => 0,
        };
        let settlement = match self.reservation.take() {
            Some(r) => r.settle(rated_book, now),
            None => crate::balance::settle_account(
                &self.account,
                &self.policy,
                rated_book,
                0,
                0,
                0,
                now,
            ),
        };
        record.cost = Some(from_nanos(settlement.charge));
        record.rated_cost = Some(from_nanos(settlement.rated));
        record.unit = Some(self.policy.unit.clone());
        let label = self
            .price
            .as_ref()
            .map_or_else(unpriced_label, |p| p.label.clone());
        self.metrics.observe(record, &label, settlement.charge);
        if let Some(route) = &self.alerts {
            route.announce(&self.policy, &self.account, settlement.crossings);
        }
        settlement.topup.map(|grant| {
            tracing::info!(
                account = %self.policy.id,
                grant = %grant.id,
                amount = %from_nanos(grant.amount),
                "automatic top-up added"
            );
            GrantEntry::new(
                &self.policy.id,
                &self.policy.unit,
                &grant,
                GrantSource::AutoTopUp,
                now,
            )
        })
    }
}

impl AlertRoute {
    pub fn announce(
        &self,
        policy: &AccountPolicy,
        account: &AccountState,
        crossings: Vec<Crossing>,
    ) {
        if self.targets.is_empty() {
            return;
        }
        for c in crossings {
            let (kind, value, limit, threshold, message) = match c {
                Crossing::SpendThreshold {
                    fraction,
                    spend,
                    cap,
                } => (
                    AlertKind::SpendThreshold,
                    spend,
                    Some(cap),
                    Some(fraction),
                    format!(
                        "spend reached {}% of the period's hard cap",
                        fraction * rust_decimal::Decimal::from(100)
                    ),
                ),
                Crossing::AllowanceThreshold {
                    fraction,
                    used,
                    included,
                } => (
                    AlertKind::AllowanceThreshold,
                    used,
                    Some(included),
                    Some(fraction),
                    format!(
                        "usage reached {}% of the plan's included allowance",
                        fraction * rust_decimal::Decimal::from(100)
                    ),
                ),
                Crossing::SoftCap { spend, cap } => (
                    AlertKind::SoftCap,
                    spend,
                    Some(cap),
                    None,
                    "spend reached the soft cap".to_string(),
                ),
                Crossing::LowBalance { balance, threshold } => (
                    AlertKind::LowBalance,
                    balance,
                    Some(threshold),
                    None,
                    "the prepaid balance is low".to_string(),
                ),
                Crossing::AutoTopUp {
                    grant_id,
                    amount,
                    balance: _,
                } => (
                    AlertKind::AutoTopUp,
                    amount,
                    None,
                    None,
                    format!("automatic top-up `{grant_id}` added"),
                ),
            };
            let mut event = AlertEvent::new(
                kind,
                policy.id.to_string(),
                from_nanos(value).to_string(),
                policy.unit.to_string(),
                message,
            );
            event.key_id = Some(self.key_id.to_string());
            event.limit = limit.map(|l| from_nanos(l).to_string());
            event.threshold = threshold.map(|t| t.normalize().to_string());
            event.period_start = Some(account.view(policy).period_start);
            self.alerter.send(event, self.targets.clone());
        }
    }
}

/// Bytes of a body gathered frame by frame: a body that arrives in one frame (most do) stays
/// that frame; later frames are joined into one buffer, once.
#[derive(Default)]
pub(crate) struct Gathered {
    first: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Gathered {
    pub(crate) fn push(&mut self, data: Bytes) {
        match (&self.first, &mut self.joined) {
            (None, _) => self.first = Some(data),
            (Some(first), None) => {
                let mut all = BytesMut::with_capacity(first.len() + data.len());
                all.extend_from_slice(first);
                all.extend_from_slice(&data);
                self.joined = Some(all);
            }
            (Some(_), Some(all)) => all.extend_from_slice(&data),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match (&self.first, &self.joined) {
            (_, Some(all)) => all.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    /// The whole body (`None` if nothing was pushed).
    pub(crate) fn into_bytes(self) -> Option<Bytes> {
        self.joined.map(BytesMut::freeze).or(self.first)
    }
}

enum Mode {
    /// Forwarding not started or nothing to read (errors, other endpoints).
    Opaque,
    /// A non-streaming JSON body: kept whole to read `usage` at the end.
    Json { body: Gathered, overflow: bool },
    /// An event stream.
    Sse {
        parser: SseParser,
        /// Drop the usage-only chunk tollgate asked for on the client's behalf.
        hide_usage_chunk: bool,
        retained: Vec<Bytes>,
        retained_bytes: usize,
        unretained_bytes: u64,
    },
}

/// Per-request metering state; see the module docs.
pub struct Meter {
    start: Option<MeterStart>,
    mode: Mode,
    sent_at: Instant,
    ttfb_us: Option<u64>,
    status: u16,
    usage: StreamUsage,
    stream_error: bool,
    /// Output tokens delivered so far in a stream on a budget (tokenizer count of each
    /// event's text); for other streams, the number of data events.
    events_seen: u64,
    /// The account cannot afford more output: end the stream.
    cut: bool,
    /// Completes when the record is written to the journal; the end of the response waits
    /// for it.
    journaled: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// The metrics label of calls no price-book entry prices.
const UNPRICED_LABEL: &str = "unpriced";

/// The shared `unpriced` label (no allocation per request).
fn unpriced_label() -> Arc<str> {
    static LABEL: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    LABEL.get_or_init(|| Arc::from(UNPRICED_LABEL)).clone()
}

/// Most bytes coalesced into one client frame from chunks already waiting upstream.
const COALESCE_BYTES: usize = 16 * 1024;

/// Yields in a row without new data after which coalesced data is sent. Each yield lets the
/// runtime poll for I/O once; over HTTP/2, hyper's connection task also needs a scheduler pass
/// to hand over the next chunk it has read (with one yield, no two events were ever coalesced
/// there; with two, a burst of 50 goes out in a few writes).
const COALESCE_YIELDS: u8 = 2;

/// Output tokens added to a stream's reservation each time it runs past it.
const STREAM_EXTENSION_TOKENS: u64 = 256;

impl Meter {
    /// Starts timing; call right before the request is sent upstream.
    pub fn new(start: MeterStart) -> Meter {
        Meter {
            start: Some(start),
            mode: Mode::Opaque,
            sent_at: Instant::now(),
            ttfb_us: None,
            status: 0,
            usage: StreamUsage::default(),
            stream_error: false,
            events_seen: 0,
            cut: false,
            journaled: None,
        }
    }

    /// The pending journal acknowledgement of the finished record.
    pub fn take_journaled(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.journaled.take()
    }

    /// Whether chunks are coalesced: event streams, where upstreams write one event per
    /// chunk. Other bodies pass frame for frame.
    fn coalesces(&self) -> bool {
        matches!(self.mode, Mode::Sse { .. })
    }

    /// Whether the stream must end now because the account ran out (checked per chunk).
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Counts stream events against the reservation; extends it in steps, or cuts.
    fn check_stream_budget(&mut self, new_events: u64) {
        self.events_seen += new_events;
        let Some(start) = self.start.as_mut() else {
            return;
        };
        let billing = &mut start.billing;
        let (Some(covered), Some(price), Some(reservation)) = (
            billing.reserved_output_tokens.as_mut(),
            billing.price.as_ref(),
            billing.reservation.as_mut(),
        ) else {
            return;
        };
        while self.events_seen > *covered {
            // The per-call price was reserved at admission; extensions cover tokens only.
            let extra = billing
                .policy
                .reservation_for(price.worst_case(0, STREAM_EXTENSION_TOKENS) - price.per_call);
            match reservation.extend(extra, chrono::Utc::now()) {
                Ok(()) => *covered += STREAM_EXTENSION_TOKENS,
                Err(_) => {
                    self.cut = true;
                    return;
                }
            }
        }
    }

    /// Ends a stream the account cannot afford: the final error event to send.
    pub fn on_cut(&mut self) -> Option<Bytes> {
        let dialect = self.start.as_ref()?.dialect;
        let message =
            "the account's balance or spend cap cannot cover more output; the stream was cut";
        let event = match dialect {
            Dialect::OpenAi => openai::error_event(ErrorKind::Billing, message),
            Dialect::Anthropic => anthropic::error_event(ErrorKind::Billing, message),
        };
        self.finish(Outcome::CutOff);
        Some(event)
    }

    pub fn record_id(&self) -> Option<uuid::Uuid> {
        self.start.as_ref().map(|s| s.record_id)
    }

    /// The upstream's response headers arrived. Returns whether the body is metered as an
    /// event stream, whose length tollgate may change (so the caller drops `content-length`).
    pub fn on_response_head(&mut self, status: http::StatusCode, is_event_stream: bool) -> bool {
        self.ttfb_us = Some(elapsed_us(self.sent_at));
        self.status = status.as_u16();
        let Some(start) = &self.start else {
            return false;
        };
        if !status.is_success() || start.endpoint == Endpoint::Other {
            return false;
        }
        if is_event_stream {
            let hide = start.hide_usage_chunk;
            self.mode = Mode::Sse {
                parser: SseParser::new(hide),
                hide_usage_chunk: hide,
                retained: Vec::new(),
                retained_bytes: 0,
                unretained_bytes: 0,
            };
            true
        } else {
            self.mode = Mode::Json {
                body: Gathered::default(),
                overflow: false,
            };
            false
        }
    }

    /// Meters one body chunk and returns what to send to the client (the chunk itself, or
    /// the chunk without the hidden usage event; possibly empty).
    pub fn on_data(&mut self, data: Bytes) -> Bytes {
        let Some(start) = &self.start else {
            return data;
        };
        match &mut self.mode {
            Mode::Opaque => data,
            Mode::Json { body, overflow } => {
                if *overflow {
                    return data;
                }
                body.push(data.clone());
                if body.len() > start.max_metered_response_bytes {
                    *overflow = true;
                    *body = Gathered::default();
                }
                data
            }
            Mode::Sse {
                parser,
                hide_usage_chunk,
                retained,
                retained_bytes,
                unretained_bytes,
            } => {
                let usage = &mut self.usage;
                let stream_error = &mut self.stream_error;
                let mut events = 0;
                let (endpoint, dialect) = (start.endpoint, start.dialect);
                // Streams on a budget count the delivered text's tokens as they pass (only
                // accounts with limits pay for this); others only count events.
                let budgeted = start.billing.reserved_output_tokens.is_some();

                // The chunk's text is counted once, after all its events are read: one
                // tokenizer call per chunk instead of one per event.
                let mut text = String::new();
                let mut count = |block: &SseBlock<'_>| {
                    let Some(data) = block.data else { return 0 };
                    if !budgeted {
                        return 1;
                    }
                    match dialect {
                        Dialect::OpenAi => {
                            openai::delivered_text(endpoint, block.event, data, &mut text)
                        }
                        Dialect::Anthropic => {
                            anthropic::delivered_text(block.event, data, &mut text)
                        }
                    }
                    0
                };
                let out = if *hide_usage_chunk {
                    let mut kept = BytesMut::with_capacity(data.len());
                    parser.feed(&data, |block| {
                        events += count(&block);
                        let facts = observe(endpoint, dialect, &block, usage);
                        *stream_error |= facts.error;
                        if !facts.usage_only {
                            kept.extend_from_slice(block.raw);
                        }
                    });
                    kept.freeze()
                } else {
                    parser.feed(&data, |block| {
                        events += count(&block);
                        let facts = observe(endpoint, dialect, &block, usage);
                        *stream_error |= facts.error;
                    });
                    data.clone()
                };
                if budgeted && !text.is_empty() {
                    events = tokenizer::count_on_request_path(&text);
                }
                if *retained_bytes + data.len() <= MAX_RETAINED_STREAM_BYTES {
                    *retained_bytes += data.len();
                    retained.push(data);
                } else {
                    *unretained_bytes += data.len() as u64;
                }
                if events > 0 {
                    self.check_stream_budget(events);
                }
                out
            }
        }
    }

    /// The upstream body ended normally. Returns bytes still to send (a hidden-usage stream's
    /// unterminated tail, forwarded as received).
    pub fn on_end(&mut self) -> Option<Bytes> {
        let tail = match &mut self.mode {
            Mode::Sse {
                parser,
                hide_usage_chunk: true,
                ..
            } => {
                let raw = parser.take_unfinished_raw();
                (!raw.is_empty()).then(|| Bytes::from(raw))
            }
            _ => None,
        };
        let outcome = if self.stream_error {
            Outcome::StreamError
        } else if (200..300).contains(&self.status) {
            Outcome::Completed
        } else {
            Outcome::UpstreamError
        };
        self.finish(outcome);
        tail
    }

    /// The upstream body broke. Returns a final error event for event streams (so clients see
    /// a clean, dialect-shaped error instead of a truncated stream), or `None` to propagate
    /// the break.
    pub fn on_body_error(&mut self, error: &dyn std::fmt::Display) -> Option<Bytes> {
        let event = match (&self.mode, &self.start) {
            (Mode::Sse { .. }, Some(start)) => {
                let message = format!("upstream stream broke off: {error}");
                Some(match start.dialect {
                    Dialect::OpenAi => openai::error_event(ErrorKind::Upstream, &message),
                    Dialect::Anthropic => anthropic::error_event(ErrorKind::Upstream, &message),
                })
            }
            _ => None,
        };
        self.finish(Outcome::StreamError);
        event
    }

    /// The upstream never answered; tollgate answers `status` for it.
    pub fn on_no_response(&mut self, status: http::StatusCode, outcome: Outcome) {
        self.status = status.as_u16();
        self.finish(outcome);
    }

    /// Builds and submits the record. Runs once; later calls do nothing.
    fn finish(&mut self, outcome: Outcome) {
        let Some(start) = self.start.take() else {
            return;
        };
        let total_us = elapsed_us(self.sent_at);
        let mode = std::mem::replace(&mut self.mode, Mode::Opaque);
        let mut record = UsageRecord {
            id: start.record_id,
            timestamp: start.timestamp,
            key_id: start.key_id,
            account: start.account,
            model: start.model,
            upstream: start.upstream,
            endpoint: start.endpoint,
            streamed: start.streamed,
            status: self.status,
            outcome,
            usage: TokenUsage::default(),
            estimated: false,
            upstream_ttfb_us: self.ttfb_us,
            upstream_total_us: total_us,
            dimensions: start.dimensions,
            cost: None,
            rated_cost: None,
            unit: None,
            metric: None,
            quantity: None,
        };
        let ledger = start.ledger;
        let billing = start.billing;
        let (endpoint, dialect) = (start.endpoint, start.dialect);
        let fallback = match mode {
            Mode::Opaque => None,
            Mode::Json { body, overflow } => {
                let body = body.into_bytes();
                let exact = body.as_deref().and_then(|b| match dialect {
                    Dialect::OpenAi => openai::usage_from_body(b),
                    Dialect::Anthropic => anthropic::usage_from_body(b),
                });
                match exact {
                    Some(u) => {
                        record.usage = u;
                        None
                    }
                    None => Some(Fallback {
                        request_body: start.request_body,
                        output: OutputSource::Body(body.filter(|_| !overflow)),
                        known: StreamUsage::default(),
                    }),
                }
            }
            Mode::Sse {
                retained,
                unretained_bytes,
                ..
            } => {
                if self.usage.input_known && self.usage.output_known {
                    record.usage = self.usage.usage;
                    None
                } else {
                    Some(Fallback {
                        request_body: start.request_body,
                        output: OutputSource::Stream {
                            frames: retained,
                            unretained_bytes,
                        },
                        known: self.usage,
                    })
                }
            }
        };
        let (ack, journaled) = tokio::sync::oneshot::channel();
        if start.wait_for_journal {
            self.journaled = Some(journaled);
        }
        match fallback {
            None => {
                let topup = billing.settle(&mut record, chrono::Utc::now());
                if let Some(grant) = topup {
                    ledger.submit(grant);
                }
                ledger.submit_notify(record, ack);
            }
            Some(fallback) => {
                record.estimated = true;
                let run = move || {
                    record.usage = fallback.estimate(endpoint, dialect, record.model.as_deref());
                    let topup = billing.settle(&mut record, chrono::Utc::now());
                    if let Some(grant) = topup {
                        ledger.submit(grant);
                    }
                    ledger.submit_notify(record, ack);
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn_blocking(run);
                    }
                    Err(_) => run(),
                }
            }
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.start.is_some() {
            self.finish(Outcome::ClientDisconnected);
        }
    }
}

fn elapsed_us(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn observe(
    endpoint: Endpoint,
    dialect: Dialect,
    block: &SseBlock<'_>,
    usage: &mut StreamUsage,
) -> provider::EventFacts {
    let Some(data) = block.data else {
        return provider::EventFacts::default();
    };
    match dialect {
        Dialect::OpenAi => openai::observe_event(endpoint, block.event, data, usage),
        Dialect::Anthropic => anthropic::observe_event(block.event, data, usage),
    }
}

enum OutputSource {
    Body(Option<Bytes>),
    Stream {
        frames: Vec<Bytes>,
        unretained_bytes: u64,
    },
}

/// Inputs of the tokenizer fallback, moved to a blocking task.
struct Fallback {
    request_body: Bytes,
    output: OutputSource,
    /// What the provider did report (an Anthropic stream may give input but not output).
    known: StreamUsage,
}

impl Fallback {
    fn estimate(self, endpoint: Endpoint, dialect: Dialect, model: Option<&str>) -> TokenUsage {
        let model = model.unwrap_or("");
        let mut usage = self.known.usage;
        if !self.known.input_known {
            usage.input_tokens = estimate_prompt(endpoint, dialect, model, &self.request_body);
            usage.cached_input_tokens = 0;
            usage.cache_creation_input_tokens = 0;
        }
        if !self.known.output_known {
            let mut text = String::new();
            let mut extra = 0;
            match self.output {
                OutputSource::Body(Some(body)) => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        match dialect {
                            Dialect::OpenAi => openai::response_text(endpoint, &v, &mut text),
                            Dialect::Anthropic => anthropic::response_text(&v, &mut text),
                        }
                    }
                }
                OutputSource::Body(None) => {}
                OutputSource::Stream {
                    frames,
                    unretained_bytes,
                } => {
                    let mut parser = SseParser::new(false);
                    for frame in &frames {
                        parser.feed(frame, |block| {
                            if let Some(data) = block.data {
                                match dialect {
                                    Dialect::OpenAi => openai::delivered_text(
                                        endpoint,
                                        block.event,
                                        data,
                                        &mut text,
                                    ),
                                    Dialect::Anthropic => {
                                        anthropic::delivered_text(block.event, data, &mut text)
                                    }
                                }
                            }
                        });
                    }
                    extra = unretained_bytes / BYTES_PER_TOKEN_ESTIMATE;
                }
            }
            usage.output_tokens = tokenizer::count(model, &text) + extra;
            usage.reasoning_tokens = 0;
        }
        usage
    }
}

/// Prompt tokens of a request by the tokenizer: the text of its messages plus OpenAI's
/// per-message framing allowance (chat-shaped requests only).
pub fn estimate_prompt(endpoint: Endpoint, dialect: Dialect, model: &str, body: &[u8]) -> u64 {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    let mut text = String::new();
    let messages = match dialect {
        Dialect::OpenAi => openai::prompt_text(&request, &mut text),
        Dialect::Anthropic => anthropic::prompt_text(&request, &mut text),
    };
    let framing = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses if messages > 0 => {
            messages * tokenizer::TOKENS_PER_MESSAGE + tokenizer::TOKENS_PER_REPLY
        }
        _ => 0,
    };
    tokenizer::count(model, &text) + framing
}

/// Concatenates the last data chunk and a tail to send after it.
fn join(out: Bytes, tail: Option<Bytes>) -> Option<Bytes> {
    match (out.is_empty(), tail) {
        (true, tail) => tail,
        (false, None) => Some(out),
        (false, Some(tail)) => {
            let mut both = BytesMut::with_capacity(out.len() + tail.len());
            both.extend_from_slice(&out);
            both.extend_from_slice(&tail);
            Some(both.freeze())
        }
    }
}

/// The client-facing response body: the upstream body run through a [`Meter`].
pub struct MeteredBody<B: Body> {
    inner: B,
    meter: Meter,
    /// An upstream error to report after the data coalesced before it.
    stashed_error: Option<B::Error>,
    /// Trailers that arrived behind coalesced data.
    stashed_trailers: Option<http::HeaderMap>,
    /// The record's journal write, awaited before the response's last bytes go out.
    journaled: Option<tokio::sync::oneshot::Receiver<()>>,
    /// A last frame to send before ending (error event, unterminated tail).
    trailer: Option<Bytes>,
    /// Data held across a yield (see [`MeteredBody::poll_frame`]).
    coalescing: Option<BytesMut>,
    /// Yields in a row since data last arrived.
    idle_yields: u8,
    ended: bool,
    /// The upstream's `read_timeout`: a body with no new frame for this long (checked every
    /// this long, so after one to two of these) ends with [`UpstreamError::Stalled`].
    read_timeout: std::time::Duration,
    /// Armed the first time the body waits for the upstream, and then re-armed only when it
    /// fires (a timer reset per frame would cost more than the rest of a stream's timing).
    stall_check: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Frames taken from the upstream: so far, and when the check was last armed.
    frames: u64,
    frames_at_check: u64,
}

impl<B: Body> MeteredBody<B> {
    pub fn new(inner: B, meter: Meter, read_timeout: std::time::Duration) -> Self {
        Self {
            inner,
            meter,
            stashed_error: None,
            stashed_trailers: None,
            journaled: None,
            trailer: None,
            coalescing: None,
            idle_yields: 0,
            ended: false,
            read_timeout,
            stall_check: None,
            frames: 0,
            frames_at_check: 0,
        }
    }

    /// Whether the upstream sent no frame for a whole `read_timeout` (arming the check on the
    /// first wait, re-arming it when it fires after progress).
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let timeout = self.read_timeout;
        let check = match &mut self.stall_check {
            Some(check) => check,
            None => {
                self.frames_at_check = self.frames;
                self.stall_check
                    .insert(Box::pin(tokio::time::sleep(timeout)))
            }
        };
        while check.as_mut().poll(cx).is_ready() {
            if self.frames == self.frames_at_check {
                return true;
            }
            self.frames_at_check = self.frames;
            check.as_mut().reset(tokio::time::Instant::now() + timeout);
        }
        false
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display + Unpin + From<UpstreamError>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(e) = this.stashed_error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(t) = this.stashed_trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        // Chunks already waiting upstream are coalesced into one frame: one write to the
        // client instead of one per event. When the upstream body has nothing more ready, the
        // body yields (returns Pending, to be woken once the runtime has next polled for I/O,
        // which is when events that arrived meanwhile become readable; over HTTP/2 it also
        // lets hyper's connection task decode what it has already read), and sends what it
        // holds once COALESCE_YIELDS yields in a row brought nothing new. Nothing waits for
        // the network: a yield costs a pass of the scheduler, a write per event costs a
        // syscall and a wake-up of the reader.
        let mut acc: Option<BytesMut> = this.coalescing.take();
        let mut got_data = false;
        loop {
            if this.ended {
                if let Some(acc) = acc.take() {
                    this.trailer = join(acc.freeze(), this.trailer.take());
                }
                // The response ends only once its usage record is in the journal: a client
                // that saw the whole response can rely on it being metered.
                if let Some(journaled) = this.journaled.as_mut() {
                    let _ = ready!(Pin::new(journaled).poll(cx));
                    this.journaled = None;
                }
                return Poll::Ready(this.trailer.take().map(|b| Ok(Frame::data(b))));
            }
            let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if got_data {
                        this.idle_yields = 0;
                    }
                    match acc {
                        Some(acc) if this.idle_yields < COALESCE_YIELDS => {
                            this.idle_yields += 1;
                            this.coalescing = Some(acc);
                            // tokio's yield defers the wake-up until after the I/O poll (a
                            // plain self-wake would run again before it, to find nothing new).
                            let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                            return Poll::Pending;
                        }
                        Some(acc) => return Poll::Ready(Some(Ok(Frame::data(acc.freeze())))),
                        None if this.stalled(cx) => Some(Err(B::Error::from(
                            UpstreamError::Stalled(this.read_timeout),
                        ))),
                        None => return Poll::Pending,
                    }
                }
                Poll::Ready(polled) => {
                    this.frames += 1;
                    polled
                }
            };
            match polled {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        got_data = true;
                        let out = this.meter.on_data(data);
                        // A body of known length is done once its last byte arrives; the
                        // server may not poll again, so settle now rather than on drop.
                        let tail = if this.meter.is_cut() {
                            Some(this.meter.on_cut())
                        } else if this.inner.is_end_stream() {
                            Some(this.meter.on_end())
                        } else {
                            None
                        };
                        if let Some(tail) = tail {
                            // Hold the last bytes until the record is journaled.
                            this.ended = true;
                            this.journaled = this.meter.take_journaled();
                            let out = match acc.take() {
                                Some(mut a) => {
                                    a.extend_from_slice(&out);
                                    a.freeze()
                                }
                                None => out,
                            };
                            this.trailer = join(out, tail);
                            continue;
                        }
                        if out.is_empty() {
                            continue;
                        }
                        match acc.as_mut() {
                            None if !this.meter.coalesces() => {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                            None => {
                                let mut a =
                                    BytesMut::with_capacity(out.len().max(COALESCE_BYTES / 4));
                                a.extend_from_slice(&out);
                                acc = Some(a);
                            }
                            Some(a) => a.extend_from_slice(&out),
                        }
                        if acc.as_ref().is_some_and(|a| a.len() >= COALESCE_BYTES) {
                            return Poll::Ready(acc.take().map(|a| Ok(Frame::data(a.freeze()))));
                        }
                    }
                    Err(frame) => {
                        if let Some(a) = acc.take() {
                            // Rare (trailers): send the data first, the frame is dropped
                            // only if it is not data or trailers.
                            if let Ok(t) = frame.into_trailers() {
                                this.stashed_trailers = Some(t);
                            }
                            return Poll::Ready(Some(Ok(Frame::data(a.freeze()))));
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                Some(Err(e)) => {
                    this.ended = true;
                    let event = this.meter.on_body_error(&e);
                    this.journaled = this.meter.take_journaled();
                    match event {
                        Some(event) => this.trailer = Some(event),
                        None => {
                            this.stashed_error = Some(e);
                            if let Some(a) = acc.take() {
                                return Poll::Ready(Some(Ok(Frame::data(a.freeze()))));
                            }
                            // Reported on the next poll: the server flushes what it holds
                            // (the head, the data before the break) while the body is
                            // pending, and drops it when the body fails. An upstream read
                            // inline can fail in the very poll after its last data.
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    }
                }
                None => {
                    this.ended = true;
                    this.trailer = this.meter.on_end();
                    this.journaled = this.meter.take_journaled();
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not while an error or trailers wait to be reported: the server would end the
        // response cleanly after the data before them.
        self.ended
            && self.trailer.is_none()
            && self.journaled.is_none()
            && self.stashed_error.is_none()
            && self.stashed_trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.meter.mode {
            Mode::Sse { .. } => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_keeps_one_frame_and_joins_several() {
        assert_eq!(Gathered::default().into_bytes(), None);
        let one = Bytes::from_static(b"{\"a\":1}");
        let mut g = Gathered::default();
        g.push(one.clone());
        assert_eq!(g.len(), 7);
        let kept = g.into_bytes().unwrap();
        assert_eq!(kept.as_ptr(), one.as_ptr(), "one frame is kept, not copied");
        let mut g = Gathered::default();
        let mut lens = Vec::new();
        for part in ["{\"a\"", ":1", "}"] {
            g.push(Bytes::from(part));
            lens.push(g.len());
        }
        assert_eq!(lens, [4, 6, 7]);
        assert_eq!(g.into_bytes().unwrap(), one);
    }
}
