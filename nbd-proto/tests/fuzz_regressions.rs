//! Bugs the session fuzzers (`fuzz/`) found, each reproduced by hand.

use nbd_proto::client::{ClientConfig, ClientEvent, ClientNeed, ClientSession, ClientSessionError, Request, TlsMode};
use nbd_proto::server::{
    ExportDetails, ExportListing, ExportLookup, ServerConfig, ServerEvent, ServerNeed, ServerSession, TlsPolicy,
};
use nbd_proto::wire::{Command, TransmissionFlags};

/// One export of 64 KiB whatever the name.
struct One;

impl ExportLookup for One {
    type Export = ();
    fn lookup(&self, name: &str) -> Option<(ExportDetails, ())> {
        let mut d = ExportDetails::new(name, 65536);
        d.flags |= TransmissionFlags::SEND_FLUSH;
        Some((d, ()))
    }
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        each(ExportListing {
            name: "",
            description: "",
            tls_only: false,
        });
    }
}

/// Moves bytes between the two sessions (exact counts, TLS "started" in
/// place) until neither moves; the server answers READs with zeroes and
/// everything else with success. Returns the client's events.
fn exchange(c: &mut ClientSession, s: &mut ServerSession<One>) -> Vec<String> {
    let (mut to_s, mut to_c) = (Vec::new(), Vec::new());
    let mut events = Vec::new();
    for _ in 0..1000 {
        let mut moved = false;
        while c.poll_transmit(&mut to_s).is_some() {
            moved = true;
        }
        while s.poll_transmit(&mut to_c).is_some() {
            moved = true;
        }
        if let ServerNeed::StartTls(t) = s.need() {
            t.established().unwrap();
            moved = true;
        }
        if let ServerNeed::Bytes(n) = s.need()
            && n > 0
            && to_s.len() >= n
        {
            let unit: Vec<u8> = to_s.drain(..n).collect();
            let mut rest: &[u8] = &unit;
            loop {
                let (k, ev) = s.feed(rest).unwrap();
                rest = &rest[k..];
                match ev {
                    Some(ServerEvent::Request(r)) => {
                        let enc = s.encoder().unwrap();
                        if r.command == Command::READ && r.length > 0 {
                            to_c.extend_from_slice(enc.read_reply_header(&r).unwrap().as_bytes());
                            to_c.resize(to_c.len() + r.length as usize, 0);
                        } else {
                            to_c.extend_from_slice(enc.reply_ok(&r).as_bytes());
                        }
                    }
                    Some(_) => {}
                    None if k == 0 => break,
                    None => {}
                }
            }
            moved = true;
        }
        match c.need() {
            ClientNeed::Bytes(n) if n > 0 && to_c.len() >= n => {
                let unit: Vec<u8> = to_c.drain(..n).collect();
                let (k, ev) = c.feed(&unit).unwrap();
                assert_eq!(k, n);
                if let Some(ev) = ev {
                    events.push(format!("{ev:?}"));
                }
                moved = true;
            }
            ClientNeed::Pending => {
                let (_, ev) = c.feed(&[]).unwrap();
                events.push(format!("{:?}", ev.expect("an event")));
                moved = true;
            }
            ClientNeed::Data { length, .. } => {
                assert!(length > 0, "READ data of length 0 announced");
                if to_c.len() as u64 >= length {
                    to_c.drain(..length as usize);
                    if let Some(ev) = c.data_received(length).unwrap() {
                        events.push(format!("{ev:?}"));
                    }
                    moved = true;
                }
            }
            _ => {}
        }
        if !moved {
            return events;
        }
    }
    panic!("the exchange does not settle");
}

/// A READ of length 0 (sent by a client that is not strict, as the spec
/// only says SHOULD NOT) got a simple reply: the client announced zero
/// bytes of READ data and waited for them forever. It completes now.
#[test]
fn zero_length_read_in_simple_mode_completes() {
    let cfg = ClientConfig::default()
        .structured_replies(false)
        .extended_headers(false)
        .strict(false);
    let mut c = ClientSession::new(cfg);
    let mut s = ServerSession::new(ServerConfig::default(), One);
    let events = exchange(&mut c, &mut s);
    assert!(events.iter().any(|e| e.contains("Connected")), "{events:?}");
    let cookie = c.start_request(Request::new(Command::READ, 0, 0)).unwrap();
    let events = exchange(&mut c, &mut s);
    assert!(
        events
            .iter()
            .any(|e| e.contains("Done") && e.contains(&format!("{cookie:?}"))),
        "the READ of length 0 completes: {events:?}"
    );
    assert_eq!(c.in_flight(), 0);
    assert!(matches!(c.need(), ClientNeed::Idle));
}

/// An option the handshake machine refuses (a name with a NUL, a name too
/// long) is reported as misuse and changes nothing: option mode goes on.
/// (A refused `opt_go` used to keep the name it was given, so that the
/// next `opt_go(None)` failed too.)
#[test]
fn refused_option_call_is_misuse_and_changes_nothing() {
    let cfg = ClientConfig::default().opt_mode(true);
    let mut c = ClientSession::new(cfg);
    let mut s = ServerSession::new(ServerConfig::default(), One);
    exchange(&mut c, &mut s);
    assert!(matches!(c.need(), ClientNeed::Negotiating));
    assert!(matches!(c.opt_info("a\0b"), Err(ClientSessionError::Misuse(_))));
    assert!(matches!(
        c.opt_go(Some(&"x".repeat(5000))),
        Err(ClientSessionError::Misuse(_))
    ));
    assert!(matches!(c.need(), ClientNeed::Negotiating), "nothing changed");
    assert!(!c.is_closed());
    c.opt_go(None).unwrap();
    let events = exchange(&mut c, &mut s);
    assert!(events.iter().any(|e| e.contains("Connected")), "{events:?}");
}

/// After STARTTLS the machine could not send the configured export name
/// (too long): the error came back from `established()` but the session
/// stayed open, waiting for nothing. It is closed now.
#[test]
fn failure_after_tls_upgrade_closes_the_session() {
    // Nothing to negotiate after TLS but the export: GO goes at once.
    let cfg = ClientConfig::default()
        .tls(TlsMode::Require)
        .export_name("x".repeat(5000))
        .structured_replies(false)
        .extended_headers(false)
        .meta_contexts(Vec::new());
    let mut c = ClientSession::new(cfg);
    let mut s = ServerSession::new(ServerConfig::default().tls(TlsPolicy::ForcedTls), One);
    let (mut to_s, mut to_c) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        while c.poll_transmit(&mut to_s).is_some() {}
        while s.poll_transmit(&mut to_c).is_some() {}
        if let ServerNeed::StartTls(t) = s.need() {
            t.established().unwrap();
        }
        if let ServerNeed::Bytes(n) = s.need()
            && n > 0
            && to_s.len() >= n
        {
            let unit: Vec<u8> = to_s.drain(..n).collect();
            s.feed(&unit).unwrap();
        }
        match c.need() {
            ClientNeed::StartTls(t) => {
                let r = t.established();
                assert!(r.is_err(), "the name cannot be sent");
                assert!(!matches!(r, Err(ClientSessionError::Misuse(_))), "{r:?}");
                assert!(matches!(c.need(), ClientNeed::Closed), "the session is over");
                assert!(c.is_closed());
                return;
            }
            ClientNeed::Bytes(n) if n > 0 && to_c.len() >= n => {
                let unit: Vec<u8> = to_c.drain(..n).collect();
                let (_, ev) = c.feed(&unit).unwrap();
                assert!(!matches!(ev, Some(ClientEvent::Connected)));
            }
            _ => {}
        }
    }
    panic!("the client never reached STARTTLS");
}
