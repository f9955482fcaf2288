//! https upstreams: Aura in front of the mock served over TLS (rustls), with a CA made by the
//! test and given to Aura via `--upstream-ca-file`. The stream must still arrive incrementally
//! and with the usage event handled, and an upstream whose certificate Aura does not trust is
//! a 502, never a silent plaintext fallback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use aura::mock::{MockOptions, MockUpstream};
use common::{Driver, Launch, STREAM};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

on_both_drivers!(
    streams_through_an_https_upstream,
    untrusted_upstream_certificate_is_502
);

struct TlsMock {
    mock: MockUpstream,
    ca_file: PathBuf,
    _dir: TempDir,
}

/// A CA, a `localhost` certificate it signs, and the mock serving TLS with it.
fn tls_mock(options: MockOptions) -> TlsMock {
    let certs = common::test_ca::TestCa::new();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certs.leaf_der.into()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certs.key_der)),
        )
        .unwrap();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mock = MockUpstream::start_tls(listen, options, Arc::new(server)).unwrap();
    let dir = TempDir::new();
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, certs.ca_pem).unwrap();
    TlsMock {
        mock,
        ca_file,
        _dir: dir,
    }
}

fn https_url(mock: &MockUpstream) -> String {
    format!("https://localhost:{}/v1", mock.addr.port())
}

fn streams_through_an_https_upstream(driver: Driver) {
    let options = MockOptions {
        chunks: 4,
        ..MockOptions::default()
    };
    let tls = tls_mock(options);
    let aura = Launch::new(&https_url(&tls.mock), driver)
        .arg("--upstream-ca-file")
        .arg(tls.ca_file.to_str().unwrap())
        .start();
    let mut client = aura.client();
    let response = client.post_json(
        "/v1/chat/completions",
        &[("x-mock-delay-ms", "100")],
        STREAM,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(response.complete);
    assert_eq!(response.streamed_content(), "tok0 tok1 tok2 tok3 ");
    let events = response.events();
    assert!(
        events.iter().all(|e| !e.is_usage_only()),
        "usage event must be stripped"
    );
    assert_eq!(events.last().unwrap().data(), "[DONE]");
    // Incremental over TLS: the first content event arrives well before the last.
    let first = events[1].at;
    let last = events[events.len() - 2].at;
    assert!(
        last.duration_since(first).as_millis() >= 200,
        "events were buffered"
    );
    // The upstream was asked for usage over TLS too.
    let sent = tls.mock.requests().pop().unwrap().json().unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
}

fn untrusted_upstream_certificate_is_502(driver: Driver) {
    let tls = tls_mock(MockOptions::default());
    // No --upstream-ca-file: the test CA is not in the Mozilla root store.
    let aura = Launch::new(&https_url(&tls.mock), driver).start();
    let response = aura.client().post_json("/v1/chat/completions", &[], STREAM);
    let error = response.assert_openai_error(502);
    assert_eq!(error["error"]["code"], "upstream_unreachable");
    assert!(
        tls.mock.requests().is_empty(),
        "nothing may reach an untrusted upstream"
    );
}

/// A temporary directory removed on drop (no extra crate for one file).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "aura-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
