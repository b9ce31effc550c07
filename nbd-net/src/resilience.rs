//! Deadlines and reconnection, as both client runtimes apply them: what a
//! caller configures ([`Timeouts`], [`Reconnect`], together
//! [`ConnectOptions`]), what the runtimes count ([`Stats`]), and the
//! checks they share (is an error worth reconnecting over, is the export
//! after a reconnect the one before, how long to wait between attempts).
//!
//! # Defaults: no deadlines, no reconnection
//!
//! As in libnbd, a client waits as long as the server takes unless the
//! caller sets a deadline, and a broken connection fails what was in
//! flight unless the caller asks for reconnection. A library cannot know
//! what its caller calls slow: a FLUSH of gigabytes of dirty cache, or a
//! WRITE_ZEROES of a gigabyte on a server that writes the zeroes, can take
//! minutes on a healthy server; a deadline it did not ask for would turn
//! that into an error. The command-line tools set their own defaults
//! (see their `--timeout`).
//!
//! # What is sent again after a reconnect
//!
//! Requests that were in flight when the connection broke (sent or not;
//! their replies lost) are sent again, once the new connection has
//! negotiated the same export (same size, transmission flags, protocol
//! flavour, block-size constraints and metadata contexts). The client
//! cannot know whether the server carried out a request whose reply it
//! lost, so every request it resends must be one that is harmless to
//! carry out twice. At block level every request the clients make is:
//!
//! - READ, BLOCK_STATUS and CACHE change nothing; sending them twice gives
//!   the answer of the second.
//! - WRITE, WRITE_ZEROES and TRIM are idempotent: the same bytes at the
//!   same offset, sent twice, leave the export as sent once. (A request
//!   from this client that overlaps another in flight at the same time
//!   has no defined order in NBD to begin with.) After a TRIM is sent
//!   again the range reads as zeroes or as it did, exactly as after the
//!   first.
//! - FLUSH is sent again too (see below for what its acknowledgement on
//!   the new connection is worth).
//! - `NBD_CMD_DISC` is never sent again: a client that was disconnecting
//!   when the connection broke is simply closed.
//!
//! What is **not** safe, and what the clients do not promise:
//!
//! - *A server that is slow, not dead.* When a request deadline expires
//!   the client gives up on the connection, but the server may still be
//!   working through what it received on it. The resent request can be
//!   answered first, the caller can go on to write the same range again,
//!   and the old copy of the first request can land afterwards, on top.
//!   Resending is only as safe as the server is dead: with a request
//!   deadline *and* reconnection, choose a deadline far beyond anything
//!   a healthy server takes (or none, and let the server's death be seen
//!   as the end of its connection).
//! - *Writes of other clients.* Sent again after a reconnect, a WRITE can
//!   overwrite what another client (or another connection of the same
//!   pool, which did not break) wrote to the same range meanwhile. NBD
//!   gives concurrent writers to one range no order, and reconnection
//!   does not add one.
//! - *A server with another export behind the same name.* The checks
//!   above (size, flags, contexts) catch a different image only when it
//!   looks different: a server restarted on another file of the same size
//!   is written to. The client cannot tell.
//!
//! # What a FLUSH acknowledged before the break guarantees
//!
//! Everything it promised: every write that completed before that FLUSH
//! was sent is on stable storage, and survives the death of the server
//! and of its machine. A write that was acknowledged but not yet covered
//! by an acknowledged FLUSH (and not sent with FUA) may be lost if the
//! server dies, as a disk loses its volatile cache when it loses power;
//! the client does not keep it and does not send it again.
//!
//! A FLUSH that was *in flight* at the break, and is acknowledged on the
//! new connection, guarantees less than it seems to: it covers what the
//! restarted server still has. A server process that was killed and
//! restarted on the same machine has handed its acknowledged writes to
//! the kernel, which keeps them, and the new FLUSH makes them durable;
//! a server whose machine crashed has lost them, and the new FLUSH
//! cannot bring them back. A caller that must know compares the
//! reconnect count of [`Stats`] when its writes were acknowledged with the
//! count when its FLUSH was: if they differ, the FLUSH vouches only for
//! what the restarted server kept.
//!
//! Protocol violations by the server are not reconnected over: the
//! connection is closed and requests fail, as QEMU does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nbd_proto::client::{ClientConfig, Negotiated};

use crate::client::Error;
pub use crate::client::Phase;
use crate::tls::LazyClientTls;

/// Deadlines of a client (each `None`, the default, waits forever).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// Opening the socket (each attempt: every address of a TCP host
    /// shares it).
    pub connect: Option<Duration>,
    /// The handshake, from the server's greeting to transmission (in
    /// option mode, each option).
    pub handshake: Option<Duration>,
    /// Each request, from the moment it is sent (again from its
    /// resending, after a reconnect) to its reply. The session decides it
    /// (`nbd_proto::time`); the runtimes tell it the time. When a
    /// request's deadline expires the connection is deemed broken: it is
    /// closed, and every request in flight fails with
    /// [`Error::TimedOut`] (or, with [`Reconnect`], the client reconnects
    /// and sends them again).
    pub request: Option<Duration>,
}

impl Timeouts {
    /// The same deadline for connecting, the handshake and each request.
    pub fn all(t: Duration) -> Timeouts {
        Timeouts {
            connect: Some(t),
            handshake: Some(t),
            request: Some(t),
        }
    }

    /// Sets the deadline of opening the socket.
    pub const fn connect(mut self, v: Option<Duration>) -> Self {
        self.connect = v;
        self
    }

    /// Sets the deadline of the handshake.
    pub const fn handshake(mut self, v: Option<Duration>) -> Self {
        self.handshake = v;
        self
    }

    /// Sets the deadline of each request.
    pub const fn request(mut self, v: Option<Duration>) -> Self {
        self.request = v;
        self
    }

    /// `config` with the deadlines its session decides (the handshake's
    /// and each request's; see `nbd_proto::time`), the handshake's no
    /// longer than `cap` (what is left of a reconnect delay).
    pub fn session_config(&self, config: ClientConfig, cap: Option<Duration>) -> ClientConfig {
        let handshake = match (self.handshake, cap) {
            (Some(t), Some(cap)) => Some(t.min(cap)),
            (t, cap) => t.or(cap),
        };
        config.handshake_timeout(handshake).request_timeout(self.request)
    }
}

/// Reconnection after a broken connection (QEMU's `reconnect-delay`).
///
/// When the transport breaks (a socket error, the server's end of the
/// connection, an expired request deadline) or the server refuses a
/// request with `NBD_ESHUTDOWN` (as a server being stopped for a restart
/// does), the client reconnects in the background, trying again after `initial_backoff`, then after twice as
/// long each time up to `max_backoff`, for up to `delay` from the break.
/// Requests wait meanwhile, both those in flight (sent again once
/// connected, see the [module docs](self)) and new ones. Once `delay` has
/// passed without a connection to the same export, every outstanding and
/// every later request fails with [`Error::ReconnectFailed`], and the
/// client stays closed (unlike QEMU, it does not go on trying: a new
/// client tries again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// How long requests wait for a new connection.
    pub delay: Duration,
    /// The wait before the second attempt (the first is made at once).
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
}

impl Reconnect {
    /// Reconnect for up to `delay`, first after 25 ms, then doubling up
    /// to 1 s between attempts (a restarted server is back soon, and a
    /// client that asks once a second costs nothing).
    pub fn within(delay: Duration) -> Reconnect {
        Reconnect {
            delay,
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// How a client connects, beyond what `ClientConfig` negotiates.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Reconnection (only for clients that connect from a URI: one made
    /// over a socket of the caller's cannot dial again).
    pub reconnect: Option<Reconnect>,
    /// TLS credentials; `None`: those the URI names.
    pub tls: Option<LazyClientTls>,
}

/// Chainable setters, one per field (the struct is `#[non_exhaustive]`:
/// other crates build it from [`ConnectOptions::default`]).
impl ConnectOptions {
    /// Sets the deadlines.
    pub fn timeouts(mut self, v: Timeouts) -> Self {
        self.timeouts = v;
        self
    }

    /// Sets the reconnection policy (`None`: none).
    pub fn reconnect(mut self, v: Option<Reconnect>) -> Self {
        self.reconnect = v;
        self
    }

    /// Sets the TLS credentials (`None`: those the URI names).
    pub fn tls(mut self, v: Option<LazyClientTls>) -> Self {
        self.tls = v;
        self
    }
}

/// Counters of a client's connection (shared by its clones).
#[derive(Debug, Default)]
pub struct Stats {
    disconnects: AtomicU64,
    reconnects: AtomicU64,
    resent: AtomicU64,
    timeouts: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections that broke (and were reconnected over, or not).
    pub disconnects: u64,
    /// Connections re-established after a break.
    pub reconnects: u64,
    /// Requests sent again on a new connection.
    pub resent: u64,
    /// Deadlines that expired.
    pub timeouts: u64,
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            disconnects: self.disconnects.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
        }
    }

    /// A connection broke.
    pub fn disconnected(&self) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was re-established, and `resent` requests sent again.
    pub fn reconnected(&self, resent: u64) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        self.resent.fetch_add(resent, Ordering::Relaxed);
    }

    /// A deadline expired.
    pub fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::ops::Add for StatsSnapshot {
    type Output = StatsSnapshot;
    fn add(self, o: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            disconnects: self.disconnects + o.disconnects,
            reconnects: self.reconnects + o.reconnects,
            resent: self.resent + o.resent,
            timeouts: self.timeouts + o.timeouts,
        }
    }
}

/// Whether a connection that ended on `e` is worth reconnecting over: the
/// transport broke (a socket error, the server's end of the connection, a
/// deadline), not a rule (a protocol violation, a handshake refusal, a
/// misuse).
pub fn transport_failure(e: &Error) -> bool {
    matches!(
        e,
        Error::Io(_) | Error::Disconnected(_) | Error::TimedOut { .. } | Error::TlsHandshake(_)
    )
}

/// Checks that a new connection negotiated the export the client had:
/// the same size, transmission flags, protocol flavour, block-size
/// constraints and metadata contexts (by name; their ids may change, see
/// [`context_ids`]). The export name is the same by construction.
pub fn same_export(old: &Negotiated, new: &Negotiated) -> Result<(), Error> {
    let differ = |what: String| Err(Error::ExportChanged(what.into()));
    if old.size != new.size {
        return differ(format!("the export's size was {} and is {}", old.size, new.size));
    }
    if old.flags != new.flags {
        return differ(format!(
            "the export's flags were {:#x} and are {:#x}",
            old.flags.bits(),
            new.flags.bits()
        ));
    }
    if old.mode != new.mode {
        return differ(format!(
            "the protocol was {:?} and is {:?} (structured replies or extended headers changed)",
            old.mode, new.mode
        ));
    }
    if old.block_size != new.block_size {
        return differ(format!(
            "the block sizes were {:?} and are {:?}",
            old.block_size, new.block_size
        ));
    }
    let names = |n: &Negotiated| {
        let mut v: Vec<String> = n.contexts.iter().map(|c| c.name.clone()).collect();
        v.sort();
        v
    };
    if names(old) != names(new) {
        return differ(format!(
            "the metadata contexts were {:?} and are {:?}",
            names(old),
            names(new)
        ));
    }
    Ok(())
}

/// For each context of `new` whose id differs from the same context's in
/// `old`: (new id, old id). A client translates block status of the new
/// connection back to the ids its caller knows.
pub fn context_ids(old: &Negotiated, new: &Negotiated) -> Vec<(u32, u32)> {
    new.contexts
        .iter()
        .filter_map(|c| {
            let before = old.context_id(&c.name)?;
            (before != c.id).then_some((c.id, before))
        })
        .collect()
}

/// The waits between reconnection attempts, bounded by the deadline.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    /// When the client gives up.
    pub deadline: Instant,
    /// The error of the last attempt (or of the break).
    pub last: Arc<str>,
}

impl Backoff {
    /// Attempts for `policy`, from a break at `since` on error `why`.
    pub fn new(policy: &Reconnect, since: Instant, why: Arc<str>) -> Backoff {
        Backoff {
            next: policy.initial_backoff,
            max: policy.max_backoff.max(policy.initial_backoff),
            deadline: since + policy.delay,
            last: why,
        }
    }

    /// How long until the deadline (zero once passed).
    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The wait before the next attempt (never past the deadline), and
    /// doubles the one after it.
    pub fn wait(&mut self) -> Duration {
        let w = self.next.min(self.left());
        self.next = (self.next * 2).min(self.max);
        w
    }

    /// The error every request gets once the deadline has passed.
    pub fn give_up(&self, delay: Duration) -> Error {
        Error::ReconnectFailed {
            delay,
            last: self.last.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_never_past_the_deadline() {
        let policy = Reconnect {
            delay: Duration::from_secs(3600),
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(150),
        };
        let mut b = Backoff::new(&policy, Instant::now(), "broke".into());
        let waits: Vec<u128> = (0..5).map(|_| b.wait().as_millis()).collect();
        assert_eq!(waits, [25, 50, 100, 150, 150]);

        let short = Reconnect::within(Duration::from_millis(10));
        let mut b = Backoff::new(&short, Instant::now(), "broke".into());
        assert!(b.wait() <= Duration::from_millis(10));
        let e = b.give_up(short.delay);
        assert!(matches!(&e, Error::ReconnectFailed { delay, last } if *delay == short.delay && &**last == "broke"));
    }

    #[test]
    fn the_handshake_deadline_is_the_earlier_of_its_own_and_the_cap() {
        let secs = |n| Some(Duration::from_secs(n));
        let c = |t: Timeouts, cap| t.session_config(ClientConfig::default(), cap);
        let none = Timeouts::default();
        assert_eq!(c(none, None).handshake_timeout, None);
        assert_eq!(c(none, secs(5)).handshake_timeout, secs(5));
        assert_eq!(c(none.handshake(secs(60)), secs(5)).handshake_timeout, secs(5));
        assert_eq!(c(none.handshake(secs(1)), secs(5)).handshake_timeout, secs(1));
        let all = c(Timeouts::all(Duration::from_secs(7)), None);
        assert_eq!((all.handshake_timeout, all.request_timeout), (secs(7), secs(7)));
    }
}
