//! The load bench's open-loop generator (`tollgate-loadgen`) against the mock upstream over
//! loopback: it keeps the asked rate, reads whole JSON and chunked SSE responses, and counts
//! what went wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use tollgate::mock::{MockConfig, MockServer};

/// The loadgen's keys are `tg-bench-<i>`; the mock accepts this one.
const KEY: &str = "tg-bench-0";

async fn mock() -> MockServer {
    MockServer::start(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig {
            openai_key: KEY.into(),
            anthropic_key: KEY.into(),
            ..MockConfig::default()
        },
    )
    .await
    .unwrap()
}

/// Runs the generator against `mock` and returns its `LOADJSON` object.
async fn loadgen(mock: &MockServer, args: &[&str]) -> serde_json::Value {
    let addr = mock.addr().to_string();
    let mut all = run_loadgen(["--addr", addr.as_str()].iter().chain(args)).await;
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

/// Runs the generator with exactly these arguments; its `LOADJSON` objects, in order.
async fn run_loadgen<'a>(args: impl Iterator<Item = &'a &'a str>) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-loadgen"));
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let all: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("LOADJSON "))
        .map(|json| serde_json::from_str(json).unwrap())
        .collect();
    assert!(!all.is_empty(), "no LOADJSON line in {stdout:?}");
    all
}

fn errors(report: &serde_json::Value) -> u64 {
    report["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_rate_for_json_and_sse_responses() {
    let mock = mock().await;
    for (arrivals, stream) in [("poisson", false), ("uniform", true)] {
        let mut args = vec![
            "--rate",
            "200",
            "--duration-s",
            "1.5",
            "--connections",
            "4",
            "--nkeys",
            "1",
            "--arrivals",
            arrivals,
        ];
        if stream {
            args.extend(["--stream", "--max-tokens", "20"]);
        }
        let r = loadgen(&mock, &args).await;
        assert_eq!(errors(&r), 0, "{r}");
        let n = r["requests"].as_u64().unwrap();
        // 300 expected; Poisson counts vary (sd ~17).
        assert!((230..=370).contains(&n), "{arrivals}: {n} requests: {r}");
        if arrivals == "uniform" {
            assert!((295..=305).contains(&n), "uniform: {n} requests: {r}");
        }
        let lat = &r["latency_us"];
        assert!(lat["min"].as_u64().unwrap() > 0, "{r}");
        assert!(lat["p50"].as_u64() <= lat["p99"].as_u64(), "{r}");
        // Every response was read whole: at least the SSE events' bytes of each.
        let per_response = r["bytes"].as_u64().unwrap() / n;
        let least = if stream { 20 * 50 } else { 200 };
        assert!(
            per_response > least,
            "{per_response} bytes per response: {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_refused_requests_and_a_dead_server() {
    let mock = mock().await;
    // Key tg-bench-1 is refused (401): about half of the requests.
    let r = loadgen(
        &mock,
        &[
            "--rate",
            "200",
            "--duration-s",
            "1",
            "--connections",
            "2",
            "--nkeys",
            "2",
        ],
    )
    .await;
    let (n, status) = (
        r["requests"].as_u64().unwrap(),
        r["errors"]["status"].as_u64().unwrap(),
    );
    assert!(status > n / 4 && status < n * 3 / 4, "{status} of {n}: {r}");

    let addr = mock.addr();
    mock.shutdown().await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-loadgen"));
    cmd.args([
        "--addr",
        &addr.to_string(),
        "--rate",
        "50",
        "--duration-s",
        "0.5",
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(stdout.trim().strip_prefix("LOADJSON ").unwrap()).unwrap();
    assert_eq!(r["requests"], 0, "{r}");
    assert!(r["errors"]["connect"].as_u64().unwrap() > 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_targets_take_turns_at_the_rate_each() {
    let (one, two) = (mock().await, mock().await);
    let (a1, a2) = (one.addr().to_string(), two.addr().to_string());
    let args = [
        "--addr",
        &a1,
        "--addr",
        &a2,
        "--rate",
        "200",
        "--duration-s",
        "2",
        "--epoch-ms",
        "100",
        "--connections",
        "2",
        "--nkeys",
        "1",
    ];
    let reports = run_loadgen(args.iter()).await;
    assert_eq!(reports.len(), 2, "{reports:?}");
    for (r, addr) in reports.iter().zip([&a1, &a2]) {
        assert_eq!(r["addr"], addr.as_str(), "{r}");
        assert_eq!(errors(r), 0, "{r}");
        // Each had 10 turns of 100 ms: 1 s at 200/s (Poisson, sd ~14).
        assert_eq!(r["duration_us"], 1_000_000, "{r}");
        let n = r["requests"].as_u64().unwrap();
        assert!((150..=250).contains(&n), "{addr}: {n} requests: {r}");
    }
}
