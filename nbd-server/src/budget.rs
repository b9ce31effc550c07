//! The server-wide cap on payload memory.

use std::sync::Mutex;
use std::task::Waker;

/// How many bytes of READ and WRITE payload a server holds at once, over
/// all its connections: READ replies waiting to be sent and WRITE pieces
/// waiting for storage. A connection that cannot get budget stops reading
/// requests until another connection's buffers are released, so a crowd of
/// clients (or one that never reads its replies) cannot make the server
/// allocate without bound.
#[derive(Debug)]
pub struct PayloadBudget {
    total: u64,
    inner: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    available: u64,
    waiters: Vec<Waker>,
}

impl PayloadBudget {
    /// A budget of `total` bytes (at least 1 MiB).
    pub fn new(total: u64) -> PayloadBudget {
        let total = total.max(1 << 20);
        PayloadBudget {
            total,
            inner: Mutex::new(BudgetState {
                available: total,
                waiters: Vec::new(),
            }),
        }
    }

    /// The cap.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes not taken.
    pub fn available(&self) -> u64 {
        self.lock().available
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a request of `n` bytes takes: never more than the whole budget,
    /// so that one request larger than the cap still runs (alone).
    pub(crate) fn cost(&self, n: u64) -> u64 {
        n.min(self.total)
    }

    /// Takes `n` bytes if they are available.
    pub(crate) fn try_acquire(&self, n: u64) -> bool {
        let n = self.cost(n);
        let mut g = self.lock();
        if g.available >= n {
            g.available -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` bytes if they are available; otherwise remembers `waker`,
    /// woken when bytes are released.
    pub(crate) fn acquire_or_wait(&self, n: u64, waker: &Waker) -> bool {
        let n = self.cost(n);
        let mut g = self.lock();
        if g.available >= n {
            g.available -= n;
            true
        } else {
            if !g.waiters.iter().any(|w| w.will_wake(waker)) {
                g.waiters.push(waker.clone());
            }
            false
        }
    }

    /// Gives `n` bytes back (as many as [`PayloadBudget::cost`] took).
    pub(crate) fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let n = self.cost(n);
        let waiters = {
            let mut g = self.lock();
            g.available = (g.available + n).min(self.total);
            std::mem::take(&mut g.waiters)
        };
        for w in waiters {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_and_release() {
        let b = PayloadBudget::new(4 << 20);
        assert!(b.try_acquire(3 << 20));
        assert!(!b.try_acquire(2 << 20));
        b.release(3 << 20);
        assert_eq!(b.available(), 4 << 20);
        // Larger than the whole budget: takes all of it.
        assert!(b.try_acquire(100 << 20));
        assert_eq!(b.available(), 0);
        b.release(100 << 20);
        assert_eq!(b.available(), 4 << 20);
    }
}
