//! An async NBD server over smol: many clients, several exports, a
//! maximum number of connections, a handshake timeout, graceful shutdown.
//!
//! Each connection runs in its own task: the handshake is driven by
//! `nbd_proto`'s server machine (with a timeout), then transmission is
//! served by [`nbd_storage::serve::Connection`] (shared with the blocking
//! server), with replies gathered and flushed whenever the client has no
//! more requests buffered.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use nbd_proto::client::Mode;
use nbd_proto::server::{ExportListing, ServerConfig, ServerHandshake, ServerNegotiated, ServerStep};
use nbd_storage::serve::{Connection, Export, Exports, Next};
use smol::Async;
use smol::lock::Semaphore;

use crate::io::SharedHalf;

/// The default handshake timeout, as QEMU's.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Negotiation settings.
    pub config: ServerConfig,
    /// Connections served at once; more wait in the listen queue.
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Log each connection's negotiated mode and export to stderr.
    pub verbose: bool,
    /// The TLS certificate and key (see [`crate::tls::ServerTlsOptions`]),
    /// needed unless `config.tls` is [`nbd_proto::server::TlsPolicy::NoTls`]:
    /// without them a client's `NBD_OPT_STARTTLS` is acknowledged by the
    /// policy but the connection is then closed.
    pub tls: Option<Arc<crate::tls::rustls::ServerConfig>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            config: ServerConfig::default(),
            max_connections: 1024,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            verbose: false,
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

/// Runs `fut`, failing with "handshake timed out" at `deadline`.
async fn with_deadline<T>(deadline: Instant, fut: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    smol::future::or(fut, async {
        smol::Timer::at(deadline).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))
    })
    .await
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(Async<std::net::TcpListener>),
    /// A Unix domain socket (removed on drop when `path` is set).
    Unix(Async<UnixListener>, Option<PathBuf>),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(p)) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Listener {
    /// Binds a TCP address.
    pub fn bind_tcp(addr: std::net::SocketAddr) -> io::Result<Listener> {
        Ok(Listener::Tcp(Async::<std::net::TcpListener>::bind(addr)?))
    }

    /// Binds a Unix socket path (replacing a stale socket file).
    pub fn bind_unix(path: impl Into<PathBuf>) -> io::Result<Listener> {
        let path = path.into();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path)?;
            }
        }
        let l = UnixListener::bind(&path)?;
        Ok(Listener::Unix(Async::new(l)?, Some(path)))
    }

    /// Sockets passed by systemd socket activation (`LISTEN_FDS`,
    /// `LISTEN_PID`), as nbdkit and qemu-nbd accept them. Returns `None`
    /// when the environment does not ask for it.
    pub fn from_systemd() -> io::Result<Option<Vec<Listener>>> {
        let Ok(fds) = std::env::var("LISTEN_FDS") else {
            return Ok(None);
        };
        if let Ok(pid) = std::env::var("LISTEN_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return Ok(None);
            }
        }
        let n: i32 = fds
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid LISTEN_FDS={fds:?}")))?;
        // SAFETY-free path: take ownership of fds 3.. as the protocol says.
        let mut out = Vec::new();
        for fd in 3..3 + n {
            out.push(listener_from_fd(fd)?);
        }
        // SAFETY: environment mutation happens before any thread is
        // spawned by this program (called at startup).
        unsafe_env_remove();
        Ok(Some(out))
    }

    async fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.get_ref().set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok(Conn::Unix(s))
            }
        }
    }

    /// The local address, for logging.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.get_ref().local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, Some(p)) => p.display().to_string(),
            Listener::Unix(l, None) => format!("{:?}", l.get_ref().local_addr().ok()),
        }
    }
}

fn unsafe_env_remove() {
    // Removing variables is only unsafe in the presence of other threads;
    // this runs before the executor starts.
    #[allow(unused_unsafe)]
    unsafe {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDNAMES");
    }
}

fn listener_from_fd(fd: i32) -> io::Result<Listener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: systemd socket activation hands us these descriptors; we
    // take ownership exactly once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock = socket2::Socket::from(owned);
    let domain = sock.local_addr()?.domain();
    if domain == socket2::Domain::UNIX {
        let l: UnixListener = UnixListener::from(OwnedFd::from(sock));
        Ok(Listener::Unix(Async::new(l)?, None))
    } else {
        let l: std::net::TcpListener = std::net::TcpListener::from(OwnedFd::from(sock));
        Ok(Listener::Tcp(Async::new(l)?))
    }
}

enum Conn {
    Tcp(Async<std::net::TcpStream>),
    Unix(Async<std::os::unix::net::UnixStream>),
}

/// A running server: cheap to clone, shut it down with [`Server::shutdown`].
#[derive(Clone)]
pub struct Server {
    exports: Arc<Exports>,
    options: Arc<ServerOptions>,
    shutting_down: Arc<AtomicBool>,
    shutdown_event: Arc<event_listener::Event>,
    active: Arc<AtomicUsize>,
}

impl Server {
    /// A server for a set of exports.
    pub fn new(exports: Vec<Export>, options: ServerOptions) -> Server {
        Server {
            exports: Arc::new(Exports::new(exports)),
            options: Arc::new(options),
            shutting_down: Arc::new(AtomicBool::new(false)),
            shutdown_event: Arc::new(event_listener::Event::new()),
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Number of connections being served.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Stops accepting, lets clients in transmission finish their
    /// in-flight requests, refuses new options with
    /// `NBD_REP_ERR_SHUTDOWN`, and makes [`Server::serve`] return once
    /// every connection is gone.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown_event.notify(usize::MAX);
    }

    /// Serves connections from the listeners until shutdown.
    pub async fn serve(&self, listeners: Vec<Listener>) -> io::Result<()> {
        let limit = Arc::new(Semaphore::new(self.options.max_connections.max(1)));
        let tasks: Vec<smol::Task<io::Result<()>>> = listeners
            .into_iter()
            .map(|l| {
                let this = self.clone();
                let limit = limit.clone();
                smol::spawn(async move { this.accept_loop(l, limit).await })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
        // Wait for the connections to drain.
        while self.active.load(Ordering::SeqCst) > 0 {
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn accept_loop(&self, listener: Listener, limit: Arc<Semaphore>) -> io::Result<()> {
        loop {
            if self.shutting_down.load(Ordering::SeqCst) {
                return Ok(());
            }
            let permit = {
                let listen = self.shutdown_event.listen();
                let acquire = async { Some(limit.acquire_arc().await) };
                let stop = async {
                    listen.await;
                    None
                };
                match smol::future::or(acquire, stop).await {
                    Some(p) => p,
                    None => continue,
                }
            };
            let conn = {
                let listen = self.shutdown_event.listen();
                let accept = async { Some(listener.accept().await) };
                let stop = async {
                    listen.await;
                    None
                };
                match smol::future::or(accept, stop).await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        // Out of descriptors and the like: wait and retry.
                        eprintln!("nbd-serve: accept: {e}");
                        smol::Timer::after(Duration::from_millis(50)).await;
                        continue;
                    }
                    None => continue,
                }
            };
            let this = self.clone();
            self.active.fetch_add(1, Ordering::SeqCst);
            smol::spawn(async move {
                let r = match conn {
                    Conn::Tcp(s) => {
                        let s = Arc::new(s);
                        this.serve_connection(SharedHalf(s.clone()), SharedHalf(s)).await
                    }
                    Conn::Unix(s) => {
                        let s = Arc::new(s);
                        this.serve_connection(SharedHalf(s.clone()), SharedHalf(s)).await
                    }
                };
                if let Err(e) = r {
                    // A client that hangs up without waiting for our last
                    // reply (libnbd does after NBD_OPT_ABORT) is no error.
                    let hung_up = matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    );
                    if !hung_up {
                        eprintln!("nbd-serve: connection: {e}");
                    }
                }
                this.active.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            })
            .detach();
        }
    }

    /// Serves one connection (handshake, then transmission) over a pair of
    /// halves. When the client asks for TLS (and the policy allows it),
    /// the rest of the handshake and transmission run over TLS: the
    /// halves are joined for the TLS handshake and the TLS stream is split
    /// again.
    pub async fn serve_connection<R, W>(&self, r: R, w: W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // One deadline for the whole handshake, TLS included.
        let deadline = Instant::now() + self.options.handshake_timeout;
        let mut r = BufReader::with_capacity(64 * 1024, r);
        let mut w = w;
        let hs = ServerHandshake::new(self.options.config.clone());
        let hs = match with_deadline(deadline, self.handshake(hs, &mut r, &mut w)).await? {
            HandshakeEnd::Done(neg, export) => return self.start_transmission(neg, export, &mut r, &mut w).await,
            HandshakeEnd::Closed => return Ok(()),
            HandshakeEnd::StartTls(hs) => hs,
        };
        // The client must wait for the ACK before its TLS handshake, and
        // the machine read nothing past STARTTLS: buffered bytes here were
        // sent too early (and would be lost to TLS).
        if !r.buffer().is_empty() {
            return Err(invalid_data(
                "client sent data before the NBD_OPT_STARTTLS acknowledgement",
            ));
        }
        let Some(config) = self.options.tls.clone() else {
            return Err(io::Error::other("TLS requested but the server has no certificate"));
        };
        let accept = async {
            crate::tls::accept(r.into_inner(), w, config)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))
        };
        let (tr, mut tw) = with_deadline(deadline, accept).await?;
        let mut tr = BufReader::with_capacity(64 * 1024, tr);
        let mut hs = hs;
        hs.tls_established().map_err(invalid_data)?;
        match with_deadline(deadline, self.handshake(hs, &mut tr, &mut tw)).await? {
            HandshakeEnd::Done(neg, export) => self.start_transmission(neg, export, &mut tr, &mut tw).await,
            HandshakeEnd::Closed => {
                // Sends close_notify.
                let _ = tw.close().await;
                Ok(())
            }
            // The machine itself refuses a second STARTTLS.
            HandshakeEnd::StartTls(_) => Err(invalid_data("second NBD_OPT_STARTTLS")),
        }
    }

    async fn start_transmission<R, W>(
        &self,
        neg: ServerNegotiated,
        export: usize,
        r: &mut BufReader<R>,
        w: &mut W,
    ) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.options.verbose {
            eprintln!(
                "nbd-serve: client negotiated {}{}, export {:?} ({} bytes)",
                mode_description(neg.mode),
                if neg.tls { " over TLS" } else { "" },
                neg.export_name,
                neg.size
            );
        }
        self.transmission(neg, export, r, w).await
    }

    async fn handshake<R, W>(
        &self,
        mut hs: ServerHandshake,
        r: &mut BufReader<R>,
        w: &mut W,
    ) -> io::Result<HandshakeEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = Vec::new();
        let mut chosen: Option<usize> = None;
        loop {
            if self.shutting_down.load(Ordering::Relaxed) {
                hs.shutdown();
            }
            match hs.step() {
                ServerStep::Send(b) => {
                    w.write_all(b).await?;
                    w.flush().await?;
                    hs.sent();
                }
                ServerStep::Receive(n) => {
                    buf.resize(n, 0);
                    r.read_exact(&mut buf).await?;
                    hs.received(&buf).map_err(invalid_data)?;
                }
                ServerStep::Discard(n) => {
                    discard(r, n as u64).await?;
                    hs.discarded().map_err(invalid_data)?;
                }
                ServerStep::StartTls => return Ok(HandshakeEnd::StartTls(hs)),
                ServerStep::LookupExport { name } => {
                    let found = self.exports.lookup(name);
                    chosen = found;
                    let details = found.map(|i| self.exports.details(i));
                    hs.answer_export(details).map_err(invalid_data)?;
                }
                ServerStep::ListExports => {
                    let listing: Vec<ExportListing<'_>> = self.exports.listing();
                    hs.answer_list(&listing).map_err(invalid_data)?;
                }
                ServerStep::Done => {
                    let neg = hs.finish().map_err(invalid_data)?;
                    let idx = self.exports.lookup(&neg.export_name).or(chosen).unwrap_or(0);
                    return Ok(HandshakeEnd::Done(neg, idx));
                }
                ServerStep::Aborted | ServerStep::Closed => return Ok(HandshakeEnd::Closed),
            }
        }
    }

    /// Transmission: requests are read and executed by one future while
    /// a second one writes the replies of earlier requests, so storage work
    /// and socket writes overlap (two reply buffers take turns). Replies are
    /// handed to the writer when the client has nothing more buffered or a
    /// buffer holds [`EAGER_FLUSH`] bytes; past [`HIGH_WATER`] bytes the
    /// reader waits for the writer, so a client that stops reading its
    /// replies stops being read (bounded memory).
    async fn transmission<R, W>(
        &self,
        neg: ServerNegotiated,
        export: usize,
        r: &mut BufReader<R>,
        w: &mut W,
    ) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut conn = Connection::new(&neg, self.exports.get(export));
        let (to_writer, from_reader) = smol::channel::bounded::<Vec<u8>>(1);
        let (to_reader, from_writer) = smol::channel::bounded::<Vec<u8>>(1);
        let writer = async {
            while let Ok(mut buf) = from_reader.recv().await {
                w.write_all(&buf).await?;
                w.flush().await?;
                Connection::recycle(&mut buf);
                if to_reader.send(buf).await.is_err() {
                    break;
                }
            }
            let _ = w.close().await;
            Ok::<(), io::Error>(())
        };
        let reader = async {
            // The reply buffer not lent to the writer (None while the
            // writer holds both).
            let mut spare: Option<Vec<u8>> = Some(Vec::new());
            let r = self
                .serve_requests(&mut conn, r, &to_writer, &from_writer, &mut spare)
                .await;
            // Whatever is left goes out before the writer closes.
            if conn.has_output() {
                let mut spare = match spare.take() {
                    Some(b) => b,
                    None => from_writer.recv().await.unwrap_or_default(),
                };
                conn.swap_output(&mut spare);
                let _ = to_writer.send(spare).await;
            }
            drop(to_writer);
            r
        };
        futures_lite::future::try_zip(reader, writer).await.map(|_| ())
    }

    async fn serve_requests<R: AsyncRead + Unpin>(
        &self,
        conn: &mut Connection,
        r: &mut BufReader<R>,
        to_writer: &smol::channel::Sender<Vec<u8>>,
        from_writer: &smol::channel::Receiver<Vec<u8>>,
        spare: &mut Option<Vec<u8>>,
    ) -> io::Result<()> {
        fn closed<E>(_: E) -> io::Error {
            io::Error::new(io::ErrorKind::BrokenPipe, "reply writer stopped")
        }
        let mut header = Vec::with_capacity(32);
        // One listener for the whole connection: shutdown happens once.
        let mut stop = self.shutdown_event.listen();
        loop {
            if conn.has_output() && (r.buffer().is_empty() || conn.output().len() >= EAGER_FLUSH) {
                if spare.is_none() {
                    *spare = from_writer.try_recv().ok();
                }
                if spare.is_none() && conn.output().len() >= HIGH_WATER {
                    *spare = Some(from_writer.recv().await.map_err(closed)?);
                }
                if let Some(mut b) = spare.take() {
                    conn.swap_output(&mut b);
                    to_writer.send(b).await.map_err(closed)?;
                }
            }
            match conn.next() {
                Next::Bytes(n) => {
                    if r.buffer().is_empty() {
                        if conn.has_output() {
                            // Replies wait for the writer: take whichever
                            // comes first, the writer's buffer or input.
                            let back = async { Some(from_writer.recv().await) };
                            let input = async {
                                let _ = r.fill_buf().await;
                                None
                            };
                            if let Some(b) = smol::future::or(back, input).await {
                                *spare = Some(b.map_err(closed)?);
                                continue;
                            }
                        } else if !self.wait_for_request(r, &mut stop).await? {
                            // Every request so far is answered and sent:
                            // on shutdown, hang up now instead of waiting
                            // for the client (the spec's hard disconnect
                            // after in-flight requests); requests already
                            // buffered get NBD_ESHUTDOWN.
                            return Ok(());
                        }
                    }
                    if self.shutting_down.load(Ordering::SeqCst) {
                        conn.shutdown();
                    }
                    header.resize(n, 0);
                    match r.read_exact(&mut header).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) => return Err(e),
                    }
                    conn.handle_bytes(&header).map_err(invalid_data)?;
                }
                Next::Payload(n) => {
                    if r.buffer().len() >= n {
                        // Already received: write it from where it is.
                        conn.payload_from(&r.buffer()[..n]).map_err(invalid_data)?;
                        r.consume(n);
                    } else {
                        let buf = conn.payload_buffer(n);
                        r.read_exact(buf).await?;
                        conn.payload_received().map_err(invalid_data)?;
                    }
                }
                Next::Discard(n) => {
                    discard(r, n).await?;
                    conn.discarded().map_err(invalid_data)?;
                }
                Next::Close => return Ok(()),
            }
        }
    }
}

/// Replies are handed to the writer once this many bytes are pending, even
/// if more requests are buffered.
const EAGER_FLUSH: usize = 256 * 1024;
/// With this many reply bytes pending and the writer still busy, stop
/// reading requests until it is done.
const HIGH_WATER: usize = 8 << 20;

/// How [`ServerOptions::verbose`] names a negotiated mode.
fn mode_description(mode: Mode) -> &'static str {
    match mode {
        Mode::Oldstyle => "oldstyle negotiation",
        Mode::ExportNameOnly => "NBD_OPT_EXPORT_NAME (simple replies)",
        Mode::Simple => "simple replies",
        Mode::Structured => "structured replies",
        Mode::Extended => "extended headers",
    }
}

impl Server {
    /// Waits until the client sends something (or hangs up): `true`, or
    /// until the server shuts down: `false`.
    /// `stop` must have been created before the server's shutdown flag is
    /// read, so that no notification is missed.
    async fn wait_for_request<R: AsyncRead + Unpin>(
        &self,
        r: &mut BufReader<R>,
        stop: &mut event_listener::EventListener,
    ) -> io::Result<bool> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let readable = async { r.fill_buf().await.map(|_| true) };
        let stopped = async {
            stop.await;
            Ok(false)
        };
        smol::future::or(readable, stopped).await
    }
}

fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

async fn discard<R: AsyncRead + Unpin>(r: &mut BufReader<R>, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let k = (avail.len() as u64).min(n) as usize;
        r.consume(k);
        n -= k as u64;
    }
    Ok(())
}
