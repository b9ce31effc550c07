//! [`ClientSession`]: one object that owns a client connection's whole
//! life, from the server's greeting through option haggling (and TLS) to
//! transmission and its end.
//!
//! A driver owns the socket (and TLS, and timers) and pumps the session.
//! Its methods fall in four families:
//!
//! - **input**: [`ClientSession::need`] says what the session needs next;
//!   bytes from the server go in with [`ClientSession::feed`] (any amount:
//!   the session consumes what it can and buffers a partial header itself)
//!   or, for READ data that the driver moves straight into the caller's
//!   buffer, by reporting the count with [`ClientSession::data_received`].
//! - **output**: [`ClientSession::poll_transmit`] appends the next bytes to
//!   send to a buffer of the driver's and says whether a WRITE payload (the
//!   caller's own data, never copied by the session) goes right after them.
//! - **events**: [`ClientEvent`]s are returned by the input methods: the
//!   handshake finished, an option's outcome, READ data (on the feed path),
//!   holes, block-status extents, a request's completion.
//! - **commands and getters**: [`ClientSession::start_request`], the
//!   option-mode `opt_*` methods, [`ClientSession::disconnect`], and what
//!   was negotiated.
//!
//! # The order a driver calls them in
//!
//! ```text
//! loop {
//!     session.handle_timeout(now)   // with deadlines (see below)
//!     while let Some(t) = session.poll_transmit(&mut out) {
//!         send `out` (and then, if t.payload is Some, that WRITE's data)
//!     }
//!     match session.need() {
//!         Bytes(n)      => read up to n bytes (exactly n if you must not
//!                          over-read), then feed them
//!         Data {..}     => read up to `length` bytes into the request's
//!                          buffer at `buf_offset`, then data_received(k)
//!         Pending       => feed(&[]): an event is waiting
//!         StartTls(t)   => send all output, run the TLS client handshake on
//!                          the socket, then t.established()
//!         Negotiating   => option mode: call an opt_* method
//!         Idle          => transmission with nothing to read: wait for the
//!                          caller (start_request) or for the socket
//!         Closed        => close the socket
//!     }
//!     // before blocking: arm a timer at session.poll_timeout()
//!     // `feed` returns at most one event; call it again with what it did
//!     // not consume until it consumes nothing and returns no event.
//! }
//! ```
//!
//! A buffered event loop feeds whatever it read and needs no reassembly
//! code of its own; a zero-copy driver reads exactly the counts
//! [`ClientNeed::Bytes`] gives and moves READ data itself. The two can be
//! mixed. Before `NBD_OPT_STARTTLS` is acknowledged the session never
//! consumes a byte past the acknowledgement, so what a driver read beyond
//! it (nothing, if it read exact counts) belongs to TLS.
//!
//! The session performs no I/O and reads no clock, but it decides its
//! deadlines ([`ClientConfig::handshake_timeout`],
//! [`ClientConfig::request_timeout`]) from the time the driver gives it:
//! a driver calls [`ClientSession::handle_timeout`] with the time at each
//! turn of its loop (and after starting requests or options), and arms one
//! timer at [`ClientSession::poll_timeout`]; when it fires, it calls
//! `handle_timeout` again. An expired deadline fails the session with
//! [`ClientSessionError::TimedOut`] (see [`crate::time`]). It allocates while negotiating (option replies, names) and, in
//! transmission, only until its buffers have grown to the batch sizes the
//! driver uses.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::handshake::{ClientConfig, ClientHandshake, HandshakeError, HandshakeStep, Negotiated, OptionOutcome};
use super::transmission::{
    ClientTransmission, Cookie, Extents, ReceiveNext, ReplyEvent, ReplyViolation, Request, RequestError, ServerError,
};
use crate::common::{Interest, MetaContext, Mode};
use crate::time::{Deadline, TimedOut, Timer, Timestamp};
use crate::wire::{BlockSizeConstraints, Command, TransmissionFlags};

/// Why the session cannot go on: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientSessionError {
    /// The handshake failed: a violation by the server, a refusal the
    /// client cannot do without, TLS unavailable, ...
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The server broke a rule of transmission.
    #[error("protocol violation by server: {0}")]
    Violation(#[from] ReplyViolation),
    /// The driver called a method the session's state does not allow
    /// (nothing changed).
    #[error("client session misuse: {0}")]
    Misuse(&'static str),
    /// The session is over (it failed earlier, was aborted, or the
    /// connection was lost).
    #[error("the session is closed")]
    Closed,
    /// A deadline passed: the handshake's, or a request's (the connection
    /// is deemed broken; [`ClientSession::connection_lost`] gives the
    /// requests that were in flight).
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
}

/// What the session needs from the driver next (see the module docs for
/// the loop a driver runs).
#[derive(Debug)]
#[must_use]
#[non_exhaustive]
pub enum ClientNeed<'a> {
    /// Bytes from the server: read up to this many and pass them to
    /// [`ClientSession::feed`]. Reading exactly this many never reads past
    /// what the session will consume (which matters before TLS starts).
    Bytes(usize),
    /// The next `length` bytes from the server are READ data of `cookie`,
    /// to be placed at `buf_offset` in that request's buffer. Move up to
    /// `length` bytes there and report the count with
    /// [`ClientSession::data_received`] (or pass them to
    /// [`ClientSession::feed`], which hands them back as
    /// [`ClientEvent::Data`]).
    #[non_exhaustive]
    Data {
        /// The request.
        cookie: Cookie,
        /// Where in the request's buffer the bytes go.
        buf_offset: u64,
        /// Where in the export the bytes are from (the request's offset
        /// plus `buf_offset`).
        offset: u64,
        /// How many bytes of this request's data follow on the wire.
        length: u64,
    },
    /// An event is waiting: call [`ClientSession::feed`] with an empty slice.
    Pending,
    /// The server accepted `NBD_OPT_STARTTLS`: send whatever
    /// [`ClientSession::poll_transmit`] still gives, run the TLS client
    /// handshake over the socket, then call [`ClientStartTls::established`]
    /// (or close the connection if TLS failed).
    StartTls(ClientStartTls<'a>),
    /// Option mode ([`ClientConfig::opt_mode`]): the session waits for an
    /// option (`opt_list`, `opt_info`, `opt_go`, ...).
    Negotiating,
    /// In transmission with nothing in flight: nothing is expected from the
    /// server. (A driver may still read, to notice that the server closed.)
    Idle,
    /// The session is over: send what is left to send, then close.
    Closed,
}

/// The handle of the TLS upgrade: only it can tell the session that TLS is
/// running (see [`ClientNeed::StartTls`]).
#[derive(Debug)]
#[must_use = "the session waits until the TLS upgrade is reported"]
pub struct ClientStartTls<'a> {
    session: &'a mut ClientSession,
}

impl ClientStartTls<'_> {
    /// The TLS handshake succeeded: negotiation goes on over TLS (and
    /// everything negotiated before is forgotten, as the spec requires).
    pub fn established(self) -> Result<(), ClientSessionError> {
        let State::Handshake(hs) = &mut self.session.state else {
            return Err(ClientSessionError::Misuse("no TLS upgrade is pending"));
        };
        // TLS is running whatever happens next: an error here (even a
        // misuse, such as a configured name the machine cannot send) ends
        // the session.
        match hs.tls_established() {
            Ok(()) => {
                self.session.pump_handshake_output();
                Ok(())
            }
            Err(e) => Err(self.session.fail(e.into())),
        }
    }
}

/// Something that happened, returned by the input methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientEvent<'a> {
    /// The handshake is complete: transmission starts, and
    /// [`ClientSession::negotiated`] tells what was negotiated.
    Connected,
    /// Option mode: the option issued last finished with this outcome (a
    /// refusal is [`OptionOutcome::Refused`], not an error).
    OptionDone(OptionOutcome),
    /// Option mode: the server acknowledged `NBD_OPT_ABORT` (the session is
    /// closed).
    Aborted,
    /// READ data (only from [`ClientSession::feed`]): copy `data` to
    /// `buf_offset` in the request's buffer.
    #[non_exhaustive]
    Data {
        /// The request.
        cookie: Cookie,
        /// Where in the request's buffer.
        buf_offset: u64,
        /// Where in the export the bytes are from (the request's offset
        /// plus `buf_offset`), so a driver needs no table of its own.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// `length` bytes at `buf_offset` of the request's buffer read as
    /// zeroes (a structured hole chunk): fill them with zeroes.
    #[non_exhaustive]
    Hole {
        /// The request.
        cookie: Cookie,
        /// Where in the request's buffer.
        buf_offset: u64,
        /// Where in the export (the request's offset plus `buf_offset`).
        offset: u64,
        /// How many bytes.
        length: u64,
    },
    /// Block-status extents for one context, from the request's offset on.
    BlockStatus {
        /// The request.
        cookie: Cookie,
        /// The context's id (see [`ClientSession::contexts`]).
        context_id: u32,
        /// The extents.
        extents: Extents<'a>,
    },
    /// The request is complete: success, or the (first) error the server
    /// reported for it.
    Done {
        /// The request.
        cookie: Cookie,
        /// Its command.
        command: Command,
        /// The outcome.
        result: Result<(), ServerError>,
    },
}

/// What [`ClientSession::poll_transmit`] appended, and what goes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// A WRITE whose data the driver sends right after the appended bytes
    /// (all `length` bytes of the buffer the caller gave for `cookie`),
    /// before anything else.
    pub payload: Option<PayloadOut>,
}

/// A WRITE payload to send beside the session's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadOut {
    /// The request the data belongs to.
    pub cookie: Cookie,
    /// How many bytes.
    pub length: u64,
}

/// A WRITE header in the output queue: the payload follows the byte at
/// `end` (exclusive) of `out`.
#[derive(Debug, Clone, Copy)]
struct Mark {
    end: usize,
    payload: PayloadOut,
}

// The state changes twice per connection; the variants' sizes only cost
// the session's own size.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum State {
    Handshake(ClientHandshake),
    Transmission(ClientTransmission, Negotiated),
    Closed,
}

/// A client connection's whole life, sans-IO: see the [module
/// docs](self) for the order in which a driver calls its methods.
///
/// ```
/// use nbd_proto::client::{ClientConfig, ClientNeed, ClientSession};
///
/// let mut session = ClientSession::new(ClientConfig::default());
/// // Nothing to send before the server's greeting: 16 bytes are needed.
/// let mut out = Vec::new();
/// assert!(session.poll_transmit(&mut out).is_none());
/// assert!(matches!(session.need(), ClientNeed::Bytes(16)));
/// ```
#[derive(Debug)]
pub struct ClientSession {
    state: State,
    max_in_flight: usize,
    strict: bool,
    manual_release: bool,
    unnegotiated_max_payload: u64,
    /// Feed path: the bytes of the unit being assembled (a header, a
    /// chunk's metadata, an option reply).
    partial: Vec<u8>,
    /// `partial` was handed to the machine (an event may still borrow it):
    /// clear it before the next unit.
    partial_used: bool,
    /// Bytes of the current READ data span already received.
    data_done: u64,
    out: Vec<u8>,
    out_pos: usize,
    marks: VecDeque<Mark>,
    /// The last error, repeated by later calls.
    failed: Option<ClientSessionError>,
    /// The deadlines and the time they are decided by.
    deadlines: Deadlines,
}

/// A timer that starts at the first time the session is given after it
/// was started (so a driver whose last `handle_timeout` is old never sees
/// a deadline that expired before it began).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Off,
    Starting,
    Running(Timestamp),
}

/// The session's deadlines.
#[derive(Debug)]
struct Deadlines {
    handshake: Option<core::time::Duration>,
    request: Option<core::time::Duration>,
    /// The last time given.
    now: Option<Timestamp>,
    /// The handshake's timer (it counts while the session waits for the
    /// server in the handshake; an option restarts it).
    handshake_timer: Stamp,
    /// With a request deadline, per in-flight slot: the request's cookie
    /// and when its timer started.
    requests: Vec<Option<(Cookie, Stamp)>>,
}

impl Deadlines {
    fn new(config: &ClientConfig) -> Deadlines {
        Deadlines {
            handshake: config.handshake_timeout,
            request: config.request_timeout,
            now: None,
            handshake_timer: match config.handshake_timeout {
                Some(_) => Stamp::Starting,
                None => Stamp::Off,
            },
            requests: Vec::new(),
        }
    }

    /// An option was issued: the handshake's timer starts again.
    fn restart_handshake(&mut self) {
        if self.handshake.is_some() {
            self.handshake_timer = Stamp::Starting;
        }
    }

    /// A request was started under `cookie`.
    fn request_started(&mut self, cookie: Cookie, capacity: usize) {
        if self.request.is_none() {
            return;
        }
        if self.requests.len() < capacity {
            self.requests.resize(capacity, None);
        }
        if let Some(slot) = self.requests.get_mut(cookie.slot()) {
            *slot = Some((cookie, Stamp::Starting));
        }
    }
}

impl ClientSession {
    /// A session that negotiates as `config` asks (see [`ClientConfig`]
    /// for every default). The first thing it needs is the server's
    /// greeting.
    pub fn new(config: ClientConfig) -> ClientSession {
        let max_in_flight = config.max_in_flight.max(1);
        let strict = config.strict;
        let unnegotiated_max_payload = config.unnegotiated_max_payload;
        let deadlines = Deadlines::new(&config);
        let mut s = ClientSession {
            state: State::Handshake(ClientHandshake::new(config)),
            max_in_flight,
            strict,
            manual_release: false,
            unnegotiated_max_payload,
            partial: Vec::new(),
            partial_used: false,
            data_done: 0,
            out: Vec::with_capacity(64),
            out_pos: 0,
            marks: VecDeque::new(),
            failed: None,
            deadlines,
        };
        s.pump_handshake_output();
        s
    }

    /// With manual release, a completed request keeps its cookie's slot
    /// until [`ClientSession::release`], so a driver that keeps per-slot
    /// state (buffers, results, wakers indexed by [`Cookie::slot`]) can
    /// hand the result over before the slot is reused. Set it before the
    /// handshake completes.
    pub fn set_manual_release(&mut self, manual: bool) {
        self.manual_release = manual;
        if let State::Transmission(tx, _) = &mut self.state {
            tx.set_manual_release(manual);
        }
    }

    /// Gives a completed request's slot back (manual release only).
    pub fn release(&mut self, cookie: Cookie) {
        if let State::Transmission(tx, _) = &mut self.state {
            tx.release(cookie);
        }
    }

    // ----- input -----------------------------------------------------------

    /// What the session needs next.
    #[must_use = "the driver must do what the session needs next"]
    pub fn need(&mut self) -> ClientNeed<'_> {
        if self.failed.is_some() {
            return ClientNeed::Closed;
        }
        let partial = if self.partial_used { 0 } else { self.partial.len() };
        match &self.state {
            State::Handshake(hs) => match hs.step() {
                HandshakeStep::Receive(n) => ClientNeed::Bytes(n.saturating_sub(partial)),
                HandshakeStep::StartTls => ClientNeed::StartTls(ClientStartTls { session: self }),
                HandshakeStep::Negotiating => ClientNeed::Negotiating,
                // OptionDone and Done are turned into events as soon as the
                // machine reaches them; Send is drained into the output.
                HandshakeStep::OptionDone | HandshakeStep::Done => ClientNeed::Pending,
                HandshakeStep::Send(_) => ClientNeed::Bytes(0),
                HandshakeStep::Aborted => ClientNeed::Closed,
            },
            State::Transmission(tx, _) => match tx.next() {
                ReceiveNext::Complete => ClientNeed::Pending,
                ReceiveNext::Data {
                    cookie,
                    buf_offset,
                    length,
                } => ClientNeed::Data {
                    cookie,
                    buf_offset: buf_offset + self.data_done,
                    offset: tx.request(cookie).map_or(0, |r| r.offset) + buf_offset + self.data_done,
                    length: length - self.data_done,
                },
                ReceiveNext::Bytes(_) if tx.is_failed() => ClientNeed::Closed,
                ReceiveNext::Bytes(_) if tx.in_flight() == 0 && partial == 0 => ClientNeed::Idle,
                ReceiveNext::Bytes(n) => ClientNeed::Bytes(n.saturating_sub(partial)),
            },
            State::Closed => ClientNeed::Closed,
        }
    }

    /// Takes bytes from the server: consumes what it can, up to the next
    /// event, and returns how many bytes it consumed and that event, if
    /// any. Call it again with what it did not consume until a call
    /// consumes nothing and returns no event (then everything was taken, or
    /// the session stopped where the driver must act first:
    /// [`ClientNeed::StartTls`], [`ClientNeed::Negotiating`],
    /// [`ClientNeed::Closed`]):
    ///
    /// ```
    /// # use nbd_proto::client::{ClientSession, ClientEvent, ClientSessionError};
    /// fn on_input(session: &mut ClientSession, mut input: &[u8]) -> Result<(), ClientSessionError> {
    ///     loop {
    ///         let (n, event) = session.feed(input)?;
    ///         input = &input[n..];
    ///         match event {
    ///             Some(ClientEvent::Done { cookie, result, .. }) => { /* wake the caller */ }
    ///             Some(_) => { /* data, holes, extents, ... */ }
    ///             None if n == 0 => return Ok(()),
    ///             None => {}
    ///         }
    ///     }
    /// }
    /// ```
    ///
    /// After an error the connection must be closed; call
    /// [`ClientSession::connection_lost`] to learn which requests failed.
    ///
    /// READ data fed here comes back as [`ClientEvent::Data`] (borrowing
    /// `input`); a driver that moves it into the caller's buffer itself
    /// uses [`ClientSession::data_received`] instead.
    #[must_use = "the bytes used must be dropped from the input and the event handled"]
    pub fn feed<'a>(&'a mut self, input: &'a [u8]) -> Result<(usize, Option<ClientEvent<'a>>), ClientSessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.partial_used {
            self.partial.clear();
            self.partial_used = false;
        }
        if !matches!(self.state, State::Transmission(..)) {
            return match self.feed_handshake(input) {
                Ok(x) => Ok(x),
                Err(e) => Err(self.fail(e)),
            };
        }
        // Split the borrows: an event may borrow `input` or `partial`.
        let ClientSession {
            state,
            partial,
            partial_used,
            data_done,
            failed,
            ..
        } = self;
        let State::Transmission(tx, _) = state else {
            return Ok((0, None));
        };
        let r = feed_transmission(tx, partial, partial_used, data_done, input);
        if let Err(e) = &r {
            *failed = Some(e.clone());
        }
        r
    }

    /// The driver moved `n` bytes of the READ data announced by
    /// [`ClientNeed::Data`] into the request's buffer (at the announced
    /// `buf_offset`). Returns the request's completion when these were the
    /// last bytes of its reply.
    #[must_use = "the completed request must be reported to its owner"]
    pub fn data_received(&mut self, n: u64) -> Result<Option<ClientEvent<'static>>, ClientSessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let State::Transmission(tx, _) = &mut self.state else {
            return Err(ClientSessionError::Misuse("data_received() outside transmission"));
        };
        let ReceiveNext::Data { length, .. } = tx.next() else {
            return Err(ClientSessionError::Misuse(
                "data_received() while no READ data is announced",
            ));
        };
        if n > length - self.data_done {
            return Err(ClientSessionError::Misuse(
                "data_received() with more bytes than announced",
            ));
        }
        self.data_done += n;
        if self.data_done < length {
            return Ok(None);
        }
        self.data_done = 0;
        match tx.data_received() {
            Ok(ev) => Ok(owned_event(ev, tx)),
            Err(v) => Err(self.fail(v.into())),
        }
    }

    /// The connection ended (EOF, a socket error, a timeout): the session
    /// is closed and every request in flight has failed. Returns their
    /// cookies, so the driver can tell their owners (or send them again
    /// on a new connection).
    #[must_use = "the requests that failed must be reported to their owners"]
    pub fn connection_lost(&mut self) -> Vec<Cookie> {
        let cookies = match &mut self.state {
            State::Transmission(tx, _) => tx.fail_all().collect(),
            _ => Vec::new(),
        };
        self.state = State::Closed;
        self.out.clear();
        self.out_pos = 0;
        self.marks.clear();
        cookies
    }

    // ----- output ----------------------------------------------------------

    /// Appends the next bytes to send to `buf` (the driver's own buffer,
    /// which it may reuse). Returns `None` when there is nothing to send;
    /// otherwise, if [`Transmit::payload`] is set, the driver sends that
    /// WRITE's data right after the appended bytes and before the bytes of
    /// the next call. Headers of several requests are appended by one call
    /// up to the first WRITE, so a driver sends a batch with one (vectored)
    /// write.
    #[must_use = "the appended bytes (and a WRITE's payload) must be sent"]
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Transmit> {
        if self.out_pos >= self.out.len() {
            return None;
        }
        let end = self.marks.front().map_or(self.out.len(), |m| m.end);
        buf.extend_from_slice(&self.out[self.out_pos..end]);
        self.out_pos = end;
        let payload = match self.marks.front() {
            Some(m) if m.end == end => self.marks.pop_front().map(|m| m.payload),
            _ => None,
        };
        if self.out_pos >= self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        Some(Transmit { payload })
    }

    /// Whether [`ClientSession::poll_transmit`] has something to give.
    pub fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    // ----- commands --------------------------------------------------------

    /// Validates a request against what the server advertised, gives it a
    /// cookie and queues its header for [`ClientSession::poll_transmit`].
    /// For a WRITE the driver sends the caller's `length` bytes where
    /// `poll_transmit` says ([`Transmit::payload`]).
    pub fn start_request(&mut self, req: Request) -> Result<Cookie, RequestError> {
        if req.command == Command::DISC {
            return self.disconnect().map(|()| Cookie(u64::MAX));
        }
        self.check_not_failed()?;
        let State::Transmission(tx, _) = &mut self.state else {
            return Err(match self.state {
                State::Closed => RequestError::Failed,
                _ => RequestError::NotConnected,
            });
        };
        let (cookie, header) = tx.start_request(req)?;
        self.out.extend_from_slice(header.as_bytes());
        self.deadlines.request_started(cookie, tx.capacity());
        if req.command == Command::WRITE && req.length > 0 {
            self.marks.push_back(Mark {
                end: self.out.len(),
                payload: PayloadOut {
                    cookie,
                    length: req.length,
                },
            });
        }
        Ok(cookie)
    }

    /// Queues `NBD_CMD_DISC`: the replies of requests in flight still
    /// arrive, nothing can be sent after it, and the server closes the
    /// connection. A driver sends it once it needs nothing more.
    pub fn disconnect(&mut self) -> Result<(), RequestError> {
        self.check_not_failed()?;
        let State::Transmission(tx, _) = &mut self.state else {
            return Err(match self.state {
                State::Closed => RequestError::Failed,
                _ => RequestError::NotConnected,
            });
        };
        let (_, header) = tx.start_request(Request::new(Command::DISC, 0, 0))?;
        self.out.extend_from_slice(header.as_bytes());
        Ok(())
    }

    fn handshake(&mut self) -> Result<&mut ClientHandshake, ClientSessionError> {
        match &mut self.state {
            State::Handshake(hs) => Ok(hs),
            _ => Err(ClientSessionError::Misuse("an option outside the handshake")),
        }
    }

    /// Option mode: `NBD_OPT_LIST` (the outcome is
    /// [`OptionOutcome::List`]).
    pub fn opt_list(&mut self) -> Result<(), ClientSessionError> {
        let r = self.handshake()?.opt_list();
        self.after_handshake_call(r)
    }

    /// Option mode: `NBD_OPT_INFO` for an export ([`OptionOutcome::Info`]).
    pub fn opt_info(&mut self, export: &str) -> Result<(), ClientSessionError> {
        let r = self.handshake()?.opt_info(export);
        self.after_handshake_call(r)
    }

    /// Option mode: `NBD_OPT_GO` for the configured export or `export`
    /// (falling back to `NBD_OPT_EXPORT_NAME` where the server does not
    /// know GO). Success is [`ClientEvent::Connected`]; a refusal is
    /// [`ClientEvent::OptionDone`] with [`OptionOutcome::Refused`].
    pub fn opt_go(&mut self, export: Option<&str>) -> Result<(), ClientSessionError> {
        let r = self.handshake()?.opt_go(export);
        self.after_handshake_call(r)
    }

    /// Option mode: `NBD_OPT_LIST_META_CONTEXT` (no queries lists them all).
    pub fn opt_list_meta_context(&mut self, export: &str, queries: &[&str]) -> Result<(), ClientSessionError> {
        let r = self.handshake()?.opt_list_meta_context(export, queries);
        self.after_handshake_call(r)
    }

    /// Option mode: `NBD_OPT_SET_META_CONTEXT`.
    pub fn opt_set_meta_context(&mut self, export: &str, queries: &[&str]) -> Result<(), ClientSessionError> {
        let r = self.handshake()?.opt_set_meta_context(export, queries);
        self.after_handshake_call(r)
    }

    /// Option mode: `NBD_OPT_STRUCTURED_REPLY`.
    pub fn opt_structured_reply(&mut self) -> Result<(), ClientSessionError> {
        let r = self.handshake()?.opt_structured_reply();
        self.after_handshake_call(r)
    }

    /// Option mode: `NBD_OPT_EXTENDED_HEADERS`.
    pub fn opt_extended_headers(&mut self) -> Result<(), ClientSessionError> {
        let r = self.handshake()?.opt_extended_headers();
        self.after_handshake_call(r)
    }

    /// Option mode: `NBD_OPT_ABORT`. The session ends with
    /// [`ClientEvent::Aborted`] (or the server simply closes, which the
    /// spec allows: treat that as the same thing).
    pub fn opt_abort(&mut self) -> Result<(), ClientSessionError> {
        let r = self.handshake()?.opt_abort();
        self.after_handshake_call(r)
    }

    // ----- time --------------------------------------------------------------

    /// Tells the session the time (see [`crate::time`]): timers that were
    /// waiting for it start now, and a deadline that has passed fails the
    /// session with [`ClientSessionError::TimedOut`] (which the input
    /// methods then return; a driver closes the connection, and in
    /// transmission [`ClientSession::connection_lost`] gives the requests
    /// that were in flight). Times earlier than one given before are taken
    /// as that one.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let now = self.deadlines.now.map_or(now, |t| t.max(now));
        self.deadlines.now = Some(now);
        if self.failed.is_some() {
            return;
        }
        if self.deadlines.handshake_timer == Stamp::Starting {
            self.deadlines.handshake_timer = Stamp::Running(now);
        }
        let tx = match &self.state {
            State::Transmission(tx, _) => Some(tx),
            _ => None,
        };
        for slot in &mut self.deadlines.requests {
            match slot {
                Some((cookie, stamp)) if tx.is_some_and(|tx| tx.request(*cookie).is_some()) => {
                    if *stamp == Stamp::Starting {
                        *stamp = Stamp::Running(now);
                    }
                }
                _ => *slot = None,
            }
        }
        if let Some(timer) = self.next_timer()
            && now >= timer.at
        {
            self.failed = Some(ClientSessionError::TimedOut(timer.expired));
        }
    }

    /// Whether the session has deadlines at all (a handshake or request
    /// timeout): a driver of one that has none needs no clock.
    pub fn has_deadlines(&self) -> bool {
        self.deadlines.handshake.is_some() || self.deadlines.request.is_some()
    }

    /// When the session's next deadline expires (`None`: no deadline
    /// runs): the driver calls [`ClientSession::handle_timeout`] then.
    #[must_use = "the driver arms a timer at the session's next deadline"]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_timer().map(|t| t.at)
    }

    /// The deadline that expires first.
    fn next_timer(&self) -> Option<Timer> {
        if self.failed.is_some() {
            return None;
        }
        let d = &self.deadlines;
        match &self.state {
            State::Handshake(hs) => match (d.handshake_timer, d.handshake, hs.step()) {
                // Waiting for the caller's option, or done: not the
                // server's time.
                (_, _, HandshakeStep::Negotiating | HandshakeStep::Aborted) => None,
                (Stamp::Running(since), Some(after), _) => Some(Timer::start(since, Deadline::Handshake, after)),
                _ => None,
            },
            State::Transmission(tx, _) => {
                let after = d.request?;
                let since = d
                    .requests
                    .iter()
                    .filter_map(|slot| match slot {
                        Some((cookie, Stamp::Running(since))) if tx.request(*cookie).is_some() => Some(*since),
                        _ => None,
                    })
                    .min()?;
                Some(Timer::start(since, Deadline::Request, after))
            }
            State::Closed => None,
        }
    }

    // ----- getters ---------------------------------------------------------

    /// What the handshake negotiated, once [`ClientEvent::Connected`].
    pub fn negotiated(&self) -> Option<&Negotiated> {
        match &self.state {
            State::Transmission(_, n) => Some(n),
            _ => None,
        }
    }

    /// Whether transmission is running.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Transmission(..)) && self.failed.is_none()
    }

    /// The request in flight under `cookie` (`None` if it is not in
    /// flight): what a driver needs to place a reply, without a table of
    /// its own.
    pub fn request(&self, cookie: Cookie) -> Option<Request> {
        match &self.state {
            State::Transmission(tx, _) => tx.request(cookie),
            _ => None,
        }
    }

    /// Whether [`ClientSession::start_request`] would take a request now:
    /// transmission is running, `NBD_CMD_DISC` was not sent and the
    /// in-flight table has room.
    pub fn can_start_request(&self) -> bool {
        match &self.state {
            State::Transmission(tx, _) => {
                self.failed.is_none() && !tx.is_disconnecting() && !tx.is_failed() && tx.in_flight() < tx.capacity()
            }
            _ => false,
        }
    }

    /// What the session wants from the socket now (see [`Interest`]).
    pub fn interest(&self) -> Interest {
        let open = !self.is_closed();
        let waiting_on_driver = match &self.state {
            State::Handshake(hs) => !matches!(hs.step(), HandshakeStep::Receive(_)),
            State::Transmission(tx, _) => matches!(tx.next(), ReceiveNext::Complete),
            State::Closed => true,
        };
        Interest {
            read: open && !waiting_on_driver,
            write: self.has_output(),
        }
    }

    /// Why the session failed, once it did (the error its input methods
    /// repeat): a violation, a refusal, an expired deadline, ...
    pub fn error(&self) -> Option<&ClientSessionError> {
        self.failed.as_ref()
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed) || self.failed.is_some()
    }

    /// The protocol flavour (once connected).
    pub fn mode(&self) -> Option<Mode> {
        self.negotiated().map(|n| n.mode)
    }

    /// Export size in bytes (0 before connected).
    pub fn size(&self) -> u64 {
        self.negotiated().map_or(0, |n| n.size)
    }

    /// Transmission flags (empty before connected).
    pub fn flags(&self) -> TransmissionFlags {
        self.negotiated().map_or(TransmissionFlags::empty(), |n| n.flags)
    }

    /// Block-size constraints in force (the spec's defaults before
    /// connected or when the server sent none).
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.negotiated().map(Negotiated::constraints).unwrap_or_default()
    }

    /// The metadata contexts negotiated, with their ids.
    pub fn contexts(&self) -> &[MetaContext] {
        self.negotiated().map_or(&[], |n| &n.contexts)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        match &self.state {
            State::Transmission(tx, _) => tx.in_flight(),
            _ => 0,
        }
    }

    /// Most requests in flight at once ([`ClientConfig::max_in_flight`]).
    pub fn capacity(&self) -> usize {
        self.max_in_flight
    }

    /// The protocol name as libnbd reports it (`oldstyle`, `newstyle`,
    /// `newstyle-fixed`); meaningful once the greeting was received.
    pub fn protocol_name(&self) -> &'static str {
        match &self.state {
            State::Handshake(hs) => hs.protocol_name(),
            State::Transmission(_, n) => n.mode.protocol_name(),
            State::Closed => "newstyle-fixed",
        }
    }

    /// Whether the server speaks fixed newstyle (options can be used).
    pub fn fixed_newstyle(&self) -> bool {
        match &self.state {
            State::Handshake(hs) => hs.fixed_newstyle(),
            State::Transmission(_, n) => !matches!(n.mode, Mode::Oldstyle | Mode::ExportNameOnly),
            State::Closed => false,
        }
    }

    /// Whether TLS is running.
    pub fn tls(&self) -> bool {
        match &self.state {
            State::Handshake(hs) => hs.tls(),
            State::Transmission(_, n) => n.tls,
            State::Closed => false,
        }
    }

    /// Whether structured replies (or extended headers) are negotiated so far.
    pub fn structured_replies(&self) -> bool {
        match &self.state {
            State::Handshake(hs) => hs.structured_replies(),
            State::Transmission(_, n) => n.mode.structured(),
            State::Closed => false,
        }
    }

    /// Whether extended headers are negotiated so far.
    pub fn extended_headers(&self) -> bool {
        match &self.state {
            State::Handshake(hs) => hs.extended_headers(),
            State::Transmission(_, n) => n.mode.extended(),
            State::Closed => false,
        }
    }

    // ----- internals -------------------------------------------------------

    /// A request after the session failed answers with the failure.
    fn check_not_failed(&self) -> Result<(), RequestError> {
        match &self.failed {
            Some(e) => Err(RequestError::SessionFailed(alloc::boxed::Box::new(e.clone()))),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: ClientSessionError) -> ClientSessionError {
        if !matches!(e, ClientSessionError::Misuse(_)) {
            self.failed = Some(e.clone());
        }
        e
    }

    /// After an option call: queue what the machine wants sent. A call
    /// the machine refuses (the state or its arguments do not allow it)
    /// changes nothing and is reported as [`ClientSessionError::Misuse`].
    fn after_handshake_call(&mut self, r: Result<(), HandshakeError>) -> Result<(), ClientSessionError> {
        match r {
            Ok(()) => {
                self.deadlines.restart_handshake();
                self.pump_handshake_output();
                Ok(())
            }
            // A call the state or its arguments do not allow changes nothing.
            Err(HandshakeError::Misuse(m)) => Err(ClientSessionError::Misuse(m)),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    /// Moves the handshake machine's bytes to send into the output queue.
    fn pump_handshake_output(&mut self) {
        let State::Handshake(hs) = &mut self.state else {
            return;
        };
        while let HandshakeStep::Send(bytes) = hs.step() {
            self.out.extend_from_slice(bytes);
            hs.sent();
        }
    }

    fn feed_handshake(&mut self, input: &[u8]) -> Result<(usize, Option<ClientEvent<'static>>), ClientSessionError> {
        let mut consumed = 0;
        loop {
            self.pump_handshake_output();
            let State::Handshake(hs) = &mut self.state else {
                return Ok((consumed, None));
            };
            match hs.step() {
                HandshakeStep::Receive(n) => {
                    let rest = &input[consumed..];
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
                HandshakeStep::OptionDone => {
                    let outcome = hs.take_outcome().unwrap_or(OptionOutcome::Ack);
                    return Ok((consumed, Some(ClientEvent::OptionDone(outcome))));
                }
                HandshakeStep::Done => {
                    let State::Handshake(hs) = core::mem::replace(&mut self.state, State::Closed) else {
                        unreachable_closed()?
                    };
                    let negotiated = hs.finish()?;
                    let mut tx = ClientTransmission::new(&negotiated, self.max_in_flight);
                    tx.set_strict(self.strict);
                    tx.set_manual_release(self.manual_release);
                    tx.set_unnegotiated_max_payload(self.unnegotiated_max_payload);
                    self.state = State::Transmission(tx, negotiated);
                    return Ok((consumed, Some(ClientEvent::Connected)));
                }
                HandshakeStep::Aborted => {
                    self.state = State::Closed;
                    return Ok((consumed, Some(ClientEvent::Aborted)));
                }
                HandshakeStep::StartTls | HandshakeStep::Negotiating | HandshakeStep::Send(_) => {
                    return Ok((consumed, None));
                }
            }
        }
    }
}

/// A `Closed` error where the state cannot be what it was just matched to
/// be (keeps the code free of panics).
fn unreachable_closed<T>() -> Result<T, ClientSessionError> {
    Err(ClientSessionError::Closed)
}

/// Transmission input: see [`ClientSession::feed`].
fn feed_transmission<'a>(
    tx: &'a mut ClientTransmission,
    partial: &'a mut Vec<u8>,
    partial_used: &'a mut bool,
    data_done: &'a mut u64,
    input: &'a [u8],
) -> Result<(usize, Option<ClientEvent<'a>>), ClientSessionError> {
    let mut consumed = 0;
    loop {
        match tx.next() {
            ReceiveNext::Complete => {
                let ev = tx.complete_pending()?;
                return Ok((consumed, owned_event(ev, tx)));
            }
            ReceiveNext::Data {
                cookie,
                buf_offset,
                length,
            } => {
                let rest = &input[consumed..];
                let left = length - *data_done;
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                if take == 0 {
                    return Ok((consumed, None));
                }
                let data = &rest[..take];
                let at = buf_offset + *data_done;
                let offset = tx.request(cookie).map_or(0, |r| r.offset) + at;
                *data_done += take as u64;
                consumed += take;
                if *data_done == length {
                    *data_done = 0;
                    // The completion (if this was the last chunk) is
                    // announced by `next()` as `Complete`... unless the
                    // machine reports it now: keep it for the next call.
                    tx.data_received_deferred()?;
                }
                return Ok((
                    consumed,
                    Some(ClientEvent::Data {
                        cookie,
                        buf_offset: at,
                        offset,
                        data,
                    }),
                ));
            }
            ReceiveNext::Bytes(n) => {
                let rest = &input[consumed..];
                if partial.is_empty() && rest.len() >= n {
                    consumed += n;
                    let ev = tx.handle_bytes(&rest[..n])?;
                    if let Some(ev) = event(ev, tx) {
                        return Ok((consumed, Some(ev)));
                    }
                    continue;
                }
                if n == 0 || rest.is_empty() {
                    return Ok((consumed, None));
                }
                let take = (n - partial.len()).min(rest.len());
                partial.extend_from_slice(&rest[..take]);
                consumed += take;
                if partial.len() < n {
                    return Ok((consumed, None));
                }
                // The event may borrow the unit: it is cleared by the next
                // call (the rest of the input is taken then, too).
                *partial_used = true;
                let ev = tx.handle_bytes(partial)?;
                return Ok((consumed, event(ev, tx)));
            }
        }
    }
}

/// The event a driver sees for the machine's `ev` (`tx` tells where in
/// the export a request's reply lands).
fn event<'b>(ev: ReplyEvent<'b>, tx: &ClientTransmission) -> Option<ClientEvent<'b>> {
    match ev {
        ReplyEvent::Nothing => None,
        ReplyEvent::Hole {
            cookie,
            buf_offset,
            length,
        } => Some(ClientEvent::Hole {
            cookie,
            buf_offset,
            offset: tx.request(cookie).map_or(0, |r| r.offset) + buf_offset,
            length,
        }),
        ReplyEvent::BlockStatus {
            cookie,
            context_id,
            extents,
        } => Some(ClientEvent::BlockStatus {
            cookie,
            context_id,
            extents,
        }),
        ReplyEvent::Done {
            cookie,
            command,
            result,
        } => Some(ClientEvent::Done {
            cookie,
            command,
            result,
        }),
    }
}

fn owned_event(ev: ReplyEvent<'static>, tx: &ClientTransmission) -> Option<ClientEvent<'static>> {
    event(ev, tx)
}
