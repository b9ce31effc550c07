//! The runtimes' clock for the sessions' [`Timestamp`]s: one origin per
//! process, so that every session of a process counts from the same
//! instant. A runtime gives the sessions [`now`] and arms its timer at
//! [`instant`] of what `poll_timeout` answers.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nbd_proto::time::Timestamp;

/// The process's origin of [`Timestamp`]s (the first time it is asked).
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The time now, for a session.
pub fn now() -> Timestamp {
    Timestamp::from_origin(Instant::now().saturating_duration_since(origin()))
}

/// The `Instant` of a session's time (far in the future if it does not
/// fit one), to arm a timer at.
pub fn instant(t: Timestamp) -> Instant {
    let o = origin();
    o.checked_add(t.since_origin())
        .unwrap_or_else(|| o + Duration::from_secs(100 * 365 * 86_400))
}

/// How long from now until `t` (zero once it passed): a blocking
/// runtime's socket timeout.
pub fn until(t: Timestamp) -> Duration {
    t.saturating_duration_since(now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_and_instant_agree() {
        let t = now();
        let i = instant(t);
        assert!(i <= Instant::now());
        assert!(Instant::now() - i < Duration::from_secs(5));
        let later = t.saturating_add(Duration::from_secs(60));
        assert!(until(later) > Duration::from_secs(50));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(until(t), Duration::ZERO, "a time that passed is due now");
        assert!(instant(Timestamp::from_origin(Duration::MAX)) > Instant::now() + Duration::from_secs(86_400));
    }
}
