//! The HTTP/1.1 keep-alive connection loop: reads a request head (bounded in size, header count
//! and time), handles `Expect: 100-continue`, reads the body (content-length or chunked, bounded),
//! and hands the whole request to a [`Handler`] that writes the response itself. Knows nothing of
//! routes, budgets or SSE. Malformed or oversize requests get an OpenAI-style error and a close.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use monoio::time::Instant;

use http::StatusCode;
use monoio::io::{AsyncReadRent, AsyncWriteRent};

use crate::config::{Limits, Timeouts};
use crate::error::Error;
use crate::http::chunked::ChunkedDecoder;
pub use crate::http::Reply;
use crate::http::{self as h1, Framing, RequestHead};
use crate::net::{self, Timed};

/// Room made for each read of a request head: an SDK's head and a small body fit in one page, and
/// a connection's buffer stays that small while it waits (16 KiB cost ~8 KiB of RSS per open
/// connection: glibc touches a chunk's first and last pages).
const READ_SPARE: usize = 4 * 1024;
/// Room made for each read of a chunked request body (a sized body reads what is left, up to 1 MiB).
const BODY_READ_SPARE: usize = 64 * 1024;

pub struct Request {
    pub head: RequestHead,
    pub body: Vec<u8>,
}

/// What the connection does after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    KeepAlive,
    Close,
}

/// Writes one response to `client`. The request's keep-alive wish is already folded into
/// `keep_alive`; the handler returns `Close` when the response could not be completed.
pub trait Handler<S> {
    fn handle(
        &self,
        request: Request,
        keep_alive: bool,
        client: &mut S,
    ) -> impl Future<Output = Persist>;

    /// A request refused before it could be handled (malformed, too large, too slow): the
    /// server answers it; this lets the handler account for it.
    fn refused(&self, error: &Error) {
        let _ = error;
    }
}

/// Serves requests on one connection until it closes, errs, or idles out.
pub async fn serve_connection<S, H>(mut stream: S, handler: &H, limits: Limits, timeouts: Timeouts)
where
    S: AsyncReadRent + AsyncWriteRent,
    H: Handler<S>,
{
    let mut buf = Vec::with_capacity(READ_SPARE);
    let receiving = Receiving {
        handler,
        progress: Progress::default(),
        stream: std::marker::PhantomData,
    };
    loop {
        let read = read_request(&mut stream, &mut buf, limits, timeouts, &receiving.progress).await;
        let head_only = receiving.progress.head_only.replace(false);
        receiving.progress.started.set(false);
        let request = match read {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(error) => {
                handler.refused(&error);
                // A HEAD request refused here gets its answer without a body too.
                let reply = Reply {
                    keep_alive: false,
                    head_only: head_only || buf.starts_with(b"HEAD "),
                };
                write_error(
                    &mut stream,
                    &error,
                    &error.body(),
                    &[],
                    reply,
                    timeouts.client_send,
                )
                .await;
                return;
            }
        };
        let keep_alive = h1::keep_alive(request.head.minor_version, &request.head.headers);
        if handler.handle(request, keep_alive, &mut stream).await == Persist::Close || !keep_alive {
            return;
        }
    }
}

/// A request being received: one dropped part way (the connection cut at the end of the
/// shutdown grace) is accounted for as refused, so it too leaves its one access-log record.
struct Receiving<'h, H: Handler<S>, S> {
    handler: &'h H,
    progress: Progress,
    stream: std::marker::PhantomData<fn(S)>,
}

/// How far the request being read got.
#[derive(Default)]
struct Progress {
    /// Its first byte came.
    started: Cell<bool>,
    /// Its head parsed, and it is a HEAD request.
    head_only: Cell<bool>,
}

impl<H: Handler<S>, S> Drop for Receiving<'_, H, S> {
    fn drop(&mut self) {
        if self.progress.started.get() {
            self.handler.refused(&Error::ShutdownCut);
        }
    }
}

/// Writes an error response, `body` (the error in its API's shape), with `Allow` for a 405,
/// `Retry-After` for a 429, and `extra` headers, within `within`; whether it was written.
pub async fn write_error<S: AsyncWriteRent>(
    stream: &mut S,
    error: &Error,
    body: &[u8],
    extra: &[(&str, String)],
    reply: Reply,
    within: Duration,
) -> bool {
    let mut out = Vec::with_capacity(256);
    let retry_after;
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    match error {
        Error::MethodNotAllowed { allow } => headers.push(("allow", allow.as_bytes())),
        // A browser asks for the token (as a password) and sends it with every admin call.
        Error::AdminToken => headers.push((
            "www-authenticate",
            b"Basic realm=\"Aura admin\", charset=\"UTF-8\"",
        )),
        Error::RateLimited {
            retry_after_secs, ..
        } => {
            retry_after = retry_after_secs.to_string();
            headers.push(("retry-after", retry_after.as_bytes()));
        }
        _ => {}
    }
    headers.extend(extra.iter().map(|(name, value)| (*name, value.as_bytes())));
    h1::write_simple_response(
        error.status(),
        "application/json",
        body,
        &headers,
        reply,
        &mut out,
    );
    matches!(
        net::write_all_within(stream, out, within).await.0,
        Timed::Done(Ok(()))
    )
}

/// Reads the next request. `Ok(None)`: the client closed or idled out between requests.
/// `buf` carries bytes already read past the previous request (pipelining) and keeps any
/// bytes read past this one.
async fn read_request<S>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limits: Limits,
    timeouts: Timeouts,
    progress: &Progress,
) -> Result<Option<Request>, Error>
where
    S: AsyncReadRent + AsyncWriteRent,
{
    let Some((head, deadline)) =
        read_head(stream, buf, limits, timeouts, &progress.started).await?
    else {
        return Ok(None);
    };
    progress.head_only.set(head.method == http::Method::HEAD);
    let framing = h1::request_framing(&head)?;
    if let Framing::Length(n) = framing {
        if n > limits.max_body_bytes as u64 {
            return Err(Error::BodyTooLarge {
                limit_bytes: limits.max_body_bytes,
            });
        }
    }
    buf.drain(..head.len);
    if framing != Framing::Empty && buf.is_empty() && h1::expects_continue(&head) {
        let left = deadline.saturating_duration_since(Instant::now());
        let continue_ = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        let (res, _) = net::write_all_within(stream, continue_, left).await;
        if !matches!(res, Timed::Done(Ok(()))) {
            return Err(Error::ClientTimeout);
        }
    }
    let body = match framing {
        Framing::Empty | Framing::UntilClose => Vec::new(),
        Framing::Length(n) => {
            let deadline = deadline + body_allowance(n as usize);
            read_sized_body(stream, buf, n as usize, deadline).await?
        }
        Framing::Chunked => read_chunked_body(stream, buf, limits.max_body_bytes, deadline).await?,
    };
    Ok(Some(Request { head, body }))
}

/// The slowest a request body may come (128 kbit/s): on top of `client_head_timeout_ms`, a body
/// of `n` bytes has `n` over this rate to arrive. A real upload is much faster; a trickle is
/// cut (one deadline per request, which grows only with what the body carries).
pub const MIN_BODY_BYTES_PER_SEC: usize = 16 * 1024;

fn body_allowance(n: usize) -> Duration {
    Duration::from_millis((n as u64).saturating_mul(1000) / MIN_BODY_BYTES_PER_SEC as u64)
}

/// Reads a request head, and the deadline of the whole request: the first byte may take up to
/// the idle timeout; from it, the head and the body must arrive within the head timeout
/// (slow-loris bound, for a trickled body too).
async fn read_head<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limits: Limits,
    timeouts: Timeouts,
    started: &Cell<bool>,
) -> Result<Option<(RequestHead, Instant)>, Error> {
    let mut deadline: Option<Instant> = None;
    loop {
        if !buf.is_empty() {
            started.set(true);
            let parsed = h1::parse_request(buf, limits.max_headers)?;
            if let Some(head) = parsed {
                if head.len > limits.max_head_bytes {
                    return Err(Error::HeadTooLarge {
                        limit_bytes: limits.max_head_bytes,
                    });
                }
                // Pipelined bytes: this request's first byte came with the last read.
                let deadline = deadline.unwrap_or_else(|| Instant::now() + timeouts.client_head);
                return Ok(Some((head, deadline)));
            }
            if buf.len() > limits.max_head_bytes {
                return Err(Error::HeadTooLarge {
                    limit_bytes: limits.max_head_bytes,
                });
            }
        }
        let now = Instant::now();
        let limit = match deadline {
            Some(d) => d.saturating_duration_since(now),
            None if buf.is_empty() => timeouts.idle,
            None => {
                deadline = Some(now + timeouts.client_head);
                timeouts.client_head
            }
        };
        // The read takes the buffer while in flight (and drops it on timeout): decide on
        // "between requests" or "mid-head" from what was there before it.
        let between_requests = buf.is_empty();
        match net::read_more_within(stream, buf, READ_SPARE, limit).await {
            Timed::Done(Ok(0)) | Timed::Done(Err(_)) if between_requests => return Ok(None),
            Timed::Done(Ok(0)) | Timed::Done(Err(_)) => {
                return Err(Error::MalformedHead("connection closed mid-head"))
            }
            Timed::Done(Ok(_)) => {
                started.set(true);
                if deadline.is_none() {
                    deadline = Some(Instant::now() + timeouts.client_head);
                }
            }
            Timed::TimedOut if between_requests => return Ok(None),
            Timed::TimedOut => return Err(Error::ClientTimeout),
        }
    }
}

async fn read_sized_body<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    len: usize,
    deadline: Instant,
) -> Result<Vec<u8>, Error> {
    while buf.len() < len {
        let spare = (len - buf.len()).min(1 << 20);
        let left = deadline.saturating_duration_since(Instant::now());
        match net::read_more_within(stream, buf, spare, left).await {
            Timed::Done(Ok(0)) | Timed::Done(Err(_)) => {
                return Err(Error::MalformedBody("connection closed mid-body".into()))
            }
            Timed::Done(Ok(_)) => {}
            Timed::TimedOut => return Err(Error::ClientTimeout),
        }
    }
    let rest = buf.split_off(len);
    Ok(std::mem::replace(buf, rest))
}

async fn read_chunked_body<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    max_body_bytes: usize,
    deadline: Instant,
) -> Result<Vec<u8>, Error> {
    let mut decoder = ChunkedDecoder::default();
    let mut body = Vec::new();
    loop {
        let decoded = decoder
            .decode(buf, &mut body)
            .map_err(|e| Error::MalformedBody(format!("chunked body: {e}")))?;
        buf.drain(..decoded.consumed);
        if body.len() > max_body_bytes {
            return Err(Error::BodyTooLarge {
                limit_bytes: max_body_bytes,
            });
        }
        if decoded.done {
            return Ok(body);
        }
        // What came so far earns its time, as a sized body's length does.
        let until = deadline + body_allowance(body.len() + buf.len());
        let left = until.saturating_duration_since(Instant::now());
        match net::read_more_within(stream, buf, BODY_READ_SPARE, left).await {
            Timed::Done(Ok(0)) | Timed::Done(Err(_)) => {
                return Err(Error::MalformedBody("connection closed mid-body".into()))
            }
            Timed::Done(Ok(_)) => {}
            Timed::TimedOut => return Err(Error::ClientTimeout),
        }
    }
}

/// A `GET /healthz`-style fixed JSON response, written within `within`.
pub async fn write_json<S: AsyncWriteRent>(
    stream: &mut S,
    status: StatusCode,
    body: &[u8],
    reply: Reply,
    within: Duration,
) -> Persist {
    write_body(stream, status, "application/json", body, reply, within).await
}

/// An admin call's answer, with its own content type and headers.
pub async fn write_answer<S: AsyncWriteRent>(
    stream: &mut S,
    answer: &crate::admin::Answer,
    reply: Reply,
    within: Duration,
) -> Persist {
    let mut out = Vec::with_capacity(256 + answer.body.len());
    let headers: Vec<(&str, &[u8])> = answer
        .headers
        .iter()
        .map(|(name, value)| (*name, value.as_bytes()))
        .collect();
    h1::write_simple_response(
        answer.status,
        answer.content_type,
        &answer.body,
        &headers,
        reply,
        &mut out,
    );
    match net::write_all_within(stream, out, within).await.0 {
        Timed::Done(Ok(())) => Persist::KeepAlive,
        Timed::Done(Err(_)) | Timed::TimedOut => Persist::Close,
    }
}

pub async fn write_body<S: AsyncWriteRent>(
    stream: &mut S,
    status: StatusCode,
    content_type: &str,
    body: &[u8],
    reply: Reply,
    within: Duration,
) -> Persist {
    let mut out = Vec::with_capacity(128 + body.len());
    h1::write_simple_response(status, content_type, body, &[], reply, &mut out);
    match net::write_all_within(stream, out, within).await.0 {
        Timed::Done(Ok(())) => Persist::KeepAlive,
        Timed::Done(Err(_)) | Timed::TimedOut => Persist::Close,
    }
}
