//! A simple thread-per-connection NBD server over std sockets, on the same
//! state machines (`nbd_proto`) and request executor (`nbd_storage::serve`)
//! as the async server.

use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nbd_net::rustls;
use nbd_proto::server::{ExportListing, ServerConfig, ServerHandshake, ServerNegotiated, ServerStep};
use nbd_storage::serve::{Connection, Export, Exports, Next};

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Negotiation settings.
    pub config: ServerConfig,
    /// Connections served at once; further ones are closed at once.
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// The TLS certificate and key (see [`nbd_net::ServerTlsOptions`]),
    /// needed unless `config.tls` is [`nbd_proto::server::TlsPolicy::NoTls`]:
    /// without them a client's `NBD_OPT_STARTTLS` is acknowledged by the
    /// policy but the connection is then closed.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            config: ServerConfig::default(),
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// How a handshake (or its part before TLS) ended.
enum HandshakeEnd {
    /// Transmission can start on this export.
    Done(ServerNegotiated, usize),
    /// The client asked for TLS and the ACK went out.
    StartTls(ServerHandshake),
    /// The client aborted or went away.
    Closed,
}

/// One side of a TLS session that the reading and the writing half of a
/// connection (both on the connection's thread) share.
struct TlsHalf<S: Read + Write>(Rc<RefCell<rustls::StreamOwned<rustls::ServerConnection, S>>>);

impl<S: Read + Write> Read for TlsHalf<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<S: Read + Write> Write for TlsHalf<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// A blocking server: call [`Server::serve_unix`] or [`Server::serve_tcp`]
/// from a thread of your own; [`Server::shutdown`] stops it.
#[derive(Clone)]
pub struct Server {
    exports: Arc<Exports>,
    options: Arc<ServerOptions>,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
}

/// A stream the server can use: readable, writable, with timeouts.
pub trait ServerStream: Read + Write + Send + 'static {
    /// A second handle to the same socket.
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Sets the read timeout.
    fn set_read_timeout_stream(&self, t: Option<Duration>) -> io::Result<()>;
}

impl ServerStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_stream(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl ServerStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_stream(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Server {
    /// A server for a set of exports.
    pub fn new(exports: Vec<Export>, options: ServerOptions) -> Server {
        Server {
            exports: Arc::new(Exports::new(exports)),
            options: Arc::new(options),
            stop: Arc::new(AtomicBool::new(false)),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Stops accepting (the accept loop notices within 100 ms).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Number of connections being served.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Accepts on a Unix listener until shutdown, a thread per connection.
    pub fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.accept_loop(|| listener.accept().map(|(s, _)| s))
    }

    /// Accepts on a TCP listener until shutdown, a thread per connection.
    pub fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.accept_loop(|| {
            listener.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                s
            })
        })
    }

    fn accept_loop<S: ServerStream>(&self, mut accept: impl FnMut() -> io::Result<S>) -> io::Result<()> {
        while !self.stop.load(Ordering::SeqCst) {
            match accept() {
                Ok(s) => {
                    if self.active.load(Ordering::SeqCst) >= self.options.max_connections {
                        drop(s);
                        continue;
                    }
                    // On Linux accepted sockets do not inherit the
                    // listener's non-blocking mode.
                    self.spawn(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("nbd server: accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(())
    }

    fn spawn<S: ServerStream>(&self, s: S) {
        let this = self.clone();
        this.active.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            let _ = this.serve_connection(s);
            this.active.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Serves one connection to its end: the handshake (upgrading to TLS
    /// when the client asks and the policy allows), then transmission.
    pub fn serve_connection<S: ServerStream>(&self, s: S) -> io::Result<()> {
        let control = s.try_clone_stream()?;
        let mut w = s.try_clone_stream()?;
        let deadline = Instant::now() + self.options.handshake_timeout;
        s.set_read_timeout_stream(Some(self.options.handshake_timeout))?;
        let mut r = BufReader::with_capacity(64 * 1024, s);
        let hs = ServerHandshake::new(self.options.config.clone());
        let hs = match self.handshake(hs, &mut r, &mut w, deadline, &control)? {
            HandshakeEnd::Done(neg, export) => {
                control.set_read_timeout_stream(None)?;
                return self.transmission(neg, export, &mut r, &mut w);
            }
            HandshakeEnd::Closed => return Ok(()),
            HandshakeEnd::StartTls(hs) => hs,
        };
        // The client must wait for the ACK before its TLS handshake, and
        // the machine read nothing past STARTTLS: buffered bytes here were
        // sent too early.
        if !r.buffer().is_empty() {
            return Err(invalid_data(
                "client sent data before the NBD_OPT_STARTTLS acknowledgement",
            ));
        }
        let Some(config) = self.options.tls.clone() else {
            return Err(io::Error::other("TLS requested but the server has no certificate"));
        };
        drop(w);
        let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, r.into_inner());
        tls_handshake(&mut tls).map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
        let tls = Rc::new(RefCell::new(tls));
        let mut r = BufReader::with_capacity(64 * 1024, TlsHalf(tls.clone()));
        let mut w = TlsHalf(tls.clone());
        let mut hs = hs;
        hs.tls_established().map_err(invalid_data)?;
        let result = match self.handshake(hs, &mut r, &mut w, deadline, &control)? {
            HandshakeEnd::Done(neg, export) => {
                control.set_read_timeout_stream(None)?;
                self.transmission(neg, export, &mut r, &mut w)
            }
            HandshakeEnd::Closed => Ok(()),
            // The machine refuses a second STARTTLS itself.
            HandshakeEnd::StartTls(_) => Err(invalid_data("second NBD_OPT_STARTTLS")),
        };
        // Say goodbye properly (best effort).
        let mut t = tls.borrow_mut();
        t.conn.send_close_notify();
        let _ = t.flush();
        result
    }

    /// `control` is a handle on the socket used to keep the read timeout
    /// at the time left before `deadline`, so a client trickling bytes
    /// cannot stretch the handshake past it.
    fn handshake<R: BufRead, W: Write, S: ServerStream>(
        &self,
        mut hs: ServerHandshake,
        r: &mut R,
        w: &mut W,
        deadline: Instant,
        control: &S,
    ) -> io::Result<HandshakeEnd> {
        let mut buf = Vec::new();
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"));
            }
            match hs.step() {
                ServerStep::Send(b) => {
                    w.write_all(b)?;
                    w.flush()?;
                    hs.sent();
                }
                ServerStep::Receive(n) => {
                    buf.resize(n, 0);
                    let mut got = 0;
                    while got < n {
                        let k = read_before(r, &mut buf[got..], control, deadline)?;
                        if k == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        got += k;
                    }
                    hs.received(&buf).map_err(invalid_data)?;
                }
                ServerStep::Discard(n) => {
                    let mut left = n;
                    let mut sink = [0u8; 4096];
                    while left > 0 {
                        let k = left.min(sink.len());
                        let got = read_before(r, &mut sink[..k], control, deadline)?;
                        if got == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        left -= got;
                    }
                    hs.discarded().map_err(invalid_data)?;
                }
                ServerStep::StartTls => return Ok(HandshakeEnd::StartTls(hs)),
                ServerStep::LookupExport { name } => {
                    let details = self.exports.lookup(name).map(|i| self.exports.details(i));
                    hs.answer_export(details).map_err(invalid_data)?;
                }
                ServerStep::ListExports => {
                    let listing: Vec<ExportListing<'_>> = self.exports.listing();
                    hs.answer_list(&listing).map_err(invalid_data)?;
                }
                ServerStep::Done => {
                    let neg = hs.finish().map_err(invalid_data)?;
                    let idx = self.exports.lookup(&neg.export_name).unwrap_or(0);
                    return Ok(HandshakeEnd::Done(neg, idx));
                }
                ServerStep::Aborted | ServerStep::Closed => return Ok(HandshakeEnd::Closed),
            }
        }
    }

    fn transmission<R: Read, W: Write>(
        &self,
        neg: ServerNegotiated,
        export: usize,
        r: &mut BufReader<R>,
        w: &mut W,
    ) -> io::Result<()> {
        let mut conn = Connection::new(&neg, self.exports.get(export));
        let mut header = Vec::with_capacity(32);
        loop {
            // Replies go out when the client has nothing more buffered, or
            // once they pile up: a client that pipelines without reading
            // is then blocked by its own full socket (bounded memory).
            if conn.has_output() && (r.buffer().is_empty() || conn.output().len() >= EAGER_FLUSH) {
                w.write_all(conn.output())?;
                w.flush()?;
                conn.output_sent();
            }
            match conn.next() {
                Next::Bytes(n) => {
                    header.resize(n, 0);
                    match r.read_exact(&mut header) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) => return Err(e),
                    }
                    conn.handle_bytes(&header).map_err(invalid_data)?;
                }
                Next::Payload(n) => {
                    r.read_exact(conn.payload_buffer(n))?;
                    conn.payload_received().map_err(invalid_data)?;
                }
                Next::Discard(n) => {
                    discard(r, n)?;
                    conn.discarded().map_err(invalid_data)?;
                }
                Next::Close => {
                    if conn.has_output() {
                        w.write_all(conn.output())?;
                        conn.output_sent();
                    }
                    w.flush()?;
                    return Ok(());
                }
            }
        }
    }
}

/// Runs the server side of a TLS handshake to its end.
fn tls_handshake<S: Read + Write>(tls: &mut rustls::StreamOwned<rustls::ServerConnection, S>) -> io::Result<()> {
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    // TLS 1.3 session tickets may still be queued.
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock)?;
    }
    tls.sock.flush()
}

/// Replies pending beyond this are written even if requests are buffered.
const EAGER_FLUSH: usize = 256 * 1024;

/// One read, with the socket's read timeout set to what is left before
/// `deadline` (`TimedOut` once it has passed).
fn read_before<R: Read, S: ServerStream>(
    r: &mut R,
    buf: &mut [u8],
    control: &S,
    deadline: Instant,
) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"));
    }
    control.set_read_timeout_stream(Some(left.max(Duration::from_millis(1))))?;
    match r.read(buf) {
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))
        }
        other => other,
    }
}

fn discard<R: BufRead>(r: &mut R, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let k = (avail.len() as u64).min(n) as usize;
        r.consume(k);
        n -= k as u64;
    }
    Ok(())
}
