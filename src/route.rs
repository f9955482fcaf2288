//! Routing on one canonical path. Billing must never depend on a spelling: a request is routed
//! on the canonical form of its path, and that form is what goes upstream. Canonical means:
//! percent-encoded unreserved characters decoded, other escapes in upper-case hex, repeated
//! slashes collapsed, a trailing slash dropped, dot segments resolved, and the literal segments
//! of a known route in its own letter case (an upstream may match paths without regard to
//! case; ids keep theirs). What cannot be made canonical is refused: an encoded `/` or `\`,
//! a `;`, a control character, a bad escape, a path that climbs above the root or out of `/v1`.
//! Pure (L0): no IO.
//!
//! Every `/v1` route is in [`API`] with how it is billed; a route not in it that could cost
//! money is unpriced (refused in virtual mode unless the operator allows it).

use http::Method;

/// How a request billed by its usage is bounded before it is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Billable {
    /// Answers with completion tokens: chat completions, completions, responses.
    Generates,
    /// Prompt tokens only: embeddings.
    Embeds,
}

/// A request target made canonical: the path routed and forwarded, and the query as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: String,
    pub query: Option<String>,
}

impl Target {
    /// Path and query, as the request line carries them.
    pub fn origin_form(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Why a target cannot be made canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the path must start with /")]
    NotAPath,
    #[error("the path has an invalid percent escape")]
    BadEscape,
    #[error("the path has an encoded / or \\")]
    EncodedSeparator,
    #[error("the path has a character Aura does not route (a ; \\ # or a control character)")]
    Forbidden,
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path leaves /v1")]
    LeavesV1,
}

/// The canonical form of `target` (origin form).
pub fn canonical(target: &str) -> Result<Target, TargetError> {
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    if !raw_path.starts_with('/') {
        return Err(TargetError::NotAPath);
    }
    let decoded = decode_unreserved(raw_path)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or(TargetError::AboveRoot)?;
            }
            s => segments.push(s),
        }
    }
    let enters_v1 = decoded
        .trim_start_matches('/')
        .split('/')
        .next()
        .is_some_and(|first| first.eq_ignore_ascii_case("v1"));
    let in_v1 = segments
        .first()
        .is_some_and(|first| first.eq_ignore_ascii_case("v1"));
    if enters_v1 && !in_v1 {
        return Err(TargetError::LeavesV1);
    }
    let mut path = String::with_capacity(decoded.len());
    if in_v1 {
        path.push_str("/v1");
        let rest = &segments[1..];
        match known_spelling(rest) {
            Some(spelled) => {
                for s in spelled {
                    path.push('/');
                    path.push_str(&s);
                }
            }
            None => {
                for s in rest {
                    path.push('/');
                    path.push_str(s);
                }
            }
        }
    } else {
        for s in &segments {
            path.push('/');
            path.push_str(s);
        }
        if path.is_empty() {
            path.push('/');
        }
    }
    Ok(Target { path, query })
}

/// `%XX` of an unreserved character becomes the character; other escapes stay, in upper-case
/// hex; an escape of `/`, `\`, `%` or a control character, a bad escape, and a raw `;`, `\`,
/// `#` or control character are refused.
fn decode_unreserved(path: &str) -> Result<String, TargetError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(TargetError::BadEscape)?;
                let value = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(TargetError::BadEscape)?;
                match value {
                    b'/' | b'\\' => return Err(TargetError::EncodedSeparator),
                    v if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') => {
                        out.push(char::from(v))
                    }
                    v if v < 0x20 || v == 0x7f || v == b'%' || v == b';' => {
                        return Err(TargetError::Forbidden)
                    }
                    v => out.push_str(&format!("%{v:02X}")),
                }
                i += 3;
            }
            b';' | b'\\' | b'#' => return Err(TargetError::Forbidden),
            b if b < 0x20 || b == 0x7f => return Err(TargetError::Forbidden),
            _ => {
                // httparse keeps the target to visible ASCII; anything else is copied as is.
                out.push(char::from(b));
                i += 1;
                continue;
            }
        }
    }
    Ok(out)
}

/// How a `/v1` route is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Billing {
    /// Chat completions: the body is rewritten for the usage event (proxy.rs).
    Chat,
    /// By the usage the answer reports (completions, responses, embeddings).
    Usage(Billable),
    /// Images: by the answer's usage (gpt-image) or per image, `n` of them.
    Images,
    /// Text to speech: per character of `input`.
    Speech,
    /// Transcriptions and translations: by the answer's usage (tokens or seconds).
    Transcription,
    /// Costs nothing (reads, deletes, uploads, moderations, objects that do no work).
    Free,
    /// Costs money (now or later: batches, fine-tuning, runs, realtime sessions, storage) and
    /// Aura cannot price it: refused in virtual mode unless allowed.
    Unpriced,
}

impl Billing {
    pub fn label(self) -> &'static str {
        match self {
            Billing::Chat => "chat_completions",
            Billing::Usage(_) => "usage",
            Billing::Images => "images",
            Billing::Speech => "speech",
            Billing::Transcription => "transcription",
            Billing::Free => "free",
            Billing::Unpriced => "unpriced",
        }
    }
}

/// A `/v1` route: its method, its path after `/v1` (`*` stands for one id segment), and how
/// it is billed. Routes not listed: GET/HEAD/DELETE/OPTIONS are free, anything else unpriced.
pub const API: &[(&str, &str, Billing)] = &[
    ("POST", "/chat/completions", Billing::Chat),
    ("POST", "/completions", Billing::Usage(Billable::Generates)),
    ("POST", "/responses", Billing::Usage(Billable::Generates)),
    (
        "POST",
        "/responses/compact",
        Billing::Usage(Billable::Generates),
    ),
    ("POST", "/embeddings", Billing::Usage(Billable::Embeds)),
    ("POST", "/images/generations", Billing::Images),
    ("POST", "/images/edits", Billing::Images),
    ("POST", "/images/variations", Billing::Images),
    ("POST", "/audio/speech", Billing::Speech),
    ("POST", "/audio/transcriptions", Billing::Transcription),
    ("POST", "/audio/translations", Billing::Transcription),
    ("POST", "/moderations", Billing::Free),
    ("POST", "/responses/input_tokens", Billing::Free),
    ("POST", "/responses/*/cancel", Billing::Free),
    ("POST", "/files", Billing::Free),
    ("POST", "/uploads", Billing::Free),
    ("POST", "/uploads/*/parts", Billing::Free),
    ("POST", "/uploads/*/complete", Billing::Free),
    ("POST", "/uploads/*/cancel", Billing::Free),
    ("POST", "/batches/*/cancel", Billing::Free),
    ("POST", "/fine_tuning/jobs/*/cancel", Billing::Free),
    ("POST", "/fine_tuning/jobs/*/pause", Billing::Free),
    ("POST", "/assistants", Billing::Free),
    ("POST", "/assistants/*", Billing::Free),
    ("POST", "/threads", Billing::Free),
    ("POST", "/threads/*", Billing::Free),
    ("POST", "/threads/*/messages", Billing::Free),
    ("POST", "/threads/*/messages/*", Billing::Free),
    ("POST", "/threads/*/runs/*/cancel", Billing::Free),
    ("POST", "/conversations", Billing::Free),
    ("POST", "/conversations/*", Billing::Free),
    ("POST", "/conversations/*/items", Billing::Free),
    ("POST", "/chat/completions/*", Billing::Free),
    ("POST", "/batches", Billing::Unpriced),
    ("POST", "/fine_tuning/jobs", Billing::Unpriced),
    ("POST", "/fine_tuning/jobs/*/resume", Billing::Unpriced),
    ("POST", "/threads/runs", Billing::Unpriced),
    ("POST", "/threads/*/runs", Billing::Unpriced),
    (
        "POST",
        "/threads/*/runs/*/submit_tool_outputs",
        Billing::Unpriced,
    ),
    ("POST", "/vector_stores", Billing::Unpriced),
    ("POST", "/realtime/sessions", Billing::Unpriced),
    ("POST", "/realtime/client_secrets", Billing::Unpriced),
    (
        "POST",
        "/realtime/transcription_sessions",
        Billing::Unpriced,
    ),
    ("POST", "/containers", Billing::Unpriced),
    ("POST", "/videos", Billing::Unpriced),
    // Reads of a model list and of objects: free, and listed for their spelling.
    ("GET", "/models", Billing::Free),
    ("GET", "/models/*", Billing::Free),
    ("GET", "/files", Billing::Free),
    ("GET", "/files/*", Billing::Free),
    ("GET", "/files/*/content", Billing::Free),
    ("GET", "/batches", Billing::Free),
    ("GET", "/batches/*", Billing::Free),
    ("GET", "/responses/*", Billing::Free),
    ("GET", "/fine_tuning/jobs", Billing::Free),
    ("GET", "/fine_tuning/jobs/*", Billing::Free),
    // A WebSocket session (GET + Upgrade) costs money; Aura does not forward upgrades.
    ("GET", "/realtime", Billing::Unpriced),
];

/// The most specific route of [`API`] (most literal segments) that `segments` match, of
/// `method` (any method when none); literals compared without regard to case when `any_case`.
fn best_match(
    method: Option<&Method>,
    segments: &[&str],
    any_case: bool,
) -> Option<&'static (&'static str, &'static str, Billing)> {
    API.iter()
        .filter(|(m, _, _)| method.is_none_or(|method| *m == method.as_str()))
        .filter(|(_, pattern, _)| {
            let parts: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
            parts.len() == segments.len()
                && parts
                    .iter()
                    .zip(segments)
                    .all(|(p, s)| *p == "*" || (any_case && p.eq_ignore_ascii_case(s)) || p == s)
        })
        .max_by_key(|(_, pattern, _)| pattern.split('/').filter(|p| *p != "*").count())
}

/// The segments after `/v1` in the spelling of the known route they match (literals as the
/// route has them, ids as sent); none if no route has this shape.
fn known_spelling(segments: &[&str]) -> Option<Vec<String>> {
    let (_, pattern, _) = best_match(None, segments, true)?;
    let parts = pattern.trim_start_matches('/').split('/');
    Some(
        parts
            .zip(segments)
            .map(|(p, s)| {
                if p == "*" {
                    s.to_string()
                } else {
                    p.to_string()
                }
            })
            .collect(),
    )
}

/// How `method` on the canonical `/v1` path `path` is billed.
pub fn billing(method: &Method, path: &str) -> Billing {
    let rest = path.strip_prefix("/v1").unwrap_or(path);
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match best_match(Some(method), &segments, false) {
        Some((_, _, billing)) => *billing,
        None if matches!(
            *method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
        ) =>
        {
            Billing::Free
        }
        None => Billing::Unpriced,
    }
}

/// Whether Aura forwards `method` at all: the methods of RFC 9110 an API uses. Anything else
/// (an extension method, `post` in lower case, TRACE, CONNECT) could be read by an upstream as
/// a billed call Aura did not route.
pub fn forwardable(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_billed_path_is_the_canonical_path() {
        let chat = "/v1/chat/completions";
        for spelling in [
            "/v1/chat/completions",
            "//v1/chat/completions",
            "/v1//chat///completions",
            "/v1/chat/completions/",
            "/v1/./chat/completions",
            "/v1/chat/./completions/.",
            "/v1/x/../chat/completions",
            "/v1/chat/%63ompletions",
            "/v1/%63%68%61%74/completions",
            "/%76%31/chat/completions",
            "/V1/Chat/Completions",
            "/v1/CHAT/COMPLETIONS/",
        ] {
            let target = canonical(spelling).unwrap_or_else(|e| panic!("{spelling}: {e}"));
            assert_eq!(target.path, chat, "{spelling}");
            assert_eq!(
                billing(&Method::POST, &target.path),
                Billing::Chat,
                "{spelling}"
            );
        }
        let t = canonical("/v1/Embeddings?api-version=2024").unwrap();
        assert_eq!(t.origin_form(), "/v1/embeddings?api-version=2024");
    }

    #[test]
    fn what_cannot_be_made_canonical_is_refused() {
        let cases = [
            ("/v1/chat%2Fcompletions", TargetError::EncodedSeparator),
            ("/v1/chat%2fcompletions", TargetError::EncodedSeparator),
            ("/v1/chat%5Ccompletions", TargetError::EncodedSeparator),
            ("/v1/chat/completions;x=1", TargetError::Forbidden),
            ("/v1/chat\\completions", TargetError::Forbidden),
            ("/v1/chat/completions%00", TargetError::Forbidden),
            ("/v1/chat/completions%3B", TargetError::Forbidden),
            ("/v1/chat/completions%", TargetError::BadEscape),
            ("/v1/chat/completions%zz", TargetError::BadEscape),
            ("/v1/../x", TargetError::LeavesV1),
            ("/v1/..", TargetError::LeavesV1),
            ("/v1/%2e%2e/admin/keys", TargetError::LeavesV1),
            ("/../v1/chat/completions", TargetError::AboveRoot),
            ("*", TargetError::NotAPath),
        ];
        for (target, want) in cases {
            assert_eq!(canonical(target), Err(want), "{target}");
        }
    }

    #[test]
    fn ids_keep_their_case_and_other_escapes_are_normalised() {
        let t = canonical("/V1/FILES/file-AbC123/CONTENT").unwrap();
        assert_eq!(t.path, "/v1/files/file-AbC123/content");
        let t = canonical("/v1/threads/thread_XyZ/Runs").unwrap();
        assert_eq!(t.path, "/v1/threads/thread_XyZ/runs");
        assert_eq!(billing(&Method::POST, &t.path), Billing::Unpriced);
        // The most specific route wins: `runs` is a literal, not a thread id.
        let t = canonical("/v1/Threads/RUNS").unwrap();
        assert_eq!(t.path, "/v1/threads/runs");
        assert_eq!(billing(&Method::POST, &t.path), Billing::Unpriced);
        assert_eq!(
            canonical("/v1/files/a%3ab").unwrap().path,
            "/v1/files/a%3Ab"
        );
        assert_eq!(canonical("/healthz/").unwrap().path, "/healthz");
        assert_eq!(canonical("/").unwrap().path, "/");
    }

    #[test]
    fn routes_are_billed_by_method_and_shape() {
        let cases = [
            (
                Method::POST,
                "/v1/embeddings",
                Billing::Usage(Billable::Embeds),
            ),
            (
                Method::POST,
                "/v1/responses",
                Billing::Usage(Billable::Generates),
            ),
            (Method::POST, "/v1/images/generations", Billing::Images),
            (Method::POST, "/v1/audio/speech", Billing::Speech),
            (
                Method::POST,
                "/v1/audio/translations",
                Billing::Transcription,
            ),
            (Method::POST, "/v1/moderations", Billing::Free),
            (Method::POST, "/v1/batches", Billing::Unpriced),
            (Method::POST, "/v1/batches/batch_1/cancel", Billing::Free),
            (Method::POST, "/v1/fine_tuning/jobs", Billing::Unpriced),
            (Method::POST, "/v1/something/new", Billing::Unpriced),
            (Method::PUT, "/v1/files", Billing::Unpriced),
            (Method::GET, "/v1/models", Billing::Free),
            (Method::GET, "/v1/anything/else", Billing::Free),
            (Method::DELETE, "/v1/files/file-1", Billing::Free),
            (Method::GET, "/v1/realtime", Billing::Unpriced),
        ];
        for (method, path, want) in cases {
            assert_eq!(billing(&method, path), want, "{method} {path}");
        }
        assert!(forwardable(&Method::POST));
        for odd in ["post", "TRACE", "CONNECT", "PROPFIND"] {
            let method = Method::from_bytes(odd.as_bytes()).unwrap();
            assert!(!forwardable(&method), "{odd}");
        }
    }

    #[test]
    fn every_route_pattern_is_canonical_itself() {
        for (_, pattern, _) in API {
            let path = format!("/v1{}", pattern.replace('*', "id-1"));
            assert_eq!(canonical(&path).unwrap().path, path);
        }
    }
}
