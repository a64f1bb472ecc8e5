//! Pricing: turning metered usage into money.
//!
//! Config holds prices as exact decimals (`rust_decimal`). The request path works in integer
//! fixed point: **nano-units**, 10⁻⁹ of the account's unit (a currency or credits), in `i64`
//! (±9.2 × 10⁹ units of headroom). Token prices become nano-units per million tokens as
//! `i128`, so `tokens × rate` never overflows and never rounds until the end.
//!
//! Rounding rule: a request's charge is computed exactly in 10⁻¹⁵-unit steps and rounded **up**
//! to the next nano-unit, once per request (and once per plan tier piece); per-call prices are
//! exact. `from_nanos(to_nanos(d)) == d` for every price with at most nine decimal places —
//! config validation refuses more precise prices.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;

use crate::config::ModelMatch;
use crate::provider::TokenUsage;

/// Nano-units in one unit.
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;
const TOKENS_PER_MTOK: i128 = 1_000_000;
const MICROS_PER_SECOND: i128 = 1_000_000;
/// Fixed-point scale of multipliers and conversion rates (parts per billion).
const PPB: i128 = 1_000_000_000;

/// Converts an exact decimal amount to nano-units. Fails when it has more than nine decimal
/// places or does not fit.
///
/// Integer arithmetic on the decimal's mantissa (`d = m / 10^scale`), exact: the journal's
/// shadow balances convert every record's costs with it.
pub fn to_nanos(d: Decimal) -> Result<i64, String> {
    let (mantissa, scale) = (d.mantissa(), d.scale());
    let nanos = if scale <= 9 {
        // |m| < 2^96, times at most 10^9: within i128.
        mantissa * 10i128.pow(9 - scale)
    } else {
        let divisor = 10i128.pow(scale - 9);
        if mantissa % divisor != 0 {
            return Err(format!("{d} has more than 9 decimal places"));
        }
        mantissa / divisor
    };
    i64::try_from(nanos).map_err(|_| format!("{d} is too large"))
}

/// Nano-units as an exact decimal.
pub fn from_nanos(n: i64) -> Decimal {
    Decimal::new(n, 9).normalize()
}

/// A decimal as parts per billion (multipliers, conversion rates).
pub fn to_ppb(d: Decimal) -> Result<i128, String> {
    to_nanos(d).map(i128::from)
}

fn ceil_div(n: i128, d: i128) -> i128 {
    if n >= 0 { (n + d - 1) / d } else { n / d }
}

fn clamp_i64(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

/// Prices of one model (or model family), in nano-units of the price book's currency.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelPrice {
    /// Per million uncached input tokens.
    pub input_per_mtok: i128,
    /// Per million input tokens read from the prompt cache.
    pub cached_input_per_mtok: i128,
    /// Per million input tokens written to the prompt cache.
    pub cache_write_per_mtok: i128,
    /// Per million output tokens that are not reasoning tokens.
    pub output_per_mtok: i128,
    /// Per million reasoning tokens.
    pub reasoning_per_mtok: i128,
    /// Per call.
    pub per_call: i64,
    /// Per second of upstream time (request sent → response complete).
    pub per_compute_second: i128,
    /// The price-book entry's name for metrics (`gpt-4o`, `claude-*`).
    pub label: std::sync::Arc<str>,
}

impl ModelPrice {
    /// The charge for one call's usage and upstream time.
    pub fn rate(&self, usage: &TokenUsage, upstream_us: u64) -> i64 {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let written = usage
            .cache_creation_input_tokens
            .min(usage.input_tokens - cached);
        let plain_input = usage.input_tokens - cached - written;
        let reasoning = usage.reasoning_tokens.min(usage.output_tokens);
        let plain_output = usage.output_tokens - reasoning;
        // Numerator in nano-units × 10⁶ (per-Mtok rates, per-µs compute).
        let tokens = i128::from(plain_input) * self.input_per_mtok
            + i128::from(cached) * self.cached_input_per_mtok
            + i128::from(written) * self.cache_write_per_mtok
            + i128::from(plain_output) * self.output_per_mtok
            + i128::from(reasoning) * self.reasoning_per_mtok
            + i128::from(upstream_us) * self.per_compute_second;
        debug_assert_eq!(TOKENS_PER_MTOK, MICROS_PER_SECOND);
        clamp_i64(ceil_div(tokens, TOKENS_PER_MTOK) + i128::from(self.per_call))
    }

    /// An upper bound of the charge for a call with at most these token counts (each input
    /// token at the dearest input rate, each output token at the dearest output rate), used
    /// to reserve before forwarding. Upstream time is not bounded here and is settled after.
    pub fn worst_case(&self, input_tokens: u64, output_tokens: u64) -> i64 {
        let input_rate = self
            .input_per_mtok
            .max(self.cached_input_per_mtok)
            .max(self.cache_write_per_mtok);
        let output_rate = self.output_per_mtok.max(self.reasoning_per_mtok);
        let n = i128::from(input_tokens) * input_rate + i128::from(output_tokens) * output_rate;
        clamp_i64(ceil_div(n, TOKENS_PER_MTOK) + i128::from(self.per_call))
    }
}

/// Prices by model (first match wins) and by outcome.
#[derive(Clone, Debug, Default)]
pub struct PriceBook {
    pub models: Vec<(ModelMatch, ModelPrice)>,
    pub outcomes: std::collections::HashMap<String, i64>,
}

impl PriceBook {
    pub fn price_for(&self, model: &str) -> Option<&ModelPrice> {
        self.models
            .iter()
            .find(|(m, _)| match m {
                ModelMatch::Exact(e) => e == model,
                ModelMatch::Prefix(p) => model.starts_with(p.as_str()),
            })
            .map(|(_, p)| p)
    }
}

/// Converts price-book money into an account's unit (identity for currency accounts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conversion {
    /// Account units per price-book unit, in parts per billion.
    pub rate_ppb: i128,
}

impl Conversion {
    pub const IDENTITY: Conversion = Conversion { rate_ppb: PPB };

    /// Rounds up: a conversion never charges less than the price.
    pub fn apply(self, nanos: i64) -> i64 {
        if self.rate_ppb == PPB {
            return nanos;
        }
        clamp_i64(ceil_div(i128::from(nanos) * self.rate_ppb, PPB))
    }
}

/// Billing period, aligned to UTC calendar boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Day,
    /// ISO weeks, starting Monday 00:00 UTC.
    Week,
    Month,
}

impl Period {
    /// The period containing `t`: `[start, end)`.
    pub fn bounds(self, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let date = t.date_naive();
        let (start, end) = match self {
            Period::Day => (date, date + Duration::days(1)),
            Period::Week => {
                let start = date - Duration::days(i64::from(date.weekday().num_days_from_monday()));
                (start, start + Duration::days(7))
            }
            Period::Month => {
                let start = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date);
                let (y, m) = if date.month() == 12 {
                    (date.year() + 1, 1)
                } else {
                    (date.year(), date.month() + 1)
                };
                (start, NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(start))
            }
        };
        let at_midnight =
            |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default());
        (at_midnight(start), at_midnight(end))
    }
}

/// One graduated tier of overage: usage beyond the allowance up to `up_to` (exclusive of
/// earlier tiers) is charged at `multiplier_ppb` / 10⁹ of its rated price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Upper bound of overage covered by this tier, nano-units; `None` for the last tier.
    pub up_to: Option<i64>,
    pub multiplier_ppb: i128,
}

/// A hybrid plan: subscription and seat fees per period, included usage, graduated overage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    pub period: Period,
    pub base_fee: i64,
    pub seat_fee: i64,
    /// Rated usage included per period, nano-units of the account's unit.
    pub included: i64,
    /// Graduated tiers over the overage; never empty (a plan without tiers has one at 1×).
    pub tiers: Vec<Tier>,
}

impl Plan {
    /// A plan that charges usage as rated: no fees, no allowance, one tier at 1×.
    pub fn pay_as_you_go(period: Period) -> Plan {
        Plan {
            id: "pay-as-you-go".into(),
            period,
            base_fee: 0,
            seat_fee: 0,
            included: 0,
            tiers: vec![Tier {
                up_to: None,
                multiplier_ppb: PPB,
            }],
        }
    }

    /// Cumulative usage charge for `rated` nano-units of rated usage in one period.
    pub fn usage_charge(&self, rated: i64) -> i64 {
        let mut overage = i128::from(rated.saturating_sub(self.included).max(0));
        let mut lower: i128 = 0;
        let mut total: i128 = 0;
        for tier in &self.tiers {
            if overage <= 0 {
                break;
            }
            let width = tier.up_to.map_or(i128::MAX, |u| i128::from(u) - lower);
            let piece = overage.min(width.max(0));
            total += ceil_div(piece * tier.multiplier_ppb, PPB);
            overage -= piece;
            lower = tier.up_to.map_or(lower, i128::from);
        }
        clamp_i64(total)
    }

    /// The charge for moving period usage from `before` to `after` (telescopes exactly: the
    /// charges of a period sum to `usage_charge(total)`).
    pub fn charge_between(&self, before: i64, after: i64) -> i64 {
        self.usage_charge(after) - self.usage_charge(before)
    }

    /// The largest tier multiplier: reserving `rated × this` covers any marginal charge.
    pub fn max_multiplier_ppb(&self) -> i128 {
        self.tiers
            .iter()
            .map(|t| t.multiplier_ppb)
            .max()
            .unwrap_or(PPB)
    }

    /// Fixed fees for one period with `seats` seats.
    pub fn fixed_fees(&self, seats: u32) -> i64 {
        self.base_fee
            .saturating_add(self.seat_fee.saturating_mul(i64::from(seats)))
    }
}

/// Scales `nanos` by a parts-per-billion multiplier, rounding up.
pub fn scale_ppb(nanos: i64, ppb: i128) -> i64 {
    clamp_i64(ceil_div(i128::from(nanos) * ppb, PPB))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn per_mtok(s: &str) -> i128 {
        to_ppb(d(s)).unwrap()
    }

    #[test]
    fn nanos_round_trip_and_precision_limit() {
        for s in ["0", "2.5", "0.000000001", "1234567.123456789", "-3.25"] {
            assert_eq!(from_nanos(to_nanos(d(s)).unwrap()), d(s).normalize(), "{s}");
        }
        assert!(to_nanos(d("0.0000000001")).is_err());
        assert!(to_nanos(d("99999999999")).is_err());
        // Trailing zeros beyond nine places are not precision.
        assert_eq!(to_nanos(d("0.50000000000000")), Ok(500_000_000));
        assert!(to_nanos(d("-0.0000000015")).is_err());
    }

    proptest::proptest! {
        /// The integer conversion agrees with decimal arithmetic (`d × 10^9`, whole, in i64)
        /// on every decimal whose product is exact.
        #[test]
        fn nanos_are_the_decimal_product(
            mantissa in proptest::prop_oneof![-10_000i64..10_000, proptest::num::i64::ANY],
            scale in 0u32..=28,
        ) {
            let d = Decimal::new(mantissa, scale);
            let by_decimal = d
                .checked_mul(Decimal::from(NANOS_PER_UNIT))
                .filter(|p| p.fract().is_zero())
                .and_then(|p| i64::try_from(p).ok());
            proptest::prop_assert_eq!(to_nanos(d).ok(), by_decimal, "{}", d);
        }
    }

    #[test]
    fn rating_matches_hand_computed_decimals() {
        // gpt-4o-like: $2.50 in, $1.25 cached, $10 out, $0.0001 per call, $0.002 per second.
        let p = ModelPrice {
            input_per_mtok: per_mtok("2.50"),
            cached_input_per_mtok: per_mtok("1.25"),
            cache_write_per_mtok: per_mtok("3.75"),
            output_per_mtok: per_mtok("10"),
            reasoning_per_mtok: per_mtok("12"),
            per_call: to_nanos(d("0.0001")).unwrap(),
            per_compute_second: per_mtok("0.002"),
            label: "gpt-4o".into(),
        };
        let usage = TokenUsage {
            input_tokens: 1000,
            output_tokens: 500,
            cached_input_tokens: 200,
            cache_creation_input_tokens: 100,
            reasoning_tokens: 50,
        };
        let expected = d("700") * d("2.50") / d("1000000")
            + d("200") * d("1.25") / d("1000000")
            + d("100") * d("3.75") / d("1000000")
            + d("450") * d("10") / d("1000000")
            + d("50") * d("12") / d("1000000")
            + d("0.0001")
            + d("1.5") * d("0.002");
        assert_eq!(from_nanos(p.rate(&usage, 1_500_000)), expected.normalize());
    }

    #[test]
    fn rating_rounds_up_once_to_the_nano() {
        // 1 token at $0.15/Mtok = 0.00000015 exactly = 150 nanos; at $0.0000015/Mtok it is
        // 1.5 pico-units → rounds up to 1 nano.
        let p = ModelPrice {
            input_per_mtok: per_mtok("0.0000015"),
            ..ModelPrice::default()
        };
        let one = TokenUsage {
            input_tokens: 1,
            ..TokenUsage::default()
        };
        assert_eq!(p.rate(&one, 0), 1);
        let p = ModelPrice {
            input_per_mtok: per_mtok("0.15"),
            ..ModelPrice::default()
        };
        assert_eq!(p.rate(&one, 0), 150);
    }

    #[test]
    fn worst_case_bounds_every_split() {
        let p = ModelPrice {
            input_per_mtok: per_mtok("3"),
            cached_input_per_mtok: per_mtok("0.3"),
            cache_write_per_mtok: per_mtok("3.75"),
            output_per_mtok: per_mtok("15"),
            reasoning_per_mtok: per_mtok("15"),
            per_call: 7,
            per_compute_second: 0,
            label: "claude-*".into(),
        };
        let bound = p.worst_case(1000, 300);
        for cached in [0, 500, 1000] {
            for reasoning in [0, 300] {
                let u = TokenUsage {
                    input_tokens: 1000,
                    output_tokens: 300,
                    cached_input_tokens: cached,
                    cache_creation_input_tokens: 1000 - cached,
                    reasoning_tokens: reasoning,
                };
                assert!(p.rate(&u, 0) <= bound);
            }
        }
    }

    #[test]
    fn credits_conversion_rounds_up() {
        let c = Conversion {
            rate_ppb: to_ppb(d("100")).unwrap(),
        };
        assert_eq!(
            c.apply(to_nanos(d("0.015")).unwrap()),
            to_nanos(d("1.5")).unwrap()
        );
        let third = Conversion {
            rate_ppb: to_ppb(d("0.333333333")).unwrap(),
        };
        assert_eq!(third.apply(1), 1);
        assert_eq!(Conversion::IDENTITY.apply(12345), 12345);
    }

    #[test]
    fn allowance_and_graduated_tiers() {
        let n = |s: &str| to_nanos(d(s)).unwrap();
        let plan = Plan {
            id: "pro".into(),
            period: Period::Month,
            base_fee: n("20"),
            seat_fee: n("5"),
            included: n("10"),
            tiers: vec![
                Tier {
                    up_to: Some(n("100")),
                    multiplier_ppb: to_ppb(d("1")).unwrap(),
                },
                Tier {
                    up_to: None,
                    multiplier_ppb: to_ppb(d("0.8")).unwrap(),
                },
            ],
        };
        assert_eq!(plan.usage_charge(n("9.99")), 0);
        assert_eq!(plan.usage_charge(n("10")), 0, "allowance boundary is free");
        assert_eq!(plan.usage_charge(n("10.000000001")), 1);
        assert_eq!(plan.usage_charge(n("110")), n("100"));
        // 10 included, 100 at 1×, 40 at 0.8× = 132.
        assert_eq!(plan.usage_charge(n("150")), n("132"));
        // Charges telescope across any split.
        let steps = [n("3"), n("8"), n("50"), n("60"), n("29")];
        let mut before = 0;
        let mut sum = 0;
        for s in steps {
            sum += plan.charge_between(before, before + s);
            before += s;
        }
        assert_eq!(sum, plan.usage_charge(before));
        assert_eq!(plan.fixed_fees(3), n("35"));
        assert_eq!(plan.max_multiplier_ppb(), PPB);
    }

    #[test]
    fn periods_align_to_utc_calendar() {
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        let (s, e) = Period::Month.bounds(t);
        assert_eq!(s, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert_eq!(e, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
        let (s, e) = Period::Week.bounds(Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap());
        assert_eq!(s, Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap());
        assert_eq!(e, Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap());
        let (s, e) = Period::Day.bounds(Utc.with_ymd_and_hms(2026, 2, 28, 5, 0, 0).unwrap());
        assert_eq!((s.day(), e.month(), e.day()), (28, 3, 1));
    }
}
