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

use std::collections::HashMap;

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
        // The literal segments of a known route in its spelling; ids, and unknown paths, as sent.
        let route = best_match(None, rest, true);
        for (i, s) in rest.iter().enumerate() {
            path.push('/');
            match route.map(|r| r.parts[i]) {
                Some(literal) if literal != "*" => path.push_str(literal),
                _ => path.push_str(s),
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
    // The common case: nothing to decode or refuse.
    if !bytes
        .iter()
        .any(|&b| matches!(b, b'%' | b';' | b'\\' | b'#') || b < 0x20 || b == 0x7f)
    {
        return Ok(path.to_string());
    }
    // Bytes, copied as they are (a UTF-8 path stays the same text) or decoded to ASCII.
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
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
                        out.push(v)
                    }
                    v if v < 0x20 || v == 0x7f || v == b'%' || v == b';' => {
                        return Err(TargetError::Forbidden)
                    }
                    v => out.extend_from_slice(format!("%{v:02X}").as_bytes()),
                }
                i += 3;
            }
            b';' | b'\\' | b'#' => return Err(TargetError::Forbidden),
            b if b < 0x20 || b == 0x7f => return Err(TargetError::Forbidden),
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only whole characters of a `str` were copied, and ASCII added: still UTF-8.
    String::from_utf8(out).map_err(|_| TargetError::Forbidden)
}

/// How a `/v1` route is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Billing {
    /// Chat completions: the body is rewritten for the usage event (proxy.rs).
    Chat,
    /// Anthropic's Messages: billed by the usage of its `message_start` and `message_delta`
    /// events, or of its JSON answer (usage/anthropic.rs).
    Messages,
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
            Billing::Messages => "messages",
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
pub const API: &[(Method, &str, Billing)] = &[
    (Method::POST, "/chat/completions", Billing::Chat),
    // Anthropic's Messages API, on `anthropic` upstreams (proxy.rs); counting tokens is free.
    (Method::POST, "/messages", Billing::Messages),
    (Method::POST, "/messages/count_tokens", Billing::Free),
    (
        Method::POST,
        "/completions",
        Billing::Usage(Billable::Generates),
    ),
    (
        Method::POST,
        "/responses",
        Billing::Usage(Billable::Generates),
    ),
    (
        Method::POST,
        "/responses/compact",
        Billing::Usage(Billable::Generates),
    ),
    (
        Method::POST,
        "/embeddings",
        Billing::Usage(Billable::Embeds),
    ),
    (Method::POST, "/images/generations", Billing::Images),
    (Method::POST, "/images/edits", Billing::Images),
    (Method::POST, "/images/variations", Billing::Images),
    (Method::POST, "/audio/speech", Billing::Speech),
    (
        Method::POST,
        "/audio/transcriptions",
        Billing::Transcription,
    ),
    (Method::POST, "/audio/translations", Billing::Transcription),
    (Method::POST, "/moderations", Billing::Free),
    (Method::POST, "/responses/input_tokens", Billing::Free),
    (Method::POST, "/responses/*/cancel", Billing::Free),
    (Method::POST, "/files", Billing::Free),
    (Method::POST, "/uploads", Billing::Free),
    (Method::POST, "/uploads/*/parts", Billing::Free),
    (Method::POST, "/uploads/*/complete", Billing::Free),
    (Method::POST, "/uploads/*/cancel", Billing::Free),
    (Method::POST, "/batches/*/cancel", Billing::Free),
    (Method::POST, "/fine_tuning/jobs/*/cancel", Billing::Free),
    (Method::POST, "/fine_tuning/jobs/*/pause", Billing::Free),
    (Method::POST, "/assistants", Billing::Free),
    (Method::POST, "/assistants/*", Billing::Free),
    (Method::POST, "/threads", Billing::Free),
    (Method::POST, "/threads/*", Billing::Free),
    (Method::POST, "/threads/*/messages", Billing::Free),
    (Method::POST, "/threads/*/messages/*", Billing::Free),
    (Method::POST, "/threads/*/runs/*/cancel", Billing::Free),
    (Method::POST, "/conversations", Billing::Free),
    (Method::POST, "/conversations/*", Billing::Free),
    (Method::POST, "/conversations/*/items", Billing::Free),
    (Method::POST, "/chat/completions/*", Billing::Free),
    (Method::POST, "/batches", Billing::Unpriced),
    (Method::POST, "/fine_tuning/jobs", Billing::Unpriced),
    (
        Method::POST,
        "/fine_tuning/jobs/*/resume",
        Billing::Unpriced,
    ),
    (Method::POST, "/threads/runs", Billing::Unpriced),
    (Method::POST, "/threads/*/runs", Billing::Unpriced),
    (
        Method::POST,
        "/threads/*/runs/*/submit_tool_outputs",
        Billing::Unpriced,
    ),
    (Method::POST, "/vector_stores", Billing::Unpriced),
    (Method::POST, "/realtime/sessions", Billing::Unpriced),
    (Method::POST, "/realtime/client_secrets", Billing::Unpriced),
    (
        Method::POST,
        "/realtime/transcription_sessions",
        Billing::Unpriced,
    ),
    (Method::POST, "/containers", Billing::Unpriced),
    (Method::POST, "/videos", Billing::Unpriced),
    // Reads of a model list and of objects: free, and listed for their spelling.
    (Method::GET, "/models", Billing::Free),
    (Method::GET, "/models/*", Billing::Free),
    (Method::GET, "/files", Billing::Free),
    (Method::GET, "/files/*", Billing::Free),
    (Method::GET, "/files/*/content", Billing::Free),
    (Method::GET, "/batches", Billing::Free),
    (Method::GET, "/batches/*", Billing::Free),
    (Method::GET, "/responses/*", Billing::Free),
    (Method::GET, "/fine_tuning/jobs", Billing::Free),
    (Method::GET, "/fine_tuning/jobs/*", Billing::Free),
    // A WebSocket session (GET + Upgrade) costs money; Aura does not forward upgrades.
    (Method::GET, "/realtime", Billing::Unpriced),
];

/// A route of [`API`], split once: routing runs on every request.
struct Route {
    method: Method,
    /// The segments after `/v1`; `*` is one id.
    parts: Vec<&'static str>,
    /// How many are not `*`: the most literal route that matches wins.
    literals: usize,
    billing: Billing,
}

/// The routes by their first segment (a literal in every route).
static ROUTES: std::sync::LazyLock<HashMap<&'static str, Vec<Route>>> =
    std::sync::LazyLock::new(|| {
        let mut routes: HashMap<&'static str, Vec<Route>> = HashMap::new();
        for (method, pattern, billing) in API {
            let parts: Vec<&'static str> = pattern.trim_start_matches('/').split('/').collect();
            routes.entry(parts[0]).or_default().push(Route {
                method: method.clone(),
                literals: parts.iter().filter(|p| **p != "*").count(),
                parts,
                billing: *billing,
            });
        }
        routes
    });

/// Longer than any route's first segment.
const MAX_FIRST_SEGMENT: usize = 32;

/// More segments than any route has: such a path matches none.
const MAX_SEGMENTS: usize = 8;

/// The segments of `rest` (a path after `/v1`, from its `/`), on the stack; none when there are
/// more than any route has.
fn segments_of(rest: &str) -> Option<([&str; MAX_SEGMENTS], usize)> {
    let mut segments = [""; MAX_SEGMENTS];
    let mut n = 0;
    for segment in rest.trim_start_matches('/').split('/') {
        *segments.get_mut(n)? = segment;
        n += 1;
    }
    Some((segments, n))
}

/// The most specific route of [`API`] (most literal segments) that `segments` match, of
/// `method` (any method when none); literals compared without regard to case when `any_case`.
fn best_match(
    method: Option<&Method>,
    segments: &[&str],
    any_case: bool,
) -> Option<&'static Route> {
    let first = *segments.first()?;
    let mut lower = [0u8; MAX_FIRST_SEGMENT];
    let first = if any_case {
        let lower = lower.get_mut(..first.len())?;
        lower.copy_from_slice(first.as_bytes());
        lower.make_ascii_lowercase();
        std::str::from_utf8(lower).ok()?
    } else {
        first
    };
    ROUTES
        .get(first)?
        .iter()
        .filter(|route| {
            let part_matches =
                |p: &str, s: &str| p == "*" || p == s || (any_case && p.eq_ignore_ascii_case(s));
            route.parts.len() == segments.len()
                && method.is_none_or(|method| route.method == method)
                && route
                    .parts
                    .iter()
                    .zip(segments)
                    .skip(1)
                    .all(|(p, s)| part_matches(p, s))
        })
        .max_by_key(|route| route.literals)
}

/// How `method` on the canonical `/v1` path `path` is billed.
pub fn billing(method: &Method, path: &str) -> Billing {
    let rest = path.strip_prefix("/v1").unwrap_or(path);
    let matched = segments_of(rest)
        .and_then(|(segments, n)| best_match(Some(method), &segments[..n], false))
        .map(|route| route.billing);
    match matched {
        Some(billing) => billing,
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
/// The methods Aura forwards (its `Allow` for any other): never TRACE or CONNECT.
pub const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

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
        // A UTF-8 id is the same text whether or not the path holds an escape.
        assert_eq!(canonical("/v1/files/é").unwrap().path, "/v1/files/é");
        assert_eq!(canonical("/v1/files/é%41").unwrap().path, "/v1/files/éA");
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
            // Within what the index handles (a longer one would never be matched).
            let parts: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
            assert!(parts.len() <= MAX_SEGMENTS, "{pattern}");
            assert!(parts[0].len() <= MAX_FIRST_SEGMENT, "{pattern}");
            assert!(
                parts[0] != "*",
                "{pattern}: the index needs a literal first segment"
            );
            let path = format!("/v1{}", pattern.replace('*', "id-1"));
            assert_eq!(canonical(&path).unwrap().path, path);
        }
    }
}
