//! The wire, tried as a misbehaving upstream and a hostile client would: the real `aura` binary
//! over loopback sockets, on both drivers, against upstreams scripted byte by byte
//! (tests/common/scripted.rs). Each test says which bug it reproduces.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::scripted::{json_answer, send, Asked, Scripted, Then};
use common::{Aura, Driver, Launch};

on_both_drivers!(
    stray_bytes_on_an_idle_upstream_connection_never_reach_another_client,
    an_interim_response_read_with_the_final_one_is_skipped,
    a_request_the_upstream_may_have_read_is_never_sent_twice,
);

/// A passthrough request (free: no budget involved) that names itself.
fn ask(aura: &Aura, id: &str) -> common::Response {
    aura.client().request(
        "GET",
        "/v1/models",
        &[("authorization", "Bearer sk-test-wire"), ("x-test-id", id)],
        b"",
    )
}

fn id_of(response: &common::Response) -> String {
    let body: serde_json::Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|_| panic!("not JSON: {}", response.text()));
    body["id"].as_str().unwrap_or_default().to_string()
}

/// The ways an upstream puts bytes on a keep-alive connection that no request asked for.
#[derive(Debug, Clone, Copy)]
enum Stray {
    /// A whole second answer, written a moment after the first.
    LateAnswer,
    /// A 204 (no body by definition) followed by a body.
    BodyAfterNoContent,
    /// A 304, its body in the same write.
    BodyWithNotModified,
    /// More body than its Content-Length said, in the same write.
    LongerThanItsLength,
    /// An idle connection's `408`, then the close.
    IdleTimeout,
}

const STRAYS: [Stray; 5] = [
    Stray::LateAnswer,
    Stray::BodyAfterNoContent,
    Stray::BodyWithNotModified,
    Stray::LongerThanItsLength,
    Stray::IdleTimeout,
];

fn misbehave(stray: Stray, asked: &Asked, stream: &mut TcpStream) -> Then {
    let id = asked.header("x-test-id").unwrap_or_default();
    let mine = json_answer(&id);
    let theirs = json_answer("stray");
    let pause = || std::thread::park_timeout(Duration::from_millis(30));
    if asked.connection > 0 || asked.nth > 0 {
        // Only the first answer misbehaves; every later one is honest (the client whose
        // request it carries must get its own answer).
        send(stream, &mine);
        return Then::Next;
    }
    match stray {
        Stray::LateAnswer => {
            send(stream, &mine);
            pause();
            send(stream, &theirs);
        }
        Stray::BodyAfterNoContent => {
            send(stream, b"HTTP/1.1 204 No Content\r\n\r\n");
            pause();
            send(stream, &theirs);
        }
        Stray::BodyWithNotModified => {
            let mut all = b"HTTP/1.1 304 Not Modified\r\n\r\n".to_vec();
            all.extend_from_slice(&theirs);
            send(stream, &all);
        }
        Stray::LongerThanItsLength => {
            let mut all = mine;
            all.extend_from_slice(&theirs);
            send(stream, &all);
        }
        Stray::IdleTimeout => {
            send(stream, &mine);
            pause();
            send(
                stream,
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 20\r\nconnection: close\r\n\r\n{\"id\":\"stray-408\"}  ",
            );
            pause();
            return Then::Close;
        }
    }
    Then::Next
}

/// Bug: a pooled upstream connection was reused without a look: bytes that arrived on it while
/// idle (a late answer, a body after a 204 or 304, a body past its length, an idle 408) became
/// the next request's answer, and another client (another key) got them.
fn stray_bytes_on_an_idle_upstream_connection_never_reach_another_client(driver: Driver) {
    for stray in STRAYS {
        let upstream = Scripted::start(move |asked, stream| misbehave(stray, asked, stream));
        let aura = Launch::new(&upstream.url(), driver).workers(1).start();
        let first = ask(&aura, "first");
        assert!(
            matches!(first.status, 200 | 204 | 304),
            "{stray:?}: {}",
            first.status
        );
        // The stray bytes arrive while the connection idles in the pool.
        std::thread::park_timeout(Duration::from_millis(150));
        let second = ask(&aura, "second");
        assert_eq!(second.status, 200, "{stray:?}: {}", second.text());
        assert_eq!(id_of(&second), "second", "{stray:?}: another's answer");
    }
}

/// Bug: after skipping a `100 Continue` or `103 Early Hints`, Aura read the socket again
/// instead of parsing the final head it already held, and waited the upstream read timeout.
fn an_interim_response_read_with_the_final_one_is_skipped(driver: Driver) {
    let upstream = Scripted::start(|asked, stream| {
        let id = asked.header("x-test-id").unwrap_or_default();
        let mut all = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n".to_vec();
        all.extend_from_slice(&json_answer(&id));
        send(stream, &all);
        Then::Next
    });
    let aura = Launch::new(&upstream.url(), driver)
        .arg("--upstream-read-timeout-ms")
        .arg("3000")
        .start();
    let started = Instant::now();
    let response = ask(&aura, "after-hints");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(id_of(&response), "after-hints");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
}

/// Bug: a pooled connection that closed after the upstream read the request (no answer) made
/// Aura send the request again on a fresh connection: a provider that had started (and
/// charged for) the first would run it twice.
fn a_request_the_upstream_may_have_read_is_never_sent_twice(driver: Driver) {
    let upstream = Scripted::start(|asked, stream| {
        let id = asked.header("x-test-id").unwrap_or_default();
        if id == "read-then-closed" {
            return Then::Close;
        }
        send(stream, &json_answer(&id));
        Then::Next
    });
    let aura = Launch::new(&upstream.url(), driver).workers(1).start();
    assert_eq!(ask(&aura, "warm").status, 200);
    let response = ask(&aura, "read-then-closed");
    assert_eq!(response.status, 502, "{}", response.text());
    let times = upstream
        .asked()
        .iter()
        .filter(|a| a.header("x-test-id").as_deref() == Some("read-then-closed"))
        .count();
    assert_eq!(times, 1, "the upstream was asked {times} times");
    // The connection it came on is not reused; the next request is answered.
    assert_eq!(id_of(&ask(&aura, "after")), "after");
}
