//! HTTP sources under faults: nginx behind `nbd_tests::fault_proxy`, which
//! cuts responses, answers 503, adds latency or plays a server that is
//! gone. `nbd-copy URL` and `nbd-serve URL` (read by libnbd's nbdcopy)
//! must ride out the passing faults with byte-identical copies, and fail
//! with a clear error, in bounded time, when the server stays away.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use nbd_tests::fault_proxy::{Fault, FaultKind, FaultProxy, Rule};
use nbd_tests::*;

/// The size of the large copy by `nbd-copy URL`: the 1 GiB the issue
/// asks for (55 s in the debug test build on a machine of two cores,
/// alone; nbd-copy, the proxy and nginx all move every byte).
const LARGE: u64 = 1 << 30;

/// The size of the large copy through `nbd-serve URL` read by nbdcopy:
/// one more hop, so 1 GiB took 74 s there, over the minute a test may
/// take; 512 MiB is the largest power of two under it.
const LARGE_SERVED: u64 = 512 << 20;

/// The size of the copies with latency added: every request waits, so
/// fewer of them.
const SMALL: u64 = 16 << 20;

/// The longest a copy may take to fail once the server is gone: the five
/// attempts of a read wait 0.2 + 0.4 + 0.8 + 1.6 s between them, and the
/// open does the same; the rest is starting the programs.
const GONE_BOUND: Duration = Duration::from_secs(20);

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Writes `size` bytes of deterministic pseudo-random data (a different
/// pattern for every MiB) to `path`.
fn write_image(path: &Path, size: u64) {
    let mut f = File::create(path).unwrap();
    let mut left = size;
    let mut seed = 1;
    while left > 0 {
        let n = left.min(1 << 20);
        f.write_all(&pattern(n as usize, seed)).unwrap();
        left -= n;
        seed += 1;
    }
}

/// Compares two files by content, naming the first MiB that differs.
fn assert_same_file(a: &Path, b: &Path) {
    let (la, lb) = (fs::metadata(a).unwrap().len(), fs::metadata(b).unwrap().len());
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(1 << 20) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        assert!(ba[..n] == bb[..n], "the copy differs in the MiB at offset {off}");
        off += n as u64;
    }
}

/// nginx serving `size` bytes at /disk.img, and a fault proxy in front.
fn web(dir: &TempDir, size: u64) -> (WebServer, FaultProxy) {
    let w = nginx(dir);
    write_image(&w.root.join("disk.img"), size);
    let p = FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, w.port))).unwrap();
    (w, p)
}

/// Passing faults: about 2% of the requests cut after 64 KiB and some
/// bytes of the response, about 2% answered 503.
fn passing_faults(p: &FaultProxy) {
    p.set(Fault::Cut((64 << 10) + 300), Rule::Rate { per_mille: 20, seed: 7 });
    p.set(Fault::Unavailable, Rule::Rate { per_mille: 20, seed: 8 });
}

#[test]
fn nbd_copy_rides_out_drops_and_503s() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, p) = web(&dir, LARGE);
    passing_faults(&p);
    let out = dir.join("out.raw");
    let r = run_timeout(
        &our_bin("nbd-copy"),
        &[&p.url("/disk.img"), s(&out)],
        Duration::from_secs(300),
    );
    assert!(r.status.success(), "{}\n{}", describe_output(&r), w.error_log());
    assert_same_file(&w.root.join("disk.img"), &out);
    assert!(
        p.injected(FaultKind::Cut) > 0 && p.injected(FaultKind::Unavailable) > 0,
        "no fault was injected in {} requests",
        p.requests()
    );
}

#[test]
fn nbd_serve_rides_out_drops_and_503s() {
    if !require_peers(&["nginx", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, p) = web(&dir, LARGE_SERVED);
    passing_faults(&p);
    let socket = dir.socket_path("nbd-serve");
    let url = p.url("/disk.img");
    let server = Peer::start(
        &dir,
        &our_bin("nbd-serve"),
        &["--socket", s(&socket), &url],
        Endpoint::Unix(socket.clone()),
    );
    let out = dir.join("out.raw");
    let r = run_timeout("nbdcopy", &[&server.uri(""), s(&out)], Duration::from_secs(300));
    assert!(r.status.success(), "{}\n{}", describe_output(&r), server.stderr());
    assert_same_file(&w.root.join("disk.img"), &out);
    assert!(
        p.injected(FaultKind::Cut) > 0 && p.injected(FaultKind::Unavailable) > 0,
        "no fault was injected in {} requests",
        p.requests()
    );
}

#[test]
fn nbd_copy_with_latency_is_identical() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, p) = web(&dir, SMALL);
    p.set(Fault::Latency(Duration::from_millis(30)), Rule::Always);
    let out = dir.join("out.raw");
    let r = run_timeout(
        &our_bin("nbd-copy"),
        &[&p.url("/disk.img"), s(&out)],
        Duration::from_secs(300),
    );
    assert!(r.status.success(), "{}\n{}", describe_output(&r), w.error_log());
    assert_same_file(&w.root.join("disk.img"), &out);
    assert_eq!(p.injected(FaultKind::Latency), p.requests());
    assert!(p.requests() > 1);
}

#[test]
fn a_server_gone_mid_copy_fails_within_the_retry_bound() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (_w, p) = web(&dir, SMALL);
    // The open and some reads pass; then nothing is answered.
    p.set(Fault::Gone, Rule::From(4));
    let url = p.url("/disk.img");
    let out = dir.join("out.raw");
    // Built before the clock starts.
    let nbd_copy = our_bin("nbd-copy");
    let started = Instant::now();
    let r = run_timeout(&nbd_copy, &[&url, s(&out)], Duration::from_secs(120));
    let elapsed = started.elapsed();
    let t = describe_output(&r);
    assert_eq!(r.status.code(), Some(1), "{t}");
    assert!(elapsed < GONE_BOUND, "took {elapsed:?}: {t}");
    assert!(t.contains(&url) && t.contains("failed after 5 attempts"), "{t}");
    assert!(p.injected(FaultKind::Gone) > 0);
}

#[test]
fn a_503_at_open_is_a_clear_error() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, p) = web(&dir, 1 << 20);
    p.set(Fault::Unavailable, Rule::Always);
    let url = p.url("/disk.img");
    let out = dir.join("out.raw");
    // Built before the clock starts.
    let nbd_copy = our_bin("nbd-copy");
    let started = Instant::now();
    let r = run(&nbd_copy, &[&url, s(&out)]);
    let t = describe_output(&r);
    assert_eq!(r.status.code(), Some(1), "{t}");
    assert!(started.elapsed() < GONE_BOUND, "took {:?}: {t}", started.elapsed());
    assert!(
        t.contains(&url) && t.contains("HTTP 503 Service Unavailable") && t.contains("after 5 attempts"),
        "{t}"
    );
    // Tried again, and not forever.
    let n = p.requests();
    assert!((5..=10).contains(&n), "{n} requests: {t}");
    // A passing 503 at open is ridden out.
    p.set(Fault::Unavailable, Rule::FirstN(p.requests() + 2));
    let r = run(&our_bin("nbd-copy"), &[&url, s(&out)]);
    assert!(r.status.success(), "{}", describe_output(&r));
    assert_same_file(&w.root.join("disk.img"), &out);
}
