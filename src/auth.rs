//! The caller's identity: the bearer key of `Authorization: Bearer <key>`, held as a [`KeyId`]
//! (the first 8 bytes of its SHA-256, shown as 16 hex digits) everywhere outside the request
//! itself: budgets, the store, logs and metrics never see the key in clear. `/v1/usage` shows it
//! masked (`sk-...abcd`). Pure L0.

use std::collections::HashMap;
use std::fmt;

use http::{header, HeaderMap};

use crate::config::governance::Limits;
use crate::config::{KeyEntry, KeyMode, Secret};
use crate::error::Error;
use crate::upstream::select::ModelPattern;

/// A map keyed by key ids. A key id is already a SHA-256 prefix, uniformly spread: hashing it
/// again with SipHash (std's default, ~20 ns) buys nothing on the request path.
pub type KeyIdMap<V> = HashMap<KeyId, V, std::hash::BuildHasherDefault<KeyIdHasher>>;

/// Folds the bytes a key id (or an `Option` of one) hashes into one word.
#[derive(Default)]
pub struct KeyIdHasher(u64);

impl std::hash::Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = self.0.rotate_left(29) ^ n as u64;
    }
}

/// A key's stable, non-reversible id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl KeyId {
    pub fn of(key: &str) -> KeyId {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        KeyId::of_digest(digest.as_ref())
    }

    /// From a key's SHA-256.
    fn of_digest(digest: &[u8]) -> KeyId {
        let mut id = [0; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl KeyId {
    /// Its 8 bytes, as the journal keeps them.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }

    pub fn from_bytes(bytes: [u8; 8]) -> KeyId {
        KeyId(bytes)
    }

    /// From its 16 hex digits, as shown.
    pub fn parse(hex: &str) -> Option<KeyId> {
        if hex.len() != 16 {
            return None;
        }
        let mut id = [0; 8];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(KeyId(id))
    }
}

/// A key Aura knows: from the config file's `[keys]`, or made by the admin API.
#[derive(Debug, Clone)]
pub struct Member {
    /// A config key's: its secret's id. An admin-made key's: drawn when it was made.
    pub id: KeyId,
    pub alias: String,
    pub limits: Limits,
    pub team: Option<String>,
    /// Set for a virtual key: what goes upstream instead of the client's key.
    pub upstream_key: Option<Secret>,
    /// Models it may ask for; empty: any.
    pub models: Vec<ModelPattern>,
    /// The upstream its requests go to, by name; none: any serving the model.
    pub upstream: Option<String>,
    pub origin: Origin,
}

/// Where a key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file: its secret is in the file.
    Config,
    /// The admin API: only the SHA-256 of each secret it accepts is known, each with when it
    /// stops being accepted (a rotated-out secret's grace), and when the key expires.
    Admin {
        secrets: Vec<([u8; 32], Option<u64>)>,
        expires_at: Option<u64>,
    },
}

impl Member {
    pub fn from_config(entry: &KeyEntry) -> Member {
        Member {
            id: KeyId::of(entry.key.expose()),
            alias: entry.alias.clone(),
            limits: entry.limits.clone(),
            team: entry.team.clone(),
            upstream_key: entry.upstream_key.clone(),
            models: entry.models.clone(),
            upstream: entry.upstream.clone(),
            origin: Origin::Config,
        }
    }
}

/// The keys Aura knows (the config file's and the admin API's): aliases, the upstream key of
/// each virtual key, what each may ask for.
#[derive(Debug)]
pub struct Directory {
    mode: KeyMode,
    known: HashMap<KeyId, Known>,
    /// Admin-made keys' secrets: SHA-256 → the key, and when the secret stops being accepted.
    secrets: HashMap<[u8; 32], (KeyId, Option<u64>)>,
    /// Every upstream has provider keys of its own: a virtual key needs no `upstream_key`.
    upstreams_keyed: bool,
}

#[derive(Debug)]
struct Known {
    alias: String,
    upstream_key: Option<Secret>,
    models: Vec<ModelPattern>,
    upstream: Option<String>,
    /// Set for an admin-made key (none: the config file's).
    admin: Option<Expiry>,
}

#[derive(Debug, Clone, Copy)]
struct Expiry {
    expires_at: Option<u64>,
}

/// Who is calling, once authorized.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub id: KeyId,
    pub alias: Option<&'a str>,
    /// Set for a virtual key: what goes upstream instead of the client's key.
    pub upstream_key: Option<&'a Secret>,
    /// Models it may ask for; empty: any.
    pub models: &'a [ModelPattern],
    /// The upstream its requests go to; none: any.
    pub upstream: Option<&'a str>,
}

impl Caller<'_> {
    /// Whether the key may ask for `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m.matches(model))
    }
}

impl Directory {
    pub fn new(mode: KeyMode, members: &[Member]) -> Directory {
        let mut secrets = HashMap::new();
        let known = members
            .iter()
            .map(|m| {
                let admin = match &m.origin {
                    Origin::Config => None,
                    Origin::Admin {
                        secrets: accepted,
                        expires_at,
                    } => {
                        for (hash, until) in accepted {
                            secrets.insert(*hash, (m.id, *until));
                        }
                        Some(Expiry {
                            expires_at: *expires_at,
                        })
                    }
                };
                let known = Known {
                    alias: m.alias.clone(),
                    upstream_key: m.upstream_key.clone(),
                    models: m.models.clone(),
                    upstream: m.upstream.clone(),
                    admin,
                };
                (m.id, known)
            })
            .collect();
        Directory {
            mode,
            known,
            secrets,
            upstreams_keyed: false,
        }
    }

    /// Every upstream has provider keys of its own: in virtual mode each configured key is
    /// accepted, with or without an `upstream_key`.
    pub fn upstreams_keyed(mut self, keyed: bool) -> Directory {
        self.upstreams_keyed = keyed;
        self
    }

    /// The caller of a request with these headers at `now` (unix seconds). Passthrough mode
    /// takes any bearer key; virtual mode only known keys that have an upstream key (or any of
    /// them, where every upstream has keys of its own). An admin-made key is accepted by any
    /// of its live secrets until it expires. One credential only: the key billed is exactly
    /// the key forwarded.
    pub fn authorize(&self, headers: &HeaderMap, now: u64) -> Result<Caller<'_>, Error> {
        let key = single_credential(headers)?.ok_or(Error::MissingKey)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut id = KeyId::of_digest(digest.as_ref());
        let mut known = self.known.get(&id).filter(|k| k.admin.is_none());
        if known.is_none() && !self.secrets.is_empty() {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(digest.as_ref());
            if let Some(&(member, until)) = self.secrets.get(&hash) {
                let member_known = self.known.get(&member);
                let expired = until.is_some_and(|until| now >= until)
                    || member_known
                        .and_then(|k| k.admin)
                        .and_then(|a| a.expires_at)
                        .is_some_and(|at| now >= at);
                if expired || member_known.is_none() {
                    return Err(Error::InvalidKey);
                }
                (id, known) = (member, member_known);
            }
        }
        let upstream_key = known.and_then(|k| k.upstream_key.as_ref());
        let served = upstream_key.is_some() || (self.upstreams_keyed && known.is_some());
        let admin_made = known.is_some_and(|k| k.admin.is_some());
        if (self.mode == KeyMode::Virtual || admin_made) && !served {
            return Err(Error::InvalidKey);
        }
        Ok(Caller {
            id,
            alias: known.map(|k| k.alias.as_str()),
            upstream_key,
            models: known.map_or(&[], |k| k.models.as_slice()),
            upstream: known.and_then(|k| k.upstream.as_deref()),
        })
    }

    pub fn mode(&self) -> KeyMode {
        self.mode
    }

    pub fn alias(&self, id: KeyId) -> Option<&str> {
        self.known.get(&id).map(|k| k.alias.as_str())
    }

    /// Where the key comes from: `config` or `admin` (none: Aura does not know it).
    pub fn origin(&self, id: KeyId) -> Option<&'static str> {
        self.known
            .get(&id)
            .map(|k| if k.admin.is_some() { "admin" } else { "config" })
    }

    /// Every known key's alias.
    pub fn aliases(&self) -> HashMap<KeyId, String> {
        self.known
            .iter()
            .map(|(id, k)| (*id, k.alias.clone()))
            .collect()
    }

    /// The id of the key with this alias.
    pub fn by_alias(&self, alias: &str) -> Option<KeyId> {
        self.known
            .iter()
            .find(|(_, k)| k.alias == alias)
            .map(|(id, _)| *id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Headers that carry a credential to some upstream: OpenAI's, Azure's, Anthropic's, and the
/// `_` spellings some servers read as the same.
const CREDENTIAL_HEADERS: [&str; 5] = [
    "authorization",
    "api-key",
    "x-api-key",
    "api_key",
    "x_api_key",
];

/// The request's one credential (None: there is none, or it is not a key): a bearer key, or
/// the key of `x-api-key` (Anthropic's SDKs) or `api-key` (Azure's). Two credentials (two
/// `Authorization` headers, or one with `api-key` or `x-api-key`), or a value that is not one
/// token (`Bearer a, Bearer b`), are refused: an upstream could use another one than the one
/// Aura bills.
pub fn single_credential(headers: &HeaderMap) -> Result<Option<&str>, Error> {
    let count: usize = CREDENTIAL_HEADERS
        .iter()
        .map(|name| headers.get_all(*name).iter().count())
        .sum();
    if count > 1 {
        return Err(Error::AmbiguousCredentials);
    }
    let key = credential(headers);
    if key.is_some_and(|k| k.bytes().any(|b| b.is_ascii_whitespace() || b == b',')) {
        return Err(Error::AmbiguousCredentials);
    }
    Ok(key)
}

/// The key of the request's credential header: `Authorization: Bearer <key>`, `x-api-key` or
/// `api-key` (the first present, in that order); None when absent, empty, or not a bearer key.
pub fn credential(headers: &HeaderMap) -> Option<&str> {
    if headers.contains_key(header::AUTHORIZATION) {
        return bearer(headers);
    }
    ["x-api-key", "api-key"].iter().find_map(|name| {
        let key = headers.get(*name)?.to_str().ok()?.trim();
        (!key.is_empty()).then_some(key)
    })
}

/// The key of `Authorization: Bearer <key>`; None when absent, another scheme, or empty.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The password of `Authorization: Basic <base64(user:password)>` (a browser's own prompt;
/// the console's calls then carry it), if the header is one.
pub fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let (_, password) = decoded.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

/// Standard base64 (RFC 4648, padded or not); none for anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            bits |= value(*c)? << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// `sk-proj-abc…wxyz` → `sk-...wxyz`: the prefix up to the first `-`, and the last 4 characters.
/// Keys too short to hide anything are masked whole.
pub fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "...".to_string();
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    let prefix = key
        .split_once('-')
        .map(|(p, _)| p)
        .filter(|p| p.len() <= 4)
        .unwrap_or("");
    if prefix.is_empty() {
        format!("...{tail}")
    } else {
        format!("{prefix}-...{tail}")
    }
}

/// Compares two secrets in time that depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn key_ids_are_stable_short_and_not_the_key() {
        let id = KeyId::of("sk-test-0123456789");
        assert_eq!(id, KeyId::of("sk-test-0123456789"));
        assert_ne!(id, KeyId::of("sk-test-0123456780"));
        let shown = id.to_string();
        assert_eq!(shown.len(), 16);
        assert!(!shown.contains("sk-"));
        // SHA-256("abc") starts ba7816bf8f01cfea.
        assert_eq!(KeyId::of("abc").to_string(), "ba7816bf8f01cfea");
    }

    #[test]
    fn bearer_keys() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            bearer(&h).map(str::to_owned)
        };
        assert_eq!(with("Bearer sk-1"), Some("sk-1".into()));
        assert_eq!(with("bearer   sk-1 "), Some("sk-1".into()));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn one_credential_per_request() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(
                    http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            h
        };
        assert_eq!(
            single_credential(&headers(&[("authorization", "Bearer sk-1")])).unwrap(),
            Some("sk-1")
        );
        assert_eq!(single_credential(&headers(&[])).unwrap(), None);
        for ambiguous in [
            &[
                ("authorization", "Bearer sk-1"),
                ("authorization", "Bearer sk-2"),
            ][..],
            &[("authorization", "Bearer sk-1"), ("api-key", "sk-2")],
            &[("authorization", "Bearer sk-1"), ("x-api-key", "sk-2")],
            &[("api-key", "sk-1"), ("x-api-key", "sk-2")],
            &[("authorization", "Bearer sk-1, Bearer sk-2")],
            &[("authorization", "Bearer sk-1 sk-2")],
        ] {
            assert!(
                matches!(
                    single_credential(&headers(ambiguous)),
                    Err(Error::AmbiguousCredentials)
                ),
                "{ambiguous:?}"
            );
        }
    }

    #[test]
    fn masks_keep_only_a_prefix_and_the_last_four() {
        assert_eq!(mask("sk-proj-0123456789abcd"), "sk-...abcd");
        assert_eq!(mask("gsk_0123456789abcdef"), "...cdef");
        assert_eq!(mask("short-key"), "...");
    }

    #[test]
    fn key_ids_parse_back_from_their_hex() {
        let id = KeyId::of("sk-x");
        assert_eq!(KeyId::parse(&id.to_string()), Some(id));
        assert_eq!(KeyId::parse("zz"), None);
        assert_eq!(KeyId::parse("zz00000000000000"), None);
    }

    #[test]
    fn directories_authorize_by_mode() {
        let entries = [
            KeyEntry {
                alias: "team-a".into(),
                key: Secret::new("sk-aura-a"),
                limits: Default::default(),
                team: None,
                upstream_key: Some(Secret::new("sk-proj-up")),
                models: Vec::new(),
                upstream: None,
            },
            KeyEntry {
                alias: "team-b".into(),
                key: Secret::new("sk-aura-b"),
                limits: Default::default(),
                team: None,
                upstream_key: None,
                models: Vec::new(),
                upstream: None,
            },
        ];
        let entries: Vec<Member> = entries.iter().map(Member::from_config).collect();
        let with = |key: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
            );
            h
        };
        let virtual_keys = Directory::new(KeyMode::Virtual, &entries);
        let a = with("sk-aura-a");
        let caller = virtual_keys.authorize(&a, 0).unwrap();
        assert_eq!(caller.alias, Some("team-a"));
        assert_eq!(caller.upstream_key.unwrap().expose(), "sk-proj-up");
        let b = with("sk-aura-b");
        assert!(matches!(
            virtual_keys.authorize(&b, 0),
            Err(Error::InvalidKey)
        ));
        let other = with("sk-anything");
        assert!(matches!(
            virtual_keys.authorize(&other, 0),
            Err(Error::InvalidKey)
        ));
        assert!(matches!(
            virtual_keys.authorize(&HeaderMap::new(), 0),
            Err(Error::MissingKey)
        ));
        let passthrough = Directory::new(KeyMode::Passthrough, &entries);
        let caller = passthrough.authorize(&other, 0).unwrap();
        assert_eq!((caller.alias, caller.upstream_key), (None, None));
        assert_eq!(passthrough.authorize(&b, 0).unwrap().alias, Some("team-b"));
        assert_eq!(passthrough.by_alias("team-b"), Some(KeyId::of("sk-aura-b")));
    }

    #[test]
    fn a_browsers_basic_credentials_give_their_password() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            h
        };
        // "admin:s3cret-token" and ":x"
        assert_eq!(
            basic_password(&with("Basic YWRtaW46czNjcmV0LXRva2Vu")).as_deref(),
            Some("s3cret-token")
        );
        assert_eq!(basic_password(&with("basic Ong=")).as_deref(), Some("x"));
        for bad in [
            "Basic",
            "Basic !!!!",
            "Bearer YWRtaW46czNjcmV0",
            "Basic YWRtaW4=",
        ] {
            assert_eq!(basic_password(&with(bad)), None, "{bad}");
        }
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokem"));
        assert!(!constant_time_eq(b"token", b"token2"));
    }
}
