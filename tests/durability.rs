//! Durability end to end: balances rebuilt from the journal after a restart, the real binary
//! SIGKILLed under load with PostgreSQL and CloudEvents sinks (nothing lost, nothing counted
//! twice), a sink outage that heals, and a damaged journal recovered at start.
//!
//! Everything runs on loopback: the mock upstream and the CloudEvents receiver in-process,
//! PostgreSQL on 127.0.0.1:5432 (user `postgres`, trust auth; a fresh database per test,
//! dropped at the end even when the test fails). Every test runs under a time bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ALICE, ANTHROPIC_CREDENTIAL, OPENAI_CREDENTIAL, config_text, test_env};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio_postgres::NoTls;
use tollgate::config::Config;
use tollgate::ledger::journal::{SEGMENT_MAGIC, read_entries, segments};
use tollgate::ledger::{GrantEntry, LedgerEntry, UsageRecord};
use tollgate::mock::{MockConfig, MockServer};
use tollgate::{GatewayBuilder, RunningGateway};
use uuid::Uuid;

const ADMIN_TOKEN: &str = "durability-admin-token-0123456789";
const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";
const ACCOUNT: &str = "acme";
/// The configured grant of the prepaid account.
const WELCOME: &str = "25";
/// Upper bound on every test's run time.
const TEST_BOUND: Duration = Duration::from_secs(55);

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// Runs a test body under [`TEST_BOUND`]; on timeout the body is dropped, which kills its
/// children and drops its database.
async fn bounded(body: impl Future<Output = ()>) {
    let started = Instant::now();
    tokio::time::timeout(TEST_BOUND, body)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {TEST_BOUND:?}"));
    println!("test took {:.1} s", started.elapsed().as_secs_f64());
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn dec(v: &Value) -> Decimal {
    d(v.as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {v}")))
}

/// Prices for both models the tests call, and the prepaid account alice's key belongs to.
fn billing() -> String {
    format!(
        r#"
[[prices]]
model_prefix = "gpt-4o"
input_per_mtok = "2"
output_per_mtok = "4"
per_call = "0.0001"

[[prices]]
model_prefix = "claude-"
input_per_mtok = "3"
output_per_mtok = "15"
per_call = "0.0002"

[[accounts]]
id = "{ACCOUNT}"
prepaid = true
grants = [{{ id = "welcome", amount = "{WELCOME}", kind = "paid" }}]
"#
    )
}

fn admin_section(listen: &str) -> String {
    format!("\n[admin]\nlisten = \"{listen}\"\ntoken_env = \"T_ADMIN\"\n")
}

fn sinks_section(receiver: &Receiver) -> String {
    format!(
        r#"
[[sinks]]
kind = "postgres"
url_env = "T_PG_URL"

[[sinks]]
kind = "cloudevents"
url = "http://{}/api/v1/events"
timeout_ms = 2000
"#,
        receiver.addr
    )
}

/// [`config_text`] with more settings in its `[journal]` table.
fn config_with_journal(
    mock: SocketAddr,
    journal: &Path,
    extra: &str,
    journal_options: &str,
) -> String {
    // Generous upstream timeouts: these tests measure durability, and a loaded machine must
    // not turn them into 504s.
    let text =
        config_text(mock, journal, "", extra).replace("timeout_ms = 1500", "timeout_ms = 15000");
    let dir_line = format!("dir = \"{}\"\n", journal.display());
    assert!(text.contains(&dir_line));
    text.replacen(&dir_line, &format!("{dir_line}{journal_options}\n"), 1)
}

/// The environment the config reads: provider credentials, the admin token, the PG URL.
fn env_vars(pg_url: Option<&str>) -> HashMap<String, String> {
    let mut env = test_env();
    env.insert("T_ADMIN".into(), ADMIN_TOKEN.into());
    if let Some(url) = pg_url {
        env.insert("T_PG_URL".into(), url.into());
    }
    env
}

async fn start_mock() -> MockServer {
    MockServer::start(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig {
            openai_key: OPENAI_CREDENTIAL.into(),
            anthropic_key: ANTHROPIC_CREDENTIAL.into(),
            record_requests: false,
            ..MockConfig::default()
        },
    )
    .await
    .unwrap()
}

/// An in-process gateway with its admin listener on a free port.
async fn start_gateway(text: &str, env: &HashMap<String, String>) -> RunningGateway {
    let config = Config::parse(text, env).unwrap();
    GatewayBuilder::new(config)
        .admin_listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn admin_get(http: &reqwest::Client, admin: &str, path: &str) -> Value {
    let resp = http
        .get(format!("{admin}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

async fn admin_grant(http: &reqwest::Client, admin: &str, body: Value) -> Value {
    let resp = http
        .post(format!("{admin}/admin/accounts/{ACCOUNT}/grants"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{v}");
    v
}

async fn metrics(http: &reqwest::Client, admin: &str) -> String {
    let resp = http
        .get(format!("{admin}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// The value of one sample (`name{labels}`) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// What an account view must keep across a restart (created_at of configured grants is the
/// start time, so it is left out).
fn durable_view(v: &Value) -> Value {
    let norm = |x: &Value| json!(dec(x).normalize().to_string());
    let mut grants: Vec<Value> = v["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            json!({
                "id": g["id"],
                "kind": g["kind"],
                "priority": g["priority"],
                "amount": norm(&g["amount"]),
                "remaining": norm(&g["remaining"]),
                "expires_at": g["expires_at"],
                "expired": g["expired"],
            })
        })
        .collect();
    grants.sort_by_key(|g| g["id"].as_str().unwrap().to_string());
    json!({
        "balance": norm(&v["balance"]),
        "available": norm(&v["available"]),
        "overdraft": norm(&v["overdraft"]),
        "period_spend": norm(&v["period_spend"]),
        "period_rated_usage": norm(&v["period_rated_usage"]),
        "period_committed": norm(&v["period_committed"]),
        "topup_required": v["topup_required"],
        "grants": grants,
    })
}

fn usage_of(entries: &[LedgerEntry]) -> Vec<&UsageRecord> {
    entries
        .iter()
        .filter_map(|e| match e {
            LedgerEntry::Usage(r) => Some(r),
            LedgerEntry::Grant(_) => None,
        })
        .collect()
}

fn grants_of(entries: &[LedgerEntry]) -> Vec<&GrantEntry> {
    entries
        .iter()
        .filter_map(|e| match e {
            LedgerEntry::Grant(g) => Some(g),
            LedgerEntry::Usage(_) => None,
        })
        .collect()
}

/// Sum of `cost` over usage records (every one must be priced).
fn total_cost(records: &[&UsageRecord]) -> Decimal {
    records
        .iter()
        .map(|r| r.cost.unwrap_or_else(|| panic!("unpriced record {r:?}")))
        .sum()
}

/// The configured grant plus every grant journaled at run time.
fn total_granted(entries: &[LedgerEntry]) -> Decimal {
    d(WELCOME)
        + grants_of(entries)
            .iter()
            .map(|g| {
                assert_eq!(g.account, ACCOUNT);
                g.amount
            })
            .sum::<Decimal>()
}

// ---------------------------------------------------------------------------------------------
// Requests and load.
// ---------------------------------------------------------------------------------------------

/// How one request ended, from the client's side.
#[derive(Debug)]
enum Sent {
    /// 200 and the whole body: the record id.
    Ok(String),
    /// Never connected (the gateway was down).
    Refused,
    /// The connection broke after the request went out; the id when the headers arrived.
    Interrupted(Option<String>),
    /// Another status.
    Status(u16, Option<String>),
    /// 200 and a body that ended cleanly but incomplete.
    Truncated(Option<String>),
}

/// Request `i` of a mix: OpenAI or Anthropic shape, streaming or not, various lengths.
async fn send(http: &reqwest::Client, base: &str, i: u64) -> Sent {
    let anthropic = i % 3 == 1;
    let stream = i % 2 == 0;
    let max_tokens = 3 + i % 17;
    let prompt = "durable ledgers never forget a single token".repeat(1 + (i % 4) as usize);
    let req = if anthropic {
        http.post(format!("{base}/v1/messages"))
            .header("x-api-key", ALICE)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({
                "model": "claude-3-5-haiku-latest",
                "max_tokens": max_tokens,
                "stream": stream,
                "messages": [{"role": "user", "content": prompt}],
            }))
    } else {
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(ALICE)
            .json(&json!({
                "model": "gpt-4o-mini",
                "max_tokens": max_tokens,
                "stream": stream,
                "messages": [{"role": "user", "content": prompt}],
            }))
    };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Sent::Refused,
        Err(_) => return Sent::Interrupted(None),
    };
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-tollgate-record-id")
        .map(|v| v.to_str().unwrap().to_string());
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(_) => return Sent::Interrupted(id),
    };
    if status != 200 {
        return Sent::Status(status, id);
    }
    let text = String::from_utf8_lossy(&body);
    let complete = match (stream, anthropic) {
        (false, _) => serde_json::from_slice::<Value>(&body).is_ok(),
        (true, true) => text.contains("message_stop"),
        (true, false) => text.contains("data: [DONE]"),
    };
    match (complete, id) {
        (true, Some(id)) => Sent::Ok(id),
        (_, id) => Sent::Truncated(id),
    }
}

#[derive(Debug, Default)]
struct Tally {
    ok: Vec<String>,
    refused: u64,
    interrupted: u64,
    /// Record ids of interrupted requests whose headers had arrived.
    interrupted_ids: Vec<String>,
    other_status: Vec<(u16, Option<String>)>,
    truncated: Vec<Option<String>>,
}

/// Concurrent workers sending [`send`] requests in a loop until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(base: &str, workers: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let counter = Arc::new(AtomicU64::new(0));
        let workers = (0..workers)
            .map(|_| {
                let (stop, tally, counter) = (stop.clone(), tally.clone(), counter.clone());
                let base = base.to_string();
                tokio::spawn(async move {
                    let http = client();
                    while !stop.load(Ordering::Relaxed) {
                        let i = counter.fetch_add(1, Ordering::Relaxed);
                        let sent = send(&http, &base, i).await;
                        let refused = matches!(sent, Sent::Refused);
                        {
                            let mut t = tally.lock().unwrap();
                            match sent {
                                Sent::Ok(id) => t.ok.push(id),
                                Sent::Refused => t.refused += 1,
                                Sent::Interrupted(id) => {
                                    t.interrupted += 1;
                                    t.interrupted_ids.extend(id);
                                }
                                Sent::Status(s, id) => t.other_status.push((s, id)),
                                Sent::Truncated(id) => t.truncated.push(id),
                            }
                        }
                        if refused {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            workers,
        }
    }

    fn ok_count(&self) -> usize {
        self.tally.lock().unwrap().ok.len()
    }

    /// Waits until a response completes after this call (the gateway just (re)started
    /// serves); returns the count of completed responses before it and the wait in ms.
    async fn wait_serving(&self) -> (usize, u128) {
        let before = self.ok_count();
        let started = Instant::now();
        while self.ok_count() == before {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no request completed within 20 s: {:?}",
                self.tally.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (before, started.elapsed().as_millis())
    }

    async fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for w in std::mem::take(&mut self.workers) {
            w.await.unwrap();
        }
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: a database per test.
// ---------------------------------------------------------------------------------------------

/// A database created for one test; dropped (forcefully) when this is dropped, also on panic.
struct TestDb {
    name: String,
}

impl TestDb {
    async fn create() -> TestDb {
        let (admin, conn) = tokio_postgres::connect(PG_ADMIN, NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth)");
        let driver = tokio::spawn(conn);
        let name = format!("tollgate_durability_{}", Uuid::now_v7().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        drop(admin);
        let _ = driver.await;
        TestDb { name }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok((admin, conn)) = tokio_postgres::connect(PG_ADMIN, NoTls).await {
                    tokio::spawn(conn);
                    if let Err(e) = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                    {
                        eprintln!("cannot drop test database {name}: {e}");
                    }
                }
            });
        })
        .join();
    }
}

/// Usage row ids of the database, with how many rows each has.
async fn pg_usage_ids(pg: &tokio_postgres::Client) -> HashMap<String, i64> {
    pg.query(
        "SELECT id::text, count(*) FROM tollgate_usage GROUP BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
    .collect()
}

async fn pg_decimal(pg: &tokio_postgres::Client, sql: &str) -> Decimal {
    let s: String = pg.query_one(sql, &[]).await.unwrap().get(0);
    d(&s)
}

// ---------------------------------------------------------------------------------------------
// CloudEvents receiver.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Received {
    /// `(type, id)` of every event accepted, in arrival order (redeliveries included).
    events: Vec<(String, String)>,
    accepted_posts: u64,
    refused_posts: u64,
}

/// A CloudEvents batch receiver that answers 503 for `outage` from the first post it gets
/// (so the outage always meets deliveries, however slowly the gateway starts), then 200.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(outage: Option<Duration>) -> Receiver {
        let first_post: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let r = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let r = r.clone();
                let first_post = first_post.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let r = r.clone();
                        let first_post = first_post.clone();
                        async move {
                            let ok_type = req
                                .headers()
                                .get(http::header::CONTENT_TYPE)
                                .is_some_and(|v| v == "application/cloudevents-batch+json");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let failing = outage.is_some_and(|d| {
                                let now = Instant::now();
                                let first = *first_post.lock().unwrap().get_or_insert(now);
                                now < first + d
                            });
                            let status = if !ok_type {
                                400
                            } else if failing {
                                503
                            } else {
                                200
                            };
                            {
                                let mut r = r.lock().unwrap();
                                if status == 200 {
                                    let events: Vec<Value> = serde_json::from_slice(&body).unwrap();
                                    r.events.extend(events.iter().map(|e| {
                                        (
                                            e["type"].as_str().unwrap().to_string(),
                                            e["id"].as_str().unwrap().to_string(),
                                        )
                                    }));
                                    r.accepted_posts += 1;
                                } else {
                                    r.refused_posts += 1;
                                }
                            }
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            received,
            task,
        }
    }

    /// How many times each id of events of `event_type` arrived.
    fn counts(&self, event_type: &str) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for (t, id) in &self.received.lock().unwrap().events {
            if t == event_type {
                *out.entry(id.clone()).or_default() += 1;
            }
        }
        out
    }

    fn posts(&self) -> (u64, u64) {
        let r = self.received.lock().unwrap();
        (r.accepted_posts, r.refused_posts)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary.
// ---------------------------------------------------------------------------------------------

/// Removes ANSI colour sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `tollgate serve` child process; killed on drop if still running.
struct Served {
    child: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn spawn(config: &Path, listen: &str, env: &HashMap<String, String>, args: &[&str]) -> Served {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--listen", listen])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [stdout, stderr] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(strip_ansi(&line));
                }
            });
        }
        Served { child, log }
    }

    /// Starts `tollgate serve` and waits until it listens; retries while the address is still
    /// taken (a killed predecessor's sockets).
    async fn start(config: &Path, listen: &str, env: &HashMap<String, String>) -> Served {
        Served::start_with(config, listen, env, &[]).await
    }

    /// [`Served::start`] with more command-line arguments.
    async fn start_with(
        config: &Path,
        listen: &str,
        env: &HashMap<String, String>,
        args: &[&str],
    ) -> Served {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut served = Served::spawn(config, listen, env, args);
            match served.wait_listening().await {
                Ok(()) => return served,
                Err(log) if log.contains("cannot listen") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(log) => panic!("tollgate did not start:\n{log}"),
            }
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the `tollgate listening` line; `Err(log)` when the process exited first.
    async fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.addr().is_some() {
                return Ok(());
            }
            if self.child.try_wait().unwrap().is_some() {
                // Let the reader threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no `tollgate listening` line:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The data-plane address from the `tollgate listening addr=…` line.
    fn addr(&self) -> Option<String> {
        self.log.lock().unwrap().iter().find_map(|l| {
            let rest = l.split("tollgate listening").nth(1)?;
            let addr = rest.split("addr=").nth(1)?;
            Some(addr.split_whitespace().next()?.to_string())
        })
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    async fn wait_exit(&mut self, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not exit on {what}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `kill -KILL`, and waits until the process is gone.
    async fn sigkill(&mut self) {
        self.signal("KILL");
        let status = self.wait_exit("SIGKILL").await;
        assert!(!status.success());
    }

    /// `kill -TERM`, and waits for a clean exit.
    async fn terminate(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit("SIGTERM").await;
        assert!(status.success(), "{status}:\n{}", self.log());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Restart: balances rebuilt exactly.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_balances_exactly() {
    bounded(async {
        let mock = start_mock().await;
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let text = config_text(
            mock.addr(),
            &journal,
            "",
            &format!("{}{}", billing(), admin_section("127.0.0.1:0")),
        );
        let env = env_vars(None);
        let http = client();

        let gateway = start_gateway(&text, &env).await;
        let base = format!("http://{}", gateway.addr());
        let admin = format!("http://{}", gateway.admin_addr().unwrap());
        let mut ids = Vec::new();
        for i in 0..10u64 {
            if i == 4 {
                // A top-up drawn before the configured grant (lower priority number), so the
                // draw order is fixed by the config alone.
                admin_grant(
                    &http,
                    &admin,
                    json!({"id": "topup-1", "amount": "7.5", "priority": 5}),
                )
                .await;
            }
            match send(&http, &base, i).await {
                Sent::Ok(id) => ids.push(id),
                other => panic!("request {i}: {other:?}"),
            }
        }
        let before = admin_get(&http, &admin, &format!("/admin/accounts/{ACCOUNT}")).await;
        gateway.shutdown().await;

        let entries = read_entries(&journal).unwrap();
        let usage = usage_of(&entries);
        assert_eq!(
            usage.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(),
            ids
        );
        assert!(usage.iter().any(|r| r.streamed) && usage.iter().any(|r| !r.streamed));
        assert_eq!(grants_of(&entries).len(), 1);
        let granted = total_granted(&entries);
        let spent = total_cost(&usage);
        assert_eq!(granted, d(WELCOME) + d("7.5"));
        assert!(spent > Decimal::ZERO);
        assert_eq!(dec(&before["balance"]), granted - spent, "{before}");
        assert_eq!(dec(&before["period_spend"]), spent, "{before}");

        // A new gateway on the same journal.
        let gateway = start_gateway(&text, &env).await;
        let base = format!("http://{}", gateway.addr());
        let admin = format!("http://{}", gateway.admin_addr().unwrap());
        let after = admin_get(&http, &admin, &format!("/admin/accounts/{ACCOUNT}")).await;
        assert_eq!(
            durable_view(&after),
            durable_view(&before),
            "before: {before}\nafter: {after}"
        );
        println!("restored: {}", durable_view(&after));

        // The rebuilt wallet keeps working: one more request is drawn from it exactly.
        let Sent::Ok(id) = send(&http, &base, 10).await else {
            panic!("request after the restart failed")
        };
        let now = admin_get(&http, &admin, &format!("/admin/accounts/{ACCOUNT}")).await;
        gateway.shutdown().await;
        let entries = read_entries(&journal).unwrap();
        let usage = usage_of(&entries);
        assert_eq!(usage.last().unwrap().id.to_string(), id);
        let last_cost = usage.last().unwrap().cost.unwrap();
        assert_eq!(dec(&now["balance"]), dec(&after["balance"]) - last_cost);
        assert_eq!(dec(&now["balance"]), granted - total_cost(&usage));
    })
    .await;
}

/// Two grants of equal priority and no expiry are drawn oldest first. Live, the configured
/// grant is older than a later admin top-up; replay after a restart must keep that order
/// (configured grants date from the epoch), so each grant's `remaining` survives the restart
/// — not only the total balance. Regression test: replay once re-created configured grants
/// with the restart time and drew from the top-up instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn restart_keeps_the_draw_order_of_equal_priority_grants() {
    bounded(async {
        let mock = start_mock().await;
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let text = config_text(
            mock.addr(),
            &journal,
            "",
            &format!("{}{}", billing(), admin_section("127.0.0.1:0")),
        );
        let env = env_vars(None);
        let http = client();
        let gateway = start_gateway(&text, &env).await;
        let base = format!("http://{}", gateway.addr());
        let admin = format!("http://{}", gateway.admin_addr().unwrap());
        // Same (default) priority as the configured grant, no expiry.
        admin_grant(&http, &admin, json!({"id": "topup-1", "amount": "7.5"})).await;
        for i in 0..4u64 {
            assert!(matches!(send(&http, &base, i).await, Sent::Ok(_)));
        }
        let before = admin_get(&http, &admin, &format!("/admin/accounts/{ACCOUNT}")).await;
        gateway.shutdown().await;
        let gateway = start_gateway(&text, &env).await;
        let admin = format!("http://{}", gateway.admin_addr().unwrap());
        let after = admin_get(&http, &admin, &format!("/admin/accounts/{ACCOUNT}")).await;
        gateway.shutdown().await;
        assert_eq!(dec(&after["balance"]), dec(&before["balance"]));
        assert_eq!(
            durable_view(&after)["grants"],
            durable_view(&before)["grants"],
            "before: {before}\nafter: {after}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL under load.
// ---------------------------------------------------------------------------------------------

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_and_duplicates_nothing() {
    bounded(async {
        let mock = start_mock().await;
        let db = TestDb::create().await;
        let receiver = Receiver::start(None).await;
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        // The binary watches its config's directory: keep the journal out of it.
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let config_path = etc.join("tollgate.toml");
        let (port, admin_port) = (free_port(), free_port());
        let listen = format!("127.0.0.1:{port}");
        let admin_listen = format!("127.0.0.1:{admin_port}");
        let text = config_with_journal(
            mock.addr(),
            &journal,
            &format!(
                "{}{}{}",
                billing(),
                sinks_section(&receiver),
                admin_section(&admin_listen)
            ),
            "fsync = \"interval\"\nfsync_interval_ms = 5",
        );
        let env = env_vars(Some(&db.url()));
        Config::parse(&text, &env).unwrap();
        std::fs::write(&config_path, &text).unwrap();
        let base = format!("http://{listen}");
        let admin = format!("http://{admin_listen}");
        let http = client();

        // Runs alternate between the single-threaded runtime (which gathers each scheduler
        // pass's records into one journal write) and the multi-threaded one (which writes
        // each record as it is submitted); the first and third are killed single-threaded.
        let runtime = |run: usize| -> &'static [&'static str] {
            if run % 2 == 0 {
                &["--worker-threads", "1"]
            } else {
                &[]
            }
        };
        let mut served = Served::start_with(&config_path, &listen, &env, runtime(0)).await;
        admin_grant(&http, &admin, json!({"id": "topup-1", "amount": "7.5"})).await;

        let load = Load::start(&base, 8);
        // (ms from the run's first completed response to the kill, responses completed in
        // the run before the kill, ms from start to the first completed response).
        let mut kills = Vec::new();
        for run in 1..=3 {
            let (before, warm_up) = load.wait_serving().await;
            let ms = rand::rng().random_range(700..=1500);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let completed = load.ok_count() - before;
            served.sigkill().await;
            kills.push((ms, completed, warm_up));
            served = Served::start_with(&config_path, &listen, &env, runtime(run)).await;
        }
        // The last run under load, then a graceful stop.
        load.wait_serving().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let tally = load.stop().await;
        served.terminate().await;

        // Once more with no load, until both sinks caught up.
        let mut served = Served::start(&config_path, &listen, &env).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = metrics(&http, &admin).await;
            let lag = |sink: &str| {
                sample(&m, &format!("tollgate_sink_lag_entries{{sink=\"{sink}\"}}"))
                    .unwrap_or_else(|| panic!("no lag for {sink}:\n{m}"))
            };
            if lag("postgres") == 0.0 && lag("cloudevents") == 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sinks did not catch up in 30 s:\n{m}\n{}",
                served.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let account = admin_get(&http, &admin, &format!("/admin/accounts/{ACCOUNT}")).await;
        let pg = db.client().await;
        let pg_ids = pg_usage_ids(&pg).await;
        let pg_cost = pg_decimal(
            &pg,
            "SELECT COALESCE(SUM(cost), 0)::text FROM tollgate_usage",
        )
        .await;
        let pg_granted = pg_decimal(
            &pg,
            "SELECT COALESCE(SUM(amount), 0)::text FROM tollgate_grants",
        )
        .await;
        let pg_grant_ids: HashSet<String> = pg
            .query("SELECT id::text FROM tollgate_grants", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let ok_uuids: Vec<Uuid> = tally
            .ok
            .iter()
            .map(|s| Uuid::parse_str(s).unwrap())
            .collect();
        let ok_rows: i64 = pg
            .query_one(
                "SELECT count(*) FROM tollgate_usage WHERE id = ANY($1)",
                &[&ok_uuids],
            )
            .await
            .unwrap()
            .get(0);
        let duplicated_rows = pg
            .query(
                "SELECT id FROM tollgate_usage GROUP BY id HAVING count(*) > 1",
                &[],
            )
            .await
            .unwrap()
            .len();
        served.terminate().await;
        drop(pg);

        let entries = read_entries(&journal).unwrap();
        let usage = usage_of(&entries);
        let granted = total_granted(&entries);
        let spent = total_cost(&usage);
        let received = receiver.counts("tollgate.usage");
        let received_grants = receiver.counts("tollgate.grant");
        let (accepted_posts, refused_posts) = receiver.posts();
        let events: usize = received.values().sum();
        let duplicates = events - received.len();

        println!(
            "crash test: kills after {:?} ms of serving load ({:?} responses completed in each \
             run, first response {:?} ms after the load met the new process); requests ok {}, \
             killed in flight {} ({} with a record id), refused while down {}, other status {}, \
             truncated {}; journal usage records {}, grants {}; PG rows {}; events at receiver \
             {} ({} distinct, {} duplicates, {} posts accepted, {} refused); balance {} = \
             granted {} - spent {}",
            kills.iter().map(|k| k.0).collect::<Vec<_>>(),
            kills.iter().map(|k| k.1).collect::<Vec<_>>(),
            kills.iter().map(|k| k.2).collect::<Vec<_>>(),
            tally.ok.len(),
            tally.interrupted,
            tally.interrupted_ids.len(),
            tally.refused,
            tally.other_status.len(),
            tally.truncated.len(),
            usage.len(),
            grants_of(&entries).len(),
            pg_ids.len(),
            events,
            received.len(),
            duplicates,
            accepted_posts,
            refused_posts,
            account["balance"],
            granted,
            spent,
        );

        assert!(tally.ok.len() >= 100, "too little load: {}", tally.ok.len());
        assert!(tally.other_status.is_empty(), "{:?}", tally.other_status);
        assert!(tally.truncated.is_empty(), "{:?}", tally.truncated);

        // The journal: every id once; every completed response's record in it exactly once.
        let mut journal_counts: HashMap<String, usize> = HashMap::new();
        for e in &entries {
            *journal_counts.entry(e.id().to_string()).or_default() += 1;
        }
        let twice: Vec<_> = journal_counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "journaled more than once: {twice:?}");
        let ok_set: HashSet<&String> = tally.ok.iter().collect();
        assert_eq!(ok_set.len(), tally.ok.len(), "a record id answered twice");
        let usage_ids: HashSet<String> = usage.iter().map(|r| r.id.to_string()).collect();
        let lost: Vec<_> = tally
            .ok
            .iter()
            .filter(|id| !usage_ids.contains(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "{} completed responses have no journaled record: {lost:?}",
            lost.len()
        );
        // Interrupted requests: at most one record each.
        for id in &tally.interrupted_ids {
            assert!(journal_counts.get(id).copied().unwrap_or(0) <= 1, "{id}");
            assert!(pg_ids.get(id).copied().unwrap_or(0) <= 1, "{id}");
        }

        // PostgreSQL: exactly one row per completed response, no duplicates, and exactly the
        // journal's records.
        assert_eq!(ok_rows, tally.ok.len() as i64);
        assert_eq!(duplicated_rows, 0);
        let pg_set: HashSet<String> = pg_ids.keys().cloned().collect();
        assert_eq!(pg_set, usage_ids, "PG rows vs journal");
        let journal_grant_ids: HashSet<String> = grants_of(&entries)
            .iter()
            .map(|g| g.id.to_string())
            .collect();
        assert_eq!(pg_grant_ids, journal_grant_ids);

        // CloudEvents: at least one event per record; distinct ids = PG ids (redeliveries of
        // the same id are allowed: consumers deduplicate on it).
        let received_set: HashSet<String> = received.keys().cloned().collect();
        assert!(ok_set.iter().all(|id| received_set.contains(*id)));
        assert_eq!(received_set, pg_set, "receiver distinct ids vs PG ids");
        assert_eq!(
            received_grants.keys().cloned().collect::<HashSet<_>>(),
            journal_grant_ids
        );

        // Money: the balance is what was granted less what the journal and PG say was spent.
        assert_eq!(granted, d(WELCOME) + d("7.5"));
        assert_eq!(pg_granted + d(WELCOME), granted);
        assert_eq!(pg_cost, spent, "PG SUM(cost) vs journal");
        assert_eq!(dec(&account["balance"]), granted - spent, "{account}");
        assert_eq!(dec(&account["balance"]), granted - pg_cost, "{account}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. A sink outage that heals.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sink_outage_then_recovery_delivers_everything_once() {
    bounded(async {
        let mock = start_mock().await;
        let db = TestDb::create().await;
        let outage = Duration::from_millis(1500);
        let receiver = Receiver::start(Some(outage)).await;
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let text = config_text(
            mock.addr(),
            &journal,
            "",
            &format!(
                "{}{}{}",
                billing(),
                sinks_section(&receiver),
                admin_section("127.0.0.1:0")
            ),
        );
        let env = env_vars(Some(&db.url()));
        let gateway = start_gateway(&text, &env).await;
        let base = format!("http://{}", gateway.addr());
        let admin = format!("http://{}", gateway.admin_addr().unwrap());
        let http = client();

        // Load through the outage and a little past it.
        let load = Load::start(&base, 8);
        tokio::time::sleep(outage + Duration::from_millis(700)).await;
        let tally = load.stop().await;
        assert!(
            tally.refused == 0
                && tally.interrupted == 0
                && tally.other_status.is_empty()
                && tally.truncated.is_empty(),
            "every request must succeed during a sink outage: {tally:?}"
        );
        assert!(tally.ok.len() >= 50, "too little load: {}", tally.ok.len());
        let ok: HashSet<String> = tally.ok.iter().cloned().collect();
        let ledger = gateway.ledger();
        assert!(
            ledger
                .wait_written(ledger.submitted(), Duration::from_secs(10))
                .await
        );
        let journaled: HashSet<String> = tollgate::ledger::journal::read_all(&journal)
            .unwrap()
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(journaled, ok);

        let pg = db.client().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let received = receiver.counts("tollgate.usage");
            let rows: i64 = pg
                .query_one("SELECT count(*) FROM tollgate_usage", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            if received.len() >= ok.len() && rows >= ok.len() as i64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not delivered within 30 s: receiver {} distinct, PG {rows}, of {}",
                received.len(),
                ok.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A moment more, so a late redelivery would show.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = metrics(&http, &admin).await;
        let received = receiver.counts("tollgate.usage");
        let (accepted_posts, refused_posts) = receiver.posts();
        let pg_ids = pg_usage_ids(&pg).await;
        let failures = sample(&m, "tollgate_sink_failures_total{sink=\"cloudevents\"}").unwrap();
        println!(
            "outage: {} requests ok; receiver refused {refused_posts} posts then accepted \
             {accepted_posts} with {} events ({} distinct); PG rows {}; \
             tollgate_sink_failures_total{{sink=\"cloudevents\"}} {failures}",
            ok.len(),
            received.values().sum::<usize>(),
            received.len(),
            pg_ids.len()
        );
        assert!(refused_posts > 0, "the outage saw no delivery");
        assert!(failures > 0.0, "{m}");
        assert_eq!(
            sample(&m, "tollgate_sink_lag_entries{sink=\"cloudevents\"}"),
            Some(0.0),
            "{m}"
        );
        let received_set: HashSet<String> = received.keys().cloned().collect();
        assert_eq!(received_set, ok, "receiver ids vs completed responses");
        let repeated: Vec<_> = received.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            repeated.is_empty(),
            "delivered more than once: {repeated:?}"
        );
        assert_eq!(pg_ids.keys().cloned().collect::<HashSet<_>>(), ok);
        assert!(pg_ids.values().all(|n| *n == 1));
        drop(pg);
        gateway.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. A damaged journal recovered at start.
// ---------------------------------------------------------------------------------------------

/// One well-formed frame of a segment file.
struct RawFrame {
    offset: usize,
    len: usize,
    seq: u64,
    payload: Vec<u8>,
}

/// The well-formed frames of a segment, and the offset after the last one.
fn frames(bytes: &[u8]) -> (Vec<RawFrame>, usize) {
    assert_eq!(&bytes[..SEGMENT_MAGIC.len()], SEGMENT_MAGIC);
    let mut at = SEGMENT_MAGIC.len();
    let mut out = Vec::new();
    while bytes.len() - at >= 16 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        if at + 16 + len > bytes.len() || crc32c::crc32c(&bytes[at + 8..at + 16 + len]) != crc {
            break;
        }
        out.push(RawFrame {
            offset: at,
            len: 16 + len,
            seq: u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap()),
            payload: bytes[at + 16..at + 16 + len].to_vec(),
        });
        at += 16 + len;
    }
    (out, at)
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_journal_tail_recovers_at_start() {
    bounded(async {
        let mock = start_mock().await;
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let config_path = etc.join("tollgate.toml");
        // Small segments, so the flipped frame sits in an earlier segment than the torn tail.
        let text = config_with_journal(mock.addr(), &journal, "", "segment_bytes = 4096");
        let env = env_vars(None);
        Config::parse(&text, &env).unwrap();
        std::fs::write(&config_path, &text).unwrap();
        let http = client();

        let mut served = Served::start(&config_path, "127.0.0.1:0", &env).await;
        let base = format!("http://{}", served.addr().unwrap());
        let mut ids = Vec::new();
        for i in 0..24u64 {
            match send(&http, &base, i).await {
                Sent::Ok(id) => ids.push(id),
                other => panic!("request {i}: {other:?}"),
            }
        }
        served.terminate().await;
        let segs = segments(&journal).unwrap();
        assert!(segs.len() >= 3, "{segs:?}");

        // Flip a byte in the middle of the middle frame of the first segment.
        let first = segs[0].1.clone();
        let mut bytes = std::fs::read(&first).unwrap();
        let (good, end) = frames(&bytes);
        assert_eq!(end, bytes.len());
        assert!(good.len() >= 3);
        let victim = &good[good.len() / 2];
        let victim_entry: LedgerEntry = serde_json::from_slice(&victim.payload).unwrap();
        let victim_id = victim_entry.id().to_string();
        let victim_seq = victim.seq;
        bytes[victim.offset + 16 + victim.payload.len() / 2] ^= 0x01;
        let victim_bytes = bytes[victim.offset..victim.offset + victim.len].to_vec();
        std::fs::write(&first, &bytes).unwrap();

        // A torn tail on the newest segment: a frame header promising more than follows.
        let newest = segs.last().unwrap().1.clone();
        let newest_len = std::fs::metadata(&newest).unwrap().len();
        let mut garbage = Vec::new();
        garbage.extend_from_slice(&300u32.to_le_bytes());
        garbage.extend_from_slice(&0xdead_beefu32.to_le_bytes());
        garbage.extend_from_slice(&99_999u64.to_le_bytes());
        garbage.extend_from_slice(br#"{"type":"usage","id":"0199"#);
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&newest)
                .unwrap();
            f.write_all(&garbage).unwrap();
        }

        let mut served = Served::start(&config_path, "127.0.0.1:0", &env).await;
        let base = format!("http://{}", served.addr().unwrap());
        let Sent::Ok(new_id) = send(&http, &base, 100).await else {
            panic!("no service after recovery:\n{}", served.log())
        };
        served.terminate().await;
        let log = served.log();
        println!(
            "{}",
            log.lines()
                .filter(|l| l.contains("journal"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(log.contains("journal has a torn tail; truncated"), "{log}");
        assert!(
            log.contains(&format!("bytes={}", garbage.len())),
            "the truncation names the bytes dropped:\n{log}"
        );
        assert!(
            log.contains("journal frame fails its checksum; skipped and quarantined"),
            "{log}"
        );
        assert!(log.contains("journal recovered from damage"), "{log}");

        // The journal reads back without the flipped frame, with the new record after the
        // surviving ones, in strictly increasing sequence.
        let entries = read_entries(&journal).unwrap();
        let got: Vec<String> = entries.iter().map(|e| e.id().to_string()).collect();
        let mut want: Vec<String> = ids.iter().filter(|id| **id != victim_id).cloned().collect();
        want.push(new_id);
        assert_eq!(got, want);
        assert_eq!(got.len(), ids.len());
        let mut last_seq = 0;
        for (_, path) in segments(&journal).unwrap() {
            let bytes = std::fs::read(&path).unwrap();
            let (good, end) = frames(&bytes);
            assert_eq!(
                end,
                bytes.len(),
                "{} has bytes past its frames",
                path.display()
            );
            for f in good {
                assert!(f.seq > last_seq);
                assert_ne!(f.seq, victim_seq);
                last_seq = f.seq;
            }
        }
        // The torn tail is gone from the newest segment of the first run.
        let newest_bytes = std::fs::read(&newest).unwrap();
        assert!(newest_bytes.len() as u64 >= newest_len);
        assert!(
            !newest_bytes
                .windows(garbage.len())
                .any(|w| w == garbage.as_slice())
        );

        // Both pieces are kept in quarantine/, byte for byte.
        let quarantined: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(journal.join("quarantine"))
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        assert_eq!(quarantined.len(), 2, "{quarantined:?}");
        let holds = |bytes: &[u8]| quarantined.iter().any(|(_, b)| b == bytes);
        assert!(
            holds(&victim_bytes),
            "the flipped frame is not in quarantine/"
        );
        assert!(holds(&garbage), "the torn tail is not in quarantine/");
        let victim_file = format!(
            "{}-{}.bin",
            first.file_name().unwrap().to_str().unwrap(),
            victim.offset
        );
        assert!(
            quarantined
                .iter()
                .any(|(p, _)| p.file_name().unwrap().to_str().unwrap() == victim_file),
            "{quarantined:?}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Checkpoints: delivered segments are deleted, and recovery still comes out exact.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_segments_are_checkpointed_and_deleted_and_restart_is_exact() {
    bounded(async {
        let mock = start_mock().await;
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let export = dir.path().join("export.jsonl");
        let extra = format!(
            "{}{}\n[[sinks]]\nkind = \"file\"\npath = \"{}\"\n",
            billing(),
            admin_section("127.0.0.1:0"),
            export.display()
        );
        let text = config_with_journal(
            mock.addr(),
            &journal,
            &extra,
            "segment_bytes = 4096\ncheckpoint_interval_ms = 50",
        );
        let env = env_vars(None);
        let http = client();
        let gateway = start_gateway(&text, &env).await;
        let base = format!("http://{}", gateway.addr());
        let admin = format!("http://{}", gateway.admin_addr().unwrap());
        admin_grant(
            &http,
            &admin,
            json!({"id": "topup-1", "amount": "5", "priority": 5}),
        )
        .await;
        let mut ok = Vec::new();
        for i in 0..120 {
            if let Sent::Ok(id) = send(&http, &base, i).await {
                ok.push(id);
            }
        }
        assert_eq!(ok.len(), 120);
        // Wait for a checkpoint that let segments go.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let segment_count = || {
            std::fs::read_dir(&journal)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "seg")
                })
                .count()
        };
        while !(journal.join("checkpoint.json").exists() && segment_count() <= 2) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no checkpoint; {} segments",
                segment_count()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = durable_view(&admin_get(&http, &admin, "/admin/accounts/acme").await);
        gateway.shutdown().await;
        println!(
            "after 120 requests: {} segments left, checkpoint written",
            segment_count()
        );

        // Restart: checkpoint + the entries after it give the same balances.
        let gateway = start_gateway(&text, &env).await;
        let admin = format!("http://{}", gateway.admin_addr().unwrap());
        let after = durable_view(&admin_get(&http, &admin, "/admin/accounts/acme").await);
        assert_eq!(before, after);
        gateway.shutdown().await;

        // The export sink holds every record exactly once, though its segments are gone.
        let exported = std::fs::read_to_string(&export).unwrap();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for line in exported.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            *seen
                .entry(v["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        for id in &ok {
            assert_eq!(seen.get(id), Some(&1), "record {id}");
        }
    })
    .await;
}
