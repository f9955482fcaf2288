//! HTTP/1.1 message heads: parsing with httparse into the `http` crate's types, body framing
//! (RFC 9112 §6), hop-by-hop header filtering, and head serialisation. Pure: no IO.
//! `http/chunked.rs` holds the resumable chunked codec.

pub mod chunked;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::error::Error;

#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    /// The request target as sent (origin form: path and query).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: HeaderMap,
    /// Bytes the head took in the buffer, the blank line included.
    pub len: usize,
}

#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub minor_version: u8,
    pub headers: HeaderMap,
    pub len: usize,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Response only: the body runs until the connection closes.
    UntilClose,
}

/// Parses a request head; `Ok(None)` while the head is still incomplete.
pub fn parse_request(buf: &[u8], max_headers: usize) -> Result<Option<RequestHead>, Error> {
    let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::TooManyHeaders { limit: max_headers })
        }
        Err(e) => return Err(Error::MalformedHead(parse_error(e))),
    };
    let method = req
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
    let method = method.ok_or(Error::MalformedHead("invalid method"))?;
    let target = req
        .path
        .ok_or(Error::MalformedHead("missing request target"))?
        .to_string();
    if !target.starts_with('/') && target != "*" {
        return Err(Error::MalformedHead(
            "request target must be in origin form",
        ));
    }
    let headers = header_map(req.headers).ok_or(Error::MalformedHead("invalid header"))?;
    let minor_version = req.version.unwrap_or(1);
    // RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host; no request has two.
    match headers.get_all(http::header::HOST).iter().count() {
        0 if minor_version >= 1 => return Err(Error::MalformedHead("missing Host header")),
        0 | 1 => {}
        _ => return Err(Error::MalformedHead("more than one Host header")),
    }
    Ok(Some(RequestHead {
        method,
        target,
        minor_version,
        headers,
        len,
    }))
}

/// Parses a response head; `Ok(None)` while incomplete. Errors are the upstream's fault.
pub fn parse_response(buf: &[u8], max_headers: usize) -> Result<Option<ResponseHead>, Error> {
    let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
    let mut res = httparse::Response::new(&mut slots);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::UpstreamProtocol(parse_error(e))),
    };
    let status = res.code.and_then(|c| StatusCode::from_u16(c).ok());
    let status = status.ok_or(Error::UpstreamProtocol("invalid status code"))?;
    let headers = header_map(res.headers).ok_or(Error::UpstreamProtocol("invalid header"))?;
    Ok(Some(ResponseHead {
        status,
        minor_version: res.version.unwrap_or(1),
        headers,
        len,
    }))
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status line",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "unsupported HTTP version",
    }
}

fn header_map(parsed: &[httparse::Header<'_>]) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        map.append(name, value);
    }
    Some(map)
}

/// Request body framing. Both Content-Length and Transfer-Encoding, conflicting lengths, or a
/// coding other than chunked are refused: they are the raw material of request smuggling.
pub fn request_framing(head: &RequestHead) -> Result<Framing, Error> {
    let h = &head.headers;
    if let Some(te) = h.get(header::TRANSFER_ENCODING) {
        if h.contains_key(header::CONTENT_LENGTH) {
            return Err(Error::MalformedHead(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        if !te.as_bytes().eq_ignore_ascii_case(b"chunked")
            || h.get_all(header::TRANSFER_ENCODING).iter().count() > 1
        {
            return Err(Error::Unsupported("a transfer coding other than chunked"));
        }
        return Ok(Framing::Chunked);
    }
    match content_length(h).map_err(Error::MalformedHead)? {
        Some(0) | None => Ok(Framing::Empty),
        Some(n) => Ok(Framing::Length(n)),
    }
}

/// Response body framing for a request made with `method`.
pub fn response_framing(method: &Method, head: &ResponseHead) -> Result<Framing, Error> {
    let status = head.status;
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let h = &head.headers;
    if let Some(te) = h.get(header::TRANSFER_ENCODING) {
        let last = te
            .as_bytes()
            .rsplit(|b| *b == b',')
            .next()
            .unwrap_or_default();
        if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Ok(Framing::Chunked);
        }
        return Ok(Framing::UntilClose);
    }
    match content_length(h).map_err(Error::UpstreamProtocol)? {
        Some(0) => Ok(Framing::Empty),
        Some(n) => Ok(Framing::Length(n)),
        None => Ok(Framing::UntilClose),
    }
}

fn content_length(h: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut found = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let digits = part.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            let n = std::str::from_utf8(digits)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if found.is_some_and(|prev| prev != n) {
                return Err("conflicting Content-Length values");
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Whether the connection may carry another message after this one.
pub fn keep_alive(minor_version: u8, headers: &HeaderMap) -> bool {
    let mut close = minor_version == 0;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                return false;
            }
            if token.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    !close
}

/// Whether the client sent `Expect: 100-continue` and waits for a go-ahead before its body.
pub fn expects_continue(head: &RequestHead) -> bool {
    head.minor_version >= 1
        && head
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, never forwarded.
/// Also drops every header the `Connection` header names.
pub fn is_hop_by_hop(name: &HeaderName, headers: &HeaderMap) -> bool {
    const HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    ];
    if HOP.contains(&name.as_str()) || name == header::CONTENT_LENGTH || name == header::HOST {
        // Content-Length and Host are rewritten by whoever writes the new head.
        return true;
    }
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|t| {
            t.trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        })
    })
}

/// Appends `name: value\r\n` for every end-to-end header of `headers`.
pub fn write_end_to_end_headers(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        if !is_hop_by_hop(name, headers) {
            write_header(name.as_str(), value.as_bytes(), out);
        }
    }
}

pub fn write_header(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn write_status_line(status: StatusCode, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// How a response Aura writes itself goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub keep_alive: bool,
    /// The answer to a HEAD request: the head says what the body would be; no body follows.
    pub head_only: bool,
}

impl Reply {
    pub fn new(keep_alive: bool) -> Reply {
        Reply {
            keep_alive,
            head_only: false,
        }
    }
}

/// A complete response with a fixed body (errors, health checks, the mock's JSON replies), and
/// any `extra` headers.
pub fn write_simple_response(
    status: StatusCode,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &[u8])],
    reply: Reply,
    out: &mut Vec<u8>,
) {
    write_status_line(status, out);
    write_header("content-type", content_type.as_bytes(), out);
    write_header("content-length", body.len().to_string().as_bytes(), out);
    for (name, value) in extra {
        write_header(name, value, out);
    }
    if !reply.keep_alive {
        write_header("connection", b"close", out);
    }
    out.extend_from_slice(b"\r\n");
    if !reply.head_only {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> Result<Option<RequestHead>, Error> {
        parse_request(raw.as_bytes(), 16)
    }

    #[test]
    fn parses_a_complete_request_and_reports_partial_ones() {
        let raw = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        let head = req(raw).unwrap().unwrap();
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.target, "/v1/chat/completions");
        assert_eq!(head.len, raw.len() - 2);
        assert_eq!(request_framing(&head).unwrap(), Framing::Length(2));
        for cut in 0..head.len {
            assert!(req(&raw[..cut]).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn refuses_smuggling_shapes_and_bad_heads() {
        let bad = [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        ];
        for raw in bad {
            let head = req(raw).unwrap().unwrap();
            assert!(request_framing(&head).is_err(), "{raw:?}");
        }
        assert!(matches!(
            req("GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(Error::MalformedHead(_))
        ));
        assert!(matches!(
            req("G\0T / HTTP/1.1\r\n\r\n"),
            Err(Error::MalformedHead(_))
        ));
        // RFC 9112 §3.2: Host exactly once in HTTP/1.1, at most once in HTTP/1.0.
        for raw in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
        ] {
            assert!(matches!(req(raw), Err(Error::MalformedHead(_))), "{raw:?}");
        }
        assert!(req("GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
        let many: String = (0..20).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(matches!(
            req(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(Error::TooManyHeaders { limit: 16 })
        ));
    }

    #[test]
    fn keep_alive_follows_version_and_connection_header() {
        let cases = [
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", true),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                false,
            ),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
        ];
        for (raw, expected) in cases {
            let head = req(raw).unwrap().unwrap();
            assert_eq!(
                keep_alive(head.minor_version, &head.headers),
                expected,
                "{raw:?}"
            );
        }
    }

    #[test]
    fn response_framing_by_method_status_and_headers() {
        let parse = |raw: &str| parse_response(raw.as_bytes(), 16).unwrap().unwrap();
        let chunked = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(
            response_framing(&Method::POST, &chunked).unwrap(),
            Framing::Chunked
        );
        assert_eq!(
            response_framing(&Method::HEAD, &chunked).unwrap(),
            Framing::Empty
        );
        let no_content = parse("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &no_content).unwrap(),
            Framing::Empty
        );
        let close = parse("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &close).unwrap(),
            Framing::UntilClose
        );
        let sized = parse("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &sized).unwrap(),
            Framing::Length(12)
        );
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let head = req("GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: 5\r\nAuthorization: Bearer k\r\nContent-Length: 0\r\nX-Kept: yes\r\n\r\n").unwrap().unwrap();
        let mut out = Vec::new();
        write_end_to_end_headers(&head.headers, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "authorization: Bearer k\r\nx-kept: yes\r\n"
        );
    }
}
