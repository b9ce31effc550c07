//! TLS (`NBD_OPT_STARTTLS`, rustls) against peers nobody here wrote, with
//! certificates the tests make (a CA, a server certificate for
//! `localhost`/`127.0.0.1`, a client certificate; see
//! `nbd_tests::tls`):
//!
//! - our clients (blocking and async, nbd-info, nbd-copy) against
//!   `nbdkit --tls=require` and `qemu-nbd --tls-creds` (which also demands
//!   our client certificate);
//! - our servers (nbd-serve and the blocking server) under nbdinfo,
//!   nbdcopy (libnbd, GnuTLS), qemu-img and qemu-io (QEMU, GnuTLS);
//! - the refusals: a plain client and a `require` server, a client that
//!   requires TLS and a server without it, a wrong CA, a wrong host name,
//!   a missing client certificate, and the spec's FORCEDTLS rules on the
//!   wire (every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`,
//!   a second STARTTLS gets `NBD_REP_ERR_INVALID`, what was negotiated
//!   before TLS is forgotten).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nbd_blocking::client::{Client, Error, Negotiation};
use nbd_blocking::server::{Server as BlockingServer, ServerOptions};
use nbd_proto::client::{ClientConfig, HandshakeError, Mode};
use nbd_proto::server::{ServerConfig, TlsPolicy};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{OptionType, ReplyType};
use nbd_server::Export;
use nbd_storage::MemoryStorage;
use nbd_tests::tls::{Certificates, make_certificates};
use nbd_tests::*;

const MIB: u64 = 1 << 20;

fn certs(dir: &TempDir, name: &str) -> Certificates {
    make_certificates(&dir.join(name)).expect("making test certificates")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `nbds+unix:///EXPORT?socket=SOCKET&tls-certificates=DIR` plus `extra`
/// query parameters.
fn nbds_unix(socket: &Path, certs: &Certificates, extra: &str) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}{extra}",
        percent_encode(path_str(socket)),
        percent_encode(certs.dir_str())
    )
}

/// Starts `nbd-serve --socket SOCKET ARGS...`.
fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbd-serve");
    let socket_arg = path_str(&socket).to_owned();
    let mut full = vec!["--socket", socket_arg.as_str()];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket))
}

/// Starts `nbd-serve --tls=MODE --tls-certificates=DIR --memory 16M`.
fn serve_tls(dir: &TempDir, certs: &Certificates, mode: &str, extra: &[&str]) -> Peer {
    let tls = format!("--tls={mode}");
    let certificates = format!("--tls-certificates={}", certs.dir_str());
    let mut args = vec![tls.as_str(), certificates.as_str(), "--memory", "16M"];
    args.extend_from_slice(extra);
    serve(dir, &args)
}

/// Writes, reads back and flushes through a blocking client.
fn round_trip(c: &mut Client, what: &str) {
    let data = pattern(256 * 1024, 7);
    c.write(&data, MIB).unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, MIB).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert!(back == data, "{what}: data read back differs");
    if c.flags().contains(nbd_proto::wire::TransmissionFlags::SEND_FLUSH) {
        c.flush().unwrap_or_else(|e| panic!("{what}: flush: {e}"));
    }
}

fn connect(uri: &str) -> Result<Client, Error> {
    Client::connect_uri(&NbdUri::parse(uri).unwrap(), ClientConfig::default())
}

fn connect_ok(uri: &str) -> Client {
    connect(uri).unwrap_or_else(|e| panic!("connecting to {uri}: {e}"))
}

// ---------------------------------------------------------------------------
// Our clients against nbdkit and qemu-nbd
// ---------------------------------------------------------------------------

#[test]
fn our_clients_against_nbdkit_tls_require() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let certificates = format!("--tls-certificates={}", pki.dir_str());
    let peer = nbdkit(&dir, &["--tls=require", &certificates, "memory", "16M"]);
    let uri = nbds_unix(peer.socket(), &pki, "");

    // Blocking client.
    let mut c = connect_ok(&uri);
    assert!(c.negotiated().tls, "TLS in use");
    round_trip(&mut c, "blocking client over TLS to nbdkit");
    c.disconnect().unwrap();

    // The async client, with several requests in flight.
    nbd_smol::block_on(async {
        let c = nbd_smol::Client::connect(&uri).await.unwrap();
        assert!(c.negotiated().tls);
        let data = pattern(128 * 1024, 3);
        let writes = (0..8u64).map(|i| c.write(data.clone(), i * 128 * 1024));
        for (r, _) in futures_lite_join(writes).await {
            r.unwrap();
        }
        for i in 0..8u64 {
            let (r, back) = c.read(vec![0; data.len()], i * 128 * 1024).await;
            r.unwrap();
            assert!(back == data, "async read back {i}");
        }
        c.disconnect().await.unwrap();
    });

    // nbd-info reports TLS.
    let json = run_ok(&our_bin("nbd-info"), &["--json", &uri]);
    assert!(json.contains("\"TLS\": true"), "{json}");
    let text = run_ok(&our_bin("nbd-info"), &[&uri]);
    assert!(text.contains("with TLS"), "{text}");
}

/// Joins futures (the tests crate has no futures utilities).
async fn futures_lite_join<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let tasks: Vec<_> = futs.into_iter().collect();
    let mut out = Vec::with_capacity(tasks.len());
    // Start them all, then collect in order.
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = tasks.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(done.into_iter().map(|d| d.expect("every future finished")));
    out
}

#[test]
fn our_client_against_qemu_nbd_with_client_certificates() {
    if !require_peer("qemu-nbd") {
        return;
    }
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let img = dir.sparse_file("disk.img", 16 * MIB);
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", pki.dir_str());
    let peer = qemu_nbd(
        &dir,
        &["--object", &object, "--tls-creds", "tls0", "-f", "raw", path_str(&img)],
    );
    let uri = nbds_unix(peer.socket(), &pki, "");
    let mut c = connect_ok(&uri);
    assert!(c.negotiated().tls);
    assert_eq!(
        c.mode(),
        Mode::Extended,
        "qemu-nbd 10 negotiates extended headers over TLS"
    );
    round_trip(&mut c, "blocking client over TLS to qemu-nbd");
    c.disconnect().unwrap();

    // QEMU's server verifies clients by default: without our certificate
    // (a directory with only the CA) the TLS handshake fails.
    let ca_only = dir.join("ca-only");
    std::fs::create_dir_all(&ca_only).unwrap();
    std::fs::copy(pki.file("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        percent_encode(path_str(peer.socket())),
        percent_encode(path_str(&ca_only))
    );
    // With TLS 1.3 our side of the TLS handshake is over before QEMU has
    // checked our (missing) certificate: the refusal shows as the server
    // hanging up right after it.
    match connect(&uri) {
        Err(Error::TlsHandshake(_)) => {}
        Err(Error::Io(e)) if e.to_string().contains("right after the TLS handshake") => {}
        other => panic!("qemu-nbd accepted a client without a certificate: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Our servers under libnbd and QEMU
// ---------------------------------------------------------------------------

/// The blocking server in a thread of the test, on a Unix socket.
struct InThread {
    server: BlockingServer,
    thread: Option<thread::JoinHandle<std::io::Result<()>>>,
    socket: std::path::PathBuf,
}

impl InThread {
    fn start(dir: &TempDir, options: ServerOptions) -> InThread {
        let socket = dir.socket_path("blocking");
        let listener = UnixListener::bind(&socket).unwrap();
        let storage = Arc::new(MemoryStorage::new(16 * MIB));
        let server = BlockingServer::new(vec![Export::new("", "in a thread", storage)], options);
        let thread = {
            let server = server.clone();
            Some(thread::spawn(move || server.serve_unix(listener)))
        };
        InThread { server, thread, socket }
    }
}

impl Drop for InThread {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn blocking_tls_server(dir: &TempDir, certs: &Certificates, policy: TlsPolicy) -> InThread {
    let tls = nbd_net::ServerTlsOptions::from_dir(&certs.dir, false).build().unwrap();
    InThread::start(
        dir,
        ServerOptions::default()
            .config(ServerConfig::default().tls(policy))
            .tls(Some(tls)),
    )
}

#[test]
fn nbdinfo_and_nbdcopy_against_our_servers() {
    if !require_peers(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "require", &[]);
    let blocking = blocking_tls_server(&dir, &pki, TlsPolicy::ForcedTls);
    for socket in [peer.socket(), blocking.socket.as_path()] {
        let uri = nbds_unix(socket, &pki, "");
        let json = run_ok("nbdinfo", &["--json", &uri]);
        assert!(json.contains("\"TLS\": true"), "{json}");
        assert!(json.contains("\"export-size\": 16777216"), "{json}");
        // libnbd names the server for its certificate check with
        // tls-hostname... only where it knows the parameter; 1.14 ignores
        // the name over Unix sockets, so this just has to work.
        let listing = run_ok("nbdinfo", &["--list", &uri]);
        assert!(listing.contains("with TLS"), "{listing}");

        // nbdcopy both ways through TLS.
        let src = dir.join("src.img");
        std::fs::write(&src, pattern(4 * MIB as usize, 9)).unwrap();
        run_ok("nbdcopy", &[path_str(&src), &uri]);
        let back = dir.join("back.img");
        run_ok("nbdcopy", &["--", &uri, path_str(&back)]);
        let back = std::fs::read(&back).unwrap();
        assert!(
            back[..4 * MIB as usize] == std::fs::read(&src).unwrap()[..],
            "nbdcopy round trip"
        );
    }
}

#[test]
fn qemu_img_and_qemu_io_against_our_server() {
    if !require_peers(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "require", &[]);
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.dir_str());
    // QEMU wants a name to check the certificate for even over a Unix
    // socket ("No hostname for certificate validation").
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
        path_str(peer.socket())
    );
    let info = run_ok("qemu-img", &["info", "--object", &object, "--image-opts", &opts]);
    assert!(info.contains("virtual size: 16 MiB"), "{info}");
    let out = run_ok(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5a 1M 256k",
            "-c",
            "read -P 0x5a 1M 256k",
            "-c",
            "flush",
        ],
    );
    assert!(out.contains("wrote 262144/262144"), "{out}");
    assert!(out.contains("read 262144/262144"), "{out}");

    // The same with QEMU verifying our name over TCP (localhost).
    let port = free_tcp_port().to_string();
    let certificates = format!("--tls-certificates={}", pki.dir_str());
    let tcp = Peer::start(
        &dir,
        &our_bin("nbd-serve"),
        &["--tls=require", &certificates, "--memory", "16M", "-p", &port],
        Endpoint::Tcp(([127, 0, 0, 1], port.parse().unwrap()).into()),
    );
    let opts = format!("driver=nbd,server.type=inet,server.host=localhost,server.port={port},tls-creds=tls0");
    let info = run_ok("qemu-img", &["info", "--object", &object, "--image-opts", &opts]);
    assert!(info.contains("virtual size: 16 MiB"), "{info}");
    drop(tcp);
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[test]
fn plain_client_refused_by_a_require_server() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "require", &[]);
    let blocking = blocking_tls_server(&dir, &pki, TlsPolicy::ForcedTls);
    for socket in [peer.socket(), blocking.socket.as_path()] {
        let uri = Endpoint::Unix(socket.to_owned()).uri("");
        match connect(&uri) {
            Err(Error::Handshake(HandshakeError::TlsRequired(_))) => {}
            other => panic!("a plain client got {other:?}"),
        }
        let e = connect(&uri).unwrap_err().to_string();
        assert!(e.contains("requires TLS"), "{e}");
        // The async client says the same.
        let e = nbd_smol::block_on(nbd_smol::Client::connect(&uri)).unwrap_err();
        assert!(
            matches!(e, nbd_smol::client::Error::Handshake(HandshakeError::TlsRequired(_))),
            "{e}"
        );
        // nbdinfo (libnbd without TLS) is refused too.
        if require_peer("nbdinfo") {
            let out = run("nbdinfo", &[&uri]);
            assert!(
                !out.status.success(),
                "nbdinfo without TLS got in:\n{}",
                describe_output(&out)
            );
        }
    }
}

#[test]
fn client_requiring_tls_refused_by_servers_without_it() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve(&dir, &["--memory", "16M"]);
    let blocking = InThread::start(&dir, ServerOptions::default());
    let mut sockets = vec![peer.socket().to_owned(), blocking.socket.clone()];
    let kit = require_peer("nbdkit").then(|| nbdkit(&dir, &["memory", "16M"]));
    if let Some(k) = &kit {
        sockets.push(k.socket().to_owned());
    }
    for socket in &sockets {
        let uri = nbds_unix(socket, &pki, "");
        match connect(&uri) {
            Err(Error::Handshake(HandshakeError::TlsUnavailable(_))) => {}
            other => panic!("{uri}: {other:?}"),
        }
        let e = connect(&uri).unwrap_err().to_string();
        assert!(e.contains("TLS required but the server does not support it"), "{e}");
        let e = nbd_smol::block_on(nbd_smol::Client::connect(&uri)).unwrap_err();
        assert!(
            matches!(e, nbd_smol::client::Error::Handshake(HandshakeError::TlsUnavailable(_))),
            "{e}"
        );
        // nbd-info --tls=require on a plain URI: the same refusal.
        let plain = Endpoint::Unix(socket.clone()).uri("");
        let out = run(&our_bin("nbd-info"), &["--tls=require", &plain]);
        assert!(!out.status.success(), "{}", describe_output(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("TLS required"),
            "{}",
            describe_output(&out)
        );
        // tls=allow goes on in clear.
        let mut c = connect_ok(&format!("{plain}&tls=allow"));
        assert!(!c.negotiated().tls);
        round_trip(&mut c, "tls=allow against a server without TLS");
        c.disconnect().unwrap();
    }
}

#[test]
fn wrong_ca_and_wrong_hostname_are_refused() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let other = certs(&dir, "other-ca");
    let peer = serve_tls(&dir, &pki, "require", &[]);
    let kit = require_peer("nbdkit").then(|| {
        let certificates = format!("--tls-certificates={}", pki.dir_str());
        nbdkit(&dir, &["--tls=require", &certificates, "memory", "16M"])
    });
    let mut sockets = vec![peer.socket().to_owned()];
    if let Some(k) = &kit {
        sockets.push(k.socket().to_owned());
    }
    for socket in &sockets {
        // A CA that did not sign the server's certificate.
        let uri = nbds_unix(socket, &other, "");
        match connect(&uri) {
            Err(Error::TlsHandshake(e)) => assert!(e.to_string().contains("invalid peer certificate"), "{e}"),
            other => panic!("{uri}: {other:?}"),
        }
        let e = nbd_smol::block_on(nbd_smol::Client::connect(&uri)).unwrap_err();
        assert!(matches!(e, nbd_smol::client::Error::TlsHandshake(_)), "{e}");
        // ... unless told not to verify.
        let mut c = connect_ok(&nbds_unix(socket, &other, "&tls-verify-peer=0"));
        assert!(c.negotiated().tls);
        round_trip(&mut c, "tls-verify-peer=0");
        c.disconnect().unwrap();

        // The right CA, but the server is not "wrong.example".
        let uri = nbds_unix(socket, &pki, "&tls-hostname=wrong.example");
        match connect(&uri) {
            Err(Error::TlsHandshake(e)) => assert!(e.to_string().contains("not valid for name"), "{e}"),
            other => panic!("{uri}: {other:?}"),
        }
        // ... and it is "localhost".
        let c = connect_ok(&nbds_unix(socket, &pki, "&tls-hostname=localhost"));
        c.disconnect().unwrap();
    }

    // Over TCP the URI's host is the name checked: localhost and
    // 127.0.0.1 are in the certificate, 127.0.0.2 is not.
    let port = free_tcp_port();
    let certificates = format!("--tls-certificates={}", pki.dir_str());
    let port_arg = port.to_string();
    let _tcp = Peer::start(
        &dir,
        &our_bin("nbd-serve"),
        &[
            "--tls=require",
            &certificates,
            "--memory",
            "16M",
            "-p",
            &port_arg,
            "-b",
            "0.0.0.0",
        ],
        Endpoint::Tcp(([127, 0, 0, 1], port).into()),
    );
    let q = format!("?tls-certificates={}", percent_encode(pki.dir_str()));
    for host in ["localhost", "127.0.0.1"] {
        let c = connect_ok(&format!("nbds://{host}:{port}/{q}"));
        assert!(c.negotiated().tls);
        c.disconnect().unwrap();
    }
    match connect(&format!("nbds://127.0.0.2:{port}/{q}")) {
        Err(Error::TlsHandshake(e)) => assert!(e.to_string().contains("not valid for name"), "{e}"),
        other => panic!("127.0.0.2: {other:?}"),
    }
}

#[test]
fn client_certificates_required_by_our_server() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    // The directory as nbdkit takes it, and the files one by one.
    let by_dir = serve_tls(&dir, &pki, "require", &["--tls-verify-peer"]);
    let (cert, key, ca) = (
        format!("--tls-cert={}", path_str(&pki.file("server-cert.pem"))),
        format!("--tls-key={}", path_str(&pki.file("server-key.pem"))),
        format!("--tls-ca={}", path_str(&pki.file("ca-cert.pem"))),
    );
    let by_files = serve(&dir, &[&cert, &key, &ca, "--memory", "16M"]);
    let ca_only = dir.join("ca-only");
    std::fs::create_dir_all(&ca_only).unwrap();
    std::fs::copy(pki.file("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    for peer in [&by_dir, &by_files] {
        // With the client certificate (in the directory): in.
        let mut c = connect_ok(&nbds_unix(peer.socket(), &pki, ""));
        assert!(c.negotiated().tls);
        round_trip(&mut c, "with a client certificate");
        c.disconnect().unwrap();
        if require_peer("nbdinfo") {
            let json = run_ok("nbdinfo", &["--json", &nbds_unix(peer.socket(), &pki, "")]);
            assert!(json.contains("\"TLS\": true"), "{json}");
        }
        // Without one: out.
        let uri = format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            percent_encode(path_str(peer.socket())),
            percent_encode(path_str(&ca_only))
        );
        let e = connect(&uri).expect_err("a client without a certificate got in");
        assert!(e.to_string().contains("TLS"), "{e}");
    }
    // A plain client of the file-configured server (TLS by default when a
    // certificate is given) is told TLS is required.
    let e = connect(&Endpoint::Unix(by_files.socket().to_owned()).uri("")).unwrap_err();
    assert!(e.to_string().contains("requires TLS"), "{e}");
}

#[test]
fn tls_on_serves_both_plain_and_tls_clients() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "on", &[]);
    let blocking = blocking_tls_server(&dir, &pki, TlsPolicy::SelectiveTls);
    for socket in [peer.socket(), blocking.socket.as_path()] {
        let mut plain = connect_ok(&Endpoint::Unix(socket.to_owned()).uri(""));
        assert!(!plain.negotiated().tls);
        round_trip(&mut plain, "plain client of a --tls=on server");
        plain.disconnect().unwrap();
        let mut tls = connect_ok(&nbds_unix(socket, &pki, ""));
        assert!(tls.negotiated().tls);
        assert_eq!(tls.mode(), Mode::Extended);
        round_trip(&mut tls, "TLS client of a --tls=on server");
        tls.disconnect().unwrap();
        // tls=allow takes TLS when offered; option mode over TLS too.
        let allow = format!("{}&tls=allow", Endpoint::Unix(socket.to_owned()).uri(""));
        let allow = allow.replacen('?', &format!("?tls-certificates={}&", percent_encode(pki.dir_str())), 1);
        let c = connect_ok(&allow);
        assert!(c.negotiated().tls);
        c.disconnect().unwrap();
        let mut n = Negotiation::connect(
            &NbdUri::parse(&nbds_unix(socket, &pki, "")).unwrap(),
            ClientConfig::default(),
        )
        .unwrap();
        assert!(n.session().tls());
        assert_eq!(n.list().unwrap().len(), 1);
        n.abort().unwrap();
    }
}

#[test]
fn nbd_copy_through_tls_both_ways() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "require", &[]);
    let uri = nbds_unix(peer.socket(), &pki, "");
    let src = dir.join("src.img");
    let data = pattern(8 * MIB as usize, 5);
    std::fs::write(&src, &data).unwrap();
    run_ok(&our_bin("nbd-copy"), &[path_str(&src), &uri]);
    let back = dir.join("back.img");
    run_ok(&our_bin("nbd-copy"), &[&uri, path_str(&back)]);
    assert!(
        std::fs::read(&back).unwrap()[..data.len()] == data[..],
        "nbd-copy round trip"
    );
    // --tls=require on an nbd+unix URI (with the certificates) works too.
    let plain = format!(
        "nbd+unix:///?socket={}&tls-certificates={}",
        percent_encode(path_str(peer.socket())),
        percent_encode(pki.dir_str())
    );
    run_ok(&our_bin("nbd-copy"), &["--tls=require", &plain, "null:"]);
    let out = run(&our_bin("nbd-copy"), &["--tls=off", &uri, "null:"]);
    assert!(!out.status.success(), "--tls=off with nbds:// must fail");
}

// ---------------------------------------------------------------------------
// The spec's rules on the wire
// ---------------------------------------------------------------------------

/// Reads the newstyle greeting and answers with fixed newstyle + no zeroes.
fn greet(s: &mut impl ReadWrite) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn send_option(s: &mut impl ReadWrite, option: OptionType, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(b"IHAVEOPT");
    m.extend_from_slice(&option.0.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
    s.flush().unwrap();
}

fn read_reply(s: &mut impl ReadWrite) -> (OptionType, ReplyType, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), 0x0003_e889_0455_65a9);
    let option = OptionType(u32::from_be_bytes(h[8..12].try_into().unwrap()));
    let reply = ReplyType(u32::from_be_bytes(h[12..16].try_into().unwrap()));
    let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut data).unwrap();
    (option, reply, data)
}

/// Sends an option and returns the (last) reply type.
fn ask(s: &mut impl ReadWrite, option: OptionType, data: &[u8]) -> ReplyType {
    send_option(s, option, data);
    loop {
        let (o, r, _) = read_reply(s);
        assert_eq!(o, option);
        if r != ReplyType::SERVER && r != ReplyType::INFO && r != ReplyType::META_CONTEXT {
            return r;
        }
    }
}

/// `NBD_OPT_INFO`/`GO` data for the default export, no info requests.
fn info_data() -> Vec<u8> {
    vec![0, 0, 0, 0, 0, 0]
}

/// `NBD_OPT_SET_META_CONTEXT` data: default export, `base:allocation`.
fn meta_data() -> Vec<u8> {
    let mut d = vec![0, 0, 0, 0, 0, 0, 0, 1];
    d.extend_from_slice(&15u32.to_be_bytes());
    d.extend_from_slice(b"base:allocation");
    d
}

/// The rustls client end of a STARTTLS upgrade.
fn upgrade(
    s: UnixStream,
    certs: &Certificates,
) -> nbd_net::rustls::StreamOwned<nbd_net::rustls::ClientConnection, UnixStream> {
    let tls = nbd_net::ClientTlsOptions {
        certificates: Some(certs.dir.clone()),
        hostname: Some("localhost".into()),
        verify_peer: true,
    }
    .build()
    .unwrap();
    let mut t = nbd_net::rustls::StreamOwned::new(tls.connection().unwrap(), s);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock).unwrap();
    }
    t
}

fn raw_client(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[test]
fn forced_tls_rules_on_the_wire() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "require", &[]);
    let blocking = blocking_tls_server(&dir, &pki, TlsPolicy::ForcedTls);
    for socket in [peer.socket(), blocking.socket.as_path()] {
        let mut s = raw_client(socket);
        greet(&mut s);
        // Every option but STARTTLS and ABORT: NBD_REP_ERR_TLS_REQD, even
        // ones the server does not know.
        for (o, d) in [
            (OptionType::LIST, vec![]),
            (OptionType::INFO, info_data()),
            (OptionType::GO, info_data()),
            (OptionType::STRUCTURED_REPLY, vec![]),
            (OptionType::EXTENDED_HEADERS, vec![]),
            (OptionType::LIST_META_CONTEXT, meta_data()),
            (OptionType(0x77), vec![1, 2, 3]),
        ] {
            assert_eq!(ask(&mut s, o, &d), ReplyType::ERR_TLS_REQD, "{o:?} in clear");
        }
        assert_eq!(ask(&mut s, OptionType::STARTTLS, &[]), ReplyType::ACK);
        let mut t = upgrade(s, &pki);
        // Over TLS: options work, no TLS_REQD, a second STARTTLS is invalid.
        assert_eq!(ask(&mut t, OptionType::STARTTLS, &[]), ReplyType::ERR_INVALID);
        assert_eq!(ask(&mut t, OptionType::LIST, &[]), ReplyType::ACK);
        assert_eq!(ask(&mut t, OptionType::INFO, &info_data()), ReplyType::ACK);
        assert_eq!(ask(&mut t, OptionType::ABORT, &[]), ReplyType::ACK);

        // NBD_OPT_EXPORT_NAME in clear cannot be refused: the server hangs up.
        let mut s = raw_client(socket);
        greet(&mut s);
        send_option(&mut s, OptionType::EXPORT_NAME, b"");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "EXPORT_NAME in clear got {rest:?}");

        // ABORT in clear is allowed.
        let mut s = raw_client(socket);
        greet(&mut s);
        assert_eq!(ask(&mut s, OptionType::ABORT, &[]), ReplyType::ACK);
    }
}

#[test]
fn what_was_negotiated_before_tls_is_forgotten() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "on", &[]);
    let blocking = blocking_tls_server(&dir, &pki, TlsPolicy::SelectiveTls);
    for socket in [peer.socket(), blocking.socket.as_path()] {
        let mut s = raw_client(socket);
        greet(&mut s);
        assert_eq!(ask(&mut s, OptionType::STRUCTURED_REPLY, &[]), ReplyType::ACK);
        assert_eq!(ask(&mut s, OptionType::SET_META_CONTEXT, &meta_data()), ReplyType::ACK);
        assert_eq!(ask(&mut s, OptionType::STARTTLS, &[]), ReplyType::ACK);
        let mut t = upgrade(s, &pki);
        // Structured replies are gone: meta contexts need them again, and
        // asking for them again is not "already negotiated".
        assert_eq!(
            ask(&mut t, OptionType::SET_META_CONTEXT, &meta_data()),
            ReplyType::ERR_INVALID
        );
        assert_eq!(ask(&mut t, OptionType::STRUCTURED_REPLY, &[]), ReplyType::ACK);
        assert_eq!(ask(&mut t, OptionType::STARTTLS, &[]), ReplyType::ERR_INVALID);
        assert_eq!(ask(&mut t, OptionType::ABORT, &[]), ReplyType::ACK);
    }
}

#[test]
fn bytes_sent_before_the_starttls_ack_close_the_connection() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "require", &[]);
    let blocking = blocking_tls_server(&dir, &pki, TlsPolicy::ForcedTls);
    for socket in [peer.socket(), blocking.socket.as_path()] {
        let mut s = raw_client(socket);
        greet(&mut s);
        // STARTTLS and, without waiting for the ACK, the start of a
        // "ClientHello": the server must not feed those bytes to TLS.
        let mut m = Vec::new();
        m.extend_from_slice(b"IHAVEOPT");
        m.extend_from_slice(&OptionType::STARTTLS.0.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5]);
        s.write_all(&m).unwrap();
        let (_, r, _) = read_reply(&mut s);
        assert_eq!(r, ReplyType::ACK);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the server answered early TLS bytes: {rest:?}");
    }
    // nbd-serve logs why.
    thread::sleep(Duration::from_millis(100));
    assert!(
        peer.stderr().contains("before the NBD_OPT_STARTTLS acknowledgement"),
        "{}",
        peer.stderr()
    );
}

/// Waits until the server closes `s` (EOF or an error; `raw_client`'s 5 s
/// read timeout stops a server that does not): how long that took.
fn closed_after(s: &mut impl Read, since: std::time::Instant) -> Duration {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => {}
            Err(e) => {
                assert!(
                    !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                    "still open after {:?}",
                    since.elapsed()
                );
                return since.elapsed();
            }
        }
    }
}

/// The handshake timeout bounds the whole handshake, TLS included: a
/// client that stalls in the TLS handshake, or once TLS is up, is closed
/// when the time since it connected runs out.
#[test]
fn the_handshake_timeout_covers_tls() {
    let dir = TempDir::new();
    let pki = certs(&dir, "pki");
    let peer = serve_tls(&dir, &pki, "require", &["--handshake-timeout", "1"]);
    let tls = nbd_net::ServerTlsOptions::from_dir(&pki.dir, false).build().unwrap();
    let blocking = InThread::start(
        &dir,
        ServerOptions::default()
            .config(
                ServerConfig::default()
                    .tls(TlsPolicy::ForcedTls)
                    .handshake_timeout(Some(Duration::from_secs(1))),
            )
            .tls(Some(tls)),
    );
    let in_time = |took: Duration, what: &str| {
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(3000),
            "{what}: closed after {took:?}, expected the 1 s handshake timeout"
        );
    };
    for socket in [peer.socket(), blocking.socket.as_path()] {
        // Silent after the STARTTLS acknowledgement: no ClientHello.
        let since = std::time::Instant::now();
        let mut s = raw_client(socket);
        greet(&mut s);
        assert_eq!(ask(&mut s, OptionType::STARTTLS, &[]), ReplyType::ACK);
        in_time(closed_after(&mut s, since), "in the TLS handshake");

        // TLS is up, then silence: the same deadline, from connecting.
        let since = std::time::Instant::now();
        let mut s = raw_client(socket);
        greet(&mut s);
        assert_eq!(ask(&mut s, OptionType::STARTTLS, &[]), ReplyType::ACK);
        let mut t = upgrade(s, &pki);
        thread::sleep(Duration::from_millis(300));
        assert_eq!(ask(&mut t, OptionType::LIST, &[]), ReplyType::ACK);
        in_time(closed_after(&mut t, since), "over TLS");
    }
    assert!(peer.stderr().contains("handshake timed out"), "{}", peer.stderr());
}
