//! Time as the sessions see it.
//!
//! nbd-proto reads no clock: a driver tells a session the time, and the
//! session decides every deadline of its connection (the handshake's, a
//! request's) from it, as quinn-proto does. The protocol, then, is:
//!
//! ```text
//! at the top of each turn of the loop:  session.handle_timeout(now)
//! before blocking:                      arm one timer at session.poll_timeout()
//! when that timer fires:                session.handle_timeout(now)
//! ```
//!
//! A session's clock is the last time it was given: a deadline that
//! starts (the handshake's when the session first learns the time, a
//! request's when it is started) starts then. A driver that never gives
//! the time has no deadlines. An expired deadline fails the session with
//! [`TimedOut`], which its input methods then return.

use core::fmt;
use core::time::Duration;

/// A point in time, as the time passed since an origin of the driver's
/// choosing (the same origin for every call on one session; a runtime
/// typically takes a process-wide `std::time::Instant`).
///
/// ```
/// use core::time::Duration;
/// use nbd_proto::time::Timestamp;
///
/// let t = Timestamp::from_origin(Duration::from_secs(5));
/// let later = t.saturating_add(Duration::from_millis(250));
/// assert_eq!(later.saturating_duration_since(t), Duration::from_millis(250));
/// assert_eq!(t.saturating_duration_since(later), Duration::ZERO);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(Duration);

impl Timestamp {
    /// The origin itself.
    pub const ORIGIN: Timestamp = Timestamp(Duration::ZERO);

    /// The time `since` after the origin.
    pub const fn from_origin(since: Duration) -> Timestamp {
        Timestamp(since)
    }

    /// How long after the origin this is.
    pub const fn since_origin(self) -> Duration {
        self.0
    }

    /// `d` later (the farthest time there is, if that overflows).
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d))
    }

    /// How long after `earlier` this is (zero if it is not later).
    #[must_use]
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

/// Which of a session's deadlines passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Deadline {
    /// The handshake (the greeting, then each option, TLS included) did
    /// not finish in time.
    Handshake,
    /// A request waited too long for its reply.
    Request,
}

impl fmt::Display for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Deadline::Handshake => "waiting for the peer in the handshake",
            Deadline::Request => "waiting for the server to reply",
        })
    }
}

/// A deadline passed: the session failed (the connection must be closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("timed out after {after:?} {deadline}")]
pub struct TimedOut {
    /// Which deadline.
    pub deadline: Deadline,
    /// How long it was.
    pub after: Duration,
}

/// One pending deadline: when it expires, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timer {
    pub(crate) at: Timestamp,
    pub(crate) expired: TimedOut,
}

impl Timer {
    /// A timer of `after` from `now`.
    pub(crate) fn start(now: Timestamp, deadline: Deadline, after: Duration) -> Timer {
        Timer {
            at: now.saturating_add(after),
            expired: TimedOut { deadline, after },
        }
    }
}
