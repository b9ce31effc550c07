//! A blocking NBD client over std TCP and Unix sockets.
//!
//! One request at a time, driven by `nbd_proto`'s state machines: the
//! client writes each request header and its WRITE data with one vectored
//! write, and reads READ data straight from the socket into the caller's
//! buffer.
//!
//! The client has no timeouts of its own: against a server that stops
//! answering, a call waits as long as the socket does. A caller who needs a
//! bound connects the socket itself, sets `set_read_timeout` /
//! `set_write_timeout` on it, and negotiates over it with
//! [`Client::handshake`]; a call that times out then fails with that
//! `io::Error` (`WouldBlock` or `TimedOut`), and every later call with
//! `RequestError::Failed` (the stream is out of step): drop the client.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use nbd_net::rustls;
use nbd_net::{ClientTls, LazyClientTls, TlsError};
use nbd_proto::client::{
    ClientConfig, ClientHandshake, ClientTransmission, Cookie, ExportEntry, ExportInfo, HandshakeError, HandshakeStep,
    MetaContext, Mode, Negotiated, OptionOutcome, ReceiveNext, ReplyEvent, ReplyViolation, Request, RequestError,
    ServerError, ServerOptionError, TlsMode,
};
use nbd_proto::uri::{NbdUri, Transport, UriError};
use nbd_proto::wire::{BlockSizeConstraints, Command, CommandFlags, TransmissionFlags};

/// Everything that can go wrong for a client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The URI is not valid.
    #[error("invalid NBD URI: {0}")]
    Uri(#[from] UriError),
    /// The handshake failed.
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    /// The request was refused before reaching the wire.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The server broke the protocol; the connection is closed.
    #[error("protocol violation by server: {0}")]
    Protocol(#[from] ReplyViolation),
    /// The server answered the request with an error.
    #[error("{0}")]
    Server(#[from] ServerError),
    /// The server closed the connection.
    #[error("server closed the connection{0}")]
    Closed(&'static str),
    /// The TLS credentials could not be set up (a certificate file is
    /// missing or unreadable, an unsupported `tls-type`, ...).
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (the server's
    /// certificate did not verify, the server refused ours, ...); the
    /// connection is closed, as the spec requires.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
}

impl Error {
    /// The errno this error stands for, where it has one (server errors
    /// give their NBD error; socket errors their OS error).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Server(e) => Some(e.code.to_errno()),
            Error::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A bidirectional byte stream the client can run over.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Opens the socket a URI names.
pub fn connect_transport(uri: &NbdUri) -> Result<Box<dyn Stream>> {
    match &uri.transport {
        Transport::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Transport::Unix { socket } => {
            if let Some(name) = socket.strip_prefix('\0') {
                #[cfg(target_os = "linux")]
                {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                    return Ok(Box::new(UnixStream::connect_addr(&addr)?));
                }
                #[cfg(not(target_os = "linux"))]
                {
                    let _ = name;
                    return Err(io::Error::new(io::ErrorKind::Unsupported, "abstract sockets need Linux").into());
                }
            }
            Ok(Box::new(UnixStream::connect(socket)?))
        }
    }
}

fn eof_to_closed(e: io::Error, during: &'static str) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::Closed(during)
    } else {
        Error::Io(e)
    }
}

/// A TLS client session over a connected stream. Dropping it sends a
/// `close_notify` alert (best effort), so that the server sees a clean end.
struct TlsClientStream {
    tls: rustls::StreamOwned<rustls::ClientConnection, Box<dyn Stream>>,
    /// Nothing was read over TLS yet.
    fresh: bool,
}

impl Read for TlsClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.read(buf) {
            Ok(0) if self.fresh && !buf.is_empty() => {
                Err(nbd_net::refused_after_handshake(io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(n) => {
                self.fresh = false;
                Ok(n)
            }
            Err(e) => self.hint(Err(e)),
        }
    }
}

impl TlsClientStream {
    fn hint<T>(&self, r: io::Result<T>) -> io::Result<T> {
        match r {
            Err(e) if self.fresh && e.kind() != io::ErrorKind::Interrupted => Err(nbd_net::refused_after_handshake(e)),
            r => r,
        }
    }
}

impl Write for TlsClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.tls.write(buf);
        self.hint(r)
    }
    fn flush(&mut self) -> io::Result<()> {
        let r = self.tls.flush();
        self.hint(r)
    }
}

impl Drop for TlsClientStream {
    fn drop(&mut self) {
        self.tls.conn.send_close_notify();
        let _ = self.tls.conn.write_tls(&mut self.tls.sock);
    }
}

/// Upgrades `stream` to TLS in place (right after the server's ACK of
/// `NBD_OPT_STARTTLS`): the whole TLS handshake happens here.
fn start_tls(stream: &mut Box<dyn Stream>, tls: &ClientTls) -> Result<()> {
    let conn = tls.connection()?;
    let plain = std::mem::replace(stream, Box::new(io::empty()));
    let mut s = rustls::StreamOwned::new(conn, plain);
    let handshake = |s: &mut rustls::StreamOwned<rustls::ClientConnection, Box<dyn Stream>>| -> io::Result<()> {
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        // TLS 1.3: our Finished may still be queued.
        while s.conn.wants_write() {
            s.conn.write_tls(&mut s.sock)?;
        }
        s.sock.flush()
    };
    handshake(&mut s).map_err(Error::TlsHandshake)?;
    *stream = Box::new(TlsClientStream { tls: s, fresh: true });
    Ok(())
}

/// Drives a handshake to the point it stops on its own (Done, an option
/// outcome in option mode, Negotiating, or Aborted), upgrading to TLS
/// when the server accepts `NBD_OPT_STARTTLS`.
fn drive(hs: &mut ClientHandshake, stream: &mut Box<dyn Stream>, buf: &mut Vec<u8>, tls: &LazyClientTls) -> Result<()> {
    loop {
        match hs.step() {
            HandshakeStep::Send(bytes) => {
                stream.write_all(bytes)?;
                stream.flush()?;
                hs.sent();
            }
            HandshakeStep::Receive(n) => {
                buf.resize(n, 0);
                stream
                    .read_exact(buf)
                    .map_err(|e| eof_to_closed(e, " during the handshake"))?;
                hs.received(buf)?;
            }
            HandshakeStep::StartTls => {
                start_tls(stream, &tls.get()?)?;
                hs.tls_established()?;
            }
            HandshakeStep::Negotiating | HandshakeStep::OptionDone | HandshakeStep::Done | HandshakeStep::Aborted => {
                return Ok(());
            }
        }
    }
}

/// A connection in option mode: list exports, ask about them, then either
/// [`Negotiation::go`] into a [`Client`] or [`Negotiation::abort`].
pub struct Negotiation {
    hs: ClientHandshake,
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    tls: LazyClientTls,
}

impl Negotiation {
    /// Connects and negotiates up to option haggling (TLS, structured
    /// replies and extended headers as `config` asks). TLS is used as
    /// [`Client::connect_uri`] says.
    pub fn connect(uri: &NbdUri, mut config: ClientConfig) -> Result<Negotiation> {
        config.opt_mode = true;
        if uri.tls != TlsMode::Off {
            config.tls = uri.tls;
        }
        let tls = LazyClientTls::from_uri(uri)?;
        let stream = connect_transport(uri)?;
        Self::over_with_tls(stream, config, tls)
    }

    /// Negotiates over an already-connected stream (TLS, if `config` asks
    /// for it, with libnbd's default credentials and no name check).
    pub fn over(stream: Box<dyn Stream>, config: ClientConfig) -> Result<Negotiation> {
        Self::over_with_tls(stream, config, LazyClientTls::default())
    }

    /// Negotiates over an already-connected stream with these TLS
    /// credentials (used if `config.tls` asks for TLS and the server
    /// accepts).
    pub fn over_with_tls(
        mut stream: Box<dyn Stream>,
        mut config: ClientConfig,
        tls: LazyClientTls,
    ) -> Result<Negotiation> {
        config.opt_mode = true;
        let mut hs = ClientHandshake::new(config);
        let mut buf = Vec::new();
        drive(&mut hs, &mut stream, &mut buf, &tls)?;
        Ok(Negotiation { hs, stream, buf, tls })
    }

    /// Whether the server speaks fixed newstyle (options can be used).
    pub fn fixed_newstyle(&self) -> bool {
        self.hs.fixed_newstyle()
    }

    /// Whether the server already ended negotiation (an oldstyle server,
    /// or one that only knows `NBD_OPT_EXPORT_NAME`).
    pub fn is_done(&self) -> bool {
        matches!(self.hs.step(), HandshakeStep::Done)
    }

    /// The protocol name as libnbd reports it (`oldstyle`, `newstyle`,
    /// `newstyle-fixed`).
    pub fn protocol_name(&self) -> &'static str {
        self.hs.protocol_name()
    }

    /// Whether structured replies (or extended headers) were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.hs.structured_replies()
    }

    /// Whether extended headers were negotiated.
    pub fn extended_headers(&self) -> bool {
        self.hs.extended_headers()
    }

    /// Whether TLS is in use.
    pub fn tls(&self) -> bool {
        self.hs.tls()
    }

    fn run(&mut self) -> Result<OptionOutcome> {
        drive(&mut self.hs, &mut self.stream, &mut self.buf, &self.tls)?;
        match self.hs.step() {
            HandshakeStep::OptionDone => Ok(self.hs.take_outcome().unwrap_or(OptionOutcome::Ack)),
            _ => Ok(OptionOutcome::Ack),
        }
    }

    fn refused(o: OptionOutcome) -> Result<OptionOutcome> {
        match o {
            OptionOutcome::Refused(e) => Err(Error::Handshake(HandshakeError::Refused(e))),
            o => Ok(o),
        }
    }

    /// `NBD_OPT_LIST`: every export's name and description.
    pub fn list(&mut self) -> Result<Vec<ExportEntry>> {
        self.hs.opt_list()?;
        match Self::refused(self.run()?)? {
            OptionOutcome::List(l) => Ok(l),
            _ => Ok(Vec::new()),
        }
    }

    /// `NBD_OPT_INFO` for one export.
    pub fn info(&mut self, export: &str) -> Result<ExportInfo, Error> {
        self.hs.opt_info(export)?;
        match Self::refused(self.run()?)? {
            OptionOutcome::Info(i) => Ok(i),
            _ => Err(Error::Closed(" without answering NBD_OPT_INFO")),
        }
    }

    /// `NBD_OPT_INFO`, returning the server's refusal as a value.
    pub fn try_info(&mut self, export: &str) -> Result<Result<ExportInfo, ServerOptionError>> {
        self.hs.opt_info(export)?;
        match self.run()? {
            OptionOutcome::Info(i) => Ok(Ok(i)),
            OptionOutcome::Refused(e) => Ok(Err(e)),
            _ => Err(Error::Closed(" without answering NBD_OPT_INFO")),
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` (no queries: every context).
    pub fn list_meta_contexts(&mut self, export: &str, queries: &[&str]) -> Result<Vec<MetaContext>> {
        self.hs.opt_list_meta_context(export, queries)?;
        match Self::refused(self.run()?)? {
            OptionOutcome::MetaContexts(c) => Ok(c),
            _ => Ok(Vec::new()),
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT`.
    pub fn set_meta_contexts(&mut self, export: &str, queries: &[&str]) -> Result<Vec<MetaContext>> {
        self.hs.opt_set_meta_context(export, queries)?;
        match Self::refused(self.run()?)? {
            OptionOutcome::MetaContexts(c) => Ok(c),
            _ => Ok(Vec::new()),
        }
    }

    /// `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` if the server
    /// does not know GO): enter transmission.
    pub fn go(mut self, export: &str) -> Result<Client> {
        if !self.is_done() {
            self.hs.opt_go(Some(export))?;
            match self.run()? {
                OptionOutcome::Refused(e) => return Err(Error::Handshake(HandshakeError::Refused(e))),
                _ if !self.is_done() => return Err(Error::Closed(" without answering NBD_OPT_GO")),
                _ => {}
            }
        }
        let neg = self.hs.finish()?;
        Ok(Client::from_parts(self.stream, neg))
    }

    /// `NBD_OPT_ABORT`, then close.
    pub fn abort(mut self) -> Result<()> {
        if self.is_done() {
            // Oldstyle or EXPORT_NAME-only: a hard close is all there is.
            return Ok(());
        }
        self.hs.opt_abort()?;
        match drive(&mut self.hs, &mut self.stream, &mut self.buf, &self.tls) {
            // The spec lets the server close without replying (nbd-server
            // even resets the connection).
            Ok(()) | Err(Error::Closed(_)) => Ok(()),
            Err(Error::Io(e)) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The result of a block-status query for one context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// The context id.
    pub context_id: u32,
    /// The context name.
    pub context: String,
    /// Extents starting at the request offset.
    pub extents: Vec<nbd_proto::client::Extent>,
}

/// A connected client in transmission.
pub struct Client {
    stream: Box<dyn Stream>,
    tx: ClientTransmission,
    neg: Negotiated,
    hdr: Vec<u8>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("negotiated", &self.neg).finish()
    }
}

impl Client {
    /// Connects to a URI and negotiates with the default configuration
    /// (extended headers, structured replies, `base:allocation`).
    pub fn connect(uri: &str) -> Result<Client> {
        let uri = NbdUri::parse(uri)?;
        Self::connect_uri(&uri, ClientConfig::default())
    }

    /// Connects to a parsed URI with a configuration (the URI's export
    /// name overrides the configuration's, and so does its TLS policy
    /// unless it is [`TlsMode::Off`]: `nbds://` and `nbds+unix://` require
    /// TLS, `tls=allow|require` asks for it). The TLS credentials come
    /// from the URI's `tls-certificates`, `tls-hostname` and
    /// `tls-verify-peer` (see [`nbd_net::ClientTlsOptions::from_uri`]).
    pub fn connect_uri(uri: &NbdUri, mut config: ClientConfig) -> Result<Client> {
        config.export_name = uri.export.clone();
        if uri.tls != TlsMode::Off {
            config.tls = uri.tls;
        }
        let tls = LazyClientTls::from_uri(uri)?;
        let stream = connect_transport(uri)?;
        Self::handshake_with_tls(stream, config, tls)
    }

    /// Negotiates over an already-connected stream (TLS, if `config` asks
    /// for it, with libnbd's default credentials and no name check).
    pub fn handshake(stream: Box<dyn Stream>, config: ClientConfig) -> Result<Client> {
        Self::handshake_with_tls(stream, config, LazyClientTls::default())
    }

    /// Negotiates over an already-connected stream with these TLS
    /// credentials (used if `config.tls` asks for TLS and the server
    /// accepts).
    pub fn handshake_with_tls(
        mut stream: Box<dyn Stream>,
        mut config: ClientConfig,
        tls: LazyClientTls,
    ) -> Result<Client> {
        config.opt_mode = false;
        let mut hs = ClientHandshake::new(config);
        let mut buf = Vec::new();
        drive(&mut hs, &mut stream, &mut buf, &tls)?;
        let neg = hs.finish()?;
        Ok(Client::from_parts(stream, neg))
    }

    fn from_parts(stream: Box<dyn Stream>, neg: Negotiated) -> Client {
        let tx = ClientTransmission::new(&neg, 1);
        Client {
            stream,
            tx,
            neg,
            hdr: Vec::with_capacity(64),
        }
    }

    /// What the handshake negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }
    /// The protocol flavour in use.
    pub fn mode(&self) -> Mode {
        self.neg.mode
    }
    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.neg.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.neg.flags
    }
    /// Block-size constraints in force.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.neg.constraints()
    }
    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.neg.flags.contains(TransmissionFlags::READ_ONLY)
    }

    /// Turns the stricter client-side checks on or off (see
    /// [`ClientTransmission::set_strict`]).
    pub fn set_strict(&mut self, strict: bool) {
        self.tx.set_strict(strict);
    }

    fn send(&mut self, req: Request, payload: &[u8]) -> Result<Cookie> {
        let (cookie, header) = self.tx.start_request(req)?;
        let r = write_all_vectored(&mut *self.stream, header.as_bytes(), payload).and_then(|_| self.stream.flush());
        if let Err(e) = r {
            // Part of the request may be on the wire (after a write timeout
            // set by the caller, say): the stream is out of step, so later
            // requests must fail rather than follow it.
            let _ = self.tx.fail_all().count();
            return Err(e.into());
        }
        Ok(cookie)
    }

    /// Waits for the reply to `cookie`, placing READ data into `buf` and
    /// passing block-status extents to `on_status`.
    fn wait(
        &mut self,
        cookie: Cookie,
        mut buf: Option<&mut [u8]>,
        on_status: &mut dyn FnMut(u32, nbd_proto::client::Extents<'_>),
    ) -> Result<()> {
        loop {
            let ev = match self.tx.next() {
                ReceiveNext::Bytes(n) => {
                    self.hdr.resize(n, 0);
                    if let Err(e) = self.stream.read_exact(&mut self.hdr) {
                        let _ = self.tx.fail_all().count();
                        return Err(eof_to_closed(e, " while waiting for a reply"));
                    }
                    match self.tx.handle_bytes(&self.hdr)? {
                        ReplyEvent::BlockStatus {
                            cookie: c,
                            context_id,
                            extents,
                        } if c == cookie => {
                            on_status(context_id, extents);
                            continue;
                        }
                        ReplyEvent::Hole {
                            cookie: c,
                            buf_offset,
                            length,
                        } if c == cookie => {
                            let start = buf_offset as usize;
                            if let Some(piece) = buf
                                .as_deref_mut()
                                .and_then(|b| b.get_mut(start..start + length as usize))
                            {
                                piece.fill(0);
                            }
                            continue;
                        }
                        ev => ev.into_owned(),
                    }
                }
                ReceiveNext::Data {
                    cookie: c,
                    buf_offset,
                    length,
                } => {
                    let start = buf_offset as usize;
                    let end = start + length as usize;
                    let r = match buf.as_deref_mut() {
                        Some(b) if c == cookie && end <= b.len() => self.stream.read_exact(&mut b[start..end]),
                        _ => io::copy(&mut (&mut *self.stream).take(length), &mut io::sink()).map(|_| ()),
                    };
                    if let Err(e) = r {
                        let _ = self.tx.fail_all().count();
                        return Err(eof_to_closed(e, " in the middle of a reply"));
                    }
                    self.tx.data_received()?
                }
                ReceiveNext::Complete => self.tx.complete_pending()?,
            };
            if let ReplyEvent::Done { cookie: c, result, .. } = ev
                && c == cookie
            {
                return result.map_err(Error::Server);
            }
        }
    }

    fn simple(&mut self, req: Request) -> Result<()> {
        let c = self.send(req, &[])?;
        self.wait(c, None, &mut |_, _| {})
    }

    /// Reads `buf.len()` bytes at `offset` with one request.
    pub fn pread(&mut self, buf: &mut [u8], offset: u64, flags: CommandFlags) -> Result<()> {
        let c = self.send(
            Request::new(Command::READ, offset, buf.len() as u64).with_flags(flags),
            &[],
        )?;
        self.wait(c, Some(buf), &mut |_, _| {})
    }

    /// Writes `data` at `offset` with one request.
    pub fn pwrite(&mut self, data: &[u8], offset: u64, flags: CommandFlags) -> Result<()> {
        let c = self.send(
            Request::new(Command::WRITE, offset, data.len() as u64).with_flags(flags),
            data,
        )?;
        self.wait(c, None, &mut |_, _| {})
    }

    fn chunk_len(&self) -> usize {
        let c = self.constraints();
        let max = (c.maximum.min(32 << 20)) as usize;
        let pref = c.preferred.max(c.minimum) as usize;
        // Keep requests aligned to the preferred size.
        (max / pref).max(1) * pref
    }

    /// Reads `buf.len()` bytes at `offset`, split into requests no larger
    /// than the maximum payload.
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let chunk = self.chunk_len();
        for (i, piece) in buf.chunks_mut(chunk).enumerate() {
            self.pread(piece, offset + (i * chunk) as u64, CommandFlags::empty())?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, split into requests no larger than the
    /// maximum payload.
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.write_with(data, offset, CommandFlags::empty())
    }

    /// As [`Client::write`], with command flags (e.g. FUA) on every request.
    pub fn write_with(&mut self, data: &[u8], offset: u64, flags: CommandFlags) -> Result<()> {
        let chunk = self.chunk_len();
        for (i, piece) in data.chunks(chunk).enumerate() {
            self.pwrite(piece, offset + (i * chunk) as u64, flags)?;
        }
        Ok(())
    }

    /// `NBD_CMD_FLUSH`.
    pub fn flush(&mut self) -> Result<()> {
        self.simple(Request::new(Command::FLUSH, 0, 0))
    }

    /// `NBD_CMD_TRIM`.
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
    /// REQ_ONE): one entry per negotiated context.
    pub fn block_status(&mut self, offset: u64, length: u64, flags: CommandFlags) -> Result<Vec<BlockStatus>> {
        let c = self.send(
            Request::new(Command::BLOCK_STATUS, offset, length).with_flags(flags),
            &[],
        )?;
        let mut out: Vec<BlockStatus> = Vec::new();
        let contexts = self.neg.contexts.clone();
        self.wait(c, None, &mut |id, extents| {
            let name = contexts
                .iter()
                .find(|c| c.id == id)
                .map(|c| c.name.clone())
                .unwrap_or_default();
            out.push(BlockStatus {
                context_id: id,
                context: name,
                extents: extents.collect(),
            });
        })?;
        Ok(out)
    }

    /// Politely ends the session with `NBD_CMD_DISC`.
    pub fn disconnect(mut self) -> Result<()> {
        let (_, header) = self.tx.start_request(Request::new(Command::DISC, 0, 0))?;
        self.stream.write_all(header.as_bytes())?;
        self.stream.flush()?;
        Ok(())
    }

    /// A `Read + Write + Seek` view of the export for simple tools.
    pub fn into_io(self) -> ClientIo {
        ClientIo { client: self, pos: 0 }
    }
}

trait OwnedEvent {
    fn into_owned(self) -> ReplyEvent<'static>;
}

impl OwnedEvent for ReplyEvent<'_> {
    fn into_owned(self) -> ReplyEvent<'static> {
        match self {
            ReplyEvent::Done {
                cookie,
                command,
                result,
            } => ReplyEvent::Done {
                cookie,
                command,
                result,
            },
            ReplyEvent::Hole {
                cookie,
                buf_offset,
                length,
            } => ReplyEvent::Hole {
                cookie,
                buf_offset,
                length,
            },
            _ => ReplyEvent::Nothing,
        }
    }
}

/// Writes a header and a payload with vectored writes until both are out.
pub fn write_all_vectored(w: &mut dyn Write, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(header), IoSlice::new(payload)];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    if payload.is_empty() {
        slices = &mut slices[..1];
    }
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write the request")),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
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
}

fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io(e) => e,
        Error::Server(s) => io::Error::from_raw_os_error(s.code.to_errno()),
        other => io::Error::other(other),
    }
}

impl Read for ClientIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.client.size();
        if self.pos >= size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        let n = n.min(self.client.chunk_len());
        self.client
            .pread(&mut buf[..n], self.pos, CommandFlags::empty())
            .map_err(to_io)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for ClientIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let size = self.client.size();
        if self.pos >= size && !buf.is_empty() {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        let n = n.min(self.client.chunk_len());
        self.client
            .pwrite(&buf[..n], self.pos, CommandFlags::empty())
            .map_err(to_io)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.client.flags().contains(TransmissionFlags::SEND_FLUSH) {
            self.client.flush().map_err(to_io)?;
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
