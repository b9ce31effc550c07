//! NBD URIs, as `doc/uri.md` of the NBD project defines them:
//! `nbd://host[:port]/export`, `nbds://...`, `nbd+unix:///export?socket=PATH`
//! and `nbds+unix:///export?socket=PATH`, with libnbd's TLS query
//! parameters (`tls-certificates`, `tls-hostname`, `tls-verify-peer`,
//! `tls-type`).

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::client::ClientConfig;
use crate::common::TlsMode;
use crate::wire::NBD_DEFAULT_PORT;

/// Where an NBD server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP to a host (name or address; IPv6 without brackets) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (10809 by default).
        port: u16,
    },
    /// A Unix domain socket (an abstract one if it starts with NUL).
    Unix {
        /// The socket path.
        socket: String,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where to connect.
    pub transport: Transport,
    /// The export name (the path without its leading `/`, decoded).
    pub export: String,
    /// TLS policy implied by the scheme (`nbds*` requires it) and
    /// `tls=` hints.
    pub tls: TlsMode,
    /// `tls-certificates=DIR`: a directory with `ca-cert.pem`,
    /// `client-cert.pem` and `client-key.pem`.
    pub tls_certificates: Option<String>,
    /// `tls-hostname=NAME`: the name to check the server certificate for.
    pub tls_hostname: Option<String>,
    /// `tls-verify-peer=0|1` (default: verify).
    pub tls_verify_peer: bool,
    /// `tls-type=anon|x509|psk`, if given.
    pub tls_type: Option<String>,
    /// The user part of the authority, if any.
    pub user: Option<String>,
}

/// Why a string is not a valid NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    /// The scheme is not one of the NBD schemes.
    #[error("unknown URI scheme {0:?} (expected nbd, nbds, nbd+unix or nbds+unix)")]
    UnknownScheme(String),
    /// No `scheme://`.
    #[error("not a URI: missing \"scheme://\"")]
    NotAUri,
    /// A Unix-socket URI without `socket=`.
    #[error("{0} URI needs a socket=PATH query parameter")]
    MissingSocket(&'static str),
    /// A TCP URI without a host.
    #[error("nbd URI needs a host")]
    MissingHost,
    /// The port is not a number in range.
    #[error("invalid port {0:?}")]
    BadPort(String),
    /// A `%` escape that is not two hex digits, or decodes to invalid UTF-8
    /// or a NUL (outside an abstract socket name).
    #[error("invalid percent-encoding in {0:?}")]
    BadEncoding(String),
    /// A query parameter nobody understands.
    #[error("unknown query parameter {0:?}")]
    UnknownParameter(String),
    /// A query parameter with a bad value.
    #[error("invalid value {value:?} for {name}")]
    BadValue {
        /// Parameter.
        name: &'static str,
        /// Value.
        value: String,
    },
    /// An unterminated `[` IPv6 literal.
    #[error("invalid IPv6 literal in authority {0:?}")]
    BadIpv6(String),
    /// An export name longer than the 4096-byte string limit.
    #[error("export name longer than 4096 bytes")]
    ExportNameTooLong,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes (and, in queries, `+` is kept literally as RFC
/// 3986 says).
pub fn percent_decode(s: &str, allow_nul: bool) -> Result<String, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) else {
                return Err(UriError::BadEncoding(s.to_string()));
            };
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    if !allow_nul && out.contains(&0) {
        return Err(UriError::BadEncoding(s.to_string()));
    }
    String::from_utf8(out).map_err(|_| UriError::BadEncoding(s.to_string()))
}

/// Encodes everything but RFC 3986 unreserved characters (and `/`, which
/// is kept so paths stay readable).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(c as char);
        } else {
            out.push('%');
            out.push(
                char::from_digit((c >> 4) as u32, 16)
                    .unwrap_or('0')
                    .to_ascii_uppercase(),
            );
            out.push(
                char::from_digit((c & 15) as u32, 16)
                    .unwrap_or('0')
                    .to_ascii_uppercase(),
            );
        }
    }
    out
}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(s: &str) -> Result<NbdUri, UriError> {
        let (scheme, rest) = s.split_once("://").ok_or(UriError::NotAUri)?;
        let (tls, unix) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (TlsMode::Off, false),
            "nbds" => (TlsMode::Require, false),
            "nbd+unix" => (TlsMode::Off, true),
            "nbds+unix" => (TlsMode::Require, true),
            _ => return Err(UriError::UnknownScheme(scheme.to_string())),
        };
        // Fragment is ignored.
        let rest = rest.split_once('#').map_or(rest, |(a, _)| a);
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path), false)?;
        if export.len() > crate::wire::MAX_STRING_LEN {
            return Err(UriError::ExportNameTooLong);
        }
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(percent_decode(u, false)?), h),
            None => (None, authority),
        };
        let mut uri = NbdUri {
            transport: Transport::Unix { socket: String::new() },
            export,
            tls,
            tls_certificates: None,
            tls_hostname: None,
            tls_verify_peer: true,
            tls_type: None,
            user,
        };
        let mut socket = None;
        for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            let k = percent_decode(k, false)?;
            match k.as_str() {
                "socket" => socket = Some(percent_decode(v, true)?),
                "tls-certificates" => uri.tls_certificates = Some(percent_decode(v, false)?),
                "tls-hostname" => uri.tls_hostname = Some(percent_decode(v, false)?),
                "tls-verify-peer" => {
                    uri.tls_verify_peer = match v {
                        "1" | "true" | "on" | "yes" => true,
                        "0" | "false" | "off" | "no" => false,
                        _ => {
                            return Err(UriError::BadValue {
                                name: "tls-verify-peer",
                                value: v.to_string(),
                            });
                        }
                    }
                }
                "tls-type" => {
                    let t = percent_decode(v, false)?;
                    if !matches!(t.as_str(), "anon" | "x509" | "psk") {
                        return Err(UriError::BadValue {
                            name: "tls-type",
                            value: t,
                        });
                    }
                    uri.tls_type = Some(t);
                }
                "tls" => {
                    // libnbd-style hint on plain schemes: tls=require|allow|off
                    let mode = match v {
                        "require" | "on" | "1" => TlsMode::Require,
                        "allow" => TlsMode::Allow,
                        "off" | "0" | "disable" => TlsMode::Off,
                        _ => {
                            return Err(UriError::BadValue {
                                name: "tls",
                                value: v.to_string(),
                            });
                        }
                    };
                    if uri.tls != TlsMode::Require {
                        uri.tls = mode;
                    }
                }
                other if other.starts_with("x-") => {}
                other => return Err(UriError::UnknownParameter(other.to_string())),
            }
        }
        if unix {
            let socket = socket.ok_or(UriError::MissingSocket(if tls == TlsMode::Require {
                "nbds+unix"
            } else {
                "nbd+unix"
            }))?;
            if socket.is_empty() {
                return Err(UriError::MissingSocket("nbd+unix"));
            }
            uri.transport = Transport::Unix { socket };
        } else {
            if socket.is_some() {
                return Err(UriError::UnknownParameter("socket".to_string()));
            }
            let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| UriError::BadIpv6(hostport.to_string()))?;
                let port = match after {
                    "" => None,
                    p => Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| UriError::BadIpv6(hostport.to_string()))?,
                    ),
                };
                // Taken as it is (no percent-decoding), but a NUL is no
                // more valid here than in any other host.
                if h.contains('\0') {
                    return Err(UriError::BadIpv6(hostport.to_string()));
                }
                (h.to_string(), port)
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (percent_decode(h, false)?, Some(p)),
                    None => (percent_decode(hostport, false)?, None),
                }
            };
            if host.is_empty() {
                return Err(UriError::MissingHost);
            }
            let port = match port {
                None | Some("") => NBD_DEFAULT_PORT,
                Some(p) => p.parse::<u16>().map_err(|_| UriError::BadPort(p.to_string()))?,
            };
            uri.transport = Transport::Tcp { host, port };
        }
        Ok(uri)
    }

    /// The client configuration for this URI: `config` with the URI's
    /// export name, and with the URI's TLS policy unless that is
    /// [`TlsMode::Off`] (`nbds://` and `nbds+unix://` require TLS,
    /// `tls=allow|require` asks for it; a plain URI keeps what `config`
    /// says). Every client connects through this one step.
    ///
    /// ```
    /// use nbd_proto::client::{ClientConfig, TlsMode};
    /// use nbd_proto::uri::NbdUri;
    ///
    /// let uri = NbdUri::parse("nbds+unix:///disk?socket=/run/nbd.sock").unwrap();
    /// let config = uri.client_config(ClientConfig::default());
    /// assert_eq!(config.export_name, "disk");
    /// assert_eq!(config.tls, TlsMode::Require);
    /// ```
    pub fn client_config(&self, mut config: ClientConfig) -> ClientConfig {
        config.export_name = self.export.clone();
        if self.tls != TlsMode::Off {
            config.tls = self.tls;
        }
        config
    }

    /// Formats the URI back, so that [`NbdUri::parse`] gives the same
    /// value: the user, the TLS parameters and `tls=allow` are kept, and
    /// the user, host, export, socket and parameter values are
    /// percent-encoded where needed.
    pub fn to_uri_string(&self) -> String {
        let tls = self.tls == TlsMode::Require;
        let mut s = String::new();
        let unix = matches!(self.transport, Transport::Unix { .. });
        s.push_str(match (tls, unix) {
            (false, false) => "nbd://",
            (true, false) => "nbds://",
            (false, true) => "nbd+unix://",
            (true, true) => "nbds+unix://",
        });
        if let Some(user) = &self.user {
            s.push_str(&percent_encode_component(user));
            s.push('@');
        }
        let mut query: Vec<(&str, String)> = Vec::new();
        match &self.transport {
            Transport::Tcp { host, port } => {
                if is_ipv6_literal(host) {
                    s.push('[');
                    s.push_str(host);
                    s.push(']');
                } else {
                    // Inside brackets nothing is decoded, so only a plain
                    // IPv6 address goes there; anything else is escaped.
                    s.push_str(&percent_encode_component(host));
                }
                if *port != NBD_DEFAULT_PORT {
                    s.push(':');
                    s.push_str(&port.to_string());
                }
            }
            Transport::Unix { socket } => query.push(("socket", percent_encode(socket))),
        }
        s.push('/');
        s.push_str(&percent_encode(&self.export));
        if self.tls == TlsMode::Allow {
            query.push(("tls", "allow".to_string()));
        }
        for (name, value) in [
            ("tls-certificates", &self.tls_certificates),
            ("tls-hostname", &self.tls_hostname),
            ("tls-type", &self.tls_type),
        ] {
            if let Some(v) = value {
                query.push((name, percent_encode_component(v)));
            }
        }
        if !self.tls_verify_peer {
            query.push(("tls-verify-peer", "0".to_string()));
        }
        for (i, (name, value)) in query.iter().enumerate() {
            s.push(if i == 0 { '?' } else { '&' });
            s.push_str(name);
            s.push('=');
            s.push_str(value);
        }
        s
    }
}

/// Whether a host can be written as `[host]`: an IPv6 address (hex digits,
/// colons and dots, with at least one colon).
fn is_ipv6_literal(host: &str) -> bool {
    host.contains(':') && host.bytes().all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
}

/// [`percent_encode`] for a component that must not contain `/` (a user,
/// a host, a query value).
fn percent_encode_component(s: &str) -> String {
    percent_encode(s).replace('/', "%2F")
}

impl core::str::FromStr for NbdUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        let cases = [
            ("nbd://example.com/disk", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ];
        for (u, e) in cases {
            let p = NbdUri::parse(u).unwrap();
            assert_eq!(p.export, e, "{u}");
            assert_eq!(
                p.transport,
                Transport::Tcp {
                    host: "example.com".into(),
                    port: 10809
                }
            );
        }
        let p = NbdUri::parse("nbd+unix:///disk?socket=sock").unwrap();
        assert_eq!(p.export, "disk");
        assert_eq!(p.transport, Transport::Unix { socket: "sock".into() });
        let p = NbdUri::parse("nbd+unix:///?socket=%00/abstract").unwrap();
        assert_eq!(
            p.transport,
            Transport::Unix {
                socket: "\0/abstract".into()
            }
        );
    }

    #[test]
    fn ports_tls_and_errors() {
        let p = NbdUri::parse("nbds://[::1]:1234/x?tls-certificates=/etc/pki&tls-verify-peer=0").unwrap();
        assert_eq!(
            p.transport,
            Transport::Tcp {
                host: "::1".into(),
                port: 1234
            }
        );
        assert_eq!(p.tls, TlsMode::Require);
        assert_eq!(p.tls_certificates.as_deref(), Some("/etc/pki"));
        assert!(!p.tls_verify_peer);
        assert!(matches!(NbdUri::parse("http://x/"), Err(UriError::UnknownScheme(_))));
        assert!(matches!(
            NbdUri::parse("nbd+unix:///x"),
            Err(UriError::MissingSocket(_))
        ));
        assert!(matches!(NbdUri::parse("nbd://h:99999/"), Err(UriError::BadPort(_))));
        assert!(matches!(
            NbdUri::parse("nbd://h/?frob=1"),
            Err(UriError::UnknownParameter(_))
        ));
        assert!(matches!(NbdUri::parse("nbd://h/%zz"), Err(UriError::BadEncoding(_))));
        assert!(matches!(NbdUri::parse("nbd:///"), Err(UriError::MissingHost)));
        assert!(matches!(NbdUri::parse("/dev/nbd0"), Err(UriError::NotAUri)));
    }

    /// Found by fuzzing (`uri`): `to_uri_string` dropped the user, the TLS
    /// parameters and `tls=allow`, and wrote hosts unescaped, so the
    /// string it gave did not parse back to the same URI.
    #[test]
    fn roundtrip_keeps_everything() {
        for u in [
            "nbd://me@h/e",
            "nbd://@h/e",
            "nbd://a%2Fb%40c%3Fd/e",
            "nbd://%5Bx/",
            "nbd://a%3A%5Db/",
            "nbd://[fe80::1%25eth0]:99/",
            "nbd://[a\u{1a}:b]/",
            "nbd+unix://u%2F@/e?socket=s&tls=allow",
            "nbds://h/?tls-certificates=/etc/pki%26x&tls-hostname=n&tls-verify-peer=false&tls-type=psk",
        ] {
            let p = NbdUri::parse(u).unwrap();
            let s = p.to_uri_string();
            assert_eq!(NbdUri::parse(&s).unwrap(), p, "{u} -> {s}");
        }
        // A NUL in a bracketed host is refused like in any other host
        // (it could not be written back).
        assert!(matches!(NbdUri::parse("nbd://[a:\0]/"), Err(UriError::BadIpv6(_))));
        assert!(matches!(NbdUri::parse("nbd://a%00/"), Err(UriError::BadEncoding(_))));
        assert_eq!(
            NbdUri::parse("nbd://me@h:99/e?tls=allow").unwrap().to_uri_string(),
            "nbd://me@h:99/e?tls=allow"
        );
    }

    #[test]
    fn roundtrip() {
        for u in [
            "nbd+unix:///a%20b?socket=/tmp/x%20y.sock",
            "nbd://h:99/e",
            "nbds://[::1]/e",
        ] {
            let p = NbdUri::parse(u).unwrap();
            assert_eq!(NbdUri::parse(&p.to_uri_string()).unwrap(), p, "{u}");
        }
    }
}
