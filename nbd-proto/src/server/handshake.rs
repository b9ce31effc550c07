//! The server side of the handshake: the greeting (oldstyle or fixed
//! newstyle), the client flags, and option haggling up to transmission.
//!
//! The machine never reads more than it needs: every
//! [`ServerStep::Receive`] is an exact byte count, so after the
//! acknowledgement of `NBD_OPT_STARTTLS` has been sent
//! ([`ServerStep::StartTls`]) nothing of the client's TLS handshake has
//! been consumed.
//!
//! Which exports exist, and what they look like, is answered by the
//! driver: when an option names an export the machine stops in
//! [`ServerStep::LookupExport`] and the driver calls
//! [`ServerHandshake::answer_export`] with the export's
//! [`ExportDetails`] (or `None`). `NBD_OPT_LIST` stops in
//! [`ServerStep::ListExports`], answered by
//! [`ServerHandshake::answer_list`].
//!
//! # Bounds
//!
//! Everything read into memory is bounded before it is read:
//!
//! - option data is only read into memory for the options that carry
//!   something to parse (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_INFO`,
//!   `NBD_OPT_GO`, `NBD_OPT_LIST_META_CONTEXT`, `NBD_OPT_SET_META_CONTEXT`),
//!   and only up to [`MAX_OPTION_DATA`] (64 KiB) bytes. Longer ones are
//!   skipped with [`ServerStep::Discard`] (the driver reads and drops the
//!   bytes) and refused with `NBD_REP_ERR_TOO_BIG`; an `NBD_OPT_EXPORT_NAME`
//!   longer than a string may be (4096 bytes) cannot be refused, so the
//!   connection is closed without reading it.
//! - the data of every other option (unknown options, data where the spec
//!   says there is none) is discarded, never stored.
//! - a meta-context option may carry at most [`MAX_META_CONTEXT_QUERIES`]
//!   queries (more: `NBD_REP_ERR_TOO_BIG`).
//! - at most [`ServerConfig::max_options`] options per connection; the
//!   next one closes the connection (a client looping on options is a
//!   denial of service, which the spec allows a hard disconnect for).

use alloc::borrow::ToOwned;
use alloc::string::String;
use alloc::vec::Vec;

use zerocopy::{FromBytes, IntoBytes};

use crate::common::{MetaContext, Mode};
use crate::wire::*;

/// Option data longer than this is never read into memory: it is
/// discarded and the option refused with `NBD_REP_ERR_TOO_BIG`.
///
/// 64 KiB holds any `NBD_OPT_INFO`/`NBD_OPT_GO` with a 4096-byte name and
/// thousands of information requests, and a meta-context option with a
/// 4096-byte export name and well over a hundred realistic queries (the
/// theoretical largest, 128 queries of 4096 bytes each, is about 517 KiB;
/// a server may refuse such a request as too big).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Most queries accepted in one `NBD_OPT_LIST_META_CONTEXT` or
/// `NBD_OPT_SET_META_CONTEXT`; more are refused with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_META_CONTEXT_QUERIES: u32 = 128;

/// The default of [`ServerConfig::handshake_timeout`]: 10 seconds, QEMU's.
pub const DEFAULT_HANDSHAKE_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(10);

/// The default of [`ServerConfig::unnegotiated_max_payload`]: 64 MiB.
pub const DEFAULT_UNNEGOTIATED_MAX_PAYLOAD: u64 = 64 << 20;

/// The default for [`ServerConfig::max_options`].
pub const DEFAULT_MAX_OPTIONS: u32 = 1024;

/// The spec's three TLS modes of a server ("TLS support", "Server-side
/// requirements").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// NOTLS: the server operates entirely without TLS. `NBD_OPT_STARTTLS`
    /// is refused with `NBD_REP_ERR_POLICY` (the option is understood,
    /// policy forbids it).
    #[default]
    NoTls,
    /// FORCEDTLS: every option other than `NBD_OPT_STARTTLS` and
    /// `NBD_OPT_ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until TLS is
    /// running (`NBD_OPT_EXPORT_NAME` closes the connection).
    ForcedTls,
    /// SELECTIVETLS: TLS is available; exports with
    /// [`ExportDetails::tls_only`] can only be used over TLS.
    SelectiveTls,
}

/// How the server negotiates.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Use oldstyle negotiation (opt-in): the greeting carries the default
    /// export (looked up as `""` in the very first step) and there are no
    /// options, no TLS and no export names. Default: no (fixed newstyle).
    pub oldstyle: bool,
    /// TLS policy. Default: [`TlsPolicy::NoTls`].
    pub tls: TlsPolicy,
    /// Answer `NBD_OPT_LIST`; when false it is refused with
    /// `NBD_REP_ERR_POLICY`. Default: yes.
    pub allow_list: bool,
    /// Options accepted per connection before the server closes it.
    /// Default: [`DEFAULT_MAX_OPTIONS`] (1024).
    pub max_options: u32,
    /// Advertise `NBD_FLAG_NO_ZEROES`. Default: yes.
    pub no_zeroes: bool,
    /// Support `NBD_OPT_INFO` and `NBD_OPT_GO`. When false both are refused
    /// with `NBD_REP_ERR_UNSUP` (as an old server would), clients fall
    /// back to `NBD_OPT_EXPORT_NAME`, and `NBD_OPT_EXTENDED_HEADERS` is
    /// refused too (the spec ties it to `NBD_OPT_GO`). Default: yes.
    pub support_go: bool,
    /// Support `NBD_OPT_STRUCTURED_REPLY` (and the meta-context options,
    /// which need it or extended headers). Default: yes.
    pub structured_replies: bool,
    /// Support `NBD_OPT_EXTENDED_HEADERS`. Default: yes.
    pub extended_headers: bool,
    /// How long a client may take from connecting to transmission, TLS
    /// included (`None`: no limit). A [`ServerSession`](super::ServerSession)
    /// counts it from the first time its driver tells it the time
    /// ([`ServerSession::handle_timeout`](super::ServerSession::handle_timeout))
    /// and fails with [`TimedOut`](crate::time::TimedOut) when it runs out.
    /// Default: 10 seconds, as QEMU's `qemu-nbd` (`--handshake-limit`).
    pub handshake_timeout: Option<core::time::Duration>,
    /// The largest READ or WRITE payload accepted from a client that was
    /// sent no block sizes (see
    /// [`ServerTransmission::set_unnegotiated_max_payload`](super::ServerTransmission::set_unnegotiated_max_payload)).
    /// The spec asks a server to accept at least 2^25 bytes from such
    /// clients and calls a larger limit "effectively unlimited" when it can
    /// afford it. Default: [`DEFAULT_UNNEGOTIATED_MAX_PAYLOAD`] (64 MiB).
    pub unnegotiated_max_payload: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            oldstyle: false,
            tls: TlsPolicy::NoTls,
            allow_list: true,
            max_options: DEFAULT_MAX_OPTIONS,
            no_zeroes: true,
            support_go: true,
            structured_replies: true,
            extended_headers: true,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            unnegotiated_max_payload: DEFAULT_UNNEGOTIATED_MAX_PAYLOAD,
        }
    }
}

/// Chainable setters, one per field (the struct is `#[non_exhaustive]`:
/// other crates build it from [`ServerConfig::default`]).
impl ServerConfig {
    /// Sets whether to use oldstyle negotiation.
    pub fn oldstyle(mut self, v: bool) -> Self {
        self.oldstyle = v;
        self
    }

    /// Sets the TLS policy.
    pub fn tls(mut self, v: TlsPolicy) -> Self {
        self.tls = v;
        self
    }

    /// Sets whether to answer `NBD_OPT_LIST`.
    pub fn allow_list(mut self, v: bool) -> Self {
        self.allow_list = v;
        self
    }

    /// Sets the options accepted per connection before closing it.
    pub fn max_options(mut self, v: u32) -> Self {
        self.max_options = v;
        self
    }

    /// Sets whether to advertise `NBD_FLAG_NO_ZEROES`.
    pub fn no_zeroes(mut self, v: bool) -> Self {
        self.no_zeroes = v;
        self
    }

    /// Sets whether to support `NBD_OPT_INFO` and `NBD_OPT_GO`.
    pub fn support_go(mut self, v: bool) -> Self {
        self.support_go = v;
        self
    }

    /// Sets whether to support `NBD_OPT_STRUCTURED_REPLY`.
    pub fn structured_replies(mut self, v: bool) -> Self {
        self.structured_replies = v;
        self
    }

    /// Sets whether to support `NBD_OPT_EXTENDED_HEADERS`.
    pub fn extended_headers(mut self, v: bool) -> Self {
        self.extended_headers = v;
        self
    }

    /// Sets how long a client may take to reach transmission (`None`: no limit).
    pub fn handshake_timeout(mut self, v: Option<core::time::Duration>) -> Self {
        self.handshake_timeout = v;
        self
    }

    /// Sets the largest payload accepted from a client sent no block sizes.
    pub fn unnegotiated_max_payload(mut self, v: u64) -> Self {
        self.unnegotiated_max_payload = v;
        self
    }
}

/// What the driver knows about one export, given in answer to
/// [`ServerStep::LookupExport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDetails {
    /// The canonical name (sent as `NBD_INFO_NAME`).
    pub name: String,
    /// A description for humans (empty: none).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// What the storage supports: `READ_ONLY`, `SEND_FLUSH`, `SEND_FUA`,
    /// `ROTATIONAL`, `SEND_TRIM`, `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO`,
    /// `CAN_MULTI_CONN`, `SEND_CACHE`, `BLOCK_STATUS_PAYLOAD`. The machine
    /// adjusts what it sends: `HAS_FLAGS` always; `SEND_DF` exactly when
    /// structured replies or extended headers are negotiated (the reply
    /// encoders honour DF); `SEND_FAST_ZERO` only with `SEND_WRITE_ZEROES`;
    /// `BLOCK_STATUS_PAYLOAD` only with extended headers and at least one
    /// (and at most 64) selected contexts; `SEND_RESIZE` and unknown bits
    /// never (the machine does not implement them).
    pub flags: TransmissionFlags,
    /// Block-size constraints enforced on this export (`None`: the
    /// defaults, minimum 1 and maximum payload 32 MiB).
    pub block_size: Option<BlockSizeConstraints>,
    /// Refuse `NBD_OPT_GO` without an `NBD_INFO_BLOCK_SIZE` request
    /// (`NBD_REP_ERR_BLOCK_SIZE_REQD`), and `NBD_OPT_EXPORT_NAME` and
    /// oldstyle (which cannot carry constraints) by closing.
    pub block_size_required: bool,
    /// The metadata contexts this export supports, by name
    /// (`base:allocation`, `qemu:dirty-bitmap:NAME`, ...). Each must be a
    /// valid string of the form `namespace:leaf`. They are taken to report
    /// 32-bit status (as every `base:` and `qemu:` context does), so they
    /// are offered with and without extended headers. Ids are assigned by
    /// `NBD_OPT_SET_META_CONTEXT` in the order of this list, from 1.
    pub meta_contexts: Vec<String>,
    /// With [`TlsPolicy::SelectiveTls`]: the export needs TLS.
    pub tls_only: bool,
}

impl ExportDetails {
    /// An export with the given canonical name and size, flags
    /// `HAS_FLAGS | SEND_FLUSH | SEND_FUA`, default block sizes and the
    /// `base:allocation` context.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        ExportDetails {
            name: name.into(),
            description: String::new(),
            size,
            flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA,
            block_size: None,
            block_size_required: false,
            meta_contexts: alloc::vec![CONTEXT_BASE_ALLOCATION.to_owned()],
            tls_only: false,
        }
    }
}

/// One export as `NBD_OPT_LIST` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportListing<'a> {
    /// The export's name.
    pub name: &'a str,
    /// Its description (empty: none).
    pub description: &'a str,
    /// TLS-only: with [`TlsPolicy::SelectiveTls`] it is left out of the
    /// list until TLS is running.
    pub tls_only: bool,
}

/// The result of a successful handshake: everything transmission needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerNegotiated {
    /// Which flavour of the protocol was reached. `ExportNameOnly` means
    /// `NBD_OPT_EXPORT_NAME` without structured replies; a client that
    /// negotiated `NBD_OPT_STRUCTURED_REPLY` and then used
    /// `NBD_OPT_EXPORT_NAME` gets `Structured`, as the spec requires
    /// structured replies whenever they were negotiated.
    pub mode: Mode,
    /// The export's canonical name ([`ExportDetails::name`]).
    pub export_name: String,
    /// The name the client asked for.
    pub requested_name: String,
    /// Export size in bytes.
    pub size: u64,
    /// The transmission flags as sent.
    pub flags: TransmissionFlags,
    /// The block-size constraints sent with `NBD_INFO_BLOCK_SIZE`, if they
    /// were sent (transmission enforces these, or the defaults).
    pub block_size: Option<BlockSizeConstraints>,
    /// The metadata contexts selected for this export, with their ids.
    pub contexts: Vec<MetaContext>,
    /// Whether the connection runs over TLS.
    pub tls: bool,
    /// Whether the client asked for `NBD_INFO_BLOCK_SIZE` with
    /// `NBD_OPT_GO`, and so promised to honour the constraints.
    pub client_requested_block_size: bool,
}

impl ServerNegotiated {
    /// The constraints in force: those sent, or the spec's defaults.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.block_size.unwrap_or_default()
    }
}

/// A rule of the handshake broken by the client; the server closes the
/// connection (a hard disconnect, as the spec allows).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientViolation {
    /// Client flags with bits the spec does not define.
    #[error("client flags {0} contain unknown bits")]
    UnknownClientFlags(Hex<u32>),
    /// `NBD_FLAG_C_NO_ZEROES` although the server did not advertise it.
    #[error("client set NBD_FLAG_C_NO_ZEROES which the server did not advertise")]
    NoZeroesNotAdvertised,
    /// An option that did not start with `IHAVEOPT`.
    #[error("bad option magic {0}, expected IHAVEOPT")]
    BadOptionMagic(Hex<u64>),
    /// `NBD_OPT_EXPORT_NAME` after extended headers were negotiated.
    #[error("NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS")]
    ExportNameWithExtendedHeaders,
    /// An `NBD_OPT_EXPORT_NAME` whose name is not a valid string.
    #[error("NBD_OPT_EXPORT_NAME with an invalid name: {0}")]
    BadExportName(&'static str),
}

/// Why the server handshake ended without reaching transmission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerHandshakeError {
    /// The client broke a rule of the protocol.
    #[error("protocol violation by client: {0}")]
    Violation(#[from] ClientViolation),
    /// `NBD_OPT_EXPORT_NAME` (or oldstyle) for an export that does not
    /// exist: the spec says the server MUST terminate the session.
    #[error("unknown export {0:?} requested with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` (or oldstyle) for an export that needs TLS
    /// when TLS is not running.
    #[error("export {0:?} requires TLS")]
    TlsRequired(String),
    /// `NBD_OPT_EXPORT_NAME` (or oldstyle) for an export that requires
    /// the client to acknowledge its block sizes.
    #[error("export {0:?} requires block size negotiation with NBD_OPT_GO")]
    BlockSizeRequired(String),
    /// The client sent more options than [`ServerConfig::max_options`].
    #[error("client sent more than {0} options")]
    TooManyOptions(u32),
    /// `NBD_OPT_EXPORT_NAME` while the server is shutting down.
    #[error("NBD_OPT_EXPORT_NAME refused: the server is shutting down")]
    ShuttingDown,
    /// The driver used the API out of order or gave invalid answers.
    #[error("server handshake API misuse: {0}")]
    Misuse(&'static str),
}

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerStep<'a> {
    /// Write all of these bytes, then call [`ServerHandshake::sent`].
    Send(&'a [u8]),
    /// Read exactly this many bytes and pass them to
    /// [`ServerHandshake::received`].
    Receive(usize),
    /// Read exactly this many bytes and drop them (they are option data
    /// the server does not use: never buffer them), then call
    /// [`ServerHandshake::discarded`]. The count can be up to 4 GiB; a
    /// driver that deems that abusive may close the connection instead
    /// (the spec allows a hard disconnect against denial of service).
    Discard(usize),
    /// Perform the server side of the TLS handshake now, then call
    /// [`ServerHandshake::tls_established`]. Nothing has been over-read.
    /// If TLS fails, close the connection.
    StartTls,
    /// Look this export up and call [`ServerHandshake::answer_export`].
    LookupExport {
        /// The name the client gave (`""` is the default export).
        name: &'a str,
    },
    /// Call [`ServerHandshake::answer_list`] with the exports.
    ListExports,
    /// The handshake is complete: call [`ServerHandshake::finish`] and
    /// start transmission.
    Done,
    /// The client ended the session with `NBD_OPT_ABORT` (acknowledged):
    /// close the connection.
    Aborted,
    /// The handshake failed (the error was returned): close the connection.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Read the client flags.
    ClientFlags,
    /// Read the next option header.
    NextOption,
    /// Upgrade to TLS.
    StartTls,
    /// Transmission.
    Done,
    /// `NBD_OPT_ABORT` acknowledged.
    Aborted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// 32 bits of client flags.
    ClientFlags,
    /// An option header.
    OptionHeader,
    /// The data of the current option.
    OptionData,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterDiscard {
    /// Refuse the option with this error.
    Reply(ReplyType, &'static str),
    /// Acknowledge `NBD_OPT_ABORT`.
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sending(After),
    Receiving(Recv),
    Discarding(AfterDiscard),
    Tls,
    Lookup,
    List,
    Done,
    Aborted,
    Closed,
}

/// Which `NBD_INFO_*` the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct InfoRequests {
    name: bool,
    description: bool,
    block_size: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Oldstyle,
    ExportName,
    Info { go: bool, infos: InfoRequests },
    ListMetaContext { queries: Vec<String> },
    SetMetaContext { queries: Vec<String> },
}

/// The server handshake state machine.
#[derive(Debug)]
pub struct ServerHandshake {
    config: ServerConfig,
    phase: Phase,
    need: usize,
    out: Vec<u8>,
    /// The option being handled.
    option: OptionType,
    /// The export name the pending lookup is for.
    name: String,
    pending: Option<Pending>,
    client_flags: ClientFlags,
    tls: bool,
    structured: bool,
    extended: bool,
    /// The last `NBD_OPT_SET_META_CONTEXT`: the export name it named and
    /// the contexts it selected.
    selection: Option<(String, Vec<MetaContext>)>,
    options_received: u32,
    shutting_down: bool,
    result: Option<ServerNegotiated>,
}

impl ServerHandshake {
    /// A new handshake. Newstyle: the first step sends the greeting.
    /// Oldstyle: the first step looks up the default export (`""`).
    pub fn new(config: ServerConfig) -> Self {
        let mut hs = ServerHandshake {
            phase: Phase::Closed,
            need: 0,
            out: Vec::with_capacity(64),
            option: OptionType(0),
            name: String::new(),
            pending: None,
            client_flags: ClientFlags::empty(),
            tls: false,
            structured: false,
            extended: false,
            selection: None,
            options_received: 0,
            shutting_down: false,
            result: None,
            config,
        };
        if hs.config.oldstyle {
            hs.pending = Some(Pending::Oldstyle);
            hs.phase = Phase::Lookup;
        } else {
            let greeting = ServerGreeting {
                nbdmagic: NBDMAGIC.into(),
                magic: IHAVEOPT.into(),
            };
            let mut flags = HandshakeFlags::FIXED_NEWSTYLE;
            if hs.config.no_zeroes {
                flags |= HandshakeFlags::NO_ZEROES;
            }
            hs.out.extend_from_slice(greeting.as_bytes());
            hs.out.extend_from_slice(&flags.bits().to_be_bytes());
            hs.phase = Phase::Sending(After::ClientFlags);
        }
        hs
    }

    /// What the driver must do next.
    pub fn step(&self) -> ServerStep<'_> {
        match self.phase {
            Phase::Sending(_) => ServerStep::Send(&self.out),
            Phase::Receiving(_) => ServerStep::Receive(self.need),
            Phase::Discarding(_) => ServerStep::Discard(self.need),
            Phase::Tls => ServerStep::StartTls,
            Phase::Lookup => ServerStep::LookupExport { name: &self.name },
            Phase::List => ServerStep::ListExports,
            Phase::Done => ServerStep::Done,
            Phase::Aborted => ServerStep::Aborted,
            Phase::Closed => ServerStep::Closed,
        }
    }

    /// The driver wrote everything [`ServerStep::Send`] gave it.
    pub fn sent(&mut self) {
        let Phase::Sending(after) = self.phase else {
            return;
        };
        self.out.clear();
        match after {
            After::ClientFlags => self.expect(Recv::ClientFlags, 4),
            After::NextOption => self.expect(Recv::OptionHeader, OPTION_HEADER_LEN),
            After::StartTls => self.phase = Phase::Tls,
            After::Done => self.phase = Phase::Done,
            After::Aborted => self.phase = Phase::Aborted,
        }
    }

    /// The driver read the bytes that [`ServerStep::Receive`] asked for.
    /// An error means the connection must be closed (the machine is then
    /// in [`ServerStep::Closed`]), except for [`ServerHandshakeError::Misuse`],
    /// which changes nothing.
    pub fn received(&mut self, data: &[u8]) -> Result<(), ServerHandshakeError> {
        let Phase::Receiving(recv) = self.phase else {
            return Err(ServerHandshakeError::Misuse("received() called while not receiving"));
        };
        if data.len() != self.need {
            return Err(ServerHandshakeError::Misuse(
                "received() given a different number of bytes than asked",
            ));
        }
        let r = match recv {
            Recv::ClientFlags => self.on_client_flags(data),
            Recv::OptionHeader => self.on_option_header(data),
            Recv::OptionData => self.on_option_data(data),
        };
        self.check(r)
    }

    /// The driver read and dropped the bytes [`ServerStep::Discard`] asked for.
    pub fn discarded(&mut self) -> Result<(), ServerHandshakeError> {
        let Phase::Discarding(after) = self.phase else {
            return Err(ServerHandshakeError::Misuse("discarded() called while not discarding"));
        };
        self.after_discard(after);
        Ok(())
    }

    /// The driver finished the server side of the TLS handshake asked by
    /// [`ServerStep::StartTls`]. Everything negotiated before is forgotten,
    /// as the spec requires.
    pub fn tls_established(&mut self) -> Result<(), ServerHandshakeError> {
        if self.phase != Phase::Tls {
            return Err(ServerHandshakeError::Misuse("tls_established() without StartTls"));
        }
        self.tls = true;
        self.structured = false;
        self.extended = false;
        self.selection = None;
        self.expect(Recv::OptionHeader, OPTION_HEADER_LEN);
        Ok(())
    }

    /// Answers [`ServerStep::LookupExport`]: the export's details, or
    /// `None` if there is no such export. An error other than
    /// [`ServerHandshakeError::Misuse`] means the connection must be closed
    /// (`NBD_OPT_EXPORT_NAME` and oldstyle cannot report errors).
    /// `Misuse` (invalid details: strings over 4096 bytes or with NUL,
    /// a context name without a namespace, block sizes breaking the spec's
    /// rules) changes nothing.
    pub fn answer_export(&mut self, details: Option<ExportDetails>) -> Result<(), ServerHandshakeError> {
        if self.phase != Phase::Lookup {
            return Err(ServerHandshakeError::Misuse("answer_export() without LookupExport"));
        }
        if let Some(d) = &details {
            validate_details(d)?;
        }
        let Some(pending) = self.pending.take() else {
            return Err(ServerHandshakeError::Misuse("no pending lookup"));
        };
        let r = self.on_lookup(pending, details);
        self.check(r)
    }

    /// Answers [`ServerStep::ListExports`]. With
    /// [`TlsPolicy::SelectiveTls`] and no TLS yet, TLS-only exports are
    /// left out. `Misuse` (a name or description over 4096 bytes or with
    /// NUL) changes nothing.
    pub fn answer_list(&mut self, exports: &[ExportListing<'_>]) -> Result<(), ServerHandshakeError> {
        if self.phase != Phase::List {
            return Err(ServerHandshakeError::Misuse("answer_list() without ListExports"));
        }
        let hide_tls_only = self.config.tls == TlsPolicy::SelectiveTls && !self.tls;
        let shown = || exports.iter().filter(move |e| !(hide_tls_only && e.tls_only));
        for e in shown() {
            if !valid_string(e.name.as_bytes()) || !valid_string(e.description.as_bytes()) {
                return Err(ServerHandshakeError::Misuse(
                    "export name or description is not a valid NBD string",
                ));
            }
        }
        self.out.clear();
        for e in shown() {
            let len = 4 + e.name.len() + e.description.len();
            self.push_reply_header(ReplyType::SERVER, len);
            self.out.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
            self.out.extend_from_slice(e.name.as_bytes());
            self.out.extend_from_slice(e.description.as_bytes());
        }
        self.push_reply_header(ReplyType::ACK, 0);
        self.phase = Phase::Sending(After::NextOption);
        Ok(())
    }

    /// The negotiated result, once [`ServerStep::Done`].
    pub fn finish(self) -> Result<ServerNegotiated, ServerHandshakeError> {
        match (self.phase, self.result) {
            (Phase::Done, Some(r)) => Ok(r),
            _ => Err(ServerHandshakeError::Misuse("finish() before Done")),
        }
    }

    /// From now on refuse every option but `NBD_OPT_ABORT` with
    /// `NBD_REP_ERR_SHUTDOWN` (and close on `NBD_OPT_EXPORT_NAME`), as the
    /// spec asks of a server that is shutting down.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// The option being handled (meaningful during a lookup or a list).
    pub fn current_option(&self) -> OptionType {
        self.option
    }

    /// The client flags received.
    pub fn client_flags(&self) -> ClientFlags {
        self.client_flags
    }

    /// Whether TLS is running.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Whether structured replies are negotiated so far.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Whether extended headers are negotiated so far.
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Number of options received so far.
    pub fn options_received(&self) -> u32 {
        self.options_received
    }

    // ----- internals -------------------------------------------------------

    fn check(&mut self, r: Result<(), ServerHandshakeError>) -> Result<(), ServerHandshakeError> {
        if let Err(e) = &r
            && !matches!(e, ServerHandshakeError::Misuse(_))
        {
            self.phase = Phase::Closed;
            self.out.clear();
        }
        r
    }

    fn expect(&mut self, recv: Recv, need: usize) {
        self.phase = Phase::Receiving(recv);
        self.need = need;
    }

    /// Whether the client may use TLS at all: the spec keeps a server in
    /// NOTLS mode unless both sides agreed on fixed newstyle.
    fn tls_possible(&self) -> bool {
        self.config.tls != TlsPolicy::NoTls && self.client_flags.contains(ClientFlags::FIXED_NEWSTYLE)
    }

    /// The error for "TLS is needed first": `NBD_REP_ERR_TLS_REQD`, or
    /// `NBD_REP_ERR_POLICY` where TLS is impossible (a server in NOTLS
    /// mode MUST NOT send `NBD_REP_ERR_TLS_REQD`).
    fn tls_reqd(&self) -> ReplyType {
        if self.tls_possible() {
            ReplyType::ERR_TLS_REQD
        } else {
            ReplyType::ERR_POLICY
        }
    }

    fn push_reply_header(&mut self, reply: ReplyType, len: usize) {
        let h = OptionReplyHeader {
            magic: OPTION_REPLY_MAGIC.into(),
            option: self.option.0.into(),
            reply_type: reply.0.into(),
            length: (len as u32).into(),
        };
        self.out.extend_from_slice(h.as_bytes());
    }

    fn push_reply(&mut self, reply: ReplyType, data: &[u8]) {
        self.push_reply_header(reply, data.len());
        self.out.extend_from_slice(data);
    }

    /// Ends the current option with a single reply.
    fn reply(&mut self, reply: ReplyType, message: &str) {
        self.out.clear();
        self.push_reply(reply, message.as_bytes());
        self.phase = Phase::Sending(After::NextOption);
    }

    /// Skips `len` bytes of option data, then does `then`.
    fn discard_then(&mut self, len: u32, then: AfterDiscard) {
        if len == 0 {
            self.after_discard(then);
        } else {
            self.phase = Phase::Discarding(then);
            self.need = len as usize;
        }
    }

    fn after_discard(&mut self, then: AfterDiscard) {
        match then {
            AfterDiscard::Reply(reply, message) => self.reply(reply, message),
            AfterDiscard::Abort => {
                self.out.clear();
                self.push_reply(ReplyType::ACK, &[]);
                self.phase = Phase::Sending(After::Aborted);
            }
        }
    }

    fn refuse(&mut self, len: u32, reply: ReplyType, message: &'static str) {
        self.discard_then(len, AfterDiscard::Reply(reply, message));
    }

    /// Reads `len` bytes of option data (bounded by the caller).
    fn receive_data(&mut self, len: u32) -> Result<(), ServerHandshakeError> {
        if len == 0 {
            self.on_option_data(&[])
        } else {
            self.expect(Recv::OptionData, len as usize);
            Ok(())
        }
    }

    fn on_client_flags(&mut self, data: &[u8]) -> Result<(), ServerHandshakeError> {
        let bits = read_u32(data, 0).ok_or(ServerHandshakeError::Misuse("short client flags"))?;
        let flags = ClientFlags::from_bits_retain(bits);
        if !ClientFlags::all().contains(flags) {
            return Err(ClientViolation::UnknownClientFlags(Hex(bits)).into());
        }
        if flags.contains(ClientFlags::NO_ZEROES) && !self.config.no_zeroes {
            return Err(ClientViolation::NoZeroesNotAdvertised.into());
        }
        self.client_flags = flags;
        self.expect(Recv::OptionHeader, OPTION_HEADER_LEN);
        Ok(())
    }

    fn on_option_header(&mut self, data: &[u8]) -> Result<(), ServerHandshakeError> {
        let (h, _) = OptionHeader::read_from_prefix(data).map_err(|_| ServerHandshakeError::Misuse("short header"))?;
        if h.magic.get() != IHAVEOPT {
            return Err(ClientViolation::BadOptionMagic(Hex(h.magic.get())).into());
        }
        self.options_received = self.options_received.saturating_add(1);
        if self.options_received > self.config.max_options {
            return Err(ServerHandshakeError::TooManyOptions(self.config.max_options));
        }
        let option = OptionType(h.option.get());
        let len = h.length.get();
        self.option = option;

        // NBD_OPT_ABORT is always acknowledged; data is ignored.
        if option == OptionType::ABORT {
            self.discard_then(len, AfterDiscard::Abort);
            return Ok(());
        }
        // NBD_OPT_EXPORT_NAME cannot be refused: every problem closes.
        if option == OptionType::EXPORT_NAME {
            if self.extended {
                return Err(ClientViolation::ExportNameWithExtendedHeaders.into());
            }
            if self.shutting_down {
                return Err(ServerHandshakeError::ShuttingDown);
            }
            if len as usize > MAX_STRING_LEN {
                return Err(ClientViolation::BadExportName("longer than 4096 bytes").into());
            }
            if self.config.tls == TlsPolicy::ForcedTls && !self.tls {
                return Err(ServerHandshakeError::TlsRequired(String::new()));
            }
            return self.receive_data(len);
        }
        if self.shutting_down {
            self.refuse(len, ReplyType::ERR_SHUTDOWN, "server is shutting down");
            return Ok(());
        }
        if option == OptionType::STARTTLS {
            if len != 0 {
                self.refuse(len, ReplyType::ERR_INVALID, "NBD_OPT_STARTTLS must not carry data");
            } else if !self.tls_possible() {
                self.reply(ReplyType::ERR_POLICY, "TLS is not available on this server");
            } else if self.tls {
                self.reply(ReplyType::ERR_INVALID, "TLS is already running");
            } else {
                self.out.clear();
                self.push_reply(ReplyType::ACK, &[]);
                self.phase = Phase::Sending(After::StartTls);
            }
            return Ok(());
        }
        if self.config.tls == TlsPolicy::ForcedTls && !self.tls {
            // FORCEDTLS: every other option is refused until TLS runs.
            let reply = self.tls_reqd();
            self.refuse(len, reply, "TLS is required");
            return Ok(());
        }
        match option {
            OptionType::LIST => {
                if len != 0 {
                    self.refuse(len, ReplyType::ERR_INVALID, "NBD_OPT_LIST must not carry data");
                } else if !self.config.allow_list {
                    self.reply(ReplyType::ERR_POLICY, "listing exports is not allowed");
                } else {
                    self.phase = Phase::List;
                }
            }
            OptionType::INFO | OptionType::GO => {
                if !self.config.support_go {
                    self.refuse(len, ReplyType::ERR_UNSUP, "option not supported");
                } else if len > MAX_OPTION_DATA {
                    self.refuse(len, ReplyType::ERR_TOO_BIG, "option data too large");
                } else {
                    self.receive_data(len)?;
                }
            }
            OptionType::STRUCTURED_REPLY => {
                if !self.config.structured_replies {
                    self.refuse(len, ReplyType::ERR_UNSUP, "option not supported");
                } else if len != 0 {
                    self.refuse(
                        len,
                        ReplyType::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY must not carry data",
                    );
                } else if self.extended {
                    self.reply(ReplyType::ERR_EXT_HEADER_REQD, "extended headers already negotiated");
                } else if self.structured {
                    self.reply(ReplyType::ERR_INVALID, "structured replies already negotiated");
                } else {
                    self.structured = true;
                    self.reply(ReplyType::ACK, "");
                }
            }
            OptionType::EXTENDED_HEADERS => {
                if !self.config.extended_headers || !self.config.support_go {
                    self.refuse(len, ReplyType::ERR_UNSUP, "option not supported");
                } else if len != 0 {
                    self.refuse(
                        len,
                        ReplyType::ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS must not carry data",
                    );
                } else if self.extended {
                    self.reply(ReplyType::ERR_INVALID, "extended headers already negotiated");
                } else {
                    self.extended = true;
                    self.reply(ReplyType::ACK, "");
                }
            }
            OptionType::LIST_META_CONTEXT | OptionType::SET_META_CONTEXT => {
                if option == OptionType::SET_META_CONTEXT {
                    // Replaces the previous selection even if it fails.
                    self.selection = None;
                }
                if !self.config.structured_replies && !self.config.extended_headers {
                    self.refuse(len, ReplyType::ERR_UNSUP, "option not supported");
                } else if !self.structured && !self.extended {
                    self.refuse(
                        len,
                        ReplyType::ERR_INVALID,
                        "structured replies or extended headers must be negotiated first",
                    );
                } else if len > MAX_OPTION_DATA {
                    self.refuse(len, ReplyType::ERR_TOO_BIG, "option data too large");
                } else {
                    self.receive_data(len)?;
                }
            }
            _ => self.refuse(len, ReplyType::ERR_UNSUP, "option not supported"),
        }
        Ok(())
    }

    fn on_option_data(&mut self, data: &[u8]) -> Result<(), ServerHandshakeError> {
        match self.option {
            OptionType::EXPORT_NAME => {
                let name = parse_string(data).map_err(ClientViolation::BadExportName)?;
                self.name = name.to_owned();
                self.pending = Some(Pending::ExportName);
                self.phase = Phase::Lookup;
            }
            OptionType::INFO | OptionType::GO => match parse_info_request(data) {
                Ok((name, infos)) => {
                    self.name = name.to_owned();
                    self.pending = Some(Pending::Info {
                        go: self.option == OptionType::GO,
                        infos,
                    });
                    self.phase = Phase::Lookup;
                }
                Err(message) => self.reply(ReplyType::ERR_INVALID, message),
            },
            OptionType::LIST_META_CONTEXT | OptionType::SET_META_CONTEXT => match parse_meta_context_request(data) {
                Ok((name, queries)) => {
                    self.name = name.to_owned();
                    self.pending = Some(if self.option == OptionType::LIST_META_CONTEXT {
                        Pending::ListMetaContext { queries }
                    } else {
                        Pending::SetMetaContext { queries }
                    });
                    self.phase = Phase::Lookup;
                }
                Err((reply, message)) => self.reply(reply, message),
            },
            _ => return Err(ServerHandshakeError::Misuse("option data for an option without data")),
        }
        Ok(())
    }

    /// The transmission flags sent for an export, as [`ExportDetails::flags`] documents.
    fn transmission_flags(&self, d: &ExportDetails, selected: usize) -> TransmissionFlags {
        let known = TransmissionFlags::READ_ONLY
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::ROTATIONAL
            | TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::CAN_MULTI_CONN
            | TransmissionFlags::SEND_CACHE
            | TransmissionFlags::SEND_FAST_ZERO
            | TransmissionFlags::BLOCK_STATUS_PAYLOAD;
        let mut f = (d.flags & known) | TransmissionFlags::HAS_FLAGS;
        if self.structured || self.extended {
            f |= TransmissionFlags::SEND_DF;
        }
        if !f.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
            f.remove(TransmissionFlags::SEND_FAST_ZERO);
        }
        if !self.extended || selected == 0 || selected > 64 {
            f.remove(TransmissionFlags::BLOCK_STATUS_PAYLOAD);
        }
        f
    }

    /// The contexts selected for `name`, if the last SET_META_CONTEXT named it.
    fn contexts_for(&self, name: &str) -> Vec<MetaContext> {
        match &self.selection {
            Some((n, c)) if n == name && (self.structured || self.extended) => c.clone(),
            _ => Vec::new(),
        }
    }

    fn mode(&self) -> Mode {
        if self.extended {
            Mode::Extended
        } else if self.structured {
            Mode::Structured
        } else {
            Mode::Simple
        }
    }

    fn on_lookup(&mut self, pending: Pending, details: Option<ExportDetails>) -> Result<(), ServerHandshakeError> {
        let needs_tls = |d: &ExportDetails, s: &Self| {
            !s.tls && (s.config.tls == TlsPolicy::ForcedTls || (s.config.tls == TlsPolicy::SelectiveTls && d.tls_only))
        };
        match pending {
            Pending::Oldstyle => {
                let Some(d) = details else {
                    return Err(ServerHandshakeError::UnknownExport(String::new()));
                };
                // Oldstyle cannot run TLS at all.
                if needs_tls(&d, self) {
                    return Err(ServerHandshakeError::TlsRequired(d.name));
                }
                if d.block_size_required {
                    return Err(ServerHandshakeError::BlockSizeRequired(d.name));
                }
                let flags = self.transmission_flags(&d, 0);
                let greeting = ServerGreeting {
                    nbdmagic: NBDMAGIC.into(),
                    magic: CLISERV_MAGIC.into(),
                };
                let tail = OldstyleTail {
                    size: d.size.into(),
                    flags: (flags.bits() as u32).into(),
                    zeroes: [0; ZERO_PAD_LEN],
                };
                self.out.clear();
                self.out.extend_from_slice(greeting.as_bytes());
                self.out.extend_from_slice(tail.as_bytes());
                self.result = Some(ServerNegotiated {
                    mode: Mode::Oldstyle,
                    export_name: d.name,
                    requested_name: String::new(),
                    size: d.size,
                    flags,
                    block_size: None,
                    contexts: Vec::new(),
                    tls: false,
                    client_requested_block_size: false,
                });
                self.phase = Phase::Sending(After::Done);
            }
            Pending::ExportName => {
                let name = core::mem::take(&mut self.name);
                let Some(d) = details else {
                    return Err(ServerHandshakeError::UnknownExport(name));
                };
                if needs_tls(&d, self) {
                    return Err(ServerHandshakeError::TlsRequired(name));
                }
                if d.block_size_required {
                    return Err(ServerHandshakeError::BlockSizeRequired(name));
                }
                let contexts = self.contexts_for(&name);
                let flags = self.transmission_flags(&d, contexts.len());
                let reply = ExportNameReply {
                    size: d.size.into(),
                    flags: flags.bits().into(),
                };
                self.out.clear();
                self.out.extend_from_slice(reply.as_bytes());
                if !self.client_flags.contains(ClientFlags::NO_ZEROES) {
                    self.out.extend_from_slice(&[0; ZERO_PAD_LEN]);
                }
                // Structured replies negotiated before EXPORT_NAME stay in
                // force (extended headers cannot get here).
                let mode = if self.structured {
                    Mode::Structured
                } else {
                    Mode::ExportNameOnly
                };
                self.result = Some(ServerNegotiated {
                    mode,
                    export_name: d.name,
                    requested_name: name,
                    size: d.size,
                    flags,
                    block_size: None,
                    contexts,
                    tls: self.tls,
                    client_requested_block_size: false,
                });
                self.phase = Phase::Sending(After::Done);
            }
            Pending::Info { go, infos } => {
                let Some(d) = details else {
                    self.reply(ReplyType::ERR_UNKNOWN, "unknown export");
                    return Ok(());
                };
                if needs_tls(&d, self) {
                    let reply = self.tls_reqd();
                    self.reply(reply, "export requires TLS");
                    return Ok(());
                }
                let name = core::mem::take(&mut self.name);
                let contexts = self.contexts_for(&name);
                let flags = self.transmission_flags(&d, contexts.len());
                self.out.clear();
                let export = InfoExport {
                    info_type: InfoType::EXPORT.0.into(),
                    size: d.size.into(),
                    flags: flags.bits().into(),
                };
                self.push_reply(ReplyType::INFO, export.as_bytes());
                if infos.name {
                    self.push_info_string(InfoType::NAME, &d.name);
                }
                if infos.description && !d.description.is_empty() {
                    self.push_info_string(InfoType::DESCRIPTION, &d.description);
                }
                let send_block_size = infos.block_size || d.block_size_required || d.block_size.is_some();
                let block_size = if send_block_size {
                    let c = d.block_size.unwrap_or_default();
                    let b = InfoBlockSize {
                        info_type: InfoType::BLOCK_SIZE.0.into(),
                        minimum: c.minimum.into(),
                        preferred: c.preferred.into(),
                        maximum: c.maximum.into(),
                    };
                    self.push_reply(ReplyType::INFO, b.as_bytes());
                    Some(c)
                } else {
                    None
                };
                if go && d.block_size_required && !infos.block_size {
                    self.push_reply(
                        ReplyType::ERR_BLOCK_SIZE_REQD,
                        b"export requires NBD_INFO_BLOCK_SIZE to be requested",
                    );
                    self.phase = Phase::Sending(After::NextOption);
                    return Ok(());
                }
                self.push_reply(ReplyType::ACK, &[]);
                if go {
                    self.result = Some(ServerNegotiated {
                        mode: self.mode(),
                        export_name: d.name,
                        requested_name: name,
                        size: d.size,
                        flags,
                        block_size,
                        contexts,
                        tls: self.tls,
                        client_requested_block_size: infos.block_size,
                    });
                    self.phase = Phase::Sending(After::Done);
                } else {
                    self.phase = Phase::Sending(After::NextOption);
                }
            }
            Pending::ListMetaContext { queries } | Pending::SetMetaContext { queries } => {
                let set = self.option == OptionType::SET_META_CONTEXT;
                let Some(d) = details else {
                    self.reply(ReplyType::ERR_UNKNOWN, "unknown export");
                    return Ok(());
                };
                if needs_tls(&d, self) {
                    // Only INFO, GO and EXPORT_NAME may answer TLS_REQD.
                    self.reply(ReplyType::ERR_POLICY, "export requires TLS");
                    return Ok(());
                }
                let name = core::mem::take(&mut self.name);
                self.out.clear();
                if set {
                    // Exact names select; wildcards (`base:`) select nothing.
                    let mut selected: Vec<MetaContext> = Vec::new();
                    for c in &d.meta_contexts {
                        if queries.iter().any(|q| q == c) {
                            selected.push(MetaContext {
                                id: selected.len() as u32 + 1,
                                name: c.clone(),
                            });
                        }
                    }
                    for c in &selected {
                        self.push_meta_context(c.id, &c.name);
                    }
                    self.selection = Some((name, selected));
                } else {
                    for c in &d.meta_contexts {
                        if queries.is_empty() || queries.iter().any(|q| query_matches(q, c)) {
                            self.push_meta_context(0, c);
                        }
                    }
                }
                self.push_reply(ReplyType::ACK, &[]);
                self.phase = Phase::Sending(After::NextOption);
            }
        }
        Ok(())
    }

    fn push_info_string(&mut self, info: InfoType, s: &str) {
        self.push_reply_header(ReplyType::INFO, 2 + s.len());
        self.out.extend_from_slice(&info.0.to_be_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn push_meta_context(&mut self, id: u32, name: &str) {
        self.push_reply_header(ReplyType::META_CONTEXT, 4 + name.len());
        self.out.extend_from_slice(&id.to_be_bytes());
        self.out.extend_from_slice(name.as_bytes());
    }
}

/// Whether a `NBD_OPT_LIST_META_CONTEXT` query matches a context: the
/// exact name, or a query with an empty leaf (`base:`, or a prefix ending
/// in `:` such as `qemu:dirty-bitmap:`) as a wildcard for its namespace.
fn query_matches(query: &str, context: &str) -> bool {
    query == context || (query.ends_with(':') && context.starts_with(query))
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_u16(data: &[u8], at: usize) -> Option<u16> {
    let b = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// A string as the spec defines it: at most 4096 bytes, no NUL (and UTF-8,
/// which `&str` already is).
fn valid_string(b: &[u8]) -> bool {
    b.len() <= MAX_STRING_LEN && !b.contains(&0)
}

fn parse_string(b: &[u8]) -> Result<&str, &'static str> {
    if b.len() > MAX_STRING_LEN {
        return Err("longer than 4096 bytes");
    }
    if b.contains(&0) {
        return Err("contains NUL");
    }
    core::str::from_utf8(b).map_err(|_| "not UTF-8")
}

fn validate_details(d: &ExportDetails) -> Result<(), ServerHandshakeError> {
    if !valid_string(d.name.as_bytes()) || !valid_string(d.description.as_bytes()) {
        return Err(ServerHandshakeError::Misuse(
            "export name or description is not a valid NBD string",
        ));
    }
    for c in &d.meta_contexts {
        let ns_ok = matches!(c.find(':'), Some(i) if i > 0);
        if !valid_string(c.as_bytes()) || !ns_ok {
            return Err(ServerHandshakeError::Misuse(
                "metadata context names must be valid strings of the form namespace:leaf",
            ));
        }
    }
    if let Some(b) = &d.block_size {
        b.validate().map_err(ServerHandshakeError::Misuse)?;
    }
    Ok(())
}

/// Parses the data of `NBD_OPT_INFO`/`NBD_OPT_GO`: name length, name,
/// number of information requests, the requests. Every inconsistency is
/// `NBD_REP_ERR_INVALID`.
fn parse_info_request(data: &[u8]) -> Result<(&str, InfoRequests), &'static str> {
    if data.len() < 6 {
        return Err("option data shorter than 6 bytes");
    }
    let name_len = read_u32(data, 0).ok_or("option data too short")? as usize;
    if name_len > data.len() - 6 {
        return Err("export name length exceeds the option length");
    }
    let name = parse_string(data.get(4..4 + name_len).ok_or("bad name")?)?;
    let count = read_u16(data, 4 + name_len).ok_or("option data too short")? as usize;
    let requests = data.get(6 + name_len..).ok_or("option data too short")?;
    if requests.len() != 2 * count {
        return Err("number of information requests does not match the option length");
    }
    let mut infos = InfoRequests::default();
    for pair in requests.chunks_exact(2) {
        let seen = match InfoType(u16::from_be_bytes([pair[0], pair[1]])) {
            InfoType::NAME => core::mem::replace(&mut infos.name, true),
            InfoType::DESCRIPTION => core::mem::replace(&mut infos.description, true),
            InfoType::BLOCK_SIZE => core::mem::replace(&mut infos.block_size, true),
            // NBD_INFO_EXPORT is always sent; unknown requests are ignored.
            _ => false,
        };
        if seen {
            return Err("information request listed twice");
        }
    }
    Ok((name, infos))
}

/// Parses the data of the meta-context options: export name, number of
/// queries, queries. Syntax errors are `NBD_REP_ERR_INVALID`, more than
/// [`MAX_META_CONTEXT_QUERIES`] queries `NBD_REP_ERR_TOO_BIG`.
fn parse_meta_context_request(data: &[u8]) -> Result<(&str, Vec<String>), (ReplyType, &'static str)> {
    let invalid = |m: &'static str| (ReplyType::ERR_INVALID, m);
    let name_len = read_u32(data, 0).ok_or(invalid("option data too short"))? as usize;
    if name_len > data.len().saturating_sub(8) {
        return Err(invalid("export name length exceeds the option length"));
    }
    let name = parse_string(data.get(4..4 + name_len).ok_or(invalid("bad name"))?).map_err(invalid)?;
    let count = read_u32(data, 4 + name_len).ok_or(invalid("option data too short"))? as usize;
    let mut rest = data.get(8 + name_len..).ok_or(invalid("option data too short"))?;
    if count > rest.len() / 4 {
        return Err(invalid("number of queries exceeds the option length"));
    }
    if count > MAX_META_CONTEXT_QUERIES as usize {
        return Err((ReplyType::ERR_TOO_BIG, "too many queries"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = read_u32(rest, 0).ok_or(invalid("query length exceeds the option length"))? as usize;
        let q = rest
            .get(4..)
            .and_then(|r| r.get(..len))
            .ok_or(invalid("query length exceeds the option length"))?;
        let q = parse_string(q).map_err(invalid)?;
        if !matches!(q.find(':'), Some(i) if i > 0) {
            return Err(invalid("query does not start with a namespace and a colon"));
        }
        queries.push(q.to_owned());
        rest = rest.get(4 + len..).unwrap_or(&[]);
    }
    if !rest.is_empty() {
        return Err(invalid("trailing data after the queries"));
    }
    Ok((name, queries))
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
