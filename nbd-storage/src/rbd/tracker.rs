//! The requests of one export that librbd has not answered yet, so that
//! they can be answered without it: when they outlive the deadline, and
//! when the image turns out to have been removed (librbd then waits
//! forever for an exclusive lock it can no longer take).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Completion;

/// How often the monitor looks at the requests in flight.
const TICK: Duration = Duration::from_millis(250);

/// A request unanswered this long makes the monitor check that the image
/// still exists.
pub(super) const STALL: Duration = Duration::from_secs(2);

/// While requests come in, the image's existence is checked at least this
/// often (reads of a removed image would otherwise return zeroes).
pub(super) const RECHECK: Duration = Duration::from_secs(5);

/// A request's place in the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Key {
    index: usize,
    generation: u64,
}

struct Slot {
    generation: u64,
    pending: Option<(Completion, Instant)>,
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Why the export serves no more requests, once it does not.
    dead: Option<String>,
    /// A request arrived since the last existence check.
    active: bool,
    /// Requests answered here that librbd has not finished.
    abandoned: usize,
}

/// The requests in flight of one export.
pub(super) struct Tracker {
    slots: Mutex<Slots>,
    wake: Condvar,
    closed: AtomicBool,
    /// Requests older than this are answered with `ETIMEDOUT`.
    deadline: Option<Duration>,
    /// What the export is called in messages.
    name: String,
}

impl Tracker {
    pub(super) fn new(name: String, deadline: Option<Duration>) -> Tracker {
        Tracker {
            slots: Mutex::new(Slots::default()),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            deadline,
            name,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a request in; gives the completion back if the export is
    /// dead (answer it with [`Tracker::refusal`]).
    pub(super) fn begin(&self, done: Completion) -> Result<Key, Completion> {
        let mut g = self.lock();
        if g.dead.is_some() {
            return Err(done);
        }
        g.active = true;
        let pending = Some((done, Instant::now()));
        let index = match g.free.pop() {
            Some(i) => i,
            None => {
                g.slots.push(Slot {
                    generation: 0,
                    pending: None,
                });
                g.slots.len() - 1
            }
        };
        let slot = &mut g.slots[index];
        slot.generation = slot.generation.wrapping_add(1);
        slot.pending = pending;
        Ok(Key {
            index,
            generation: slot.generation,
        })
    }

    /// The error for requests to a dead export.
    pub(super) fn refusal(&self) -> io::Error {
        let why = self.lock().dead.clone();
        io::Error::other(why.unwrap_or_else(|| format!("{}: the export is closed", self.name)))
    }

    /// librbd answered: the completion, unless the request was answered
    /// already.
    pub(super) fn end(&self, key: Key) -> Option<Completion> {
        let mut g = self.lock();
        let pending = match g.slots.get_mut(key.index) {
            Some(slot) if slot.generation == key.generation => slot.pending.take(),
            _ => None,
        };
        match pending {
            Some((done, _)) => {
                g.free.push(key.index);
                Some(done)
            }
            None => {
                // A request answered here (past the deadline, or the image
                // was removed) that librbd finished after all.
                g.abandoned = g.abandoned.saturating_sub(1);
                None
            }
        }
    }

    /// Whether librbd holds requests that were answered here (past the
    /// deadline) and has not finished yet.
    pub(super) fn abandoned(&self) -> bool {
        self.lock().abandoned > 0
    }

    /// Whether librbd holds requests that were answered here and may never
    /// finish, or the image was removed: closing the image would wait for
    /// them forever.
    pub(super) fn stuck(&self) -> bool {
        let g = self.lock();
        g.abandoned > 0 || g.dead.is_some()
    }

    /// Answers every request in flight with `why`, and every later one.
    pub(super) fn kill(&self, why: String) {
        let taken = {
            let mut g = self.lock();
            if g.dead.is_some() {
                return;
            }
            g.dead = Some(why.clone());
            take_where(&mut g, |_| true)
        };
        for done in taken {
            done.complete(Err(io::Error::other(why.clone())));
        }
    }

    /// Stops the monitor.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _g = self.lock();
        self.wake.notify_all();
    }

    /// The monitor's loop: answers requests past the deadline and asks
    /// `check` (which must not block; it runs the check elsewhere) to
    /// verify the image exists when a request stalls or, while requests
    /// arrive, every [`RECHECK`].
    pub(super) fn monitor(self: &Arc<Tracker>, check: impl Fn()) {
        let mut last_check = Instant::now();
        let mut g = self.lock();
        loop {
            g = self.wake.wait_timeout(g, TICK).unwrap_or_else(|e| e.into_inner()).0;
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            if g.dead.is_some() {
                continue;
            }
            let now = Instant::now();
            let oldest = g.slots.iter().filter_map(|s| s.pending.as_ref().map(|p| p.1)).min();
            let stalled = oldest.is_some_and(|t| now.duration_since(t) >= STALL);
            let due = g.active && now.duration_since(last_check) >= RECHECK;
            if (stalled || due) && now.duration_since(last_check) >= STALL {
                g.active = false;
                last_check = now;
                check();
            }
            let Some(deadline) = self.deadline else {
                continue;
            };
            if oldest.is_none_or(|t| now.duration_since(t) < deadline) {
                continue;
            }
            let expired = take_where(&mut g, |since| now.duration_since(since) >= deadline);
            drop(g);
            for done in expired {
                done.complete(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: no answer from the Ceph cluster within {} s",
                        self.name,
                        deadline.as_secs()
                    ),
                )));
            }
            g = self.lock();
        }
    }
}

/// Takes the completions of the requests whose start matches `pred`.
/// Takes the completions of the requests whose start matches `pred`
/// (librbd still holds them: they count as abandoned).
fn take_where(g: &mut Slots, pred: impl Fn(Instant) -> bool) -> Vec<Completion> {
    let mut out = Vec::new();
    for (i, slot) in g.slots.iter_mut().enumerate() {
        if let Some((done, _)) = slot.pending.take_if(|p| pred(p.1)) {
            out.push(done);
            g.free.push(i);
        }
    }
    g.abandoned += out.len();
    out
}
