//! Byte-level helpers for `sse`: the resumable event-boundary finder and the memchr/memmem
//! prefilters that pick the few events worth parsing. Depends on memchr only: no JSON parser,
//! nothing else of Aura, no IO. Hot path: every relayed byte passes through
//! [`Framer::next_boundary`], which jumps from line terminator to line terminator with `memchr2`;
//! nothing here allocates except [`event_data`], called only for events a prefilter matched.

use std::sync::LazyLock;

use memchr::{memchr2, memmem};

/// Where a byte stream stands between line terminators (`\r\n`, `\n` or `\r`), across splits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Framer {
    /// No byte of the current line has been seen, so a terminator now is a blank line.
    line_start: bool,
    /// The last byte seen was a CR: a LF right after it belongs to the same terminator.
    after_cr: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Self {
            line_start: true,
            after_cr: false,
        }
    }
}

impl Framer {
    /// The offset just past the blank line that ends the first event in `buf` (with the LF of a
    /// final CRLF when `buf` has it), or None once all of `buf` belongs to an unfinished event.
    pub(crate) fn next_boundary(&mut self, buf: &[u8]) -> Option<usize> {
        let mut i = 0;
        loop {
            i += self.finish_crlf(tail(buf, i));
            let rest = tail(buf, i);
            let Some(at) = memchr2(b'\n', b'\r', rest) else {
                self.line_start &= rest.is_empty();
                return None;
            };
            self.line_start &= at == 0;
            self.after_cr = rest.get(at) == Some(&b'\r');
            i += at + 1;
            if self.line_start {
                return Some(i + self.finish_crlf(tail(buf, i)));
            }
            self.line_start = true;
        }
    }

    /// True while the last byte seen was a CR whose LF, if any, has not arrived yet.
    pub(crate) fn awaits_lf(&self) -> bool {
        self.after_cr
    }

    /// Consumes the LF that completes a CR seen just before `buf`: returns 1 if it did, else 0.
    pub(crate) fn finish_crlf(&mut self, buf: &[u8]) -> usize {
        match buf.first() {
            Some(&b) if self.after_cr => {
                self.after_cr = false;
                usize::from(b == b'\n')
            }
            _ => 0,
        }
    }
}

fn tail(buf: &[u8], from: usize) -> &[u8] {
    buf.get(from..).unwrap_or_default()
}

/// What the first `"choices":` of an event's bytes shows so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choices {
    /// Not seen yet (absent, or cut off by the end of the bytes).
    Unknown,
    EmptyArray,
    /// A non-empty array or not an array: the event cannot be usage-only.
    Other,
}

/// Every start of `finder`'s needle in `hay`, without overlaps. memchr's own `find_iter` copies
/// the whole finder (its prefilter tables) into each iterator it makes: per event, on the
/// stream's path, that copy cost more than the search.
pub(crate) fn positions<'h>(
    finder: &'h memmem::Finder<'static>,
    hay: &'h [u8],
) -> impl Iterator<Item = usize> + 'h {
    let step = finder.needle().len().max(1);
    let mut from = 0;
    std::iter::from_fn(move || {
        let at = from + finder.find(hay.get(from..)?)?;
        from = at + step;
        Some(at)
    })
}

static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static CHOICES_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"choices\""));

/// Finds a quoted JSON key followed by `:` in an event's raw bytes. The finders are built once
/// per process, not per request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyFinder {
    finder: &'static memmem::Finder<'static>,
}

impl KeyFinder {
    pub(crate) fn usage() -> Self {
        Self { finder: &USAGE_KEY }
    }

    pub(crate) fn choices() -> Self {
        Self {
            finder: &CHOICES_KEY,
        }
    }

    /// For each occurrence of the key followed by `:`, the bytes from its value on; an
    /// occurrence cut off by the end of `hay` yields an empty slice.
    fn values<'h>(&'h self, hay: &'h [u8]) -> impl Iterator<Item = &'h [u8]> + 'h {
        let key_len = self.finder.needle().len();
        positions(self.finder, hay).filter_map(move |at| {
            let rest = skip_gap(tail(hay, at + key_len));
            match rest.split_first() {
                None => Some(rest),
                Some((b':', value)) => Some(skip_gap(value)),
                Some(_) => None,
            }
        })
    }

    /// True if some occurrence of the key has an object value (`"usage" : {`).
    pub(crate) fn has_object(&self, hay: &[u8]) -> bool {
        self.values(hay).any(|v| v.first() == Some(&b'{'))
    }

    /// Classifies the value of the key's first occurrence as an array (empty or not).
    pub(crate) fn array(&self, hay: &[u8]) -> Choices {
        let Some(value) = self.values(hay).next() else {
            return Choices::Unknown;
        };
        match value.split_first() {
            None => Choices::Unknown,
            Some((b'[', inner)) => match skip_gap(inner).first() {
                None => Choices::Unknown,
                Some(b']') => Choices::EmptyArray,
                Some(_) => Choices::Other,
            },
            Some(_) => Choices::Other,
        }
    }
}

/// Skips JSON whitespace, and the `data:` that continues a multi-line data field after a line
/// break. A break followed by a cut-off `dat` counts as the end of the bytes (empty result).
fn skip_gap(mut b: &[u8]) -> &[u8] {
    loop {
        let n = b
            .iter()
            .take_while(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
            .count();
        let crossed_line = b.iter().take(n).any(|c| matches!(c, b'\r' | b'\n'));
        b = tail(b, n);
        if !crossed_line {
            return b;
        }
        if let Some(next) = b.strip_prefix(b"data:") {
            b = next;
        } else if b"data:".starts_with(b) {
            return &[];
        } else {
            return b;
        }
    }
}

/// Appends an event's data to `out`: its `data` lines' values (one leading space stripped)
/// joined with LF. Other fields and comments are ignored.
pub(crate) fn event_data(event: &[u8], out: &mut Vec<u8>) {
    let mut first = true;
    // Splitting on CR and LF alike yields empty pieces inside a CRLF: they are not data lines.
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        let value = match line.strip_prefix(b"data") {
            Some([]) => &[][..],
            Some([b':', value @ ..]) => value.strip_prefix(b" ").unwrap_or(value),
            _ => continue,
        };
        if !first {
            out.push(b'\n');
        }
        first = false;
        out.extend_from_slice(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_memchrs_find_iter_without_the_copy() {
        // Needles that overlap themselves too, in haystacks of a few letters so that matches
        // crowd and touch; a deterministic generator (xorshift), no crate.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for needle in [&b"aa"[..], b"aba", b"[DONE]", b"a", b"\"usage\""] {
            let finder = memmem::Finder::new(needle).into_owned();
            for len in 0..200 {
                let hay: Vec<u8> = (0..len)
                    .map(|_| b"ab[DONE]\"usage"[(next() % 14) as usize])
                    .collect();
                let ours: Vec<usize> = positions(&finder, &hay).collect();
                let theirs: Vec<usize> = memmem::find_iter(&hay, needle).collect();
                assert_eq!(
                    ours,
                    theirs,
                    "needle {needle:?} in {:?}",
                    String::from_utf8_lossy(&hay)
                );
            }
        }
    }

    /// Every event of `stream` as (start, end), feeding it in pieces of `step` bytes.
    fn events(stream: &[u8], step: usize) -> Vec<(usize, usize)> {
        let (mut framer, mut out, mut start) = (Framer::default(), Vec::<(usize, usize)>::new(), 0);
        for (n, piece) in stream.chunks(step).enumerate() {
            // A LF completing the CR that ended the previous event belongs to that event.
            let mut at = 0;
            if start == n * step && framer.awaits_lf() {
                at = framer.finish_crlf(piece);
                start += at;
                if let Some(last) = out.last_mut() {
                    last.1 += at;
                }
            }
            while let Some(end) = framer.next_boundary(&piece[at..]) {
                at += end;
                out.push((start, n * step + at));
                start = n * step + at;
            }
        }
        out
    }

    #[test]
    fn boundaries_for_every_separator_and_split() {
        let cases: &[(&[u8], &[usize])] = &[
            (b"data: a\n\ndata: b\n\n", &[9, 18]),
            (b"data: a\r\n\r\ndata: b\r\n\r\n", &[11, 22]),
            (b"data: a\r\rdata: b\r\r", &[9, 18]),
            (b"data: a\n\r\ndata: b\r\n\ndata: c\r\rx", &[10, 20, 29]),
            (b"event: e\r\ndata: a\r\n\r\n", &[21]),
            (b"\n\ndata: a\n\n", &[1, 2, 11]),
            (b"data: a\ndata: b\n", &[]),
        ];
        for (stream, ends) in cases {
            for step in 1..=stream.len() {
                let got: Vec<usize> = events(stream, step).iter().map(|e| e.1).collect();
                assert_eq!(
                    &got,
                    ends,
                    "{:?} step {step}",
                    String::from_utf8_lossy(stream)
                );
            }
        }
    }

    #[test]
    fn crlf_split_before_lf_leaves_lf_pending() {
        let mut f = Framer::default();
        assert_eq!(f.next_boundary(b"data: a\r\n\r"), Some(10));
        assert!(f.awaits_lf());
        assert_eq!(f.finish_crlf(b"\ndata"), 1);
        assert!(!f.awaits_lf());
    }

    #[test]
    fn usage_object_prefilter() {
        let u = KeyFinder::usage();
        let cases: &[(&[u8], bool)] = &[
            (br#"data: {"usage":{"prompt_tokens":1}}"#, true),
            (br#"data: {"usage" :	 {"prompt_tokens":1}}"#, true),
            (br#"data: {"usage":null}"#, false),
            (br#"data: {"usage":null,"x_groq":{"usage":{}}}"#, true),
            (br#"data: {"text":"\"usage\":{"}"#, false),
            (b"data: {\"usage\":\ndata: {}}", true),
            (br#"data: {"usage""#, false),
            (b"", false),
        ];
        for (hay, want) in cases {
            assert_eq!(u.has_object(hay), *want, "{}", String::from_utf8_lossy(hay));
        }
    }

    #[test]
    fn choices_prefilter_resolves_only_when_the_bytes_show_it() {
        let c = KeyFinder::choices();
        let cases: &[(&[u8], Choices)] = &[
            (br#"data: {"choices":[],"usage":{}}"#, Choices::EmptyArray),
            (br#"data: {"choices" : [ ] }"#, Choices::EmptyArray),
            (br#"data: {"choices":[{"index":0}]}"#, Choices::Other),
            (br#"data: {"choices":null}"#, Choices::Other),
            (br#"data: {"x":"choices","choices":[1]}"#, Choices::Other),
            (br#"data: {"choices":["#, Choices::Unknown),
            (br#"data: {"choices""#, Choices::Unknown),
            (b"data: {\"choices\":\nda", Choices::Unknown),
            (b"data: {\"choices\":\ndata: []}", Choices::EmptyArray),
            (br#"data: {"model":"m"}"#, Choices::Unknown),
        ];
        for (hay, want) in cases {
            assert_eq!(c.array(hay), *want, "{}", String::from_utf8_lossy(hay));
        }
    }

    #[test]
    fn data_lines_joined() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"data: {\"a\":1}\n\n", b"{\"a\":1}"),
            (b"data:{\"a\":1}\r\n\r\n", b"{\"a\":1}"),
            (
                b"event: x\r\nid: 3\r\n: note\r\ndata: [1,\r\ndata:  2]\r\n\r\n",
                b"[1,\n 2]",
            ),
            (b"data\ndata: x\rdatum: y\n\n", b"\nx"),
            (b"data: tail without separator", b"tail without separator"),
            (b": comment only\n\n", b""),
        ];
        for (event, want) in cases {
            let mut out = Vec::new();
            event_data(event, &mut out);
            assert_eq!(out, *want, "{}", String::from_utf8_lossy(event));
        }
    }
}
