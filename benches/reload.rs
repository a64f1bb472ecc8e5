//! Reload time for a config with 100 000 keys: read the file, parse and validate it, diff it
//! against the running config, build the new snapshot (key table, routes, reused upstream
//! pools) and swap it in — `Reloader::reload_file`, the path SIGHUP, file watch and
//! `POST /admin/reload` take. Beside it, in the same run, the parse + validate step alone.
//!
//! `cargo bench --bench reload` (target: ≤ 1 s per reload).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::config::{Config, hash_key};

const KEYS: usize = 100_000;

fn config_text(dir: &std::path::Path) -> String {
    let mut s = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[journal]
dir = "{}/journal"
[[upstreams]]
name = "openai"
dialect = "openai"
base_url = "http://127.0.0.1:9"
default = true
[[prices]]
model_prefix = "gpt-4o"
input_per_mtok = "2.50"
output_per_mtok = "10.00"
[[accounts]]
id = "acct-0"
hard_cap = "100"
"#,
        dir.display()
    );
    for i in 0..KEYS {
        let _ = write!(
            s,
            "[[keys]]\nid = \"key-{i}\"\nsha256 = \"{}\"\naccount = \"acct-{}\"\nrpm = 600\n",
            hex::encode(hash_key(&format!("tg-bench-{i}"))),
            i % 1000
        );
    }
    s
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let text = config_text(dir.path());
    std::fs::write(&path, &text).unwrap();
    let env: HashMap<String, String> = HashMap::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gateway = rt.block_on(async {
        tollgate::GatewayBuilder::new(Config::parse(&text, &env).unwrap())
            .config_path(&path)
            .env(Arc::new(env.clone()))
            .start()
            .await
            .unwrap()
    });
    let mut g = c.benchmark_group("reload_100k_keys");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("parse_and_validate_only", |b| {
        b.iter(|| Config::parse(&text, &env).unwrap())
    });
    g.bench_function("full_reload", |b| {
        b.iter(|| rt.block_on(gateway.reloader().reload_file()).unwrap())
    });
    g.finish();
    rt.block_on(gateway.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
