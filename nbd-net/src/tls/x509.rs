//! The credentials themselves, with rustls (cargo feature `tls`): see
//! the [parent module](super).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_proto::uri::NbdUri;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use x509_cert::Certificate;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::{Decode, Tag, Tagged};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::{CA_CERT, CLIENT_CERT, CLIENT_KEY, ClientTlsOptions, SERVER_CERT, SERVER_KEY, TlsError};

pub use rustls;

/// System CA bundles, tried in order when no CA is given (Debian/Ubuntu,
/// Fedora/RHEL, openSUSE, Alpine/BSD).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The crypto provider used throughout: rustls' `aws-lc-rs` provider,
/// which signs with RSA keys of 2048 to 8192 bits (any size, not only
/// multiples of 512), ECDSA P-256, P-384 and P-521 keys and Ed25519 keys.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
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

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1) and
/// checks that the crypto provider can sign with it, so that an unusable
/// key is reported with its file's name.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let unusable = |message: String| TlsError::UnusableKey {
        path: path.to_owned(),
        message,
    };
    let key = match PrivateKeyDer::from_pem_file(path) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            // Say why when the file has a key of a kind rustls skips.
            return Err(if pem_has_section(path, "ENCRYPTED PRIVATE KEY") {
                unusable(
                    "the private key is encrypted; decrypt it first (e.g. `openssl pkey -in KEY -out PLAIN`)".into(),
                )
            } else if pem_has_section(path, "DSA PRIVATE KEY") {
                unusable("DSA keys are not supported (use RSA, ECDSA or Ed25519)".into())
            } else {
                TlsError::NoPrivateKey(path.to_owned())
            });
        }
        Err(e) => return Err(pem_error(path, e)),
    };
    if let Err(e) = provider().key_provider.load_private_key(key.clone_key()) {
        return Err(unusable(format!(
            "unusable {} private key ({e}); supported are RSA keys of 2048 to 8192 bits, \
             ECDSA keys on P-256, P-384 or P-521, and Ed25519 keys",
            match &key {
                PrivateKeyDer::Pkcs1(_) => "PKCS#1",
                PrivateKeyDer::Sec1(_) => "SEC1",
                _ => "PKCS#8",
            }
        )));
    }
    Ok(key)
}

/// Whether a PEM file has a section with this label (`-----BEGIN LABEL-----`).
fn pem_has_section(path: &Path, label: &str) -> bool {
    std::fs::read(path).is_ok_and(|pem| {
        let begin = format!("-----BEGIN {label}-----");
        pem.windows(begin.len()).any(|w| w == begin.as_bytes())
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

impl ClientTlsOptions {
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
            if roots.is_empty() {
                return Err(TlsError::NoTrustAnchors(
                    "the CA file holds no usable certificate".into(),
                ));
            }
            Arc::new(NbdServerVerifier {
                roots: Arc::new(roots),
                provider: provider.clone(),
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
            builder
                .with_client_auth_cert(load_certs(&cert)?, load_key(&key)?)
                .map_err(|error| TlsError::CertKey { cert, key, error })?
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

/// The server's certificate check: the chain by webpki, then the name,
/// by webpki against the subjectAltName and, for a certificate without
/// DNS or IP entries there, against its common name ([`common_name_check`]).
/// The name check is skipped when no name is known (a Unix socket without
/// `tls-hostname`).
#[derive(Debug)]
struct NbdServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    check_name: bool,
}

impl ServerCertVerifier for NbdServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if !self.check_name {
            return Ok(ServerCertVerified::assertion());
        }
        match verify_server_name(&cert, server_name) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(
                e @ rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ),
            ) => match common_name_check(end_entity, server_name) {
                CommonName::NotApplicable => Err(e),
                CommonName::Matches => Ok(ServerCertVerified::assertion()),
                CommonName::Refused(e) => Err(e),
            },
            Err(e) => Err(e),
        }
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

/// The outcome of [`common_name_check`].
#[derive(Debug)]
enum CommonName {
    /// The certificate names DNS names or IP addresses in its
    /// subjectAltName (or cannot be read): those alone count, and webpki
    /// has found none of them to match.
    NotApplicable,
    /// The certificate has no subjectAltName DNS or IP entry and its one
    /// common name matches the name.
    Matches,
    /// The certificate has no subjectAltName DNS or IP entry and its
    /// common name does not match (or it has none, or several).
    Refused(rustls::Error),
}

/// `id-at-commonName` (2.5.4.3).
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// The name check of a certificate without subjectAltName DNS or IP
/// entries, as RFC 6125 (6.4.4) allows and GnuTLS does: the subject's
/// common name, which must be the only one, is matched against the name
/// ([`common_name_matches`]). Called only for a certificate webpki has
/// verified up to its name.
fn common_name_check(end_entity: &CertificateDer<'_>, server_name: &ServerName<'_>) -> CommonName {
    // A certificate webpki took but x509-cert cannot read gets no leniency.
    let Ok(cert) = Certificate::from_der(end_entity.as_ref()) else {
        return CommonName::NotApplicable;
    };
    let tbs = cert.tbs_certificate();
    match tbs.get_extension::<SubjectAltName>() {
        Ok(None) => {}
        Ok(Some((_, san))) => {
            let names_hosts = san
                .0
                .iter()
                .any(|n| matches!(n, GeneralName::DnsName(_) | GeneralName::IpAddress(_)));
            if names_hosts {
                return CommonName::NotApplicable;
            }
        }
        // Malformed or repeated: not a certificate to be lenient with.
        Err(_) => return CommonName::NotApplicable,
    }
    let cns: Vec<_> = tbs
        .subject()
        .as_ref()
        .iter()
        .flat_map(|rdn| rdn.iter())
        .filter(|atv| atv.oid == COMMON_NAME)
        .collect();
    let refused = |why: String| {
        CommonName::Refused(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(NameCheckError(why)),
        ))))
    };
    let expected = server_name.to_str();
    let cn = match cns.as_slice() {
        [] => {
            return refused(format!(
                "certificate not valid for name {expected:?}: it names no host (no subjectAltName DNS name or IP address, no common name)"
            ));
        }
        [one] => one,
        _ => {
            return refused(format!(
                "certificate not valid for name {expected:?}: it has no subjectAltName DNS name or IP address and {} common names, where RFC 6125 wants exactly one",
                cns.len()
            ));
        }
    };
    let Some(cn) = directory_string(cn.value.tag(), cn.value.value()) else {
        return refused(format!(
            "certificate not valid for name {expected:?}: it has no subjectAltName DNS name or IP address and its common name is not a readable string"
        ));
    };
    if common_name_matches(&cn, server_name) {
        CommonName::Matches
    } else {
        CommonName::Refused(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForNameContext {
                expected: server_name.to_owned(),
                presented: vec![format!(
                    "the common name {cn:?} (it has no subjectAltName DNS name or IP address)"
                )],
            },
        ))
    }
}

/// The text of an X.520 DirectoryString (or IA5String) attribute value;
/// `None` for other types or text that is not valid in its encoding.
fn directory_string(tag: Tag, bytes: &[u8]) -> Option<String> {
    match tag {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::VisibleString | Tag::TeletexString => {
            std::str::from_utf8(bytes).ok().map(str::to_owned)
        }
        Tag::BmpString => {
            if !bytes.len().is_multiple_of(2) {
                return None;
            }
            let units = bytes.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units).collect::<Result<String, _>>().ok()
        }
        _ => None,
    }
}

/// Whether a certificate's common name names the server: for a DNS name,
/// equal without regard to ASCII case (a trailing dot ignored), or
/// `*.REST` where the name is one label followed by `.REST` and `REST`
/// has at least two labels; for an IP address, the same address.
fn common_name_matches(cn: &str, server_name: &ServerName<'_>) -> bool {
    if !cn.is_ascii() || cn.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return false;
    }
    match server_name {
        ServerName::DnsName(name) => {
            let name = name.as_ref();
            let name = name.strip_suffix('.').unwrap_or(name);
            let cn = cn.strip_suffix('.').unwrap_or(cn);
            if cn.eq_ignore_ascii_case(name) {
                return !cn.contains('*');
            }
            let Some(rest) = cn.strip_prefix("*.") else {
                return false;
            };
            if rest.contains('*') || !rest.contains('.') || rest.split('.').any(str::is_empty) {
                return false;
            }
            match name.split_once('.') {
                Some((label, name_rest)) => !label.is_empty() && name_rest.eq_ignore_ascii_case(rest),
                None => false,
            }
        }
        ServerName::IpAddress(ip) => cn.parse::<IpAddr>().is_ok_and(|a| a == IpAddr::from(*ip)),
        _ => false,
    }
}

/// Why a certificate's common name could not stand for its host name.
#[derive(Debug)]
struct NameCheckError(String);

impl fmt::Display for NameCheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameCheckError {}

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
        let config = builder
            .with_single_cert(load_certs(&self.cert)?, load_key(&self.key)?)
            .map_err(|error| TlsError::CertKey {
                cert: self.cert.clone(),
                key: self.key.clone(),
                error,
            })?;
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
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

    // -----------------------------------------------------------------
    // Keys and certificates made by OpenSSL (testdata/make.sh)
    // -----------------------------------------------------------------

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
    }

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("nbd-net-tls-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        /// Copies a test file into the directory under another name.
        fn put(&self, name: &str, from: &str) {
            std::fs::copy(testdata(from), self.0.join(name)).unwrap();
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Moves what `from` has to send into `to`.
    fn transfer(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Result<(), rustls::Error> {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rest = &buf[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// A TLS handshake between a client and a server in memory, then a
    /// message each way; the first error either side has.
    fn handshake(client: &ClientTls, server: Arc<rustls::ServerConfig>) -> Result<(), rustls::Error> {
        use std::io::{Read, Write};
        let mut c = rustls::Connection::Client(client.connection().unwrap());
        let mut s = rustls::Connection::Server(rustls::ServerConnection::new(server)?);
        for _ in 0..10 {
            transfer(&mut c, &mut s)?;
            transfer(&mut s, &mut c)?;
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "the handshake did not finish"
        );
        c.writer().write_all(b"NBDMAGIC").unwrap();
        transfer(&mut c, &mut s)?;
        let mut got = [0; 8];
        s.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"NBDMAGIC");
        s.writer().write_all(b"IHAVEOPT").unwrap();
        transfer(&mut s, &mut c)?;
        c.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"IHAVEOPT");
        Ok(())
    }

    fn client(dir: &Path, hostname: Option<&str>) -> ClientTls {
        ClientTlsOptions {
            certificates: Some(dir.to_owned()),
            hostname: hostname.map(str::to_owned),
            verify_peer: true,
        }
        .build()
        .unwrap()
    }

    /// Every key type and PEM flavour GnuTLS peers are set up with loads,
    /// in a server and as a client's certificate, and signs handshakes
    /// both peers verify, over TLS 1.3 and 1.2.
    #[test]
    fn every_key_type_and_pem_flavour_loads_and_handshakes() {
        let keys: &[(&str, &[&str])] = &[
            ("rsa2048", &["pkcs1", "pkcs8"]),
            ("rsa2432", &["pkcs1", "pkcs8"]),
            ("rsa3072", &["pkcs1", "pkcs8"]),
            ("rsa4096", &["pkcs1", "pkcs8"]),
            ("p256", &["sec1", "pkcs8"]),
            ("p384", &["sec1", "pkcs8"]),
            ("p521", &["sec1", "pkcs8"]),
            ("ed25519", &["pkcs8"]),
        ];
        for (kind, flavours) in keys {
            for flavour in *flavours {
                let what = format!("{kind}-{flavour}");
                let key_file = format!("{what}.pem");
                let key = load_key(&testdata(&key_file)).unwrap_or_else(|e| panic!("{e}"));
                let expected = match *flavour {
                    "pkcs1" => matches!(key, PrivateKeyDer::Pkcs1(_)),
                    "sec1" => matches!(key, PrivateKeyDer::Sec1(_)),
                    _ => matches!(key, PrivateKeyDer::Pkcs8(_)),
                };
                assert!(expected, "{what}: read as the wrong flavour");

                // The same certificate and key for the server and the
                // client; the server asks for the client's certificate.
                let dir = Scratch::new();
                dir.put(CA_CERT, "ca-cert.pem");
                let cert_file = format!("{kind}-cert.pem");
                for (cert, key) in [(SERVER_CERT, SERVER_KEY), (CLIENT_CERT, CLIENT_KEY)] {
                    dir.put(cert, &cert_file);
                    dir.put(key, &key_file);
                }
                let server = ServerTlsOptions::from_dir(&dir.0, true)
                    .build()
                    .unwrap_or_else(|e| panic!("{what}: server: {e}"));
                let tls = client(&dir.0, Some("localhost"));
                handshake(&tls, server).unwrap_or_else(|e| panic!("{what}: TLS 1.3 handshake: {e}"));

                // TLS 1.2 signs differently (PKCS#1 v1.5 RSA signatures).
                let tls12 = rustls::ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS12])
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(load_certs(&dir.0.join(SERVER_CERT)).unwrap(), key)
                    .unwrap();
                handshake(&tls, Arc::new(tls12)).unwrap_or_else(|e| panic!("{what}: TLS 1.2 handshake: {e}"));
            }
        }
    }

    #[test]
    fn unusable_keys_are_refused_with_the_reason_and_file() {
        for (file, says) in [
            ("rsa1024-pkcs8.pem", "2048 to 8192 bits"),
            ("ed448-pkcs8.pem", "Ed25519"),
            ("encrypted-pkcs8.pem", "encrypted"),
            ("dsa-traditional.pem", "DSA keys are not supported"),
        ] {
            let e = load_key(&testdata(file)).unwrap_err();
            assert!(matches!(e, TlsError::UnusableKey { .. }), "{file}: {e:?}");
            let e = e.to_string();
            assert!(e.contains(file) && e.contains(says), "{file}: {e}");
        }
        // A certificate with another key's private key.
        let e = ServerTlsOptions {
            cert: testdata("rsa2048-cert.pem"),
            key: testdata("p256-pkcs8.pem"),
            client_ca: None,
        }
        .build()
        .unwrap_err();
        assert!(matches!(e, TlsError::CertKey { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("rsa2048-cert.pem") && e.contains("p256-pkcs8.pem"), "{e}");
    }

    /// A server with `cert` (and the key of p256-cert.pem) for a client
    /// trusting `ca` and checking `hostname`: the handshake's outcome.
    fn name_check(cert: &str, ca: &str, hostname: Option<&str>) -> Result<(), String> {
        let dir = Scratch::new();
        dir.put(CA_CERT, ca);
        dir.put(SERVER_CERT, cert);
        dir.put(SERVER_KEY, "p256-pkcs8.pem");
        let server = ServerTlsOptions::from_dir(&dir.0, false).build().unwrap();
        handshake(&client(&dir.0, hostname), server).map_err(|e| e.to_string())
    }

    #[test]
    fn common_name_stands_for_the_host_only_without_subject_alt_names() {
        let ok = |cert: &str, host: &str| {
            name_check(cert, "ca-cert.pem", Some(host)).unwrap_or_else(|e| panic!("{cert} for {host}: {e}"))
        };
        let refused = |cert: &str, host: &str| {
            name_check(cert, "ca-cert.pem", Some(host))
                .err()
                .unwrap_or_else(|| panic!("{cert} accepted for {host}"))
        };

        // CN=localhost and no subjectAltName, as certtool makes them.
        ok("cn-only-cert.pem", "localhost");
        ok("cn-only-cert.pem", "LocalHost");
        let e = refused("cn-only-cert.pem", "other.example.test");
        assert!(
            e.contains("not valid for name") && e.contains("common name \"localhost\""),
            "{e}"
        );
        // Over a Unix socket without tls-hostname no name is checked.
        name_check("cn-only-cert.pem", "ca-cert.pem", None).unwrap();
        // The chain is checked as strictly as ever.
        let e = name_check("cn-only-cert.pem", "other-ca-cert.pem", Some("localhost")).unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");

        // A wildcard CN stands for one leftmost label.
        ok("cn-wildcard-cert.pem", "nbd.example.test");
        refused("cn-wildcard-cert.pem", "example.test");
        refused("cn-wildcard-cert.pem", "a.b.example.test");
        // An IP address CN for an IP address.
        ok("cn-ip-cert.pem", "127.0.0.1");
        refused("cn-ip-cert.pem", "127.0.0.2");
        refused("cn-ip-cert.pem", "localhost");
        // Two CNs: RFC 6125 wants exactly one.
        let e = refused("cn-two-cert.pem", "localhost");
        assert!(e.contains("2 common names"), "{e}");
        // No CN at all.
        let e = refused("no-name-cert.pem", "localhost");
        assert!(e.contains("names no host"), "{e}");
        // A subjectAltName without DNS or IP entries leaves the CN in use.
        ok("san-email-cert.pem", "localhost");
        // One with an IP address alone: that is the only name; the CN
        // "localhost" does not count.
        ok("san-ip-cert.pem", "127.0.0.2");
        let e = refused("san-ip-cert.pem", "localhost");
        assert!(e.contains("127.0.0.2") && !e.contains("common name"), "{e}");
        // The usual certificate, DNS:localhost and IP:127.0.0.1: its CN
        // (also localhost) never matters.
        ok("p256-cert.pem", "localhost");
        ok("p256-cert.pem", "127.0.0.1");
        let e = refused("p256-cert.pem", "other.example.test");
        assert!(e.contains("not valid for name") && !e.contains("common name"), "{e}");
    }

    #[test]
    fn common_name_matching_rules() {
        let dns = |s: &str| ServerName::try_from(s.to_owned()).unwrap();
        let yes = [
            ("localhost", "localhost"),
            ("LOCALHOST", "localhost"),
            ("server.foo.example.com", "Server.Foo.Example.Com"),
            ("localhost.", "localhost"),
            ("localhost", "localhost."),
            ("*.example.com", "nbd.example.com"),
            ("*.EXAMPLE.com", "nbd.example.COM"),
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
            ("0:0:0:0:0:0:0:1", "::1"),
        ];
        for (cn, name) in yes {
            assert!(common_name_matches(cn, &dns(name)), "{cn} vs {name}");
        }
        let no = [
            ("localhost", "localhost2"),
            ("", "localhost"),
            ("*.example.com", "example.com"),
            ("*.example.com", "a.b.example.com"),
            ("*.com", "example.com"),
            ("*", "localhost"),
            ("nbd*.example.com", "nbd1.example.com"),
            ("*.*.example.com", "a.b.example.com"),
            ("*.example..com", "a.example..com"),
            ("local host", "localhost"),
            ("localhost\0.evil", "localhost"),
            ("lоcalhost", "localhost"), // a Cyrillic o
            ("127.0.0.1", "127.0.0.2"),
            ("localhost", "127.0.0.1"),
            ("*.0.0.1", "127.0.0.1"),
            ("127.0.0.1", "::ffff:127.0.0.1"),
        ];
        for (cn, name) in no {
            let name = ServerName::try_from(name.to_owned());
            if let Ok(name) = name {
                assert!(!common_name_matches(cn, &name), "{cn:?} vs {name:?}");
            }
        }
        assert_eq!(
            directory_string(Tag::BmpString, &[0, b'l', 0, b'o']).as_deref(),
            Some("lo")
        );
        assert_eq!(directory_string(Tag::BmpString, &[0, b'l', 0]), None);
        assert_eq!(directory_string(Tag::Utf8String, &[0xff]), None);
        assert_eq!(directory_string(Tag::OctetString, b"localhost"), None);
    }
}
