//! The admin listener (token, balances, grants, metrics) and the outcomes endpoint, through
//! real HTTP, with the journal read back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate::config::Config;
use tollgate::mock::{MockConfig, MockServer};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

struct Admin {
    mock: MockServer,
    gateway: tollgate::RunningGateway,
    base: String,
    admin: String,
    http: reqwest::Client,
    journal: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn start(extra: &str) -> Admin {
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
    let extra = format!("{extra}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"T_ADMIN\"\n");
    let text = config_text(mock.addr(), &journal, "", &extra);
    let mut env = test_env();
    env.insert("T_ADMIN".into(), ADMIN_TOKEN.into());
    let config = Config::parse(&text, &env).unwrap();
    let gateway = tollgate::GatewayBuilder::new(config).start().await.unwrap();
    Admin {
        base: format!("http://{}", gateway.addr()),
        admin: format!("http://{}", gateway.admin_addr().unwrap()),
        mock,
        gateway,
        http: reqwest::Client::new(),
        journal,
        _dir: dir,
    }
}

const PREPAID: &str = r#"
[[prices]]
model_prefix = "gpt-4o"
input_per_mtok = "1000"
output_per_mtok = "1000"

[[outcome_prices]]
name = "ticket_resolved"
price = "0.50"

[[accounts]]
id = "acme"
prepaid = true
grants = [ { id = "start", amount = "0.005", priority = 1 } ]
"#;

fn dec(v: &Value) -> Decimal {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn admin_needs_the_token() {
    let a = start(PREPAID).await;
    for auth in [None, Some("wrong"), Some("test-admin-token-012345678")] {
        let mut req = a.http.get(format!("{}/admin/accounts/acme", a.admin));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.unwrap().status(), 401);
    }
    let ok = a
        .http
        .get(format!("{}/admin/accounts/acme", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let health = a
        .http
        .get(format!("{}/healthz", a.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let missing = a
        .http
        .get(format!("{}/admin/accounts/nobody", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn balance_top_up_and_the_next_request_sees_it() {
    let a = start(PREPAID).await;
    let chat = || {
        a.http
            .post(format!("{}/v1/chat/completions", a.base))
            .bearer_auth(ALICE)
            .json(&json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "one two three"}]}))
    };
    // Worst case: the cheap estimate (~100 body bytes / 3 ≈ 34 tokens) + 5 output tokens at
    // $1000/Mtok ≈ $0.039 > $0.005; the exact recount (3 prompt + 6 framing + 5 output tokens) still
    // costs $0.014: refused before any top-up.
    let refused = chat().send().await.unwrap();
    assert_eq!(refused.status(), 402);
    let v: Value = refused.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("insufficient balance"),
        "{v}"
    );
    assert_eq!(a.mock.request_count(), 0);

    let topup = a
        .http
        .post(format!("{}/admin/accounts/acme/grants", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"id": "topup-1", "amount": "1.00", "kind": "paid", "priority": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(topup.status(), 201);
    let view: Value = topup.json().await.unwrap();
    assert_eq!(dec(&view["balance"]), "1.005".parse::<Decimal>().unwrap());

    let dup = a
        .http
        .post(format!("{}/admin/accounts/acme/grants", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"id": "topup-1", "amount": "1.00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409, "grant ids are idempotent");
    let bad = a
        .http
        .post(format!("{}/admin/accounts/acme/grants", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"amount": "-3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let ok = chat().send().await.unwrap();
    assert_eq!(ok.status(), 200);
    ok.bytes().await.unwrap();
    assert!(
        a.gateway
            .ledger()
            .wait_written(1, Duration::from_secs(5))
            .await
    );
    let record = tollgate::ledger::journal::read_all(&a.journal)
        .unwrap()
        .remove(0);
    // 3 input + 5 output tokens at $1000/Mtok = $0.008.
    assert_eq!(record.cost, Some("0.008".parse().unwrap()));
    assert_eq!(record.unit.as_deref(), Some("USD"));

    let view: Value = a
        .http
        .get(format!("{}/admin/accounts/acme", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dec(&view["balance"]), "0.997".parse::<Decimal>().unwrap());
    assert_eq!(
        dec(&view["period_spend"]),
        "0.008".parse::<Decimal>().unwrap()
    );
    // Drawn from the priority-0 top-up first.
    let grants = view["grants"].as_array().unwrap();
    assert_eq!(grants[0]["id"], "topup-1");
    assert_eq!(
        dec(&grants[0]["remaining"]),
        "0.992".parse::<Decimal>().unwrap()
    );
    assert_eq!(
        dec(&grants[1]["remaining"]),
        "0.005".parse::<Decimal>().unwrap()
    );
}

#[tokio::test]
async fn outcomes_are_priced_journaled_and_refused_when_unaffordable() {
    let a = start(PREPAID).await;
    let report = |body: Value| {
        a.http
            .post(format!("{}/v1/outcomes", a.base))
            .bearer_auth(ALICE)
            .header("x-tollgate-feature", "support-bot")
            .json(&body)
    };
    // 0.50 each; the account holds 0.005.
    let refused = report(json!({"outcome": "ticket_resolved"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 402);
    let unknown = report(json!({"outcome": "invoice_processed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let malformed = report(json!({"outcome": 3})).send().await.unwrap();
    assert_eq!(malformed.status(), 400);

    a.http
        .post(format!("{}/admin/accounts/acme/grants", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"amount": "2"}))
        .send()
        .await
        .unwrap();
    let ok = report(json!({"outcome": "ticket_resolved", "quantity": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let v: Value = ok.json().await.unwrap();
    assert_eq!(dec(&v["cost"]), "1.5".parse::<Decimal>().unwrap());
    assert!(
        a.gateway
            .ledger()
            .wait_written(1, Duration::from_secs(5))
            .await
    );
    let r = tollgate::ledger::journal::read_all(&a.journal)
        .unwrap()
        .remove(0);
    assert_eq!(r.endpoint, tollgate::provider::Endpoint::Outcomes);
    assert_eq!(
        (r.metric.as_deref(), r.quantity),
        (Some("ticket_resolved"), Some(3))
    );
    assert_eq!(r.cost, Some("1.5".parse().unwrap()));
    assert_eq!(r.dimensions.feature.as_deref(), Some("support-bot"));
    assert_eq!(
        a.mock.request_count(),
        0,
        "outcomes never reach an upstream"
    );
}

#[tokio::test]
async fn metrics_count_requests_tokens_spend_and_refusals() {
    let a = start(PREPAID).await;
    a.http
        .post(format!("{}/admin/accounts/acme/grants", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"amount": "5"}))
        .send()
        .await
        .unwrap();
    for _ in 0..2 {
        a.http
            .post(format!("{}/v1/chat/completions", a.base))
            .bearer_auth(ALICE)
            .json(&json!({"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "a b"}]}))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    let unauth = a
        .http
        .post(format!("{}/v1/chat/completions", a.base))
        .bearer_auth("nope")
        .json(&json!({"model": "gpt-4o"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    assert!(
        a.gateway
            .ledger()
            .wait_written(2, Duration::from_secs(5))
            .await
    );
    let text = a
        .http
        .get(format!("{}/metrics", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "tollgate_requests_total{upstream=\"mock-openai\",model=\"gpt-4o*\",endpoint=\"chat_completions\",status=\"200\"} 2",
        "tollgate_tokens_total{model=\"gpt-4o*\",kind=\"input\"} 4",
        "tollgate_tokens_total{model=\"gpt-4o*\",kind=\"output\"} 8",
        "tollgate_spend_total{model=\"gpt-4o*\",unit=\"USD\"} 0.012",
        "tollgate_refusals_total{reason=\"auth\"} 1",
        "tollgate_journal_entries_written_total 3",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    assert!(text.contains("tollgate_upstream_ttfb_seconds_count{upstream=\"mock-openai\"} 2"));
    assert!(
        !text.contains(ALICE) && !text.contains("alice-dev"),
        "no per-key labels"
    );
}

#[tokio::test]
async fn limited_accounts_cannot_call_unpriced_models() {
    let a = start(PREPAID).await;
    a.http
        .post(format!("{}/admin/accounts/acme/grants", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"amount": "5"}))
        .send()
        .await
        .unwrap();
    let resp = a
        .http
        .post(format!("{}/v1/chat/completions", a.base))
        .bearer_auth(ALICE)
        .json(&json!({"model": "o3-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "a b"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 402);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has no price"),
        "{v}"
    );
    assert_eq!(a.mock.request_count(), 0);
    // An unlimited account (bob's globex is not configured) may: it is metered, not limited.
    let resp = a
        .http
        .post(format!("{}/v1/chat/completions", a.base))
        .bearer_auth(BOB)
        .json(&json!({"model": "o3-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "a b"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
