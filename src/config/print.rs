//! `aura --print-config`: the routing table Aura would serve with, as TOML an operator can read
//! (and paste back), every upstream's settings as resolved (its own, or the global ones where it
//! sets none). Secrets are redacted: provider and virtual keys show as `sk-...abcd` (the
//! prefix and last four characters, as providers' dashboards show them), header values as
//! `***`.

use std::fmt::Write;

use super::governance::{Limits, Window};
use super::{Config, KeyMode, Period, Secret, UpstreamEntry, UpstreamKind};
use crate::auth::mask;

/// The routing table and the settings that steer it.
pub fn routing_table(config: &Config) -> String {
    let mut out = String::new();
    let mode = match config.budgets.key_mode {
        KeyMode::Passthrough => "passthrough",
        KeyMode::Virtual => "virtual",
    };
    let _ = writeln!(out, "# aura --print-config: secrets are redacted");
    let _ = writeln!(out, "key_mode = {}", quoted(mode));
    let _ = writeln!(out, "upstream_max_attempts = {}", config.max_attempts);
    if let Some(total) = config.upstream_total_timeout {
        let _ = writeln!(out, "upstream_total_timeout_ms = {}", total.as_millis());
    }
    let health = &config.health;
    let _ = writeln!(
        out,
        "upstream_eject_after_failures = {}",
        health.eject_after
    );
    let _ = writeln!(out, "upstream_eject_ms = {}", health.base_rest.as_millis());
    for route in config.routes() {
        upstream(&mut out, config, &route);
    }
    if !config.fallbacks.is_empty() {
        let _ = writeln!(out, "\n[fallbacks]");
        for (model, to) in &config.fallbacks {
            let to: Vec<String> = to.iter().map(|m| quoted(m)).collect();
            let _ = writeln!(out, "{} = [{}]", quoted(model), to.join(", "));
        }
    }
    for key in &config.budgets.keys {
        let _ = writeln!(out, "\n[keys.{}]", quoted(&key.alias));
        let _ = writeln!(out, "key = {}", redacted(&key.key));
        if let Some(team) = &key.team {
            let _ = writeln!(out, "team = {}", quoted(team));
        }
        limits(&mut out, &key.limits);
        if let Some(upstream_key) = &key.upstream_key {
            let _ = writeln!(out, "upstream_key = {}", redacted(upstream_key));
        }
    }
    for team in &config.budgets.teams {
        let _ = writeln!(out, "\n[teams.{}]", quoted(&team.name));
        limits(&mut out, &team.limits);
    }
    out
}

/// A key's or a team's budgets and rate limits.
fn limits(out: &mut String, limits: &Limits) {
    match limits.windows.as_slice() {
        [] => {}
        [Window {
            period: None,
            limit_dollars,
        }] => {
            let _ = writeln!(out, "limit_dollars = {limit_dollars}");
        }
        windows => {
            let listed: Vec<String> = windows
                .iter()
                .map(|w| {
                    let period = w.period.unwrap_or(Period::Never).name();
                    format!(
                        "{{ period = \"{period}\", limit_dollars = {} }}",
                        w.limit_dollars
                    )
                })
                .collect();
            let _ = writeln!(out, "budgets = [{}]", listed.join(", "));
        }
    }
    let rates = &limits.rates;
    for (name, value) in [
        ("rpm", rates.rpm),
        ("tpm", rates.tpm),
        ("max_concurrent", rates.max_concurrent),
    ] {
        if let Some(value) = value {
            let _ = writeln!(out, "{name} = {value}");
        }
    }
}

fn upstream(out: &mut String, config: &Config, route: &UpstreamEntry) {
    let kind = match route.kind {
        UpstreamKind::OpenAi => "openai",
        UpstreamKind::Azure => "azure",
        UpstreamKind::Anthropic => "anthropic",
    };
    let models: Vec<String> = route
        .models
        .iter()
        .map(|m| quoted(&m.to_string()))
        .collect();
    let _ = writeln!(out, "\n[[upstreams]]");
    let _ = writeln!(out, "name = {}", quoted(&route.name));
    let _ = writeln!(out, "kind = {}", quoted(kind));
    let _ = writeln!(out, "url = {}", quoted(&route.url.to_string()));
    let _ = writeln!(out, "models = [{}]", models.join(", "));
    let _ = writeln!(out, "weight = {}", route.weight);
    if !route.keys.is_empty() {
        let keys: Vec<String> = route.keys.iter().map(redacted).collect();
        let _ = writeln!(out, "keys = [{}]", keys.join(", "));
    }
    let global = &config.timeouts;
    let own = &route.timeouts;
    for (name, value) in [
        (
            "connect_timeout_ms",
            own.connect.unwrap_or(global.upstream_connect),
        ),
        (
            "first_byte_timeout_ms",
            own.first_byte.unwrap_or(global.upstream_first_byte),
        ),
        ("read_timeout_ms", own.read.unwrap_or(global.upstream_read)),
    ] {
        let _ = writeln!(out, "{name} = {}", value.as_millis());
    }
    let inject = route
        .inject_stream_usage
        .unwrap_or(config.inject_stream_usage);
    let _ = writeln!(out, "inject_stream_usage = {inject}");
    if !route.headers.is_empty() {
        let headers: Vec<String> = route
            .headers
            .iter()
            .map(|(name, _)| format!("{} = \"***\"", quoted(name)))
            .collect();
        let _ = writeln!(out, "headers = {{ {} }}", headers.join(", "));
    }
    let ca_files: Vec<String> = config
        .upstream_ca_file
        .iter()
        .chain(route.ca_file.iter())
        .map(|p| quoted(&p.display().to_string()))
        .collect();
    if !ca_files.is_empty() {
        let _ = writeln!(
            out,
            "# CA files trusted besides the system's: {}",
            ca_files.join(", ")
        );
    }
    if let Some(azure) = &route.azure {
        let _ = writeln!(out, "api_version = {}", quoted(&azure.api_version));
        if !azure.deployments.is_empty() {
            let pairs: Vec<String> = azure
                .deployments
                .iter()
                .map(|(model, deployment)| format!("{} = {}", quoted(model), quoted(deployment)))
                .collect();
            let _ = writeln!(out, "deployments = {{ {} }}", pairs.join(", "));
        }
    }
}

/// A TOML basic string.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn redacted(secret: &Secret) -> String {
    quoted(&mask(secret.expose()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_table_reads_back_as_toml_and_shows_no_secret() {
        let text = r#"
            key_mode = "virtual"
            [keys.team]
            key = "sk-aura-team-0123456789"
            upstream_key = "sk-proj-operator-abcdefgh"
            [[upstreams]]
            name = "openai"
            url = "https://api.openai.com/v1"
            models = ["gpt-4o*"]
            keys = ["sk-proj-pool-key-one-wxyz"]
            headers = { "OpenAI-Organization" = "org-secret-id" }
            first_byte_timeout_ms = 9000
            [[upstreams]]
            name = "azure"
            kind = "azure"
            url = "https://res.openai.azure.com/openai"
            models = ["gpt-4o"]
            key = "azure-key-0123456789"
            api_version = "2024-10-21"
            "#;
        let env: HashMap<String, String> = HashMap::new();
        let mut config =
            crate::config::resolve(&[crate::config::file_layer(text).unwrap()]).unwrap();
        let tables = crate::config::file_tables(text, &env).unwrap();
        config.upstreams = tables.upstreams;
        config.budgets.keys = tables.keys;
        let printed = routing_table(&config);
        for secret in [
            "sk-aura-team-0123456789",
            "sk-proj-operator-abcdefgh",
            "sk-proj-pool-key-one-wxyz",
            "org-secret-id",
            "azure-key-0123456789",
        ] {
            assert!(!printed.contains(secret), "{secret} in:\n{printed}");
        }
        assert!(printed.contains(r#"keys = ["sk-...wxyz"]"#), "{printed}");
        assert!(
            printed.contains("first_byte_timeout_ms = 9000"),
            "{printed}"
        );
        assert!(
            printed.contains("first_byte_timeout_ms = 300000"),
            "{printed}"
        );
        assert!(
            printed.contains(r#"api_version = "2024-10-21""#),
            "{printed}"
        );
        // It is TOML, and its upstreams parse back as the config's.
        let back: toml::Table = printed.parse().unwrap();
        let upstreams = back["upstreams"].as_array().unwrap();
        assert_eq!(upstreams.len(), 2);
        assert_eq!(upstreams[0]["name"].as_str(), Some("openai"));
        assert_eq!(upstreams[1]["kind"].as_str(), Some("azure"));
    }
}
