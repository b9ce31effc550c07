//! The client side of transmission: encoding requests, the in-flight
//! table, and decoding simple, structured and extended replies with every
//! check the spec (and QEMU's `nbd_parse_*` helpers) make.
//!
//! Sending: [`ClientTransmission::start_request`] validates a request
//! against what the server advertised, assigns a cookie and encodes the
//! header into a small array. The driver writes the header, and for a
//! WRITE the caller's data right after it (ideally with one vectored
//! write). The core never touches the data.
//!
//! Receiving: [`ClientTransmission::next`] says what comes next on the
//! wire: either a number of header/metadata bytes to pass to
//! [`ClientTransmission::handle_bytes`], or a span of READ payload that
//! belongs to a cookie, which the driver moves straight from the socket
//! into the caller's buffer before calling
//! [`ClientTransmission::data_received`]. Events ([`ReplyEvent`]) report
//! holes, block-status extents (borrowed from the driver's bytes) and the
//! completion of each request.

use alloc::string::String;
use alloc::vec::Vec;

use zerocopy::{FromBytes, IntoBytes};

use super::handshake::{MetaContext, Mode, Negotiated};
use crate::wire::*;

/// A request as the caller describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// Command flags (`PAYLOAD_LEN` is added by the machine when needed).
    pub flags: CommandFlags,
    /// Offset in the export.
    pub offset: u64,
    /// Length: the payload length of a WRITE, the effect length otherwise.
    pub length: u64,
}

impl Request {
    /// A request with no flags.
    pub fn new(command: Command, offset: u64, length: u64) -> Self {
        Request {
            command,
            flags: CommandFlags::empty(),
            offset,
            length,
        }
    }
    /// The same request with flags added.
    pub fn with_flags(mut self, flags: CommandFlags) -> Self {
        self.flags |= flags;
        self
    }
}

/// The cookie of an in-flight request: its slot in the in-flight table
/// (low 32 bits) and a generation (high 32 bits), so that a reply for a
/// stale or invented cookie is caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

impl Cookie {
    /// The slot in the in-flight table: drivers may index their own
    /// per-request state (buffers, wakers) with it; it is below the
    /// `max_in_flight` given to [`ClientTransmission::new`].
    pub fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
}

/// An encoded request header, ready to be written.
#[derive(Debug, Clone, Copy)]
pub struct EncodedHeader {
    buf: [u8; EXTENDED_REQUEST_HEADER_LEN],
    len: u8,
}

impl EncodedHeader {
    /// The bytes to write.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// Why a request was refused before reaching the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The export is read-only.
    #[error("{0} refused: the export is read-only")]
    ReadOnly(Command),
    /// The server did not advertise the command.
    #[error("{command} refused: the server does not advertise {needs}")]
    NotAdvertised {
        /// The command.
        command: Command,
        /// The flag it needs.
        needs: &'static str,
    },
    /// A flag the server did not advertise, or that does not apply.
    #[error("flag {flags:?} is not valid for {command}{}", if *.advertised { "" } else { " (not advertised by the server)" })]
    BadFlag {
        /// The command.
        command: Command,
        /// The offending flags.
        flags: CommandFlags,
        /// Whether the server advertised the feature at all.
        advertised: bool,
    },
    /// Past the end of the export.
    #[error("request at offset {offset} length {length} is beyond the export size {size}")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// Not aligned to the minimum block size.
    #[error("offset {offset} / length {length} not aligned to the minimum block size {minimum}")]
    Unaligned {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Minimum block size.
        minimum: u32,
    },
    /// A payload longer than the maximum payload size.
    #[error("length {length} exceeds the maximum payload size {maximum}")]
    TooLarge {
        /// Length.
        length: u64,
        /// Maximum payload.
        maximum: u64,
    },
    /// Length zero: the spec leaves the server's behaviour unspecified.
    #[error("{0} with length 0 refused")]
    ZeroLength(Command),
    /// Block status without a negotiated metadata context.
    #[error("NBD_CMD_BLOCK_STATUS refused: no metadata context was negotiated")]
    NoMetaContext,
    /// Too many requests in flight.
    #[error("too many requests in flight (limit {0})")]
    TooManyInFlight(usize),
    /// `NBD_CMD_DISC` was sent; nothing may follow it.
    #[error("the connection is disconnecting")]
    Disconnecting,
    /// The connection failed earlier (the driver reported it lost).
    #[error("the connection failed earlier")]
    Failed,
    /// The session failed earlier, for this reason: the server broke a
    /// rule, or the handshake failed.
    #[error("the connection failed earlier: {0}")]
    SessionFailed(alloc::boxed::Box<super::ClientSessionError>),
    /// The handshake has not finished: there is no transmission yet.
    #[error("the handshake has not finished")]
    NotConnected,
    /// A command this client cannot send (unknown, or RESIZE).
    #[error("{0} is not supported by this client")]
    Unsupported(Command),
}

/// A rule of transmission broken by the server. Every one of these is
/// fatal: the connection cannot be trusted after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyViolation {
    /// A reply magic that is not valid in this mode.
    #[error("bad reply magic {0}")]
    BadMagic(Hex<u32>),
    /// A simple reply where the spec forbids one.
    #[error("simple reply not allowed here ({0})")]
    SimpleReplyNotAllowed(&'static str),
    /// A reply for a cookie not in flight.
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    /// An extended reply whose offset differs from the request's.
    #[error("extended reply offset {got} does not match the request offset {expected}")]
    OffsetMismatch {
        /// Request offset.
        expected: u64,
        /// Reply offset.
        got: u64,
    },
    /// A chunk type that is not valid for the request or mode.
    #[error("chunk {chunk} is not valid in reply to {command}")]
    UnexpectedChunk {
        /// The chunk type.
        chunk: ReplyChunkType,
        /// The command of the request.
        command: Command,
    },
    /// A chunk whose length is wrong for its type.
    #[error("chunk {chunk} has invalid length {length}")]
    BadChunkLength {
        /// The chunk type.
        chunk: ReplyChunkType,
        /// The length given.
        length: u64,
    },
    /// `NBD_REPLY_TYPE_NONE` without the DONE flag.
    #[error("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")]
    NoneWithoutDone,
    /// Content outside the request.
    #[error(
        "{chunk} at offset {offset} length {length} lies outside the request (offset {req_offset}, length {req_length})"
    )]
    OutsideRequest {
        /// The chunk type.
        chunk: ReplyChunkType,
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        length: u64,
        /// Request offset.
        req_offset: u64,
        /// Request length.
        req_length: u64,
    },
    /// Content overlapping content already received.
    #[error("content chunks cover more than the request length (overlap)")]
    Overlap,
    /// More than one content chunk although DF was set.
    #[error("more than one content chunk in reply to a read with NBD_CMD_FLAG_DF")]
    FragmentedDf,
    /// A hole chunk with size zero.
    #[error("NBD_REPLY_TYPE_OFFSET_HOLE with size 0")]
    ZeroHole,
    /// An error chunk with error value 0.
    #[error("error chunk with error value 0")]
    ZeroError,
    /// An error message longer than its chunk or than 4096 bytes.
    #[error("error message of {0} bytes does not fit its chunk")]
    BadErrorMessage(u32),
    /// Block status for a context that was not negotiated.
    #[error("block status for metadata context id {0} which was not negotiated")]
    UnknownContext(u32),
    /// Two status chunks for one context.
    #[error("two block status chunks for metadata context id {0}")]
    DuplicateContext(u32),
    /// An extent of length zero.
    #[error("block status extent of length 0")]
    ZeroExtent,
    /// More than one extent after REQ_ONE, or an extent past the request.
    #[error("block status violates NBD_CMD_FLAG_REQ_ONE")]
    ReqOneViolated,
    /// Extents continuing after the requested length was covered.
    #[error("block status extents continue past the requested length")]
    ExtentsPastRequest,
    /// A BLOCK_STATUS_EXT descriptor count that disagrees with its length.
    #[error("block status descriptor count {count} disagrees with chunk length {length}")]
    BadDescriptorCount {
        /// The count field.
        count: u32,
        /// The chunk length.
        length: u64,
    },
    /// A 64-bit status with high bits for a 32-bit context.
    #[error("64-bit status value {0:#x} for a 32-bit context")]
    StatusTooWide(u64),
    /// A chunk longer than any valid chunk of its type can be.
    #[error("chunk of {length} bytes exceeds the limit of {limit}")]
    ChunkTooLarge {
        /// Length claimed.
        length: u64,
        /// Limit.
        limit: u64,
    },
    /// A successful read reply that did not cover the whole request.
    #[error("read reply ended after {got} of {expected} bytes without an error")]
    ShortRead {
        /// Bytes covered.
        got: u64,
        /// Bytes requested.
        expected: u64,
    },
    /// A successful block status reply without a chunk for each context.
    #[error("block status reply ended without a status chunk for every negotiated context")]
    MissingContext,
    /// An unknown non-error chunk type: the spec mandates a hard disconnect.
    #[error("unknown chunk type {0}")]
    UnknownChunk(ReplyChunkType),
    /// Not the server's fault: the driver passed the wrong number of bytes.
    #[error("driver misuse: {0}")]
    DriverMisuse(&'static str),
}

/// An error reported by the server for one request (an `NBD_E*` value and,
/// with structured replies, a message and perhaps an offset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server error {code}: {}{}", if .message.is_empty() { .code.description() } else { .message.as_str() }, match .offset { Some(o) => alloc::format!(" at offset {o}"), None => String::new() })]
pub struct ServerError {
    /// The error value (unknown values are kept; treat them as EINVAL).
    pub code: ErrorCode,
    /// The server's message, if any.
    pub message: String,
    /// The offset of `NBD_REPLY_TYPE_ERROR_OFFSET`, if given.
    pub offset: Option<u64>,
}

/// What the driver must do next on the receive side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveNext {
    /// Read exactly this many bytes (header or metadata) and pass them to
    /// [`ClientTransmission::handle_bytes`].
    Bytes(usize),
    /// Nothing to read: call [`ClientTransmission::complete_pending`] to
    /// get the completion of a reply whose last chunk carried an event.
    Complete,
    /// The next `length` bytes on the wire are READ data for `cookie`, to
    /// be placed at `buf_offset` in that request's buffer. Move them, then
    /// call [`ClientTransmission::data_received`].
    Data {
        /// The request.
        cookie: Cookie,
        /// Where in the request's buffer the data goes.
        buf_offset: u64,
        /// How many bytes.
        length: u64,
    },
}

/// One extent of block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero).
    pub length: u64,
    /// Status flags, as the context defines them.
    pub flags: u64,
}

/// Block-status extents of one chunk, decoded lazily from the driver's bytes.
#[derive(Debug, Clone)]
pub struct Extents<'a> {
    data: &'a [u8],
    wide: bool,
}

impl Iterator for Extents<'_> {
    type Item = Extent;
    fn next(&mut self) -> Option<Extent> {
        if self.wide {
            let (d, rest) = BlockDescriptorExt::read_from_prefix(self.data).ok()?;
            self.data = rest;
            Some(Extent {
                length: d.length.get(),
                flags: d.status.get(),
            })
        } else {
            let (d, rest) = BlockDescriptor::read_from_prefix(self.data).ok()?;
            self.data = rest;
            Some(Extent {
                length: d.length.get() as u64,
                flags: d.status.get() as u64,
            })
        }
    }
}

/// Something that happened on the receive side.
#[derive(Debug, Clone)]
pub enum ReplyEvent<'a> {
    /// Nothing to report yet; ask [`ClientTransmission::next`] again.
    Nothing,
    /// `length` bytes at `buf_offset` of the request's buffer read as zero.
    Hole {
        /// The request.
        cookie: Cookie,
        /// Where in the request's buffer.
        buf_offset: u64,
        /// How many bytes.
        length: u64,
    },
    /// Block-status extents for one context, starting at the request offset.
    BlockStatus {
        /// The request.
        cookie: Cookie,
        /// The context id.
        context_id: u32,
        /// The extents.
        extents: Extents<'a>,
    },
    /// The request is complete.
    Done {
        /// The request.
        cookie: Cookie,
        /// The command it was.
        command: Command,
        /// Success, or the (first) error the server reported.
        result: Result<(), ServerError>,
    },
}

#[derive(Debug, Clone)]
struct InFlight {
    generation: u32,
    command: Command,
    flags: CommandFlags,
    offset: u64,
    length: u64,
    /// Bytes of content (data + holes) received.
    covered: u64,
    content_chunks: u32,
    /// Bitmask of context indexes that sent status.
    contexts_seen: u64,
    error: Option<ServerError>,
    busy: bool,
    /// Completed, waiting for the driver's `release` (manual release).
    held: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    /// Waiting for a reply header (first 16 bytes in compact structured
    /// mode, where the magic decides whether 4 more follow).
    Header,
    /// Compact structured mode: the 4 remaining bytes of a structured header.
    HeaderRest,
    /// Payload of a chunk, of `len` bytes.
    ChunkPayload {
        slot: usize,
        chunk: ReplyChunkType,
        flags: ReplyFlags,
        len: u64,
    },
    /// READ data of an OFFSET_DATA chunk: first its 8-byte offset.
    DataOffset { slot: usize, flags: ReplyFlags, len: u64 },
    /// READ data being moved by the driver.
    Data {
        slot: usize,
        done: bool,
        buf_offset: u64,
        len: u64,
    },
    /// The connection is dead.
    Failed,
}

/// The client transmission state machine.
#[derive(Debug)]
pub struct ClientTransmission {
    mode: Mode,
    size: u64,
    flags: TransmissionFlags,
    constraints: BlockSizeConstraints,
    block_size_known: bool,
    contexts: Vec<MetaContext>,
    slots: Vec<InFlight>,
    free: Vec<u32>,
    in_flight: usize,
    state: RecvState,
    header: [u8; EXTENDED_REPLY_HEADER_LEN],
    disconnecting: bool,
    strict: bool,
    pending_done: Option<usize>,
    manual_release: bool,
    /// The cookie of the reply being received (from its header on).
    replying: u64,
    /// The largest READ or WRITE sent when the server sent no block sizes.
    unnegotiated_max_payload: u64,
}

/// Largest error chunk payload: the fixed fields, a 4096-byte message, an
/// offset, and slack for future fields.
const MAX_ERROR_CHUNK: u64 = 6 + MAX_STRING_LEN as u64 + 8 + 64;

impl ClientTransmission {
    /// A transmission machine for a negotiated connection, with room for
    /// `max_in_flight` outstanding requests (the table is allocated here,
    /// once).
    pub fn new(negotiated: &Negotiated, max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.clamp(1, u32::MAX as usize);
        let mut free: Vec<u32> = (0..max_in_flight as u32).collect();
        free.reverse();
        ClientTransmission {
            mode: negotiated.mode,
            size: negotiated.size,
            flags: negotiated.flags,
            constraints: negotiated.constraints(),
            block_size_known: negotiated.block_size.is_some(),
            contexts: negotiated.contexts.clone(),
            slots: (0..max_in_flight)
                .map(|_| InFlight {
                    generation: 0,
                    command: Command::READ,
                    flags: CommandFlags::empty(),
                    offset: 0,
                    length: 0,
                    covered: 0,
                    content_chunks: 0,
                    contexts_seen: 0,
                    error: None,
                    busy: false,
                    held: false,
                })
                .collect(),
            free,
            in_flight: 0,
            state: RecvState::Header,
            header: [0; EXTENDED_REPLY_HEADER_LEN],
            disconnecting: false,
            strict: true,
            pending_done: None,
            manual_release: false,
            replying: 0,
            unnegotiated_max_payload: DEFAULT_MAX_PAYLOAD as u64,
        }
    }

    /// Turn off the checks that go beyond what QEMU and libnbd enforce by
    /// default (extents continuing past the request, missing contexts,
    /// requests of length 0). Protocol framing is always checked.
    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    /// The largest READ or WRITE payload to send when the server sent no
    /// block sizes (default: the spec's 2^25, which every server must
    /// accept). Raise it only for servers known to accept more.
    pub fn set_unnegotiated_max_payload(&mut self, limit: u64) {
        self.unnegotiated_max_payload = limit;
    }

    /// With manual release, a completed request keeps its slot (and so its
    /// cookie's slot index) until the driver calls
    /// [`ClientTransmission::release`]: a driver that keeps per-slot state
    /// (buffers, results) can hand the result over before the slot is
    /// reused.
    pub fn set_manual_release(&mut self, manual: bool) {
        self.manual_release = manual;
    }

    /// Gives a completed request's slot back (manual release only).
    pub fn release(&mut self, cookie: Cookie) {
        let slot = cookie.slot();
        if let Some(s) = self.slots.get_mut(slot)
            && s.held
            && s.generation == (cookie.0 >> 32) as u32
        {
            s.held = false;
            self.free.push(slot as u32);
        }
    }

    /// The protocol flavour in use.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.flags
    }
    /// Block-size constraints in force.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.constraints
    }
    /// Negotiated metadata contexts.
    pub fn contexts(&self) -> &[MetaContext] {
        &self.contexts
    }
    /// Number of requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
    /// Capacity of the in-flight table.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
    /// The request in flight under `cookie` (`None` for a cookie that is
    /// not in flight), so that a driver needs no table of its own to
    /// place a reply.
    pub fn request(&self, cookie: Cookie) -> Option<Request> {
        let s = self.slots.get(cookie.slot())?;
        (s.busy && cookie == self.cookie_of(cookie.slot())).then_some(Request {
            command: s.command,
            flags: s.flags,
            offset: s.offset,
            length: s.length,
        })
    }
    /// Whether `NBD_CMD_DISC` was queued (nothing may follow it).
    pub fn is_disconnecting(&self) -> bool {
        self.disconnecting
    }
    /// Whether the connection failed (a violation was detected).
    pub fn is_failed(&self) -> bool {
        self.state == RecvState::Failed
    }

    /// Checks a request against the server's advertisement, without
    /// sending it.
    pub fn check_request(&self, req: &Request) -> Result<(), RequestError> {
        if self.state == RecvState::Failed {
            return Err(RequestError::Failed);
        }
        if self.disconnecting {
            return Err(RequestError::Disconnecting);
        }
        let f = self.flags;
        let cmd = req.command;
        let ro = f.contains(TransmissionFlags::READ_ONLY);
        let need = |flag: TransmissionFlags, name: &'static str| {
            if f.contains(flag) {
                Ok(())
            } else {
                Err(RequestError::NotAdvertised {
                    command: cmd,
                    needs: name,
                })
            }
        };
        // Which flags each command accepts.
        let allowed = match cmd {
            Command::READ => CommandFlags::FUA | CommandFlags::DF,
            Command::WRITE => CommandFlags::FUA,
            Command::TRIM => CommandFlags::FUA,
            Command::WRITE_ZEROES => CommandFlags::FUA | CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
            Command::BLOCK_STATUS => CommandFlags::FUA | CommandFlags::REQ_ONE,
            Command::FLUSH | Command::CACHE | Command::DISC => CommandFlags::FUA,
            _ => return Err(RequestError::Unsupported(cmd)),
        };
        let extra = req.flags.difference(allowed);
        if !extra.is_empty() {
            return Err(RequestError::BadFlag {
                command: cmd,
                flags: extra,
                advertised: true,
            });
        }
        let not_advertised = |fl: CommandFlags| RequestError::BadFlag {
            command: cmd,
            flags: fl,
            advertised: false,
        };
        if req.flags.contains(CommandFlags::FUA) && !f.contains(TransmissionFlags::SEND_FUA) {
            return Err(not_advertised(CommandFlags::FUA));
        }
        if req.flags.contains(CommandFlags::DF) && !(f.contains(TransmissionFlags::SEND_DF) && self.mode.structured()) {
            return Err(not_advertised(CommandFlags::DF));
        }
        if req.flags.contains(CommandFlags::FAST_ZERO) && !f.contains(TransmissionFlags::SEND_FAST_ZERO) {
            return Err(not_advertised(CommandFlags::FAST_ZERO));
        }
        match cmd {
            Command::WRITE | Command::TRIM | Command::WRITE_ZEROES if ro => {
                return Err(RequestError::ReadOnly(cmd));
            }
            Command::FLUSH => need(TransmissionFlags::SEND_FLUSH, "NBD_FLAG_SEND_FLUSH")?,
            Command::TRIM => need(TransmissionFlags::SEND_TRIM, "NBD_FLAG_SEND_TRIM")?,
            Command::WRITE_ZEROES => need(TransmissionFlags::SEND_WRITE_ZEROES, "NBD_FLAG_SEND_WRITE_ZEROES")?,
            Command::CACHE => need(TransmissionFlags::SEND_CACHE, "NBD_FLAG_SEND_CACHE")?,
            Command::BLOCK_STATUS if self.contexts.is_empty() || !self.mode.structured() => {
                return Err(RequestError::NoMetaContext);
            }
            _ => {}
        }
        if matches!(cmd, Command::FLUSH | Command::DISC) {
            if req.offset != 0 || req.length != 0 {
                return Err(RequestError::OutOfRange {
                    offset: req.offset,
                    length: req.length,
                    size: self.size,
                });
            }
            return Ok(());
        }
        if req.length == 0 && self.strict {
            return Err(RequestError::ZeroLength(cmd));
        }
        let end = req.offset.checked_add(req.length);
        if end.is_none_or(|e| e > self.size) {
            return Err(RequestError::OutOfRange {
                offset: req.offset,
                length: req.length,
                size: self.size,
            });
        }
        let min = self.constraints.minimum as u64;
        if min > 1 && (!req.offset.is_multiple_of(min) || !req.length.is_multiple_of(min)) {
            // The last partial block of an export that is not a multiple of
            // the minimum is still addressable up to the end.
            let tail_ok = end == Some(self.size) && req.offset.is_multiple_of(min);
            if !tail_ok {
                return Err(RequestError::Unaligned {
                    offset: req.offset,
                    length: req.length,
                    minimum: self.constraints.minimum,
                });
            }
        }
        let max_payload = if self.block_size_known {
            self.constraints.maximum as u64
        } else {
            self.unnegotiated_max_payload
        };
        let carries_payload = cmd == Command::WRITE || (cmd == Command::READ && !self.mode.structured());
        if cmd == Command::READ || cmd == Command::WRITE {
            // Reads are limited too: a structured read may exceed it only by
            // server choice, and we never ask more than 32 bits' worth.
            let limit = if carries_payload || self.block_size_known || !self.mode.extended() {
                max_payload
            } else {
                u32::MAX as u64
            };
            if req.length > limit {
                return Err(RequestError::TooLarge {
                    length: req.length,
                    maximum: limit,
                });
            }
        }
        if !self.mode.extended() && req.length > u32::MAX as u64 {
            return Err(RequestError::TooLarge {
                length: req.length,
                maximum: u32::MAX as u64,
            });
        }
        Ok(())
    }

    /// Validates a request, gives it a cookie, records it as in flight and
    /// encodes its header. For a WRITE the driver sends the data right
    /// after the header. `NBD_CMD_DISC` takes no slot and expects no reply.
    pub fn start_request(&mut self, req: Request) -> Result<(Cookie, EncodedHeader), RequestError> {
        self.check_request(&req)?;
        let mut flags = req.flags;
        let cookie = if req.command == Command::DISC {
            self.disconnecting = true;
            Cookie(u64::MAX)
        } else {
            let Some(slot) = self.free.pop() else {
                return Err(RequestError::TooManyInFlight(self.slots.len()));
            };
            let s = &mut self.slots[slot as usize];
            s.generation = s.generation.wrapping_add(1);
            s.command = req.command;
            s.flags = req.flags;
            s.offset = req.offset;
            s.length = req.length;
            s.covered = 0;
            s.content_chunks = 0;
            s.contexts_seen = 0;
            s.error = None;
            s.busy = true;
            self.in_flight += 1;
            Cookie(((s.generation as u64) << 32) | slot as u64)
        };
        let mut buf = [0u8; EXTENDED_REQUEST_HEADER_LEN];
        let len = if self.mode.extended() {
            if req.command == Command::WRITE {
                flags |= CommandFlags::PAYLOAD_LEN;
            }
            let h = ExtendedRequestHeader {
                magic: EXTENDED_REQUEST_MAGIC.into(),
                flags: flags.bits().into(),
                command: req.command.0.into(),
                cookie: cookie.0.into(),
                offset: req.offset.into(),
                length: req.length.into(),
            };
            buf.copy_from_slice(h.as_bytes());
            EXTENDED_REQUEST_HEADER_LEN
        } else {
            let h = RequestHeader {
                magic: REQUEST_MAGIC.into(),
                flags: flags.bits().into(),
                command: req.command.0.into(),
                cookie: cookie.0.into(),
                offset: req.offset.into(),
                length: (req.length as u32).into(),
            };
            buf[..REQUEST_HEADER_LEN].copy_from_slice(h.as_bytes());
            REQUEST_HEADER_LEN
        };
        Ok((cookie, EncodedHeader { buf, len: len as u8 }))
    }

    /// Forgets an in-flight request whose header could not be sent, so the
    /// slot is reused (the server never saw it).
    pub fn cancel_unsent(&mut self, cookie: Cookie) {
        if let Some(s) = self.slots.get_mut(cookie.slot())
            && s.busy
            && s.generation == (cookie.0 >> 32) as u32
        {
            s.busy = false;
            self.free.push(cookie.slot() as u32);
            self.in_flight -= 1;
        }
    }

    /// What the driver must read next.
    pub fn next(&self) -> ReceiveNext {
        if self.pending_done.is_some() {
            return ReceiveNext::Complete;
        }
        match self.state {
            RecvState::Header => ReceiveNext::Bytes(match self.mode {
                Mode::Extended => EXTENDED_REPLY_HEADER_LEN,
                _ => SIMPLE_REPLY_HEADER_LEN,
            }),
            RecvState::HeaderRest => ReceiveNext::Bytes(STRUCTURED_REPLY_HEADER_LEN - SIMPLE_REPLY_HEADER_LEN),
            RecvState::ChunkPayload { len, .. } => ReceiveNext::Bytes(len as usize),
            RecvState::DataOffset { .. } => ReceiveNext::Bytes(8),
            RecvState::Data {
                slot, buf_offset, len, ..
            } => ReceiveNext::Data {
                cookie: self.cookie_of(slot),
                buf_offset,
                length: len,
            },
            RecvState::Failed => ReceiveNext::Bytes(0),
        }
    }

    fn cookie_of(&self, slot: usize) -> Cookie {
        Cookie(((self.slots[slot].generation as u64) << 32) | slot as u64)
    }

    fn fail(&mut self, v: ReplyViolation) -> ReplyViolation {
        self.state = RecvState::Failed;
        v
    }

    /// The slot of a request in flight; a reply header names it, and it
    /// becomes the reply being received.
    fn lookup(&mut self, cookie: u64) -> Result<usize, ReplyViolation> {
        let slot = (cookie & 0xffff_ffff) as usize;
        match self.slots.get(slot) {
            Some(s) if s.busy && s.generation == (cookie >> 32) as u32 => {
                self.replying = cookie;
                Ok(slot)
            }
            _ => Err(ReplyViolation::UnknownCookie(cookie)),
        }
    }

    /// Checks, before the rest of a reply is taken in, that its request is
    /// still in flight: [`ClientTransmission::cancel_unsent`] may have given
    /// it up after the header arrived, which means the server replied to a
    /// request it never received (it guessed the cookie).
    fn still_replying(&mut self) -> Result<(), ReplyViolation> {
        self.lookup(self.replying).map(|_| ())
    }

    fn complete(&mut self, slot: usize) -> ReplyEvent<'static> {
        let cookie = self.cookie_of(slot);
        let s = &mut self.slots[slot];
        s.busy = false;
        let command = s.command;
        let result = match s.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if self.manual_release {
            s.held = true;
        } else {
            self.free.push(slot as u32);
        }
        self.in_flight -= 1;
        ReplyEvent::Done {
            cookie,
            command,
            result,
        }
    }

    /// The driver moved the READ data announced by [`ReceiveNext::Data`].
    pub fn data_received(&mut self) -> Result<ReplyEvent<'static>, ReplyViolation> {
        match self.state {
            RecvState::Data { slot, done, .. } => {
                if let Err(e) = self.still_replying() {
                    return Err(self.fail(e));
                }
                self.state = RecvState::Header;
                if done {
                    self.finish_reply(slot).map_err(|e| self.fail(e))
                } else {
                    Ok(ReplyEvent::Nothing)
                }
            }
            _ => Ok(ReplyEvent::Nothing),
        }
    }

    /// As [`ClientTransmission::data_received`], but a completion is not
    /// returned: [`ClientTransmission::next`] announces it as
    /// [`ReceiveNext::Complete`] (so the data's own event can be handed
    /// out first).
    pub(crate) fn data_received_deferred(&mut self) -> Result<(), ReplyViolation> {
        if let RecvState::Data { slot, done, .. } = self.state {
            if let Err(e) = self.still_replying() {
                return Err(self.fail(e));
            }
            self.state = RecvState::Header;
            if done {
                self.pending_done = Some(slot);
            }
        }
        Ok(())
    }

    /// The connection ended (EOF or error): fails every request in flight.
    /// Returns the cookies, so the driver can wake their owners.
    pub fn fail_all(&mut self) -> impl Iterator<Item = Cookie> + '_ {
        self.state = RecvState::Failed;
        let mut out = Vec::new();
        for i in 0..self.slots.len() {
            if self.slots[i].busy {
                out.push(self.cookie_of(i));
                self.slots[i].busy = false;
                if self.manual_release {
                    self.slots[i].held = true;
                } else {
                    self.free.push(i as u32);
                }
            }
        }
        self.in_flight = 0;
        out.into_iter()
    }

    /// Feeds the bytes asked for by [`ReceiveNext::Bytes`].
    pub fn handle_bytes<'b>(&mut self, bytes: &'b [u8]) -> Result<ReplyEvent<'b>, ReplyViolation> {
        let r = self.handle_inner(bytes);
        if let Err(e) = r {
            return Err(self.fail(e));
        }
        r
    }

    fn handle_inner<'b>(&mut self, bytes: &'b [u8]) -> Result<ReplyEvent<'b>, ReplyViolation> {
        match self.next() {
            ReceiveNext::Bytes(n) if bytes.len() == n => {}
            ReceiveNext::Bytes(_) => {
                return Err(ReplyViolation::DriverMisuse(
                    "handle_bytes() given a different number of bytes than next() asked",
                ));
            }
            _ => {
                return Err(ReplyViolation::DriverMisuse(
                    "handle_bytes() called while next() asks for data_received() or complete_pending()",
                ));
            }
        }
        match self.state {
            RecvState::Failed => Err(ReplyViolation::BadMagic(Hex(0))),
            RecvState::Header => {
                if bytes.len() < 4 {
                    return Err(ReplyViolation::BadMagic(Hex(0)));
                }
                let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                match (magic, self.mode) {
                    (SIMPLE_REPLY_MAGIC, Mode::Extended) => Err(ReplyViolation::SimpleReplyNotAllowed(
                        "extended headers were negotiated",
                    )),
                    (SIMPLE_REPLY_MAGIC, _) => {
                        let (h, _) = SimpleReplyHeader::read_from_prefix(bytes)
                            .map_err(|_| ReplyViolation::BadMagic(Hex(magic)))?;
                        self.simple_reply(h.cookie.get(), h.error.get())
                    }
                    (STRUCTURED_REPLY_MAGIC, Mode::Structured) => {
                        self.header[..SIMPLE_REPLY_HEADER_LEN].copy_from_slice(&bytes[..SIMPLE_REPLY_HEADER_LEN]);
                        self.state = RecvState::HeaderRest;
                        Ok(ReplyEvent::Nothing)
                    }
                    (EXTENDED_REPLY_MAGIC, Mode::Extended) => {
                        let (h, _) = ExtendedReplyHeader::read_from_prefix(bytes)
                            .map_err(|_| ReplyViolation::BadMagic(Hex(magic)))?;
                        let slot = self.lookup(h.cookie.get())?;
                        let req_offset = self.slots[slot].offset;
                        if h.offset.get() != req_offset {
                            return Err(ReplyViolation::OffsetMismatch {
                                expected: req_offset,
                                got: h.offset.get(),
                            });
                        }
                        self.chunk_header(
                            slot,
                            ReplyFlags::from_bits_retain(h.flags.get()),
                            ReplyChunkType(h.chunk_type.get()),
                            h.length.get(),
                        )
                    }
                    _ => Err(ReplyViolation::BadMagic(Hex(magic))),
                }
            }
            RecvState::HeaderRest => {
                self.header[SIMPLE_REPLY_HEADER_LEN..STRUCTURED_REPLY_HEADER_LEN].copy_from_slice(&bytes[..4]);
                let (h, _) = StructuredReplyHeader::read_from_prefix(&self.header[..])
                    .map_err(|_| ReplyViolation::BadMagic(Hex(0)))?;
                let slot = self.lookup(h.cookie.get())?;
                self.chunk_header(
                    slot,
                    ReplyFlags::from_bits_retain(h.flags.get()),
                    ReplyChunkType(h.chunk_type.get()),
                    h.length.get() as u64,
                )
            }
            RecvState::DataOffset { slot, flags, len } => {
                self.still_replying()?;
                let offset = u64::from_be_bytes(bytes[..8].try_into().map_err(|_| ReplyViolation::BadMagic(Hex(0)))?);
                let data_len = len - 8;
                self.content(slot, ReplyChunkType::OFFSET_DATA, offset, data_len)?;
                let buf_offset = offset - self.slots[slot].offset;
                self.state = RecvState::Data {
                    slot,
                    done: flags.contains(ReplyFlags::DONE),
                    buf_offset,
                    len: data_len,
                };
                Ok(ReplyEvent::Nothing)
            }
            RecvState::Data { .. } => Ok(ReplyEvent::Nothing),
            RecvState::ChunkPayload {
                slot,
                chunk,
                flags,
                len,
            } => {
                if bytes.len() as u64 != len {
                    return Err(ReplyViolation::BadChunkLength {
                        chunk,
                        length: bytes.len() as u64,
                    });
                }
                self.still_replying()?;
                self.state = RecvState::Header;
                let done = flags.contains(ReplyFlags::DONE);
                let ev = self.chunk_payload(slot, chunk, bytes)?;
                if done {
                    // The payload's event (extents, a hole) must reach the
                    // driver before the completion, which `next` then
                    // announces as `ReceiveNext::Complete`.
                    if matches!(ev, ReplyEvent::Nothing) {
                        return self.finish_reply(slot);
                    }
                    self.pending_done = Some(slot);
                }
                Ok(ev)
            }
        }
    }

    /// Completes the request announced by [`ReceiveNext::Complete`].
    pub fn complete_pending(&mut self) -> Result<ReplyEvent<'static>, ReplyViolation> {
        match self.pending_done.take() {
            Some(slot) => {
                if let Err(e) = self.still_replying() {
                    return Err(self.fail(e));
                }
                self.finish_reply(slot).map_err(|e| self.fail(e))
            }
            None => Ok(ReplyEvent::Nothing),
        }
    }

    fn simple_reply<'b>(&mut self, cookie: u64, error: u32) -> Result<ReplyEvent<'b>, ReplyViolation> {
        let slot = self.lookup(cookie)?;
        let s = &self.slots[slot];
        if self.mode.structured() && s.command == Command::READ && error == 0 {
            return Err(ReplyViolation::SimpleReplyNotAllowed(
                "successful read with structured replies",
            ));
        }
        if s.command == Command::BLOCK_STATUS && error == 0 {
            return Err(ReplyViolation::SimpleReplyNotAllowed("successful block status"));
        }
        if error != 0 {
            self.slots[slot].error = Some(ServerError {
                code: ErrorCode(error),
                message: String::new(),
                offset: None,
            });
            return Ok(self.complete(slot));
        }
        // The data of a READ follows (none for a READ of length 0, which
        // completes now: announcing zero bytes would leave the driver
        // waiting for nothing).
        if s.command == Command::READ && s.length > 0 {
            let len = s.length;
            self.slots[slot].covered = len;
            self.state = RecvState::Data {
                slot,
                done: true,
                buf_offset: 0,
                len,
            };
            return Ok(ReplyEvent::Nothing);
        }
        Ok(self.complete(slot))
    }

    fn chunk_header<'b>(
        &mut self,
        slot: usize,
        flags: ReplyFlags,
        chunk: ReplyChunkType,
        length: u64,
    ) -> Result<ReplyEvent<'b>, ReplyViolation> {
        let command = self.slots[slot].command;
        let bad_len = || ReplyViolation::BadChunkLength { chunk, length };
        let done = flags.contains(ReplyFlags::DONE);
        match chunk {
            ReplyChunkType::NONE => {
                if length != 0 {
                    return Err(bad_len());
                }
                if !done {
                    return Err(ReplyViolation::NoneWithoutDone);
                }
                self.state = RecvState::Header;
                self.finish_reply(slot)
            }
            ReplyChunkType::OFFSET_DATA => {
                if command != Command::READ {
                    return Err(ReplyViolation::UnexpectedChunk { chunk, command });
                }
                if length < 9 {
                    return Err(bad_len());
                }
                // Longer than the whole request: refused from the header
                // (the offset is not read yet, so there is none to name).
                let limit = self.slots[slot].length.saturating_add(8);
                if length > limit {
                    return Err(ReplyViolation::ChunkTooLarge { length, limit });
                }
                self.state = RecvState::DataOffset {
                    slot,
                    flags,
                    len: length,
                };
                Ok(ReplyEvent::Nothing)
            }
            ReplyChunkType::OFFSET_HOLE => {
                if command != Command::READ {
                    return Err(ReplyViolation::UnexpectedChunk { chunk, command });
                }
                if length != 12 {
                    return Err(bad_len());
                }
                self.state = RecvState::ChunkPayload {
                    slot,
                    chunk,
                    flags,
                    len: length,
                };
                Ok(ReplyEvent::Nothing)
            }
            ReplyChunkType::BLOCK_STATUS | ReplyChunkType::BLOCK_STATUS_EXT => {
                if command != Command::BLOCK_STATUS {
                    return Err(ReplyViolation::UnexpectedChunk { chunk, command });
                }
                let wide = chunk == ReplyChunkType::BLOCK_STATUS_EXT;
                if wide != self.mode.extended() {
                    return Err(ReplyViolation::UnexpectedChunk { chunk, command });
                }
                let (fixed, each) = if wide { (8u64, 16u64) } else { (4, 8) };
                if length < fixed + each || !(length - fixed).is_multiple_of(each) {
                    return Err(bad_len());
                }
                let limit = fixed + each * MAX_BLOCK_STATUS_EXTENTS as u64;
                if length > limit {
                    return Err(ReplyViolation::ChunkTooLarge { length, limit });
                }
                self.state = RecvState::ChunkPayload {
                    slot,
                    chunk,
                    flags,
                    len: length,
                };
                Ok(ReplyEvent::Nothing)
            }
            c if c.is_error() => {
                if length < 6 {
                    return Err(bad_len());
                }
                if length > MAX_ERROR_CHUNK {
                    return Err(ReplyViolation::ChunkTooLarge {
                        length,
                        limit: MAX_ERROR_CHUNK,
                    });
                }
                if c == ReplyChunkType::ERROR_OFFSET {
                    if length < 14 {
                        return Err(bad_len());
                    }
                    if !matches!(
                        command,
                        Command::READ
                            | Command::WRITE
                            | Command::TRIM
                            | Command::CACHE
                            | Command::WRITE_ZEROES
                            | Command::BLOCK_STATUS
                    ) {
                        return Err(ReplyViolation::UnexpectedChunk { chunk, command });
                    }
                }
                self.state = RecvState::ChunkPayload {
                    slot,
                    chunk,
                    flags,
                    len: length,
                };
                Ok(ReplyEvent::Nothing)
            }
            other => Err(ReplyViolation::UnknownChunk(other)),
        }
    }

    /// Records content (data or hole) for a READ and checks it.
    fn content(&mut self, slot: usize, chunk: ReplyChunkType, offset: u64, length: u64) -> Result<(), ReplyViolation> {
        let s = &mut self.slots[slot];
        let end = offset.checked_add(length);
        let req_end = s.offset + s.length;
        if offset < s.offset || end.is_none_or(|e| e > req_end) {
            return Err(ReplyViolation::OutsideRequest {
                chunk,
                offset,
                length,
                req_offset: s.offset,
                req_length: s.length,
            });
        }
        s.content_chunks += 1;
        if s.flags.contains(CommandFlags::DF) && s.content_chunks > 1 {
            return Err(ReplyViolation::FragmentedDf);
        }
        s.covered = s.covered.saturating_add(length);
        if s.covered > s.length {
            return Err(ReplyViolation::Overlap);
        }
        Ok(())
    }

    fn chunk_payload<'b>(
        &mut self,
        slot: usize,
        chunk: ReplyChunkType,
        p: &'b [u8],
    ) -> Result<ReplyEvent<'b>, ReplyViolation> {
        let cookie = self.cookie_of(slot);
        match chunk {
            ReplyChunkType::OFFSET_HOLE => {
                let (h, _) = OffsetHolePayload::read_from_prefix(p).map_err(|_| ReplyViolation::BadChunkLength {
                    chunk,
                    length: p.len() as u64,
                })?;
                let (offset, length) = (h.offset.get(), h.length.get() as u64);
                if length == 0 {
                    return Err(ReplyViolation::ZeroHole);
                }
                self.content(slot, chunk, offset, length)?;
                Ok(ReplyEvent::Hole {
                    cookie,
                    buf_offset: offset - self.slots[slot].offset,
                    length,
                })
            }
            ReplyChunkType::BLOCK_STATUS | ReplyChunkType::BLOCK_STATUS_EXT => {
                let wide = chunk == ReplyChunkType::BLOCK_STATUS_EXT;
                let context_id = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                let descriptors = if wide {
                    let count = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                    if count as u64 * 16 + 8 != p.len() as u64 {
                        return Err(ReplyViolation::BadDescriptorCount {
                            count,
                            length: p.len() as u64,
                        });
                    }
                    &p[8..]
                } else {
                    &p[4..]
                };
                let Some(index) = self.contexts.iter().position(|c| c.id == context_id) else {
                    return Err(ReplyViolation::UnknownContext(context_id));
                };
                let s = &mut self.slots[slot];
                let bit = 1u64 << (index % 64);
                if index < 64 && s.contexts_seen & bit != 0 {
                    return Err(ReplyViolation::DuplicateContext(context_id));
                }
                s.contexts_seen |= bit;
                let extents = Extents {
                    data: descriptors,
                    wide,
                };
                let req_one = s.flags.contains(CommandFlags::REQ_ONE);
                let mut sum: u64 = 0;
                let mut n = 0usize;
                for e in extents.clone() {
                    if e.length == 0 {
                        return Err(ReplyViolation::ZeroExtent);
                    }
                    if self.strict && n > 0 && sum >= s.length {
                        return Err(ReplyViolation::ExtentsPastRequest);
                    }
                    if wide && e.flags > u32::MAX as u64 && is_32bit_context(&self.contexts[index].name) {
                        return Err(ReplyViolation::StatusTooWide(e.flags));
                    }
                    sum = sum.saturating_add(e.length);
                    n += 1;
                }
                if req_one && (n != 1 || sum > s.length) {
                    return Err(ReplyViolation::ReqOneViolated);
                }
                Ok(ReplyEvent::BlockStatus {
                    cookie,
                    context_id,
                    extents,
                })
            }
            c => {
                // Error chunks (known or unknown type with bit 15 set).
                let (h, rest) =
                    ErrorPayloadHeader::read_from_prefix(p).map_err(|_| ReplyViolation::BadChunkLength {
                        chunk,
                        length: p.len() as u64,
                    })?;
                let mlen = h.message_length.get() as usize;
                if mlen > rest.len() || mlen > MAX_STRING_LEN {
                    return Err(ReplyViolation::BadErrorMessage(mlen as u32));
                }
                let code = h.error.get();
                if code == 0 && (c == ReplyChunkType::ERROR || c == ReplyChunkType::ERROR_OFFSET) {
                    return Err(ReplyViolation::ZeroError);
                }
                let message = String::from_utf8_lossy(&rest[..mlen]).into_owned();
                let mut offset = None;
                if c == ReplyChunkType::ERROR_OFFSET {
                    let tail = &rest[mlen..];
                    if tail.len() != 8 {
                        return Err(ReplyViolation::BadChunkLength {
                            chunk,
                            length: p.len() as u64,
                        });
                    }
                    let o = u64::from_be_bytes(
                        tail.try_into()
                            .map_err(|_| ReplyViolation::BadErrorMessage(mlen as u32))?,
                    );
                    let s = &self.slots[slot];
                    if o < s.offset || o >= s.offset.saturating_add(s.length.max(1)) {
                        return Err(ReplyViolation::OutsideRequest {
                            chunk,
                            offset: o,
                            length: 0,
                            req_offset: s.offset,
                            req_length: s.length,
                        });
                    }
                    offset = Some(o);
                }
                let code = if code == 0 { ErrorCode::EINVAL } else { ErrorCode(code) };
                let s = &mut self.slots[slot];
                if s.error.is_none() {
                    s.error = Some(ServerError { code, message, offset });
                }
                Ok(ReplyEvent::Nothing)
            }
        }
    }

    fn finish_reply<'b>(&mut self, slot: usize) -> Result<ReplyEvent<'b>, ReplyViolation> {
        let s = &self.slots[slot];
        if s.error.is_none() {
            if s.command == Command::READ && s.covered != s.length {
                return Err(ReplyViolation::ShortRead {
                    got: s.covered,
                    expected: s.length,
                });
            }
            if s.command == Command::BLOCK_STATUS {
                let n = self.contexts.len().min(64);
                let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                if s.contexts_seen == 0 || (self.strict && s.contexts_seen != all) {
                    return Err(ReplyViolation::MissingContext);
                }
            }
        }
        Ok(self.complete(slot))
    }
}

fn is_32bit_context(name: &str) -> bool {
    name.starts_with("base:") || name.starts_with("qemu:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// A data chunk longer than its whole request is refused from its
    /// header alone (its payload is neither awaited nor buffered), as a
    /// chunk too large for the request rather than as content at an offset
    /// that was never read.
    #[test]
    fn data_chunk_longer_than_its_request_is_too_large() {
        for length in [8 + 4097, u32::MAX] {
            let mut tx = ClientTransmission::new(&structured(), 4);
            let (cookie, _) = tx.start_request(Request::new(Command::READ, 4096, 4096)).unwrap();
            let h = StructuredReplyHeader {
                magic: STRUCTURED_REPLY_MAGIC.into(),
                flags: ReplyFlags::DONE.bits().into(),
                chunk_type: ReplyChunkType::OFFSET_DATA.0.into(),
                cookie: cookie.0.into(),
                length: length.into(),
            };
            tx.handle_bytes(&h.as_bytes()[..16]).unwrap();
            assert_eq!(
                tx.handle_bytes(&h.as_bytes()[16..]).unwrap_err(),
                ReplyViolation::ChunkTooLarge {
                    length: length.into(),
                    limit: 8 + 4096
                }
            );
            assert!(tx.is_failed());
        }
        // The longest valid one is accepted.
        let mut tx = ClientTransmission::new(&structured(), 4);
        let (cookie, _) = tx.start_request(Request::new(Command::READ, 4096, 4096)).unwrap();
        let wire = chunk(cookie, ReplyFlags::DONE, ReplyChunkType::OFFSET_DATA, &[0; 8 + 4096]);
        tx.handle_bytes(&wire[..16]).unwrap();
        tx.handle_bytes(&wire[16..20]).unwrap();
        assert_eq!(tx.next(), ReceiveNext::Bytes(8));
    }

    fn structured() -> Negotiated {
        Negotiated {
            mode: Mode::Structured,
            tls: false,
            export_name: String::new(),
            description: None,
            size: 1 << 20,
            flags: TransmissionFlags::HAS_FLAGS,
            block_size: None,
            contexts: Vec::new(),
        }
    }

    fn chunk(cookie: Cookie, flags: ReplyFlags, chunk: ReplyChunkType, payload: &[u8]) -> Vec<u8> {
        let h = StructuredReplyHeader {
            magic: STRUCTURED_REPLY_MAGIC.into(),
            flags: flags.bits().into(),
            chunk_type: chunk.0.into(),
            cookie: cookie.0.into(),
            length: (payload.len() as u32).into(),
        };
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// Found by fuzzing (`structured`): a server that guesses the cookie of
    /// a request not sent yet can start replying to it; if the driver then
    /// gives the request up with `cancel_unsent`, the rest of the reply
    /// completed a free slot: `in_flight` underflowed (a panic in debug
    /// builds; in release the slot went twice onto the free list).
    #[test]
    fn reply_to_a_cancelled_request_is_a_violation() {
        // The rest of a chunk (its payload, or the offset of a data chunk).
        for (ty, payload) in [
            (
                ReplyChunkType::OFFSET_HOLE,
                [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0].as_slice(),
            ),
            (ReplyChunkType::OFFSET_DATA, [0u8; 8 + 4096].as_slice()),
        ] {
            let mut tx = ClientTransmission::new(&structured(), 4);
            let (cookie, _) = tx.start_request(Request::new(Command::READ, 0, 4096)).unwrap();
            let wire = chunk(cookie, ReplyFlags::DONE, ty, payload);
            tx.handle_bytes(&wire[..16]).unwrap();
            tx.handle_bytes(&wire[16..20]).unwrap();
            tx.cancel_unsent(cookie);
            assert_eq!(tx.in_flight(), 0);
            let ReceiveNext::Bytes(n) = tx.next() else {
                panic!("expected the rest of the chunk");
            };
            assert_eq!(
                tx.handle_bytes(&wire[20..20 + n]).unwrap_err(),
                ReplyViolation::UnknownCookie(cookie.0)
            );
            assert!(tx.is_failed());
            assert_eq!(tx.in_flight(), 0);
        }
        // READ data being moved (simple reply), then the request given up.
        let mut n = structured();
        n.mode = Mode::Simple;
        let mut tx = ClientTransmission::new(&n, 4);
        let (cookie, _) = tx.start_request(Request::new(Command::READ, 0, 512)).unwrap();
        let h = SimpleReplyHeader {
            magic: SIMPLE_REPLY_MAGIC.into(),
            error: 0.into(),
            cookie: cookie.0.into(),
        };
        tx.handle_bytes(h.as_bytes()).unwrap();
        assert!(matches!(tx.next(), ReceiveNext::Data { length: 512, .. }));
        tx.cancel_unsent(cookie);
        assert_eq!(tx.data_received().unwrap_err(), ReplyViolation::UnknownCookie(cookie.0));
        assert!(tx.is_failed());
        // A completion announced by `Complete`, then the request given up
        // and its slot reused by a new request.
        let mut n = structured();
        n.contexts = vec![MetaContext {
            id: 1,
            name: CONTEXT_BASE_ALLOCATION.into(),
        }];
        let mut tx = ClientTransmission::new(&n, 1);
        let (cookie, _) = tx.start_request(Request::new(Command::BLOCK_STATUS, 0, 4096)).unwrap();
        let mut status = 1u32.to_be_bytes().to_vec();
        status.extend_from_slice(&4096u32.to_be_bytes());
        status.extend_from_slice(&0u32.to_be_bytes());
        let wire = chunk(cookie, ReplyFlags::DONE, ReplyChunkType::BLOCK_STATUS, &status);
        tx.handle_bytes(&wire[..16]).unwrap();
        tx.handle_bytes(&wire[16..20]).unwrap();
        assert!(matches!(
            tx.handle_bytes(&wire[20..]),
            Ok(ReplyEvent::BlockStatus { .. })
        ));
        assert_eq!(tx.next(), ReceiveNext::Complete);
        tx.cancel_unsent(cookie);
        let (again, _) = tx.start_request(Request::new(Command::BLOCK_STATUS, 0, 4096)).unwrap();
        assert_eq!(again.slot(), cookie.slot());
        assert_eq!(
            tx.complete_pending().unwrap_err(),
            ReplyViolation::UnknownCookie(cookie.0)
        );
        assert!(tx.is_failed());
        assert_eq!(tx.fail_all().collect::<Vec<_>>(), vec![again]);
    }

    /// Found by fuzzing (`structured`): a READ whose last data chunk left
    /// the request short was reported as a violation by `data_received`,
    /// but the connection was not marked failed, unlike every other
    /// violation (and the request stayed in flight forever).
    #[test]
    fn short_read_in_last_data_chunk_fails_the_connection() {
        let mut tx = ClientTransmission::new(&structured(), 4);
        let (cookie, _) = tx.start_request(Request::new(Command::READ, 0, 4096)).unwrap();
        let h = StructuredReplyHeader {
            magic: STRUCTURED_REPLY_MAGIC.into(),
            flags: ReplyFlags::DONE.bits().into(),
            chunk_type: ReplyChunkType::OFFSET_DATA.0.into(),
            cookie: cookie.0.into(),
            length: (8 + 512u32).into(),
        };
        let mut wire = h.as_bytes().to_vec();
        wire.extend_from_slice(&0u64.to_be_bytes());
        let mut pos = 0;
        for _ in 0..3 {
            let ReceiveNext::Bytes(n) = tx.next() else {
                panic!("expected header bytes");
            };
            assert!(matches!(tx.handle_bytes(&wire[pos..pos + n]), Ok(ReplyEvent::Nothing)));
            pos += n;
        }
        assert_eq!(
            tx.next(),
            ReceiveNext::Data {
                cookie,
                buf_offset: 0,
                length: 512
            }
        );
        assert_eq!(
            tx.data_received().unwrap_err(),
            ReplyViolation::ShortRead {
                got: 512,
                expected: 4096
            }
        );
        assert!(tx.is_failed());
        assert_eq!(tx.next(), ReceiveNext::Bytes(0));
        assert_eq!(tx.fail_all().collect::<Vec<_>>(), vec![cookie]);
    }
}
