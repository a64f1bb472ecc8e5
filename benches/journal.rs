//! Journal append throughput: the same usage records appended through the segment journal
//! with no fsync (the OS decides), with group commit (one fsync per 64-record batch — what
//! `fsync = "interval"` amounts to under load), and strict (one fsync per record), in the same
//! run. `cargo bench --bench journal`; throughput is reported in records/s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tollgate::ledger::{Dimensions, Journal, LedgerEntry, Outcome, SegmentJournal, UsageRecord};
use tollgate::provider::{Endpoint, TokenUsage};

fn record(i: u64) -> LedgerEntry {
    LedgerEntry::Usage(UsageRecord {
        id: uuid::Uuid::now_v7(),
        timestamp: chrono::Utc::now(),
        key_id: Arc::from(format!("key-{}", i % 10_000).as_str()),
        account: Arc::from("acme"),
        model: Some("gpt-4o-mini".into()),
        upstream: Arc::from("openai"),
        endpoint: Endpoint::ChatCompletions,
        streamed: i % 2 == 0,
        status: 200,
        outcome: Outcome::Completed,
        usage: TokenUsage {
            input_tokens: 812,
            output_tokens: 164,
            cached_input_tokens: 512,
            cache_creation_input_tokens: 0,
            reasoning_tokens: 0,
        },
        estimated: false,
        upstream_ttfb_us: Some(1812),
        upstream_total_us: 42_118,
        dimensions: Dimensions {
            feature: Some("search".into()),
            workflow: None,
            end_user: Some("user-42".into()),
        },
        cost: Some("0.000244".parse().unwrap()),
        rated_cost: Some("0.000244".parse().unwrap()),
        unit: Some("USD".into()),
        metric: None,
        quantity: None,
    })
}

const BATCH: u64 = 64;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = SegmentJournal::open(dir.path(), 64 * 1024 * 1024).unwrap();
    let batch: Vec<LedgerEntry> = (0..BATCH).map(record).collect();
    let mut g = c.benchmark_group("journal_append");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("no_fsync", |b| {
        b.iter(|| {
            journal.append(&batch).unwrap();
            journal.flush().unwrap();
        })
    });
    g.bench_function("group_commit_fsync_per_64", |b| {
        b.iter(|| {
            journal.append(&batch).unwrap();
            journal.sync().unwrap();
        })
    });
    g.bench_function("strict_fsync_per_record", |b| {
        b.iter_batched(
            || (),
            |()| {
                for entry in &batch {
                    journal.append(std::slice::from_ref(entry)).unwrap();
                    journal.sync().unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
