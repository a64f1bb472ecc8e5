//! The one way tollgate builds an outbound HTTP(S) client (upstreams, alert webhooks,
//! CloudEvents sinks): hyper-util's pooled client over hyper-rustls with the ring provider,
//! the system trust roots (loaded once per process) plus an optional PEM CA file, HTTP/1.1 and
//! HTTP/2 by ALPN, TCP_NODELAY.

use std::io::BufReader;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

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
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
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
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(options.pool_max_idle_per_host)
        .build(https))
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
