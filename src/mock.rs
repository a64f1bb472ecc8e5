//! Deterministic mock LLM upstream: a small hyper 1.x server that speaks the
//! OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/responses`, `GET /v1/models`) and Anthropic (`/v1/messages`) HTTP APIs
//! closely enough for the official SDKs to parse every reply, streaming or not.
//!
//! It is what the gateway talks to in integration tests (start it in-process with
//! [`MockServer::start`] on port 0) and in load benchmarks (the `tollgate-mock`
//! binary). The per-request path does no logging and no I/O besides the socket, so
//! it is not the bottleneck when a gateway is driven at tens of thousands of req/s.
//!
//! # Auth
//! OpenAI endpoints need `authorization: Bearer <openai_key>`, `/v1/messages`
//! needs `x-api-key: <anthropic_key>` (or `authorization: Bearer <anthropic_key>`,
//! which recent anthropic SDKs send instead). `GET /v1/models` answers in
//! Anthropic's shape when the request carries `x-api-key` or `anthropic-version`.
//! Failures are 401 in the provider's error
//! shape; a body that is not a JSON object is 400; an unknown route is 404 (OpenAI
//! shape).
//!
//! # Deterministic usage
//! * Input tokens `P` = [`prompt_tokens_for`]: the number of whitespace-separated
//!   words in all request text: `messages[].content` (a string, or the `text` of
//!   each array part), top-level `system` (a string or an array of text blocks),
//!   `prompt` (a string or an array of strings) and `input` (a string, an array of
//!   strings, or an array of message objects whose `content` is a string or an
//!   array of parts with `text`). Never less than 1.
//! * Output tokens `N` = the first present of `max_tokens`,
//!   `max_completion_tokens`, `max_output_tokens` (capped at 1,000,000), else 16.
//!   A model name containing `large` uses `N = 4000` regardless. The output text is
//!   the word `tok` repeated `N` times, joined by single spaces; reported
//!   completion/output tokens are `N`.
//! * Finish reason: `length` (Anthropic `max_tokens`) when `N` came from a limit
//!   given in the request (and the model is not `large`), otherwise `stop`
//!   (Anthropic `end_turn`).
//! * Model containing `cached`: cached input tokens `C = P / 2` (OpenAI
//!   `prompt_tokens_details.cached_tokens`, Responses
//!   `input_tokens_details.cached_tokens`; Anthropic `cache_read_input_tokens = C`,
//!   `cache_creation_input_tokens = 0` and `input_tokens = P - C`). Otherwise 0.
//! * Model containing `reasoning`: reasoning tokens `N / 2`, included in `N`.
//! * Totals: `total_tokens = P + N`. Embeddings report `prompt_tokens = total_tokens = P`.
//!
//! # Behaviours selected by model-name substrings (combinable)
//! * `no-usage`: never send usage (no `usage` key, no usage chunk, no usage in
//!   Anthropic's `message_start`/`message_delta` or in `response.completed`).
//! * `slow-<ms>` waits that many milliseconds before the response headers; plain
//!   `slow` waits 2000 ms.
//! * `error-mid`: streaming only; after the prelude events and the first `N / 2`
//!   word events the body fails, so the connection is aborted without a proper
//!   chunked terminator.
//! * `fail-5xx`: 500 with a provider-shaped `server_error`/`api_error` body.
//! * `large`: `N = 4000`.
//!
//! Streaming replies send every SSE event as its own body frame (and its own write
//! to the socket), so a gateway sees realistic chunking.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// How many requests [`MockServer::received`] keeps.
const RECORD_LIMIT: usize = 1000;
/// Output tokens when the request gives no limit.
const DEFAULT_OUTPUT_TOKENS: u64 = 16;
/// Output tokens for a model whose name contains `large`.
const LARGE_OUTPUT_TOKENS: u64 = 4000;
/// Upper bound on a requested output length, to keep memory bounded.
const MAX_OUTPUT_TOKENS: u64 = 1_000_000;
/// Delay for a model containing `slow` without a `slow-<ms>` suffix.
const DEFAULT_SLOW: Duration = Duration::from_millis(2000);
/// The one word the mock ever generates.
const WORD: &str = "tok";
const FAILURE_MESSAGE: &str = "mock upstream failure";

/// Settings of a [`MockServer`].
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Accepted `authorization: Bearer` key on the OpenAI endpoints.
    pub openai_key: String,
    /// Accepted `x-api-key` on `/v1/messages`.
    pub anthropic_key: String,
    /// Serve HTTPS with this certificate when set.
    pub tls: Option<MockTls>,
    /// Keep the last 1000 requests for [`MockServer::received`].
    pub record_requests: bool,
}

/// PEM certificate chain and private key for serving HTTPS.
#[derive(Clone, Debug)]
pub struct MockTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Offer HTTP/2 by ALPN besides HTTP/1.1.
    pub offer_h2: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            openai_key: "sk-mock-openai".to_string(),
            anthropic_key: "sk-mock-anthropic".to_string(),
            tls: None,
            record_requests: true,
        }
    }
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names are lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// HTTP/1.1 or HTTP/2.
    pub version: http::Version,
}

struct Shared {
    openai_bearer: Vec<u8>,
    anthropic_key: Vec<u8>,
    anthropic_bearer: Vec<u8>,
    record: bool,
    count: AtomicU64,
    connections: AtomicU64,
    log: Mutex<VecDeque<ReceivedRequest>>,
}

impl Shared {
    fn push(&self, request: ReceivedRequest) {
        let mut log = crate::lock(&self.log);
        if log.len() >= RECORD_LIMIT {
            log.pop_front();
        }
        log.push_back(request);
    }
}

/// A running mock upstream. Dropping it stops it too.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl MockServer {
    /// Binds `addr` (port 0 allowed) and spawns the accept loop on the current
    /// tokio runtime.
    pub async fn start(addr: SocketAddr, config: MockConfig) -> io::Result<MockServer> {
        let tls = match &config.tls {
            Some(tls) => Some(tls_acceptor(tls)?),
            None => None,
        };
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            openai_bearer: format!("Bearer {}", config.openai_key).into_bytes(),
            anthropic_bearer: format!("Bearer {}", config.anthropic_key).into_bytes(),
            anthropic_key: config.anthropic_key.into_bytes(),
            record: config.record_requests,
            count: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), tls, stopped));
        Ok(MockServer {
            addr,
            shared,
            stop: Some(stop),
            task,
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every HTTP request received so far, any path, authorised or not.
    pub fn request_count(&self) -> u64 {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// TCP connections accepted so far.
    pub fn connection_count(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// The last 1000 requests, oldest first (empty unless `record_requests`).
    pub fn received(&self) -> Vec<ReceivedRequest> {
        let log = crate::lock(&self.shared.log);
        log.iter().cloned().collect()
    }

    /// Stops accepting and aborts every open connection.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tls_acceptor(tls: &MockTls) -> io::Result<TlsAcceptor> {
    let certs =
        rustls_pemfile::certs(&mut tls.cert_pem.as_slice()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no certificate in the TLS cert PEM",
        ));
    }
    let key = rustls_pemfile::private_key(&mut tls.key_pem.as_slice())?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "no private key in the TLS key PEM",
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    config.alpn_protocols = if tls.offer_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    mut stopped: oneshot::Receiver<()>,
) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let builder = builder.clone();
                    match &tls {
                        None => {
                            conns.spawn(serve(builder, stream, shared));
                        }
                        Some(acceptor) => {
                            let acceptor = acceptor.clone();
                            conns.spawn(async move {
                                if let Ok(stream) = acceptor.accept(stream).await {
                                    serve(builder, stream, shared).await;
                                }
                            });
                        }
                    }
                }
                // Out of file descriptors or similar: back off briefly.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve<I>(builder: Arc<auto::Builder<TokioExecutor>>, io: I, shared: Arc<Shared>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let _ = builder.serve_connection(TokioIo::new(io), service).await;
}

/// Response body: a whole buffer, or SSE events sent one frame (and one socket
/// write) each, optionally ending in an error (`error-mid`).
enum MockBody {
    Full(Option<Bytes>),
    Events {
        events: std::vec::IntoIter<Bytes>,
        fail: bool,
        yield_next: bool,
    },
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            MockBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            MockBody::Events {
                events,
                fail,
                yield_next,
            } => {
                if *yield_next {
                    // Return Pending once between events so hyper flushes each
                    // event on its own instead of coalescing the whole stream.
                    *yield_next = false;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                match events.next() {
                    Some(event) => {
                        *yield_next = true;
                        Poll::Ready(Some(Ok(Frame::data(event))))
                    }
                    None if *fail => {
                        *fail = false;
                        Poll::Ready(Some(Err(io::Error::other("mock error-mid"))))
                    }
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Events { .. } => SizeHint::default(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Provider {
    OpenAi,
    Anthropic,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Messages,
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<MockBody> {
    let seq = shared.count.fetch_add(1, Ordering::Relaxed) + 1;
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "could not read the request body",
                "invalid_request_error",
                None,
            );
        }
    };
    if shared.record {
        shared.push(ReceivedRequest {
            version: parts.version,
            method: parts.method.as_str().to_string(),
            path: parts
                .uri
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| parts.uri.path().to_string()),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_string(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        });
    }

    let endpoint = match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/chat/completions") => Endpoint::Chat,
        (&Method::POST, "/v1/completions") => Endpoint::Completions,
        (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
        (&Method::POST, "/v1/responses") => Endpoint::Responses,
        (&Method::POST, "/v1/messages") => Endpoint::Messages,
        (&Method::GET, "/v1/models") => return models(&shared, &parts.headers),
        (method, path) => {
            let message =
                format!("Unknown request URL: {method} {path}. Please check the URL for typos.");
            return openai_error(
                StatusCode::NOT_FOUND,
                &message,
                "invalid_request_error",
                Some("unknown_url"),
            );
        }
    };
    let provider = if endpoint == Endpoint::Messages {
        Provider::Anthropic
    } else {
        Provider::OpenAi
    };
    if !authorised(&shared, provider, &parts.headers) {
        return auth_error(provider);
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(value @ Value::Object(_)) => value,
        _ => return bad_request(provider),
    };
    let plan = Plan::new(&request, seq);
    if let Some(delay) = plan.slow {
        tokio::time::sleep(delay).await;
    }
    if plan.fail {
        return upstream_failure(provider);
    }
    match endpoint {
        Endpoint::Chat => chat(&plan),
        Endpoint::Completions => completions(&plan),
        Endpoint::Embeddings => embeddings(&plan, &request),
        Endpoint::Responses => responses(&plan),
        Endpoint::Messages => messages(&plan),
    }
}

fn authorised(shared: &Shared, provider: Provider, headers: &HeaderMap) -> bool {
    match provider {
        Provider::OpenAi => headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == shared.openai_bearer.as_slice()),
        Provider::Anthropic => {
            headers
                .get("x-api-key")
                .is_some_and(|v| v.as_bytes() == shared.anthropic_key.as_slice())
                // Recent anthropic SDKs send the API key as a bearer token.
                || headers
                    .get(header::AUTHORIZATION)
                    .is_some_and(|v| v.as_bytes() == shared.anthropic_bearer.as_slice())
        }
    }
}

// ---------------------------------------------------------------------------
// Plan: everything the reply depends on, derived from the request body.

struct Plan {
    model: String,
    prompt: u64,
    output: u64,
    hit_limit: bool,
    cached: u64,
    reasoning: u64,
    usage: bool,
    error_mid: bool,
    fail: bool,
    slow: Option<Duration>,
    stream: bool,
    include_usage: bool,
    created: u64,
    seq: u64,
}

impl Plan {
    fn new(request: &Value, seq: u64) -> Plan {
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock-model")
            .to_string();
        let prompt = prompt_tokens_for(request);
        let limit = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|key| request.get(*key).and_then(Value::as_u64));
        let large = model.contains("large");
        let (output, hit_limit) = match (large, limit) {
            (true, _) => (LARGE_OUTPUT_TOKENS, false),
            (false, Some(limit)) => (limit.min(MAX_OUTPUT_TOKENS), true),
            (false, None) => (DEFAULT_OUTPUT_TOKENS, false),
        };
        let cached = if model.contains("cached") {
            prompt / 2
        } else {
            0
        };
        let reasoning = if model.contains("reasoning") {
            output / 2
        } else {
            0
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Plan {
            prompt,
            output,
            hit_limit,
            cached,
            reasoning,
            usage: !model.contains("no-usage"),
            error_mid: model.contains("error-mid"),
            fail: model.contains("fail-5xx"),
            slow: slow_delay(&model),
            stream: request.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true),
            created,
            seq,
            model,
        }
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}mock{:016x}", self.seq)
    }

    /// The full output text: `tok` repeated `output` times.
    fn text(&self) -> String {
        let n = usize::try_from(self.output).unwrap_or(0);
        let mut text = String::with_capacity(n * (WORD.len() + 1));
        for i in 0..n {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(WORD);
        }
        text
    }

    /// Number of word events to send: all of them, or half with `error-mid`.
    fn streamed_words(&self) -> u64 {
        if self.error_mid {
            self.output / 2
        } else {
            self.output
        }
    }

    fn openai_finish(&self) -> &'static str {
        if self.hit_limit { "length" } else { "stop" }
    }

    fn anthropic_stop(&self) -> &'static str {
        if self.hit_limit {
            "max_tokens"
        } else {
            "end_turn"
        }
    }
}

fn slow_delay(model: &str) -> Option<Duration> {
    let at = model.find("slow")?;
    let rest = &model[at + "slow".len()..];
    let digits: &str = rest
        .strip_prefix('-')
        .map(|r| {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            &r[..end]
        })
        .unwrap_or("");
    match digits.parse::<u64>() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => Some(DEFAULT_SLOW),
    }
}

/// Deterministic input-token count of a request body: the number of
/// whitespace-separated words in `messages[].content`, `system`, `prompt` and
/// `input` (see the module docs for the accepted shapes), at least 1.
pub fn prompt_tokens_for(body: &Value) -> u64 {
    fn words(s: &str) -> u64 {
        s.split_whitespace().count() as u64
    }
    /// A string, or an array of parts/blocks whose `text` is counted.
    fn content(value: &Value) -> u64 {
        match value {
            Value::String(s) => words(s),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(words)
                .sum(),
            _ => 0,
        }
    }
    let mut total = 0u64;
    if let Some(Value::Array(messages)) = body.get("messages") {
        total += messages
            .iter()
            .filter_map(|m| m.get("content"))
            .map(content)
            .sum::<u64>();
    }
    if let Some(system) = body.get("system") {
        total += content(system);
    }
    match body.get("prompt") {
        Some(Value::String(s)) => total += words(s),
        Some(Value::Array(items)) => {
            total += items
                .iter()
                .filter_map(Value::as_str)
                .map(words)
                .sum::<u64>();
        }
        _ => {}
    }
    match body.get("input") {
        Some(Value::String(s)) => total += words(s),
        Some(Value::Array(items)) => {
            for item in items {
                total += match item {
                    Value::String(s) => words(s),
                    Value::Object(_) => item.get("content").map(content).unwrap_or(0),
                    _ => 0,
                };
            }
        }
        _ => {}
    }
    total.max(1)
}

// ---------------------------------------------------------------------------
// Response helpers.

fn json_response(status: StatusCode, value: &Value) -> Response<MockBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(MockBody::Full(Some(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn sse_response(events: Vec<Bytes>, fail: bool) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Events {
        events: events.into_iter(),
        fail,
        yield_next: false,
    });
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn data_event(value: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    if serde_json::to_writer(&mut out, value).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn named_event(name: &str, value: &Value) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    if serde_json::to_writer(&mut out, value).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn insert(target: &mut Value, key: &str, value: Value) {
    if let Value::Object(map) = target {
        map.insert(key.to_string(), value);
    }
}

fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
) -> Response<MockBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response<MockBody> {
    json_response(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

fn auth_error(provider: Provider) -> Response<MockBody> {
    match provider {
        Provider::OpenAi => openai_error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        Provider::Anthropic => anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        ),
    }
}

fn bad_request(provider: Provider) -> Response<MockBody> {
    let message = "We could not parse the JSON body of your request.";
    match provider {
        Provider::OpenAi => openai_error(
            StatusCode::BAD_REQUEST,
            message,
            "invalid_request_error",
            None,
        ),
        Provider::Anthropic => {
            anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }
}

fn upstream_failure(provider: Provider) -> Response<MockBody> {
    match provider {
        Provider::OpenAi => openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            FAILURE_MESSAGE,
            "server_error",
            None,
        ),
        Provider::Anthropic => anthropic_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            FAILURE_MESSAGE,
        ),
    }
}

fn models(shared: &Shared, headers: &HeaderMap) -> Response<MockBody> {
    if headers.contains_key("x-api-key") || headers.contains_key("anthropic-version") {
        if !authorised(shared, Provider::Anthropic, headers) {
            return auth_error(Provider::Anthropic);
        }
        return json_response(
            StatusCode::OK,
            &json!({
                "data": [
                    {"type": "model", "id": "claude-sonnet-4-20250514", "display_name": "Claude Sonnet 4", "created_at": "2025-05-22T00:00:00Z"},
                    {"type": "model", "id": "claude-3-5-haiku-20241022", "display_name": "Claude Haiku 3.5", "created_at": "2024-10-22T00:00:00Z"}
                ],
                "has_more": false,
                "first_id": "claude-sonnet-4-20250514",
                "last_id": "claude-3-5-haiku-20241022"
            }),
        );
    }
    if !authorised(shared, Provider::OpenAi, headers) {
        return auth_error(Provider::OpenAi);
    }
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [
                {"id": "gpt-4o-mini", "object": "model", "created": 1_721_172_741u64, "owned_by": "system"},
                {"id": "gpt-4o", "object": "model", "created": 1_715_367_049u64, "owned_by": "system"},
                {"id": "text-embedding-3-small", "object": "model", "created": 1_705_948_997u64, "owned_by": "system"}
            ]
        }),
    )
}

// ---------------------------------------------------------------------------
// OpenAI chat completions.

fn chat_usage(plan: &Plan) -> Value {
    json!({
        "prompt_tokens": plan.prompt,
        "completion_tokens": plan.output,
        "total_tokens": plan.prompt + plan.output,
        "prompt_tokens_details": {"cached_tokens": plan.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

fn chat(plan: &Plan) -> Response<MockBody> {
    let id = plan.id("chatcmpl-");
    if !plan.stream {
        let mut body = json!({
            "id": id,
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": plan.text(), "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": plan.openai_finish()
            }],
            "service_tier": "default",
            "system_fingerprint": "fp_mock"
        });
        if plan.usage {
            insert(&mut body, "usage", chat_usage(plan));
        }
        return json_response(StatusCode::OK, &body);
    }

    let chunk = |choices: Value| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model,
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
            "choices": choices
        });
        if plan.include_usage {
            insert(&mut chunk, "usage", Value::Null);
        }
        data_event(&chunk)
    };
    let delta = |delta: Value, finish: Value| {
        chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]))
    };
    let words = plan.streamed_words();
    let mut events = Vec::with_capacity(words as usize + 4);
    events.push(delta(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    ));
    push_words(&mut events, words, |w| {
        delta(json!({ "content": w }), Value::Null)
    });
    if !plan.error_mid {
        events.push(delta(json!({}), json!(plan.openai_finish())));
        if plan.include_usage && plan.usage {
            events.push(data_event(&json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": plan.created,
                "model": plan.model,
                "service_tier": "default",
                "system_fingerprint": "fp_mock",
                "choices": [],
                "usage": chat_usage(plan)
            })));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    sse_response(events, plan.error_mid)
}

/// Pushes `count` word events: the first is `tok`, the rest ` tok`. Each distinct
/// event is rendered once and then shared.
fn push_words(events: &mut Vec<Bytes>, count: u64, render: impl Fn(&str) -> Bytes) {
    if count == 0 {
        return;
    }
    events.push(render(WORD));
    let rest = render(&format!(" {WORD}"));
    for _ in 1..count {
        events.push(rest.clone());
    }
}

// ---------------------------------------------------------------------------
// OpenAI legacy completions.

fn completion_usage(plan: &Plan) -> Value {
    json!({
        "prompt_tokens": plan.prompt,
        "completion_tokens": plan.output,
        "total_tokens": plan.prompt + plan.output
    })
}

fn completions(plan: &Plan) -> Response<MockBody> {
    let id = plan.id("cmpl-");
    if !plan.stream {
        let mut body = json!({
            "id": id,
            "object": "text_completion",
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": "fp_mock",
            "choices": [{
                "text": plan.text(),
                "index": 0,
                "logprobs": null,
                "finish_reason": plan.openai_finish()
            }]
        });
        if plan.usage {
            insert(&mut body, "usage", completion_usage(plan));
        }
        return json_response(StatusCode::OK, &body);
    }

    let chunk = |text: &str, finish: Value| {
        let mut chunk = json!({
            "id": id,
            "object": "text_completion",
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": "fp_mock",
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]
        });
        if plan.include_usage {
            insert(&mut chunk, "usage", Value::Null);
        }
        data_event(&chunk)
    };
    let words = plan.streamed_words();
    let mut events = Vec::with_capacity(words as usize + 3);
    push_words(&mut events, words, |w| chunk(w, Value::Null));
    if !plan.error_mid {
        events.push(chunk("", json!(plan.openai_finish())));
        if plan.include_usage && plan.usage {
            events.push(data_event(&json!({
                "id": id,
                "object": "text_completion",
                "created": plan.created,
                "model": plan.model,
                "system_fingerprint": "fp_mock",
                "choices": [],
                "usage": completion_usage(plan)
            })));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    sse_response(events, plan.error_mid)
}

// ---------------------------------------------------------------------------
// OpenAI embeddings.

const EMBEDDING_DIMS: usize = 8;

fn embedding_vector(index: usize) -> [f32; EMBEDDING_DIMS] {
    let mut v = [0f32; EMBEDDING_DIMS];
    for (k, x) in v.iter_mut().enumerate() {
        *x = ((index % 1000) as f32 + 1.0) * 0.001 + k as f32 * 0.125;
    }
    v
}

fn embeddings(plan: &Plan, request: &Value) -> Response<MockBody> {
    let count = match request.get("input") {
        Some(Value::Array(items)) => items.len(),
        Some(_) => 1,
        None => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "you must provide an input",
                "invalid_request_error",
                None,
            );
        }
    };
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = (0..count)
        .map(|i| {
            let vector = embedding_vector(i);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let mut body = json!({"object": "list", "data": data, "model": plan.model});
    if plan.usage {
        insert(
            &mut body,
            "usage",
            json!({"prompt_tokens": plan.prompt, "total_tokens": plan.prompt}),
        );
    }
    json_response(StatusCode::OK, &body)
}

fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// OpenAI Responses API.

fn responses_usage(plan: &Plan) -> Value {
    json!({
        "input_tokens": plan.prompt,
        "input_tokens_details": {"cached_tokens": plan.cached, "cache_write_tokens": 0},
        "output_tokens": plan.output,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning},
        "total_tokens": plan.prompt + plan.output
    })
}

fn output_text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn output_message(msg_id: &str, status: &str, content: Value) -> Value {
    json!({"type": "message", "id": msg_id, "status": status, "role": "assistant", "content": content})
}

/// A `response` object; `usage` is `None` for the in-progress snapshots.
fn response_object(plan: &Plan, status: &str, output: Value, usage: Option<Value>) -> Value {
    let limit = if plan.hit_limit {
        json!(plan.output)
    } else {
        Value::Null
    };
    let completed_at = if status == "completed" {
        json!(plan.created)
    } else {
        Value::Null
    };
    let mut response = json!({
        "id": plan.id("resp_"),
        "object": "response",
        "created_at": plan.created,
        "completed_at": completed_at,
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": null,
        "max_output_tokens": limit,
        "max_tool_calls": null,
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "service_tier": "default",
        "store": true,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "user": null,
        "metadata": {}
    });
    match usage {
        Some(usage) => insert(&mut response, "usage", usage),
        None if status != "completed" => insert(&mut response, "usage", Value::Null),
        None => {}
    }
    response
}

/// Serialises a Responses stream event, appending `sequence_number` last.
fn responses_event(kind: &str, mut fields: Map<String, Value>, seq: &mut u64) -> Bytes {
    fields.insert("type".to_string(), Value::String(kind.to_string()));
    fields.insert("sequence_number".to_string(), json!(*seq));
    *seq += 1;
    named_event(kind, &Value::Object(fields))
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn responses(plan: &Plan) -> Response<MockBody> {
    let msg_id = plan.id("msg_");
    let usage = plan.usage.then(|| responses_usage(plan));
    if !plan.stream {
        let text = plan.text();
        let output = json!([output_message(
            &msg_id,
            "completed",
            json!([output_text_part(&text)])
        )]);
        return json_response(
            StatusCode::OK,
            &response_object(plan, "completed", output, usage),
        );
    }

    let mut seq = 0u64;
    let words = plan.streamed_words();
    let mut events = Vec::with_capacity(words as usize + 9);
    let in_progress = response_object(plan, "in_progress", json!([]), None);
    events.push(responses_event(
        "response.created",
        object(json!({ "response": in_progress })),
        &mut seq,
    ));
    events.push(responses_event(
        "response.in_progress",
        object(json!({ "response": in_progress })),
        &mut seq,
    ));
    events.push(responses_event(
        "response.output_item.added",
        object(json!({
            "output_index": 0,
            "item": output_message(&msg_id, "in_progress", json!([]))
        })),
        &mut seq,
    ));
    events.push(responses_event(
        "response.content_part.added",
        object(json!({
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "part": output_text_part("")
        })),
        &mut seq,
    ));
    // Word deltas differ only in `delta` and `sequence_number`: render the
    // prefix once and append the sequence number per event.
    let delta_prefix = |w: &str| {
        let fields = json!({
            "type": "response.output_text.delta",
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "delta": w,
            "logprobs": []
        });
        let mut text = serde_json::to_string(&fields).unwrap_or_default();
        text.pop(); // the closing brace
        text
    };
    if words > 0 {
        let first = delta_prefix(WORD);
        let rest = delta_prefix(&format!(" {WORD}"));
        for i in 0..words {
            let prefix = if i == 0 { &first } else { &rest };
            events.push(Bytes::from(format!(
                "event: response.output_text.delta\ndata: {prefix},\"sequence_number\":{seq}}}\n\n"
            )));
            seq += 1;
        }
    }
    if !plan.error_mid {
        let text = plan.text();
        events.push(responses_event(
            "response.output_text.done",
            object(json!({
                "item_id": msg_id,
                "output_index": 0,
                "content_index": 0,
                "text": text,
                "logprobs": []
            })),
            &mut seq,
        ));
        events.push(responses_event(
            "response.content_part.done",
            object(json!({
                "item_id": msg_id,
                "output_index": 0,
                "content_index": 0,
                "part": output_text_part(&text)
            })),
            &mut seq,
        ));
        let item = output_message(&msg_id, "completed", json!([output_text_part(&text)]));
        events.push(responses_event(
            "response.output_item.done",
            object(json!({ "output_index": 0, "item": item })),
            &mut seq,
        ));
        let completed = response_object(plan, "completed", json!([item]), usage);
        events.push(responses_event(
            "response.completed",
            object(json!({ "response": completed })),
            &mut seq,
        ));
    }
    sse_response(events, plan.error_mid)
}

// ---------------------------------------------------------------------------
// Anthropic messages.

fn anthropic_usage(plan: &Plan, output_tokens: u64) -> Value {
    json!({
        "input_tokens": plan.prompt - plan.cached,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": plan.cached
    })
}

fn messages(plan: &Plan) -> Response<MockBody> {
    let id = plan.id("msg_");
    if !plan.stream {
        let mut body = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [{"type": "text", "text": plan.text()}],
            "stop_reason": plan.anthropic_stop(),
            "stop_sequence": null
        });
        if plan.usage {
            insert(&mut body, "usage", anthropic_usage(plan, plan.output));
        }
        return json_response(StatusCode::OK, &body);
    }

    let words = plan.streamed_words();
    let mut events = Vec::with_capacity(words as usize + 6);
    let mut message = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null
    });
    if plan.usage {
        insert(&mut message, "usage", anthropic_usage(plan, 1));
    }
    events.push(named_event(
        "message_start",
        &json!({"type": "message_start", "message": message}),
    ));
    events.push(named_event(
        "content_block_start",
        &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    events.push(named_event("ping", &json!({"type": "ping"})));
    push_words(&mut events, words, |w| {
        named_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
        )
    });
    if !plan.error_mid {
        events.push(named_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ));
        let mut delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": plan.anthropic_stop(), "stop_sequence": null}
        });
        if plan.usage {
            insert(&mut delta, "usage", json!({"output_tokens": plan.output}));
        }
        events.push(named_event("message_delta", &delta));
        events.push(named_event(
            "message_stop",
            &json!({"type": "message_stop"}),
        ));
    }
    sse_response(events, plan.error_mid)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;

    type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn start() -> MockServer {
        MockServer::start("127.0.0.1:0".parse().unwrap(), MockConfig::default())
            .await
            .unwrap()
    }

    async fn post(
        client: &TestClient,
        server: &MockServer,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{}", server.addr(), path))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body)
    }

    const OPENAI: (&str, &str) = ("authorization", "Bearer sk-mock-openai");
    const ANTHROPIC: (&str, &str) = ("x-api-key", "sk-mock-anthropic");

    #[test]
    fn prompt_token_rule() {
        let body = json!({
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [
                {"role": "user", "content": "hello there  world"},
                {"role": "user", "content": [{"type": "text", "text": "one two"}, {"type": "image_url"}]}
            ],
            "prompt": ["a b", "c"],
            "input": ["x", {"role": "user", "content": [{"type": "input_text", "text": "y z"}]}, {"content": "w"}]
        });
        assert_eq!(prompt_tokens_for(&body), 2 + 3 + 2 + 3 + 1 + 2 + 1);
        assert_eq!(prompt_tokens_for(&json!({})), 1);
        assert_eq!(prompt_tokens_for(&json!({"input": "a b c"})), 3);
        assert_eq!(prompt_tokens_for(&json!({"system": "s t"})), 2);
    }

    #[test]
    fn slow_and_base64() {
        assert_eq!(
            slow_delay("gpt-4o-slow-300"),
            Some(Duration::from_millis(300))
        );
        assert_eq!(slow_delay("gpt-slow"), Some(DEFAULT_SLOW));
        assert_eq!(slow_delay("gpt-4o"), None);
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_encode(b"M"), "TQ==");
    }

    #[tokio::test]
    async fn chat_non_streaming_usage() {
        let server = start().await;
        let client = client();
        let (status, headers, body) = post(
            &client,
            &server,
            "/v1/chat/completions",
            &[OPENAI],
            json!({"model": "gpt-4o-cached-reasoning", "max_tokens": 10,
                   "messages": [{"role": "user", "content": "one two three four five"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "application/json");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o-cached-reasoning");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(text.split(' ').count(), 10);
        assert!(text.split(' ').all(|w| w == "tok"));
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        assert_eq!(v["usage"]["completion_tokens"], 10);
        assert_eq!(v["usage"]["total_tokens"], 15);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(
            v["usage"]["completion_tokens_details"]["reasoning_tokens"],
            5
        );

        let (_, _, body) = post(
            &client,
            &server,
            "/v1/chat/completions",
            &[OPENAI],
            json!({"model": "gpt-4o-no-usage", "messages": []}),
        )
        .await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v.get("usage").is_none());
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(server.request_count(), 2);
        let received = server.received();
        assert_eq!(received.len(), 2);
        assert_eq!(received[0].path, "/v1/chat/completions");
        assert!(
            received[0]
                .headers
                .iter()
                .any(|(k, v)| k == "authorization" && v == "Bearer sk-mock-openai")
        );
        server.shutdown().await;
    }

    fn sse_data(body: &[u8]) -> Vec<String> {
        std::str::from_utf8(body)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[tokio::test]
    async fn chat_streaming_with_usage() {
        let server = start().await;
        let client = client();
        let (status, headers, body) = post(
            &client,
            &server,
            "/v1/chat/completions",
            &[OPENAI],
            json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "a b c"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let data = sse_data(&body);
        // role chunk + 16 words + finish chunk + usage chunk + [DONE]
        assert_eq!(data.len(), 20);
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..19]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks[1..17]
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(text, vec!["tok"; 16].join(" "));
        for c in &chunks[..18] {
            assert!(c["usage"].is_null() && c.get("usage").is_some());
        }
        assert_eq!(chunks[17]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[18]["choices"], json!([]));
        assert_eq!(chunks[18]["usage"]["prompt_tokens"], 3);
        assert_eq!(chunks[18]["usage"]["completion_tokens"], 16);
        assert_eq!(chunks[18]["usage"]["total_tokens"], 19);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn unauthorised_and_unknown() {
        let server = start().await;
        let client = client();
        let (status, _, body) = post(
            &client,
            &server,
            "/v1/chat/completions",
            &[("authorization", "Bearer wrong")],
            json!({"model": "gpt-4o", "messages": []}),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");

        let (status, _, body) = post(
            &client,
            &server,
            "/v1/messages",
            &[OPENAI],
            json!({"model": "claude", "max_tokens": 5, "messages": []}),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");

        let (status, _, _) = post(&client, &server, "/v2/nothing", &[OPENAI], json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(server.request_count(), 3);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn anthropic_cached_and_failures() {
        let server = start().await;
        let client = client();
        let (status, _, body) = post(
            &client,
            &server,
            "/v1/messages",
            &[ANTHROPIC],
            json!({"model": "claude-cached", "max_tokens": 4, "system": "x y",
                   "messages": [{"role": "user", "content": "a b c"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["usage"]["input_tokens"], 3);
        assert_eq!(v["usage"]["cache_read_input_tokens"], 2);
        assert_eq!(v["usage"]["output_tokens"], 4);
        assert_eq!(v["stop_reason"], "max_tokens");

        let (status, _, body) = post(
            &client,
            &server,
            "/v1/messages",
            &[ANTHROPIC],
            json!({"model": "claude-fail-5xx", "max_tokens": 4, "messages": []}),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "api_error");

        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/v1/chat/completions", server.addr()))
            .header("authorization", "Bearer sk-mock-openai")
            .body(Full::new(Bytes::from_static(b"{not json")))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn error_mid_aborts_stream() {
        let server = start().await;
        let client = client();
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/v1/chat/completions", server.addr()))
            .header("authorization", "Bearer sk-mock-openai")
            .body(Full::new(Bytes::from(
                json!({"model": "gpt-error-mid", "stream": true, "messages": []}).to_string(),
            )))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut words = 0;
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        words += std::str::from_utf8(data).unwrap().matches("tok").count();
                    }
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "body should fail");
        assert_eq!(words, 8);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn slow_model_waits() {
        let server = start().await;
        let client = client();
        let started = std::time::Instant::now();
        let (status, _, _) = post(
            &client,
            &server,
            "/v1/chat/completions",
            &[OPENAI],
            json!({"model": "gpt-slow-200", "messages": []}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(200));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn tls_serves_https() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let config = MockConfig {
            tls: Some(MockTls {
                cert_pem: cert.cert.pem().into_bytes(),
                key_pem: cert.key_pair.serialize_pem().into_bytes(),
                offer_h2: true,
            }),
            ..MockConfig::default()
        };
        let server = MockServer::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::GET)
            .uri("/v1/models")
            .header("host", "localhost")
            .header("authorization", "Bearer sk-mock-openai")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "list");
        server.shutdown().await;
    }
}
