//! A simple thread-per-connection NBD server over std sockets.
//!
//! Everything but the sockets, TLS and the timer of the handshake's
//! deadline (a socket read timeout) is [`nbd_server::ServeConnection`],
//! shared with the async server; the connection keeps the deadline itself.
//! Each connection is served by one thread: it feeds the requests the
//! client has sent, and writes the replies whenever no more input is
//! buffered (or the connection must wait), so storage that runs on the I/O
//! pool still overlaps with reading. TLS runs on the same thread.

#[cfg(feature = "tls")]
use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
#[cfg(feature = "tls")]
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::Duration;

#[cfg(feature = "tls")]
use nbd_net::rustls;
use nbd_net::time;
#[cfg(feature = "tls")]
use nbd_server::ServeError;
pub use nbd_server::ServerOptions;
use nbd_server::{Export, HandshakeProgress, ReplyWriter, ServeConnection, ServeContext, Status};

#[cfg(feature = "tls")]
/// One side of a TLS session that the reading and the writing half of a
/// connection (both on the connection's thread) share.
struct TlsHalf<S: Read + Write>(Rc<RefCell<rustls::StreamOwned<rustls::ServerConnection, S>>>);

#[cfg(feature = "tls")]
impl<S: Read + Write> Read for TlsHalf<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

#[cfg(feature = "tls")]
impl<S: Read + Write> Write for TlsHalf<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.borrow_mut().write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// A blocking server: call [`Server::serve_unix`] or [`Server::serve_tcp`]
/// from a thread of your own; [`Server::shutdown`] stops it.
#[derive(Clone)]
pub struct Server {
    ctx: Arc<ServeContext>,
    options: Arc<ServerOptions>,
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

/// Wakes a parked thread.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl Server {
    /// A server for a set of exports.
    pub fn new(exports: Vec<Export>, options: ServerOptions) -> Server {
        let ctx = ServeContext::new(exports, options.config.clone(), options.limits);
        Server {
            options: Arc::new(options),
            ctx: Arc::new(ctx),
        }
    }

    /// Stops accepting (the accept loop notices within 100 ms); open
    /// connections refuse new options with `NBD_REP_ERR_SHUTDOWN` and new
    /// requests with `NBD_ESHUTDOWN`, and end when their clients leave.
    pub fn shutdown(&self) {
        self.ctx.shutdown();
    }

    /// Number of connections being served.
    pub fn active_connections(&self) -> usize {
        self.ctx.active_connections()
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
        while !self.ctx.is_shutting_down() {
            match accept() {
                Ok(s) => {
                    if self.ctx.active_connections() >= self.options.max_connections {
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
        // Counted from here (until the thread drops it).
        let conn = ServeConnection::new(&self.ctx);
        std::thread::spawn(move || {
            let _ = this.serve_accepted(conn, s);
        });
    }

    /// Serves one connection to its end: the handshake (upgrading to TLS
    /// when the client asks and the policy allows), then transmission.
    pub fn serve_connection<S: ServerStream>(&self, s: S) -> io::Result<()> {
        self.serve_accepted(ServeConnection::new(&self.ctx), s)
    }

    fn serve_accepted<S: ServerStream>(&self, mut conn: ServeConnection, s: S) -> io::Result<()> {
        // The handshake's deadline starts now (the connection keeps it).
        conn.handle_timeout(time::now()).map_err(handshake_timed_out)?;
        let control = s.try_clone_stream()?;
        let mut w = s.try_clone_stream()?;
        let mut r = BufReader::with_capacity(64 * 1024, s);
        if self.negotiate(&mut conn, &mut r, &mut w, &control)? != HandshakeProgress::StartTls {
            return self.after_handshake(conn, &mut r, &mut w, &control);
        }
        self.serve_tls(conn, r, w, control)
    }

    /// Without the `tls` feature there is no certificate: a client's
    /// `NBD_OPT_STARTTLS` that the policy acknowledged ends the connection.
    #[cfg(not(feature = "tls"))]
    fn serve_tls<S: ServerStream>(&self, conn: ServeConnection, r: BufReader<S>, _w: S, _control: S) -> io::Result<()> {
        match conn.starting_tls::<std::convert::Infallible>(r.buffer().len(), None) {
            Ok(never) => match never {},
            Err(e) => Err(invalid_data(e)),
        }
    }

    /// Upgrades the connection to TLS and goes on negotiating over it.
    #[cfg(feature = "tls")]
    fn serve_tls<S: ServerStream>(
        &self,
        mut conn: ServeConnection,
        r: BufReader<S>,
        w: S,
        control: S,
    ) -> io::Result<()> {
        let config = conn
            .starting_tls(r.buffer().len(), self.options.tls.clone())
            .map_err(invalid_data)?;
        drop(w);
        let tls_conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(tls_conn, r.into_inner());
        // Under the handshake's deadline: each read waits at most until it.
        tls_handshake(&mut tls, || arm_deadline(&mut conn, &control))?;
        let tls = Rc::new(RefCell::new(tls));
        let mut r = BufReader::with_capacity(64 * 1024, TlsHalf(tls.clone()));
        let mut w = TlsHalf(tls.clone());
        conn.tls_established().map_err(invalid_data)?;
        let result = match self.negotiate(&mut conn, &mut r, &mut w, &control)? {
            HandshakeProgress::StartTls => Err(invalid_data(ServeError::SecondStartTls)),
            _ => self.after_handshake(conn, &mut r, &mut w, &control),
        };
        // Say goodbye properly (best effort).
        let mut t = tls.borrow_mut();
        t.conn.send_close_notify();
        let _ = t.flush();
        result
    }

    /// Serves transmission if the handshake reached it.
    fn after_handshake<R: Read, W: Write, S: ServerStream>(
        &self,
        conn: ServeConnection,
        r: &mut BufReader<R>,
        w: &mut W,
        control: &S,
    ) -> io::Result<()> {
        if !conn.is_transmitting() {
            return Ok(());
        }
        control.set_read_timeout_stream(None)?;
        self.transmission(conn, r, w, control)
    }

    /// The handshake, until transmission starts, TLS is asked for, or the
    /// client leaves. `control` is a handle on the socket used to keep the
    /// read timeout at the connection's deadline
    /// ([`ServeConnection::poll_timeout`]), so a client trickling bytes
    /// cannot stretch the handshake past it.
    fn negotiate<R: Read, W: Write, S: ServerStream>(
        &self,
        conn: &mut ServeConnection,
        r: &mut BufReader<R>,
        w: &mut W,
        control: &S,
    ) -> io::Result<HandshakeProgress> {
        let mut out = Vec::new();
        loop {
            send_handshake_output(conn, &mut out, w)?;
            let next = conn.negotiation();
            if next != HandshakeProgress::Read {
                return Ok(next);
            }
            let input = fill_before_deadline(conn, r, control)?;
            let used = conn.input(input);
            if used.is_err() {
                let _ = send_handshake_output(conn, &mut out, w);
            }
            r.consume(used.map_err(invalid_data)?);
        }
    }

    fn transmission<R: Read, W: Write, S: ServerStream>(
        &self,
        mut conn: ServeConnection,
        r: &mut BufReader<R>,
        w: &mut W,
        control: &S,
    ) -> io::Result<()> {
        if self.options.verbose
            && let (Some(neg), Some(export)) = (conn.negotiated(), conn.export())
        {
            eprintln!("nbd server: {}", nbd_server::describe(neg, export));
        }
        let mut writer = conn.reply_writer();
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let result = self.serve_requests(&mut conn, &mut writer, &waker, r, w, control);
        if result.is_err() {
            conn.input_closed();
            writer.failed();
            return result;
        }
        // Every request read is answered before the connection closes.
        write_replies(&mut writer, &waker, w, true)?;
        w.flush()
    }

    fn serve_requests<R: Read, W: Write, S: ServerStream>(
        &self,
        conn: &mut ServeConnection,
        writer: &mut ReplyWriter,
        waker: &Waker,
        r: &mut BufReader<R>,
        w: &mut W,
        control: &S,
    ) -> io::Result<()> {
        loop {
            match conn.status(Some(waker)) {
                Status::Closed => return Ok(()),
                Status::StartTls(_) => return Err(invalid_data("NBD_OPT_STARTTLS in transmission")),
                Status::Blocked => {
                    // Send what is ready, and wait for a change.
                    if !write_replies(writer, waker, w, false)? {
                        std::thread::park_timeout(Duration::from_millis(100));
                    }
                    continue;
                }
                _ => {}
            }
            if r.buffer().is_empty() {
                // The client has sent nothing more: answer everything
                // storage is working on before waiting for it (a WRITE
                // whose payload is still coming needs the client first).
                while conn.executing() > 0 {
                    if !write_replies(writer, waker, w, false)? {
                        std::thread::park_timeout(Duration::from_millis(100));
                    }
                }
                write_replies(writer, waker, w, false)?;
                w.flush()?;
                if !wait_readable(conn, r, control)? {
                    // The connection's deadline (it gives its buffers back
                    // once idle long enough).
                    conn.handle_timeout(time::now()).map_err(handshake_timed_out)?;
                    continue;
                }
            }
            // (An empty input, EOF, closes the connection's input.)
            let input = r.fill_buf()?;
            let n = conn.input(input).map_err(invalid_data)?;
            r.consume(n);
        }
    }
}

/// Sends the handshake bytes the connection has queued.
fn send_handshake_output<W: Write>(conn: &mut ServeConnection, out: &mut Vec<u8>, w: &mut W) -> io::Result<()> {
    while conn.poll_transmit(out).is_some() {}
    if !out.is_empty() {
        w.write_all(out)?;
        w.flush()?;
        out.clear();
    }
    Ok(())
}

/// The error of a handshake that did not reach transmission in time.
fn handshake_timed_out(t: nbd_proto::time::TimedOut) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("handshake timed out (after {:?})", t.after),
    )
}

/// Tells the connection the time (`Err` once its handshake deadline
/// passed) and sets the socket's read timeout to what is left before that
/// deadline (none without one), before a blocking read.
fn arm_deadline<S: ServerStream>(conn: &mut ServeConnection, control: &S) -> io::Result<()> {
    conn.handle_timeout(time::now()).map_err(handshake_timed_out)?;
    // A zero timeout would mean none: the read waits at least 1 ms.
    let left = conn
        .poll_timeout()
        .map(|t| time::until(t).max(Duration::from_millis(1)));
    control.set_read_timeout_stream(left)
}

/// Fills the read buffer if it is empty, each read waiting at most until
/// the connection's deadline; a read that timed out is tried again unless
/// the connection says the deadline passed (then its error).
fn fill_before_deadline<'r, R: Read, S: ServerStream>(
    conn: &mut ServeConnection,
    r: &'r mut BufReader<R>,
    control: &S,
) -> io::Result<&'r [u8]> {
    while r.buffer().is_empty() {
        arm_deadline(conn, control)?;
        match r.fill_buf() {
            // (Empty: EOF.)
            Ok(_) => break,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(r.buffer())
}

/// Waits for input until the connection's deadline (in transmission, when
/// an idle connection gives its buffers back; with none, as long as it
/// takes): `false` if none came by then. The read timeout is reset after.
fn wait_readable<R: Read, S: ServerStream>(
    conn: &mut ServeConnection,
    r: &mut BufReader<R>,
    control: &S,
) -> io::Result<bool> {
    arm_deadline(conn, control)?;
    let got = match r.fill_buf() {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(false),
        Err(e) => Err(e),
    };
    if conn.poll_timeout().is_some() {
        control.set_read_timeout_stream(None)?;
    }
    got
}

/// Writes the replies that are ready. With `to_end`, waits until the
/// connection has no more replies to give (every request answered, no more
/// read); returns whether anything was written.
fn write_replies<W: Write>(writer: &mut ReplyWriter, waker: &Waker, w: &mut W, to_end: bool) -> io::Result<bool> {
    let mut cx = Context::from_waker(waker);
    let mut wrote = false;
    loop {
        match writer.poll_batch(&mut cx) {
            Poll::Ready(true) => {
                while !writer.is_empty() {
                    let n = writer.with_slices(|s| w.write_vectored(s))?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    writer.advance(n);
                }
                wrote = true;
            }
            Poll::Ready(false) => return Ok(wrote),
            Poll::Pending if to_end => std::thread::park_timeout(Duration::from_millis(100)),
            Poll::Pending => return Ok(wrote),
        }
    }
}

/// Runs the server side of a TLS handshake to its end. `arm` runs before
/// each step that may block on a read (it sets the read timeout, or fails
/// once the handshake's deadline passed); a read that timed out is tried
/// again after it.
#[cfg(feature = "tls")]
fn tls_handshake<S: Read + Write>(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, S>,
    mut arm: impl FnMut() -> io::Result<()>,
) -> io::Result<()> {
    let failed = |e: io::Error| io::Error::new(e.kind(), format!("TLS handshake failed: {e}"));
    while tls.conn.is_handshaking() {
        arm()?;
        match tls.conn.complete_io(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e)),
        }
    }
    // TLS 1.3 session tickets may still be queued.
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock).map_err(failed)?;
    }
    tls.sock.flush().map_err(failed)
}
