//! The `delay` filter: operations wait before they run, as a slow or
//! distant server would (nbdkit's `delay` filter).

use std::io;
use std::time::Duration;

use super::{Around, FilterError, Op, parse_bool, parse_delay, unknown_param};

/// Delays per operation (zero: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delay {
    /// `rdelay` / `delay-read`.
    pub read: Duration,
    /// `wdelay` / `delay-write`.
    pub write: Duration,
    /// `delay-zero`.
    pub zero: Duration,
    /// `delay-trim`.
    pub trim: Duration,
    /// `delay-extents`.
    pub extents: Duration,
    /// `delay-cache`.
    pub cache: Duration,
    /// `delay-fast-zero` (default true): a fast zero request is delayed as
    /// any other; false refuses it at once with `EOPNOTSUPP` where zeroes
    /// are delayed, since it could not be fast.
    pub fast_zero: bool,
}

impl Delay {
    /// The filter from nbdkit's parameters.
    pub fn from_params(params: &[(String, String)]) -> Result<Delay, FilterError> {
        let mut d = Delay {
            fast_zero: true,
            ..Delay::default()
        };
        for (k, v) in params {
            let slot = match k.as_str() {
                "rdelay" | "delay-read" => &mut d.read,
                "wdelay" | "delay-write" => &mut d.write,
                "delay-zero" => &mut d.zero,
                "delay-trim" => &mut d.trim,
                "delay-extents" => &mut d.extents,
                "delay-cache" => &mut d.cache,
                "delay-fast-zero" => {
                    d.fast_zero = parse_bool("delay", k, v)?;
                    continue;
                }
                _ => return Err(unknown_param("delay", k)),
            };
            *slot = parse_delay("delay", k, v)?;
        }
        Ok(d)
    }
}

impl Around for Delay {
    fn around(&self, op: Op, call: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()> {
        let wait = match op {
            Op::Read => self.read,
            Op::Write => self.write,
            Op::Zero(flags) => {
                if flags.fast && !self.fast_zero && !self.zero.is_zero() {
                    return Err(crate::fast_zero_unsupported());
                }
                self.zero
            }
            Op::Trim => self.trim,
            Op::Extents => self.extents,
            Op::Cache => self.cache,
            _ => Duration::ZERO,
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        call()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::filter::Filtered;
    use crate::{MemoryStorage, Storage, ZeroFlags};

    fn params(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn operations_wait_as_configured() {
        let d = Delay::from_params(&params(&[("rdelay", "30ms"), ("delay-zero", "0.03")])).unwrap();
        assert_eq!(d.read, Duration::from_millis(30));
        assert_eq!(d.write, Duration::ZERO);
        let s = Filtered::new(Arc::new(MemoryStorage::new(4096)), d);
        let t = Instant::now();
        s.write_at(&[1; 512], 0, false).unwrap();
        assert!(t.elapsed() < Duration::from_millis(30), "writes are not delayed");
        let t = Instant::now();
        let mut b = [0u8; 512];
        s.read_at(&mut b, 0).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert_eq!(b, [1; 512]);
        let t = Instant::now();
        s.write_zeroes(0, 512, ZeroFlags::default()).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn fast_zeroes_are_refused_when_asked() {
        let d = Delay::from_params(&params(&[("delay-zero", "1"), ("delay-fast-zero", "false")])).unwrap();
        let s = Filtered::new(Arc::new(MemoryStorage::new(4096)), d);
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        let t = Instant::now();
        let e = s.write_zeroes(0, 512, fast).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
