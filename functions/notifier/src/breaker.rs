//! A circuit breaker per endpoint, so one dead receiver does not hold up everyone's events.
//!
//! A receiver that never answers costs each attempt the whole request timeout (15 s by
//! default) of one of the few pullers; with every event retried up to eight times, a burst of
//! completions to such an endpoint would keep all pullers waiting on it and delay the
//! notifications of every other endpoint and subject by minutes to hours. So after
//! [`BreakerSettings::failures`] failed attempts in a row an endpoint is **open**: its
//! deliveries fail at once, without a request, asking to come back when the cool-down ends
//! (the event is redelivered then, like any failed delivery, and still dead-lettered after its
//! last attempt). When the cool-down ends one attempt goes through (**half-open**): a success
//! closes the breaker, a failure opens it again for twice as long, up to
//! [`BreakerSettings::cooldown_max`].
//!
//! The state is the process's own: each notifier process (or warm Lambda instance) learns of a
//! dead endpoint by its own first few failures.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// When endpoints are cut off and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failed attempts in a row that open an endpoint's breaker; 0 turns breakers off.
    pub failures: u32,
    /// How long a breaker first stays open.
    pub cooldown: Duration,
    /// The longest it stays open; each failed trial attempt doubles the cool-down up to this.
    pub cooldown_max: Duration,
}

/// Whether an attempt at an endpoint may go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Send the request, then [`Breakers::record`] how it went.
    Send,
    /// Do not send: the endpoint's breaker is open (or its trial attempt is in flight).
    Open {
        /// When to come back: the rest of the cool-down.
        retry_in: Duration,
        /// The failures in a row that opened it.
        failures: u32,
    },
}

#[derive(Debug, Default)]
struct EndpointState {
    /// Failed attempts since the last success.
    failures: u32,
    /// Set while open: until when.
    open_until: Option<Instant>,
    /// The cool-down the next opening lasts (doubles on every failed trial).
    cooldown: Duration,
    /// When the trial attempt of a half-open breaker went out, while it is in flight.
    trial: Option<Instant>,
}

/// The breakers of every endpoint, by endpoint id.
#[derive(Debug)]
pub struct Breakers {
    settings: BreakerSettings,
    states: Mutex<HashMap<String, EndpointState>>,
}

impl Breakers {
    /// Breakers with these settings, all closed.
    pub fn new(settings: BreakerSettings) -> Self {
        Breakers {
            settings,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an attempt at `endpoint` may go out at `now`. A [`Admission::Send`] must be
    /// followed by [`Self::record`]: it may be the trial attempt of a half-open breaker.
    pub fn admit(&self, endpoint: &str, now: Instant) -> Admission {
        if self.settings.failures == 0 {
            return Admission::Send;
        }
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(state) = states.get_mut(endpoint) else {
            return Admission::Send;
        };
        match state.open_until {
            Some(until) if now < until => Admission::Open {
                retry_in: until - now,
                failures: state.failures,
            },
            Some(_) => {
                // The cool-down is over: this attempt is the trial; others wait for it.
                state.open_until = None;
                state.trial = Some(now);
                Admission::Send
            }
            // A trial whose outcome never came (its task was cancelled) lapses after a
            // cool-down, so the breaker cannot stay half-open for good.
            None => match state.trial {
                Some(sent) if now < sent + self.settings.cooldown => Admission::Open {
                    retry_in: sent + self.settings.cooldown - now,
                    failures: state.failures,
                },
                Some(_) => {
                    state.trial = Some(now);
                    Admission::Send
                }
                None => Admission::Send,
            },
        }
    }

    /// Whether `endpoint` is cut off at `now` (for the `darkroom_webhook_breaker_open` gauge).
    pub fn is_open(&self, endpoint: &str, now: Instant) -> bool {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        states
            .get(endpoint)
            .and_then(|state| state.open_until)
            .is_some_and(|until| until > now)
    }

    /// Records how an admitted attempt at `endpoint` went.
    pub fn record(&self, endpoint: &str, succeeded: bool, now: Instant) {
        if self.settings.failures == 0 {
            return;
        }
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        if succeeded {
            states.remove(endpoint);
            return;
        }
        let state = states.entry(endpoint.to_owned()).or_default();
        state.failures = state.failures.saturating_add(1);
        if state.trial.take().is_some() {
            state.cooldown = (state.cooldown * 2).min(self.settings.cooldown_max);
            state.open_until = Some(now + state.cooldown);
        } else if state.open_until.is_none() && state.failures >= self.settings.failures {
            state.cooldown = self.settings.cooldown.min(self.settings.cooldown_max);
            state.open_until = Some(now + state.cooldown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: BreakerSettings = BreakerSettings {
        failures: 3,
        cooldown: Duration::from_secs(10),
        cooldown_max: Duration::from_secs(25),
    };

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    fn fail(breakers: &Breakers, endpoint: &str, now: Instant, times: u32) {
        for _ in 0..times {
            assert_eq!(breakers.admit(endpoint, now), Admission::Send);
            breakers.record(endpoint, false, now);
        }
    }

    #[test]
    fn opens_after_the_failures_in_a_row_and_only_for_that_endpoint() {
        let breakers = Breakers::new(SETTINGS);
        let start = Instant::now();
        fail(&breakers, "dead", start, 3);
        assert_eq!(
            breakers.admit("dead", at(start, 4)),
            Admission::Open {
                retry_in: Duration::from_secs(6),
                failures: 3
            }
        );
        assert_eq!(breakers.admit("alive", at(start, 4)), Admission::Send);
        assert!(breakers.is_open("dead", at(start, 4)));
        assert!(!breakers.is_open("dead", at(start, 11)));
        assert!(!breakers.is_open("alive", at(start, 4)));
    }

    #[test]
    fn a_success_between_failures_starts_the_count_again() {
        let breakers = Breakers::new(SETTINGS);
        let start = Instant::now();
        fail(&breakers, "flaky", start, 2);
        breakers.record("flaky", true, start);
        fail(&breakers, "flaky", start, 2);
        assert_eq!(breakers.admit("flaky", start), Admission::Send);
    }

    #[test]
    fn after_the_cooldown_one_trial_goes_out_and_its_success_closes_the_breaker() {
        let breakers = Breakers::new(SETTINGS);
        let start = Instant::now();
        fail(&breakers, "back", start, 3);
        let later = at(start, 10);
        assert_eq!(breakers.admit("back", later), Admission::Send);
        // The trial is in flight: nobody else goes.
        assert!(matches!(
            breakers.admit("back", later),
            Admission::Open { .. }
        ));
        breakers.record("back", true, later);
        assert_eq!(breakers.admit("back", later), Admission::Send);
        // Closed for good: it takes the full count of failures again to open it.
        fail(&breakers, "back", later, 2);
        assert_eq!(breakers.admit("back", later), Admission::Send);
    }

    #[test]
    fn a_trial_that_never_reports_lapses_after_a_cooldown() {
        let breakers = Breakers::new(SETTINGS);
        let start = Instant::now();
        fail(&breakers, "dead", start, 3);
        assert_eq!(breakers.admit("dead", at(start, 10)), Admission::Send);
        assert_eq!(
            breakers.admit("dead", at(start, 15)),
            Admission::Open {
                retry_in: Duration::from_secs(5),
                failures: 3
            }
        );
        assert_eq!(breakers.admit("dead", at(start, 20)), Admission::Send);
    }

    #[test]
    fn a_failed_trial_reopens_it_for_twice_as_long_up_to_the_maximum() {
        let breakers = Breakers::new(SETTINGS);
        let start = Instant::now();
        fail(&breakers, "dead", start, 3);
        let mut now = start;
        for cooldown in [20, 25, 25] {
            now += Duration::from_secs(25);
            fail(&breakers, "dead", now, 1);
            let admission = breakers.admit("dead", now);
            assert!(
                matches!(admission, Admission::Open { retry_in, .. } if retry_in == Duration::from_secs(cooldown)),
                "{admission:?}"
            );
        }
    }

    #[test]
    fn zero_failures_turns_breakers_off() {
        let breakers = Breakers::new(BreakerSettings {
            failures: 0,
            ..SETTINGS
        });
        let start = Instant::now();
        fail(&breakers, "dead", start, 100);
        assert_eq!(breakers.admit("dead", start), Admission::Send);
    }
}
