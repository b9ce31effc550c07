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
//! The client has no timeouts of its own: against a server that stops
//! answering, a call waits as long as the socket does. A caller who needs a
//! bound connects the socket itself ([`nbd_net::connect`]), sets
//! [`Socket::set_read_timeout`] / [`Socket::set_write_timeout`] on it, and
//! negotiates over it with [`Client::handshake`]; a call that times out
//! then fails with that `io::Error` (`WouldBlock` or `TimedOut`), and every
//! later call with [`Error::Disconnected`] (the stream is out of step).

use std::io::{self, Read, Write};
use std::sync::Arc;

use nbd_net::client::{
    HandshakeIo, Incoming, Options, Replies, Stop, add_block_status, data_range, fill_hole, outcome, reason, split_len,
    uri_tls,
};
use nbd_net::rustls;
use nbd_net::{ClientTls, LazyClientTls};
use nbd_proto::client::{
    ClientConfig, ClientSession, ClientSessionError, Cookie, ExportEntry, ExportInfo, Extents, MetaContext, Mode,
    Negotiated, Request, ServerError, ServerOptionError,
};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{BlockSizeConstraints, Command, CommandFlags, ErrorCode, TransmissionFlags};

pub use nbd_net::client::{BlockStatus, Error, Handshake, Result};
pub use nbd_net::{Socket, connect};

/// A bidirectional byte stream the client runs over (the socket, or TLS
/// over it).
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A TLS client session over the socket. Dropping it sends a
/// `close_notify` alert (best effort), so that the server sees a clean end.
struct TlsStream(rustls::StreamOwned<rustls::ClientConnection, Socket>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TlsStream").field(&self.0.sock).finish()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

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
    Tls(Box<TlsStream>),
    /// Closed after a fatal error (the socket was dropped): reads and
    /// writes nothing.
    Closed(io::Empty),
}

impl Conn {
    fn stream(&mut self) -> &mut dyn Stream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &mut **t,
            Conn::Closed(nothing) => nothing,
        }
    }

    /// Runs the TLS client handshake over the socket (right after the
    /// server's ACK of `NBD_OPT_STARTTLS`).
    fn start_tls(&mut self, tls: &ClientTls) -> Result<()> {
        let Conn::Plain(socket) = std::mem::replace(self, Conn::Closed(io::empty())) else {
            return Err(Error::Misuse("TLS started twice"));
        };
        let mut s = rustls::StreamOwned::new(tls.connection()?, socket);
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
        handshake(&mut s).map_err(Error::TlsHandshake)?;
        *self = Conn::Tls(Box::new(TlsStream(s)));
        Ok(())
    }
}

/// Pumps a handshake until it stops (transmission, an option's outcome,
/// waiting for an option, or aborted).
fn negotiate(hs: &mut Handshake, conn: &mut Conn, tls: &LazyClientTls) -> Result<Stop> {
    loop {
        match hs.step()? {
            HandshakeIo::Send => {
                let s = conn.stream();
                s.write_all(hs.output())
                    .and_then(|()| s.flush())
                    .map_err(|e| hs.io_error(e))?;
                hs.sent();
            }
            HandshakeIo::Receive => {
                if let Err(e) = conn.stream().read_exact(hs.input()) {
                    return Err(hs.io_error(e));
                }
                hs.received()?;
            }
            HandshakeIo::StartTls => {
                conn.start_tls(&tls.get()?)?;
                hs.tls_established()?;
            }
            HandshakeIo::Stopped(stop) => return Ok(stop),
        }
    }
}

/// A connection in option mode: list exports, ask about them, then either
/// [`Negotiation::go`] into a [`Client`] or [`Negotiation::abort`].
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
pub struct Negotiation {
    options: Options,
    conn: Conn,
}

impl Negotiation {
    /// Connects to `uri` and negotiates up to option haggling (TLS,
    /// structured replies and extended headers as `config` asks; TLS as
    /// [`Client::connect_uri`] says).
    pub fn connect(uri: &NbdUri, config: ClientConfig) -> Result<Negotiation> {
        Self::handshake_with_tls(connect(uri)?, uri.client_config(config), uri_tls(uri)?)
    }

    /// Negotiates over a connected socket (TLS, if `config` asks for it,
    /// with libnbd's default credentials and no name check).
    pub fn handshake(socket: impl Into<Socket>, config: ClientConfig) -> Result<Negotiation> {
        Self::handshake_with_tls(socket, config, LazyClientTls::default())
    }

    /// Negotiates over a connected socket with these TLS credentials.
    pub fn handshake_with_tls(
        socket: impl Into<Socket>,
        mut config: ClientConfig,
        tls: LazyClientTls,
    ) -> Result<Negotiation> {
        config.opt_mode = true;
        config.max_in_flight = 1;
        let mut hs = Handshake::new(config);
        let mut conn = Conn::Plain(socket.into());
        let stop = negotiate(&mut hs, &mut conn, &tls)?;
        Ok(Negotiation {
            options: Options::new(hs, tls, &stop),
            conn,
        })
    }

    /// The session: what was negotiated so far (`fixed_newstyle()`,
    /// `protocol_name()`, `tls()`, `structured_replies()`,
    /// `extended_headers()`).
    pub fn session(&self) -> &ClientSession {
        self.options.session()
    }

    /// Whether the server already ended negotiation (an oldstyle server,
    /// or one that only knows `NBD_OPT_EXPORT_NAME`): only
    /// [`Negotiation::go`] is left.
    pub fn is_done(&self) -> bool {
        self.options.is_done()
    }

    fn option(&mut self, option: impl FnOnce(&mut ClientSession) -> Result<(), ClientSessionError>) -> Result<Stop> {
        let (hs, tls) = self.options.issue(option)?;
        let stop = negotiate(hs, &mut self.conn, tls)?;
        Ok(self.options.stopped(stop))
    }

    /// `NBD_OPT_LIST`: every export's name and description.
    pub fn list(&mut self) -> Result<Vec<ExportEntry>> {
        outcome::list(self.option(|s| s.opt_list())?)
    }

    /// `NBD_OPT_INFO` for one export.
    pub fn info(&mut self, export: &str) -> Result<ExportInfo> {
        outcome::info(self.option(|s| s.opt_info(export))?)
    }

    /// `NBD_OPT_INFO`, returning the server's refusal as a value.
    pub fn try_info(&mut self, export: &str) -> Result<Result<ExportInfo, ServerOptionError>> {
        outcome::info_or_refusal(self.option(|s| s.opt_info(export))?)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` (no queries: every context).
    pub fn list_meta_contexts(&mut self, export: &str, queries: &[&str]) -> Result<Vec<MetaContext>> {
        outcome::meta_contexts(self.option(|s| s.opt_list_meta_context(export, queries))?)
    }

    /// `NBD_OPT_SET_META_CONTEXT`.
    pub fn set_meta_contexts(&mut self, export: &str, queries: &[&str]) -> Result<Vec<MetaContext>> {
        outcome::meta_contexts(self.option(|s| s.opt_set_meta_context(export, queries))?)
    }

    /// `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` if the server
    /// does not know GO): enter transmission.
    pub fn go(mut self, export: &str) -> Result<Client> {
        if !self.is_done() {
            outcome::go(self.option(|s| s.opt_go(Some(export)))?)?;
        }
        Client::from_parts(self.options.into_session(), self.conn)
    }

    /// `NBD_OPT_ABORT`, then close.
    pub fn abort(mut self) -> Result<()> {
        if self.is_done() {
            // Oldstyle or EXPORT_NAME-only: a hard close is all there is.
            return Ok(());
        }
        outcome::aborted(self.option(|s| s.opt_abort()))
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
}

/// The one request in flight: where its data and extents go.
struct One<'a> {
    buf: &'a mut [u8],
    status: Option<&'a mut Vec<BlockStatus>>,
    contexts: &'a [MetaContext],
    result: Option<Result<(), ServerError>>,
}

impl Replies for One<'_> {
    fn hole(&mut self, _: Cookie, buf_offset: u64, length: u64) {
        fill_hole(self.buf, buf_offset, length);
    }
    fn block_status(&mut self, _: Cookie, context_id: u32, extents: Extents<'_>) {
        if let Some(out) = self.status.as_deref_mut() {
            add_block_status(out, self.contexts, context_id, extents);
        }
    }
    fn done(&mut self, _: Cookie, result: Result<(), ServerError>) {
        self.result = Some(result);
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
        Self::handshake_with_tls(connect(uri)?, uri.client_config(config), tls)
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
    pub fn handshake_with_tls(
        socket: impl Into<Socket>,
        mut config: ClientConfig,
        tls: LazyClientTls,
    ) -> Result<Client> {
        config.opt_mode = false;
        config.max_in_flight = 1;
        let mut hs = Handshake::new(config);
        let mut conn = Conn::Plain(socket.into());
        outcome::go(negotiate(&mut hs, &mut conn, &tls)?)?;
        Self::from_parts(hs.into_session(), conn)
    }

    fn from_parts(session: ClientSession, conn: Conn) -> Result<Client> {
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

    /// A socket error in the middle of a request.
    fn lost(&mut self, e: io::Error, during: &str) -> Error {
        let e = match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                Error::Disconnected(format!("the server closed the connection {during}").into())
            }
            _ => Error::Io(e),
        };
        self.fail(e)
    }

    /// Sends one request (its WRITE data from `payload`) and waits for
    /// its reply.
    fn request(&mut self, req: Request, payload: &[u8], one: &mut One<'_>) -> Result<()> {
        if let Some(why) = &self.dead {
            return Err(Error::Disconnected(why.clone()));
        }
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
            let r = write_all_gathered(self.conn.stream(), &self.out, data);
            self.out.clear();
            // Part of the request may be on the wire (after a write
            // timeout set by the caller, say): the stream is out of step.
            r.map_err(|e| self.lost(e, "while a request was sent"))?;
        }
        self.conn
            .stream()
            .flush()
            .map_err(|e| self.lost(e, "while a request was sent"))
    }

    fn receive(&mut self, one: &mut One<'_>) -> Result<()> {
        loop {
            let next = nbd_net::client::receive(&mut self.session, one).map_err(|e| self.fail(e))?;
            match next {
                Incoming::Idle => return Ok(()),
                Incoming::Header(n) => {
                    self.input.resize(n, 0);
                    if let Err(e) = self.conn.stream().read_exact(&mut self.input) {
                        return Err(self.lost(e, "while a reply was expected"));
                    }
                    let r = nbd_net::client::input_received(&mut self.session, &self.input, one);
                    r.map_err(|e| self.fail(e))?;
                }
                Incoming::Data { buf_offset, length, .. } => {
                    let r = match data_range(one.buf.len(), buf_offset, length) {
                        Some(range) => self.conn.stream().read_exact(&mut one.buf[range]),
                        None => return Err(self.fail(Error::Misuse("READ data beyond the request's buffer"))),
                    };
                    r.map_err(|e| self.lost(e, "in the middle of a reply"))?;
                    let r = nbd_net::client::data_received(&mut self.session, length, one);
                    r.map_err(|e| self.fail(e))?;
                }
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
        let contexts = self.negotiated.contexts.clone();
        let mut out = Vec::new();
        let mut one = One {
            buf: &mut [],
            status: Some(&mut out),
            contexts: &contexts,
            result: None,
        };
        self.request(req, &[], &mut one)?;
        Ok(out)
    }

    /// Politely ends the session with `NBD_CMD_DISC` (the server then
    /// closes the connection).
    pub fn disconnect(mut self) -> Result<()> {
        if let Some(why) = &self.dead {
            return Err(Error::Disconnected(why.clone()));
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
