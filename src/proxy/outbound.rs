//! The request as one upstream gets it: its path (an Azure deployment's, with `api-version`),
//! the client's headers less what is Aura's to set, the credential the upstream takes in its
//! kind's header, the upstream's own `headers`, and the body. One buffer: one write.

use http::{header, Method};

use crate::config::upstreams::AzureSettings;
use crate::config::{Secret, UpstreamKind};
use crate::error::Error;
use crate::http::{self as h1, RequestHead};
use crate::upstream::Upstream;

/// The `anthropic-version` sent for a client that gave none.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Headers that carry a provider key, or choose what an operator's key bills (OpenAI's
/// organization and project): when Aura sends its own key, the client's never go on. A name
/// is compared with `_` read as `-`: some servers fold one into the other.
const CREDENTIAL_HEADERS: [&str; 6] = [
    "authorization",
    "api-key",
    "x-api-key",
    "openai-organization",
    "openai-project",
    "proxy-authorization",
];

fn is_credential_header(name: &str) -> bool {
    CREDENTIAL_HEADERS.iter().any(|c| {
        c.len() == name.len()
            && c.bytes()
                .zip(name.bytes())
                .all(|(c, n)| c == n || (c == b'-' && n == b'_'))
    })
}

/// What goes upstream as the request's credential.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// The client's own credential header, as sent (passthrough).
    Client,
    /// A key of the upstream's pool, already shaped for its kind's header.
    Pool(&'a [u8]),
    /// A virtual key's `upstream_key`.
    Virtual(&'a Secret),
}

/// Writes the request for `upstream` into `out`: `head` with `body`, for `model` (an Azure
/// upstream's deployment). Fails only on a model no Azure deployment path can name.
pub fn write_request(
    head: &RequestHead,
    body: &[u8],
    credential: Credential<'_>,
    upstream: &Upstream,
    model: Option<&str>,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let rest = head.target.strip_prefix("/v1").unwrap_or(&head.target);
    out.reserve(512 + body.len());
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    match &upstream.azure {
        Some(azure) => azure_target(&upstream.url.base_path, rest, azure, model, out)?,
        None => {
            out.extend_from_slice(upstream.url.base_path.as_bytes());
            out.extend_from_slice(rest.as_bytes());
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    h1::write_header("host", upstream.authority.as_bytes(), out);
    let own_credential = !matches!(credential, Credential::Client);
    for (name, value) in &head.headers {
        // Compressed responses would hide the usage from the scanner: ask for identity.
        if name == header::ACCEPT_ENCODING || h1::is_hop_by_hop(name, &head.headers) {
            continue;
        }
        if own_credential && is_credential_header(name.as_str()) {
            continue;
        }
        if upstream.sets_header(name.as_str()) {
            continue;
        }
        h1::write_header(name.as_str(), value.as_bytes(), out);
    }
    let header_name = match upstream.kind {
        UpstreamKind::OpenAi => "authorization",
        UpstreamKind::Azure => "api-key",
        UpstreamKind::Anthropic => "x-api-key",
    };
    match credential {
        Credential::Client => {}
        Credential::Pool(value) => h1::write_header(header_name, value, out),
        Credential::Virtual(key) if upstream.kind == UpstreamKind::OpenAi => {
            out.extend_from_slice(b"authorization: Bearer ");
            out.extend_from_slice(key.expose().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Credential::Virtual(key) => h1::write_header(header_name, key.expose().as_bytes(), out),
    }
    out.extend_from_slice(upstream.extra_headers());
    // Anthropic refuses a request without its API version: a client that sent none (a plain
    // HTTP client; the SDKs always send one) gets the version its SDKs use.
    let versioned =
        head.headers.contains_key("anthropic-version") || upstream.sets_header("anthropic-version");
    if upstream.kind == UpstreamKind::Anthropic && !versioned {
        h1::write_header("anthropic-version", ANTHROPIC_VERSION.as_bytes(), out);
    }
    let sends_body =
        !body.is_empty() || matches!(head.method, Method::POST | Method::PUT | Method::PATCH);
    if sends_body {
        h1::write_header("content-length", body.len().to_string().as_bytes(), out);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    Ok(())
}

/// Azure OpenAI's target: `{base}/deployments/{deployment}{path}` for a request naming its
/// model (`{base}{path}` otherwise), with `api-version` added to the query unless the client
/// set one.
fn azure_target(
    base: &str,
    rest: &str,
    azure: &AzureSettings,
    model: Option<&str>,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    out.extend_from_slice(base.as_bytes());
    if let Some(model) = model {
        let deployment = azure.deployment(model);
        if !deployment_name(deployment) {
            return Err(Error::model_not_found(model));
        }
        out.extend_from_slice(b"/deployments/");
        out.extend_from_slice(deployment.as_bytes());
    }
    out.extend_from_slice(path.as_bytes());
    out.push(b'?');
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        out.extend_from_slice(query.as_bytes());
        let has_version = query.split('&').any(|pair| {
            pair.split('=')
                .next()
                .is_some_and(|name| name.eq_ignore_ascii_case("api-version"))
        });
        if has_version {
            return Ok(());
        }
        out.push(b'&');
    }
    out.extend_from_slice(b"api-version=");
    out.extend_from_slice(azure.api_version.as_bytes());
    Ok(())
}

/// A name that is one safe path segment: letters, digits, `.`, `_`, `-`, and not only dots
/// (a model `../x` must not reach another path of the operator's Azure resource).
pub fn deployment_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.bytes().all(|b| b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_credentials_and_billing_scopes_are_known_by_either_spelling() {
        for name in [
            "authorization",
            "x-api-key",
            "x_api_key",
            "api_key",
            "openai-organization",
            "openai_project",
            "proxy-authorization",
        ] {
            assert!(is_credential_header(name), "{name}");
        }
        for name in [
            "content-type",
            "x-api-keys",
            "openai-beta",
            "anthropic-version",
        ] {
            assert!(!is_credential_header(name), "{name}");
        }
    }

    fn target(rest: &str, model: Option<&str>) -> Result<String, Error> {
        let azure = AzureSettings {
            api_version: "2024-10-21".into(),
            deployments: vec![("gpt-4o".into(), "prod-4o".into())],
        };
        let mut out = Vec::new();
        azure_target("/openai", rest, &azure, model, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn azure_targets_name_the_deployment_and_the_api_version() {
        assert_eq!(
            target("/chat/completions", Some("gpt-4o")).unwrap(),
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            target("/embeddings?x=1", Some("text-embedding-3-small")).unwrap(),
            "/openai/deployments/text-embedding-3-small/embeddings?x=1&api-version=2024-10-21"
        );
        assert_eq!(
            target("/models?api-version=2025-01-01", None).unwrap(),
            "/openai/models?api-version=2025-01-01"
        );
        assert_eq!(
            target("/models?Api-Version=2025-01-01", None).unwrap(),
            "/openai/models?Api-Version=2025-01-01"
        );
        for evil in ["../keys", "..", "a/b", "a b", "x%2F", ""] {
            assert!(target("/chat/completions", Some(evil)).is_err(), "{evil}");
        }
    }
}
