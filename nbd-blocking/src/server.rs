//! A simple thread-per-connection NBD server over std sockets, on the same
//! state machines (`nbd_proto`) and request executor (`nbd_storage::serve`)
//! as the async server.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            config: ServerConfig::default(),
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
        }
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

    /// Serves one connection to its end.
    pub fn serve_connection<S: ServerStream>(&self, s: S) -> io::Result<()> {
        let w = s.try_clone_stream()?;
        let deadline = Instant::now() + self.options.handshake_timeout;
        s.set_read_timeout_stream(Some(self.options.handshake_timeout))?;
        let mut r = BufReader::with_capacity(64 * 1024, s);
        let mut w = w;
        let Some((neg, export)) = self.handshake(&mut r, &mut w, deadline)? else {
            return Ok(());
        };
        r.get_ref().set_read_timeout_stream(None)?;
        self.transmission(neg, export, &mut r, &mut w)
    }

    fn handshake<S: ServerStream>(
        &self,
        r: &mut BufReader<S>,
        w: &mut S,
        deadline: Instant,
    ) -> io::Result<Option<(ServerNegotiated, usize)>> {
        let mut hs = ServerHandshake::new(self.options.config.clone());
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
                    r.read_exact(&mut buf)?;
                    hs.received(&buf).map_err(invalid_data)?;
                }
                ServerStep::Discard(n) => {
                    discard(r, n as u64)?;
                    hs.discarded().map_err(invalid_data)?;
                }
                ServerStep::StartTls => {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, "TLS not supported"));
                }
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
                    return Ok(Some((neg, idx)));
                }
                ServerStep::Aborted | ServerStep::Closed => return Ok(None),
            }
        }
    }

    fn transmission<S: ServerStream>(
        &self,
        neg: ServerNegotiated,
        export: usize,
        r: &mut BufReader<S>,
        w: &mut S,
    ) -> io::Result<()> {
        let mut conn = Connection::new(&neg, self.exports.get(export));
        let mut header = Vec::with_capacity(32);
        loop {
            if r.buffer().is_empty() && conn.has_output() {
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
