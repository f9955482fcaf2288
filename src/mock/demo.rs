//! `aura --demo`: the built-in mock upstreams and the routing table in front of them, so a
//! newcomer sees routing, fallback and health with no internet and no key. Two
//! OpenAI-compatible mocks serve every model, one of them failing half its requests with a
//! 503 (its requests go on to the other; when it fails three times in a row it is ejected,
//! which the log and `aura_upstream_up` show); Anthropic's Messages API is served by an
//! `anthropic` upstream on the healthy mock.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{MockOptions, MockUpstream};
use crate::config::upstreams::UpstreamKind;
use crate::config::{Scheme, UpstreamEntry, UpstreamUrl};
use crate::upstream::select::ModelPattern;

/// The demo's share of requests the flaky upstream answers 503.
pub const FLAKY_FAILURE_RATIO: f64 = 0.5;

/// The demo's mock upstreams, running for as long as they are held.
pub struct Demo {
    pub healthy: MockUpstream,
    pub flaky: MockUpstream,
}

impl Demo {
    /// Starts both mocks on loopback, on free ports.
    pub fn start() -> io::Result<Demo> {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let healthy = MockUpstream::start(loopback, MockOptions::default())?;
        let flaky = MockUpstream::start(
            loopback,
            MockOptions {
                failure_ratio: FLAKY_FAILURE_RATIO,
                ..MockOptions::default()
            },
        )?;
        Ok(Demo { healthy, flaky })
    }

    /// The routing table: `demo` and `demo-flaky` serve every model at equal weights (the
    /// models a listing shows named), `demo-anthropic` serves `claude-*` Messages.
    pub fn routes(&self) -> Vec<UpstreamEntry> {
        let url = |mock: &MockUpstream| UpstreamUrl {
            scheme: Scheme::Http,
            host: mock.addr.ip().to_string(),
            port: mock.addr.port(),
            base_path: "/v1".into(),
        };
        let models = |names: &[&str]| -> Vec<ModelPattern> {
            names
                .iter()
                .filter_map(|n| ModelPattern::parse(n).ok())
                .collect()
        };
        let openai = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "*"];
        let mut healthy = UpstreamEntry::single("demo", url(&self.healthy));
        healthy.models = models(&openai);
        let mut flaky = UpstreamEntry::single("demo-flaky", url(&self.flaky));
        flaky.models = models(&openai);
        let mut anthropic = UpstreamEntry::single("demo-anthropic", url(&self.healthy));
        anthropic.kind = UpstreamKind::Anthropic;
        anthropic.models = models(&["claude-sonnet-4", "claude-haiku-4-5", "claude-*"]);
        vec![healthy, flaky, anthropic]
    }
}
