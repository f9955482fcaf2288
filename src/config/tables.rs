//! The two tables of the TOML file beside its flat settings:
//!
//! ```toml
//! [prices."my-finetune"]            # dollars per million tokens; overrides any other price
//! input_dollars_per_million = 1.0
//! output_dollars_per_million = 2.0
//! cached_input_dollars_per_million = 0.5   # optional (default: the input price)
//! cache_write_input_dollars_per_million = 1.25   # optional (default: the input price)
//! cache_write_1h_input_dollars_per_million = 2.0  # optional (default: the cache-write price)
//! max_output_tokens = 8192                 # optional
//!
//! [keys.team-a]                     # the alias shown instead of the key
//! key = "sk-aura-team-a-..."        # what clients send
//! limit_dollars = 25.0              # optional (default: default_limit_dollars)
//! upstream_key = "sk-proj-..."      # optional: a virtual key, forwarded as this key
//! ```
//! Teams, calendar budgets and rate limits (`[teams]`, `team`, `budgets`, `rpm`, …) are
//! `config/governance.rs`'s.
//! Every problem is reported, with its table and field. Keys are held as [`Secret`]s.

use std::fmt;

use super::governance::{self, Limits, TeamEntry};
use crate::pricing::{self, Price, Units};
use crate::upstream::select::ModelPattern;

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One `[keys.<alias>]` entry.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub alias: String,
    pub key: Secret,
    /// Its budgets (none: the default limit in `budget_period`) and rate limits.
    pub limits: Limits,
    /// The team it is charged to as well.
    pub team: Option<String>,
    /// Set: a virtual key; Aura sends this key upstream instead of the client's.
    pub upstream_key: Option<Secret>,
    /// Models it may ask for (names or globs); empty: any.
    pub models: Vec<ModelPattern>,
    /// The upstream its requests go to, by name; none: any serving the model.
    pub upstream: Option<String>,
}

/// One `[prices.<model>]` entry.
#[derive(Debug, Clone)]
pub struct PriceEntry {
    pub model: String,
    pub price: Price,
}

#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub keys: Vec<KeyEntry>,
    pub prices: Vec<PriceEntry>,
    /// `[[upstreams]]` (`config/upstreams.rs`).
    pub upstreams: Vec<super::upstreams::UpstreamEntry>,
    /// `[fallbacks]`: a model, and the models its requests go on to, in order, when every
    /// upstream serving it failed.
    pub fallbacks: Vec<(String, Vec<String>)>,
    /// `[teams]`.
    pub teams: Vec<TeamEntry>,
}

/// The names of the tables in the file (the flat settings skip them).
pub const TABLES: [&str; 5] = ["keys", "prices", "upstreams", "fallbacks", "teams"];

/// The most models one model falls back to.
const MAX_FALLBACKS: usize = 8;

/// `[fallbacks]`: `"gpt-4o" = ["gpt-4o-mini"]`, each model once, none its own fallback.
fn fallbacks(value: &toml::Value, errors: &mut Vec<String>) -> Vec<(String, Vec<String>)> {
    let Some(table) = value.as_table() else {
        errors.push("config file: `fallbacks` must be a table of model = [models]".into());
        return Vec::new();
    };
    let mut out = Vec::new();
    for (model, list) in table {
        let at = format!("config file: `fallbacks.{model}`");
        let names: Option<Vec<String>> = list.as_array().and_then(|items| {
            items
                .iter()
                .map(|m| {
                    m.as_str()
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(String::from)
                })
                .collect()
        });
        match names {
            Some(names) if !names.is_empty() && names.len() <= MAX_FALLBACKS => {
                if names.iter().any(|n| n == model) {
                    errors.push(format!("{at} names the model itself"));
                } else {
                    out.push((model.clone(), names));
                }
            }
            _ => errors.push(format!(
                "{at} must be a list of 1 to {MAX_FALLBACKS} model names"
            )),
        }
    }
    out
}

pub fn parse(file: &toml::Table, env: &dyn super::Source) -> Result<Tables, Vec<String>> {
    let mut errors = Vec::new();
    let mut tables = Tables::default();
    for (name, value) in file {
        if !TABLES.contains(&name.as_str()) {
            continue;
        }
        if name == "upstreams" {
            tables.upstreams = super::upstreams::parse(value, env, &mut errors);
            continue;
        }
        if name == "fallbacks" {
            tables.fallbacks = fallbacks(value, &mut errors);
            continue;
        }
        if name == "teams" {
            tables.teams = governance::teams(value, &mut errors);
            continue;
        }
        let Some(entries) = value.as_table() else {
            errors.push(format!("config file: `{name}` must be a table"));
            continue;
        };
        for (entry_name, entry) in entries {
            let Some(entry) = entry.as_table() else {
                errors.push(format!(
                    "config file: `{name}.{entry_name}` must be a table"
                ));
                continue;
            };
            let mut fields = Fields {
                at: format!("{name}.{entry_name}"),
                entry,
                errors: &mut errors,
            };
            if name == "keys" {
                if let Some(key) = key_entry(entry_name, &mut fields) {
                    tables.keys.push(key);
                }
            } else if let Some(price) = price_entry(&mut fields) {
                tables.prices.push(PriceEntry {
                    model: entry_name.clone(),
                    price,
                });
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for k in &tables.keys {
        // An alias stands for its key in the admin API and in metric labels: it must not read
        // as a key id (16 hex digits) or as the label of keys past the series cap.
        let looks_like_id = k.alias.len() == 16 && k.alias.bytes().all(|b| b.is_ascii_hexdigit());
        if looks_like_id || k.alias == "other" || k.alias == "(other keys)" {
            errors.push(format!(
                "config file: `keys.{}`: an alias may not be `other` or 16 hex digits (a key id)",
                k.alias
            ));
        }
        if !seen.insert(k.key.expose()) {
            errors.push(format!(
                "config file: `keys.{}` repeats another entry's key",
                k.alias
            ));
        }
        if let Some(team) = &k.team {
            if !tables.teams.iter().any(|t| &t.name == team) {
                errors.push(format!(
                    "config file: `keys.{}` `team` names no `[teams.{team}]`",
                    k.alias
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(tables)
    } else {
        Err(errors)
    }
}

fn key_entry(alias: &str, f: &mut Fields) -> Option<KeyEntry> {
    let mut known = vec!["key", "upstream_key", "team", "models", "upstream"];
    known.extend(governance::FIELDS);
    f.only(&known);
    let key = f.string("key", true);
    let limits = governance::limits(f);
    let team = f.string("team", false);
    let upstream_key = f.string("upstream_key", false);
    let models = governance::models(f);
    let upstream = f.string("upstream", false);
    Some(KeyEntry {
        alias: alias.to_string(),
        key: Secret(key?),
        limits,
        team,
        upstream_key: upstream_key.map(Secret),
        models,
        upstream,
    })
}

fn price_entry(f: &mut Fields) -> Option<Price> {
    f.only(&[
        "input_dollars_per_million",
        "output_dollars_per_million",
        "cached_input_dollars_per_million",
        "cache_write_input_dollars_per_million",
        "cache_write_1h_input_dollars_per_million",
        "media_input_dollars_per_million",
        "dollars_per_image",
        "dollars_per_million_characters",
        "dollars_per_audio_minute",
        "max_output_tokens",
        "dollars_per_web_search",
        "max_input_tokens",
    ]);
    let input = f.dollars("input_dollars_per_million");
    let output = f.dollars("output_dollars_per_million");
    let units = Units {
        media_input_pico: f
            .dollars("media_input_dollars_per_million")
            .map(|d| pricing::dollars_to_pico(d / 1e6)),
        per_image_nano: f.dollars("dollars_per_image").map(pricing::dollars_to_nano),
        per_character_pico: f
            .dollars("dollars_per_million_characters")
            .map(|d| pricing::dollars_to_pico(d / 1e6)),
        per_second_pico: f
            .dollars("dollars_per_audio_minute")
            .map(|d| pricing::dollars_to_pico(d / 60.0)),
        per_web_search_nano: f
            .dollars("dollars_per_web_search")
            .map(pricing::dollars_to_nano),
    };
    let unit_priced = units != Units::default();
    if (input.is_none() || output.is_none()) && !unit_priced {
        f.error(
            "needs input_dollars_per_million and output_dollars_per_million (or a price per image, character or audio minute)",
        );
        return None;
    }
    let (input, output) = (input.unwrap_or(0.0), output.unwrap_or(0.0));
    let cached = f
        .dollars("cached_input_dollars_per_million")
        .unwrap_or(input);
    let mut price = Price::per_million(input, output, cached);
    if let Some(write) = f.dollars("cache_write_input_dollars_per_million") {
        price.cache_write_input_pico = pricing::dollars_to_pico(write / 1e6);
        price.cache_write_1h_input_pico = price.cache_write_input_pico;
    }
    if let Some(write) = f.dollars("cache_write_1h_input_dollars_per_million") {
        price.cache_write_1h_input_pico = pricing::dollars_to_pico(write / 1e6);
    }
    price.max_output_tokens = f.count("max_output_tokens");
    price.max_input_tokens = f.count("max_input_tokens");
    price.units = units;
    Some(price)
}

pub(super) struct Fields<'a> {
    pub(super) at: String,
    pub(super) entry: &'a toml::Table,
    pub(super) errors: &'a mut Vec<String>,
}

impl Fields<'_> {
    pub(super) fn error(&mut self, what: &str) {
        // `what` may go on with its own punctuation (": `url` …").
        let space = if what.starts_with(':') { "" } else { " " };
        self.errors
            .push(format!("config file: `{}`{space}{what}", self.at));
    }

    pub(super) fn only(&mut self, known: &[&str]) {
        let unknown: Vec<String> = self
            .entry
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in unknown {
            self.error(&format!("has unknown field `{k}`"));
        }
    }

    pub(super) fn string(&mut self, field: &str, required: bool) -> Option<String> {
        match self.entry.get(field) {
            None if required => {
                self.error(&format!("needs `{field}`"));
                None
            }
            None => None,
            Some(toml::Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Some(_) => {
                self.error(&format!("`{field}` must be a non-empty string"));
                None
            }
        }
    }

    pub(super) fn dollars(&mut self, field: &str) -> Option<f64> {
        let v = match self.entry.get(field)? {
            toml::Value::Float(v) => *v,
            toml::Value::Integer(v) => *v as f64,
            _ => f64::NAN,
        };
        if v.is_finite() && v >= 0.0 {
            Some(v)
        } else {
            self.error(&format!(
                "`{field}` must be a non-negative number of dollars"
            ));
            None
        }
    }

    pub(super) fn count(&mut self, field: &str) -> Option<u64> {
        match self.entry.get(field)? {
            toml::Value::Integer(v) if *v > 0 => Some(*v as u64),
            _ => {
                self.error(&format!("`{field}` must be a positive integer"));
                None
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The tables of a config file's text.
    pub(in crate::config) fn tables(text: &str) -> Result<Tables, Vec<String>> {
        parse(
            &text.parse::<toml::Table>().unwrap(),
            &std::collections::HashMap::new(),
        )
    }

    #[test]
    fn fallbacks_parse_and_refuse_a_model_falling_back_to_itself() {
        let t = tables(
            r#"
            [fallbacks]
            "gpt-4o" = ["gpt-4o-mini", "llama-3.3-70b"]
            "#,
        )
        .unwrap();
        assert_eq!(
            t.fallbacks,
            [(
                "gpt-4o".to_string(),
                vec!["gpt-4o-mini".to_string(), "llama-3.3-70b".to_string()]
            )]
        );
        let errors = tables("[fallbacks]\na = [\"a\"]\nb = []\nc = [1]\n")
            .unwrap_err()
            .join("\n");
        assert!(
            errors.contains("`fallbacks.a` names the model itself"),
            "{errors}"
        );
        assert!(errors.contains("`fallbacks.b` must be a list"), "{errors}");
        assert!(errors.contains("`fallbacks.c` must be a list"), "{errors}");
    }

    #[test]
    fn keys_and_prices_parse() {
        let t = tables(
            r#"
            port = 1
            [keys.team-a]
            key = "sk-aura-a"
            limit_dollars = 25
            upstream_key = "sk-proj-upstream"
            [keys.team-b]
            key = "sk-aura-b"
            [prices."my-finetune"]
            input_dollars_per_million = 1.0
            output_dollars_per_million = 2
            cache_write_input_dollars_per_million = 1.25
            cache_write_1h_input_dollars_per_million = 2
            max_output_tokens = 8192
            "#,
        )
        .unwrap();
        assert_eq!(t.keys.len(), 2);
        let a = t.keys.iter().find(|k| k.alias == "team-a").unwrap();
        assert_eq!(a.key.expose(), "sk-aura-a");
        assert_eq!(a.limits.windows[0].limit_dollars, 25.0);
        assert_eq!(a.limits.windows[0].period, None);
        assert_eq!(
            a.upstream_key.as_ref().unwrap().expose(),
            "sk-proj-upstream"
        );
        assert_eq!(format!("{a:?}").matches("***").count(), 2, "{a:?}");
        assert!(!format!("{a:?}").contains("sk-"));
        let p = &t.prices[0];
        assert_eq!(p.model, "my-finetune");
        assert_eq!(
            (
                p.price.input_pico,
                p.price.output_pico,
                p.price.cached_input_pico
            ),
            (1_000_000, 2_000_000, 1_000_000)
        );
        assert_eq!(p.price.cache_write_input_pico, 1_250_000);
        assert_eq!(p.price.cache_write_1h_input_pico, 2_000_000);
        assert_eq!(p.price.max_output_tokens, Some(8192));
    }

    #[test]
    fn every_problem_is_reported() {
        let errors = tables(
            r#"
            [keys.a]
            limit_dollars = -1
            colour = "red"
            [keys.b]
            key = "same"
            [keys.c]
            key = "same"
            [keys.other]
            key = "k-other"
            [keys.0123456789abcdef]
            key = "k-hex"
            [prices.m]
            input_dollars_per_million = 1.0
            "#,
        )
        .unwrap_err();
        assert_eq!(errors.len(), 7, "{errors:#?}");
        assert_eq!(
            errors
                .iter()
                .filter(|e| e.contains("may not be `other`"))
                .count(),
            2
        );
        assert!(errors.iter().any(|e| e.contains("`keys.a` needs `key`")));
        assert!(errors.iter().any(|e| e.contains("unknown field `colour`")));
        assert!(errors
            .iter()
            .any(|e| e.contains("repeats another entry's key")));
        assert!(errors.iter().any(|e| e.contains("`prices.m` needs")));
    }
}
