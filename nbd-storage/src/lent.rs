//! Bytes a storage lends to a reply instead of copying them
//! ([`Storage::read_shared`](crate::Storage::read_shared)).

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Longest run of zeroes one [`SharedBytes::zeroes`] piece stands for.
pub const MAX_ZERO_PIECE: usize = 64 << 10;

/// Zeroes that zero pieces point into.
static ZEROES: [u8; MAX_ZERO_PIECE] = [0; MAX_ZERO_PIECE];

/// A read-only piece of bytes that can outlive the read that produced it:
/// a range of a reference-counted buffer (a page of the memory export,
/// say), or a run of zeroes. Cloning is cheap (a reference count).
///
/// A storage that lends its pages keeps them unchanged while a piece
/// refers to them: a later write copies the page first (copy-on-write), so
/// a reply being sent is never torn by a write that arrives meanwhile.
///
/// ```
/// use std::sync::Arc;
/// use nbd_storage::SharedBytes;
///
/// let page: Arc<[u8]> = Arc::from(&b"hello, world"[..]);
/// let piece = SharedBytes::new(page, 7..12);
/// assert_eq!(&*piece, b"world");
/// let mut pieces = Vec::new();
/// SharedBytes::push_zeroes(&mut pieces, 100_000);
/// assert_eq!(pieces.iter().map(|p| p.len()).sum::<usize>(), 100_000);
/// assert!(pieces.iter().all(|p| p.iter().all(|&b| b == 0)));
/// ```
#[derive(Clone)]
pub struct SharedBytes {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    Shared { buf: Arc<[u8]>, start: usize, end: usize },
    Zeroes(usize),
}

impl SharedBytes {
    /// Bytes `range` of `buf`.
    ///
    /// # Panics
    ///
    /// If `range` is not within `buf` (or runs backwards).
    pub fn new(buf: Arc<[u8]>, range: Range<usize>) -> SharedBytes {
        assert!(
            range.start <= range.end && range.end <= buf.len(),
            "range {range:?} outside a buffer of {} bytes",
            buf.len()
        );
        SharedBytes {
            repr: Repr::Shared {
                buf,
                start: range.start,
                end: range.end,
            },
        }
    }

    /// `len` zero bytes, without allocating.
    ///
    /// # Panics
    ///
    /// If `len` exceeds [`MAX_ZERO_PIECE`] (see
    /// [`push_zeroes`](Self::push_zeroes) for any length).
    pub fn zeroes(len: usize) -> SharedBytes {
        assert!(len <= MAX_ZERO_PIECE, "a zero piece of {len} bytes");
        SharedBytes {
            repr: Repr::Zeroes(len),
        }
    }

    /// Appends pieces standing for `len` zero bytes to `out` (extending a
    /// zero piece at its end first).
    pub fn push_zeroes(out: &mut Vec<SharedBytes>, mut len: usize) {
        if let Some(SharedBytes {
            repr: Repr::Zeroes(last),
        }) = out.last_mut()
        {
            let n = (MAX_ZERO_PIECE - *last).min(len);
            *last += n;
            len -= n;
        }
        while len > 0 {
            let n = len.min(MAX_ZERO_PIECE);
            out.push(SharedBytes::zeroes(n));
            len -= n;
        }
    }
}

impl Deref for SharedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.repr {
            Repr::Shared { buf, start, end } => &buf[*start..*end],
            Repr::Zeroes(len) => &ZEROES[..*len],
        }
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Shared { start, end, .. } => write!(f, "SharedBytes({start}..{end})"),
            Repr::Zeroes(len) => write!(f, "SharedBytes(zeroes: {len})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroes_extend_the_last_zero_piece() {
        let mut v = vec![SharedBytes::new(Arc::from(&[1u8, 2, 3][..]), 1..3)];
        SharedBytes::push_zeroes(&mut v, 10);
        SharedBytes::push_zeroes(&mut v, MAX_ZERO_PIECE);
        let lens: Vec<usize> = v.iter().map(|p| p.len()).collect();
        assert_eq!(lens, vec![2, MAX_ZERO_PIECE, 10]);
        assert_eq!(&*v[0], &[2, 3]);
        SharedBytes::push_zeroes(&mut v, 0);
        assert_eq!(v.len(), 3);
    }

    #[test]
    #[should_panic(expected = "outside a buffer")]
    fn a_range_outside_the_buffer_panics() {
        let _ = SharedBytes::new(Arc::from(&[0u8; 4][..]), 2..5);
    }
}
