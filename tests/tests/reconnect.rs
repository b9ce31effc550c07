//! Reconnection across restarts of real servers: nbd-serve, qemu-nbd
//! (`--persistent`) and nbdkit, each serving a file, are killed with
//! SIGKILL and restarted on the same socket while
//!
//! - nbd-copy copies 1 GiB to and from the export with
//!   `--reconnect-delay` (twice per copy; `cmp` then finds no
//!   difference),
//! - a pool of 4 async connections does random writes and reads checked
//!   against a model of the export (and survives a third, graceful
//!   restart: SIGTERM, which nbdkit and nbd-serve answer with
//!   NBD_ESHUTDOWN to what is still in flight), and a blocking client
//!   reads back, after a restart, what it wrote before;
//!
//! and once the server stays away longer than the reconnect delay, every
//! outstanding and later request fails with `Error::ReconnectFailed`
//! (nbd-copy fails saying so), and nothing hangs.
//!
//! The copies write about 2 GiB per server, so the tests take turns.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nbd_blocking::client::{Client as BlockingClient, ConnectOptions, Error, Reconnect, Timeouts};
use nbd_proto::client::ClientConfig;
use nbd_proto::uri::NbdUri;
use nbd_smol::client::Client;
use nbd_smol::pool::Pool;
use nbd_tests::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// One test at a time: each writes gigabytes.
static SERIAL: Mutex<()> = Mutex::new(());

/// The reconnect delay of the copies and pools that must survive.
const DELAY: Duration = Duration::from_secs(30);

/// The reconnect delay of the clients that must give up.
const SHORT_DELAY: Duration = Duration::from_secs(2);

/// How long after the reconnect delay the clients may give up (the issue
/// asks for one second; the assertion allows for a busy machine, and the
/// tests print the figures).
const SLACK: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NbdServe,
    QemuNbd,
    Nbdkit,
}

/// A server of `file` on `socket` that the test restarts.
struct Server {
    kind: Kind,
    socket: PathBuf,
    file: PathBuf,
    peer: Option<Peer>,
    /// The socket and the server's logs.
    dir: TempDir,
}

impl Server {
    fn start(kind: Kind, file: &Path) -> Server {
        let dir = TempDir::new();
        let mut s = Server {
            kind,
            socket: dir.socket_path("srv"),
            file: file.to_owned(),
            peer: None,
            dir,
        };
        s.restart();
        s
    }

    fn uri(&self) -> String {
        Endpoint::Unix(self.socket.clone()).uri("")
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut p) = self.peer.take() {
            p.kill();
        }
    }

    /// SIGTERM, as a service manager stops a server (nbdkit and nbd-serve
    /// refuse what they are still sent with NBD_ESHUTDOWN), then waits
    /// until it is gone.
    fn terminate(&mut self) {
        if let Some(mut p) = self.peer.take() {
            let pid = libc::pid_t::try_from(p.pid()).unwrap();
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while p.is_running() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            assert!(!p.is_running(), "{:?} still runs 20 s after SIGTERM", self.kind);
        }
    }

    /// Starts the server again on the same socket and file.
    fn restart(&mut self) {
        let dir = &self.dir;
        if let Some(mut p) = self.peer.take() {
            p.kill();
        }
        // The dead server's socket file stays behind.
        let _ = fs::remove_file(&self.socket);
        let sock = self.socket.to_str().unwrap().to_owned();
        let file = self.file.to_str().unwrap().to_owned();
        let endpoint = Endpoint::Unix(self.socket.clone());
        self.peer = Some(match self.kind {
            Kind::NbdServe => Peer::start(dir, &our_bin("nbd-serve"), &["-k", &sock, &file], endpoint),
            Kind::QemuNbd => Peer::start(
                dir,
                "qemu-nbd",
                &[
                    &format!("--socket={sock}"),
                    "--persistent",
                    "--shared=16",
                    "-f",
                    "raw",
                    &file,
                ],
                endpoint,
            ),
            Kind::Nbdkit => Peer::start(dir, "nbdkit", &["-f", "-U", &sock, "file", &file], endpoint),
        });
    }
}

fn peers_for(kind: Kind) -> bool {
    match kind {
        Kind::NbdServe => true,
        Kind::QemuNbd => require_peer("qemu-nbd"),
        Kind::Nbdkit => require_peer("nbdkit"),
    }
}

/// Bytes of `path` on disk.
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// A 1 GiB source: random data in [0, 384 MiB) and [640 MiB, 1 GiB), a
/// hole between (copied as zeroes).
fn make_source(path: &Path) {
    let mut f = File::create(path).unwrap();
    f.set_len(GIB).unwrap();
    let mut random = File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for (start, end) in [(0, 384 * MIB), (640 * MIB, GIB)] {
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(start)).unwrap();
        for _ in (start..end).step_by(MIB as usize) {
            random.read_exact(&mut buf).unwrap();
            f.write_all(&buf).unwrap();
        }
    }
}

/// Runs `nbd-copy args` while the server is killed and restarted twice,
/// each time after `watched` (the file the copy writes) grew by 128 MiB
/// more; checks that the copy succeeded and reconnected.
fn copy_across_restarts(server: &mut Server, watched: &Path, args: &[&str], what: &str) {
    let started = Instant::now();
    let mut child = Command::new(our_bin("nbd-copy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut kills = 0;
    let mut mark = allocated(watched);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            panic!("{what}: nbd-copy still running after 10 minutes");
        }
        if kills < 2 && allocated(watched) >= mark + 128 * MIB {
            server.kill();
            kills += 1;
            eprintln!("{what}: server killed at {:.2} s", started.elapsed().as_secs_f64());
            thread::sleep(Duration::from_millis(200));
            server.restart();
            mark = allocated(watched);
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stderr = err_thread.join().unwrap();
    eprintln!(
        "{what}: copied in {:.2} s; {}",
        started.elapsed().as_secs_f64(),
        stderr.trim()
    );
    assert!(status.success(), "{what}: nbd-copy failed ({status}): {stderr}");
    assert_eq!(kills, 2, "{what}: the copy ended before the server was killed twice");
    assert!(stderr.contains("reconnected"), "{what}: {stderr}");
}

/// `cmp` finds no difference.
fn same_files(a: &Path, b: &Path, what: &str) {
    let out = run("cmp", &[a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.success(), "{what}: {}", describe_output(&out));
}

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn resilient(delay: Duration) -> ConnectOptions {
    ConnectOptions::default()
        .timeouts(Timeouts::default().request(Some(Duration::from_secs(30))))
        .reconnect(Some(Reconnect::within(delay)))
        .tls(None)
}

/// Size of the export the pool works on.
const MODEL_SIZE: u64 = 64 * MIB;

/// A pool of 4 connections does rounds of random writes and reads (16
/// disjoint ranges in flight at once) checked against a model, while
/// another thread kills and restarts the server twice, then stops it
/// with SIGTERM and restarts it once more.
fn pool_against_model(kind: Kind, dir: &TempDir) {
    let file = dir.join("model.img");
    File::create(&file).unwrap().set_len(MODEL_SIZE).unwrap();
    let server = Arc::new(Mutex::new(Server::start(kind, &file)));
    let uri = NbdUri::parse(&server.lock().unwrap().uri()).unwrap();
    let round = Arc::new(AtomicU32::new(0));
    let killer = {
        let (server, round) = (server.clone(), round.clone());
        thread::spawn(move || {
            for (at, graceful) in [(10, false), (30, false), (40, true)] {
                while round.load(Ordering::SeqCst) < at {
                    thread::sleep(Duration::from_millis(1));
                }
                let mut s = server.lock().unwrap();
                if graceful {
                    s.terminate();
                } else {
                    s.kill();
                }
                thread::sleep(Duration::from_millis(200));
                s.restart();
            }
            // nbdkit asks for SIGTERM when the thread that started it
            // ends (PR_SET_PDEATHSIG): live until the pool is done.
            while round.load(Ordering::SeqCst) != u32::MAX {
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut model = vec![0u8; MODEL_SIZE as usize];
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ kind as u64);
    smol::block_on(async {
        let config = ClientConfig::default().max_in_flight(8);
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(
                Client::connect_with(&uri, config.clone(), &resilient(DELAY))
                    .await
                    .unwrap(),
            );
        }
        let pool = Arc::new(Pool::from_clients(clients).unwrap());
        let cell = MODEL_SIZE / 64;
        for r in 0..50u32 {
            round.store(r, Ordering::SeqCst);
            // 16 distinct cells, a random range in each.
            let mut cells: Vec<u64> = (0..64).collect();
            let mut tasks = Vec::new();
            for i in 0..16usize {
                let pick = i + rng.below(64 - i as u64) as usize;
                cells.swap(i, pick);
                let len = 1 + rng.below(cell);
                let offset = cells[i] * cell + rng.below(cell - len + 1);
                let pool = pool.clone();
                if rng.below(2) == 0 {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                    tasks.push(smol::spawn(async move {
                        let (res, _) = pool.write(data, offset).await;
                        (res, None, offset)
                    }));
                } else {
                    let want = model[offset as usize..(offset + len) as usize].to_vec();
                    tasks.push(smol::spawn(async move {
                        let (res, buf) = pool.read(vec![0u8; len as usize], offset).await;
                        (res, Some((buf, want)), offset)
                    }));
                }
            }
            for t in tasks {
                let (res, read, offset) = t.await;
                res.unwrap_or_else(|e| panic!("{kind:?} round {r}: request at {offset}: {e}"));
                if let Some((got, want)) = read {
                    assert!(
                        got == want,
                        "{kind:?} round {r}: READ at {offset} differs from the model"
                    );
                }
            }
        }
        // The whole export, as the model says.
        let (res, all) = pool.read(vec![0u8; MODEL_SIZE as usize], 0).await;
        res.unwrap();
        assert!(all == model, "{kind:?}: the export differs from the model");
        pool.flush().await.unwrap();
        let stats = pool.stats();
        eprintln!("{kind:?}: pool of 4 after three restarts: {stats:?}");
        assert!(stats.reconnects >= 3, "{kind:?}: {stats:?}");
        pool.disconnect().await.unwrap();
    });
    round.store(u32::MAX, Ordering::SeqCst);
    killer.join().unwrap();

    // The blocking client, one request at a time, across a restart (of
    // a server this thread starts: the killer's ended with it).
    server.lock().unwrap().restart();
    let mut c = BlockingClient::connect_with(&uri, ClientConfig::default(), &resilient(DELAY)).unwrap();
    let data = pattern(MIB as usize, 77);
    c.write(&data, 5 * MIB).unwrap();
    c.flush().unwrap();
    server.lock().unwrap().restart();
    let mut back = vec![0u8; MIB as usize];
    c.read(&mut back, 5 * MIB).unwrap();
    assert!(back == data, "{kind:?}: blocking client read back other data");
    assert_eq!(c.stats().reconnects, 1, "{kind:?}");
    c.disconnect().unwrap();
}

/// With the server gone for longer than the delay, every request fails
/// with [`Error::ReconnectFailed`] by the end of the delay.
fn gone_too_long(kind: Kind, dir: &TempDir, source: &Path) {
    let file = dir.join("gone.img");
    File::create(&file).unwrap().set_len(MODEL_SIZE).unwrap();
    let mut server = Server::start(kind, &file);
    let uri = NbdUri::parse(&server.uri()).unwrap();
    let failed = |e: &Error| matches!(e, Error::ReconnectFailed { delay, .. } if *delay == SHORT_DELAY);
    smol::block_on(async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(
                Client::connect_with(&uri, ClientConfig::default(), &resilient(SHORT_DELAY))
                    .await
                    .unwrap(),
            );
        }
        let pool = Arc::new(Pool::from_clients(clients).unwrap());
        let (r, _) = pool.write(vec![1u8; 65536], 0).await;
        r.unwrap();
        server.kill();
        let killed = Instant::now();
        let tasks: Vec<_> = (0..32u64)
            .map(|i| {
                let pool = pool.clone();
                smol::spawn(async move {
                    if i % 2 == 0 {
                        pool.read(vec![0u8; 65536], i * 65536).await.0
                    } else {
                        pool.write(vec![2u8; 65536], i * 65536).await.0
                    }
                })
            })
            .collect();
        for t in tasks {
            let r = t.await;
            assert!(matches!(&r, Err(e) if failed(e)), "{kind:?}: {r:?}");
        }
        let took = killed.elapsed();
        eprintln!(
            "{kind:?}: 32 requests on 4 connections failed {:.3} s after the server died (delay {SHORT_DELAY:?})",
            took.as_secs_f64()
        );
        assert!(took >= SHORT_DELAY.mul_f64(0.9), "{kind:?}: gave up after {took:?}");
        assert!(took < SHORT_DELAY + SLACK, "{kind:?}: gave up only after {took:?}");
        // Later requests fail at once, with the same error.
        let later = pool.flush().await;
        assert!(matches!(&later, Err(e) if failed(e)), "{kind:?}: {later:?}");
        assert!(pool.clients().iter().all(Client::is_closed));
    });

    // The blocking client.
    server.restart();
    let mut c = BlockingClient::connect_with(&uri, ClientConfig::default(), &resilient(SHORT_DELAY)).unwrap();
    c.write(&[3u8; 4096], 0).unwrap();
    server.kill();
    let killed = Instant::now();
    let r = c.read(&mut [0u8; 4096], 0);
    let took = killed.elapsed();
    eprintln!(
        "{kind:?}: blocking client gave up {:.3} s after the server died",
        took.as_secs_f64()
    );
    assert!(matches!(&r, Err(e) if failed(e)), "{kind:?}: {r:?}");
    assert!(took < SHORT_DELAY + SLACK, "{kind:?}: gave up only after {took:?}");
    assert!(matches!(c.flush(), Err(e) if failed(&e)));

    // nbd-copy, from a server that dies in the middle and stays dead.
    server.file = source.to_owned();
    server.restart();
    let out_file = dir.join("partial.img");
    let uri_s = server.uri();
    let out_s = out_file.to_str().unwrap().to_owned();
    let copy = thread::spawn(move || {
        let t = Instant::now();
        let out = run_timeout(
            &our_bin("nbd-copy"),
            &["--reconnect-delay=2", &uri_s, &out_s],
            Duration::from_secs(120),
        );
        (out, t)
    });
    while allocated(&out_file) < 64 * MIB && !copy.is_finished() {
        thread::sleep(Duration::from_millis(5));
    }
    server.kill();
    let killed = Instant::now();
    let (out, _) = copy.join().unwrap();
    let took = killed.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{kind:?}: nbd-copy failed {:.3} s after the server died: {}",
        took.as_secs_f64(),
        stderr.trim()
    );
    assert!(
        !out.status.success() && stderr.contains("not re-established within 2s"),
        "{kind:?}: {}",
        describe_output(&out)
    );
    assert!(
        took < SHORT_DELAY + SLACK,
        "{kind:?}: nbd-copy gave up only after {took:?}"
    );
    let _ = fs::remove_file(&out_file);
}

fn across_restarts(kind: Kind) {
    if !peers_for(kind) {
        return;
    }
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new();
    let source = dir.join("source.img");
    make_source(&source);

    // To the export.
    let served = dir.join("served.img");
    File::create(&served).unwrap().set_len(GIB).unwrap();
    let mut server = Server::start(kind, &served);
    let uri = server.uri();
    copy_across_restarts(
        &mut server,
        &served,
        &["--reconnect-delay=30", "--flush", source.to_str().unwrap(), &uri],
        &format!("{kind:?}: 1 GiB to the export"),
    );
    server.kill();
    same_files(&source, &served, &format!("{kind:?}: to the export"));
    let _ = fs::remove_file(&served);

    // From the export.
    let mut server = Server::start(kind, &source);
    let copied = dir.join("copied.img");
    let uri = server.uri();
    copy_across_restarts(
        &mut server,
        &copied,
        &["--reconnect-delay=30", &uri, copied.to_str().unwrap()],
        &format!("{kind:?}: 1 GiB from the export"),
    );
    server.kill();
    same_files(&source, &copied, &format!("{kind:?}: from the export"));
    let _ = fs::remove_file(&copied);

    pool_against_model(kind, &dir);
    gone_too_long(kind, &dir, &source);
}

#[test]
fn nbd_serve_restarts() {
    across_restarts(Kind::NbdServe);
}

#[test]
fn qemu_nbd_restarts() {
    across_restarts(Kind::QemuNbd);
}

#[test]
fn nbdkit_restarts() {
    across_restarts(Kind::Nbdkit);
}

/// A server restarted on another export (here: of another size) is not
/// written to: both clients fail with [`Error::ExportChanged`], at once
/// rather than after the delay, and stay closed.
#[test]
fn export_changed_after_restart() {
    let dir = TempDir::new();
    let first = dir.join("first.img");
    File::create(&first).unwrap().set_len(MODEL_SIZE).unwrap();
    let other = dir.join("other.img");
    File::create(&other).unwrap().set_len(MODEL_SIZE / 2).unwrap();
    let mut server = Server::start(Kind::NbdServe, &first);
    let uri = NbdUri::parse(&server.uri()).unwrap();
    let changed = |e: &Error| matches!(e, Error::ExportChanged(why) if why.contains("size"));

    let mut blocking = BlockingClient::connect_with(&uri, ClientConfig::default(), &resilient(DELAY)).unwrap();
    blocking.write(&[1u8; 4096], 0).unwrap();
    let client = smol::block_on(Client::connect_with(&uri, ClientConfig::default(), &resilient(DELAY))).unwrap();
    server.kill();
    server.file = other;
    server.restart();

    let t = Instant::now();
    let r = blocking.write(&[2u8; 4096], 0);
    assert!(matches!(&r, Err(e) if changed(e)), "{r:?}");
    assert!(matches!(&blocking.read(&mut [0u8; 512], 0), Err(e) if changed(e)));
    let r = smol::block_on(client.write(vec![2u8; 4096], 0)).0;
    assert!(matches!(&r, Err(e) if changed(e)), "{r:?}");
    assert!(client.is_closed());
    assert!(matches!(&smol::block_on(client.flush()), Err(e) if changed(e)));
    assert!(t.elapsed() < DELAY, "the clients waited for the delay");
    // Nothing was written to the other export.
    let mut f = File::open(dir.join("other.img")).unwrap();
    let mut head = [0u8; 4096];
    f.read_exact(&mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0), "a client wrote to the other export");
}
