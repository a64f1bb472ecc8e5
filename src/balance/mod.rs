//! Balances and guardrails, decided in-line from in-memory state.
//!
//! Each account's state is a set of atomics ([`AccountState`]) found through a `DashMap`
//! outside the config snapshot, so it survives every reload. The request path never holds a
//! mutex: admission reserves the worst-case charge with compare-and-swap loops on two
//! counters (period commitment against the hard cap, wallet availability against the prepaid
//! balance), and settlement moves the reservation to the true charge with `fetch_add`. A mutex
//! is taken only on rare administrative paths: adding a grant, expiring grants, rolling the
//! period at its boundary.
//!
//! Invariants (nano-units of the account's unit):
//! - `available = Σ live grants' remaining − overdraft − outstanding wallet reservations`;
//! - `balance = Σ live grants' remaining − overdraft` (moves only on settle, grant, expiry);
//! - `committed = period charges settled + outstanding cap reservations ≤ hard cap`
//!   whenever every reservation covered its request's true charge.
//!
//! Threshold alerts are detected from `fetch_add` results on monotonic per-period counters:
//! concurrent updates see disjoint `[before, after)` intervals, so each crossing is reported
//! exactly once, with no shared "already fired" state.

pub mod throttle;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use arc_swap::ArcSwap;
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

use crate::alert::{crossed_below, crossed_thresholds};
use crate::pricing::{Conversion, Plan, from_nanos, scale_ppb};

/// What happens when a prepaid wallet cannot cover a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverageRule {
    /// Refuse once the balance cannot cover the reservation.
    Block,
    /// Let the balance go negative, down to minus `limit` nano-units.
    Allow { limit: i64 },
    /// Refuse once the balance is exhausted, until a grant or top-up is added.
    RequireTopUp,
}

/// Whether a grant was paid for or given away (reported; both are spent the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    Paid,
    Promotional,
}

impl GrantKind {
    /// Parses `paid` / `promotional` (config and admin API share the words and the message).
    pub fn parse(word: &str) -> Result<GrantKind, String> {
        match word {
            "paid" => Ok(GrantKind::Paid),
            "promotional" => Ok(GrantKind::Promotional),
            other => Err(format!("`{other}` is not one of paid, promotional")),
        }
    }
}

/// Parses a grant's rollover rule: `keep` (carries over until its expiry) or `expire`
/// (forfeited at the end of the period it was added in). Returns `expires_at_period_end`.
pub fn parse_rollover(word: &str) -> Result<bool, String> {
    match word {
        "keep" => Ok(false),
        "expire" => Ok(true),
        other => Err(format!("`{other}` is not one of keep, expire")),
    }
}

/// A grant as configured or added by an admin or an automatic top-up.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GrantSpec {
    pub id: String,
    pub amount: i64,
    pub kind: GrantKind,
    /// Lower is drawn first.
    pub priority: i32,
    pub expires_at: Option<DateTime<Utc>>,
    /// Forfeit what is left at the end of the period the grant was added in.
    pub expires_at_period_end: bool,
}

/// Automatic top-up when the balance falls below a threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoTopUp {
    pub threshold: i64,
    pub amount: i64,
    pub cooldown: std::time::Duration,
}

/// Automatic slow-down as period spend approaches the hard cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slowdown {
    /// Fraction of the hard cap, parts per billion.
    pub at_ppb: i128,
    /// Requests per minute allowed per key beyond that point.
    pub rpm: u32,
}

/// An account's limits and billing rules, from config (lives in the snapshot).
#[derive(Clone, Debug)]
pub struct AccountPolicy {
    pub id: Arc<str>,
    /// `USD`, `credits`, … — the unit of every amount below.
    pub unit: Arc<str>,
    pub conversion: Conversion,
    pub plan: Plan,
    pub seats: u32,
    pub hard_cap: Option<i64>,
    pub soft_cap: Option<i64>,
    pub prepaid: bool,
    pub overage: OverageRule,
    pub grants: Vec<GrantSpec>,
    pub auto_topup: Option<AutoTopUp>,
    /// Fractions of the hard cap (and of the plan allowance) that raise an alert.
    pub alert_fractions: Vec<Decimal>,
    pub low_balance: Option<i64>,
    pub webhooks: Vec<String>,
    pub slowdown: Option<Slowdown>,
}

impl AccountPolicy {
    /// The policy of an account that config does not list: metered, never limited.
    pub fn unlimited(id: &str) -> AccountPolicy {
        AccountPolicy {
            id: Arc::from(id),
            unit: "USD".into(),
            conversion: Conversion::IDENTITY,
            plan: Plan::pay_as_you_go(crate::pricing::Period::Month),
            seats: 0,
            hard_cap: None,
            soft_cap: None,
            prepaid: false,
            overage: OverageRule::Block,
            grants: Vec::new(),
            auto_topup: None,
            alert_fractions: Vec::new(),
            low_balance: None,
            webhooks: Vec::new(),
            slowdown: None,
        }
    }

    /// Whether admission needs to reserve at all.
    pub fn is_limited(&self) -> bool {
        self.hard_cap.is_some() || self.prepaid
    }

    /// Converts a worst-case price-book amount into the reservation this account needs:
    /// in the account's unit, at the dearest plan tier, so it covers any marginal charge.
    pub fn reservation_for(&self, worst_case_book_nanos: i64) -> i64 {
        scale_ppb(
            self.conversion.apply(worst_case_book_nanos),
            self.plan.max_multiplier_ppb(),
        )
    }
}

/// Why admission refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("spend cap of {cap} {unit} for this period is reached; it resets at {resets_at}")]
    HardCap {
        cap: Decimal,
        unit: String,
        resets_at: DateTime<Utc>,
    },
    #[error(
        "insufficient balance: {balance} {unit} left, this request may cost up to {needed} {unit}"
    )]
    InsufficientBalance {
        balance: Decimal,
        needed: Decimal,
        unit: String,
    },
    #[error("the prepaid balance is exhausted; add a top-up to continue")]
    TopUpRequired,
}

/// A threshold crossed by a settlement, to be announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Crossing {
    /// Period spend reached `fraction` of the hard cap.
    SpendThreshold {
        fraction: Decimal,
        spend: i64,
        cap: i64,
    },
    /// Period rated usage reached `fraction` of the plan's included allowance.
    AllowanceThreshold {
        fraction: Decimal,
        used: i64,
        included: i64,
    },
    SoftCap {
        spend: i64,
        cap: i64,
    },
    LowBalance {
        balance: i64,
        threshold: i64,
    },
    /// An automatic top-up grant was added.
    AutoTopUp {
        grant_id: String,
        amount: i64,
        balance: i64,
    },
}

/// One prepaid grant's live state.
#[derive(Debug)]
pub struct Grant {
    pub spec: GrantSpec,
    pub created_at: DateTime<Utc>,
    /// Effective expiry (`expires_at`, or the period end for period-bound grants).
    pub expires_at: Option<DateTime<Utc>>,
    remaining: AtomicI64,
    expired: AtomicBool,
}

impl Grant {
    pub fn remaining(&self) -> i64 {
        self.remaining.load(Ordering::Acquire)
    }
    pub fn is_expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }
}

/// An account's live counters; see the module docs for the invariants.
#[derive(Debug)]
pub struct AccountState {
    pub id: Arc<str>,
    grants: ArcSwap<Vec<Arc<Grant>>>,
    available: AtomicI64,
    balance: AtomicI64,
    overdraft: AtomicI64,
    topup_required: AtomicBool,
    period_start: AtomicI64,
    period_end: AtomicI64,
    period_rated: AtomicI64,
    period_spend: AtomicI64,
    committed: AtomicI64,
    next_expiry: AtomicI64,
    last_topup_ms: AtomicI64,
    /// Serialises the rare writers (grant changes, expiry, period roll); never held by the
    /// request path except on those events.
    admin: std::sync::Mutex<()>,
}

/// A snapshot of an account for the admin API and reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AccountView {
    pub account: String,
    pub unit: String,
    pub balance: Decimal,
    pub available: Decimal,
    pub overdraft: Decimal,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub period_rated_usage: Decimal,
    pub period_spend: Decimal,
    pub period_committed: Decimal,
    pub hard_cap: Option<Decimal>,
    pub soft_cap: Option<Decimal>,
    pub included_usage: Decimal,
    pub fixed_fees: Decimal,
    pub topup_required: bool,
    pub grants: Vec<GrantView>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GrantView {
    pub id: String,
    pub kind: GrantKind,
    pub priority: i32,
    pub amount: Decimal,
    pub remaining: Decimal,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub expired: bool,
}

/// A reservation held while a request is in flight. Settle it with the true charge; dropping
/// it unsettled releases it.
#[derive(Debug)]
pub struct Reservation {
    account: Arc<AccountState>,
    policy: Arc<AccountPolicy>,
    wallet: i64,
    cap: i64,
    period_start: i64,
    settled: bool,
}

/// The result of settling a request.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Rated usage in the account's unit, before allowance and tiers.
    pub rated: i64,
    /// What the account was charged.
    pub charge: i64,
    pub crossings: Vec<Crossing>,
    /// A grant an automatic top-up added (for the journal and the payment webhook).
    pub topup: Option<GrantSpec>,
}

fn cas_add_within(counter: &AtomicI64, amount: i64, ok: impl Fn(i64) -> bool) -> Result<(), i64> {
    let mut current = counter.load(Ordering::Acquire);
    loop {
        if !ok(current) {
            return Err(current);
        }
        match counter.compare_exchange_weak(
            current,
            current + amount,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Ok(()),
            Err(now) => current = now,
        }
    }
}

fn draw_order(a: &Arc<Grant>, b: &Arc<Grant>) -> std::cmp::Ordering {
    a.spec
        .priority
        .cmp(&b.spec.priority)
        .then_with(|| match (a.expires_at, b.expires_at) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        })
        .then_with(|| a.created_at.cmp(&b.created_at))
}

impl AccountState {
    pub fn new(policy: &AccountPolicy, now: DateTime<Utc>) -> AccountState {
        let (start, end) = policy.plan.period.bounds(now);
        let state = AccountState {
            id: policy.id.clone(),
            grants: ArcSwap::from_pointee(Vec::new()),
            available: AtomicI64::new(0),
            balance: AtomicI64::new(0),
            overdraft: AtomicI64::new(0),
            topup_required: AtomicBool::new(false),
            period_start: AtomicI64::new(start.timestamp()),
            period_end: AtomicI64::new(end.timestamp()),
            period_rated: AtomicI64::new(0),
            period_spend: AtomicI64::new(0),
            committed: AtomicI64::new(0),
            next_expiry: AtomicI64::new(i64::MAX),
            last_topup_ms: AtomicI64::new(i64::MIN / 2),
            admin: std::sync::Mutex::new(()),
        };
        state.sync_grants(policy, now);
        state
    }

    /// Adds the policy's configured grants this state has not seen (by id). Configured
    /// grants date from the epoch, so they sort the same on every start (replay after a
    /// restart draws them in the same order as the live run did).
    pub fn sync_grants(&self, policy: &AccountPolicy, now: DateTime<Utc>) {
        for spec in &policy.grants {
            let _ = self.add_grant_created(policy, spec.clone(), now, DateTime::UNIX_EPOCH);
        }
    }

    /// Adds a grant (config, admin top-up, automatic top-up). Repays any overdraft first.
    /// Fails when a grant with the same id exists (ids make grants idempotent).
    pub fn add_grant(
        &self,
        policy: &AccountPolicy,
        spec: GrantSpec,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        self.add_grant_created(policy, spec, now, now)
    }

    /// [`AccountState::add_grant`] with an explicit creation time for the draw order.
    pub fn add_grant_created(
        &self,
        policy: &AccountPolicy,
        spec: GrantSpec,
        now: DateTime<Utc>,
        created_at: DateTime<Utc>,
    ) -> Result<(), String> {
        let _guard = self
            .admin
            .lock()
            .map_err(|_| "account state poisoned".to_string())?;
        let current = self.grants.load_full();
        if current.iter().any(|g| g.spec.id == spec.id) {
            return Err(format!("grant `{}` already exists", spec.id));
        }
        if spec.amount <= 0 {
            return Err("grant amount must be positive".into());
        }
        let mut expires_at = spec.expires_at;
        if spec.expires_at_period_end {
            let (_, end) = policy.plan.period.bounds(now);
            expires_at = Some(expires_at.map_or(end, |e| e.min(end)));
        }
        if expires_at.is_some_and(|e| e <= now) {
            return Err(format!("grant `{}` has already expired", spec.id));
        }
        // Repay the overdraft out of the new grant.
        let mut repay = 0;
        let _ = self
            .overdraft
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                repay = o.min(spec.amount).max(0);
                Some(o - repay)
            });
        let amount = spec.amount;
        let grant = Arc::new(Grant {
            remaining: AtomicI64::new(amount - repay),
            expired: AtomicBool::new(false),
            created_at,
            expires_at,
            spec,
        });
        let mut next: Vec<Arc<Grant>> = current.iter().cloned().collect();
        next.push(grant);
        next.sort_by(draw_order);
        if let Some(e) = expires_at {
            self.next_expiry.fetch_min(e.timestamp(), Ordering::AcqRel);
        }
        self.grants.store(Arc::new(next));
        self.available.fetch_add(amount, Ordering::AcqRel);
        self.balance.fetch_add(amount, Ordering::AcqRel);
        self.topup_required.store(false, Ordering::Release);
        Ok(())
    }

    /// Resets period counters when `now` is past the period end (rare path, locked).
    fn roll_period(&self, policy: &AccountPolicy, now: DateTime<Utc>) {
        if now.timestamp() < self.period_end.load(Ordering::Acquire) {
            return;
        }
        let Ok(_guard) = self.admin.lock() else {
            return;
        };
        if now.timestamp() < self.period_end.load(Ordering::Acquire) {
            return;
        }
        let (start, end) = policy.plan.period.bounds(now);
        self.period_rated.store(0, Ordering::Release);
        self.period_spend.store(0, Ordering::Release);
        self.committed.store(0, Ordering::Release);
        self.period_start
            .store(start.timestamp(), Ordering::Release);
        self.period_end.store(end.timestamp(), Ordering::Release);
    }

    /// Zeroes grants whose expiry has passed (rare path, locked).
    fn expire_grants(&self, now: DateTime<Utc>) {
        if now.timestamp() < self.next_expiry.load(Ordering::Acquire) {
            return;
        }
        let Ok(_guard) = self.admin.lock() else {
            return;
        };
        let mut next = i64::MAX;
        for g in self.grants.load().iter() {
            let Some(e) = g.expires_at else { continue };
            if g.is_expired() {
                continue;
            }
            if e <= now {
                g.expired.store(true, Ordering::Release);
                let left = g.remaining.swap(0, Ordering::AcqRel);
                self.available.fetch_sub(left, Ordering::AcqRel);
                self.balance.fetch_sub(left, Ordering::AcqRel);
            } else {
                next = next.min(e.timestamp());
            }
        }
        self.next_expiry.store(next, Ordering::Release);
    }

    /// Reserves `amount` (nano-units of the account's unit) against the hard cap and the
    /// wallet, or refuses.
    pub fn reserve(
        self: &Arc<Self>,
        policy: &Arc<AccountPolicy>,
        amount: i64,
        now: DateTime<Utc>,
    ) -> Result<Reservation, Refusal> {
        self.roll_period(policy, now);
        self.expire_grants(now);
        let amount = amount.max(0);
        if policy.prepaid
            && policy.overage == OverageRule::RequireTopUp
            && self.topup_required.load(Ordering::Acquire)
        {
            return Err(Refusal::TopUpRequired);
        }
        let period_start = self.period_start.load(Ordering::Acquire);
        let mut cap_reserved = 0;
        if let Some(cap) = policy.hard_cap {
            cas_add_within(&self.committed, amount, |c| c + amount <= cap).map_err(|_| {
                Refusal::HardCap {
                    cap: from_nanos(cap),
                    unit: policy.unit.to_string(),
                    resets_at: Utc
                        .timestamp_opt(self.period_end.load(Ordering::Acquire), 0)
                        .single()
                        .unwrap_or(now),
                }
            })?;
            cap_reserved = amount;
        }
        let mut wallet_reserved = 0;
        if policy.prepaid {
            let floor = match policy.overage {
                OverageRule::Allow { limit } => -limit,
                OverageRule::Block | OverageRule::RequireTopUp => 0,
            };
            if let Err(available) =
                cas_add_within(&self.available, -amount, |a| a - amount >= floor)
            {
                if cap_reserved > 0 {
                    self.committed.fetch_sub(cap_reserved, Ordering::AcqRel);
                }
                if policy.overage == OverageRule::RequireTopUp && available <= 0 {
                    self.topup_required.store(true, Ordering::Release);
                    return Err(Refusal::TopUpRequired);
                }
                return Err(Refusal::InsufficientBalance {
                    balance: from_nanos(available.max(0)),
                    needed: from_nanos(amount),
                    unit: policy.unit.to_string(),
                });
            }
            wallet_reserved = amount;
        }
        Ok(Reservation {
            account: self.clone(),
            policy: policy.clone(),
            wallet: wallet_reserved,
            cap: cap_reserved,
            period_start,
            settled: false,
        })
    }

    /// Charges `charge` to the wallet's grants in draw order; what they cannot cover becomes
    /// overdraft.
    fn draw(&self, charge: i64) {
        let mut left = charge;
        for g in self.grants.load().iter() {
            if left <= 0 {
                break;
            }
            if g.is_expired() {
                continue;
            }
            let mut taken = 0;
            let _ = g
                .remaining
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                    taken = r.min(left).max(0);
                    Some(r - taken)
                });
            left -= taken;
        }
        if left > 0 {
            self.overdraft.fetch_add(left, Ordering::AcqRel);
        }
    }

    pub fn view(&self, policy: &AccountPolicy) -> AccountView {
        let ts = |s: i64| Utc.timestamp_opt(s, 0).single().unwrap_or_default();
        AccountView {
            account: self.id.to_string(),
            unit: policy.unit.to_string(),
            balance: from_nanos(self.balance.load(Ordering::Acquire)),
            available: from_nanos(self.available.load(Ordering::Acquire)),
            overdraft: from_nanos(self.overdraft.load(Ordering::Acquire)),
            period_start: ts(self.period_start.load(Ordering::Acquire)),
            period_end: ts(self.period_end.load(Ordering::Acquire)),
            period_rated_usage: from_nanos(self.period_rated.load(Ordering::Acquire)),
            period_spend: from_nanos(self.period_spend.load(Ordering::Acquire)),
            period_committed: from_nanos(self.committed.load(Ordering::Acquire)),
            hard_cap: policy.hard_cap.map(from_nanos),
            soft_cap: policy.soft_cap.map(from_nanos),
            included_usage: from_nanos(policy.plan.included),
            fixed_fees: from_nanos(policy.plan.fixed_fees(policy.seats)),
            topup_required: self.topup_required.load(Ordering::Acquire),
            grants: self
                .grants
                .load()
                .iter()
                .map(|g| GrantView {
                    id: g.spec.id.clone(),
                    kind: g.spec.kind,
                    priority: g.spec.priority,
                    amount: from_nanos(g.spec.amount),
                    remaining: from_nanos(g.remaining()),
                    created_at: g.created_at,
                    expires_at: g.expires_at,
                    expired: g.is_expired(),
                })
                .collect(),
        }
    }

    /// Re-applies a journaled charge at start-up: wallet draw always, period counters when
    /// it falls in the current period. No alerts, no top-ups (they were journaled as such).
    pub fn replay_usage(
        &self,
        policy: &AccountPolicy,
        rated: i64,
        charge: i64,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) {
        self.roll_period(policy, now);
        let start = self.period_start.load(Ordering::Acquire);
        let end = self.period_end.load(Ordering::Acquire);
        if (start..end).contains(&at.timestamp()) {
            self.period_rated.fetch_add(rated, Ordering::AcqRel);
            self.period_spend.fetch_add(charge, Ordering::AcqRel);
            self.committed.fetch_add(charge, Ordering::AcqRel);
        }
        if policy.prepaid {
            self.available.fetch_sub(charge, Ordering::AcqRel);
            self.balance.fetch_sub(charge, Ordering::AcqRel);
            self.draw(charge);
            if self.balance() <= 0 && policy.overage == OverageRule::RequireTopUp {
                self.topup_required.store(true, Ordering::Release);
            }
        }
    }

    /// Records when the last automatic top-up happened (replay).
    pub fn note_topup(&self, at: DateTime<Utc>) {
        self.last_topup_ms
            .fetch_max(at.timestamp_millis(), Ordering::AcqRel);
    }

    /// Period spend (settled) so far, nano-units.
    pub fn period_spend(&self) -> i64 {
        self.period_spend.load(Ordering::Acquire)
    }

    /// Settled balance, nano-units.
    pub fn balance(&self) -> i64 {
        self.balance.load(Ordering::Acquire)
    }

    /// Fraction of the hard cap spent, parts per billion (0 without a cap).
    pub fn cap_used_ppb(&self, policy: &AccountPolicy) -> i128 {
        match policy.hard_cap {
            Some(cap) if cap > 0 => {
                i128::from(self.period_spend()) * 1_000_000_000 / i128::from(cap)
            }
            _ => 0,
        }
    }
}

/// An account's settled state, as written in a journal checkpoint (no reservations: a
/// checkpoint is built by replaying the journal, never from live state).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountSnapshot {
    pub account: String,
    pub balance: i64,
    pub overdraft: i64,
    pub topup_required: bool,
    pub period_start: i64,
    pub period_end: i64,
    pub period_rated: i64,
    pub period_spend: i64,
    pub last_topup_ms: i64,
    pub grants: Vec<GrantSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GrantSnapshot {
    pub spec: GrantSpec,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub remaining: i64,
    pub expired: bool,
}

impl AccountState {
    /// The settled state, for a checkpoint. Only meaningful with no reservation outstanding.
    pub fn export(&self) -> AccountSnapshot {
        AccountSnapshot {
            account: self.id.to_string(),
            balance: self.balance.load(Ordering::Acquire),
            overdraft: self.overdraft.load(Ordering::Acquire),
            topup_required: self.topup_required.load(Ordering::Acquire),
            period_start: self.period_start.load(Ordering::Acquire),
            period_end: self.period_end.load(Ordering::Acquire),
            period_rated: self.period_rated.load(Ordering::Acquire),
            period_spend: self.period_spend.load(Ordering::Acquire),
            last_topup_ms: self.last_topup_ms.load(Ordering::Acquire),
            grants: self
                .grants
                .load()
                .iter()
                .map(|g| GrantSnapshot {
                    spec: g.spec.clone(),
                    created_at: g.created_at,
                    expires_at: g.expires_at,
                    remaining: g.remaining(),
                    expired: g.is_expired(),
                })
                .collect(),
        }
    }

    /// Rebuilds an account from a checkpoint.
    pub fn import(snapshot: &AccountSnapshot) -> AccountState {
        let mut grants: Vec<Arc<Grant>> = snapshot
            .grants
            .iter()
            .map(|g| {
                Arc::new(Grant {
                    spec: g.spec.clone(),
                    created_at: g.created_at,
                    expires_at: g.expires_at,
                    remaining: AtomicI64::new(g.remaining),
                    expired: AtomicBool::new(g.expired),
                })
            })
            .collect();
        grants.sort_by(draw_order);
        let next_expiry = grants
            .iter()
            .filter(|g| !g.is_expired())
            .filter_map(|g| g.expires_at.map(|e| e.timestamp()))
            .min()
            .unwrap_or(i64::MAX);
        AccountState {
            id: Arc::from(snapshot.account.as_str()),
            grants: ArcSwap::from_pointee(grants),
            available: AtomicI64::new(snapshot.balance),
            balance: AtomicI64::new(snapshot.balance),
            overdraft: AtomicI64::new(snapshot.overdraft),
            topup_required: AtomicBool::new(snapshot.topup_required),
            period_start: AtomicI64::new(snapshot.period_start),
            period_end: AtomicI64::new(snapshot.period_end),
            period_rated: AtomicI64::new(snapshot.period_rated),
            period_spend: AtomicI64::new(snapshot.period_spend),
            committed: AtomicI64::new(snapshot.period_spend),
            next_expiry: AtomicI64::new(next_expiry),
            last_topup_ms: AtomicI64::new(snapshot.last_topup_ms),
            admin: std::sync::Mutex::new(()),
        }
    }
}

impl Reservation {
    /// The amount held against the wallet or cap.
    pub fn amount(&self) -> i64 {
        self.wallet.max(self.cap)
    }

    /// Tries to hold `extra` more (a stream running past its reservation).
    pub fn extend(&mut self, extra: i64, now: DateTime<Utc>) -> Result<(), Refusal> {
        let mut more = self.account.reserve(&self.policy, extra, now)?;
        self.wallet += more.wallet;
        self.cap += more.cap;
        // Its holdings now belong to `self`; mark it settled so its drop releases nothing.
        more.settled = true;
        Ok(())
    }

    /// Settles to the true price-book charge `rated_book` and releases the rest.
    pub fn settle(mut self, rated_book: i64, now: DateTime<Utc>) -> Settlement {
        self.settled = true;
        settle_account(
            &self.account,
            &self.policy,
            rated_book,
            self.wallet,
            self.cap,
            self.period_start,
            now,
        )
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if self.wallet > 0 {
            self.account
                .available
                .fetch_add(self.wallet, Ordering::AcqRel);
        }
        if self.cap > 0 && self.account.period_start.load(Ordering::Acquire) == self.period_start {
            self.account.committed.fetch_sub(self.cap, Ordering::AcqRel);
        }
    }
}

/// Settles a charge against an account (also used without a reservation, e.g. outcomes).
pub fn settle_account(
    account: &AccountState,
    policy: &AccountPolicy,
    rated_book: i64,
    wallet_reserved: i64,
    cap_reserved: i64,
    reserved_in_period: i64,
    now: DateTime<Utc>,
) -> Settlement {
    account.roll_period(policy, now);
    let rated = policy.conversion.apply(rated_book.max(0));
    let rated_before = account.period_rated.fetch_add(rated, Ordering::AcqRel);
    let charge = policy
        .plan
        .charge_between(rated_before, rated_before + rated);
    let same_period = account.period_start.load(Ordering::Acquire) == reserved_in_period;
    let cap_release = if same_period { cap_reserved } else { 0 };
    account
        .committed
        .fetch_add(charge - cap_release, Ordering::AcqRel);
    let spend_before = account.period_spend.fetch_add(charge, Ordering::AcqRel);
    let spend_after = spend_before + charge;
    let mut settlement = Settlement {
        rated,
        charge,
        crossings: Vec::new(),
        topup: None,
    };

    if let Some(cap) = policy.hard_cap {
        for fraction in crossed_thresholds(spend_before, spend_after, cap, &policy.alert_fractions)
        {
            settlement.crossings.push(Crossing::SpendThreshold {
                fraction,
                spend: spend_after,
                cap,
            });
        }
    }
    if let Some(soft) = policy.soft_cap
        && spend_before < soft
        && spend_after >= soft
    {
        settlement.crossings.push(Crossing::SoftCap {
            spend: spend_after,
            cap: soft,
        });
    }
    if policy.plan.included > 0 {
        for fraction in crossed_thresholds(
            rated_before,
            rated_before + rated,
            policy.plan.included,
            &policy.alert_fractions,
        ) {
            settlement.crossings.push(Crossing::AllowanceThreshold {
                fraction,
                used: rated_before + rated,
                included: policy.plan.included,
            });
        }
    }

    if policy.prepaid {
        account
            .available
            .fetch_add(wallet_reserved - charge, Ordering::AcqRel);
        account.draw(charge);
        let balance_before = account.balance.fetch_sub(charge, Ordering::AcqRel);
        let balance_after = balance_before - charge;
        if let Some(low) = policy.low_balance
            && crossed_below(balance_before, balance_after, low)
        {
            settlement.crossings.push(Crossing::LowBalance {
                balance: balance_after,
                threshold: low,
            });
        }
        if balance_after <= 0 && policy.overage == OverageRule::RequireTopUp {
            account.topup_required.store(true, Ordering::Release);
        }
        if let Some(auto) = &policy.auto_topup
            && balance_after < auto.threshold
        {
            let now_ms = now.timestamp_millis();
            let cooldown_ms = i64::try_from(auto.cooldown.as_millis()).unwrap_or(i64::MAX);
            let last = account.last_topup_ms.load(Ordering::Acquire);
            if now_ms.saturating_sub(last) >= cooldown_ms
                && account
                    .last_topup_ms
                    .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                let spec = GrantSpec {
                    id: format!("auto-topup-{}", uuid::Uuid::now_v7()),
                    amount: auto.amount,
                    kind: GrantKind::Paid,
                    priority: 0,
                    expires_at: None,
                    expires_at_period_end: false,
                };
                if account.add_grant(policy, spec.clone(), now).is_ok() {
                    settlement.crossings.push(Crossing::AutoTopUp {
                        grant_id: spec.id.clone(),
                        amount: spec.amount,
                        balance: account.balance(),
                    });
                    settlement.topup = Some(spec);
                }
            }
        }
    }
    settlement
}

/// Every account's live state, outside the config snapshot.
#[derive(Default)]
pub struct Balances {
    accounts: crate::FastDashMap<Arc<str>, Arc<AccountState>>,
}

impl Balances {
    /// The state of `policy`'s account, created on first use.
    pub fn account(&self, policy: &AccountPolicy, now: DateTime<Utc>) -> Arc<AccountState> {
        if let Some(a) = self.accounts.get(&policy.id) {
            return a.clone();
        }
        self.accounts
            .entry(policy.id.clone())
            .or_insert_with(|| Arc::new(AccountState::new(policy, now)))
            .clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<AccountState>> {
        self.accounts.get(id).map(|a| a.clone())
    }

    /// Every account's settled state (checkpoints).
    pub fn export(&self) -> Vec<AccountSnapshot> {
        let mut out: Vec<AccountSnapshot> = self.accounts.iter().map(|a| a.export()).collect();
        out.sort_by(|a, b| a.account.cmp(&b.account));
        out
    }

    /// Balances restored from a checkpoint.
    pub fn import(snapshots: &[AccountSnapshot]) -> Balances {
        let accounts = crate::FastDashMap::default();
        for s in snapshots {
            accounts.insert(
                Arc::from(s.account.as_str()),
                Arc::new(AccountState::import(s)),
            );
        }
        Balances { accounts }
    }

    /// Applies one journal entry (start-up replay and checkpoints): a charge, or a grant
    /// added at run time. `policy_for` gives the account's current policy.
    pub fn apply_entry(
        &self,
        entry: &crate::ledger::LedgerEntry,
        policy_for: &dyn Fn(&str) -> Arc<AccountPolicy>,
        now: DateTime<Utc>,
    ) {
        use crate::ledger::{GrantSource, LedgerEntry};
        match entry {
            LedgerEntry::Usage(r) => {
                let policy = policy_for(&r.account);
                let state = self.account(&policy, now);
                let nanos = |d: Option<Decimal>| {
                    d.and_then(|d| crate::pricing::to_nanos(d).ok())
                        .unwrap_or(0)
                };
                state.replay_usage(
                    &policy,
                    nanos(r.rated_cost),
                    nanos(r.cost),
                    r.timestamp,
                    now,
                );
            }
            LedgerEntry::Grant(g) => {
                let policy = policy_for(&g.account);
                let state = self.account(&policy, now);
                let spec = GrantSpec {
                    id: g.grant_id.clone(),
                    amount: crate::pricing::to_nanos(g.amount).unwrap_or(0),
                    kind: g.kind,
                    priority: g.priority,
                    expires_at: g.expires_at,
                    expires_at_period_end: g.expires_at_period_end,
                };
                if let Err(e) = state.add_grant(&policy, spec, g.timestamp) {
                    tracing::warn!(account = %g.account, grant = %g.grant_id, error = %e, "journaled grant not re-applied");
                }
                if g.source == GrantSource::AutoTopUp {
                    state.note_topup(g.timestamp);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::{Period, to_nanos};
    use std::str::FromStr;

    fn n(s: &str) -> i64 {
        to_nanos(Decimal::from_str(s).unwrap()).unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn grant(id: &str, amount: &str, priority: i32, expires: Option<&str>) -> GrantSpec {
        GrantSpec {
            id: id.into(),
            amount: n(amount),
            kind: GrantKind::Promotional,
            priority,
            expires_at: expires.map(at),
            expires_at_period_end: false,
        }
    }

    fn prepaid(grants: Vec<GrantSpec>) -> Arc<AccountPolicy> {
        let mut p = AccountPolicy::unlimited("acme");
        p.prepaid = true;
        p.grants = grants;
        p.alert_fractions = ["0.5", "0.75", "0.9", "1"]
            .iter()
            .map(|s| Decimal::from_str(s).unwrap())
            .collect();
        Arc::new(p)
    }

    #[test]
    fn grants_draw_by_priority_then_expiry_then_age() {
        let now = at("2026-11-25T10:00:00Z");
        let policy = prepaid(vec![
            grant("late-expiry", "10", 1, Some("2027-06-01T00:00:00Z")),
            grant("no-expiry", "10", 1, None),
            grant("soon", "10", 1, Some("2026-12-15T00:00:00Z")),
            grant("low-priority", "10", 5, Some("2026-11-26T00:00:00Z")),
        ]);
        let acct = Arc::new(AccountState::new(&policy, now));
        let r = acct.reserve(&policy, n("15"), now).unwrap();
        r.settle(n("15"), now);
        let v = acct.view(&policy);
        let left: Vec<(String, Decimal)> = v
            .grants
            .iter()
            .map(|g| (g.id.clone(), g.remaining))
            .collect();
        assert_eq!(
            left,
            vec![
                ("soon".into(), Decimal::ZERO),
                ("late-expiry".into(), Decimal::from(5)),
                ("no-expiry".into(), Decimal::from(10)),
                ("low-priority".into(), Decimal::from(10)),
            ]
        );
        assert_eq!(v.balance, Decimal::from(25));
    }

    #[test]
    fn expired_grants_stop_counting_at_their_expiry() {
        let t0 = at("2026-11-25T10:00:00Z");
        let policy = prepaid(vec![
            grant("a", "5", 0, Some("2026-11-25T12:00:00Z")),
            grant("b", "3", 1, None),
        ]);
        let acct = Arc::new(AccountState::new(&policy, t0));
        assert_eq!(acct.balance(), n("8"));
        // One second before expiry the grant still counts...
        let r = acct
            .reserve(&policy, n("7"), at("2026-11-25T11:59:59Z"))
            .unwrap();
        drop(r);
        // ...at expiry it does not.
        let err = acct
            .reserve(&policy, n("7"), at("2026-11-25T12:00:00Z"))
            .unwrap_err();
        assert!(matches!(err, Refusal::InsufficientBalance { .. }), "{err}");
        assert_eq!(acct.balance(), n("3"));
        assert!(
            acct.view(&policy)
                .grants
                .iter()
                .any(|g| g.id == "a" && g.expired)
        );
    }

    #[test]
    fn reservations_release_on_drop_and_settle_to_true_cost() {
        let now = at("2026-11-25T10:00:00Z");
        let policy = prepaid(vec![grant("g", "1", 0, None)]);
        let acct = Arc::new(AccountState::new(&policy, now));
        let r1 = acct.reserve(&policy, n("0.6"), now).unwrap();
        assert!(
            acct.reserve(&policy, n("0.6"), now).is_err(),
            "only 0.4 left available"
        );
        drop(r1);
        let r2 = acct.reserve(&policy, n("0.6"), now).unwrap();
        let s = r2.settle(n("0.25"), now);
        assert_eq!(s.charge, n("0.25"));
        assert_eq!(acct.balance(), n("0.75"));
        assert_eq!(
            acct.view(&policy).available,
            Decimal::from_str("0.75").unwrap()
        );
    }

    #[test]
    fn hard_cap_refuses_and_resets_at_the_period_boundary() {
        let now = at("2026-11-30T23:59:00Z");
        let mut p = AccountPolicy::unlimited("acme");
        p.hard_cap = Some(n("1"));
        let policy = Arc::new(p);
        let acct = Arc::new(AccountState::new(&policy, now));
        acct.reserve(&policy, n("0.9"), now)
            .unwrap()
            .settle(n("0.9"), now);
        let err = acct.reserve(&policy, n("0.2"), now).unwrap_err();
        match &err {
            Refusal::HardCap { resets_at, .. } => {
                assert_eq!(*resets_at, at("2026-12-01T00:00:00Z"))
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("resets at 2026-12-01"));
        let next = at("2026-12-01T00:00:00Z");
        acct.reserve(&policy, n("0.2"), next)
            .unwrap()
            .settle(n("0.2"), next);
        assert_eq!(acct.period_spend(), n("0.2"));
    }

    #[test]
    fn overage_rules() {
        let now = at("2026-11-25T10:00:00Z");
        let mut p = (*prepaid(vec![grant("g", "1", 0, None)])).clone();
        p.overage = OverageRule::Allow { limit: n("0.5") };
        let policy = Arc::new(p);
        let acct = Arc::new(AccountState::new(&policy, now));
        acct.reserve(&policy, n("1.4"), now)
            .unwrap()
            .settle(n("1.4"), now);
        assert_eq!(acct.balance(), n("-0.4"));
        assert!(acct.reserve(&policy, n("0.2"), now).is_err());
        // A top-up repays the overdraft first.
        acct.add_grant(&policy, grant("topup", "2", 0, None), now)
            .unwrap();
        assert_eq!(acct.balance(), n("1.6"));
        let v = acct.view(&policy);
        assert_eq!(v.overdraft, Decimal::ZERO);

        let mut p = (*prepaid(vec![grant("g", "1", 0, None)])).clone();
        p.overage = OverageRule::RequireTopUp;
        let policy = Arc::new(p);
        let acct = Arc::new(AccountState::new(&policy, now));
        acct.reserve(&policy, n("1"), now)
            .unwrap()
            .settle(n("1"), now);
        assert_eq!(
            acct.reserve(&policy, 0, now).unwrap_err(),
            Refusal::TopUpRequired
        );
        acct.add_grant(&policy, grant("t", "1", 0, None), now)
            .unwrap();
        assert!(acct.reserve(&policy, n("0.5"), now).is_ok());
    }

    #[test]
    fn alerts_fire_once_per_crossing_even_when_hovering() {
        let now = at("2026-11-25T10:00:00Z");
        let mut p = (*prepaid(vec![grant("g", "10", 0, None)])).clone();
        p.prepaid = false;
        p.hard_cap = Some(n("10"));
        p.soft_cap = Some(n("8"));
        let policy = Arc::new(p);
        let acct = Arc::new(AccountState::new(&policy, now));
        let mut fired = Vec::new();
        // Reservations that are released hover around 50 % without settling anything.
        for step in ["4.9", "0.1", "0", "0", "2.5", "0.1", "1.4", "1"] {
            drop(acct.reserve(&policy, n("0.2"), now).unwrap());
            let s = acct
                .reserve(&policy, n(step), now)
                .unwrap()
                .settle(n(step), now);
            fired.extend(s.crossings);
        }
        let spend: Vec<String> = fired
            .iter()
            .filter_map(|c| match c {
                Crossing::SpendThreshold { fraction, .. } => Some(fraction.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(spend, vec!["0.5", "0.75", "0.9", "1"]);
        assert_eq!(
            fired
                .iter()
                .filter(|c| matches!(c, Crossing::SoftCap { .. }))
                .count(),
            1
        );
    }

    #[test]
    fn low_balance_and_auto_topup_with_cooldown() {
        let now = at("2026-11-25T10:00:00Z");
        let mut p = (*prepaid(vec![grant("g", "10", 0, None)])).clone();
        p.low_balance = Some(n("3"));
        p.auto_topup = Some(AutoTopUp {
            threshold: n("2"),
            amount: n("5"),
            cooldown: std::time::Duration::from_secs(3600),
        });
        let policy = Arc::new(p);
        let acct = Arc::new(AccountState::new(&policy, now));
        let s = acct
            .reserve(&policy, n("7.5"), now)
            .unwrap()
            .settle(n("7.5"), now);
        assert!(
            s.crossings
                .iter()
                .any(|c| matches!(c, Crossing::LowBalance { .. }))
        );
        assert!(s.topup.is_none(), "2.5 left: above the top-up threshold");
        let s = acct
            .reserve(&policy, n("1"), now)
            .unwrap()
            .settle(n("1"), now);
        assert!(s.topup.is_some());
        assert_eq!(acct.balance(), n("6.5"));
        // Within the cooldown no second top-up, however low the balance goes.
        let s = acct
            .reserve(&policy, n("6"), now)
            .unwrap()
            .settle(n("6"), now);
        assert!(s.topup.is_none());
        let later = now + chrono::Duration::hours(1);
        let s = acct
            .reserve(&policy, n("0.1"), later)
            .unwrap()
            .settle(n("0.1"), later);
        assert!(s.topup.is_some());
    }

    #[test]
    fn credits_and_plan_allowance_apply_at_settlement() {
        let now = at("2026-11-25T10:00:00Z");
        let mut p = AccountPolicy::unlimited("acme");
        p.unit = "credits".into();
        p.conversion = Conversion {
            rate_ppb: crate::pricing::to_ppb(Decimal::from(100)).unwrap(),
        };
        p.plan = Plan {
            included: n("50"),
            ..Plan::pay_as_you_go(Period::Month)
        };
        let policy = Arc::new(p);
        let acct = Arc::new(AccountState::new(&policy, now));
        // $0.40 = 40 credits, inside the 50-credit allowance: free.
        let s = acct.reserve(&policy, 0, now).unwrap().settle(n("0.4"), now);
        assert_eq!((s.rated, s.charge), (n("40"), 0));
        // Another $0.40: 30 credits beyond the allowance are charged.
        let s = acct.reserve(&policy, 0, now).unwrap().settle(n("0.4"), now);
        assert_eq!((s.rated, s.charge), (n("40"), n("30")));
    }

    #[test]
    fn concurrent_reservations_never_overspend() {
        let now = at("2026-11-25T10:00:00Z");
        let policy = prepaid(vec![grant("g", "100", 0, None)]);
        let acct = Arc::new(AccountState::new(&policy, now));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let acct = acct.clone();
                let policy = policy.clone();
                std::thread::spawn(move || {
                    let mut ok = 0;
                    for i in 0..10_000 {
                        if let Ok(r) = acct.reserve(&policy, n("0.01"), now) {
                            r.settle(n("0.01") - i % 3, now);
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let admitted: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(acct.balance() >= 0, "balance {}", acct.balance());
        assert!(admitted >= 10_000, "admitted {admitted}");
        assert_eq!(acct.view(&policy).overdraft, Decimal::ZERO);
    }
}
