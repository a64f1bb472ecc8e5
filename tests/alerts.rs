//! Alert webhooks end to end: a local receiver records every request and checks its
//! signature, and the tests count deliveries, retries, give-ups and drops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tollgate::alert::{self, AlertEvent, AlertKind, Alerter, AlerterConfig};
use tollgate::config::Secret;

const SECRET: &str = "whsec_test_secret";
const DRAIN: Duration = Duration::from_secs(10);

/// How the receiver answers its n-th request (0-based).
#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    Hang,
}

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
struct Recorded {
    content_type: Option<String>,
    event_id: String,
    timestamp: i64,
    signature_valid: bool,
    body: Bytes,
    status: u16,
}

struct Receiver {
    addr: SocketAddr,
    /// Requests answered.
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Requests that arrived, answered or not.
    arrived: Arc<AtomicUsize>,
}

impl Receiver {
    fn url(&self) -> String {
        format!("http://{}/hooks/tollgate", self.addr)
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn accepted(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }
}

fn header(req: &http::request::Parts, name: &str) -> Option<String> {
    req.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A webhook receiver on 127.0.0.1:0 answering request n with `answer(n)`.
async fn receiver(answer: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
    let arrived = Arc::new(AtomicUsize::new(0));
    let seen = arrived.clone();
    let answer = Arc::new(answer);
    let log = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (log, seen, answer) = (log.clone(), seen.clone(), answer.clone());
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (log, seen, answer) = (log.clone(), seen.clone(), answer.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    let timestamp: i64 = header(&parts, "x-tollgate-timestamp")
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(i64::MIN);
                    let signature = header(&parts, "x-tollgate-signature").unwrap_or_default();
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    let status = match answer(n) {
                        Answer::Status(s) => s,
                        Answer::Hang => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            200
                        }
                    };
                    log.lock().unwrap().push(Recorded {
                        content_type: header(&parts, "content-type"),
                        event_id: header(&parts, "x-tollgate-event-id").unwrap_or_default(),
                        timestamp,
                        signature_valid: alert::verify(SECRET, timestamp, &body, &signature),
                        body,
                        status,
                    });
                    let response = http::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Receiver {
        addr,
        requests,
        arrived,
    }
}

fn config() -> AlerterConfig {
    let mut c = AlerterConfig::new(Secret::new(SECRET.to_string()));
    c.max_attempts = 3;
    c.initial_backoff = Duration::from_millis(10);
    c.max_backoff = Duration::from_millis(40);
    c.request_timeout = Duration::from_secs(2);
    c
}

fn event() -> AlertEvent {
    let mut e = AlertEvent::new(
        AlertKind::SpendThreshold,
        "acme",
        "75.00",
        "USD",
        "acme reached 75% of its 100.00 USD monthly cap",
    );
    e.key_id = Some("acme-prod".into());
    e.period_start = Some("2025-01-01T00:00:00Z".parse().unwrap());
    e.threshold = Some("0.75".into());
    e.limit = Some("100.00".into());
    e
}

#[tokio::test]
async fn one_event_reaches_each_target_once_signed() {
    let a = receiver(|_| Answer::Status(200)).await;
    let b = receiver(|_| Answer::Status(204)).await;
    let alerter = Alerter::start(config());
    let sent = event();
    alerter.send(sent.clone(), vec![a.url(), b.url()]);
    assert!(alerter.drain(DRAIN).await);

    assert_eq!(alerter.delivered(), 2);
    assert_eq!(alerter.failed(), 0);
    assert_eq!(alerter.dropped(), 0);
    for r in [&a, &b] {
        let got = r.requests();
        assert_eq!(got.len(), 1);
        let got = &got[0];
        assert!(got.signature_valid, "bad signature");
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        assert_eq!(got.event_id, sent.id.to_string());
        assert!((got.timestamp - chrono::Utc::now().timestamp()).abs() < 60);
        let parsed: AlertEvent = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(parsed, sent);
    }
}

#[tokio::test]
async fn server_errors_are_retried_until_accepted_once() {
    let r = receiver(|n| Answer::Status(if n < 2 { 500 } else { 200 })).await;
    let alerter = Alerter::start(config());
    let sent = event();
    alerter.send(sent.clone(), vec![r.url()]);
    assert!(alerter.drain(DRAIN).await);

    let all = r.requests();
    assert_eq!(
        all.iter().map(|x| x.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    assert!(all.iter().all(|x| x.signature_valid));
    // Every attempt carries the same idempotency key.
    assert!(all.iter().all(|x| x.event_id == sent.id.to_string()));
    assert_eq!(r.accepted().len(), 1);
    assert_eq!(r.arrived.load(Ordering::SeqCst), 3);
    assert_eq!(alerter.delivered(), 1);
    assert_eq!(alerter.failed(), 0);
}

#[tokio::test]
async fn a_dead_target_is_given_up_after_max_attempts() {
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let alerter = Alerter::start(config());
    alerter.send(event(), vec![format!("http://{closed}/hook")]);
    assert!(alerter.drain(DRAIN).await);
    assert_eq!(alerter.failed(), 1);
    assert_eq!(alerter.delivered(), 0);
}

#[tokio::test]
async fn a_silent_receiver_times_out_and_is_retried() {
    let r = receiver(|_| Answer::Hang).await;
    let mut c = config();
    c.max_attempts = 2;
    c.request_timeout = Duration::from_millis(200);
    let alerter = Alerter::start(c);
    alerter.send(event(), vec![r.url()]);
    assert!(alerter.drain(DRAIN).await);
    assert_eq!(alerter.failed(), 1);
    assert_eq!(alerter.delivered(), 0);
    assert_eq!(r.arrived.load(Ordering::SeqCst), 2);
    assert!(r.requests().is_empty());
}

#[tokio::test]
async fn a_malformed_target_fails_without_affecting_the_others() {
    let r = receiver(|_| Answer::Status(200)).await;
    let alerter = Alerter::start(config());
    alerter.send(
        event(),
        vec!["not a url".into(), "ftp://example.com/x".into(), r.url()],
    );
    assert!(alerter.drain(DRAIN).await);
    assert_eq!(alerter.failed(), 2);
    assert_eq!(alerter.delivered(), 1);
    assert_eq!(r.requests().len(), 1);
}

/// The default test runtime is single-threaded, so the delivery task cannot run between
/// these `send`s: the one-slot channel takes the first event and the rest are dropped.
#[tokio::test]
async fn a_full_channel_drops_and_counts() {
    let r = receiver(|_| Answer::Status(200)).await;
    let mut c = config();
    c.channel_capacity = 1;
    let alerter = Alerter::start(c);
    for _ in 0..5 {
        alerter.send(event(), vec![r.url()]);
    }
    assert_eq!(alerter.dropped(), 4);
    assert!(alerter.drain(DRAIN).await);
    assert_eq!(alerter.delivered(), 1);
    assert_eq!(r.requests().len(), 1);
}

#[tokio::test]
async fn drain_returns_at_once_when_nothing_was_sent() {
    let alerter = Alerter::start(config());
    assert!(alerter.drain(Duration::from_millis(1)).await);
}
