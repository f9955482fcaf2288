//! The caller's identity: the bearer key of `Authorization: Bearer <key>`, held as a [`KeyId`]
//! (the first 8 bytes of its SHA-256, shown as 16 hex digits) everywhere outside the request
//! itself: budgets, the store, logs and metrics never see the key in clear. `/v1/usage` shows it
//! masked (`sk-...abcd`). Pure L0.

use std::fmt;

use http::{header, HeaderMap};

/// A key's stable, non-reversible id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl KeyId {
    pub fn of(key: &str) -> KeyId {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut id = [0; 8];
        id.copy_from_slice(&digest.as_ref()[..8]);
        KeyId(id)
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

/// The key of `Authorization: Bearer <key>`; None when absent, another scheme, or empty.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
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
    fn masks_keep_only_a_prefix_and_the_last_four() {
        assert_eq!(mask("sk-proj-0123456789abcd"), "sk-...abcd");
        assert_eq!(mask("gsk_0123456789abcdef"), "...cdef");
        assert_eq!(mask("short-key"), "...");
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokem"));
        assert!(!constant_time_eq(b"token", b"token2"));
    }
}
