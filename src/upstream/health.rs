//! Passive health, per worker: an upstream (or one key of its pool) that fails `eject_after`
//! times in a row rests for a cooldown that doubles each time it is ejected again, up to
//! `max_rest`. When the rest is over it gets one trial request: a success brings it back, a
//! failure ejects it again for longer. `Retry-After` rests it for as long as it asks. State is
//! the worker's own (cells): nothing is shared on the request path.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// When to eject, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthRules {
    /// Consecutive failures that eject.
    pub eject_after: u32,
    /// The first ejection's rest; each ejection in a row doubles it.
    pub base_rest: Duration,
    /// The longest rest, for ejections and `Retry-After` alike.
    pub max_rest: Duration,
}

impl HealthRules {
    /// A pool key is rested on its first refusal (401, 403, 429): the provider said so.
    pub fn for_keys(self) -> HealthRules {
        HealthRules {
            eject_after: 1,
            ..self
        }
    }
}

/// One upstream's (or key's) health on one worker.
#[derive(Debug, Default)]
pub struct Health {
    /// Failures since the last success.
    failures: Cell<u32>,
    /// Ejections in a row (no success between): the rest doubles with each.
    ejections: Cell<u32>,
    /// Ejected (or asked to be left alone) until then.
    resting_until: Cell<Option<Instant>>,
    /// Its rest is over and a trial request is out, since then: nothing else goes to it
    /// until the trial is judged (or has been out as long as the last rest, in case its
    /// request was dropped unjudged).
    trial_since: Cell<Option<Instant>>,
}

impl Health {
    /// Whether a request may go to it now: not resting, and no trial out.
    pub fn available(&self, now: Instant) -> bool {
        !self.resting(now) && self.trial_since.get().is_none()
    }

    /// Whether it is ejected (or resting at its own ask) now: the gauge's 0. A trial out is
    /// not a rest.
    pub fn resting(&self, now: Instant) -> bool {
        self.resting_until.get().is_some_and(|until| now < until)
    }

    /// When it may be used again (None: now).
    pub fn rests_until(&self) -> Option<Instant> {
        self.resting_until.get()
    }

    /// A request goes to it. After a rest, that request is its trial; a trial out for as
    /// long as the last rest (its request dropped unjudged) gives way to a new one.
    pub fn begin(&self, rules: &HealthRules, now: Instant) {
        let stale = self
            .trial_since
            .get()
            .is_some_and(|since| now >= since + self.rest(rules));
        if stale {
            self.trial_since.set(None);
        }
        let rested = self.resting_until.get().is_some_and(|until| now >= until);
        if rested && self.trial_since.get().is_none() {
            self.trial_since.set(Some(now));
        }
    }

    /// It answered: healthy again.
    pub fn succeeded(&self) {
        self.failures.set(0);
        self.ejections.set(0);
        self.resting_until.set(None);
        self.trial_since.set(None);
    }

    /// It failed. Returns the rest it was ejected for, if this ejected it: the `eject_after`th
    /// failure in a row, or its trial's failure. A failure of a request sent before it was
    /// ejected (still in flight then) neither ejects it again nor lengthens its rest.
    pub fn failed(&self, rules: &HealthRules, now: Instant) -> Option<Duration> {
        let trial_failed = self.trial_since.take().is_some();
        if !trial_failed && self.resting_until.get().is_some() {
            return None;
        }
        let failures = self.failures.get().saturating_add(1);
        if failures < rules.eject_after.max(1) && !trial_failed {
            self.failures.set(failures);
            return None;
        }
        self.failures.set(0);
        self.ejections.set(self.ejections.get().saturating_add(1));
        let rest = self.rest(rules);
        self.resting_until.set(Some(now + rest));
        Some(rest)
    }

    /// It asked to be left alone for `wait` (`Retry-After`): rested that long (at most
    /// `max_rest`), or longer if it already rests longer.
    pub fn rest_for(&self, rules: &HealthRules, wait: Duration, now: Instant) {
        let until = now + wait.min(rules.max_rest);
        let later = self.resting_until.get().map_or(until, |t| t.max(until));
        self.resting_until.set(Some(later));
        self.trial_since.set(None);
    }

    /// The rest of the current ejection: `base_rest` doubled per ejection in a row after the
    /// first, at most `max_rest`.
    fn rest(&self, rules: &HealthRules) -> Duration {
        let doublings = self.ejections.get().saturating_sub(1).min(20);
        rules
            .base_rest
            .saturating_mul(1 << doublings)
            .min(rules.max_rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: HealthRules = HealthRules {
        eject_after: 3,
        base_rest: Duration::from_secs(5),
        max_rest: Duration::from_secs(30),
    };

    #[test]
    fn ejected_after_consecutive_failures_for_a_growing_rest() {
        let h = Health::default();
        let t0 = Instant::now();
        assert_eq!(h.failed(&RULES, t0), None);
        h.succeeded();
        assert_eq!(h.failed(&RULES, t0), None);
        assert_eq!(h.failed(&RULES, t0), None);
        assert!(h.available(t0), "2 failures in a row do not eject");
        assert_eq!(h.failed(&RULES, t0), Some(Duration::from_secs(5)));
        assert!(!h.available(t0 + Duration::from_secs(4)));
        // The rest is over: one trial goes, and while it is out nothing else does.
        let t1 = t0 + Duration::from_secs(5);
        assert!(h.available(t1));
        h.begin(&RULES, t1);
        assert!(!h.available(t1 + Duration::from_secs(1)));
        // The trial fails: ejected at once, for twice as long; then 4×, then capped.
        assert_eq!(h.failed(&RULES, t1), Some(Duration::from_secs(10)));
        let t2 = t1 + Duration::from_secs(10);
        h.begin(&RULES, t2);
        assert_eq!(h.failed(&RULES, t2), Some(Duration::from_secs(20)));
        let t3 = t2 + Duration::from_secs(20);
        h.begin(&RULES, t3);
        assert_eq!(h.failed(&RULES, t3), Some(Duration::from_secs(30)));
        // A trial that succeeds brings it back, and the next ejection starts small again.
        let t4 = t3 + Duration::from_secs(30);
        h.begin(&RULES, t4);
        h.succeeded();
        assert!(h.available(t4));
        for _ in 0..2 {
            assert_eq!(h.failed(&RULES, t4), None);
        }
        assert_eq!(h.failed(&RULES, t4), Some(Duration::from_secs(5)));
    }

    #[test]
    fn failures_of_requests_in_flight_at_the_ejection_do_not_lengthen_it() {
        let h = Health::default();
        let t0 = Instant::now();
        let rests: Vec<Option<Duration>> = (0..8).map(|_| h.failed(&RULES, t0)).collect();
        assert_eq!(rests[2], Some(Duration::from_secs(5)));
        assert!(rests[3..].iter().all(Option::is_none), "{rests:?}");
        assert!(h.available(t0 + Duration::from_secs(5)));
        // A trial that is dropped unjudged gives way to another after the last rest's length.
        let t1 = t0 + Duration::from_secs(5);
        h.begin(&RULES, t1);
        assert!(!h.available(t1 + Duration::from_secs(4)));
        assert!(
            !h.resting(t1 + Duration::from_secs(4)),
            "a trial out is not a rest"
        );
        h.begin(&RULES, t1 + Duration::from_secs(5));
        assert_eq!(h.failed(&RULES, t1), Some(Duration::from_secs(10)));
    }

    #[test]
    fn retry_after_rests_for_as_long_as_asked_within_the_cap() {
        let h = Health::default();
        let t0 = Instant::now();
        h.rest_for(&RULES, Duration::from_secs(2), t0);
        assert!(!h.available(t0 + Duration::from_millis(1999)));
        assert!(h.available(t0 + Duration::from_secs(2)));
        h.rest_for(&RULES, Duration::from_secs(3600), t0);
        assert!(h.available(t0 + Duration::from_secs(30)));
        // A shorter ask does not cut a longer rest.
        h.rest_for(&RULES, Duration::from_secs(1), t0);
        assert!(!h.available(t0 + Duration::from_secs(29)));
    }

    #[test]
    fn keys_are_rested_on_their_first_refusal() {
        let h = Health::default();
        let t0 = Instant::now();
        assert_eq!(
            h.failed(&RULES.for_keys(), t0),
            Some(Duration::from_secs(5))
        );
    }
}
