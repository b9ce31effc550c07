//! `HttpStorage` against a small web server of our own that misbehaves on
//! purpose: bodies cut short, 5xx answers, a redirect whose target
//! expires, ranges ignored. (The tests against nginx are in
//! tests/tests/http_source.rs.)
#![cfg(feature = "http")]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd_storage::Storage;
use nbd_storage::http::{HttpOptions, HttpStorage};

/// What the server does with a request for `path` (the `n`th request of
/// that path, from 0) for bytes `a..=b` of the data.
type Behaviour = dyn Fn(&str, usize, u64, u64) -> Reply + Send + Sync;

enum Reply {
    /// 206 with the range; `cut`: close after this many body bytes.
    Range { cut: Option<usize> },
    /// 200 with the whole file.
    Whole,
    /// A status without a body (`Location` for 3xx).
    Status(u16, Option<String>),
}

struct Server {
    port: u16,
    counts: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    connections: Arc<AtomicUsize>,
}

impl Server {
    fn start(data: Arc<Vec<u8>>, behaviour: Arc<Behaviour>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let c = counts.clone();
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (data, behaviour, counts) = (data.clone(), behaviour.clone(), c.clone());
                std::thread::spawn(move || serve(conn, &data, &*behaviour, &counts));
            }
        });
        Server {
            port,
            counts,
            connections,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn serve(
    conn: TcpStream,
    data: &[u8],
    behaviour: &Behaviour,
    counts: &Mutex<std::collections::HashMap<String, usize>>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    // Head and body go in two writes: no Nagle wait between them.
    let _ = out.set_nodelay(true);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("range: ").or_else(|| h.strip_prefix("Range: ")) {
                let (a, b) = v.trim_start_matches("bytes=").split_once('-').unwrap();
                range = Some((a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()));
            }
        }
        let n = {
            let mut c = counts.lock().unwrap();
            let e = c.entry(path.clone()).or_default();
            *e += 1;
            *e - 1
        };
        let (a, b) = range.unwrap_or((0, data.len() as u64 - 1));
        let b = b.min(data.len() as u64 - 1);
        let r = match behaviour(&path, n, a, b) {
            Reply::Range { cut } => {
                let body = &data[a as usize..=b as usize];
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\n\r\n",
                    body.len(),
                    data.len()
                );
                let body = &body[..cut.unwrap_or(body.len()).min(body.len())];
                out.write_all(head.as_bytes())
                    .and_then(|()| out.write_all(body))
                    .map(|()| cut.is_none())
            }
            Reply::Whole => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", data.len());
                out.write_all(head.as_bytes())
                    .and_then(|()| out.write_all(data))
                    .map(|()| true)
            }
            Reply::Status(s, location) => {
                let loc = location.map(|l| format!("Location: {l}\r\n")).unwrap_or_default();
                let head = format!("HTTP/1.1 {s} X\r\n{loc}Content-Length: 0\r\n\r\n");
                out.write_all(head.as_bytes()).map(|()| true)
            }
        };
        if !matches!(r, Ok(true)) {
            return;
        }
    }
}

fn data() -> Arc<Vec<u8>> {
    Arc::new(
        (0..300_001u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    )
}

fn quick() -> HttpOptions {
    HttpOptions::default().retry_delay(Duration::from_millis(1))
}

#[test]
fn reads_resume_after_cut_bodies_and_5xx() {
    let data = data();
    let server = Server::start(
        data.clone(),
        Arc::new(|_: &str, n: usize, _, _| match n {
            // The first request (open) is fine; then a cut body, a 503,
            // another cut body, then fine.
            1 | 3 => Reply::Range { cut: Some(1000) },
            2 => Reply::Status(503, None),
            _ => Reply::Range { cut: None },
        }),
    );
    let s = HttpStorage::open_with(&server.url("/d"), &quick()).unwrap();
    assert_eq!(s.size(), data.len() as u64);
    assert!(s.capabilities().read_only);
    let mut buf = vec![0u8; 100_000];
    s.read_at(&mut buf, 12_345).unwrap();
    assert!(buf[..] == data[12_345..112_345]);
    assert_eq!(server.requests("/d"), 5);
    // The last byte.
    let mut one = [0u8; 1];
    s.read_at(&mut one, data.len() as u64 - 1).unwrap();
    assert_eq!(one[0], data[data.len() - 1]);
    assert!(s.read_at(&mut one, data.len() as u64).is_err());
    assert_eq!(
        s.write_at(&one, 0, false).unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    assert_eq!(s.trim(0, 1, false).unwrap_err().raw_os_error(), Some(libc::EROFS));
}

#[test]
fn a_read_fails_after_the_attempts_with_a_message() {
    let server = Server::start(
        data(),
        Arc::new(|_: &str, n: usize, _, _| {
            if n == 0 {
                Reply::Range { cut: None }
            } else {
                Reply::Status(500, None)
            }
        }),
    );
    let s = HttpStorage::open_with(&server.url("/d"), &quick().retries(3)).unwrap();
    let e = s.read_at(&mut [0u8; 10], 0).unwrap_err();
    let t = e.to_string();
    assert!(
        t.contains("after 3 attempts") && t.contains("500") && t.contains(&server.url("/d")),
        "{t}"
    );
    assert_eq!(server.requests("/d"), 4);
}

#[test]
fn an_expired_redirect_target_is_resolved_again() {
    let generation = Arc::new(AtomicUsize::new(0));
    let g = generation.clone();
    let server = Server::start(
        data(),
        Arc::new(move |path: &str, _, _, _| {
            let now = g.load(Ordering::SeqCst);
            if path == "/disk" {
                return Reply::Status(302, Some(format!("/signed-{now}")));
            }
            // Only the newest signed URL is valid.
            if path == format!("/signed-{now}") {
                Reply::Range { cut: None }
            } else {
                Reply::Status(403, None)
            }
        }),
    );
    let s = HttpStorage::open_with(&server.url("/disk"), &quick()).unwrap();
    assert_eq!(s.pinned_url(), server.url("/signed-0"));
    let mut buf = vec![0u8; 5000];
    s.read_at(&mut buf, 7).unwrap();
    generation.store(1, Ordering::SeqCst);
    s.read_at(&mut buf, 7).unwrap();
    assert_eq!(s.pinned_url(), server.url("/signed-1"));
    assert!(buf[..] == data()[7..5007]);
    assert_eq!(server.requests("/signed-0"), 3);
    assert_eq!(server.requests("/disk"), 2);
}

#[test]
fn servers_that_ignore_ranges_are_refused() {
    let server = Server::start(data(), Arc::new(|_: &str, _, _, _| Reply::Whole));
    let e = HttpStorage::open_with(&server.url("/d"), &quick()).unwrap_err();
    let t = e.to_string();
    assert!(
        t.contains(&server.url("/d")) && t.contains("the server does not support range requests"),
        "{t}"
    );
    let server = Server::start(data(), Arc::new(|_: &str, _, _, _| Reply::Status(404, None)));
    let t = HttpStorage::open_with(&server.url("/d"), &quick())
        .unwrap_err()
        .to_string();
    assert!(t.contains("404"), "{t}");
}

#[test]
fn concurrent_reads_use_several_connections() {
    let data = data();
    let server = Server::start(data.clone(), Arc::new(|_: &str, _, _, _| Reply::Range { cut: None }));
    let s = Arc::new(HttpStorage::open_with(&server.url("/d"), &quick()).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let (s, data) = (s.clone(), data.clone());
            std::thread::spawn(move || {
                for j in 0..20u64 {
                    let off = (i * 31_337 + j * 1_009) % 290_000;
                    let mut buf = vec![0u8; 9_999];
                    s.read_at(&mut buf, off).unwrap();
                    assert!(buf[..] == data[off as usize..off as usize + 9_999]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(server.requests("/d"), 161);
    // Kept alive, yet more than one.
    let c = server.connections.load(Ordering::SeqCst);
    assert!((2..=16).contains(&c), "{c} connections");
}

#[test]
fn open_retries_5xx_408_and_429() {
    let data = data();
    // The size probe meets a 503, a 408, a 429 and a 502 before it is
    // answered (a refused connection at open: tests/tests/http_faults.rs).
    let server = Server::start(
        data.clone(),
        Arc::new(|_: &str, n: usize, _, _| match n {
            0 => Reply::Status(503, None),
            1 => Reply::Status(408, None),
            2 => Reply::Status(429, None),
            3 => Reply::Status(502, None),
            _ => Reply::Range { cut: None },
        }),
    );
    let s = HttpStorage::open_with(&server.url("/d"), &quick()).unwrap();
    assert_eq!(s.size(), data.len() as u64);
    assert_eq!(server.requests("/d"), 5);
    let mut buf = vec![0u8; 1000];
    s.read_at(&mut buf, 99).unwrap();
    assert!(buf[..] == data[99..1099]);
}

#[test]
fn open_fails_after_the_attempts_naming_the_status() {
    let server = Server::start(data(), Arc::new(|_: &str, _, _, _| Reply::Status(503, None)));
    let t = HttpStorage::open_with(&server.url("/d"), &quick().retries(3))
        .unwrap_err()
        .to_string();
    assert!(
        t.contains(&server.url("/d")) && t.contains("HTTP 503") && t.contains("after 3 attempts"),
        "{t}"
    );
    assert_eq!(server.requests("/d"), 3);
    // A 404 is not tried again.
    let server = Server::start(data(), Arc::new(|_: &str, _, _, _| Reply::Status(404, None)));
    let t = HttpStorage::open_with(&server.url("/d"), &quick())
        .unwrap_err()
        .to_string();
    assert!(t.contains("HTTP 404") && !t.contains("attempts"), "{t}");
    assert_eq!(server.requests("/d"), 1);
}
