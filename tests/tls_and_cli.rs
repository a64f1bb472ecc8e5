//! Upstream TLS with a private CA file, and the command-line tools.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;
use serde_json::json;
use tollgate::config::Config;
use tollgate::mock::{MockConfig, MockServer, MockTls};

#[tokio::test]
async fn https_upstream_with_private_ca_and_connection_reuse() {
    https_upstream(true).await;
}

/// The same over HTTP/1.1 (the upstream offers no HTTP/2): tollgate's own HTTP/1.1 client
/// over TLS, one connection for all three requests.
#[tokio::test]
async fn https_upstream_over_http1_reuses_its_connection() {
    https_upstream(false).await;
}

async fn https_upstream(offer_h2: bool) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let mock = MockServer::start(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig {
            openai_key: OPENAI_CREDENTIAL.into(),
            anthropic_key: ANTHROPIC_CREDENTIAL.into(),
            tls: Some(MockTls {
                cert_pem: cert.cert.pem().into_bytes(),
                key_pem: cert.key_pair.serialize_pem().into_bytes(),
                offer_h2,
            }),
            record_requests: true,
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let journal = dir.path().join("usage.jsonl");
    let port = mock.addr().port();
    let text = config_text(mock.addr(), &journal, "", "").replace(
        &format!("base_url = \"http://{}\"", mock.addr()),
        &format!(
            "base_url = \"https://localhost:{port}\"\nca_file = \"{}\"",
            ca.display()
        ),
    );
    assert!(text.contains("https://localhost"));
    let config = Config::parse(&text, &test_env()).unwrap();
    let gateway = tollgate::GatewayBuilder::new(config).start().await.unwrap();
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let resp = http
            .post(format!("http://{}/v1/chat/completions", gateway.addr()))
            .bearer_auth(ALICE)
            .json(&json!({"model": "gpt-4o", "max_tokens": 2, "messages": [{"role": "user", "content": "a b c"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    assert!(
        gateway
            .ledger()
            .wait_written(3, std::time::Duration::from_secs(5))
            .await
    );
    let records = tollgate::ledger::journal::read_all(&journal).unwrap();
    assert!(
        records
            .iter()
            .all(|r| r.usage.input_tokens == 3 && r.usage.output_tokens == 2)
    );
    assert_eq!(mock.request_count(), 3);
    // ALPN picked HTTP/2 when offered, and the three requests shared one connection.
    let version = if offer_h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    assert!(mock.received().iter().all(|r| r.version == version));
    assert_eq!(mock.connection_count(), 1);

    // Without the CA file the same upstream is refused (system roots do not trust it): 502.
    let untrusted = text.replace(&format!("ca_file = \"{}\"", ca.display()), "");
    let config = Config::parse(&untrusted, &test_env()).unwrap();
    let gateway2 = tollgate::GatewayBuilder::new(config).start().await.unwrap();
    let resp = http
        .post(format!("http://{}/v1/chat/completions", gateway2.addr()))
        .bearer_auth(ALICE)
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body = resp.text().await.unwrap();
    assert!(body.contains("certificate"), "{body}");
    gateway.shutdown().await;
    gateway2.shutdown().await;
}

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

#[test]
fn check_config_prints_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[[upstreams]]
name = "x"
dialect = "soap"
base_url = "api.example.com"
[[keys]]
id = "k"
sha256 = "short"
account = ""
"#,
    )
    .unwrap();
    let out = check_config(&[bad.as_os_str()], Secrets::Set);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "upstreams[0].dialect",
        "upstreams[0].base_url",
        "keys[0].sha256",
        "keys[0].account",
    ] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }

    let example = std::ffi::OsStr::new("config/tollgate.toml");
    let out = check_config(&[example], Secrets::Set);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

    // Without the secrets in the environment: refused, naming each variable, unless the
    // environment is not to be read.
    let out = check_config(&[example], Secrets::Unset);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for (var, _) in EXAMPLE_SECRETS {
        assert!(err.contains(var), "missing {var}: {err}");
    }
    let without_env = std::ffi::OsStr::new("--without-env");
    assert_success(&check_config(&[without_env, example], Secrets::Unset));
    // A value that must parse (a PostgreSQL URL) is not checked without the environment.
    let with_pg = dir.path().join("pg.toml");
    let base = std::fs::read_to_string("config/tollgate.toml").unwrap();
    std::fs::write(
        &with_pg,
        format!("{base}\n[[sinks]]\nkind = \"postgres\"\nurl_env = \"TOLLGATE_PG_URL\"\n"),
    )
    .unwrap();
    assert_success(&check_config(
        &[without_env, with_pg.as_os_str()],
        Secrets::Unset,
    ));
    // The file's own problems are still found.
    let out = check_config(&[without_env, bad.as_os_str()], Secrets::Unset);
    assert_eq!(out.status.code(), Some(1));
}

/// The variables `config/tollgate.toml` reads its secrets from, with test values.
const EXAMPLE_SECRETS: [(&str, &str); 3] = [
    ("TOLLGATE_OPENAI_KEY", "x"),
    ("TOLLGATE_ANTHROPIC_KEY", "y"),
    ("TOLLGATE_ADMIN_TOKEN", "an-admin-token-of-length"),
];

enum Secrets {
    Set,
    Unset,
}

/// `tollgate check-config ARGS`, with the example config's secrets set or unset.
fn check_config(args: &[&std::ffi::OsStr], secrets: Secrets) -> std::process::Output {
    let mut cmd = tollgate();
    cmd.arg("check-config").args(args);
    for (var, value) in EXAMPLE_SECRETS {
        match secrets {
            Secrets::Set => cmd.env(var, value),
            Secrets::Unset => cmd.env_remove(var),
        };
    }
    cmd.output().unwrap()
}

fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hash_key_matches_config_hashing_and_reads_stdin() {
    let out = tollgate()
        .args(["hash-key", "tg-demo-alice"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "3a11a98be70b2283c5c53b03427e4ab85f18efeaf52932b2a6f4712db37313de"
    );
    use std::io::Write;
    let mut child = tollgate()
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"tg-demo-alice\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "3a11a98be70b2283c5c53b03427e4ab85f18efeaf52932b2a6f4712db37313de"
    );
    let help = tollgate().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("serve") && help.contains("check-config") && help.contains("hash-key"));
}

#[tokio::test]
async fn journal_command_prints_the_entries() {
    let h = Harness::start().await;
    let resp = h
        .openai(
            "/v1/chat/completions",
            ALICE,
            json!({"model": "gpt-4o", "max_tokens": 2, "messages": [{"role": "user", "content": "a b"}]}),
        )
        .send()
        .await
        .unwrap();
    let id = record_id(&resp);
    resp.bytes().await.unwrap();
    h.records(1).await;
    let out = tollgate().arg("journal").arg(&h.journal).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["type"], "usage");
    assert_eq!(line["id"], id);
}
