//! A read-only disk served by a web server, read with HTTP range requests,
//! as nbdkit's `curl` plugin reads it (feature `http`).
//!
//! [`HttpStorage::open`] asks for the first byte (`Range: bytes=0-0`),
//! which tells the size (from `Content-Range`) and that the server honours
//! ranges: a server that answers `200` with the whole body, or a `206`
//! without `Content-Range`, is refused at once ("the server does not
//! support range requests"). Redirects are followed at open only, and the
//! final URL is pinned for the reads; when a read of the pinned URL fails
//! with a redirect, a `4xx` or a connection error, the original URL is
//! resolved again, once per read (signed URLs behind a redirect expire).
//! The probe is tried again on a `5xx`, `408`, `429` or a connection
//! error, with the reads' attempts and back-off; a certificate that is
//! not trusted fails at once.
//!
//! Each [`Storage::read_at`] is one `GET` with `Range: bytes=A-B`; the
//! `206` reply and its `Content-Range` are checked and the body is read
//! straight into the caller's buffer. The connections are kept alive in a
//! pool (ureq's agent) shared by every thread, so concurrent reads run on
//! as many connections. A read that fails on the way (a reset
//! connection, a `5xx`, a short body) is sent again for what is still
//! missing, after a back-off, up to [`HttpOptions::retries`] attempts; it
//! then fails with `EIO` and a message naming the URL and the cause.
//!
//! Writes, trims and zeroes fail with `EROFS`: the export is read-only.
//!
//! # Parameters
//!
//! [`HttpOptions::set`] takes nbdkit curl's parameter names:
//!
//! | parameter | meaning |
//! | --- | --- |
//! | `header=NAME: VALUE` | an extra request header (repeatable) |
//! | `cainfo=FILE` | trust the CA certificates in this PEM file (instead of the system's) |
//! | `capath=DIR` | trust the PEM certificates of this directory (instead of the system's) |
//! | `sslverify=false` | do not verify the server's certificate |
//! | `timeout=SECS` | time limit of each request |
//! | `connect-timeout=SECS` | time limit of connecting |
//! | `proxy=URL` | HTTP or SOCKS proxy (the default: `http_proxy`, `https_proxy`, `all_proxy` and `no_proxy` from the environment) |
//! | `noproxy=HOSTS` | with `proxy=`: hosts reached directly (comma-separated) |
//! | `user-agent=TEXT` | the `User-Agent` header |
//! | `cookie=TEXT` | a `Cookie` header |
//! | `followlocation=false` | refuse redirects |
//! | `connections=N` | connections kept open (the default 16) |
//! | `retries=N` | attempts of a read (ours; the default 5) |
//!
//! Without `cainfo=`/`capath=` the system's CA bundle is trusted
//! (`SSL_CERT_FILE`, else Debian's, Fedora's or SUSE's bundle path).
//! Other nbdkit curl parameters (`user=`, `password=`, cookie scripts,
//! `protocols=`, TLS cipher lists...) are not supported: `set` refuses
//! them by name.

use std::fmt;
use std::io::{self, Read as _};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::{Agent, ResponseExt as _};

use crate::{Capabilities, Storage, ZeroFlags, check_range, errno_error};

/// How an [`HttpStorage`] talks to its server. `Default` is nbdkit curl's
/// defaults: no extra headers, the system's CAs, certificates verified,
/// no time limits, redirects followed at open.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpOptions {
    /// Extra request headers, sent with every request (`header=`).
    pub headers: Vec<(String, String)>,
    /// Trust the CA certificates of this PEM file instead of the system's
    /// (`cainfo=`).
    pub cainfo: Option<PathBuf>,
    /// Trust the PEM certificates of this directory instead of the
    /// system's (`capath=`).
    pub capath: Option<PathBuf>,
    /// Verify the server's certificate (`sslverify=`).
    pub sslverify: bool,
    /// Time limit of each request (`timeout=`).
    pub timeout: Option<Duration>,
    /// Time limit of connecting (`connect-timeout=`).
    pub connect_timeout: Option<Duration>,
    /// Proxy URL (`proxy=`); `None`: the environment's.
    pub proxy: Option<String>,
    /// Hosts reached without the proxy, comma-separated (`noproxy=`).
    pub noproxy: Option<String>,
    /// The `User-Agent` header (`user-agent=`).
    pub user_agent: Option<String>,
    /// Follow redirects at open (`followlocation=`).
    pub followlocation: bool,
    /// Idle connections kept open for reuse (`connections=`).
    pub connections: usize,
    /// Attempts of one read before it fails (`retries=`); at least 1.
    pub retries: u32,
    /// The first back-off between attempts; it doubles each time.
    pub retry_delay: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            headers: Vec::new(),
            cainfo: None,
            capath: None,
            sslverify: true,
            timeout: None,
            connect_timeout: None,
            proxy: None,
            noproxy: None,
            user_agent: None,
            followlocation: true,
            connections: 16,
            retries: 5,
            retry_delay: Duration::from_millis(200),
        }
    }
}

/// The parameters [`HttpOptions::set`] takes (nbdkit curl's names).
pub const PARAMETERS: &[&str] = &[
    "header",
    "cainfo",
    "capath",
    "sslverify",
    "timeout",
    "connect-timeout",
    "proxy",
    "noproxy",
    "user-agent",
    "cookie",
    "followlocation",
    "connections",
    "retries",
];

impl HttpOptions {
    /// Adds a request header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the CA file.
    pub fn cainfo(mut self, v: Option<PathBuf>) -> Self {
        self.cainfo = v;
        self
    }

    /// Sets the CA directory.
    pub fn capath(mut self, v: Option<PathBuf>) -> Self {
        self.capath = v;
        self
    }

    /// Sets whether the server's certificate is verified.
    pub fn sslverify(mut self, v: bool) -> Self {
        self.sslverify = v;
        self
    }

    /// Sets the time limit of each request.
    pub fn timeout(mut self, v: Option<Duration>) -> Self {
        self.timeout = v;
        self
    }

    /// Sets the time limit of connecting.
    pub fn connect_timeout(mut self, v: Option<Duration>) -> Self {
        self.connect_timeout = v;
        self
    }

    /// Sets the proxy.
    pub fn proxy(mut self, v: Option<String>) -> Self {
        self.proxy = v;
        self
    }

    /// Sets the hosts reached without the proxy.
    pub fn noproxy(mut self, v: Option<String>) -> Self {
        self.noproxy = v;
        self
    }

    /// Sets the `User-Agent` header.
    pub fn user_agent(mut self, v: Option<String>) -> Self {
        self.user_agent = v;
        self
    }

    /// Sets whether redirects are followed at open.
    pub fn followlocation(mut self, v: bool) -> Self {
        self.followlocation = v;
        self
    }

    /// Sets how many idle connections are kept.
    pub fn connections(mut self, v: usize) -> Self {
        self.connections = v.max(1);
        self
    }

    /// Sets the attempts of one read.
    pub fn retries(mut self, v: u32) -> Self {
        self.retries = v.max(1);
        self
    }

    /// Sets the first back-off between attempts.
    pub fn retry_delay(mut self, v: Duration) -> Self {
        self.retry_delay = v;
        self
    }

    /// Sets one parameter by nbdkit curl's name (see the [module
    /// documentation](self)), e.g. `set("header", "Authorization: Bearer
    /// X")` or `set("sslverify", "false")`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let bad = |what: &str| format!("{key}={value}: {what}");
        let secs = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| (s > 0.0).then(|| Duration::from_secs_f64(s)))
                .ok_or_else(|| bad("expected seconds"))
        };
        match key {
            "header" => {
                let (name, v) = value.split_once(':').ok_or_else(|| bad("expected NAME: VALUE"))?;
                self.headers.push((name.trim().to_string(), v.trim().to_string()));
            }
            "cookie" => self.headers.push(("Cookie".into(), value.to_string())),
            "cainfo" => self.cainfo = (!value.is_empty()).then(|| value.into()),
            "capath" => self.capath = (!value.is_empty()).then(|| value.into()),
            "sslverify" => self.sslverify = parse_bool(value).ok_or_else(|| bad("expected a boolean"))?,
            "followlocation" => self.followlocation = parse_bool(value).ok_or_else(|| bad("expected a boolean"))?,
            "timeout" => self.timeout = secs(value)?,
            "connect-timeout" => self.connect_timeout = secs(value)?,
            "proxy" => self.proxy = (!value.is_empty()).then(|| value.to_string()),
            "noproxy" => self.noproxy = (!value.is_empty()).then(|| value.to_string()),
            "user-agent" => self.user_agent = Some(value.to_string()),
            "connections" => {
                self.connections = value
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("expected a positive number"))?
            }
            "retries" => {
                self.retries = value
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("expected a positive number"))?
            }
            _ => {
                return Err(format!(
                    "unknown HTTP parameter {key:?} (supported: {})",
                    PARAMETERS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Sets a `KEY=VALUE` parameter (see [`HttpOptions::set`]).
    pub fn set_param(&mut self, param: &str) -> Result<(), String> {
        let (k, v) = param
            .split_once('=')
            .ok_or_else(|| format!("{param:?}: expected KEY=VALUE"))?;
        self.set(k.trim(), v)
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Whether `s` names an HTTP(S) source (`http://` or `https://`).
pub fn is_http_url(s: &str) -> bool {
    let lower = |p: &str| s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p);
    lower("http://") || lower("https://")
}

/// A disk image on a web server, read-only (see the [module
/// documentation](self)).
pub struct HttpStorage {
    /// The URL as given.
    url: String,
    /// Where reads go: the URL after the redirects at open.
    pinned: RwLock<Arc<str>>,
    size: u64,
    agent: Agent,
    headers: Vec<(String, String)>,
    followlocation: bool,
    retries: u32,
    retry_delay: Duration,
}

impl fmt::Debug for HttpStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpStorage")
            .field("url", &self.url)
            .field("pinned", &self.pinned_url())
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Why one request failed, and what may help.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt on the same URL (a reset connection, `5xx`,
    /// a short body, a time-out).
    Transient(String),
    /// The URL may have moved or expired (`3xx`, `4xx`): worth resolving
    /// the original URL again.
    Moved(String),
    /// No attempt will help.
    Fatal(String),
}

impl HttpStorage {
    /// Opens `url` with the default options.
    pub fn open(url: &str) -> io::Result<HttpStorage> {
        HttpStorage::open_with(url, &HttpOptions::default())
    }

    /// Opens `url`: resolves its redirects and its size, and checks that
    /// the server honours range requests. Errors name the URL.
    pub fn open_with(url: &str, opts: &HttpOptions) -> io::Result<HttpStorage> {
        let named = |e: String| io::Error::other(format!("{url}: {e}"));
        if !is_http_url(url) {
            return Err(named("not an http:// or https:// URL".into()));
        }
        let agent = build_agent(opts).map_err(named)?;
        let mut s = HttpStorage {
            url: url.to_string(),
            pinned: RwLock::new(url.into()),
            size: 0,
            agent,
            headers: opts.headers.clone(),
            followlocation: opts.followlocation,
            retries: opts.retries.max(1),
            retry_delay: opts.retry_delay,
        };
        let (pinned, size) = s.resolve_retrying().map_err(named)?;
        s.size = size;
        *s.pinned.write().unwrap_or_else(|p| p.into_inner()) = pinned.into();
        Ok(s)
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL the reads go to (after the redirects).
    pub fn pinned_url(&self) -> String {
        self.pinned.read().unwrap_or_else(|p| p.into_inner()).to_string()
    }

    fn request(&self, url: &str, first: u64, last: u64) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let mut req = self.agent.get(url).header("Range", format!("bytes={first}-{last}"));
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req
    }

    /// [`HttpStorage::resolve`] with the reads' attempts and back-off: a
    /// reset connection, a `5xx`, `408` or `429` is tried again, up to
    /// [`HttpOptions::retries`] attempts; the error then tells how many.
    fn resolve_retrying(&self) -> Result<(String, u64), String> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.resolve() {
                Ok(r) => return Ok(r),
                Err(Failure::Transient(_)) if attempt < self.retries => {
                    std::thread::sleep(self.retry_delay.saturating_mul(1 << (attempt - 1).min(10)));
                }
                Err(Failure::Transient(r)) if attempt > 1 => return Err(format!("{r} (after {attempt} attempts)")),
                Err(f) => return Err(f.into_text()),
            }
        }
    }

    /// Asks the original URL for its first byte, following redirects:
    /// returns the final URL and the size. Failures worth another attempt
    /// (a connection error, a `5xx`, `408`, `429`) are
    /// [`Failure::Transient`]; the others [`Failure::Fatal`].
    fn resolve(&self) -> Result<(String, u64), Failure> {
        let redirects = if self.followlocation { 10 } else { 0 };
        let resp = self
            .request(&self.url, 0, 0)
            .config()
            .max_redirects(redirects)
            .build()
            .call()
            .map_err(classify_error)?;
        let status = resp.status().as_u16();
        if matches!(status, 408 | 429 | 500..=599) {
            return Err(Failure::Transient(status_text(status)));
        }
        self.resolved(resp, status).map_err(Failure::Fatal)
    }

    /// What a reply of [`HttpStorage::resolve`] tells: the final URL and
    /// the size, or why not.
    fn resolved(&self, mut resp: ureq::http::Response<ureq::Body>, status: u16) -> Result<(String, u64), String> {
        let final_url = resp.get_uri().to_string();
        let content_range = header(&resp, "content-range");
        let size = match status {
            206 => {
                let cr = content_range.ok_or(
                    "the server does not support range requests (its 206 reply has no Content-Range)".to_string(),
                )?;
                let (_, _, total) = parse_content_range(&cr)
                    .ok_or_else(|| format!("the server sent an invalid Content-Range: {cr:?}"))?;
                total.ok_or("the server does not tell the size of the file (Content-Range: .../*)".to_string())?
            }
            // The range is past the end: an empty file (`bytes */0`).
            416 => match content_range.as_deref().and_then(parse_content_range) {
                Some((_, _, Some(0))) => 0,
                _ => return Err("the server refused the range 0-0 (416) of a file that is not empty".into()),
            },
            200 => {
                let accept = header(&resp, "accept-ranges").unwrap_or_default();
                return Err(format!(
                    "the server does not support range requests: it answered a Range request with 200 and the \
                     whole file{}",
                    if accept.eq_ignore_ascii_case("bytes") {
                        " (despite Accept-Ranges: bytes)"
                    } else {
                        ""
                    }
                ));
            }
            300..=399 if !self.followlocation => {
                return Err(format!(
                    "redirected ({}) to {} but followlocation=false",
                    status_text(status),
                    header(&resp, "location").unwrap_or_default()
                ));
            }
            _ => return Err(status_text(status)),
        };
        // Read the byte, so the connection goes back to the pool.
        let _ = resp.body_mut().with_config().limit(1 << 16).read_to_vec();
        Ok((final_url, size))
    }

    /// One attempt at reading `buf[*done..]`, which starts at
    /// `offset + *done`; `*done` grows with what arrived, even when the
    /// attempt fails.
    fn read_once(&self, url: &str, buf: &mut [u8], offset: u64, done: &mut usize) -> Result<(), Failure> {
        let first = offset + *done as u64;
        let last = offset + buf.len() as u64 - 1;
        let mut resp = self.request(url, first, last).call().map_err(classify_error)?;
        let status = resp.status().as_u16();
        match status {
            206 => {}
            200 => {
                return Err(Failure::Moved(
                    "the server no longer honours range requests (200 with the whole file)".into(),
                ));
            }
            300..=399 | 400..=407 | 409..=428 | 430..=499 => return Err(Failure::Moved(status_text(status))),
            _ => return Err(Failure::Transient(status_text(status))),
        }
        let cr = header(&resp, "content-range").unwrap_or_default();
        match parse_content_range(&cr) {
            Some((a, b, total)) if a == first && b == last && total.is_none_or(|t| t == self.size) => {}
            _ => {
                return Err(Failure::Moved(format!(
                    "asked for bytes {first}-{last}/{}, the server sent Content-Range {cr:?}",
                    self.size
                )));
            }
        }
        let mut reader = resp.body_mut().with_config().limit(last - first + 1).reader();
        while *done < buf.len() {
            match reader.read(&mut buf[*done..]) {
                Ok(0) => {
                    return Err(Failure::Transient(format!(
                        "the body ended after {} of {} bytes",
                        *done as u64 - (first - offset),
                        last - first + 1
                    )));
                }
                Ok(n) => *done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::Transient(format!("reading the body: {e}"))),
            }
        }
        // Reach the end of the body: only then does the connection go back
        // to the pool (the data is all there, so a failure here is not
        // the read's).
        let _ = reader.read(&mut [0u8; 1]);
        Ok(())
    }
}

impl Failure {
    /// The reason, whatever the kind.
    fn into_text(self) -> String {
        match self {
            Failure::Transient(r) | Failure::Moved(r) | Failure::Fatal(r) => r,
        }
    }
}

/// A request that got no reply: a bad URL or a certificate is
/// [`Failure::Fatal`], the rest (a refused or reset connection, a
/// time-out) [`Failure::Transient`].
fn classify_error(e: ureq::Error) -> Failure {
    if matches!(e, ureq::Error::BadUri(_) | ureq::Error::Tls(_) | ureq::Error::Rustls(_)) {
        return Failure::Fatal(describe_error(e));
    }
    // A TLS failure may come wrapped in an I/O error: it stays so.
    let io_inner = match &e {
        ureq::Error::Io(io) => io.get_ref().map(|w| w as &(dyn std::error::Error + 'static)),
        _ => None,
    };
    let mut src: Option<&(dyn std::error::Error + 'static)> = io_inner.or(Some(&e));
    while let Some(c) = src {
        // `io::Error::source` skips the error it wraps: look at it too.
        let wrapped = c.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        let tls = c
            .downcast_ref::<rustls::Error>()
            .or_else(|| wrapped.and_then(|w| w.downcast_ref::<rustls::Error>()));
        if let Some(tls) = tls {
            let hint = if matches!(tls, rustls::Error::InvalidCertificate(_)) {
                " (the server's certificate is not trusted: give its CA with cainfo=FILE or capath=DIR, or \
                 sslverify=false)"
            } else {
                ""
            };
            return Failure::Fatal(format!("TLS: {tls}{hint}"));
        }
        src = c.source();
    }
    Failure::Transient(describe_error(e))
}

/// An error value's text with its causes.
fn describe_error(e: ureq::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

fn status_text(status: u16) -> String {
    let reason = ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("HTTP {status} {reason}").trim_end().to_string()
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// Parses `bytes A-B/TOTAL` (`TOTAL` may be `*`) or `bytes */TOTAL` (then
/// `A` and `B` are `u64::MAX`).
fn parse_content_range(s: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = s.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if range.trim() == "*" {
        return Some((u64::MAX, u64::MAX, total));
    }
    let (a, b) = range.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    if b < a || total.is_some_and(|t| b >= t) {
        return None;
    }
    Some((a, b, total))
}

fn build_agent(opts: &HttpOptions) -> Result<Agent, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(provider)
        .root_certs(root_certs(opts)?)
        .disable_verification(!opts.sslverify)
        .build();
    let proxy = match &opts.proxy {
        Some(p) => {
            let proxy = ureq::Proxy::new(p).map_err(|e| format!("proxy={p}: {e}"))?;
            match &opts.noproxy {
                Some(n) => Some(
                    ureq::Proxy::builder(proxy.protocol())
                        .host(proxy.host())
                        .port(proxy.port())
                        .no_proxy(n)
                        .build()
                        .map_err(|e| format!("proxy={p}: {e}"))?,
                ),
                None => Some(proxy),
            }
        }
        None => ureq::Proxy::try_from_env(),
    };
    let mut config = Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(tls)
        .proxy(proxy)
        .max_idle_connections(opts.connections.max(1))
        .max_idle_connections_per_host(opts.connections.max(1))
        .timeout_global(opts.timeout)
        .timeout_connect(opts.connect_timeout)
        .user_agent(
            opts.user_agent
                .clone()
                .unwrap_or_else(|| format!("nbd-storage/{}", env!("CARGO_PKG_VERSION"))),
        );
    // No compressed bodies: the ranges are of the file's bytes.
    config = config.accept_encoding("identity");
    Ok(config.build().into())
}

/// The CAs to trust: `cainfo=`/`capath=`, else the system's bundle.
fn root_certs(opts: &HttpOptions) -> Result<RootCerts, String> {
    let mut certs: Vec<Certificate<'static>> = Vec::new();
    let mut load = |path: &std::path::Path, must: bool| -> Result<(), String> {
        let pem = match std::fs::read(path) {
            Ok(p) => p,
            Err(e) if must => return Err(format!("{}: {e}", path.display())),
            Err(_) => return Ok(()),
        };
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) if must => return Err(format!("{}: {e}", path.display())),
                Err(_) => {}
            }
        }
        Ok(())
    };
    if opts.cainfo.is_some() || opts.capath.is_some() {
        if let Some(f) = &opts.cainfo {
            load(f, true).map_err(|e| format!("cainfo={e}"))?;
        }
        if let Some(d) = &opts.capath {
            let entries = std::fs::read_dir(d).map_err(|e| format!("capath={}: {e}", d.display()))?;
            for e in entries.flatten() {
                let p = e.path();
                if p.is_file() {
                    load(&p, false)?;
                }
            }
        }
        if let Some(f) = &opts.cainfo
            && certs.is_empty()
        {
            return Err(format!("cainfo={}: no certificate in it", f.display()));
        }
    } else {
        let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
        let known = [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/ca-bundle.pem",
            "/etc/ssl/cert.pem",
        ];
        if let Some(f) = env
            .into_iter()
            .chain(known.iter().map(PathBuf::from))
            .find(|p| p.is_file())
        {
            load(&f, false)?;
        }
    }
    Ok(RootCerts::Specific(Arc::new(certs)))
}

/// `EROFS`: the export is read-only.
fn read_only() -> io::Error {
    errno_error(libc::EROFS)
}

impl Storage for HttpStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        // Every connection reads the same immutable file.
        Capabilities::default()
            .read_only(true)
            .can_multi_conn(true)
            .can_cache(false)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut done = 0usize;
        let mut resolved_again = false;
        let mut attempt = 0u32;
        loop {
            let url = self.pinned.read().unwrap_or_else(|p| p.into_inner()).clone();
            let failure = match self.read_once(&url, buf, offset, &mut done) {
                Ok(()) => return Ok(()),
                Err(f) => f,
            };
            attempt += 1;
            let (reason, may_move, moved) = match failure {
                Failure::Fatal(r) => return Err(self.read_error(offset, buf.len(), attempt, &r)),
                // Moved again after resolving the URL again: it stays so.
                Failure::Moved(r) if resolved_again => return Err(self.read_error(offset, buf.len(), attempt, &r)),
                Failure::Moved(r) => (r, true, true),
                // A connection error on a redirect's target: it may be gone.
                Failure::Transient(r) => (r, *url != *self.url, false),
            };
            if attempt >= self.retries {
                return Err(self.read_error(offset, buf.len(), attempt, &reason));
            }
            if may_move && !resolved_again {
                // Once per read: where does the original URL lead now?
                resolved_again = true;
                match self.resolve() {
                    Ok((pinned, size)) if size == self.size => {
                        *self.pinned.write().unwrap_or_else(|p| p.into_inner()) = pinned.into();
                        continue;
                    }
                    Ok((_, size)) => {
                        let r = format!("{reason}; and the file changed size ({} to {size} bytes)", self.size);
                        return Err(self.read_error(offset, buf.len(), attempt, &r));
                    }
                    Err(e) if moved => {
                        let r = format!("{reason}; resolving the URL again: {}", e.into_text());
                        return Err(self.read_error(offset, buf.len(), attempt, &r));
                    }
                    // A passing failure, maybe of the network: the pinned
                    // URL gets the attempts that are left.
                    Err(_) => {}
                }
            }
            std::thread::sleep(self.retry_delay.saturating_mul(1 << (attempt - 1).min(10)));
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        Err(read_only())
    }

    fn trim(&self, offset: u64, length: u64, _fua: bool) -> io::Result<()> {
        check_range(self.size, offset, length)?;
        Err(read_only())
    }

    fn write_zeroes(&self, offset: u64, length: u64, _flags: ZeroFlags) -> io::Result<()> {
        check_range(self.size, offset, length)?;
        Err(read_only())
    }

    fn sparse_reads(&self) -> crate::SparseReads {
        // No allocation map: holes are found in what was read.
        crate::SparseReads::Contents
    }
}

impl HttpStorage {
    fn read_error(&self, offset: u64, len: usize, attempts: u32, reason: &str) -> io::Error {
        io::Error::other(format!(
            "{}: reading {len} bytes at {offset} failed{}: {reason}",
            self.url,
            if attempts > 1 {
                format!(" after {attempts} attempts")
            } else {
                String::new()
            }
        ))
    }
}

/// Finds the backing files of an image on a web server
/// ([`crate::image::remote::LayerSource`]): a relative name is resolved
/// against the image's URL (the same directory on the same server), an
/// `http://` or `https://` URL is taken as it is, and each is opened as
/// another [`HttpStorage`] with the same options. A local absolute path,
/// or a URL of another scheme, is refused: it cannot be read from here.
#[derive(Debug, Clone, Default)]
pub struct HttpLayers {
    options: HttpOptions,
}

impl HttpLayers {
    /// Opens backing files with `options`.
    pub fn new(options: HttpOptions) -> HttpLayers {
        HttpLayers { options }
    }
}

/// Resolves the backing file name `name` recorded in the image at `image`
/// (an `http://` or `https://` URL) as a URL.
pub fn resolve_backing_url(image: &str, name: &str) -> io::Result<String> {
    let refuse = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
    if name.is_empty() {
        return Err(refuse("an empty backing file name"));
    }
    if is_http_url(name) {
        return Ok(name.to_string());
    }
    if name.contains("://") || name.starts_with("json:") {
        return Err(refuse(
            "not an http:// or https:// URL, so it cannot be read from the image's web server",
        ));
    }
    if name.starts_with('/') {
        return Err(refuse(
            "a local absolute path, which cannot be read from the image's web server \
             (rebase the image onto a relative name or a URL: qemu-img rebase -u)",
        ));
    }
    // The image's directory: its URL without query or fragment, up to the
    // last '/' of the path (after the authority).
    let bare = image.split(['?', '#']).next().unwrap_or(image);
    let after_scheme = bare.find("://").map(|i| i + 3).unwrap_or(0);
    let dir = match bare[after_scheme..].find('/') {
        Some(p) => {
            let path_start = after_scheme + p;
            let last = bare[path_start..]
                .rfind('/')
                .map(|i| path_start + i)
                .unwrap_or(path_start);
            &bare[..=last]
        }
        None => return Ok(format!("{bare}/{name}")),
    };
    Ok(format!("{dir}{name}"))
}

impl crate::image::remote::LayerSource for HttpLayers {
    fn open_backing(&self, image: &str, name: &str) -> io::Result<(String, Arc<dyn Storage>)> {
        let url = resolve_backing_url(image, name)?;
        let storage = HttpStorage::open_with(&url, &self.options)?;
        Ok((url, Arc::new(storage)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-0/10"), Some((0, 0, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */0"), Some((u64::MAX, u64::MAX, Some(0))));
        assert_eq!(parse_content_range("bytes 5-10/10"), None);
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn parameters() {
        let mut o = HttpOptions::default();
        o.set("header", "Authorization: Bearer x:y").unwrap();
        o.set_param("sslverify=false").unwrap();
        o.set_param("timeout=2.5").unwrap();
        o.set_param("cookie=a=b").unwrap();
        o.set_param("retries=3").unwrap();
        assert_eq!(
            o.headers,
            vec![
                ("Authorization".to_string(), "Bearer x:y".to_string()),
                ("Cookie".to_string(), "a=b".to_string())
            ]
        );
        assert!(!o.sslverify);
        assert_eq!(o.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(o.retries, 3);
        assert!(o.set("password", "x").unwrap_err().contains("unknown HTTP parameter"));
        assert!(o.set("retries", "0").is_err());
        assert!(o.set("header", "no colon").is_err());
        assert!(is_http_url("HTTPS://h/x") && is_http_url("http://h") && !is_http_url("nbd://h"));
    }

    #[test]
    fn backing_urls() {
        let r = |i: &str, n: &str| resolve_backing_url(i, n).map_err(|e| e.to_string());
        assert_eq!(r("http://h/d/top.qcow2", "base.raw").unwrap(), "http://h/d/base.raw");
        assert_eq!(
            r("https://h:8/a/b/t?sig=1#x", "../c/b.qcow2").unwrap(),
            "https://h:8/a/b/../c/b.qcow2"
        );
        assert_eq!(r("http://h", "b").unwrap(), "http://h/b");
        assert_eq!(r("http://h/t", "HTTPS://o/b").unwrap(), "HTTPS://o/b");
        assert!(
            r("http://h/t", "/var/lib/b.qcow2")
                .unwrap_err()
                .contains("local absolute path")
        );
        assert!(r("http://h/t", "nbd://h/x").unwrap_err().contains("not an http"));
        assert!(r("http://h/t", "").unwrap_err().contains("empty"));
    }

    #[test]
    fn refuses_what_is_not_a_url() {
        let e = HttpStorage::open("nbd://localhost/x").unwrap_err();
        assert!(e.to_string().contains("not an http"), "{e}");
    }
}
