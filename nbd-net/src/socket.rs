//! Connecting to the server an NBD URI names: TCP (every address the host
//! resolves to, in turn), a Unix socket path, or a Linux abstract Unix
//! socket (`socket=` starting with `%00`). Both runtimes connect here; the
//! async one wraps the connected [`Socket`] in its reactor.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nbd_proto::uri::{NbdUri, Transport};

/// A connected stream socket: what an NBD client talks over.
///
/// `Read` and `Write` are implemented for `&Socket` too, so that one
/// thread (or task) can read while another writes.
#[derive(Debug)]
pub enum Socket {
    /// TCP (with `TCP_NODELAY` set by [`connect`]).
    Tcp(TcpStream),
    /// A Unix domain socket (a path, or an abstract name).
    Unix(UnixStream),
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Socket {
        Socket::Tcp(s)
    }
}

impl From<UnixStream> for Socket {
    fn from(s: UnixStream) -> Socket {
        Socket::Unix(s)
    }
}

impl Socket {
    /// Shuts down the reading, writing or both halves.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        }
    }

    /// Sets `O_NONBLOCK` (async runtimes) or clears it.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nonblocking(nonblocking),
            Socket::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }

    /// Bounds every later read (`None`: wait forever, the default). A read
    /// that times out fails with `WouldBlock` or `TimedOut`.
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(timeout),
            Socket::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    /// Bounds every later write (`None`: wait forever, the default).
    pub fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(timeout),
            Socket::Unix(s) => s.set_write_timeout(timeout),
        }
    }
}

/// Opens the socket a URI names (blocking until connected). A TCP host is
/// resolved and each of its addresses tried in turn; `TCP_NODELAY` is set,
/// since NBD requests are small and latency-bound. A Unix `socket=` that
/// starts with NUL names an abstract socket (Linux only).
pub fn connect(uri: &NbdUri) -> io::Result<Socket> {
    connect_timeout(uri, None)
}

/// [`connect`], giving up after `timeout` (`None`: as long as the system
/// tries). The time covers every address a TCP host resolves to (name
/// resolution itself is the system resolver's, with its own timeouts); a
/// Unix socket whose server does not accept fails when its listen queue
/// is full and `timeout` passes. An expired timeout is `ErrorKind::TimedOut`.
///
/// Errors keep their kind and name what was being connected to
/// (`Unix socket /run/nbd.sock: No such file or directory`,
/// `host:10809: Connection refused`).
pub fn connect_timeout(uri: &NbdUri, timeout: Option<Duration>) -> io::Result<Socket> {
    connect_any(uri, timeout).map_err(|e| {
        let what = match &uri.transport {
            Transport::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Transport::Tcp { host, port } => format!("{host}:{port}"),
            Transport::Unix { socket } => match socket.strip_prefix('\0') {
                Some(name) => format!("abstract Unix socket @{name}"),
                None => format!("Unix socket {socket}"),
            },
        };
        io::Error::new(e.kind(), ConnectError { what, source: e })
    })
}

/// A connect error with what was being connected to; its source is the
/// system's error (whose OS error number [`os_error`] finds).
#[derive(Debug)]
struct ConnectError {
    what: String,
    source: io::Error,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The OS error number of `e`, or of the system error it wraps (as the
/// errors of [`connect_timeout`] wrap theirs).
pub fn os_error(e: &io::Error) -> Option<i32> {
    if let Some(code) = e.raw_os_error() {
        return Some(code);
    }
    let mut inner: &(dyn std::error::Error + 'static) = e.get_ref()?;
    loop {
        if let Some(io) = inner.downcast_ref::<io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        inner = inner.source()?;
    }
}

fn connect_any(uri: &NbdUri, timeout: Option<Duration>) -> io::Result<Socket> {
    let Some(timeout) = timeout else {
        return connect_blocking(uri);
    };
    let deadline = Instant::now() + timeout;
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))
        } else {
            Ok(d)
        }
    };
    match &uri.transport {
        Transport::Tcp { host, port } => {
            let mut last = None;
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, left()?) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(Socket::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host has no address")))
        }
        Transport::Unix { socket } => {
            // socket2 reads a leading NUL as an abstract name, as we do.
            let addr = socket2::SockAddr::unix(socket.as_str())?;
            // A Unix stream connect completes at once or, when the
            // server's listen queue is full, fails with EAGAIN (it never
            // answers EINPROGRESS): try again until the deadline.
            let mut wait = Duration::from_millis(1);
            loop {
                let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                match s.connect(&addr) {
                    Ok(()) => {
                        s.set_nonblocking(false)?;
                        return Ok(Socket::Unix(UnixStream::from(std::os::fd::OwnedFd::from(s))));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(wait.min(left()?));
                        wait = (wait * 2).min(Duration::from_millis(50));
                        left()?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

fn connect_blocking(uri: &NbdUri) -> io::Result<Socket> {
    match &uri.transport {
        Transport::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))?;
            s.set_nodelay(true)?;
            Ok(Socket::Tcp(s))
        }
        Transport::Unix { socket } => match socket.strip_prefix('\0') {
            Some(name) => connect_abstract(name.as_bytes()).map(Socket::Unix),
            None => UnixStream::connect(socket).map(Socket::Unix),
        },
    }
}

#[cfg(target_os = "linux")]
fn connect_abstract(name: &[u8]) -> io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    UnixStream::connect_addr(&addr)
}

#[cfg(not(target_os = "linux"))]
fn connect_abstract(_name: &[u8]) -> io::Result<UnixStream> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract Unix sockets exist on Linux only",
    ))
}

macro_rules! each {
    ($s:expr, $v:ident => $e:expr) => {
        match $s {
            Socket::Tcp($v) => $e,
            Socket::Unix($v) => $e,
        }
    };
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        each!(*self, s => (&*s).read(buf))
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        each!(*self, s => (&*s).read_vectored(bufs))
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        each!(*self, s => (&*s).write(buf))
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        each!(*self, s => (&*s).write_vectored(bufs))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        each!(self, s => s.as_fd())
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        each!(self, s => s.as_raw_fd())
    }
}

/// A header and a payload on their way out with vectored writes: the
/// runtimes' write loops call [`Gather::slices`], write, and
/// [`Gather::advance`] by what was written until [`Gather::is_done`].
#[derive(Debug)]
pub struct Gather<'a> {
    head: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Gather<'a> {
    /// `head` first, then `payload` (either may be empty).
    pub fn new(head: &'a [u8], payload: &'a [u8]) -> Gather<'a> {
        Gather { head, payload }
    }

    /// Whether everything was written.
    pub fn is_done(&self) -> bool {
        self.head.is_empty() && self.payload.is_empty()
    }

    /// What is left, as slices for `write_vectored`.
    pub fn slices(&self) -> [IoSlice<'a>; 2] {
        [IoSlice::new(self.head), IoSlice::new(self.payload)]
    }

    /// `n` more bytes were written. A write of nothing while bytes remain
    /// is an error (`WriteZero`): the peer stopped taking data.
    pub fn advance(&mut self, n: usize) -> io::Result<()> {
        if n == 0 && !self.is_done() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the connection took no more bytes",
            ));
        }
        let h = n.min(self.head.len());
        self.head = &self.head[h..];
        let p = (n - h).min(self.payload.len());
        self.payload = &self.payload[p..];
        Ok(())
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;

    #[test]
    fn errors_name_what_was_connected_to() {
        let uri: NbdUri = "nbd+unix:///?socket=/nonexistent/nbd.sock".parse().unwrap();
        let Err(e) = connect(&uri) else {
            panic!("connected to no socket")
        };
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with("Unix socket /nonexistent/nbd.sock: "), "{e}");
        assert_eq!(os_error(&e), Some(2), "ENOENT");
        let Err(e) = connect_timeout(&uri, Some(Duration::from_secs(1))) else {
            panic!("connected to no socket")
        };
        assert!(e.to_string().contains("/nonexistent/nbd.sock"), "{e}");
        assert_eq!(os_error(&e), Some(2), "ENOENT");
    }
}
