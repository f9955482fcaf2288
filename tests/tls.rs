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
    untrusted_upstream_certificate_is_502,
    a_stray_record_on_an_idle_tls_connection_never_reaches_another_client,
);

struct TlsMock {
    mock: MockUpstream,
    ca_file: PathBuf,
    _dir: TempDir,
}

/// A TLS server's config with the `localhost` certificate `certs` signs.
fn server_config(certs: &common::test_ca::TestCa) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certs.leaf_der.clone().into()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certs.key_der.clone())),
        )
        .unwrap();
    Arc::new(server)
}

/// A CA, a `localhost` certificate it signs, and the mock serving TLS with it.
fn tls_mock(options: MockOptions) -> TlsMock {
    let certs = common::test_ca::TestCa::new();

    let server = server_config(&certs);
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mock = MockUpstream::start_tls(listen, options, server).unwrap();
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

/// Bug: the pool's check looked at the socket only. monoio-rustls reads up to 16 KiB from it at
/// a time, so a TLS record that came in the same write as an answer's last one (a stray answer
/// > 4 KiB) waited above the socket, unseen, and became the next client's answer.
fn a_stray_record_on_an_idle_tls_connection_never_reaches_another_client(driver: Driver) {
    use std::io::Write;
    let certs = common::test_ca::TestCa::new();
    let server = server_config(&certs);
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, tcp) in listener.incoming().enumerate() {
            let Ok(tcp) = tcp else { return };
            let server = server.clone();
            std::thread::spawn(move || {
                let connection = rustls::ServerConnection::new(server).unwrap();
                let mut tls = rustls::StreamOwned::new(connection, tcp);
                let mut buf = Vec::new();
                let mut first = n == 0;
                while let Some(head) = common::scripted::read_request(&mut tls, &mut buf) {
                    let id = head
                        .lines()
                        .find_map(|l| l.strip_prefix("x-test-id:"))
                        .unwrap_or_default()
                        .trim()
                        .to_string();
                    // Two records in one TCP write: the answer, then a stray one of 6 KB.
                    tls.conn
                        .writer()
                        .write_all(&common::scripted::json_answer(&id))
                        .unwrap();
                    if std::mem::take(&mut first) {
                        let stray = format!("stray-{}", "x".repeat(6000));
                        tls.conn
                            .writer()
                            .write_all(&common::scripted::json_answer(&stray))
                            .unwrap();
                    }
                    if tls.conn.complete_io(&mut tls.sock).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let dir = TempDir::new();
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, certs.ca_pem).unwrap();
    let aura = Launch::new(&format!("https://localhost:{port}/v1"), driver)
        .arg("--upstream-ca-file")
        .arg(ca_file.to_str().unwrap())
        .workers(1)
        .start();
    let ask = |id: &str| {
        aura.client().request(
            "GET",
            "/v1/models",
            &[("authorization", "Bearer sk-test-tls"), ("x-test-id", id)],
            b"",
        )
    };
    assert_eq!(ask("first").json()["id"], "first");
    std::thread::park_timeout(std::time::Duration::from_millis(100));
    let second = ask("second");
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.json()["id"], "second", "another's answer");
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
