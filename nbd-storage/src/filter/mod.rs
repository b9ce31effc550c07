//! Filters: storage over storage, stacked, with nbdkit's names and
//! parameters, so that an `nbdkit --filter=... PLUGIN KEY=VALUE ...`
//! command line translates directly.
//!
//! | filter | what it does | parameters |
//! | --- | --- | --- |
//! | `cache` | a local cache file in front of the storage below: reads of what it holds never go below; writes are written back on flush, through at once, or on eviction ([`Cache`]) | `cache=writeback\|writethrough\|unsafe`, `cache-on-read=BOOL\|/PATH`, `cache-min-block-size=SIZE`, `cache-max-size=SIZE`, `cache-high-threshold=N`, `cache-low-threshold=N`, `cachedir=DIR` |
//! | `cow` | writes go to a temporary local overlay; the storage below is never written ([`crate::cow::CowStorage`]) | `cow-block-size=SIZE` |
//! | `delay` | delays operations ([`Delay`]) | `rdelay`, `wdelay`, `delay-read`, `delay-write`, `delay-zero`, `delay-trim`, `delay-extents`, `delay-cache`, `delay-fast-zero=BOOL` |
//! | `error` | fails operations with an errno, at a rate, while a file exists ([`InjectErrors`]) | `error`, `error-rate`, `error-file`, and each of them per operation: `error-pread`, `error-pwrite`, `error-zero`, `error-trim`, `error-extents`, `error-cache`, `error-flush` (`-rate`, `-file`) |
//! | `readahead` | sequential reads read a growing window ahead (64 KiB doubling to 4 MiB) from below and are served from it ([`ReadAhead`]) | none |
//! | `retry` | retries a failed operation after a delay that grows ([`Retry`]) | `retries`, `retry-delay`, `retry-exponential=BOOL`, `retry-readonly=BOOL` |
//!
//! A [`FilterSpec`] is written `NAME[:KEY=VALUE[,KEY=VALUE...]]` (what
//! `nbd-serve --filter` takes). [`stack`] applies several in nbdkit's
//! order: the first is the one the client talks to, the last sits right on
//! the storage.
//!
//! ```
//! use std::sync::Arc;
//! use nbd_storage::filter::{FilterSpec, stack};
//! use nbd_storage::{MemoryStorage, Storage};
//!
//! let disk: Arc<dyn Storage> = Arc::new(MemoryStorage::new(1 << 20));
//! let specs: Vec<FilterSpec> = ["error:error=ENOSPC,error-pwrite-rate=100%", "delay:rdelay=1ms"]
//!     .iter()
//!     .map(|s| s.parse())
//!     .collect::<Result<_, _>>()?;
//! let filtered = stack(disk, &specs, None)?;
//! let mut buf = [0u8; 512];
//! filtered.read_at(&mut buf, 0)?; // 1 ms late
//! let e = filtered.write_at(&buf, 0, false).unwrap_err();
//! assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cache;
mod delay;
mod error;
mod readahead;
mod retry;
#[cfg(test)]
pub(crate) mod testing;

use std::fmt;
use std::io;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use cache::{CACHE_BLOCK_SIZE, Cache, CacheMode, CacheOnRead, CacheOptions};
pub use delay::Delay;
pub use error::{InjectErrors, Injection};
pub use readahead::{MAX_WINDOW, MIN_WINDOW, ReadAhead};
pub use retry::Retry;

use crate::{Capabilities, Extent, SparseReads, StatusExtent, Storage, ZeroFlags};

/// One filter of a stack, as written on a command line:
/// `NAME[:KEY=VALUE[,KEY=VALUE...]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSpec {
    /// The filter's name (`cache`, `cow`, `delay`, `error`, `readahead`,
    /// `retry`).
    pub name: String,
    /// Its parameters, in order.
    pub params: Vec<(String, String)>,
}

impl FromStr for FilterSpec {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<FilterSpec, FilterError> {
        let (name, rest) = match s.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (s, None),
        };
        if name.is_empty() {
            return Err(FilterError::Syntax(s.to_string()));
        }
        let mut params = Vec::new();
        for kv in rest.into_iter().flat_map(|r| r.split(',')).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| FilterError::Syntax(s.to_string()))?;
            params.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(FilterSpec {
            name: name.to_string(),
            params,
        })
    }
}

impl fmt::Display for FilterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
    }
}

/// Why a filter could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// Not `NAME[:KEY=VALUE,...]`.
    #[error("{0:?}: expected NAME[:KEY=VALUE[,KEY=VALUE...]]")]
    Syntax(String),
    /// No filter of this name.
    #[error("unknown filter {0:?} (known: cache, cow, delay, error, readahead, retry)")]
    Unknown(String),
    /// A parameter the filter does not know, or a bad value.
    #[error("filter {filter}: {key}: {why}")]
    Param {
        /// The filter.
        filter: &'static str,
        /// The parameter.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// Setting the filter up failed (the `cow` overlay or the `cache` file
    /// could not be made).
    #[error("filter {filter}: {source}")]
    Io {
        /// The filter.
        filter: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Applies `specs` to `storage` as nbdkit stacks `--filter`s: the first is
/// the outermost (what the client talks to), the last sits on `storage`.
/// `temp_dir` is where the `cow` filter puts its overlay and the `cache`
/// filter its cache file unless `cachedir=` says (`None`: `$TMPDIR`, else
/// `/var/tmp`).
pub fn stack(
    storage: Arc<dyn Storage>,
    specs: &[FilterSpec],
    temp_dir: Option<&Path>,
) -> Result<Arc<dyn Storage>, FilterError> {
    specs
        .iter()
        .rev()
        .try_fold(storage, |inner, spec| apply(inner, spec, temp_dir))
}

/// Applies one filter to `inner`.
pub fn apply(
    inner: Arc<dyn Storage>,
    spec: &FilterSpec,
    temp_dir: Option<&Path>,
) -> Result<Arc<dyn Storage>, FilterError> {
    Ok(match spec.name.as_str() {
        "cow" => {
            let mut block = crate::cow::COW_BLOCK_SIZE;
            for (k, v) in &spec.params {
                match k.as_str() {
                    "cow-block-size" => block = parse_size("cow", k, v)?,
                    _ => return Err(unknown_param("cow", k)),
                }
            }
            let cow = crate::cow::CowStorage::with_block_size(inner, temp_dir, block)
                .map_err(|source| FilterError::Io { filter: "cow", source })?;
            Arc::new(cow)
        }
        "cache" => {
            let options = CacheOptions::from_params(&spec.params)?;
            let cache = Cache::new(inner, temp_dir, options).map_err(|source| FilterError::Io {
                filter: "cache",
                source,
            })?;
            Arc::new(cache)
        }
        "readahead" => Arc::new(ReadAhead::from_params(inner, &spec.params)?),
        "delay" => Arc::new(Filtered::new(inner, Delay::from_params(&spec.params)?)),
        "error" => Arc::new(Filtered::new(inner, InjectErrors::from_params(&spec.params)?)),
        "retry" => Arc::new(Filtered::new(inner, Retry::from_params(&spec.params)?)),
        other => return Err(FilterError::Unknown(other.to_string())),
    })
}

/// An operation a filter sees, with nbdkit's names for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `pread`.
    Read,
    /// `pwrite`.
    Write,
    /// `flush`.
    Flush,
    /// `trim`.
    Trim,
    /// `zero`, with its flags.
    Zero(ZeroFlags),
    /// `extents` (block status in any context).
    Extents,
    /// `cache`.
    Cache,
}

impl Op {
    /// Whether the operation changes the export.
    pub fn writes(self) -> bool {
        matches!(self, Op::Write | Op::Trim | Op::Zero(_))
    }
}

/// What a filter that acts around operations does: delays them, fails
/// them, retries them... [`Filtered`] turns one into a [`Storage`] over
/// another.
pub trait Around: Send + Sync + fmt::Debug {
    /// Runs `call` (the operation `op` on the storage below) as the filter
    /// does, and returns what the client gets.
    fn around(&self, op: Op, call: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()>;
}

/// A storage whose every operation goes through an [`Around`].
pub struct Filtered<A> {
    inner: Arc<dyn Storage>,
    around: A,
}

impl<A: fmt::Debug> fmt::Debug for Filtered<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filtered")
            .field("around", &self.around)
            .finish_non_exhaustive()
    }
}

impl<A: Around> Filtered<A> {
    /// `around` over `inner`.
    pub fn new(inner: Arc<dyn Storage>, around: A) -> Filtered<A> {
        Filtered { inner, around }
    }

    /// The storage below.
    pub fn inner(&self) -> &Arc<dyn Storage> {
        &self.inner
    }
}

impl<A: Around> Storage for Filtered<A> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.around.around(Op::Read, &mut || self.inner.read_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.around
            .around(Op::Write, &mut || self.inner.write_at(buf, offset, fua))
    }

    fn flush(&self) -> io::Result<()> {
        self.around.around(Op::Flush, &mut || self.inner.flush())
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.around
            .around(Op::Trim, &mut || self.inner.trim(offset, length, fua))
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.around
            .around(Op::Zero(flags), &mut || self.inner.write_zeroes(offset, length, flags))
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.around.around(Op::Cache, &mut || self.inner.cache(offset, length))
    }

    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let before = out.len();
        self.around.around(Op::Extents, &mut || {
            // A retried call starts from what was there before.
            out.truncate(before);
            self.inner.block_status(offset, length, out)
        })
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.inner.meta_contexts()
    }

    fn context_status(&self, context: &str, offset: u64, length: u64, out: &mut Vec<StatusExtent>) -> io::Result<()> {
        let before = out.len();
        self.around.around(Op::Extents, &mut || {
            out.truncate(before);
            self.inner.context_status(context, offset, length, out)
        })
    }

    fn extent_at(&self, offset: u64, scratch: &mut Vec<Extent>) -> io::Result<Extent> {
        let mut found = None;
        self.around.around(Op::Extents, &mut || {
            found = Some(self.inner.extent_at(offset, scratch)?);
            Ok(())
        })?;
        found.ok_or_else(|| io::Error::other("the filter answered block status without asking below"))
    }

    // try_read_at / try_write_at stay `None`: a filter may wait (a delay,
    // a retry), which the servers must never do on the thread that reads
    // the connection.

    /// As the storage below, except that a file's reads of holes are still
    /// made, through the filter, which acts on reads (delays, fails and
    /// retries them as nbdkit's filters do), instead of being answered
    /// from a lookup unread.
    fn sparse_reads(&self) -> SparseReads {
        match self.inner.sparse_reads() {
            SparseReads::ContentsUnlessHole => SparseReads::Contents,
            other => other,
        }
    }
}

/// An unknown parameter of `filter`.
fn unknown_param(filter: &'static str, key: &str) -> FilterError {
    FilterError::Param {
        filter,
        key: key.to_string(),
        why: "unknown parameter".into(),
    }
}

fn bad(filter: &'static str, key: &str, why: impl Into<String>) -> FilterError {
    FilterError::Param {
        filter,
        key: key.to_string(),
        why: why.into(),
    }
}

/// A boolean as nbdkit takes them (`1`/`0`, `true`/`false`, `yes`/`no`,
/// `on`/`off`).
fn parse_bool(filter: &'static str, key: &str, v: &str) -> Result<bool, FilterError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(bad(filter, key, format!("{v:?} is not a boolean"))),
    }
}

/// A size with an optional `k`/`M`/`G`/`T` suffix (powers of 1024).
fn parse_size(filter: &'static str, key: &str, v: &str) -> Result<u64, FilterError> {
    let t = v.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(bad(filter, key, format!("{v:?}: unknown size suffix"))),
            };
            (&t[..i], 1u64 << shift)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| bad(filter, key, format!("{v:?} is not a size")))
}

/// A delay as nbdkit ≥ 1.40 takes them: seconds (`2`, `1.5`) or a number
/// with `s`, `ms`, `us`/`μs` or `ns`.
fn parse_delay(filter: &'static str, key: &str, v: &str) -> Result<Duration, FilterError> {
    let t = v.trim();
    let (num, unit) = [("ns", 1e-9), ("us", 1e-6), ("μs", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(suffix, unit)| t.strip_suffix(suffix).map(|n| (n, *unit)))
        .unwrap_or((t, 1.0));
    match num.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 && n * unit < 1e9 => Ok(Duration::from_secs_f64(n * unit)),
        _ => Err(bad(filter, key, format!("{v:?} is not a delay (e.g. 2, 1.5, 100ms)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;

    #[test]
    fn specs_parse_and_print() {
        let s: FilterSpec = "error:error=EIO,error-rate=10%".parse().unwrap();
        assert_eq!(s.name, "error");
        assert_eq!(
            s.params,
            [("error".into(), "EIO".into()), ("error-rate".into(), "10%".into())]
        );
        assert_eq!(s.to_string(), "error:error=EIO,error-rate=10%");
        assert_eq!("cow".parse::<FilterSpec>().unwrap().params, []);
        assert!(matches!("".parse::<FilterSpec>(), Err(FilterError::Syntax(_))));
        assert!(matches!(
            "delay:rdelay".parse::<FilterSpec>(),
            Err(FilterError::Syntax(_))
        ));
    }

    #[test]
    fn values_parse_as_nbdkit_takes_them() {
        assert_eq!(parse_delay("d", "k", "2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_delay("d", "k", "1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_delay("d", "k", "100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_delay("d", "k", "250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_delay("d", "k", "7ns").unwrap(), Duration::from_nanos(7));
        assert!(parse_delay("d", "k", "-1").is_err());
        assert!(parse_delay("d", "k", "soon").is_err());
        assert_eq!(parse_size("c", "k", "64k").unwrap(), 65536);
        assert_eq!(parse_size("c", "k", "1M").unwrap(), 1 << 20);
        assert!(parse_size("c", "k", "1Q").is_err());
        assert!(parse_bool("r", "k", "yes").unwrap());
        assert!(!parse_bool("r", "k", "off").unwrap());
        assert!(parse_bool("r", "k", "maybe").is_err());
    }

    #[test]
    fn unknown_filters_and_parameters_are_refused() {
        let m: Arc<dyn Storage> = Arc::new(MemoryStorage::new(4096));
        let e = apply(m.clone(), &"rate:rate=1M".parse().unwrap(), None).err().unwrap();
        assert!(matches!(e, FilterError::Unknown(_)), "{e}");
        let e = apply(m.clone(), &"delay:rdelay=1,colour=red".parse().unwrap(), None)
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "filter delay: colour: unknown parameter");
        let e = apply(m, &"cow:cow-block-size=1000".parse().unwrap(), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("power of two"), "{e}");
    }

    #[test]
    fn the_first_filter_is_the_outermost() {
        // error (outermost) fails writes before retry (below it) sees them:
        // the write fails although retry would have retried.
        let m: Arc<dyn Storage> = Arc::new(MemoryStorage::new(4096));
        let specs: Vec<FilterSpec> = ["error:error=EPERM,error-pwrite-rate=1", "retry:retries=3,retry-delay=0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let s = stack(m, &specs, None).unwrap();
        assert_eq!(
            s.write_at(&[1], 0, false).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        let mut b = [9u8];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0], "the write never reached the storage");
    }
}
