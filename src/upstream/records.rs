//! Between an upstream's socket and its TLS layer: hands the TLS layer at most the rest of one
//! TLS record per read, and says how many bytes it holds read from the socket and not handed
//! over. With it, once an answer's last record is decrypted nothing of a later record sits
//! above the socket unseen: a connection is pooled only when this holds nothing and the socket
//! is quiet. Without it, monoio-rustls reads up to 16 KiB from the socket at a time, and a
//! record that came after the answer (a late body, an idle 408) waited in its buffer for the
//! next request on the connection: another client's.

use std::cell::Cell;
use std::io;
use std::rc::Rc;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;
use monoio::BufResult;

/// A TLS record's header: content type, version (2 bytes), length (2 bytes).
const HEADER: usize = 5;
/// Socket reads: a whole record (16 KiB of payload at most, plus its header and tag) fits.
const READ_BYTES: usize = 18 * 1024;

pub struct RecordPacer {
    tcp: TcpStream,
    /// Read from the socket: `buf[at..]` is not handed over yet.
    buf: Vec<u8>,
    at: usize,
    /// What is left of the current record to hand over (0: the next byte starts a record).
    record_left: usize,
    /// `buf.len() - at`, for the pool.
    held: Rc<Cell<usize>>,
}

impl RecordPacer {
    /// The pacer, and the count it keeps of the bytes it holds.
    pub fn new(tcp: TcpStream) -> (RecordPacer, Rc<Cell<usize>>) {
        let held = Rc::new(Cell::new(0));
        let pacer = RecordPacer {
            tcp,
            buf: Vec::new(),
            at: 0,
            record_left: 0,
            held: held.clone(),
        };
        (pacer, held)
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    /// Reads more from the socket, after what is pending; `Ok(0)` at its end.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.reserve(READ_BYTES);
        let len = buf.len();
        let (res, slice) = self.tcp.read(buf.slice_mut(len..)).await;
        self.buf = slice.into_inner();
        self.held.set(self.buf.len());
        res
    }

    /// How much of what is pending may go now: up to the current record's end.
    fn next_piece(&mut self) -> usize {
        let pending = self.pending();
        if self.record_left == 0 {
            let length = usize::from(u16::from_be_bytes([pending[3], pending[4]]));
            self.record_left = HEADER + length;
        }
        self.record_left.min(self.pending().len())
    }
}

impl AsyncReadRent for RecordPacer {
    async fn read<T: IoBufMut>(&mut self, mut out: T) -> BufResult<usize, T> {
        // A record's header is read whole before any of it is handed over.
        while self.pending().is_empty() || (self.record_left == 0 && self.pending().len() < HEADER)
        {
            match self.fill().await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return (Err(e), out),
            }
        }
        let n = if self.record_left == 0 && self.pending().len() < HEADER {
            // The socket ended inside a header: what there is goes (the TLS layer fails on it).
            self.pending().len()
        } else {
            self.next_piece()
        }
        .min(out.bytes_total());
        let piece = &self.buf[self.at..self.at + n];
        // SAFETY: `out` has room for `bytes_total()` bytes at `write_ptr()`, and `n` is at most
        // that; `piece` is our own buffer, which cannot overlap a buffer the caller owns.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(piece.as_ptr(), out.write_ptr(), n);
            out.set_init(n);
        }
        self.at += n;
        self.record_left = self.record_left.saturating_sub(n);
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        self.held.set(self.buf.len() - self.at);
        (Ok(n), out)
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        // The TLS layer reads with `read` only; a vectored read would need unsafe iovec
        // plumbing for nothing.
        (
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "vectored reads of a TLS record pacer",
            )),
            buf,
        )
    }
}

impl AsyncWriteRent for RecordPacer {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.tcp.write(buf).await
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.tcp.writev(buf).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.tcp.shutdown().await
    }
}
