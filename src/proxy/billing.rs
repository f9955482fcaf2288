//! The fields of a request body that bound its cost (which routes are billed is route.rs; the
//! estimate itself is budget/estimate.rs).

use serde::Deserialize;

use crate::budget::Reservation;
use crate::pricing::Price;

/// The fields of a pass-through request body that bound its cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    /// `n` (choices) of completions: each up to `max_tokens`.
    pub choices: u64,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            model: None,
            max_tokens: None,
            choices: 1,
        }
    }
}

/// `model` and `max_tokens` / `max_completion_tokens` / `max_output_tokens` (Responses API) of
/// a JSON body; absent or unreadable fields are None (the request is then bounded by the
/// model's limits), so a body Aura cannot read is still billed.
pub fn bounds_of(body: &[u8]) -> Bounds {
    #[derive(Deserialize)]
    struct Fields {
        model: Option<serde_json::Value>,
        max_tokens: Option<serde_json::Value>,
        max_completion_tokens: Option<serde_json::Value>,
        max_output_tokens: Option<serde_json::Value>,
        n: Option<serde_json::Value>,
    }
    let Ok(fields) = serde_json::from_slice::<Fields>(body) else {
        return Bounds::default();
    };
    Bounds {
        model: fields.model.and_then(|m| m.as_str().map(str::to_owned)),
        max_tokens: [
            fields.max_completion_tokens,
            fields.max_tokens,
            fields.max_output_tokens,
        ]
        .into_iter()
        .flatten()
        .find_map(|v| v.as_u64()),
        choices: fields
            .n
            .and_then(|n| n.as_u64())
            .filter(|n| *n > 0)
            .unwrap_or(1),
    }
}

/// A reservation, and what settle needs to price the request.
#[derive(Debug)]
pub struct Bill<'s> {
    pub reservation: Reservation<'s>,
    pub request_bytes: u64,
    /// `n` of the request.
    pub choices: u64,
    /// The model asked for (the answer may name another), and the price it reserved at.
    pub requested: Option<String>,
    pub reserved_at: Price,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_read_from_any_json_body() {
        assert_eq!(
            bounds_of(br#"{"model":"gpt-4o","input":["a","b"],"max_output_tokens":50}"#),
            Bounds {
                model: Some("gpt-4o".into()),
                max_tokens: Some(50),
                choices: 1,
            }
        );
        assert_eq!(
            bounds_of(br#"{"model":"m","max_tokens":null,"max_completion_tokens":7}"#).max_tokens,
            Some(7)
        );
        assert_eq!(bounds_of(br#"{"prompt":"x","n":4}"#).choices, 4);
        assert_eq!(bounds_of(b"not json"), Bounds::default());
        assert_eq!(bounds_of(br#"{"model":5}"#), Bounds::default());
    }
}
