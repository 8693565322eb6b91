//! When to try a webhook again: exponential backoff with full jitter, and the receiver's
//! `Retry-After`.
//!
//! Full jitter (every delay drawn uniformly from zero to the exponential ceiling) spreads the
//! retries of many events that failed together, so a receiver coming back up is not hit by
//! all of them at once. `Retry-After` (RFC 9110 §10.2.3: delay-seconds or an HTTP date) is a
//! floor: the retry never comes earlier than the receiver asked, up to a cap.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the delay after the first failed attempt; it doubles with each attempt.
    pub base: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Backoff {
    /// The ceiling after failed attempt `attempt` (from 1): `min(max, base · 2^(attempt−1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(0..=millis))
    }
}

/// The delay a `Retry-After` value asks for, counted from `now`: delay-seconds (`120`) or an
/// HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`, also the obsolete RFC 850 and asctime forms).
/// A date in the past asks for no delay. `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for u64 is still "a very long time".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_secs(5),
        max: Duration::from_secs(600),
    };

    #[test]
    fn ceilings_double_then_stop_at_the_cap() {
        let secs: Vec<u64> = (1..=10).map(|a| BACKOFF.ceiling(a).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 320, 600, 600, 600]);
        assert_eq!(BACKOFF.ceiling(0), Duration::from_secs(5));
        assert_eq!(BACKOFF.ceiling(u32::MAX), Duration::from_secs(600));
    }

    #[test]
    fn jittered_delays_stay_within_zero_and_the_ceiling_and_spread_over_it() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 1..=12 {
            let ceiling = BACKOFF.ceiling(attempt);
            let delays: Vec<Duration> = (0..2000)
                .map(|_| BACKOFF.delay(attempt, &mut rng))
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            // Full jitter: both the low and the high quarter of the range are drawn.
            assert!(delays.iter().any(|d| *d < ceiling / 4), "attempt {attempt}");
            assert!(
                delays.iter().any(|d| *d > ceiling * 3 / 4),
                "attempt {attempt}"
            );
        }
        let zero = Backoff {
            base: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(zero.delay(3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let parse = |v: &str| parse_retry_after(v, now);
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        // IMF-fixdate, RFC 850 and asctime, 90 s after `now`.
        assert_eq!(
            parse("Wed, 21 Oct 2015 07:29:30 GMT"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse("Wednesday, 21-Oct-15 07:29:30 GMT"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse("Wed Oct 21 07:29:30 2015"),
            Some(Duration::from_secs(90))
        );
        // A date already past: retry now.
        assert_eq!(parse("Wed, 21 Oct 2015 07:00:00 GMT"), Some(Duration::ZERO));
        for bad in ["", "-5", "1.5", "soon", "120 s", "Wed, 21 Oct 2015"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
