//! [`ServerSession`]: one object that owns a server connection's whole
//! life: the greeting, option haggling (and TLS), the choice of an export,
//! then transmission until the client disconnects.
//!
//! Which exports exist is answered through the [`ExportLookup`] trait, which
//! the session asks during the handshake; the export the client finally
//! chose is kept by the session ([`ServerSession::export`]), so the hand-off
//! from handshake to transmission happens in one place.
//!
//! The methods fall in the same families as the client's
//! ([`ClientSession`](crate::client::ClientSession)):
//!
//! - **input**: [`ServerSession::need`] says what comes next;
//!   [`ServerSession::feed`] takes any amount of bytes (the session buffers
//!   a partial header itself); a WRITE payload or bytes to drop can instead
//!   be moved by the driver and reported with
//!   [`ServerSession::payload_received`] and [`ServerSession::discarded`].
//! - **output**: [`ServerSession::poll_transmit`] appends handshake bytes to
//!   a buffer of the driver's. Replies in transmission are encoded with the
//!   [`ReplyEncoder`] from [`ServerSession::encoder`] (a small `Copy` value
//!   usable on any thread), into the driver's own buffers, because they are
//!   produced wherever the storage completes a request.
//! - **events**: [`ServerEvent`]s, returned by the input methods: transmission
//!   is ready, a request to execute, WRITE data (on the feed path), a request
//!   to refuse, the client's disconnect.
//! - **time**: [`ServerSession::handle_timeout`] tells the session the
//!   time; [`ServerSession::poll_timeout`] says when to tell it next (the
//!   handshake's deadline, [`ServerConfig::handshake_timeout`] from the
//!   first time the session learns, until transmission starts: see
//!   [`crate::time`]).
//! - **getters**: the negotiated values, the chosen export.
//!
//! # The order a driver calls them in
//!
//! ```text
//! loop {
//!     session.handle_timeout(now)   (the first call starts the handshake's
//!                                    deadline; an expired one closes)
//!     while session.poll_transmit(&mut out).is_some() { send `out` }
//!     match session.need() {
//!         Bytes(n)            => read up to n bytes (exactly n before TLS),
//!                                feed them
//!         Payload{request,..} => move up to `length` bytes of the WRITE
//!                                payload into storage at
//!                                request.offset + offset, then
//!                                payload_received(k) (or feed them and get
//!                                ServerEvent::WriteData)
//!         Discard(n)          => read and drop up to n bytes, discarded(k)
//!         StartTls(t)         => send all output, run the TLS server
//!                                handshake, t.established()
//!         Closed              => finish the requests in flight, send what
//!                                is left, close
//!     }
//!     // `feed` returns at most one event; call it again with what it did
//!     // not consume until it consumes nothing and returns no event.
//!     // Whatever the driver waits for (the client, the TLS handshake), it
//!     // also waits for a timer at session.poll_timeout(), if any, and
//!     // calls session.handle_timeout(now) when that fires.
//! }
//! ```
//!
//! The session performs no I/O, reads no clock (a driver that never calls
//! [`ServerSession::handle_timeout`] has no handshake deadline) and never
//! panics on what a client sends.

use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use super::handshake::{
    ExportDetails, ExportListing, ServerConfig, ServerHandshake, ServerHandshakeError, ServerNegotiated, ServerStep,
};
use super::transmission::{
    ReplyEncoder, RequestEvent, ServerReceive, ServerRequest, ServerTransmission, ServerTransmissionError,
};
use crate::common::{Interest, MetaContext, Mode};
use crate::time::{Deadline, TimedOut, Timer, Timestamp};
use crate::wire::{BlockSizeConstraints, ErrorCode, TransmissionFlags};

/// The exports a server offers, as the session asks about them.
///
/// The session resolves the spec's "empty name means the default export":
/// it asks [`ExportLookup::lookup`] for `""` first, and if there is no
/// export of that name, [`ExportLookup::default_export`].
pub trait ExportLookup {
    /// What the driver keeps of a chosen export (an index, a handle to its
    /// storage, ...): the session hands it back through
    /// [`ServerSession::export`] once transmission starts.
    type Export;

    /// The export named exactly `name`, with what the handshake tells the
    /// client about it, or `None` if there is none.
    fn lookup(&self, name: &str) -> Option<(ExportDetails, Self::Export)>;

    /// The export a client gets when it names none (`""`) and no export is
    /// named `""`. The default: none.
    fn default_export(&self) -> Option<(ExportDetails, Self::Export)> {
        None
    }

    /// Calls `each` for every export `NBD_OPT_LIST` shows. (The session
    /// hides TLS-only exports from clients without TLS.)
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>));
}

/// Exports shared by many connections' sessions.
impl<T: ExportLookup + ?Sized> ExportLookup for alloc::sync::Arc<T> {
    type Export = T::Export;
    fn lookup(&self, name: &str) -> Option<(ExportDetails, T::Export)> {
        (**self).lookup(name)
    }
    fn default_export(&self) -> Option<(ExportDetails, T::Export)> {
        (**self).default_export()
    }
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        (**self).list(each)
    }
}

/// Why the session cannot go on: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerSessionError {
    /// The handshake ended without transmission (a violation by the
    /// client, an unknown export with `NBD_OPT_EXPORT_NAME`, too many
    /// options, ...).
    #[error(transparent)]
    Handshake(#[from] ServerHandshakeError),
    /// The client broke a rule of transmission.
    #[error(transparent)]
    Transmission(#[from] ServerTransmissionError),
    /// The driver called a method the session's state does not allow
    /// (nothing changed).
    #[error("server session misuse: {0}")]
    Misuse(&'static str),
    /// The session is over.
    #[error("the session is closed")]
    Closed,
    /// The handshake did not reach transmission in time
    /// ([`ServerConfig::handshake_timeout`], counted from the first
    /// [`ServerSession::handle_timeout`]).
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
}

/// What the session needs from the driver next.
#[derive(Debug)]
#[must_use]
#[non_exhaustive]
pub enum ServerNeed<'a> {
    /// Bytes from the client: read up to this many (exactly this many
    /// before TLS may start) and pass them to [`ServerSession::feed`].
    Bytes(usize),
    /// The next `length` bytes are WRITE payload of `request`, starting
    /// `offset` bytes into its payload (so they belong at
    /// `request.offset + offset` of the export). Move up to `length` of them
    /// into storage, then call [`ServerSession::payload_received`] (or pass
    /// them to [`ServerSession::feed`], which hands them back as
    /// [`ServerEvent::WriteData`]).
    Payload {
        /// The WRITE they belong to.
        request: ServerRequest,
        /// Bytes of this payload received before.
        offset: u64,
        /// Bytes still to come.
        length: u64,
    },
    /// Read and drop up to this many bytes (data the server does not use:
    /// never buffer it), then call [`ServerSession::discarded`] with the
    /// count (or pass them to [`ServerSession::feed`]). It can be up to 4 GiB;
    /// a driver that deems that abusive may close instead.
    Discard(u64),
    /// The client asked for TLS and the acknowledgement is queued: send all
    /// output, run the TLS server handshake, then call
    /// [`ServerStartTls::established`] (or close if TLS failed).
    StartTls(ServerStartTls<'a>),
    /// Nothing more is read: send the rest of the output (and the replies
    /// of requests in flight), then close.
    Closed,
}

/// The handle of the TLS upgrade: only it can tell the session that TLS is
/// running (see [`ServerNeed::StartTls`]).
#[derive(Debug)]
#[must_use = "the session waits until the TLS upgrade is reported"]
pub struct ServerStartTls<'a> {
    handshake: &'a mut ServerHandshake,
}

impl ServerStartTls<'_> {
    /// The TLS handshake succeeded: negotiation goes on over TLS (and
    /// everything negotiated before it is forgotten).
    pub fn established(self) -> Result<(), ServerSessionError> {
        self.handshake.tls_established().map_err(Into::into)
    }
}

/// Something that happened, returned by the input methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent<'a> {
    /// The handshake is complete: [`ServerSession::export`] is the export
    /// chosen and [`ServerSession::negotiated`] what was negotiated.
    Ready,
    /// The client ended the handshake with `NBD_OPT_ABORT` (acknowledged:
    /// send the output, then close).
    Aborted,
    /// A valid request: execute it and reply. For a WRITE with a payload,
    /// [`ServerSession::need`] announces the payload next.
    Request(ServerRequest),
    /// WRITE payload bytes (only from [`ServerSession::feed`]): they belong
    /// `offset` bytes into `request`'s payload. `last` is set on the piece
    /// that completes it.
    WriteData {
        /// The WRITE.
        request: ServerRequest,
        /// Where in the payload these bytes go.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
        /// This piece completes the payload.
        last: bool,
    },
    /// A request the server must refuse: reply with this error (with
    /// [`ReplyEncoder::reply_error`]). A payload it carried is dropped by
    /// the session.
    Reject {
        /// The request as decoded.
        request: ServerRequest,
        /// The error to reply with.
        error: ErrorCode,
        /// Why, for the error's message and for logs.
        reason: &'static str,
    },
    /// `NBD_CMD_DISC`: no reply; finish the requests in flight, then close.
    Disconnect,
}

#[derive(Debug)]
enum State {
    Handshake(ServerHandshake),
    Transmission(ServerTransmission, ServerNegotiated),
    Closed,
}

/// A server connection's whole life, sans-IO: see the [module docs](self)
/// for the order in which a driver calls its methods.
///
/// ```
/// use nbd_proto::server::{ExportDetails, ExportListing, ExportLookup, ServerConfig, ServerNeed, ServerSession};
///
/// /// One export of 1 MiB, whatever the client asks for.
/// struct One;
/// impl ExportLookup for One {
///     type Export = ();
///     fn lookup(&self, name: &str) -> Option<(ExportDetails, ())> {
///         name.is_empty().then(|| (ExportDetails::new("", 1 << 20), ()))
///     }
///     fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
///         each(ExportListing { name: "", description: "", tls_only: false });
///     }
/// }
///
/// let mut session = ServerSession::new(ServerConfig::default(), One);
/// let mut out = Vec::new();
/// assert!(session.poll_transmit(&mut out).is_some()); // the greeting
/// assert_eq!(&out[..8], b"NBDMAGIC");
/// assert!(matches!(session.need(), ServerNeed::Bytes(4))); // client flags
/// ```
pub struct ServerSession<E: ExportLookup> {
    exports: E,
    state: State,
    /// The export of the last lookup (the one `NBD_OPT_GO` or
    /// `NBD_OPT_EXPORT_NAME` made, once the handshake is done).
    chosen: Option<E::Export>,
    handshake_timeout: Option<Duration>,
    /// The last time the driver gave ([`ServerSession::handle_timeout`]).
    now: Option<Timestamp>,
    /// The handshake's deadline, once started (until transmission).
    timer: Option<Timer>,
    unnegotiated_max_payload: u64,
    partial: Vec<u8>,
    /// Bytes of the current payload (or discard) already taken.
    progress: u64,
    out: Vec<u8>,
    out_pos: usize,
    failed: Option<ServerSessionError>,
    /// [`ServerEvent::Ready`] was handed out.
    ready_reported: bool,
}

impl<E: ExportLookup> core::fmt::Debug for ServerSession<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServerSession")
            .field("state", &self.state)
            .field("chosen", &self.chosen.is_some())
            .field("failed", &self.failed)
            .finish()
    }
}

impl<E: ExportLookup> ServerSession<E> {
    /// A session negotiating as `config` says (see [`ServerConfig`] for
    /// every default), offering the exports of `exports`.
    pub fn new(config: ServerConfig, exports: E) -> ServerSession<E> {
        let handshake_timeout = config.handshake_timeout;
        let unnegotiated_max_payload = config.unnegotiated_max_payload;
        let mut s = ServerSession {
            exports,
            state: State::Handshake(ServerHandshake::new(config)),
            chosen: None,
            handshake_timeout,
            now: None,
            timer: None,
            unnegotiated_max_payload,
            partial: Vec::new(),
            progress: 0,
            out: Vec::with_capacity(64),
            out_pos: 0,
            failed: None,
            ready_reported: false,
        };
        if let Err(e) = s.pump_handshake() {
            s.failed = Some(e);
        }
        s
    }

    // ----- input -----------------------------------------------------------

    /// What the session needs next.
    #[must_use = "the driver must do what the session needs next"]
    pub fn need(&mut self) -> ServerNeed<'_> {
        if self.failed.is_some() {
            return ServerNeed::Closed;
        }
        let partial = self.partial.len();
        match &mut self.state {
            State::Handshake(hs) => match hs.step() {
                ServerStep::Receive(n) => ServerNeed::Bytes(n.saturating_sub(partial)),
                ServerStep::Discard(n) => ServerNeed::Discard((n as u64).saturating_sub(self.progress)),
                ServerStep::StartTls => ServerNeed::StartTls(ServerStartTls { handshake: hs }),
                // Send, LookupExport and ListExports are handled inside;
                // Done becomes Transmission as soon as it is reached.
                ServerStep::Aborted | ServerStep::Closed => ServerNeed::Closed,
                ServerStep::Send(_) | ServerStep::LookupExport { .. } | ServerStep::ListExports | ServerStep::Done => {
                    ServerNeed::Bytes(0)
                }
            },
            // The handshake's last bytes first (see `feed`).
            State::Transmission(..) if self.out_pos < self.out.len() => ServerNeed::Bytes(0),
            State::Transmission(tx, _) => match tx.next() {
                ServerReceive::Bytes(n) => ServerNeed::Bytes(n.saturating_sub(partial)),
                ServerReceive::Payload { length, .. } => match tx.pending_request() {
                    Some(request) => ServerNeed::Payload {
                        request,
                        offset: self.progress,
                        length: length - self.progress,
                    },
                    None => ServerNeed::Closed,
                },
                ServerReceive::Discard(n) => ServerNeed::Discard(n - self.progress),
                ServerReceive::Closed => ServerNeed::Closed,
            },
            State::Closed => ServerNeed::Closed,
        }
    }

    /// Takes bytes from the client: consumes what it can, up to the next
    /// event, and returns how many bytes it consumed and that event, if
    /// any. Call it again with what it did not consume until a call
    /// consumes nothing and returns no event. It never consumes past the
    /// `NBD_OPT_STARTTLS` that asks for TLS.
    ///
    /// **Output order.** Every handshake byte comes from
    /// [`ServerSession::poll_transmit`]; replies are the driver's own
    /// (made with [`ServerSession::encoder`]). So that no reply can go out
    /// before the handshake's last bytes (a client may send its first
    /// requests right behind `NBD_OPT_GO`), no request is decoded while
    /// `poll_transmit` still has something to give: `feed` consumes
    /// nothing until the driver took it.
    ///
    /// An event borrows only `input` (WRITE data), never the session, so
    /// the driver can ask the session ([`ServerSession::encoder`],
    /// [`ServerSession::export`], ...) while it handles the event.
    #[must_use = "the bytes used must be dropped from the input and the event handled"]
    pub fn feed<'i>(&mut self, input: &'i [u8]) -> Result<(usize, Option<ServerEvent<'i>>), ServerSessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !matches!(self.state, State::Transmission(..)) {
            return match self.feed_handshake(input) {
                Ok(x) => Ok(x),
                Err(e) => Err(self.fail(e)),
            };
        }
        if !self.ready_reported {
            // Transmission started without input (oldstyle: right after
            // the greeting).
            self.ready_reported = true;
            return Ok((0, Some(ServerEvent::Ready)));
        }
        if self.has_output() {
            // Output order: no request is decoded (so no reply can be
            // made) while handshake bytes still wait in `poll_transmit`,
            // whatever order the driver appends its replies in.
            return Ok((0, None));
        }
        let ServerSession {
            state,
            partial,
            progress,
            failed,
            ..
        } = self;
        let State::Transmission(tx, _) = state else {
            return Ok((0, None));
        };
        let r = feed_transmission(tx, partial, progress, input);
        if let Err(e) = &r
            && !matches!(e, ServerSessionError::Misuse(_))
        {
            *failed = Some(e.clone());
        }
        r
    }

    /// The driver moved `n` bytes of the WRITE payload announced by
    /// [`ServerNeed::Payload`] into storage. Returns `true` when the payload
    /// is complete (the WRITE can be acknowledged once storage has it).
    #[must_use = "a complete WRITE must be acknowledged once storage has it"]
    pub fn payload_received(&mut self, n: u64) -> Result<bool, ServerSessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let State::Transmission(tx, _) = &mut self.state else {
            return Err(ServerSessionError::Misuse("payload_received() outside transmission"));
        };
        let ServerReceive::Payload { length, .. } = tx.next() else {
            return Err(ServerSessionError::Misuse(
                "payload_received() while no payload is announced",
            ));
        };
        if n > length - self.progress {
            return Err(ServerSessionError::Misuse(
                "payload_received() with more bytes than announced",
            ));
        }
        self.progress += n;
        if self.progress < length {
            return Ok(false);
        }
        self.progress = 0;
        tx.payload_received()?;
        Ok(true)
    }

    /// The driver read and dropped `n` of the bytes announced by
    /// [`ServerNeed::Discard`].
    pub fn discarded(&mut self, n: u64) -> Result<(), ServerSessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let total = match &mut self.state {
            State::Handshake(hs) => match hs.step() {
                ServerStep::Discard(t) => t as u64,
                _ => {
                    return Err(ServerSessionError::Misuse(
                        "discarded() while nothing is to be discarded",
                    ));
                }
            },
            State::Transmission(tx, _) => match tx.next() {
                ServerReceive::Discard(t) => t,
                _ => {
                    return Err(ServerSessionError::Misuse(
                        "discarded() while nothing is to be discarded",
                    ));
                }
            },
            State::Closed => return Err(ServerSessionError::Closed),
        };
        if n > total - self.progress {
            return Err(ServerSessionError::Misuse("discarded() with more bytes than announced"));
        }
        self.progress += n;
        if self.progress < total {
            return Ok(());
        }
        self.progress = 0;
        let r = match &mut self.state {
            State::Handshake(hs) => hs.discarded().map_err(ServerSessionError::from),
            State::Transmission(tx, _) => tx.discarded().map_err(ServerSessionError::from),
            State::Closed => Ok(()),
        };
        r.and_then(|()| self.pump_handshake()).map_err(|e| self.fail(e))
    }

    // ----- output ----------------------------------------------------------

    /// Appends the next handshake bytes to send to `buf` (the driver's own
    /// buffer); `None` when there is nothing to send. Replies in
    /// transmission come from [`ServerSession::encoder`] instead.
    #[must_use = "the appended bytes must be sent"]
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<()> {
        if self.out_pos >= self.out.len() {
            return None;
        }
        buf.extend_from_slice(&self.out[self.out_pos..]);
        self.out.clear();
        self.out_pos = 0;
        Some(())
    }

    /// Whether [`ServerSession::poll_transmit`] has something to give.
    pub fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// What the session wants from the socket now (see [`Interest`]):
    /// bytes from the client unless it waits on the driver (TLS to start)
    /// or is closed, and writability while handshake bytes wait.
    pub fn interest(&self) -> Interest {
        let read = self.failed.is_none()
            && match &self.state {
                State::Handshake(hs) => !matches!(
                    hs.step(),
                    ServerStep::StartTls | ServerStep::Aborted | ServerStep::Closed
                ),
                State::Transmission(tx, _) => !matches!(tx.next(), ServerReceive::Closed),
                State::Closed => false,
            };
        Interest {
            read,
            write: self.has_output(),
        }
    }

    /// The encoder of this connection's replies (once [`ServerEvent::Ready`]).
    pub fn encoder(&self) -> Option<ReplyEncoder> {
        match &self.state {
            State::Transmission(tx, _) => Some(tx.encoder()),
            _ => None,
        }
    }

    // ----- control ---------------------------------------------------------

    /// The server is shutting down: options other than `NBD_OPT_ABORT` are
    /// refused with `NBD_REP_ERR_SHUTDOWN` and requests with `NBD_ESHUTDOWN`,
    /// as the spec advises.
    pub fn shutdown(&mut self) {
        match &mut self.state {
            State::Handshake(hs) => hs.shutdown(),
            State::Transmission(tx, _) => tx.shutdown(),
            State::Closed => {}
        }
    }

    /// The connection ended (EOF, a socket error): the session is closed.
    pub fn connection_lost(&mut self) {
        self.state = State::Closed;
        self.out.clear();
        self.out_pos = 0;
    }

    // ----- time ------------------------------------------------------------

    /// The time is `now` (see [`crate::time`]): call it at the top of each
    /// turn of the driver's loop and when the timer armed at
    /// [`ServerSession::poll_timeout`] fires. The first call starts the
    /// handshake's deadline ([`ServerConfig::handshake_timeout`], if any);
    /// once `now` reaches it before transmission started, the session
    /// fails with [`ServerSessionError::TimedOut`]: the input methods
    /// return that error, [`ServerSession::need`] says
    /// [`ServerNeed::Closed`], and the driver closes the connection.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let first = self.now.is_none();
        self.now = Some(now);
        if !matches!(self.state, State::Handshake(_)) || self.failed.is_some() {
            self.timer = None;
            return;
        }
        if first && let Some(after) = self.handshake_timeout {
            self.timer = Some(Timer::start(now, Deadline::Handshake, after));
        }
        if let Some(timer) = self.timer
            && now >= timer.at
        {
            self.timer = None;
            self.failed = Some(ServerSessionError::TimedOut(timer.expired));
        }
    }

    /// When to call [`ServerSession::handle_timeout`] next (the handshake's
    /// deadline), or `None`: no deadline is pending (the session has not
    /// learnt the time, has none, reached transmission, or is over).
    #[must_use = "the driver must arm a timer at the deadline"]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match self.state {
            State::Handshake(_) if self.failed.is_none() => self.timer.map(|t| t.at),
            _ => None,
        }
    }

    // ----- getters ---------------------------------------------------------

    /// Why the session failed, if it did: the error its input methods
    /// return (a [`ServerSessionError::TimedOut`] from
    /// [`ServerSession::handle_timeout`], a client's violation, ...).
    pub fn error(&self) -> Option<&ServerSessionError> {
        self.failed.as_ref()
    }

    /// The largest READ or WRITE payload this connection accepts (once
    /// [`ServerEvent::Ready`]; 0 before).
    pub fn max_payload(&self) -> u64 {
        match &self.state {
            State::Transmission(tx, _) => tx.max_payload(),
            _ => 0,
        }
    }

    /// The export the client chose (once [`ServerEvent::Ready`]).
    pub fn export(&self) -> Option<&E::Export> {
        match self.state {
            State::Transmission(..) => self.chosen.as_ref(),
            _ => None,
        }
    }

    /// The exports this session offers.
    pub fn exports(&self) -> &E {
        &self.exports
    }

    /// What was negotiated (once [`ServerEvent::Ready`]).
    pub fn negotiated(&self) -> Option<&ServerNegotiated> {
        match &self.state {
            State::Transmission(_, n) => Some(n),
            _ => None,
        }
    }

    /// The protocol flavour (once ready).
    pub fn mode(&self) -> Option<Mode> {
        self.negotiated().map(|n| n.mode)
    }

    /// The export's size (0 before ready).
    pub fn size(&self) -> u64 {
        self.negotiated().map_or(0, |n| n.size)
    }

    /// The transmission flags sent (empty before ready).
    pub fn flags(&self) -> TransmissionFlags {
        self.negotiated().map_or(TransmissionFlags::empty(), |n| n.flags)
    }

    /// The block-size constraints enforced.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.negotiated().map(ServerNegotiated::constraints).unwrap_or_default()
    }

    /// The metadata contexts selected, with their ids.
    pub fn contexts(&self) -> &[MetaContext] {
        self.negotiated().map_or(&[], |n| &n.contexts)
    }

    /// The contexts a BLOCK_STATUS request must be answered for (one
    /// status chunk each), with their index in [`ServerSession::contexts`].
    pub fn selected_contexts(&self, request: &ServerRequest) -> impl Iterator<Item = (usize, &MetaContext)> + '_ {
        let sel = request.contexts;
        self.contexts()
            .iter()
            .enumerate()
            .filter(move |(i, _)| sel.includes(*i))
    }

    /// Whether TLS is running.
    pub fn tls(&self) -> bool {
        match &self.state {
            State::Handshake(hs) => hs.tls(),
            State::Transmission(_, n) => n.tls,
            State::Closed => false,
        }
    }

    /// Whether the session is over (nothing more will be read).
    pub fn is_closed(&self) -> bool {
        self.failed.is_some() || matches!(self.state, State::Closed)
    }

    // ----- internals -------------------------------------------------------

    fn fail(&mut self, e: ServerSessionError) -> ServerSessionError {
        if !matches!(e, ServerSessionError::Misuse(_)) {
            self.failed = Some(e.clone());
        }
        e
    }

    /// Runs the handshake machine as far as it goes without the driver:
    /// queues its output, answers lookups and lists, and starts
    /// transmission when it is done.
    fn pump_handshake(&mut self) -> Result<(), ServerSessionError> {
        loop {
            let State::Handshake(hs) = &mut self.state else {
                return Ok(());
            };
            match hs.step() {
                ServerStep::Send(bytes) => {
                    self.out.extend_from_slice(bytes);
                    hs.sent();
                }
                ServerStep::LookupExport { name } => {
                    let found = self.exports.lookup(name).or_else(|| {
                        if name.is_empty() {
                            self.exports.default_export()
                        } else {
                            None
                        }
                    });
                    let (details, export) = match found {
                        Some((d, e)) => (Some(d), Some(e)),
                        None => (None, None),
                    };
                    self.chosen = export;
                    hs.answer_export(details)?;
                }
                ServerStep::ListExports => {
                    let mut names: Vec<(String, String, bool)> = Vec::new();
                    self.exports.list(&mut |e| {
                        names.push((e.name.into(), e.description.into(), e.tls_only));
                    });
                    let listing: Vec<ExportListing<'_>> = names
                        .iter()
                        .map(|(name, description, tls_only)| ExportListing {
                            name,
                            description,
                            tls_only: *tls_only,
                        })
                        .collect();
                    hs.answer_list(&listing)?;
                }
                ServerStep::Done => {
                    let State::Handshake(hs) = core::mem::replace(&mut self.state, State::Closed) else {
                        return Err(ServerSessionError::Closed);
                    };
                    let negotiated = hs.finish()?;
                    // The handshake's deadline ends with it.
                    self.timer = None;
                    let mut tx = ServerTransmission::new(&negotiated);
                    tx.set_unnegotiated_max_payload(self.unnegotiated_max_payload);
                    self.state = State::Transmission(tx, negotiated);
                    return Ok(());
                }
                ServerStep::Receive(_)
                | ServerStep::Discard(_)
                | ServerStep::StartTls
                | ServerStep::Aborted
                | ServerStep::Closed => return Ok(()),
            }
        }
    }

    fn feed_handshake(&mut self, input: &[u8]) -> Result<(usize, Option<ServerEvent<'static>>), ServerSessionError> {
        let mut consumed = 0;
        loop {
            self.pump_handshake()?;
            let hs = match &mut self.state {
                State::Handshake(hs) => hs,
                State::Transmission(..) => {
                    self.ready_reported = true;
                    return Ok((consumed, Some(ServerEvent::Ready)));
                }
                State::Closed => return Ok((consumed, None)),
            };
            let rest = &input[consumed..];
            match hs.step() {
                ServerStep::Receive(n) => {
                    if self.partial.is_empty() && rest.len() >= n {
                        hs.received(&rest[..n])?;
                        consumed += n;
                        continue;
                    }
                    let take = (n - self.partial.len()).min(rest.len());
                    self.partial.extend_from_slice(&rest[..take]);
                    consumed += take;
                    if self.partial.len() < n {
                        return Ok((consumed, None));
                    }
                    let r = hs.received(&self.partial);
                    self.partial.clear();
                    r?;
                }
                ServerStep::Discard(n) => {
                    let left = n as u64 - self.progress;
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    if take == 0 {
                        return Ok((consumed, None));
                    }
                    consumed += take;
                    self.progress += take as u64;
                    if self.progress == n as u64 {
                        self.progress = 0;
                        hs.discarded()?;
                    }
                }
                ServerStep::Aborted => {
                    self.state = State::Closed;
                    return Ok((consumed, Some(ServerEvent::Aborted)));
                }
                _ => return Ok((consumed, None)),
            }
        }
    }
}

/// Transmission input: see [`ServerSession::feed`].
fn feed_transmission<'i>(
    tx: &mut ServerTransmission,
    partial: &mut Vec<u8>,
    progress: &mut u64,
    input: &'i [u8],
) -> Result<(usize, Option<ServerEvent<'i>>), ServerSessionError> {
    let mut consumed = 0;
    loop {
        let rest = &input[consumed..];
        match tx.next() {
            ServerReceive::Closed => return Ok((consumed, None)),
            ServerReceive::Payload { length, .. } => {
                let Some(request) = tx.pending_request() else {
                    return Err(ServerSessionError::Closed);
                };
                let left = length - *progress;
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                if take == 0 {
                    return Ok((consumed, None));
                }
                let offset = *progress;
                *progress += take as u64;
                let last = *progress == length;
                if last {
                    *progress = 0;
                    tx.payload_received()?;
                }
                return Ok((
                    consumed + take,
                    Some(ServerEvent::WriteData {
                        request,
                        offset,
                        data: &rest[..take],
                        last,
                    }),
                ));
            }
            ServerReceive::Discard(n) => {
                let left = n - *progress;
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                if take == 0 {
                    return Ok((consumed, None));
                }
                consumed += take;
                *progress += take as u64;
                if *progress == n {
                    *progress = 0;
                    tx.discarded()?;
                }
            }
            ServerReceive::Bytes(n) => {
                let unit: &[u8] = if partial.is_empty() && rest.len() >= n {
                    consumed += n;
                    &rest[..n]
                } else {
                    if rest.is_empty() {
                        return Ok((consumed, None));
                    }
                    let take = (n - partial.len()).min(rest.len());
                    partial.extend_from_slice(&rest[..take]);
                    consumed += take;
                    if partial.len() < n {
                        return Ok((consumed, None));
                    }
                    let ev = tx.handle_bytes(partial);
                    partial.clear();
                    match request_event(ev?) {
                        Some(ev) => return Ok((consumed, Some(ev))),
                        None => continue,
                    }
                };
                if let Some(ev) = request_event(tx.handle_bytes(unit)?) {
                    return Ok((consumed, Some(ev)));
                }
            }
        }
    }
}

fn request_event(ev: RequestEvent) -> Option<ServerEvent<'static>> {
    match ev {
        RequestEvent::Continue => None,
        RequestEvent::Request(r) => Some(ServerEvent::Request(r)),
        RequestEvent::Reject { request, error, reason } => Some(ServerEvent::Reject { request, error, reason }),
        RequestEvent::Disconnect => Some(ServerEvent::Disconnect),
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
