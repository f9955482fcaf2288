//! Shared harness for the integration tests: the project's mock upstream on a free port, the real
//! `aura` binary spawned per test (killed on drop), and a small blocking HTTP/1.1 client that
//! notes when each piece of a streamed body arrived. Loopback only, no fixed ports, no sleeps:
//! every wait reads from a pipe or a socket with a deadline.
//! Each test file uses what it needs; the rest is dead code there.
#![allow(
    dead_code,
    unused_imports,
    unused_macros,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use aura::mock::{MockOptions, MockUpstream, Recorded};

pub mod billing;
pub mod load;
pub mod scripted;
pub mod test_ca;
pub mod valkey;

/// How long `aura` may take to print its listening line, or to exit when it must.
pub const START_DEADLINE: Duration = Duration::from_secs(20);
/// Longest silence the client accepts while reading a response.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The chat completions route, and the request bodies most tests send to it.
pub const CHAT: &str = "/v1/chat/completions";
pub const STREAM: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"stream":true}"#;
pub const STREAM_USAGE: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"stream":true,"stream_options":{"include_usage":true}}"#;

/// A streamed chat completion for `key` as raw bytes on the wire, with extra `headers` (the
/// mock's `x-mock-*` controls): for tests that read or cut the answer part way.
pub fn raw_stream_request(key: &str, headers: &[(&str, &str)]) -> String {
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{STREAM}",
        STREAM.len()
    )
}
pub const WHOLE: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;

/// The line `aura` prints on stdout once it accepts connections.
const LISTENING: &str = "aura listening on http://";

/// Runs each named test function `fn name(driver: Driver)` once per monoio driver, as
/// `name::io_uring` and `name::epoll`.
macro_rules! on_both_drivers {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn io_uring() {
                super::$name(crate::common::Driver::IoUring)
            }
            #[test]
            fn epoll() {
                super::$name(crate::common::Driver::Epoll)
            }
        }
    )+};
}

/// Writes `text` as `aura.toml` in a directory of its own, named by `name` (unique per test
/// and driver) and this process; returns its path.
pub fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("aura-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("aura.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The project's mock upstream on 127.0.0.1, a free port.
pub fn start_mock(options: MockOptions) -> MockUpstream {
    MockUpstream::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), options)
        .expect("the mock upstream starts")
}

/// A loopback port with nothing listening on it (bound, then released).
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// A free loopback port below the kernel's ephemeral range, for a server that is stopped and
/// started again on it: an ephemeral port may be taken meanwhile by any outgoing connection
/// (another test's), one below the range only by a server that chose it.
pub fn restartable_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, span) = (10_000u16, low.saturating_sub(10_000).max(1));
    for _ in 0..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = from + (h.finish() % u64::from(span)) as u16;
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    dead_port()
}

/// Which monoio driver the spawned `aura` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// monoio's default: io_uring where the kernel allows it.
    IoUring,
    /// The epoll fallback, forced with `MONOIO_FORCE_LEGACY_DRIVER=1`.
    Epoll,
}

const FORCE_LEGACY: &str = "MONOIO_FORCE_LEGACY_DRIVER";

/// How to start `aura`: the harness's defaults plus what a test adds.
pub struct Launch {
    upstream_url: String,
    port: u16,
    workers: usize,
    driver: Driver,
    args: Vec<String>,
    env: Vec<(String, String)>,
    capture_stderr: bool,
}

impl Launch {
    /// `aura --port 0 --listen-addr 127.0.0.1 --upstream-url URL --workers 2 --pin-workers false`.
    pub fn new(upstream_url: &str, driver: Driver) -> Launch {
        Launch {
            upstream_url: upstream_url.to_string(),
            port: 0,
            workers: 2,
            driver,
            args: Vec::new(),
            env: Vec::new(),
            capture_stderr: false,
        }
    }

    pub fn port(mut self, port: u16) -> Launch {
        self.port = port;
        self
    }

    /// Worker threads (2 unless set).
    /// The node's name in a shared store (its journal holders and leases carry it).
    pub fn node_id(self, id: &str) -> Launch {
        self.arg("--node-id").arg(id)
    }

    pub fn workers(mut self, workers: usize) -> Launch {
        self.workers = workers;
        self
    }

    pub fn arg(mut self, arg: &str) -> Launch {
        self.args.push(arg.to_string());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Launch {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Collects `aura`'s stderr (its log) into [`Aura::stderr`] instead of passing it through.
    pub fn capture_stderr(mut self) -> Launch {
        self.capture_stderr = true;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aura"));
        let port = self.port.to_string();
        let workers = self.workers.to_string();
        cmd.args(["--port", &port, "--listen-addr", "127.0.0.1"]);
        // Empty: the upstreams come from a config file's [[upstreams]].
        if !self.upstream_url.is_empty() {
            cmd.args(["--upstream-url", &self.upstream_url]);
        }
        cmd.args(["--workers", &workers, "--pin-workers", "false"]);
        cmd.args(&self.args);
        // The shell's own settings must not reach the binary under test (UPSTREAM_URL beside a
        // config's [[upstreams]] is refused; a demo would replace the test's upstream).
        for name in ["UPSTREAM_URL", "AURA_DEMO", "MOCK_UPSTREAM"] {
            cmd.env_remove(name);
        }
        // Each aura its own state file for admin-made keys (the default one is shared by
        // every aura of the machine); a test that restarts one names its own.
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let state = std::env::temp_dir().join(format!("aura-keys-{}-{n}.json", std::process::id()));
        cmd.env("AURA_KEY_STATE_FILE", state);
        match self.driver {
            Driver::IoUring => cmd.env_remove(FORCE_LEGACY),
            Driver::Epoll => cmd.env(FORCE_LEGACY, "1"),
        };
        // Quiet by default (start-up and access lines at info would flood the test output);
        // AURA_LOG set for the test run passes through.
        if std::env::var_os("AURA_LOG").is_none() {
            cmd.env("AURA_LOG", "warn");
        }
        for (name, value) in &self.env {
            cmd.env(name, value);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Spawns `aura` and waits for its listening line.
    pub fn start(self) -> Aura {
        let mut cmd = self.command();
        let stderr_to = if self.capture_stderr {
            Stdio::piped()
        } else {
            Stdio::inherit()
        };
        cmd.stdout(Stdio::piped()).stderr(stderr_to);
        let mut child = cmd.spawn().expect("spawn the aura binary");
        let stdout = Lines::collect("stdout", child.stdout.take().unwrap());
        let stderr = child
            .stderr
            .take()
            .map(|pipe| Lines::collect("stderr", pipe));
        let deadline = Instant::now() + START_DEADLINE;
        let listening = stdout.wait_for(deadline, |lines| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(LISTENING))
                .map(str::to_string)
        });
        let Some(addr) = listening else {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "aura printed no {LISTENING:?} line within {START_DEADLINE:?} ({status:?}); stdout: {:?}",
                stdout.snapshot()
            );
        };
        let addr: SocketAddr = addr
            .trim()
            .trim_end_matches('/')
            .parse()
            .unwrap_or_else(|e| panic!("listening line {addr:?}: {e}"));
        Aura {
            child,
            addr,
            stdout,
            stderr,
        }
    }

    /// Runs `aura` expecting it to exit by itself (e.g. a refused start); kills it and panics
    /// if it is still running after `START_DEADLINE`.
    pub fn run_to_exit(self) -> Exit {
        run_with_deadline(self.command(), START_DEADLINE)
    }
}

/// A running `aura`, killed on drop.
pub struct Aura {
    child: Child,
    pub addr: SocketAddr,
    /// Everything it printed on stdout, the listening line included.
    pub stdout: Lines,
    /// Its log, when started with [`Launch::capture_stderr`].
    pub stderr: Option<Lines>,
}

impl Aura {
    /// `aura` with the harness's defaults in front of `upstream_url`.
    pub fn start(upstream_url: &str, driver: Driver) -> Aura {
        Launch::new(upstream_url, driver).start()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT/v1`, what an SDK takes as its base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// SIGTERM, then waits up to `limit` for the process to exit by itself.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        self.wait_exit(limit)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "aura did not exit within {limit:?}"
            );
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no signal handler runs, nothing is flushed; waits for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The captured log; panics unless started with [`Launch::capture_stderr`].
    pub fn log(&self) -> &Lines {
        self.stderr
            .as_ref()
            .expect("aura was started without Launch::capture_stderr")
    }
}

/// The lines a child process writes on one pipe, collected by a thread as they come.
#[derive(Clone)]
pub struct Lines {
    shared: Arc<(Mutex<LinesState>, Condvar)>,
}

#[derive(Default)]
struct LinesState {
    lines: Vec<String>,
    closed: bool,
}

impl Lines {
    /// Starts a thread that reads `pipe` to its end. Each line is also printed (prefixed with
    /// `name`), so it shows in the output of a failing test.
    fn collect(name: &'static str, pipe: impl Read + Send + 'static) -> Lines {
        let lines = Lines {
            shared: Arc::default(),
        };
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                println!("aura {name}: {line}");
                sink.state().lines.push(line);
                sink.shared.1.notify_all();
            }
            sink.state().closed = true;
            sink.shared.1.notify_all();
        });
        lines
    }

    fn state(&self) -> MutexGuard<'_, LinesState> {
        self.shared
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every line so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.state().lines.clone()
    }

    /// Waits until `check` finds what it looks for in the lines so far; `None` when the
    /// deadline passes or the pipe closes first.
    pub fn wait_for<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let mut state = self.state();
        loop {
            if let Some(found) = check(&state.lines) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.closed || left.is_zero() {
                return None;
            }
            state = self
                .shared
                .1
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Every line, once the writer closed the pipe (e.g. after the process ended); panics if it
    /// is still open after `limit`.
    pub fn all_when_closed(&self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut state = self.state();
        while !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "pipe still open after {limit:?}");
            state = self
                .shared
                .1
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        state.lines.clone()
    }

    /// Waits until at least `count` lines contain `needle`, and returns those lines; panics
    /// with every line seen if they do not appear within `limit`.
    pub fn wait_for_count(&self, needle: &str, count: usize, limit: Duration) -> Vec<String> {
        let found = self.wait_for(Instant::now() + limit, |lines| {
            let matching: Vec<String> = lines
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            (matching.len() >= count).then_some(matching)
        });
        found.unwrap_or_else(|| {
            panic!(
                "fewer than {count} lines with {needle:?} within {limit:?}:\n{}",
                self.snapshot().join("\n")
            )
        })
    }
}

impl Drop for Aura {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a process that was run to its end ended.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Exit {
    pub fn output(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` with its output captured; kills it and panics if it has not exited (closed its
/// output) within `limit`.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> Exit {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let (tx, rx) = mpsc::channel();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_tx = tx.clone();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = out_tx.send((1, text));
    });
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send((2, text));
    });
    let deadline = Instant::now() + limit;
    let (mut out, mut err) = (String::new(), String::new());
    for _ in 0..2 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((1, text)) => out = text,
            Ok((_, text)) => err = text,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{program} did not exit within {limit:?}; stdout so far: {out}; stderr so far: {err}");
            }
        }
    }
    let status = child.wait().unwrap();
    Exit {
        status,
        stdout: out,
        stderr: err,
    }
}

/// A response as the client read it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Names lower-case, in order.
    pub headers: Vec<(String, String)>,
    /// The body, chunked coding removed.
    pub body: Vec<u8>,
    /// The body's framing ended properly; false when the connection closed first.
    pub complete: bool,
    pub chunked: bool,
    /// When the request was written.
    pub sent_at: Instant,
    /// After each socket read that grew the decoded body: when, and the body's length then.
    pub arrivals: Vec<(Instant, usize)>,
}

/// One SSE event of a streamed body and when its last byte arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    /// The event's text, its blank line included.
    pub text: String,
}

impl Event {
    /// The `data:` payload of an event with one `data:` line (after any `event:` line).
    pub fn data(&self) -> &str {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .map_or("", str::trim)
    }

    /// The payload as JSON (`None` for `[DONE]` and other non-JSON payloads).
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(self.data()).ok()
    }

    /// The usage-only event OpenAI sends last: `"choices":[]` and a usage object.
    pub fn is_usage_only(&self) -> bool {
        self.json().is_some_and(|v| {
            v["choices"].as_array().is_some_and(|c| c.is_empty()) && v["usage"].is_object()
        })
    }
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }

    /// The body split into SSE events (at blank lines), each with its arrival time. Bytes after
    /// the last blank line (a truncated event) are left out.
    pub fn events(&self) -> Vec<Event> {
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(at) = find(&self.body[start..], b"\n\n") {
            let end = start + at + 2;
            let arrived = self
                .arrivals
                .iter()
                .find(|(_, len)| *len >= end)
                .map_or(self.sent_at, |(t, _)| *t);
            events.push(Event {
                at: arrived,
                text: String::from_utf8_lossy(&self.body[start..end]).into_owned(),
            });
            start = end;
        }
        events
    }

    /// Concatenated `delta.content` of a chat completion stream.
    pub fn streamed_content(&self) -> String {
        self.events()
            .iter()
            .filter_map(|e| e.json())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }

    /// Asserts an OpenAI-style error body: `{"error":{"message","type","code"}}`.
    pub fn assert_openai_error(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "status; body: {}", self.text());
        let v = self.json();
        let error = &v["error"];
        assert!(error["message"].is_string(), "error.message: {v}");
        assert!(error["type"].is_string(), "error.type: {v}");
        assert!(error.get("code").is_some(), "error.code: {v}");
        v
    }
}

/// A blocking HTTP/1.1 client on one connection; several requests may follow each other.
pub struct Client {
    stream: TcpStream,
    addr: SocketAddr,
    /// Bytes read past the previous response.
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            addr,
            buf: Vec::new(),
        }
    }

    pub fn get(&mut self, target: &str) -> Response {
        self.request("GET", target, &[], b"")
    }

    /// POST with `content-type: application/json` and a bearer key.
    pub fn post_json(&mut self, target: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let mut all = vec![
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-test"),
        ];
        all.extend_from_slice(headers);
        self.request("POST", target, &all, body.as_bytes())
    }

    /// Sends one request (with `host` and, for a body or a POST, `content-length`) and reads the
    /// whole response. A connection closed mid-body gives `complete: false`, not a panic.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let mut out = format!("{method} {target} HTTP/1.1\r\nhost: {}\r\n", self.addr).into_bytes();
        for (name, value) in headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        self.stream
            .write_all(&out)
            .unwrap_or_else(|e| panic!("write {method} {target}: {e}"));
        let sent_at = Instant::now();
        self.read_response(method, sent_at)
    }

    /// Writes raw bytes: a hand-made request, or part of one.
    pub fn send(&mut self, raw: &[u8]) {
        self.stream
            .write_all(raw)
            .unwrap_or_else(|e| panic!("write {} bytes: {e}", raw.len()));
    }

    /// Reads the next (final) response to a request made with `method`, e.g. after [`send`].
    ///
    /// [`send`]: Client::send
    pub fn receive(&mut self, method: &str) -> Response {
        self.read_response(method, Instant::now())
    }

    /// Reads raw bytes until they contain `needle` (or the peer closes); returns every
    /// unparsed byte read so far.
    pub fn read_until(&mut self, needle: &[u8]) -> &[u8] {
        while find(&self.buf, needle).is_none() && self.fill() > 0 {}
        &self.buf
    }

    /// Bytes read but not yet parsed into a response.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads until the peer closes the connection (bytes that come first are kept for
    /// [`receive`]); returns how long that took. Panics if it is still open after `limit`.
    ///
    /// [`receive`]: Client::receive
    pub fn wait_closed(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        let deadline = started + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "connection still open after {limit:?}; read so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut tmp = [0u8; 16 * 1024];
            match self.stream.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if e.kind() == ErrorKind::ConnectionReset
                        || e.kind() == ErrorKind::ConnectionAborted =>
                {
                    break
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        self.stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        started.elapsed()
    }

    fn read_response(&mut self, method: &str, sent_at: Instant) -> Response {
        let (status, headers) = loop {
            let (status, headers) = self.read_head();
            if !(100..200).contains(&status) {
                break (status, headers);
            }
        };
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
            complete: false,
            chunked: false,
            sent_at,
            arrivals: Vec::new(),
        };
        let te = response
            .header("transfer-encoding")
            .map(str::to_ascii_lowercase);
        let length = response
            .header("content-length")
            .map(|v| v.trim().parse::<usize>().unwrap());
        if method == "HEAD" || status == 204 || status == 304 {
            response.complete = true;
        } else if te.as_deref().is_some_and(|te| te.ends_with("chunked")) {
            response.chunked = true;
            self.read_chunked(&mut response);
        } else if let Some(length) = length {
            self.read_sized(&mut response, length);
        } else {
            self.read_to_close(&mut response);
        }
        response
    }

    /// Reads more bytes into `buf`; 0 when the peer closed (or reset) the connection.
    fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16 * 1024];
        match self.stream.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                n
            }
            Err(e)
                if e.kind() == ErrorKind::ConnectionReset
                    || e.kind() == ErrorKind::ConnectionAborted =>
            {
                0
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!(
                    "no response bytes for {READ_TIMEOUT:?} (have {} unparsed bytes)",
                    self.buf.len()
                )
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Reads one response head, an interim (1xx) one included: status and headers.
    pub fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head =
                    String::from_utf8(self.buf[..end].to_vec()).expect("response head is UTF-8");
                self.buf.drain(..end + 4);
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap();
                let mut parts = status_line.splitn(3, ' ');
                assert!(
                    parts.next().is_some_and(|v| v.starts_with("HTTP/1.")),
                    "status line {status_line:?}"
                );
                let status = parts
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("status line {status_line:?}"));
                let headers = lines
                    .map(|line| {
                        let (name, value) = line
                            .split_once(':')
                            .unwrap_or_else(|| panic!("header line {line:?}"));
                        (name.trim().to_ascii_lowercase(), value.trim().to_string())
                    })
                    .collect();
                return (status, headers);
            }
            if self.fill() == 0 {
                panic!(
                    "connection closed before a complete response head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    fn read_sized(&mut self, response: &mut Response, length: usize) {
        loop {
            if self.buf.len() >= length {
                response.body = self.buf.drain(..length).collect();
                response.arrivals.push((Instant::now(), length));
                response.complete = true;
                return;
            }
            if self.fill() == 0 {
                response.body = std::mem::take(&mut self.buf);
                return;
            }
        }
    }

    fn read_to_close(&mut self, response: &mut Response) {
        while self.fill() > 0 {
            response.arrivals.push((Instant::now(), self.buf.len()));
        }
        response.body = std::mem::take(&mut self.buf);
        response.complete = true;
    }

    fn read_chunked(&mut self, response: &mut Response) {
        loop {
            let before = response.body.len();
            let (used, done) = decode_chunks(&self.buf, &mut response.body);
            self.buf.drain(..used);
            if response.body.len() > before {
                response
                    .arrivals
                    .push((Instant::now(), response.body.len()));
            }
            if done {
                response.complete = true;
                return;
            }
            if self.fill() == 0 {
                return;
            }
        }
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    Client::connect(addr).request(method, target, headers, body)
}

/// Decodes the whole chunks at the start of `raw` into `out`. Returns the bytes used and whether
/// the last chunk (and its trailer section) was among them. A partial chunk is left unused.
fn decode_chunks(raw: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
    let mut pos = 0;
    loop {
        let rest = &raw[pos..];
        let Some(line_end) = find(rest, b"\r\n") else {
            return (pos, false);
        };
        let line = std::str::from_utf8(&rest[..line_end])
            .unwrap_or_else(|_| panic!("chunk size line is not UTF-8: {rest:?}"));
        let digits = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(digits, 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
        let data = line_end + 2;
        if size == 0 {
            // Trailer lines until an empty one.
            let mut p = data;
            loop {
                let Some(end) = find(&rest[p..], b"\r\n") else {
                    return (pos, false);
                };
                if end == 0 {
                    return (pos + p + 2, true);
                }
                p += end + 2;
            }
        }
        if rest.len() < data + size + 2 {
            return (pos, false);
        }
        assert_eq!(
            &rest[data + size..data + size + 2],
            b"\r\n",
            "chunk data not followed by CRLF"
        );
        out.extend_from_slice(&rest[data..data + size]);
        pos += data + size + 2;
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of the sample `series` in a scrape (name with its labels, exactly as exported).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes `/metrics` until `done` holds, or fails after 10 s with the last scrape.
pub fn scrape_until(aura: &Aura, done: impl Fn(&str) -> bool) -> String {
    scrape_within(aura, Duration::from_secs(10), done)
}

/// Scrapes `/metrics` (checking its status and content type) until `done` holds, or fails
/// after `limit` with the last scrape.
pub fn scrape_within(aura: &Aura, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    scrape_within_at(aura.addr, limit, done)
}

/// Scrapes `/metrics` at `addr` (Aura's port, or its control plane's) until `done` holds.
pub fn scrape_within_at(addr: SocketAddr, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let r = Client::connect(addr).get("/metrics");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = r.text();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never got there:\n{text}"
        );
        // A pause between scrapes, not a wait for state: the loop checks the state itself.
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// libfaketime's preload library (Debian's `faketime` package, which scripts/test installs).
pub fn libfaketime() -> std::path::PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists());
    found.expect("libfaketime is not installed: run scripts/test (it installs Debian's faketime)")
}

/// A node whose clock starts at `at` (UTC, `YYYY-MM-DD hh:mm:ss`) and runs from there.
pub fn at_time(launch: Launch, at: &str) -> Launch {
    launch
        .env("LD_PRELOAD", libfaketime().to_str().unwrap())
        .env("FAKETIME", &format!("@{at}"))
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("TZ", "UTC")
}

/// Asks `probe` every 20 ms until it answers; fails naming `what` (and its last answer)
/// after `limit`.
pub fn poll<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match probe() {
            Ok(answer) => return answer,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?} ({last})"
            ),
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// Waits until `done`; fails naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    poll(what, limit, || {
        if done() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
}
