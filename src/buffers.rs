//! A worker's free list of byte buffers. The request path takes its big buffers here (the
//! upstream request, the response read buffer, the relay's decode and write buffers) and gives
//! them back when the request ends, so a steady flow of requests allocates nothing big.
//! Why: with a fresh 16 KiB buffer per step, glibc's per-thread arenas grew and trimmed their
//! heaps in waves; page faults and `sysmalloc` took ~12% of Aura's CPU in perf scenario (b)
//! (`perf record -e cpu-clock`, see perf/RESULTS.md). Per worker, so `!Send` and lock-free.

use std::cell::{Cell, RefCell};

/// Buffers kept at most, per worker: about 50 requests in flight (4 to 5 buffers each), at most
/// 256 × 64 KiB held after a burst. More in flight allocate as before.
const MAX_KEPT: usize = 256;
/// How often a worker trims its pool.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// A buffer that grew past this (a large body) is freed rather than kept.
const MAX_KEPT_CAPACITY: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct BufPool {
    free: RefCell<Vec<Vec<u8>>>,
    /// The fewest buffers kept since the last trim: that many were never needed.
    low_water: Cell<usize>,
}

impl BufPool {
    /// An empty buffer, with the capacity it had when it was given back.
    pub fn take(&self) -> Vec<u8> {
        let mut free = self.free.borrow_mut();
        let buf = free.pop().unwrap_or_default();
        self.low_water.set(self.low_water.get().min(free.len()));
        buf
    }

    /// Frees the buffers that sat unused since the last trim (the low-water mark), so memory
    /// taken in a burst goes back once the burst is over. Called every [`TRIM_EVERY`].
    pub fn trim(&self) {
        let mut free = self.free.borrow_mut();
        let unused = self.low_water.get().min(free.len());
        let keep = free.len() - unused;
        free.truncate(keep);
        free.shrink_to_fit();
        self.low_water.set(free.len());
    }

    /// Keeps `buf` for a later `take`, unless it is too big or the pool is full.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > MAX_KEPT_CAPACITY {
            return;
        }
        let mut free = self.free.borrow_mut();
        if free.len() < MAX_KEPT {
            buf.clear();
            free.push(buf);
        }
    }

    /// Buffers held now.
    pub fn kept(&self) -> usize {
        self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_empty_with_its_capacity() {
        let pool = BufPool::default();
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(b"secret bytes of a previous request");
        pool.give(b);
        let again = pool.take();
        assert!(again.is_empty());
        assert!(again.capacity() >= 4096);
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn trimming_frees_what_a_whole_interval_did_not_need() {
        let pool = BufPool::default();
        for _ in 0..10 {
            pool.give(Vec::with_capacity(64));
        }
        // First interval: the burst just ended, nothing taken since; all 10 were given during
        // it, so the low-water mark is still 0 and nothing is freed yet.
        pool.trim();
        assert_eq!(pool.kept(), 10);
        // Second interval: at most 3 in use at once, so 7 were never needed.
        let taken: Vec<_> = (0..3).map(|_| pool.take()).collect();
        for b in taken {
            pool.give(b);
        }
        pool.trim();
        assert_eq!(pool.kept(), 3);
        // An idle interval frees the rest.
        pool.trim();
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn big_and_empty_buffers_are_not_kept_and_the_pool_is_bounded() {
        let pool = BufPool::default();
        pool.give(Vec::new());
        pool.give(Vec::with_capacity(MAX_KEPT_CAPACITY + 1));
        assert_eq!(pool.kept(), 0);
        for _ in 0..MAX_KEPT + 10 {
            pool.give(Vec::with_capacity(16));
        }
        assert_eq!(pool.kept(), MAX_KEPT);
    }
}
