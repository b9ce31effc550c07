//! What both client runtimes share around `nbd_proto`'s
//! [`ClientSession`]: the one error type ([`Error`]) and the errors
//! requests get when a connection ends ([`in_flight_error`],
//! [`request_error`], [`reason`]), the TLS credentials a URI names
//! ([`uri_tls`]; its configuration is [`NbdUri::client_config`]), and
//! small helpers of transmission ([`add_block_status`], [`data_range`],
//! [`split_len`], [`IDLE_READ`]).
//!
//! Transmission's receive side has no layer here: each runtime drives the
//! session itself (`need`, `feed`, `data_received`) and handles each
//! [`ClientEvent`](nbd_proto::client::ClientEvent) in one `match`,
//! reading READ data straight into the request's buffer.
//!
//! Everything here is free of I/O: a runtime reads and writes its socket
//! (blocking, or async) where these functions say, and nothing else. The
//! handshake, option mode and (re)dialing are [`crate::negotiate`]'s.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use nbd_proto::client::{
    ClientSession, ClientSessionError, Extent, Extents, HandshakeError, ReplyViolation, RequestError, ServerError,
};
use nbd_proto::common::MetaContext;
use nbd_proto::time::Deadline;
use nbd_proto::uri::{NbdUri, UriError};
use nbd_proto::wire::{BlockSizeConstraints, DEFAULT_MAX_PAYLOAD};

use crate::tls::{LazyClientTls, TlsError};

/// Linux's (and most Unixes') ETIMEDOUT.
const ETIMEDOUT: i32 = 110;

/// Everything that can go wrong for a client, in both runtimes.
///
/// A rule broken by the server is a value ([`Error::Protocol`] in
/// transmission, [`HandshakeError::Violation`] in the handshake), distinct
/// from the server's answer to a request ([`Error::Server`]) and from a
/// request refused before it reached the wire ([`Error::Request`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The URI is not valid.
    #[error("invalid NBD URI: {0}")]
    Uri(#[from] UriError),
    /// The handshake failed (a violation by the server, a refusal the
    /// client cannot do without, TLS unavailable, ...).
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    /// The request was refused before reaching the wire (read-only
    /// export, not advertised, out of range, unaligned, too large, ...).
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The server broke a rule of transmission; the connection is closed
    /// and every request in flight on it failed with this.
    #[error("protocol violation by server: {0}")]
    Protocol(#[from] ReplyViolation),
    /// The server answered the request with an error.
    #[error("{0}")]
    Server(#[from] ServerError),
    /// The connection is gone (the server closed it, or an earlier error
    /// or the client's `NBD_CMD_DISC` ended it): the request was not sent,
    /// or its reply never came. The text says why.
    #[error("disconnected: {0}")]
    Disconnected(Arc<str>),
    /// The TLS credentials could not be set up (a certificate file is
    /// missing or unreadable, an unsupported `tls-type`, ...).
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (the server's
    /// certificate did not verify, the server refused ours, ...); the
    /// connection is closed, as the spec requires.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    /// A bug in the client runtime: it drove the session out of order.
    #[error("client misuse: {0}")]
    Misuse(&'static str),
    /// A deadline of `Timeouts` expired:
    /// the connection was closed (a request's deadline fails every
    /// request in flight with it).
    #[error("timed out after {after:?} {phase}")]
    TimedOut {
        /// Which deadline.
        phase: Phase,
        /// How long it was.
        after: Duration,
    },
    /// The connection broke and no connection to the same export was made
    /// within the reconnect delay: every outstanding and every later
    /// request fails with this.
    #[error("the connection was lost and not re-established within {delay:?}: {last}")]
    ReconnectFailed {
        /// The reconnect delay.
        delay: Duration,
        /// The error of the last attempt (or of the break).
        last: Arc<str>,
    },
    /// After a reconnect the server offered a different export (size,
    /// flags, ...): the client gave up rather than write to it.
    #[error("the server offers a different export after reconnecting: {0}")]
    ExportChanged(Arc<str>),
}

/// Which deadline expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Opening the socket.
    Connect,
    /// The handshake.
    Handshake,
    /// A request's reply.
    Request,
}

impl From<Deadline> for Phase {
    fn from(d: Deadline) -> Phase {
        match d {
            Deadline::Handshake => Phase::Handshake,
            _ => Phase::Request,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connecting to the server",
            Phase::Handshake => "waiting for the server in the handshake",
            Phase::Request => "waiting for the server to reply",
        })
    }
}

impl Error {
    /// The errno this error stands for, where it has one: the server's
    /// NBD error (unknown values as EINVAL, as the spec says), the
    /// socket's OS error, or ETIMEDOUT for an expired deadline.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Server(e) => Some(e.code.to_errno()),
            Error::Io(e) | Error::TlsHandshake(e) => crate::socket::os_error(e),
            Error::TimedOut { .. } => Some(ETIMEDOUT),
            _ => None,
        }
    }

    /// Whether this is an expired deadline ([`Error::TimedOut`]).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::TimedOut { .. })
    }

    /// The same error again, for another request that fails for the same
    /// reason (`io::Error` is not `Clone`: its kind, OS error and text are
    /// kept; a server's error is the server's answer to one request and
    /// becomes [`Error::Disconnected`] with its text).
    pub fn duplicate(&self) -> Error {
        let io = |e: &io::Error| match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        };
        match self {
            Error::Io(e) => Error::Io(io(e)),
            Error::TlsHandshake(e) => Error::TlsHandshake(io(e)),
            Error::Uri(e) => Error::Uri(e.clone()),
            Error::Handshake(e) => Error::Handshake(e.clone()),
            Error::Request(e) => Error::Request(e.clone()),
            Error::Protocol(v) => Error::Protocol(v.clone()),
            Error::Disconnected(w) => Error::Disconnected(w.clone()),
            Error::Misuse(m) => Error::Misuse(m),
            Error::TimedOut { phase, after } => Error::TimedOut {
                phase: *phase,
                after: *after,
            },
            Error::ReconnectFailed { delay, last } => Error::ReconnectFailed {
                delay: *delay,
                last: last.clone(),
            },
            Error::ExportChanged(w) => Error::ExportChanged(w.clone()),
            other => Error::Disconnected(other.to_string().into()),
        }
    }

    /// A [`Error::Disconnected`] with this reason.
    pub fn disconnected(why: &str) -> Error {
        Error::Disconnected(why.into())
    }

    /// This error as an `io::Error` (for `std::io` adapters): socket
    /// errors as they are, server errors as their errno, the rest wrapped.
    pub fn into_io(self) -> io::Error {
        match self {
            Error::Io(e) => e,
            e @ Error::TimedOut { .. } => io::Error::new(io::ErrorKind::TimedOut, e),
            Error::Server(s) => io::Error::from_raw_os_error(s.code.to_errno()),
            other => io::Error::other(other),
        }
    }
}

impl From<ClientSessionError> for Error {
    fn from(e: ClientSessionError) -> Error {
        match e {
            ClientSessionError::Handshake(h) => Error::Handshake(h),
            ClientSessionError::Violation(v) => Error::Protocol(v),
            ClientSessionError::Misuse(m) => Error::Misuse(m),
            ClientSessionError::TimedOut(t) => Error::TimedOut {
                phase: t.deadline.into(),
                after: t.after,
            },
            _ => Error::disconnected("the session is closed"),
        }
    }
}

/// The error of a session whose deadline passed ([`Error::TimedOut`]),
/// if one did.
pub fn timed_out(session: &ClientSession) -> Option<Error> {
    match session.error() {
        Some(e @ ClientSessionError::TimedOut(_)) => Some(e.clone().into()),
        _ => None,
    }
}

/// Result alias for the clients.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Block status for one metadata context, as both clients return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// The context's id.
    pub context_id: u32,
    /// The context's name (e.g. `base:allocation`).
    pub context: String,
    /// The extents, from the request's offset on.
    pub extents: Vec<Extent>,
}

/// Adds a block-status chunk to the per-context list a request gathers
/// (a context that sent several chunks gets one entry).
pub fn add_block_status(out: &mut Vec<BlockStatus>, contexts: &[MetaContext], context_id: u32, extents: Extents<'_>) {
    match out.iter_mut().find(|s| s.context_id == context_id) {
        Some(s) => s.extents.extend(extents),
        None => out.push(BlockStatus {
            context_id,
            context: contexts
                .iter()
                .find(|c| c.id == context_id)
                .map(|c| c.name.clone())
                .unwrap_or_default(),
            extents: extents.collect(),
        }),
    }
}

/// The credentials for connecting to `uri`: from its `tls-certificates`,
/// `tls-hostname` and `tls-verify-peer`, read only if the server accepts
/// TLS (see [`LazyClientTls::from_uri`]). The configuration is
/// [`NbdUri::client_config`].
pub fn uri_tls(uri: &NbdUri) -> Result<LazyClientTls> {
    Ok(LazyClientTls::from_uri(uri)?)
}

/// The largest piece a client's `read`/`write` of any length sends as
/// one request: the server's maximum payload, but at most the 32 MiB that
/// every server accepts (a larger advertised maximum would only make the
/// client hold more of a buffer per request), rounded down to the
/// preferred block size so that pieces stay aligned.
pub fn split_len(c: BlockSizeConstraints) -> usize {
    let max = c.maximum.min(DEFAULT_MAX_PAYLOAD) as usize;
    let pref = c.preferred.max(c.minimum).max(1) as usize;
    (max / pref).max(1) * pref
}

/// The range of a request's buffer that READ data (or a hole) of
/// `ClientNeed::Data` (or `ClientEvent::Hole`) covers (`None` if it does
/// not fit, which the session never announces).
pub fn data_range(buf_len: usize, buf_offset: u64, length: u64) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(buf_offset).ok()?;
    let end = start.checked_add(usize::try_from(length).ok()?)?;
    (end <= buf_len).then_some(start..end)
}

/// The error each request in flight gets when the connection ends on
/// `e`: a violation by the server as itself, anything else as
/// [`Error::Disconnected`] with `why`.
pub fn in_flight_error(e: &Error, why: &Arc<str>) -> Error {
    match e {
        Error::Protocol(_) | Error::TimedOut { .. } | Error::ReconnectFailed { .. } | Error::ExportChanged(_) => {
            e.duplicate()
        }
        _ => Error::Disconnected(why.clone()),
    }
}

/// The error for a request the session refused: on a connection that
/// ended ([`RequestError::Failed`]) it is [`Error::Disconnected`] with
/// why it ended.
pub fn request_error(e: RequestError, dead: Option<&Arc<str>>) -> Error {
    match (e, dead) {
        (RequestError::Failed, Some(why)) => Error::Disconnected(why.clone()),
        (RequestError::Failed, None) => Error::disconnected("the connection failed earlier"),
        (RequestError::SessionFailed(why), _) => Error::Disconnected(why.to_string().into()),
        (e, _) => Error::Request(e),
    }
}

/// The shortest reply header there is (a simple reply's): what a runtime
/// with nothing in flight may read to notice that the server closed the
/// connection or broke the rules, without reading past a reply of any
/// kind (the session keeps a partial header).
pub const IDLE_READ: usize = nbd_proto::wire::SIMPLE_REPLY_HEADER_LEN;

/// The reason given to requests when the connection ends on `e`.
pub fn reason(e: &Error) -> Arc<str> {
    match e {
        Error::Disconnected(why) => why.clone(),
        Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => "the server closed the connection".into(),
        e => e.to_string().into(),
    }
}
