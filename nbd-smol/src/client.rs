//! An async, multiplexed NBD client over smol, pumping `nbd_proto`'s
//! [`ClientSession`].
//!
//! Any number of tasks issue requests on one shared [`Client`] at once;
//! requests are pipelined and replies are matched to their cookies in any
//! order. One session sits under a mutex between a reader task (which
//! reads exactly the header bytes the session asks for, and READ data
//! straight into the caller's buffer) and a writer task (which sends the
//! queued headers with each WRITE's data beside them in one vectored
//! write). Nothing is copied and nothing is allocated per request.
//!
//! The API is the blocking client's (`nbd_blocking::Client`): the same
//! method names, argument order and [`Error`]. The difference the
//! ownership model forces: a request's buffer is an owned `Vec<u8>` that
//! is given back with the result (`read(buf, offset)` returns
//! `(Result<()>, Vec<u8>)`), because the reader and writer tasks use it
//! while the caller's future may be dropped; dropping a request's future
//! never corrupts the connection (the tasks finish the request and free
//! the buffer). [`Client::disconnect`] takes `&self`, since clones share
//! the connection.
//!
//! When the connection ends, every outstanding request fails at once
//! (with [`Error::Protocol`] if the server broke the protocol, else
//! [`Error::Disconnected`]); nothing hangs.
//!
//! # Threads
//!
//! The reader and writer tasks of every connection run on smol's global
//! executor, which starts `SMOL_THREADS` threads (one by default) the
//! first time it is used; async-io's reactor runs on its own thread
//! (`async-io`) while no `block_on` drives it. Connecting to a host name
//! or socket runs on smol's blocking pool (threads that exit when idle).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use nbd_net::client::{
    IDLE_READ, add_block_status, data_range, in_flight_error, reason, request_error, split_len, timed_out,
};
use nbd_net::negotiate::{Redial, Runtime, Stalled, Transport};
use nbd_net::resilience::{Stats, context_ids, transport_failure};
use nbd_net::time::{instant, now};
use nbd_proto::client::{
    ClientConfig, ClientEvent, ClientNeed, ClientSession, Cookie, MetaContext, Mode, Negotiated, Request,
};
use nbd_proto::time::Timestamp;
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{
    BlockSizeConstraints, Command, CommandFlags, EXTENDED_REQUEST_HEADER_LEN, ErrorCode, TransmissionFlags,
};
use smol::Async;
use smol::lock::{Semaphore, SemaphoreGuardArc};

use crate::io::{SharedHalf, write_all_vectored};
use crate::tls::LazyClientTls;

pub use nbd_net::client::{BlockStatus, Error, Result};
pub use nbd_net::resilience::{ConnectOptions, Phase, Reconnect, StatsSnapshot, Timeouts};
pub use nbd_net::socket::connect_timeout;
pub use nbd_net::{Socket, connect};

/// The reading half of a connection.
pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half of a connection.
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// A connection of the async client: the socket's two halves (TLS over
/// them once started) and the socket itself (to shut it down when the
/// connection must end). The handshake over it is `nbd_net::negotiate`'s,
/// shared with the blocking client.
pub struct Connection {
    r: BoxRead,
    w: BoxWrite,
    socket: Arc<Async<Socket>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Connection").field(self.socket.get_ref()).finish()
    }
}

impl Connection {
    /// Registers a connected socket with the reactor and splits it.
    fn new(socket: Socket) -> std::io::Result<Connection> {
        let (r, w) = SharedHalf::pair(Async::new(socket)?);
        let socket = r.0.clone();
        Ok(Connection {
            r: Box::new(r),
            w: Box::new(w),
            socket,
        })
    }
}

/// Runs `io` until the deadline `by`: [`Stalled::Deadline`] if the
/// deadline came first.
async fn before<T>(by: Option<Timestamp>, io: impl Future<Output = std::io::Result<T>>) -> Result<T, Stalled> {
    let Some(at) = by else {
        return Ok(io.await?);
    };
    let expired = async {
        smol::Timer::at(instant(at)).await;
        Err(Stalled::Deadline)
    };
    futures_lite::future::or(async { Ok(io.await?) }, expired).await
}

/// Runs the TLS client handshake over the connection's halves (right
/// after the server's ACK of `NBD_OPT_STARTTLS`) and puts the TLS halves
/// in their place.
#[cfg(feature = "tls")]
async fn start_tls(r: &mut BoxRead, w: &mut BoxWrite, creds: &crate::tls::ClientTls) -> std::io::Result<()> {
    let plain_r = std::mem::replace(r, Box::new(futures_lite::io::empty()));
    let plain_w = std::mem::replace(w, Box::new(futures_lite::io::sink()));
    let (tr, tw) = crate::tls::connect(plain_r, plain_w, creds).await?;
    *r = Box::new(tr);
    *w = Box::new(tw);
    Ok(())
}

/// Without the `tls` feature there are no credentials to start TLS with
/// (`LazyClientTls::get` refuses first).
#[cfg(not(feature = "tls"))]
async fn start_tls(_r: &mut BoxRead, _w: &mut BoxWrite, creds: &crate::tls::ClientTls) -> std::io::Result<()> {
    match *creds {}
}

impl Transport for Connection {
    async fn send(&mut self, bytes: &[u8], by: Option<Timestamp>) -> Result<(), Stalled> {
        let w = &mut self.w;
        let send = async move {
            w.write_all(bytes).await?;
            w.flush().await
        };
        before(by, send).await
    }

    async fn receive(&mut self, buf: &mut [u8], by: Option<Timestamp>) -> Result<(), Stalled> {
        before(by, self.r.read_exact(buf)).await
    }

    async fn start_tls(&mut self, tls: &LazyClientTls, by: Option<Timestamp>) -> Result<(), Stalled> {
        let creds = tls.get().map_err(Stalled::Credentials)?;
        before(by, start_tls(&mut self.r, &mut self.w, &creds)).await
    }
}

impl Runtime for Connection {
    type Client = Client;

    /// Connects on smol's blocking pool (name resolution and `connect`
    /// block), and registers the socket with the reactor.
    async fn open(uri: &NbdUri, timeout: Option<Duration>) -> std::io::Result<Connection> {
        let uri = uri.clone();
        Connection::new(smol::unblock(move || connect_timeout(&uri, timeout)).await?)
    }

    fn from_socket(socket: Socket) -> std::io::Result<Connection> {
        Connection::new(socket)
    }

    async fn sleep(d: Duration) {
        smol::Timer::after(d).await;
    }

    fn client(session: ClientSession, conn: Connection, timeouts: Timeouts) -> Result<Client> {
        Client::start(session, conn, timeouts, None)
    }
}

/// A connection in option mode: list exports, ask about them, then either
/// [`Negotiation::go`] into a [`Client`] or [`Negotiation::abort`] (the
/// negotiation both clients share, over this client's [`Connection`]).
///
/// ```no_run
/// # smol::block_on(async {
/// use nbd_smol::{ClientConfig, NbdUri, Negotiation};
///
/// let uri = NbdUri::parse("nbd+unix:///?socket=/tmp/nbd.sock")?;
/// let mut neg = Negotiation::connect(&uri, ClientConfig::default()).await?;
/// for export in neg.list().await? {
///     let info = neg.info(&export.name).await?;
///     println!("{}: {} bytes", export.name, info.size);
/// }
/// neg.abort().await?;
/// # Ok::<(), nbd_smol::Error>(())
/// # });
/// ```
pub type Negotiation = nbd_net::negotiate::Negotiation<Connection>;

/// Per-request state. A request keeps its slot (and its buffer) from the
/// call to the moment its caller takes the result (or, for a caller that
/// gave up, to its completion), across reconnections; the session's
/// cookies map to slots through [`Inner::route`], since a new session
/// hands out cookies of its own.
#[derive(Default)]
struct Slot {
    /// The caller's buffer (READ destination or WRITE source).
    buf: Option<Vec<u8>>,
    /// Where this request's bytes start in `buf`.
    start: usize,
    /// How many bytes it covers there.
    len: usize,
    /// The buffer is lent to the writer or reader task right now.
    lent: bool,
    /// Block status received, per context.
    status: Vec<BlockStatus>,
    /// The result, once complete.
    result: Option<Result<()>>,
    waker: Option<Waker>,
    /// The caller dropped its future: free everything on completion.
    abandoned: bool,
    /// The request, to send again on a new connection.
    req: Option<Request>,
    /// Waiting for a connection to be (re)started on.
    pending: bool,
    /// The request's place among `max_in_flight`, given back when the
    /// slot is freed.
    permit: Option<SemaphoreGuardArc>,
}

impl Slot {
    /// Whether the caller can take the result now.
    fn ready(&self) -> bool {
        self.result.is_some() && !self.lent
    }

    /// The request's part of its buffer.
    fn bytes(&mut self) -> &mut [u8] {
        let (start, len) = (self.start, self.len);
        match &mut self.buf {
            Some(b) => b.get_mut(start..start + len).unwrap_or_default(),
            None => &mut [],
        }
    }
}

/// Frees slot `i`: its buffer, its result, its permit.
fn free(slots: &mut [Slot], i: usize, free_slots: &mut Vec<u32>) {
    let s = &mut slots[i];
    s.result = None;
    s.buf = None;
    s.abandoned = false;
    s.req = None;
    s.pending = false;
    s.status.clear();
    s.permit = None;
    free_slots.push(i as u32);
}

/// Frees a completed slot whose caller is gone, or wakes its caller.
fn settle(slots: &mut [Slot], i: usize, free_slots: &mut Vec<u32>) {
    let s = &mut slots[i];
    if !s.ready() {
        return;
    }
    if s.abandoned {
        free(slots, i, free_slots);
    } else if let Some(w) = s.waker.take() {
        w.wake();
    }
}

struct Inner {
    session: ClientSession,
    slots: Vec<Slot>,
    /// The session's slot (of a cookie) to ours.
    route: Vec<u32>,
    /// Our slots that are free.
    free: Vec<u32>,
    writer_waker: Option<Waker>,
    reader_waker: Option<Waker>,
    /// The task that tells the session the time (with deadlines only).
    deadline_waker: Option<Waker>,
    /// The current connection runs: false from its break until a new one
    /// is installed (requests made meanwhile wait, `pending`).
    up: bool,
    /// The error that broke the current connection.
    fault: Option<Error>,
    /// The current socket, shut down to break the connection.
    socket: Option<Arc<Async<Socket>>>,
    /// Why the client ended for good, once it did.
    dead: Option<Arc<str>>,
    /// What later requests fail with, where that is not
    /// [`Error::Disconnected`] with `dead`.
    dead_error: Option<Error>,
    /// `NBD_CMD_DISC` is queued: the writer closes after sending it.
    disconnecting: bool,
    disc_waker: Option<Waker>,
    /// Context ids of the current session that differ from the first's:
    /// (now, first).
    context_map: Vec<(u32, u32)>,
    /// The client reconnects: a request refused with `NBD_ESHUTDOWN`
    /// waits for the next connection rather than fail.
    resend_shutdown: bool,
}

impl Inner {
    /// Gives the session what the reader received (reply bytes, all fed;
    /// none for an event that is `Pending`; or READ data moved into the
    /// request's buffer) and handles the replies that come of it: a hole
    /// zeroes its part of the request's buffer, block status joins the
    /// request's list (under the first connection's context id), a
    /// completion settles the request.
    fn received(&mut self, got: Got<'_>, contexts: &[MetaContext]) -> Result<()> {
        let Inner {
            session,
            slots,
            route,
            free,
            context_map,
            resend_shutdown,
            ..
        } = self;
        let mut shutdown = false;
        let mut reply = |ev: ClientEvent<'_>| match ev {
            ClientEvent::Hole {
                cookie,
                buf_offset,
                length,
                ..
            } => {
                let buf = slots[route[cookie.slot()] as usize].bytes();
                if let Some(range) = data_range(buf.len(), buf_offset, length) {
                    buf[range].fill(0);
                }
            }
            ClientEvent::BlockStatus {
                cookie,
                context_id,
                extents,
            } => {
                let i = route[cookie.slot()] as usize;
                let id = match context_map.iter().find(|(now, _)| *now == context_id) {
                    Some(&(_, first)) => first,
                    None => context_id,
                };
                add_block_status(&mut slots[i].status, contexts, id, extents);
            }
            ClientEvent::Done { cookie, result, .. } => {
                let i = route[cookie.slot()] as usize;
                let s = &mut slots[i];
                if *resend_shutdown && matches!(&result, Err(e) if e.code == ErrorCode::ESHUTDOWN) {
                    // A server going away (a restart): send it again on
                    // the next connection.
                    s.pending = true;
                    s.status.clear();
                    shutdown = true;
                    return;
                }
                s.result = Some(result.map_err(Error::Server));
                settle(slots, i, free);
            }
            // READ data comes as ClientNeed::Data, which the reader moves
            // itself; handshake events cannot occur in transmission.
            _ => {}
        };
        match got {
            Got::Bytes(mut input) => loop {
                let (n, ev) = session.feed(input)?;
                input = &input[n..];
                match ev {
                    Some(ev) => reply(ev),
                    None if n == 0 => break,
                    None => {}
                }
            },
            Got::Data(n) => {
                if let Some(ev) = session.data_received(n)? {
                    reply(ev);
                }
            }
        }
        if shutdown {
            // Its requests wait for the next connection, as when a
            // connection breaks.
            return Err(Error::disconnected("the server is shutting down (NBD_ESHUTDOWN)"));
        }
        Ok(())
    }

    /// Our slot of a session cookie.
    fn slot_of(&self, cookie: Cookie) -> usize {
        self.route[cookie.slot()] as usize
    }

    /// Hands slot `i`'s request to the session.
    fn start(&mut self, i: usize) -> std::result::Result<(), Error> {
        let Some(req) = self.slots[i].req else {
            return Err(Error::Misuse("a slot without a request"));
        };
        match self.session.start_request(req) {
            Ok(cookie) => {
                self.route[cookie.slot()] = i as u32;
                let s = &mut self.slots[i];
                s.pending = false;
                Ok(())
            }
            Err(e) => Err(request_error(e, self.dead.as_ref())),
        }
    }

    fn wake_tasks(&mut self) {
        for w in [self.writer_waker.take(), self.reader_waker.take()]
            .into_iter()
            .flatten()
        {
            w.wake();
        }
    }

    /// The error a request gets from a client that ended.
    fn dead_error(&self) -> Error {
        match (&self.dead_error, &self.dead) {
            (Some(e), _) => e.duplicate(),
            (None, Some(why)) => Error::Disconnected(why.clone()),
            (None, None) => Error::disconnected("the connection ended"),
        }
    }
}

/// What the reader received, for [`Inner::received`].
enum Got<'a> {
    /// Reply bytes (none, for an event that is `Pending`).
    Bytes(&'a [u8]),
    /// This many bytes of READ data, moved into the request's buffer.
    Data(u64),
}

struct State {
    inner: Mutex<Inner>,
    permits: Arc<Semaphore>,
    /// What the first connection negotiated (every later one negotiates
    /// the same).
    negotiated: Negotiated,
    timeouts: Timeouts,
    redial: Option<Redial>,
    stats: Stats,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current connection broke on `e` (the first call wins): its
    /// requests wait for the next one (or the end), the socket is shut
    /// down so that both tasks stop.
    fn broken(&self, e: Error) {
        let mut g = self.lock();
        let g = &mut *g;
        if !g.up {
            return;
        }
        g.up = false;
        g.fault.get_or_insert(e);
        for c in g.session.connection_lost() {
            let i = g.route[c.slot()] as usize;
            let s = &mut g.slots[i];
            s.pending = true;
        }
        if let Some(socket) = g.socket.take() {
            let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
        }
        g.wake_tasks();
    }

    /// The client ends for good on `e`: every waiting request fails.
    fn finish(&self, e: &Error) {
        let mut g = self.lock();
        let g = &mut *g;
        let why = g.dead.get_or_insert_with(|| reason(e)).clone();
        if matches!(e, Error::ReconnectFailed { .. } | Error::ExportChanged(_)) {
            g.dead_error.get_or_insert_with(|| e.duplicate());
        }
        for i in 0..g.slots.len() {
            if g.slots[i].pending {
                g.slots[i].pending = false;
                g.slots[i].result = Some(Err(in_flight_error(e, &why)));
                settle(&mut g.slots, i, &mut g.free);
            }
        }
        g.up = false;
        if let Some(w) = g.disc_waker.take() {
            w.wake();
        }
        g.wake_tasks();
    }

    /// Installs a new connection: the requests that wait are sent again.
    fn install(&self, mut session: ClientSession, c: Connection) -> Option<(BoxRead, BoxWrite)> {
        let mut g = self.lock();
        let g = &mut *g;
        if g.dead.is_some() {
            return None;
        }
        if let Some(n) = session.negotiated() {
            g.context_map = context_ids(&self.negotiated, n);
        }
        session.set_manual_release(false);
        g.session = session;
        g.socket = Some(c.socket);
        g.up = true;
        g.fault = None;
        let mut resent = 0;
        for i in 0..g.slots.len() {
            let s = &mut g.slots[i];
            if !s.pending {
                continue;
            }
            if s.abandoned {
                // Nobody waits for it.
                s.pending = false;
                free(&mut g.slots, i, &mut g.free);
                continue;
            }
            s.status.clear();
            resent += 1;
            if let Err(e) = g.start(i) {
                let s = &mut g.slots[i];
                s.pending = false;
                s.result = Some(Err(e));
                settle(&mut g.slots, i, &mut g.free);
            }
        }
        self.stats.reconnected(resent);
        Some((c.r, c.w))
    }
}

/// Reconnects after a break on `e` (for up to the policy's delay) and
/// installs the new connection.
async fn reconnect(state: &State, redial: &Redial, e: &Error) -> Result<(BoxRead, BoxWrite)> {
    let gone = || {
        let g = state.lock();
        g.dead.is_some().then(|| g.dead_error())
    };
    let (session, conn) = redial.reconnect::<Connection>(e, &state.negotiated, gone).await?;
    match state.install(session, conn) {
        Some(halves) => Ok(halves),
        None => Err(state.lock().dead_error()),
    }
}

/// Runs the client's connections: the reader and writer tasks of one,
/// and when it breaks, a reconnect (or the end).
async fn supervise(state: Arc<State>, mut r: BoxRead, mut w: BoxWrite) {
    loop {
        let reader = smol::spawn(reader_task(state.clone(), r));
        let writer = smol::spawn(writer_task(state.clone(), w));
        let both = async {
            reader.await;
            writer.await;
        };
        if state.timeouts.request.is_some() {
            futures_lite::future::or(both, deadlines(&state)).await
        } else {
            both.await
        }
        let e = {
            let mut g = state.lock();
            // A client that was disconnecting is not reconnected: its
            // NBD_CMD_DISC is not sent again.
            if g.dead.is_some() || g.disconnecting {
                g.dead.get_or_insert_with(|| "the client disconnected".into());
                drop(g);
                state.finish(&Error::disconnected("the client disconnected"));
                return;
            }
            g.fault
                .take()
                .unwrap_or_else(|| Error::disconnected("the connection ended"))
        };
        if transport_failure(&e) {
            state.stats.disconnected();
        }
        let next = match &state.redial {
            Some(redial) if transport_failure(&e) => reconnect(&state, redial, &e).await,
            _ => Err(e),
        };
        match next {
            Ok((nr, nw)) => (r, w) = (nr, nw),
            Err(e) => {
                state.finish(&e);
                return;
            }
        }
    }
}

/// Tells the session the time whenever its next deadline comes (or the
/// writer says that requests started), and breaks the connection when
/// one passed. Never returns: the supervisor stops polling it.
async fn deadlines(state: &State) {
    let mut timer = smol::Timer::never();
    std::future::poll_fn(|cx| -> Poll<()> {
        loop {
            let mut g = state.lock();
            if !g.up {
                // Broken: the tasks end, and the supervisor with them.
                return Poll::Pending;
            }
            g.session.handle_timeout(now());
            if let Some(e) = timed_out(&g.session) {
                drop(g);
                state.stats.timed_out();
                state.broken(e);
                return Poll::Pending;
            }
            g.deadline_waker = Some(cx.waker().clone());
            match g.session.poll_timeout() {
                Some(at) => timer.set_at(instant(at)),
                None => timer = smol::Timer::never(),
            }
            drop(g);
            if Pin::new(&mut timer).poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await
}

/// A connected async client. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct Client {
    state: Arc<State>,
    _task: Arc<smol::Task<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("negotiated", &self.state.negotiated)
            .finish()
    }
}

impl Client {
    /// Connects to a URI with the default configuration (extended
    /// headers, structured replies, `base:allocation`, 64 requests in
    /// flight).
    ///
    /// ```no_run
    /// # smol::block_on(async {
    /// let client = nbd_smol::Client::connect("nbd+unix:///?socket=/tmp/nbd.sock").await?;
    /// // Two reads in flight at once; each buffer comes back with its result.
    /// let (a, b) = futures_lite::future::zip(
    ///     client.read(vec![0u8; 65536], 0),
    ///     client.read(vec![0u8; 65536], 65536),
    /// )
    /// .await;
    /// let (first, second) = (a.0?, b.0?);
    /// client.disconnect().await?;
    /// # Ok::<(), nbd_smol::Error>(())
    /// # });
    /// ```
    pub async fn connect(uri: &str) -> Result<Client> {
        Self::connect_uri(&NbdUri::parse(uri)?, ClientConfig::default()).await
    }

    /// Connects to a parsed URI with a configuration (see
    /// [`NbdUri::client_config`]: the URI's export name and TLS policy
    /// win; `config.max_in_flight` bounds the requests in flight). The
    /// TLS credentials come from the URI's `tls-certificates`,
    /// `tls-hostname` and `tls-verify-peer`.
    pub async fn connect_uri(uri: &NbdUri, config: ClientConfig) -> Result<Client> {
        Self::connect_with(uri, config, &ConnectOptions::default()).await
    }

    /// [`Client::connect_uri`] with TLS credentials of the caller's (e.g.
    /// one [`LazyClientTls`] for every connection of a pool: the files are
    /// read once and the connections share a TLS session cache).
    pub async fn connect_uri_with_tls(uri: &NbdUri, config: ClientConfig, tls: LazyClientTls) -> Result<Client> {
        let opts = ConnectOptions::default().tls(Some(tls));
        Self::connect_with(uri, config, &opts).await
    }

    /// [`Client::connect_uri`] with deadlines and reconnection (see
    /// [`nbd_net::resilience`] for what they do and what is sent again).
    ///
    /// ```no_run
    /// # smol::block_on(async {
    /// use std::time::Duration;
    /// use nbd_smol::{ClientConfig, NbdUri};
    /// use nbd_smol::client::{Client, ConnectOptions, Reconnect, Timeouts};
    ///
    /// let uri = NbdUri::parse("nbd+unix:///?socket=/tmp/nbd.sock")?;
    /// let opts = ConnectOptions::default()
    ///     // Give up on a server that says nothing for 30 s.
    ///     .timeouts(Timeouts::all(Duration::from_secs(30)))
    ///     // Ride out a restart of the server of up to a minute.
    ///     .reconnect(Some(Reconnect::within(Duration::from_secs(60))));
    /// let client = Client::connect_with(&uri, ClientConfig::default(), &opts).await?;
    /// let (r, buf) = client.read(vec![0u8; 4096], 0).await;
    /// r?;
    /// println!("{} reconnects so far", client.stats().reconnects);
    /// # Ok::<(), nbd_smol::Error>(())
    /// # });
    /// ```
    pub async fn connect_with(uri: &NbdUri, config: ClientConfig, opts: &ConnectOptions) -> Result<Client> {
        let (session, conn, redial) = nbd_net::negotiate::connect::<Connection>(uri, config, opts).await?;
        Self::start(session, conn, opts.timeouts, redial)
    }

    /// Negotiates over a connected socket and starts the tasks (TLS, if
    /// `config` asks for it, with libnbd's default credentials and no
    /// name check).
    pub async fn handshake(socket: impl Into<Socket>, config: ClientConfig) -> Result<Client> {
        Self::handshake_with_tls(socket, config, LazyClientTls::default()).await
    }

    /// Negotiates over a connected socket with these TLS credentials
    /// (used if `config.tls` asks for TLS and the server accepts), then
    /// starts the tasks.
    pub async fn handshake_with_tls(
        socket: impl Into<Socket>,
        config: ClientConfig,
        tls: LazyClientTls,
    ) -> Result<Client> {
        let conn = Connection::new(socket.into())?;
        let (session, conn) = nbd_net::negotiate::handshake_go(conn, config, &tls).await?;
        Self::start(session, conn, Timeouts::default(), None)
    }

    fn start(
        mut session: ClientSession,
        conn: Connection,
        timeouts: Timeouts,
        redial: Option<Redial>,
    ) -> Result<Client> {
        let Connection { r, w, socket } = conn;
        let negotiated = session
            .negotiated()
            .cloned()
            .ok_or(Error::Misuse("transmission without a negotiated export"))?;
        session.set_manual_release(false);
        let n = session.capacity();
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                session,
                slots: (0..n).map(|_| Slot::default()).collect(),
                route: vec![0; n],
                free: (0..n as u32).rev().collect(),
                writer_waker: None,
                reader_waker: None,
                deadline_waker: None,
                up: true,
                fault: None,
                socket: Some(socket),
                dead: None,
                dead_error: None,
                disconnecting: false,
                disc_waker: None,
                context_map: Vec::new(),
                resend_shutdown: redial.is_some(),
            }),
            permits: Arc::new(Semaphore::new(n)),
            negotiated,
            timeouts,
            redial,
            stats: Stats::default(),
        });
        let task = smol::spawn(supervise(state.clone(), r, w));
        Ok(Client {
            state,
            _task: Arc::new(task),
        })
    }

    /// What the handshake negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.state.negotiated
    }
    /// The protocol flavour in use.
    pub fn mode(&self) -> Mode {
        self.state.negotiated.mode
    }
    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.state.negotiated.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.state.negotiated.flags
    }
    /// Block-size constraints in force.
    pub fn constraints(&self) -> BlockSizeConstraints {
        self.state.negotiated.constraints()
    }
    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.flags().contains(TransmissionFlags::READ_ONLY)
    }
    /// Whether the client is over (the server closed the connection, a
    /// violation, a socket error or a deadline ended it and no reconnect
    /// was asked for or it failed, or it was disconnected): every request
    /// fails.
    pub fn is_closed(&self) -> bool {
        self.state.lock().dead.is_some()
    }
    /// Whether a connection runs now (false while reconnecting, and once
    /// closed).
    pub fn is_connected(&self) -> bool {
        let g = self.state.lock();
        g.up && g.dead.is_none()
    }
    /// Disconnects, reconnects, requests sent again and deadlines expired
    /// so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.state.stats.snapshot()
    }

    /// Issues a request on `buf[start..start + req.length]` (READ
    /// destination or WRITE source) and waits for its reply.
    async fn submit(
        &self,
        req: Request,
        buf: Option<Vec<u8>>,
        start: usize,
    ) -> (Result<Vec<BlockStatus>>, Option<Vec<u8>>) {
        let permit = self.state.permits.acquire_arc().await;
        let slot = {
            let mut g = self.state.lock();
            let g = &mut *g;
            if g.dead.is_some() {
                return (Err(g.dead_error()), buf);
            }
            let Some(i) = g.free.pop() else {
                return (Err(Error::Misuse("no free slot under a permit")), buf);
            };
            let i = i as usize;
            let s = &mut g.slots[i];
            s.buf = buf;
            s.start = start;
            s.len = if req.command == Command::READ || req.command == Command::WRITE {
                req.length as usize
            } else {
                0
            };
            s.lent = false;
            s.result = None;
            s.abandoned = false;
            s.req = Some(req);
            s.permit = Some(permit);
            if g.up {
                if let Err(e) = g.start(i) {
                    let buf = g.slots[i].buf.take();
                    free(&mut g.slots, i, &mut g.free);
                    return (Err(e), buf);
                }
                g.wake_tasks();
            } else {
                // Reconnecting: sent once connected (or failed).
                g.slots[i].pending = true;
            }
            i
        };
        let mut guard = SlotGuard {
            state: &self.state,
            slot,
            done: false,
        };
        (&mut guard).await
    }

    /// Reads `buf.len()` bytes at `offset` with one request, giving the
    /// buffer back (holes arrive as zeroes).
    pub async fn pread(&self, buf: Vec<u8>, offset: u64, flags: CommandFlags) -> (Result<()>, Vec<u8>) {
        let req = Request::new(Command::READ, offset, buf.len() as u64).with_flags(flags);
        let (r, b) = self.submit(req, Some(buf), 0).await;
        (r.map(drop), b.unwrap_or_default())
    }

    /// Writes all of `buf` at `offset` with one request, giving it back.
    pub async fn pwrite(&self, buf: Vec<u8>, offset: u64, flags: CommandFlags) -> (Result<()>, Vec<u8>) {
        let req = Request::new(Command::WRITE, offset, buf.len() as u64).with_flags(flags);
        let (r, b) = self.submit(req, Some(buf), 0).await;
        (r.map(drop), b.unwrap_or_default())
    }

    /// Reads `buf.len()` bytes at `offset`, in requests no larger than the
    /// maximum payload (sent one after the other), giving the buffer back.
    pub async fn read(&self, buf: Vec<u8>, offset: u64) -> (Result<()>, Vec<u8>) {
        self.read_with(buf, offset, CommandFlags::empty()).await
    }

    /// As [`Client::read`], with command flags (e.g. DF) on every request.
    pub async fn read_with(&self, buf: Vec<u8>, offset: u64, flags: CommandFlags) -> (Result<()>, Vec<u8>) {
        self.split(Command::READ, buf, offset, flags).await
    }

    /// Writes all of `buf` at `offset`, in requests no larger than the
    /// maximum payload, giving it back.
    pub async fn write(&self, buf: Vec<u8>, offset: u64) -> (Result<()>, Vec<u8>) {
        self.write_with(buf, offset, CommandFlags::empty()).await
    }

    /// As [`Client::write`], with command flags (e.g. FUA) on every request.
    pub async fn write_with(&self, buf: Vec<u8>, offset: u64, flags: CommandFlags) -> (Result<()>, Vec<u8>) {
        self.split(Command::WRITE, buf, offset, flags).await
    }

    async fn split(
        &self,
        command: Command,
        mut buf: Vec<u8>,
        offset: u64,
        flags: CommandFlags,
    ) -> (Result<()>, Vec<u8>) {
        let chunk = split_len(self.constraints());
        let mut at = 0;
        loop {
            let len = (buf.len() - at).min(chunk);
            let req = Request::new(command, offset + at as u64, len as u64).with_flags(flags);
            let (r, b) = self.submit(req, Some(buf), at).await;
            buf = b.unwrap_or_default();
            at += len;
            if r.is_err() || at >= buf.len() {
                return (r.map(drop), buf);
            }
        }
    }

    async fn simple(&self, req: Request) -> Result<()> {
        self.submit(req, None, 0).await.0.map(drop)
    }

    /// `NBD_CMD_FLUSH`.
    pub async fn flush(&self) -> Result<()> {
        self.simple(Request::new(Command::FLUSH, 0, 0)).await
    }

    /// `NBD_CMD_TRIM` (flags: FUA).
    pub async fn trim(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.simple(Request::new(Command::TRIM, offset, length).with_flags(flags))
            .await
    }

    /// `NBD_CMD_WRITE_ZEROES` (flags: FUA, NO_HOLE, FAST_ZERO).
    pub async fn write_zeroes(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.simple(Request::new(Command::WRITE_ZEROES, offset, length).with_flags(flags))
            .await
    }

    /// `NBD_CMD_CACHE`.
    pub async fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.simple(Request::new(Command::CACHE, offset, length)).await
    }

    /// `NBD_CMD_BLOCK_STATUS` for `length` bytes at `offset` (flags:
    /// REQ_ONE): one entry per negotiated context that answered.
    pub async fn block_status(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<Vec<BlockStatus>> {
        let req = Request::new(Command::BLOCK_STATUS, offset, length).with_flags(flags);
        self.submit(req, None, 0).await.0
    }

    /// Sends `NBD_CMD_DISC` once every outstanding request of this client
    /// (and its clones) has been answered, and closes the connection.
    /// Later requests fail.
    pub async fn disconnect(&self) -> Result<()> {
        // Every permit: nothing in flight.
        let n = self.state.lock().slots.len();
        let mut permits = Vec::with_capacity(n);
        for _ in 0..n {
            permits.push(self.state.permits.acquire_arc().await);
        }
        {
            let mut g = self.state.lock();
            if g.dead.is_some() {
                return Ok(());
            }
            if !g.up {
                // Reconnecting, with nothing outstanding: stop there.
                g.dead = Some("the client disconnected".into());
                return Ok(());
            }
            g.session.disconnect()?;
            g.disconnecting = true;
            if let Some(w) = g.writer_waker.take() {
                w.wake();
            }
        }
        // Until the writer sent it (or the connection died).
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
    type Output = (Result<Vec<BlockStatus>>, Option<Vec<u8>>);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut **self.get_mut();
        let mut g = this.state.lock();
        let g = &mut *g;
        let s = &mut g.slots[this.slot];
        if s.ready() {
            this.done = true;
            s.waker = None;
            let buf = s.buf.take();
            let r = match s.result.take() {
                Some(Ok(())) | None => Ok(std::mem::take(&mut s.status)),
                Some(Err(e)) => Err(e),
            };
            free(&mut g.slots, this.slot, &mut g.free);
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
        s.abandoned = true;
        // Completed but never collected: free it now; else the tasks
        // finish it and free it (or a reconnect forgets it).
        settle(&mut g.slots, self.slot, &mut g.free);
    }
}

async fn reader_task(state: Arc<State>, mut r: BoxRead) {
    if let Err(e) = reader_loop(&state, &mut r).await {
        state.broken(e);
    }
}

/// Waits until the session expects a reply (or the connection died).
struct WaitReader<'a>(&'a State);

impl Future for WaitReader<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = self.0.lock();
        if g.dead.is_some() || !g.up || g.session.in_flight() > 0 {
            return Poll::Ready(());
        }
        g.reader_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

async fn reader_loop(state: &State, r: &mut BoxRead) -> Result<()> {
    let contexts = &state.negotiated.contexts;
    let mut scratch: Vec<u8> = Vec::with_capacity(64);
    let eof = |e: std::io::Error, during: &str| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            Error::Disconnected(format!("the server closed the connection {during}").into())
        }
        _ => Error::Io(e),
    };
    loop {
        // What the session needs, taken out of the lock.
        let read = {
            let mut g = state.lock();
            if g.dead.is_some() || !g.up {
                return Ok(());
            }
            match g.session.need() {
                ClientNeed::Bytes(0) | ClientNeed::Pending => {
                    g.received(Got::Bytes(&[]), contexts)?;
                    continue;
                }
                ClientNeed::Bytes(n) => Read::Bytes(n),
                ClientNeed::Data {
                    cookie,
                    buf_offset,
                    length,
                    ..
                } => {
                    let slot = g.slot_of(cookie);
                    let s = &mut g.slots[slot];
                    s.lent = true;
                    Read::Data {
                        slot,
                        buf: s.buf.take(),
                        start: s.start,
                        buf_offset,
                        length,
                    }
                }
                ClientNeed::Idle => Read::Idle,
                ClientNeed::Closed => {
                    // Repeats the error that closed it, if any.
                    g.session.feed(&[])?;
                    return Err(Error::disconnected("the session is closed"));
                }
                _ => return Err(Error::Misuse("transmission is not running")),
            }
        };
        match read {
            Read::Bytes(n) => {
                scratch.resize(n, 0);
                r.read_exact(&mut scratch)
                    .await
                    .map_err(|e| eof(e, "while replies were expected"))?;
                state.lock().received(Got::Bytes(&scratch), contexts)?;
            }
            Read::Data {
                slot,
                mut buf,
                start,
                buf_offset,
                length,
            } => {
                let res = match buf.as_mut().and_then(|b| {
                    let range = data_range(b.len().saturating_sub(start), buf_offset, length)?;
                    b.get_mut(start + range.start..start + range.end)
                }) {
                    Some(piece) => r.read_exact(piece).await,
                    // Never announced by the session; keep the stream in
                    // step anyway.
                    None => drain(r, length).await,
                };
                let mut g = state.lock();
                let g = &mut *g;
                let s = &mut g.slots[slot];
                s.buf = buf;
                s.lent = false;
                // The request may have failed meanwhile (the client
                // ended): its caller can have the buffer now.
                settle(&mut g.slots, slot, &mut g.free);
                if !g.up {
                    return Ok(());
                }
                res.map_err(|e| eof(e, "in the middle of a reply"))?;
                g.received(Got::Data(length), contexts)?;
            }
            Read::Idle => {
                // Nothing in flight: read the start of the next reply, so
                // that a server that closes (or sends garbage) is noticed.
                scratch.resize(IDLE_READ, 0);
                let idle = async { Ok(Some(r.read(&mut scratch).await)) };
                let woken = async {
                    WaitReader(state).await;
                    Ok(None)
                };
                let got: Result<Option<std::io::Result<usize>>> = futures_lite::future::or(idle, woken).await;
                match got? {
                    // A request started: go round.
                    None => {}
                    Some(Ok(0)) => return Err(Error::disconnected("the server closed the connection")),
                    Some(Ok(n)) => state.lock().received(Got::Bytes(&scratch[..n]), contexts)?,
                    Some(Err(e)) => return Err(Error::Io(e)),
                }
            }
        }
    }
}

/// What the reader reads next, as the session said (taken out of the
/// lock, which no read holds).
enum Read {
    /// Exactly this many bytes of a reply, into the scratch buffer.
    Bytes(usize),
    /// `length` bytes of READ data at `buf_offset` of slot `slot`'s
    /// request, whose buffer (`buf`, the request's part from `start`) is
    /// lent to the reader meanwhile.
    Data {
        slot: usize,
        buf: Option<Vec<u8>>,
        start: usize,
        buf_offset: u64,
        length: u64,
    },
    /// Nothing in flight.
    Idle,
}

/// Reads and drops `length` bytes.
async fn drain(r: &mut BoxRead, length: u64) -> std::io::Result<()> {
    let n = futures_lite::io::copy(r.take(length), futures_lite::io::sink()).await?;
    if n < length {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn writer_task(state: Arc<State>, mut w: BoxWrite) {
    if let Err(e) = writer_loop(&state, &mut w).await {
        state.broken(e);
    }
}

/// Waits until the session has something to send (or the connection
/// died).
struct WaitOutput<'a>(&'a State);

impl Future for WaitOutput<'_> {
    type Output = bool;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut g = self.0.lock();
        if g.dead.is_some() || !g.up {
            return Poll::Ready(false);
        }
        if g.session.has_output() {
            return Poll::Ready(true);
        }
        g.writer_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

async fn writer_loop(state: &State, w: &mut BoxWrite) -> Result<()> {
    // The headers of a batch (up to and with the first WRITE), sent with
    // that WRITE's data in one vectored write.
    let mut out: Vec<u8> = Vec::with_capacity(nbd_proto::client::DEFAULT_MAX_IN_FLIGHT * EXTENDED_REQUEST_HEADER_LEN);
    loop {
        if !WaitOutput(state).await {
            return Ok(());
        }
        out.clear();
        let (payload, disc) = {
            let mut g = state.lock();
            let Some(t) = g.session.poll_transmit(&mut out) else {
                continue;
            };
            if g.session.has_deadlines() {
                // Requests start their deadlines now: the deadline task
                // tells the session the time and arms its timer anew.
                if let Some(w) = g.deadline_waker.take() {
                    w.wake();
                }
            }
            let payload = t.payload.map(|p| {
                let i = g.slot_of(p.cookie);
                let s = &mut g.slots[i];
                s.lent = true;
                (i, s.buf.take(), s.start, s.len)
            });
            (payload, g.disconnecting && !g.session.has_output())
        };
        let data = match &payload {
            Some((_, Some(b), start, len)) => b.get(*start..start + len).unwrap_or_default(),
            _ => &[],
        };
        let res = write_all_vectored(w, &out, data).await;
        if let Some((slot, buf, ..)) = payload {
            let mut g = state.lock();
            let g = &mut *g;
            let s = &mut g.slots[slot];
            s.buf = buf;
            s.lent = false;
            settle(&mut g.slots, slot, &mut g.free);
        }
        res?;
        w.flush().await?;
        if disc {
            let _ = w.close().await;
            let mut g = state.lock();
            g.dead.get_or_insert_with(|| "the client disconnected".into());
            for w in [g.disc_waker.take(), g.reader_waker.take()].into_iter().flatten() {
                w.wake();
            }
            return Ok(());
        }
    }
}
