//! Where a driver reads from: the fuzz input or a pipe from its peer.

use super::*;

// ---------------------------------------------------------------------------
// Where a driver reads from
// ---------------------------------------------------------------------------

/// The bytes the peer sent that the driver has not read yet.
pub trait Source {
    /// Reads up to `n` bytes.
    fn read(&mut self, n: usize) -> &[u8];
}

impl Source for Input<'_> {
    fn read(&mut self, n: usize) -> &[u8] {
        self.take(n)
    }
}

/// One direction of the in-memory connection of the `conversation` target.
#[derive(Debug, Default)]
pub struct Pipe {
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
}

impl Pipe {
    pub(super) fn push(&mut self, b: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(b);
    }

    pub(super) fn len(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl Source for Pipe {
    fn read(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.len());
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        b
    }
}

/// Bytes a driver read and its session has not consumed yet, with the
/// STARTTLS check: before the driver's own TLS upgrade, the session must
/// not consume bytes the peer sent after its upgrade.
#[derive(Debug, Default)]
pub(super) struct Inbox {
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
    /// Bytes consumed by the session so far (including READ data and WRITE
    /// payloads the driver moved itself).
    pub(super) total: u64,
    /// Where in the stream the peer's TLS bytes start, while this side has
    /// not started TLS: the session must not consume past it.
    pub(super) limit: Option<u64>,
}

impl Inbox {
    pub(super) fn rest(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub(super) fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn push(&mut self, b: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(b);
    }

    /// The session consumed `n` bytes of the inbox.
    pub(super) fn consumed(&mut self, n: usize) {
        assert!(n <= self.len(), "consumed more than given");
        self.pos += n;
        self.moved(n as u64);
    }

    /// The session took `n` bytes (from the inbox, or moved by the driver
    /// straight from the socket).
    pub(super) fn moved(&mut self, n: u64) {
        self.total += n;
        if let Some(l) = self.limit {
            assert!(
                self.total <= l,
                "consumed bytes sent after STARTTLS before the TLS upgrade"
            );
        }
    }
}
