//! Unit tests of the server session's handshake deadline.

use super::*;
use crate::server::TlsPolicy;
use crate::wire::{ClientFlags, IHAVEOPT, OptionType};
use std::string::ToString;
use std::vec;

const LIMIT: Duration = Duration::from_secs(10);

/// One export of 1 MiB, named "".
struct One;

impl ExportLookup for One {
    type Export = ();
    fn lookup(&self, name: &str) -> Option<(ExportDetails, ())> {
        name.is_empty().then(|| (ExportDetails::new("", 1 << 20), ()))
    }
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        each(ExportListing {
            name: "",
            description: "",
            tls_only: false,
        });
    }
}

fn at(secs: u64, millis: u64) -> Timestamp {
    Timestamp::from_origin(Duration::from_secs(secs) + Duration::from_millis(millis))
}

fn session(config: ServerConfig) -> ServerSession<One> {
    let mut s = ServerSession::new(config, One);
    let mut out = Vec::new();
    assert!(s.poll_transmit(&mut out).is_some(), "the greeting");
    s
}

fn opt(option: OptionType, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.0.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Feeds `input` to its end, returning the events.
fn feed_all(s: &mut ServerSession<One>, mut input: &[u8]) -> Result<Vec<ServerEvent<'static>>, ServerSessionError> {
    let mut events = Vec::new();
    loop {
        let (n, ev) = s.feed(input)?;
        input = &input[n..];
        match ev {
            Some(ServerEvent::Ready) => events.push(ServerEvent::Ready),
            Some(ServerEvent::Aborted) => events.push(ServerEvent::Aborted),
            Some(ev) => panic!("{ev:?}"),
            None if n == 0 => return Ok(events),
            None => {}
        }
    }
}

fn client_flags() -> Vec<u8> {
    (ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
        .bits()
        .to_be_bytes()
        .to_vec()
}

/// NBD_OPT_EXPORT_NAME of the default export: transmission at once.
fn to_transmission(s: &mut ServerSession<One>) {
    let mut input = client_flags();
    input.extend_from_slice(&opt(OptionType::EXPORT_NAME, b""));
    assert_eq!(feed_all(s, &input).unwrap(), vec![ServerEvent::Ready]);
    let mut out = Vec::new();
    assert!(s.poll_transmit(&mut out).is_some(), "the export's details");
}

fn timed_out() -> ServerSessionError {
    ServerSessionError::TimedOut(TimedOut {
        deadline: Deadline::Handshake,
        after: LIMIT,
    })
}

#[test]
fn the_deadline_fires_exactly_at_its_time() {
    let mut s = session(ServerConfig::default().handshake_timeout(Some(LIMIT)));
    s.handle_timeout(at(100, 0));
    assert_eq!(s.poll_timeout(), Some(at(110, 0)));
    // Later calls do not move it.
    s.handle_timeout(at(105, 0));
    assert_eq!(s.poll_timeout(), Some(at(110, 0)));
    assert_eq!(feed_all(&mut s, &client_flags()).unwrap(), vec![]);
    s.handle_timeout(at(109, 999));
    assert_eq!(s.poll_timeout(), Some(at(110, 0)));
    assert!(matches!(s.need(), ServerNeed::Bytes(16)));
    assert!(s.interest().read);
    assert_eq!(s.error(), None);
    s.handle_timeout(at(110, 0));
    assert_eq!(s.error(), Some(&timed_out()));
    assert_eq!(s.poll_timeout(), None);
    assert!(matches!(s.need(), ServerNeed::Closed));
    assert!(!s.interest().read);
    assert!(s.is_closed());
}

#[test]
fn an_expired_deadline_is_the_input_methods_error() {
    let mut s = session(ServerConfig::default().handshake_timeout(Some(LIMIT)));
    s.handle_timeout(at(0, 0));
    s.handle_timeout(at(60, 0));
    let e = s.feed(&client_flags()).unwrap_err();
    assert_eq!(e, timed_out());
    assert_eq!(
        e.to_string(),
        "timed out after 10s waiting for the peer in the handshake"
    );
    // Every later call too, and nothing was consumed.
    assert_eq!(s.feed(&client_flags()), Err(timed_out()));
    assert_eq!(s.discarded(1), Err(timed_out()));
    assert_eq!(s.payload_received(1), Err(timed_out()));
    // Time going on changes nothing.
    s.handle_timeout(at(61, 0));
    assert_eq!(s.feed(&[]), Err(timed_out()));
}

#[test]
fn discarding_option_data_is_bounded() {
    let mut s = session(ServerConfig::default().handshake_timeout(Some(LIMIT)));
    s.handle_timeout(at(0, 0));
    let mut input = client_flags();
    // An unknown option claiming 4 GiB - 1 of data.
    input.extend_from_slice(&IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&0x4242u32.to_be_bytes());
    input.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(feed_all(&mut s, &input).unwrap(), vec![]);
    assert!(matches!(s.need(), ServerNeed::Discard(_)));
    s.discarded(1000).unwrap();
    s.handle_timeout(at(10, 0));
    assert!(matches!(s.need(), ServerNeed::Closed));
    assert_eq!(s.discarded(1000), Err(timed_out()));
}

#[test]
fn no_deadline_before_the_session_learns_the_time() {
    let mut s = session(ServerConfig::default().handshake_timeout(Some(LIMIT)));
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(feed_all(&mut s, &client_flags()).unwrap(), vec![]);
    assert_eq!(s.poll_timeout(), None);
    // It starts when the session first learns the time, not at the origin.
    s.handle_timeout(at(1000, 0));
    assert_eq!(s.poll_timeout(), Some(at(1010, 0)));
    assert!(matches!(s.need(), ServerNeed::Bytes(16)));
}

#[test]
fn no_deadline_without_a_handshake_timeout() {
    let mut s = session(ServerConfig::default().handshake_timeout(None));
    s.handle_timeout(at(0, 0));
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(at(1_000_000, 0));
    assert!(matches!(s.need(), ServerNeed::Bytes(4)));
}

#[test]
fn a_zero_timeout_expires_at_once() {
    let mut s = session(ServerConfig::default().handshake_timeout(Some(Duration::ZERO)));
    s.handle_timeout(at(5, 0));
    assert!(matches!(s.need(), ServerNeed::Closed));
    assert!(matches!(s.feed(&client_flags()), Err(ServerSessionError::TimedOut(_))));
}

#[test]
fn the_deadline_ends_when_transmission_starts() {
    let mut s = session(ServerConfig::default().handshake_timeout(Some(LIMIT)));
    s.handle_timeout(at(0, 0));
    assert_eq!(s.poll_timeout(), Some(at(10, 0)));
    to_transmission(&mut s);
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(at(3600, 0));
    assert_eq!(s.poll_timeout(), None);
    assert!(matches!(s.need(), ServerNeed::Bytes(_)));
    assert!(!s.is_closed());
}

#[test]
fn oldstyle_has_no_handshake_deadline() {
    let mut s = session(ServerConfig::default().oldstyle(true).handshake_timeout(Some(LIMIT)));
    s.handle_timeout(at(0, 0));
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(at(3600, 0));
    assert_eq!(s.feed(&[]).unwrap(), (0, Some(ServerEvent::Ready)));
}

#[test]
fn a_tls_upgrade_in_progress_is_bounded() {
    let mut s = session(
        ServerConfig::default()
            .tls(TlsPolicy::ForcedTls)
            .handshake_timeout(Some(LIMIT)),
    );
    s.handle_timeout(at(0, 0));
    let mut input = client_flags();
    input.extend_from_slice(&opt(OptionType::STARTTLS, b""));
    assert_eq!(feed_all(&mut s, &input).unwrap(), vec![]);
    let mut out = Vec::new();
    assert!(s.poll_transmit(&mut out).is_some(), "the acknowledgement");
    assert!(matches!(s.need(), ServerNeed::StartTls(_)));
    // The driver runs the TLS handshake, waiting for the timer too.
    assert_eq!(s.poll_timeout(), Some(at(10, 0)));
    s.handle_timeout(at(10, 0));
    assert!(matches!(s.need(), ServerNeed::Closed));
    assert!(!s.interest().read);
    assert_eq!(s.feed(&[]), Err(timed_out()));
}

#[test]
fn the_deadline_goes_on_over_tls() {
    let mut s = session(
        ServerConfig::default()
            .tls(TlsPolicy::ForcedTls)
            .handshake_timeout(Some(LIMIT)),
    );
    s.handle_timeout(at(0, 0));
    let mut input = client_flags();
    input.extend_from_slice(&opt(OptionType::STARTTLS, b""));
    assert_eq!(feed_all(&mut s, &input).unwrap(), vec![]);
    let mut out = Vec::new();
    assert!(s.poll_transmit(&mut out).is_some());
    s.handle_timeout(at(4, 0));
    match s.need() {
        ServerNeed::StartTls(t) => t.established().unwrap(),
        n => panic!("{n:?}"),
    }
    // One deadline for the whole handshake: TLS does not restart it.
    assert_eq!(s.poll_timeout(), Some(at(10, 0)));
    s.handle_timeout(at(9, 0));
    assert!(matches!(s.need(), ServerNeed::Bytes(16)));
    s.handle_timeout(at(10, 0));
    assert_eq!(s.feed(&opt(OptionType::EXPORT_NAME, b"")), Err(timed_out()));
}

#[test]
fn a_closed_session_has_no_deadline() {
    let mut s = session(ServerConfig::default().handshake_timeout(Some(LIMIT)));
    s.handle_timeout(at(0, 0));
    s.connection_lost();
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(at(20, 0));
    assert_eq!(s.feed(&[1]), Ok((0, None)));

    let mut s = session(ServerConfig::default().handshake_timeout(Some(LIMIT)));
    s.handle_timeout(at(0, 0));
    let mut input = client_flags();
    input.extend_from_slice(&opt(OptionType::ABORT, b""));
    assert_eq!(feed_all(&mut s, &input).unwrap(), vec![ServerEvent::Aborted]);
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(at(20, 0));
    assert!(matches!(s.need(), ServerNeed::Closed));
    assert_eq!(s.feed(&[]), Ok((0, None)));
}
