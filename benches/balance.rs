//! Reserve + settle on the account map under 2-thread contention: tollgate's lock-free
//! accounts (DashMap lookup + CAS reservations + fetch_add settlement, grants drawn in order)
//! beside a `Mutex<HashMap>` doing the same bookkeeping under one lock, in the same run.
//!
//! `cargo bench --bench balance`. Each iteration is one reserve + settle per thread; both
//! threads hit the same 16 hot accounts, the worst case for contention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::balance::{AccountPolicy, Balances, GrantKind, GrantSpec};

const THREADS: usize = 2;
const ACCOUNTS: usize = 16;

fn policies() -> Vec<Arc<AccountPolicy>> {
    (0..ACCOUNTS)
        .map(|i| {
            let mut p = AccountPolicy::unlimited(&format!("acct-{i}"));
            p.prepaid = true;
            p.hard_cap = Some(i64::MAX / 4);
            p.grants = vec![GrantSpec {
                id: "g".into(),
                amount: i64::MAX / 4,
                kind: GrantKind::Paid,
                priority: 0,
                expires_at: None,
                expires_at_period_end: false,
            }];
            Arc::new(p)
        })
        .collect()
}

/// Runs `op(thread, i)` `iters` times on each of two threads; returns the wall time.
fn contended(iters: u64, op: Arc<dyn Fn(usize, u64) + Send + Sync>) -> Duration {
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let op = op.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..iters {
                    op(t, i);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

struct LockedAccount {
    available: i64,
    committed: i64,
    spend: i64,
    grants: Vec<i64>,
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("reserve_settle_2_threads");
    g.throughput(Throughput::Elements(THREADS as u64));

    let policies = policies();
    let balances = Arc::new(Balances::default());
    let now = Utc::now();
    let ids: Vec<String> = policies.iter().map(|p| p.id.to_string()).collect();
    g.bench_function("tollgate_lock_free", |b| {
        let balances = balances.clone();
        let policies = policies.clone();
        b.iter_custom(|iters| {
            let balances = balances.clone();
            let policies = policies.clone();
            contended(
                iters,
                Arc::new(move |_t, i| {
                    let policy = &policies[(i as usize) % ACCOUNTS];
                    let account = balances.account(policy, now);
                    let r = account.reserve(policy, 1_000, now).unwrap();
                    r.settle(700, now);
                }),
            )
        })
    });

    let map: Arc<Mutex<HashMap<String, LockedAccount>>> = Arc::new(Mutex::new(
        ids.iter()
            .map(|id| {
                (
                    id.clone(),
                    LockedAccount {
                        available: i64::MAX / 4,
                        committed: 0,
                        spend: 0,
                        grants: vec![i64::MAX / 4],
                    },
                )
            })
            .collect(),
    ));
    g.bench_function("baseline_mutex_hashmap", |b| {
        let map = map.clone();
        let ids = ids.clone();
        b.iter_custom(|iters| {
            let map = map.clone();
            let ids = ids.clone();
            contended(
                iters,
                Arc::new(move |_t, i| {
                    let id = &ids[(i as usize) % ACCOUNTS];
                    {
                        let mut m = map.lock().unwrap();
                        let a = m.get_mut(id).unwrap();
                        assert!(a.available >= 1_000 && a.committed + 1_000 <= i64::MAX / 4);
                        a.available -= 1_000;
                        a.committed += 1_000;
                    }
                    let mut m = map.lock().unwrap();
                    let a = m.get_mut(id).unwrap();
                    a.available += 1_000 - 700;
                    a.committed -= 1_000 - 700;
                    a.spend += 700;
                    a.grants[0] -= 700;
                }),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
