//! The mock's Anthropic Messages answers, in Anthropic's shapes: a whole `message`, or the
//! stream of `message_start`, content blocks, `message_delta` (the output count) and
//! `message_stop`. Usage: input = a quarter of the body's bytes, output = one token per chunk,
//! and the cache counts a request asks for with `x-mock-cache-write` / `x-mock-cache-read`.

use serde_json::{json, Value};

use super::token;

/// A Messages usage, as Anthropic reports it (its input apart from both cache counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessagesUsage {
    pub input: u64,
    pub cache_write: u64,
    pub cache_read: u64,
    pub output: u64,
    /// Web searches a server tool ran (`server_tool_use.web_search_requests`).
    pub web_searches: u64,
}

impl MessagesUsage {
    fn input_side(&self, output: u64) -> Value {
        let mut usage = json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": output,
        });
        if self.web_searches > 0 {
            usage["server_tool_use"] = json!({ "web_search_requests": self.web_searches });
        }
        usage
    }
}

/// A whole (non-streamed) answer.
pub fn message(model: &str, chunks: usize, usage: MessagesUsage) -> Vec<u8> {
    let text: String = (0..chunks).map(token).collect();
    json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": usage.input_side(usage.output),
    })
    .to_string()
    .into_bytes()
}

/// A streamed answer, one SSE event per element.
pub fn stream_events(model: &str, chunks: usize, usage: MessagesUsage) -> Vec<Vec<u8>> {
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n").into_bytes();
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage.input_side(1),
            }}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for i in 0..chunks {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token(i)}}),
        ));
    }
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": usage.output,
                         "server_tool_use": {"web_search_requests": usage.web_searches}}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    events
}

/// `POST /v1/messages/count_tokens`: the input a request would count.
pub fn count_tokens(input: u64) -> Vec<u8> {
    json!({ "input_tokens": input }).to_string().into_bytes()
}

/// An error in Anthropic's shape.
pub fn error(kind: &str, message: &str) -> Vec<u8> {
    json!({"type": "error", "error": {"type": kind, "message": message}})
        .to_string()
        .into_bytes()
}
