//! The server side of the protocol: the handshake and transmission.
//!
//! Both machines are sans-IO, like their client counterparts:
//!
//! - [`ServerHandshake`] says what to do next with [`ServerStep`]: send
//!   these bytes, read exactly this many bytes (never more, so TLS can be
//!   started right after the `NBD_OPT_STARTTLS` acknowledgement), discard
//!   this many bytes, upgrade to TLS, look an export up, list the exports.
//!   Which exports exist is the driver's business: the machine asks
//!   ([`ServerStep::LookupExport`]) and the driver answers
//!   ([`ServerHandshake::answer_export`]).
//! - [`ServerTransmission`] decodes and validates request headers
//!   ([`RequestEvent`]), announces WRITE payloads for the driver to move
//!   straight into its own buffers ([`ServerReceive::Payload`]), and a
//!   [`ReplyEncoder`] (a small `Copy` value, usable from any thread)
//!   encodes reply headers and small chunks without allocating.

pub mod handshake;
pub mod session;
pub mod transmission;

pub use handshake::{
    ClientViolation, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_UNNEGOTIATED_MAX_PAYLOAD, ExportDetails, ExportListing,
    MAX_META_CONTEXT_QUERIES, MAX_OPTION_DATA, ServerConfig, ServerHandshake, ServerHandshakeError, ServerNegotiated,
    ServerStep, TlsPolicy,
};
pub use session::{ExportLookup, ServerEvent, ServerNeed, ServerSession, ServerSessionError, ServerStartTls};
pub use transmission::{
    ContextSelection, MAX_REPLY_HEADER_LEN, ReplyEncoder, ReplyError, ReplyHeader, RequestEvent, RequestViolation,
    ServerReceive, ServerRequest, ServerTransmission, ServerTransmissionError,
};

use crate::wire::ErrorCode;

/// Maps a host `errno` (Linux numbering) to the NBD error a reply should
/// carry, as QEMU's `system_errno_to_nbd_errno` does: EDQUOT and EFBIG
/// become `NBD_ENOSPC`, EROFS becomes `NBD_EPERM`, anything unknown
/// becomes `NBD_EINVAL`. A thin alias of [`ErrorCode::from_errno`].
pub fn errno_to_nbd(errno: i32) -> ErrorCode {
    ErrorCode::from_errno(errno)
}
