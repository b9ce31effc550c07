//! TLS credentials for NBD clients and servers, in one place for both
//! runtimes: [rustls] configurations built from the certificate files and
//! directories that libnbd, nbdkit and QEMU use.
//!
//! - A client's credentials come from a directory as libnbd's
//!   `tls-certificates=DIR` URI parameter names it: `ca-cert.pem` (the CA
//!   the server's certificate must chain to) and, optionally,
//!   `client-cert.pem` with `client-key.pem` (a client certificate for
//!   servers that ask for one). Without a directory, libnbd's default
//!   directories (`$HOME/.pki/libnbd`, `$HOME/.config/pki/libnbd`, or
//!   `/etc/pki/libnbd` for root) and then the system's trust store are
//!   used. See [`ClientTlsOptions`] and [`ClientTls`].
//! - A server's come from `--tls-cert`/`--tls-key` files or from a
//!   directory as nbdkit's `--tls-certificates=DIR` and QEMU's
//!   `tls-creds-x509,dir=DIR` take it: `server-cert.pem`,
//!   `server-key.pem` and `ca-cert.pem`. See [`ServerTlsOptions`].
//!
//! The server's certificate is checked against the CA and, when a name is
//! known (the URI's host or its `tls-hostname`), against that name. Over a
//! Unix socket without `tls-hostname` there is no name to check, so only
//! the chain is verified: a middle way between libnbd 1.14, which checks
//! nothing there, and QEMU 10, which refuses to connect ("No hostname for
//! certificate validation"). `tls-verify-peer=0` turns the check off
//! altogether.
//!
//! The crypto provider is rustls' `ring` one (TLS 1.2 and 1.3, as the NBD
//! spec asks: "MUST support TLS version 1.2, SHOULD support any later
//! versions"). Private keys may be PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nbd_proto::client::TlsMode;
use nbd_proto::uri::{NbdUri, Transport};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use rustls;

/// The CA certificate's file name in a certificates directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The client certificate's file name in a certificates directory.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client key's file name in a certificates directory.
pub const CLIENT_KEY: &str = "client-key.pem";
/// The server certificate's file name in a certificates directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server key's file name in a certificates directory.
pub const SERVER_KEY: &str = "server-key.pem";

/// System CA bundles, tried in order when no CA is given (Debian/Ubuntu,
/// Fedora/RHEL, openSUSE, Alpine/BSD).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why TLS credentials could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{}: {message}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A certificate file holds no certificate.
    #[error("{}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    /// A key file holds no private key.
    #[error("{}: no private key in the file", .0.display())]
    NoPrivateKey(PathBuf),
    /// No CA certificate to verify the peer against was found.
    #[error("no CA certificate to verify the server against: {0}")]
    NoTrustAnchors(String),
    /// Only one of a certificate and its key was given.
    #[error("a TLS certificate needs its key and a key its certificate ({0})")]
    CertWithoutKey(String),
    /// The URI asks for a kind of TLS authentication rustls cannot do.
    #[error("tls-type={0} is not supported (only X.509 certificates are)")]
    UnsupportedType(String),
    /// The name to check the server's certificate for is not a valid DNS
    /// name or IP address.
    #[error("invalid TLS hostname {0:?}")]
    BadHostname(String),
    /// rustls refused the configuration (e.g. a key that does not match
    /// its certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The certificate verifier could not be built.
    #[error("TLS certificate verifier: {0}")]
    Verifier(String),
}

/// The crypto provider used throughout: rustls' `ring` provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        message: match e {
            rustls::pki_types::pem::Error::Io(e) => e.to_string(),
            e => e.to_string(),
        },
    }
}

/// Reads every certificate of a PEM file (in order: a chain's leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey(path.to_owned()),
        e => pem_error(path, e),
    })
}

/// Reads the CA certificates of a PEM file into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The system's trust store: `$SSL_CERT_FILE`, else the first CA bundle
/// found in the usual places.
fn system_roots() -> Result<RootCertStore, TlsError> {
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let candidates = env.into_iter().chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from));
    for path in candidates {
        if !path.is_file() {
            continue;
        }
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&path).map_err(|e| pem_error(&path, e))?;
        // A system bundle may hold certificates webpki cannot parse; skip
        // those rather than refuse them all.
        roots.add_parsable_certificates(certs.filter_map(Result::ok));
        if !roots.is_empty() {
            return Ok(roots);
        }
    }
    Err(TlsError::NoTrustAnchors(format!(
        "give tls-certificates=DIR with {CA_CERT}, or install a system CA bundle"
    )))
}

/// libnbd's default certificate directories, in the order it tries them.
fn default_certificate_dirs() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    match home {
        Some(home) if !is_root => vec![home.join(".pki/libnbd"), home.join(".config/pki/libnbd")],
        _ => vec![PathBuf::from("/etc/pki/libnbd")],
    }
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// How a client authenticates the server and itself: the URI's TLS
/// parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// `tls-certificates=DIR`: [`CA_CERT`], and optionally [`CLIENT_CERT`]
    /// with [`CLIENT_KEY`]. `None`: libnbd's default directories, then the
    /// system trust store.
    pub certificates: Option<PathBuf>,
    /// The name the server's certificate must be valid for (`tls-hostname`,
    /// else the URI's host). `None` (a Unix socket): the chain is verified
    /// but no name is checked.
    pub hostname: Option<String>,
    /// `tls-verify-peer`: verify the server's certificate (the default).
    /// `false` accepts any certificate, as libnbd does.
    pub verify_peer: bool,
}

impl Default for ClientTlsOptions {
    fn default() -> Self {
        ClientTlsOptions {
            certificates: None,
            hostname: None,
            verify_peer: true,
        }
    }
}

impl ClientTlsOptions {
    /// The options an NBD URI gives: `tls-certificates`, `tls-hostname`
    /// (else the host of an `nbd://`/`nbds://` URI) and `tls-verify-peer`.
    /// `tls-type` other than `x509` is refused: rustls has neither
    /// anonymous nor PSK authentication.
    pub fn from_uri(uri: &NbdUri) -> Result<ClientTlsOptions, TlsError> {
        if let Some(t) = &uri.tls_type {
            if t != "x509" {
                return Err(TlsError::UnsupportedType(t.clone()));
            }
        }
        let hostname = uri.tls_hostname.clone().or_else(|| match &uri.transport {
            Transport::Tcp { host, .. } => Some(host.clone()),
            Transport::Unix { .. } => None,
        });
        Ok(ClientTlsOptions {
            certificates: uri.tls_certificates.as_ref().map(PathBuf::from),
            hostname,
            verify_peer: uri.tls_verify_peer,
        })
    }

    /// Loads the files and builds the rustls configuration.
    pub fn build(&self) -> Result<ClientTls, TlsError> {
        let provider = provider();
        // The directory in use: the given one, else the first default one
        // that has a CA certificate.
        let dir = match &self.certificates {
            Some(d) => Some(d.clone()),
            None => default_certificate_dirs()
                .into_iter()
                .find(|d| d.join(CA_CERT).is_file()),
        };
        let ca = dir.as_ref().map(|d| d.join(CA_CERT)).filter(|p| p.is_file());
        let server_name = match &self.hostname {
            Some(h) => ServerName::try_from(h.clone()).map_err(|_| TlsError::BadHostname(h.clone()))?,
            // No name is checked; an address sends no SNI.
            None => ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into()),
        };
        let builder =
            rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let verifier: Arc<dyn ServerCertVerifier> = if self.verify_peer {
            let roots = match &ca {
                Some(ca) => load_roots(ca)?,
                None => system_roots()?,
            };
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            Arc::new(NbdServerVerifier {
                inner: webpki,
                check_name: self.hostname.is_some(),
            })
        } else {
            Arc::new(AcceptAnyServer { provider })
        };
        let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
        let (cert, key) = match &dir {
            Some(d) => (d.join(CLIENT_CERT), d.join(CLIENT_KEY)),
            None => (PathBuf::new(), PathBuf::new()),
        };
        let config = if dir.is_some() && cert.is_file() && key.is_file() {
            builder.with_client_auth_cert(load_certs(&cert)?, load_key(&key)?)?
        } else {
            builder.with_no_client_auth()
        };
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// A client's TLS setup, ready for connections: cheap to clone, and one
/// value can serve many connections (which then share a session cache).
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClientTls {
    /// [`ClientTlsOptions::from_uri`], then [`ClientTlsOptions::build`].
    pub fn from_uri(uri: &NbdUri) -> Result<ClientTls, TlsError> {
        ClientTlsOptions::from_uri(uri)?.build()
    }

    /// A setup from a rustls configuration of the caller's own and the
    /// name to send (SNI) and to verify.
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> ClientTls {
        ClientTls { config, server_name }
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<rustls::ClientConfig> {
        &self.config
    }

    /// The server name given to rustls.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// A new client connection (for a blocking stream).
    pub fn connection(&self) -> Result<rustls::ClientConnection, TlsError> {
        Ok(rustls::ClientConnection::new(
            self.config.clone(),
            self.server_name.clone(),
        )?)
    }
}

/// A client's TLS credentials, loaded the first time a server accepts
/// `NBD_OPT_STARTTLS` (so a client that merely allows TLS never touches
/// certificate files when the server does not offer it), then kept for
/// every later connection made with a clone of this value.
#[derive(Debug, Clone)]
pub struct LazyClientTls {
    options: ClientTlsOptions,
    built: Arc<Mutex<Option<ClientTls>>>,
    /// The URI's TLS parameters were refused; reported if TLS is used.
    refused: Option<TlsError>,
}

impl Default for LazyClientTls {
    /// libnbd's defaults: its certificate directories, else the system
    /// trust store; no name is checked.
    fn default() -> Self {
        LazyClientTls::new(ClientTlsOptions::default())
    }
}

impl LazyClientTls {
    /// Credentials to load from `options` when first needed.
    pub fn new(options: ClientTlsOptions) -> LazyClientTls {
        LazyClientTls {
            options,
            built: Arc::new(Mutex::new(None)),
            refused: None,
        }
    }

    /// Credentials from an NBD URI's TLS parameters; the files are read
    /// when needed. An unsupported `tls-type` is refused now when the URI
    /// asks for TLS, else by [`LazyClientTls::get`] if TLS is used after
    /// all.
    pub fn from_uri(uri: &NbdUri) -> Result<LazyClientTls, TlsError> {
        match ClientTlsOptions::from_uri(uri) {
            Ok(o) => Ok(LazyClientTls::new(o)),
            Err(e) if uri.tls == TlsMode::Off => Ok(LazyClientTls {
                refused: Some(e),
                ..LazyClientTls::default()
            }),
            Err(e) => Err(e),
        }
    }

    /// Credentials built already.
    pub fn ready(tls: ClientTls) -> LazyClientTls {
        LazyClientTls {
            options: ClientTlsOptions::default(),
            built: Arc::new(Mutex::new(Some(tls))),
            refused: None,
        }
    }

    /// The options the credentials are (or will be) built from.
    pub fn options(&self) -> &ClientTlsOptions {
        &self.options
    }

    /// The credentials, built now if this is the first use.
    pub fn get(&self) -> Result<ClientTls, TlsError> {
        if let Some(e) = &self.refused {
            return Err(e.clone());
        }
        let mut g = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &*g {
            return Ok(t.clone());
        }
        let t = self.options.build()?;
        *g = Some(t.clone());
        Ok(t)
    }
}

/// webpki verification of the server, with the name check skipped when no
/// name is known (a Unix socket without `tls-hostname`).
#[derive(Debug)]
struct NbdServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for NbdServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // webpki checks the name last, after the chain: a name
            // mismatch means everything else was fine.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `tls-verify-peer=0`: any certificate is accepted (the handshake's
/// signatures are still checked, so the connection is encrypted to whoever
/// holds the certificate's key).
struct AcceptAnyServer {
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for AcceptAnyServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AcceptAnyServer")
    }
}

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// A server's certificate, key and (optionally) the CA its clients'
/// certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsOptions {
    /// The server's certificate (chain), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// When set, clients must present a certificate that chains to a CA
    /// in this PEM file.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsOptions {
    /// The files of a certificates directory as nbdkit's
    /// `--tls-certificates=DIR` and QEMU's `tls-creds-x509,dir=DIR` take
    /// it: [`SERVER_CERT`], [`SERVER_KEY`] and, with `verify_peer` (as
    /// nbdkit's `--tls-verify-peer`), [`CA_CERT`] to verify clients with.
    pub fn from_dir(dir: &Path, verify_peer: bool) -> ServerTlsOptions {
        ServerTlsOptions {
            cert: dir.join(SERVER_CERT),
            key: dir.join(SERVER_KEY),
            client_ca: verify_peer.then(|| dir.join(CA_CERT)),
        }
    }

    /// Loads the files and builds the rustls configuration.
    pub fn build(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = provider();
        let builder =
            rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let roots = load_roots(ca)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(load_certs(&self.cert)?, load_key(&self.key)?)?;
        Ok(Arc::new(config))
    }
}

/// Applies a tool's `--tls=off|allow|require` flag to a URI: `allow` and
/// `require` ask for TLS on an `nbd://` or `nbd+unix://` URI (as its
/// `tls=` parameter would), `off` keeps TLS off. A URI that requires TLS
/// (`nbds`, `nbds+unix`, `tls=require`) keeps requiring it, so
/// `--tls=off` with one is an error.
pub fn apply_tls_flag(uri: &mut NbdUri, flag: TlsMode) -> Result<(), String> {
    match (uri.tls, flag) {
        (TlsMode::Require, TlsMode::Off) => Err(format!(
            "{}: --tls=off contradicts the URI, which requires TLS",
            uri.to_uri_string()
        )),
        (TlsMode::Require, _) => Ok(()),
        (_, flag) => {
            uri.tls = flag;
            Ok(())
        }
    }
}

/// The error for a read that fails right after a TLS handshake, before
/// the server said anything over TLS: with TLS 1.3 the client's handshake
/// ends before the server has checked the client's certificate, so a
/// server that refuses it (or has none to check it against) just closes
/// the connection, and this is where the client notices.
pub fn refused_after_handshake(e: io::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!(
            "the server closed the connection right after the TLS handshake (did it refuse our client certificate?): {e}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> NbdUri {
        NbdUri::parse(s).unwrap()
    }

    #[test]
    fn options_from_uris() {
        let o = ClientTlsOptions::from_uri(&uri("nbds://example.com/disk?tls-certificates=/etc/x")).unwrap();
        assert_eq!(o.certificates, Some(PathBuf::from("/etc/x")));
        assert_eq!(o.hostname.as_deref(), Some("example.com"));
        assert!(o.verify_peer);

        let o = ClientTlsOptions::from_uri(&uri("nbds+unix:///?socket=/s&tls-hostname=srv&tls-verify-peer=0")).unwrap();
        assert_eq!(o.hostname.as_deref(), Some("srv"));
        assert!(!o.verify_peer);

        // A Unix socket has no name to check.
        let o = ClientTlsOptions::from_uri(&uri("nbds+unix:///?socket=/s")).unwrap();
        assert_eq!(o.hostname, None);

        for t in ["psk", "anon"] {
            let e = ClientTlsOptions::from_uri(&uri(&format!("nbds+unix:///?socket=/s&tls-type={t}"))).unwrap_err();
            assert!(matches!(e, TlsError::UnsupportedType(_)), "{e}");
        }
        assert!(ClientTlsOptions::from_uri(&uri("nbds+unix:///?socket=/s&tls-type=x509")).is_ok());
        // Without TLS in the URI, the refusal waits until TLS is used.
        let lazy = LazyClientTls::from_uri(&uri("nbd+unix:///?socket=/s&tls-type=psk")).unwrap();
        assert!(matches!(lazy.get(), Err(TlsError::UnsupportedType(_))));
        assert!(LazyClientTls::from_uri(&uri("nbds+unix:///?socket=/s&tls-type=psk")).is_err());
    }

    #[test]
    fn tls_flags() {
        let mut u = uri("nbd://h/");
        apply_tls_flag(&mut u, TlsMode::Allow).unwrap();
        assert_eq!(u.tls, TlsMode::Allow);
        let mut u = uri("nbds://h/");
        apply_tls_flag(&mut u, TlsMode::Allow).unwrap();
        assert_eq!(u.tls, TlsMode::Require);
        assert!(apply_tls_flag(&mut u, TlsMode::Off).is_err());
        let mut u = uri("nbd+unix:///?socket=/s&tls=allow");
        apply_tls_flag(&mut u, TlsMode::Off).unwrap();
        assert_eq!(u.tls, TlsMode::Off);
    }

    #[test]
    fn missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("nbd-tls-missing-{}", std::process::id()));
        let e = ServerTlsOptions::from_dir(&dir, false).build().unwrap_err();
        assert!(e.to_string().contains(SERVER_CERT), "{e}");
        let o = ClientTlsOptions {
            certificates: Some(dir.clone()),
            hostname: Some("bad name!".into()),
            verify_peer: true,
        };
        assert!(matches!(o.build(), Err(TlsError::BadHostname(_))));
    }

    #[test]
    fn garbage_pem_is_refused() {
        let dir = std::env::temp_dir().join(format!("nbd-tls-garbage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("c.pem");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        assert!(matches!(load_certs(&cert), Err(TlsError::NoCertificate(_))));
        assert!(matches!(load_key(&cert), Err(TlsError::NoPrivateKey(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn verify_peer_off_needs_no_ca() {
        let o = ClientTlsOptions {
            certificates: Some(PathBuf::from("/nonexistent")),
            hostname: Some("localhost".into()),
            verify_peer: false,
        };
        let tls = o.build().unwrap();
        assert!(tls.connection().is_ok());
    }
}
