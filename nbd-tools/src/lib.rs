//! The command-line tools of the NBD stack, and the engines behind them:
//!
//! - `nbd-serve`: serve files, block devices or memory (like qemu-nbd and
//!   nbdkit), on the async server of `nbd-smol`;
//! - `nbd-info`: describe an export (like libnbd's nbdinfo), on the
//!   blocking client of `nbd-blocking`; [`info`] formats its reports;
//! - `nbd-copy`: copy between NBD exports, files, block devices and
//!   `null:`, stdin and stdout (like libnbd's nbdcopy); [`copy`] is the
//!   copying engine, [`progress`] its progress reports.
//!
//! `nbd-info` and `nbd-copy` also run a server as a subprocess, as
//! `nbdinfo -- [ CMD ARGS ... ]` does ([`captive`]); [`cli`] holds what
//! the three command lines share.
//!
//! The libraries (`nbd-proto`, `nbd-blocking`, `nbd-smol`) do not depend
//! on this crate, so their users never compile clap or signal-hook.
#![warn(missing_docs)]

pub mod captive;
pub mod cli;
pub mod copy;
pub mod info;
pub mod progress;

/// A command-line duration in seconds (`--timeout=SECS`,
/// `--reconnect-delay=SECS`); 0 is `None`, no deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Option<std::time::Duration>);

/// Parses [`Seconds`]: a non-negative number, fractions allowed.
pub fn parse_seconds(s: &str) -> Result<Seconds, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid number of seconds {s:?}"))?;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("seconds must be between 0 and 1e9, not {s:?}"));
    }
    Ok(Seconds((secs > 0.0).then(|| std::time::Duration::from_secs_f64(secs))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("0"), Ok(Seconds(None)));
        assert_eq!(parse_seconds("2"), Ok(Seconds(Some(Duration::from_secs(2)))));
        assert_eq!(parse_seconds(" 0.5 "), Ok(Seconds(Some(Duration::from_millis(500)))));
        for bad in ["", "-1", "NaN", "inf", "1e10", "5s"] {
            assert!(parse_seconds(bad).is_err(), "{bad:?}");
        }
    }
}
