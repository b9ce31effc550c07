//! An async NBD server over smol: many clients, several exports, a
//! maximum number of connections, a handshake timeout, graceful shutdown.
//!
//! # Lifecycle
//!
//! - [`Server::shutdown`] stops accepting and drains: clients in
//!   transmission get answers to what they sent, then the connection
//!   closes; new options and requests are refused. It waits as long as
//!   clients take. [`Server::shutdown_within`] bounds the drain: when the
//!   grace period is over, [`Server::close_connections`] closes whatever
//!   is still open (a client stalled in the middle of a WRITE payload, one
//!   that does not read its replies).
//! - [`Server::stop_after_last_client`]: once the last connection ends,
//!   the server shuts down (qemu-nbd's lifetime without `--persistent`).
//! - [`Listener::bind_unix`] leaves a live socket alone ("address in
//!   use") and replaces a stale one; the socket file is removed when the
//!   listener is dropped, if it is still the one it bound.
//! - [`Listener::from_systemd`] takes only listening stream sockets; any
//!   other descriptor is an error at start, not an accept loop that fails
//!   forever. An accept error that retrying cannot fix (`EINVAL`,
//!   `EBADF`, `ENOTSOCK`, ...) ends [`Server::serve`] with that error.
//!
//! Everything but the sockets, TLS and timers is
//! [`nbd_server::ServeConnection`], shared with the blocking
//! server: this module reads bytes into it and writes what it gives out.
//! Each connection is one task with two halves that run at once: a reader
//! that feeds requests in (waiting when the connection says it must) and a
//! writer that sends replies as storage completes them, with vectored
//! writes straight from the buffers storage filled.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_lite::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use nbd_net::time;
#[cfg(feature = "tls")]
use nbd_server::ServeError;
pub use nbd_server::ServerOptions;
use nbd_server::{Export, HandshakeProgress, ReplyWriter, ServeConnection, ServeContext, Status};
use smol::Async;
use smol::lock::Semaphore;

use crate::io::SharedHalf;

/// The error of a handshake that did not reach transmission in time.
fn handshake_timed_out(t: nbd_proto::time::TimedOut) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("handshake timed out (after {:?})", t.after),
    )
}

/// Runs `io` (a step of the handshake: a read, a write, the TLS handshake)
/// under the connection's deadline: tells the connection the time, then
/// races `io` with one timer at [`ServeConnection::poll_timeout`]; when it
/// fires, the connection decides ([`ServeConnection::handle_timeout`]):
/// its "handshake timed out" error, or `io` goes on under a new timer.
async fn before_deadline<T>(
    conn: &mut ServeConnection,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let mut io = std::pin::pin!(io);
    loop {
        conn.handle_timeout(time::now()).map_err(handshake_timed_out)?;
        let Some(at) = conn.poll_timeout() else {
            return io.await;
        };
        let done = async { Some(io.as_mut().await) };
        let fired = async {
            smol::Timer::at(time::instant(at)).await;
            None
        };
        if let Some(r) = smol::future::or(done, fired).await {
            return r;
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(Async<std::net::TcpListener>),
    /// A Unix domain socket; the socket file it bound (if any) is removed
    /// on drop.
    Unix(Async<UnixListener>, Option<SocketFile>),
}

/// The file of a Unix socket a [`Listener`] bound: its path, and which
/// file it is, so that dropping the listener removes that file and never
/// one another server put at the same path since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Device and inode of the file at `path` (not following symlinks).
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(f)) = self
            && f.id.is_some()
            && file_id(&f.path) == f.id
        {
            let _ = std::fs::remove_file(&f.path);
        }
    }
}

impl Listener {
    /// Binds a TCP address.
    pub fn bind_tcp(addr: std::net::SocketAddr) -> io::Result<Listener> {
        Ok(Listener::Tcp(Async::<std::net::TcpListener>::bind(addr)?))
    }

    /// Binds a Unix socket path. Something already at the path is left
    /// alone ("address in use") unless it is a stale socket, one nobody
    /// listens on any more (a server that was killed leaves one behind),
    /// which is replaced.
    pub fn bind_unix(path: impl Into<PathBuf>) -> io::Result<Listener> {
        let path = path.into();
        let l = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                replace_stale_socket(&path)?;
                UnixListener::bind(&path)?
            }
            Err(e) => return Err(e),
        };
        let id = file_id(&path);
        Ok(Listener::Unix(Async::new(l)?, Some(SocketFile { path, id })))
    }

    /// Sockets passed by systemd socket activation (`LISTEN_FDS`,
    /// `LISTEN_PID`, descriptors from 3 on), as nbdkit and qemu-nbd
    /// accept them. Returns `None` when the environment does not ask for
    /// it (no `LISTEN_FDS`, or a `LISTEN_PID` that is another process's).
    /// A descriptor that is not a listening stream socket (a connected
    /// socket, a pipe, a closed descriptor) is an error naming it.
    pub fn from_systemd() -> io::Result<Option<Vec<Listener>>> {
        let Ok(fds) = std::env::var("LISTEN_FDS") else {
            return Ok(None);
        };
        if let Ok(pid) = std::env::var("LISTEN_PID")
            && pid.parse::<u32>().ok() != Some(std::process::id())
        {
            return Ok(None);
        }
        let n: i32 = fds
            .parse()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid LISTEN_FDS={fds:?}")))?;
        let mut out = Vec::new();
        for fd in 3..3 + n {
            out.push(listener_from_fd(fd).map_err(|e| io::Error::new(e.kind(), format!("descriptor {fd}: {e}")))?);
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
            Listener::Unix(_, Some(f)) => f.path.display().to_string(),
            Listener::Unix(l, None) => format!("{:?}", l.get_ref().local_addr().ok()),
        }
    }

    /// The TCP address it listens on (`None` for a Unix socket).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.get_ref().local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// The path of the Unix socket it listens on (`None` for TCP and for
    /// unnamed or abstract sockets).
    pub fn unix_path(&self) -> Option<PathBuf> {
        match self {
            Listener::Unix(_, Some(f)) => Some(f.path.clone()),
            Listener::Unix(l, None) => l.get_ref().local_addr().ok()?.as_pathname().map(PathBuf::from),
            Listener::Tcp(_) => None,
        }
    }
}

/// `path` is taken: remove it if it is a socket nobody listens on, else
/// say why it cannot be used.
fn replace_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let in_use = |why: &str| io::Error::new(io::ErrorKind::AddrInUse, format!("address in use: {why}"));
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(in_use("the path exists and is not a socket"));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(in_use("another server is listening on this socket")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("address in use: cannot tell whether the socket is alive: {e}"),
        )),
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
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // A descriptor that is not open must not be taken (closing it later
    // would close whatever gets that number next).
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: systemd socket activation hands us these descriptors; we
    // take ownership exactly once, and checked above that it is open.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock = socket2::Socket::from(owned);
    let not_listening = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a listening socket ({what}); socket activation passes sockets that listen"),
        )
    };
    let kind = match sock.r#type() {
        Ok(k) => k,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => return Err(not_listening("not a socket")),
        Err(e) => return Err(e),
    };
    if kind != socket2::Type::STREAM {
        return Err(not_listening("not a stream socket"));
    }
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    if listening == 0 {
        return Err(not_listening("a connected or unbound socket"));
    }
    let domain = sock.local_addr()?.domain();
    if domain == socket2::Domain::UNIX {
        let l: UnixListener = UnixListener::from(OwnedFd::from(sock));
        Ok(Listener::Unix(Async::new(l)?, None))
    } else if domain == socket2::Domain::IPV4 || domain == socket2::Domain::IPV6 {
        let l: std::net::TcpListener = std::net::TcpListener::from(OwnedFd::from(sock));
        Ok(Listener::Tcp(Async::new(l)?))
    } else {
        Err(not_listening("neither a Unix nor a TCP socket"))
    }
}

/// Whether an accept error passes: out of descriptors or memory, a client
/// that left before it was accepted, and the network errors accept(2)
/// says to treat like `EAGAIN`. Wait and accept again. Any other
/// (`EINVAL`, `EBADF`, `ENOTSOCK`, ...) would repeat forever.
fn accept_error_passes(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPERM
                | libc::ETIMEDOUT
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::ENETDOWN
                | libc::ENONET
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EOPNOTSUPP
        )
    )
}

enum Conn {
    Tcp(Async<std::net::TcpStream>),
    Unix(Async<std::os::unix::net::UnixStream>),
}

/// A running server: cheap to clone, shut it down with [`Server::shutdown`]
/// or [`Server::shutdown_within`].
#[derive(Clone)]
pub struct Server {
    ctx: Arc<ServeContext>,
    options: Arc<ServerOptions>,
    shutdown_event: Arc<event_listener::Event>,
    closing: Arc<Closing>,
    stop_when_idle: Arc<AtomicBool>,
}

/// [`Server::close_connections`]: raised once, never lowered.
#[derive(Default)]
struct Closing {
    now: AtomicBool,
    event: event_listener::Event,
}

impl Closing {
    /// Completes once connections must be closed.
    async fn wait(&self) {
        loop {
            if self.now.load(Ordering::SeqCst) {
                return;
            }
            let listener = self.event.listen();
            if self.now.load(Ordering::SeqCst) {
                return;
            }
            listener.await;
        }
    }
}

impl Server {
    /// A server for a set of exports.
    pub fn new(exports: Vec<Export>, options: ServerOptions) -> Server {
        let ctx = ServeContext::new(exports, options.config.clone(), options.limits);
        Server {
            ctx: Arc::new(ctx),
            shutdown_event: Arc::new(event_listener::Event::new()),
            options: Arc::new(options),
            closing: Arc::new(Closing::default()),
            stop_when_idle: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Number of connections being served.
    pub fn active_connections(&self) -> usize {
        self.ctx.active_connections()
    }

    /// Stops accepting, lets clients in transmission finish their
    /// in-flight requests, refuses new options with
    /// `NBD_REP_ERR_SHUTDOWN`, and makes [`Server::serve`] return once
    /// every connection is gone. A client that never lets its connection
    /// finish (it stops in the middle of a WRITE payload, or does not read
    /// its replies) keeps it open: see [`Server::shutdown_within`].
    pub fn shutdown(&self) {
        self.ctx.shutdown();
        self.shutdown_event.notify(usize::MAX);
    }

    /// [`Server::shutdown`], and after `grace`
    /// [`Server::close_connections`] for whatever has not finished by then
    /// (at once for a zero `grace`). The timer runs on smol's global
    /// executor; call it from any thread.
    pub fn shutdown_within(&self, grace: Duration) {
        self.shutdown();
        if grace.is_zero() {
            self.close_connections();
            return;
        }
        // The timer holds only what closing needs, not the server: the
        // exports (and what their storage holds open) go when the server
        // is dropped, whether the grace has run out or not.
        let closing = self.closing.clone();
        smol::spawn(async move {
            smol::Timer::after(grace).await;
            closing.now.store(true, Ordering::SeqCst);
            closing.event.notify(usize::MAX);
        })
        .detach();
    }

    /// Closes every connection now, whatever it is doing: requests in
    /// flight get no reply (so none of them was acknowledged) and storage
    /// calls already running finish on their own. What a drain that takes
    /// too long ends with.
    pub fn close_connections(&self) {
        self.closing.now.store(true, Ordering::SeqCst);
        self.closing.event.notify(usize::MAX);
    }

    /// Once the last connection ends, shut down (qemu-nbd's lifetime
    /// without `--persistent`): the first client comes, and when no
    /// client is left the server stops. Off by default: a server serves
    /// until [`Server::shutdown`].
    pub fn stop_after_last_client(&self, stop: bool) {
        self.stop_when_idle.store(stop, Ordering::SeqCst);
    }

    /// Serves connections from the listeners until shutdown, then waits
    /// for the connections to drain. An accept error that cannot pass
    /// (see the [module docs](self)) shuts the server down and is
    /// returned once the connections are gone.
    pub async fn serve(&self, listeners: Vec<Listener>) -> io::Result<()> {
        let limit = Arc::new(Semaphore::new(self.options.max_connections.max(1)));
        let tasks: Vec<smol::Task<io::Result<()>>> = listeners
            .into_iter()
            .map(|l| {
                let this = self.clone();
                let limit = limit.clone();
                smol::spawn(async move {
                    let r = this.accept_loop(&l, limit).await;
                    if let Err(e) = &r {
                        eprintln!("nbd-serve: accept on {}: {e}", l.describe());
                        this.shutdown();
                    }
                    r
                })
            })
            .collect();
        let mut result = Ok(());
        for t in tasks {
            let r = t.await;
            if result.is_ok() {
                result = r;
            }
        }
        // Wait for the connections to drain.
        while self.ctx.active_connections() > 0 {
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        result
    }

    async fn accept_loop(&self, listener: &Listener, limit: Arc<Semaphore>) -> io::Result<()> {
        loop {
            if self.ctx.is_shutting_down() {
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
                    Some(Err(e)) if accept_error_passes(&e) => {
                        // Out of descriptors and the like: wait and retry.
                        eprintln!("nbd-serve: accept: {e}");
                        smol::Timer::after(Duration::from_millis(50)).await;
                        continue;
                    }
                    Some(Err(e)) => return Err(e),
                    None => continue,
                }
            };
            if self.ctx.is_shutting_down() {
                // Accepted as the server began to shut down: close it.
                continue;
            }
            let this = self.clone();
            // Counted from here, so that serve() waits for it.
            let served = ServeConnection::new(&self.ctx);
            smol::spawn(async move {
                let r = match conn {
                    Conn::Tcp(s) => {
                        let s = Arc::new(s);
                        this.serve_accepted(served, SharedHalf(s.clone()), SharedHalf(s)).await
                    }
                    Conn::Unix(s) => {
                        let s = Arc::new(s);
                        this.serve_accepted(served, SharedHalf(s.clone()), SharedHalf(s)).await
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
                drop(permit);
                // The connection was dropped inside serve_accepted.
                if this.stop_when_idle.load(Ordering::SeqCst) && this.ctx.active_connections() == 0 {
                    this.shutdown();
                }
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
        self.serve_accepted(ServeConnection::new(&self.ctx), r, w).await
    }

    /// Serves a connection until it ends or [`Server::close_connections`]
    /// closes it (dropping the connection and its halves).
    async fn serve_accepted<R, W>(&self, conn: ServeConnection, r: R, w: W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let closed = async {
            self.closing.wait().await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "closed: the connection had not finished when the shutdown's grace period ended",
            ))
        };
        smol::future::or(self.serve_halves(conn, r, w), closed).await
    }

    async fn serve_halves<R, W>(&self, mut conn: ServeConnection, r: R, w: W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // One deadline for the whole handshake, TLS included, kept by the
        // connection from now on.
        conn.handle_timeout(time::now()).map_err(handshake_timed_out)?;
        let mut r = BufReader::with_capacity(64 * 1024, r);
        let mut w = w;
        if self.negotiate(&mut conn, &mut r, &mut w).await? != HandshakeProgress::StartTls {
            return self.after_handshake(conn, &mut r, &mut w).await;
        }
        self.serve_tls(conn, r, w).await
    }

    /// Without the `tls` feature there is no certificate: a client's
    /// `NBD_OPT_STARTTLS` that the policy acknowledged ends the connection.
    #[cfg(not(feature = "tls"))]
    async fn serve_tls<R, W>(&self, conn: ServeConnection, r: BufReader<R>, _w: W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        match conn.starting_tls::<std::convert::Infallible>(r.buffer().len(), None) {
            Ok(never) => match never {},
            Err(e) => Err(invalid_data(e)),
        }
    }

    /// Upgrades the connection to TLS and goes on negotiating over it.
    #[cfg(feature = "tls")]
    async fn serve_tls<R, W>(&self, mut conn: ServeConnection, r: BufReader<R>, w: W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let config = conn
            .starting_tls(r.buffer().len(), self.options.tls.clone())
            .map_err(invalid_data)?;
        let accept = async {
            crate::tls::accept(r.into_inner(), w, config)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))
        };
        let (tr, mut tw) = before_deadline(&mut conn, accept).await?;
        let mut tr = BufReader::with_capacity(64 * 1024, tr);
        conn.tls_established().map_err(invalid_data)?;
        match self.negotiate(&mut conn, &mut tr, &mut tw).await? {
            HandshakeProgress::StartTls => Err(invalid_data(ServeError::SecondStartTls)),
            _ => self.after_handshake(conn, &mut tr, &mut tw).await,
        }
    }

    /// Serves transmission if the handshake reached it, else closes (over
    /// TLS, with close_notify).
    async fn after_handshake<R, W>(&self, conn: ServeConnection, r: &mut BufReader<R>, w: &mut W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if conn.is_transmitting() {
            return self.transmission(conn, r, w).await;
        }
        let _ = w.close().await;
        Ok(())
    }

    /// Negotiation: until transmission starts, TLS is asked for, or the
    /// client leaves; each read and write under the connection's deadline
    /// (see [`before_deadline`]).
    async fn negotiate<R, W>(
        &self,
        conn: &mut ServeConnection,
        r: &mut BufReader<R>,
        w: &mut W,
    ) -> io::Result<HandshakeProgress>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = Vec::new();
        loop {
            while conn.poll_transmit(&mut out).is_some() {}
            before_deadline(conn, send_all(&mut out, w)).await?;
            let next = conn.negotiation();
            if next != HandshakeProgress::Read {
                return Ok(next);
            }
            let input = before_deadline(conn, r.fill_buf()).await?;
            let used = conn.input(input);
            if used.is_err() {
                while conn.poll_transmit(&mut out).is_some() {}
                let _ = before_deadline(conn, send_all(&mut out, w)).await;
            }
            r.consume(used.map_err(invalid_data)?);
        }
    }

    /// Transmission: a reader feeds requests in while a writer sends the
    /// replies as they complete.
    async fn transmission<R, W>(&self, mut conn: ServeConnection, r: &mut BufReader<R>, w: &mut W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.options.verbose
            && let (Some(neg), Some(export)) = (conn.negotiated(), conn.export())
        {
            eprintln!("nbd-serve: {}", nbd_server::describe(neg, export));
        }
        let mut writer = conn.reply_writer();
        let reader = async {
            let r = self.read_requests(&mut conn, r).await;
            if r.is_err() {
                conn.input_closed();
            }
            r
        };
        let write = async {
            let r = write_replies(&mut writer, w).await;
            if r.is_err() {
                writer.failed();
            }
            let _ = w.close().await;
            r
        };
        futures_lite::future::try_zip(reader, write).await.map(|_| ())
    }

    async fn read_requests<R: AsyncRead + Unpin>(
        &self,
        conn: &mut ServeConnection,
        r: &mut BufReader<R>,
    ) -> io::Result<()> {
        // One listener for the whole connection: shutdown happens once.
        let mut stop = self.shutdown_event.listen();
        let mut timer = ConnTimer::default();
        loop {
            // Wait while the connection must (budget, requests in flight,
            // replies the client does not take).
            futures_lite::future::poll_fn(|cx| match conn.status(Some(cx.waker())) {
                Status::Blocked => Poll::Pending,
                _ => Poll::Ready(()),
            })
            .await;
            match conn.status(None) {
                Status::Closed => return Ok(()),
                Status::StartTls(_) => return Err(invalid_data("NBD_OPT_STARTTLS in transmission")),
                _ => {}
            }
            if r.buffer().is_empty() && !self.wait_for_request(conn, r, &mut stop, &mut timer).await? {
                // Shutting down with nothing buffered: stop reading;
                // requests in flight are answered, then the connection
                // closes (the spec's hard disconnect after them).
                conn.input_closed();
                return Ok(());
            }
            // (An empty input, EOF, closes the connection's input.)
            let input = r.fill_buf().await?;
            let n = conn.input(input).map_err(invalid_data)?;
            r.consume(n);
        }
    }

    /// Waits until the client sends something (or hangs up): `true`, or
    /// until the server shuts down while nothing is in flight: `false`.
    /// Meanwhile the connection is told the time, with one timer at what it
    /// asks for (a connection that waits long gives its buffers back).
    async fn wait_for_request<R: AsyncRead + Unpin>(
        &self,
        conn: &mut ServeConnection,
        r: &mut BufReader<R>,
        stop: &mut event_listener::EventListener,
        timer: &mut ConnTimer,
    ) -> io::Result<bool> {
        loop {
            if conn.server_shutting_down() && conn.in_flight() == 0 {
                return Ok(false);
            }
            conn.handle_timeout(time::now()).map_err(handshake_timed_out)?;
            timer.want(conn.poll_timeout().map(time::instant));
            let readable = async { r.fill_buf().await.map(|_| Some(true)) };
            let stopped = async {
                (&mut *stop).await;
                Ok(Some(false))
            };
            let fired = async {
                (&mut timer.timer).await;
                timer.at = None;
                Ok(None)
            };
            match smol::future::or(readable, smol::future::or(stopped, fired)).await? {
                Some(true) => return Ok(true),
                Some(false) => {
                    // Shutting down: requests in flight still get answers.
                    *stop = self.shutdown_event.listen();
                    if conn.in_flight() == 0 {
                        return Ok(false);
                    }
                }
                // (Told the time again at the top.)
                None => {}
            }
        }
    }
}

/// The timer a connection's reader waits on, kept across waits: it is
/// moved only when the connection asks for an earlier moment than the one
/// set (each move wakes the reactor, a system call, and a reader waits
/// once per batch of requests). A timer that fires before the moment the
/// connection wants now only makes the reader tell it the time again.
struct ConnTimer {
    timer: smol::Timer,
    /// When `timer` fires (`None`: never).
    at: Option<std::time::Instant>,
}

impl Default for ConnTimer {
    fn default() -> ConnTimer {
        ConnTimer {
            timer: smol::Timer::never(),
            at: None,
        }
    }
}

impl ConnTimer {
    /// The connection wants to be told the time at `at` (or never).
    fn want(&mut self, at: Option<std::time::Instant>) {
        if let Some(at) = at
            && self.at.is_none_or(|set| at < set)
        {
            self.timer.set_at(at);
            self.at = Some(at);
        }
    }
}

/// Sends the handshake bytes in `out` (what the connection queued).
async fn send_all<W: AsyncWrite + Unpin>(out: &mut Vec<u8>, w: &mut W) -> io::Result<()> {
    if !out.is_empty() {
        w.write_all(out).await?;
        w.flush().await?;
        out.clear();
    }
    Ok(())
}

/// The writer half: replies as they complete, in vectored writes.
async fn write_replies<W: AsyncWrite + Unpin>(writer: &mut ReplyWriter, w: &mut W) -> io::Result<()> {
    loop {
        let more = futures_lite::future::poll_fn(|cx| writer.poll_batch(cx)).await;
        if !more {
            return w.flush().await;
        }
        while !writer.is_empty() {
            let n = futures_lite::future::poll_fn(|cx| {
                writer.with_slices(|s| Pin::new(&mut *w).poll_write_vectored(cx, s))
            })
            .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            writer.advance(n);
        }
        w.flush().await?;
    }
}

fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}
