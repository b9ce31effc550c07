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
//! # Keys
//!
//! The crypto provider is rustls' `aws-lc-rs` one (TLS 1.2 and 1.3, as the
//! NBD spec asks: "MUST support TLS version 1.2, SHOULD support any later
//! versions"). It takes the keys GnuTLS-based peers (nbd-server, nbdkit,
//! qemu-nbd, libnbd) are set up with: RSA of any size from 2048 to 8192
//! bits (such as the 2432-bit key of the reference NBD test suite, which
//! rustls' `ring` provider refuses), ECDSA on P-256, P-384 and P-521, and
//! Ed25519. A key file is PEM: PKCS#8 (`BEGIN PRIVATE KEY`), PKCS#1
//! (`BEGIN RSA PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`, with or
//! without the `EC PARAMETERS` block `openssl ecparam -genkey` writes
//! before it). Encrypted keys, RSA keys under 2048 bits, DSA and Ed448
//! keys are refused with an error naming the file.
//!
//! # Checking the server's name
//!
//! The server's certificate must chain to the CA (webpki, strict: validity
//! dates, basic constraints, the TLS server extended key usage) and, when
//! a name is known (the URI's host or its `tls-hostname`), be valid for
//! that name. The name is matched against the certificate's
//! subjectAltName DNS names and IP addresses. A certificate with no DNS or
//! IP entry there (as `certtool` makes from a template with only
//! `cn = HOST`, like the reference NBD test suite's) is checked against its
//! single subject common name instead, as RFC 6125 (section 6.4.4) and
//! GnuTLS do: the CN is compared to the name without regard to case, a
//! `*.` wildcard standing for exactly one leftmost label, and an IP
//! address compared as an address. A certificate with several common names
//! is refused then.
//!
//! Over a Unix socket without `tls-hostname` there is no name to check, so
//! only the chain is verified: a middle way between libnbd 1.14, which
//! checks nothing there, and QEMU 10, which refuses to connect ("No
//! hostname for certificate validation"). `tls-verify-peer=0` turns the
//! check off altogether.
//!
//! # Not supported
//!
//! TLS-PSK (nbdkit's `--tls-psk`, libnbd's `tls-psk-file`) and anonymous
//! TLS: rustls implements neither external pre-shared keys nor anonymous
//! key exchange, so `tls-type=psk` is refused with a clear error.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nbd_proto::client::TlsMode;
use nbd_proto::uri::{NbdUri, Transport};

#[cfg(feature = "tls")]
mod x509;
#[cfg(feature = "tls")]
pub use x509::*;

#[cfg(not(feature = "tls"))]
mod none;
#[cfg(not(feature = "tls"))]
pub use none::*;

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
    /// A key file holds a private key the crypto provider cannot use
    /// (encrypted, or of an unsupported type or size).
    #[error("{}: {message}", path.display())]
    UnusableKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with the key.
        message: String,
    },
    /// A certificate and its key do not go together (or rustls refused the
    /// pair for another reason).
    #[cfg(feature = "tls")]
    #[error("{} with {}: {error}", cert.display(), key.display())]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        error: rustls::Error,
    },
    /// No CA certificate to verify the peer against was found.
    #[error("no CA certificate to verify the server against: {0}")]
    NoTrustAnchors(String),
    /// Only one of a certificate and its key was given.
    #[error("a TLS certificate needs its key and a key its certificate ({0})")]
    CertWithoutKey(String),
    /// The URI asks for a kind of TLS authentication rustls cannot do.
    #[error(
        "tls-type={0} is not supported: only X.509 certificates are (rustls has neither TLS-PSK nor anonymous TLS)"
    )]
    UnsupportedType(String),
    /// The name to check the server's certificate for is not a valid DNS
    /// name or IP address.
    #[error("invalid TLS hostname {0:?}")]
    BadHostname(String),
    /// rustls refused the configuration (e.g. a key that does not match
    /// its certificate).
    #[cfg(feature = "tls")]
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// TLS was asked for, but this build has no TLS (the cargo feature
    /// `tls` of `nbd-net`, on by default, is off).
    #[cfg(not(feature = "tls"))]
    #[error("TLS is not available: built without the cargo feature \"tls\"")]
    NotBuilt,
    /// The certificate verifier could not be built.
    #[error("TLS certificate verifier: {0}")]
    Verifier(String),
}

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
        if let Some(t) = &uri.tls_type
            && t != "x509"
        {
            return Err(TlsError::UnsupportedType(t.clone()));
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
    // Without the `tls` feature `ClientTls` has no values.
    #[cfg_attr(not(feature = "tls"), allow(unreachable_code, unused_mut))]
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
