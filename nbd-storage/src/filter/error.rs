//! The `error` filter: operations fail with an errno, at a rate, and only
//! while a trigger file exists if one is named (nbdkit's `error` filter),
//! so that clients can be tested against a failing server.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Around, FilterError, Op, bad, unknown_param};

/// When one kind of operation fails, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// The errno (`error=`: EPERM, EIO, ENOMEM, EINVAL, ENOSPC, ESHUTDOWN;
    /// default EIO).
    pub errno: i32,
    /// The probability of failing, 0 to 1 (`error-rate=10%|0.1|1:10`;
    /// default 0: never).
    pub rate: f64,
    /// Errors only while this file exists (`error-file=`).
    pub file: Option<PathBuf>,
}

/// The `error` filter: an error injection per operation nbdkit names
/// (`pread`, `pwrite`, `trim`, `zero`, `extents`, `cache`; flush is never
/// failed, as in nbdkit).
#[derive(Debug)]
pub struct InjectErrors {
    pread: Injection,
    pwrite: Injection,
    trim: Injection,
    zero: Injection,
    extents: Injection,
    cache: Injection,
    /// xorshift64* state.
    rng: AtomicU64,
}

const OPS: [&str; 6] = ["pread", "pwrite", "trim", "zero", "extents", "cache"];

impl InjectErrors {
    /// The filter from nbdkit's parameters: `error`, `error-rate` and
    /// `error-file` for every operation, `error-OP`, `error-OP-rate` and
    /// `error-OP-file` for one (they win, whatever their order).
    pub fn from_params(params: &[(String, String)]) -> Result<InjectErrors, FilterError> {
        let default = Injection {
            errno: libc::EIO,
            rate: 0.0,
            file: None,
        };
        let mut all = default.clone();
        let mut per: [(Option<i32>, Option<f64>, Option<PathBuf>); 6] = Default::default();
        for (k, v) in params {
            let Some(rest) = k.strip_prefix("error") else {
                return Err(unknown_param("error", k));
            };
            let (op, what) = match rest {
                "" => (None, ""),
                "-rate" => (None, "rate"),
                "-file" => (None, "file"),
                _ => {
                    let rest = rest.strip_prefix('-').ok_or_else(|| unknown_param("error", k))?;
                    let (op, what) = match rest.split_once('-') {
                        Some((op, what)) => (op, what),
                        None => (rest, ""),
                    };
                    let i = OPS
                        .iter()
                        .position(|o| *o == op)
                        .ok_or_else(|| unknown_param("error", k))?;
                    (Some(i), what)
                }
            };
            match (what, op) {
                ("", None) => all.errno = parse_errno(k, v)?,
                ("", Some(i)) => per[i].0 = Some(parse_errno(k, v)?),
                ("rate", None) => all.rate = parse_rate(k, v)?,
                ("rate", Some(i)) => per[i].1 = Some(parse_rate(k, v)?),
                ("file", None) => all.file = Some(PathBuf::from(v)),
                ("file", Some(i)) => per[i].2 = Some(PathBuf::from(v)),
                _ => return Err(unknown_param("error", k)),
            }
        }
        let [pread, pwrite, trim, zero, extents, cache] = per.map(|(errno, rate, file)| Injection {
            errno: errno.unwrap_or(all.errno),
            rate: rate.unwrap_or(all.rate),
            file: file.or_else(|| all.file.clone()),
        });
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
            | 1;
        Ok(InjectErrors {
            pread,
            pwrite,
            trim,
            zero,
            extents,
            cache,
            rng: AtomicU64::new(seed),
        })
    }

    /// A uniform number in [0, 1).
    fn random(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .rng
                .compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return (y.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64,
                Err(now) => x = now,
            }
        }
    }

    /// The error `op` fails with this time, if it does.
    fn injected(&self, op: Op) -> Option<io::Error> {
        let i = match op {
            Op::Read => &self.pread,
            Op::Write => &self.pwrite,
            Op::Trim => &self.trim,
            Op::Zero(_) => &self.zero,
            Op::Extents => &self.extents,
            Op::Cache => &self.cache,
            _ => return None,
        };
        if i.rate <= 0.0 || i.file.as_ref().is_some_and(|f| !f.exists()) {
            return None;
        }
        (i.rate >= 1.0 || self.random() < i.rate).then(|| io::Error::from_raw_os_error(i.errno))
    }
}

impl Around for InjectErrors {
    fn around(&self, op: Op, call: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()> {
        match self.injected(op) {
            Some(e) => Err(e),
            None => call(),
        }
    }
}

/// The errors nbdkit's filter can inject.
fn parse_errno(key: &str, v: &str) -> Result<i32, FilterError> {
    Ok(match v {
        "EPERM" => libc::EPERM,
        "EIO" => libc::EIO,
        "ENOMEM" => libc::ENOMEM,
        "EINVAL" => libc::EINVAL,
        "ENOSPC" => libc::ENOSPC,
        "ESHUTDOWN" => libc::ESHUTDOWN,
        _ => {
            return Err(bad(
                "error",
                key,
                format!("{v:?}: one of EPERM, EIO, ENOMEM, EINVAL, ENOSPC, ESHUTDOWN"),
            ));
        }
    })
}

/// `10%`, `0.1` or `1:10`.
fn parse_rate(key: &str, v: &str) -> Result<f64, FilterError> {
    let t = v.trim();
    let r = if let Some(p) = t.strip_suffix('%') {
        p.trim().parse::<f64>().map(|p| p / 100.0).ok()
    } else if let Some((a, b)) = t.split_once(':') {
        match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
            (Ok(a), Ok(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    } else {
        t.parse::<f64>().ok()
    };
    match r {
        Some(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(bad(
            "error",
            key,
            format!("{v:?} is not a rate from 0 to 1 (e.g. 10%, 0.1, 1:10)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::filter::Filtered;
    use crate::{MemoryStorage, Storage};

    fn params(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn filtered(p: &[(&str, &str)]) -> Filtered<InjectErrors> {
        Filtered::new(
            Arc::new(MemoryStorage::new(1 << 20)),
            InjectErrors::from_params(&params(p)).unwrap(),
        )
    }

    #[test]
    fn nothing_fails_without_a_rate() {
        let s = filtered(&[("error", "ENOSPC")]);
        s.write_at(&[1; 512], 0, false).unwrap();
        s.read_at(&mut [0; 512], 0).unwrap();
    }

    #[test]
    fn per_operation_settings_win() {
        // nbdkit's example: writes and zeroes fail with ENOSPC, the rest works.
        let s = filtered(&[
            ("error", "ENOSPC"),
            ("error-pwrite-rate", "100%"),
            ("error-zero-rate", "1:1"),
            ("error-pread", "EPERM"),
        ]);
        assert_eq!(
            s.write_at(&[1], 0, false).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        let e = s.write_zeroes(0, 512, Default::default()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        s.read_at(&mut [0; 512], 0).unwrap();
        s.trim(0, 512, false).unwrap();
        s.flush().unwrap();
        let s = filtered(&[("error-rate", "1"), ("error-pread", "EPERM")]);
        assert_eq!(s.read_at(&mut [0], 0).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert_eq!(s.cache(0, 1).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(s.flush().is_ok(), "flush is never failed");
    }

    #[test]
    fn a_rate_fails_about_that_often() {
        let s = filtered(&[("error-rate", "25%")]);
        let failed = (0..4000).filter(|_| s.read_at(&mut [0], 0).is_err()).count();
        assert!((700..1300).contains(&failed), "{failed} of 4000 at 25%");
    }

    #[test]
    fn errors_only_while_the_file_exists() {
        let dir = std::env::temp_dir().join(format!("nbd-error-filter-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let file = dir.to_str().unwrap().to_string();
        let s = filtered(&[("error-rate", "100%"), ("error-file", &file)]);
        s.read_at(&mut [0], 0).unwrap();
        std::fs::write(&dir, b"").unwrap();
        assert!(s.read_at(&mut [0], 0).is_err());
        std::fs::remove_file(&dir).unwrap();
        s.read_at(&mut [0], 0).unwrap();
    }

    #[test]
    fn bad_parameters_are_refused() {
        for (k, v) in [
            ("error", "EAGAIN"),
            ("error-rate", "150%"),
            ("error-rate", "x"),
            ("error-flush", "EIO"),
            ("errors", "EIO"),
        ] {
            assert!(InjectErrors::from_params(&params(&[(k, v)])).is_err(), "{k}={v}");
        }
    }
}
