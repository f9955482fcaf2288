//! A closed-loop load generator over keep-alive HTTP/1.1: each client sends a streamed chat
//! completion, reads the whole answer, and sends the next. Per request it records the time to
//! the first byte of the SSE body (TTFT) and to its end, in nanoseconds, in hdrhistograms.
//! Bounded twice: a total request count and a deadline. Loopback only (the harness passes
//! addresses it started itself). Each answer is checked: status 200, chunked framing, ends in
//! `data: [DONE]`, and no usage chunk (the clients never ask for one, so a proxy that injects
//! `include_usage` must strip it).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use aura::http::chunked::ChunkedDecoder;
use aura::net;
use hdrhistogram::Histogram;
use monoio::net::TcpStream;

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub clients: usize,
    /// Requests in all, over all clients.
    pub requests: u64,
    /// The run stops at this deadline even if requests remain.
    pub max_duration: Duration,
    pub chunks: usize,
    /// The pause before each content event, `delay_ms` or, when `delay_max_ms` is more, drawn
    /// from `delay_ms..=delay_max_ms` per event.
    pub delay_ms: u64,
    pub delay_max_ms: u64,
    /// Client starts are spread evenly over this span (0: all at once).
    pub stagger: Duration,
    /// Load generator threads (one monoio runtime each); clients are split among them.
    pub threads: usize,
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Nanoseconds from writing the request to the first body byte.
    pub ttft_ns: Histogram<u64>,
    /// Nanoseconds from writing the request to the end of the answer.
    pub total_ns: Histogram<u64>,
    pub completed: u64,
    pub errors: u64,
    /// Why the first failed request failed, to tell "refused" from "bad answer".
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl LoadResult {
    pub fn requests_per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line: counts, rate, TTFT p50/p99 and total p99.
    pub fn summary(&self) -> String {
        format!(
            "{} ok, {} errors, {:.0} req/s, ttft p50 {:.1} µs p99 {:.1} µs, total p99 {:.2} ms{}",
            self.completed,
            self.errors,
            self.requests_per_second(),
            self.ttft_ns.value_at_quantile(0.5) as f64 / 1e3,
            self.ttft_ns.value_at_quantile(0.99) as f64 / 1e3,
            self.total_ns.value_at_quantile(0.99) as f64 / 1e6,
            self.first_error
                .as_ref()
                .map(|e| format!(", first error: {e}"))
                .unwrap_or_default()
        )
    }
}

/// 1 ns .. 100 s at 3 significant figures; `saturating_record` clamps anything beyond.
#[allow(clippy::expect_used)]
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("constant bounds are valid")
}

/// Runs the load and waits for every client to finish.
pub fn run(spec: &LoadSpec) -> io::Result<LoadResult> {
    let threads = spec.threads.clamp(1, spec.clients.max(1));
    let started = Instant::now();
    let deadline = started + spec.max_duration;
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        // Clients [from, to) and the same proportion of the requests, so shares sum exactly.
        let (from, to) = (spec.clients * t / threads, spec.clients * (t + 1) / threads);
        let clients: Vec<usize> = (from..to).collect();
        let upto = |c: usize| spec.requests * c as u64 / spec.clients.max(1) as u64;
        let share = upto(to) - upto(from);
        let spec = spec.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("perf-load-{t}"))
                .spawn(move || -> io::Result<Tally> {
                    let mut rt = aura::runtime::build_runtime(
                        aura::runtime::io_driver::IoPlan::PLAIN_URING,
                    )?;
                    Ok(rt.block_on(thread_main(spec, clients, share, started, deadline)))
                })?,
        );
    }
    let mut total = Tally::new();
    for h in handles {
        let tally = h
            .join()
            .map_err(|_| io::Error::other("load thread panicked"))??;
        total.merge(tally);
    }
    Ok(LoadResult {
        ttft_ns: total.ttft,
        total_ns: total.total,
        completed: total.completed,
        errors: total.errors,
        first_error: total.first_error,
        elapsed: started.elapsed(),
    })
}

struct Tally {
    ttft: Histogram<u64>,
    total: Histogram<u64>,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ttft: histogram(),
            total: histogram(),
            completed: 0,
            errors: 0,
            first_error: None,
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.ttft.add(&other.ttft);
        let _ = self.total.add(&other.total);
        self.completed += other.completed;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn error(&mut self, e: &io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

async fn thread_main(
    spec: LoadSpec,
    clients: Vec<usize>,
    requests: u64,
    started: Instant,
    deadline: Instant,
) -> Tally {
    let tickets = Rc::new(Cell::new(requests));
    let request = Rc::new(request_bytes(&spec));
    let mut tasks = Vec::with_capacity(clients.len());
    for c in clients {
        let start_at = started + spec.stagger.mul_f64(c as f64 / spec.clients.max(1) as f64);
        let (tickets, request, target) = (tickets.clone(), request.clone(), spec.target);
        tasks.push(monoio::spawn(async move {
            let now = Instant::now();
            if start_at > now {
                monoio::time::sleep(start_at - now).await;
            }
            client(target, &request, &tickets, deadline).await
        }));
    }
    let mut tally = Tally::new();
    for task in tasks {
        tally.merge(task.await);
    }
    tally
}

fn take_ticket(tickets: &Cell<u64>, deadline: Instant) -> bool {
    let left = tickets.get();
    if left == 0 || Instant::now() >= deadline {
        return false;
    }
    tickets.set(left - 1);
    true
}

/// One client: a keep-alive connection, reopened after any failure.
async fn client(
    target: SocketAddr,
    request: &[u8],
    tickets: &Cell<u64>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut body = Vec::with_capacity(16 * 1024);
    while take_ticket(tickets, deadline) {
        let stream = match conn.take() {
            Some(s) => s,
            None => match connect(target).await {
                Ok(s) => s,
                Err(e) => {
                    tally.error(&e);
                    // Do not spin on a refused port.
                    monoio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let mut stream = stream;
        buf.clear();
        body.clear();
        let sent = Instant::now();
        match exchange(&mut stream, request, &mut buf, &mut body, sent).await {
            Ok(Exchange { ttft, keep_alive }) => {
                let total = sent.elapsed();
                tally.ttft.saturating_record(ttft.as_nanos() as u64);
                tally.total.saturating_record(total.as_nanos() as u64);
                tally.completed += 1;
                if keep_alive {
                    conn = Some(stream);
                }
            }
            Err(e) => tally.error(&e),
        }
    }
    tally
}

async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

struct Exchange {
    ttft: Duration,
    keep_alive: bool,
}

async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
    body: &mut Vec<u8>,
    sent: Instant,
) -> io::Result<Exchange> {
    let (res, _) = net::write_all(stream, request.to_vec()).await;
    res?;
    // The head.
    let (head_len, keep_alive) = loop {
        if net::read_more(stream, buf, 16 * 1024).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the response head",
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                if resp.code != Some(200) {
                    return Err(io::Error::other(format!("status {:?}", resp.code)));
                }
                let header = |name: &str| {
                    resp.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| h.value.to_ascii_lowercase())
                };
                if header("transfer-encoding").as_deref() != Some(b"chunked".as_slice()) {
                    return Err(io::Error::other("answer is not chunked"));
                }
                let close = header("connection").is_some_and(|v| v == b"close");
                break (n, !close);
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(io::Error::other(format!("bad response head: {e}"))),
        }
    };
    // The body: TTFT is stamped when the first decoded body byte is in hand.
    let mut decoder = ChunkedDecoder::default();
    let mut ttft = None;
    let mut pending = buf.split_off(head_len);
    loop {
        let decoded = decoder
            .decode(&pending, body)
            .map_err(|e| io::Error::other(format!("bad chunked body: {e}")))?;
        if ttft.is_none() && !body.is_empty() {
            ttft = Some(sent.elapsed());
        }
        pending.drain(..decoded.consumed);
        if decoded.done {
            break;
        }
        if net::read_more(stream, &mut pending, 16 * 1024).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed mid-body",
            ));
        }
    }
    check_answer(body)?;
    Ok(Exchange {
        ttft: ttft.unwrap_or_else(|| sent.elapsed()),
        keep_alive,
    })
}

/// The client never asks for usage, so it must never see a usage object.
fn check_answer(body: &[u8]) -> io::Result<()> {
    if !body.ends_with(b"data: [DONE]\n\n") {
        return Err(io::Error::other("answer does not end with data: [DONE]"));
    }
    if memchr::memmem::find(body, b"\"usage\":{").is_some() {
        return Err(io::Error::other(
            "a usage chunk reached a client that did not ask for it",
        ));
    }
    Ok(())
}

/// The request every client sends: a streamed chat completion without `stream_options`, as the
/// openai SDK sends `stream=True`.
pub fn request_bytes(spec: &LoadSpec) -> Vec<u8> {
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write one short sentence about latency."}],"max_tokens":64}"#;
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer sk-perf-0000000000000000\r\ncontent-type: application/json\r\naccept: text/event-stream\r\nuser-agent: aura-perf\r\nx-mock-chunks: {}\r\nx-mock-delay-ms: {}\r\ncontent-length: {}\r\n\r\n{body}",
        spec.target,
        spec.chunks,
        if spec.delay_max_ms > spec.delay_ms {
            format!("{}-{}", spec.delay_ms, spec.delay_max_ms)
        } else {
            spec.delay_ms.to_string()
        },
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream;

    fn spec(target: SocketAddr) -> LoadSpec {
        LoadSpec {
            target,
            clients: 4,
            requests: 41,
            max_duration: Duration::from_secs(20),
            chunks: 5,
            delay_ms: 0,
            delay_max_ms: 0,
            stagger: Duration::from_millis(20),
            threads: 2,
        }
    }

    #[test]
    fn every_request_completes_against_the_mock_and_is_timed() {
        let mock = upstream::start("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let r = run(&spec(mock)).unwrap();
        assert_eq!((r.completed, r.errors), (41, 0), "{:?}", r.first_error);
        assert_eq!(r.ttft_ns.len(), 41);
        assert!(r.ttft_ns.max() <= r.total_ns.max());
    }

    #[test]
    fn delayed_chunks_show_in_the_total_but_not_in_ttft() {
        let mock = upstream::start("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let r = run(&LoadSpec {
            clients: 2,
            requests: 4,
            chunks: 3,
            delay_ms: 30,
            delay_max_ms: 0,
            ..spec(mock)
        })
        .unwrap();
        assert_eq!((r.completed, r.errors), (4, 0), "{:?}", r.first_error);
        // 3 content chunks and the finish chunk, each 30 ms after the previous event.
        assert!(
            r.total_ns.min() >= 4 * 30_000_000,
            "total {} ns",
            r.total_ns.min()
        );
        assert!(r.ttft_ns.max() < 30_000_000, "ttft {} ns", r.ttft_ns.max());
    }

    #[test]
    fn a_refused_port_counts_errors_and_stops_at_the_request_bound() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let r = run(&LoadSpec {
            requests: 8,
            ..spec(closed)
        })
        .unwrap();
        assert_eq!((r.completed, r.errors), (0, 8));
        assert!(r.first_error.is_some());
    }

    #[test]
    fn answers_are_checked_for_a_leaked_usage_chunk_and_for_their_end() {
        let body = |usage| {
            let wire = upstream::answer(3, usage, 100).concat();
            let mut out = Vec::new();
            ChunkedDecoder::default().decode(&wire, &mut out).unwrap();
            out
        };
        assert!(check_answer(&body(false)).is_ok());
        assert!(check_answer(&body(true)).is_err());
        let cut = body(false);
        assert!(check_answer(&cut[..cut.len() - 3]).is_err());
    }
}
