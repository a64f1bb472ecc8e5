//! `tollgate-mock`: the deterministic mock OpenAI/Anthropic upstream from
//! [`tollgate::mock`] as a standalone server, for load benchmarks and manual
//! testing of the gateway. See the module docs for the usage rules and the
//! behaviours selected by model name.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tollgate::mock::{MockConfig, MockServer, MockTls};

/// Deterministic mock LLM upstream speaking the OpenAI and Anthropic HTTP APIs.
#[derive(Parser, Debug)]
#[command(name = "tollgate-mock", version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Key accepted as `authorization: Bearer <key>` on the OpenAI endpoints.
    #[arg(long, env = "MOCK_OPENAI_KEY", default_value = "sk-mock-openai")]
    openai_key: String,
    /// Key accepted as `x-api-key` on `/v1/messages`.
    #[arg(long, env = "MOCK_ANTHROPIC_KEY", default_value = "sk-mock-anthropic")]
    anthropic_key: String,
    /// PEM certificate chain; with --tls-key, serve HTTPS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Tokio worker threads (1 runs a single-threaded runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: u16,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(MockTls {
            cert_pem: std::fs::read(cert)
                .with_context(|| format!("reading TLS certificate {}", cert.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("reading TLS key {}", key.display()))?,
            offer_h2: true,
        }),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let config = MockConfig {
        openai_key: args.openai_key,
        anthropic_key: args.anthropic_key,
        tls,
        // Nobody can read the recording from outside the process.
        record_requests: false,
    };

    let runtime = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.worker_threads))
            .enable_all()
            .build()
    }
    .context("building the tokio runtime")?;

    runtime.block_on(async move {
        let server = MockServer::start(args.listen, config)
            .await
            .with_context(|| format!("starting the mock on {}", args.listen))?;
        println!("tollgate-mock listening on {scheme}://{}", server.addr());
        tokio::signal::ctrl_c()
            .await
            .context("waiting for ctrl-c")?;
        server.shutdown().await;
        Ok(())
    })
}
