//! The server side of transmission: decoding and validating requests, and
//! encoding replies.
//!
//! Receiving: [`ServerTransmission::next`] says what comes next on the
//! wire: a request header (or a small block-status payload) to pass to
//! [`ServerTransmission::handle_bytes`], the payload of a WRITE that the
//! driver moves straight into its own buffer or storage
//! ([`ServerReceive::Payload`], then
//! [`ServerTransmission::payload_received`]), or bytes to drop
//! ([`ServerReceive::Discard`], then [`ServerTransmission::discarded`]).
//! Each header yields a [`RequestEvent`]: a valid request to execute, a
//! request to refuse with an error (every check of the spec's "Request
//! types" and "Error values" sections), or the client's disconnect. The
//! machine keeps no table of requests in flight, so it can go on decoding
//! while replies are pending; replies may leave in any order.
//!
//! Sending: a [`ReplyEncoder`] (a small `Copy` value from
//! [`ServerTransmission::encoder`], usable from any thread) encodes reply
//! headers into fixed-size [`ReplyHeader`]s, and the few chunks with
//! variable metadata (errors, block status) into a caller-provided
//! `Vec<u8>` that the driver clears and reuses, so steady state allocates
//! nothing. READ data is never copied: the driver writes the header and
//! then its own buffer, ideally with one vectored write.
//!
//! # Payload limits
//!
//! - A WRITE payload (or any payload announced with
//!   `NBD_CMD_FLAG_PAYLOAD_LEN`) larger than the maximum payload size is a
//!   hard disconnect with extended headers, as the spec says a server
//!   SHOULD do. With compact headers a WRITE payload up to
//!   max(maximum payload, 2^25) is consumed gracefully ([`ServerReceive::Discard`])
//!   and refused with `NBD_EINVAL` (the spec: payloads up to 2^25 SHOULD NOT
//!   be considered a denial of service); beyond that it is a hard disconnect.
//! - READ requests are limited to the maximum payload size (`NBD_EINVAL`
//!   with simple replies, `NBD_EOVERFLOW` with structured replies, as the
//!   spec allows), so the driver never has to allocate more.

use alloc::vec::Vec;

use zerocopy::{FromBytes, IntoBytes};

use super::handshake::ServerNegotiated;
use crate::common::{MetaContext, Mode};
use crate::wire::*;

/// Which of the negotiated metadata contexts a `NBD_CMD_BLOCK_STATUS`
/// asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextSelection {
    /// All of them (the usual form).
    All,
    /// Only these (the `NBD_CMD_FLAG_PAYLOAD_LEN` form, with
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`): bit `i` stands for
    /// `ServerTransmission::contexts()[i]`.
    Only(u64),
}

impl ContextSelection {
    /// Whether the context at `index` in the negotiated list is asked for.
    pub fn includes(self, index: usize) -> bool {
        match self {
            ContextSelection::All => true,
            ContextSelection::Only(mask) => index < 64 && mask & (1u64 << index) != 0,
        }
    }
}

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRequest {
    /// The client's cookie, echoed in every reply.
    pub cookie: u64,
    /// The command.
    pub command: Command,
    /// Command flags (unknown bits kept).
    pub flags: CommandFlags,
    /// Offset in the export.
    pub offset: u64,
    /// The effect length (for a WRITE, its payload length; for the
    /// payload form of BLOCK_STATUS, the effect length from the payload).
    pub length: u64,
    /// For BLOCK_STATUS: which contexts to answer for.
    pub contexts: ContextSelection,
}

impl ServerRequest {
    /// Whether `NBD_CMD_FLAG_FUA` is set: reply only once the effect is
    /// on stable storage.
    pub fn fua(&self) -> bool {
        self.flags.contains(CommandFlags::FUA)
    }
}

/// What the driver must do next on the receive side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerReceive {
    /// Read exactly this many bytes and pass them to
    /// [`ServerTransmission::handle_bytes`].
    Bytes(usize),
    /// The next `length` bytes are the WRITE payload of `cookie` (announced
    /// by the [`RequestEvent::Request`] just returned): move them into the
    /// driver's own buffer or storage, then call
    /// [`ServerTransmission::payload_received`].
    Payload {
        /// The request's cookie.
        cookie: u64,
        /// The payload length (at most the maximum payload size).
        length: u64,
    },
    /// Read and drop exactly this many bytes (the payload of a refused
    /// request), then call [`ServerTransmission::discarded`].
    Discard(u64),
    /// Nothing more is to be read: the client sent `NBD_CMD_DISC`, or
    /// broke the protocol. Finish the requests in flight, then close.
    Closed,
}

/// Something decoded on the receive side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEvent {
    /// Nothing to act on yet; ask [`ServerTransmission::next`] again.
    Continue,
    /// A valid request: execute it and reply. For a WRITE with a nonzero
    /// length, [`ServerTransmission::next`] announces its payload next.
    Request(ServerRequest),
    /// A request the server must refuse: reply with this error (with
    /// [`ReplyEncoder::reply_error`]). Any payload it carried is announced
    /// next as [`ServerReceive::Discard`].
    Reject {
        /// The request as decoded.
        request: ServerRequest,
        /// The error to reply with.
        error: ErrorCode,
        /// Why, for the error chunk's message and for logs.
        reason: &'static str,
    },
    /// `NBD_CMD_DISC`: no reply; let the requests in flight finish, then
    /// shut TLS down and close the connection.
    Disconnect,
}

/// A rule of transmission broken by the client that ends the connection
/// (a hard disconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestViolation {
    /// A request magic that is not the one of the negotiated header style.
    #[error("bad request magic {0}")]
    BadMagic(Hex<u32>),
    /// A payload larger than the server accepts.
    #[error("{command} payload of {length} bytes exceeds the limit of {limit}")]
    PayloadTooLarge {
        /// The command.
        command: Command,
        /// The payload length.
        length: u64,
        /// The limit.
        limit: u64,
    },
}

/// Why [`ServerTransmission::handle_bytes`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerTransmissionError {
    /// The client broke the protocol: close the connection.
    #[error("protocol violation by client: {0}")]
    Violation(#[from] RequestViolation),
    /// The driver called out of order or with the wrong number of bytes
    /// (nothing changed).
    #[error("server transmission API misuse: {0}")]
    Misuse(&'static str),
    /// Nothing more can be received (after a disconnect or a violation).
    #[error("the connection is closed")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Payload { request: ServerRequest, length: u64 },
    Discard { length: u64 },
    BlockStatusPayload { request: ServerRequest, length: u64 },
    Closed,
}

/// The server transmission state machine (receive side), and the source
/// of [`ReplyEncoder`]s.
#[derive(Debug, Clone)]
pub struct ServerTransmission {
    mode: Mode,
    size: u64,
    flags: TransmissionFlags,
    constraints: BlockSizeConstraints,
    contexts: Vec<MetaContext>,
    state: State,
    shutting_down: bool,
    /// The largest READ or WRITE payload accepted.
    max_payload: u64,
    /// `NBD_INFO_BLOCK_SIZE` was sent: the client is held to it.
    block_size_sent: bool,
}

impl ServerTransmission {
    /// A transmission machine for a negotiated connection.
    pub fn new(negotiated: &ServerNegotiated) -> Self {
        ServerTransmission {
            mode: negotiated.mode,
            size: negotiated.size,
            flags: negotiated.flags,
            constraints: negotiated.constraints(),
            contexts: negotiated.contexts.clone(),
            state: State::Header,
            shutting_down: false,
            max_payload: match negotiated.block_size {
                Some(c) => c.maximum as u64,
                None => DEFAULT_MAX_PAYLOAD as u64,
            },
            block_size_sent: negotiated.block_size.is_some(),
        }
    }

    /// The largest READ or WRITE payload accepted from a client that was
    /// sent no block sizes (it asked for none, and the export has no
    /// constraints of its own): at least the spec's 2^25, which is also the
    /// default. A client that was sent `NBD_INFO_BLOCK_SIZE` is held to its
    /// maximum payload.
    pub fn set_unnegotiated_max_payload(&mut self, limit: u64) {
        if !self.block_size_sent {
            self.max_payload = limit.max(DEFAULT_MAX_PAYLOAD as u64);
        }
    }

    /// The largest READ or WRITE payload this connection accepts.
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// The protocol flavour in use.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The transmission flags sent.
    pub fn flags(&self) -> TransmissionFlags {
        self.flags
    }
    /// Block-size constraints enforced.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.constraints
    }
    /// The negotiated metadata contexts.
    pub fn contexts(&self) -> &[MetaContext] {
        &self.contexts
    }
    /// The contexts a BLOCK_STATUS request must be answered for, one
    /// status chunk each.
    pub fn selected_contexts<'s>(&'s self, request: &ServerRequest) -> impl Iterator<Item = &'s MetaContext> + 's {
        let sel = request.contexts;
        self.contexts
            .iter()
            .enumerate()
            .filter(move |(i, _)| sel.includes(*i))
            .map(|(_, c)| c)
    }
    /// A reply encoder for this connection.
    pub fn encoder(&self) -> ReplyEncoder {
        ReplyEncoder {
            mode: self.mode,
            size: self.size,
            minimum: self.constraints.minimum.max(1),
        }
    }
    /// From now on refuse every request with `NBD_ESHUTDOWN` (the spec's
    /// advice for a server that is shutting down).
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }
    /// Whether nothing more will be received.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    fn header_len(&self) -> usize {
        if self.mode.extended() {
            EXTENDED_REQUEST_HEADER_LEN
        } else {
            REQUEST_HEADER_LEN
        }
    }

    /// What the driver must read next.
    pub fn next(&self) -> ServerReceive {
        match self.state {
            State::Header => ServerReceive::Bytes(self.header_len()),
            State::Payload { request, length } => ServerReceive::Payload {
                cookie: request.cookie,
                length,
            },
            State::Discard { length } => ServerReceive::Discard(length),
            // Bounded by 8 + 4 * 64 when the state is entered.
            State::BlockStatusPayload { length, .. } => ServerReceive::Bytes(length as usize),
            State::Closed => ServerReceive::Closed,
        }
    }

    /// The WRITE whose payload [`ServerReceive::Payload`] announces.
    pub fn pending_request(&self) -> Option<ServerRequest> {
        match self.state {
            State::Payload { request, .. } => Some(request),
            _ => None,
        }
    }

    /// The driver moved the payload announced by [`ServerReceive::Payload`].
    pub fn payload_received(&mut self) -> Result<(), ServerTransmissionError> {
        match self.state {
            State::Payload { .. } => {
                self.state = State::Header;
                Ok(())
            }
            _ => Err(ServerTransmissionError::Misuse(
                "payload_received() without a pending payload",
            )),
        }
    }

    /// The driver dropped the bytes announced by [`ServerReceive::Discard`].
    pub fn discarded(&mut self) -> Result<(), ServerTransmissionError> {
        match self.state {
            State::Discard { .. } => {
                self.state = State::Header;
                Ok(())
            }
            _ => Err(ServerTransmissionError::Misuse("discarded() without a pending discard")),
        }
    }

    /// Feeds the bytes asked for by [`ServerReceive::Bytes`].
    pub fn handle_bytes(&mut self, bytes: &[u8]) -> Result<RequestEvent, ServerTransmissionError> {
        match self.state {
            State::Header => {
                if bytes.len() != self.header_len() {
                    return Err(ServerTransmissionError::Misuse(
                        "handle_bytes() given a different number of bytes than asked",
                    ));
                }
                self.decode_header(bytes).map_err(|v| {
                    self.state = State::Closed;
                    v.into()
                })
            }
            State::BlockStatusPayload { request, length } => {
                if bytes.len() as u64 != length {
                    return Err(ServerTransmissionError::Misuse(
                        "handle_bytes() given a different number of bytes than asked",
                    ));
                }
                self.state = State::Header;
                Ok(self.block_status_payload(request, bytes))
            }
            State::Closed => Err(ServerTransmissionError::Closed),
            State::Payload { .. } | State::Discard { .. } => Err(ServerTransmissionError::Misuse(
                "handle_bytes() called while a payload is pending",
            )),
        }
    }

    fn decode_header(&mut self, bytes: &[u8]) -> Result<RequestEvent, RequestViolation> {
        let extended = self.mode.extended();
        let request = if extended {
            let (h, _) =
                ExtendedRequestHeader::read_from_prefix(bytes).map_err(|_| RequestViolation::BadMagic(Hex(0)))?;
            if h.magic.get() != EXTENDED_REQUEST_MAGIC {
                return Err(RequestViolation::BadMagic(Hex(h.magic.get())));
            }
            ServerRequest {
                cookie: h.cookie.get(),
                command: Command(h.command.get()),
                flags: CommandFlags::from_bits_retain(h.flags.get()),
                offset: h.offset.get(),
                length: h.length.get(),
                contexts: ContextSelection::All,
            }
        } else {
            let (h, _) = RequestHeader::read_from_prefix(bytes).map_err(|_| RequestViolation::BadMagic(Hex(0)))?;
            if h.magic.get() != REQUEST_MAGIC {
                return Err(RequestViolation::BadMagic(Hex(h.magic.get())));
            }
            ServerRequest {
                cookie: h.cookie.get(),
                command: Command(h.command.get()),
                flags: CommandFlags::from_bits_retain(h.flags.get()),
                offset: h.offset.get(),
                length: h.length.get() as u64,
                contexts: ContextSelection::All,
            }
        };
        if request.command == Command::DISC {
            // Nothing may follow NBD_CMD_DISC; there is no reply.
            self.state = State::Closed;
            return Ok(RequestEvent::Disconnect);
        }
        // Framing first: how many payload bytes follow the header.
        // A WRITE always carries its data. With extended headers the spec
        // says the client MUST set PAYLOAD_LEN on it, but QEMU's client
        // (10.0) does not; like QEMU's server, accept that and read the
        // payload anyway rather than desynchronise the stream.
        let payload = if extended {
            if request.flags.contains(CommandFlags::PAYLOAD_LEN) || request.command == Command::WRITE {
                request.length
            } else {
                0
            }
        } else if request.command == Command::WRITE {
            request.length
        } else {
            0
        };
        if payload > 0 {
            let maximum = self.max_payload;
            let limit = if extended {
                maximum
            } else {
                maximum.max(DEFAULT_MAX_PAYLOAD as u64)
            };
            if payload > limit {
                return Err(RequestViolation::PayloadTooLarge {
                    command: request.command,
                    length: payload,
                    limit,
                });
            }
        }
        if extended
            && request.command == Command::BLOCK_STATUS
            && request.flags.contains(CommandFlags::PAYLOAD_LEN)
            && self.flags.contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD)
        {
            // The payload form: 64-bit effect length, then context ids.
            let ids = payload.saturating_sub(8) / 4;
            if payload < 12 || (payload - 8) % 4 != 0 || ids > self.contexts.len().min(64) as u64 {
                // Too short, ragged, or necessarily holding duplicate or
                // unknown ids: consume it (if there is any), then fail.
                if payload > 0 {
                    self.state = State::Discard { length: payload };
                }
                return Ok(RequestEvent::Reject {
                    request,
                    error: ErrorCode::EINVAL,
                    reason: "invalid NBD_CMD_BLOCK_STATUS payload",
                });
            }
            self.state = State::BlockStatusPayload {
                request,
                length: payload,
            };
            return Ok(RequestEvent::Continue);
        }
        Ok(match self.validate(&request, payload) {
            Ok(()) => {
                if payload > 0 {
                    self.state = State::Payload {
                        request,
                        length: payload,
                    };
                }
                RequestEvent::Request(request)
            }
            Err((error, reason)) => {
                if payload > 0 {
                    self.state = State::Discard { length: payload };
                }
                RequestEvent::Reject { request, error, reason }
            }
        })
    }

    fn block_status_payload(&self, mut request: ServerRequest, bytes: &[u8]) -> RequestEvent {
        let reject = |request, reason| RequestEvent::Reject {
            request,
            error: ErrorCode::EINVAL,
            reason,
        };
        let Some((effect, ids)) = bytes.split_first_chunk::<8>() else {
            return reject(request, "invalid NBD_CMD_BLOCK_STATUS payload");
        };
        request.length = u64::from_be_bytes(*effect);
        let mut mask = 0u64;
        for id in ids.chunks_exact(4) {
            let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
            let Some(index) = self.contexts.iter().position(|c| c.id == id).filter(|i| *i < 64) else {
                return reject(request, "unknown metadata context id in NBD_CMD_BLOCK_STATUS payload");
            };
            let bit = 1u64 << index;
            if mask & bit != 0 {
                return reject(request, "duplicate metadata context id in NBD_CMD_BLOCK_STATUS payload");
            }
            mask |= bit;
        }
        request.contexts = ContextSelection::Only(mask);
        match self.validate(&request, 0) {
            Ok(()) => RequestEvent::Request(request),
            Err((error, reason)) => RequestEvent::Reject { request, error, reason },
        }
    }

    /// Every check of the spec on a request, in the order: command, flags,
    /// read-only, advertisement, range, alignment, size limits.
    fn validate(&self, req: &ServerRequest, payload: u64) -> Result<(), (ErrorCode, &'static str)> {
        if self.shutting_down {
            return Err((ErrorCode::ESHUTDOWN, "server is shutting down"));
        }
        let f = self.flags;
        let cmd = req.command;
        let extended = self.mode.extended();
        let einval = |why| Err((ErrorCode::EINVAL, why));
        let mut allowed = CommandFlags::FUA;
        match cmd {
            Command::READ => allowed |= CommandFlags::DF,
            Command::WRITE if extended => allowed |= CommandFlags::PAYLOAD_LEN,
            Command::WRITE | Command::FLUSH | Command::TRIM | Command::CACHE => {}
            Command::WRITE_ZEROES => allowed |= CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
            Command::BLOCK_STATUS => {
                allowed |= CommandFlags::REQ_ONE;
                if extended && f.contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD) {
                    allowed |= CommandFlags::PAYLOAD_LEN;
                }
            }
            _ => return einval("unknown command"),
        }
        if !allowed.contains(req.flags) {
            return einval("command flag not valid for this command");
        }
        // Before the advertisement checks: a read-only export advertises
        // neither TRIM nor WRITE_ZEROES (nor FUA), and the spec asks for
        // NBD_EPERM on any write, trim or write zeroes to it.
        if f.contains(TransmissionFlags::READ_ONLY)
            && matches!(cmd, Command::WRITE | Command::TRIM | Command::WRITE_ZEROES)
        {
            return Err((ErrorCode::EPERM, "the export is read-only"));
        }
        if req.flags.contains(CommandFlags::FUA) && !f.contains(TransmissionFlags::SEND_FUA) {
            return einval("NBD_CMD_FLAG_FUA without NBD_FLAG_SEND_FUA");
        }
        if req.flags.contains(CommandFlags::DF) && !f.contains(TransmissionFlags::SEND_DF) {
            return einval("NBD_CMD_FLAG_DF without NBD_FLAG_SEND_DF");
        }
        if req.flags.contains(CommandFlags::FAST_ZERO) && !f.contains(TransmissionFlags::SEND_FAST_ZERO) {
            return einval("NBD_CMD_FLAG_FAST_ZERO without NBD_FLAG_SEND_FAST_ZERO");
        }
        let advertised = |flag: TransmissionFlags, why| if f.contains(flag) { Ok(()) } else { einval(why) };
        match cmd {
            Command::FLUSH => advertised(TransmissionFlags::SEND_FLUSH, "NBD_CMD_FLUSH not advertised")?,
            Command::TRIM => advertised(TransmissionFlags::SEND_TRIM, "NBD_CMD_TRIM not advertised")?,
            Command::WRITE_ZEROES => advertised(
                TransmissionFlags::SEND_WRITE_ZEROES,
                "NBD_CMD_WRITE_ZEROES not advertised",
            )?,
            Command::CACHE => advertised(TransmissionFlags::SEND_CACHE, "NBD_CMD_CACHE not advertised")?,
            Command::BLOCK_STATUS if !self.mode.structured() || self.contexts.is_empty() => {
                return einval("NBD_CMD_BLOCK_STATUS without a negotiated metadata context");
            }
            _ => {}
        }
        if cmd == Command::FLUSH {
            if req.offset != 0 || req.length != 0 {
                return einval("NBD_CMD_FLUSH with nonzero offset or length");
            }
            return Ok(());
        }
        if cmd == Command::BLOCK_STATUS && req.length == 0 {
            return einval("NBD_CMD_BLOCK_STATUS with length 0");
        }
        let end = req.offset.checked_add(req.length);
        if end.is_none_or(|e| e > self.size) {
            return if matches!(cmd, Command::WRITE | Command::WRITE_ZEROES) {
                Err((ErrorCode::ENOSPC, "request beyond the end of the export"))
            } else {
                einval("request beyond the end of the export")
            };
        }
        let min = self.constraints.minimum.max(1) as u64;
        if !req.offset.is_multiple_of(min) || (!req.length.is_multiple_of(min) && end != Some(self.size)) {
            // The last partial block of an export that is not a multiple
            // of the minimum block size stays addressable.
            return einval("request not aligned to the minimum block size");
        }
        let maximum = self.max_payload;
        if cmd == Command::WRITE && payload > maximum {
            return einval("write larger than the maximum payload size");
        }
        if cmd == Command::READ {
            if !self.mode.structured() && req.length > maximum {
                return einval("read larger than the maximum payload size");
            }
            // One OFFSET_DATA chunk must be able to carry it.
            let chunk_limit = if extended {
                maximum
            } else {
                maximum.min(u32::MAX as u64 - 8)
            };
            if req.length > chunk_limit {
                return Err((ErrorCode::EOVERFLOW, "read larger than the maximum payload size"));
            }
        }
        Ok(())
    }
}

/// The largest header [`ReplyEncoder`] produces: an extended chunk header
/// with the 12-byte payload of `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const MAX_REPLY_HEADER_LEN: usize = EXTENDED_REPLY_HEADER_LEN + 12;

/// An encoded reply header (and, for chunks with a small fixed payload,
/// that payload), ready to be written.
#[derive(Clone, Copy)]
pub struct ReplyHeader {
    buf: [u8; MAX_REPLY_HEADER_LEN],
    len: u8,
}

impl ReplyHeader {
    fn new() -> Self {
        ReplyHeader {
            buf: [0; MAX_REPLY_HEADER_LEN],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let at = self.len as usize;
        if let Some(dst) = self.buf.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len() as u8;
        }
    }

    /// The bytes to write.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len as usize).unwrap_or(&[])
    }
}

impl core::fmt::Debug for ReplyHeader {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("ReplyHeader").field(&self.as_bytes()).finish()
    }
}

impl PartialEq for ReplyHeader {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for ReplyHeader {}

/// A reply the encoder refuses to produce because it would break the
/// protocol (a driver bug, not a client's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// A chunk when neither structured replies nor extended headers are in use.
    #[error("structured reply chunks need structured replies or extended headers")]
    NotStructured,
    /// A chunk type that is not valid in reply to this command.
    #[error("this chunk is not valid in reply to {0}")]
    WrongCommand(Command),
    /// Content or an error offset outside the request.
    #[error("offset {offset} length {length} lies outside the request")]
    OutsideRequest {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// A content chunk of length zero.
    #[error("content chunks must describe at least one byte")]
    ZeroLength,
    /// A length that does not fit the chunk's length field.
    #[error("length {0} does not fit the chunk")]
    TooLarge(u64),
    /// A content chunk not covering the whole request although the client
    /// set `NBD_CMD_FLAG_DF`.
    #[error("the client set NBD_CMD_FLAG_DF: the only content chunk must cover the whole request")]
    Fragmented,
    /// No extent to report (block status needs at least one).
    #[error("block status needs at least one extent of nonzero length")]
    NoExtents,
    /// A 64-bit status value with compact headers.
    #[error("status {0:#x} does not fit a 32-bit descriptor")]
    StatusTooWide(u64),
}

/// Encodes replies for one connection. Small and `Copy`: hand one to every
/// worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyEncoder {
    mode: Mode,
    size: u64,
    minimum: u32,
}

/// Shortens a message to a valid NBD string: at most 4096 bytes, cut at a
/// character boundary, and before any NUL.
fn clip_message(message: &str) -> &str {
    let mut end = message.find('\0').unwrap_or(message.len()).min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.get(..end).unwrap_or("")
}

impl ReplyEncoder {
    /// The protocol flavour encoded for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A simple reply header (16 bytes). In simple mode a successful READ
    /// reply is followed by the data. Raw: it does not check that simple
    /// replies are allowed in this mode (they are not with extended headers).
    pub fn encode_simple_reply(&self, cookie: u64, error: ErrorCode) -> ReplyHeader {
        let h = SimpleReplyHeader {
            magic: SIMPLE_REPLY_MAGIC.into(),
            error: error.0.into(),
            cookie: cookie.into(),
        };
        let mut r = ReplyHeader::new();
        r.push(h.as_bytes());
        r
    }

    /// A structured (20-byte) or extended (32-byte) chunk header; `offset`
    /// is the request's offset (used by extended headers only).
    pub fn encode_chunk_header(
        &self,
        cookie: u64,
        offset: u64,
        flags: ReplyFlags,
        chunk: ReplyChunkType,
        payload_len: u64,
    ) -> Result<ReplyHeader, ReplyError> {
        let mut r = ReplyHeader::new();
        match self.mode {
            Mode::Extended => {
                let h = ExtendedReplyHeader {
                    magic: EXTENDED_REPLY_MAGIC.into(),
                    flags: flags.bits().into(),
                    chunk_type: chunk.0.into(),
                    cookie: cookie.into(),
                    offset: offset.into(),
                    length: payload_len.into(),
                };
                r.push(h.as_bytes());
            }
            Mode::Structured => {
                let length = u32::try_from(payload_len).map_err(|_| ReplyError::TooLarge(payload_len))?;
                let h = StructuredReplyHeader {
                    magic: STRUCTURED_REPLY_MAGIC.into(),
                    flags: flags.bits().into(),
                    chunk_type: chunk.0.into(),
                    cookie: cookie.into(),
                    length: length.into(),
                };
                r.push(h.as_bytes());
            }
            _ => return Err(ReplyError::NotStructured),
        }
        Ok(r)
    }

    fn done(done: bool) -> ReplyFlags {
        if done { ReplyFlags::DONE } else { ReplyFlags::empty() }
    }

    /// A successful reply without payload: `NBD_REPLY_TYPE_NONE` with
    /// `NBD_REPLY_FLAG_DONE` when structured, a simple reply otherwise.
    /// Also the final chunk after content, status or error chunks sent
    /// without the DONE flag. Not for a whole READ reply of nonzero length
    /// (in simple mode the data must follow: use
    /// [`ReplyEncoder::read_reply_header`]).
    pub fn reply_ok(&self, request: &ServerRequest) -> ReplyHeader {
        self.encode_chunk_header(
            request.cookie,
            request.offset,
            ReplyFlags::DONE,
            ReplyChunkType::NONE,
            0,
        )
        .unwrap_or_else(|_| self.encode_simple_reply(request.cookie, ErrorCode(0)))
    }

    /// A complete error reply, appended to `out`: an `NBD_REPLY_TYPE_ERROR`
    /// chunk with the DONE flag and the message (clipped to a valid
    /// string) when structured — always the case for a READ with
    /// structured replies —, a simple reply otherwise (the message is then
    /// not sent). An error value of 0 is sent as `NBD_EINVAL`.
    pub fn reply_error(&self, request: &ServerRequest, error: ErrorCode, message: &str, out: &mut Vec<u8>) {
        let error = if error.0 == 0 { ErrorCode::EINVAL } else { error };
        let message = clip_message(message);
        let payload = ErrorPayloadHeader {
            error: error.0.into(),
            message_length: (message.len() as u16).into(),
        };
        let len = (payload.as_bytes().len() + message.len()) as u64;
        match self.encode_chunk_header(
            request.cookie,
            request.offset,
            ReplyFlags::DONE,
            ReplyChunkType::ERROR,
            len,
        ) {
            Ok(h) => {
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(payload.as_bytes());
                out.extend_from_slice(message.as_bytes());
            }
            Err(_) => out.extend_from_slice(self.encode_simple_reply(request.cookie, error).as_bytes()),
        }
    }

    /// An `NBD_REPLY_TYPE_ERROR_OFFSET` chunk, appended to `out`: the error
    /// happened at `offset`, which must lie within the request (structured
    /// modes only; for READ, WRITE, TRIM, CACHE, WRITE_ZEROES and
    /// BLOCK_STATUS).
    pub fn reply_error_offset(
        &self,
        request: &ServerRequest,
        error: ErrorCode,
        message: &str,
        offset: u64,
        done: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), ReplyError> {
        if !matches!(
            request.command,
            Command::READ
                | Command::WRITE
                | Command::TRIM
                | Command::CACHE
                | Command::WRITE_ZEROES
                | Command::BLOCK_STATUS
        ) {
            return Err(ReplyError::WrongCommand(request.command));
        }
        let end = request.offset.saturating_add(request.length.max(1));
        if offset < request.offset || offset >= end {
            return Err(ReplyError::OutsideRequest { offset, length: 0 });
        }
        let error = if error.0 == 0 { ErrorCode::EINVAL } else { error };
        let message = clip_message(message);
        let payload = ErrorPayloadHeader {
            error: error.0.into(),
            message_length: (message.len() as u16).into(),
        };
        let len = (payload.as_bytes().len() + message.len() + 8) as u64;
        let h = self.encode_chunk_header(
            request.cookie,
            request.offset,
            Self::done(done),
            ReplyChunkType::ERROR_OFFSET,
            len,
        )?;
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(payload.as_bytes());
        out.extend_from_slice(message.as_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        Ok(())
    }

    /// The header of a successful READ reply that carries the whole
    /// request's data in one piece, which the driver sends right after it:
    /// a simple reply header in simple mode, an `NBD_REPLY_TYPE_OFFSET_DATA`
    /// chunk header (with its 8-byte offset, and the DONE flag) otherwise.
    /// Only set DONE this way once the data is in hand (no error can occur
    /// while sending it). A READ of length 0 gets [`ReplyEncoder::reply_ok`].
    pub fn read_reply_header(&self, request: &ServerRequest) -> Result<ReplyHeader, ReplyError> {
        if request.command != Command::READ {
            return Err(ReplyError::WrongCommand(request.command));
        }
        if !self.mode.structured() || request.length == 0 {
            return Ok(self.reply_ok(request));
        }
        self.offset_data_header(request, request.offset, request.length, true)
    }

    fn check_content(&self, request: &ServerRequest, offset: u64, length: u64) -> Result<(), ReplyError> {
        if !self.mode.structured() {
            return Err(ReplyError::NotStructured);
        }
        if request.command != Command::READ {
            return Err(ReplyError::WrongCommand(request.command));
        }
        if length == 0 {
            return Err(ReplyError::ZeroLength);
        }
        let end = offset.checked_add(length);
        let req_end = request.offset.saturating_add(request.length);
        if offset < request.offset || end.is_none_or(|e| e > req_end) {
            return Err(ReplyError::OutsideRequest { offset, length });
        }
        if request.flags.contains(CommandFlags::DF) && (offset != request.offset || length != request.length) {
            return Err(ReplyError::Fragmented);
        }
        Ok(())
    }

    /// The header of one `NBD_REPLY_TYPE_OFFSET_DATA` chunk (with its
    /// 8-byte offset) for `data_len` bytes at `offset` of the export, which
    /// the driver sends right after it. For fragmented (or out of order)
    /// READ replies; with `NBD_CMD_FLAG_DF` the chunk must cover the whole
    /// request.
    pub fn offset_data_header(
        &self,
        request: &ServerRequest,
        offset: u64,
        data_len: u64,
        done: bool,
    ) -> Result<ReplyHeader, ReplyError> {
        self.check_content(request, offset, data_len)?;
        let len = data_len.checked_add(8).ok_or(ReplyError::TooLarge(data_len))?;
        let mut h = self.encode_chunk_header(
            request.cookie,
            request.offset,
            Self::done(done),
            ReplyChunkType::OFFSET_DATA,
            len,
        )?;
        h.push(&offset.to_be_bytes());
        Ok(h)
    }

    /// A complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `length` bytes at
    /// `offset` read as zeroes (sparse READ replies). With
    /// `NBD_CMD_FLAG_DF` only a hole covering the whole request is allowed.
    pub fn hole_chunk(
        &self,
        request: &ServerRequest,
        offset: u64,
        length: u64,
        done: bool,
    ) -> Result<ReplyHeader, ReplyError> {
        self.check_content(request, offset, length)?;
        let hole = u32::try_from(length).map_err(|_| ReplyError::TooLarge(length))?;
        let payload = OffsetHolePayload {
            offset: offset.into(),
            length: hole.into(),
        };
        let mut h = self.encode_chunk_header(
            request.cookie,
            request.offset,
            Self::done(done),
            ReplyChunkType::OFFSET_HOLE,
            payload.as_bytes().len() as u64,
        )?;
        h.push(payload.as_bytes());
        Ok(h)
    }

    /// One status chunk for a BLOCK_STATUS request, appended to `out`:
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` with compact headers,
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` with extended headers. `extents`
    /// are consecutive `(length, status)` pairs starting at the request
    /// offset; they are taken as given (nothing is merged), except that:
    /// zero-length extents are skipped; extents stop once the request
    /// length is covered (the last one may extend past it, as the spec
    /// allows) and at the end of the export; with `NBD_CMD_FLAG_REQ_ONE`
    /// exactly one extent is sent, clipped to the request length; compact
    /// descriptors are clipped to 32 bits (rounded down to the minimum
    /// block size); at most 2^20 descriptors are sent. A clipped extent is
    /// always the last. Returns the number of bytes described. On error
    /// `out` is left as it was.
    pub fn block_status_chunk<I>(
        &self,
        request: &ServerRequest,
        context_id: u32,
        extents: I,
        done: bool,
        out: &mut Vec<u8>,
    ) -> Result<u64, ReplyError>
    where
        I: IntoIterator<Item = (u64, u64)>,
    {
        if request.command != Command::BLOCK_STATUS {
            return Err(ReplyError::WrongCommand(request.command));
        }
        let extended = match self.mode {
            Mode::Extended => true,
            Mode::Structured => false,
            _ => return Err(ReplyError::NotStructured),
        };
        let (header_len, fixed, each) = if extended {
            (EXTENDED_REPLY_HEADER_LEN, 8usize, 16usize)
        } else {
            (STRUCTURED_REPLY_HEADER_LEN, 4, 8)
        };
        let start = out.len();
        out.resize(start + header_len + fixed, 0);
        let req_one = request.flags.contains(CommandFlags::REQ_ONE);
        let want = request.length;
        let available = self.size.saturating_sub(request.offset);
        let min = self.minimum.max(1) as u64;
        let descriptor_max = if extended {
            u64::MAX
        } else {
            (u32::MAX as u64 / min) * min
        };
        let mut sum = 0u64;
        let mut n = 0usize;
        // Nothing can be sent for a REQ_ONE of length 0 (or past the end).
        let nothing = (req_one && want == 0) || available == 0;
        for (length, status) in extents.into_iter().take_while(|_| !nothing) {
            if n >= MAX_BLOCK_STATUS_EXTENTS || (req_one && n == 1) || (n > 0 && sum >= want) || sum >= available {
                break;
            }
            let mut len = length.min(available - sum).min(descriptor_max);
            if req_one {
                len = len.min(want);
            }
            if len == 0 {
                continue;
            }
            if extended {
                let d = BlockDescriptorExt {
                    length: len.into(),
                    status: status.into(),
                };
                out.extend_from_slice(d.as_bytes());
            } else {
                let Ok(status32) = u32::try_from(status) else {
                    out.truncate(start);
                    return Err(ReplyError::StatusTooWide(status));
                };
                let d = BlockDescriptor {
                    length: (len as u32).into(),
                    status: status32.into(),
                };
                out.extend_from_slice(d.as_bytes());
            }
            sum += len;
            n += 1;
            if len != length {
                // Whatever follows would be placed at the wrong offset.
                break;
            }
        }
        if n == 0 {
            out.truncate(start);
            return Err(ReplyError::NoExtents);
        }
        let payload_len = (fixed + n * each) as u64;
        let h = match self.encode_chunk_header(
            request.cookie,
            request.offset,
            Self::done(done),
            if extended {
                ReplyChunkType::BLOCK_STATUS_EXT
            } else {
                ReplyChunkType::BLOCK_STATUS
            },
            payload_len,
        ) {
            Ok(h) => h,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        };
        let mut fixed_part = [0u8; 8];
        fixed_part[..4].copy_from_slice(&context_id.to_be_bytes());
        fixed_part[4..].copy_from_slice(&(n as u32).to_be_bytes());
        if let Some(dst) = out.get_mut(start..start + header_len) {
            dst.copy_from_slice(h.as_bytes());
        }
        if let (Some(dst), Some(src)) = (
            out.get_mut(start + header_len..start + header_len + fixed),
            fixed_part.get(..fixed),
        ) {
            dst.copy_from_slice(src);
        }
        Ok(sum)
    }
}

#[cfg(test)]
#[path = "transmission_tests.rs"]
mod tests;
