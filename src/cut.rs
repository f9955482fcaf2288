//! The end of a worker's shutdown grace, as something its connections wait on: when it fires,
//! every connection still serving drops its request (whose settle then logs and bills it as
//! cut), instead of the process ending under it with no record.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// One per worker.
#[derive(Default)]
pub struct CutSignal {
    fired: Cell<bool>,
    next_id: Cell<u64>,
    waiting: RefCell<HashMap<u64, Waker>>,
}

impl CutSignal {
    /// Wakes every connection waiting on it; they see it fired.
    pub fn fire(&self) {
        self.fired.set(true);
        for (_, waker) in self.waiting.borrow_mut().drain() {
            waker.wake();
        }
    }

    /// Resolves once `fire` was called.
    pub fn fired(&self) -> Cut<'_> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        Cut {
            signal: self,
            id,
            registered: false,
        }
    }
}

pub struct Cut<'a> {
    signal: &'a CutSignal,
    id: u64,
    registered: bool,
}

impl Future for Cut<'_> {
    type Output = ();

    /// Polled at every wake of its connection's task: after the first, a flag's read. (A monoio
    /// task's waker is its own for its whole life, so the one stored at the first poll stays
    /// right.)
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        if !self.registered {
            self.registered = true;
            self.signal
                .waiting
                .borrow_mut()
                .insert(self.id, cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        if self.registered {
            self.signal.waiting.borrow_mut().remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_is_pending_until_fired_and_forgets_its_waiter_when_dropped() {
        let signal = CutSignal::default();
        let mut cx = Context::from_waker(Waker::noop());
        let mut first = Box::pin(signal.fired());
        let mut second = Box::pin(signal.fired());
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        drop(second);
        assert_eq!(signal.waiting.borrow().len(), 1);
        signal.fire();
        assert!(first.as_mut().poll(&mut cx).is_ready());
        drop(first);
        assert!(signal.waiting.borrow().is_empty());
    }
}
