//! Ledger sinks against real receivers: PostgreSQL on 127.0.0.1:5432 (a fresh database per
//! test), an in-process HTTP receiver for CloudEvents, and files in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rust_decimal::Decimal;
use serde::Deserialize;
use tokio_postgres::NoTls;
use uuid::Uuid;

use tollgate::balance::GrantKind;
use tollgate::config::Secret;
use tollgate::ledger::cloudevents::{CloudEventsSink, CloudEventsSinkConfig};
use tollgate::ledger::file_sink::FileSink;
use tollgate::ledger::postgres::{PostgresSink, PostgresSinkConfig};
use tollgate::ledger::sink::{Sink, SinkError};
use tollgate::ledger::sinks::{self, RawSinkConfig, SinkKind};
use tollgate::ledger::{Dimensions, GrantEntry, GrantSource, LedgerEntry, Outcome, UsageRecord};
use tollgate::provider::{Endpoint, TokenUsage};

// ---------------------------------------------------------------------------------------------
// Entries.
// ---------------------------------------------------------------------------------------------

fn at(secs: i64, micros: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, micros * 1_000).unwrap()
}

fn usage(account: &str, cost: &str) -> UsageRecord {
    UsageRecord {
        id: Uuid::now_v7(),
        timestamp: at(1_760_000_000, 123_456),
        key_id: "key-1".into(),
        account: account.into(),
        model: Some("gpt-4o-mini".into()),
        upstream: "openai".into(),
        endpoint: Endpoint::ChatCompletions,
        streamed: true,
        status: 200,
        outcome: Outcome::Completed,
        usage: TokenUsage {
            input_tokens: 1_200,
            output_tokens: 340,
            cached_input_tokens: 1_024,
            cache_creation_input_tokens: 7,
            reasoning_tokens: 128,
        },
        estimated: false,
        upstream_ttfb_us: Some(81_234),
        upstream_total_us: 1_234_567,
        dimensions: Dimensions {
            feature: Some("search".into()),
            workflow: Some("wf-9".into()),
            end_user: Some("user-42".into()),
        },
        cost: Some(Decimal::from_str(cost).unwrap()),
        rated_cost: Some(Decimal::from_str("0.000987654321012345").unwrap()),
        unit: Some("USD".into()),
        metric: None,
        quantity: None,
    }
}

/// A record with every optional field empty.
fn sparse_usage(account: &str) -> UsageRecord {
    UsageRecord {
        model: None,
        endpoint: Endpoint::Outcomes,
        streamed: false,
        status: 502,
        outcome: Outcome::UpstreamUnreachable,
        usage: TokenUsage::default(),
        estimated: true,
        upstream_ttfb_us: None,
        upstream_total_us: 0,
        dimensions: Dimensions::default(),
        cost: None,
        rated_cost: None,
        unit: None,
        metric: Some("ticket_resolved".into()),
        quantity: Some(3),
        ..usage(account, "0")
    }
}

fn grant(account: &str, amount: &str) -> GrantEntry {
    GrantEntry {
        id: Uuid::now_v7(),
        timestamp: at(1_760_000_100, 0),
        account: account.into(),
        grant_id: "topup-1".into(),
        amount: Decimal::from_str(amount).unwrap(),
        unit: "credits".into(),
        kind: GrantKind::Paid,
        priority: 5,
        expires_at: Some(at(1_770_000_000, 0)),
        expires_at_period_end: false,
        source: GrantSource::AutoTopUp,
    }
}

fn batch() -> Vec<LedgerEntry> {
    vec![
        LedgerEntry::Usage(usage("acme", "0.000123456789012345")),
        LedgerEntry::Grant(grant("acme", "250.5")),
        LedgerEntry::Usage(sparse_usage("globex")),
    ]
}

fn is_retryable(r: &Result<(), SinkError>) -> bool {
    matches!(r, Err(SinkError::Retryable(_)))
}

fn is_rejected(r: &Result<(), SinkError>) -> bool {
    matches!(r, Err(SinkError::Rejected(_)))
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL.
// ---------------------------------------------------------------------------------------------

const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// A database created for one test and dropped by [`TestDb::drop_db`].
struct TestDb {
    name: String,
    admin: tokio_postgres::Client,
}

impl TestDb {
    async fn create() -> TestDb {
        let (admin, conn) = tokio_postgres::connect(PG_ADMIN, NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth)");
        tokio::spawn(conn);
        let name = format!("tollgate_test_{}", Uuid::now_v7().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb { name, admin }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }

    fn sink(&self) -> PostgresSink {
        PostgresSink::new("pg", &PostgresSinkConfig::new(Secret::new(self.url())))
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    /// Ends the sink's connections (as a database restart would).
    async fn kick(&self) {
        self.admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .unwrap();
    }

    async fn drop_db(self) {
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap();
    }
}

async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn postgres_creates_its_schema_idempotently() {
    let db = TestDb::create().await;
    // Several gateways starting at once on an empty database: the advisory lock serialises
    // them, and every one succeeds.
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let sink = db.sink();
            tokio::spawn(async move { sink.connect_and_migrate().await })
        })
        .collect();
    for racer in racers {
        racer.await.unwrap().unwrap();
    }
    let sink = db.sink();
    sink.connect_and_migrate().await.unwrap();
    sink.connect_and_migrate().await.unwrap();
    // A second gateway on the same database finds the schema in place.
    let other = db.sink();
    other.connect_and_migrate().await.unwrap();
    let client = db.client().await;
    let versions: Vec<i32> = client
        .query("SELECT version FROM tollgate_schema_version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![1]);
    let columns: Vec<(String, String)> = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_name = 'tollgate_usage' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let get = |c: &str| {
        columns
            .iter()
            .find(|(n, _)| n == c)
            .map(|(_, t)| t.as_str())
    };
    assert_eq!(get("id"), Some("uuid"));
    assert_eq!(get("cost"), Some("numeric"));
    assert_eq!(get("input_tokens"), Some("bigint"));
    assert_eq!(get("recorded_at"), Some("timestamp with time zone"));
    assert_eq!(columns.len(), 27);
    drop((sink, other, client));
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_delivers_each_entry_once_with_exact_values() {
    let db = TestDb::create().await;
    let sink = db.sink();
    let entries = batch();
    // No explicit migration: the first delivery connects and creates the schema.
    sink.deliver(&entries).await.unwrap();
    // The same batch again (a replay after a crash), and an overlapping one.
    sink.deliver(&entries).await.unwrap();
    let extra = LedgerEntry::Usage(usage("acme", "1"));
    sink.deliver(&[entries[0].clone(), extra.clone()])
        .await
        .unwrap();
    sink.deliver(&[]).await.unwrap();

    let client = db.client().await;
    assert_eq!(count(&client, "tollgate_usage").await, 3);
    assert_eq!(count(&client, "tollgate_grants").await, 1);

    let LedgerEntry::Usage(full) = &entries[0] else {
        unreachable!()
    };
    let row = client
        .query_one(
            "SELECT timestamp, key_id, account, model, upstream, endpoint, streamed, status, \
                    outcome, input_tokens, output_tokens, cached_input_tokens, \
                    cache_creation_input_tokens, reasoning_tokens, estimated, upstream_ttfb_us, \
                    upstream_total_us, feature, workflow, end_user, cost::text, \
                    rated_cost::text, unit, metric, quantity, recorded_at \
             FROM tollgate_usage WHERE id = $1",
            &[&full.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, DateTime<Utc>>(0), full.timestamp);
    assert_eq!(row.get::<_, &str>(1), "key-1");
    assert_eq!(row.get::<_, &str>(2), "acme");
    assert_eq!(row.get::<_, Option<&str>>(3), Some("gpt-4o-mini"));
    assert_eq!(row.get::<_, &str>(4), "openai");
    assert_eq!(row.get::<_, &str>(5), "chat_completions");
    assert!(row.get::<_, bool>(6));
    assert_eq!(row.get::<_, i32>(7), 200);
    assert_eq!(row.get::<_, &str>(8), "completed");
    assert_eq!(row.get::<_, i64>(9), 1_200);
    assert_eq!(row.get::<_, i64>(10), 340);
    assert_eq!(row.get::<_, i64>(11), 1_024);
    assert_eq!(row.get::<_, i64>(12), 7);
    assert_eq!(row.get::<_, i64>(13), 128);
    assert!(!row.get::<_, bool>(14));
    assert_eq!(row.get::<_, Option<i64>>(15), Some(81_234));
    assert_eq!(row.get::<_, i64>(16), 1_234_567);
    assert_eq!(row.get::<_, Option<&str>>(17), Some("search"));
    assert_eq!(row.get::<_, Option<&str>>(18), Some("wf-9"));
    assert_eq!(row.get::<_, Option<&str>>(19), Some("user-42"));
    assert_eq!(row.get::<_, Option<&str>>(20), Some("0.000123456789012345"));
    assert_eq!(row.get::<_, Option<&str>>(21), Some("0.000987654321012345"));
    assert_eq!(row.get::<_, Option<&str>>(22), Some("USD"));
    assert_eq!(row.get::<_, Option<&str>>(23), None);
    assert_eq!(row.get::<_, Option<i64>>(24), None);
    let recorded: DateTime<Utc> = row.get(25);
    assert!((Utc::now() - recorded).num_seconds().abs() < 60);

    let LedgerEntry::Usage(sparse) = &entries[2] else {
        unreachable!()
    };
    let row = client
        .query_one(
            "SELECT model, endpoint, status, outcome, input_tokens, estimated, \
                    upstream_ttfb_us, feature, cost, rated_cost, unit, metric, quantity \
             FROM tollgate_usage WHERE id = $1",
            &[&sparse.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<&str>>(0), None);
    assert_eq!(row.get::<_, &str>(1), "outcomes");
    assert_eq!(row.get::<_, i32>(2), 502);
    assert_eq!(row.get::<_, &str>(3), "upstream_unreachable");
    assert_eq!(row.get::<_, i64>(4), 0);
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, Option<i64>>(6), None);
    assert_eq!(row.get::<_, Option<&str>>(7), None);
    // Untyped NULL checks: the numeric columns are null.
    let nulls: bool = client
        .query_one(
            "SELECT cost IS NULL AND rated_cost IS NULL FROM tollgate_usage WHERE id = $1",
            &[&sparse.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(nulls);
    assert_eq!(row.get::<_, Option<&str>>(10), None);
    assert_eq!(row.get::<_, Option<&str>>(11), Some("ticket_resolved"));
    assert_eq!(row.get::<_, Option<i64>>(12), Some(3));

    let LedgerEntry::Grant(g) = &entries[1] else {
        unreachable!()
    };
    let row = client
        .query_one(
            "SELECT id, timestamp, account, grant_id, amount::text, unit, kind, priority, \
                    expires_at, expires_at_period_end, source \
             FROM tollgate_grants",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), g.id);
    assert_eq!(row.get::<_, DateTime<Utc>>(1), g.timestamp);
    assert_eq!(row.get::<_, &str>(2), "acme");
    assert_eq!(row.get::<_, &str>(3), "topup-1");
    assert_eq!(row.get::<_, &str>(4), "250.5");
    assert_eq!(row.get::<_, &str>(5), "credits");
    assert_eq!(row.get::<_, &str>(6), "paid");
    assert_eq!(row.get::<_, i32>(7), 5);
    assert_eq!(row.get::<_, Option<DateTime<Utc>>>(8), g.expires_at);
    assert!(!row.get::<_, bool>(9));
    assert_eq!(row.get::<_, &str>(10), "auto_top_up");

    // Sums over numeric stay exact.
    let total: String = client
        .query_one(
            "SELECT sum(cost)::text FROM tollgate_usage WHERE account = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, "1.000123456789012345");
    drop((sink, client));
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_reconnects_after_losing_its_connection() {
    let db = TestDb::create().await;
    let sink = db.sink();
    sink.deliver(&batch()).await.unwrap();
    db.kick().await;
    let next = batch();
    // The first attempt may find the connection dead (retryable); a retry reconnects.
    let first = sink.deliver(&next).await;
    if first.is_err() {
        assert!(is_retryable(&first), "{first:?}");
        sink.deliver(&next).await.unwrap();
    }
    let client = db.client().await;
    assert_eq!(count(&client, "tollgate_usage").await, 4);
    assert_eq!(count(&client, "tollgate_grants").await, 2);
    drop((sink, client));
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_down_is_retryable_and_quick() {
    let sink = PostgresSink::new(
        "pg",
        &PostgresSinkConfig::new(Secret::new(
            "postgres://postgres:hunter2@127.0.0.1:1/test".into(),
        )),
    );
    let started = Instant::now();
    let result = sink.deliver(&batch()).await;
    assert!(is_retryable(&result), "{result:?}");
    assert!(!format!("{result:?}").contains("hunter2"));
    assert!(is_retryable(&sink.connect_and_migrate().await));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Blackholed address: bounded by the connect timeout.
    let mut config = PostgresSinkConfig::new(Secret::new(
        "host=10.255.255.1 port=5432 user=postgres dbname=test".into(),
    ));
    config.connect_timeout = Duration::from_millis(300);
    let sink = PostgresSink::new("pg", &config);
    let started = Instant::now();
    let result = sink.deliver(&batch()).await;
    assert!(is_retryable(&result), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn postgres_with_an_invalid_url_rejects_without_panicking() {
    let sink = PostgresSink::new(
        "pg",
        &PostgresSinkConfig::new(Secret::new("postgres://u@h:notaport/db".into())),
    );
    let result = sink.deliver(&batch()).await;
    assert!(is_rejected(&result), "{result:?}");
}

// ---------------------------------------------------------------------------------------------
// CloudEvents.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Received {
    ids: Vec<String>,
    events: Vec<serde_json::Value>,
    authorization: Vec<Option<String>>,
    problems: Vec<String>,
}

struct Receiver {
    addr: SocketAddr,
    /// Status answered to a valid batch.
    status: Arc<AtomicU16>,
    /// Pause before answering, ms.
    delay_ms: Arc<AtomicU64>,
    received: Arc<Mutex<Received>>,
}

impl Receiver {
    fn url(&self) -> http::Uri {
        format!("http://{}/api/v1/events", self.addr)
            .parse()
            .unwrap()
    }
}

/// Checks a batch as a CloudEvents receiver would; returns the problems found.
fn check_batch(content_type: Option<&str>, body: &[u8]) -> (Vec<serde_json::Value>, Vec<String>) {
    let mut problems = Vec::new();
    if content_type != Some("application/cloudevents-batch+json") {
        problems.push(format!("content-type {content_type:?}"));
    }
    let events: Vec<serde_json::Value> = match serde_json::from_slice(body) {
        Ok(serde_json::Value::Array(events)) => events,
        other => {
            problems.push(format!("body is not a JSON array: {other:?}"));
            return (Vec::new(), problems);
        }
    };
    for (i, e) in events.iter().enumerate() {
        if e["specversion"] != "1.0" {
            problems.push(format!("[{i}].specversion"));
        }
        for attr in ["id", "source", "type", "subject", "time"] {
            if e[attr].as_str().is_none_or(str::is_empty) {
                problems.push(format!("[{i}].{attr} missing"));
            }
        }
        if e["time"]
            .as_str()
            .is_none_or(|t| DateTime::parse_from_rfc3339(t).is_err())
        {
            problems.push(format!("[{i}].time is not RFC 3339"));
        }
        if e["datacontenttype"] != "application/json" || !e["data"].is_object() {
            problems.push(format!("[{i}].data"));
        }
    }
    (events, problems)
}

async fn receiver() -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(AtomicU16::new(200));
    let delay_ms = Arc::new(AtomicU64::new(0));
    let received = Arc::new(Mutex::new(Received::default()));
    let (s, d, r) = (status.clone(), delay_ms.clone(), received.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (s, d, r) = (s.clone(), d.clone(), r.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (s, d, r) = (s.clone(), d.clone(), r.clone());
                    async move {
                        let content_type = req
                            .headers()
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let authorization = req
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let (events, problems) = check_batch(content_type.as_deref(), &body);
                        let delay = d.load(Ordering::Relaxed);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let status = if problems.is_empty() {
                            s.load(Ordering::Relaxed)
                        } else {
                            400
                        };
                        {
                            let mut r = r.lock().unwrap();
                            r.authorization.push(authorization);
                            if status == 200 {
                                r.ids.extend(
                                    events.iter().map(|e| e["id"].as_str().unwrap().to_string()),
                                );
                                r.events.extend(events);
                            }
                            r.problems.extend(problems.clone());
                        }
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(problems.join("; "))))
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
        status,
        delay_ms,
        received,
    }
}

#[tokio::test]
async fn cloudevents_posts_a_valid_batch_with_authorization() {
    let rx = receiver().await;
    let mut config = CloudEventsSinkConfig::new(rx.url());
    config.authorization = Some(Secret::new("Bearer om_secret_token".into()));
    config.source = "tollgate-test".into();
    let sink = CloudEventsSink::new("openmeter", config.clone());
    assert!(!format!("{config:?}").contains("om_secret_token"));
    let entries = batch();
    sink.deliver(&entries).await.unwrap();
    sink.deliver(&[]).await.unwrap();

    let r = rx.received.lock().unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(
        r.ids,
        entries
            .iter()
            .map(|e| e.id().to_string())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        r.authorization,
        vec![Some("Bearer om_secret_token".to_string())]
    );
    let usage = &r.events[0];
    assert_eq!(usage["type"], "tollgate.usage");
    assert_eq!(usage["source"], "tollgate-test");
    assert_eq!(usage["subject"], "acme");
    assert_eq!(
        DateTime::parse_from_rfc3339(usage["time"].as_str().unwrap()).unwrap(),
        at(1_760_000_000, 123_456)
    );
    assert_eq!(usage["data"]["input_tokens"], 1_200);
    assert_eq!(usage["data"]["cost"], "0.000123456789012345");
    assert_eq!(usage["data"]["model"], "gpt-4o-mini");
    assert!(usage["data"].get("type").is_none());
    let grant = &r.events[1];
    assert_eq!(grant["type"], "tollgate.grant");
    assert_eq!(grant["data"]["amount"], "250.5");
    assert_eq!(r.events[2]["subject"], "globex");
    // The data round-trips to the record.
    let back: UsageRecord = serde_json::from_value(usage["data"].clone()).unwrap();
    assert_eq!(LedgerEntry::Usage(back), entries[0]);
}

#[tokio::test]
async fn cloudevents_classifies_failures() {
    let rx = receiver().await;
    let sink = CloudEventsSink::new("ce", CloudEventsSinkConfig::new(rx.url()));
    let entries = batch();

    rx.status.store(500, Ordering::Relaxed);
    assert!(is_retryable(&sink.deliver(&entries).await));
    rx.status.store(503, Ordering::Relaxed);
    assert!(is_retryable(&sink.deliver(&entries).await));
    rx.status.store(429, Ordering::Relaxed);
    assert!(is_retryable(&sink.deliver(&entries).await));
    rx.status.store(408, Ordering::Relaxed);
    assert!(is_retryable(&sink.deliver(&entries).await));
    rx.status.store(400, Ordering::Relaxed);
    let rejected = sink.deliver(&entries).await;
    assert!(is_rejected(&rejected), "{rejected:?}");
    rx.status.store(401, Ordering::Relaxed);
    assert!(is_rejected(&sink.deliver(&entries).await));
    rx.status.store(202, Ordering::Relaxed);
    sink.deliver(&entries).await.unwrap();
    {
        let r = rx.received.lock().unwrap();
        // No authorization configured: none sent.
        assert!(r.authorization.iter().all(Option::is_none));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    // Too slow: retryable, within about the timeout.
    let mut config = CloudEventsSinkConfig::new(rx.url());
    config.timeout = Duration::from_millis(200);
    let slow = CloudEventsSink::new("ce", config);
    rx.delay_ms.store(2_000, Ordering::Relaxed);
    let started = Instant::now();
    assert!(is_retryable(&slow.deliver(&entries).await));
    assert!(started.elapsed() < Duration::from_millis(1_500));

    // Nobody listening: retryable.
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let down = CloudEventsSink::new(
        "ce",
        CloudEventsSinkConfig::new(format!("http://{closed}/events").parse().unwrap()),
    );
    let result = down.deliver(&entries).await;
    assert!(is_retryable(&result), "{result:?}");
}

// ---------------------------------------------------------------------------------------------
// File.
// ---------------------------------------------------------------------------------------------

fn read_entries(path: &std::path::Path) -> Vec<LedgerEntry> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn file_sink_appends_lines_that_parse_back_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export/ledger.jsonl");
    let sink = FileSink::new("file", &path);
    let first = batch();
    sink.deliver(&first).await.unwrap();
    sink.deliver(&first).await.unwrap();
    let second = batch();
    sink.deliver(&second).await.unwrap();
    let all: Vec<LedgerEntry> = first.iter().chain(&second).cloned().collect();
    assert_eq!(read_entries(&path), all);
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(raw.lines().next().unwrap().contains(r#""type":"usage""#));

    // A restart replaying the last batch adds nothing; a torn line from a crash is cut off.
    drop(sink);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"type":"usage","id":"01"#).unwrap();
    }
    let sink = FileSink::new("file", &path);
    sink.deliver(&second).await.unwrap();
    let third = batch();
    sink.deliver(&third).await.unwrap();
    let all: Vec<LedgerEntry> = all.into_iter().chain(third).collect();
    assert_eq!(read_entries(&path), all);
}

#[tokio::test]
async fn file_sink_that_cannot_write_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let sink = FileSink::new("file", blocker.join("ledger.jsonl"));
    let result = sink.deliver(&batch()).await;
    assert!(is_retryable(&result), "{result:?}");
}

// ---------------------------------------------------------------------------------------------
// Configuration.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Doc {
    sinks: Vec<RawSinkConfig>,
}

fn parse(text: &str) -> Vec<RawSinkConfig> {
    toml::from_str::<Doc>(text).unwrap().sinks
}

fn env() -> HashMap<String, String> {
    HashMap::from([
        (
            "PG_URL".to_string(),
            "postgres://tollgate:pg-password@127.0.0.1:1/ledger".to_string(),
        ),
        ("OM_AUTH".to_string(), "Bearer om-token".to_string()),
        ("BAD_HEADER".to_string(), "Bearer a\nb".to_string()),
    ])
}

#[test]
fn config_validates_with_defaults_and_hides_secrets() {
    let raw = parse(
        r#"
        [[sinks]]
        kind = "postgres"
        url_env = "PG_URL"

        [[sinks]]
        kind = "cloudevents"
        url = "https://openmeter.example.com/api/v1/events"
        auth_header_env = "OM_AUTH"

        [[sinks]]
        kind = "cloudevents"
        name = "backup-events"
        url = "http://127.0.0.1:9/events"
        source = "tollgate-eu"
        timeout_ms = 1500

        [[sinks]]
        kind = "file"
        path = "data/export.jsonl"
        "#,
    );
    let mut problems = Vec::new();
    let configs = sinks::validate(raw, &env(), &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["postgres", "cloudevents", "backup-events", "file"]);
    match &configs[1].kind {
        SinkKind::CloudEvents(c) => {
            assert_eq!(c.source, "tollgate");
            assert_eq!(c.timeout, Duration::from_secs(10));
            assert_eq!(
                c.authorization.as_ref().map(Secret::expose),
                Some("Bearer om-token")
            );
        }
        other => panic!("{other:?}"),
    }
    match &configs[2].kind {
        SinkKind::CloudEvents(c) => {
            assert_eq!(c.source, "tollgate-eu");
            assert_eq!(c.timeout, Duration::from_millis(1500));
            assert!(c.authorization.is_none());
        }
        other => panic!("{other:?}"),
    }
    let shown = format!("{configs:?}");
    assert!(!shown.contains("pg-password"), "{shown}");
    assert!(!shown.contains("om-token"), "{shown}");
}

#[test]
fn config_problems_name_their_fields() {
    let raw = parse(
        r#"
        [[sinks]]
        kind = "postgres"
        url_env = "MISSING"

        [[sinks]]
        kind = "cloudevents"
        url = "ftp://example.com"

        [[sinks]]
        kind = "cloudevents"
        url = "http://example.com"
        auth_header_env = "BAD_HEADER"
        timeout_ms = 0
        source = ""

        [[sinks]]
        kind = "file"
        path = "a.jsonl"

        [[sinks]]
        kind = "file"
        path = "b.jsonl"

        [[sinks]]
        kind = "file"
        name = "../escape"
        path = "c.jsonl"
        "#,
    );
    let mut problems = Vec::new();
    let configs = sinks::validate(raw, &env(), &mut problems);
    let expect = [
        "sinks[0].url_env: environment variable `MISSING` is not set",
        "sinks[1].url: `ftp://example.com` is not an http(s) URL",
        "sinks[2].auth_header_env: the value of `BAD_HEADER` is not a valid header value",
        "sinks[2].source: must not be empty",
        "sinks[2].timeout_ms: must be positive",
        "sinks[4].name: another sink is already named `file`; give this one a `name`",
        "sinks[5].name: `../escape` may only hold ASCII letters, digits, `-` and `_`",
    ];
    assert_eq!(problems, expect);
    assert!(problems.iter().all(|p| !p.contains("Bearer a")));
    assert_eq!(configs.len(), 1);

    // Unknown fields and kinds are refused when parsing.
    assert!(
        toml::from_str::<Doc>("[[sinks]]\nkind = \"file\"\npath = \"x\"\nextra = 1\n").is_err()
    );
    assert!(toml::from_str::<Doc>("[[sinks]]\nkind = \"kafka\"\n").is_err());

    let mut problems = Vec::new();
    let bad_url = HashMap::from([("PG_URL".to_string(), "postgres://u:pw@h:xx/db".to_string())]);
    sinks::validate(
        parse("[[sinks]]\nkind = \"postgres\"\nurl_env = \"PG_URL\"\n"),
        &bad_url,
        &mut problems,
    );
    assert_eq!(problems.len(), 1);
    assert!(problems[0].starts_with("sinks[0].url_env: the value of `PG_URL` is not a valid"));
    assert!(!problems[0].contains("pw@"));
}

#[tokio::test]
async fn build_never_waits_for_sinks_that_are_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let raw = parse(&format!(
        r#"
        [[sinks]]
        kind = "postgres"
        url_env = "PG_URL"

        [[sinks]]
        kind = "cloudevents"
        url = "http://127.0.0.1:1/events"

        [[sinks]]
        kind = "file"
        path = "{}"
        "#,
        path.display()
    ));
    let mut problems = Vec::new();
    let configs = sinks::validate(raw, &env(), &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let started = Instant::now();
    let built = sinks::build(&configs).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    let names: Vec<&str> = built.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["postgres", "cloudevents", "file"]);
    let entries = batch();
    assert!(is_retryable(&built[0].deliver(&entries).await));
    assert!(is_retryable(&built[1].deliver(&entries).await));
    built[2].deliver(&entries).await.unwrap();
    assert_eq!(read_entries(&path), entries);
}
