//! The threads that run blocking storage calls, off the threads that serve
//! sockets.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use super::exec::Job;

/// A fixed set of threads that run storage calls which may block (file
/// I/O, `fdatasync`, a backend waiting on the network), so that a slow
/// call never delays other connections' requests, nor the reading of this
/// connection's next requests. Jobs wait in one queue (no allocation per
/// job once the queue has grown); threads start on first use.
#[derive(Debug, Clone)]
pub struct IoPool {
    handle: Arc<PoolHandle>,
}

/// Dropped with the last [`IoPool`]: the threads finish the queue and end.
#[derive(Debug)]
struct PoolHandle {
    inner: Arc<PoolInner>,
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.inner.ready.notify_all();
    }
}

#[derive(Debug)]
struct PoolInner {
    threads: usize,
    state: Mutex<PoolState>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    queue: VecDeque<Job>,
    started: usize,
    idle: usize,
    closed: bool,
}

impl IoPool {
    /// A pool of at most `threads` threads (at least 1).
    pub fn new(threads: usize) -> IoPool {
        IoPool {
            handle: Arc::new(PoolHandle {
                inner: Arc::new(PoolInner {
                    threads: threads.max(1),
                    state: Mutex::new(PoolState::default()),
                    ready: Condvar::new(),
                }),
            }),
        }
    }

    /// The most threads it runs.
    pub fn threads(&self) -> usize {
        self.handle.inner.threads
    }

    pub(crate) fn submit(&self, job: Job) {
        let pool = &self.handle.inner;
        let spawn = {
            let mut g = pool.state.lock().unwrap_or_else(|p| p.into_inner());
            g.queue.push_back(job);
            // Start a thread when none is idle (up to the limit).
            if g.idle == 0 && g.started < pool.threads {
                g.started += 1;
                true
            } else {
                false
            }
        };
        if spawn {
            let inner = pool.clone();
            let r = std::thread::Builder::new()
                .name("nbd-io".into())
                .spawn(move || worker(&inner));
            if r.is_err() {
                // Out of threads: the ones running take the job.
                let mut g = pool.state.lock().unwrap_or_else(|p| p.into_inner());
                g.started -= 1;
                if g.started == 0 {
                    // Nobody would ever run it: run it here.
                    if let Some(job) = g.queue.pop_front() {
                        drop(g);
                        job.run();
                    }
                }
                return;
            }
        }
        pool.ready.notify_one();
    }
}

fn worker(inner: &PoolInner) {
    let mut g = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(job) = g.queue.pop_front() {
            drop(g);
            job.run();
            g = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        if g.closed {
            g.started -= 1;
            return;
        }
        g.idle += 1;
        g = inner.ready.wait(g).unwrap_or_else(|p| p.into_inner());
        g.idle -= 1;
    }
}
