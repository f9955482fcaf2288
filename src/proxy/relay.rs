//! The byte pump upstream → client. Each upstream read is de-framed, re-framed as the client's
//! own response (chunked, or content-length when the body passes unchanged) and written at once:
//! write first, observe second. The scanner then walks the same payload for the usage event; a
//! JSON body's usage members are kept as they pass (usage/body.rs), read at its end. A client
//! that leaves mid-stream (or stops reading for `client_send`) stops getting writes, but the
//! upstream is still read (bounded in bytes and time) so the usage that bills the request is
//! not lost.

use std::cell::Cell;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, StatusCode};
use memchr::memmem::Finder;
use monoio::io::{AsyncReadRent, AsyncWriteRent};

use crate::buffers::BufPool;
use crate::config::upstreams::Api;
use crate::config::Timeouts;
use crate::error::Error;
use crate::http::chunked::{self, ChunkedDecoder};
use crate::http::{self as h1, Framing, ResponseHead};
use crate::net::{self, Timed};
use crate::server::Persist;
use crate::sse::scan::positions;
use crate::sse::{SharedParse, UsageOnlyStripper, UsageScanner};
use crate::usage::body::BodyUsage;
use crate::usage::Found;

/// Room made for each upstream read: at first a page, enough for any SSE event, so a stream
/// waiting on its upstream holds a small buffer (1000 streams: resident memory 43 → 29 MiB,
/// perf/RESULTS.md); a read that fills the room doubles it for the next, up to the most.
pub const READ_BUF_BYTES: usize = 4 * 1024;
const READ_BUF_MAX_BYTES: usize = 16 * 1024;
/// After the client left: how much more of the upstream response is read to reach the usage.
const DRAIN_MAX_BYTES: usize = 8 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(30);

/// A worker's count of responses still read after their client left, and its bound: past it, a
/// response whose client leaves is abandoned (and billed its whole reservation) rather than read.
#[derive(Debug)]
pub struct Drains {
    active: Cell<usize>,
    max: usize,
}

impl Drains {
    pub fn new(max: usize) -> Drains {
        Drains {
            active: Cell::new(0),
            max,
        }
    }

    fn begin(&self) -> Option<DrainSlot<'_>> {
        let n = self.active.get();
        (n < self.max).then(|| {
            self.active.set(n + 1);
            DrainSlot(&self.active)
        })
    }
}

/// What a worker's relays share.
#[derive(Clone, Copy)]
pub struct Worker<'a> {
    pub pool: &'a BufPool,
    pub drains: &'a Drains,
}

/// One drain in progress; ends when dropped.
struct DrainSlot<'a>(&'a Cell<usize>);

impl Drop for DrainSlot<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    EventStream,
    Json,
    Other,
}

impl BodyKind {
    pub fn of(headers: &HeaderMap) -> BodyKind {
        let Some(ct) = headers.get(header::CONTENT_TYPE) else {
            return BodyKind::Other;
        };
        let ct = ct.as_bytes();
        let is = |prefix: &[u8]| {
            ct.len() >= prefix.len() && ct[..prefix.len()].eq_ignore_ascii_case(prefix)
        };
        if is(b"text/event-stream") {
            BodyKind::EventStream
        } else if is(b"application/json") {
            BodyKind::Json
        } else {
            BodyKind::Other
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientFraming {
    /// The body passes unchanged under the upstream's Content-Length (or is empty).
    AsIs,
    Chunked,
    /// HTTP/1.0 client and a body of unknown length: ends when the connection closes.
    Close,
}

pub struct RelayEnd {
    pub usage: Option<Found>,
    /// Body bytes read from the upstream (de-framed), for estimating a usage that never came.
    pub body_bytes: u64,
    /// The client left and the rest of the response was not read (drain bounds reached).
    pub abandoned: bool,
    pub first_byte_overhead: Option<Duration>,
    pub ttft: Option<Duration>,
    pub error: Option<Error>,
    pub upstream_reusable: bool,
    pub client_persist: Persist,
}

pub struct Relay {
    client_head: Vec<u8>,
    upstream_framing: Framing,
    client_framing: ClientFraming,
    kind: BodyKind,
    strip: Option<UsageOnlyStripper>,
    /// Set with `strip`: the stripper's parse of the usage-only event, reused by the scanner.
    shared_parse: Option<SharedParse>,
    upstream_keep_alive: bool,
    client_keep_alive: bool,
    /// The answer is Anthropic's Messages: its usage is read as Anthropic tells it.
    anthropic: bool,
}

impl Relay {
    pub fn new(
        head: &ResponseHead,
        framing: Framing,
        kind: BodyKind,
        strip_usage_event: bool,
        keep_alive: bool,
        client_http11: bool,
    ) -> Relay {
        let client_framing = match framing {
            Framing::Empty => ClientFraming::AsIs,
            Framing::Length(_) if !strip_usage_event => ClientFraming::AsIs,
            _ if client_http11 => ClientFraming::Chunked,
            _ => ClientFraming::Close,
        };
        let client_keep_alive = keep_alive && client_framing != ClientFraming::Close;
        let mut out = Vec::with_capacity(512);
        h1::write_status_line(head.status, &mut out);
        h1::write_end_to_end_headers(&head.headers, &mut out);
        match (client_framing, framing) {
            (ClientFraming::AsIs, Framing::Length(n)) => {
                h1::write_header("content-length", n.to_string().as_bytes(), &mut out)
            }
            (ClientFraming::AsIs, _) => write_empty_body_length(head, &mut out),
            (ClientFraming::Chunked, _) => {
                h1::write_header("transfer-encoding", b"chunked", &mut out)
            }
            (ClientFraming::Close, _) => {}
        }
        if !client_keep_alive {
            h1::write_header("connection", b"close", &mut out);
        }
        out.extend_from_slice(b"\r\n");
        let shared_parse = strip_usage_event.then(SharedParse::default);
        Relay {
            client_head: out,
            upstream_framing: framing,
            client_framing,
            kind,
            strip: shared_parse.clone().map(UsageOnlyStripper::sharing),
            shared_parse,
            upstream_keep_alive: h1::keep_alive(head.minor_version, &head.headers),
            client_keep_alive,
            anthropic: false,
        }
    }

    /// The API the answer speaks: Anthropic's Messages usage sits in its own events and
    /// fields (usage/anthropic.rs).
    pub fn speaking(mut self, api: Api) -> Relay {
        self.anthropic = api == Api::Anthropic;
        self
    }

    /// Pumps the body. `buffered` holds body bytes read together with the response head; it and
    /// every buffer the relay needs come from, and go back to, the worker's pool. When the
    /// answer ends (the body's end, or a stream's `[DONE]` / `response.completed`, where an SSE
    /// client stops reading), `before_last_write` sees its usage before the client gets those
    /// bytes: billing happens there, so a client that has its whole answer was billed for it.
    #[allow(clippy::too_many_arguments)]
    pub async fn run<U, S>(
        mut self,
        upstream: &mut U,
        client: &mut S,
        buffered: Vec<u8>,
        worker: Worker<'_>,
        timeouts: Timeouts,
        started: Instant,
        before_last_write: &mut dyn FnMut(&RelayEnd),
    ) -> RelayEnd
    where
        U: AsyncReadRent,
        S: AsyncWriteRent,
    {
        let Worker { pool, drains } = worker;
        let mut input = buffered;
        let mut read_room = READ_BUF_BYTES;
        let mut read_at = Instant::now();
        // payload, stripped and out are taken from the pool for each upstream read and given
        // back before the next read: a stream waiting on its upstream holds only its read buffer.
        let mut out = pool.take();
        out.extend_from_slice(&self.client_head);
        let mut payload = Vec::new();
        let mut stripped = Vec::new();
        let mut scanner = match self.shared_parse.take() {
            Some(shared) => UsageScanner::sharing(shared),
            None if self.anthropic => UsageScanner::anthropic(),
            None => UsageScanner::default(),
        };
        let mut json = BodyUsage::default();
        let mut decoder = ChunkedDecoder::default();
        let mut remaining = match self.upstream_framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut end = RelayEnd {
            usage: None,
            body_bytes: 0,
            abandoned: false,
            first_byte_overhead: None,
            ttft: None,
            error: None,
            upstream_reusable: false,
            client_persist: Persist::Close,
        };
        let mut client_alive = true;
        let mut drained_bytes = 0usize;
        let mut drain_slot = None;
        let mut drain_deadline = None;
        let mut trailing_garbage = false;
        let mut closed_by_upstream = false;
        let mut send_timed_out = false;
        let send_timer = monoio::time::sleep(timeouts.client_send);
        let mut send_timer = std::pin::pin!(send_timer);
        // One timer for every upstream read of the answer (see `net::read_more_by`).
        let read_timer = monoio::time::sleep(timeouts.upstream_read);
        let mut read_timer = std::pin::pin!(read_timer);
        // `before_last_write` has run.
        let mut billed = false;
        loop {
            // 1. De-frame what came in.
            take_if_lent(&mut payload, pool);
            payload.clear();
            let done = match self.upstream_framing {
                Framing::Empty => {
                    // A 204, a 304 or an answer to HEAD has no body: bytes after its head are not
                    // this response's (and the connection must not serve another request).
                    trailing_garbage |= !input.is_empty();
                    true
                }
                Framing::Length(_) => {
                    let take = input.len().min(remaining as usize);
                    payload.extend_from_slice(&input[..take]);
                    trailing_garbage |= take < input.len();
                    remaining -= take as u64;
                    remaining == 0
                }
                Framing::Chunked => match decoder.decode(&input, &mut payload) {
                    Ok(decoded) => {
                        trailing_garbage |= decoded.consumed < input.len();
                        decoded.done
                    }
                    Err(_) => {
                        end.error = Some(Error::UpstreamProtocol("invalid chunked encoding"));
                        break;
                    }
                },
                Framing::UntilClose => {
                    payload.extend_from_slice(&input);
                    closed_by_upstream
                }
            };
            input.clear();

            // 2. Forward: one write per upstream read, head included the first time.
            if client_alive {
                take_if_lent(&mut out, pool);
                let forward: &[u8] = match self.strip.as_mut() {
                    Some(stripper) => {
                        take_if_lent(&mut stripped, pool);
                        stripped.clear();
                        stripper.push(&payload, &mut stripped);
                        if done {
                            stripper.finish(&mut stripped);
                        }
                        &stripped
                    }
                    None => &payload,
                };
                match self.client_framing {
                    ClientFraming::Chunked => {
                        chunked::encode_chunk(forward, &mut out);
                        if done {
                            out.extend_from_slice(chunked::LAST_CHUNK);
                        }
                    }
                    ClientFraming::AsIs | ClientFraming::Close => out.extend_from_slice(forward),
                }
            }

            // The read that ends the answer (the body's end; for a stream, its `[DONE]` or its
            // `response.completed`, which is where an SSE client stops reading) is observed before
            // it is written: the request is billed before its client has it all. Every other
            // read is written first and observed second.
            let mut observed = false;
            let ending = if done {
                Ending::Body
            } else if self.kind == BodyKind::EventStream && !billed {
                ending_of(&payload)
            } else {
                Ending::Not
            };
            if ending != Ending::Not {
                self.observe(&payload, &mut scanner, &mut json, &mut end);
                observed = true;
                let usage = match ending {
                    Ending::Body => self.usage_found(&mut scanner, &mut json, true),
                    _ => scanner.found().cloned(),
                };
                // A `response.completed` split across reads is not in `usage` yet: the body's
                // end (or a later read) bills it.
                let ready = ending != Ending::Completed || usage.is_some();
                if ready {
                    end.usage = usage;
                }
                if ready && !billed {
                    before_last_write(&end);
                    billed = true;
                }
            }

            if client_alive && !out.is_empty() {
                // The send timer is re-armed only once a quarter of it is used up: a write the
                // client does not take is cut between 3/4 of `client_send` and all of it, and a
                // stream pays for no timer per write.
                let write_by = monoio::time::Instant::from_std(read_at + timeouts.client_send);
                if send_timer.deadline() < write_by - timeouts.client_send / 4 {
                    send_timer.as_mut().reset(write_by);
                }
                // None: the timer fired first (the cancelled write took the buffer).
                let written = monoio::select! {
                    done = net::write_all(client, std::mem::take(&mut out)) => Some(done),
                    _ = &mut send_timer => None,
                };
                let sent = match written {
                    Some((result, back)) => {
                        out = back;
                        out.clear();
                        result.is_ok()
                    }
                    None => {
                        send_timed_out = true;
                        false
                    }
                };
                if !sent {
                    // Gone, or not reading (a full socket for `client_send`): from here the
                    // upstream is drained for the usage, and the client gets nothing more.
                    client_alive = false;
                    drain_deadline = Some(Instant::now() + DRAIN_MAX_TIME);
                    drain_slot = drains.begin();
                } else if end.first_byte_overhead.is_none() && !payload.is_empty() {
                    end.first_byte_overhead = Some(read_at.elapsed());
                    end.ttft = Some(started.elapsed());
                }
            }

            if done {
                break;
            }
            // 3. Observe the same bytes.
            if !observed {
                self.observe(&payload, &mut scanner, &mut json, &mut end);
            }
            if !client_alive {
                drained_bytes += payload.len();
                if drain_slot.is_none()
                    || drained_bytes > DRAIN_MAX_BYTES
                    || drain_deadline.is_some_and(|d| Instant::now() > d)
                {
                    // The client's doing, not the upstream's.
                    end.error = Some(if send_timed_out {
                        Error::ClientSendTimeout
                    } else {
                        Error::ClientGone
                    });
                    end.abandoned = true;
                    break;
                }
            }

            for buf in [&mut payload, &mut stripped, &mut out] {
                pool.give(std::mem::take(buf));
            }

            // 4. Read more.
            let read_by = monoio::time::Instant::now() + timeouts.upstream_read;
            match net::read_more_by(
                upstream,
                &mut input,
                read_room,
                read_timer.as_mut(),
                read_by,
            )
            .await
            {
                Timed::Done(Ok(0)) | Timed::Done(Err(_))
                    if self.upstream_framing == Framing::UntilClose =>
                {
                    closed_by_upstream = true
                }
                Timed::Done(Ok(0)) | Timed::Done(Err(_)) => {
                    end.error = Some(Error::UpstreamReset);
                    break;
                }
                Timed::Done(Ok(n)) => {
                    read_at = Instant::now();
                    if n >= read_room {
                        read_room = (read_room * 2).min(READ_BUF_MAX_BYTES);
                    }
                }
                Timed::TimedOut => {
                    end.error = Some(Error::UpstreamTimeout);
                    break;
                }
            }
        }
        drop(drain_slot);
        let complete = end.error.is_none();
        if !complete {
            end.usage = self.usage_found(&mut scanner, &mut json, false);
        } else if send_timed_out {
            end.error = Some(Error::ClientSendTimeout);
        }
        for buf in [input, out, payload, stripped] {
            pool.give(buf);
        }
        end.upstream_reusable = complete
            && !trailing_garbage
            && self.upstream_keep_alive
            && self.upstream_framing != Framing::UntilClose;
        end.client_persist = if complete && client_alive && self.client_keep_alive {
            Persist::KeepAlive
        } else {
            Persist::Close
        };
        end
    }
}

impl Relay {
    /// Feeds one read's payload to whatever reads the usage.
    fn observe(
        &self,
        payload: &[u8],
        scanner: &mut UsageScanner,
        json: &mut BodyUsage,
        end: &mut RelayEnd,
    ) {
        end.body_bytes += payload.len() as u64;
        match self.kind {
            BodyKind::EventStream => scanner.feed(payload),
            BodyKind::Json => json.feed(payload),
            BodyKind::Other => {}
        }
    }

    /// The usage the body carried: a stream's last usage event (even if the stream broke
    /// after it), a JSON body's `usage` (only once the body is complete).
    fn usage_found(
        &self,
        scanner: &mut UsageScanner,
        json: &mut BodyUsage,
        complete: bool,
    ) -> Option<Found> {
        match self.kind {
            BodyKind::EventStream => {
                scanner.finish();
                scanner.found().cloned()
            }
            BodyKind::Json if complete && self.anthropic => json.finish_anthropic(),
            BodyKind::Json if complete => json.finish(),
            BodyKind::Json | BodyKind::Other => None,
        }
    }
}

/// Where a read stands in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Not,
    /// The body ends with it.
    Body,
    /// A stream's `data: [DONE]`: an SSE client stops reading there.
    Done,
    /// A Responses API stream's `response.completed` event (its last, with the usage), or an
    /// Anthropic stream's `message_stop` (its last, after the usage of its `message_delta`).
    Completed,
}

static DONE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"[DONE]"));
static COMPLETED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"response.completed"));
static MESSAGE_STOP: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"message_stop"));

/// Whether an event-stream payload carries the end of the answer: a line `data: [DONE]`,
/// `event: response.completed` or (Anthropic's) `event: message_stop`. A line, not text: what a model writes sits inside a JSON string,
/// where a raw line break cannot follow it.
fn ending_of(payload: &[u8]) -> Ending {
    if has_line(payload, &DONE, b"data:") {
        Ending::Done
    } else if has_line(payload, &COMPLETED, b"event:")
        || has_line(payload, &MESSAGE_STOP, b"event:")
    {
        Ending::Completed
    } else {
        Ending::Not
    }
}

/// Whether `payload` has a line `FIELD VALUE` (`FIELD` then optional spaces, then the value
/// `finder` looks for), ended by a line break.
fn has_line(payload: &[u8], finder: &Finder<'static>, field: &[u8]) -> bool {
    let value = finder.needle();
    positions(finder, payload).any(|at| {
        let ended = matches!(payload.get(at + value.len()), Some(b'\n' | b'\r'));
        let before = payload[..at].trim_ascii_end();
        let line_start = before.len().checked_sub(field.len()).is_some_and(|start| {
            &before[start..] == field && (start == 0 || matches!(before[start - 1], b'\n' | b'\r'))
        });
        ended && line_start
    })
}

/// A buffer given back to the pool while the relay waited is taken again before use; one still
/// held (the first write's, which starts with the response head) is left as it is.
fn take_if_lent(buf: &mut Vec<u8>, pool: &BufPool) {
    if buf.capacity() == 0 {
        *buf = pool.take();
    }
}

/// For a response without a body: one whose upstream said `content-length` keeps it (0, or for
/// HEAD and 304 the entity's length); 204 has none; an answer to HEAD or a 304 without one gets
/// none either (the client knows no body follows; a 0 would misstate the entity's size).
fn write_empty_body_length(head: &ResponseHead, out: &mut Vec<u8>) {
    if head.status == StatusCode::NO_CONTENT || head.status.is_informational() {
        return;
    }
    if let Some(v) = head.headers.get(header::CONTENT_LENGTH) {
        h1::write_header("content-length", v.as_bytes(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_stream_is_a_line_not_text() {
        assert_eq!(ending_of(b"data: {}\n\ndata: [DONE]\n\n"), Ending::Done);
        assert_eq!(ending_of(b"data:[DONE]\r\n\r\n"), Ending::Done);
        assert_eq!(
            ending_of(b"event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n"),
            Ending::Completed
        );
        assert_eq!(
            ending_of(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
            Ending::Completed
        );
        // A model that writes the words: inside a JSON string, no raw line break follows.
        for text in [
            &b"data: {\"choices\":[{\"delta\":{\"content\":\"data: [DONE]\"}}]}\n\n"[..],
            b"data: {\"type\":\"response.completed\"}\n\n",
            b"[DONE]\"}}]}\n\n",
            b"data: x [DONE]\n",
        ] {
            assert_eq!(
                ending_of(text),
                Ending::Not,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }
}
