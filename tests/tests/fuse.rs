//! `nbd-fuse` end to end: the export mounted as a file over FUSE, against
//! nbd-serve and qemu-nbd, checked with cmp, mkfs.ext4 and e2fsck, fio,
//! lseek against `nbdinfo --map`, fallocate, a read-only mount, SIGTERM,
//! and a server that dies.
//!
//! Needs /dev/fuse and fusermount; every mount is unmounted (lazily) when
//! its guard is dropped, so a failing test leaves no mount behind.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nbd_tests::*;

/// How long a mount may take to appear, and a process to exit.
const WAIT: Duration = Duration::from_secs(30);

/// The peers every test needs.
fn peers() -> bool {
    require_peers(&["fusermount", "nbdinfo"]) && Path::new("/dev/fuse").exists()
}

fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let sock = dir.socket_path("serve");
    let mut full = vec!["--socket", sock.to_str().unwrap()];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(sock.clone()))
}

/// Whether `path` is a mount point now (from /proc/self/mountinfo).
fn is_mounted(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let want = path.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want))
}

/// A running `nbd-fuse`, unmounted and stopped when dropped.
struct Mount {
    child: Option<Child>,
    mountpoint: PathBuf,
    file: PathBuf,
    log: PathBuf,
}

impl Mount {
    /// `nbd-fuse ARGS MOUNTPOINT[/NAME] TARGET...` on a new directory in
    /// `dir`; waits until the file is there.
    fn start(dir: &TempDir, args: &[&str], name: Option<&str>, target: &[&str]) -> Mount {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mountpoint = dir.join(format!("mnt{n}"));
        std::fs::create_dir(&mountpoint).unwrap();
        let log = dir.join(format!("nbd-fuse{n}.log"));
        let spec = match name {
            Some(f) => mountpoint.join(f),
            None => mountpoint.clone(),
        };
        let file = mountpoint.join(name.unwrap_or("nbd"));
        let out = File::create(&log).unwrap();
        let child = Command::new(our_bin("nbd-fuse"))
            .args(args)
            .arg(&spec)
            .args(target)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut m = Mount {
            child: Some(child),
            mountpoint,
            file,
            log,
        };
        let start = Instant::now();
        while !(is_mounted(&m.mountpoint) && m.file.exists()) {
            if let Ok(Some(st)) = m.child.as_mut().unwrap().try_wait() {
                panic!("nbd-fuse exited with {st} before mounting: {}", m.log());
            }
            assert!(
                start.elapsed() < WAIT,
                "nbd-fuse did not mount in {WAIT:?}: {}",
                m.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn file(&self) -> &str {
        self.file.to_str().unwrap()
    }

    /// Sends `sig` and waits (within [`WAIT`]) for the exit.
    fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        self.wait()
    }

    fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                start.elapsed() < WAIT,
                "nbd-fuse did not exit in {WAIT:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("fusermount")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A file of `size` bytes with pattern data in 1 MiB blocks at `at` (MiB),
/// the rest holes.
fn sparse_file(dir: &TempDir, name: &str, size: u64, at: &[u64]) -> PathBuf {
    let path = dir.sparse_file(name, size);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    for (i, &mib) in at.iter().enumerate() {
        f.write_all_at(&pattern(1 << 20, i as u64 + 7), mib << 20).unwrap();
    }
    path
}

fn cmp(a: &Path, b: &Path) {
    let out = run("cmp", &[a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe_output(&out));
}

/// The servers a test runs against, on `image` (a raw file).
enum Server {
    Ours,
    Qemu,
}

fn start(dir: &TempDir, server: &Server, image: &Path) -> Option<Peer> {
    Some(match server {
        Server::Ours => serve(dir, &["-f", "raw", image.to_str().unwrap()]),
        Server::Qemu => {
            if !require_peer("qemu-nbd") {
                return None;
            }
            qemu_nbd(
                dir,
                &["-f", "raw", "--cache=none", "--discard=unmap", image.to_str().unwrap()],
            )
        }
    })
}

fn writes_reach_the_export(server: Server) {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let image = sparse_file(&dir, "disk.img", 32 << 20, &[1, 20]);
    let Some(peer) = start(&dir, &server, &image) else {
        return;
    };
    let m = Mount::start(&dir, &[], Some("disk.raw"), &[&peer.uri("")]);
    assert_eq!(std::fs::metadata(&m.file).unwrap().len(), 32 << 20);
    assert_eq!(std::fs::metadata(&m.file).unwrap().mode() & 0o777, 0o666);
    cmp(&m.file, &image);
    let data = dir.join("data");
    std::fs::write(&data, pattern(3 << 20, 99)).unwrap();
    for args in [
        vec!["bs=4096", "seek=100"],
        vec!["bs=1000", "seek=12345", "count=700"],
        vec!["bs=1M", "seek=29"],
    ] {
        let mut full = vec![
            format!("if={}", data.display()),
            format!("of={}", m.file()),
            "conv=notrunc".into(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let full: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        run_ok("dd", &full);
    }
    cmp(&m.file, &image);
    // And what the server has, read back through the mount after a fresh open.
    let f = File::open(&m.file).unwrap();
    let mut buf = vec![0; 4096];
    f.read_exact_at(&mut buf, 100 * 4096).unwrap();
    assert_eq!(buf, pattern(3 << 20, 99)[..4096]);
}

#[test]
fn nbd_serve_writes_reach_the_export() {
    writes_reach_the_export(Server::Ours);
}

#[test]
fn qemu_nbd_writes_reach_the_export() {
    writes_reach_the_export(Server::Qemu);
}

fn mkfs_and_fsck(server: Server) {
    if !peers() || !require_peers(&["mkfs.ext4", "e2fsck"]) {
        return;
    }
    let dir = TempDir::new();
    let image = dir.sparse_file("disk.img", 64 << 20);
    let Some(peer) = start(&dir, &server, &image) else {
        return;
    };
    let m = Mount::start(&dir, &[], None, &[&peer.uri("")]);
    run_ok("mkfs.ext4", &["-F", "-q", m.file()]);
    run_ok("e2fsck", &["-fn", m.file()]);
    drop(m);
    // The image itself holds the filesystem.
    run_ok("e2fsck", &["-fn", image.to_str().unwrap()]);
}

#[test]
fn nbd_serve_mkfs_ext4_and_e2fsck() {
    mkfs_and_fsck(Server::Ours);
}

#[test]
fn qemu_nbd_mkfs_ext4_and_e2fsck() {
    mkfs_and_fsck(Server::Qemu);
}

fn fio_verify(server: Server) {
    if !peers() || !require_peer("fio") {
        return;
    }
    let dir = TempDir::new();
    let image = dir.sparse_file("disk.img", 16 << 20);
    let Some(peer) = start(&dir, &server, &image) else {
        return;
    };
    let m = Mount::start(&dir, &[], None, &[&peer.uri("")]);
    // Buffered writes, then direct I/O submitted asynchronously (16 in
    // flight: the mount takes them concurrently), each verified.
    for (engine, direct, offset) in [("psync", "0", "0"), ("libaio", "1", "8M")] {
        let out = run(
            "fio",
            &[
                "--name=verify",
                &format!("--filename={}", m.file()),
                "--rw=randwrite",
                "--bs=4k",
                &format!("--offset={offset}"),
                "--size=8M",
                "--iodepth=16",
                &format!("--ioengine={engine}"),
                &format!("--direct={direct}"),
                "--numjobs=1",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ],
        );
        assert!(out.status.success(), "fio {engine}: {}", describe_output(&out));
    }
}

#[test]
fn nbd_serve_fio_verify() {
    fio_verify(Server::Ours);
}

#[test]
fn qemu_nbd_fio_verify() {
    fio_verify(Server::Qemu);
}

/// `(offset, length, hole)` extents from `nbdinfo --map`.
fn nbdinfo_holes(uri: &str) -> Vec<(u64, u64, bool)> {
    run_ok("nbdinfo", &["--map", uri])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ty: u64 = f[2].parse().unwrap();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), ty & 1 != 0)
        })
        .collect()
}

/// `lseek(SEEK_DATA)` and `lseek(SEEK_HOLE)` at each offset, by Python;
/// -1 for ENXIO.
fn seeks(file: &str, offsets: &[u64]) -> Vec<(i64, i64)> {
    let script = "import os, sys\n\
                  fd = os.open(sys.argv[1], os.O_RDONLY)\n\
                  def s(o, w):\n    try:\n        return os.lseek(fd, o, w)\n    except OSError as e:\n        \
                  assert e.errno == 6, e\n        return -1\n\
                  for a in sys.argv[2:]:\n    o = int(a)\n    print(s(o, os.SEEK_DATA), s(o, os.SEEK_HOLE))\n";
    let mut args = vec!["-c".to_string(), script.to_string(), file.to_string()];
    args.extend(offsets.iter().map(|o| o.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run_ok("python3", &args)
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect()
}

fn lseek_matches_map(server: Server) {
    if !peers() || !require_peer("python3") {
        return;
    }
    let dir = TempDir::new();
    let size = 32u64 << 20;
    let image = sparse_file(&dir, "disk.img", size, &[0, 5, 6, 17, 31]);
    let Some(peer) = start(&dir, &server, &image) else {
        return;
    };
    let uri = peer.uri("");
    let m = Mount::start(&dir, &["-r"], None, &[&uri]);
    let map = nbdinfo_holes(&uri);
    assert!(map.iter().any(|e| e.2) && map.iter().any(|e| !e.2), "{map:?}");
    let hole_at = |o: u64| map.iter().any(|&(s, l, h)| h && (s..s + l).contains(&o));
    let mut offsets: Vec<u64> = map
        .iter()
        .flat_map(|&(s, l, _)| [s, s + 1, s + l / 2, s + l - 1])
        .collect();
    offsets.push(size - 1);
    offsets.sort();
    offsets.dedup();
    for (o, (data, hole)) in offsets.iter().zip(seeks(m.file(), &offsets)) {
        let next_data = map
            .iter()
            .filter(|&&(s, l, h)| !h && s + l > *o)
            .map(|&(s, _, _)| s.max(*o))
            .min()
            .map_or(-1, |v| v as i64);
        let next_hole = if hole_at(*o) {
            *o
        } else {
            map.iter()
                .filter(|&&(s, _, h)| h && s > *o)
                .map(|&(s, _, _)| s)
                .min()
                .unwrap_or(size)
        };
        assert_eq!((data, hole), (next_data, next_hole as i64), "at {o}, map {map:?}");
    }
}

#[test]
fn nbd_serve_lseek_data_and_hole_match_nbdinfo_map() {
    lseek_matches_map(Server::Ours);
}

#[test]
fn qemu_nbd_lseek_data_and_hole_match_nbdinfo_map() {
    lseek_matches_map(Server::Qemu);
}

fn fallocate_reads_back_zeroes(server: Server) {
    if !peers() || !require_peer("fallocate") {
        return;
    }
    let dir = TempDir::new();
    let image = dir.sparse_file("disk.img", 8 << 20);
    std::fs::write(&image, pattern(8 << 20, 3)).unwrap();
    let Some(peer) = start(&dir, &server, &image) else {
        return;
    };
    let m = Mount::start(&dir, &[], None, &[&peer.uri("")]);
    run_ok(
        "fallocate",
        &["--punch-hole", "-o", "1048576", "-l", "2097152", m.file()],
    );
    run_ok("fallocate", &["--punch-hole", "-o", "5000", "-l", "3000", m.file()]);
    run_ok(
        "fallocate",
        &["--zero-range", "-o", "4194304", "-l", "1048576", m.file()],
    );
    run_ok("fallocate", &["--zero-range", "-o", "7000000", "-l", "12345", m.file()]);
    let mut want = pattern(8 << 20, 3);
    for (o, l) in [(1048576, 2097152), (5000, 3000), (4194304, 1048576), (7000000, 12345)] {
        want[o..o + l].fill(0);
    }
    assert!(
        std::fs::read(&m.file).unwrap() == want,
        "the mount does not read back zeroes"
    );
    assert!(std::fs::read(&image).unwrap() == want, "the image does not hold zeroes");
}

#[test]
fn nbd_serve_fallocate_punch_hole_and_zero_range() {
    fallocate_reads_back_zeroes(Server::Ours);
}

#[test]
fn qemu_nbd_fallocate_punch_hole_and_zero_range() {
    fallocate_reads_back_zeroes(Server::Qemu);
}

fn assert_refuses_writes(m: &Mount) {
    assert_eq!(std::fs::metadata(&m.file).unwrap().mode() & 0o777, 0o444);
    let e = OpenOptions::new().write(true).open(&m.file).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let out = run(
        "dd",
        &["if=/dev/zero", &format!("of={}", m.file()), "conv=notrunc", "count=1"],
    );
    assert!(!out.status.success());
    // Reads still work.
    File::open(&m.file).unwrap().read_exact_at(&mut [0; 512], 0).unwrap();
}

#[test]
fn readonly_mounts_refuse_writes() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let image = dir.sparse_file("disk.img", 1 << 20);
    let peer = serve(&dir, &["-f", "raw", image.to_str().unwrap()]);
    let m = Mount::start(&dir, &["-r"], None, &[&peer.uri("")]);
    assert_refuses_writes(&m);
    drop(m);
    // A read-only export makes a read-only file without -r.
    let dir2 = TempDir::new();
    let ro = serve(&dir2, &["-r", "-f", "raw", image.to_str().unwrap()]);
    let m = Mount::start(&dir2, &[], None, &[&ro.uri("")]);
    assert_refuses_writes(&m);
}

#[test]
fn sigterm_unmounts_and_exits_0() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "4M"]);
    let mut m = Mount::start(&dir, &["-P", dir.join("pid").to_str().unwrap()], None, &[&peer.uri("")]);
    let pid: u32 = std::fs::read_to_string(dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, m.child.as_ref().unwrap().id());
    let st = m.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "{st}: {}", m.log());
    assert!(!is_mounted(&m.mountpoint));

    // fusermount -u ends it too.
    let mut m = Mount::start(&dir, &[], None, &[&peer.uri("")]);
    run_ok("fusermount", &["-u", m.mountpoint.to_str().unwrap()]);
    let st = m.wait();
    assert!(st.success(), "{st}: {}", m.log());

    // A busy mount is detached.
    let mut m = Mount::start(&dir, &[], None, &[&peer.uri("")]);
    let busy = File::open(&m.file).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(m.child.as_ref().unwrap().id() as i32, libc::SIGINT) };
    let start = Instant::now();
    while is_mounted(&m.mountpoint) {
        assert!(start.elapsed() < WAIT, "still mounted: {}", m.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(busy);
    let st = m.wait();
    assert!(st.success(), "{st}: {}", m.log());
}

#[test]
fn a_dead_server_fails_reads_with_eio() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let mut peer = serve(&dir, &["--memory", "16M"]);
    let m = Mount::start(&dir, &["--timeout=5"], None, &[&peer.uri("")]);
    File::open(&m.file).unwrap().read_exact_at(&mut [0; 4096], 0).unwrap();
    peer.kill();
    let file = m.file.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = File::open(&file).and_then(|f| f.read_exact_at(&mut [0; 4096], 8 << 20));
        let _ = tx.send(r);
    });
    let r = rx.recv_timeout(WAIT).expect("the read hung");
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
}

#[test]
fn captive_server() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let serve = our_bin("nbd-serve");
    let m = Mount::start(&dir, &[], Some("ram"), &["[", &serve, "--memory", "8M", "]"]);
    assert_eq!(std::fs::metadata(&m.file).unwrap().len(), 8 << 20);
    let f = OpenOptions::new().read(true).write(true).open(&m.file).unwrap();
    f.write_all_at(&pattern(65536, 5), 1 << 20).unwrap();
    drop(f);
    let mut buf = vec![0; 65536];
    File::open(&m.file).unwrap().read_exact_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, pattern(65536, 5));
}
