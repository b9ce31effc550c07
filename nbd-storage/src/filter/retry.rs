//! The `retry` filter: a failed operation is tried again after a delay
//! that doubles, a bounded number of times (nbdkit's `retry` filter).
//!
//! nbdkit also reopens its plugin between attempts; a storage here that
//! has connections to remake (a remote source) remakes them itself, so
//! the filter only waits and tries again.

use std::io;
use std::time::Duration;

use super::{Around, FilterError, Op, parse_bool, parse_delay, unknown_param};

/// How often and how patiently operations are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// `retries` (default 5): attempts after the first.
    pub retries: u32,
    /// `retry-delay` (default 2 s): the wait before the first retry.
    pub delay: Duration,
    /// `retry-exponential` (default yes): each wait is twice the last.
    pub exponential: bool,
    /// `retry-readonly` (default no): after the first failure, writes
    /// fail at once with `EROFS` instead of being retried.
    pub readonly: bool,
}

impl Retry {
    /// The filter from nbdkit's parameters.
    pub fn from_params(params: &[(String, String)]) -> Result<Retry, FilterError> {
        let mut r = Retry {
            retries: 5,
            delay: Duration::from_secs(2),
            exponential: true,
            readonly: false,
        };
        for (k, v) in params {
            match k.as_str() {
                "retries" => {
                    r.retries = v
                        .trim()
                        .parse()
                        .map_err(|_| super::bad("retry", k, format!("{v:?} is not a count")))?;
                }
                "retry-delay" => r.delay = parse_delay("retry", k, v)?,
                "retry-exponential" => r.exponential = parse_bool("retry", k, v)?,
                "retry-readonly" => r.readonly = parse_bool("retry", k, v)?,
                _ => return Err(unknown_param("retry", k)),
            }
        }
        Ok(r)
    }
}

impl Around for Retry {
    fn around(&self, op: Op, call: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()> {
        let mut wait = self.delay;
        let mut attempt = 0;
        loop {
            let e = match call() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            // An argument the storage refuses fails the same way again.
            let permanent = matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM | libc::EROFS)
            );
            if permanent || attempt >= self.retries {
                return Err(e);
            }
            if self.readonly && op.writes() {
                return Err(io::Error::from_raw_os_error(libc::EROFS));
            }
            attempt += 1;
            std::thread::sleep(wait);
            if self.exponential {
                wait = wait.saturating_mul(2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug, Default)]
    struct Flaky(AtomicU32);

    fn retry(p: &[(&str, &str)]) -> Retry {
        let p: Vec<(String, String)> = p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Retry::from_params(&p).unwrap()
    }

    #[test]
    fn failures_are_retried_up_to_the_bound() {
        let r = retry(&[("retries", "3"), ("retry-delay", "1ms")]);
        let calls = Arc::new(Flaky::default());
        // Fails twice, then works.
        let ok = r.around(Op::Read, &mut || {
            if calls.0.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        });
        assert!(ok.is_ok());
        assert_eq!(calls.0.load(Ordering::SeqCst), 3);
        // Always fails: 1 + 3 attempts.
        calls.0.store(0, Ordering::SeqCst);
        let e = r.around(Op::Read, &mut || {
            calls.0.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::from_raw_os_error(libc::EIO))
        });
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(calls.0.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn permanent_errors_and_readonly_writes_are_not_retried() {
        let r = retry(&[("retry-delay", "1ms"), ("retry-readonly", "yes")]);
        let mut n = 0;
        let e = r.around(Op::Read, &mut || {
            n += 1;
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        });
        assert_eq!((e.unwrap_err().raw_os_error(), n), (Some(libc::EINVAL), 1));
        let mut n = 0;
        let e = r.around(Op::Write, &mut || {
            n += 1;
            Err(io::Error::from_raw_os_error(libc::EIO))
        });
        assert_eq!((e.unwrap_err().raw_os_error(), n), (Some(libc::EROFS), 1));
    }

    #[test]
    fn defaults_are_nbdkits() {
        let r = retry(&[]);
        assert_eq!(
            (r.retries, r.delay, r.exponential, r.readonly),
            (5, Duration::from_secs(2), true, false)
        );
        assert!(Retry::from_params(&[("retries".into(), "many".into())]).is_err());
    }
}
