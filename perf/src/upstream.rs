//! The benchmark's upstream: an OpenAI-shaped chat completion streamer that costs as little as
//! possible, so the proxy under test, not the mock, is what the numbers show. Every event is
//! built once per chunk count and then only written. The request picks the shape with headers
//! (`x-mock-chunks`; `x-mock-delay-ms`, a pause before each content event, `N` or a range
//! `N-M` drawn per event), which pass through every proxy unchanged; the usage chunk is sent
//! only when the body asks for `stream_options.include_usage`, as OpenAI does.
//!
//! Each event is its own write, as real providers write them (a proxy then reads each
//! separately). `x-mock-write: whole-answer` writes an answer without pauses in one write
//! instead: the mode the harness used before issue 11, kept for comparison.
//! One monoio runtime per thread, SO_REUSEPORT listeners, keep-alive.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use aura::http::chunked::{encode_chunk, LAST_CHUNK};
use aura::net;
use monoio::net::{TcpListener, TcpStream};

const MODEL: &str = "gpt-4o-mini-2024-07-18";
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_BODY_BYTES: usize = 1024 * 1024;
const MAX_CHUNKS: usize = 10_000;

/// Starts `threads` serving threads on `addr` (port 0 picks one) and returns the bound address.
pub fn start(addr: SocketAddr, threads: usize) -> io::Result<SocketAddr> {
    let (listeners, bound, lock) = aura::runtime::bind_listeners(addr, threads)
        .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, e.to_string()))?;
    // The port lock lives as long as the process: the mock never stops on its own.
    std::mem::forget(lock);
    for (id, listener) in listeners.into_iter().enumerate() {
        std::thread::Builder::new()
            .name(format!("perf-mock-{id}"))
            .spawn(move || {
                let mut rt = match aura::runtime::build_runtime(
                    aura::runtime::io_driver::IoPlan::PLAIN_URING,
                ) {
                    Ok(rt) => rt,
                    Err(e) => return eprintln!("perf mock: no runtime: {e}"),
                };
                rt.block_on(serve(listener));
            })?;
    }
    Ok(bound)
}

async fn serve(listener: std::net::TcpListener) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return eprintln!("perf mock: cannot adopt listener: {e}"),
    };
    let streams = Rc::new(std::cell::RefCell::new(Streams::default()));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let streams = streams.clone();
                monoio::spawn(async move {
                    let _ = connection(stream, streams).await;
                });
            }
            Err(e) => {
                eprintln!("perf mock: accept: {e}");
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One request's shape, read from its head and body.
struct Ask {
    chunks: usize,
    /// The pause before each content event: from `delay` to `delay_max` (equal: fixed).
    delay: Duration,
    delay_max: Duration,
    usage: bool,
    prompt_bytes: usize,
    /// `x-mock-write: whole-answer`: an answer without pauses goes in one write.
    whole_answer: bool,
}

/// `N` or `N-M` milliseconds.
fn delay_range(value: &str) -> Option<(Duration, Duration)> {
    let ms = |v: &str| v.trim().parse::<u64>().ok().map(Duration::from_millis);
    match value.split_once('-') {
        Some((low, high)) => {
            let (low, high) = (ms(low)?, ms(high)?);
            (low <= high).then_some((low, high))
        }
        None => ms(value).map(|d| (d, d)),
    }
}

/// A pause drawn from `low..=high` (xorshift: cheap, and different per connection).
fn draw(low: Duration, high: Duration, state: &mut u64) -> Duration {
    if high <= low {
        return low;
    }
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let span = (high - low).as_micros() as u64 + 1;
    low + Duration::from_micros(*state % span)
}

async fn connection(
    mut stream: TcpStream,
    streams: Rc<std::cell::RefCell<Streams>>,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut jitter = (std::ptr::addr_of!(buf) as u64) | 1;
    loop {
        let Some((ask, used)) = read_request(&mut stream, &mut buf).await? else {
            return Ok(());
        };
        buf.drain(..used);
        let events = streams
            .borrow_mut()
            .get(ask.chunks, ask.usage, ask.prompt_bytes);
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        if ask.whole_answer && ask.delay_max.is_zero() {
            for event in events.iter() {
                out.extend_from_slice(event);
            }
            net::write_all(&mut stream, out).await.0?;
            continue;
        }
        // Head and role chunk in one write, then each event in its own write, after a pause
        // before each content chunk and the finish chunk; the usage chunk and `[DONE]` follow
        // the finish chunk at once, as OpenAI sends them.
        for (i, event) in events.iter().enumerate() {
            if i > 0 && i <= ask.chunks + 1 && !ask.delay_max.is_zero() {
                monoio::time::sleep(draw(ask.delay, ask.delay_max, &mut jitter)).await;
            }
            out.extend_from_slice(event);
            let (res, back) = net::write_all(&mut stream, out).await;
            res?;
            out = back;
            out.clear();
        }
    }
}

/// Reads one request; `None` when the peer closed between requests.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<Option<(Ask, usize)>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let mut ask = Ask {
                    chunks: 20,
                    delay: Duration::ZERO,
                    delay_max: Duration::ZERO,
                    usage: false,
                    prompt_bytes: 0,
                    whole_answer: false,
                };
                let mut body_len = 0;
                for h in req.headers.iter() {
                    let value = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        body_len = value.parse().map_err(|_| bad("content-length"))?;
                    } else if h.name.eq_ignore_ascii_case("x-mock-chunks") {
                        ask.chunks = value.parse().map_err(|_| bad("x-mock-chunks"))?;
                    } else if h.name.eq_ignore_ascii_case("x-mock-delay-ms") {
                        (ask.delay, ask.delay_max) =
                            delay_range(value).ok_or_else(|| bad("x-mock-delay-ms"))?;
                    } else if h.name.eq_ignore_ascii_case("x-mock-write") {
                        ask.whole_answer = value.eq_ignore_ascii_case("whole-answer");
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(bad(
                            "chunked request bodies are not supported by the perf mock",
                        ));
                    }
                }
                if body_len > MAX_BODY_BYTES || ask.chunks > MAX_CHUNKS {
                    return Err(bad("request too large"));
                }
                while buf.len() < head_len + body_len {
                    if net::read_more(stream, buf, 16 * 1024).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                let body = &buf[head_len..head_len + body_len];
                ask.usage = asks_for_usage(body);
                ask.prompt_bytes = body_len;
                return Ok(Some((ask, head_len + body_len)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {
                if net::read_more(stream, buf, 16 * 1024).await? == 0 {
                    return if buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    };
                }
            }
            Ok(httparse::Status::Partial) | Err(_) => return Err(bad("malformed request head")),
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// `"include_usage"`, optional spaces, `:`, optional spaces, `true`.
pub fn asks_for_usage(body: &[u8]) -> bool {
    let Some(at) = memchr::memmem::find(body, b"\"include_usage\"") else {
        return false;
    };
    let rest = &body[at + b"\"include_usage\"".len()..];
    let rest = skip_spaces(rest);
    rest.first() == Some(&b':') && skip_spaces(&rest[1..]).starts_with(b"true")
}

fn skip_spaces(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

/// The chunk-framed events of one answer.
type Events = Rc<Vec<Vec<u8>>>;

/// Answers built once per (chunks, usage asked, prompt bytes).
#[derive(Default)]
struct Streams {
    built: HashMap<(usize, bool, usize), Events>,
}

impl Streams {
    fn get(&mut self, chunks: usize, usage: bool, prompt_bytes: usize) -> Events {
        self.built
            .entry((chunks, usage, prompt_bytes))
            .or_insert_with(|| Rc::new(answer(chunks, usage, prompt_bytes)))
            .clone()
    }
}

/// One streamed answer as OpenAI sends it: a role chunk, `chunks` content chunks, a finish
/// chunk, the usage chunk when asked (then every chunk also carries `"usage":null`), `[DONE]`.
pub fn answer(chunks: usize, usage: bool, prompt_bytes: usize) -> Vec<Vec<u8>> {
    let null_usage = if usage { ",\"usage\":null" } else { "" };
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-perf\",\"object\":\"chat.completion.chunk\",\"created\":1732000000,\"model\":\"{MODEL}\",\"system_fingerprint\":\"fp_perf\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{null_usage}}}\n\n"
        )
    };
    let mut events = vec![chunk("{\"role\":\"assistant\",\"content\":\"\"}", "null")];
    for i in 0..chunks {
        events.push(chunk(&format!("{{\"content\":\"tok{i} \"}}"), "null"));
    }
    events.push(chunk("{}", "\"stop\""));
    if usage {
        let prompt = prompt_bytes / 4;
        events.push(format!(
            "data: {{\"id\":\"chatcmpl-perf\",\"object\":\"chat.completion.chunk\",\"created\":1732000000,\"model\":\"{MODEL}\",\"system_fingerprint\":\"fp_perf\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{chunks},\"total_tokens\":{}}}}}\n\n",
            prompt + chunks
        ));
    }
    let mut framed: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            let mut out = Vec::with_capacity(e.len() + 12);
            encode_chunk(e.as_bytes(), &mut out);
            out
        })
        .collect();
    let mut done = Vec::new();
    encode_chunk(b"data: [DONE]\n\n", &mut done);
    done.extend_from_slice(LAST_CHUNK);
    framed.push(done);
    framed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_is_a_number_or_a_range_and_draws_stay_in_it() {
        let ms = Duration::from_millis;
        assert_eq!(delay_range("20"), Some((ms(20), ms(20))));
        assert_eq!(delay_range("10-40"), Some((ms(10), ms(40))));
        assert_eq!(delay_range("40-10"), None);
        assert_eq!(delay_range("x"), None);
        let mut state = 12345;
        let drawn: Vec<Duration> = (0..1000)
            .map(|_| draw(ms(10), ms(40), &mut state))
            .collect();
        assert!(drawn.iter().all(|d| *d >= ms(10) && *d <= ms(40)));
        assert!(drawn.iter().any(|d| *d < ms(20)) && drawn.iter().any(|d| *d > ms(30)));
    }

    #[test]
    fn usage_is_asked_only_by_a_true_include_usage() {
        assert!(asks_for_usage(
            br#"{"stream_options":{"include_usage":true}}"#
        ));
        assert!(asks_for_usage(
            br#"{"stream_options": {"include_usage" :  true}}"#
        ));
        assert!(!asks_for_usage(
            br#"{"stream_options":{"include_usage":false}}"#
        ));
        assert!(!asks_for_usage(br#"{"stream":true}"#));
    }

    #[test]
    fn an_answer_scans_to_its_usage_in_aura() {
        let events = answer(3, true, 400);
        let mut body = Vec::new();
        let mut decoder = aura::http::chunked::ChunkedDecoder::default();
        let wire: Vec<u8> = events.concat();
        let decoded = decoder.decode(&wire, &mut body).unwrap();
        assert!(decoded.done);
        let mut scanner = aura::sse::UsageScanner::default();
        scanner.feed(&body);
        scanner.finish();
        let found = scanner.found().unwrap();
        assert_eq!(found.usage.prompt_tokens, 100);
        assert_eq!(found.usage.completion_tokens, 3);
        assert!(body.ends_with(b"data: [DONE]\n\n"));
    }
}
