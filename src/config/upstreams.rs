//! The `[[upstreams]]` array of the TOML file: named OpenAI-compatible upstreams, each serving
//! the models it lists (names and globs) at a weight.
//!
//! ```toml
//! [[upstreams]]
//! name = "openai"
//! url = "https://api.openai.com/v1"
//! models = ["gpt-4o*", "o3*"]
//! weight = 1                        # optional (default 1; 0 serves nothing)
//! ```
//! Without the array, `upstream_url` is the one upstream and serves every model.

use super::UpstreamUrl;
use crate::upstream::select::ModelPattern;

/// One `[[upstreams]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamEntry {
    pub name: String,
    pub url: UpstreamUrl,
    pub models: Vec<ModelPattern>,
    pub weight: u32,
}

/// The most a weight may be: weights are ratios, and a bound keeps their sum far from overflow.
const MAX_WEIGHT: i64 = 10_000;

/// The entries of `value` (the file's `upstreams`), every problem reported with its entry.
pub fn parse(value: &toml::Value, errors: &mut Vec<String>) -> Vec<UpstreamEntry> {
    let Some(entries) = value.as_array() else {
        errors.push("config file: `upstreams` must be an array of tables ([[upstreams]])".into());
        return Vec::new();
    };
    let mut out: Vec<UpstreamEntry> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("config file: `upstreams[{i}]`");
        let Some(entry) = entry.as_table() else {
            errors.push(format!("{at} must be a table"));
            continue;
        };
        for key in entry.keys() {
            if !["name", "url", "models", "weight"].contains(&key.as_str()) {
                errors.push(format!("{at} has unknown field `{key}`"));
            }
        }
        let string = |field: &str, errors: &mut Vec<String>| match entry.get(field) {
            Some(toml::Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            None => {
                errors.push(format!("{at} needs `{field}`"));
                None
            }
            Some(_) => {
                errors.push(format!("{at}: `{field}` must be a non-empty string"));
                None
            }
        };
        let name = string("name", errors);
        let url = string("url", errors).and_then(|raw| {
            UpstreamUrl::parse(&raw)
                .map_err(|e| errors.push(format!("{at}: `url` `{raw}`: {e}")))
                .ok()
        });
        let models = match entry.get("models").and_then(toml::Value::as_array) {
            Some(list) if !list.is_empty() => {
                let mut models = Vec::new();
                for m in list {
                    match m.as_str().map(ModelPattern::parse) {
                        Some(Ok(p)) => models.push(p),
                        Some(Err(e)) => errors.push(format!("{at}: `models`: {e}")),
                        None => errors.push(format!("{at}: `models` must hold strings")),
                    }
                }
                models
            }
            _ => {
                errors.push(format!(
                    "{at} needs `models`, a non-empty list of names and globs (\"*\" for every model)"
                ));
                Vec::new()
            }
        };
        let weight = match entry.get("weight") {
            None => 1,
            Some(toml::Value::Integer(w)) if (0..=MAX_WEIGHT).contains(w) => *w as u32,
            Some(_) => {
                errors.push(format!(
                    "{at}: `weight` must be a whole number from 0 to {MAX_WEIGHT}"
                ));
                1
            }
        };
        if let Some(name) = &name {
            // Every entry's name counts, a broken entry's too: its fix must not make a clash.
            if !names.insert(name.clone()) {
                errors.push(format!("{at}: the name `{name}` is used twice"));
            }
        }
        if let (Some(name), Some(url)) = (name, url) {
            out.push(UpstreamEntry {
                name,
                url,
                models,
                weight,
            });
        }
    }
    if !out.is_empty() && out.iter().all(|u| u.weight == 0) {
        errors.push("config file: every upstream has weight 0: none would serve".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> (Vec<UpstreamEntry>, Vec<String>) {
        let file: toml::Table = text.parse().unwrap();
        let mut errors = Vec::new();
        let out = parse(&file["upstreams"], &mut errors);
        (out, errors)
    }

    #[test]
    fn entries_parse_with_their_models_and_weights() {
        let (out, errors) = parsed(
            r#"
            [[upstreams]]
            name = "openai"
            url = "https://api.openai.com/v1"
            models = ["gpt-4o*", "o3"]
            [[upstreams]]
            name = "local"
            url = "http://127.0.0.1:8000/v1"
            models = ["*"]
            weight = 3
            "#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "openai");
        assert_eq!(out[0].url.host, "api.openai.com");
        assert_eq!(out[0].weight, 1);
        assert!(out[0].models[0].matches("gpt-4o-mini"));
        assert_eq!(out[1].weight, 3);
        assert!(out[1].models[0].matches("anything"));
    }

    #[test]
    fn every_problem_is_reported_with_its_entry() {
        let (_, errors) = parsed(
            r#"
            [[upstreams]]
            name = "a"
            url = "ftp://x"
            models = []
            weight = -1
            key = "sk-..."
            [[upstreams]]
            name = "a"
            url = "http://h/v1"
            models = ["ok", " "]
            "#,
        );
        let all = errors.join("\n");
        for want in [
            "`upstreams[0]`: `url` `ftp://x`",
            "`upstreams[0]` needs `models`",
            "`upstreams[0]`: `weight` must be a whole number",
            "`upstreams[0]` has unknown field `key`",
            "`upstreams[1]`: `models`: a model pattern may not be empty",
            "`upstreams[1]`: the name `a` is used twice",
        ] {
            assert!(all.contains(want), "missing `{want}` in:\n{all}");
        }
        let (_, errors) = parsed(
            r#"
            [[upstreams]]
            name = "z"
            url = "http://h/v1"
            models = ["*"]
            weight = 0
            "#,
        );
        assert!(errors.iter().any(|e| e.contains("weight 0")), "{errors:?}");
    }
}
