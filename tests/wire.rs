//! The wire, tried as a misbehaving upstream and a hostile client would: the real `aura` binary
//! over loopback sockets, on both drivers, against upstreams scripted byte by byte
//! (tests/common/scripted.rs). Each test says which bug it reproduces.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::billing::{
    bearer, cost, mock_usage, wait_for_metric, wait_for_spend, MINI_IN, MINI_OUT,
};
use common::scripted::{json_answer, send, Asked, Scripted, Then};
use common::{start_mock, Aura, Driver, Launch, MockOptions, CHAT};

on_both_drivers!(
    stray_bytes_on_an_idle_upstream_connection_never_reach_another_client,
    an_interim_response_read_with_the_final_one_is_skipped,
    a_request_the_upstream_may_have_read_is_never_sent_twice,
    a_request_body_sent_slowly_has_one_deadline,
    a_client_that_stops_reading_is_cut_and_billed_its_usage,
    head_gets_no_body_and_each_route_answers_its_own_methods,
    head_through_to_a_chunked_upstream_states_no_length,
    a_request_without_one_host_is_400,
    a_request_cut_at_the_end_of_the_grace_is_logged,
    a_request_cut_before_it_reached_the_upstream_costs_nothing,
    no_signal_but_a_stop_signal_ends_aura_and_that_one_gracefully,
    a_json_answer_past_8_mib_is_billed_its_usage,
    metrics_and_the_admin_api_move_to_their_own_listener,
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
/// Reads the request on its first connection's second turn, and closes without an answer;
/// answers every other one with its id.
fn closes_at_second_turn(asked: &Asked, stream: &mut TcpStream) -> Then {
    if asked.connection == 0 && asked.nth == 1 {
        return Then::Close;
    }
    let id = asked.header("x-test-id").unwrap_or_default();
    send(stream, &json_answer(&id));
    Then::Next
}

fn a_request_the_upstream_may_have_read_is_never_sent_twice(driver: Driver) {
    let upstream = Scripted::start(closes_at_second_turn);
    let aura = Launch::new(&upstream.url(), driver).workers(1).start();
    let times = |id: &str| {
        upstream
            .asked()
            .iter()
            .filter(|a| a.header("x-test-id").as_deref() == Some(id))
            .count()
    };
    assert_eq!(ask(&aura, "warm").status, 200);
    // A billed POST (embeddings) may have started: never sent again.
    let response = aura.client().request(
        "POST",
        "/v1/embeddings",
        &[
            ("authorization", "Bearer sk-test-wire"),
            ("content-type", "application/json"),
            ("x-test-id", "billed"),
        ],
        br#"{"model":"text-embedding-3-small","input":"hi"}"#,
    );
    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(times("billed"), 1, "a billed request was sent twice");
    // A free GET on a pooled connection closed as it was taken (the upstream's idle close
    // racing the request) is asked again, on a fresh connection: it costs and changes nothing.
    assert_eq!(ask(&aura, "warm-again").status, 200);
    let upstream_closes = Scripted::start(closes_at_second_turn);
    let aura = Launch::new(&upstream_closes.url(), driver)
        .workers(1)
        .start();
    assert_eq!(ask(&aura, "warm").status, 200);
    let retried = ask(&aura, "free");
    assert_eq!(retried.status, 200, "{}", retried.text());
    assert_eq!(id_of(&retried), "free");
    // A 1xx is an answer begun: even a free GET is not asked again after one.
    let hints_then_close = Scripted::start(|asked, stream| {
        if asked.connection == 0 && asked.nth == 1 {
            send(stream, b"HTTP/1.1 103 Early Hints\r\n\r\n");
            return Then::Close;
        }
        let id = asked.header("x-test-id").unwrap_or_default();
        send(stream, &json_answer(&id));
        Then::Next
    });
    let aura = Launch::new(&hints_then_close.url(), driver)
        .workers(1)
        .start();
    assert_eq!(ask(&aura, "warm").status, 200);
    assert_eq!(ask(&aura, "after-hints").status, 502);
    let asked = hints_then_close
        .asked()
        .iter()
        .filter(|a| a.header("x-test-id").as_deref() == Some("after-hints"))
        .count();
    assert_eq!(asked, 1, "asked again after a 1xx");
}

/// Writes `head`, then `pieces` one every 200 ms while the connection takes them; returns the
/// status line Aura answered with (empty if none) and when it came.
fn trickle(aura: &Aura, head: &str, piece: &[u8], pieces: usize) -> (String, Duration) {
    let mut stream = TcpStream::connect(aura.addr).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..pieces {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {}
        }
        if stream.write_all(piece).is_err() {
            break;
        }
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    if answer.is_empty() {
        let n = stream.read(&mut buf).unwrap_or(0);
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    (
        text.lines().next().unwrap_or_default().to_string(),
        started.elapsed(),
    )
}

/// Bug: the head timeout bounded each read, not the request: a body sent a byte every 200 ms
/// (sized or chunked) held its connection open for as long as the client liked.
fn a_request_body_sent_slowly_has_one_deadline(driver: Driver) {
    let upstream = Scripted::start(|_, stream| {
        send(stream, &json_answer("never"));
        Then::Next
    });
    let aura = Launch::new(&upstream.url(), driver)
        .arg("--client-head-timeout-ms")
        .arg("1000")
        .start();
    let sized = "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test-wire\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    let chunked = "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test-wire\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    for (head, piece) in [(sized, &b"x"[..]), (chunked, &b"1\r\nx\r\n"[..])] {
        // 40 pieces would take 8 s: the request must be cut at its 1 s deadline.
        let (status, after) = trickle(&aura, head, piece, 40);
        assert!(status.contains(" 408 "), "{status:?} after {after:?}");
        assert!(after < Duration::from_secs(3), "cut after {after:?}");
    }
    assert!(upstream.asked().is_empty(), "a cut request went upstream");
    // An upload that keeps coming (~400 KB/s for 3 s) is no trickle: its length earns it time.
    let body = vec![b'x'; 1_200_000];
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test-wire\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(aura.addr).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    for piece in body.chunks(40_000) {
        stream.write_all(piece).unwrap();
        std::thread::park_timeout(Duration::from_millis(100));
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = [0u8; 64];
    let n = stream.read(&mut answer).unwrap();
    let status = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
}

/// Bug: no write to a client had a deadline: a client that stopped reading held its stream,
/// the upstream connection, the buffers and the reservation for as long as it kept the socket
/// open. Cut after `client_send_timeout_ms`, the stream is drained and billed its real usage.
fn a_client_that_stops_reading_is_cut_and_billed_its_usage(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let aura = Launch::new(&mock.url(), driver)
        .arg("--client-send-timeout-ms")
        .arg("1000")
        .workers(1)
        .start();
    let key = "sk-test-wire-stops-reading";
    // ~7 MB of events: more than the socket buffers between Aura and a client that reads
    // nothing (its receive buffer kept small), less than what a drain reads after the cut.
    // Three choices, so the model's output limit allows the 40,000 tokens.
    let body = r#"{"model":"gpt-4o-mini","n":3,"messages":[{"role":"user","content":"Say hello"}],"stream":true}"#;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&aura.addr.into()).unwrap();
    let mut client: TcpStream = socket.into();
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-type: application/json\r\nx-mock-chunks: 40000\r\ncontent-length: {}\r\n\r\n{body}",
        bearer(key),
        body.len()
    );
    client.write_all(request.as_bytes()).unwrap();
    // The client holds the socket open and reads nothing.
    wait_for_metric(&aura, "aura_errors_total{kind=\"client_send_timeout\"} 1");
    let asked = mock.requests();
    let (prompt, completion) = mock_usage(&asked[0]);
    assert_eq!(completion, 40_000);
    wait_for_spend(&aura, key, cost(prompt, completion, MINI_IN, MINI_OUT));
    drop(client);
}

/// Bug: answers to HEAD carried a body (`/healthz`, errors), so the next response on the
/// keep-alive connection could not be parsed; `/healthz` answered POST.
fn head_gets_no_body_and_each_route_answers_its_own_methods(driver: Driver) {
    let upstream = Scripted::start(|asked, stream| {
        let id = asked.header("x-test-id").unwrap_or_default();
        send(stream, &json_answer(&id));
        Then::Next
    });
    let aura = Launch::new(&upstream.url(), driver).start();
    // HEAD then GET on one connection: the GET's answer parses, so the HEAD's had no body.
    let mut client = aura.client();
    for path in ["/healthz", "/metrics", "/nowhere", "/v1/usage"] {
        let head = client.request("HEAD", path, &[], b"");
        assert!(head.body.is_empty(), "HEAD {path}: {}", head.text());
        let get = client.request("GET", "/healthz", &[], b"");
        assert_eq!(get.status, 200, "after HEAD {path}: {}", get.text());
        assert_eq!(get.json()["status"], "ok");
    }
    for (method, path, allow) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("PUT", "/v1/usage", "GET, HEAD"),
        (
            "TRACE",
            "/v1/models",
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
        ),
    ] {
        let r = aura.client().request(method, path, &[], b"");
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        r.assert_openai_error(405);
    }
    assert!(upstream.asked().is_empty(), "TRACE went upstream");
}

/// A HEAD forwarded to an upstream whose answer is chunked: no body, and no length Aura
/// made up (it said `content-length: 0` of an entity it knew nothing of).
fn head_through_to_a_chunked_upstream_states_no_length(driver: Driver) {
    let upstream = Scripted::start(|_, stream| {
        send(
            stream,
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        Then::Next
    });
    let aura = Launch::new(&upstream.url(), driver).start();
    let mut client = aura.client();
    let head = client.request(
        "HEAD",
        "/v1/models",
        &[("authorization", "Bearer sk-test-wire")],
        b"",
    );
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), None);
    // The connection serves the next request: nothing followed the head.
    assert_eq!(client.get("/healthz").status, 200);
}

/// Bug: an HTTP/1.1 request without Host, or with two, was served (RFC 9112 §3.2: 400).
fn a_request_without_one_host_is_400(driver: Driver) {
    let aura = Launch::new("http://127.0.0.1:9/v1", driver).start();
    for head in [
        "GET /healthz HTTP/1.1\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
    ] {
        let mut client = aura.client();
        client.send(head.as_bytes());
        let (status, _) = client.read_head();
        assert_eq!(status, 400, "{head:?}");
    }
    let mut client = aura.client();
    client.send(b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(client.read_head().0, 200, "HTTP/1.0 needs no Host");
}

/// Bug: a request still in flight when the shutdown grace ended left no access-log record.
fn a_request_cut_at_the_end_of_the_grace_is_logged(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let mut aura = logging_with_short_grace(&mock.url(), driver);
    let mut client = aura.client();
    let request = common::raw_stream_request(
        "sk-test-wire-cut",
        &[("x-mock-chunks", "100"), ("x-mock-delay-ms", "100")],
    );
    client.send(request.as_bytes());
    client.read_until(b"\n\n");
    // A second request half received, and an idle keep-alive connection (no request: no record).
    let mut uploading = aura.client();
    uploading
        .send(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"a\"");
    let mut idle = aura.client();
    assert_eq!(idle.get("/healthz").status, 200);
    std::thread::park_timeout(Duration::from_millis(100));
    let (lines, access) = stop_for_access_records(&mut aura);
    assert_eq!(access.len(), 2, "{}", lines.join("\n"));
    assert!(
        access.iter().all(|l| l.contains("shutdown_cut")),
        "{}",
        lines.join("\n")
    );
    assert!(access.iter().any(|l| l.contains("chat_completions")));
}

/// Bug: a request cut at the end of the grace before it reached the upstream (still
/// connecting) was billed its whole reservation.
fn a_request_cut_before_it_reached_the_upstream_costs_nothing(driver: Driver) {
    // An https upstream that takes the connection and never speaks TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/v1", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let held: Vec<TcpStream> = silent.incoming().take(4).flatten().collect();
        std::thread::park_timeout(Duration::from_secs(20));
        drop(held);
    });
    let mut aura = logging_with_short_grace(&url, driver);
    let mut client = aura.client();
    client.send(common::raw_stream_request("sk-test-wire-unsent", &[]).as_bytes());
    std::thread::park_timeout(Duration::from_millis(200));
    let (lines, access) = stop_for_access_records(&mut aura);
    assert_eq!(access.len(), 1, "{}", lines.join("\n"));
    assert!(access[0].contains("shutdown_cut"), "{}", access[0]);
    assert!(access[0].contains("cost_nano_usd=0 "), "{}", access[0]);
}

/// Aura with its access log captured and a 300 ms shutdown grace.
fn logging_with_short_grace(upstream_url: &str, driver: Driver) -> Aura {
    Launch::new(upstream_url, driver)
        .arg("--shutdown-grace-ms")
        .arg("300")
        .env("AURA_LOG", "info")
        .capture_stderr()
        .start()
}

/// SIGTERM, then every line Aura logged and its access-log records.
fn stop_for_access_records(aura: &mut Aura) -> (Vec<String>, Vec<String>) {
    aura.terminate(Duration::from_secs(10));
    let lines = aura.log().all_when_closed(Duration::from_secs(5));
    let access = lines
        .iter()
        .filter(|l| l.contains("aura::access"))
        .cloned()
        .collect();
    (lines, access)
}

fn signal(aura: &Aura, name: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &aura.pid().to_string()])
        .status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -{name}");
}

/// Bug: SIGHUP and SIGUSR1 killed Aura at once: streams cut, spend in memory lost. SIGHUP now
/// reloads the configuration; other signals are logged and ignored; SIGQUIT stops it as
/// SIGTERM does.
fn no_signal_but_a_stop_signal_ends_aura_and_that_one_gracefully(driver: Driver) {
    let mock = start_mock(MockOptions::default());
    let mut aura = Launch::new(&mock.url(), driver)
        .env("AURA_LOG", "info")
        .capture_stderr()
        .start();
    let key = "sk-test-wire-signals";
    let mut client = aura.client();
    let request =
        common::raw_stream_request(key, &[("x-mock-chunks", "10"), ("x-mock-delay-ms", "30")]);
    client.send(request.as_bytes());
    client.read_until(b"\n\n");
    for name in [
        "HUP", "USR1", "USR2", "ALRM", "VTALRM", "PROF", "IO", "PWR", "XCPU", "XFSZ",
        // Real-time signals by number: SIGRTMIN+1 and SIGRTMAX with glibc.
        "35", "64",
    ] {
        signal(&aura, name);
    }
    // The stream in flight ends whole, and Aura goes on serving.
    client.read_until(b"data: [DONE]");
    assert_eq!(aura.client().get("/healthz").status, 200);
    aura.log()
        .wait_for_count("signal ignored", 11, Duration::from_secs(5));
    aura.log()
        .wait_for_count("configuration reloaded", 1, Duration::from_secs(5));
    // SIGQUIT: the graceful stop (a zero exit, after "stopped").
    signal(&aura, "QUIT");
    let status = aura.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let lines = aura.log().all_when_closed(Duration::from_secs(5));
    assert!(
        lines.iter().any(|l| l.contains("stopped")),
        "{}",
        lines.join("\n")
    );
}

/// Bug: a non-streaming JSON answer was kept whole (up to 8 MiB) to read its usage: memory for
/// every large answer, and past 8 MiB the usage was not read at all (billed an estimate).
fn a_json_answer_past_8_mib_is_billed_its_usage(driver: Driver) {
    let upstream = Scripted::start(|_, stream| {
        let text = "x".repeat(9 * 1024 * 1024);
        let body = format!(
            r#"{{"id":"chatcmpl-big","object":"chat.completion","model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}}}"#
        );
        send(
            stream,
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        for piece in body.as_bytes().chunks(64 * 1024) {
            send(stream, piece);
        }
        Then::Next
    });
    let aura = Launch::new(&upstream.url(), driver).start();
    let key = "sk-test-wire-big-json";
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let auth = bearer(key);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let r = aura
        .client()
        .request("POST", CHAT, &headers, body.as_bytes());
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 9 * 1024 * 1024);
    wait_for_spend(&aura, key, cost(10, 20, MINI_IN, MINI_OUT));
}

/// `admin_listen`: /metrics and the admin API on a listener of their own (e.g. loopback only),
/// and no longer on the data-plane port, where any client could read aliases and budgets.
fn metrics_and_the_admin_api_move_to_their_own_listener(driver: Driver) {
    const TOKEN: &str = "admin-token-wire-0001";
    let mock = start_mock(MockOptions::default());
    let port = common::dead_port();
    let control: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut aura = Launch::new(&mock.url(), driver)
        .arg("--admin-listen")
        .arg(&control.to_string())
        .arg("--admin-token")
        .arg(TOKEN)
        .env("AURA_LOG", "info")
        .capture_stderr()
        .start();
    let admin = bearer(TOKEN);
    let key = "sk-test-wire-control";
    let auth = bearer(key);
    let chat = aura.client().request(
        "POST",
        CHAT,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        common::WHOLE.as_bytes(),
    );
    assert_eq!(chat.status, 200);
    // The data plane: the API and its own usage, not the control plane's routes.
    assert_eq!(aura.client().get("/metrics").status, 404);
    let listing = aura
        .client()
        .request("GET", "/admin/keys", &[("authorization", &admin)], b"");
    assert_eq!(listing.status, 404);
    assert_eq!(aura.client().get("/healthz").status, 200);
    let usage = aura
        .client()
        .request("GET", "/v1/usage", &[("authorization", &auth)], b"");
    assert_eq!(usage.status, 200);
    // The control plane.
    common::scrape_within_at(control, Duration::from_secs(10), |text| {
        text.contains("aura_requests_total{route=\"chat_completions\",status_class=\"2xx\"} 1")
    });
    let head = common::request(control, "HEAD", "/metrics", &[], b"");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    for (method, path, status) in [
        ("POST", "/metrics", 405),
        ("GET", "/admin/keys", 401),
        ("GET", "/healthz", 200),
        ("GET", "/v1/models", 404),
    ] {
        let r = common::request(control, method, path, &[], b"");
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
    }
    let keys = common::request(
        control,
        "GET",
        "/admin/keys",
        &[("authorization", &admin)],
        b"",
    );
    assert_eq!(keys.status, 200, "{}", keys.text());
    let id = aura::auth::KeyId::of(key).to_string();
    assert!(keys.text().contains(&id), "{}", keys.text());
    // Refused admin calls are logged too (a token being guessed shows).
    aura.log()
        .wait_for_count("status=401", 1, Duration::from_secs(5));
    // Stopping (a stream holds the grace open), its /healthz says so.
    let mut streaming = aura.client();
    streaming.send(
        common::raw_stream_request(key, &[("x-mock-chunks", "50"), ("x-mock-delay-ms", "100")])
            .as_bytes(),
    );
    streaming.read_until(b"\n\n");
    signal(&aura, "TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = common::request(control, "GET", "/healthz", &[], b"");
        if health.status == 503 {
            assert_eq!(health.json()["status"], "stopping");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "control /healthz still {}",
            health.status
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
    aura.wait_exit(Duration::from_secs(20));
}
