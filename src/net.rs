//! Small helpers over monoio's rent-style IO: append-reads into a growable buffer and
//! whole-buffer writes, each optionally bounded by a timeout. Dropping a timed-out read
//! cancels the in-flight io_uring operation (monoio's `async-cancel` feature), and callers close
//! the connection after any timeout, so no bytes are lost to a later reader.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use monoio::time::{Instant, Sleep};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

/// Outcome of a bounded IO step.
#[derive(Debug)]
pub enum Timed<T> {
    Done(T),
    TimedOut,
}

/// Reads once, appending to `buf` (growing it by at least `spare` bytes of room first).
/// Returns the count read; 0 means the peer closed. If the future is dropped, `buf` is empty.
pub async fn read_more<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    spare: usize,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < spare {
        buf.reserve(spare);
    }
    let owned = std::mem::take(buf);
    let len = owned.len();
    let (res, slice) = stream.read(owned.slice_mut(len..)).await;
    *buf = slice.into_inner();
    res
}

pub async fn read_more_within<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    spare: usize,
    limit: Duration,
) -> Timed<io::Result<usize>> {
    match monoio::time::timeout(limit, read_more(stream, buf, spare)).await {
        Ok(res) => Timed::Done(res),
        Err(_) => Timed::TimedOut,
    }
}

/// Reads once into `buf` as [`read_more`] does, giving up at `deadline`, on a timer the caller
/// keeps across reads: a stream's deadline moves with every read, and re-arming a timer for
/// each (a timer-wheel insert and removal per read) is what a long stream would pay for it.
/// Here the timer is moved only when it would fire late; when it fires early (the deadline
/// has moved on since it was armed) it is re-armed to the deadline and the read goes on,
/// untouched. So a timeout is exact, and a stream pays about one timer per `limit`.
pub async fn read_more_by<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    spare: usize,
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
) -> Timed<io::Result<usize>> {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    let read = std::pin::pin!(read_more(stream, buf, spare));
    let mut read = read;
    loop {
        monoio::select! {
            // Bytes that came as the deadline passed are taken, not dropped for a timeout.
            biased;
            res = &mut read => return Timed::Done(res),
            _ = &mut timer => {
                if Instant::now() >= deadline {
                    return Timed::TimedOut;
                }
                timer.as_mut().reset(deadline);
            }
        }
    }
}

/// Writes all of `data` and hands the buffer back for reuse.
pub async fn write_all<S: AsyncWriteRent>(
    stream: &mut S,
    data: Vec<u8>,
) -> (io::Result<()>, Vec<u8>) {
    let (res, data) = stream.write_all(data).await;
    (res.map(|_| ()), data)
}

/// Writes all of `data` within `limit`; the buffer comes back unless the write timed out (the
/// cancelled write took it: a fresh one comes back).
pub async fn write_all_within<S: AsyncWriteRent>(
    stream: &mut S,
    data: Vec<u8>,
    limit: Duration,
) -> (Timed<io::Result<()>>, Vec<u8>) {
    match monoio::time::timeout(limit, write_all(stream, data)).await {
        Ok((res, data)) => (Timed::Done(res), data),
        Err(_) => (Timed::TimedOut, Vec::new()),
    }
}

/// Writes `data[from..]`, handing the buffer back.
pub async fn write_from<S: AsyncWriteRent>(
    stream: &mut S,
    data: Vec<u8>,
    from: usize,
) -> (io::Result<()>, Vec<u8>) {
    use monoio::buf::IoBuf;
    let (res, slice) = stream.write_all(data.slice(from..)).await;
    (res.map(|_| ()), slice.into_inner())
}
