//! Test certificates for the TLS tests and benchmarks, made with `rcgen`
//! and laid out as libnbd, nbdkit and QEMU expect a certificates
//! directory: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem` and `client-key.pem` (keys in PKCS#8 PEM, mode 0600).
//!
//! The certificates are shaped the way QEMU's strict checks want them: the
//! CA has basic constraints `CA:TRUE` and may sign certificates; the
//! server and client certificates say `CA:FALSE` and carry the TLS server
//! or client extended key usage. The server certificate is valid for
//! `localhost` and `127.0.0.1`.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// The names the server certificate is valid for.
pub const SERVER_NAMES: &[&str] = &["localhost"];

/// A certificates directory made by [`make_certificates`].
#[derive(Debug, Clone)]
pub struct Certificates {
    /// The directory (pass it as `tls-certificates=`, `--tls-certificates`
    /// or `dir=`).
    pub dir: PathBuf,
}

impl Certificates {
    /// A file of the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The directory as a string (panics if not UTF-8).
    pub fn dir_str(&self) -> &str {
        self.dir.to_str().expect("UTF-8 certificates directory")
    }
}

fn rcgen_error(e: rcgen::Error) -> io::Error {
    io::Error::other(e.to_string())
}

fn write(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    fs::write(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Makes a fresh CA, a server certificate for `localhost`/`127.0.0.1` and
/// a client certificate, all signed by the CA, in `dir` (created if
/// needed). Two calls make two unrelated CAs.
pub fn make_certificates(dir: &Path) -> io::Result<Certificates> {
    fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate().map_err(rcgen_error)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own, so that two CAs are told apart by name too.
    let name = format!("nbd-rs test CA {}", dir.display());
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca.self_signed(&ca_key).map_err(rcgen_error)?;

    let server_key = KeyPair::generate().map_err(rcgen_error)?;
    let names: Vec<String> = SERVER_NAMES.iter().map(|s| s.to_string()).collect();
    let mut server = CertificateParams::new(names).map_err(rcgen_error)?;
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    server.is_ca = IsCa::ExplicitNoCa;
    server.distinguished_name.push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server.signed_by(&server_key, &ca, &ca_key).map_err(rcgen_error)?;

    let client_key = KeyPair::generate().map_err(rcgen_error)?;
    let mut client = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    client.is_ca = IsCa::ExplicitNoCa;
    client.distinguished_name.push(DnType::CommonName, "nbd-rs test client");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client.signed_by(&client_key, &ca, &ca_key).map_err(rcgen_error)?;

    write(&dir.join("ca-cert.pem"), &ca.pem(), 0o644)?;
    write(&dir.join("server-cert.pem"), &server.pem(), 0o644)?;
    write(&dir.join("server-key.pem"), &server_key.serialize_pem(), 0o600)?;
    write(&dir.join("client-cert.pem"), &client.pem(), 0o644)?;
    write(&dir.join("client-key.pem"), &client_key.serialize_pem(), 0o600)?;
    Ok(Certificates { dir: dir.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_load_with_rustls() {
        let tmp = crate::TempDir::new();
        let c = make_certificates(&tmp.join("pki")).unwrap();
        nbd_net::ServerTlsOptions::from_dir(&c.dir, true).build().unwrap();
        nbd_net::ClientTlsOptions {
            certificates: Some(c.dir.clone()),
            hostname: Some("localhost".into()),
            verify_peer: true,
        }
        .build()
        .unwrap();
        let mode = fs::metadata(c.file("server-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
