//! The one way tollgate connects out over HTTP(S): hyper-rustls with the ring provider, the
//! system trust roots (loaded once per process) plus an optional PEM CA file, HTTP/1.1 and
//! HTTP/2 by ALPN, TCP_NODELAY. Alert webhooks and CloudEvents sinks use hyper-util's pooled
//! client ([`build`]); the request path uses an [`OriginPool`] per upstream, which speaks
//! HTTP/1.1 itself ([`h1`]) and HTTP/2 through hyper.

mod h1;

pub(crate) use h1::ChunkState;

use std::io::BufReader;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwapOption;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower_service::Service as _;

/// A pooled HTTP(S) client sending buffered bodies.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keep-alive probe interval on outbound connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Settings of one client.
pub struct ClientOptions<'a> {
    /// Extra PEM CA bundle trusted besides the system roots.
    pub ca_file: Option<&'a Path>,
    pub connect_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

/// System trust roots, loaded once per process.
fn system_roots() -> &'static [rustls::pki_types::CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for e in &loaded.errors {
            tracing::warn!(error = %e, "could not load some system CA certificates");
        }
        loaded.certs
    })
}

/// Builds a client; fails only on an unusable CA file or TLS setup.
pub fn build(options: &ClientOptions<'_>) -> Result<HttpsClient, String> {
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(options.pool_max_idle_per_host)
        .build(connector(options)?))
}

/// rustls with the ring provider, the system roots and the optional CA file.
fn tls_config(options: &ClientOptions<'_>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(path) = options.ca_file {
        let file =
            std::fs::File::open(path).map_err(|e| format!("ca_file `{}`: {e}", path.display()))?;
        let mut count = 0;
        for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
            let cert = cert.map_err(|e| format!("ca_file `{}`: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("ca_file `{}`: {e}", path.display()))?;
            count += 1;
        }
        if count == 0 {
            return Err(format!(
                "ca_file `{}` holds no PEM certificate",
                path.display()
            ));
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The TCP + TLS connector (ALPN offers HTTP/2 and HTTP/1.1).
fn connector(options: &ClientOptions<'_>) -> Result<HttpsConnector<HttpConnector>, String> {
    let tls = tls_config(options)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(options.connect_timeout));
    http.set_keepalive(Some(TCP_KEEPALIVE));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(https)
}

/// An error with its causes, `: `-joined: hyper's top-level message ("client error
/// (Connect)") says little; the cause ("connection refused") sits a few levels down.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Connections to one upstream origin, for the request path. HTTP/1.1 connections are
/// driven by the request's own task ([`h1`]): lent to one request at a time, reused
/// most-recent-first, and given back once their response body has been read to the end. An
/// HTTP/2 connection (when ALPN picks it) runs under hyper and is shared by all requests. A
/// request that an idle connection could not take (it had closed meanwhile, and the request
/// could not be written) is retried on another one.
pub struct OriginPool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority`, what the connector dials.
    origin: Uri,
    /// The authority, sent as `Host` on HTTP/1.1.
    host: HeaderValue,
    max_idle: usize,
    /// Idle HTTP/1.1 connections, oldest first.
    idle: Mutex<Vec<IdleConn>>,
    /// The shared HTTP/2 connection, when ALPN picked HTTP/2 (read without a lock: every
    /// request looks here first).
    h2: ArcSwapOption<http2::SendRequest<Full<Bytes>>>,
}

struct IdleConn {
    conn: Box<h1::Connection>,
    since: Instant,
}

/// What [`OriginPool::send`] fails with: the connect, TLS or HTTP error.
pub type PoolError = Box<dyn std::error::Error + Send + Sync>;

enum Conn {
    H1(Box<h1::Connection>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// Why an upstream exchange or response body failed after the connection was made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("upstream closed the connection {0}")]
    Closed(&'static str),
    #[error("malformed response from upstream: {0}")]
    Malformed(String),
    /// From the HTTP/2 connection.
    #[error(transparent)]
    Http2(#[from] hyper::Error),
    /// The response body stopped: no bytes for this long (`read_timeout_ms`).
    #[error("no bytes from the upstream for {} s", .0.as_secs())]
    Stalled(std::time::Duration),
}

impl OriginPool {
    /// A pool for `origin` (`scheme://host[:port]`); fails on an unusable CA file or origin.
    pub fn new(origin: &str, options: &ClientOptions<'_>) -> Result<Arc<Self>, String> {
        let origin: Uri = origin
            .parse()
            .map_err(|e| format!("upstream origin `{origin}`: {e}"))?;
        let host = origin
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| format!("upstream origin `{origin}` has no host"))?;
        Ok(Arc::new(Self {
            connector: connector(options)?,
            origin,
            host,
            max_idle: options.pool_max_idle_per_host,
            idle: Mutex::new(Vec::new()),
            h2: ArcSwapOption::empty(),
        }))
    }

    /// Sends `req` (its URI in origin form: path and query) to the origin and returns the
    /// response once its head has arrived; the body is read as it is polled.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Bytes>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        if let Some(tx) = self.shared_h2() {
            return self.send_h2(tx, req).await;
        }
        let head_request = req.method() == http::Method::HEAD;
        let encoded = h1::encode_request(&req, &self.host);
        while let Some(mut conn) = self.checkout() {
            // A write that fails on an idle connection means it closed before the whole
            // request was out: the origin cannot have acted on it. Try another.
            if let Ok(whole) = conn.write_request(&encoded, &req).await {
                return Ok(h1::read_response(self, conn, head_request, whole).await?);
            }
        }
        // Boxed: connecting (TCP, TLS, handshakes) is rare, and its future is large; unboxed,
        // it would make every request's future as large, and that is copied when moved.
        match Box::pin(self.connect()).await? {
            Conn::H1(mut conn) => {
                let whole = conn.write_request(&encoded, &req).await?;
                Ok(h1::read_response(self, conn, head_request, whole).await?)
            }
            Conn::H2(tx) => self.send_h2(tx, req).await,
        }
    }

    async fn send_h2(
        &self,
        mut tx: http2::SendRequest<Full<Bytes>>,
        req: Request<Bytes>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let mut req = req.map(Full::new);
        let mut parts = http::uri::Parts::from(self.origin.clone());
        parts.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() = Uri::from_parts(parts)?;
        tx.ready().await?;
        Ok(tx.send_request(req).await?.map(UpstreamBody::H2))
    }

    fn shared_h2(&self) -> Option<http2::SendRequest<Full<Bytes>>> {
        let current = self.h2.load();
        let tx = current.as_ref()?;
        if tx.is_closed() {
            // Gone; unless a new one replaced it meanwhile, forget it.
            self.h2.compare_and_swap(&*current, None);
            return None;
        }
        Some((**tx).clone())
    }

    /// The most recently used idle HTTP/1.1 connection that is still open and fresh. Each is
    /// probed outside the lock.
    fn checkout(&self) -> Option<Box<h1::Connection>> {
        loop {
            let mut idle = crate::lock(&self.idle).pop()?;
            if idle.since.elapsed() < POOL_IDLE_TIMEOUT && idle.conn.is_idle_open() {
                return Some(idle.conn);
            }
        }
    }

    fn give_back(&self, conn: Box<h1::Connection>) {
        if self.max_idle == 0 {
            return;
        }
        let now = Instant::now();
        let mut idle = crate::lock(&self.idle);
        let stale = idle
            .iter()
            .take_while(|c| now.duration_since(c.since) >= POOL_IDLE_TIMEOUT)
            .count();
        idle.drain(..stale);
        if idle.len() >= self.max_idle {
            idle.remove(0);
        }
        idle.push(IdleConn { conn, since: now });
    }

    async fn connect(&self) -> Result<Conn, PoolError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(self.origin.clone()).await?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            self.h2.store(Some(Arc::new(tx.clone())));
            Ok(Conn::H2(tx))
        } else {
            Ok(Conn::H1(h1::Connection::new(TokioIo::new(io))))
        }
    }
}

/// An upstream response body: read off an HTTP/1.1 connection by the request's task (which
/// gives the connection back to the pool at the body's end), or an HTTP/2 stream.
pub enum UpstreamBody {
    H1(h1::H1Body),
    H2(Incoming),
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, UpstreamError>>> {
        match self.get_mut() {
            UpstreamBody::H1(body) => body.poll_frame(cx),
            UpstreamBody::H2(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map_err(UpstreamError::Http2),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.is_end_stream(),
            UpstreamBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::H1(body) => body.size_hint(),
            UpstreamBody::H2(body) => body.size_hint(),
        }
    }
}
