//! The gateway driven by the official `openai` and `anthropic` Python SDKs, used as an
//! application would (tollgate key as the API key, tollgate as the base URL), in front of the
//! mock upstream. `tests/e2e/sdk_clients.py` makes the calls and checks what the SDKs parsed;
//! this test checks that each call's journal record holds what the mock's rules say.
//!
//! Needs a Python with the pinned SDKs: `TOLLGATE_E2E_PYTHON`, else `<repo>/.venv/bin/python`
//! (`python3 -m venv .venv && .venv/bin/pip install -r tests/e2e/requirements.txt`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde::Deserialize;
use serde_json::Value;
use tollgate::ledger::Outcome;
use tollgate::provider::Endpoint;

/// What the script made, in order; the test fails if a call is dropped or added unnoticed.
const CALLS: &[&str] = &[
    "chat_completion",
    "chat_completion_stream",
    "chat_completion_stream_with_usage",
    "completion",
    "completion_stream",
    "embeddings",
    "response",
    "response_stream",
    "no_usage_stream",
    "message",
    "message_stream",
];

#[derive(Debug, Deserialize)]
struct Call {
    call: String,
    record_id: String,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
struct Expect {
    endpoint: Endpoint,
    model: String,
    streamed: bool,
    estimated: bool,
    /// `None` when the upstream reported no usage (see `estimate`).
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cached_input_tokens: u64,
    reasoning_tokens: u64,
    feature: Option<String>,
    workflow: Option<String>,
    end_user: Option<String>,
    estimate: Option<Estimate>,
}

/// What the tokenizer fallback counts, for a call whose upstream reported no usage.
#[derive(Debug, Deserialize)]
struct Estimate {
    /// The text of each chat message sent.
    prompt_messages: Vec<String>,
    /// Words of the mock's output (`tok tok ...`).
    output_words: usize,
}

fn python() -> PathBuf {
    const HOW: &str = "create it with: python3 -m venv .venv && \
                       .venv/bin/pip install -r tests/e2e/requirements.txt \
                       (or point TOLLGATE_E2E_PYTHON at a python that has them)";
    if let Some(p) = std::env::var_os("TOLLGATE_E2E_PYTHON") {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "TOLLGATE_E2E_PYTHON={} does not exist; {HOW}",
            p.display()
        );
        return p;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the openai/anthropic SDKs: {} is missing and TOLLGATE_E2E_PYTHON is \
         unset; {HOW}",
        venv.display()
    );
    venv
}

/// Runs the SDK script against the harness's gateway and returns its calls.
async fn run_sdk_clients(h: &Harness) -> Vec<Call> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/sdk_clients.py");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(&script)
        .arg("--openai-base")
        .arg(format!("{}/v1", h.base))
        .arg("--anthropic-base")
        .arg(&h.base)
        .arg("--key")
        .arg(ALICE)
        // Loopback only, and no ambient credentials or endpoints the SDKs would pick up.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for var in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("sdk_clients.py took over 120 s")
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sdk_clients.py failed ({}):\n{stderr}\nstdout:\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("sdk_clients.py printed no JSON list ({e}):\n{stdout}"))
}

#[tokio::test]
async fn official_sdks_through_the_gateway_are_metered_exactly() {
    let h = Harness::start().await;
    let calls = run_sdk_clients(&h).await;
    let names: Vec<&str> = calls.iter().map(|c| c.call.as_str()).collect();
    assert_eq!(names, CALLS);

    let records = h.records(calls.len() as u64).await;
    for c in &calls {
        let e = &c.expect;
        let r = records
            .iter()
            .find(|r| r.id.to_string() == c.record_id)
            .unwrap_or_else(|| panic!("{}: no journal record {}", c.call, c.record_id));
        let ctx = format!("{}: {r:#?}", c.call);
        assert_eq!((&*r.key_id, &*r.account), ("alice-dev", "acme"), "{ctx}");
        assert_eq!((r.status, r.outcome), (200, Outcome::Completed), "{ctx}");
        let upstream = if e.endpoint == Endpoint::Messages {
            "mock-anthropic"
        } else {
            "mock-openai"
        };
        assert_eq!(&*r.upstream, upstream, "{ctx}");
        assert_eq!(r.model.as_deref(), Some(e.model.as_str()), "{ctx}");
        assert_eq!(r.endpoint, e.endpoint, "{ctx}");
        assert_eq!(r.streamed, e.streamed, "{ctx}");
        assert_eq!(r.estimated, e.estimated, "{ctx}");

        let (input, output) = match &e.estimate {
            // The gateway's tokenizer fallback: message text plus OpenAI's framing allowance,
            // and the generated text as delivered.
            Some(est) => {
                assert!(e.estimated, "{ctx}");
                let messages = est.prompt_messages.len() as u64;
                (
                    tiktoken(&e.model, &est.prompt_messages.join("\n")) + messages * 3 + 3,
                    tiktoken(&e.model, &mock_text(est.output_words)),
                )
            }
            None => (e.input_tokens.unwrap(), e.output_tokens.unwrap()),
        };
        assert_eq!(
            (
                r.usage.input_tokens,
                r.usage.output_tokens,
                r.usage.cached_input_tokens,
                r.usage.reasoning_tokens,
                r.usage.cache_creation_input_tokens,
            ),
            (input, output, e.cached_input_tokens, e.reasoning_tokens, 0),
            "{ctx}"
        );
        assert_eq!(r.dimensions.feature, e.feature, "{ctx}");
        assert_eq!(r.dimensions.workflow, e.workflow, "{ctx}");
        assert_eq!(r.dimensions.end_user, e.end_user, "{ctx}");
    }

    // Every Chat/Completions stream went upstream with usage requested, including those whose
    // client did not ask (and, as the script checked, never saw the usage chunk).
    let streams: Vec<Value> = h
        .mock
        .received()
        .iter()
        .filter(|r| r.path.ends_with("/completions"))
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter(|v| v["stream"] == true)
        .collect();
    assert_eq!(streams.len(), 4, "chat x3 and completions x1 streamed");
    for s in &streams {
        assert_eq!(s["stream_options"]["include_usage"], true, "{s}");
    }
}
