//! Resident memory per key: parses a config with 1 000 000 keys, builds the snapshot the
//! gateway serves from (key table, routes, upstream pools), drops the TOML text, and reports
//! resident-set growth per key (steady state) and the peak during parsing, beside the
//! process's baseline measured in the same run. Target: 1M keys ≤ 1 GiB resident.
//!
//! `cargo bench --bench keys_memory` (Linux: reads /proc/self/status). KEYS=N overrides.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fmt::Write as _;

use tollgate::config::{Config, hash_key};
use tollgate::proxy::snapshot::Snapshot;

// mimalloc's own (linked through `libmimalloc-sys`, whose binding sits behind a feature).
unsafe extern "C" {
    fn mi_collect(force: bool);
}

/// The allocator of the `tollgate` binary, so the figures are the binary's.
#[global_allocator]
static GLOBAL: tollgate::alloc::Allocator = tollgate::alloc::Allocator;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` runs this with `--bench`; test runners (`cargo test --all-targets`,
    // nextest's `--list`) must not pay for a million keys: nothing to list, nothing to test.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let keys: usize = std::env::var("KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let base_rss = status_kib("VmRSS:");
    let mut text = String::from(
        "[[upstreams]]\nname = \"openai\"\ndialect = \"openai\"\nbase_url = \"http://127.0.0.1:9\"\ndefault = true\n",
    );
    for i in 0..keys {
        let _ = write!(
            text,
            "[[keys]]\nid = \"key-{i}\"\nsha256 = \"{}\"\naccount = \"acct-{}\"\n",
            hex::encode(hash_key(&format!("tg-bench-{i}"))),
            i % 10_000
        );
    }
    let text_bytes = text.len();
    let env: HashMap<String, String> = HashMap::new();
    let started = std::time::Instant::now();
    let config = Config::parse(&text, &env).unwrap();
    drop(text);
    let snapshot = Snapshot::build(config).unwrap();
    let built = started.elapsed();
    let built_rss = status_kib("VmRSS:");
    let peak = status_kib("VmHWM:");
    // What the parse freed goes back to the system as the allocator purges (a running
    // gateway's allocations trigger that over time); forced here, so the figure is the
    // snapshot's, not the parse's leftovers. Both are reported.
    // SAFETY: `mi_collect` only returns free memory; no allocation is in flight.
    unsafe { mi_collect(true) };
    let rss = status_kib("VmRSS:");
    let per_key = (rss.saturating_sub(base_rss) * 1024) as f64 / keys as f64;
    println!(
        "keys: {keys} (config text {:.1} MiB)",
        text_bytes as f64 / 1048576.0
    );
    println!("parse + validate + build: {:.2} s", built.as_secs_f64());
    println!(
        "resident: baseline {:.1} MiB, with snapshot {:.1} MiB (right after the build, before \
         the allocator returned what the parse freed: {:.1} MiB), peak {:.1} MiB",
        base_rss as f64 / 1024.0,
        rss as f64 / 1024.0,
        built_rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!("resident per key (steady state): {per_key:.0} bytes");
    println!(
        "target 1M keys <= 1 GiB resident: {}",
        if (rss as f64 / 1024.0 / 1024.0) * (1_000_000.0 / keys as f64) <= 1.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    std::hint::black_box(&snapshot);
}
