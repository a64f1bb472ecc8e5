//! Hot reload end to end: the config file edited in place or renamed into place (file watch),
//! SIGHUP to the real binary, `POST /admin/reload` (refusals, dry runs), balances across
//! reloads, reloads under load, and `check-config --against`. Every test checks what clients
//! saw over HTTP and what was journaled; expected costs are computed here by hand from the
//! configured prices and the mock's usage rules (input tokens = words of the prompt, output
//! tokens = `max_tokens`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ALICE, ANTHROPIC_CREDENTIAL, BOB, OPENAI_CREDENTIAL, config_text, test_env};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Value, json};
use tollgate::config::Config;
use tollgate::ledger::UsageRecord;
use tollgate::mock::{MockConfig, MockServer};
use tollgate::reload::WATCH_DEBOUNCE;
use tollgate::{GatewayBuilder, RunningGateway};

const ADMIN_TOKEN: &str = "reload-admin-token-0123456789";
const NEW_KEY: &str = "tg-test-new";
const CHAT: &str = "/v1/chat/completions";
const ADMIN_SECTION: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"T_ADMIN\"\n";

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn hash(key: &str) -> String {
    hex::encode(tollgate::config::hash_key(key))
}

/// One price for every model the tests call (`gpt-4o*` and `claude-*`); cached, cache-write
/// and reasoning rates default to the input/output rates.
#[derive(Clone, Copy, Debug)]
struct Price {
    input: Decimal,
    output: Decimal,
    per_call: Decimal,
}

impl Price {
    fn new(input: &str, output: &str, per_call: &str) -> Price {
        Price {
            input: d(input),
            output: d(output),
            per_call: d(per_call),
        }
    }

    fn a() -> Price {
        Price::new("2", "4", "0.0001")
    }

    fn b() -> Price {
        Price::new("3", "7", "0.0002")
    }

    fn toml(&self) -> String {
        ["gpt-4o", "claude-"]
            .iter()
            .map(|prefix| {
                format!(
                    "[[prices]]\nmodel_prefix = \"{prefix}\"\ninput_per_mtok = \"{}\"\n\
                     output_per_mtok = \"{}\"\nper_call = \"{}\"\n\n",
                    self.input, self.output, self.per_call
                )
            })
            .collect()
    }

    /// The charge for this usage: the token part rounded up to 10⁻⁹, plus the per-call price.
    fn cost(&self, input: u64, output: u64) -> Decimal {
        let tokens = Decimal::from(input) * self.input + Decimal::from(output) * self.output;
        (tokens / Decimal::from(1_000_000))
            .round_dp_with_strategy(9, RoundingStrategy::ToPositiveInfinity)
            + self.per_call
    }

    fn cost_of(&self, r: &UsageRecord) -> Decimal {
        assert_eq!(
            (
                r.usage.cached_input_tokens,
                r.usage.cache_creation_input_tokens,
                r.usage.reasoning_tokens
            ),
            (0, 0, 0),
            "{r:?}"
        );
        self.cost(r.usage.input_tokens, r.usage.output_tokens)
    }
}

fn chat_body(model: &str, prompt: &str, max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    })
}

/// A `[[keys]]` table to append at the end of a config text.
fn key_table(id: &str, sha256: &str, account: &str, extra: &str) -> String {
    format!("\n[[keys]]\nid = \"{id}\"\nsha256 = \"{sha256}\"\naccount = \"{account}\"\n{extra}")
}

/// bob-prod's table exactly as `config_text` writes it.
fn bob_table() -> String {
    format!(
        "[[keys]]\nid = \"bob-prod\"\nsha256 = \"{}\"\naccount = \"globex\"\n",
        hash(BOB)
    )
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{name}` in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn env() -> HashMap<String, String> {
    let mut env = test_env();
    env.insert("T_ADMIN".into(), ADMIN_TOKEN.into());
    env
}

async fn start_mock() -> MockServer {
    MockServer::start(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig {
            openai_key: OPENAI_CREDENTIAL.into(),
            anthropic_key: ANTHROPIC_CREDENTIAL.into(),
            ..MockConfig::default()
        },
    )
    .await
    .unwrap()
}

/// A gateway started from a config *file* (so it can reload it), with an admin listener.
struct Fixture {
    mock: MockServer,
    gateway: RunningGateway,
    path: PathBuf,
    journal: PathBuf,
    base: String,
    admin: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(extra: &str, watch: bool) -> Fixture {
        let mock = start_mock().await;
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("usage.jsonl");
        let path = dir.path().join("tollgate.toml");
        let text = config_text(
            mock.addr(),
            &journal,
            "",
            &format!("{extra}{ADMIN_SECTION}"),
        );
        std::fs::write(&path, &text).unwrap();
        let env = env();
        let config = Config::load(&path, &env).unwrap();
        let gateway = GatewayBuilder::new(config)
            .config_path(&path)
            .env(Arc::new(env))
            .watch(watch)
            .admin_listen("127.0.0.1:0".parse().unwrap())
            .start()
            .await
            .unwrap();
        Fixture {
            base: format!("http://{}", gateway.addr()),
            admin: format!("http://{}", gateway.admin_addr().unwrap()),
            mock,
            gateway,
            path,
            journal,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            _dir: dir,
        }
    }

    /// The config text this fixture was started with, with `extra` in place of its extra.
    fn text(&self, extra: &str) -> String {
        config_text(
            self.mock.addr(),
            &self.journal,
            "",
            &format!("{extra}{ADMIN_SECTION}"),
        )
    }

    /// Rewrites the config file in place (truncate and write, as `echo > file` would).
    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    /// Writes a temporary file next to the config and renames it over the config.
    fn rename_into_place(&self, text: &str) {
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    fn reloads_applied(&self) -> u64 {
        self.gateway.reloader().applied()
    }

    /// Waits until at least `n` reloads were applied (the watcher debounces for 200 ms).
    async fn wait_applied(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.reloads_applied() < n {
            assert!(
                Instant::now() < deadline,
                "reload #{n} not applied within 10 s ({} applied, {} failed)",
                self.reloads_applied(),
                self.gateway.reloader().failed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a request with `key` (Anthropic shape for `claude-*` models), reads the whole
    /// body and returns the status, the record id (on success) and the body.
    async fn send(&self, key: &str, body: &Value) -> (u16, Option<String>, String) {
        let anthropic = body["model"].as_str().unwrap().starts_with("claude-");
        let req = if anthropic {
            self.http
                .post(format!("{}/v1/messages", self.base))
                .header("x-api-key", key)
                .header("anthropic-version", "2023-06-01")
        } else {
            self.http
                .post(format!("{}{CHAT}", self.base))
                .bearer_auth(key)
        };
        let resp = req.json(body).send().await.unwrap();
        let status = resp.status().as_u16();
        let id = resp
            .headers()
            .get("x-tollgate-record-id")
            .map(|v| v.to_str().unwrap().to_string());
        (status, id, resp.text().await.unwrap())
    }

    /// Sends a request that must succeed; returns its record id.
    async fn ok(&self, key: &str, body: &Value) -> String {
        let (status, id, text) = self.send(key, body).await;
        assert_eq!(status, 200, "{text}");
        id.unwrap()
    }

    /// Waits for exactly `n` journaled records and returns them.
    async fn records(&self, n: u64) -> Vec<UsageRecord> {
        common::journaled_records(&self.gateway, &self.journal, n).await
    }

    async fn admin_get(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    async fn admin_reload(&self, dry_run: bool) -> (u16, Value) {
        let query = if dry_run { "?dry_run=true" } else { "" };
        let resp = self
            .http
            .post(format!("{}/admin/reload{query}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn by_id<'a>(records: &'a [UsageRecord], id: &str) -> &'a UsageRecord {
    records
        .iter()
        .find(|r| r.id.to_string() == id)
        .unwrap_or_else(|| panic!("no record {id}"))
}

fn dec(v: &Value) -> Decimal {
    d(v.as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {v}")))
}

// ---------------------------------------------------------------------------------------------
// 1. File watch: edit in place.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_in_place_edit_reprices_the_requests_after_the_reload() {
    let (a, b) = (Price::a(), Price::b());
    let f = Fixture::start(&a.toml(), true).await;
    // 3 prompt words, 5 output tokens: A = (3·2 + 5·4)/10⁶ + 0.0001, B = (3·3 + 5·7)/10⁶ + 0.0002.
    let (cost_a, cost_b) = (d("0.000126"), d("0.000244"));
    assert_eq!((a.cost(3, 5), b.cost(3, 5)), (cost_a, cost_b));
    let body = chat_body("gpt-4o", "one two three", 5, false);
    let claude = chat_body("claude-3-5-sonnet", "one two three", 5, false);

    let mut before = Vec::new();
    for body in [&body, &claude, &body] {
        before.push(f.ok(ALICE, body).await);
    }
    assert_eq!(f.reloads_applied(), 0);
    f.write(&f.text(&b.toml()));
    f.wait_applied(1).await;
    let mut after = Vec::new();
    for body in [&body, &claude, &body] {
        after.push(f.ok(ALICE, body).await);
    }

    let records = f.records(6).await;
    for id in &before {
        assert_eq!(by_id(&records, id).cost, Some(cost_a), "before the edit");
    }
    for id in &after {
        assert_eq!(by_id(&records, id).cost, Some(cost_b), "after the edit");
    }

    // Rewriting the same bytes (a `touch`-like save) is seen but is not a reload.
    f.write(&f.text(&b.toml()));
    tokio::time::sleep(WATCH_DEBOUNCE * 4).await;
    assert_eq!(f.reloads_applied(), 1, "an unchanged file is not reloaded");
    let metrics = f.metrics().await;
    assert_eq!(metric(&metrics, "tollgate_config_reloads_applied_total"), 1);
    assert_eq!(metric(&metrics, "tollgate_config_reloads_failed_total"), 0);
}

// ---------------------------------------------------------------------------------------------
// 2. File watch: rename into place.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_rename_into_place_removes_a_key_and_a_second_one_restores_it() {
    let extra = Price::a().toml();
    let f = Fixture::start(&extra, true).await;
    let body = chat_body("gpt-4o", "one two three", 5, false);
    let mut ok = vec![f.ok(ALICE, &body).await, f.ok(BOB, &body).await];

    let full = f.text(&extra);
    let without_bob = full.replace(&bob_table(), "");
    assert_ne!(without_bob, full, "bob-prod's table was not found");
    f.rename_into_place(&without_bob);
    f.wait_applied(1).await;
    for _ in 0..3 {
        let (status, id, text) = f.send(BOB, &body).await;
        assert_eq!(status, 401, "a removed key is refused: {text}");
        assert!(id.is_none());
        ok.push(f.ok(ALICE, &body).await);
    }

    // The watch is on the directory, so it survives the file being replaced.
    f.rename_into_place(&full);
    f.wait_applied(2).await;
    ok.push(f.ok(BOB, &body).await);

    let records = f.records(ok.len() as u64).await;
    let bob: Vec<_> = records
        .iter()
        .filter(|r| &*r.key_id == "bob-prod")
        .collect();
    assert_eq!(bob.len(), 2, "refused requests leave no record");
    assert!(records.iter().all(|r| r.status == 200));
    assert!(!f.path.with_extension("toml.tmp").exists());
    assert_eq!(f.gateway.reloader().failed(), 0);
}

// ---------------------------------------------------------------------------------------------
// 3. SIGHUP to the real binary.
// ---------------------------------------------------------------------------------------------

/// Removes ANSI colour sequences (tracing colours its text output on some setups).
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
    fn spawn(config: &Path) -> Served {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("T_OPENAI", OPENAI_CREDENTIAL)
            .env("T_ANTHROPIC", ANTHROPIC_CREDENTIAL)
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

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The data-plane address from the `tollgate listening addr=…` line.
    async fn addr(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self.log.lock().unwrap().iter().find_map(|l| {
                let rest = l.split("tollgate listening").nth(1)?;
                let addr = rest.split("addr=").nth(1)?;
                Some(addr.split_whitespace().next()?.to_string())
            });
            if let Some(addr) = found {
                return addr;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "tollgate exited ({status}) before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `tollgate listening` line:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not stop on SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

/// The binary watches the config file's directory, so an edit there would be reloaded by the
/// watcher and prove nothing about SIGHUP. Here `--config` names a symlink whose target lives
/// in another directory: editing the target raises no event in the watched directory, while
/// SIGHUP re-reads the file through the link. The test first checks that the edit alone (well
/// past the debounce) changed nothing, so the change it then sees can only come from SIGHUP.
#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_config_file_of_the_running_binary() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let (watched, elsewhere) = (dir.path().join("etc"), dir.path().join("data"));
    std::fs::create_dir_all(&watched).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let journal = dir.path().join("usage.jsonl");
    let target = elsewhere.join("tollgate.toml");
    let link = watched.join("tollgate.toml");
    let text = config_text(mock.addr(), &journal, "", &Price::a().toml());
    std::fs::write(&target, &text).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let mut served = Served::spawn(&link);
    let base = format!("http://{}", served.addr().await);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let status = |key: &'static str| {
        let req = http
            .post(format!("{base}{CHAT}"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o", "one two three", 5, false));
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            resp.bytes().await.unwrap();
            status
        }
    };
    assert_eq!(status(ALICE).await, 200);

    let disabled = text.replace(
        "labels = { team = \"support\" }\n",
        "labels = { team = \"support\" }\ndisabled = true\n",
    );
    assert_ne!(disabled, text);
    std::fs::write(&target, &disabled).unwrap();
    tokio::time::sleep(WATCH_DEBOUNCE * 5).await;
    assert_eq!(status(ALICE).await, 200, "the watcher saw the edit");
    assert_eq!(served.count("config reloaded"), 0, "{}", served.log());

    served.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(ALICE).await != 401 {
        assert!(
            Instant::now() < deadline,
            "alice-dev still admitted 10 s after SIGHUP:\n{}",
            served.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(BOB).await, 200, "other keys still work");
    // The reload is logged after the new config is in place, and the log is read from the
    // child's output by another thread: the lines may trail the 401 a little.
    while served.count("config reloaded") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served.count("SIGHUP: reloading the config file"), 1);
    assert_eq!(served.count("config reloaded"), 1, "{}", served.log());
    assert!(served.log().contains("keys_changed: [\"alice-dev\"]"));

    let exit = served.terminate().await;
    assert!(exit.success(), "{exit}:\n{}", served.log());
    let records = tollgate::ledger::journal::read_all(&journal).unwrap();
    let keys: Vec<&str> = records.iter().map(|r| &*r.key_id).collect();
    // alice before the edit, after it (the watcher saw nothing) and possibly in the moment
    // before SIGHUP took effect; then only bob.
    let (last, alice) = keys.split_last().unwrap();
    assert_eq!(*last, "bob-prod", "{keys:?}");
    assert!(
        alice.len() >= 2 && alice.iter().all(|k| *k == "alice-dev"),
        "{keys:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Admin trigger: refusals, dry run, apply.
// ---------------------------------------------------------------------------------------------

fn problems(v: &Value) -> Vec<String> {
    v["error"]["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems in {v}"))
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn admin_reload_refuses_invalid_configs_dry_runs_and_applies() {
    let (a, b) = (Price::a(), Price::b());
    // No file watch: the admin endpoint is the only trigger, so a dry run stays a dry run.
    let f = Fixture::start(&a.toml(), false).await;
    let body = chat_body("gpt-4o", "one two three", 5, false);
    let mut ids = vec![f.ok(ALICE, &body).await];

    // Two problems in different places: both reported, each with its path.
    let bad_prices = b
        .toml()
        .replacen("output_per_mtok = \"7\"", "output_per_mtok = \"-7\"", 1);
    let invalid = f.text(&bad_prices) + &key_table("new-key", "not-hex", "acme", "");
    f.write(&invalid);
    let (status, v) = f.admin_reload(false).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["applied"], false, "{v}");
    let found = problems(&v);
    println!("refused: {found:#?}");
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("keys[3].sha256:") && p.contains("64 hex")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("prices[0].output_per_mtok:") && p.contains("negative")),
        "{found:?}"
    );
    assert_eq!(found.len(), 2, "{found:?}");

    // An unknown field is refused too, naming the field.
    let unknown =
        f.text(&b.toml()) + &key_table("new-key", &hash(NEW_KEY), "acme", "colour = \"blue\"\n");
    f.write(&unknown);
    let (status, v) = f.admin_reload(false).await;
    assert_eq!(status, 422, "{v}");
    let found = problems(&v);
    println!("refused: {found:#?}");
    assert!(
        found.iter().any(|p| p.contains("unknown field `colour`")),
        "{found:?}"
    );

    // The old config keeps serving: old key set, old prices.
    ids.push(f.ok(ALICE, &body).await);
    let (status, _, _) = f.send(NEW_KEY, &body).await;
    assert_eq!(status, 401);
    let metrics = f.metrics().await;
    assert_eq!(metric(&metrics, "tollgate_config_reloads_failed_total"), 2);
    assert_eq!(metric(&metrics, "tollgate_config_reloads_applied_total"), 0);

    // A valid change: the dry run reports it and applies nothing.
    let valid = f.text(&b.toml()) + &key_table("new-key", &hash(NEW_KEY), "acme", "");
    f.write(&valid);
    let (status, dry) = f.admin_reload(true).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["applied"], false);
    let changes = &dry["changes"];
    assert_eq!(changes["keys_added"], json!(["new-key"]), "{dry}");
    assert_eq!(
        changes["prices_changed"],
        json!(["claude-*", "gpt-4o*"]),
        "{dry}"
    );
    for unchanged in [
        "keys_removed",
        "keys_changed",
        "upstreams_changed",
        "needs_restart",
    ] {
        assert_eq!(changes[unchanged], json!([]), "{unchanged}: {dry}");
    }
    assert_eq!(changes["routes_changed"], false);
    let (status, _, _) = f.send(NEW_KEY, &body).await;
    assert_eq!(status, 401, "a dry run applies nothing");
    ids.push(f.ok(ALICE, &body).await);
    assert_eq!(f.reloads_applied(), 0);

    // Applied for real: same report, and the new key works at the new prices.
    let (status, applied) = f.admin_reload(false).await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["applied"], true);
    assert_eq!(applied["changes"], dry["changes"]);
    let new_id = f.ok(NEW_KEY, &body).await;
    let metrics = f.metrics().await;
    assert_eq!(metric(&metrics, "tollgate_config_reloads_applied_total"), 1);
    assert_eq!(metric(&metrics, "tollgate_config_reloads_failed_total"), 2);

    let records = f.records(4).await;
    for id in &ids {
        assert_eq!(by_id(&records, id).cost, Some(a.cost(3, 5)));
    }
    let new = by_id(&records, &new_id);
    assert_eq!((&*new.key_id, &*new.account), ("new-key", "acme"));
    assert_eq!(new.cost, Some(b.cost(3, 5)));
}

// ---------------------------------------------------------------------------------------------
// 5. Balances across reloads.
// ---------------------------------------------------------------------------------------------

fn accounts(hard_cap: &str, globex_grants: &str) -> String {
    format!(
        "{}
[[accounts]]
id = \"acme\"
hard_cap = \"{hard_cap}\"

[[accounts]]
id = \"globex\"
prepaid = true
grants = [{globex_grants}]
",
        Price::a().toml()
    )
}

#[tokio::test]
async fn balances_survive_reloads_and_a_raised_cap_unblocks_at_once() {
    let welcome = "{ id = \"welcome\", amount = \"1\" }";
    let f = Fixture::start(&accounts("0.0005", welcome), false).await;
    let body = chat_body("gpt-4o", "one two three", 5, false);
    let cost = Price::a().cost(3, 5);

    // Prepaid globex spends a little.
    for _ in 0..2 {
        f.ok(BOB, &body).await;
    }
    let globex = f.admin_get("/admin/accounts/globex").await;
    assert_eq!(dec(&globex["balance"]), d("1") - cost * Decimal::TWO);

    // acme spends up to its cap.
    let mut acme_ok = 0u64;
    loop {
        let (status, _, text) = f.send(ALICE, &body).await;
        if status == 402 {
            assert!(text.contains("spend cap of 0.0005 USD"), "{text}");
            break;
        }
        assert_eq!(status, 200, "{text}");
        acme_ok += 1;
        assert!(acme_ok < 20, "the cap never refused");
    }
    assert!(acme_ok >= 1);

    // Raise the cap: the very next request passes.
    f.write(&f.text(&accounts("1", welcome)));
    let diff = f.gateway.reloader().reload_file().await.unwrap();
    assert_eq!(diff.accounts_changed, ["acme"]);
    assert!(diff.keys_changed.is_empty() && diff.prices_changed.is_empty());
    f.ok(ALICE, &body).await;
    f.ok(ALICE, &body).await;
    acme_ok += 2;
    let globex_after = f.admin_get("/admin/accounts/globex").await;
    assert_eq!(
        globex_after["balance"], globex["balance"],
        "a reload that changes no grant leaves the balance alone"
    );

    let records = f.records(2 + acme_ok).await;
    let acme_spend: Decimal = records
        .iter()
        .filter(|r| &*r.account == "acme")
        .map(|r| r.cost.unwrap())
        .sum();
    assert_eq!(acme_spend, cost * Decimal::from(acme_ok));
    let acme = f.admin_get("/admin/accounts/acme").await;
    assert_eq!(dec(&acme["period_spend"]), acme_spend, "{acme}");
    assert_eq!(dec(&acme["hard_cap"]), d("1"), "{acme}");
    assert_eq!(dec(&acme["period_committed"]), acme_spend, "{acme}");

    // A new configured grant reaches the live wallet: the balance rises by exactly its amount.
    let with_bonus = format!("{welcome}, {{ id = \"bonus\", amount = \"0.25\" }}");
    f.write(&f.text(&accounts("1", &with_bonus)));
    let (status, v) = f.admin_reload(false).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["changes"]["accounts_changed"], json!(["globex"]), "{v}");
    let globex_bonus = f.admin_get("/admin/accounts/globex").await;
    assert_eq!(
        dec(&globex_bonus["balance"]),
        dec(&globex["balance"]) + d("0.25"),
        "{globex_bonus}"
    );
    let grant_ids: Vec<&str> = globex_bonus["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(grant_ids.len(), 2, "{globex_bonus}");
    assert!(grant_ids.contains(&"bonus") && grant_ids.contains(&"welcome"));

    // Reloading the same file again grants nothing twice (grant ids are idempotent).
    let (status, v) = f.admin_reload(false).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        f.admin_get("/admin/accounts/globex").await["balance"],
        globex_bonus["balance"]
    );
    let acme = f.admin_get("/admin/accounts/acme").await;
    assert_eq!(dec(&acme["period_spend"]), acme_spend, "{acme}");
    assert_eq!(f.reloads_applied(), 3);
}

// ---------------------------------------------------------------------------------------------
// 6. Reloads under load.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_reloads_under_load_fail_no_request_and_never_mix_prices() {
    let (a, b) = (Price::a(), Price::b());
    let f = Arc::new(Fixture::start(&a.toml(), true).await);
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    let mut workers = Vec::new();
    for w in 0..8u64 {
        let (f, done, sent) = (f.clone(), done.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = w;
            while !done.load(Ordering::Relaxed) || started.elapsed() < Duration::from_secs(3) {
                let model = if i % 2 == 0 {
                    "gpt-4o"
                } else {
                    "claude-3-5-haiku"
                };
                let stream = (i / 2) % 2 == 1;
                let words = vec!["w"; 1 + (i % 7) as usize].join(" ");
                let body = chat_body(model, &words, 1 + i % 11, stream);
                let key = if w % 2 == 0 { ALICE } else { BOB };
                let (status, _, text) = f.send(key, &body).await;
                sent.fetch_add(1, Ordering::Relaxed);
                let complete = !stream
                    || text.contains("data: [DONE]")
                    || text.contains("event: message_stop");
                if status != 200 || !complete {
                    failures.push(format!("{model} stream={stream}: {status} {text}"));
                }
                i += 1;
            }
            failures
        }));
    }

    let (text_a, text_b) = (f.text(&a.toml()), f.text(&b.toml()));
    let reloader = {
        let f = f.clone();
        let done = done.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                f.write(if i % 2 == 0 { &text_b } else { &text_a });
                f.gateway.reloader().reload_file().await.unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    reloader.await.unwrap();
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    let n = sent.load(Ordering::Relaxed);
    let records = f.records(n).await;
    let (mut at_a, mut at_b) = (0u64, 0u64);
    for r in &records {
        let (ca, cb) = (a.cost_of(r), b.cost_of(r));
        assert_ne!(ca, cb);
        assert_eq!(r.status, 200);
        match r.cost {
            Some(c) if c == ca => at_a += 1,
            Some(c) if c == cb => at_b += 1,
            other => panic!("cost {other:?} is neither A ({ca}) nor B ({cb}): {r:?}"),
        }
    }
    println!(
        "{n} requests ({} streamed) in {:?} across 100 reloads: {at_a} at price A, {at_b} at price B",
        records.iter().filter(|r| r.streamed).count(),
        started.elapsed()
    );
    assert!(at_a > 0 && at_b > 0, "A {at_a}, B {at_b}");
    assert!(f.reloads_applied() >= 100);
    assert_eq!(f.gateway.reloader().failed(), 0);
}

// ---------------------------------------------------------------------------------------------
// 7. check-config --against.
// ---------------------------------------------------------------------------------------------

#[test]
fn check_config_against_prints_what_a_reload_would_change() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("usage.jsonl");
    let mock: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let old_text = config_text(mock, &journal, "", &Price::a().toml());
    // Only the gpt-4o price changes; a key is added.
    let new_prices =
        Price::a()
            .toml()
            .replacen("output_per_mtok = \"4\"", "output_per_mtok = \"5\"", 1);
    let new_text = config_text(mock, &journal, "", &new_prices)
        + &key_table("new-key", &hash(NEW_KEY), "acme", "");
    let (old, new) = (dir.path().join("old.toml"), dir.path().join("new.toml"));
    std::fs::write(&old, old_text).unwrap();
    std::fs::write(&new, new_text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check-config")
        .arg(&new)
        .arg("--against")
        .arg(&old)
        .env("T_OPENAI", OPENAI_CREDENTIAL)
        .env("T_ANTHROPIC", ANTHROPIC_CREDENTIAL)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    assert!(
        stdout.contains("valid (2 upstreams, 1 routes, 4 keys"),
        "{stdout}"
    );
    let (_, diff) = stdout
        .split_once(&format!("changes against {}:\n", old.display()))
        .unwrap_or_else(|| panic!("no diff in:\n{stdout}"));
    let diff: Value = serde_json::from_str(diff).unwrap();
    assert_eq!(diff["keys_added"], json!(["new-key"]));
    assert_eq!(diff["prices_changed"], json!(["gpt-4o*"]));
    for unchanged in [
        "keys_removed",
        "keys_changed",
        "accounts_added",
        "upstreams_changed",
        "needs_restart",
    ] {
        assert_eq!(diff[unchanged], json!([]), "{unchanged}: {diff}");
    }
    assert_eq!(diff["routes_changed"], false);
    assert!(!stdout.contains(OPENAI_CREDENTIAL) && !stdout.contains(&hash(NEW_KEY)));

    // The same file against itself: nothing to change.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check-config")
        .arg(&old)
        .arg("--against")
        .arg(&old)
        .env("T_OPENAI", OPENAI_CREDENTIAL)
        .env("T_ANTHROPIC", ANTHROPIC_CREDENTIAL)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (_, diff) = stdout
        .split_once(&format!("changes against {}:\n", old.display()))
        .unwrap_or_else(|| panic!("no diff in:\n{stdout}"));
    let diff: Value = serde_json::from_str(diff).unwrap();
    assert!(
        diff.as_object()
            .unwrap()
            .values()
            .all(|x| x == &json!([]) || x == &json!(false)),
        "{diff}"
    );
}
