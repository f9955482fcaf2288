//! Aura: an OpenAI-compatible LLM gateway. One monoio runtime per core relays chat completion
//! streams without buffering, injects `stream_options.include_usage`, and finds the usage event
//! in-stream. The library exposes what the binary, the tests and the benches need.

// L0: pure, no IO.
pub mod auth;
pub mod error;
pub mod http;
pub mod pricing;
pub mod rewrite;
pub mod route;
pub mod sse;
pub mod usage;
// Config is pure too (the environment is read through a trait).
pub mod config;
// L1: per-worker state.
pub mod budget;
pub mod buffers;
pub mod governance;
pub mod keyring;
pub mod metrics;
// L2/L3/L4: IO.
pub mod admin;
pub mod control;
pub mod cut;
pub mod mock;
pub mod net;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod spend_record;
pub mod upstream;
