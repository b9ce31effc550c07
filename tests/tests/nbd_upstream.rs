//! nbd-serve with another NBD server as its source (`nbd-serve
//! nbd+unix:///...`, a proxy; `nbd_smol::upstream::NbdStorage`):
//!
//! - qemu-nbd serves a sparse raw file with a known pattern; through the
//!   proxy, nbdcopy reads identical bytes, `nbdinfo --map` gives qemu-nbd's
//!   own map, qemu-io's writes land in the file, and `-r` refuses them;
//! - nbdkit (slowed by its delay filter) is killed with SIGKILL twice
//!   during an nbdcopy of 256 MiB through the proxy and restarted on the
//!   same socket a second later: the copy completes, identical;
//! - an upstream gone longer than `--upstream-reconnect-delay`: reads
//!   through the proxy fail (not hang) within the bound, and succeed again
//!   once the upstream is back.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nbd_tests::*;

const MIB: u64 = 1 << 20;

/// nbd-serve proxying `upstream` on a Unix socket in `dir`.
fn proxy(dir: &TempDir, upstream: &str, extra: &[&str]) -> Peer {
    let socket = dir.socket_path("proxy");
    let sock = socket.to_str().unwrap().to_owned();
    let mut args = vec!["-k", sock.as_str()];
    args.extend_from_slice(extra);
    args.push(upstream);
    Peer::start(dir, &our_bin("nbd-serve"), &args, Endpoint::Unix(socket))
}

/// A sparse 64 MiB raw file: 64 KiB of a byte pattern every 4 MiB, holes
/// between.
fn patterned(path: &Path) {
    let mut f = File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    for i in 0..16u64 {
        f.seek(SeekFrom::Start(i * 4 * MIB)).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|j| (j as u8) ^ (i as u8).wrapping_mul(37)).collect();
        f.write_all(&data).unwrap();
    }
}

fn same_files(a: &Path, b: &Path, what: &str) {
    let out = run("cmp", &[a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.success(), "{what}: {}", describe_output(&out));
}

#[test]
fn qemu_nbd_through_the_proxy() {
    if !require_peers(&["qemu-nbd", "nbdcopy", "nbdinfo", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.join("disk.raw");
    patterned(&file);
    let upstream = qemu_nbd(&dir, &["-f", "raw", "-x", "disk", file.to_str().unwrap()]);
    let up_uri = upstream.uri("disk");
    let px = proxy(&dir, &up_uri, &[]);
    // The export keeps the upstream's name (and "" reaches it too).
    let px_uri = px.uri("disk");
    assert_eq!(run_ok("nbdinfo", &["--size", &px_uri]).trim(), (64 * MIB).to_string());
    assert_eq!(
        run_ok("nbdinfo", &["--size", &px.uri("")]).trim(),
        (64 * MIB).to_string()
    );

    // The same bytes.
    let out = dir.join("out.raw");
    run_ok("nbdcopy", &[&px_uri, out.to_str().unwrap()]);
    same_files(&file, &out, "nbdcopy through the proxy");

    // The same map (base:allocation, through the proxy's block status).
    let up_map = run_ok("nbdinfo", &["--map", &up_uri]);
    let px_map = run_ok("nbdinfo", &["--map", &px_uri]);
    assert!(up_map.lines().count() >= 32, "{up_map}");
    assert_eq!(px_map, up_map);

    // Writes land in the file.
    let written = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush", &px_uri],
    );
    assert!(written.contains("wrote 65536/65536"), "{written}");
    let mut back = vec![0u8; 65536];
    let mut f = File::open(&file).unwrap();
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a), "the write did not reach the file");
    let px_map = run_ok("nbdinfo", &["--map", &px_uri]);
    assert_eq!(px_map, run_ok("nbdinfo", &["--map", &up_uri]));
    drop(px);

    // -r: read-only, whatever the upstream allows.
    let ro = proxy(&dir, &up_uri, &["-r"]);
    let info = run_ok("nbdinfo", &[&ro.uri("disk")]);
    assert!(info.contains("is_read_only: true"), "{info}");
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 4k", &ro.uri("disk")]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("wrote 4096/4096"),
        "a write through -r succeeded: {text}"
    );
    let mut first = [0u8; 4];
    File::open(&file).unwrap().read_exact(&mut first).unwrap();
    assert_eq!(first, [0, 1, 2, 3]);

    drop(ro);

    // --export NAME=URI, next to a memory export.
    let socket = dir.socket_path("exports");
    let sock = socket.to_str().unwrap().to_owned();
    let export = format!("px={up_uri}");
    let multi = Peer::start(
        &dir,
        &our_bin("nbd-serve"),
        &["-k", &sock, "--export", "mem=memory:1M", "--export", &export],
        Endpoint::Unix(socket),
    );
    assert_eq!(
        run_ok("nbdinfo", &["--size", &multi.uri("px")]).trim(),
        (64 * MIB).to_string()
    );
    assert_eq!(
        run_ok("nbdinfo", &["--size", &multi.uri("mem")]).trim(),
        MIB.to_string()
    );
    let out = dir.join("out2.raw");
    run_ok("nbdcopy", &[&multi.uri("px"), out.to_str().unwrap()]);
    same_files(&file, &out, "nbdcopy through --export px=URI");
    drop(multi);

    // Filters are refused on NBD upstreams.
    let refused = run(
        &our_bin("nbd-serve"),
        &["--filter=cow", "-k", "/nonexistent/s", &up_uri],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not to NBD upstreams"),
        "{}",
        describe_output(&refused)
    );
}

/// nbdkit serving `file` (reads slowed down) on `socket`, restartable.
struct Upstream {
    dir: TempDir,
    socket: PathBuf,
    file: PathBuf,
    rdelay: &'static str,
    peer: Option<Peer>,
}

impl Upstream {
    fn start(file: &Path, rdelay: &'static str) -> Upstream {
        let dir = TempDir::new();
        let mut u = Upstream {
            socket: dir.socket_path("up"),
            dir,
            file: file.to_owned(),
            rdelay,
            peer: None,
        };
        u.restart();
        u
    }

    fn uri(&self) -> String {
        Endpoint::Unix(self.socket.clone()).uri("")
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.peer.take() {
            p.kill();
        }
    }

    fn restart(&mut self) {
        self.kill();
        let _ = fs::remove_file(&self.socket);
        let sock = self.socket.to_str().unwrap().to_owned();
        let rdelay = format!("rdelay={}", self.rdelay);
        let file = self.file.to_str().unwrap().to_owned();
        self.peer = Some(Peer::start(
            &self.dir,
            "nbdkit",
            &["-f", "-U", &sock, "--filter=delay", "file", &file, &rdelay],
            Endpoint::Unix(self.socket.clone()),
        ));
    }
}

/// A file of `len` bytes of random data.
fn random_file(path: &Path, len: u64) {
    let mut f = File::create(path).unwrap();
    let mut random = File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..len / MIB {
        random.read_exact(&mut buf).unwrap();
        f.write_all(&buf).unwrap();
    }
}

#[test]
fn upstream_restarts_are_invisible() {
    if !require_peers(&["nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let src = dir.join("src.raw");
    random_file(&src, 256 * MIB);
    let mut upstream = Upstream::start(&src, "60ms");
    let px = proxy(&dir, &upstream.uri(), &["--upstream-reconnect-delay", "30"]);
    let out = dir.join("out.raw");
    let started = Instant::now();
    let mut child = Command::new("nbdcopy")
        .args([&px.uri(""), out.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for round in 0..2 {
        thread::sleep(Duration::from_millis(700));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before the upstream was killed (round {round}): slow the upstream down"
        );
        upstream.kill();
        eprintln!("upstream killed at {:.2} s", started.elapsed().as_secs_f64());
        thread::sleep(Duration::from_secs(1));
        upstream.restart();
        eprintln!("upstream restarted at {:.2} s", started.elapsed().as_secs_f64());
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nbdcopy still running after 5 minutes\nproxy: {}", px.stderr());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    eprintln!("copied in {:.2} s", started.elapsed().as_secs_f64());
    assert!(
        status.success(),
        "nbdcopy failed ({status}): {stderr}\nproxy: {}",
        px.stderr()
    );
    same_files(&src, &out, "nbdcopy across two upstream restarts");
}

#[test]
fn upstream_gone_too_long_fails_then_recovers() {
    if !require_peers(&["nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let src = dir.join("src.raw");
    random_file(&src, 16 * MIB);
    let mut upstream = Upstream::start(&src, "0");
    let px = proxy(&dir, &upstream.uri(), &["--upstream-reconnect-delay", "2"]);
    let uri = px.uri("");
    run_ok("nbdcopy", &[&uri, "null:"]);
    upstream.kill();
    // Reads wait out the reconnect delay, then fail.
    let started = Instant::now();
    let out = run_timeout("nbdcopy", &[&uri, "null:"], Duration::from_secs(30));
    let took = started.elapsed();
    eprintln!("failed after {:.2} s: {}", took.as_secs_f64(), describe_output(&out));
    assert!(!out.status.success(), "a copy from a dead upstream succeeded");
    assert!(took < Duration::from_secs(2 + 3), "took {took:?}");
    // Later reads fail at once (the upstream is still gone).
    let started = Instant::now();
    let out = run_timeout("nbdcopy", &[&uri, "null:"], Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // Back: the proxy dials again.
    upstream.restart();
    thread::sleep(Duration::from_millis(1100));
    let copy = dir.join("copy.raw");
    run_ok("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    same_files(&src, &copy, "after the upstream came back");
}
