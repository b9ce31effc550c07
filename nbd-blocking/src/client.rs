//! A blocking NBD client over std sockets, pumping `nbd_proto`'s
//! [`ClientSession`].
//!
//! One request at a time: the client writes each request header and its
//! WRITE data with one vectored write (the data straight from the
//! caller's slice), reads exactly the header bytes the session asks for,
//! and reads READ data straight from the socket into the caller's buffer.
//! Nothing is copied and nothing is allocated per request.
//!
//! The API is the async client's (`nbd_smol::Client`): the same method
//! names, argument order and [`Error`]; here buffers are borrowed slices,
//! there they are owned `Vec`s given back with the result.
//!
//! Deadlines and reconnection ([`Client::connect_with`], see
//! [`nbd_net::resilience`]) are off unless asked for, as in libnbd: then
//! a call waits as long as the server takes. With a request deadline, a
//! call whose reply has not come when it expires fails with
//! [`Error::TimedOut`] and the connection is closed (the stream is out of
//! step); with reconnection, a call whose connection breaks (a socket
//! error, the server's end, a deadline) reconnects, checks that the export
//! is the same, and sends its request again, for up to the reconnect delay.
//! The session decides the deadlines (see `nbd_proto::time`); before each
//! read and write the client tells it the time and sets the socket's
//! timeouts to what is left before its next deadline (two system calls
//! more per read, and none at all without deadlines).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use nbd_net::client::{add_block_status, data_range, reason, split_len, timed_out, uri_tls};
use nbd_net::negotiate::{self, Redial, Runtime, Stalled, Transport, block_on};
#[cfg(feature = "tls")]
use nbd_net::rustls;
use nbd_net::time::{now, until};
use nbd_net::{ClientTls, LazyClientTls};
use nbd_proto::client::{
    ClientConfig, ClientEvent, ClientNeed, ClientSession, ExportEntry, ExportInfo, MetaContext, Mode, Negotiated,
    Request, ServerError, ServerOptionError,
};
use nbd_proto::time::Timestamp;
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{BlockSizeConstraints, Command, CommandFlags, ErrorCode, TransmissionFlags};

pub use nbd_net::client::{BlockStatus, Error, Result};
pub use nbd_net::resilience::{ConnectOptions, Phase, Reconnect, StatsSnapshot, Timeouts};
use nbd_net::resilience::{Stats, context_ids, transport_failure};
pub use nbd_net::socket::connect_timeout;
pub use nbd_net::{Socket, connect};

/// A bidirectional byte stream the client runs over (the socket, or TLS
/// over it).
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

#[cfg(feature = "tls")]
/// A TLS client session over the socket. Dropping it sends a
/// `close_notify` alert (best effort), so that the server sees a clean end.
struct TlsStream(rustls::StreamOwned<rustls::ClientConnection, Socket>);

#[cfg(feature = "tls")]
impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TlsStream").field(&self.0.sock).finish()
    }
}

#[cfg(feature = "tls")]
impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

#[cfg(feature = "tls")]
impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(feature = "tls")]
impl Drop for TlsStream {
    fn drop(&mut self) {
        self.0.conn.send_close_notify();
        let _ = self.0.conn.write_tls(&mut self.0.sock);
    }
}

/// The connection: the socket until TLS starts, then TLS over it.
#[derive(Debug)]
enum Conn {
    Plain(Socket),
    #[cfg(feature = "tls")]
    Tls(Box<TlsStream>),
    /// Closed after a fatal error (the socket was dropped): reads and
    /// writes nothing.
    Closed(io::Empty),
}

impl Conn {
    fn socket(&self) -> Option<&Socket> {
        match self {
            Conn::Plain(s) => Some(s),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => Some(&t.0.sock),
            Conn::Closed(_) => None,
        }
    }

    /// Bounds the next reads and writes by `by` ([`Stalled::Deadline`]
    /// once it passed).
    fn arm(&self, by: Option<Timestamp>) -> Result<(), Stalled> {
        let (Some(at), Some(s)) = (by, self.socket()) else {
            return Ok(());
        };
        let left = until(at);
        if left.is_zero() {
            return Err(Stalled::Deadline);
        }
        // The kernel sleeps at least this long, so the deadline has passed
        // when the timeout fires.
        s.set_read_timeout(Some(left))?;
        s.set_write_timeout(Some(left))?;
        Ok(())
    }

    /// Takes the socket timeouts off again.
    fn disarm(&self) {
        if let Some(s) = self.socket() {
            let _ = s.set_read_timeout(None);
            let _ = s.set_write_timeout(None);
        }
    }

    /// Reads exactly `buf.len()` bytes, by `by` (none: as long as it
    /// takes).
    fn read_full(&mut self, mut buf: &mut [u8], by: Option<Timestamp>) -> Result<(), Stalled> {
        if by.is_none() {
            return Ok(self.stream().read_exact(buf)?);
        }
        while !buf.is_empty() {
            self.arm(by)?;
            match self.stream().read(buf) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => buf = &mut std::mem::take(&mut buf)[n..],
                // A socket timeout: the next arm says whether `by` passed.
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Writes `head` then `payload` with vectored writes, by `by`.
    fn write_full(&mut self, head: &[u8], payload: &[u8], by: Option<Timestamp>) -> Result<(), Stalled> {
        if by.is_none() {
            return Ok(write_all_gathered(self.stream(), head, payload)?);
        }
        let mut g = nbd_net::socket::Gather::new(head, payload);
        while !g.is_done() {
            self.arm(by)?;
            match self.stream().write_vectored(&g.slices()) {
                Ok(n) => g.advance(n)?,
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn stream(&mut self) -> &mut dyn Stream {
        match self {
            Conn::Plain(s) => s,
            #[cfg(feature = "tls")]
            Conn::Tls(t) => &mut **t,
            Conn::Closed(nothing) => nothing,
        }
    }

    /// Runs the TLS client handshake over the socket (right after the
    /// server's ACK of `NBD_OPT_STARTTLS`).
    #[cfg(feature = "tls")]
    fn tls_handshake(&mut self, tls: &ClientTls) -> io::Result<()> {
        let Conn::Plain(socket) = std::mem::replace(self, Conn::Closed(io::empty())) else {
            return Err(io::Error::other("TLS started twice"));
        };
        let mut s = rustls::StreamOwned::new(tls.connection().map_err(io::Error::other)?, socket);
        let handshake = |s: &mut rustls::StreamOwned<rustls::ClientConnection, Socket>| -> io::Result<()> {
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock)?;
            }
            // TLS 1.3: our Finished may still be queued.
            while s.conn.wants_write() {
                s.conn.write_tls(&mut s.sock)?;
            }
            Ok(())
        };
        handshake(&mut s)?;
        *self = Conn::Tls(Box::new(TlsStream(s)));
        Ok(())
    }

    /// Without the `tls` feature there are no credentials to start TLS
    /// with (`LazyClientTls::get` refuses first).
    #[cfg(not(feature = "tls"))]
    fn tls_handshake(&mut self, tls: &ClientTls) -> io::Result<()> {
        match *tls {}
    }
}

/// The handshake's I/O (`nbd_net::negotiate`, shared with the async
/// client): blocking calls, so every future is ready when first polled.
impl Transport for Conn {
    async fn send(&mut self, bytes: &[u8], by: Option<Timestamp>) -> Result<(), Stalled> {
        self.write_full(bytes, &[], by)?;
        Ok(self.stream().flush()?)
    }

    async fn receive(&mut self, buf: &mut [u8], by: Option<Timestamp>) -> Result<(), Stalled> {
        self.read_full(buf, by)
    }

    async fn start_tls(&mut self, tls: &LazyClientTls, by: Option<Timestamp>) -> Result<(), Stalled> {
        let creds = tls.get().map_err(Stalled::Credentials)?;
        self.arm(by)?;
        match self.tls_handshake(&creds) {
            Err(e) if by.is_some() && retry(&e) => Err(Stalled::Deadline),
            r => Ok(r?),
        }
    }
}

impl Runtime for Conn {
    type Client = Client;

    async fn open(uri: &NbdUri, timeout: Option<Duration>) -> io::Result<Conn> {
        Ok(Conn::Plain(connect_timeout(uri, timeout)?))
    }

    fn from_socket(socket: Socket) -> io::Result<Conn> {
        Ok(Conn::Plain(socket))
    }

    async fn sleep(d: Duration) {
        std::thread::sleep(d);
    }

    fn client(session: ClientSession, conn: Conn, timeouts: Timeouts) -> Result<Client> {
        let mut client = Client::from_parts(session, conn)?;
        client.timeouts = timeouts;
        Ok(client)
    }

    fn session_config(config: ClientConfig) -> ClientConfig {
        config.max_in_flight(1)
    }
}

/// Whether an I/O error only says that a socket timeout fired (or a
/// signal came): the session decides whether a deadline passed.
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A connection in option mode: list exports, ask about them, then either
/// [`Negotiation::go`] into a [`Client`] or [`Negotiation::abort`]: the
/// negotiation both clients share (`nbd_net::negotiate::Negotiation`),
/// run to its end by each call.
///
/// ```no_run
/// use nbd_blocking::{ClientConfig, NbdUri, Negotiation};
///
/// let uri = NbdUri::parse("nbd://localhost")?;
/// let mut neg = Negotiation::connect(&uri, ClientConfig::default())?;
/// for export in neg.list()? {
///     println!("{}: {} bytes", export.name, neg.info(&export.name)?.size);
/// }
/// let client = neg.go("disk")?;
/// # Ok::<(), nbd_blocking::Error>(())
/// ```
#[derive(Debug)]
pub struct Negotiation(negotiate::Negotiation<Conn>);

impl Negotiation {
    /// Connects to `uri` and negotiates up to option haggling (TLS,
    /// structured replies and extended headers as `config` asks; TLS as
    /// [`Client::connect_uri`] says).
    pub fn connect(uri: &NbdUri, config: ClientConfig) -> Result<Negotiation> {
        block_on(negotiate::Negotiation::connect(uri, config)).map(Negotiation)
    }

    /// [`Negotiation::connect`] with deadlines (`opts.timeouts`: connect;
    /// handshake, for the greeting and then for each option; requests,
    /// once [`Negotiation::go`] made a client) and TLS credentials
    /// (`opts.tls`, else the URI's). A client made by `go` does not
    /// reconnect.
    pub fn connect_with(uri: &NbdUri, config: ClientConfig, opts: &ConnectOptions) -> Result<Negotiation> {
        block_on(negotiate::Negotiation::connect_with(uri, config, opts)).map(Negotiation)
    }

    /// Negotiates over a connected socket (TLS, if `config` asks for it,
    /// with libnbd's default credentials and no name check).
    pub fn handshake(socket: impl Into<Socket>, config: ClientConfig) -> Result<Negotiation> {
        block_on(negotiate::Negotiation::handshake(socket, config)).map(Negotiation)
    }

    /// Negotiates over a connected socket with these TLS credentials.
    pub fn handshake_with_tls(
        socket: impl Into<Socket>,
        config: ClientConfig,
        tls: LazyClientTls,
    ) -> Result<Negotiation> {
        block_on(negotiate::Negotiation::handshake_with_tls(socket, config, tls)).map(Negotiation)
    }

    /// The session: what was negotiated so far (`fixed_newstyle()`,
    /// `protocol_name()`, `tls()`, `structured_replies()`,
    /// `extended_headers()`).
    pub fn session(&self) -> &ClientSession {
        self.0.session()
    }

    /// Whether the server already ended negotiation (an oldstyle server,
    /// or one that only knows `NBD_OPT_EXPORT_NAME`): only
    /// [`Negotiation::go`] is left.
    pub fn is_done(&self) -> bool {
        self.0.is_done()
    }

    /// `NBD_OPT_LIST`: every export's name and description.
    pub fn list(&mut self) -> Result<Vec<ExportEntry>> {
        block_on(self.0.list())
    }

    /// `NBD_OPT_INFO` for one export.
    pub fn info(&mut self, export: &str) -> Result<ExportInfo> {
        block_on(self.0.info(export))
    }

    /// `NBD_OPT_INFO`, returning the server's refusal as a value.
    pub fn try_info(&mut self, export: &str) -> Result<Result<ExportInfo, ServerOptionError>> {
        block_on(self.0.try_info(export))
    }

    /// `NBD_OPT_LIST_META_CONTEXT` (no queries: every context).
    pub fn list_meta_contexts(&mut self, export: &str, queries: &[&str]) -> Result<Vec<MetaContext>> {
        block_on(self.0.list_meta_contexts(export, queries))
    }

    /// `NBD_OPT_SET_META_CONTEXT`.
    pub fn set_meta_contexts(&mut self, export: &str, queries: &[&str]) -> Result<Vec<MetaContext>> {
        block_on(self.0.set_meta_contexts(export, queries))
    }

    /// `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` if the server
    /// does not know GO): enter transmission.
    pub fn go(self, export: &str) -> Result<Client> {
        block_on(self.0.go(export))
    }

    /// `NBD_OPT_ABORT`, then close (a server that closes without
    /// answering, as the spec allows, is success too).
    pub fn abort(self) -> Result<()> {
        block_on(self.0.abort())
    }
}

/// A connected client in transmission.
#[derive(Debug)]
pub struct Client {
    conn: Conn,
    session: ClientSession,
    negotiated: Negotiated,
    /// Request headers on their way out.
    out: Vec<u8>,
    /// Reply headers and chunk metadata, read in exact counts.
    input: Vec<u8>,
    /// Why the connection ended, once it did.
    dead: Option<Arc<str>>,
    /// What later requests fail with, where that is not
    /// [`Error::Disconnected`] with `dead`.
    dead_error: Option<Error>,
    timeouts: Timeouts,
    redial: Option<Redial>,
    stats: Stats,
    /// Context ids of the current session that differ from the first's:
    /// (now, first).
    context_map: Vec<(u32, u32)>,
}

/// The one request in flight: where its data and extents go.
struct One<'a> {
    buf: &'a mut [u8],
    status: Option<&'a mut Vec<BlockStatus>>,
    contexts: &'a [MetaContext],
    result: Option<Result<(), ServerError>>,
}

impl One<'_> {
    /// A reply event of the session: a hole zeroes its part of the
    /// buffer, block status joins the list, a completion is the result.
    fn reply(&mut self, ev: ClientEvent<'_>) {
        match ev {
            ClientEvent::Hole { buf_offset, length, .. } => {
                if let Some(range) = data_range(self.buf.len(), buf_offset, length) {
                    self.buf[range].fill(0);
                }
            }
            ClientEvent::BlockStatus {
                context_id, extents, ..
            } => {
                if let Some(out) = self.status.as_deref_mut() {
                    add_block_status(out, self.contexts, context_id, extents);
                }
            }
            ClientEvent::Done { result, .. } => self.result = Some(result),
            // READ data comes as ClientNeed::Data, which `receive` moves
            // itself; handshake events cannot occur in transmission.
            _ => {}
        }
    }
}

impl Client {
    /// Connects to a URI and negotiates with the default configuration
    /// (extended headers, structured replies, `base:allocation`).
    ///
    /// ```no_run
    /// let mut client = nbd_blocking::Client::connect("nbd+unix:///?socket=/tmp/nbd.sock")?;
    /// let mut buf = vec![0u8; 4096];
    /// client.read(&mut buf, 0)?;
    /// client.write(&buf, 4096)?;
    /// client.flush()?;
    /// client.disconnect()?;
    /// # Ok::<(), nbd_blocking::Error>(())
    /// ```
    pub fn connect(uri: &str) -> Result<Client> {
        Self::connect_uri(&NbdUri::parse(uri)?, ClientConfig::default())
    }

    /// Connects to a parsed URI with a configuration (see
    /// [`NbdUri::client_config`]: the URI's export name and TLS policy
    /// win). The TLS credentials come from the URI's `tls-certificates`,
    /// `tls-hostname` and `tls-verify-peer` (see
    /// [`nbd_net::ClientTlsOptions::from_uri`]).
    pub fn connect_uri(uri: &NbdUri, config: ClientConfig) -> Result<Client> {
        Self::connect_uri_with_tls(uri, config, uri_tls(uri)?)
    }

    /// [`Client::connect_uri`] with TLS credentials of the caller's.
    pub fn connect_uri_with_tls(uri: &NbdUri, config: ClientConfig, tls: LazyClientTls) -> Result<Client> {
        let opts = ConnectOptions::default().tls(Some(tls));
        Self::connect_with(uri, config, &opts)
    }

    /// [`Client::connect_uri`] with deadlines and reconnection (see
    /// [`nbd_net::resilience`] for what they do and what is sent again).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use nbd_blocking::{ClientConfig, NbdUri};
    /// use nbd_blocking::client::{Client, ConnectOptions, Reconnect, Timeouts};
    ///
    /// let uri = NbdUri::parse("nbd+unix:///?socket=/tmp/nbd.sock")?;
    /// let opts = ConnectOptions::default()
    ///     .timeouts(Timeouts::all(Duration::from_secs(30)))
    ///     .reconnect(Some(Reconnect::within(Duration::from_secs(60))));
    /// let mut client = Client::connect_with(&uri, ClientConfig::default(), &opts)?;
    /// let mut buf = vec![0u8; 4096];
    /// client.read(&mut buf, 0)?;
    /// # Ok::<(), nbd_blocking::Error>(())
    /// ```
    pub fn connect_with(uri: &NbdUri, config: ClientConfig, opts: &ConnectOptions) -> Result<Client> {
        let (session, conn, redial) = block_on(negotiate::connect::<Conn>(uri, config, opts))?;
        let mut client = Self::from_parts(session, conn)?;
        client.timeouts = opts.timeouts;
        client.redial = redial;
        Ok(client)
    }

    /// Negotiates over a connected socket (TLS, if `config` asks for it,
    /// with libnbd's default credentials and no name check).
    pub fn handshake(socket: impl Into<Socket>, config: ClientConfig) -> Result<Client> {
        Self::handshake_with_tls(socket, config, LazyClientTls::default())
    }

    /// Negotiates over a connected socket with these TLS credentials
    /// (used if `config.tls` asks for TLS and the server accepts). One
    /// request is in flight at a time, whatever `config.max_in_flight`
    /// says.
    pub fn handshake_with_tls(socket: impl Into<Socket>, config: ClientConfig, tls: LazyClientTls) -> Result<Client> {
        let conn = Conn::Plain(socket.into());
        let (session, conn) = block_on(negotiate::handshake_go(conn, config, &tls))?;
        Self::from_parts(session, conn)
    }

    fn from_parts(session: ClientSession, conn: Conn) -> Result<Client> {
        // The handshake's deadline may have left socket timeouts behind
        // (without deadlines, the socket's timeouts are the caller's own).
        if session.has_deadlines() {
            conn.disarm();
        }
        let negotiated = session
            .negotiated()
            .cloned()
            .ok_or(Error::Misuse("transmission without a negotiated export"))?;
        Ok(Client {
            conn,
            session,
            negotiated,
            out: Vec::with_capacity(64),
            input: Vec::with_capacity(64),
            dead: None,
            dead_error: None,
            timeouts: Timeouts::default(),
            redial: None,
            stats: Stats::default(),
            context_map: Vec::new(),
        })
    }

    /// What the handshake negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }
    /// The protocol flavour in use.
    pub fn mode(&self) -> Mode {
        self.negotiated.mode
    }
    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.negotiated.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.negotiated.flags
    }
    /// Block-size constraints in force.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.negotiated.constraints()
    }
    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.negotiated.flags.contains(TransmissionFlags::READ_ONLY)
    }
    /// Whether the connection is gone (after a socket error, a violation
    /// by the server, or a disconnect): every request fails.
    pub fn is_closed(&self) -> bool {
        self.dead.is_some()
    }
    /// Disconnects, reconnects, requests sent again and deadlines expired
    /// so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The error a request gets from a client that ended.
    fn dead_error(&self) -> Option<Error> {
        match (&self.dead_error, &self.dead) {
            (Some(e), _) => Some(e.duplicate()),
            (None, Some(why)) => Some(Error::Disconnected(why.clone())),
            (None, None) => None,
        }
    }

    /// The client ends for good on `e`.
    fn give_up(&mut self, e: Error) -> Error {
        self.dead = Some(reason(&e));
        self.dead_error = Some(e.duplicate());
        self.conn = Conn::Closed(io::empty());
        e
    }

    /// Reconnects after the connection broke on `e`, until the policy's
    /// delay has passed.
    fn reconnect(&mut self, e: &Error) -> Result<()> {
        let Some(redial) = &self.redial else {
            return Err(Error::Misuse("reconnect without a URI"));
        };
        self.stats.disconnected();
        match block_on(redial.reconnect::<Conn>(e, &self.negotiated, || None)) {
            Ok((session, conn)) => {
                conn.disarm();
                if let Some(n) = session.negotiated() {
                    self.context_map = context_ids(&self.negotiated, n);
                }
                self.session = session;
                self.conn = conn;
                self.dead = None;
                self.stats.reconnected(1);
                Ok(())
            }
            Err(e) => Err(self.give_up(e)),
        }
    }

    /// The connection is unusable: remember why, fail what was in flight
    /// and close the socket.
    fn fail(&mut self, e: Error) -> Error {
        if self.dead.is_none() {
            self.dead = Some(reason(&e));
        }
        let _ = self.session.connection_lost();
        self.conn = Conn::Closed(io::empty());
        e
    }

    /// A socket error in the middle of a request, or its deadline.
    fn lost(&mut self, e: Stalled, during: &str) -> Error {
        if matches!(e, Stalled::Deadline) {
            self.session.handle_timeout(now());
        }
        let e = match (timed_out(&self.session), e) {
            (Some(timeout), _) => {
                self.stats.timed_out();
                timeout
            }
            (None, Stalled::Deadline) => Error::Misuse("a deadline's timer fired before the deadline"),
            (None, Stalled::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Error::Disconnected(format!("the server closed the connection {during}").into())
            }
            (None, Stalled::Io(e)) => Error::Io(e),
            (None, Stalled::Credentials(e)) => Error::Tls(e),
        };
        self.fail(e)
    }

    /// Tells the session the time (if it has deadlines): by when the next
    /// read or write must be done (a time already past once a deadline
    /// expired, so that the I/O stops at once and reports it).
    fn by(&mut self) -> Option<Timestamp> {
        if !self.session.has_deadlines() {
            return None;
        }
        self.session.handle_timeout(now());
        match timed_out(&self.session) {
            Some(_) => Some(Timestamp::ORIGIN),
            None => self.session.poll_timeout(),
        }
    }

    /// Sends one request (its WRITE data from `payload`) and waits for
    /// its reply; with reconnection, again on a new connection when the
    /// connection breaks.
    fn request(&mut self, req: Request, payload: &[u8], one: &mut One<'_>) -> Result<()> {
        if let Some(e) = self.dead_error() {
            return Err(e);
        }
        loop {
            let r = match self.request_once(req, payload, one) {
                // A server going away (a restart): send it again on the
                // next connection.
                Err(Error::Server(e)) if self.redial.is_some() && e.code == ErrorCode::ESHUTDOWN => {
                    Err(self.fail(Error::disconnected("the server is shutting down (NBD_ESHUTDOWN)")))
                }
                r => r,
            };
            match r {
                Err(e) if self.redial.is_some() && transport_failure(&e) => {
                    self.reconnect(&e)?;
                    one.result = None;
                    if let Some(out) = one.status.as_deref_mut() {
                        out.clear();
                    }
                }
                r => return r,
            }
        }
    }

    fn request_once(&mut self, req: Request, payload: &[u8], one: &mut One<'_>) -> Result<()> {
        self.session.start_request(req)?;
        self.send(payload)?;
        self.receive(one)?;
        match one.result.take() {
            Some(r) => r.map_err(Error::Server),
            None => Err(Error::Misuse("the reply ended without a completion")),
        }
    }

    fn send(&mut self, payload: &[u8]) -> Result<()> {
        while let Some(t) = self.session.poll_transmit(&mut self.out) {
            let data = if t.payload.is_some() { payload } else { &[] };
            let by = self.by();
            let r = self.conn.write_full(&self.out, data, by);
            self.out.clear();
            // Part of the request may be on the wire (after a write
            // timeout, say): the stream is out of step.
            r.map_err(|e| self.lost(e, "while a request was sent"))?;
        }
        self.conn
            .stream()
            .flush()
            .map_err(|e| self.lost(e.into(), "while a request was sent"))
    }

    fn receive(&mut self, one: &mut One<'_>) -> Result<()> {
        loop {
            match self.session.need() {
                ClientNeed::Bytes(0) | ClientNeed::Pending => self.feed(0, one)?,
                ClientNeed::Bytes(n) => {
                    self.input.resize(n, 0);
                    let by = self.by();
                    if let Err(e) = self.conn.read_full(&mut self.input, by) {
                        return Err(self.lost(e, "while a reply was expected"));
                    }
                    self.feed(n, one)?;
                }
                ClientNeed::Data { buf_offset, length, .. } => {
                    let by = self.by();
                    let r = match data_range(one.buf.len(), buf_offset, length) {
                        Some(range) => self.conn.read_full(&mut one.buf[range], by),
                        None => return Err(self.fail(Error::Misuse("READ data beyond the request's buffer"))),
                    };
                    r.map_err(|e| self.lost(e, "in the middle of a reply"))?;
                    match self.session.data_received(length) {
                        Ok(Some(ev)) => one.reply(ev),
                        Ok(None) => {}
                        Err(e) => return Err(self.fail(e.into())),
                    }
                }
                ClientNeed::Idle => return Ok(()),
                ClientNeed::Closed => {
                    // Repeats the error that closed it, if any.
                    let e = match self.session.feed(&[]) {
                        Err(e) => e.into(),
                        Ok(_) => Error::disconnected("the session is closed"),
                    };
                    return Err(self.fail(e));
                }
                _ => return Err(self.fail(Error::Misuse("transmission is not running"))),
            }
        }
    }

    /// Feeds the session the first `n` bytes of the input buffer (none,
    /// for an event that is `Pending`), each event to `one`.
    fn feed(&mut self, n: usize, one: &mut One<'_>) -> Result<()> {
        let mut input = &self.input[..n];
        loop {
            match self.session.feed(input) {
                Ok((k, ev)) => {
                    input = &input[k..];
                    match ev {
                        Some(ev) => one.reply(ev),
                        None if k == 0 => return Ok(()),
                        None => {}
                    }
                }
                Err(e) => return Err(self.fail(e.into())),
            }
        }
    }

    fn simple(&mut self, req: Request) -> Result<()> {
        let mut one = One {
            buf: &mut [],
            status: None,
            contexts: &[],
            result: None,
        };
        self.request(req, &[], &mut one)
    }

    /// Reads `buf.len()` bytes at `offset` with one request (holes arrive
    /// as zeroes).
    pub fn pread(&mut self, buf: &mut [u8], offset: u64, flags: CommandFlags) -> Result<()> {
        let req = Request::new(Command::READ, offset, buf.len() as u64).with_flags(flags);
        let mut one = One {
            buf,
            status: None,
            contexts: &[],
            result: None,
        };
        self.request(req, &[], &mut one)
    }

    /// Writes `buf` at `offset` with one request.
    pub fn pwrite(&mut self, buf: &[u8], offset: u64, flags: CommandFlags) -> Result<()> {
        let req = Request::new(Command::WRITE, offset, buf.len() as u64).with_flags(flags);
        let mut one = One {
            buf: &mut [],
            status: None,
            contexts: &[],
            result: None,
        };
        self.request(req, buf, &mut one)
    }

    /// Reads `buf.len()` bytes at `offset`, in requests no larger than the
    /// maximum payload (see [`nbd_net::client::split_len`]).
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_with(buf, offset, CommandFlags::empty())
    }

    /// As [`Client::read`], with command flags (e.g. DF) on every request.
    pub fn read_with(&mut self, buf: &mut [u8], offset: u64, flags: CommandFlags) -> Result<()> {
        let chunk = split_len(self.constraints());
        let mut at = offset;
        for piece in buf.chunks_mut(chunk) {
            self.pread(piece, at, flags)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, in requests no larger than the maximum
    /// payload.
    pub fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(buf, offset, CommandFlags::empty())
    }

    /// As [`Client::write`], with command flags (e.g. FUA) on every request.
    pub fn write_with(&mut self, buf: &[u8], offset: u64, flags: CommandFlags) -> Result<()> {
        let chunk = split_len(self.constraints());
        let mut at = offset;
        for piece in buf.chunks(chunk) {
            self.pwrite(piece, at, flags)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// `NBD_CMD_FLUSH`.
    pub fn flush(&mut self) -> Result<()> {
        self.simple(Request::new(Command::FLUSH, 0, 0))
    }

    /// `NBD_CMD_TRIM` (flags: FUA).
    pub fn trim(&mut self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.simple(Request::new(Command::TRIM, offset, length).with_flags(flags))
    }

    /// `NBD_CMD_WRITE_ZEROES` (flags: FUA, NO_HOLE, FAST_ZERO).
    pub fn write_zeroes(&mut self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.simple(Request::new(Command::WRITE_ZEROES, offset, length).with_flags(flags))
    }

    /// `NBD_CMD_CACHE`.
    pub fn cache(&mut self, offset: u64, length: u64) -> Result<()> {
        self.simple(Request::new(Command::CACHE, offset, length))
    }

    /// `NBD_CMD_BLOCK_STATUS` for `length` bytes at `offset` (flags:
    /// REQ_ONE): one entry per negotiated context that answered.
    pub fn block_status(&mut self, offset: u64, length: u64, flags: CommandFlags) -> Result<Vec<BlockStatus>> {
        let req = Request::new(Command::BLOCK_STATUS, offset, length).with_flags(flags);
        let mut out = Vec::new();
        let mut one = One {
            buf: &mut [],
            status: Some(&mut out),
            contexts: &[],
            result: None,
        };
        self.request(req, &[], &mut one)?;
        // The ids and names of the first connection's contexts (a
        // reconnect may have renumbered them).
        for s in &mut out {
            if let Some(&(_, first)) = self.context_map.iter().find(|(now, _)| *now == s.context_id) {
                s.context_id = first;
            }
            if let Some(c) = self.negotiated.contexts.iter().find(|c| c.id == s.context_id) {
                s.context.clone_from(&c.name);
            }
        }
        Ok(out)
    }

    /// Politely ends the session with `NBD_CMD_DISC` (the server then
    /// closes the connection).
    pub fn disconnect(mut self) -> Result<()> {
        if let Some(e) = self.dead_error() {
            return Err(e);
        }
        self.session.disconnect()?;
        self.send(&[])
    }

    /// A `Read + Write + Seek` view of the export for simple tools.
    pub fn into_io(self) -> ClientIo {
        ClientIo { client: self, pos: 0 }
    }
}

/// Writes `head` and `payload` with vectored writes until both are out.
fn write_all_gathered(w: &mut dyn Stream, head: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut g = nbd_net::socket::Gather::new(head, payload);
    while !g.is_done() {
        match w.write_vectored(&g.slices()) {
            Ok(n) => g.advance(n)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `std::io::{Read, Write, Seek}` over a [`Client`]. Writes are sent as
/// they come (no caching); `flush` sends `NBD_CMD_FLUSH` when the server
/// supports it.
pub struct ClientIo {
    client: Client,
    pos: u64,
}

impl ClientIo {
    /// The client underneath.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }
    /// Gives the client back.
    pub fn into_inner(self) -> Client {
        self.client
    }

    /// How much of `len` fits before the end of the export and in one
    /// request.
    fn span(&self, len: usize) -> usize {
        let left = self.client.size().saturating_sub(self.pos);
        (len as u64).min(left).min(split_len(self.client.constraints()) as u64) as usize
    }
}

impl Read for ClientIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.span(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.client
            .pread(&mut buf[..n], self.pos, CommandFlags::empty())
            .map_err(Error::into_io)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for ClientIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.span(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::from_raw_os_error(ErrorCode::ENOSPC.to_errno()));
        }
        self.client
            .pwrite(&buf[..n], self.pos, CommandFlags::empty())
            .map_err(Error::into_io)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.client.flags().contains(TransmissionFlags::SEND_FLUSH) {
            self.client.flush().map_err(Error::into_io)?;
        }
        Ok(())
    }
}

impl io::Seek for ClientIo {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let size = self.client.size() as i128;
        let new = match pos {
            io::SeekFrom::Start(o) => o as i128,
            io::SeekFrom::End(d) => size + d as i128,
            io::SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 || new > u64::MAX as i128 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the export",
            ));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}
