//! The NBD server engine: everything of a server that does not depend on
//! the runtime, shared by the blocking and the async servers (which only
//! move its bytes), serving the backends of `nbd-storage`.
//!
//! - [`Exports`]: the exports a server offers (it answers the handshake's
//!   lookups through [`nbd_proto::server::ExportLookup`]).
//! - [`ServeContext`]: what every connection of a server shares: the
//!   exports, the negotiation settings, the [`IoPool`] that runs blocking
//!   storage calls and the [`PayloadBudget`] that caps payload memory.
//! - [`ServeConnection`]: one connection's whole life: the protocol
//!   session (handshake, TLS upgrade, transmission), the export the client
//!   chose, and the execution of its requests; the runtime only moves bytes.
//! - [`ReplyWriter`]: the replies, for the runtime to write with vectored
//!   writes.
//!
//! # Where requests run
//!
//! Storage that never blocks ([`Storage::never_blocks`], the memory export)
//! runs in place, on the thread that reads the connection. Storage that may
//! block (files, block devices, images) runs on the [`IoPool`], so a slow
//! `fdatasync` delays neither other connections nor the reading of this
//! one's next requests; replies leave in the order requests complete.
//! [`AsyncStorage`] is started in place and completes on its own.
//!
//! # Memory
//!
//! No buffer is sized from a request header before its bytes arrive: a
//! WRITE payload goes to storage straight from the receive buffer (storage
//! that never blocks) or in pieces of at most [`WRITE_PIECE`] bytes that
//! grow with the bytes received. READ buffers and WRITE pieces are taken
//! from the server's [`PayloadBudget`]; a connection that cannot get budget,
//! has [`Limits::max_in_flight`] requests in flight, or has more than
//! [`Limits::reply_high_water`] bytes of replies waiting for its client,
//! stops reading until that changes ([`Status::Blocked`]). A transmitting
//! connection that stays idle for [`IDLE_RELEASE`] (nothing in flight,
//! nothing received) gives its large buffers back; it keeps that time
//! itself, as it keeps its handshake deadline (see below).
//!
//! # The loop a runtime runs
//!
//! ```text
//! reader:                                   writer:
//! loop {                                    loop {
//!     send conn.poll_transmit() bytes           match writer.poll_batch(cx) {
//!     match conn.status(Some(waker)) {              Ready(true) => write
//!         Read       => read some bytes,                writer.with_slices(..),
//!                       n = conn.input(bytes)?,         advance(n)
//!                       drop n of them              Ready(false) => done
//!         Blocked    => wait for the waker          Pending => wait
//!         StartTls(t)=> TLS, t.established()    }
//!         Closed     => stop                    }
//!     }
//! }
//! on EOF: conn.input_closed()
//! ```
//!
//! The reader also tells the connection the time, which keeps its own
//! deadlines: it calls `conn.handle_timeout(now)?` at the top of each turn
//! (at least before each wait for the client), and whatever it waits for
//! (the client, the TLS handshake) it races with one timer at
//! `conn.poll_timeout()`, calling `conn.handle_timeout(now)?` when that
//! fires. In the handshake that deadline is the handshake's: an `Err` (the
//! handshake timed out) closes the connection. In transmission it is the
//! moment an idle connection gives its buffers back ([`IDLE_RELEASE`]),
//! which `handle_timeout` does itself; it never fails there.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod budget;
mod exec;
mod options;
mod pool;
mod replies;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Waker;
use std::time::Duration;

use nbd_proto::common::{MetaContext, Mode};
use nbd_proto::server::{
    ExportDetails, ExportListing, ExportLookup, ServerConfig, ServerEvent, ServerNeed, ServerNegotiated, ServerSession,
    ServerSessionError, ServerStartTls,
};
use nbd_proto::time::{TimedOut, Timestamp};
use nbd_proto::wire::{CONTEXT_BASE_ALLOCATION, TransmissionFlags};

pub use budget::PayloadBudget;
pub use exec::{Backend, HOLE_GRAIN, IoPool, SPARSE_READ_THRESHOLD, WRITE_PIECE};
pub use options::ServerOptions;
pub use replies::ReplyWriter;

use exec::{Env, Executor};
use nbd_storage::{AsyncStorage, Capabilities, Storage};
use replies::Shared;

/// One export: a name, a description and its storage.
#[derive(Clone)]
pub struct Export {
    /// The export name (`""` is the default export).
    pub name: String,
    /// A description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Where its requests run.
    pub backend: Backend,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.size())
            .field("backend", &self.backend)
            .finish()
    }
}

impl Export {
    /// An export of synchronous storage.
    pub fn new(name: impl Into<String>, description: impl Into<String>, storage: Arc<dyn Storage>) -> Export {
        Export {
            name: name.into(),
            description: description.into(),
            backend: Backend::Sync(storage),
        }
    }

    /// An export of asynchronous storage.
    pub fn new_async(
        name: impl Into<String>,
        description: impl Into<String>,
        storage: Arc<dyn AsyncStorage>,
    ) -> Export {
        Export {
            name: name.into(),
            description: description.into(),
            backend: Backend::Async(storage),
        }
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        match &self.backend {
            Backend::Sync(s) => s.size(),
            Backend::Async(a) => a.size(),
        }
    }

    /// What the storage supports.
    pub fn capabilities(&self) -> Capabilities {
        match &self.backend {
            Backend::Sync(s) => s.capabilities(),
            Backend::Async(a) => a.capabilities(),
        }
    }

    /// The transmission flags this export's storage supports.
    pub fn flags(&self) -> TransmissionFlags {
        flags_of(&self.capabilities())
    }

    /// What the handshake tells clients about this export.
    pub fn details(&self) -> ExportDetails {
        let caps = self.capabilities();
        let mut d = ExportDetails::new(self.name.clone(), self.size());
        d.description = self.description.clone();
        d.flags = flags_of(&caps);
        d.block_size = caps.block_size;
        if let Backend::Sync(s) = &self.backend {
            // The contexts the storage offers (`base:allocation`, and e.g.
            // `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME` for images).
            d.meta_contexts = s.meta_contexts();
        }
        d
    }
}

/// The transmission flags a set of capabilities allows.
pub fn flags_of(caps: &Capabilities) -> TransmissionFlags {
    let mut f = TransmissionFlags::HAS_FLAGS;
    let rw = !caps.read_only;
    for (on, flag) in [
        (caps.read_only, TransmissionFlags::READ_ONLY),
        (caps.can_flush, TransmissionFlags::SEND_FLUSH),
        (caps.can_fua && rw, TransmissionFlags::SEND_FUA),
        (caps.rotational, TransmissionFlags::ROTATIONAL),
        (caps.can_trim && rw, TransmissionFlags::SEND_TRIM),
        (caps.can_zero && rw, TransmissionFlags::SEND_WRITE_ZEROES),
        (
            caps.can_zero && caps.can_fast_zero && rw,
            TransmissionFlags::SEND_FAST_ZERO,
        ),
        (caps.can_multi_conn, TransmissionFlags::CAN_MULTI_CONN),
        (caps.can_cache, TransmissionFlags::SEND_CACHE),
        (true, TransmissionFlags::BLOCK_STATUS_PAYLOAD),
    ] {
        if on {
            f |= flag;
        }
    }
    f
}

/// One line about a connection that reached transmission, for logs:
/// "client negotiated structured replies over TLS, export "x" (N bytes)".
pub fn describe(negotiated: &ServerNegotiated, export: &Export) -> String {
    let mode = negotiated.mode.description();
    format!(
        "client negotiated {mode}{}, export {:?} ({} bytes)",
        if negotiated.tls { " over TLS" } else { "" },
        export.name,
        negotiated.size
    )
}

/// The set of exports a server offers. The default export (what a client
/// that names none gets) is the one named `""`, else the first.
#[derive(Debug, Clone, Default)]
pub struct Exports {
    list: Vec<Export>,
}

impl Exports {
    /// A set of exports.
    pub fn new(list: Vec<Export>) -> Exports {
        Exports { list }
    }

    /// Export `i`.
    pub fn get(&self, i: usize) -> Option<&Export> {
        self.list.get(i)
    }

    /// The exports, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.list.iter()
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are no exports.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

impl ExportLookup for Exports {
    type Export = Export;

    fn lookup(&self, name: &str) -> Option<(ExportDetails, Export)> {
        let e = self.list.iter().find(|e| e.name == name)?;
        Some((e.details(), e.clone()))
    }

    fn default_export(&self) -> Option<(ExportDetails, Export)> {
        let e = self.list.first()?;
        Some((e.details(), e.clone()))
    }

    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        for e in &self.list {
            each(ExportListing {
                name: &e.name,
                description: &e.description,
                tls_only: false,
            });
        }
    }
}

/// Limits of a server, beyond the protocol's (which are in
/// [`ServerConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Requests in flight per connection before it stops reading more
    /// (default 128).
    pub max_in_flight: usize,
    /// Payload memory (READ replies waiting to be sent, WRITE pieces
    /// waiting for storage) over all connections (default 1 GiB).
    pub payload_budget: u64,
    /// Threads that run blocking storage calls (default 16).
    pub io_threads: usize,
    /// Reply bytes a connection queues for a client that does not read
    /// them before it stops reading requests (default 32 MiB).
    pub reply_high_water: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_in_flight: 128,
            payload_budget: 1 << 30,
            io_threads: 16,
            reply_high_water: 32 << 20,
        }
    }
}

/// Chainable setters, one per field (the struct is `#[non_exhaustive]`:
/// other crates build it from [`Limits::default`]).
impl Limits {
    /// Sets the requests in flight per connection before it stops reading.
    pub const fn max_in_flight(mut self, v: usize) -> Self {
        self.max_in_flight = v;
        self
    }

    /// Sets the payload memory over all connections.
    pub const fn payload_budget(mut self, v: u64) -> Self {
        self.payload_budget = v;
        self
    }

    /// Sets the threads that run blocking storage calls.
    pub const fn io_threads(mut self, v: usize) -> Self {
        self.io_threads = v;
        self
    }

    /// Sets the reply bytes queued for a client before it stops reading requests.
    pub const fn reply_high_water(mut self, v: usize) -> Self {
        self.reply_high_water = v;
        self
    }
}

/// How long a transmitting connection waits with nothing to do (no request
/// in flight, nothing received) before it gives its large buffers back.
/// The connection keeps this time itself: [`ServeConnection::poll_timeout`]
/// names the moment and [`ServeConnection::handle_timeout`] releases the
/// buffers once it has passed (see [`ServeConnection::idle_releases`]).
pub const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// While requests are in flight, how long until an idle connection's
/// runtime is asked to tell the time again: the connection cannot see
/// when its last request completes, so it looks again this often (only
/// while its runtime waits for the client with requests in flight).
const IDLE_RECHECK: Duration = Duration::from_millis(250);

/// Where a transmitting connection stands on the way to giving its buffers
/// back ([`IDLE_RELEASE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Input came since the connection was last told the time: the idle
    /// period has not begun.
    Active,
    /// Requests were in flight when told the time, first at `.0`: look
    /// again [`IDLE_RECHECK`] later.
    Busy(Timestamp),
    /// Idle since `.0`: the first time told after it became idle (never a
    /// time told before, so a runtime's stale clock cannot fire it early).
    Since(Timestamp),
    /// The buffers were given back in this idle period.
    Released,
}

/// What every connection of a server shares.
#[derive(Debug)]
pub struct ServeContext {
    exports: Arc<Exports>,
    config: ServerConfig,
    limits: Limits,
    pool: IoPool,
    budget: Arc<PayloadBudget>,
    shutting_down: AtomicBool,
    active: AtomicUsize,
}

impl ServeContext {
    /// A server's shared state: its exports, how it negotiates, its limits.
    pub fn new(exports: Vec<Export>, config: ServerConfig, limits: Limits) -> ServeContext {
        ServeContext {
            exports: Arc::new(Exports::new(exports)),
            config,
            pool: IoPool::new(limits.io_threads),
            budget: Arc::new(PayloadBudget::new(limits.payload_budget)),
            limits,
            shutting_down: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        }
    }

    /// The server is shutting down: from now on every connection refuses
    /// options with `NBD_REP_ERR_SHUTDOWN` and requests with
    /// `NBD_ESHUTDOWN` (the runtime stops accepting and lets connections
    /// finish what is in flight).
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether [`ServeContext::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Connections that exist ([`ServeConnection`]s not yet dropped).
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// The exports.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// How connections negotiate.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The payload budget.
    pub fn budget(&self) -> &PayloadBudget {
        &self.budget
    }
}

/// Why a connection ends with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The client broke the protocol, or the handshake could not reach
    /// transmission.
    #[error(transparent)]
    Session(#[from] ServerSessionError),
    /// The client sent bytes after `NBD_OPT_STARTTLS` without waiting for
    /// the acknowledgement (they would be lost to TLS).
    #[error("client sent data before the NBD_OPT_STARTTLS acknowledgement")]
    EarlyTlsData,
    /// The policy let a client ask for TLS but the server has no
    /// certificate.
    #[error("TLS requested but the server has no certificate")]
    NoTlsCertificate,
    /// A second `NBD_OPT_STARTTLS` (the session refuses it itself; a
    /// runtime that sees it has a bug).
    #[error("second NBD_OPT_STARTTLS")]
    SecondStartTls,
}

/// Where a connection's handshake stands, for the runtime's handshake loop
/// ([`ServeConnection::negotiation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeProgress {
    /// Read more from the client and pass it to [`ServeConnection::input`].
    Read,
    /// Transmission started: serve requests.
    Transmission,
    /// The client asked for TLS and its acknowledgement was sent: check
    /// with [`ServeConnection::starting_tls`], run the TLS server
    /// handshake, then [`ServeConnection::tls_established`].
    StartTls,
    /// The handshake ended without transmission (the client aborted or
    /// left, or broke the protocol): close.
    Closed,
}

/// What a connection needs from its runtime next.
#[derive(Debug)]
#[must_use]
#[non_exhaustive]
pub enum Status<'a> {
    /// Read bytes from the client and pass them to
    /// [`ServeConnection::input`].
    Read,
    /// Wait before reading more (budget, requests in flight, replies not
    /// yet taken by the client): the waker given to
    /// [`ServeConnection::status`] is woken when that changes.
    Blocked,
    /// Send everything [`ServeConnection::poll_transmit`] gives, run the
    /// TLS server handshake, then call [`ServerStartTls::established`].
    StartTls(ServerStartTls<'a>),
    /// Nothing more is read: let the writer finish, then close.
    Closed,
}

/// One connection, runtime-agnostic: see the [module docs](self).
pub struct ServeConnection {
    ctx: Arc<ServeContext>,
    session: ServerSession<Arc<Exports>>,
    shared: Arc<Shared>,
    exec: Option<Executor>,
    export: Option<Export>,
    done: bool,
    /// The server's shutdown reached the session.
    shut_down: bool,
    /// The idle period, in transmission.
    idle: Idle,
    /// Idle periods that ended with the buffers given back.
    idle_releases: u64,
}

impl Drop for ServeConnection {
    fn drop(&mut self) {
        self.ctx.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for ServeConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConnection")
            .field("session", &self.session)
            .field("done", &self.done)
            .finish()
    }
}

impl ServeConnection {
    /// A new connection of the server `ctx` describes: its first output is
    /// the greeting.
    pub fn new(ctx: &Arc<ServeContext>) -> ServeConnection {
        ctx.active.fetch_add(1, Ordering::SeqCst);
        ServeConnection {
            session: ServerSession::new(ctx.config.clone(), ctx.exports.clone()),
            shared: Arc::new(Shared::new(ctx.budget.clone())),
            ctx: ctx.clone(),
            exec: None,
            export: None,
            done: false,
            shut_down: false,
            idle: Idle::Active,
            idle_releases: 0,
        }
    }

    /// Passes the server's shutdown on to the session (once).
    fn follow_shutdown(&mut self) {
        if !self.shut_down && self.ctx.is_shutting_down() {
            self.shut_down = true;
            self.session.shutdown();
        }
    }

    /// The writer of this connection's replies (take it once).
    #[must_use = "without its writer the connection's replies are never sent"]
    pub fn reply_writer(&self) -> ReplyWriter {
        ReplyWriter::new(self.shared.clone())
    }

    /// Appends handshake bytes to send to `buf`; `None` when there are
    /// none. (Replies come from the [`ReplyWriter`].)
    #[must_use = "the appended bytes must be sent"]
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<()> {
        self.session.poll_transmit(buf)
    }

    /// Whether handshake bytes wait to be sent.
    pub fn has_output(&self) -> bool {
        self.session.has_output()
    }

    /// What the connection needs next. With a waker, a [`Status::Blocked`]
    /// connection wakes it when it may go on.
    #[must_use = "the driver must do what the connection needs next"]
    pub fn status(&mut self, waker: Option<&Waker>) -> Status<'_> {
        self.follow_shutdown();
        if self.done {
            return Status::Closed;
        }
        let blocked = self.blocked(waker);
        match self.session.need() {
            ServerNeed::Closed => Status::Closed,
            ServerNeed::StartTls(t) => Status::StartTls(t),
            _ if blocked => Status::Blocked,
            _ => Status::Read,
        }
    }

    /// What the handshake needs next; call it after sending what
    /// [`ServeConnection::poll_transmit`] gave.
    #[must_use = "the driver must do what the handshake needs next"]
    pub fn negotiation(&mut self) -> HandshakeProgress {
        if self.is_transmitting() {
            return HandshakeProgress::Transmission;
        }
        match self.status(None) {
            Status::StartTls(_) => HandshakeProgress::StartTls,
            Status::Closed => HandshakeProgress::Closed,
            _ => HandshakeProgress::Read,
        }
    }

    /// Checks, before the TLS server handshake, that the client waited for
    /// the acknowledgement (`buffered`: bytes the runtime read beyond what
    /// [`ServeConnection::input`] took) and that the server has a
    /// certificate (`certificate`, the runtime's TLS configuration, given
    /// back). An error means: close the connection.
    pub fn starting_tls<C>(&self, buffered: usize, certificate: Option<C>) -> Result<C, ServeError> {
        if buffered > 0 {
            return Err(ServeError::EarlyTlsData);
        }
        certificate.ok_or(ServeError::NoTlsCertificate)
    }

    /// The TLS server handshake succeeded: negotiation goes on over TLS.
    pub fn tls_established(&mut self) -> Result<(), ServeError> {
        match self.status(None) {
            Status::StartTls(t) => t.established().map_err(Into::into),
            _ => Err(ServeError::SecondStartTls),
        }
    }

    /// One line about the connection once it reached transmission, for
    /// logs (see [`describe`]).
    pub fn log_line(&self) -> Option<String> {
        Some(describe(self.negotiated()?, self.export()?))
    }

    fn blocked(&mut self, waker: Option<&Waker>) -> bool {
        let Some(exec) = &mut self.exec else {
            return false;
        };
        if exec.parked(waker) {
            return true;
        }
        // In the middle of a WRITE payload the request is already counted
        // in flight: the limit on requests must not stop its payload (with
        // `max_in_flight` 1 nothing else could ever free it).
        let mid_payload = matches!(self.session.need(), ServerNeed::Payload { .. });
        {
            let mut g = self.shared.lock();
            if (!mid_payload && g.in_flight >= self.ctx.limits.max_in_flight)
                || g.batch.bytes >= self.ctx.limits.reply_high_water
            {
                if let Some(w) = waker {
                    Shared::register_reader(&mut g, w);
                }
                return true;
            }
        }
        if mid_payload {
            return !exec.payload_ready(waker);
        }
        false
    }

    /// Takes bytes from the client; returns how many it used. It stops
    /// early when the connection must wait ([`Status::Blocked`]), at
    /// STARTTLS, or when nothing more is read: call
    /// [`ServeConnection::status`] and go on from there. An empty `input`
    /// means the client closed its side (EOF, see
    /// [`ServeConnection::input_closed`]). An error means the connection
    /// must be closed (once the writer is done; during the handshake, after
    /// sending what [`ServeConnection::poll_transmit`] still gives: the
    /// replies to the options before the one that ended it).
    #[must_use = "the bytes not used must be passed again"]
    pub fn input(&mut self, input: &[u8]) -> Result<usize, ServeError> {
        if input.is_empty() {
            self.input_closed();
            return Ok(0);
        }
        self.follow_shutdown();
        let mut used = 0;
        loop {
            if self.done || self.blocked(None) {
                return Ok(used);
            }
            let rest = &input[used..];
            // A WRITE piece takes at most what fits in it.
            let limit = match (&self.exec, self.session.need()) {
                (Some(exec), ServerNeed::Payload { .. }) => exec.payload_room(),
                (_, ServerNeed::StartTls(_) | ServerNeed::Closed) => return Ok(used),
                _ => usize::MAX,
            };
            let rest = &rest[..rest.len().min(limit)];
            let ServeConnection {
                session, exec, idle, ..
            } = self;
            let (n, event) = match session.feed(rest) {
                Ok(x) => x,
                Err(e) => {
                    self.finish_reading();
                    return Err(e.into());
                }
            };
            used += n;
            if n > 0 {
                // Input ends the idle period.
                *idle = Idle::Active;
            }
            match event {
                None if n == 0 => return Ok(used),
                None => {}
                Some(ServerEvent::WriteData {
                    request,
                    offset,
                    data,
                    last,
                }) => {
                    if let Some(exec) = exec {
                        exec.write_data(&request, offset, data, last);
                    }
                }
                Some(ServerEvent::Request(req)) => {
                    if let Some(exec) = exec {
                        exec.request(req);
                    }
                }
                Some(ServerEvent::Reject { request, error, reason }) => {
                    if let Some(exec) = exec {
                        exec.reject(request, error, reason);
                    }
                }
                Some(ServerEvent::Ready) => self.start_transmission(),
                Some(ServerEvent::Disconnect | ServerEvent::Aborted) => self.finish_reading(),
                Some(_) => {}
            }
        }
    }

    fn start_transmission(&mut self) {
        let (Some(enc), Some(neg), Some(export)) = (
            self.session.encoder(),
            self.session.negotiated(),
            self.session.export().cloned(),
        ) else {
            return;
        };
        let contexts: Arc<[(u32, String)]> = neg.contexts.iter().map(|c| (c.id, c.name.clone())).collect();
        let env = Env {
            shared: self.shared.clone(),
            enc,
            structured: neg.mode.structured(),
            allocation_id: neg
                .contexts
                .iter()
                .find(|c| c.name == CONTEXT_BASE_ALLOCATION)
                .map(|c| c.id),
            contexts,
        };
        self.exec = Some(Executor::new(env, export.backend.clone(), self.ctx.pool.clone()));
        self.export = Some(export);
    }

    fn finish_reading(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(exec) = &mut self.exec {
            exec.abandon();
        }
        self.shared.reader_finished();
    }

    /// The client closed its side (EOF) or the socket failed: nothing more
    /// is read; requests in flight still finish and their replies go to the
    /// writer (which may fail to send them).
    pub fn input_closed(&mut self) {
        self.session.connection_lost();
        self.finish_reading();
    }

    /// This connection shuts down (as all do after
    /// [`ServeContext::shutdown`]): options are refused with
    /// `NBD_REP_ERR_SHUTDOWN`, new requests with `NBD_ESHUTDOWN`.
    pub fn shutdown(&mut self) {
        self.shut_down = true;
        self.session.shutdown();
    }

    /// Whether the server is shutting down.
    pub fn server_shutting_down(&self) -> bool {
        self.ctx.is_shutting_down()
    }

    /// Idle periods that ended with the connection giving its large buffers
    /// back ([`IDLE_RELEASE`], through [`ServeConnection::handle_timeout`]):
    /// at most one per idle period, for statistics and tests.
    pub fn idle_releases(&self) -> u64 {
        self.idle_releases
    }

    /// Keeps the idle period (transmission): starts it the first time told
    /// after the connection became idle, gives the buffers back once
    /// [`IDLE_RELEASE`] has passed since.
    fn idle_timeout(&mut self, now: Timestamp) {
        if self.exec.is_none() || self.done {
            return;
        }
        self.idle = match self.idle {
            // (Only input starts requests, and input makes it Active.)
            Idle::Released => Idle::Released,
            Idle::Since(t) if now >= t.saturating_add(IDLE_RELEASE) => {
                self.shared.release_idle();
                self.idle_releases += 1;
                Idle::Released
            }
            Idle::Since(t) => Idle::Since(t),
            Idle::Active | Idle::Busy(_) if self.shared.lock().in_flight == 0 => Idle::Since(now),
            Idle::Busy(t) if now < t.saturating_add(IDLE_RECHECK) => Idle::Busy(t),
            Idle::Active | Idle::Busy(_) => Idle::Busy(now),
        };
    }

    /// When the idle period next needs the time, in transmission.
    fn idle_deadline(&self) -> Option<Timestamp> {
        if self.exec.is_none() || self.done {
            return None;
        }
        match self.idle {
            Idle::Active | Idle::Released => None,
            Idle::Busy(t) => Some(t.saturating_add(IDLE_RECHECK)),
            Idle::Since(t) => Some(t.saturating_add(IDLE_RELEASE)),
        }
    }

    /// Requests received and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// Requests being executed by storage: in flight, but neither a WRITE
    /// whose payload is still arriving nor a READ waiting for budget. A
    /// runtime that answers everything before it waits for the client
    /// waits for these.
    pub fn executing(&self) -> usize {
        let not_started = self.exec.as_ref().map_or(0, Executor::not_started);
        self.in_flight().saturating_sub(not_started)
    }

    /// Whether transmission started.
    pub fn is_transmitting(&self) -> bool {
        self.exec.is_some()
    }

    /// The time is `now` (the runtime's clock, `nbd_net::time::now()`):
    /// call it when the connection starts, at the top of each turn of the
    /// reading loop (at least before each wait for the client), and when
    /// the timer armed at [`ServeConnection::poll_timeout`] fires.
    ///
    /// In the handshake, the first call starts the handshake's deadline
    /// ([`ServerConfig::handshake_timeout`], TLS included, until
    /// transmission); `Err` once it has passed: nothing more is read, close
    /// the connection. In transmission it keeps the idle period: once the
    /// connection has had nothing in flight and received nothing for
    /// [`IDLE_RELEASE`] (counted from the first time told after it became
    /// idle), it gives its large buffers back, once per idle period (input
    /// starts a new one); it never fails there.
    pub fn handle_timeout(&mut self, now: Timestamp) -> Result<(), TimedOut> {
        self.session.handle_timeout(now);
        self.idle_timeout(now);
        match self.session.error() {
            Some(ServerSessionError::TimedOut(t)) => {
                let t = *t;
                self.finish_reading();
                Err(t)
            }
            _ => Ok(()),
        }
    }

    /// When the runtime must call [`ServeConnection::handle_timeout`] next
    /// (arm one timer at it while waiting for the client or the TLS
    /// handshake), or `None`: no deadline is pending. In the handshake that
    /// is the handshake's deadline (none before the first time told or
    /// without a handshake timeout); in transmission, the moment an idle
    /// connection gives its buffers back, or, while requests are in
    /// flight, a moment to look again (none after input it was not yet
    /// told the time since, once the buffers were given back, or once
    /// nothing more is read).
    #[must_use = "the runtime must arm a timer at the deadline"]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match (self.session.poll_timeout(), self.idle_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What was negotiated (once transmitting).
    pub fn negotiated(&self) -> Option<&ServerNegotiated> {
        self.session.negotiated()
    }

    /// The protocol flavour (once transmitting).
    pub fn mode(&self) -> Option<Mode> {
        self.session.mode()
    }

    /// The export the client chose (once transmitting).
    pub fn export(&self) -> Option<&Export> {
        self.export.as_ref()
    }

    /// The metadata contexts the client selected.
    pub fn contexts(&self) -> &[MetaContext] {
        self.session.contexts()
    }

    /// The largest READ or WRITE payload this connection accepts.
    pub fn max_payload(&self) -> u64 {
        self.session.max_payload()
    }
}
