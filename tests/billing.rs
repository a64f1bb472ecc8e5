//! Billing end to end: prices, hard caps, prepaid wallets, stream cuts, rate limits,
//! concurrency and alerts, through real HTTP to the gateway and the mock upstream. Every test
//! checks what the client saw *and* what was journaled; expected amounts are computed by hand
//! here in `Decimal` from the configured prices and the mock's documented usage rules (input
//! tokens = words of the prompt, output tokens = `max_tokens`, 16 without it, 4000 for
//! `large` models), never with the gateway's own pricing code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{Datelike, TimeZone, Utc};
use common::{ALICE, BOB, Harness, record_id, sse_events, test_env, tiktoken};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Value, json};
use tollgate::balance::AccountView;
use tollgate::config::{Config, Dialect};
use tollgate::ledger::{Outcome, UsageRecord};
use tollgate::provider::Endpoint;

const CHAT: &str = "/v1/chat/completions";

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn dn(n: u64) -> Decimal {
    Decimal::from(n)
}

/// A model's prices as configured (per million tokens; `per_call` per call).
#[derive(Clone, Copy, Debug)]
struct Price {
    input: Decimal,
    cached: Decimal,
    output: Decimal,
    per_call: Decimal,
}

impl Price {
    fn new(input: &str, cached: &str, output: &str, per_call: &str) -> Price {
        Price {
            input: d(input),
            cached: d(cached),
            output: d(output),
            per_call: d(per_call),
        }
    }

    /// gpt-4o-like: $2.50 in, $1.25 cached, $10 out, $0.0001 per call.
    fn gpt4o() -> Price {
        Price::new("2.50", "1.25", "10.00", "0.0001")
    }

    /// claude-like: $3 in, $0.30 cached, $15 out, $0.0002 per call.
    fn claude() -> Price {
        Price::new("3", "0.30", "15", "0.0002")
    }

    /// A `[[prices]]` table; `matcher` is `model = "…"` or `model_prefix = "…"`.
    /// `per_compute_second` stays 0 so timing never moves a cost.
    fn toml(&self, matcher: &str) -> String {
        format!(
            "[[prices]]\n{matcher}\ninput_per_mtok = \"{}\"\ncached_input_per_mtok = \"{}\"\n\
             output_per_mtok = \"{}\"\nper_call = \"{}\"\n\n",
            self.input, self.cached, self.output, self.per_call
        )
    }

    /// The exact charge, rounded up to the next 10⁻⁹ once, plus the per-call price.
    fn cost(&self, input: u64, cached: u64, output: u64) -> Decimal {
        let tokens =
            dn(input - cached) * self.input + dn(cached) * self.cached + dn(output) * self.output;
        ceil9(tokens / dn(1_000_000)) + self.per_call
    }

    /// What admission reserves for at most `input` prompt and `output` completion tokens:
    /// every input token at the dearest input rate (cache writes default to the input rate).
    fn worst(&self, input: u64, output: u64) -> Decimal {
        let tokens = dn(input) * self.input.max(self.cached) + dn(output) * self.output;
        ceil9(tokens / dn(1_000_000)) + self.per_call
    }
}

fn ceil9(x: Decimal) -> Decimal {
    x.round_dp_with_strategy(9, RoundingStrategy::ToPositiveInfinity)
}

fn floor_div(a: Decimal, b: Decimal) -> u64 {
    u64::try_from((a / b).floor().mantissa()).unwrap()
}

/// The prompt estimate admission starts from: body bytes / 3 + 1.
fn cheap_input(body: &[u8]) -> u64 {
    body.len() as u64 / 3 + 1
}

/// The exact prompt estimate admission retries with near the limit.
fn exact_input(model: &str, body: &[u8]) -> u64 {
    tollgate::meter::estimate_prompt(Endpoint::ChatCompletions, Dialect::OpenAi, model, body)
}

fn words(n: usize) -> String {
    vec!["word"; n].join(" ")
}

/// A chat request with a prompt of `prompt` (its word count is the mock's input tokens).
fn chat(model: &str, prompt: &str, max_tokens: Option<u64>, stream: bool) -> Value {
    let mut v = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
    });
    if let Some(m) = max_tokens {
        v["max_tokens"] = json!(m);
    }
    if stream {
        v["stream"] = json!(true);
    }
    v
}

fn hash(key: &str) -> String {
    hex::encode(tollgate::config::hash_key(key))
}

/// The live view of an account's balance and period counters.
fn account_view(h: &Harness, account: &str) -> AccountView {
    let gw = h.gateway.gateway();
    let snapshot = gw.snapshot.load();
    let policy = snapshot.config.accounts.get(account).unwrap();
    gw.balances.get(account).unwrap().view(policy)
}

fn sum_cost<'a>(records: impl IntoIterator<Item = &'a UsageRecord>) -> Decimal {
    records.into_iter().map(|r| r.cost.unwrap()).sum()
}

/// The start of next month (UTC), when a monthly hard cap resets.
fn next_month_start() -> chrono::DateTime<Utc> {
    let now = Utc::now();
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap()
}

/// Asserts an OpenAI-shaped billing refusal and returns its message.
async fn openai_402(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 402);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "insufficient_quota", "{v}");
    assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// 1. Costs in records.
// ---------------------------------------------------------------------------------------------

/// Whether bare TOML numbers (`input_per_mtok = 2.50`) parse like quoted decimals.
#[test]
fn bare_toml_numbers_parse_like_quoted_decimals() {
    let base = common::config_text(
        "127.0.0.1:9".parse().unwrap(),
        std::path::Path::new("/tmp/unused.jsonl"),
        "",
        "",
    );
    let quoted = format!(
        "{base}\n{}",
        Price::gpt4o().toml("model = \"gpt-4o\"") // strings
    );
    let bare = format!(
        "{base}\n[[prices]]\nmodel = \"gpt-4o\"\ninput_per_mtok = 2.50\n\
         cached_input_per_mtok = 1.25\noutput_per_mtok = 10\nper_call = 0.0001\n"
    );
    let a = Config::parse(&quoted, &test_env()).unwrap();
    let b = Config::parse(&bare, &test_env())
        .unwrap_or_else(|e| panic!("bare TOML numbers are refused: {e}"));
    let (pa, pb) = (
        a.prices.price_for("gpt-4o").unwrap(),
        b.prices.price_for("gpt-4o").unwrap(),
    );
    assert_eq!(
        (
            pa.cached_input_per_mtok,
            pa.output_per_mtok,
            pa.per_call,
            pa.input_per_mtok
        ),
        (
            pb.cached_input_per_mtok,
            pb.output_per_mtok,
            pb.per_call,
            pb.input_per_mtok
        )
    );
}

/// One request of the cost table: what is sent and the usage the mock will report.
struct Case {
    name: &'static str,
    anthropic: bool,
    body: Value,
    price: Price,
    input: u64,
    cached: u64,
    output: u64,
}

#[tokio::test]
async fn records_carry_hand_computed_costs() {
    let gpt = Price::gpt4o();
    // Sub-nano per-token rates: 3 × 0.1505 + 5 × 0.6002 = 3.4525 µ$ → rounds up to 3.453 µ$.
    let mini = Price::new("0.1505", "0.1505", "0.6002", "0");
    let claude = Price::claude();
    let extra = format!(
        "{}{}{}{}
[[plans]]
id = \"team\"
included_usage = \"0.25\"
tiers = [{{ multiplier = \"1.5\" }}]

[[accounts]]
id = \"globex\"
unit = \"credits\"
credits_per_unit = \"1000\"
plan = \"team\"
",
        gpt.toml("model = \"gpt-4o\""),
        gpt.toml("model = \"gpt-4o-cached\""),
        mini.toml("model = \"gpt-4o-mini\""),
        claude.toml("model_prefix = \"claude-\""),
    );
    let h = Harness::start_with("", &extra).await;

    let ten = words(10);
    let mut with_usage = chat("gpt-4o", "one two three", Some(7), true);
    with_usage["stream_options"] = json!({"include_usage": true});
    let cases = vec![
        Case {
            name: "gpt-4o",
            anthropic: false,
            body: chat("gpt-4o", "one two three", Some(7), false),
            price: gpt,
            input: 3,
            cached: 0,
            output: 7,
        },
        Case {
            name: "gpt-4o stream (usage asked by tollgate)",
            anthropic: false,
            body: chat("gpt-4o", "one two three", Some(7), true),
            price: gpt,
            input: 3,
            cached: 0,
            output: 7,
        },
        Case {
            name: "gpt-4o stream (usage asked by client)",
            anthropic: false,
            body: with_usage,
            price: gpt,
            input: 3,
            cached: 0,
            output: 7,
        },
        Case {
            name: "gpt-4o-cached",
            anthropic: false,
            body: chat("gpt-4o-cached", &ten, Some(3), false),
            price: gpt,
            input: 10,
            cached: 5,
            output: 3,
        },
        Case {
            name: "gpt-4o-cached stream",
            anthropic: false,
            body: chat("gpt-4o-cached", &ten, Some(3), true),
            price: gpt,
            input: 10,
            cached: 5,
            output: 3,
        },
        Case {
            name: "gpt-4o-mini (rounded up)",
            anthropic: false,
            body: chat("gpt-4o-mini", "one two three", Some(5), false),
            price: mini,
            input: 3,
            cached: 0,
            output: 5,
        },
        Case {
            name: "claude-cached",
            anthropic: true,
            body: chat("claude-cached", &ten, Some(4), false),
            price: claude,
            input: 10,
            cached: 5,
            output: 4,
        },
        Case {
            name: "claude stream",
            anthropic: true,
            body: chat("claude-3-5-sonnet", "one two three", Some(5), true),
            price: claude,
            input: 3,
            cached: 0,
            output: 5,
        },
    ];
    assert_eq!(mini.cost(3, 0, 5), d("0.000003453"));

    let mut ids = Vec::new();
    for case in &cases {
        let req = if case.anthropic {
            h.anthropic(ALICE, case.body.clone())
        } else {
            h.openai(CHAT, ALICE, case.body.clone())
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", case.name);
        ids.push(record_id(&resp));
        resp.text().await.unwrap();
    }
    // Credits with an allowance and a 1.5× tier: 0.0001775 USD = 0.1775 credits rated each;
    // the first is inside the 0.25-credit allowance, the second pays 1.5 × 0.105, the third
    // 1.5 × 0.1775.
    let mut bob_ids = Vec::new();
    for _ in 0..3 {
        let resp = h
            .openai(CHAT, BOB, chat("gpt-4o", "one two three", Some(7), false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        bob_ids.push(record_id(&resp));
        resp.text().await.unwrap();
    }

    let records = h.records((cases.len() + 3) as u64).await;
    let by_id: HashMap<String, &UsageRecord> =
        records.iter().map(|r| (r.id.to_string(), r)).collect();
    for (case, id) in cases.iter().zip(&ids) {
        let r = by_id[id];
        let expected = case.price.cost(case.input, case.cached, case.output);
        println!("{:<42} cost {expected}", case.name);
        assert_eq!(r.outcome, Outcome::Completed, "{}", case.name);
        assert!(!r.estimated, "{}", case.name);
        assert_eq!(
            (
                r.usage.input_tokens,
                r.usage.cached_input_tokens,
                r.usage.output_tokens
            ),
            (case.input, case.cached, case.output),
            "{}",
            case.name
        );
        assert_eq!(r.cost, Some(expected), "{}", case.name);
        assert_eq!(r.rated_cost, Some(expected), "{}", case.name);
        assert_eq!(r.unit.as_deref(), Some("USD"), "{}", case.name);
    }

    let rated = gpt.cost(3, 0, 7) * dn(1000);
    assert_eq!(rated, d("0.1775"));
    let included = d("0.25");
    let tier = d("1.5");
    let charge = |before: Decimal, after: Decimal| {
        let over = |x: Decimal| (x - included).max(Decimal::ZERO) * tier;
        over(after) - over(before)
    };
    for (i, id) in bob_ids.iter().enumerate() {
        let r = by_id[id];
        let before = rated * dn(i as u64);
        let expected = charge(before, before + rated);
        println!("globex request {i}: rated {rated} credits, charged {expected} credits");
        assert_eq!(r.rated_cost, Some(rated));
        assert_eq!(r.cost, Some(expected));
        assert_eq!(r.unit.as_deref(), Some("credits"));
    }
    assert_eq!(
        bob_ids
            .iter()
            .map(|id| by_id[id].cost.unwrap())
            .sum::<Decimal>(),
        d("0.42375")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Hard cap.
// ---------------------------------------------------------------------------------------------

/// Whether admission lets a request in when `committed` is already spent against `limit`.
fn admits(committed: Decimal, limit: Decimal, cheap: Decimal, exact: Option<Decimal>) -> bool {
    committed + cheap <= limit || exact.is_some_and(|e| committed + e <= limit)
}

#[tokio::test]
async fn hard_cap_refuses_with_402_in_both_dialects_and_nothing_is_forwarded() {
    let gpt = Price::gpt4o();
    let extra = format!(
        "{}{}
[[accounts]]
id = \"acme\"
hard_cap = \"0.001\"
",
        gpt.toml("model = \"gpt-4o\""),
        Price::claude().toml("model_prefix = \"claude-\""),
    );
    let h = Harness::start_with("", &extra).await;
    let cap = d("0.001");
    let body = chat("gpt-4o", "hello there general kenobi", Some(10), false);
    let bytes = serde_json::to_vec(&body).unwrap();
    let cost = gpt.cost(4, 0, 10);
    let cheap = gpt.worst(cheap_input(&bytes), 10);
    let exact_tokens = exact_input("gpt-4o", &bytes);
    let exact = (exact_tokens < cheap_input(&bytes)).then(|| gpt.worst(exact_tokens, 10));
    let mut expected = 0u64;
    while admits(cost * dn(expected), cap, cheap, exact) {
        expected += 1;
    }
    println!("cap {cap}: cost {cost}, reservation {cheap} (exact {exact:?}) → {expected} fit");
    assert!(expected >= 2);

    let mut ok = 0u64;
    let refusal = loop {
        let resp = h.openai(CHAT, ALICE, body.clone()).send().await.unwrap();
        if resp.status() != 200 {
            break resp;
        }
        resp.text().await.unwrap();
        ok += 1;
        assert!(ok <= expected, "more requests passed than the cap allows");
    };
    assert_eq!(ok, expected);
    let forwarded = h.mock.request_count();
    assert_eq!(forwarded, ok);

    let message = openai_402(refusal).await;
    let resets = next_month_start();
    assert!(message.contains("spend cap of 0.001 USD"), "{message}");
    assert!(
        message.contains(&format!("resets at {resets}")),
        "{message}"
    );

    // Streams are refused the same way, before any event.
    let resp = h
        .openai(
            CHAT,
            ALICE,
            chat("gpt-4o", "hello there general kenobi", Some(10), true),
        )
        .send()
        .await
        .unwrap();
    openai_402(resp).await;

    // Anthropic clients get Anthropic's error shape.
    let resp = h
        .anthropic(
            ALICE,
            chat(
                "claude-3-5-sonnet",
                "hello there general kenobi",
                Some(10),
                false,
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 402);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "billing_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spend cap of 0.001 USD"),
        "{v}"
    );

    // Refused requests never reached the upstream and left no record.
    assert_eq!(h.mock.request_count(), forwarded);
    let records = h.records(ok).await;
    assert!(records.iter().all(|r| r.outcome == Outcome::Completed));
    let spent = sum_cost(&records);
    assert_eq!(spent, cost * dn(ok));
    assert!(spent <= cap);
    let view = account_view(&h, "acme");
    assert_eq!(view.period_spend, spent);
    assert_eq!(view.period_committed, spent, "no reservation left behind");
}

// ---------------------------------------------------------------------------------------------
// 3. Prepaid wallets.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn prepaid_wallet_draws_down_refuses_and_allows_bounded_overage() {
    let gpt = Price::gpt4o();
    let extra = format!(
        "{}
[[accounts]]
id = \"acme\"
prepaid = true
grants = [{{ id = \"welcome\", amount = \"0.001\" }}]

[[accounts]]
id = \"globex\"
prepaid = true
overage = \"allow\"
overage_limit = \"0.0005\"
grants = [{{ id = \"welcome\", amount = \"0.001\", kind = \"paid\" }}]
",
        gpt.toml("model = \"gpt-4o\""),
    );
    let h = Harness::start_with("", &extra).await;
    let grant = d("0.001");
    let limit = d("0.0005");
    let body = chat("gpt-4o", "hello there general kenobi", Some(10), false);
    let bytes = serde_json::to_vec(&body).unwrap();
    let cost = gpt.cost(4, 0, 10);
    let cheap = gpt.worst(cheap_input(&bytes), 10);
    let exact_tokens = exact_input("gpt-4o", &bytes);
    let exact = (exact_tokens < cheap_input(&bytes)).then(|| gpt.worst(exact_tokens, 10));

    // Block: admitted while the balance covers the next worst case.
    let mut expected_block = 0u64;
    while admits(cost * dn(expected_block), grant, cheap, exact) {
        expected_block += 1;
    }
    // Allow: admitted while the balance minus the worst case stays above -limit.
    let mut expected_allow = 0u64;
    while admits(cost * dn(expected_allow), grant + limit, cheap, exact) {
        expected_allow += 1;
    }
    println!(
        "grant {grant}, cost {cost}, reservation {cheap}: block admits {expected_block}, \
         allow (limit {limit}) admits {expected_allow}"
    );
    assert!(
        cost * dn(expected_allow) > grant,
        "the overage case must go negative"
    );

    let mut balances = Vec::new();
    for (key, account, expected) in [
        (ALICE, "acme", expected_block),
        (BOB, "globex", expected_allow),
    ] {
        let mut ok = 0u64;
        let refusal = loop {
            let resp = h.openai(CHAT, key, body.clone()).send().await.unwrap();
            if resp.status() != 200 {
                break resp;
            }
            resp.text().await.unwrap();
            ok += 1;
            assert!(ok <= expected, "{account}: wallet admitted too many");
            // The balance is drawn down request by request.
            let view = account_view(&h, account);
            assert_eq!(view.balance, grant - cost * dn(ok), "{account}");
        };
        assert_eq!(ok, expected, "{account}");
        let message = openai_402(refusal).await;
        assert!(message.starts_with("insufficient balance"), "{message}");
        assert!(message.contains("USD left"), "{message}");
        balances.push(account_view(&h, account));
    }
    assert_eq!(h.mock.request_count(), expected_block + expected_allow);

    let records = h.records(expected_block + expected_allow).await;
    let acme: Vec<_> = records.iter().filter(|r| &*r.account == "acme").collect();
    let globex: Vec<_> = records.iter().filter(|r| &*r.account == "globex").collect();
    assert_eq!(acme.len() as u64, expected_block);
    assert!(acme.iter().chain(&globex).all(|r| r.cost == Some(cost)));

    let (acme_view, globex_view) = (&balances[0], &balances[1]);
    println!(
        "acme balance {} (spent {}), globex balance {} overdraft {} (spent {})",
        acme_view.balance,
        sum_cost(acme.iter().copied()),
        globex_view.balance,
        globex_view.overdraft,
        sum_cost(globex.iter().copied())
    );
    assert!(acme_view.balance >= Decimal::ZERO);
    assert_eq!(acme_view.balance, grant - sum_cost(acme.iter().copied()));
    assert!(globex_view.balance < Decimal::ZERO, "went negative");
    assert!(globex_view.balance >= -limit, "within the overage limit");
    assert_eq!(globex_view.overdraft, -globex_view.balance);
    assert_eq!(
        globex_view.balance,
        grant - sum_cost(globex.iter().copied())
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Stream cut.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_stream_the_wallet_cannot_finish_is_cut_with_a_billing_error_event() {
    let gpt = Price::gpt4o();
    let claude = Price::claude();
    let extra = format!(
        "{}{}
[[accounts]]
id = \"acme\"
prepaid = true
grants = [{{ id = \"g\", amount = \"0.01\" }}]

[[accounts]]
id = \"globex\"
prepaid = true
grants = [{{ id = \"g\", amount = \"0.01\" }}]

[reservation]
default_output_tokens = 16
",
        gpt.toml("model_prefix = \"gpt-4o\""),
        claude.toml("model_prefix = \"claude-\""),
    );
    let h = Harness::start_with("", &extra).await;
    let grant = d("0.01");

    // OpenAI: no max_tokens, so admission reserves 16 output tokens; the `large` model
    // streams 4000 and the stream extends 256 tokens at a time until the wallet is empty.
    let prompt = "write a very long story";
    let body = chat("gpt-4o-large", prompt, None, true);
    let bytes = serde_json::to_vec(&body).unwrap();
    let initial = gpt.worst(cheap_input(&bytes), 16);
    let extension = gpt.worst(0, 256) - gpt.per_call;
    let extensions = floor_div(grant - initial, extension);
    let resp = h.openai(CHAT, ALICE, body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = record_id(&resp);
    let text = resp.text().await.unwrap();
    let events = sse_events(&text);
    let (_, last) = events.last().unwrap();
    let last: Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["error"]["type"], "insufficient_quota", "{last}");
    assert_eq!(last["error"]["code"], "insufficient_quota", "{last}");
    assert!(!text.contains("[DONE]"));
    let mut delivered = String::new();
    let mut word_events = 0u64;
    for (_, data) in &events {
        if let Ok(v) = serde_json::from_str::<Value>(data)
            && let Some(t) = v["choices"][0]["delta"]["content"].as_str()
            && !t.is_empty()
        {
            delivered.push_str(t);
            word_events += 1;
        }
    }
    // The budget counts the tokens of each event's text as it passes (the role chunk has
    // none), so the word after 16 + 256 × extensions is the one that finds the wallet empty;
    // it is delivered, then the stream ends.
    assert_eq!(word_events, 16 + 256 * extensions + 1);

    let r = h.record(1, &id).await;
    assert_eq!(r.outcome, Outcome::CutOff);
    assert!(r.estimated && r.streamed);
    assert!(r.usage.output_tokens < 4000);
    assert_eq!(r.usage.output_tokens, tiktoken("gpt-4o-large", &delivered));
    let cost = gpt.cost(r.usage.input_tokens, 0, r.usage.output_tokens);
    assert_eq!(r.cost, Some(cost));
    let view = account_view(&h, "acme");
    let spent = grant - view.balance;
    println!(
        "openai cut: grant {grant}, initial reservation {initial}, {extensions} extensions of \
         {extension}; delivered {word_events} words, billed {} in + {} out tokens = {cost}; \
         spent {spent}, balance {}, available {}",
        r.usage.input_tokens, r.usage.output_tokens, view.balance, view.available
    );
    assert_eq!(spent, cost);
    assert!(spent <= grant + extension);
    assert_eq!(view.available, view.balance, "no reservation left behind");

    // Anthropic: `large` ignores max_tokens, so the stream outruns the reservation too.
    let resp = h
        .anthropic(BOB, chat("claude-large", prompt, Some(16), true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = record_id(&resp);
    let text = resp.text().await.unwrap();
    let events = sse_events(&text);
    let (event, last) = events.last().unwrap();
    assert_eq!(event, "error");
    let last: Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["type"], "error", "{last}");
    assert_eq!(last["error"]["type"], "billing_error", "{last}");
    let delivered: String = events
        .iter()
        .filter(|(e, _)| e == "content_block_delta")
        .filter_map(|(_, data)| {
            let v: Value = serde_json::from_str(data).ok()?;
            v["delta"]["text"].as_str().map(str::to_owned)
        })
        .collect();
    let r = h.record(2, &id).await;
    assert_eq!(r.outcome, Outcome::CutOff);
    assert!(r.estimated);
    assert_eq!(r.usage.input_tokens, 5, "message_start reported the prompt");
    assert!(r.usage.output_tokens < 4000);
    assert_eq!(r.usage.output_tokens, tiktoken("claude-large", &delivered));
    let cost = claude.cost(5, 0, r.usage.output_tokens);
    assert_eq!(r.cost, Some(cost));
    let view = account_view(&h, "globex");
    let spent = grant - view.balance;
    let extension = claude.worst(0, 256) - claude.per_call;
    println!(
        "anthropic cut: billed {} output tokens = {cost}; spent {spent} of {grant} \
         (+ one extension {extension})",
        r.usage.output_tokens
    );
    assert_eq!(spent, cost);
    assert!(spent <= grant + extension);
    assert_eq!(h.mock.request_count(), 2);
}

// ---------------------------------------------------------------------------------------------
// 5. Rate limits.
// ---------------------------------------------------------------------------------------------

const DAVE: &str = "tg-test-dave-rpm";
const ERIN: &str = "tg-test-erin-tpm";

#[tokio::test]
async fn per_key_rpm_and_tpm_answer_429_with_retry_after() {
    let extra = format!(
        "{}
[[keys]]
id = \"dave-rpm\"
sha256 = \"{}\"
account = \"initech\"
rpm = 3

[[keys]]
id = \"erin-tpm\"
sha256 = \"{}\"
account = \"initech\"
tpm = 1000
",
        Price::gpt4o().toml("model = \"gpt-4o\""),
        hash(DAVE),
        hash(ERIN),
    );
    let h = Harness::start_with("", &extra).await;
    let small = chat("gpt-4o", "hi", Some(4), false);

    for _ in 0..3 {
        let resp = h.openai(CHAT, DAVE, small.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    let resp = h.openai(CHAT, DAVE, small.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Three per minute: the fourth may go 20 s after the first.
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 requests per minute"),
        "{v}"
    );
    // The same key on the Anthropic endpoint shares the limit and gets Anthropic's shape.
    let resp = h
        .anthropic(DAVE, chat("claude-3-5-sonnet", "hi", Some(4), false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");

    // Tokens per minute: the admission estimate (body bytes / 3 + 1 + max_tokens) of a big
    // prompt uses more than half of 1000, so the second one in a row is refused.
    let big = chat("gpt-4o", &words(300), Some(10), false);
    let tokens = cheap_input(&serde_json::to_vec(&big).unwrap()) + 10;
    println!("tpm request estimate: {tokens} tokens");
    assert!(tokens > 500 && tokens < 1000);
    let resp = h.openai(CHAT, ERIN, big.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    let resp = h.openai(CHAT, ERIN, big.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000 tokens per minute"),
        "{v}"
    );

    // Throttled requests never reach the upstream and leave no record.
    assert_eq!(h.mock.request_count(), 4);
    let records = h.records(4).await;
    assert_eq!(
        records.iter().filter(|r| &*r.key_id == "dave-rpm").count(),
        3
    );
}

const GAIL: &str = "tg-test-gail-rpm-broke";
const IVAN: &str = "tg-test-ivan-tpm-broke";
const HANK: &str = "tg-test-hank-rpm-tpm";

#[tokio::test]
async fn requests_the_gateway_refuses_do_not_use_up_the_keys_rates() {
    let extra = format!(
        "{}
[[accounts]]
id = \"broke\"
hard_cap = \"0.000001\"

[[keys]]
id = \"gail\"
sha256 = \"{}\"
account = \"broke\"
rpm = 2

[[keys]]
id = \"ivan\"
sha256 = \"{}\"
account = \"broke\"
tpm = 1000

[[keys]]
id = \"hank\"
sha256 = \"{}\"
account = \"initech\"
rpm = 2
tpm = 1000
",
        Price::gpt4o().toml("model = \"gpt-4o\""),
        hash(GAIL),
        hash(IVAN),
        hash(HANK),
    );
    let h = Harness::start_with("", &extra).await;
    let small = chat("gpt-4o", "hi", Some(4), false);

    // Two a minute, on an account with a spend limit: a model the price book does not know
    // is refused (402) before anything is counted, and such refusals leave the limit alone.
    for i in 0..4 {
        let resp = h
            .openai(CHAT, GAIL, chat("mystery-model", "hi", Some(4), false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 402, "unpriced request {i}");
        resp.text().await.unwrap();
    }
    // A call the account cannot afford is refused only after tollgate counted its prompt
    // exactly (the cheap estimate might have been too high): that counted request is a
    // request for the limit, so the third such call in the minute is a 429.
    let mut codes = Vec::new();
    for _ in 0..3 {
        let resp = h.openai(CHAT, GAIL, small.clone()).send().await.unwrap();
        codes.push(resp.status().as_u16());
        resp.text().await.unwrap();
    }
    assert_eq!(codes, [402, 402, 429]);
    // Its tokens, though, are given back: two big prompts (each over half of 1000 tokens a
    // minute) refused for the cap are both 402s, not a 402 and a 429.
    let big = chat("gpt-4o", &words(300), Some(10), false);
    let mut codes = Vec::new();
    for _ in 0..2 {
        let resp = h.openai(CHAT, IVAN, big.clone()).send().await.unwrap();
        codes.push(resp.status().as_u16());
        resp.text().await.unwrap();
    }
    assert_eq!(codes, [402, 402]);

    // A request its tokens-per-minute limit refuses gives back the request it took from the
    // requests-per-minute limit: after a big prompt passes and a second is refused (tpm),
    // one more small request still fits in the two a minute; the one after it does not.
    let big = chat("gpt-4o", &words(300), Some(10), false);
    let mut seen = Vec::new();
    for body in [big.clone(), big, small.clone(), small] {
        let resp = h.openai(CHAT, HANK, body).send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        seen.push((
            status,
            v["error"]["message"].as_str().unwrap_or("").to_owned(),
        ));
    }
    let codes: Vec<u16> = seen.iter().map(|(c, _)| *c).collect();
    assert_eq!(codes, [200, 429, 200, 429], "{seen:?}");
    assert!(seen[1].1.contains("1000 tokens per minute"), "{seen:?}");
    assert!(seen[3].1.contains("2 requests per minute"), "{seen:?}");
    assert_eq!(h.mock.request_count(), 2);
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrency.
// ---------------------------------------------------------------------------------------------

const CONCURRENT: usize = 500;

/// Fires `CONCURRENT` copies of `body` at once; returns the statuses.
async fn burst(h: &Harness, key: &str, body: &[u8]) -> Vec<u16> {
    let body = Bytes::copy_from_slice(body);
    let start = Arc::new(tokio::sync::Barrier::new(CONCURRENT));
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let (http, url, key, body, start) = (
                h.http.clone(),
                format!("{}{CHAT}", h.base),
                key.to_string(),
                body.clone(),
                start.clone(),
            );
            tokio::spawn(async move {
                start.wait().await;
                let resp = http
                    .post(url)
                    .bearer_auth(key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                resp.bytes().await.unwrap();
                status
            })
        })
        .collect();
    let mut statuses = Vec::with_capacity(CONCURRENT);
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// With `max_tokens` set every reservation covers its request: zero overspend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_max_tokens_never_overspend() {
    let gpt = Price::gpt4o();
    let body = chat("gpt-4o", &words(20), Some(16), false);
    let bytes = serde_json::to_vec(&body).unwrap();
    let cost = gpt.cost(20, 0, 16);
    let grant = cost * dn(100);
    let extra = format!(
        "{}
[[accounts]]
id = \"acme\"
prepaid = true
grants = [{{ id = \"g\", amount = \"{grant}\" }}]
",
        gpt.toml("model = \"gpt-4o\""),
    );
    let h = Harness::start_with("", &extra).await;
    let reservation = gpt.worst(cheap_input(&bytes), 16);
    let statuses = burst(&h, ALICE, &bytes).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count() as u64;
    let refused = statuses.iter().filter(|&&s| s == 402).count() as u64;
    let records = h.records(ok).await;
    let total = sum_cost(&records);
    let view = account_view(&h, "acme");
    // Any refusal means the wallet could not hold one more cheap reservation, so at least
    // grant / reservation requests were admitted; reservations cover the true cost, so at
    // most grant / cost (= 100).
    let lower = floor_div(grant, reservation);
    println!(
        "max_tokens set: {CONCURRENT} concurrent, grant {grant}, cost {cost}, reservation \
         {reservation}: {ok} × 200, {refused} × 402 (admitted must be in [{lower}, 100]); \
         settled {total}, overspend {}, balance {}",
        (total - grant).max(Decimal::ZERO),
        view.balance
    );
    assert_eq!(
        ok + refused,
        CONCURRENT as u64,
        "only 200 or 402: {statuses:?}"
    );
    assert!((lower..=100).contains(&ok), "admitted {ok}");
    assert_eq!(h.mock.request_count(), ok);
    assert!(records.iter().all(|r| r.outcome == Outcome::Completed));
    assert!(records.iter().all(|r| r.cost == Some(cost)));
    assert!(total <= grant, "overspend: {total} > {grant}");
    assert_eq!(view.balance, grant - total);
    assert_eq!(view.available, view.balance, "no reservation left behind");
    assert_eq!(view.overdraft, Decimal::ZERO);
}

/// Without `max_tokens` admission reserves `default_output_tokens` (8) while the mock answers
/// 16: each request costs more than it reserved, and the overdraft is bounded by the
/// requests in flight at the last admission times that shortfall.
///
/// The account blocks overage: a refusal then happens exactly when the outstanding
/// reservations plus settled charges would pass the grant, which is what makes the bound
/// `in_flight × (cost − reservation)` with `in_flight ≤ grant / reservation`. With
/// `overage = "allow"` the bound would just grow by the overage limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_without_max_tokens_overspend_within_the_bound() {
    let gpt = Price::gpt4o();
    // A slow upstream keeps every admitted request in flight at once: the worst case.
    let model = "gpt-4o-slow-100";
    let body = chat(model, "hi", None, false);
    let bytes = serde_json::to_vec(&body).unwrap();
    let cost = gpt.cost(1, 0, 16);
    let grant = cost * dn(100);
    let extra = format!(
        "{}
[[accounts]]
id = \"globex\"
prepaid = true
grants = [{{ id = \"g\", amount = \"{grant}\" }}]

[reservation]
default_output_tokens = 8
",
        gpt.toml("model_prefix = \"gpt-4o\""),
    );
    let h = Harness::start_with("", &extra).await;
    let cheap = gpt.worst(cheap_input(&bytes), 8);
    let exact_tokens = exact_input(model, &bytes);
    let smallest = if exact_tokens < cheap_input(&bytes) {
        cheap.min(gpt.worst(exact_tokens, 8))
    } else {
        cheap
    };
    assert!(
        smallest < cost,
        "the reservation must fall short for this test"
    );
    let shortfall = cost - smallest;
    let max_in_flight = floor_div(grant, smallest);

    let statuses = burst(&h, BOB, &bytes).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count() as u64;
    let refused = statuses.iter().filter(|&&s| s == 402).count() as u64;
    let records = h.records(ok).await;
    let total = sum_cost(&records);
    let overspend = total - grant;
    let bound = dn(max_in_flight.min(ok)) * shortfall;
    let view = account_view(&h, "globex");
    println!(
        "no max_tokens: {CONCURRENT} concurrent, grant {grant}, cost {cost}, reservation \
         {cheap} (smallest {smallest}): {ok} × 200, {refused} × 402; settled {total}, \
         overspend {overspend} ≤ bound {bound} = min({max_in_flight}, {ok}) in flight × \
         {shortfall}; balance {}, overdraft {}",
        view.balance, view.overdraft
    );
    assert_eq!(
        ok + refused,
        CONCURRENT as u64,
        "only 200 or 402: {statuses:?}"
    );
    assert_eq!(h.mock.request_count(), ok);
    assert!(records.iter().all(|r| r.cost == Some(cost)));
    assert!(overspend <= bound, "overspend {overspend} > bound {bound}");
    assert_eq!(view.balance, grant - total);
    assert_eq!(view.available, view.balance, "no reservation left behind");
    assert_eq!(view.overdraft, (total - grant).max(Decimal::ZERO));
}

// ---------------------------------------------------------------------------------------------
// 7. Alerts end to end.
// ---------------------------------------------------------------------------------------------

const ALERT_SECRET: &str = "whsec_billing_test";
const FRANK: &str = "tg-test-frank";

#[derive(Clone, Debug)]
struct Delivery {
    event_id: String,
    signature_valid: bool,
    body: Value,
}

struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }
    fn got(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }
}

/// A webhook receiver on 127.0.0.1:0 that answers 200 and checks each signature.
async fn receiver() -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let log = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let log = log.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    let header = |name: &str| {
                        parts
                            .headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let timestamp: i64 = header("x-tollgate-timestamp").parse().unwrap_or(0);
                    log.lock().unwrap().push(Delivery {
                        event_id: header("x-tollgate-event-id"),
                        signature_valid: tollgate::alert::verify(
                            ALERT_SECRET,
                            timestamp,
                            &body,
                            &header("x-tollgate-signature"),
                        ),
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    });
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Receiver { addr, got }
}

#[tokio::test]
async fn spend_thresholds_alert_each_receiver_once_signed() {
    let admin = receiver().await;
    let owner = receiver().await;
    let gpt = Price::gpt4o();
    let extra = format!(
        "{}
[[accounts]]
id = \"acme\"
hard_cap = \"0.001\"
alert_thresholds = [\"0.5\", \"0.9\"]
admin_webhook = \"{}\"

[[keys]]
id = \"frank-ops\"
sha256 = \"{}\"
account = \"acme\"
owner_webhook = \"{}\"

[alerts]
signing_secret_env = \"T_ALERT_SECRET\"
max_attempts = 3
",
        gpt.toml("model = \"gpt-4o\""),
        admin.url(),
        hash(FRANK),
        owner.url(),
    );
    let mut env = test_env();
    env.insert("T_ALERT_SECRET".into(), ALERT_SECRET.into());
    let h = Harness::start_with_env("", &extra, env).await;

    // 0.0001125 per request: 0.5 is crossed by the 5th, 0.9 reached exactly by the 8th.
    let body = chat("gpt-4o", "hi", Some(1), false);
    let cost = gpt.cost(1, 0, 1);
    assert_eq!(cost, d("0.0001125"));
    let mut ok = 0u64;
    for _ in 0..12 {
        let resp = h.openai(CHAT, FRANK, body.clone()).send().await.unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            402 => {}
            s => panic!("status {s}"),
        }
        resp.bytes().await.unwrap();
    }
    let records = h.records(ok).await;
    let spent = sum_cost(&records);
    println!("alerts: {ok} requests admitted, spent {spent} of 0.001");
    assert!(spent >= d("0.0009"), "spend must reach 90 % of the cap");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (admin.got().len() < 2 || owner.got().len() < 2) && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A little longer, so a duplicate would show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a, o) = (admin.got(), owner.got());
    assert_eq!(a.len(), 2, "admin deliveries: {a:#?}");
    assert_eq!(o.len(), 2, "owner deliveries: {o:#?}");
    for (who, got) in [("admin", &a), ("owner", &o)] {
        let mut thresholds: Vec<&str> = got
            .iter()
            .map(|x| x.body["threshold"].as_str().unwrap())
            .collect();
        thresholds.sort_unstable();
        assert_eq!(thresholds, ["0.5", "0.9"], "{who}");
        for x in got {
            assert!(x.signature_valid, "{who}: bad signature");
            assert_eq!(x.body["kind"], "spend_threshold", "{who}");
            assert_eq!(x.body["account"], "acme", "{who}");
            assert_eq!(x.body["key_id"], "frank-ops", "{who}");
            assert_eq!(x.body["unit"], "USD", "{who}");
            assert_eq!(x.body["limit"], "0.001", "{who}");
            assert_eq!(x.body["id"], x.event_id, "{who}");
            let value = d(x.body["value"].as_str().unwrap());
            let threshold = d(x.body["threshold"].as_str().unwrap());
            assert!(value >= threshold * d("0.001"), "{who}: {value}");
        }
    }
    // Both receivers got the same two events.
    let ids = |got: &[Delivery]| {
        let mut v: Vec<String> = got.iter().map(|x| x.event_id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&a), ids(&o));
}
