//! The threads that run blocking storage calls, off the threads that serve
//! sockets: a pool of worker threads for jobs of any one type, which knows
//! nothing of what they do (the executor's jobs are
//! [`IoPool`](crate::IoPool)'s, in `exec`).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

/// Work for the pool's threads.
pub(crate) trait Task: Send + 'static {
    /// Does the work (on a pool thread).
    fn run(self);
}

/// A fixed set of threads that run jobs of type `T`. Jobs wait in one
/// queue (no allocation per job once the queue has grown); threads start
/// on first use, and end with the last handle, once the queue is done.
#[derive(Debug)]
pub(crate) struct Workers<T> {
    handle: Arc<PoolHandle<T>>,
}

impl<T> Clone for Workers<T> {
    fn clone(&self) -> Self {
        Workers {
            handle: self.handle.clone(),
        }
    }
}

/// Dropped with the last [`Workers`]: the threads finish the queue and end.
#[derive(Debug)]
struct PoolHandle<T> {
    inner: Arc<PoolInner<T>>,
}

impl<T> Drop for PoolHandle<T> {
    fn drop(&mut self) {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.inner.ready.notify_all();
    }
}

#[derive(Debug)]
struct PoolInner<T> {
    threads: usize,
    state: Mutex<PoolState<T>>,
    ready: Condvar,
}

#[derive(Debug)]
struct PoolState<T> {
    queue: VecDeque<T>,
    started: usize,
    idle: usize,
    closed: bool,
}

impl<T: Task> Workers<T> {
    /// A pool of at most `threads` threads (at least 1).
    pub(crate) fn new(threads: usize) -> Workers<T> {
        Workers {
            handle: Arc::new(PoolHandle {
                inner: Arc::new(PoolInner {
                    threads: threads.max(1),
                    state: Mutex::new(PoolState {
                        queue: VecDeque::new(),
                        started: 0,
                        idle: 0,
                        closed: false,
                    }),
                    ready: Condvar::new(),
                }),
            }),
        }
    }

    /// The most threads it runs.
    pub(crate) fn threads(&self) -> usize {
        self.handle.inner.threads
    }

    /// Queues `job` for the next free thread (starting one if none is
    /// idle and the limit allows).
    pub(crate) fn submit(&self, job: T) {
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

fn worker<T: Task>(inner: &PoolInner<T>) {
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
