//! An upstream's own provider keys, per worker: taken in turn, skipping a key that rests (it
//! was refused with 401, 403 or 429); when every key rests, the one whose rest ends first.
//! Each key's header value is made once, at start.

use std::cell::Cell;
use std::time::Instant;

use crate::config::{Secret, UpstreamKind};
use crate::upstream::health::Health;

/// One key: the value of its kind's credential header, and its health.
#[derive(Debug)]
pub struct PoolKey {
    header_value: Secret,
    pub health: Health,
}

impl PoolKey {
    /// The credential header's value (`Bearer …` for OpenAI-compatible upstreams).
    pub fn header_value(&self) -> &[u8] {
        self.header_value.expose().as_bytes()
    }
}

#[derive(Debug, Default)]
pub struct KeyPool {
    keys: Vec<PoolKey>,
    next: Cell<usize>,
}

impl KeyPool {
    pub fn new(kind: UpstreamKind, keys: &[Secret]) -> KeyPool {
        let keys = keys
            .iter()
            .map(|key| PoolKey {
                header_value: match kind {
                    UpstreamKind::OpenAi => Secret::new(format!("Bearer {}", key.expose())),
                    UpstreamKind::Azure | UpstreamKind::Anthropic => key.clone(),
                },
                health: Health::default(),
            })
            .collect();
        KeyPool {
            keys,
            next: Cell::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&PoolKey> {
        self.keys.get(index)
    }

    /// Whether some key may be used now (an empty pool: the request's own credential goes).
    pub fn any_available(&self, now: Instant) -> bool {
        self.keys.is_empty() || self.keys.iter().any(|k| k.health.available(now))
    }

    /// Whether some key is not resting (a trial out is not a rest): the gauge's 1.
    pub fn any_up(&self, now: Instant) -> bool {
        self.keys.is_empty() || self.keys.iter().any(|k| !k.health.resting(now))
    }

    /// An available key not among `tried` (a bit per key), in turn: the next to try on the
    /// same upstream after one was refused.
    pub fn pick_untried(&self, now: Instant, tried: u64) -> Option<usize> {
        let n = self.keys.len();
        let start = self.next.get() % n.max(1);
        let chosen = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| i < 64 && tried & (1 << i) == 0 && self.keys[i].health.available(now))?;
        self.next.set(chosen + 1);
        Some(chosen)
    }

    /// The next key in turn that is not resting; every key resting, the one whose rest ends
    /// first. None: the pool is empty.
    pub fn pick(&self, now: Instant) -> Option<usize> {
        self.pick_untried(now, 0).or_else(|| {
            let soonest = (0..self.keys.len())
                .min_by_key(|&i| self.keys[i].health.rests_until().unwrap_or(now))?;
            self.next.set(soonest + 1);
            Some(soonest)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::health::HealthRules;
    use std::time::Duration;

    #[test]
    fn keys_are_taken_in_turn_and_a_rested_key_is_skipped() {
        let pool = KeyPool::new(
            UpstreamKind::OpenAi,
            &[Secret::new("a"), Secret::new("b"), Secret::new("c")],
        );
        let now = Instant::now();
        let turns: Vec<usize> = (0..6).map(|_| pool.pick(now).unwrap()).collect();
        assert_eq!(turns, [0, 1, 2, 0, 1, 2]);
        assert_eq!(pool.get(1).unwrap().header_value(), b"Bearer b");
        let rules = HealthRules {
            eject_after: 1,
            base_rest: Duration::from_secs(60),
            max_rest: Duration::from_secs(600),
        };
        pool.get(1).unwrap().health.failed(&rules, now);
        let turns: Vec<usize> = (0..4).map(|_| pool.pick(now).unwrap()).collect();
        assert_eq!(turns, [0, 2, 0, 2]);
        // Every key resting: the one back first.
        pool.get(0)
            .unwrap()
            .health
            .rest_for(&rules, Duration::from_secs(300), now);
        pool.get(2)
            .unwrap()
            .health
            .rest_for(&rules, Duration::from_secs(30), now);
        assert!(!pool.any_available(now));
        assert_eq!(pool.pick(now), Some(2));
        assert_eq!(pool.pick(now + Duration::from_secs(61)), Some(1));
    }

    #[test]
    fn azure_and_anthropic_keys_go_bare() {
        let pool = KeyPool::new(UpstreamKind::Anthropic, &[Secret::new("sk-ant")]);
        assert_eq!(pool.get(0).unwrap().header_value(), b"sk-ant");
        assert!(KeyPool::new(UpstreamKind::OpenAi, &[])
            .pick(Instant::now())
            .is_none());
    }
}
