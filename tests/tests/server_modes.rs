//! Our clients against our two servers: `nbd-serve` (async, nbd-smol) and
//! `nbd_blocking::server::Server` (a thread per connection, run here in a
//! thread of the test), in every protocol mode; many connections at once,
//! `--max-connections`, and the handshake timeout.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nbd_blocking::client::{Client, Error, Negotiation};
use nbd_blocking::server::{Server as BlockingServer, ServerOptions};
use nbd_proto::client::{ClientConfig, Mode, RequestError};
use nbd_proto::server::ServerConfig;
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{CommandFlags, TransmissionFlags};
use nbd_server::Export;
use nbd_storage::MemoryStorage;
use nbd_tests::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Size of every export here: sparse, and larger than 32 bits so that
/// extended headers have 64-bit lengths to carry.
const SIZE: u64 = 6 * GIB;

/// Starts `nbd-serve --socket SOCKET ARGS...` and waits until it listens.
fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbd-serve");
    let socket_arg = socket.to_str().expect("UTF-8 path").to_owned();
    let mut full = vec!["--socket", socket_arg.as_str()];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket))
}

/// The blocking server, serving one sparse memory export on a Unix socket
/// from a thread of the test; stopped and joined on drop.
struct InThread {
    server: BlockingServer,
    thread: Option<thread::JoinHandle<std::io::Result<()>>>,
    endpoint: Endpoint,
}

impl InThread {
    fn start(dir: &TempDir, options: ServerOptions) -> InThread {
        let socket = dir.socket_path("blocking");
        let listener = UnixListener::bind(&socket).unwrap();
        let storage = Arc::new(MemoryStorage::new(SIZE));
        let server = BlockingServer::new(vec![Export::new("", "in a thread", storage)], options);
        let thread = {
            let server = server.clone();
            Some(thread::spawn(move || server.serve_unix(listener)))
        };
        InThread {
            server,
            thread,
            endpoint: Endpoint::Unix(socket),
        }
    }

    fn uri(&self) -> String {
        self.endpoint.uri("")
    }
}

impl Drop for InThread {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !thread::panicking() {
                r.expect("server thread panicked").expect("server failed");
            }
        }
    }
}

fn client_config(mode: Mode) -> ClientConfig {
    let mut config = ClientConfig::default();
    match mode {
        Mode::Simple | Mode::ExportNameOnly | Mode::Oldstyle => {
            config.structured_replies = false;
            config.extended_headers = false;
        }
        Mode::Structured => config.extended_headers = false,
        Mode::Extended => {}
    }
    config
}

fn connect(uri: &str, config: ClientConfig) -> Client {
    let uri = NbdUri::parse(uri).unwrap();
    Client::connect_uri(&uri, config).unwrap_or_else(|e| panic!("connecting to {uri:?}: {e}"))
}

fn read_back(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    c.read(&mut buf, offset).unwrap();
    buf
}

/// Whether the byte at `offset` is reported as a hole by base:allocation.
fn is_hole(c: &mut Client, offset: u64) -> bool {
    let st = c.block_status(offset, 4096, CommandFlags::REQ_ONE).unwrap();
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!(st[0].context, "base:allocation");
    assert_eq!(st[0].extents.len(), 1, "REQ_ONE gives one extent: {st:?}");
    st[0].extents[0].flags & 1 == 1
}

/// Every command the mode allows, with the data checked after each.
fn exercise(c: &mut Client, what: &str) {
    let mode = c.mode();
    assert_eq!(c.size(), SIZE, "{what}");
    let flags = c.flags();
    for f in [
        TransmissionFlags::SEND_FLUSH,
        TransmissionFlags::SEND_FUA,
        TransmissionFlags::SEND_TRIM,
        TransmissionFlags::SEND_WRITE_ZEROES,
        TransmissionFlags::SEND_CACHE,
    ] {
        assert!(flags.contains(f), "{what}: {f:?} not advertised in {flags:?}");
    }
    assert_eq!(
        flags.contains(TransmissionFlags::SEND_DF),
        mode.structured(),
        "{what}: {flags:?}"
    );

    // Writes and reads, near the start and beyond 4 GiB.
    let data = pattern(256 * 1024, 1);
    for offset in [MIB, 5 * GIB + 4096] {
        c.write(&data, offset).unwrap();
        assert_eq!(read_back(c, offset, data.len()), data, "{what} at {offset}");
    }
    c.write_with(&data[..4096], 2 * MIB, CommandFlags::FUA).unwrap();
    assert_eq!(read_back(c, 2 * MIB, 4096), data[..4096], "{what}");
    c.flush().unwrap();
    c.cache(MIB, 65536).unwrap();

    // Zeroes, with and without NO_HOLE, then trim.
    c.write_zeroes(MIB, 32768, CommandFlags::NO_HOLE).unwrap();
    c.write_zeroes(MIB + 65536, 65536, CommandFlags::empty()).unwrap();
    let back = read_back(c, MIB, data.len());
    assert!(back[..32768].iter().all(|&b| b == 0), "{what}: zeroed with NO_HOLE");
    assert_eq!(back[32768..65536], data[32768..65536], "{what}");
    assert!(back[65536..131072].iter().all(|&b| b == 0), "{what}: zeroed");
    assert_eq!(back[131072..], data[131072..], "{what}");
    // Trim the first 64 KiB past 5 GiB (two whole pages of the memory
    // export, which then reads back zeroes).
    c.trim(5 * GIB, 65536, CommandFlags::empty()).unwrap();
    assert!(read_back(c, 5 * GIB + 4096, 61440).iter().all(|&b| b == 0), "{what}");
    assert_eq!(read_back(c, 5 * GIB + 65536, 4096), data[61440..][..4096], "{what}");

    if mode.structured() {
        assert!(!is_hole(c, MIB + 131072), "{what}: written data is not a hole");
        assert!(is_hole(c, 3 * MIB), "{what}: never written is a hole");
        assert!(is_hole(c, MIB + 65536), "{what}: zeroed without NO_HOLE");
        assert!(is_hole(c, 5 * GIB + 4096), "{what}: trimmed");
        assert!(!is_hole(c, 5 * GIB + 131072), "{what}: written past the trim");
        // The whole export in one request: lengths beyond 32 bits only
        // fit with extended headers; otherwise ask for less.
        let len = if mode.extended() { SIZE } else { u32::MAX as u64 };
        let st = c.block_status(0, len, CommandFlags::empty()).unwrap();
        let total: u64 = st[0].extents.iter().map(|e| e.length).sum();
        assert!(total > 0 && total <= len, "{what}: {total}");
        assert!(st[0].extents[0].flags & 1 == 1, "{what}: the first MiB is a hole");
        if mode.extended() {
            // The hole of almost 5 GiB is one 64-bit extent.
            assert!(
                st[0]
                    .extents
                    .iter()
                    .any(|e| e.length > u32::MAX as u64 && e.flags & 1 == 1),
                "{what}: {:?}",
                st[0].extents
            );
        }
        // DF: the data in one chunk.
        let mut buf = vec![0u8; 128 * 1024];
        c.pread(&mut buf, MIB + 131072, CommandFlags::DF).unwrap();
        assert_eq!(buf, data[131072..], "{what}");
    } else {
        assert!(matches!(
            c.block_status(0, 4096, CommandFlags::empty()),
            Err(Error::Request(RequestError::NoMetaContext))
        ));
    }
}

/// A server under test: how to start it with a given negotiation policy.
enum Which {
    Async,
    Blocking,
}

/// What the server offers.
#[derive(Clone, Copy, Debug)]
enum Offer {
    Everything,
    Oldstyle,
    NoGo,
    NoStructuredReplies,
    NoExtendedHeaders,
}

struct Running {
    _peer: Option<Peer>,
    _thread: Option<InThread>,
    uri: String,
}

fn start(which: &Which, dir: &TempDir, offer: Offer) -> Running {
    match which {
        Which::Async => {
            let flag = match offer {
                Offer::Everything => None,
                Offer::Oldstyle => Some("--oldstyle"),
                Offer::NoGo => Some("--no-go"),
                Offer::NoStructuredReplies => Some("--no-sr"),
                Offer::NoExtendedHeaders => Some("--no-extended-headers"),
            };
            let mut args = vec!["--memory", "6G"];
            args.extend(flag);
            let peer = serve(dir, &args);
            let uri = peer.uri("");
            Running {
                _peer: Some(peer),
                _thread: None,
                uri,
            }
        }
        Which::Blocking => {
            let mut config = ServerConfig::default();
            match offer {
                Offer::Everything => {}
                Offer::Oldstyle => config.oldstyle = true,
                Offer::NoGo => config.support_go = false,
                Offer::NoStructuredReplies => {
                    config.structured_replies = false;
                    config.extended_headers = false;
                }
                Offer::NoExtendedHeaders => config.extended_headers = false,
            }
            let options = ServerOptions::default().config(config);
            let t = InThread::start(dir, options);
            let uri = t.uri();
            Running {
                _peer: None,
                _thread: Some(t),
                uri,
            }
        }
    }
}

/// Every (server offer, client request) pair and the mode it must reach.
const CASES: &[(Offer, Mode, Mode)] = &[
    (Offer::Everything, Mode::Extended, Mode::Extended),
    (Offer::Everything, Mode::Structured, Mode::Structured),
    (Offer::Everything, Mode::Simple, Mode::Simple),
    (Offer::NoExtendedHeaders, Mode::Extended, Mode::Structured),
    (Offer::NoStructuredReplies, Mode::Extended, Mode::Simple),
    (Offer::Oldstyle, Mode::Extended, Mode::Oldstyle),
    (Offer::NoGo, Mode::ExportNameOnly, Mode::ExportNameOnly),
];

fn every_mode(which: Which) {
    let dir = TempDir::new();
    for &(offer, asks, reaches) in CASES {
        let server = start(&which, &dir, offer);
        let what = format!("server offering {offer:?}, client asking for {asks:?}");
        let mut c = connect(&server.uri, client_config(asks));
        assert_eq!(c.mode(), reaches, "{what}");
        exercise(&mut c, &what);
        c.disconnect().unwrap();
        // A second connection sees what the first wrote.
        let mut c = connect(&server.uri, client_config(asks));
        let data = pattern(256 * 1024, 1);
        assert_eq!(
            read_back(&mut c, 5 * GIB + 131072, 4096),
            data[131072 - 4096..][..4096],
            "{what}"
        );
        c.disconnect().unwrap();
    }
}

#[test]
fn blocking_client_against_nbd_serve_in_every_mode() {
    every_mode(Which::Async);
}

#[test]
fn blocking_client_against_blocking_server_in_every_mode() {
    every_mode(Which::Blocking);
}

/// A client asking for everything from a server without NBD_OPT_GO falls
/// back to NBD_OPT_EXPORT_NAME; option mode lists exports on both servers.
#[test]
fn export_name_fallback_and_option_mode() {
    let dir = TempDir::new();
    for which in [Which::Async, Which::Blocking] {
        let server = start(&which, &dir, Offer::NoGo);
        let mut c = connect(&server.uri, ClientConfig::default());
        // Such a server refuses NBD_OPT_EXTENDED_HEADERS (the spec ties
        // them to NBD_OPT_GO), but structured replies and base:allocation
        // negotiated before NBD_OPT_EXPORT_NAME stay in force.
        assert_eq!(c.mode(), Mode::Structured);
        c.write(&pattern(4096, 3), 0).unwrap();
        assert_eq!(read_back(&mut c, 0, 4096), pattern(4096, 3));
        assert!(!is_hole(&mut c, 0));
        assert!(is_hole(&mut c, MIB));
        c.disconnect().unwrap();

        let server = start(&which, &dir, Offer::Everything);
        let uri = NbdUri::parse(&server.uri).unwrap();
        let config = ClientConfig::default().opt_mode(true);
        let mut n = Negotiation::connect(&uri, config).unwrap();
        assert!(n.session().extended_headers() && n.session().structured_replies());
        let list = n.list().unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        let info = n.info("").unwrap();
        assert_eq!(info.size, SIZE);
        let mut c = n.go("").unwrap();
        assert_eq!(c.mode(), Mode::Extended);
        c.write(&pattern(4096, 4), 4096).unwrap();
        c.disconnect().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Many connections, a connection limit, the handshake timeout
// ---------------------------------------------------------------------------

#[test]
fn twenty_async_clients_at_once() {
    const CLIENTS: u64 = 20;
    const REGION: usize = 512 * 1024;
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "16M"]);
    let uri = peer.uri("");
    smol::block_on(async {
        // All connected at the same time before any I/O starts.
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let c = nbd_smol::client::Client::connect(&uri).await.unwrap();
            assert_eq!(c.mode(), Mode::Extended);
            clients.push(c);
        }
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                smol::spawn(async move {
                    let i = i as u64;
                    let offset = i * REGION as u64;
                    for round in 0..4u64 {
                        let data = pattern(REGION, i * 100 + round);
                        let (r, data) = c.write(data, offset).await;
                        r.unwrap();
                        c.flush().await.unwrap();
                        let (r, back) = c.read(vec![0u8; REGION], offset).await;
                        r.unwrap();
                        assert!(back == data, "client {i}, round {round}");
                    }
                    c.disconnect().await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        // One more connection sees every client's last write.
        let c = nbd_smol::client::Client::connect(&uri).await.unwrap();
        for i in 0..CLIENTS {
            let (r, back) = c.read(vec![0u8; REGION], i * REGION as u64).await;
            r.unwrap();
            assert!(back == pattern(REGION, i * 100 + 3), "region of client {i}");
        }
        c.disconnect().await.unwrap();
    });
}

#[test]
fn max_connections_makes_the_next_client_wait() {
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "1M", "--max-connections", "2"]);
    let uri = peer.uri("");
    let mut first = Client::connect(&uri).unwrap();
    let mut second = Client::connect(&uri).unwrap();
    first.write(&[1u8; 4096], 0).unwrap();

    let (tx, rx) = mpsc::channel();
    let third_uri = uri.clone();
    let third = thread::spawn(move || {
        let started = Instant::now();
        let r = Client::connect(&third_uri).map(|mut c| {
            let mut buf = [0u8; 4096];
            c.read(&mut buf, 0).unwrap();
            (c, buf, started.elapsed())
        });
        let _ = tx.send(r);
    });
    // The third connection is accepted by the kernel but not served.
    assert!(
        matches!(
            rx.recv_timeout(Duration::from_millis(700)),
            Err(mpsc::RecvTimeoutError::Timeout)
        ),
        "a third client was served while two were connected"
    );
    second.read(&mut [0u8; 512], 0).unwrap();
    // One leaves: the third one gets its turn.
    first.disconnect().unwrap();
    let (c, buf, waited) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the third client was not served after one left")
        .expect("the third client failed");
    assert!(
        buf.iter().all(|&b| b == 1),
        "the third client reads the first one's write"
    );
    assert!(waited >= Duration::from_millis(600), "waited only {waited:?}");
    c.disconnect().unwrap();
    second.disconnect().unwrap();
    third.join().unwrap();
}

/// Connects and sends nothing; returns what the server sent and how long
/// it took until it closed the connection.
fn silent_client(socket: &Path) -> (Vec<u8>, Duration) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("the server kept a silent client for {:?}: {e}", started.elapsed()));
    (got, started.elapsed())
}

fn socket_of(endpoint: &Endpoint) -> PathBuf {
    match endpoint {
        Endpoint::Unix(p) => p.clone(),
        Endpoint::Tcp(a) => panic!("TCP {a}"),
    }
}

#[test]
fn handshake_timeout_closes_silent_clients() {
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "1M", "--handshake-timeout", "1"]);
    let blocking = InThread::start(
        &dir,
        ServerOptions::default().config(ServerConfig::default().handshake_timeout(Some(Duration::from_secs(1)))),
    );
    for socket in [peer.socket().to_owned(), socket_of(&blocking.endpoint)] {
        let (got, took) = silent_client(&socket);
        // The greeting (NBDMAGIC, IHAVEOPT, handshake flags), then EOF.
        assert_eq!(got.len(), 18, "{got:?}");
        assert_eq!(&got[..16], b"NBDMAGICIHAVEOPT");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "closed after {took:?}"
        );
    }
    // The timeout covers only the handshake: an idle client in
    // transmission stays connected.
    let mut c = Client::connect(&peer.uri("")).unwrap();
    let mut d = Client::connect(&blocking.uri()).unwrap();
    thread::sleep(Duration::from_millis(1300));
    c.write(&[7u8; 512], 0).unwrap();
    d.write(&[7u8; 512], 0).unwrap();
    c.disconnect().unwrap();
    d.disconnect().unwrap();
    assert!(peer.stderr().contains("handshake timed out"), "{}", peer.stderr());
}

/// SIGTERM stops nbd-serve even while a client sits idle in transmission:
/// the spec's hard disconnect once in-flight requests are answered.
#[test]
fn sigterm_hangs_up_on_idle_clients_and_exits() {
    let dir = TempDir::new();
    let mut peer = serve(&dir, &["--memory", "1M"]);
    let mut c = Client::connect(&peer.uri("")).unwrap();
    c.write(&[3u8; 512], 0).unwrap();
    let pid = libc::pid_t::try_from(peer.pid()).unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while peer.is_running() {
        assert!(
            Instant::now() < deadline,
            "nbd-serve still runs 3 s after SIGTERM with an idle client connected"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!peer.socket().exists(), "nbd-serve left its socket behind");
    let mut buf = [0u8; 512];
    assert!(c.read(&mut buf, 0).is_err(), "the connection outlived the server");
}
