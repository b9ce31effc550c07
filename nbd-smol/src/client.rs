//! An async, multiplexed NBD client over smol.
//!
//! Any number of tasks issue requests on one shared [`Client`] at once;
//! requests are pipelined and replies are matched to their cookies in any
//! order. Buffers are passed by value (`read(offset, buf)` gives `buf`
//! back filled): a reader task moves READ data straight from the socket
//! into the caller's buffer and a writer task sends WRITE data straight
//! from it, so nothing is copied, nothing is allocated per request, and
//! dropping a request's future never corrupts the connection (the tasks
//! finish the request and drop the buffer).
//!
//! When the server dies, every outstanding request fails at once with
//! [`Error::Disconnected`]; nothing hangs.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use nbd_proto::client::{
    ClientConfig, ClientHandshake, ClientTransmission, Cookie, EncodedHeader, Extent, HandshakeError, HandshakeStep,
    Mode, Negotiated, ReceiveNext, ReplyEvent, ReplyViolation, Request, RequestError, ServerError, TlsMode,
};
use nbd_proto::uri::{NbdUri, Transport, UriError};
use nbd_proto::wire::{BlockSizeConstraints, Command, CommandFlags, TransmissionFlags};
use smol::Async;
use smol::lock::Semaphore;

use crate::io::{SharedHalf, write_all_vectored};
use crate::tls::{LazyClientTls, TlsError};

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
    /// The connection is gone (server died, or a violation closed it).
    #[error("disconnected from the server: {0}")]
    Disconnected(String),
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
    /// The errno this error stands for, where it has one.
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

/// The reading half of a connection.
pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half of a connection.
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

fn split_shared<T: Send + Sync + 'static>(s: Async<T>) -> (BoxRead, BoxWrite)
where
    for<'a> &'a T: io::Read + io::Write,
{
    let (r, w) = SharedHalf::pair(s);
    (Box::new(r), Box::new(w))
}

/// Opens the socket a URI names, split into halves.
pub async fn connect_transport(uri: &NbdUri) -> Result<(BoxRead, BoxWrite)> {
    match &uri.transport {
        Transport::Tcp { host, port } => {
            let addrs = smol::net::resolve((host.as_str(), *port)).await?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
            for a in addrs {
                match Async::<std::net::TcpStream>::connect(a).await {
                    Ok(s) => {
                        s.get_ref().set_nodelay(true)?;
                        return Ok(split_shared(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last.into())
        }
        Transport::Unix { socket } => {
            if socket.starts_with('\0') {
                return Err(
                    io::Error::new(io::ErrorKind::Unsupported, "abstract sockets are not supported here").into(),
                );
            }
            let s = Async::<std::os::unix::net::UnixStream>::connect(socket).await?;
            Ok(split_shared(s))
        }
    }
}

/// Drives a handshake to its end, upgrading the halves to TLS when the
/// server accepts `NBD_OPT_STARTTLS`.
async fn drive_handshake(
    hs: &mut ClientHandshake,
    r: &mut BoxRead,
    w: &mut BoxWrite,
    tls: &LazyClientTls,
) -> Result<()> {
    let mut buf = Vec::new();
    // TLS just started and the server said nothing over it yet.
    let mut fresh_tls = false;
    loop {
        match hs.step() {
            HandshakeStep::Send(b) => {
                let sent = match w.write_all(b).await {
                    Ok(()) => w.flush().await,
                    Err(e) => Err(e),
                };
                match sent {
                    Err(e) if fresh_tls => return Err(nbd_net::refused_after_handshake(e).into()),
                    r => r?,
                }
                hs.sent();
            }
            HandshakeStep::Receive(n) => {
                buf.resize(n, 0);
                let read = r.read_exact(&mut buf).await;
                let read = match read {
                    Err(e) if fresh_tls => Err(nbd_net::refused_after_handshake(e)),
                    r => r,
                };
                fresh_tls = false;
                read.map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        Error::Disconnected("server closed the connection during the handshake".into())
                    } else {
                        Error::Io(e)
                    }
                })?;
                hs.received(&buf)?;
            }
            HandshakeStep::StartTls => {
                let creds = tls.get()?;
                let plain_r = std::mem::replace(r, Box::new(futures_lite::io::empty()));
                let plain_w = std::mem::replace(w, Box::new(futures_lite::io::sink()));
                let (tr, tw) = crate::tls::connect(plain_r, plain_w, &creds)
                    .await
                    .map_err(Error::TlsHandshake)?;
                *r = Box::new(tr);
                *w = Box::new(tw);
                hs.tls_established()?;
                fresh_tls = true;
            }
            _ => return Ok(()),
        }
    }
}

/// A request's buffer: owned by the connection while the request is in
/// flight and given back with the reply (moving a `Vec` allocates nothing).
type Buf = Vec<u8>;

/// Per-request state kept beside the protocol machine's in-flight table
/// (same index). The machine runs with manual release, so a slot is reused
/// only after its caller took the result (or gave up) and no task still
/// holds its buffer.
#[derive(Default)]
struct Slot {
    /// The request's buffer (READ destination or WRITE source).
    buf: Option<Buf>,
    /// The buffer is lent to the writer or reader task right now.
    lent: bool,
    /// Where the request's bytes end in `buf`.
    len: usize,
    /// Header still to be written (writer queue holds the slot index).
    header: Option<EncodedHeader>,
    /// Extents received, per context.
    extents: Vec<(u32, Vec<Extent>)>,
    /// Result once complete.
    result: Option<Result<(), Error>>,
    waker: Option<Waker>,
    /// The caller dropped its future: free everything on completion.
    abandoned: bool,
    /// A WRITE: the writer sends `buf[..len]` after the header.
    is_write: bool,
    cookie: Option<Cookie>,
}

impl Slot {
    /// Whether the caller can take the result now.
    fn ready(&self) -> bool {
        self.result.is_some() && !self.lent
    }
}

struct Inner {
    tx: ClientTransmission,
    slots: Vec<Slot>,
    write_queue: VecDeque<usize>,
    writer_waker: Option<Waker>,
    dead: Option<String>,
    disc_header: Option<EncodedHeader>,
    disc_waker: Option<Waker>,
}

struct State {
    inner: Mutex<Inner>,
    permits: Semaphore,
    neg: Negotiated,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails every outstanding request.
    fn kill(&self, why: String) {
        let mut g = self.lock();
        if g.dead.is_none() {
            g.dead = Some(why.clone());
        }
        let cookies: Vec<Cookie> = g.tx.fail_all().collect();
        g.write_queue.clear();
        for c in cookies {
            g.slots[c.slot()].header = None;
            finish_slot(&mut g, c, Err(Error::Disconnected(why.clone())));
        }
        if let Some(w) = g.writer_waker.take() {
            w.wake();
        }
        if let Some(w) = g.disc_waker.take() {
            w.wake();
        }
    }
}

/// A connected async client. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct Client {
    state: Arc<State>,
    _tasks: Arc<(smol::Task<()>, smol::Task<()>)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("negotiated", &self.state.neg).finish()
    }
}

/// Default number of requests in flight per connection.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

impl Client {
    /// Connects to a URI with the default configuration.
    pub async fn connect(uri: &str) -> Result<Client> {
        let uri = NbdUri::parse(uri)?;
        Self::connect_uri(&uri, ClientConfig::default(), DEFAULT_MAX_IN_FLIGHT).await
    }

    /// Connects to a parsed URI, with a configuration and an in-flight
    /// limit. The URI's export name overrides the configuration's, and so
    /// does its TLS policy unless it is [`TlsMode::Off`] (`nbds://` and
    /// `nbds+unix://` require TLS); the TLS credentials come from the
    /// URI's `tls-certificates`, `tls-hostname` and `tls-verify-peer`.
    pub async fn connect_uri(uri: &NbdUri, config: ClientConfig, max_in_flight: usize) -> Result<Client> {
        let tls = LazyClientTls::from_uri(uri)?;
        Self::connect_uri_with_tls(uri, config, max_in_flight, tls).await
    }

    /// [`Client::connect_uri`] with TLS credentials of the caller's (e.g.
    /// one [`LazyClientTls`] for every connection of a pool: the files are
    /// read once and the connections share a TLS session cache).
    pub async fn connect_uri_with_tls(
        uri: &NbdUri,
        mut config: ClientConfig,
        max_in_flight: usize,
        tls: LazyClientTls,
    ) -> Result<Client> {
        config.export_name = uri.export.clone();
        if uri.tls != TlsMode::Off {
            config.tls = uri.tls;
        }
        let (r, w) = connect_transport(uri).await?;
        Self::handshake_with_tls(r, w, config, max_in_flight, tls).await
    }

    /// Negotiates over already-connected halves and starts the tasks (TLS,
    /// if `config` asks for it, with libnbd's default credentials and no
    /// name check).
    pub async fn handshake(r: BoxRead, w: BoxWrite, config: ClientConfig, max_in_flight: usize) -> Result<Client> {
        Self::handshake_with_tls(r, w, config, max_in_flight, LazyClientTls::default()).await
    }

    /// Negotiates over already-connected halves with these TLS credentials
    /// (used if `config.tls` asks for TLS and the server accepts), then
    /// starts the tasks.
    pub async fn handshake_with_tls(
        mut r: BoxRead,
        mut w: BoxWrite,
        mut config: ClientConfig,
        max_in_flight: usize,
        tls: LazyClientTls,
    ) -> Result<Client> {
        config.opt_mode = false;
        let mut hs = ClientHandshake::new(config);
        drive_handshake(&mut hs, &mut r, &mut w, &tls).await?;
        let neg = hs.finish()?;
        let max_in_flight = max_in_flight.max(1);
        let mut tx = ClientTransmission::new(&neg, max_in_flight);
        tx.set_manual_release(true);
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                tx,
                slots: (0..max_in_flight).map(|_| Slot::default()).collect(),
                write_queue: VecDeque::with_capacity(max_in_flight),
                writer_waker: None,
                dead: None,
                disc_header: None,
                disc_waker: None,
            }),
            permits: Semaphore::new(max_in_flight),
            neg,
        });
        let reader = smol::spawn(reader_task(state.clone(), r));
        let writer = smol::spawn(writer_task(state.clone(), w));
        Ok(Client {
            state,
            _tasks: Arc::new((reader, writer)),
        })
    }

    /// What the handshake negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.state.neg
    }
    /// Protocol flavour.
    pub fn mode(&self) -> Mode {
        self.state.neg.mode
    }
    /// Export size.
    pub fn size(&self) -> u64 {
        self.state.neg.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.state.neg.flags
    }
    /// Block-size constraints in force.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.state.neg.constraints()
    }
    /// Whether the connection is gone.
    pub fn is_dead(&self) -> bool {
        self.state.lock().dead.is_some()
    }

    /// Issues a request and waits for its reply. `buf` is the READ
    /// destination or the WRITE source (its first `length` bytes).
    async fn submit(&self, req: Request, buf: Option<Buf>) -> (Result<Vec<(u32, Vec<Extent>)>>, Option<Buf>) {
        let permit = self.state.permits.acquire().await;
        let slot = {
            let mut g = self.state.lock();
            if let Some(why) = &g.dead {
                return (Err(Error::Disconnected(why.clone())), buf);
            }
            let (cookie, header) = match g.tx.start_request(req) {
                Ok(x) => x,
                Err(e) => return (Err(e.into()), buf),
            };
            let i = cookie.slot();
            let s = &mut g.slots[i];
            s.buf = buf;
            s.lent = false;
            s.len = req.length as usize;
            s.header = Some(header);
            s.result = None;
            s.abandoned = false;
            s.is_write = req.command == Command::WRITE;
            s.extents.clear();
            s.cookie = Some(cookie);
            g.write_queue.push_back(i);
            if let Some(w) = g.writer_waker.take() {
                w.wake();
            }
            i
        };
        let mut guard = SlotGuard {
            state: &self.state,
            slot,
            done: false,
        };
        let r = (&mut guard).await;
        drop(permit);
        r
    }

    /// Reads into `buf` (its whole length) at `offset` with one request,
    /// giving the buffer back. Holes arrive as zeroes.
    pub async fn read(&self, offset: u64, buf: Vec<u8>) -> (Result<()>, Vec<u8>) {
        self.read_with(offset, buf, CommandFlags::empty()).await
    }

    /// As [`Client::read`], with command flags (e.g. DF).
    pub async fn read_with(&self, offset: u64, buf: Vec<u8>, flags: CommandFlags) -> (Result<()>, Vec<u8>) {
        let len = buf.len() as u64;
        let (r, b) = self
            .submit(Request::new(Command::READ, offset, len).with_flags(flags), Some(buf))
            .await;
        (r.map(|_| ()), b.unwrap_or_default())
    }

    /// Writes all of `buf` at `offset` with one request, giving it back.
    pub async fn write(&self, offset: u64, buf: Vec<u8>) -> (Result<()>, Vec<u8>) {
        self.write_with(offset, buf, CommandFlags::empty()).await
    }

    /// As [`Client::write`], with command flags (e.g. FUA).
    pub async fn write_with(&self, offset: u64, buf: Vec<u8>, flags: CommandFlags) -> (Result<()>, Vec<u8>) {
        let len = buf.len() as u64;
        let (r, b) = self
            .submit(Request::new(Command::WRITE, offset, len).with_flags(flags), Some(buf))
            .await;
        (r.map(|_| ()), b.unwrap_or_default())
    }

    async fn simple(&self, req: Request) -> Result<()> {
        self.submit(req, None).await.0.map(|_| ())
    }

    /// `NBD_CMD_FLUSH`.
    pub async fn flush(&self) -> Result<()> {
        self.simple(Request::new(Command::FLUSH, 0, 0)).await
    }
    /// `NBD_CMD_TRIM`.
    pub async fn trim(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.simple(Request::new(Command::TRIM, offset, length).with_flags(flags))
            .await
    }
    /// `NBD_CMD_WRITE_ZEROES` (FUA, NO_HOLE, FAST_ZERO).
    pub async fn write_zeroes(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.simple(Request::new(Command::WRITE_ZEROES, offset, length).with_flags(flags))
            .await
    }
    /// `NBD_CMD_CACHE`.
    pub async fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.simple(Request::new(Command::CACHE, offset, length)).await
    }

    /// `NBD_CMD_BLOCK_STATUS`: extents per negotiated context id.
    pub async fn block_status(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<Vec<(u32, Vec<Extent>)>> {
        self.submit(
            Request::new(Command::BLOCK_STATUS, offset, length).with_flags(flags),
            None,
        )
        .await
        .0
    }

    /// Sends `NBD_CMD_DISC` once every outstanding request of this client
    /// has been answered. Later requests fail.
    pub async fn disconnect(&self) -> Result<()> {
        // Wait for every permit: nothing in flight.
        let n = self.state.lock().slots.len();
        let mut permits = Vec::with_capacity(n);
        for _ in 0..n {
            permits.push(self.state.permits.acquire().await);
        }
        let header = {
            let mut g = self.state.lock();
            if g.dead.is_some() {
                return Ok(());
            }
            let (_, h) = g.tx.start_request(Request::new(Command::DISC, 0, 0))?;
            h
        };
        {
            let mut g = self.state.lock();
            g.disc_header = Some(header);
            g.write_queue.push_back(usize::MAX);
            if let Some(w) = g.writer_waker.take() {
                w.wake();
            }
        }
        // Wait until the writer sent it (or the connection died).
        futures_lite::future::poll_fn(|cx| {
            let mut g = self.state.lock();
            if g.dead.is_some() {
                Poll::Ready(())
            } else {
                g.disc_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        drop(permits);
        Ok(())
    }
}

/// The caller's side of one in-flight request.
struct SlotGuard<'a> {
    state: &'a State,
    slot: usize,
    done: bool,
}

impl Future for &mut SlotGuard<'_> {
    type Output = (Result<Vec<(u32, Vec<Extent>)>>, Option<Buf>);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut **self.get_mut();
        let mut g = this.state.lock();
        let g = &mut *g;
        let s = &mut g.slots[this.slot];
        if s.ready() {
            this.done = true;
            s.waker = None;
            let buf = s.buf.take();
            let r = s
                .result
                .take()
                .unwrap_or(Ok(()))
                .map(|()| std::mem::take(&mut s.extents));
            if let Some(c) = s.cookie.take() {
                g.tx.release(c);
            }
            return Poll::Ready((r, buf));
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut g = self.state.lock();
        let g = &mut *g;
        let s = &mut g.slots[self.slot];
        s.waker = None;
        if s.ready() {
            // Completed but never collected: free it now.
            s.result = None;
            s.buf = None;
            if let Some(c) = s.cookie.take() {
                g.tx.release(c);
            }
        } else {
            // Still in flight: the tasks finish it and free it.
            s.abandoned = true;
        }
    }
}

/// Records a request's result; frees the slot at once if its caller is
/// gone and no task holds its buffer, else wakes the caller.
fn finish_slot(g: &mut Inner, cookie: Cookie, result: Result<(), Error>) {
    let s = &mut g.slots[cookie.slot()];
    s.result = Some(result);
    settle(g, cookie.slot());
}

/// Called when a slot's result or buffer changes.
fn settle(g: &mut Inner, slot: usize) {
    let s = &mut g.slots[slot];
    if !s.ready() {
        return;
    }
    if s.abandoned {
        s.result = None;
        s.buf = None;
        s.abandoned = false;
        if let Some(c) = s.cookie.take() {
            g.tx.release(c);
        }
    } else if let Some(w) = s.waker.take() {
        w.wake();
    }
}

fn complete(g: &mut Inner, cookie: Cookie, result: Result<(), ServerError>) {
    finish_slot(g, cookie, result.map_err(Error::Server));
}

async fn reader_task(state: Arc<State>, mut r: BoxRead) {
    let why = match reader_loop(&state, &mut r).await {
        Ok(()) => "connection closed".to_string(),
        Err(e) => e,
    };
    state.kill(why);
}

async fn reader_loop(state: &State, r: &mut BoxRead) -> std::result::Result<(), String> {
    let mut scratch: Vec<u8> = Vec::with_capacity(64);
    let eof = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            "server closed the connection".to_string()
        } else {
            e.to_string()
        }
    };
    loop {
        let next = {
            let g = state.lock();
            if g.dead.is_some() {
                return Ok(());
            }
            g.tx.next()
        };
        match next {
            ReceiveNext::Bytes(n) => {
                scratch.resize(n, 0);
                r.read_exact(&mut scratch).await.map_err(eof)?;
                let mut g = state.lock();
                let g = &mut *g;
                match g.tx.handle_bytes(&scratch) {
                    Ok(ReplyEvent::Done { cookie, result, .. }) => complete(g, cookie, result),
                    Ok(ReplyEvent::Hole {
                        cookie,
                        buf_offset,
                        length,
                    }) => {
                        let s = &mut g.slots[cookie.slot()];
                        if let Some(b) = s.buf.as_mut() {
                            let start = buf_offset as usize;
                            if let Some(piece) = b.get_mut(start..start + length as usize) {
                                piece.fill(0);
                            }
                        }
                    }
                    Ok(ReplyEvent::BlockStatus {
                        cookie,
                        context_id,
                        extents,
                    }) => {
                        let s = &mut g.slots[cookie.slot()];
                        match s.extents.iter_mut().find(|(id, v)| *id == context_id || v.is_empty()) {
                            Some((id, v)) => {
                                *id = context_id;
                                v.extend(extents);
                            }
                            None => s.extents.push((context_id, extents.collect())),
                        }
                    }
                    Ok(ReplyEvent::Nothing) => {}
                    Err(v) => return Err(format!("protocol violation by server: {v}")),
                }
            }
            ReceiveNext::Data {
                cookie,
                buf_offset,
                length,
            } => {
                let mut buf = {
                    let mut g = state.lock();
                    let s = &mut g.slots[cookie.slot()];
                    s.lent = true;
                    s.buf.take()
                };
                let start = buf_offset as usize;
                let end = start + length as usize;
                let res = match buf.as_mut().and_then(|b| b.get_mut(start..end)) {
                    Some(piece) => r.read_exact(piece).await,
                    None => {
                        // Abandoned request: drain the bytes.
                        let mut sink = [0u8; 4096];
                        let mut left = length as usize;
                        let mut res = Ok(());
                        while left > 0 {
                            let k = left.min(sink.len());
                            if let Err(e) = r.read_exact(&mut sink[..k]).await {
                                res = Err(e);
                                break;
                            }
                            left -= k;
                        }
                        res
                    }
                };
                let mut g = state.lock();
                let g = &mut *g;
                let s = &mut g.slots[cookie.slot()];
                s.buf = buf;
                s.lent = false;
                settle(g, cookie.slot());
                res.map_err(eof)?;
                match g.tx.data_received() {
                    Ok(ReplyEvent::Done { cookie, result, .. }) => complete(g, cookie, result),
                    Ok(_) => {}
                    Err(v) => return Err(format!("protocol violation by server: {v}")),
                }
            }
            ReceiveNext::Complete => {
                let mut g = state.lock();
                let g = &mut *g;
                match g.tx.complete_pending() {
                    Ok(ReplyEvent::Done { cookie, result, .. }) => complete(g, cookie, result),
                    Ok(_) => {}
                    Err(v) => return Err(format!("protocol violation by server: {v}")),
                }
            }
        }
    }
}

async fn writer_task(state: Arc<State>, mut w: BoxWrite) {
    if let Err(e) = writer_loop(&state, &mut w).await {
        state.kill(format!("write to server failed: {e}"));
    }
}

/// Waits until the write queue has something, then takes a batch.
struct WaitQueue<'a>(&'a State);

impl Future for WaitQueue<'_> {
    type Output = bool;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut g = self.0.lock();
        if g.dead.is_some() {
            return Poll::Ready(false);
        }
        if !g.write_queue.is_empty() {
            return Poll::Ready(true);
        }
        g.writer_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

async fn writer_loop(state: &State, w: &mut BoxWrite) -> io::Result<()> {
    // Headers of a batch are gathered here and sent with one vectored
    // write together with (at most one) payload.
    let mut headers: Vec<u8> = Vec::with_capacity(32 * 64);
    loop {
        if !WaitQueue(state).await {
            return Ok(());
        }
        // Take requests until one carries a payload.
        headers.clear();
        let mut payload: Option<(usize, Buf, usize)> = None;
        let mut disc = false;
        {
            let mut g = state.lock();
            while let Some(i) = g.write_queue.pop_front() {
                if i == usize::MAX {
                    if let Some(h) = g.disc_header.take() {
                        headers.extend_from_slice(h.as_bytes());
                    }
                    disc = true;
                    break;
                }
                let s = &mut g.slots[i];
                if let Some(h) = s.header.take() {
                    headers.extend_from_slice(h.as_bytes());
                }
                if s.is_write {
                    let len = s.len;
                    if let Some(b) = s.buf.take() {
                        s.lent = true;
                        payload = Some((i, b, len));
                    }
                    break;
                }
            }
        }
        let res = match &payload {
            Some((_, b, len)) => write_all_vectored(w, &headers, &b[..*len]).await,
            None => w.write_all(&headers).await,
        };
        if let Some((i, b, _)) = payload {
            let mut g = state.lock();
            let g = &mut *g;
            let s = &mut g.slots[i];
            s.buf = Some(b);
            s.lent = false;
            settle(g, i);
        }
        res?;
        w.flush().await?;
        if disc {
            let _ = w.close().await;
            let mut g = state.lock();
            g.dead.get_or_insert_with(|| "disconnected by the client".to_string());
            if let Some(w) = g.disc_waker.take() {
                w.wake();
            }
            return Ok(());
        }
    }
}
