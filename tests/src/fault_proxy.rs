//! A fault-injecting HTTP/1.1 proxy for the HTTP source tests: it sits on
//! 127.0.0.1 between a client and a web server (nginx) and, by rules of
//! our choosing, adds latency to requests, cuts responses after some
//! bytes, answers `503 Service Unavailable` in the server's place, or
//! plays a server that is gone (connections closed without a reply).
//!
//! It reads each request head (enough of HTTP/1.1 to count requests on
//! kept-alive connections: the request line, `Content-Length` and
//! `Connection`), forwards the request on a connection of its own to the
//! server, and forwards the response head and its body by
//! `Content-Length` (a body without one is forwarded until the server
//! closes, then the client's connection is closed too).
//!
//! Requests are numbered from 0 in the order their heads arrive, over all
//! connections; a [`Rule`] tells from that number whether a [`Fault`]
//! applies. `Rule::Rate` is a deterministic pseudo-random choice from a
//! seed and the number, so a run is repeatable as far as the order of the
//! requests is.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// When a fault applies, from the number of the request (from 0, over all
/// connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Never.
    Never,
    /// Every request.
    Always,
    /// The first N requests (numbers `0..N`).
    FirstN(u64),
    /// Every Nth request (numbers `N-1`, `2N-1`, ...); `EveryNth(0)` is
    /// never.
    EveryNth(u64),
    /// Every request from number N on.
    From(u64),
    /// About `per_mille` requests in a thousand, chosen pseudo-randomly
    /// (but deterministically) from `seed` and the request's number.
    Rate {
        /// How many in a thousand (1000 or more: all).
        per_mille: u32,
        /// The seed of the choice.
        seed: u64,
    },
}

impl Rule {
    /// Whether the fault applies to request number `n`.
    pub fn applies(&self, n: u64) -> bool {
        match *self {
            Rule::Never => false,
            Rule::Always => true,
            Rule::FirstN(k) => n < k,
            Rule::EveryNth(k) => k > 0 && (n + 1).is_multiple_of(k),
            Rule::From(k) => n >= k,
            Rule::Rate { per_mille, seed } => splitmix64(seed ^ splitmix64(n)) % 1000 < u64::from(per_mille),
        }
    }
}

/// One step of splitmix64: a well-mixed 64-bit value from `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the proxy does to a request its [`Rule`] picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Wait this long before forwarding the request.
    Latency(Duration),
    /// Forward only this many bytes of the response (head included),
    /// then close the client's connection.
    Cut(u64),
    /// Answer `503 Service Unavailable` (`Content-Length: 0`, the
    /// connection kept alive unless the request asked to close it)
    /// without forwarding the request.
    Unavailable,
    /// Close the client's connection without an answer, as a server
    /// that is gone; with [`Rule::Always`], new connections are closed as
    /// soon as they are accepted and the open ones at once.
    Gone,
}

impl Fault {
    fn slot(&self) -> usize {
        match self {
            Fault::Latency(_) => 0,
            Fault::Cut(_) => 1,
            Fault::Unavailable => 2,
            Fault::Gone => 3,
        }
    }
}

/// The kinds of [`Fault`], to count them with [`FaultProxy::injected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// [`Fault::Latency`].
    Latency,
    /// [`Fault::Cut`].
    Cut,
    /// [`Fault::Unavailable`].
    Unavailable,
    /// [`Fault::Gone`].
    Gone,
}

impl FaultKind {
    fn slot(self) -> usize {
        self as usize
    }
}

struct Shared {
    upstream: SocketAddr,
    /// Per [`Fault::slot`]: the fault and its rule.
    faults: Mutex<[Option<(Fault, Rule)>; 4]>,
    requests: AtomicU64,
    injected: [AtomicU64; 4],
    /// The client connections open, to close them all when gone.
    open: Mutex<Vec<TcpStream>>,
    stopping: AtomicBool,
}

impl Shared {
    /// The faults that apply to request `n`.
    fn faults_for(&self, n: u64) -> Vec<Fault> {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults
            .iter()
            .flatten()
            .filter(|(_, rule)| rule.applies(n))
            .map(|(f, _)| *f)
            .collect()
    }

    fn gone_always(&self) -> bool {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        matches!(faults[3], Some((_, Rule::Always)))
    }

    fn count(&self, f: &Fault) {
        self.injected[f.slot()].fetch_add(1, Ordering::SeqCst);
    }
}

/// The proxy, listening on 127.0.0.1 (see the [module
/// documentation](self)); it stops accepting and closes its connections
/// when dropped.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("port", &self.port)
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy to the web server at `upstream`, on a free port of
    /// 127.0.0.1, injecting nothing until [`FaultProxy::set`].
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new([None; 4]),
            requests: AtomicU64::new(0),
            injected: Default::default(),
            open: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let s = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if s.gone_always() {
                    s.injected[FaultKind::Gone.slot()].fetch_add(1, Ordering::SeqCst);
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                }
                if let Ok(c) = conn.try_clone() {
                    s.open.lock().unwrap_or_else(|p| p.into_inner()).push(c);
                }
                let s = s.clone();
                thread::spawn(move || {
                    let _ = serve(&s, conn);
                });
            }
        });
        Ok(FaultProxy { port, shared })
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/PATH` through the proxy (`path` starts with
    /// `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Injects `fault` into the requests `rule` picks, in place of the
    /// rule that fault had (one rule per kind of fault; [`Rule::Never`]
    /// removes it). `Gone` with [`Rule::Always`] also closes the
    /// connections open now.
    pub fn set(&self, fault: Fault, rule: Rule) {
        self.shared.faults.lock().unwrap_or_else(|p| p.into_inner())[fault.slot()] = Some((fault, rule));
        if fault == Fault::Gone && rule == Rule::Always {
            self.close_all();
        }
    }

    /// Injects nothing any more.
    pub fn clear(&self) {
        *self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()) = [None; 4];
    }

    /// How many request heads arrived.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// How many times a fault of `kind` was injected (for `Gone`: the
    /// requests and the connections closed).
    pub fn injected(&self, kind: FaultKind) -> u64 {
        self.shared.injected[kind.slot()].load(Ordering::SeqCst)
    }

    fn close_all(&self) {
        for c in self.shared.open.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accepting thread.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        self.close_all();
    }
}

/// A message head: the start line and the headers, as read.
#[derive(Debug, Default)]
struct Head {
    raw: Vec<u8>,
    start: String,
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
}

/// The longest head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// Reads one message head; `None` at a clean end of the stream before it.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut head = Head::default();
    loop {
        let mut line = Vec::new();
        let n = r.by_ref().take(MAX_HEAD as u64).read_until(b'\n', &mut line)?;
        if n == 0 {
            if head.raw.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the head ended early"));
        }
        head.raw.extend_from_slice(&line);
        if head.raw.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if head.start.is_empty() {
            if text.is_empty() {
                // Blank lines before a request line are ignored (RFC 9112).
                head.raw.clear();
                continue;
            }
            head.start = text.to_string();
            continue;
        }
        if text.is_empty() {
            return Ok(Some(head));
        }
        if let Some((name, value)) = text.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    head.content_length = Some(
                        value
                            .parse()
                            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?,
                    )
                }
                "transfer-encoding" => head.chunked = value.to_ascii_lowercase().contains("chunked"),
                "connection" => head.close = value.to_ascii_lowercase().contains("close"),
                _ => {}
            }
        }
    }
}

/// Copies `len` bytes from `r` to `w`, at most `budget` of them (then
/// stops early); returns how many were copied.
fn copy_exact(r: &mut impl Read, w: &mut impl Write, len: u64, budget: u64) -> io::Result<u64> {
    let want = len.min(budget);
    let n = io::copy(&mut r.by_ref().take(want), w)?;
    if n < want {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended early"));
    }
    Ok(n)
}

/// Serves one client connection until it or the server closes.
fn serve(shared: &Shared, client: TcpStream) -> io::Result<()> {
    let _ = client.set_nodelay(true);
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let mut upstream: Option<(BufReader<TcpStream>, TcpStream)> = None;
    loop {
        let Some(req) = read_head(&mut from_client)? else {
            return Ok(());
        };
        let n = shared.requests.fetch_add(1, Ordering::SeqCst);
        let faults = shared.faults_for(n);
        let mut cut = u64::MAX;
        for f in &faults {
            match f {
                Fault::Gone => {
                    shared.count(f);
                    let _ = to_client.shutdown(Shutdown::Both);
                    return Ok(());
                }
                Fault::Latency(d) => {
                    shared.count(f);
                    thread::sleep(*d);
                }
                Fault::Cut(k) => cut = *k,
                Fault::Unavailable => {}
            }
        }
        let body_len = if req.chunked {
            // No chunked request bodies here: nothing of ours sends them.
            return Err(io::Error::new(io::ErrorKind::InvalidData, "chunked request body"));
        } else {
            req.content_length.unwrap_or(0)
        };
        if faults.contains(&Fault::Unavailable) {
            shared.count(&Fault::Unavailable);
            io::copy(&mut from_client.by_ref().take(body_len), &mut io::sink())?;
            let close = if req.close { "Connection: close\r\n" } else { "" };
            write!(
                to_client,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n{close}\r\n"
            )?;
            to_client.flush()?;
            if req.close {
                return Ok(());
            }
            continue;
        }
        // Forward the request.
        if upstream.is_none() {
            let s = TcpStream::connect(shared.upstream)?;
            let _ = s.set_nodelay(true);
            upstream = Some((BufReader::new(s.try_clone()?), s));
        }
        let Some((from_server, to_server)) = upstream.as_mut() else {
            return Ok(());
        };
        to_server.write_all(&req.raw)?;
        copy_exact(&mut from_client, to_server, body_len, u64::MAX)?;
        to_server.flush()?;
        // Forward the response.
        let Some(resp) = read_head(from_server)? else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed"));
        };
        if cut != u64::MAX {
            shared.count(&Fault::Cut(cut));
        }
        let head_sent = (resp.raw.len() as u64).min(cut);
        to_client.write_all(&resp.raw[..head_sent as usize])?;
        if head_sent < resp.raw.len() as u64 {
            to_client.flush()?;
            let _ = to_client.shutdown(Shutdown::Both);
            return Ok(());
        }
        let budget = cut - head_sent;
        let status: u16 = resp
            .start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let no_body = req.start.starts_with("HEAD ") || status == 204 || status == 304 || (100..200).contains(&status);
        let mut until_close = false;
        if !no_body {
            match resp.content_length {
                Some(len) if !resp.chunked => {
                    let sent = copy_exact(from_server, &mut to_client, len, budget)?;
                    if sent < len {
                        to_client.flush()?;
                        let _ = to_client.shutdown(Shutdown::Both);
                        return Ok(());
                    }
                }
                // Chunked or without a length: until the server closes.
                _ => {
                    io::copy(&mut from_server.by_ref().take(budget), &mut to_client)?;
                    until_close = true;
                }
            }
        }
        to_client.flush()?;
        if until_close || resp.close || req.close {
            let _ = to_client.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A web server that answers every request with `200` and the body
    /// `hello, PATH`, keeping the connection alive.
    fn upstream() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                thread::spawn(move || {
                    let mut r = BufReader::new(c.try_clone().unwrap());
                    let mut w = c;
                    while let Ok(Some(h)) = read_head(&mut r) {
                        let path = h.start.split_whitespace().nth(1).unwrap_or("/").to_string();
                        let body = format!("hello, {path}");
                        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    }
                });
            }
        });
        addr
    }

    struct Client {
        r: BufReader<TcpStream>,
        w: TcpStream,
    }

    impl Client {
        fn new(p: &FaultProxy) -> Client {
            let w = TcpStream::connect((Ipv4Addr::LOCALHOST, p.port())).unwrap();
            w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Client {
                r: BufReader::new(w.try_clone().unwrap()),
                w,
            }
        }

        /// Sends `GET path` and reads the answer: the status line and the
        /// body, or an error when the connection ends before it all.
        fn get(&mut self, path: &str) -> io::Result<(String, String)> {
            write!(self.w, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let h = read_head(&mut self.r)?.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            let mut body = vec![0u8; h.content_length.unwrap_or(0) as usize];
            self.r.read_exact(&mut body)?;
            Ok((h.start, String::from_utf8_lossy(&body).into_owned()))
        }
    }

    #[test]
    fn rules() {
        let picked = |r: Rule| (0..10).filter(|&n| r.applies(n)).collect::<Vec<_>>();
        assert_eq!(picked(Rule::Never), Vec::<u64>::new());
        assert_eq!(picked(Rule::Always), (0..10).collect::<Vec<_>>());
        assert_eq!(picked(Rule::FirstN(3)), vec![0, 1, 2]);
        assert_eq!(picked(Rule::EveryNth(3)), vec![2, 5, 8]);
        assert_eq!(picked(Rule::EveryNth(0)), Vec::<u64>::new());
        assert_eq!(picked(Rule::From(7)), vec![7, 8, 9]);
        let rate = |per_mille, seed| {
            (0..10_000)
                .filter(|&n| Rule::Rate { per_mille, seed }.applies(n))
                .count()
        };
        let r = rate(100, 1);
        assert!((800..1200).contains(&r), "{r} of 10000 at 10%");
        assert_eq!(rate(0, 1), 0);
        assert_eq!(rate(1000, 1), 10_000);
        // Deterministic, and the seed matters.
        let set = |seed| picked(Rule::Rate { per_mille: 500, seed });
        assert_eq!(set(5), set(5));
        assert_ne!(set(5), set(6));
    }

    #[test]
    fn forwards_kept_alive_requests_and_counts_them() {
        let p = FaultProxy::start(upstream()).unwrap();
        let mut c = Client::new(&p);
        for i in 0..3 {
            let (status, body) = c.get(&format!("/f{i}")).unwrap();
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert_eq!(body, format!("hello, /f{i}"));
        }
        assert_eq!(p.requests(), 3);
        assert_eq!(p.injected(FaultKind::Unavailable), 0);
    }

    #[test]
    fn answers_503_and_keeps_the_connection() {
        let p = FaultProxy::start(upstream()).unwrap();
        p.set(Fault::Unavailable, Rule::FirstN(2));
        let mut c = Client::new(&p);
        assert_eq!(
            c.get("/a").unwrap(),
            ("HTTP/1.1 503 Service Unavailable".into(), String::new())
        );
        assert_eq!(
            c.get("/a").unwrap(),
            ("HTTP/1.1 503 Service Unavailable".into(), String::new())
        );
        assert_eq!(c.get("/a").unwrap(), ("HTTP/1.1 200 OK".into(), "hello, /a".into()));
        assert_eq!(p.injected(FaultKind::Unavailable), 2);
        // Every other request, on a second connection.
        p.set(Fault::Unavailable, Rule::EveryNth(2));
        let mut d = Client::new(&p);
        let statuses: Vec<_> = (0..4).map(|_| d.get("/b").unwrap().0).collect();
        assert_eq!(
            statuses,
            [
                "HTTP/1.1 503 Service Unavailable",
                "HTTP/1.1 200 OK",
                "HTTP/1.1 503 Service Unavailable",
                "HTTP/1.1 200 OK"
            ]
        );
    }

    #[test]
    fn cuts_a_response_after_n_bytes() {
        let p = FaultProxy::start(upstream()).unwrap();
        let full = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello, /c";
        p.set(Fault::Cut(full.len() as u64 - 4), Rule::FirstN(1));
        let mut c = Client::new(&p);
        write!(c.w, "GET /c HTTP/1.1\r\n\r\n").unwrap();
        let mut got = Vec::new();
        c.r.read_to_end(&mut got).unwrap();
        assert_eq!(got, full.as_bytes()[..full.len() - 4]);
        // A cut inside the head; then the next connection is whole.
        p.set(Fault::Cut(5), Rule::FirstN(2));
        let mut c = Client::new(&p);
        write!(c.w, "GET /c HTTP/1.1\r\n\r\n").unwrap();
        let mut got = Vec::new();
        c.r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"HTTP/");
        assert_eq!(Client::new(&p).get("/c").unwrap().1, "hello, /c");
        assert_eq!(p.injected(FaultKind::Cut), 2);
    }

    #[test]
    fn adds_latency() {
        let p = FaultProxy::start(upstream()).unwrap();
        p.set(Fault::Latency(Duration::from_millis(150)), Rule::Always);
        let mut c = Client::new(&p);
        let t = Instant::now();
        c.get("/l").unwrap();
        c.get("/l").unwrap();
        assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
        assert_eq!(p.injected(FaultKind::Latency), 2);
    }

    #[test]
    fn gone_closes_everything() {
        let p = FaultProxy::start(upstream()).unwrap();
        let mut open = Client::new(&p);
        open.get("/g").unwrap();
        // From request 2 on: this connection's next request is closed.
        p.set(Fault::Gone, Rule::From(2));
        open.get("/g").unwrap();
        assert!(open.get("/g").is_err());
        // Always: the open connections close, new ones close at once.
        let mut other = Client::new(&p);
        assert!(other.get("/g").is_err());
        let mut kept = Client::new(&p);
        p.set(Fault::Gone, Rule::Never);
        kept.get("/g").unwrap();
        p.set(Fault::Gone, Rule::Always);
        assert!(kept.get("/g").is_err());
        assert!(Client::new(&p).get("/g").is_err());
        assert!(p.injected(FaultKind::Gone) >= 3);
    }
}
