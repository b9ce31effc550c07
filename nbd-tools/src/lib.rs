//! The command-line tools of the NBD stack, and the engines behind them:
//!
//! - `nbd-serve`: serve files, block devices or memory (like qemu-nbd and
//!   nbdkit), on the async server of `nbd-smol`;
//! - `nbd-info`: describe an export (like libnbd's nbdinfo), on the
//!   blocking client of `nbd-blocking`; [`info`] formats its reports;
//! - `nbd-copy`: copy between NBD exports, files, block devices and
//!   `null:`, stdin and stdout (like libnbd's nbdcopy); [`copy`] is the
//!   copying engine, [`progress`] its progress reports, [`blkhash`] the
//!   checksum of `--blkhash`;
//! - `nbd-fuse`: mount an export as one file over FUSE (like libnbd's
//!   nbdfuse); [`fuse`] is the filesystem.
//!
//! `nbd-info` and `nbd-copy` also run a server as a subprocess, as
//! `nbdinfo -- [ CMD ARGS ... ]` does ([`captive`]); [`cli`] holds what
//! the three command lines share.
//!
//! The libraries (`nbd-proto`, `nbd-blocking`, `nbd-smol`) do not depend
//! on this crate, so their users never compile clap or signal-hook.
#![warn(missing_docs)]

pub mod blkhash;
pub mod captive;
pub mod cli;
pub mod copy;
pub mod fuse;
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

/// Parses a command-line size in bytes: `4096`, `512M`, `1G`, `1.5G`,
/// `2GiB` (binary multiples K, M, G, T, P, E; an optional `B` or `iB`
/// after the suffix): nbd-serve's `--memory` and `--max-payload`,
/// nbd-info's `--offset` and `--length`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                'E' => 1 << 60,
                _ => return Err(format!("invalid size {s:?}: unknown suffix {c:?}")),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"));
    }
    match num.parse::<f64>() {
        Ok(f) if f >= 0.0 && f.is_finite() && f * (mult as f64) < u64::MAX as f64 => Ok((f * mult as f64) as u64),
        _ => Err(format!("invalid size {s:?}")),
    }
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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999E").is_err());
    }
}
