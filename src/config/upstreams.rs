//! The `[[upstreams]]` array of the TOML file: named upstreams, each serving the models it
//! lists (names and globs) at a weight, with its own provider keys and settings.
//!
//! ```toml
//! [[upstreams]]
//! name = "openai"
//! url = "https://api.openai.com/v1"
//! kind = "openai"                   # optional: openai (default), azure or anthropic
//! models = ["gpt-4o*", "o3*"]
//! weight = 1                        # optional (default 1; 0 serves nothing)
//! keys = ["env:OPENAI_KEY_A", "env:OPENAI_KEY_B"]   # or key = "...": a value or env:NAME
//! first_byte_timeout_ms = 60000     # optional, as are connect_ and read_timeout_ms
//! inject_stream_usage = true        # optional (default: the global setting)
//! ca_file = "/etc/aura/internal-ca.pem"              # optional, added to the global one
//! headers = { "OpenAI-Organization" = "org-..." }    # optional, sent with every request
//! ```
//! Azure adds `api_version` (required) and `deployments` (model → deployment name; a model
//! not listed is its own deployment's name). Without the array, `upstream_url` is the one
//! upstream and serves every model.

use std::path::PathBuf;
use std::time::Duration;

use super::tables::Fields;
use super::{Secret, Source, UpstreamUrl};
use crate::upstream::select::ModelPattern;

/// The API an upstream speaks, and so how Aura sends it a request and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// Any OpenAI-compatible API (OpenAI, Groq, Together, vLLM, Ollama…): `Authorization:
    /// Bearer`.
    OpenAi,
    /// Azure OpenAI: the deployment in the path, `api-key`, `api-version` in the query.
    Azure,
    /// Anthropic's Messages API: `x-api-key`, `anthropic-version`.
    Anthropic,
}

/// The API a request speaks, and so which upstreams may serve it and the shape of Aura's own
/// errors to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI's: chat completions and every other `/v1` route.
    OpenAi,
    /// Anthropic's Messages (`/v1/messages…`).
    Anthropic,
}

impl UpstreamKind {
    /// The API it serves.
    pub fn api(self) -> Api {
        match self {
            UpstreamKind::OpenAi | UpstreamKind::Azure => Api::OpenAi,
            UpstreamKind::Anthropic => Api::Anthropic,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            UpstreamKind::OpenAi => "openai",
            UpstreamKind::Azure => "azure",
            UpstreamKind::Anthropic => "anthropic",
        }
    }
}

/// An upstream's own timeouts; unset, the global ones apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeoutOverrides {
    pub connect: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub read: Option<Duration>,
}

/// What an Azure OpenAI upstream needs besides its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureSettings {
    pub api_version: String,
    /// Model → deployment name; a model not listed is its deployment's name.
    pub deployments: Vec<(String, String)>,
}

impl AzureSettings {
    pub fn deployment<'m>(&'m self, model: &'m str) -> &'m str {
        self.deployments
            .iter()
            .find(|(m, _)| m == model)
            .map_or(model, |(_, d)| d.as_str())
    }
}

/// One `[[upstreams]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamEntry {
    pub name: String,
    pub url: UpstreamUrl,
    pub kind: UpstreamKind,
    pub models: Vec<ModelPattern>,
    pub weight: u32,
    /// Its own provider keys, balanced; empty: the request's credential goes on (the client's,
    /// or a virtual key's `upstream_key`).
    pub keys: Vec<Secret>,
    pub timeouts: TimeoutOverrides,
    pub inject_stream_usage: Option<bool>,
    /// Sent with every request to it, replacing a client's header of the same name. Values
    /// are held as secrets: an organisation id or a proxy's token may be among them.
    pub headers: Vec<(String, Secret)>,
    /// Extra CA certificates for this upstream, beside `upstream_ca_file`'s.
    pub ca_file: Option<PathBuf>,
    pub azure: Option<AzureSettings>,
}

impl UpstreamEntry {
    /// An upstream serving every model at `url` with the global settings (`upstream_url`).
    pub fn single(name: &str, url: UpstreamUrl) -> UpstreamEntry {
        UpstreamEntry {
            name: name.into(),
            url,
            kind: UpstreamKind::OpenAi,
            models: vec![ModelPattern::any()],
            weight: 1,
            keys: Vec::new(),
            timeouts: TimeoutOverrides::default(),
            inject_stream_usage: None,
            headers: Vec::new(),
            ca_file: None,
            azure: None,
        }
    }
}

/// The most a weight may be: weights are ratios, and a bound keeps their sum far from overflow.
const MAX_WEIGHT: i64 = 10_000;
/// The most upstreams a config may have, and keys an upstream may have: a request's attempts
/// are tracked in 64-bit sets.
pub const MAX_UPSTREAMS: usize = 64;
const MAX_KEYS: usize = 64;

const FIELDS: &[&str] = &[
    "name",
    "url",
    "kind",
    "models",
    "weight",
    "key",
    "keys",
    "connect_timeout_ms",
    "first_byte_timeout_ms",
    "read_timeout_ms",
    "inject_stream_usage",
    "headers",
    "ca_file",
    "api_version",
    "deployments",
];

/// Headers an upstream's `headers` may not set: Aura writes them itself (framing, the host,
/// the connection), or they carry the provider key, which `key`/`keys` set.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "accept-encoding",
    "authorization",
    "api-key",
    "x-api-key",
];

/// The entries of `value` (the file's `upstreams`), every problem reported with its entry.
/// `env` answers keys given as `env:NAME`.
pub fn parse(
    value: &toml::Value,
    env: &dyn Source,
    errors: &mut Vec<String>,
) -> Vec<UpstreamEntry> {
    let Some(entries) = value.as_array() else {
        errors.push("config file: `upstreams` must be an array of tables ([[upstreams]])".into());
        return Vec::new();
    };
    if entries.len() > MAX_UPSTREAMS {
        errors.push(format!(
            "config file: {} upstreams: at most {MAX_UPSTREAMS} are supported",
            entries.len()
        ));
    }
    let mut out: Vec<UpstreamEntry> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(entry) = entry.as_table() else {
            errors.push(format!("config file: `upstreams[{i}]` must be a table"));
            continue;
        };
        let mut f = Fields {
            at: format!("upstreams[{i}]"),
            entry,
            errors,
        };
        f.only(FIELDS);
        let name = f.string("name", true);
        if let Some(name) = &name {
            // Every entry's name counts, a broken entry's too: its fix must not make a clash.
            if !names.insert(name.clone()) {
                f.error(&format!(": the name `{name}` is used twice"));
            }
        }
        if let Some(parsed) = entry_fields(&mut f, name, env) {
            out.push(parsed);
        }
    }
    if !out.is_empty() && out.iter().all(|u| u.weight == 0) {
        errors.push("config file: every upstream has weight 0: none would serve".into());
    }
    out
}

fn entry_fields(f: &mut Fields, name: Option<String>, env: &dyn Source) -> Option<UpstreamEntry> {
    let url = f
        .string("url", true)
        .and_then(|raw| match UpstreamUrl::parse(&raw) {
            Ok(url) => Some(url),
            Err(e) => {
                f.error(&format!(": `url` `{raw}`: {e}"));
                None
            }
        });
    let kind = match f.string("kind", false).as_deref() {
        None | Some("openai") => UpstreamKind::OpenAi,
        Some("azure") => UpstreamKind::Azure,
        Some("anthropic") => UpstreamKind::Anthropic,
        Some(other) => {
            f.error(&format!(
                ": `kind` `{other}` is not openai, azure or anthropic"
            ));
            UpstreamKind::OpenAi
        }
    };
    let models = models(f);
    let weight = match f.entry.get("weight") {
        None => 1,
        Some(toml::Value::Integer(w)) if (0..=MAX_WEIGHT).contains(w) => *w as u32,
        Some(_) => {
            f.error(&format!(
                ": `weight` must be a whole number from 0 to {MAX_WEIGHT}"
            ));
            1
        }
    };
    let keys = keys(f, env);
    let mut millis = |field: &str| f.count(field).map(Duration::from_millis);
    let timeouts = TimeoutOverrides {
        connect: millis("connect_timeout_ms"),
        first_byte: millis("first_byte_timeout_ms"),
        read: millis("read_timeout_ms"),
    };
    let inject_stream_usage = match f.entry.get("inject_stream_usage") {
        None => None,
        Some(toml::Value::Boolean(b)) => Some(*b),
        Some(_) => {
            f.error(": `inject_stream_usage` must be true or false");
            None
        }
    };
    let headers = headers(f);
    let ca_file = f.string("ca_file", false).map(PathBuf::from);
    let api_version = f.string("api_version", false);
    let deployments = string_table(f, "deployments");
    for (model, deployment) in &deployments {
        if !crate::proxy::deployment_name(deployment) {
            f.error(&format!(
                ": `deployments.{model}`: `{deployment}` is not a deployment name (letters, digits, `.`, `_`, `-`)"
            ));
        }
    }
    let azure = match kind {
        UpstreamKind::Azure => match api_version {
            Some(api_version) => Some(AzureSettings {
                api_version,
                deployments,
            }),
            None => {
                f.error("needs `api_version` (kind = \"azure\"), e.g. \"2024-10-21\"");
                None
            }
        },
        _ => {
            if api_version.is_some() || f.entry.contains_key("deployments") {
                f.error(": `api_version` and `deployments` are for kind = \"azure\" only");
            }
            None
        }
    };
    Some(UpstreamEntry {
        name: name?,
        url: url?,
        kind,
        models,
        weight,
        keys,
        timeouts,
        inject_stream_usage,
        headers,
        ca_file,
        azure,
    })
}

fn models(f: &mut Fields) -> Vec<ModelPattern> {
    let Some(list) = f
        .entry
        .get("models")
        .and_then(toml::Value::as_array)
        .filter(|l| !l.is_empty())
    else {
        f.error("needs `models`, a non-empty list of names and globs (\"*\" for every model)");
        return Vec::new();
    };
    let mut models = Vec::new();
    for m in list {
        match m.as_str().map(ModelPattern::parse) {
            Some(Ok(p)) => models.push(p),
            Some(Err(e)) => f.error(&format!(": `models`: {e}")),
            None => f.error(": `models` must hold strings"),
        }
    }
    models
}

/// `key = "..."` or `keys = [...]`, each a key or `env:NAME`. A key that resolves empty or
/// to a value with spaces or control characters is refused: it could not be sent in a header.
fn keys(f: &mut Fields, env: &dyn Source) -> Vec<Secret> {
    let raw: Vec<&toml::Value> = match (f.entry.get("key"), f.entry.get("keys")) {
        (Some(_), Some(_)) => {
            f.error(": give `key` or `keys`, not both");
            return Vec::new();
        }
        (Some(one), None) => vec![one],
        (None, Some(toml::Value::Array(list))) if !list.is_empty() => list.iter().collect(),
        (None, Some(_)) => {
            f.error(": `keys` must be a non-empty list of strings");
            return Vec::new();
        }
        (None, None) => return Vec::new(),
    };
    if raw.len() > MAX_KEYS {
        f.error(&format!(": at most {MAX_KEYS} keys"));
        return Vec::new();
    }
    let mut keys = Vec::new();
    for (n, value) in raw.into_iter().enumerate() {
        let Some(text) = value.as_str().map(str::trim) else {
            f.error(&format!(": key {} must be a string", n + 1));
            continue;
        };
        let key = match text.strip_prefix("env:") {
            Some(var) => match env.get(var.trim()) {
                Some(v) => v.trim().to_string(),
                None => {
                    f.error(&format!(
                        ": key {} names the environment variable `{}`, which is not set",
                        n + 1,
                        var.trim()
                    ));
                    continue;
                }
            },
            None => text.to_string(),
        };
        if key.is_empty()
            || key
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            f.error(&format!(
                ": key {} is empty or has spaces or control characters",
                n + 1
            ));
            continue;
        }
        keys.push(Secret::new(key));
    }
    keys
}

fn headers(f: &mut Fields) -> Vec<(String, Secret)> {
    let mut out = Vec::new();
    for (name, value) in string_table(f, "headers") {
        let lower = name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            f.error(&format!(": `headers`: `{name}` is not a header name"));
        } else if RESERVED_HEADERS.contains(&lower.as_str()) {
            f.error(&format!(
                ": `headers`: `{name}` is Aura's to set (provider keys go in `key` or `keys`)"
            ));
        } else if http::HeaderValue::from_str(&value).is_err() {
            f.error(&format!(
                ": `headers`: the value of `{name}` is not a header value"
            ));
        } else if out
            .iter()
            .any(|(seen, _): &(String, Secret)| *seen == lower)
        {
            f.error(&format!(": `headers`: `{name}` is given twice"));
        } else {
            out.push((lower, Secret::new(value)));
        }
    }
    out
}

/// A table of strings (`headers`, `deployments`), in the file's order.
fn string_table(f: &mut Fields, field: &str) -> Vec<(String, String)> {
    let Some(value) = f.entry.get(field) else {
        return Vec::new();
    };
    let Some(table) = value.as_table() else {
        f.error(&format!(": `{field}` must be a table of strings"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in table {
        match v.as_str() {
            Some(s) => out.push((k.clone(), s.to_string())),
            None => f.error(&format!(": `{field}.{k}` must be a string")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parsed_with(text: &str, env: &HashMap<String, String>) -> (Vec<UpstreamEntry>, Vec<String>) {
        let file: toml::Table = text.parse().unwrap();
        let mut errors = Vec::new();
        let out = parse(&file["upstreams"], env, &mut errors);
        (out, errors)
    }

    fn parsed(text: &str) -> (Vec<UpstreamEntry>, Vec<String>) {
        parsed_with(text, &HashMap::new())
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
        assert_eq!(out[0].kind, UpstreamKind::OpenAi);
        assert!(out[0].keys.is_empty());
        assert!(out[0].models[0].matches("gpt-4o-mini"));
        assert_eq!(out[1].weight, 3);
        assert!(out[1].models[0].matches("anything"));
    }

    #[test]
    fn keys_settings_and_azure_parse() {
        let env = HashMap::from([("GROQ_KEY".to_string(), " gsk-from-env ".to_string())]);
        let (out, errors) = parsed_with(
            r#"
            [[upstreams]]
            name = "groq"
            url = "https://api.groq.com/openai/v1"
            models = ["llama*"]
            keys = ["gsk-literal", "env:GROQ_KEY"]
            connect_timeout_ms = 250
            first_byte_timeout_ms = 9000
            inject_stream_usage = false
            ca_file = "/etc/ca.pem"
            headers = { "X-Team" = "blue" }
            [[upstreams]]
            name = "azure"
            kind = "azure"
            url = "https://res.openai.azure.com/openai"
            models = ["gpt-4o"]
            key = "azure-key"
            api_version = "2024-10-21"
            deployments = { "gpt-4o" = "prod-4o" }
            "#,
            &env,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let groq = &out[0];
        let keys: Vec<&str> = groq.keys.iter().map(Secret::expose).collect();
        assert_eq!(keys, ["gsk-literal", "gsk-from-env"]);
        assert_eq!(groq.timeouts.connect, Some(Duration::from_millis(250)));
        assert_eq!(groq.timeouts.first_byte, Some(Duration::from_millis(9000)));
        assert_eq!(groq.timeouts.read, None);
        assert_eq!(groq.inject_stream_usage, Some(false));
        assert_eq!(groq.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(groq.headers[0].0, "x-team");
        assert_eq!(groq.headers[0].1.expose(), "blue");
        // Keys and header values never show in a debug print.
        let debug = format!("{out:?}");
        for secret in ["gsk-literal", "gsk-from-env", "azure-key", "blue"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        let azure = out[1].azure.as_ref().unwrap();
        assert_eq!(out[1].kind, UpstreamKind::Azure);
        assert_eq!(azure.api_version, "2024-10-21");
        assert_eq!(azure.deployment("gpt-4o"), "prod-4o");
        assert_eq!(azure.deployment("gpt-4o-mini"), "gpt-4o-mini");
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
            secret = "sk-..."
            kind = "gemini"
            key = "k"
            keys = ["k2"]
            [[upstreams]]
            name = "a"
            url = "http://h/v1"
            models = ["ok", " "]
            keys = ["env:NOT_SET", "sk-with space"]
            headers = { "Authorization" = "Bearer x", "bad name" = "v", "x-ok" = 1, "X-Dup" = "a", "x-dup" = "b" }
            first_byte_timeout_ms = 0
            api_version = "2024-10-21"
            [[upstreams]]
            name = "b"
            kind = "azure"
            url = "http://h/openai"
            models = ["*"]
            deployments = { "m" = "../x" }
            "#,
        );
        let all = errors.join("\n");
        for want in [
            "`upstreams[0]`: `url` `ftp://x`",
            "`upstreams[0]` needs `models`",
            "`upstreams[0]`: `weight` must be a whole number",
            "`upstreams[0]` has unknown field `secret`",
            "`upstreams[0]`: `kind` `gemini` is not openai, azure or anthropic",
            "`upstreams[0]`: give `key` or `keys`, not both",
            "`upstreams[1]`: `models`: a model pattern may not be empty",
            "`upstreams[1]`: the name `a` is used twice",
            "`upstreams[1]`: key 1 names the environment variable `NOT_SET`, which is not set",
            "`upstreams[1]`: key 2 is empty or has spaces",
            "`upstreams[1]`: `headers`: `Authorization` is Aura's to set",
            "`upstreams[1]`: `headers`: `bad name` is not a header name",
            "`upstreams[1]`: `headers.x-ok` must be a string",
            "`upstreams[1]`: `headers`: `x-dup` is given twice",
            "`upstreams[2]`: `deployments.m`: `../x` is not a deployment name",
            "`upstreams[1]` `first_byte_timeout_ms` must be a positive integer",
            "`upstreams[1]`: `api_version` and `deployments` are for kind = \"azure\" only",
            "`upstreams[2]` needs `api_version`",
        ] {
            assert!(all.contains(want), "missing `{want}` in:\n{all}");
        }
        assert!(!all.contains("sk-with"), "a key's text in an error: {all}");
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
