//! One negotiation for both clients: the handshake pump
//! ([`handshake`]), option mode ([`Negotiation`]), and dialing and
//! redialing a server ([`connect`], [`Redial`]), written once as async
//! code over what a runtime provides ([`Transport`], [`Runtime`]).
//!
//! The async client (`nbd-smol`) awaits these futures on its executor;
//! the blocking client (`nbd-blocking`) runs them with [`block_on`], its
//! transport blocking in its socket calls (so its futures are ready when
//! first polled). The runtimes differ in their sockets, TLS streams,
//! timers and executor, and in nothing else here.
//!
//! The session decides the handshake's deadline (`nbd_proto::time`): the
//! pump tells it the time before each step and hands the transport the
//! moment by which that step must be done.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use nbd_proto::client::{
    ClientConfig, ClientEvent, ClientNeed, ClientSession, ClientSessionError, ExportEntry, ExportInfo, HandshakeError,
    MetaContext, Negotiated, OptionOutcome, ServerOptionError,
};
use nbd_proto::time::Timestamp;
use nbd_proto::uri::NbdUri;

use crate::client::{Error, Phase, Result, reason, timed_out, uri_tls};
use crate::resilience::{Backoff, ConnectOptions, Reconnect, Timeouts, same_export};
use crate::time::now;
use crate::tls::{LazyClientTls, TlsError};

/// Why an I/O step of the handshake did not finish.
#[derive(Debug)]
pub enum Stalled {
    /// The socket (or TLS) failed.
    Io(io::Error),
    /// The deadline it was given came first.
    Deadline,
    /// The TLS credentials could not be set up.
    Credentials(TlsError),
}

impl From<io::Error> for Stalled {
    fn from(e: io::Error) -> Stalled {
        Stalled::Io(e)
    }
}

/// The I/O a handshake needs from a runtime's connection. Each step is
/// done by the moment `by` (none: as long as it takes), or ends with
/// [`Stalled::Deadline`].
pub trait Transport: Send {
    /// Sends all of `bytes` (and flushes them).
    fn send(&mut self, bytes: &[u8], by: Option<Timestamp>) -> impl Future<Output = Result<(), Stalled>> + Send;
    /// Reads exactly `buf.len()` bytes.
    fn receive(&mut self, buf: &mut [u8], by: Option<Timestamp>) -> impl Future<Output = Result<(), Stalled>> + Send;
    /// Runs the TLS client handshake over the connection with `tls`'s
    /// credentials (right after the server's acknowledgement of
    /// `NBD_OPT_STARTTLS`); the connection goes on over TLS.
    fn start_tls(
        &mut self,
        tls: &LazyClientTls,
        by: Option<Timestamp>,
    ) -> impl Future<Output = Result<(), Stalled>> + Send;
}

/// A client runtime: its connection ([`Transport`]), how it opens one,
/// how it waits, and the client it makes of a negotiated connection.
pub trait Runtime: Transport + Sized {
    /// The client a negotiated connection becomes.
    type Client;
    /// Connects to the server `uri` names (an expired `timeout` is an
    /// error of kind `TimedOut`).
    fn open(uri: &NbdUri, timeout: Option<Duration>) -> impl Future<Output = io::Result<Self>> + Send;
    /// The connection over a socket the caller connected.
    fn from_socket(socket: crate::Socket) -> io::Result<Self>;
    /// Waits `d` (between reconnection attempts).
    fn sleep(d: Duration) -> impl Future<Output = ()> + Send;
    /// The client of a connection in transmission (`timeouts`: its
    /// deadlines; its session already decides the request deadline).
    fn client(session: ClientSession, conn: Self, timeouts: Timeouts) -> Result<Self::Client>;
    /// What the runtime changes in a session's configuration (the
    /// blocking client has one request in flight at a time).
    fn session_config(config: ClientConfig) -> ClientConfig {
        config
    }
}

/// Where the handshake stopped.
#[derive(Debug)]
pub enum Stop {
    /// Transmission started.
    Connected,
    /// Option mode: the option issued last finished so.
    Option(OptionOutcome),
    /// Option mode: waiting for an option.
    Negotiating,
    /// Option mode: `NBD_OPT_ABORT` acknowledged (or the server closed).
    Aborted,
}

/// The session's next deadline after telling it the time (`None`: none
/// runs), or the error if one passed.
fn deadline(session: &mut ClientSession) -> Result<Option<Timestamp>> {
    if !session.has_deadlines() {
        return Ok(None);
    }
    session.handle_timeout(now());
    match timed_out(session) {
        Some(e) => Err(e),
        None => Ok(session.poll_timeout()),
    }
}

/// The error of a stalled step: the deadline the session says passed, or
/// the socket's error. The end of the connection during the handshake is
/// [`Error::Disconnected`]; right after the TLS handshake any failure most
/// likely means that the server refused our certificate, and the error
/// says so.
fn stalled(session: &mut ClientSession, e: Stalled, fresh_tls: bool) -> Error {
    match e {
        Stalled::Deadline => {
            session.handle_timeout(now());
            timed_out(session).unwrap_or(Error::Misuse("the handshake's timer fired before its deadline"))
        }
        Stalled::Io(e) if fresh_tls && e.kind() != io::ErrorKind::Interrupted => {
            Error::Io(crate::tls::refused_after_handshake(e))
        }
        Stalled::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Error::disconnected("the server closed the connection during the handshake")
        }
        Stalled::Io(e) => Error::Io(e),
        Stalled::Credentials(e) => Error::Tls(e),
    }
}

/// Feeds handshake input to the session: where the handshake stopped, if
/// it did.
fn feed(session: &mut ClientSession, input: &[u8]) -> Result<Option<Stop>> {
    let mut at = 0;
    let mut stop = None;
    loop {
        let (k, ev) = session.feed(&input[at..])?;
        at += k;
        match ev {
            Some(ClientEvent::Connected) => stop = Some(Stop::Connected),
            Some(ClientEvent::OptionDone(o)) => stop = Some(Stop::Option(o)),
            Some(ClientEvent::Aborted) => stop = Some(Stop::Aborted),
            Some(_) => return Err(Error::Misuse("a transmission event in the handshake")),
            None if k == 0 => return Ok(stop),
            None => {}
        }
    }
}

/// Pumps `session`'s handshake over `conn` until it stops (transmission,
/// an option's outcome, waiting for an option, or aborted), upgrading the
/// connection to TLS when the server accepts `NBD_OPT_STARTTLS` (with
/// `tls`'s credentials), by the session's handshake deadline.
pub async fn handshake<T: Transport>(session: &mut ClientSession, conn: &mut T, tls: &LazyClientTls) -> Result<Stop> {
    let mut out = Vec::new();
    let mut input = Vec::new();
    // TLS just started and the server has said nothing over it yet.
    let mut fresh_tls = false;
    loop {
        let by = deadline(session)?;
        while session.poll_transmit(&mut out).is_some() {}
        if !out.is_empty() {
            let sent = conn.send(&out, by).await;
            sent.map_err(|e| stalled(session, e, fresh_tls))?;
            out.clear();
            continue;
        }
        match session.need() {
            ClientNeed::Bytes(0) | ClientNeed::Pending => {
                if let Some(stop) = feed(session, &[])? {
                    return Ok(stop);
                }
            }
            ClientNeed::Bytes(n) => {
                input.resize(n, 0);
                let received = conn.receive(&mut input, by).await;
                received.map_err(|e| stalled(session, e, fresh_tls))?;
                fresh_tls = false;
                if let Some(stop) = feed(session, &input)? {
                    return Ok(stop);
                }
            }
            ClientNeed::StartTls(_) => {
                match conn.start_tls(tls, by).await {
                    Ok(()) => {}
                    Err(Stalled::Io(e)) => return Err(Error::TlsHandshake(e)),
                    Err(e) => return Err(stalled(session, e, false)),
                }
                match session.need() {
                    ClientNeed::StartTls(t) => t.established()?,
                    _ => return Err(Error::Misuse("no TLS upgrade is pending")),
                }
                fresh_tls = true;
            }
            ClientNeed::Negotiating => return Ok(Stop::Negotiating),
            ClientNeed::Idle => return Ok(Stop::Connected),
            ClientNeed::Closed => {
                // The session failed (feed repeats why), or option mode
                // ended with NBD_OPT_ABORT.
                feed(session, &[])?;
                return Ok(Stop::Aborted);
            }
            _ => return Err(Error::Misuse("READ data in the handshake")),
        }
    }
}

/// Opens the socket `uri` names by the connect deadline (an expired one
/// is [`Error::TimedOut`]).
async fn open<R: Runtime>(uri: &NbdUri, timeout: Option<Duration>) -> Result<R> {
    R::open(uri, timeout).await.map_err(|e| match (e.kind(), timeout) {
        (io::ErrorKind::TimedOut, Some(after)) => Error::TimedOut {
            phase: Phase::Connect,
            after,
        },
        _ => Error::Io(e),
    })
}

/// Negotiates transmission over `conn` (the configuration's export).
async fn go<R: Runtime>(mut conn: R, config: ClientConfig, tls: &LazyClientTls) -> Result<(ClientSession, R)> {
    let mut session = ClientSession::new(R::session_config(config));
    match handshake(&mut session, &mut conn, tls).await? {
        Stop::Connected => Ok((session, conn)),
        stop => Err(go_refused(stop)),
    }
}

/// The error of an `NBD_OPT_GO` that did not start transmission.
fn go_refused(stop: Stop) -> Error {
    match stop {
        Stop::Option(OptionOutcome::Refused(e)) => Error::Handshake(HandshakeError::Refused(e)),
        _ => Error::disconnected("the server ended negotiation without answering NBD_OPT_GO"),
    }
}

/// How a client made from a URI dials again after its connection broke:
/// the URI, what it negotiates, its credentials, deadlines and policy.
#[derive(Debug)]
pub struct Redial {
    uri: NbdUri,
    config: ClientConfig,
    tls: LazyClientTls,
    timeouts: Timeouts,
    /// The reconnection policy.
    pub policy: Reconnect,
}

impl Redial {
    /// Connects and negotiates transmission once, by the deadline `cap`
    /// (the connect and handshake deadlines no later than it).
    async fn dial<R: Runtime>(&self, cap: Instant) -> Result<(ClientSession, R)> {
        let left = || cap.saturating_duration_since(Instant::now());
        let connect = self.timeouts.connect.map_or(left(), |t| t.min(left()));
        let conn = open::<R>(&self.uri, Some(connect)).await?;
        let config = self.timeouts.session_config(self.config.clone(), Some(left()));
        go(conn, config, &self.tls).await
    }

    /// Reconnects after the connection broke on `e`, for up to the
    /// policy's delay, waiting between attempts as it says; `gone` says
    /// (with the error to return) that the client ended meanwhile. A
    /// connection to an export that is not `first` (see
    /// [`same_export`]) ends the attempts with [`Error::ExportChanged`];
    /// running out of time with [`Error::ReconnectFailed`].
    pub async fn reconnect<R: Runtime>(
        &self,
        e: &Error,
        first: &Negotiated,
        gone: impl Fn() -> Option<Error> + Send,
    ) -> Result<(ClientSession, R)> {
        let mut backoff = Backoff::new(&self.policy, Instant::now(), reason(e));
        loop {
            if let Some(e) = gone() {
                return Err(e);
            }
            if backoff.left().is_zero() {
                return Err(backoff.give_up(self.policy.delay));
            }
            match self.dial::<R>(backoff.deadline).await {
                Ok((session, conn)) => {
                    let Some(n) = session.negotiated() else {
                        return Err(Error::Misuse("transmission without a negotiated export"));
                    };
                    same_export(first, n)?;
                    return Ok((session, conn));
                }
                Err(e) => backoff.last = reason(&e),
            }
            let wait = backoff.wait();
            if !wait.is_zero() {
                R::sleep(wait).await;
            }
        }
    }
}

/// The TLS credentials for `uri`: the caller's, else those the URI names.
fn credentials(uri: &NbdUri, opts: &ConnectOptions) -> Result<LazyClientTls> {
    match &opts.tls {
        Some(t) => Ok(t.clone()),
        None => uri_tls(uri),
    }
}

/// Connects to `uri` and negotiates transmission (the URI's export and
/// TLS policy win over `config`'s; see [`NbdUri::client_config`]), with
/// `opts`' deadlines and credentials: the session, the connection, and
/// how to dial again if `opts` asks for reconnection.
pub async fn connect<R: Runtime>(
    uri: &NbdUri,
    config: ClientConfig,
    opts: &ConnectOptions,
) -> Result<(ClientSession, R, Option<Redial>)> {
    let tls = credentials(uri, opts)?;
    let config = uri.client_config(config).opt_mode(false);
    let conn = open::<R>(uri, opts.timeouts.connect).await?;
    let (session, conn) = go(conn, opts.timeouts.session_config(config.clone(), None), &tls).await?;
    let redial = opts.reconnect.map(|policy| Redial {
        uri: uri.clone(),
        config,
        tls,
        timeouts: opts.timeouts,
        policy,
    });
    Ok((session, conn, redial))
}

/// Negotiates transmission over a connection of the caller's (no
/// deadlines but those `config` sets).
pub async fn handshake_go<R: Runtime>(
    conn: R,
    config: ClientConfig,
    tls: &LazyClientTls,
) -> Result<(ClientSession, R)> {
    go(conn, config.opt_mode(false), tls).await
}

/// A connection in option mode: list exports, ask about them, then either
/// [`Negotiation::go`] into a client or [`Negotiation::abort`]. Each
/// option is bounded by the handshake deadline.
#[derive(Debug)]
pub struct Negotiation<R> {
    session: ClientSession,
    conn: R,
    tls: LazyClientTls,
    timeouts: Timeouts,
    /// Negotiation ended (oldstyle, newstyle without fixed newstyle, or
    /// after GO): no option can be issued.
    done: bool,
}

impl<R: Runtime> Negotiation<R> {
    /// Connects to `uri` and negotiates up to option haggling (TLS,
    /// structured replies and extended headers as `config` asks; the
    /// URI's export and TLS policy win).
    pub async fn connect(uri: &NbdUri, config: ClientConfig) -> Result<Negotiation<R>> {
        Self::connect_with(uri, config, &ConnectOptions::default()).await
    }

    /// [`Negotiation::connect`] with deadlines (`opts.timeouts`: connect;
    /// handshake, for the greeting and then for each option; requests,
    /// once [`Negotiation::go`] made a client) and TLS credentials
    /// (`opts.tls`, else the URI's). A client made by `go` does not
    /// reconnect.
    pub async fn connect_with(uri: &NbdUri, config: ClientConfig, opts: &ConnectOptions) -> Result<Negotiation<R>> {
        let tls = credentials(uri, opts)?;
        let conn = open::<R>(uri, opts.timeouts.connect).await?;
        Self::start(conn, uri.client_config(config), tls, opts.timeouts).await
    }

    /// Negotiates over a socket the caller connected (TLS, if `config`
    /// asks for it, with libnbd's default credentials and no name check).
    pub async fn handshake(socket: impl Into<crate::Socket>, config: ClientConfig) -> Result<Negotiation<R>> {
        Self::handshake_with_tls(socket, config, LazyClientTls::default()).await
    }

    /// Negotiates over a socket the caller connected, with these TLS
    /// credentials.
    pub async fn handshake_with_tls(
        socket: impl Into<crate::Socket>,
        config: ClientConfig,
        tls: LazyClientTls,
    ) -> Result<Negotiation<R>> {
        let conn = R::from_socket(socket.into())?;
        Self::start(conn, config, tls, Timeouts::default()).await
    }

    async fn start(
        mut conn: R,
        config: ClientConfig,
        tls: LazyClientTls,
        timeouts: Timeouts,
    ) -> Result<Negotiation<R>> {
        let config = timeouts.session_config(config.opt_mode(true), None);
        let mut session = ClientSession::new(R::session_config(config));
        let stop = handshake(&mut session, &mut conn, &tls).await?;
        Ok(Negotiation {
            session,
            conn,
            tls,
            timeouts,
            done: matches!(stop, Stop::Connected),
        })
    }

    /// The session: what was negotiated so far (`fixed_newstyle()`,
    /// `protocol_name()`, `tls()`, `structured_replies()`,
    /// `extended_headers()`).
    pub fn session(&self) -> &ClientSession {
        &self.session
    }

    /// Whether the server already ended negotiation (an oldstyle server,
    /// or one that only knows `NBD_OPT_EXPORT_NAME`): only
    /// [`Negotiation::go`] is left.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Issues an option and pumps the handshake until it stops.
    async fn option(
        &mut self,
        option: impl FnOnce(&mut ClientSession) -> Result<(), ClientSessionError>,
    ) -> Result<Stop> {
        if self.done {
            return Err(Error::Misuse("no options after negotiation ended"));
        }
        option(&mut self.session)?;
        let stop = handshake(&mut self.session, &mut self.conn, &self.tls).await?;
        self.done = matches!(stop, Stop::Connected);
        Ok(stop)
    }

    /// An option's outcome; a refusal is an error.
    async fn outcome(
        &mut self,
        what: &'static str,
        option: impl FnOnce(&mut ClientSession) -> Result<(), ClientSessionError>,
    ) -> Result<OptionOutcome> {
        match self.option(option).await? {
            Stop::Option(OptionOutcome::Refused(e)) => Err(Error::Handshake(HandshakeError::Refused(e))),
            Stop::Option(o) => Ok(o),
            _ => Err(Error::disconnected(what)),
        }
    }

    /// `NBD_OPT_LIST`: every export's name and description.
    pub async fn list(&mut self) -> Result<Vec<ExportEntry>> {
        let what = "the server ended negotiation without answering NBD_OPT_LIST";
        match self.outcome(what, |s| s.opt_list()).await? {
            OptionOutcome::List(l) => Ok(l),
            _ => Ok(Vec::new()),
        }
    }

    /// `NBD_OPT_INFO` for one export.
    pub async fn info(&mut self, export: &str) -> Result<ExportInfo> {
        self.try_info(export)
            .await?
            .map_err(|e| Error::Handshake(HandshakeError::Refused(e)))
    }

    /// `NBD_OPT_INFO`, with the server's refusal as a value.
    pub async fn try_info(&mut self, export: &str) -> Result<Result<ExportInfo, ServerOptionError>> {
        match self.option(|s| s.opt_info(export)).await? {
            Stop::Option(OptionOutcome::Info(i)) => Ok(Ok(i)),
            Stop::Option(OptionOutcome::Refused(e)) => Ok(Err(e)),
            _ => Err(Error::disconnected(
                "the server ended negotiation without answering NBD_OPT_INFO",
            )),
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` (no queries: every context).
    pub async fn list_meta_contexts(&mut self, export: &str, queries: &[&str]) -> Result<Vec<MetaContext>> {
        let what = "the server ended negotiation without answering a meta context option";
        match self.outcome(what, |s| s.opt_list_meta_context(export, queries)).await? {
            OptionOutcome::MetaContexts(c) => Ok(c),
            _ => Ok(Vec::new()),
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT`.
    pub async fn set_meta_contexts(&mut self, export: &str, queries: &[&str]) -> Result<Vec<MetaContext>> {
        let what = "the server ended negotiation without answering a meta context option";
        match self.outcome(what, |s| s.opt_set_meta_context(export, queries)).await? {
            OptionOutcome::MetaContexts(c) => Ok(c),
            _ => Ok(Vec::new()),
        }
    }

    /// `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` if the server
    /// does not know GO): enter transmission and make the client.
    pub async fn go(mut self, export: &str) -> Result<R::Client> {
        if !self.done {
            match self.option(|s| s.opt_go(Some(export))).await? {
                Stop::Connected => {}
                stop => return Err(go_refused(stop)),
            }
        }
        R::client(self.session, self.conn, self.timeouts)
    }

    /// `NBD_OPT_ABORT`, then close. The spec lets the server close the
    /// connection without replying (nbd-server even resets it), so that
    /// is success too.
    pub async fn abort(mut self) -> Result<()> {
        if self.done {
            // Oldstyle or EXPORT_NAME-only: a hard close is all there is.
            return Ok(());
        }
        match self.option(|s| s.opt_abort()).await {
            Ok(_) | Err(Error::Disconnected(_)) => Ok(()),
            Err(Error::Io(e)) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Wakes the thread that runs [`block_on`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to its end on this thread: the blocking client's
/// executor (its transport blocks in its socket calls, so its futures are
/// ready when first polled; any other future works too, parking the
/// thread until it is woken).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_on_runs_ready_and_woken_futures() {
        assert_eq!(block_on(async { 7 }), 7);
        // A future that is woken from another thread.
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        let mut polled = false;
        let fut = std::future::poll_fn(move |cx| {
            if polled {
                return Poll::Ready(42);
            }
            polled = true;
            tx.send(cx.waker().clone()).unwrap();
            Poll::Pending
        });
        let waker = std::thread::spawn(move || rx.recv().unwrap().wake());
        assert_eq!(block_on(fut), 42);
        waker.join().unwrap();
    }
}
