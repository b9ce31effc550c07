//! TLS keys that load: for each kind of key the GnuTLS-based peers are
//! set up with, a CA, a server and a client certificate are made with
//! OpenSSL (not with this workspace's code), then
//!
//! - our servers (nbd-serve over TCP, the blocking server over a Unix
//!   socket), asking for client certificates, serve a disk that nbdinfo
//!   and nbdcopy (libnbd) and qemu-img (QEMU) read back through TLS;
//! - nbdkit (`--tls=require --tls-certificates=DIR --tls-verify-peer`,
//!   over TCP) and qemu-nbd (`--object tls-creds-x509,...`, which asks
//!   for client certificates by default) serve a disk that our blocking
//!   and async clients and nbd-info read back through TLS.
//!
//! The kinds: RSA 2048 (PKCS#8), RSA 2432 (PKCS#1, like the reference NBD
//! test suite's key, which rustls' `ring` provider cannot load), RSA 3072
//! (PKCS#1), RSA 4096 (PKCS#8), ECDSA P-256 (SEC1 with the `EC PARAMETERS`
//! block `openssl ecparam -genkey` writes), ECDSA P-384 (PKCS#8) and
//! Ed25519 (PKCS#8). The CA's key is of the same kind, so certificate
//! signatures of each kind are verified too. Three of the server
//! certificates (RSA 2432, RSA 4096, Ed25519) name their host only in the
//! subject's CN, with no subjectAltName, as `certtool` makes them from a
//! template with only `cn = HOST`: libnbd, QEMU and our clients accept
//! them for that host and our clients refuse them for another.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use nbd_blocking::client::{Client, Error};
use nbd_blocking::server::{Server as BlockingServer, ServerOptions};
use nbd_proto::client::ClientConfig;
use nbd_proto::server::{ServerConfig, TlsPolicy};
use nbd_proto::uri::NbdUri;
use nbd_server::Export;
use nbd_storage::FileStorage;
use nbd_tests::*;

/// The size of the disks served.
const DISK: usize = 1 << 20;

/// How the private key files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pem {
    /// `BEGIN PRIVATE KEY`.
    Pkcs8,
    /// `BEGIN RSA PRIVATE KEY`.
    Pkcs1,
    /// `BEGIN EC PARAMETERS` then `BEGIN EC PRIVATE KEY`.
    Sec1,
}

impl Pem {
    fn begin(self) -> &'static str {
        match self {
            Pem::Pkcs8 => "-----BEGIN PRIVATE KEY-----",
            Pem::Pkcs1 => "-----BEGIN RSA PRIVATE KEY-----",
            Pem::Sec1 => "-----BEGIN EC PRIVATE KEY-----",
        }
    }
}

/// A kind of key and how its server certificate names the host.
#[derive(Debug, Clone, Copy)]
struct Kind {
    name: &'static str,
    /// `openssl genpkey` arguments making a PKCS#8 key (P-256 SEC1 keys
    /// come from `openssl ecparam -genkey` instead).
    genpkey: &'static [&'static str],
    pem: Pem,
    /// The server certificate has no subjectAltName, only CN=localhost.
    cn_only: bool,
}

impl Kind {
    fn is_rsa(&self) -> bool {
        self.name.starts_with("rsa")
    }
}

/// `openssl ARGS...`, which must succeed.
fn openssl(args: &[&str]) {
    run_ok("openssl", args);
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Makes a private key of `kind` in `path`, written as `pem`.
fn make_key(kind: &Kind, pem: Pem, path: &Path) {
    let out = path_str(path);
    match pem {
        Pem::Sec1 if kind.name == "p256" => openssl(&["ecparam", "-genkey", "-name", "prime256v1", "-out", out]),
        _ => {
            let mut args = vec!["genpkey"];
            args.extend_from_slice(kind.genpkey);
            args.extend_from_slice(&["-out", out]);
            openssl(&args);
            if pem != Pem::Pkcs8 {
                let tmp = path.with_extension("pkcs8");
                std::fs::rename(path, &tmp).unwrap();
                openssl(&["pkey", "-in", path_str(&tmp), "-traditional", "-out", out]);
                std::fs::remove_file(tmp).unwrap();
            }
        }
    }
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(pem.begin()), "{}: not {pem:?}:\n{text}", path.display());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A certificates directory for `kind` as libnbd, nbdkit and QEMU take
/// it: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
/// `client-cert.pem` and `client-key.pem` (the server's key again, in a
/// certificate for TLS clients). The CA's key stays outside.
fn make_pki(dir: &TempDir, kind: &Kind) -> PathBuf {
    let pki = dir.join("pki");
    std::fs::create_dir(&pki).unwrap();
    let key_usage = if kind.is_rsa() {
        "digitalSignature, keyEncipherment"
    } else {
        "digitalSignature"
    };
    let san = if kind.cn_only {
        ""
    } else {
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
    };
    let config = dir.join("openssl.cnf");
    std::fs::write(
        &config,
        format!(
            "[req]\ndistinguished_name = dn\n[dn]\n\
             [ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n\
             [server]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = {key_usage}\n\
             extendedKeyUsage = serverAuth\n{san}\
             [client]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = {key_usage}\n\
             extendedKeyUsage = clientAuth\n"
        ),
    )
    .unwrap();
    let config = path_str(&config);

    let ca_key = dir.join("ca-key.pem");
    make_key(kind, Pem::Pkcs8, &ca_key);
    let ca_cert = pki.join("ca-cert.pem");
    let ca_subject = format!("/O=nbd-rs tests/CN=nbd-rs {} test CA", kind.name);
    openssl(&[
        "req",
        "-new",
        "-x509",
        "-key",
        path_str(&ca_key),
        "-subj",
        &ca_subject,
        "-days",
        "2",
        "-config",
        config,
        "-extensions",
        "ca",
        "-out",
        path_str(&ca_cert),
    ]);

    let key = pki.join("server-key.pem");
    make_key(kind, kind.pem, &key);
    std::fs::copy(&key, pki.join("client-key.pem")).unwrap();
    for (who, subject, serial) in [
        ("server", "/O=nbd-rs tests/CN=localhost", "2"),
        ("client", "/O=nbd-rs tests/CN=nbd-rs test client", "3"),
    ] {
        let request = dir.join(format!("{who}.csr"));
        openssl(&[
            "req",
            "-new",
            "-key",
            path_str(&key),
            "-subj",
            subject,
            "-config",
            config,
            "-out",
            path_str(&request),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&request),
            "-CA",
            path_str(&ca_cert),
            "-CAkey",
            path_str(&ca_key),
            "-set_serial",
            serial,
            "-days",
            "2",
            "-extfile",
            config,
            "-extensions",
            who,
            "-out",
            path_str(&pki.join(format!("{who}-cert.pem"))),
        ]);
    }
    let text = run_ok(
        "openssl",
        &["x509", "-in", path_str(&pki.join("server-cert.pem")), "-noout", "-text"],
    );
    assert_eq!(
        text.contains("Subject Alternative Name"),
        !kind.cn_only,
        "server certificate:\n{text}"
    );
    pki
}

/// A file of `data` in `dir` (each server gets its own copy).
fn disk(dir: &TempDir, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// Reads the whole export through a blocking client and compares it with
/// `data`, then writes a block and reads it back.
fn read_back(uri: &str, data: &[u8], what: &str) {
    let mut c = Client::connect_uri(&NbdUri::parse(uri).unwrap(), ClientConfig::default())
        .unwrap_or_else(|e| panic!("{what}: connecting to {uri}: {e}"));
    assert!(c.negotiated().tls, "{what}: TLS in use");
    assert_eq!(c.size(), data.len() as u64, "{what}: size");
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, 0).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert!(back == data, "{what}: data read back differs");
    let block = pattern(64 * 1024, 99);
    c.write(&block, 128 * 1024)
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut again = vec![0u8; block.len()];
    c.read(&mut again, 128 * 1024)
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert!(again == block, "{what}: written block read back differs");
    c.disconnect().unwrap_or_else(|e| panic!("{what}: disconnect: {e}"));
}

/// The blocking server in a thread of the test, on a Unix socket.
struct InThread {
    server: BlockingServer,
    thread: Option<thread::JoinHandle<std::io::Result<()>>>,
    socket: PathBuf,
}

impl InThread {
    fn start(dir: &TempDir, file: &Path, tls: Arc<nbd_net::rustls::ServerConfig>) -> InThread {
        let socket = dir.socket_path("blocking");
        let listener = UnixListener::bind(&socket).unwrap();
        let storage = Arc::new(FileStorage::open(file, false).unwrap());
        let options = ServerOptions::default()
            .config(ServerConfig::default().tls(TlsPolicy::ForcedTls))
            .tls(Some(tls));
        let server = BlockingServer::new(vec![Export::new("", "TLS keys", storage)], options);
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

/// libnbd and QEMU read back from our servers with `kind`'s key.
fn gnutls_clients_against_our_servers(dir: &TempDir, pki: &Path, data: &[u8], kind: &Kind) {
    let certificates = format!("--tls-certificates={}", path_str(pki));
    let port = free_tcp_port();
    let port_arg = port.to_string();
    let serve_file = disk(dir, "nbd-serve.img", data);
    let serve = Peer::start(
        dir,
        &our_bin("nbd-serve"),
        &[
            "--tls=require",
            &certificates,
            "--tls-verify-peer",
            "-p",
            &port_arg,
            path_str(&serve_file),
        ],
        Endpoint::Tcp(([127, 0, 0, 1], port).into()),
    );
    let server_tls = nbd_net::ServerTlsOptions::from_dir(pki, true)
        .build()
        .unwrap_or_else(|e| panic!("{}: the blocking server's TLS: {e}", kind.name));
    let blocking = InThread::start(dir, &disk(dir, "blocking.img", data), server_tls);

    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", path_str(pki));
    let targets = [
        (
            "nbd-serve over TCP",
            // libnbd checks the server's certificate for the URI's host.
            format!(
                "nbds://localhost:{port}/?tls-certificates={}",
                percent_encode(path_str(pki))
            ),
            format!("driver=nbd,server.type=inet,server.host=localhost,server.port={port},tls-creds=tls0"),
        ),
        (
            "the blocking server",
            format!(
                "nbds+unix:///?socket={}&tls-certificates={}",
                percent_encode(path_str(&blocking.socket)),
                percent_encode(path_str(pki))
            ),
            format!(
                "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
                path_str(&blocking.socket)
            ),
        ),
    ];
    for (server, uri, qemu_opts) in &targets {
        let what = format!("{} key, {server}", kind.name);
        let json = run_ok("nbdinfo", &["--json", uri]);
        assert!(json.contains("\"TLS\": true"), "{what}: nbdinfo:\n{json}");
        assert!(
            json.contains(&format!("\"export-size\": {}", data.len())),
            "{what}: {json}"
        );

        let copied = dir.join("nbdcopy.img");
        run_ok("nbdcopy", &["--", uri, path_str(&copied)]);
        assert!(
            std::fs::read(&copied).unwrap() == data,
            "{what}: nbdcopy read back other data"
        );

        let converted = dir.join("qemu-img.img");
        run_ok(
            "qemu-img",
            &[
                "convert",
                "--object",
                &creds,
                "--image-opts",
                qemu_opts,
                "-O",
                "raw",
                path_str(&converted),
            ],
        );
        assert!(
            std::fs::read(&converted).unwrap() == data,
            "{what}: qemu-img read back other data"
        );
    }
    drop(serve);
}

/// Our clients read back from nbdkit and qemu-nbd with `kind`'s key.
fn our_clients_against_gnutls_servers(dir: &TempDir, pki: &Path, data: &[u8], kind: &Kind) {
    let certificates = format!("--tls-certificates={}", path_str(pki));
    let kit_file = disk(dir, "nbdkit.img", data);
    let kit = nbdkit_tcp(
        dir,
        &[
            "--tls=require",
            &certificates,
            "--tls-verify-peer",
            "file",
            path_str(&kit_file),
        ],
    );
    let Endpoint::Tcp(addr) = kit.endpoint() else {
        panic!("nbdkit_tcp gave {:?}", kit.endpoint());
    };
    let query = format!("?tls-certificates={}", percent_encode(path_str(pki)));
    // Over TCP the URI's host is the name checked.
    let kit_uri = format!("nbds://localhost:{}/{query}", addr.port());

    let qemu_file = disk(dir, "qemu-nbd.img", data);
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", path_str(pki));
    let qemu = qemu_nbd(
        dir,
        &[
            "--object",
            &object,
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            path_str(&qemu_file),
        ],
    );
    // Over a Unix socket, tls-hostname names the host to check.
    let qemu_uri = |host: &str| {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}&tls-hostname={host}",
            percent_encode(path_str(qemu.socket())),
            percent_encode(path_str(pki))
        )
    };

    for (server, uri) in [("nbdkit", kit_uri.clone()), ("qemu-nbd", qemu_uri("localhost"))] {
        let what = format!("{} key, {server}", kind.name);
        read_back(&uri, data, &what);

        let json = run_ok(&our_bin("nbd-info"), &["--json", &uri]);
        assert!(json.contains("\"TLS\": true"), "{what}: nbd-info:\n{json}");
        assert!(
            json.contains(&format!("\"export-size\": {}", data.len())),
            "{what}: {json}"
        );
    }

    // The async client (another TLS runtime, the same credentials).
    let back = nbd_smol::block_on(async {
        let c = nbd_smol::Client::connect(&kit_uri)
            .await
            .unwrap_or_else(|e| panic!("{}: async client to nbdkit: {e}", kind.name));
        let (r, back) = c.read(vec![0; 128 * 1024], 0).await;
        r.unwrap();
        c.disconnect().await.unwrap();
        back
    });
    assert!(back[..] == data[..128 * 1024], "{}: async read back differs", kind.name);

    // Another host name is refused; for a CN-only certificate the error
    // says that its common name was what counted.
    match Client::connect_uri(
        &NbdUri::parse(&qemu_uri("other.example.test")).unwrap(),
        ClientConfig::default(),
    ) {
        Err(Error::TlsHandshake(e)) => {
            let e = e.to_string();
            assert!(e.contains("not valid for name \"other.example.test\""), "{e}");
            assert_eq!(e.contains("common name \"localhost\""), kind.cn_only, "{e}");
        }
        other => panic!(
            "{}: a certificate for localhost accepted for another name: {other:?}",
            kind.name
        ),
    }
}

fn keys_interoperate(kind: Kind) {
    if !require_peers(&["openssl", "nbdinfo", "nbdcopy", "qemu-img", "nbdkit", "qemu-nbd"]) {
        return;
    }
    let dir = TempDir::new();
    let pki = make_pki(&dir, &kind);
    let data = pattern(DISK, kind.name.len() as u64);
    gnutls_clients_against_our_servers(&dir, &pki, &data, &kind);
    our_clients_against_gnutls_servers(&dir, &pki, &data, &kind);
}

#[test]
fn rsa_2048_pkcs8() {
    keys_interoperate(Kind {
        name: "rsa2048",
        genpkey: &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        pem: Pem::Pkcs8,
        cn_only: false,
    });
}

#[test]
fn rsa_2432_pkcs1_cn_only_as_the_reference_test_suite() {
    keys_interoperate(Kind {
        name: "rsa2432",
        genpkey: &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2432"],
        pem: Pem::Pkcs1,
        cn_only: true,
    });
}

#[test]
fn rsa_3072_pkcs1() {
    keys_interoperate(Kind {
        name: "rsa3072",
        genpkey: &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
        pem: Pem::Pkcs1,
        cn_only: false,
    });
}

#[test]
fn rsa_4096_pkcs8_cn_only() {
    keys_interoperate(Kind {
        name: "rsa4096",
        genpkey: &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"],
        pem: Pem::Pkcs8,
        cn_only: true,
    });
}

#[test]
fn ecdsa_p256_sec1() {
    keys_interoperate(Kind {
        name: "p256",
        genpkey: &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        pem: Pem::Sec1,
        cn_only: false,
    });
}

#[test]
fn ecdsa_p384_pkcs8() {
    keys_interoperate(Kind {
        name: "p384",
        genpkey: &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
        pem: Pem::Pkcs8,
        cn_only: false,
    });
}

#[test]
fn ed25519_pkcs8_cn_only() {
    keys_interoperate(Kind {
        name: "ed25519",
        genpkey: &["-algorithm", "ed25519"],
        pem: Pem::Pkcs8,
        cn_only: true,
    });
}
