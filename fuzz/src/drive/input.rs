//! The fuzz input and the choices its bytes stand for, shared by the targets.

use super::*;

// ---------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------

/// The fuzz input, read front to back.
#[derive(Debug)]
pub struct Input<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub(super) fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Up to `n` bytes.
    pub(super) fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.left());
        let b = &self.data[self.pos..self.pos + n];
        self.pos += n;
        b
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        self.take(1).first().copied()
    }

    pub(super) fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.take(N);
        b.try_into().ok()
    }

    pub(super) fn u16(&mut self) -> Option<u16> {
        self.be().map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        self.be().map(u32::from_be_bytes)
    }

    pub(super) fn u64(&mut self) -> Option<u64> {
        self.be().map(u64::from_be_bytes)
    }

    /// A length byte, then an `arbitrary` value decoded from so many bytes.
    pub(super) fn arbitrary<T: for<'b> Arbitrary<'b>>(&mut self) -> Option<T> {
        let n = self.u8()?;
        T::arbitrary_take_rest(Unstructured::new(self.take(n as usize))).ok()
    }
}

// ---------------------------------------------------------------------------
// Choices shared by the targets
// ---------------------------------------------------------------------------

/// A string the fuzzer picks by number: export names, descriptions.
pub fn name(sel: u8) -> String {
    match sel % 8 {
        0 => String::new(),
        1 => "disk".into(),
        2 => "ro".into(),
        3 => "other".into(),
        4 => "d\u{e9}j\u{e0} vu \u{1f4be}".into(),
        5 => "x".repeat(MAX_STRING_LEN + 1),
        6 => "y".repeat(MAX_STRING_LEN),
        _ => "a\0b".into(),
    }
}

/// Metadata context queries and names, picked by the bits of a mask.
pub const QUERIES: [&str; 8] = [
    CONTEXT_BASE_ALLOCATION,
    "base:",
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    "qemu:dirty-bitmap:b0",
    "x-vendor:wide",
    "nonamespace",
    "a:\0",
];

pub(super) fn queries(mask: u8) -> Vec<&'static str> {
    QUERIES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, q)| *q)
        .collect()
}

/// Valid block-size constraints (or none), picked by number.
pub fn block_size(sel: u8) -> Option<BlockSizeConstraints> {
    let (minimum, preferred, maximum) = match sel % 7 {
        0 => return None,
        1 => (1, 4096, DEFAULT_MAX_PAYLOAD),
        2 => (512, 4096, 65536),
        3 => (4096, 4096, 4096),
        4 => (65536, 65536, DEFAULT_MAX_PAYLOAD),
        5 => (512, 512, 1024),
        _ => (1, 512, u32::MAX),
    };
    let c = BlockSizeConstraints {
        minimum,
        preferred,
        maximum,
    };
    debug_assert!(c.validate().is_ok());
    Some(c)
}

/// The command a selector byte stands for.
pub fn command(sel: u8) -> Command {
    match sel % 12 {
        0 | 1 => Command::READ,
        2 => Command::WRITE,
        3 => Command::FLUSH,
        4 => Command::TRIM,
        5 => Command::CACHE,
        6 => Command::WRITE_ZEROES,
        7 | 8 => Command::BLOCK_STATUS,
        9 => Command::DISC,
        10 => Command::RESIZE,
        _ => Command(sel as u16 + 0x100),
    }
}
