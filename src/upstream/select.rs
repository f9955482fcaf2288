//! Which upstream serves a request (issue 12, first step: the pure part, wired into the proxy
//! by the next one). The upstreams whose `models` match the request's model are its
//! candidates; among them a worker picks by weight and load, as Envoy's least-request balancer
//! does with weights: each candidate weighs `weight / (in-flight + 1)` and one is drawn at
//! random by those weights. With nothing in flight that is the configured weights exactly; an
//! upstream holding more requests than the others is chosen less. The in-flight counts are the
//! worker's own: nothing is shared on the request path.

use std::cell::Cell;
use std::fmt;

/// A model as `[[upstreams]] models` lists it: a name, or a glob where `*` is any run of
/// characters and `?` any one (`gpt-4o*` serves `gpt-4o` and `gpt-4o-mini`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPattern {
    text: String,
    glob: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("a model pattern may not be empty")]
    Empty,
    #[error("model pattern `{0}` has a control character or a space")]
    Unprintable(String),
}

impl ModelPattern {
    /// `*`: every model.
    pub fn any() -> ModelPattern {
        ModelPattern {
            text: "*".into(),
            glob: true,
        }
    }

    pub fn parse(text: &str) -> Result<ModelPattern, PatternError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(PatternError::Unprintable(text.escape_debug().to_string()));
        }
        Ok(ModelPattern {
            glob: text.contains(['*', '?']),
            text: text.to_string(),
        })
    }

    /// A plain name (no `*` or `?`): one model `GET /v1/models` can list.
    pub fn exact(&self) -> Option<&str> {
        (!self.glob).then_some(&self.text)
    }

    pub fn matches(&self, model: &str) -> bool {
        if self.glob {
            glob_match(&self.text, model)
        } else {
            self.text == model
        }
    }
}

impl fmt::Display for ModelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `*` (any run of characters) and `?` (one character), iteratively with one backtrack point:
/// at most pattern × name steps, never exponential whatever the pattern (`a*a*a*…b` against
/// `aaaa…`). Positions are byte offsets in both; each step moves by whole characters.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (pat, nam) = (pattern.as_bytes(), name.as_bytes());
    let char_len = |s: &str, at: usize| s[at..].chars().next().map_or(1, char::len_utf8);
    let (mut p, mut n) = (0, 0);
    // After the last `*`: where in the pattern to resume, and the name position it stood for.
    let mut star: Option<(usize, usize)> = None;
    while n < nam.len() {
        let here = char_len(name, n);
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p + 1, n));
                p += 1;
            }
            Some(b'?') => {
                p += 1;
                n += here;
            }
            Some(_) if pat[p..].starts_with(&nam[n..n + here]) => {
                p += here;
                n += here;
            }
            _ => match star {
                // The last `*` takes one more character, and matching resumes after it.
                Some((after, taken)) => {
                    let taken = taken + char_len(name, taken);
                    star = Some((after, taken));
                    p = after;
                    n = taken;
                }
                None => return false,
            },
        }
    }
    pat[p.min(pat.len())..].iter().all(|&c| c == b'*')
}

/// The upstreams by model, in config order: upstream `i` serves `models[i]`, at `weights[i]`.
#[derive(Debug, Clone, Default)]
pub struct ModelTable {
    models: Vec<Vec<ModelPattern>>,
    weights: Vec<u32>,
}

impl ModelTable {
    /// One upstream's models and weight, in config order.
    pub fn push(&mut self, models: Vec<ModelPattern>, weight: u32) {
        self.models.push(models);
        self.weights.push(weight);
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Whether upstream `upstream` serves `model` (weight 0 means never).
    pub fn serves_at(&self, upstream: usize, model: &str) -> bool {
        self.weights.get(upstream).is_some_and(|&w| w > 0)
            && self.models[upstream].iter().any(|p| p.matches(model))
    }

    /// Every model named exactly (globs name no model), each once, sorted: what `GET /v1/models`
    /// can answer.
    pub fn named_models(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .models
            .iter()
            .flatten()
            .filter_map(ModelPattern::exact)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    pub fn weight(&self, upstream: usize) -> u32 {
        self.weights.get(upstream).copied().unwrap_or(0)
    }
}

/// A worker's side of the choice: requests in flight per upstream, and a random source.
#[derive(Debug)]
pub struct Picker {
    in_flight: Vec<Cell<u32>>,
    rng: Cell<u64>,
}

impl Picker {
    /// For `upstreams` upstreams; `seed` differs per worker (a worker's index will do: it is
    /// mixed by splitmix64 first, so neighbouring seeds give unrelated streams).
    pub fn new(upstreams: usize, seed: u64) -> Picker {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Picker {
            in_flight: (0..upstreams).map(|_| Cell::new(0)).collect(),
            // xorshift's state must not be 0.
            rng: Cell::new(z.max(1)),
        }
    }

    /// One of the upstreams of `set` (a bit each, at most 64), as [`pick`](Self::pick) draws.
    pub fn pick_set(&self, table: &ModelTable, set: u64) -> Option<usize> {
        let mut members = [0usize; 64];
        let mut n = 0;
        for i in (0..64).filter(|i| set & (1 << i) != 0) {
            members[n] = i;
            n += 1;
        }
        self.pick(table, &members[..n])
    }

    /// One of `candidates`, drawn by `weight / (in-flight + 1)`; `None` when there are none.
    pub fn pick(&self, table: &ModelTable, candidates: &[usize]) -> Option<usize> {
        let share = |i: usize| {
            let load = self.in_flight.get(i).map_or(0, Cell::get);
            f64::from(table.weight(i)) / f64::from(load.saturating_add(1))
        };
        match candidates {
            [] => None,
            [only] => Some(*only),
            _ => {
                let total: f64 = candidates.iter().map(|&i| share(i)).sum();
                let mut at = self.unit() * total;
                for &i in candidates {
                    at -= share(i);
                    if at < 0.0 {
                        return Some(i);
                    }
                }
                candidates.last().copied()
            }
        }
    }

    /// Counts a request on `upstream` until the guard drops.
    pub fn start(&self, upstream: usize) -> InFlight<'_> {
        if let Some(n) = self.in_flight.get(upstream) {
            n.set(n.get().saturating_add(1));
        }
        InFlight {
            picker: self,
            upstream,
        }
    }

    pub fn in_flight(&self, upstream: usize) -> u32 {
        self.in_flight.get(upstream).map_or(0, Cell::get)
    }

    /// A uniform draw in [0, 1): xorshift64*, the top 53 bits.
    fn unit(&self) -> f64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A request counted on an upstream; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight<'a> {
    picker: &'a Picker,
    upstream: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.picker.in_flight.get(self.upstream) {
            n.set(n.get().saturating_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ModelTable {
        /// The upstreams that serve `model`, in config order.
        fn candidates(&self, model: &str) -> Vec<usize> {
            (0..self.len())
                .filter(|&i| self.serves_at(i, model))
                .collect()
        }
    }

    fn patterns(list: &[&str]) -> Vec<ModelPattern> {
        list.iter()
            .map(|p| ModelPattern::parse(p).unwrap())
            .collect()
    }

    #[test]
    fn names_match_exactly_and_globs_by_star_and_question_mark() {
        let exact = ModelPattern::parse("gpt-4o").unwrap();
        assert!(exact.matches("gpt-4o"));
        assert!(!exact.matches("gpt-4o-mini") && !exact.matches("GPT-4o"));
        assert_eq!(exact.exact(), Some("gpt-4o"));
        let family = ModelPattern::parse("gpt-4o*").unwrap();
        assert_eq!(family.exact(), None);
        for yes in ["gpt-4o", "gpt-4o-mini", "gpt-4o-2024-08-06"] {
            assert!(family.matches(yes), "{yes}");
        }
        for no in ["gpt-4", "gpt-4-turbo", "xgpt-4o", ""] {
            assert!(!family.matches(no), "{no}");
        }
        let middle = ModelPattern::parse("claude-*-4-?").unwrap();
        assert!(middle.matches("claude-sonnet-4-5"));
        assert!(middle.matches("claude--4-5"));
        assert!(!middle.matches("claude-sonnet-4-55"));
        assert!(!middle.matches("claude-sonnet-4-"));
        assert!(ModelPattern::parse("*").unwrap().matches(""));
        assert!(ModelPattern::parse("*").unwrap().matches("anything/at all"));
        assert!(ModelPattern::parse("a*b*c").unwrap().matches("a-b-b-c"));
        assert!(!ModelPattern::parse("a*b*c").unwrap().matches("a-c-b"));
        // `?` is one character, not one byte.
        assert!(ModelPattern::parse("modèle-?").unwrap().matches("modèle-é"));
        assert!(ModelPattern::parse("*é*").unwrap().matches("café-au-lait"));
        assert!(!ModelPattern::parse("caf?").unwrap().matches("cafée"));
        assert_eq!(ModelPattern::parse("  "), Err(PatternError::Empty));
        assert!(matches!(
            ModelPattern::parse("gpt 4o"),
            Err(PatternError::Unprintable(_))
        ));
    }

    #[test]
    fn neighbouring_seeds_pick_unrelated_sequences() {
        let mut table = ModelTable::default();
        table.push(patterns(&["m"]), 1);
        table.push(patterns(&["m"]), 1);
        let candidates = table.candidates("m");
        let draws = |seed| {
            let picker = Picker::new(2, seed);
            (0..64)
                .map(|_| picker.pick(&table, &candidates).unwrap())
                .collect::<Vec<_>>()
        };
        assert_ne!(draws(2), draws(3), "seeds 2 and 3 share a stream");
        assert_ne!(draws(0), draws(1));
    }

    #[test]
    fn a_pathological_glob_stays_polynomial() {
        let pattern = ModelPattern::parse(&format!("{}b", "a*".repeat(50))).unwrap();
        let name = "a".repeat(10_000);
        // Exponential backtracking would not finish; one backtrack point keeps it to
        // pattern × name steps.
        assert!(!pattern.matches(&name));
        assert!(pattern.matches(&format!("{name}b")));
    }

    #[test]
    fn candidates_are_the_upstreams_serving_the_model_in_config_order() {
        let mut table = ModelTable::default();
        table.push(patterns(&["gpt-4o*", "o3"]), 1);
        table.push(patterns(&["gpt-4o", "llama-*"]), 2);
        table.push(patterns(&["*"]), 0);
        table.push(patterns(&["*"]), 1);
        assert_eq!(table.candidates("gpt-4o"), [0, 1, 3]);
        assert_eq!(table.candidates("gpt-4o-mini"), [0, 3]);
        assert_eq!(table.candidates("llama-3.1-70b"), [1, 3]);
        assert_eq!(table.candidates("mistral"), [3], "weight 0 serves nothing");

        assert_eq!(table.named_models(), ["gpt-4o", "o3"]);
        let mut narrow = ModelTable::default();
        narrow.push(patterns(&["gpt-4o"]), 1);
        assert!(narrow.candidates("gpt-4o-mini").is_empty());
    }

    #[test]
    fn with_nothing_in_flight_picks_follow_the_weights() {
        let mut table = ModelTable::default();
        table.push(patterns(&["m"]), 1);
        table.push(patterns(&["m"]), 3);
        table.push(patterns(&["m"]), 6);
        let picker = Picker::new(3, 7);
        let candidates = table.candidates("m");
        let mut counts = [0u32; 3];
        let n = 60_000;
        for _ in 0..n {
            counts[picker.pick(&table, &candidates).unwrap()] += 1;
        }
        for (i, want) in [0.1, 0.3, 0.6].into_iter().enumerate() {
            let got = f64::from(counts[i]) / f64::from(n);
            assert!(
                (got - want).abs() < 0.01,
                "upstream {i}: {got} of picks, weight share {want}"
            );
        }
    }

    #[test]
    fn an_upstream_holding_more_requests_is_picked_less() {
        let mut table = ModelTable::default();
        table.push(patterns(&["m"]), 1);
        table.push(patterns(&["m"]), 1);
        let picker = Picker::new(2, 11);
        let held: Vec<_> = (0..9).map(|_| picker.start(0)).collect();
        assert_eq!(picker.in_flight(0), 9);
        let candidates = table.candidates("m");
        let n = 20_000;
        let to_busy = (0..n)
            .filter(|_| picker.pick(&table, &candidates) == Some(0))
            .count();
        // Shares 1/10 against 1/1: the busy one gets about 1 pick in 11.
        let share = to_busy as f64 / f64::from(n);
        assert!((share - 1.0 / 11.0).abs() < 0.015, "{share}");
        drop(held);
        assert_eq!(picker.in_flight(0), 0, "every guard gave its count back");
        assert_eq!(
            picker.pick(&table, &[1]),
            Some(1),
            "one candidate is taken as is"
        );
        assert_eq!(picker.pick(&table, &[]), None);
    }
}
