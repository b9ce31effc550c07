//! The client side of the handshake: oldstyle and (fixed) newstyle
//! negotiation, option haggling, and the result that transmission needs.
//!
//! The machine never reads more than it needs: at each step it tells the
//! driver exactly how many bytes to read next ([`HandshakeStep::Receive`]),
//! so a driver can hand the socket over to TLS right after the
//! `NBD_OPT_STARTTLS` acknowledgement without having over-read.
//!
//! Two ways to drive it:
//!
//! - **Automatic** (the default): STARTTLS when asked, EXTENDED_HEADERS
//!   (falling back to STRUCTURED_REPLY), SET_META_CONTEXT, then GO with
//!   INFO_BLOCK_SIZE/NAME/DESCRIPTION, falling back to EXPORT_NAME where GO
//!   is not supported. The machine ends in [`HandshakeStep::Done`].
//! - **Option mode** ([`ClientConfig::opt_mode`]), like libnbd's
//!   `set_opt_mode`: after TLS and header negotiation the machine stops in
//!   [`HandshakeStep::Negotiating`] and the caller issues options one by
//!   one ([`ClientHandshake::opt_list`], [`ClientHandshake::opt_info`],
//!   [`ClientHandshake::opt_list_meta_context`], ...), each ending in
//!   [`HandshakeStep::OptionDone`].

use alloc::borrow::ToOwned;
use alloc::string::String;
use alloc::vec::Vec;

use zerocopy::{FromBytes, IntoBytes};

use crate::wire::*;

pub use crate::common::{MetaContext, Mode, TlsMode};

/// The default of [`ClientConfig::max_in_flight`]: 64 requests, the queue
/// depth libnbd's nbdcopy uses per connection (QEMU's NBD driver keeps 16).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// What the client asks for during the handshake.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The export to select. Default: empty, the server's default export.
    pub export_name: String,
    /// TLS policy. Default: [`TlsMode::Off`] (an `nbds://` URI asks for
    /// [`TlsMode::Require`]).
    pub tls: TlsMode,
    /// Ask for structured replies. Default: yes.
    pub structured_replies: bool,
    /// Ask for extended headers (used whenever the server offers them).
    /// Default: yes.
    pub extended_headers: bool,
    /// Metadata contexts to select with `NBD_OPT_SET_META_CONTEXT`.
    /// Default: `base:allocation`.
    pub meta_contexts: Vec<String>,
    /// Ask for `NBD_INFO_BLOCK_SIZE` (and so promise to honour it).
    /// Default: yes.
    pub request_block_size: bool,
    /// Stop in [`HandshakeStep::Negotiating`] and let the caller issue
    /// options (libnbd's "opt mode"). Default: no.
    pub opt_mode: bool,
    /// Most requests in flight at once in transmission (the size of the
    /// in-flight table a [`ClientSession`](super::ClientSession) allocates
    /// once; at least 1). Default: [`DEFAULT_MAX_IN_FLIGHT`] (64).
    pub max_in_flight: usize,
    /// Check replies beyond what QEMU and libnbd enforce by default (see
    /// [`ClientTransmission::set_strict`](super::ClientTransmission::set_strict)).
    /// Default: yes.
    pub strict: bool,
    /// The largest READ or WRITE payload sent when the server sent no block
    /// sizes. Default: the spec's 2^25 (32 MiB), which every server must
    /// accept; raise it for servers known to accept more (nbd-server,
    /// nbdkit and nbd-serve take 50 MB and more).
    pub unnegotiated_max_payload: u64,
    /// How long the server may take over the handshake: from the greeting
    /// to transmission, and in option mode from the greeting to the first
    /// option and then for each option (TLS included). Decided by the
    /// session from the time its driver gives it (see [`crate::time`]).
    /// Default: none.
    pub handshake_timeout: Option<core::time::Duration>,
    /// How long a request may wait for its reply, from the first time the
    /// session is given after the request was started. An expired request
    /// fails the session (the connection is deemed broken). Default: none.
    pub request_timeout: Option<core::time::Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            export_name: String::new(),
            tls: TlsMode::Off,
            structured_replies: true,
            extended_headers: true,
            meta_contexts: alloc::vec![CONTEXT_BASE_ALLOCATION.to_owned()],
            request_block_size: true,
            opt_mode: false,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            strict: true,
            unnegotiated_max_payload: DEFAULT_MAX_PAYLOAD as u64,
            handshake_timeout: None,
            request_timeout: None,
        }
    }
}

/// Chainable setters, one per field (the struct is `#[non_exhaustive]`:
/// other crates build it from [`ClientConfig::default`]).
impl ClientConfig {
    /// Sets the export to select.
    pub fn export_name(mut self, v: impl Into<String>) -> Self {
        self.export_name = v.into();
        self
    }

    /// Sets the TLS policy.
    pub fn tls(mut self, v: TlsMode) -> Self {
        self.tls = v;
        self
    }

    /// Sets whether to ask for structured replies.
    pub fn structured_replies(mut self, v: bool) -> Self {
        self.structured_replies = v;
        self
    }

    /// Sets whether to ask for extended headers.
    pub fn extended_headers(mut self, v: bool) -> Self {
        self.extended_headers = v;
        self
    }

    /// Sets the metadata contexts to select.
    pub fn meta_contexts(mut self, v: Vec<String>) -> Self {
        self.meta_contexts = v;
        self
    }

    /// Sets whether to ask for `NBD_INFO_BLOCK_SIZE`.
    pub fn request_block_size(mut self, v: bool) -> Self {
        self.request_block_size = v;
        self
    }

    /// Sets whether to stop in [`HandshakeStep::Negotiating`] (option mode).
    pub fn opt_mode(mut self, v: bool) -> Self {
        self.opt_mode = v;
        self
    }

    /// Sets the most requests in flight at once in transmission.
    pub fn max_in_flight(mut self, v: usize) -> Self {
        self.max_in_flight = v;
        self
    }

    /// Sets whether to check replies strictly.
    pub fn strict(mut self, v: bool) -> Self {
        self.strict = v;
        self
    }

    /// Sets the largest payload sent when the server sent no block sizes.
    pub fn unnegotiated_max_payload(mut self, v: u64) -> Self {
        self.unnegotiated_max_payload = v;
        self
    }

    /// Sets the handshake's deadline.
    pub fn handshake_timeout(mut self, v: Option<core::time::Duration>) -> Self {
        self.handshake_timeout = v;
        self
    }

    /// Sets each request's deadline.
    pub fn request_timeout(mut self, v: Option<core::time::Duration>) -> Self {
        self.request_timeout = v;
        self
    }
}

/// An export as `NBD_REP_SERVER` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// The export's name.
    pub name: String,
    /// The description, if the server sent one.
    pub description: Option<String>,
}

/// What the server said about an export (`NBD_REP_INFO` replies).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportInfo {
    /// The name asked for.
    pub requested_name: String,
    /// The canonical name, if the server sent `NBD_INFO_NAME`.
    pub canonical_name: Option<String>,
    /// `NBD_INFO_DESCRIPTION`, if sent.
    pub description: Option<String>,
    /// Size in bytes (`NBD_INFO_EXPORT`).
    pub size: u64,
    /// Transmission flags (`NBD_INFO_EXPORT`).
    pub flags: Option<TransmissionFlags>,
    /// `NBD_INFO_BLOCK_SIZE`, if sent.
    pub block_size: Option<BlockSizeConstraints>,
}

/// The result of a successful handshake: everything transmission needs.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// Which flavour of the protocol was reached.
    pub mode: Mode,
    /// Whether the connection runs over TLS.
    pub tls: bool,
    /// The export name used (canonical name if the server sent one).
    pub export_name: String,
    /// The export's description, if sent.
    pub description: Option<String>,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (unknown bits kept).
    pub flags: TransmissionFlags,
    /// Block-size constraints, if the server advertised them.
    pub block_size: Option<BlockSizeConstraints>,
    /// The metadata contexts selected, with their ids.
    pub contexts: Vec<MetaContext>,
}

impl Negotiated {
    /// The constraints in force: advertised ones or the spec's defaults.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.block_size.unwrap_or_default()
    }

    /// The id of a selected context, by name.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.name == name).map(|c| c.id)
    }
}

/// The result of one option issued in option mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionOutcome {
    /// The option succeeded with a plain `NBD_REP_ACK`.
    Ack,
    /// `NBD_OPT_LIST` succeeded.
    List(Vec<ExportEntry>),
    /// `NBD_OPT_INFO` succeeded.
    Info(ExportInfo),
    /// `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT` succeeded.
    MetaContexts(Vec<MetaContext>),
    /// The server refused the option.
    Refused(ServerOptionError),
}

/// The server's refusal of an option: an `NBD_REP_ERR_*` and its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server refused {option}: {reply}{}", fmt_message(.message))]
pub struct ServerOptionError {
    /// The option refused.
    pub option: OptionType,
    /// The error reply type.
    pub reply: ReplyType,
    /// The server's message (may be empty).
    pub message: String,
}

fn fmt_message(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        alloc::format!(" ({m})")
    }
}

/// A rule of the handshake broken by the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeViolation {
    /// The first 8 bytes were not `NBDMAGIC`.
    #[error("bad initial magic {0}, expected NBDMAGIC: not an NBD server")]
    BadInitPasswd(Hex<u64>),
    /// The second magic was neither `IHAVEOPT` nor `cliserv_magic`.
    #[error("bad second magic {0}, expected IHAVEOPT or cliserv_magic")]
    BadMagic(Hex<u64>),
    /// An option reply did not start with the option-reply magic.
    #[error("bad option reply magic {0}")]
    BadOptionReplyMagic(Hex<u64>),
    /// An option reply named another option than the one sent.
    #[error("option reply for {got} while waiting for {expected}")]
    WrongOption {
        /// The option sent.
        expected: OptionType,
        /// The option named in the reply.
        got: OptionType,
    },
    /// A reply type that does not belong to this option.
    #[error("unexpected reply {reply} to {option}")]
    UnexpectedReply {
        /// The option.
        option: OptionType,
        /// The reply type.
        reply: ReplyType,
    },
    /// A reply whose length is wrong for its type.
    #[error("reply {reply} to {option} has invalid length {length}")]
    BadReplyLength {
        /// The option.
        option: OptionType,
        /// The reply type.
        reply: ReplyType,
        /// The length given.
        length: u32,
    },
    /// A reply longer than any valid reply can be.
    #[error("reply to {option} claims {length} bytes, more than the {limit} allowed")]
    ReplyTooLarge {
        /// The option.
        option: OptionType,
        /// The length claimed.
        length: u32,
        /// Our limit.
        limit: u32,
    },
    /// A string longer than the spec's 4096 bytes.
    #[error("string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
    /// `NBD_REP_ACK` to GO/INFO without any `NBD_INFO_EXPORT`.
    #[error("server acknowledged {0} without sending NBD_INFO_EXPORT")]
    MissingInfoExport(OptionType),
    /// Transmission flags without `NBD_FLAG_HAS_FLAGS`.
    #[error("transmission flags {0:#06x} lack NBD_FLAG_HAS_FLAGS")]
    MissingHasFlags(u16),
    /// Advertised block sizes that break the spec's rules.
    #[error("invalid block size constraints {min}/{pref}/{max}: {why}")]
    BadBlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        pref: u32,
        /// Maximum.
        max: u32,
        /// Which rule.
        why: &'static str,
    },
    /// A metadata context reply that is not valid.
    #[error("invalid metadata context reply: {0}")]
    BadMetaContext(&'static str),
    /// A metadata context id returned twice.
    #[error("server returned metadata context id {0} twice")]
    DuplicateContextId(u32),
    /// A context returned that was never asked for.
    #[error("server selected metadata context {0:?} which was not requested")]
    UnrequestedContext(String),
    /// More replies to one option than the client keeps: the server could
    /// otherwise make it allocate without bound (see
    /// [`MAX_EXPORT_LIST_ENTRIES`], [`MAX_EXPORT_LIST_BYTES`] and
    /// [`MAX_META_CONTEXT_REPLIES`]).
    #[error("server sent more than {limit} replies (or too many bytes) to {option}")]
    TooManyReplies {
        /// The option.
        option: OptionType,
        /// The limit on the number of replies.
        limit: usize,
    },
    /// The server refused `NBD_OPT_GO` as unsupported after accepting
    /// extended headers, which the spec forbids.
    #[error("server refused NBD_OPT_GO as unsupported after accepting extended headers")]
    GoUnsupportedWithExtendedHeaders,
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The server broke a rule of the protocol.
    #[error("protocol violation by server: {0}")]
    Violation(#[from] HandshakeViolation),
    /// The server refused an option we could not do without.
    #[error(transparent)]
    Refused(#[from] ServerOptionError),
    /// TLS was required but the server cannot do it.
    #[error("TLS required but the server does not support it{}", fmt_message(.0))]
    TlsUnavailable(String),
    /// The server requires TLS and the client did not ask for it.
    #[error("server requires TLS (NBD_REP_ERR_TLS_REQD){}", fmt_message(.0))]
    TlsRequired(String),
    /// TLS was required but the server speaks oldstyle or non-fixed newstyle.
    #[error("TLS required but the server does not support fixed newstyle negotiation")]
    TlsNeedsFixedNewstyle,
    /// The server sent no fixed-newstyle flag, so no option but
    /// EXPORT_NAME can be used.
    #[error("server does not support fixed newstyle, cannot use {0}")]
    NotFixedNewstyle(OptionType),
    /// The server is oldstyle, so it cannot serve a named export.
    #[error("server uses oldstyle negotiation: it cannot list exports or select {0:?}")]
    Oldstyle(String),
    /// The API was used out of order.
    #[error("handshake API misuse: {0}")]
    Misuse(&'static str),
    /// The handshake has already failed or finished.
    #[error("the handshake is over")]
    Finished,
}

/// What the driver must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep<'a> {
    /// Write all of these bytes, then call [`ClientHandshake::sent`].
    Send(&'a [u8]),
    /// Read exactly this many bytes, then pass them to
    /// [`ClientHandshake::received`].
    Receive(usize),
    /// Upgrade the transport to TLS now (client side), then call
    /// [`ClientHandshake::tls_established`]. Nothing has been over-read.
    StartTls,
    /// Option mode: the machine is idle, issue an option or `opt_go`.
    Negotiating,
    /// Option mode: an option finished; take its outcome with
    /// [`ClientHandshake::take_outcome`] (the machine is then idle again).
    OptionDone,
    /// The handshake is complete: call [`ClientHandshake::finish`].
    Done,
    /// The session ended with `NBD_OPT_ABORT`: close the connection.
    Aborted,
}

/// Most exports kept from the answer to `NBD_OPT_LIST`; a server that
/// sends more breaks the handshake ([`HandshakeViolation::TooManyReplies`]).
pub const MAX_EXPORT_LIST_ENTRIES: usize = 1 << 16;

/// Most bytes of export names and descriptions kept from the answer to
/// `NBD_OPT_LIST` (each reply alone is bounded by the 4096-byte strings).
pub const MAX_EXPORT_LIST_BYTES: usize = 16 << 20;

/// Most metadata contexts kept from the answer to one
/// `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
pub const MAX_META_CONTEXT_REPLIES: usize = 4096;

/// Largest option reply payload accepted: NBD_REP_SERVER with a name and a
/// description of 4096 bytes each is the largest valid reply.
const MAX_OPTION_REPLY: u32 = 4 + 2 * MAX_STRING_LEN as u32 + 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// NBDMAGIC + second magic.
    Magic,
    /// Oldstyle size, flags, zeroes.
    OldstyleTail,
    /// Newstyle handshake flags.
    HandshakeFlags,
    /// An option reply header.
    OptReplyHeader,
    /// An option reply payload of the header just read.
    OptReplyPayload,
    /// The answer to NBD_OPT_EXPORT_NAME.
    ExportNameReply,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    StartTls,
    ExtendedHeaders,
    StructuredReply,
    SetMetaContext {
        export: String,
        asked: Vec<String>,
        got: Vec<MetaContext>,
    },
    ListMetaContext {
        got: Vec<MetaContext>,
    },
    List {
        got: Vec<ExportEntry>,
        /// Bytes of names and descriptions in `got`.
        bytes: usize,
    },
    Info {
        go: bool,
        info: ExportInfo,
        saw_export: bool,
    },
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Bytes to send are in `out`; after them, receive `recv`.
    Sending,
    /// Waiting for `need` bytes, to be interpreted as `recv`.
    Receiving,
    /// Waiting for the driver to finish the TLS upgrade.
    Tls,
    /// Option mode idle.
    Idle,
    /// Option mode outcome ready.
    OutcomeReady,
    /// Done.
    Done,
    /// Aborted.
    Aborted,
    /// Failed.
    Failed,
}

/// The client handshake state machine.
#[derive(Debug)]
pub struct ClientHandshake {
    config: ClientConfig,
    phase: Phase,
    recv: Recv,
    need: usize,
    out: Vec<u8>,
    after_send: Option<(Recv, usize)>,
    fixed_newstyle: bool,
    no_zeroes: bool,
    tls: bool,
    structured: bool,
    extended: bool,
    contexts: Vec<MetaContext>,
    contexts_export: Option<String>,
    pending: Option<Pending>,
    pending_option: OptionType,
    reply_header: (ReplyType, u32),
    outcome: Option<OptionOutcome>,
    auto_stage: AutoStage,
    result: Option<Negotiated>,
    export_name_fallback: bool,
    user_option: bool,
    oldstyle: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum AutoStage {
    StartTls,
    ExtendedHeaders,
    StructuredReply,
    SetMetaContext,
    Go,
    Finished,
}

impl ClientHandshake {
    /// A new handshake; the first step is to receive the server greeting.
    pub fn new(config: ClientConfig) -> Self {
        ClientHandshake {
            config,
            phase: Phase::Receiving,
            recv: Recv::Magic,
            need: 16,
            out: Vec::with_capacity(64),
            after_send: None,
            fixed_newstyle: false,
            no_zeroes: false,
            tls: false,
            structured: false,
            extended: false,
            contexts: Vec::new(),
            contexts_export: None,
            pending: None,
            pending_option: OptionType(0),
            reply_header: (ReplyType(0), 0),
            outcome: None,
            auto_stage: AutoStage::StartTls,
            result: None,
            export_name_fallback: false,
            user_option: false,
            oldstyle: false,
        }
    }

    /// What the driver must do next.
    pub fn step(&self) -> HandshakeStep<'_> {
        match self.phase {
            Phase::Sending => HandshakeStep::Send(&self.out),
            Phase::Receiving => HandshakeStep::Receive(self.need),
            Phase::Tls => HandshakeStep::StartTls,
            Phase::Idle => HandshakeStep::Negotiating,
            Phase::OutcomeReady => HandshakeStep::OptionDone,
            Phase::Done => HandshakeStep::Done,
            Phase::Aborted | Phase::Failed => HandshakeStep::Aborted,
        }
    }

    /// The driver wrote everything [`HandshakeStep::Send`] gave it.
    pub fn sent(&mut self) {
        if self.phase != Phase::Sending {
            return;
        }
        self.out.clear();
        match self.after_send.take() {
            Some((recv, need)) => {
                self.phase = Phase::Receiving;
                self.recv = recv;
                self.need = need;
            }
            None => {
                // Client flags sent in option mode with nothing to
                // negotiate automatically: hand control to the caller.
                self.phase = Phase::Idle;
            }
        }
    }

    /// The driver read the bytes that [`HandshakeStep::Receive`] asked for.
    pub fn received(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        if self.phase != Phase::Receiving {
            return Err(HandshakeError::Misuse("received() called while not receiving"));
        }
        if data.len() != self.need {
            return Err(HandshakeError::Misuse(
                "received() given a different number of bytes than asked",
            ));
        }
        let r = self.process(data);
        if r.is_err() {
            self.phase = Phase::Failed;
        }
        r
    }

    /// The driver finished the TLS upgrade asked by [`HandshakeStep::StartTls`].
    pub fn tls_established(&mut self) -> Result<(), HandshakeError> {
        if self.phase != Phase::Tls {
            return Err(HandshakeError::Misuse("tls_established() without StartTls"));
        }
        self.tls = true;
        // The spec: nothing negotiated before STARTTLS survives it.
        self.structured = false;
        self.extended = false;
        self.contexts.clear();
        self.contexts_export = None;
        self.auto_stage = AutoStage::ExtendedHeaders;
        self.advance_auto()
    }

    /// The server's handshake flags allowed fixed newstyle.
    pub fn fixed_newstyle(&self) -> bool {
        self.fixed_newstyle
    }

    /// Whether the server greeted with oldstyle negotiation.
    pub fn oldstyle(&self) -> bool {
        self.oldstyle
    }

    /// The protocol name as libnbd reports it: `oldstyle`, `newstyle` or
    /// `newstyle-fixed`.
    pub fn protocol_name(&self) -> &'static str {
        if self.oldstyle {
            "oldstyle"
        } else if self.fixed_newstyle {
            "newstyle-fixed"
        } else {
            "newstyle"
        }
    }

    /// Whether extended headers are negotiated so far.
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Whether structured replies (or extended headers) are negotiated so far.
    pub fn structured_replies(&self) -> bool {
        self.structured || self.extended
    }

    /// Whether TLS is running.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Take the outcome of the option that finished ([`HandshakeStep::OptionDone`]).
    pub fn take_outcome(&mut self) -> Option<OptionOutcome> {
        let o = self.outcome.take();
        if self.phase == Phase::OutcomeReady {
            self.phase = Phase::Idle;
        }
        o
    }

    /// The negotiated result, once [`HandshakeStep::Done`].
    pub fn finish(self) -> Result<Negotiated, HandshakeError> {
        self.result.ok_or(HandshakeError::Misuse("finish() before Done"))
    }

    // ----- option mode -----------------------------------------------------

    fn idle_check(&mut self, option: OptionType) -> Result<(), HandshakeError> {
        if self.phase != Phase::Idle {
            return Err(HandshakeError::Misuse("an option was issued while the machine is busy"));
        }
        if !self.fixed_newstyle && option != OptionType::EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(option));
        }
        self.user_option = true;
        Ok(())
    }

    /// Issue `NBD_OPT_LIST`.
    pub fn opt_list(&mut self) -> Result<(), HandshakeError> {
        self.idle_check(OptionType::LIST)?;
        self.send_option(
            OptionType::LIST,
            &[],
            Pending::List {
                got: Vec::new(),
                bytes: 0,
            },
        );
        Ok(())
    }

    /// Issue `NBD_OPT_INFO` for an export.
    pub fn opt_info(&mut self, export: &str) -> Result<(), HandshakeError> {
        self.idle_check(OptionType::INFO)?;
        self.send_info_or_go(false, export)
    }

    /// Issue `NBD_OPT_GO` for the export of the configuration (or the
    /// given name); on success the machine ends in [`HandshakeStep::Done`].
    pub fn opt_go(&mut self, export: Option<&str>) -> Result<(), HandshakeError> {
        self.idle_check(OptionType::GO)?;
        if let Some(name) = export {
            // Checked before it replaces the configured name: a refused
            // call changes nothing.
            check_string_len(name)?;
            self.config.export_name = name.to_owned();
        }
        let name = self.config.export_name.clone();
        self.send_info_or_go(true, &name)
    }

    /// Issue `NBD_OPT_LIST_META_CONTEXT` (no queries lists them all).
    pub fn opt_list_meta_context(&mut self, export: &str, queries: &[&str]) -> Result<(), HandshakeError> {
        self.idle_check(OptionType::LIST_META_CONTEXT)?;
        let data = encode_meta_context_request(export, queries)?;
        self.send_option(
            OptionType::LIST_META_CONTEXT,
            &data,
            Pending::ListMetaContext { got: Vec::new() },
        );
        Ok(())
    }

    /// Issue `NBD_OPT_SET_META_CONTEXT`.
    pub fn opt_set_meta_context(&mut self, export: &str, queries: &[&str]) -> Result<(), HandshakeError> {
        self.idle_check(OptionType::SET_META_CONTEXT)?;
        self.send_set_meta_context(export, queries.iter().map(|s| (*s).to_owned()).collect())
    }

    /// Issue `NBD_OPT_STRUCTURED_REPLY`.
    pub fn opt_structured_reply(&mut self) -> Result<(), HandshakeError> {
        self.idle_check(OptionType::STRUCTURED_REPLY)?;
        self.send_option(OptionType::STRUCTURED_REPLY, &[], Pending::StructuredReply);
        Ok(())
    }

    /// Issue `NBD_OPT_EXTENDED_HEADERS`.
    pub fn opt_extended_headers(&mut self) -> Result<(), HandshakeError> {
        self.idle_check(OptionType::EXTENDED_HEADERS)?;
        self.send_option(OptionType::EXTENDED_HEADERS, &[], Pending::ExtendedHeaders);
        Ok(())
    }

    /// Issue `NBD_OPT_ABORT`; the machine ends in [`HandshakeStep::Aborted`]
    /// once the server acknowledged it (or closed the connection, which the
    /// driver should treat as the same thing).
    pub fn opt_abort(&mut self) -> Result<(), HandshakeError> {
        self.idle_check(OptionType::ABORT)?;
        self.send_option(OptionType::ABORT, &[], Pending::Abort);
        Ok(())
    }

    // ----- internals -------------------------------------------------------

    fn send_option(&mut self, option: OptionType, data: &[u8], pending: Pending) {
        let hdr = OptionHeader {
            magic: IHAVEOPT.into(),
            option: option.0.into(),
            length: (data.len() as u32).into(),
        };
        self.out.extend_from_slice(hdr.as_bytes());
        self.out.extend_from_slice(data);
        self.pending = Some(pending);
        self.pending_option = option;
        self.phase = Phase::Sending;
        self.after_send = Some((Recv::OptReplyHeader, OPTION_REPLY_HEADER_LEN));
    }

    fn send_info_or_go(&mut self, go: bool, export: &str) -> Result<(), HandshakeError> {
        check_string_len(export)?;
        let mut infos: Vec<u16> = Vec::with_capacity(3);
        if self.config.request_block_size || !go {
            infos.push(InfoType::BLOCK_SIZE.0);
        }
        infos.push(InfoType::NAME.0);
        infos.push(InfoType::DESCRIPTION.0);
        let mut data = Vec::with_capacity(4 + export.len() + 2 + 2 * infos.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            data.extend_from_slice(&i.to_be_bytes());
        }
        let option = if go { OptionType::GO } else { OptionType::INFO };
        let info = ExportInfo {
            requested_name: export.to_owned(),
            ..ExportInfo::default()
        };
        self.send_option(
            option,
            &data,
            Pending::Info {
                go,
                info,
                saw_export: false,
            },
        );
        Ok(())
    }

    fn send_set_meta_context(&mut self, export: &str, asked: Vec<String>) -> Result<(), HandshakeError> {
        let refs: Vec<&str> = asked.iter().map(String::as_str).collect();
        let data = encode_meta_context_request(export, &refs)?;
        // Replacing the selection clears the old one even if this fails.
        self.contexts.clear();
        self.contexts_export = None;
        self.send_option(
            OptionType::SET_META_CONTEXT,
            &data,
            Pending::SetMetaContext {
                export: export.to_owned(),
                asked,
                got: Vec::new(),
            },
        );
        Ok(())
    }

    fn send_export_name(&mut self) -> Result<(), HandshakeError> {
        let name = self.config.export_name.clone();
        check_string_len(&name)?;
        let hdr = OptionHeader {
            magic: IHAVEOPT.into(),
            option: OptionType::EXPORT_NAME.0.into(),
            length: (name.len() as u32).into(),
        };
        self.out.extend_from_slice(hdr.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.pending = None;
        self.pending_option = OptionType::EXPORT_NAME;
        self.phase = Phase::Sending;
        let need = 10 + if self.no_zeroes { 0 } else { ZERO_PAD_LEN };
        self.after_send = Some((Recv::ExportNameReply, need));
        Ok(())
    }

    fn process(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        match self.recv {
            Recv::Magic => {
                let (g, _) = ServerGreeting::read_from_prefix(data).map_err(|_| HandshakeError::Misuse("short"))?;
                if g.nbdmagic.get() != NBDMAGIC {
                    return Err(HandshakeViolation::BadInitPasswd(Hex(g.nbdmagic.get())).into());
                }
                match g.magic.get() {
                    IHAVEOPT => self.expect(Recv::HandshakeFlags, 2),
                    CLISERV_MAGIC => {
                        self.oldstyle = true;
                        if self.config.tls == TlsMode::Require {
                            return Err(HandshakeError::TlsNeedsFixedNewstyle);
                        }
                        if !self.config.export_name.is_empty() {
                            return Err(HandshakeError::Oldstyle(self.config.export_name.clone()));
                        }
                        self.expect(Recv::OldstyleTail, 8 + 4 + ZERO_PAD_LEN)
                    }
                    other => return Err(HandshakeViolation::BadMagic(Hex(other)).into()),
                }
                Ok(())
            }
            Recv::OldstyleTail => {
                let (t, _) = OldstyleTail::read_from_prefix(data).map_err(|_| HandshakeError::Misuse("short"))?;
                let flags = t.flags.get() as u16;
                let flags = check_transmission_flags(flags)?;
                self.result = Some(Negotiated {
                    mode: Mode::Oldstyle,
                    tls: false,
                    export_name: String::new(),
                    description: None,
                    size: t.size.get(),
                    flags,
                    block_size: None,
                    contexts: Vec::new(),
                });
                self.phase = Phase::Done;
                Ok(())
            }
            Recv::HandshakeFlags => {
                let flags = HandshakeFlags::from_bits_retain(u16::from_be_bytes([data[0], data[1]]));
                self.fixed_newstyle = flags.contains(HandshakeFlags::FIXED_NEWSTYLE);
                self.no_zeroes = flags.contains(HandshakeFlags::NO_ZEROES);
                let mut cflags = ClientFlags::empty();
                if self.fixed_newstyle {
                    cflags |= ClientFlags::FIXED_NEWSTYLE;
                }
                if self.no_zeroes {
                    cflags |= ClientFlags::NO_ZEROES;
                }
                self.out.extend_from_slice(&cflags.bits().to_be_bytes());
                if !self.fixed_newstyle {
                    if self.config.tls == TlsMode::Require {
                        return Err(HandshakeError::TlsNeedsFixedNewstyle);
                    }
                    // Only EXPORT_NAME is possible, in option mode too.
                    self.auto_stage = AutoStage::Finished;
                    return self.send_export_name_after_flags();
                }
                self.auto_stage = AutoStage::StartTls;
                self.advance_auto_after_flags()
            }
            Recv::OptReplyHeader => {
                let (h, _) = OptionReplyHeader::read_from_prefix(data).map_err(|_| HandshakeError::Misuse("short"))?;
                if h.magic.get() != OPTION_REPLY_MAGIC {
                    return Err(HandshakeViolation::BadOptionReplyMagic(Hex(h.magic.get())).into());
                }
                let option = OptionType(h.option.get());
                if option != self.pending_option {
                    return Err(HandshakeViolation::WrongOption {
                        expected: self.pending_option,
                        got: option,
                    }
                    .into());
                }
                let reply = ReplyType(h.reply_type.get());
                let length = h.length.get();
                if length > MAX_OPTION_REPLY {
                    return Err(HandshakeViolation::ReplyTooLarge {
                        option,
                        length,
                        limit: MAX_OPTION_REPLY,
                    }
                    .into());
                }
                self.reply_header = (reply, length);
                if length == 0 {
                    self.handle_reply(reply, &[])
                } else {
                    self.expect(Recv::OptReplyPayload, length as usize);
                    Ok(())
                }
            }
            Recv::OptReplyPayload => {
                let reply = self.reply_header.0;
                self.handle_reply(reply, data)
            }
            Recv::ExportNameReply => {
                let (r, _) = ExportNameReply::read_from_prefix(data).map_err(|_| HandshakeError::Misuse("short"))?;
                let flags = check_transmission_flags(r.flags.get())?;
                // Structured replies negotiated before the fallback still
                // apply (the spec requires the server to use them), and so
                // do contexts selected for this same export name.
                let export_name = self.config.export_name.clone();
                let contexts = match &self.contexts_export {
                    Some(e) if *e == export_name && self.structured => core::mem::take(&mut self.contexts),
                    _ => Vec::new(),
                };
                self.result = Some(Negotiated {
                    mode: if self.structured {
                        Mode::Structured
                    } else {
                        Mode::ExportNameOnly
                    },
                    tls: self.tls,
                    export_name,
                    description: None,
                    size: r.size.get(),
                    flags,
                    block_size: None,
                    contexts,
                });
                self.phase = Phase::Done;
                Ok(())
            }
        }
    }

    fn expect(&mut self, recv: Recv, need: usize) {
        self.phase = Phase::Receiving;
        self.recv = recv;
        self.need = need;
    }

    /// Client flags are in `out`; queue EXPORT_NAME behind them.
    fn send_export_name_after_flags(&mut self) -> Result<(), HandshakeError> {
        let flags = core::mem::take(&mut self.out);
        self.send_export_name()?;
        let mut all = flags;
        all.extend_from_slice(&self.out);
        self.out = all;
        Ok(())
    }

    /// Client flags are in `out`; queue the first option behind them.
    fn advance_auto_after_flags(&mut self) -> Result<(), HandshakeError> {
        let flags = core::mem::take(&mut self.out);
        self.advance_auto()?;
        let mut all = flags;
        all.extend_from_slice(&self.out);
        self.out = all;
        if self.phase == Phase::Idle {
            // Option mode with nothing to negotiate: flags still to send.
            self.phase = Phase::Sending;
            self.after_send = None;
        }
        Ok(())
    }

    /// Move the automatic plan forward from `auto_stage`.
    fn advance_auto(&mut self) -> Result<(), HandshakeError> {
        loop {
            match self.auto_stage {
                AutoStage::StartTls => {
                    self.auto_stage = AutoStage::ExtendedHeaders;
                    if self.config.tls != TlsMode::Off && !self.tls {
                        self.send_option(OptionType::STARTTLS, &[], Pending::StartTls);
                        return Ok(());
                    }
                }
                AutoStage::ExtendedHeaders => {
                    self.auto_stage = AutoStage::StructuredReply;
                    if self.config.extended_headers && !self.extended {
                        self.send_option(OptionType::EXTENDED_HEADERS, &[], Pending::ExtendedHeaders);
                        return Ok(());
                    }
                }
                AutoStage::StructuredReply => {
                    self.auto_stage = AutoStage::SetMetaContext;
                    if self.config.structured_replies && !self.extended && !self.structured {
                        self.send_option(OptionType::STRUCTURED_REPLY, &[], Pending::StructuredReply);
                        return Ok(());
                    }
                }
                AutoStage::SetMetaContext => {
                    if self.config.opt_mode {
                        // Hand control to the caller.
                        self.phase = Phase::Idle;
                        return Ok(());
                    }
                    self.auto_stage = AutoStage::Go;
                    if (self.structured || self.extended) && !self.config.meta_contexts.is_empty() {
                        let export = self.config.export_name.clone();
                        let asked = self.config.meta_contexts.clone();
                        return self.send_set_meta_context(&export, asked);
                    }
                }
                AutoStage::Go => {
                    self.auto_stage = AutoStage::Finished;
                    let name = self.config.export_name.clone();
                    return self.send_info_or_go(true, &name);
                }
                AutoStage::Finished => return Ok(()),
            }
        }
    }

    /// The pending option finished (ACK or error). Decide what is next.
    fn option_finished(&mut self, outcome: OptionOutcome) -> Result<(), HandshakeError> {
        if self.user_option {
            self.user_option = false;
            if let OptionOutcome::Refused(e) = &outcome {
                if e.option == OptionType::GO && e.reply == ReplyType::ERR_UNSUP && !self.extended {
                    // GO unsupported: fall back to EXPORT_NAME, as the spec says.
                    self.export_name_fallback = true;
                    return self.send_export_name();
                }
                if e.option == OptionType::GO && e.reply == ReplyType::ERR_UNSUP {
                    return Err(HandshakeViolation::GoUnsupportedWithExtendedHeaders.into());
                }
            }
            self.outcome = Some(outcome);
            self.phase = Phase::OutcomeReady;
            return Ok(());
        }
        self.advance_auto()
    }

    fn refused(&self, message: &[u8]) -> ServerOptionError {
        ServerOptionError {
            option: self.pending_option,
            reply: self.reply_header.0,
            message: lossy(message),
        }
    }

    fn handle_reply(&mut self, reply: ReplyType, data: &[u8]) -> Result<(), HandshakeError> {
        let option = self.pending_option;
        let length = data.len() as u32;
        let bad_len = || HandshakeViolation::BadReplyLength { option, reply, length };
        let Some(pending) = self.pending.take() else {
            return Err(HandshakeError::Misuse("reply without a pending option"));
        };
        if reply.is_error() {
            let err = self.refused(data);
            return self.handle_error(pending, err);
        }
        match (pending, reply) {
            (Pending::StartTls, ReplyType::ACK) => {
                if length != 0 {
                    return Err(bad_len().into());
                }
                self.phase = Phase::Tls;
                Ok(())
            }
            (Pending::ExtendedHeaders, ReplyType::ACK) => {
                if length != 0 {
                    return Err(bad_len().into());
                }
                self.extended = true;
                self.option_finished(OptionOutcome::Ack)
            }
            (Pending::StructuredReply, ReplyType::ACK) => {
                if length != 0 {
                    return Err(bad_len().into());
                }
                self.structured = true;
                self.option_finished(OptionOutcome::Ack)
            }
            (Pending::Abort, ReplyType::ACK) => {
                self.phase = Phase::Aborted;
                Ok(())
            }
            (Pending::List { mut got, bytes }, ReplyType::SERVER) => {
                if data.len() < 4 {
                    return Err(bad_len().into());
                }
                let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if n > data.len() - 4 {
                    return Err(bad_len().into());
                }
                check_len(n)?;
                let name = lossy(&data[4..4 + n]);
                let rest = &data[4 + n..];
                check_len(rest.len())?;
                let description = if rest.is_empty() { None } else { Some(lossy(rest)) };
                let bytes = bytes + data.len() - 4;
                if got.len() >= MAX_EXPORT_LIST_ENTRIES || bytes > MAX_EXPORT_LIST_BYTES {
                    return Err(HandshakeViolation::TooManyReplies {
                        option,
                        limit: MAX_EXPORT_LIST_ENTRIES,
                    }
                    .into());
                }
                got.push(ExportEntry { name, description });
                self.continue_option(Pending::List { got, bytes });
                Ok(())
            }
            (Pending::List { got, .. }, ReplyType::ACK) => self.option_finished(OptionOutcome::List(got)),
            (Pending::ListMetaContext { mut got }, ReplyType::META_CONTEXT) => {
                let ctx = parse_meta_context(data)?;
                check_meta_context_count(option, &got)?;
                got.push(ctx);
                self.continue_option(Pending::ListMetaContext { got });
                Ok(())
            }
            (Pending::SetMetaContext { export, asked, mut got }, ReplyType::META_CONTEXT) => {
                let ctx = parse_meta_context(data)?;
                // Before the duplicate check, which is linear in `got`.
                check_meta_context_count(option, &got)?;
                if got.iter().any(|c| c.id == ctx.id) {
                    return Err(HandshakeViolation::DuplicateContextId(ctx.id).into());
                }
                if !asked.iter().any(|a| context_matches(a, &ctx.name)) {
                    return Err(HandshakeViolation::UnrequestedContext(ctx.name).into());
                }
                got.push(ctx);
                self.continue_option(Pending::SetMetaContext { export, asked, got });
                Ok(())
            }
            (Pending::ListMetaContext { got }, ReplyType::ACK) => {
                self.option_finished(OptionOutcome::MetaContexts(got))
            }
            (Pending::SetMetaContext { export, got, .. }, ReplyType::ACK) => {
                self.contexts = got.clone();
                self.contexts_export = Some(export);
                self.option_finished(OptionOutcome::MetaContexts(got))
            }
            (
                Pending::Info {
                    go,
                    mut info,
                    mut saw_export,
                },
                ReplyType::INFO,
            ) => {
                if data.len() < 2 {
                    return Err(bad_len().into());
                }
                let itype = InfoType(u16::from_be_bytes([data[0], data[1]]));
                match itype {
                    InfoType::EXPORT => {
                        let (e, rest) = InfoExport::read_from_prefix(data).map_err(|_| bad_len())?;
                        if !rest.is_empty() {
                            return Err(bad_len().into());
                        }
                        info.size = e.size.get();
                        info.flags = Some(check_transmission_flags(e.flags.get())?);
                        saw_export = true;
                    }
                    InfoType::NAME => {
                        check_len(data.len() - 2)?;
                        info.canonical_name = Some(lossy(&data[2..]));
                    }
                    InfoType::DESCRIPTION => {
                        check_len(data.len() - 2)?;
                        info.description = Some(lossy(&data[2..]));
                    }
                    InfoType::BLOCK_SIZE => {
                        let (b, rest) = InfoBlockSize::read_from_prefix(data).map_err(|_| bad_len())?;
                        if !rest.is_empty() {
                            return Err(bad_len().into());
                        }
                        let c = BlockSizeConstraints {
                            minimum: b.minimum.get(),
                            preferred: b.preferred.get(),
                            maximum: b.maximum.get(),
                        };
                        c.validate().map_err(|why| HandshakeViolation::BadBlockSize {
                            min: c.minimum,
                            pref: c.preferred,
                            max: c.maximum,
                            why,
                        })?;
                        info.block_size = Some(c);
                    }
                    _ => {} // unknown information types MUST be ignored
                }
                self.continue_option(Pending::Info { go, info, saw_export });
                Ok(())
            }
            (Pending::Info { go, info, saw_export }, ReplyType::ACK) => {
                if !saw_export {
                    return Err(HandshakeViolation::MissingInfoExport(option).into());
                }
                if go {
                    let mode = if self.extended {
                        Mode::Extended
                    } else if self.structured {
                        Mode::Structured
                    } else {
                        Mode::Simple
                    };
                    let name = info
                        .canonical_name
                        .clone()
                        .unwrap_or_else(|| info.requested_name.clone());
                    // Contexts only count for the export they were set on.
                    let contexts = match &self.contexts_export {
                        Some(e) if *e == info.requested_name => core::mem::take(&mut self.contexts),
                        _ => Vec::new(),
                    };
                    self.result = Some(Negotiated {
                        mode,
                        tls: self.tls,
                        export_name: name,
                        description: info.description,
                        size: info.size,
                        flags: info.flags.unwrap_or(TransmissionFlags::HAS_FLAGS),
                        block_size: info.block_size,
                        contexts,
                    });
                    self.phase = Phase::Done;
                    Ok(())
                } else {
                    self.option_finished(OptionOutcome::Info(info))
                }
            }
            (_, reply) => Err(HandshakeViolation::UnexpectedReply { option, reply }.into()),
        }
    }

    fn continue_option(&mut self, pending: Pending) {
        self.pending = Some(pending);
        self.expect(Recv::OptReplyHeader, OPTION_REPLY_HEADER_LEN);
    }

    fn handle_error(&mut self, pending: Pending, err: ServerOptionError) -> Result<(), HandshakeError> {
        match pending {
            Pending::StartTls => {
                if self.config.tls == TlsMode::Require {
                    return Err(HandshakeError::TlsUnavailable(err.message));
                }
                self.advance_auto()
            }
            Pending::ExtendedHeaders | Pending::StructuredReply => {
                if err.reply == ReplyType::ERR_TLS_REQD {
                    return Err(HandshakeError::TlsRequired(err.message));
                }
                if self.user_option {
                    return self.option_finished(OptionOutcome::Refused(err));
                }
                self.advance_auto()
            }
            Pending::SetMetaContext { .. } if !self.user_option => {
                if err.reply == ReplyType::ERR_TLS_REQD {
                    return Err(HandshakeError::TlsRequired(err.message));
                }
                // No contexts: block status will simply be unavailable.
                self.advance_auto()
            }
            Pending::Info { go: true, .. } if !self.user_option => {
                if err.reply == ReplyType::ERR_UNSUP {
                    if self.extended {
                        return Err(HandshakeViolation::GoUnsupportedWithExtendedHeaders.into());
                    }
                    self.export_name_fallback = true;
                    return self.send_export_name();
                }
                if err.reply == ReplyType::ERR_TLS_REQD {
                    return Err(HandshakeError::TlsRequired(err.message));
                }
                Err(err.into())
            }
            Pending::Abort => {
                self.phase = Phase::Aborted;
                Ok(())
            }
            _ => self.option_finished(OptionOutcome::Refused(err)),
        }
    }

    /// Whether the handshake fell back from GO to EXPORT_NAME.
    pub fn fell_back_to_export_name(&self) -> bool {
        self.export_name_fallback
    }
}

/// Refuses a metadata context beyond [`MAX_META_CONTEXT_REPLIES`].
fn check_meta_context_count(option: OptionType, got: &[MetaContext]) -> Result<(), HandshakeViolation> {
    if got.len() >= MAX_META_CONTEXT_REPLIES {
        return Err(HandshakeViolation::TooManyReplies {
            option,
            limit: MAX_META_CONTEXT_REPLIES,
        });
    }
    Ok(())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn check_len(n: usize) -> Result<(), HandshakeViolation> {
    if n > MAX_STRING_LEN {
        Err(HandshakeViolation::StringTooLong(n))
    } else {
        Ok(())
    }
}

fn check_string_len(s: &str) -> Result<(), HandshakeError> {
    if s.len() > MAX_STRING_LEN {
        return Err(HandshakeError::Misuse("string longer than 4096 bytes"));
    }
    if s.as_bytes().contains(&0) {
        return Err(HandshakeError::Misuse("string contains NUL"));
    }
    Ok(())
}

fn check_transmission_flags(bits: u16) -> Result<TransmissionFlags, HandshakeViolation> {
    let f = TransmissionFlags::from_bits_retain(bits);
    if !f.contains(TransmissionFlags::HAS_FLAGS) {
        return Err(HandshakeViolation::MissingHasFlags(bits));
    }
    Ok(f)
}

fn parse_meta_context(data: &[u8]) -> Result<MetaContext, HandshakeViolation> {
    if data.len() < 4 {
        return Err(HandshakeViolation::BadMetaContext("shorter than its 4-byte id"));
    }
    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let name = &data[4..];
    check_len(name.len())?;
    let name = core::str::from_utf8(name).map_err(|_| HandshakeViolation::BadMetaContext("name is not UTF-8"))?;
    if !name.contains(':') {
        return Err(HandshakeViolation::BadMetaContext("name has no namespace"));
    }
    Ok(MetaContext {
        id,
        name: name.to_owned(),
    })
}

/// Whether a context returned by the server answers a query we sent: the
/// exact name, or (for queries ending in `:`) any name in that namespace.
fn context_matches(query: &str, name: &str) -> bool {
    query == name || (query.ends_with(':') && name.starts_with(query))
}

fn encode_meta_context_request(export: &str, queries: &[&str]) -> Result<Vec<u8>, HandshakeError> {
    check_string_len(export)?;
    let mut data = Vec::with_capacity(8 + export.len() + queries.iter().map(|q| 4 + q.len()).sum::<usize>());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        check_string_len(q)?;
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(option: OptionType, reply: ReplyType, data: &[u8]) -> Vec<u8> {
        let h = OptionReplyHeader {
            magic: OPTION_REPLY_MAGIC.into(),
            option: option.0.into(),
            reply_type: reply.0.into(),
            length: (data.len() as u32).into(),
        };
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }

    /// A client in option mode, idle after the greeting.
    fn idle_client() -> ClientHandshake {
        let mut hs = ClientHandshake::new(ClientConfig {
            opt_mode: true,
            structured_replies: false,
            extended_headers: false,
            meta_contexts: Vec::new(),
            ..ClientConfig::default()
        });
        let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hs.received(&greeting).unwrap();
        hs.received(&HandshakeFlags::FIXED_NEWSTYLE.bits().to_be_bytes())
            .unwrap();
        assert!(matches!(hs.step(), HandshakeStep::Send(_)));
        hs.sent();
        assert_eq!(hs.step(), HandshakeStep::Negotiating);
        hs
    }

    /// Feeds one reply the way a driver would (header, then payload).
    fn feed(hs: &mut ClientHandshake, bytes: &[u8]) -> Result<(), HandshakeError> {
        hs.received(&bytes[..OPTION_REPLY_HEADER_LEN])?;
        if bytes.len() > OPTION_REPLY_HEADER_LEN {
            hs.received(&bytes[OPTION_REPLY_HEADER_LEN..])?;
        }
        Ok(())
    }

    /// Found while fuzzing: the replies to `NBD_OPT_LIST` and the
    /// meta-context options were collected without limit, so a server
    /// could make the client allocate (and, for SET_META_CONTEXT, compare
    /// ids) without bound by never sending the final ACK.
    #[test]
    fn replies_per_option_are_bounded() {
        let mut hs = idle_client();
        hs.opt_list().unwrap();
        hs.sent();
        let entry = reply(OptionType::LIST, ReplyType::SERVER, &[0, 0, 0, 1, b'x']);
        for _ in 0..MAX_EXPORT_LIST_ENTRIES {
            feed(&mut hs, &entry).unwrap();
        }
        assert_eq!(
            feed(&mut hs, &entry),
            Err(HandshakeViolation::TooManyReplies {
                option: OptionType::LIST,
                limit: MAX_EXPORT_LIST_ENTRIES
            }
            .into())
        );
        assert_eq!(hs.step(), HandshakeStep::Aborted);

        // Long descriptions hit the byte limit first.
        let mut hs = idle_client();
        hs.opt_list().unwrap();
        hs.sent();
        let mut data = alloc::vec![0, 0, 0, 1, b'x'];
        data.extend_from_slice(&[b'd'; MAX_STRING_LEN]);
        let entry = reply(OptionType::LIST, ReplyType::SERVER, &data);
        let fit = MAX_EXPORT_LIST_BYTES / (data.len() - 4);
        for _ in 0..fit {
            feed(&mut hs, &entry).unwrap();
        }
        assert!(matches!(
            feed(&mut hs, &entry),
            Err(HandshakeError::Violation(HandshakeViolation::TooManyReplies { .. }))
        ));

        for set in [false, true] {
            let mut hs = idle_client();
            let option = if set {
                hs.opt_set_meta_context("", &["qemu:dirty-bitmap:"]).unwrap();
                OptionType::SET_META_CONTEXT
            } else {
                hs.opt_list_meta_context("", &[]).unwrap();
                OptionType::LIST_META_CONTEXT
            };
            hs.sent();
            for id in 0..=MAX_META_CONTEXT_REPLIES as u32 {
                let mut data = (id + 1).to_be_bytes().to_vec();
                data.extend_from_slice(alloc::format!("qemu:dirty-bitmap:b{id}").as_bytes());
                let r = feed(&mut hs, &reply(option, ReplyType::META_CONTEXT, &data));
                if (id as usize) < MAX_META_CONTEXT_REPLIES {
                    r.unwrap();
                } else {
                    assert_eq!(
                        r,
                        Err(HandshakeViolation::TooManyReplies {
                            option,
                            limit: MAX_META_CONTEXT_REPLIES
                        }
                        .into())
                    );
                }
            }
        }
    }
}
