//! nbd-serve's Ceph RBD backend (cargo feature `nbd-tools/rbd`) against a
//! throwaway one-node cluster started by `scripts/ceph-cluster.sh` (one
//! monitor, one memstore OSD, on 127.0.0.1): data written through NBD is
//! read back with `rbd export`, data put with `rbd import` is read through
//! NBD, `nbdinfo --map` agrees with `rbd diff`, snapshots are served
//! read-only, and a removed image or a stopped OSD gives clients errors
//! (not a hang) while the server's other exports go on.
//!
//! Skipped when Ceph (ceph-mon, ceph-osd, ceph-common) is not installed,
//! unless NBD_TESTS_REQUIRE_PEERS is set (CI).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nbd_tests::{
    Endpoint, Peer, TempDir, describe_output, our_bin_with_features, pattern, require_peers, run, run_ok, run_timeout,
};

/// Everything these tests run.
const PEERS: &[&str] = &[
    "ceph-mon", "ceph-osd", "ceph", "rbd", "rados", "qemu-io", "nbdinfo", "nbdcopy", "nbdsh",
];

/// Longest a client may wait for an answer in the fault tests: a hang
/// fails the test instead of stalling the suite.
const FAULT_GUARD: Duration = Duration::from_secs(90);

fn nbd_serve() -> String {
    our_bin_with_features("nbd-serve", &["nbd-tools/rbd"])
}

/// A one-node cluster started by the repository's script.
struct Cluster {
    dir: PathBuf,
    conf: String,
    /// Stop it (and remove `dir`) on drop; the shared cluster is stopped
    /// by the script's watcher when the test process exits.
    private: bool,
}

impl Cluster {
    fn start(private: bool) -> Cluster {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh");
        // A new, empty directory that outlives the TempDir guard: the
        // script's watcher (or `Drop`) removes it.
        let base = TempDir::new();
        let dir = base.path().to_owned();
        let dir_s = dir.to_str().expect("UTF-8 temporary path").to_owned();
        std::mem::forget(base);
        let pid = std::process::id().to_string();
        let started = Instant::now();
        let out = run_timeout(
            "bash",
            &[script.to_str().expect("UTF-8 path"), "start", &dir_s, "--watch", &pid],
            Duration::from_secs(180),
        );
        assert!(
            out.status.success(),
            "cannot start the Ceph cluster\n{}",
            describe_output(&out)
        );
        eprintln!(
            "ceph cluster in {dir_s} started in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let conf = dir.join("ceph.conf").to_str().expect("UTF-8 path").to_owned();
        Cluster { dir, conf, private }
    }

    /// The cluster shared by the tests of this process, if Ceph is there.
    fn shared() -> Option<&'static Cluster> {
        static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
        SHARED
            .get_or_init(|| require_peers(PEERS).then(|| Cluster::start(false)))
            .as_ref()
    }

    fn rbd(&self, args: &[&str]) -> String {
        let mut full = vec!["-c", self.conf.as_str()];
        full.extend_from_slice(args);
        run_ok("rbd", &full)
    }

    fn rados(&self, args: &[&str]) -> String {
        let mut full = vec!["-c", self.conf.as_str(), "-p", "rbd"];
        full.extend_from_slice(args);
        run_ok("rados", &full)
    }

    /// Creates image `rbd/NAME` of `size` with objects of `object_size`.
    fn create(&self, name: &str, size: &str, object_size: &str) {
        self.rbd(&[
            "create",
            "--size",
            size,
            "--object-size",
            object_size,
            &format!("rbd/{name}"),
        ]);
    }

    /// The `rbd:` name nbd-serve takes for `rbd/IMAGE`, with `extra`
    /// options (`:key=value...`) after the configuration file.
    fn spec(&self, image: &str, extra: &str) -> String {
        format!("rbd:rbd/{image}:conf={}{extra}", self.conf)
    }

    /// The image's bytes as `rbd export` reads them.
    fn export(&self, image: &str, dir: &TempDir) -> Vec<u8> {
        let out = dir.join(format!("{image}.export"));
        let _ = std::fs::remove_file(&out);
        self.rbd(&[
            "export",
            "--no-progress",
            &format!("rbd/{image}"),
            out.to_str().expect("UTF-8 path"),
        ]);
        std::fs::read(&out).expect("read the exported image")
    }

    /// The pid of the OSD daemon.
    fn osd_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.join("osd.0.pid"))
            .expect("osd pid file")
            .trim()
            .parse()
            .expect("osd pid")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.private {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh");
            let dir = self.dir.to_str().unwrap_or_default();
            let _ = run("bash", &[script.to_str().unwrap_or_default(), "stop", dir]);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// nbd-serve on a Unix socket in `dir` with `args` (exports and options).
fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let sock = dir.socket_path("rbd");
    let mut full = vec!["--socket", sock.to_str().expect("UTF-8 path")];
    full.extend_from_slice(args);
    Peer::start(dir, &nbd_serve(), &full, Endpoint::Unix(sock.clone()))
}

/// Runs qemu-io commands against `uri` (raw format), failing with its
/// output if it fails.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&[], uri, cmds)
}

/// [`qemu_io`] with more options (`-r` for read-only exports).
fn qemu_io_with(options: &[&str], uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    args.extend_from_slice(options);
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {cmds:?} on {uri}\n{}",
        describe_output(&out)
    );
    text
}

/// Runs one qemu-io command that must fail (not hang: guarded by
/// [`FAULT_GUARD`]); returns its output and how long it took.
fn qemu_io_fails(uri: &str, cmd: &str) -> (String, Duration) {
    let t = Instant::now();
    let out = run_timeout("qemu-io", &["-f", "raw", "-c", cmd, uri], FAULT_GUARD);
    let took = t.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("failed") || !out.status.success(),
        "{cmd} on {uri} should fail\n{}",
        describe_output(&out)
    );
    (text, took)
}

/// Allocated byte ranges, merged, from `nbdinfo --map --json`.
fn nbd_allocation(uri: &str) -> Vec<(u64, u64)> {
    let json: serde_json::Value = serde_json::from_str(&run_ok("nbdinfo", &["--map", "--json", uri])).expect("json");
    let mut out = Vec::new();
    for e in json.as_array().expect("array of extents") {
        let (off, len, ty) = (
            e["offset"].as_u64().expect("offset"),
            e["length"].as_u64().expect("length"),
            e["type"].as_u64().expect("type"),
        );
        if ty & 1 == 0 {
            push_range(&mut out, off, len);
        }
    }
    out
}

/// Allocated byte ranges, merged, from `rbd diff --whole-object`.
fn rbd_allocation(cluster: &Cluster, image: &str) -> Vec<(u64, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&cluster.rbd(&["diff", "--whole-object", "--format", "json", &format!("rbd/{image}")]))
            .expect("json");
    let mut out = Vec::new();
    for e in json.as_array().expect("array of extents") {
        if e["exists"].as_str() == Some("true") || e["exists"].as_bool() == Some(true) {
            push_range(
                &mut out,
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
            );
        }
    }
    out
}

fn push_range(out: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    match out.last_mut() {
        Some(last) if last.0 + last.1 == off => last.1 += len,
        _ => out.push((off, len)),
    }
}

const MIB: usize = 1 << 20;

#[test]
fn qemu_io_and_nbdcopy_writes_read_back_with_rbd_export() {
    let Some(cluster) = Cluster::shared() else { return };
    let dir = TempDir::new();
    cluster.create("patterns", "16M", "1M");
    let peer = serve(&dir, &[&cluster.spec("patterns", "")]);
    let uri = peer.uri("");

    // What the export advertises.
    let info: serde_json::Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", &uri])).expect("json");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(16 << 20));
    for (flag, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(export[flag].as_bool(), Some(want), "{flag} in {export}");
    }

    // qemu-io patterns: aligned, unaligned, across an object boundary, a
    // FUA write, zeroes over data, then a flush.
    let mut want = vec![0u8; 16 * MIB];
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 4k",
            "write -P 0xcd 1048064 1024",
            "write -P 0xef 5242999 100000",
            "write -f -P 0x12 12M 2M",
            "write -z 12582912 4096",
            "flush",
            "read -P 0xcd 1048064 1024",
            "read -P 0xef 5242999 100000",
        ],
    );
    want[..4096].fill(0xab);
    want[1_048_064..1_048_064 + 1024].fill(0xcd);
    want[5_242_999..5_242_999 + 100_000].fill(0xef);
    want[12 * MIB..14 * MIB].fill(0x12);
    want[12 * MIB..12 * MIB + 4096].fill(0);
    assert!(
        cluster.export("patterns", &dir) == want,
        "rbd export differs from what qemu-io wrote"
    );

    // nbdcopy of random data over the first 9 MiB + a bit.
    let random = pattern(9 * MIB + 4321, 11);
    let src = dir.join("random.bin");
    std::fs::write(&src, &random).expect("write random data");
    run_ok("nbdcopy", &[src.to_str().expect("UTF-8 path"), &uri]);
    want[..random.len()].copy_from_slice(&random);
    assert!(
        cluster.export("patterns", &dir) == want,
        "rbd export differs from what nbdcopy wrote"
    );
}

#[test]
fn rbd_import_reads_back_through_nbd() {
    let Some(cluster) = Cluster::shared() else { return };
    let dir = TempDir::new();
    // Random data with a long run of zeroes, which rbd import leaves
    // unallocated.
    let mut data = pattern(6 * MIB + 12_345, 5);
    data[2 * MIB..5 * MIB].fill(0);
    let src = dir.join("import.bin");
    std::fs::write(&src, &data).expect("write data");
    cluster.rbd(&[
        "import",
        "--no-progress",
        "--object-size",
        "1M",
        src.to_str().expect("UTF-8 path"),
        "rbd/imported",
    ]);
    let peer = serve(&dir, &["-r", &cluster.spec("imported", "")]);
    let uri = peer.uri("");
    let out = run("nbdcopy", &[&uri, "-"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(out.stdout == data, "nbdcopy read differs from what rbd import put");
    // The zero run is a hole on both sides.
    assert_eq!(nbd_allocation(&uri), rbd_allocation(cluster, "imported"));
    assert!(
        !nbd_allocation(&uri)
            .iter()
            .any(|&(o, l)| o <= 3 * MIB as u64 && 3 * MIB as u64 + MIB as u64 <= o + l)
    );
}

#[test]
fn nbdinfo_map_agrees_with_rbd_diff() {
    let Some(cluster) = Cluster::shared() else { return };
    let dir = TempDir::new();
    cluster.create("map", "32M", "1M");
    let peer = serve(&dir, &[&cluster.spec("map", "")]);
    let uri = peer.uri("");
    assert_eq!(nbd_allocation(&uri), vec![], "a new image is all holes");
    qemu_io(
        &uri,
        &[
            "write -P 1 0 4k",
            "write -P 2 3M 2M",
            "write -P 3 9437300 200",
            "write -P 4 31M 1M",
            "flush",
        ],
    );
    let want = vec![
        (0, 1 << 20),
        (3 << 20, 2 << 20),
        (9 << 20, 1 << 20),
        (31 << 20, 1 << 20),
    ];
    assert_eq!(rbd_allocation(cluster, "map"), want);
    assert_eq!(nbd_allocation(&uri), want);
    // Zeroes that may punch holes deallocate whole objects; zeroes with
    // NO_HOLE keep them.
    qemu_io(&uri, &["write -z -u 3M 1M", "write -z 31M 1M", "flush"]);
    let want = vec![
        (0, 1 << 20),
        (4 << 20, 1 << 20),
        (9 << 20, 1 << 20),
        (31 << 20, 1 << 20),
    ];
    assert_eq!(rbd_allocation(cluster, "map"), want);
    assert_eq!(nbd_allocation(&uri), want);
    qemu_io(&uri, &["read -P 0 3M 1M", "read -P 0 31M 1M", "read -P 2 4M 1M"]);
}

#[test]
fn zeroes_fast_zero_and_trim() {
    let Some(cluster) = Cluster::shared() else { return };
    let dir = TempDir::new();
    cluster.create("zeroes", "8M", "1M");
    let peer = serve(&dir, &[&cluster.spec("zeroes", "")]);
    let script = r#"
import errno
h.pwrite(b"\xab" * (4 << 20), 0)
# NO_HOLE + FAST_ZERO: keeping the range allocated is no faster than a write.
try:
    h.zero(1 << 20, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
    raise SystemExit("fast zero with NO_HOLE succeeded")
except nbd.Error as e:
    # libnbd's Python binding names the errno (older ones give the number).
    assert e.errno in ("ENOTSUP", "EOPNOTSUPP", errno.ENOTSUP), e
assert h.pread(1 << 20, 0) == b"\xab" * (1 << 20), "a refused fast zero changed data"
h.zero(1 << 20, 0, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.zero(1000, 2 << 20, nbd.CMD_FLAG_FUA)
h.trim(1 << 20, 3 << 20)
h.flush()
assert h.pread(2 << 20, 0) == bytes(2 << 20)
assert h.pread(1000, 2 << 20) == bytes(1000)
assert h.pread(1000, (2 << 20) + 1000) == b"\xab" * 1000
print("ok")
"#;
    let out = run("nbdsh", &["-u", &peer.uri(""), "-c", script]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}",
        describe_output(&out)
    );
    // Object 0 was zeroed with NO_HOLE: still allocated. Object 1 was
    // fast-zeroed, object 3 trimmed: gone. Object 2 keeps data.
    assert_eq!(
        rbd_allocation(cluster, "zeroes"),
        vec![(0, 1 << 20), (2 << 20, 1 << 20)]
    );
}

#[test]
fn snapshot_export_serves_the_snapshot_read_only() {
    let Some(cluster) = Cluster::shared() else { return };
    let dir = TempDir::new();
    cluster.create("snapped", "8M", "1M");
    {
        let peer = serve(&dir, &[&cluster.spec("snapped", "")]);
        qemu_io(&peer.uri(""), &["write -P 0x11 0 2M", "flush"]);
    }
    cluster.rbd(&["snap", "create", "rbd/snapped@s1"]);
    let head = format!("head={}", cluster.spec("snapped", ""));
    let snap = format!("snap={}", cluster.spec("snapped@s1", ""));
    let peer = serve(&dir, &["--export", &head, "--export", &snap]);
    qemu_io(&peer.uri("head"), &["write -P 0x22 0 1M", "flush"]);
    qemu_io_with(&["-r"], &peer.uri("snap"), &["read -P 0x11 0 2M", "read -P 0 2M 6M"]);
    qemu_io(&peer.uri("head"), &["read -P 0x22 0 1M", "read -P 0x11 1M 1M"]);

    let info: serde_json::Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--json", &peer.uri("snap")])).expect("json");
    assert_eq!(info["exports"][0]["is_read_only"].as_bool(), Some(true));
    // The server refuses writes even from a client that sends them
    // anyway.
    let script = r#"
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)
h.connect_uri(uri)
assert h.is_read_only()
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to a snapshot succeeded")
except nbd.Error as e:
    print("refused", e.errno)
"#;
    let out = run("nbdsh", &["-c", &format!("uri = {:?}", peer.uri("snap")), "-c", script]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("refused"),
        "{}",
        describe_output(&out)
    );
    assert_eq!(nbd_allocation(&peer.uri("snap")), vec![(0, 2 << 20)]);
    let exported = cluster.export("snapped@s1", &dir);
    assert!(exported[..2 * MIB].iter().all(|&b| b == 0x11));
}

#[test]
fn bad_names_and_missing_images_are_clear_errors() {
    let Some(cluster) = Cluster::shared() else { return };
    for (spec, says) in [
        ("rbd:nopool".to_string(), "expected POOL/IMAGE"),
        (cluster.spec("missing", ""), "cannot open RBD image rbd/missing"),
        (format!("rbd:nosuchpool/x:conf={}", cluster.conf), "cannot open pool"),
        (cluster.spec("missing", ":no_such_option=1"), "invalid Ceph option"),
    ] {
        let out = run(&nbd_serve(), &["--socket", "/nonexistent/x.sock", &spec]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{spec}: {}",
            describe_output(&out)
        );
    }
}

#[test]
fn removed_image_fails_requests_and_other_exports_go_on() {
    let Some(cluster) = Cluster::shared() else { return };
    let dir = TempDir::new();
    cluster.create("doomed", "8M", "1M");
    cluster.create("survivor", "8M", "1M");
    let doomed = format!("doomed={}", cluster.spec("doomed", ""));
    let survivor = format!("survivor={}", cluster.spec("survivor", ""));
    let peer = serve(
        &dir,
        &["--export", &doomed, "--export", &survivor, "--export", "mem=memory:1M"],
    );
    qemu_io(&peer.uri("doomed"), &["write -P 0x55 0 2M", "flush"]);

    // `rbd rm` refuses an image in use; remove its objects underneath.
    let out = run("rbd", &["-c", &cluster.conf, "rm", "--no-progress", "rbd/doomed"]);
    assert!(!out.status.success(), "rbd rm of an image in use succeeded");
    let info = cluster.rbd(&["info", "--format", "json", "rbd/doomed"]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    let id = info["id"].as_str().expect("image id").to_owned();
    for object in cluster.rados(&["ls"]).lines().filter(|o| o.contains(&id)) {
        cluster.rados(&["rm", object]);
    }
    cluster.rados(&["rm", "rbd_id.doomed"]);
    cluster.rados(&["rmomapkey", "rbd_directory", "name_doomed"]);
    cluster.rados(&["rmomapkey", "rbd_directory", &format!("id_{id}")]);

    // A write needs the exclusive lock, which librbd would wait for
    // forever: the server answers with an error.
    let (text, took) = qemu_io_fails(&peer.uri("doomed"), "write -P 0x66 0 64k");
    eprintln!("write to the removed image failed after {took:?}: {}", text.trim());
    // Later requests, reads included, fail at once.
    let (_, took) = qemu_io_fails(&peer.uri("doomed"), "read 0 64k");
    eprintln!("read of the removed image failed after {took:?}");

    qemu_io(&peer.uri("survivor"), &["write -P 7 0 1M", "read -P 7 0 1M", "flush"]);
    qemu_io(&peer.uri("mem"), &["write -P 8 0 4k", "read -P 8 0 4k"]);

    // librbd never finishes the removed image's stuck requests: nbd-serve
    // still exits on SIGTERM (closing the survivor).
    let mut peer = peer;
    let pid = i32::try_from(peer.pid()).expect("pid");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t = Instant::now();
    while peer.is_running() && t.elapsed() < FAULT_GUARD {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !peer.is_running(),
        "nbd-serve did not exit on SIGTERM\n{}",
        peer.stderr()
    );
    eprintln!("nbd-serve exited {:?} after SIGTERM", t.elapsed());
    assert!(
        cluster.rbd(&["status", "rbd/survivor"]).contains("none"),
        "the survivor is still open"
    );
}

#[test]
fn stopped_osd_fails_requests_and_the_export_recovers() {
    if !require_peers(PEERS) {
        return;
    }
    // Its own cluster: stopping the OSD would stall the other tests.
    let cluster = Cluster::start(true);
    let dir = TempDir::new();
    cluster.create("fragile", "8M", "1M");
    // A short OSD timeout keeps the test short (the default is 30 s).
    let rbd = format!("rbd={}", cluster.spec("fragile", ":rados_osd_op_timeout=3"));
    let peer = serve(&dir, &["--export", &rbd, "--export", "mem=memory:1M"]);
    qemu_io(&peer.uri("rbd"), &["write -P 0x31 0 1M", "flush"]);

    let osd = cluster.osd_pid();
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(osd, libc::SIGSTOP) };
    let write = qemu_io_fails(&peer.uri("rbd"), "write -P 0x32 0 64k");
    let read = qemu_io_fails(&peer.uri("rbd"), "read 0 64k");
    let mem = Instant::now();
    qemu_io(&peer.uri("mem"), &["write -P 9 0 4k", "read -P 9 0 4k"]);
    let mem = mem.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(osd, libc::SIGCONT) };
    eprintln!(
        "with the OSD stopped: write failed after {:?}, read after {:?}; the memory export answered in {mem:?}",
        write.1, read.1
    );
    qemu_io(
        &peer.uri("rbd"),
        &["write -P 0x33 64k 64k", "read -P 0x33 64k 64k", "flush"],
    );
}

#[test]
fn osd_killed_before_the_first_read_fails_it_within_the_bound() {
    if !require_peers(PEERS) {
        return;
    }
    // Its own cluster: its OSD is killed.
    let cluster = Cluster::start(true);
    let dir = TempDir::new();
    let data = pattern(8 * MIB, 11);
    let src = dir.join("first.bin");
    std::fs::write(&src, &data).expect("write data");
    cluster.rbd(&[
        "import",
        "--no-progress",
        "--object-size",
        "1M",
        src.to_str().expect("UTF-8 path"),
        "rbd/first",
    ]);
    // A shorter OSD timeout than the default 30 s keeps the test short;
    // the server answers what librbd has not after twice that.
    let timeout = Duration::from_secs(10);
    let extra = format!(":rados_osd_op_timeout={}", timeout.as_secs());
    let rbd = format!("rbd={}", cluster.spec("first", &extra));
    let peer = serve(&dir, &["--export", &rbd, "--export", "mem=memory:1M"]);

    // No request has reached the image before the OSD dies (the image was
    // opened, its exclusive lock not taken).
    let osd = cluster.osd_pid();
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(osd, libc::SIGKILL) };
    // Read-write, as a VM's disk is opened: qemu-io flushes when it
    // closes the image, which must not wait for the exclusive lock.
    let (text, took) = qemu_io_fails(&peer.uri("rbd"), "read 4M 1M");
    eprintln!("first read with the OSD killed failed after {took:?}: {}", text.trim());
    assert!(
        !text.contains("read 1048576/1048576"),
        "the read returned data with the OSD killed\n{text}"
    );
    // librbd fails the read after the OSD timeout; nothing in the session
    // may take longer than the server's own bound (twice the timeout).
    let bound = timeout * 2 + Duration::from_secs(5);
    assert!(
        took < bound,
        "the first read with the OSD killed took {took:?} (bound {bound:?})\n{text}"
    );

    // A first write must take the exclusive lock, which librbd waits for
    // until its watch on the image is back, with no timeout: the server
    // answers it at its own bound, and the flush qemu-io closes with fails
    // at once instead of waiting for the same lock.
    let (text, took) = qemu_io_fails(&peer.uri("rbd"), "write -P 0x44 0 64k");
    eprintln!("first write with the OSD killed failed after {took:?}: {}", text.trim());
    assert!(
        took < bound,
        "the first write with the OSD killed took {took:?} (bound {bound:?})\n{text}"
    );

    // The server goes on: a new connection negotiates the export, and the
    // memory export serves data.
    let t = Instant::now();
    let size = run_ok("nbdinfo", &["--size", &peer.uri("rbd")]);
    assert_eq!(size.trim(), (8 * MIB).to_string());
    qemu_io(&peer.uri("mem"), &["write -P 9 0 4k", "read -P 9 0 4k"]);
    eprintln!("the server still answered in {:?}", t.elapsed());
    assert!(t.elapsed() < timeout, "the server answered others slowly");
}
