//! Request and token rate limits per key: GCRA (the generic cell rate algorithm) on one
//! atomic "theoretical arrival time" per limit, updated with compare-and-swap — no lock, and
//! exact under contention. A limit of `n` per minute admits bursts of up to `n` and refills
//! continuously.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const MINUTE_NANOS: u64 = 60_000_000_000;

/// One GCRA limit.
#[derive(Debug, Default)]
pub struct Gcra {
    /// Theoretical arrival time, nanoseconds on the caller's monotonic clock.
    tat: AtomicU64,
    /// Nanoseconds given back by refunds so far (see [`Gcra::refund`]).
    refunded: AtomicU64,
}

/// What one [`Gcra::check`] took, for [`Gcra::refund`].
#[derive(Clone, Copy, Debug)]
pub struct Admitted {
    /// The limit's theoretical arrival time this admission moved forward, nanoseconds.
    increment: u64,
    /// Where it moved it to: the admission's share runs out then (earlier if admissions
    /// before it are refunded).
    until: u64,
    /// The limit's `refunded` when it was admitted.
    refunded_before: u64,
}

impl Gcra {
    /// Admits `cost` units against a limit of `per_minute`, or says how long until it would.
    /// `now` is nanoseconds on a monotonic clock (e.g. since process start).
    pub fn check(&self, now: u64, per_minute: u64, cost: u64) -> Result<Admitted, Duration> {
        if per_minute == 0 {
            return Err(Duration::from_secs(60));
        }
        let interval = MINUTE_NANOS / per_minute;
        let increment = interval.saturating_mul(cost.max(1));
        let tolerance = MINUTE_NANOS;
        let refunded_before = self.refunded.load(Ordering::Acquire);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let start = tat.max(now);
            let new_tat = start.saturating_add(increment);
            let ahead = new_tat.saturating_sub(now);
            if ahead > tolerance.max(increment) {
                return Err(Duration::from_nanos(ahead - tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Admitted {
                        increment,
                        until: new_tat,
                        refunded_before,
                    });
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Gives back what `admitted` took, at `now`, for a request refused after it passed:
    /// only the part not yet run out (an admission's share of the limit drains with time
    /// like any other; giving back more would take it from later admissions and let the
    /// limit admit more than its burst). Refunds since it was admitted may have moved its
    /// share earlier; all of them are assumed to have, so a refund can fall short (the
    /// limit stays a little stricter) but never gives back too much.
    pub fn refund(&self, admitted: Admitted, now: u64) {
        let moved = self
            .refunded
            .load(Ordering::Acquire)
            .saturating_sub(admitted.refunded_before);
        let until = admitted.until.saturating_sub(moved);
        let left = until.saturating_sub(now).min(admitted.increment);
        if left == 0 {
            return;
        }
        self.refunded.fetch_add(left, Ordering::AcqRel);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(left))
            });
    }
}

/// A key's limiters (live state, outside the config snapshot).
#[derive(Debug, Default)]
pub struct KeyThrottle {
    pub requests: Gcra,
    pub tokens: Gcra,
    pub slowdown: Gcra,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let g = Gcra::default();
        let t0 = 1_000 * MINUTE_NANOS;
        for _ in 0..60 {
            g.check(t0, 60, 1).unwrap();
        }
        let wait = g.check(t0, 60, 1).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        // One second later exactly one more is allowed.
        g.check(t0 + 1_000_000_000, 60, 1).unwrap();
        assert!(g.check(t0 + 1_000_000_000, 60, 1).is_err());
    }

    #[test]
    fn token_costs_and_oversized_requests() {
        let g = Gcra::default();
        let t0 = 1_000 * MINUTE_NANOS;
        g.check(t0, 1000, 600).unwrap();
        g.check(t0, 1000, 400).unwrap();
        assert!(g.check(t0, 1000, 1).is_err());
        // A single request larger than the whole limit is admitted when the bucket is full
        // (otherwise it could never pass) and pushes later ones back.
        let g = Gcra::default();
        g.check(t0, 1000, 5000).unwrap();
        assert!(g.check(t0 + MINUTE_NANOS, 1000, 1).is_err());
    }

    #[test]
    fn a_refund_gives_back_exactly_what_was_taken() {
        let g = Gcra::default();
        let t0 = 1_000 * MINUTE_NANOS;
        g.check(t0, 3, 1).unwrap();
        g.check(t0, 3, 1).unwrap();
        let third = g.check(t0, 3, 1).unwrap();
        assert!(g.check(t0, 3, 1).is_err());
        g.refund(third, t0);
        g.check(t0, 3, 1).unwrap();
        assert!(g.check(t0, 3, 1).is_err());
        // Tokens: a refund of 400 admits 400 again, not more.
        let g = Gcra::default();
        g.check(t0, 1000, 600).unwrap();
        let four_hundred = g.check(t0, 1000, 400).unwrap();
        g.refund(four_hundred, t0);
        assert!(g.check(t0, 1000, 401).is_err());
        g.check(t0, 1000, 400).unwrap();
    }

    #[test]
    fn a_late_refund_gives_back_only_what_has_not_run_out() {
        // Two a minute: A at t0, then, 40 s on, B and C (A's 30 s share has run out; B and
        // C use the whole burst). A's refund then must not make room for a fourth.
        let g = Gcra::default();
        let t0 = 1_000 * MINUTE_NANOS;
        let a = g.check(t0, 2, 1).unwrap();
        let t1 = t0 + 40 * 1_000_000_000;
        g.check(t1, 2, 1).unwrap();
        g.check(t1, 2, 1).unwrap();
        assert!(g.check(t1, 2, 1).is_err());
        g.refund(a, t1);
        assert!(
            g.check(t1, 2, 1).is_err(),
            "a refund admitted more than the burst"
        );
        // Refunded half-way through its share, an admission gives back the half left.
        let g = Gcra::default();
        let a = g.check(t0, 2, 1).unwrap();
        g.check(t0, 2, 1).unwrap();
        let half = t0 + 15 * 1_000_000_000;
        assert!(g.check(half, 2, 1).is_err());
        g.refund(a, half);
        // 15 s given back: room for one more at `half`, not two.
        g.check(half, 2, 1).unwrap();
        assert!(g.check(half, 2, 1).is_err());
    }

    #[test]
    fn refunds_out_of_order_never_admit_more_than_the_burst() {
        // Three a minute. X and Y at t0, X refunded at once (Y's share now ends 20 s in).
        // At 20 s Z is admitted and Y refunded: Y's share has run out, so nothing comes
        // back, and only two more fit (Z plus two: the burst of three), not three.
        let g = Gcra::default();
        let t0 = 1_000 * MINUTE_NANOS;
        let x = g.check(t0, 3, 1).unwrap();
        let y = g.check(t0, 3, 1).unwrap();
        g.refund(x, t0);
        let t1 = t0 + 20 * 1_000_000_000;
        g.check(t1, 3, 1).unwrap();
        g.refund(y, t1);
        g.check(t1, 3, 1).unwrap();
        g.check(t1, 3, 1).unwrap();
        assert!(
            g.check(t1, 3, 1).is_err(),
            "four admitted at once against a burst of three"
        );
    }

    #[test]
    fn concurrent_admissions_are_exact() {
        let g = std::sync::Arc::new(Gcra::default());
        let t0 = 1_000 * MINUTE_NANOS;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| g.check(t0, 500, 1).is_ok()).count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 500);
    }
}
