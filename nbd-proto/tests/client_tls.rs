//! The client machine's TLS rules ("TLS support", "Client-side
//! requirements" and "Protocol downgrade attacks" in the spec): STARTTLS
//! first when TLS is wanted, never without fixed newstyle, never twice;
//! a client that requires TLS stops when it is refused; one that merely
//! allows it goes on in clear; the machine stops right after the ACK
//! (nothing over-read), and everything it negotiates comes after TLS.

use nbd_proto::client::*;
use nbd_proto::wire::*;
use zerocopy::IntoBytes;

fn greeting(flags: HandshakeFlags) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&NBDMAGIC.to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&flags.bits().to_be_bytes());
    v
}

fn reply(option: OptionType, reply: ReplyType, data: &[u8]) -> Vec<u8> {
    let h = OptionReplyHeader {
        magic: OPTION_REPLY_MAGIC.into(),
        option: option.0.into(),
        reply_type: reply.0.into(),
        length: (data.len() as u32).into(),
    };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

/// GO's replies: INFO_EXPORT then ACK.
fn go_ok() -> Vec<u8> {
    let info = InfoExport {
        info_type: InfoType::EXPORT.0.into(),
        size: (1u64 << 20).into(),
        flags: TransmissionFlags::HAS_FLAGS.bits().into(),
    };
    let mut v = reply(OptionType::GO, ReplyType::INFO, info.as_bytes());
    v.extend(reply(OptionType::GO, ReplyType::ACK, &[]));
    v
}

#[derive(Debug)]
enum End {
    StartTls,
    Done(Box<Negotiated>),
    Failed(HandshakeError),
    /// The machine wants more than the script has.
    Starved,
}

/// A client handshake fed from a scripted server.
struct Scripted {
    hs: ClientHandshake,
    server: Vec<u8>,
    pos: usize,
    sent: Vec<u8>,
}

impl Scripted {
    fn new(config: ClientConfig, server: Vec<u8>) -> Scripted {
        Scripted {
            hs: ClientHandshake::new(config),
            server,
            pos: 0,
            sent: Vec::new(),
        }
    }

    /// Runs until the machine stops on its own.
    fn run(&mut self) -> End {
        loop {
            match self.hs.step() {
                HandshakeStep::Send(b) => {
                    self.sent.extend_from_slice(b);
                    self.hs.sent();
                }
                HandshakeStep::Receive(n) => {
                    if self.pos + n > self.server.len() {
                        return End::Starved;
                    }
                    let r = self.hs.received(&self.server[self.pos..self.pos + n]);
                    self.pos += n;
                    if let Err(e) = r {
                        return End::Failed(e);
                    }
                }
                HandshakeStep::StartTls => return End::StartTls,
                HandshakeStep::Done => {
                    let hs = std::mem::replace(&mut self.hs, ClientHandshake::new(ClientConfig::default()));
                    return match hs.finish() {
                        Ok(n) => End::Done(Box::new(n)),
                        Err(e) => End::Failed(e),
                    };
                }
                other => panic!("unexpected step {other:?}"),
            }
        }
    }

    /// The options the client sent, in order (after its 4-byte flags).
    fn options(&self) -> Vec<OptionType> {
        let mut out = Vec::new();
        let mut p = 4;
        while p + 16 <= self.sent.len() {
            assert_eq!(&self.sent[p..p + 8], &IHAVEOPT.to_be_bytes());
            out.push(OptionType(u32::from_be_bytes(
                self.sent[p + 8..p + 12].try_into().unwrap(),
            )));
            let len = u32::from_be_bytes(self.sent[p + 12..p + 16].try_into().unwrap()) as usize;
            p += 16 + len;
        }
        out
    }
}

fn config(tls: TlsMode) -> ClientConfig {
    ClientConfig::default().tls(tls).meta_contexts(Vec::new())
}

#[test]
fn tls_off_never_asks_for_starttls() {
    let mut server = greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
    server.extend(reply(OptionType::EXTENDED_HEADERS, ReplyType::ACK, &[]));
    server.extend(go_ok());
    let mut s = Scripted::new(config(TlsMode::Off), server);
    let End::Done(n) = s.run() else { panic!("not done") };
    assert!(!n.tls);
    assert!(!s.options().contains(&OptionType::STARTTLS));
}

#[test]
fn starttls_is_the_first_option_and_nothing_is_over_read() {
    for mode in [TlsMode::Allow, TlsMode::Require] {
        let mut server = greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
        server.extend(reply(OptionType::STARTTLS, ReplyType::ACK, &[]));
        // Bytes after the ACK belong to TLS: the machine must not touch them.
        let ack_end = server.len();
        server.extend_from_slice(&[0x16, 3, 3, 0, 0]);
        let mut s = Scripted::new(config(mode), server);
        assert!(matches!(s.run(), End::StartTls));
        assert_eq!(s.pos, ack_end, "read past the ACK");
        assert_eq!(s.options(), vec![OptionType::STARTTLS], "STARTTLS comes first, alone");
        assert!(!s.hs.tls());
        // Until the driver says TLS runs, nothing moves.
        assert_eq!(s.hs.step(), HandshakeStep::StartTls);
    }
}

#[test]
fn after_tls_negotiation_starts_over_and_starttls_is_not_repeated() {
    let mut server = greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
    server.extend(reply(OptionType::STARTTLS, ReplyType::ACK, &[]));
    let mut s = Scripted::new(config(TlsMode::Require), server);
    assert!(matches!(s.run(), End::StartTls));
    s.hs.tls_established().unwrap();
    assert!(s.hs.tls());
    // A second tls_established is misuse.
    assert!(matches!(s.hs.tls_established(), Err(HandshakeError::Misuse(_))));
    // Over "TLS" the rest of the handshake.
    s.server
        .extend(reply(OptionType::EXTENDED_HEADERS, ReplyType::ACK, &[]));
    s.server.extend(go_ok());
    let End::Done(n) = s.run() else { panic!("not done") };
    assert!(n.tls);
    assert_eq!(n.mode, Mode::Extended);
    assert_eq!(
        s.options(),
        vec![OptionType::STARTTLS, OptionType::EXTENDED_HEADERS, OptionType::GO],
        "STARTTLS only once"
    );
}

#[test]
fn option_mode_negotiates_over_tls_before_handing_over() {
    // Option mode: STARTTLS still comes first, and the automatic options
    // (structured replies here) are asked over TLS before the caller gets
    // control, so nothing the caller sees was negotiated in clear.
    let mut server = greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
    server.extend(reply(OptionType::STARTTLS, ReplyType::ACK, &[]));
    let mut c = config(TlsMode::Allow);
    c.opt_mode = true;
    c.extended_headers = false;
    let mut s = Scripted::new(c, server);
    assert!(matches!(s.run(), End::StartTls));
    s.hs.tls_established().unwrap();
    // After TLS the automatic part asks for structured replies again.
    s.server
        .extend(reply(OptionType::STRUCTURED_REPLY, ReplyType::ACK, &[]));
    loop {
        match s.hs.step() {
            HandshakeStep::Send(b) => {
                s.sent.extend_from_slice(b);
                s.hs.sent();
            }
            HandshakeStep::Receive(n) => {
                s.hs.received(&s.server[s.pos..s.pos + n]).unwrap();
                s.pos += n;
            }
            HandshakeStep::Negotiating => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(s.hs.structured_replies());
    assert_eq!(s.options(), vec![OptionType::STARTTLS, OptionType::STRUCTURED_REPLY]);
}

#[test]
fn required_tls_refused_stops_the_client() {
    for refusal in [ReplyType::ERR_POLICY, ReplyType::ERR_UNSUP, ReplyType::ERR_INVALID] {
        let mut server = greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
        server.extend(reply(OptionType::STARTTLS, refusal, b"no TLS here"));
        let mut s = Scripted::new(config(TlsMode::Require), server);
        match s.run() {
            End::Failed(HandshakeError::TlsUnavailable(m)) => assert_eq!(m, "no TLS here"),
            other => panic!("{refusal:?}: {other:?}"),
        }
        assert_eq!(
            s.options(),
            vec![OptionType::STARTTLS],
            "nothing sent in clear after the refusal"
        );
    }
}

#[test]
fn allowed_tls_refused_goes_on_in_clear() {
    let mut server = greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
    server.extend(reply(OptionType::STARTTLS, ReplyType::ERR_POLICY, &[]));
    server.extend(reply(OptionType::EXTENDED_HEADERS, ReplyType::ACK, &[]));
    server.extend(go_ok());
    let mut s = Scripted::new(config(TlsMode::Allow), server);
    let End::Done(n) = s.run() else { panic!("not done") };
    assert!(!n.tls);
    assert_eq!(
        s.options(),
        vec![OptionType::STARTTLS, OptionType::EXTENDED_HEADERS, OptionType::GO]
    );
}

#[test]
fn required_tls_needs_fixed_newstyle() {
    // Newstyle without the fixed flag: STARTTLS must not be sent.
    let server = greeting(HandshakeFlags::empty());
    let mut s = Scripted::new(config(TlsMode::Require), server);
    assert!(matches!(s.run(), End::Failed(HandshakeError::TlsNeedsFixedNewstyle)));
    assert!(!s.options().contains(&OptionType::STARTTLS));
    // Oldstyle: the same.
    let mut old = Vec::new();
    old.extend_from_slice(&NBDMAGIC.to_be_bytes());
    old.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
    old.extend_from_slice(&(1u64 << 20).to_be_bytes());
    old.extend_from_slice(&(TransmissionFlags::HAS_FLAGS.bits() as u32).to_be_bytes());
    old.extend_from_slice(&[0u8; 124]);
    let mut s = Scripted::new(config(TlsMode::Require), old);
    assert!(matches!(s.run(), End::Failed(HandshakeError::TlsNeedsFixedNewstyle)));
    assert!(s.sent.is_empty());
}

#[test]
fn starttls_ack_with_data_is_a_violation() {
    let mut server = greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
    server.extend(reply(OptionType::STARTTLS, ReplyType::ACK, b"x"));
    let mut s = Scripted::new(config(TlsMode::Require), server);
    assert!(matches!(s.run(), End::Failed(HandshakeError::Violation(_))));
}

#[test]
fn tls_required_by_the_server_is_reported() {
    // A client without TLS meets a FORCEDTLS server.
    let mut server = greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
    server.extend(reply(
        OptionType::EXTENDED_HEADERS,
        ReplyType::ERR_TLS_REQD,
        b"TLS first",
    ));
    let mut s = Scripted::new(config(TlsMode::Off), server);
    match s.run() {
        End::Failed(e @ HandshakeError::TlsRequired(_)) => assert!(e.to_string().contains("requires TLS")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tls_established_without_starttls_is_misuse() {
    let mut hs = ClientHandshake::new(config(TlsMode::Require));
    assert!(matches!(hs.tls_established(), Err(HandshakeError::Misuse(_))));
}
