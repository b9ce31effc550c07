//! The NBD wire format: every magic, flag, type code and fixed-layout
//! message of the protocol.
//!
//! Names follow `doc/proto.md` of the NBD project (and QEMU's `nbd.h` for
//! the few values the spec only names by reference), with the `NBD_` prefix
//! dropped. Fixed-layout messages are `zerocopy` structs with big-endian
//! fields: parse them with `read_from_prefix`/`ref_from_prefix` on the
//! caller's bytes and serialise them with `as_bytes`.

use bitflags::bitflags;
use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A number that both `Debug` and `Display` print in hexadecimal, padded
/// to its width (`0x25609513`, `0x49484156454f5054`), as the spec writes
/// magic numbers: the field type of the magic numbers, flags and cookies
/// that violations carry, so that `{:?}` of an error reads like the spec.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hex<T>(pub T);

impl core::fmt::Debug for Hex<u32> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

impl core::fmt::Debug for Hex<u64> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

impl<T> core::fmt::Display for Hex<T>
where
    Hex<T>: core::fmt::Debug,
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

// ---------------------------------------------------------------------------
// Magics
// ---------------------------------------------------------------------------

/// `NBDMAGIC` (also `INIT_PASSWD`): the first 8 bytes every server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// `cliserv_magic`: the oldstyle magic that follows `NBDMAGIC`.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: compact requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`: extended requests.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC` (formerly `NBD_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// Strings (export names, descriptions, messages) MUST be no longer than this.
pub const MAX_STRING_LEN: usize = 4096;
/// The default maximum payload (2^25, 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Default preferred block size when none is advertised.
pub const DEFAULT_PREFERRED_BLOCK: u32 = 4096;
/// The largest minimum block size the spec permits (2^16).
pub const MAX_MINIMUM_BLOCK: u32 = 1 << 16;
/// Servers SHOULD NOT send more than this many block-status extents in a chunk.
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 1 << 20;
/// Unfragmented reads up to this length MUST be supported when DF is.
pub const DF_MIN_SUPPORTED: u32 = 65536;
/// The IANA port for NBD.
pub const NBD_DEFAULT_PORT: u16 = 10809;
/// Size of the zero padding after `NBD_OPT_EXPORT_NAME` / oldstyle headers.
pub const ZERO_PAD_LEN: usize = 124;

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

bitflags! {
    /// Handshake flags, sent by the server after `IHAVEOPT` (16 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HandshakeFlags: u16 {
        /// `NBD_FLAG_FIXED_NEWSTYLE`
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_NO_ZEROES`
        const NO_ZEROES = 1 << 1;
    }
}

bitflags! {
    /// Client flags, the client's answer to the handshake flags (32 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ClientFlags: u32 {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE`
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_C_NO_ZEROES`
        const NO_ZEROES = 1 << 1;
    }
}

bitflags! {
    /// Transmission flags describing an export (16 bits on the wire).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct TransmissionFlags: u16 {
        /// `NBD_FLAG_HAS_FLAGS`: MUST always be set.
        const HAS_FLAGS = 1 << 0;
        /// `NBD_FLAG_READ_ONLY`
        const READ_ONLY = 1 << 1;
        /// `NBD_FLAG_SEND_FLUSH`
        const SEND_FLUSH = 1 << 2;
        /// `NBD_FLAG_SEND_FUA`
        const SEND_FUA = 1 << 3;
        /// `NBD_FLAG_ROTATIONAL`
        const ROTATIONAL = 1 << 4;
        /// `NBD_FLAG_SEND_TRIM`
        const SEND_TRIM = 1 << 5;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`
        const SEND_WRITE_ZEROES = 1 << 6;
        /// `NBD_FLAG_SEND_DF`
        const SEND_DF = 1 << 7;
        /// `NBD_FLAG_CAN_MULTI_CONN`
        const CAN_MULTI_CONN = 1 << 8;
        /// `NBD_FLAG_SEND_RESIZE` (experimental RESIZE extension)
        const SEND_RESIZE = 1 << 9;
        /// `NBD_FLAG_SEND_CACHE`
        const SEND_CACHE = 1 << 10;
        /// `NBD_FLAG_SEND_FAST_ZERO`
        const SEND_FAST_ZERO = 1 << 11;
        /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD`
        const BLOCK_STATUS_PAYLOAD = 1 << 12;
    }
}

bitflags! {
    /// Command flags of a transmission request (16 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CommandFlags: u16 {
        /// `NBD_CMD_FLAG_FUA`
        const FUA = 1 << 0;
        /// `NBD_CMD_FLAG_NO_HOLE`
        const NO_HOLE = 1 << 1;
        /// `NBD_CMD_FLAG_DF`
        const DF = 1 << 2;
        /// `NBD_CMD_FLAG_REQ_ONE`
        const REQ_ONE = 1 << 3;
        /// `NBD_CMD_FLAG_FAST_ZERO`
        const FAST_ZERO = 1 << 4;
        /// `NBD_CMD_FLAG_PAYLOAD_LEN`
        const PAYLOAD_LEN = 1 << 5;
    }
}

bitflags! {
    /// Structured and extended reply flags (16 bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ReplyFlags: u16 {
        /// `NBD_REPLY_FLAG_DONE`
        const DONE = 1 << 0;
    }
}

bitflags! {
    /// Status flags of the `base:allocation` metadata context.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AllocationFlags: u32 {
        /// `NBD_STATE_HOLE`
        const HOLE = 1 << 0;
        /// `NBD_STATE_ZERO`
        const ZERO = 1 << 1;
    }
}

/// The `base:allocation` metadata context name.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's allocation-depth context.
pub const CONTEXT_QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's dirty-bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const CONTEXT_QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

// ---------------------------------------------------------------------------
// Type codes: newtypes over the wire integer so unknown values survive.
// ---------------------------------------------------------------------------

macro_rules! code_type {
    ($(#[$m:meta])* $name:ident($int:ty) { $($(#[$vm:meta])* $var:ident = $val:expr, $spec:literal;)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $int);
        impl $name {
            $( $(#[$vm])* #[doc = concat!("`", $spec, "`")] pub const $var: $name = $name($val); )*
            /// The spec's name for this value, if it is known.
            pub fn name(self) -> Option<&'static str> {
                match self.0 { $( v if v == $val => Some($spec), )* _ => None }
            }
        }
        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }
        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Debug::fmt(self, f)
            }
        }
        impl From<$int> for $name { fn from(v: $int) -> Self { $name(v) } }
        impl From<$name> for $int { fn from(v: $name) -> Self { v.0 } }
    };
}

code_type! {
    /// Option types of the option haggling (`NBD_OPT_*`).
    OptionType(u32) {
        EXPORT_NAME = 1, "NBD_OPT_EXPORT_NAME";
        ABORT = 2, "NBD_OPT_ABORT";
        LIST = 3, "NBD_OPT_LIST";
        PEEK_EXPORT = 4, "NBD_OPT_PEEK_EXPORT";
        STARTTLS = 5, "NBD_OPT_STARTTLS";
        INFO = 6, "NBD_OPT_INFO";
        GO = 7, "NBD_OPT_GO";
        STRUCTURED_REPLY = 8, "NBD_OPT_STRUCTURED_REPLY";
        LIST_META_CONTEXT = 9, "NBD_OPT_LIST_META_CONTEXT";
        SET_META_CONTEXT = 10, "NBD_OPT_SET_META_CONTEXT";
        EXTENDED_HEADERS = 11, "NBD_OPT_EXTENDED_HEADERS";
    }
}

/// Bit 31 marks an option reply type as an error.
pub const REP_ERR_BIT: u32 = 1 << 31;

code_type! {
    /// Option reply types (`NBD_REP_*`), including the errors (bit 31 set).
    ReplyType(u32) {
        ACK = 1, "NBD_REP_ACK";
        SERVER = 2, "NBD_REP_SERVER";
        INFO = 3, "NBD_REP_INFO";
        META_CONTEXT = 4, "NBD_REP_META_CONTEXT";
        ERR_UNSUP = REP_ERR_BIT + 1, "NBD_REP_ERR_UNSUP";
        ERR_POLICY = REP_ERR_BIT + 2, "NBD_REP_ERR_POLICY";
        ERR_INVALID = REP_ERR_BIT + 3, "NBD_REP_ERR_INVALID";
        ERR_PLATFORM = REP_ERR_BIT + 4, "NBD_REP_ERR_PLATFORM";
        ERR_TLS_REQD = REP_ERR_BIT + 5, "NBD_REP_ERR_TLS_REQD";
        ERR_UNKNOWN = REP_ERR_BIT + 6, "NBD_REP_ERR_UNKNOWN";
        ERR_SHUTDOWN = REP_ERR_BIT + 7, "NBD_REP_ERR_SHUTDOWN";
        ERR_BLOCK_SIZE_REQD = REP_ERR_BIT + 8, "NBD_REP_ERR_BLOCK_SIZE_REQD";
        ERR_TOO_BIG = REP_ERR_BIT + 9, "NBD_REP_ERR_TOO_BIG";
        ERR_EXT_HEADER_REQD = REP_ERR_BIT + 10, "NBD_REP_ERR_EXT_HEADER_REQD";
    }
}

impl ReplyType {
    /// Whether this reply type is an error (bit 31 set).
    pub fn is_error(self) -> bool {
        self.0 & REP_ERR_BIT != 0
    }
}

code_type! {
    /// Information types carried by `NBD_REP_INFO` (`NBD_INFO_*`).
    InfoType(u16) {
        EXPORT = 0, "NBD_INFO_EXPORT";
        NAME = 1, "NBD_INFO_NAME";
        DESCRIPTION = 2, "NBD_INFO_DESCRIPTION";
        BLOCK_SIZE = 3, "NBD_INFO_BLOCK_SIZE";
    }
}

code_type! {
    /// Transmission request types (`NBD_CMD_*`).
    Command(u16) {
        READ = 0, "NBD_CMD_READ";
        WRITE = 1, "NBD_CMD_WRITE";
        DISC = 2, "NBD_CMD_DISC";
        FLUSH = 3, "NBD_CMD_FLUSH";
        TRIM = 4, "NBD_CMD_TRIM";
        CACHE = 5, "NBD_CMD_CACHE";
        WRITE_ZEROES = 6, "NBD_CMD_WRITE_ZEROES";
        BLOCK_STATUS = 7, "NBD_CMD_BLOCK_STATUS";
        RESIZE = 8, "NBD_CMD_RESIZE";
    }
}

/// Bit 15 marks a reply chunk type as an error chunk.
pub const REPLY_TYPE_ERR_BIT: u16 = 1 << 15;

code_type! {
    /// Structured/extended reply chunk types (`NBD_REPLY_TYPE_*`).
    ReplyChunkType(u16) {
        NONE = 0, "NBD_REPLY_TYPE_NONE";
        OFFSET_DATA = 1, "NBD_REPLY_TYPE_OFFSET_DATA";
        OFFSET_HOLE = 2, "NBD_REPLY_TYPE_OFFSET_HOLE";
        BLOCK_STATUS = 5, "NBD_REPLY_TYPE_BLOCK_STATUS";
        BLOCK_STATUS_EXT = 6, "NBD_REPLY_TYPE_BLOCK_STATUS_EXT";
        ERROR = REPLY_TYPE_ERR_BIT + 1, "NBD_REPLY_TYPE_ERROR";
        ERROR_OFFSET = REPLY_TYPE_ERR_BIT + 2, "NBD_REPLY_TYPE_ERROR_OFFSET";
    }
}

impl ReplyChunkType {
    /// Whether this chunk type is in the error category (bit 15 set).
    pub fn is_error(self) -> bool {
        self.0 & REPLY_TYPE_ERR_BIT != 0
    }
}

code_type! {
    /// Error values of transmission replies (`NBD_E*`).
    ErrorCode(u32) {
        EPERM = 1, "NBD_EPERM";
        EIO = 5, "NBD_EIO";
        ENOMEM = 12, "NBD_ENOMEM";
        EINVAL = 22, "NBD_EINVAL";
        ENOSPC = 28, "NBD_ENOSPC";
        EOVERFLOW = 75, "NBD_EOVERFLOW";
        ENOTSUP = 95, "NBD_ENOTSUP";
        ESHUTDOWN = 108, "NBD_ESHUTDOWN";
    }
}

impl ErrorCode {
    /// A human description of the error, as `strerror` would give it.
    pub fn description(self) -> &'static str {
        match self {
            ErrorCode::EPERM => "Operation not permitted",
            ErrorCode::EIO => "Input/output error",
            ErrorCode::ENOMEM => "Cannot allocate memory",
            ErrorCode::EINVAL => "Invalid argument",
            ErrorCode::ENOSPC => "No space left on device",
            ErrorCode::EOVERFLOW => "Value too large for defined data type",
            ErrorCode::ENOTSUP => "Operation not supported",
            ErrorCode::ESHUTDOWN => "Cannot send after transport endpoint shutdown",
            _ => "Unknown error",
        }
    }

    /// Maps a host `errno` value to the NBD error that represents it, as
    /// QEMU's `system_errno_to_nbd_errno` does (EDQUOT and EFBIG become
    /// ENOSPC, EROFS becomes EPERM, anything unknown becomes EINVAL).
    pub fn from_errno(errno: i32) -> ErrorCode {
        // Linux errno values; the NBD values were chosen to match them.
        const EPERM: i32 = 1;
        const EIO: i32 = 5;
        const ENOMEM: i32 = 12;
        const EFBIG: i32 = 27;
        const ENOSPC: i32 = 28;
        const EROFS: i32 = 30;
        const EINVAL: i32 = 22;
        const EOVERFLOW: i32 = 75;
        const EOPNOTSUPP: i32 = 95;
        const ESHUTDOWN: i32 = 108;
        const EDQUOT: i32 = 122;
        const ECANCELED: i32 = 125;
        match errno {
            0 => ErrorCode(0),
            EPERM | EROFS => ErrorCode::EPERM,
            EIO => ErrorCode::EIO,
            ENOMEM => ErrorCode::ENOMEM,
            ENOSPC | EDQUOT | EFBIG => ErrorCode::ENOSPC,
            EOVERFLOW => ErrorCode::EOVERFLOW,
            EOPNOTSUPP => ErrorCode::ENOTSUP,
            ESHUTDOWN | ECANCELED => ErrorCode::ESHUTDOWN,
            EINVAL => ErrorCode::EINVAL,
            _ => ErrorCode::EINVAL,
        }
    }

    /// The host `errno` (Linux numbering) that this NBD error stands for;
    /// unknown values map to EINVAL, as the spec tells clients to treat them.
    pub fn to_errno(self) -> i32 {
        match self {
            ErrorCode::EPERM
            | ErrorCode::EIO
            | ErrorCode::ENOMEM
            | ErrorCode::EINVAL
            | ErrorCode::ENOSPC
            | ErrorCode::EOVERFLOW
            | ErrorCode::ENOTSUP
            | ErrorCode::ESHUTDOWN => self.0 as i32,
            _ => 22,
        }
    }
}

// ---------------------------------------------------------------------------
// Fixed-layout messages
// ---------------------------------------------------------------------------

/// First 16 bytes every server sends: `NBDMAGIC` then `IHAVEOPT` or
/// `cliserv_magic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ServerGreeting {
    /// `NBDMAGIC`
    pub nbdmagic: U64,
    /// `IHAVEOPT` (newstyle) or `CLISERV_MAGIC` (oldstyle)
    pub magic: U64,
}

/// The rest of an oldstyle greeting after [`ServerGreeting`]: size,
/// 32-bit flags and 124 bytes of zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OldstyleTail {
    /// Export size in bytes.
    pub size: U64,
    /// 32 bits of flags; the low 16 are the transmission flags.
    pub flags: U32,
    /// Reserved, zeroes.
    pub zeroes: [u8; ZERO_PAD_LEN],
}

/// An option header sent by the client during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionHeader {
    /// `IHAVEOPT`
    pub magic: U64,
    /// The option type.
    pub option: U32,
    /// Length of the option data that follows.
    pub length: U32,
}

/// An option reply header sent by the server in fixed newstyle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionReplyHeader {
    /// [`OPTION_REPLY_MAGIC`]
    pub magic: U64,
    /// The option this replies to.
    pub option: U32,
    /// The reply type.
    pub reply_type: U32,
    /// Length of the reply data that follows.
    pub length: U32,
}

/// The server's answer to `NBD_OPT_EXPORT_NAME` (without the zero pad).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: U64,
    /// Transmission flags.
    pub flags: U16,
}

/// Payload of `NBD_INFO_EXPORT` after the 16-bit info type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoExport {
    /// `NBD_INFO_EXPORT`
    pub info_type: U16,
    /// Export size in bytes.
    pub size: U64,
    /// Transmission flags.
    pub flags: U16,
}

/// Payload of `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoBlockSize {
    /// `NBD_INFO_BLOCK_SIZE`
    pub info_type: U16,
    /// Minimum block size.
    pub minimum: U32,
    /// Preferred block size.
    pub preferred: U32,
    /// Maximum payload size.
    pub maximum: U32,
}

/// A compact transmission request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    /// [`REQUEST_MAGIC`]
    pub magic: U32,
    /// Command flags.
    pub flags: U16,
    /// Command type.
    pub command: U16,
    /// Cookie (formerly "handle").
    pub cookie: U64,
    /// Offset in the export.
    pub offset: U64,
    /// Length.
    pub length: U32,
}

/// An extended transmission request header (32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExtendedRequestHeader {
    /// [`EXTENDED_REQUEST_MAGIC`]
    pub magic: U32,
    /// Command flags.
    pub flags: U16,
    /// Command type.
    pub command: U16,
    /// Cookie.
    pub cookie: U64,
    /// Offset in the export.
    pub offset: U64,
    /// Payload length (with `PAYLOAD_LEN`) or effect length.
    pub length: U64,
}

/// A simple reply header (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SimpleReplyHeader {
    /// [`SIMPLE_REPLY_MAGIC`]
    pub magic: U32,
    /// Error value (zero for success).
    pub error: U32,
    /// Cookie of the request.
    pub cookie: U64,
}

/// A structured reply chunk header (20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct StructuredReplyHeader {
    /// [`STRUCTURED_REPLY_MAGIC`]
    pub magic: U32,
    /// Reply flags.
    pub flags: U16,
    /// Chunk type.
    pub chunk_type: U16,
    /// Cookie of the request.
    pub cookie: U64,
    /// Payload length.
    pub length: U32,
}

/// An extended reply chunk header (32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExtendedReplyHeader {
    /// [`EXTENDED_REPLY_MAGIC`]
    pub magic: U32,
    /// Reply flags.
    pub flags: U16,
    /// Chunk type.
    pub chunk_type: U16,
    /// Cookie of the request.
    pub cookie: U64,
    /// Offset of the request.
    pub offset: U64,
    /// Payload length.
    pub length: U64,
}

/// The fixed part of an `NBD_REPLY_TYPE_OFFSET_HOLE` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OffsetHolePayload {
    /// Offset of the hole.
    pub offset: U64,
    /// Size of the hole (nonzero).
    pub length: U32,
}

/// The fixed start of every error chunk's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorPayloadHeader {
    /// Error value (nonzero).
    pub error: U32,
    /// Length of the message that follows.
    pub message_length: U16,
}

/// A 32-bit block-status descriptor (`NBD_REPLY_TYPE_BLOCK_STATUS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlockDescriptor {
    /// Extent length (nonzero).
    pub length: U32,
    /// Status flags.
    pub status: U32,
}

/// A 64-bit block-status descriptor (`NBD_REPLY_TYPE_BLOCK_STATUS_EXT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlockDescriptorExt {
    /// Extent length (nonzero).
    pub length: U64,
    /// Status flags.
    pub status: U64,
}

/// Header of an `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlockStatusExtHeader {
    /// Metadata context id.
    pub context_id: U32,
    /// Number of descriptors (nonzero).
    pub count: U32,
}

/// Size of [`RequestHeader`].
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of [`ExtendedRequestHeader`].
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;
/// Size of [`SimpleReplyHeader`].
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Size of [`StructuredReplyHeader`].
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Size of [`ExtendedReplyHeader`].
pub const EXTENDED_REPLY_HEADER_LEN: usize = 32;
/// Size of [`OptionHeader`].
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of [`OptionReplyHeader`].
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

const _: () = {
    assert!(core::mem::size_of::<RequestHeader>() == REQUEST_HEADER_LEN);
    assert!(core::mem::size_of::<ExtendedRequestHeader>() == EXTENDED_REQUEST_HEADER_LEN);
    assert!(core::mem::size_of::<SimpleReplyHeader>() == SIMPLE_REPLY_HEADER_LEN);
    assert!(core::mem::size_of::<StructuredReplyHeader>() == STRUCTURED_REPLY_HEADER_LEN);
    assert!(core::mem::size_of::<ExtendedReplyHeader>() == EXTENDED_REPLY_HEADER_LEN);
    assert!(core::mem::size_of::<OptionHeader>() == OPTION_HEADER_LEN);
    assert!(core::mem::size_of::<OptionReplyHeader>() == OPTION_REPLY_HEADER_LEN);
    assert!(core::mem::size_of::<InfoExport>() == 12);
    assert!(core::mem::size_of::<InfoBlockSize>() == 14);
    assert!(core::mem::size_of::<OldstyleTail>() == 8 + 4 + 124);
};

/// The block-size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSizeConstraints {
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub maximum: u32,
}

impl Default for BlockSizeConstraints {
    fn default() -> Self {
        BlockSizeConstraints {
            minimum: 1,
            preferred: DEFAULT_PREFERRED_BLOCK,
            maximum: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl BlockSizeConstraints {
    /// Checks the spec's rules on advertised constraints: minimum a power
    /// of two no larger than 2^16, preferred a power of two at least
    /// max(minimum, 512), maximum at least the preferred size.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !self.minimum.is_power_of_two() || self.minimum > MAX_MINIMUM_BLOCK {
            return Err("minimum block size must be a power of 2 no larger than 65536");
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.minimum.max(512) {
            return Err("preferred block size must be a power of 2 at least max(minimum, 512)");
        }
        if self.maximum < self.preferred {
            return Err("maximum payload size must be at least the preferred block size");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    #[test]
    fn names() {
        assert_eq!(OptionType::GO.name(), Some("NBD_OPT_GO"));
        assert_eq!(format!("{:?}", OptionType(99)), "OptionType(0x63)");
        assert!(ReplyType::ERR_EXT_HEADER_REQD.is_error());
        assert_eq!(ReplyType::ERR_EXT_HEADER_REQD.0, 0x8000_000a);
        assert!(ReplyChunkType::ERROR_OFFSET.is_error());
        assert_eq!(ErrorCode::from_errno(122), ErrorCode::ENOSPC);
        assert_eq!(ErrorCode::from_errno(30), ErrorCode::EPERM);
        assert_eq!(ErrorCode::from_errno(9999), ErrorCode::EINVAL);
        assert_eq!(ErrorCode(9999).to_errno(), 22);
    }

    #[test]
    fn request_roundtrip() {
        let h = RequestHeader {
            magic: REQUEST_MAGIC.into(),
            flags: CommandFlags::FUA.bits().into(),
            command: Command::WRITE.0.into(),
            cookie: 7.into(),
            offset: 4096.into(),
            length: 512.into(),
        };
        let bytes = h.as_bytes();
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        let (back, rest) = RequestHeader::read_from_prefix(bytes).unwrap();
        assert!(rest.is_empty());
        assert_eq!(back, h);
    }
}
