//! HTTP/1.1 chunked transfer coding (RFC 9112 §7.1): a resumable decoder that takes input split
//! at any byte and carries its state across calls, and a chunk encoder. Chunk data is copied out
//! with one `extend_from_slice` per contiguous span, never byte by byte.
//! Pure L0: no IO, clocks, globals or logging; depends on httparse and memchr only.

use memchr::memchr;

/// Longest chunk-size line (size, extensions and CRLF) the decoder accepts.
pub const MAX_SIZE_LINE: usize = 4096;
/// Most trailer-section bytes (all trailer lines and the final CRLF) the decoder skips.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// The last chunk with an empty trailer section: ends a chunked message.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("invalid chunk size line in chunked body")]
    BadSize,
    #[error("chunk size line longer than {} bytes", MAX_SIZE_LINE)]
    SizeLineTooLong,
    #[error("chunk data not followed by CRLF in chunked body")]
    MissingCrlf,
    #[error("trailer line not ended by CRLF in chunked body")]
    BadTrailer,
    #[error("trailer section longer than {} bytes", MAX_TRAILER_BYTES)]
    TrailerTooLong,
}

/// What one [`ChunkedDecoder::decode`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes used; less than the input only when the message ended before it.
    pub consumed: usize,
    /// The last chunk and its trailer section have been read.
    pub done: bool,
}

/// Decodes one chunked message. After an error the decoder must not be used again.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: State,
    /// A chunk-size line split across calls (bounded by MAX_SIZE_LINE).
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// Skipping trailer lines: bytes of the current line so far (LF excluded), whether its last
    /// byte was CR, and the trailer section's bytes so far.
    Trailer {
        line: usize,
        cr: bool,
        total: usize,
    },
    Done,
}

impl ChunkedDecoder {
    /// Decode as much of `input` as possible, appending payload bytes to `out`. Stops after the
    /// terminating zero chunk and its trailer section (done = true; `consumed` then excludes
    /// bytes after the message). Input may be split at any byte; state carries over.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Decoded, ChunkedError> {
        let mut pos = 0;
        while pos < input.len() && self.state != State::Done {
            let rest = &input[pos..];
            pos += match self.state {
                State::Size => self.size_line(rest)?,
                State::Data { left } => {
                    let n = usize::try_from(left).map_or(rest.len(), |left| left.min(rest.len()));
                    out.extend_from_slice(&rest[..n]);
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { left }
                    };
                    n
                }
                State::DataCr => {
                    self.state = State::DataLf;
                    expect_byte(rest[0], b'\r')?
                }
                State::DataLf => {
                    self.state = State::Size;
                    expect_byte(rest[0], b'\n')?
                }
                State::Trailer { line, cr, total } => self.trailer(rest, line, cr, total)?,
                State::Done => 0,
            };
        }
        Ok(Decoded {
            consumed: pos,
            done: self.state == State::Done,
        })
    }

    /// Whether the whole message has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads (part of) a chunk-size line; returns the bytes used.
    fn size_line(&mut self, rest: &[u8]) -> Result<usize, ChunkedError> {
        let Some(lf) = memchr(b'\n', rest) else {
            if self.line.len() + rest.len() > MAX_SIZE_LINE {
                return Err(ChunkedError::SizeLineTooLong);
            }
            self.line.extend_from_slice(rest);
            return Ok(rest.len());
        };
        let used = lf + 1;
        if self.line.len() + used > MAX_SIZE_LINE {
            return Err(ChunkedError::SizeLineTooLong);
        }
        let size = if self.line.is_empty() {
            parse_size(&rest[..used])?
        } else {
            self.line.extend_from_slice(&rest[..used]);
            let size = parse_size(&self.line);
            self.line.clear();
            size?
        };
        self.state = match size {
            0 => State::Trailer {
                line: 0,
                cr: false,
                total: 0,
            },
            left => State::Data { left },
        };
        Ok(used)
    }

    /// Skips trailer lines until the empty line; returns the bytes used.
    fn trailer(
        &mut self,
        rest: &[u8],
        line: usize,
        cr: bool,
        total: usize,
    ) -> Result<usize, ChunkedError> {
        let used = memchr(b'\n', rest).map_or(rest.len(), |lf| lf + 1);
        let total = total + used;
        if total > MAX_TRAILER_BYTES {
            return Err(ChunkedError::TrailerTooLong);
        }
        let text = &rest[..used];
        let Some(text) = text.strip_suffix(b"\n") else {
            let cr = text.last().map_or(cr, |&b| b == b'\r');
            self.state = State::Trailer {
                line: line + used,
                cr,
                total,
            };
            return Ok(used);
        };
        let line = line + text.len();
        if !text.last().map_or(cr, |&b| b == b'\r') {
            return Err(ChunkedError::BadTrailer);
        }
        self.state = match line {
            1 => State::Done,
            _ => State::Trailer {
                line: 0,
                cr: false,
                total,
            },
        };
        Ok(used)
    }
}

/// Parses one complete chunk-size line (ending in LF) with httparse. httparse takes an empty
/// size as 0 and a bare LF inside an extension as part of it: both are refused here.
fn parse_size(line: &[u8]) -> Result<u64, ChunkedError> {
    if !line.first().is_some_and(u8::is_ascii_hexdigit) {
        return Err(ChunkedError::BadSize);
    }
    match httparse::parse_chunk_size(line) {
        Ok(httparse::Status::Complete((n, size))) if n == line.len() => Ok(size),
        _ => Err(ChunkedError::BadSize),
    }
}

fn expect_byte(got: u8, want: u8) -> Result<usize, ChunkedError> {
    if got == want {
        Ok(1)
    } else {
        Err(ChunkedError::MissingCrlf)
    }
}

/// Appends one chunk (`{len:x}\r\n{payload}\r\n`) to `out`; nothing for an empty payload (an
/// empty chunk would end the message: use [`LAST_CHUNK`] for that).
pub fn encode_chunk(payload: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let len = payload.len();
    if len == 0 {
        return;
    }
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4);
    out.reserve(digits as usize + len + 4);
    for i in (0..digits).rev() {
        out.push(HEX[(len >> (4 * i)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` in one call; returns (payload, consumed, done).
    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkedError> {
        let mut out = Vec::new();
        let d = ChunkedDecoder::default().decode(input, &mut out)?;
        Ok((out, d.consumed, d.done))
    }

    /// Decodes `parts` in order with one decoder; returns (payload, total consumed, done).
    fn decode_parts(parts: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), ChunkedError> {
        let mut dec = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut done = false;
        for part in parts {
            let d = dec.decode(part, &mut out)?;
            consumed += d.consumed;
            done = d.done;
            assert_eq!(dec.is_done(), d.done);
        }
        Ok((out, consumed, done))
    }

    /// (name, encoded message, payload)
    const VALID: &[(&str, &[u8], &[u8])] = &[
        ("terminator only", b"0\r\n\r\n", b""),
        ("single chunk", b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (
            "multiple chunks",
            b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n",
            b"hello world",
        ),
        (
            "uppercase hex",
            b"A\r\n0123456789\r\n0\r\n\r\n",
            b"0123456789",
        ),
        (
            "lowercase hex, leading zeros",
            b"00a\r\n0123456789\r\n000\r\n\r\n",
            b"0123456789",
        ),
        (
            "extensions",
            b"5;name=value\r\nhello\r\n3 ; a=\"q;x\"; b\r\nabc\r\n0;last\r\n\r\n",
            b"helloabc",
        ),
        (
            "trailers",
            b"4\r\nwiki\r\n0\r\nExpires: never\r\nX-Usage: {\"a\":1}\r\n\r\n",
            b"wiki",
        ),
        (
            "data holding CRLF and digits",
            b"7\r\n\r\n0\r\n\r\n\r\n0\r\n\r\n",
            b"\r\n0\r\n\r\n",
        ),
        ("whitespace after size", b"2 \r\nok\r\n0\t\r\n\r\n", b"ok"),
    ];

    #[test]
    fn table() {
        for &(name, input, payload) in VALID {
            let got = decode_all(input).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, (payload.to_vec(), input.len(), true), "{name}");
        }
    }

    #[test]
    fn errors() {
        use ChunkedError::*;
        let long_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_SIZE_LINE));
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "y".repeat(MAX_TRAILER_BYTES));
        let cases: Vec<(&str, &[u8], ChunkedError)> = vec![
            ("bad hex", b"g\r\nx\r\n0\r\n\r\n", BadSize),
            ("hex then junk", b"1x\r\nx\r\n0\r\n\r\n", BadSize),
            ("empty size", b"\r\nx\r\n0\r\n\r\n", BadSize),
            ("space before size", b" 1\r\nx\r\n0\r\n\r\n", BadSize),
            ("space only", b" \r\n", BadSize),
            ("negative size", b"-1\r\nx\r\n", BadSize),
            ("0x prefix", b"0x1\r\nx\r\n", BadSize),
            ("bare LF after size", b"1\nx\r\n0\r\n\r\n", BadSize),
            ("bare LF in extension", b"1;a\nx\r\n0\r\n\r\n", BadSize),
            ("CR without LF", b"1\rx\r\n", BadSize),
            (
                "size overflow (17 digits)",
                b"10000000000000000\r\n",
                BadSize,
            ),
            (
                "size overflow (leading zeros)",
                b"0ffffffffffffffff\r\n",
                BadSize,
            ),
            (
                "missing CRLF after data",
                b"3\r\nabcd\r\n0\r\n\r\n",
                MissingCrlf,
            ),
            ("LF only after data", b"3\r\nabc\n0\r\n\r\n", MissingCrlf),
            (
                "CR then junk after data",
                b"3\r\nabc\rx0\r\n\r\n",
                MissingCrlf,
            ),
            ("oversize size line", long_ext.as_bytes(), SizeLineTooLong),
            ("bare LF trailer end", b"0\r\n\n", BadTrailer),
            ("bare LF trailer line", b"0\r\nX: y\n\r\n", BadTrailer),
            ("oversize trailers", long_trailer.as_bytes(), TrailerTooLong),
        ];
        for (name, input, want) in cases {
            assert_eq!(decode_all(input), Err(want), "{name}");
            // The same error when fed one byte at a time.
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(decode_parts(&bytes), Err(want), "{name}, 1-byte reads");
        }
    }

    #[test]
    fn largest_size_is_accepted() {
        let mut dec = ChunkedDecoder::default();
        let mut out = Vec::new();
        let d = dec
            .decode(b"ffffffffffffffff\r\nabc", &mut out)
            .expect("16 hex digits");
        assert_eq!(
            (d, out.as_slice()),
            (
                Decoded {
                    consumed: 21,
                    done: false
                },
                b"abc".as_slice()
            )
        );
    }

    #[test]
    fn size_line_buffered_up_to_the_limit() {
        let ext = "x".repeat(MAX_SIZE_LINE - 4);
        let line = format!("1;{ext}\r\n");
        assert_eq!(line.len(), MAX_SIZE_LINE);
        let body = format!("{line}a\r\n0\r\n\r\n");
        let (head, tail) = body.as_bytes().split_at(MAX_SIZE_LINE - 1);
        assert_eq!(
            decode_parts(&[head, tail]),
            Ok((b"a".to_vec(), body.len(), true))
        );
        let unterminated = "1".repeat(MAX_SIZE_LINE + 1);
        let parts: Vec<&[u8]> = unterminated.as_bytes().chunks(1000).collect();
        assert_eq!(decode_parts(&parts), Err(ChunkedError::SizeLineTooLong));
    }

    #[test]
    fn every_split_point_and_one_byte_reads() {
        for &(name, input, payload) in VALID {
            let want = Ok((payload.to_vec(), input.len(), true));
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                assert_eq!(decode_parts(&[a, b]), want, "{name}: split at byte {cut}");
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(decode_parts(&bytes), want, "{name}: 1-byte reads");
        }
    }

    #[test]
    fn bytes_after_the_message_are_not_consumed() {
        let next = b"POST /v1/chat/completions HTTP/1.1\r\n";
        for &(name, input, payload) in VALID {
            let mut stream = input.to_vec();
            stream.extend_from_slice(next);
            assert_eq!(
                decode_all(&stream),
                Ok((payload.to_vec(), input.len(), true)),
                "{name}"
            );
            // Split inside the message: the second call stops at its end too.
            let (a, b) = stream.split_at(input.len() - 1);
            assert_eq!(
                decode_parts(&[a, b]),
                Ok((payload.to_vec(), input.len(), true)),
                "{name}"
            );
        }
        let mut dec = ChunkedDecoder::default();
        let mut out = Vec::new();
        assert!(dec.decode(LAST_CHUNK, &mut out).expect("last chunk").done);
        assert_eq!(
            dec.decode(b"5\r\nhello", &mut out),
            Ok(Decoded {
                consumed: 0,
                done: true
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn incomplete_input_is_consumed_and_not_done() {
        for &(name, input, _) in VALID {
            for cut in 0..input.len() {
                let got = decode_all(&input[..cut]).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!((got.1, got.2), (cut, false), "{name}: prefix {cut}");
            }
        }
    }

    #[test]
    fn encode_chunk_frames() {
        let cases: &[(usize, &str)] = &[
            (0, ""),
            (1, "1"),
            (10, "a"),
            (15, "f"),
            (16, "10"),
            (255, "ff"),
            (4096, "1000"),
        ];
        for &(len, hex) in cases {
            let payload = vec![b'x'; len];
            let mut out = b"prefix".to_vec();
            encode_chunk(&payload, &mut out);
            let want = if len == 0 {
                b"prefix".to_vec()
            } else {
                [b"prefix", hex.as_bytes(), b"\r\n", &payload, b"\r\n"].concat()
            };
            assert_eq!(out, want, "len {len}");
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let payloads: Vec<Vec<u8>> = vec![
            b"data: {\"choices\":[]}\n\n".to_vec(),
            (0..=255u8).collect(),
            vec![b'\n'; 70_000],
            b"0\r\n\r\n".to_vec(),
        ];
        let mut body = Vec::new();
        for p in &payloads {
            encode_chunk(p, &mut body);
            encode_chunk(b"", &mut body);
        }
        body.extend_from_slice(LAST_CHUNK);
        let want = payloads.concat();
        assert_eq!(decode_all(&body), Ok((want.clone(), body.len(), true)));
        for size in [1, 7, 4096] {
            let parts: Vec<&[u8]> = body.chunks(size).collect();
            assert_eq!(
                decode_parts(&parts),
                Ok((want.clone(), body.len(), true)),
                "reads of {size}"
            );
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            ChunkedError::SizeLineTooLong.to_string(),
            "chunk size line longer than 4096 bytes"
        );
        assert_eq!(
            ChunkedError::MissingCrlf.to_string(),
            "chunk data not followed by CRLF in chunked body"
        );
    }
}
