//! Types both sides of the protocol share: the flavour of protocol a
//! handshake reached ([`Mode`]), metadata contexts ([`MetaContext`]), the
//! client's TLS policy ([`TlsMode`]), and the policies that hold on both
//! sides (the longest hole a single `NBD_REPLY_TYPE_OFFSET_HOLE` chunk can
//! describe, the payload limit peers can assume without negotiation).

use alloc::string::String;

pub use crate::wire::DEFAULT_MAX_PAYLOAD;

/// Whether and how to use TLS, as libnbd's `tls` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Never ask for TLS.
    #[default]
    Off,
    /// Ask for TLS; continue in clear if the server refuses.
    Allow,
    /// Ask for TLS; fail if it cannot be negotiated.
    Require,
}

/// Which flavour of the protocol the handshake reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Oldstyle negotiation: no options, no export names.
    Oldstyle,
    /// Newstyle, ended with `NBD_OPT_EXPORT_NAME`: simple replies only.
    ExportNameOnly,
    /// `NBD_OPT_GO`, simple replies.
    Simple,
    /// `NBD_OPT_GO` with structured replies.
    Structured,
    /// `NBD_OPT_GO` with extended headers.
    Extended,
}

impl Mode {
    /// Whether replies may be structured (or extended) chunks.
    pub fn structured(self) -> bool {
        matches!(self, Mode::Structured | Mode::Extended)
    }
    /// Whether extended headers are in use.
    pub fn extended(self) -> bool {
        matches!(self, Mode::Extended)
    }
    /// What the flavour means, for logs: "structured replies", ...
    pub fn description(self) -> &'static str {
        match self {
            Mode::Oldstyle => "oldstyle negotiation",
            Mode::ExportNameOnly => "NBD_OPT_EXPORT_NAME (simple replies)",
            Mode::Simple => "simple replies",
            Mode::Structured => "structured replies",
            Mode::Extended => "extended headers",
        }
    }
    /// The protocol name as nbdinfo prints it.
    pub fn protocol_name(self) -> &'static str {
        match self {
            Mode::Oldstyle => "oldstyle",
            Mode::ExportNameOnly => "newstyle",
            _ => "newstyle-fixed",
        }
    }
}

/// A metadata context selected or listed by the server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetaContext {
    /// The id the server assigned (zero in list replies).
    pub id: u32,
    /// The context name, e.g. `base:allocation`.
    pub name: String,
}

/// The longest run of zeroes one `NBD_REPLY_TYPE_OFFSET_HOLE` chunk
/// describes: its length field has 32 bits, and a server splits longer
/// holes into pieces of at most this size (2^31, a power of two so that
/// pieces stay aligned to any block size).
pub const MAX_HOLE_CHUNK: u64 = 1 << 31;

/// What a session wants from its socket now, for a loop that registers
/// interest with a reactor (mio, epoll, io_uring) and then blocks: wait
/// for readability when `read`, for writability when `write`. When
/// neither holds, the session waits on its driver (an event to collect
/// with an empty `feed`, TLS to start, an option or a request to send), so
/// the loop must not block on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    /// Bytes from the peer are wanted (or the end of the connection is to
    /// be noticed).
    pub read: bool,
    /// Output is waiting in the session (`poll_transmit`).
    pub write: bool,
}
