//! A key made by the admin API, as the keyring stores it: never its secret, only the SHA-256
//! of each secret it accepts (two during a rotation's grace), each with when it stops being
//! accepted. Its id is drawn at random when it is made and never changes, so its spend and
//! limits stay with it across rotations.

use serde::{Deserialize, Serialize};

use crate::auth::{KeyId, Member, Origin};
use crate::config::governance::{Limits, Rates, Window};
use crate::config::{Period, Secret, Source};
use crate::upstream::select::ModelPattern;

/// A runtime key's secret: `sk-aura-` and 48 hex digits (192 random bits).
pub const SECRET_PREFIX: &str = "sk-aura-";
/// Free-form metadata is kept small: it travels to every node.
pub const MAX_METADATA_BYTES: usize = 4096;
/// A key accepts at most this many secrets at once (the newest, and those in their grace).
pub const MAX_SECRETS: usize = 4;

/// Read leniently (a field a newer Aura added is ignored): the admin API checks what it takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// 16 hex digits: the key's id, drawn at random when it was made.
    pub id: String,
    /// Bumped by every change: a change is written only over the revision it was made from.
    #[serde(default)]
    pub rev: u64,
    pub alias: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Models it may ask for (names or globs); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// The upstream its requests go to (by name); none: any serving the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// `env:NAME`: the provider key its requests go upstream with, read from each node's
    /// environment (a provider key is never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<WindowSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    /// Unix seconds after which it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub secrets: Vec<SecretHash>,
    pub created_at: u64,
}

/// One calendar budget, as the admin API takes it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// `none`, `daily` or `monthly`.
    pub period: PeriodName,
    pub limit_dollars: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeriodName {
    None,
    Daily,
    Monthly,
}

impl PeriodName {
    pub fn period(self) -> Period {
        match self {
            PeriodName::None => Period::Never,
            PeriodName::Daily => Period::Daily,
            PeriodName::Monthly => Period::Monthly,
        }
    }
}

/// A secret the key accepts, by its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretHash {
    /// 64 hex digits.
    pub sha256: String,
    /// Unix seconds after which it is refused (a rotated-out secret's grace); none: until
    /// rotated or revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<u64>,
}

impl KeyRecord {
    /// A key with only its id, one secret (by its hash) and when it was made.
    pub fn new(id: KeyId, sha256: String, created_at: u64) -> KeyRecord {
        KeyRecord {
            id: id.to_string(),
            rev: 0,
            alias: String::new(),
            team: None,
            models: Vec::new(),
            upstream: None,
            upstream_key: None,
            budgets: Vec::new(),
            rpm: None,
            tpm: None,
            max_concurrent: None,
            expires_at: None,
            metadata: serde_json::Map::new(),
            secrets: vec![SecretHash {
                sha256,
                valid_until: None,
            }],
            created_at,
        }
    }

    pub fn key_id(&self) -> Option<KeyId> {
        KeyId::parse(&self.id)
    }

    /// Its budgets and rate limits, as the config's keys have them.
    pub fn limits(&self) -> Limits {
        Limits {
            windows: self
                .budgets
                .iter()
                .map(|w| Window {
                    period: Some(w.period.period()),
                    limit_dollars: w.limit_dollars,
                })
                .collect(),
            rates: Rates {
                rpm: self.rpm,
                tpm: self.tpm,
                max_concurrent: self.max_concurrent,
            },
        }
    }

    /// The key as the directory and governance take it. Its upstream key is read from this
    /// node's environment: a node without the variable cannot serve the key.
    pub fn member(&self, env: &dyn Source) -> Result<Member, String> {
        let id = self.key_id().ok_or("its id is not 16 hex digits")?;
        let upstream_key = match &self.upstream_key {
            None => None,
            Some(reference) => {
                let name = reference
                    .strip_prefix("env:")
                    .ok_or("its upstream_key is not `env:NAME`")?;
                let value = env
                    .get(name)
                    .filter(|v| !v.trim().is_empty())
                    .ok_or_else(|| format!("this node's environment has no {name}"))?;
                Some(Secret::new(value.trim()))
            }
        };
        let models = self
            .models
            .iter()
            .map(|m| ModelPattern::parse(m).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let secrets = self
            .secrets
            .iter()
            .map(|s| {
                parse_sha256(&s.sha256)
                    .map(|hash| (hash, s.valid_until))
                    .ok_or("a secret hash is not 64 hex digits")
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Member {
            id,
            alias: self.alias.clone(),
            limits: self.limits(),
            team: self.team.clone(),
            upstream_key,
            models,
            upstream: self.upstream.clone(),
            origin: Origin::Admin {
                secrets,
                expires_at: self.expires_at,
            },
        })
    }

    /// Whether the key is past its expiry at `now`.
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// The secrets it accepts at `now`.
    pub fn live_secrets(&self, now: u64) -> impl Iterator<Item = &SecretHash> {
        self.secrets
            .iter()
            .filter(move |s| s.valid_until.is_none_or(|until| now < until))
    }
}

/// A new secret: `sk-aura-` and 48 random hex digits, and its SHA-256 (hex).
pub fn new_secret() -> Result<(String, String), ring::error::Unspecified> {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)?;
    let secret = format!("{SECRET_PREFIX}{}", hex(&bytes));
    let hash = sha256_hex(&secret);
    Ok((secret, hash))
}

/// A new key id: 8 random bytes.
pub fn new_id() -> Result<KeyId, ring::error::Unspecified> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)?;
    Ok(KeyId::from_bytes(bytes))
}

pub fn sha256_hex(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// The 32 bytes of a SHA-256 written as 64 hex digits.
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_stored_only_as_its_hash() {
        let (secret, hash) = new_secret().unwrap();
        assert!(secret.starts_with(SECRET_PREFIX));
        assert_eq!(secret.len(), SECRET_PREFIX.len() + 48);
        assert_eq!(hash, sha256_hex(&secret));
        assert!(!hash.contains(&secret[SECRET_PREFIX.len()..]));
        let bytes = parse_sha256(&hash).unwrap();
        assert_eq!(
            bytes.as_ref(),
            ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref()
        );
        assert_ne!(new_secret().unwrap().0, secret);
        assert!(parse_sha256("zz").is_none());
    }

    #[test]
    fn records_read_back_as_written_and_past_fields_they_do_not_know() {
        let record = KeyRecord {
            id: "00112233445566ff".into(),
            rev: 3,
            alias: "alice".into(),
            team: Some("research".into()),
            models: vec!["gpt-4o*".into()],
            upstream: None,
            upstream_key: Some("env:OPENAI_KEY".into()),
            budgets: vec![WindowSpec {
                period: PeriodName::Daily,
                limit_dollars: 5.0,
            }],
            rpm: Some(60),
            tpm: None,
            max_concurrent: None,
            expires_at: Some(2_000_000_000),
            metadata: serde_json::Map::from_iter([("owner".to_string(), "ml".into())]),
            secrets: vec![SecretHash {
                sha256: "ab".repeat(32),
                valid_until: None,
            }],
            created_at: 1_700_000_000,
        };
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<KeyRecord>(&text).unwrap(), record);
        // A field a newer Aura added is read past.
        let newer = text.replace("\"rpm\"", "\"rpx\"");
        assert_eq!(serde_json::from_str::<KeyRecord>(&newer).unwrap().rpm, None);
        assert_eq!(record.limits().rates.rpm, Some(60));
        assert!(record.expired(2_000_000_000) && !record.expired(1_999_999_999));
    }
}
