//! Test harness: the real gateway and the mock upstream, both in-process on port 0, a fresh
//! journal in a temporary directory, and helpers to read what was journaled.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tollgate::config::Config;
use tollgate::ledger::UsageRecord;
use tollgate::mock::{MockConfig, MockServer};
use tollgate::{GatewayBuilder, RunningGateway};

pub const ALICE: &str = "tg-test-alice";
pub const BOB: &str = "tg-test-bob";
pub const DISABLED: &str = "tg-test-disabled";
pub const OPENAI_CREDENTIAL: &str = "sk-upstream-openai-SECRET";
pub const ANTHROPIC_CREDENTIAL: &str = "sk-upstream-anthropic-SECRET";

pub struct Harness {
    pub mock: MockServer,
    pub gateway: RunningGateway,
    pub journal: PathBuf,
    pub base: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// Config text for a gateway in front of `mock` with three keys; `extra` is appended
/// (more upstreams, routes) and `server` goes into `[server]`.
pub fn config_text(
    mock: std::net::SocketAddr,
    journal: &std::path::Path,
    server: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000
{server}

[journal]
dir = "{journal}"

[[upstreams]]
name = "mock-openai"
dialect = "openai"
base_url = "http://{mock}"
api_key_env = "T_OPENAI"
timeout_ms = 1500
default = true

[[upstreams]]
name = "mock-anthropic"
dialect = "anthropic"
base_url = "http://{mock}"
api_key_env = "T_ANTHROPIC"
timeout_ms = 1500
default = true

[[routes]]
model_prefix = "claude-"
upstream = "mock-anthropic"

{extra}

[[keys]]
id = "alice-dev"
sha256 = "{alice}"
account = "acme"
labels = {{ team = "support" }}

[[keys]]
id = "bob-prod"
sha256 = "{bob}"
account = "globex"

[[keys]]
id = "carol-old"
sha256 = "{disabled}"
account = "acme"
disabled = true
"#,
        journal = journal.display(),
        alice = hex::encode(tollgate::config::hash_key(ALICE)),
        bob = hex::encode(tollgate::config::hash_key(BOB)),
        disabled = hex::encode(tollgate::config::hash_key(DISABLED)),
    )
}

pub fn test_env() -> HashMap<String, String> {
    HashMap::from([
        ("T_OPENAI".to_string(), OPENAI_CREDENTIAL.to_string()),
        ("T_ANTHROPIC".to_string(), ANTHROPIC_CREDENTIAL.to_string()),
    ])
}

/// A gateway with the test config whose upstreams all point at `upstream` (a test's own
/// server instead of the mock); returns it with its journal path and the directory holding it.
pub async fn gateway_for(
    upstream: std::net::SocketAddr,
) -> (RunningGateway, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("usage.jsonl");
    let config = Config::parse(&config_text(upstream, &journal, "", ""), &test_env()).unwrap();
    let gateway = GatewayBuilder::new(config).start().await.unwrap();
    (gateway, journal, dir)
}

/// The `n` usage records `gateway` journaled (in `journal`), once written; fails if fewer
/// come or, a little later (so a double count would show), more.
pub async fn journaled_records(
    gateway: &RunningGateway,
    journal: &std::path::Path,
    n: u64,
) -> Vec<UsageRecord> {
    let ledger = gateway.ledger();
    assert!(
        ledger.wait_written(n, Duration::from_secs(30)).await,
        "expected {n} records, {} submitted",
        ledger.submitted()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    ledger.sync().await;
    let records = tollgate::ledger::journal::read_all(journal).unwrap();
    assert_eq!(records.len() as u64, n, "{records:#?}");
    records
}

/// The one usage record `gateway` journaled; see [`journaled_records`].
pub async fn only_record(gateway: &RunningGateway, journal: &std::path::Path) -> UsageRecord {
    journaled_records(gateway, journal, 1).await.remove(0)
}

/// A test's own upstream on a free loopback port: `serve` handles each accepted connection
/// (on its own task). Returns the address and a count of connections accepted.
pub async fn counting_upstream<F, Fut>(
    serve: F,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(serve(conn));
        }
    });
    (addr, accepted)
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with("", "").await
    }

    pub async fn start_with(server: &str, extra: &str) -> Harness {
        Self::start_with_env(server, extra, test_env()).await
    }

    /// Like [`Harness::start_with`], with `env` as the environment the config reads
    /// (start from [`test_env`] and add e.g. a webhook signing secret).
    pub async fn start_with_env(
        server: &str,
        extra: &str,
        env: HashMap<String, String>,
    ) -> Harness {
        let mock = MockServer::start(
            "127.0.0.1:0".parse().unwrap(),
            MockConfig {
                openai_key: OPENAI_CREDENTIAL.into(),
                anthropic_key: ANTHROPIC_CREDENTIAL.into(),
                ..MockConfig::default()
            },
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("usage.jsonl");
        let text = config_text(mock.addr(), &journal, server, extra);
        let config = Config::parse(&text, &env).unwrap();
        let gateway = GatewayBuilder::new(config).start().await.unwrap();
        let base = format!("http://{}", gateway.addr());
        Harness {
            mock,
            gateway,
            journal,
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            _dir: dir,
        }
    }

    /// POSTs JSON as an OpenAI client would (bearer key).
    pub fn openai(
        &self,
        path: &str,
        key: &str,
        body: serde_json::Value,
    ) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(&body)
    }

    /// POSTs JSON as an Anthropic client would (`x-api-key`, `anthropic-version`).
    pub fn anthropic(&self, key: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/messages", self.base))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
    }

    /// Waits for exactly `n` journaled records and returns them.
    pub async fn records(&self, n: u64) -> Vec<UsageRecord> {
        journaled_records(&self.gateway, &self.journal, n).await
    }

    /// The one record with this id.
    pub async fn record(&self, n: u64, id: &str) -> UsageRecord {
        let all = self.records(n).await;
        all.into_iter()
            .find(|r| r.id.to_string() == id)
            .unwrap_or_else(|| panic!("no record {id}"))
    }
}

/// The record id the gateway put in the response headers.
pub fn record_id(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-tollgate-record-id")
        .expect("x-tollgate-record-id header")
        .to_str()
        .unwrap()
        .to_string()
}

/// `data:` payloads of an SSE body, in order, with their event names.
pub fn sse_events(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut parser = tollgate::meter::sse::SseParser::new(false);
    parser.feed(body.as_bytes(), |b| {
        if let Some(d) = b.data {
            out.push((b.event.to_string(), String::from_utf8_lossy(d).into_owned()));
        }
    });
    out
}

/// Tokens of `text` as the gateway's fallback counts them.
pub fn tiktoken(model: &str, text: &str) -> u64 {
    tollgate::meter::tokenizer::count(model, text)
}

/// The mock's output text for `n` tokens.
pub fn mock_text(n: usize) -> String {
    vec!["tok"; n].join(" ")
}
