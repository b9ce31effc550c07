//! `nbd-bench`: our server and copier against the reference peers, measured
//! side by side in the same run on Unix sockets, printing each figure of
//! ours, of the peer, and their ratio.
//!
//! Run with `cargo run --release -p nbd-tests --bin nbd-bench` (add
//! `-- --quick` for a shorter run, `-- --tls-only` for the TLS rows
//! alone, `-- --flush-only` for the reader-next-to-a-flushing-writer rows
//! alone, `-- --qcow2-only` for the qcow2 rows alone, `-- --copy-only` for
//! the copy rows and the TLS rows, the ones that measure the client,
//! `-- --rbd-only` for the Ceph RBD rows alone (they need Ceph and
//! qemu-nbd's rbd driver, `scripts/install-peers.sh --bench`; without them
//! they are left out with a note),
//! `-- --blkhash-only` for the blkhash row alone: `nbd-copy --blkhash URI
//! null:` against blkhash's `blksum URI` on one nbd-serve export of a
//! sparse 1 GiB file on tmpfs, half data, half holes, after checking that
//! the two digests are equal (blksum is not packaged: build it with
//! `scripts/build-blksum.sh DESTDIR` and pass `--blksum DESTDIR/bin/blksum`,
//! or set `NBD_BENCH_BLKSUM` to its path, or put it on `PATH`; without it
//! the row is left out with a note),
//! `-- --fuse-only` for the FUSE rows alone: our `nbd-fuse` against
//! libnbd's `nbdfuse` mounting the same 1 GiB nbd-serve memory export of
//! random data, fio reading the mounted file with `O_DIRECT` (1 MiB
//! sequential and 4 KiB random reads, 16 in flight from sixteen `psync`
//! jobs, or from one `libaio` job at queue depth 16 with
//! `--fuse-ioengine libaio`), mounted afresh and unmounted for every run
//! (they need /dev/fuse, `fusermount` and `nbdfuse`; without them they
//! are left out with a note),
//! `-- --http-only` for the HTTP rows alone (nginx on 127.0.0.1 serving
//! files on tmpfs: nbd-copy reading a URL against nbdcopy over nbdkit's
//! curl plugin with the readahead and retry filters, straight and with
//! 10 ms added to every request by the fault proxy, on a quarter of the
//! size; a qcow2 image copied to a raw file against `qemu-img convert`
//! with QEMU's curl driver; and the peak memory of nbd-copy and of
//! nbd-serve reading a sparse file of 4 times the size, against nbdcopy
//! and nbdkit curl; a peer without its curl plugin or driver leaves its
//! rows out with a note),
//! `-- --server-only` for every row that measures the server: memory,
//! files on tmpfs and on the machine's disk, written and fallocated, the
//! flushing writer, qcow2). `--group NAME` (repeatable: `memory`, `tmpfs`,
//! `tmpfs-fallocated`, `disk`, `disk-fallocated`, `flush`, `qcow2`) picks
//! server groups; `--reps N`, `--runtime SECS` and `--copy-size MIB` (the
//! size of the copy and HTTP rows: 1024, or 256 with `--quick`) override
//! the defaults.
//! `--rw NAME` (repeatable: `randread`, `read`, `randwrite`, `write`) picks
//! the fio workloads of the server rows. `--baseline PATH` measures another build of nbd-serve in place of the
//! peer in the memory and file groups: a change's before and after,
//! alternating in the same run.
//! The machines are shared and noisy: each figure is the median of several
//! alternating runs (ours, peer, ours, peer, ...), and only ratios measured
//! in the same run mean anything.
//!
//! Every run starts with a ceiling: what one Unix socket moves on this
//! machine (1 MiB writes on one side, 1 MiB reads on the other, two
//! threads), and prints every throughput row also as a fraction of it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbd_tests::{Endpoint, Peer, TempDir, find_program, our_bin, our_bin_with_features, require_peers, run_timeout};

struct Config {
    reps: usize,
    runtime: u32,
    /// Bytes copied by the copy and HTTP rows (`--copy-size MIB`).
    copy_size: u64,
    /// Server groups picked with `--group` (all when empty).
    groups: Vec<String>,
    /// `--baseline PATH`: another build of nbd-serve, measured in place of
    /// the peer in the memory and file groups (a change's before and
    /// after, alternating in the same run).
    baseline: Option<String>,
    /// fio workloads picked with `--rw` (all when empty): `randread`,
    /// `read`, `randwrite`, `write`.
    rws: Vec<String>,
    /// `--fuse-ioengine NAME`: fio's engine in the FUSE rows, `psync`
    /// (sixteen jobs, the default) or `libaio` (one job, queue depth 16).
    fuse_ioengine: String,
}

impl Config {
    fn wants(&self, group: &str) -> bool {
        self.groups.is_empty() || self.groups.iter().any(|g| g == group)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

struct Row {
    what: String,
    peer: String,
    ours: f64,
    theirs: f64,
    unit: &'static str,
    better: Better,
    target: f64,
    /// Our bytes per second, for throughput rows (printed as a fraction of
    /// the socket ceiling).
    bytes_per_sec: Option<f64>,
}

impl Row {
    fn ratio(&self) -> f64 {
        if self.theirs == 0.0 {
            f64::NAN
        } else {
            self.ours / self.theirs
        }
    }
    fn met(&self) -> bool {
        match self.better {
            Better::Higher => self.ratio() >= self.target,
            Better::Lower => self.ratio() <= self.target,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// CPU time (user + system, all threads) of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat are utime and stime; after the command name
    // they are at index 11 and 12.
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory of a running process in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:")
}

/// A field of `/proc/PID/status` given in KiB (`field` with its colon).
fn status_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct FioResult {
    iops: f64,
    bytes_per_sec: f64,
    ios: f64,
}

fn fio(uri: &str, rw: &str, bs: &str, iodepth: u32, cfg: &Config, dir: &TempDir) -> FioResult {
    let out = dir.join("fio.json");
    let args = [
        "--name=bench".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={iodepth}"),
        "--size=256M".to_string(),
        format!("--runtime={}", cfg.runtime),
        "--time_based".to_string(),
        "--output-format=json".to_string(),
        format!("--output={}", out.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_timeout("fio", &args, Duration::from_secs(cfg.runtime as u64 + 60));
    assert!(o.status.success(), "fio failed: {}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).expect("fio output")).expect("fio json");
    let job = &j["jobs"][0];
    let side = if rw.contains("write") {
        &job["write"]
    } else {
        &job["read"]
    };
    FioResult {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        bytes_per_sec: side["bw_bytes"].as_f64().unwrap_or(0.0),
        ios: side["total_ios"].as_f64().unwrap_or(0.0),
    }
}

fn prefill(uri: &str, dir: &TempDir) {
    let args = [
        "--name=fill".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=write".to_string(),
        "--bs=1M".to_string(),
        "--iodepth=8".to_string(),
        "--size=256M".to_string(),
        format!("--output={}", dir.join("fill.txt").display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_timeout("fio", &args, Duration::from_secs(120));
    assert!(
        o.status.success(),
        "fio prefill failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// The fio workloads of the server rows: name, fio `rw`, block size, queue
/// depth. Reads come first, so that the rows of a fallocated file read
/// what no write touched yet.
const WORKLOADS: [(&str, &str, &str, u32); 4] = [
    ("4 KiB random reads, QD64", "randread", "4k", 64),
    ("1 MiB sequential reads, QD16", "read", "1M", 16),
    ("4 KiB random writes, QD64", "randwrite", "4k", 64),
    ("1 MiB sequential writes, QD16", "write", "1M", 16),
];

/// What the server rows aim at against the peer: throughput, and server
/// CPU time per request.
const TARGET_THROUGHPUT: f64 = 1.5;
const TARGET_CPU: f64 = 0.5;

/// Runs the fio workloads against two servers, alternating, and adds a
/// throughput row and a server-CPU-per-request row for each. With
/// `prefill`, the first 256 MiB are written first (else what is read is
/// whatever the export holds: holes, or fallocated space).
#[allow(clippy::too_many_arguments)]
fn server_rows(
    label: &str,
    peer_name: &str,
    ours: (&Peer, String),
    theirs: (&Peer, String),
    prefill_first: bool,
    cfg: &Config,
    dir: &TempDir,
    rows: &mut Vec<Row>,
) {
    if prefill_first {
        prefill(&ours.1, dir);
        prefill(&theirs.1, dir);
    }
    for (name, rw, bs, depth) in WORKLOADS {
        if !cfg.rws.is_empty() && !cfg.rws.iter().any(|w| w == rw) {
            continue;
        }
        let (mut a, mut b, mut a_cpu, mut b_cpu, mut a_bytes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            for (ours_now, peer, uri) in [(true, ours.0, &ours.1), (false, theirs.0, &theirs.1)] {
                let c0 = cpu_seconds(peer.pid());
                let r = fio(uri, rw, bs, depth, cfg, dir);
                let c1 = cpu_seconds(peer.pid());
                let (vals, cpus) = if ours_now {
                    a_bytes.push(r.bytes_per_sec);
                    (&mut a, &mut a_cpu)
                } else {
                    (&mut b, &mut b_cpu)
                };
                vals.push(if bs == "1M" { r.bytes_per_sec / 1e6 } else { r.iops });
                if r.ios > 0.0 {
                    cpus.push((c1 - c0) * 1e6 / r.ios);
                }
            }
        }
        let (unit, what) = if bs == "1M" {
            ("MB/s", "throughput")
        } else {
            ("IOPS", "IOPS")
        };
        rows.push(Row {
            what: format!("{label}, {name}: {what}"),
            peer: peer_name.to_string(),
            ours: median(a),
            theirs: median(b),
            unit,
            better: Better::Higher,
            target: TARGET_THROUGHPUT,
            bytes_per_sec: Some(median(a_bytes)),
        });
        rows.push(Row {
            what: format!("{label}, {name}: server CPU per request"),
            peer: peer_name.to_string(),
            ours: median(a_cpu),
            theirs: median(b_cpu),
            unit: "us",
            better: Better::Lower,
            target: TARGET_CPU,
            bytes_per_sec: None,
        });
    }
}

/// What one Unix socket moves on this machine: one thread writes 1 MiB
/// buffers, another reads them into a 1 MiB buffer, for `secs` seconds.
/// Bytes per second.
fn socket_ceiling(secs: f64) -> f64 {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let buf = vec![0x5au8; 1 << 20];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if a.write_all(&buf).is_err() {
                    break;
                }
            }
        })
    };
    let mut buf = vec![0u8; 1 << 20];
    // Warm up, then measure.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(200) {
        let _ = b.read(&mut buf).expect("read");
    }
    let t = Instant::now();
    let mut moved = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        moved += b.read(&mut buf).expect("read") as u64;
    }
    let rate = moved as f64 / t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(b);
    let _ = writer.join();
    rate
}

/// Where a file export lives.
#[derive(Clone, Copy, PartialEq)]
enum FileKind {
    /// tmpfs (`/dev/shm`): the protocol and the page cache, no device.
    Tmpfs,
    /// The machine's disk (the temporary directory).
    Disk,
}

/// nbd-serve FILE against qemu-nbd on the same kind of 1 GiB file: on tmpfs
/// or on the disk; written (the first 256 MiB, which fio uses, filled with
/// data first) or fallocated (space reserved, never written: reads find
/// unwritten extents, which tmpfs reports as holes).
fn file_rows(kind: FileKind, fallocated: bool, cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let serve = our_bin("nbd-serve");
    let path = |name: &str| match kind {
        FileKind::Tmpfs => shm_path(dir, name),
        FileKind::Disk => dir.join(name),
    };
    let f1 = path("ours.img");
    let f2 = path("qemu.img");
    for f in [&f1, &f2] {
        let h = std::fs::File::create(f).expect("create image");
        if fallocated {
            use std::os::fd::AsRawFd;
            // SAFETY: fallocate(2) on a file we own, integers only.
            let r = unsafe { libc::fallocate(h.as_raw_fd(), 0, 0, 1 << 30) };
            assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
        } else {
            h.set_len(1 << 30).expect("size image");
        }
    }
    let s1 = dir.socket_path("ours");
    let s2 = dir.socket_path("qemu");
    let ours = Peer::start(
        dir,
        &serve,
        &[
            "--socket",
            s1.to_str().unwrap_or_default(),
            f1.to_str().unwrap_or_default(),
        ],
        Endpoint::Unix(s1.clone()),
    );
    let qemu = match &cfg.baseline {
        Some(base) => Peer::start(
            dir,
            base,
            &[
                "--socket",
                s2.to_str().unwrap_or_default(),
                f2.to_str().unwrap_or_default(),
            ],
            Endpoint::Unix(s2.clone()),
        ),
        None => Peer::start(
            dir,
            "qemu-nbd",
            &[
                "--socket",
                s2.to_str().unwrap_or_default(),
                "--persistent",
                "--shared=8",
                "-f",
                "raw",
                f2.to_str().unwrap_or_default(),
            ],
            Endpoint::Unix(s2.clone()),
        ),
    };
    let label = format!(
        "nbd-serve FILE ({}, {})",
        if kind == FileKind::Tmpfs { "tmpfs" } else { "disk" },
        if fallocated { "fallocated" } else { "written" }
    );
    server_rows(
        &label,
        if cfg.baseline.is_some() { "baseline" } else { "qemu-nbd" },
        (&ours, unix_uri(&s1)),
        (&qemu, unix_uri(&s2)),
        !fallocated,
        cfg,
        dir,
        rows,
    );
    drop(ours);
    drop(qemu);
    let _ = std::fs::remove_file(&f1);
    let _ = std::fs::remove_file(&f2);
}

/// Reader IOPS and 99th percentile latency (µs) of 4 KiB random reads at
/// queue depth 1, while a second client writes 64 KiB at random with an
/// `fsync` (NBD_CMD_FLUSH) after each write, both on one server.
fn reader_next_to_flushing_writer(uri: &str, cfg: &Config, dir: &TempDir) -> (f64, f64) {
    let out = dir.join("fio-flush.json");
    let args = [
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--size=256M".to_string(),
        format!("--runtime={}", cfg.runtime.max(4)),
        "--time_based".to_string(),
        "--output-format=json".to_string(),
        format!("--output={}", out.display()),
        "--name=writer".to_string(),
        "--rw=randwrite".to_string(),
        "--bs=64k".to_string(),
        "--iodepth=1".to_string(),
        "--fsync=1".to_string(),
        "--name=reader".to_string(),
        "--rw=randread".to_string(),
        "--bs=4k".to_string(),
        "--iodepth=1".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_timeout("fio", &args, Duration::from_secs(cfg.runtime as u64 + 90));
    assert!(o.status.success(), "fio failed: {}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).expect("fio output")).expect("fio json");
    let reader = j["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|job| job["jobname"] == "reader"))
        .expect("the reader job");
    let iops = reader["read"]["iops"].as_f64().unwrap_or(0.0);
    let p99_ns = reader["read"]["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .unwrap_or(f64::NAN);
    (iops, p99_ns / 1000.0)
}

/// The same workload as [`reader_next_to_flushing_writer`] through a
/// second harness, ours: two threads of this process, each with its own
/// connection (nbd-blocking's client), one writing 64 KiB at random
/// offsets with a FLUSH after each write, one reading 4 KiB at random at
/// queue depth 1 and timing each read. Reader IOPS and 99th percentile
/// latency (µs).
fn reader_next_to_flushing_writer_threads(uri: &str, cfg: &Config) -> (f64, f64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    let runtime = Duration::from_secs(cfg.runtime.max(4) as u64);
    let span: u64 = 256 << 20;
    // xorshift64*: offsets without a dependency.
    let next = |x: &mut u64| {
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut c = nbd_blocking::Client::connect(uri).expect("connect the writer");
            let buf = vec![0x5au8; 64 << 10];
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Relaxed) {
                let at = next(&mut x) % (span / buf.len() as u64) * buf.len() as u64;
                c.write(&buf, at).expect("write");
                c.flush().expect("flush");
            }
        });
        let mut c = nbd_blocking::Client::connect(uri).expect("connect the reader");
        let mut buf = vec![0u8; 4096];
        let mut lat = Vec::new();
        let mut x = 0xd1b5_4a32_d192_ed03u64;
        let t0 = Instant::now();
        while t0.elapsed() < runtime {
            let at = next(&mut x) % (span / 4096) * 4096;
            let t = Instant::now();
            c.read(&mut buf, at).expect("read");
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let secs = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("the writer thread");
        lat.sort_by(f64::total_cmp);
        let p99 = lat.get(lat.len() * 99 / 100).copied().unwrap_or(f64::NAN);
        (lat.len() as f64 / secs, p99)
    })
}

/// nbd-serve and qemu-nbd (`--aio=threads`, its default) each on a file on
/// the machine's disk (not tmpfs: `fdatasync` must reach a device), a reader
/// beside a writer that flushes after every write, measured by two
/// harnesses: fio (two jobs in one process) and two threads of ours.
fn flushing_writer_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let serve = our_bin("nbd-serve");
    let f1 = dir.join("flush-ours.img");
    let f2 = dir.join("flush-qemu.img");
    for f in [&f1, &f2] {
        std::fs::File::create(f)
            .and_then(|h| h.set_len(256 << 20))
            .expect("create image");
    }
    let s1 = dir.socket_path("flush-ours");
    let s2 = dir.socket_path("flush-qemu");
    let ours = Peer::start(
        dir,
        &serve,
        &[
            "--socket",
            s1.to_str().unwrap_or_default(),
            f1.to_str().unwrap_or_default(),
        ],
        Endpoint::Unix(s1.clone()),
    );
    let qemu = Peer::start(
        dir,
        "qemu-nbd",
        &[
            "--socket",
            s2.to_str().unwrap_or_default(),
            "--persistent",
            "--shared=8",
            "--aio=threads",
            "-f",
            "raw",
            f2.to_str().unwrap_or_default(),
        ],
        Endpoint::Unix(s2.clone()),
    );
    prefill(&unix_uri(&s1), dir);
    prefill(&unix_uri(&s2), dir);
    let fio = |uri: &str| reader_next_to_flushing_writer(uri, cfg, dir);
    let threads = |uri: &str| reader_next_to_flushing_writer_threads(uri, cfg);
    type Harness<'a> = &'a dyn Fn(&str) -> (f64, f64);
    let harnesses: [(&str, Harness); 2] = [("fio, two jobs", &fio), ("two threads", &threads)];
    for (harness, run) in harnesses {
        let (mut a, mut b, mut a99, mut b99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            let (iops, p99) = run(&unix_uri(&s1));
            a.push(iops);
            a99.push(p99);
            let (iops, p99) = run(&unix_uri(&s2));
            b.push(iops);
            b99.push(p99);
        }
        flushing_writer_pair(harness, [a, b, a99, b99], rows);
    }
    drop(ours);
    drop(qemu);
    let _ = std::fs::remove_file(&f1);
    let _ = std::fs::remove_file(&f2);
}

/// The reader's IOPS and p99 rows of one harness: `[ours, qemu-nbd's]`
/// IOPS, then p99s.
fn flushing_writer_pair(harness: &str, [a, b, a99, b99]: [Vec<f64>; 4], rows: &mut Vec<Row>) {
    let what = format!("file on disk, 4 KiB reads QD1 next to 64 KiB writes with fsync ({harness})");
    rows.push(Row {
        what: format!("{what}: reader IOPS"),
        peer: "qemu-nbd".to_string(),
        ours: median(a),
        theirs: median(b),
        unit: "IOPS",
        better: Better::Higher,
        target: 1.0,
        bytes_per_sec: None,
    });
    rows.push(Row {
        what: format!("{what}: reader p99 latency"),
        peer: "qemu-nbd".to_string(),
        ours: median(a99),
        theirs: median(b99),
        unit: "us",
        better: Better::Lower,
        target: 1.0,
        bytes_per_sec: None,
    });
}

/// Stops a server with SIGTERM and waits for it to exit (a qcow2 server
/// must write its metadata back before the next one opens the image).
fn stop_gracefully(peer: &mut Peer) {
    // SAFETY: kill(2) with the pid of a child we started.
    unsafe { libc::kill(peer.pid() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    peer.kill();
}

/// qcow2: `nbd-serve IMG` against `qemu-nbd -f qcow2 IMG` on the same
/// kind of image on tmpfs: allocated clusters (256 MiB written first; 4 KiB
/// random reads and writes, QD32) and fresh ones (a new empty image for
/// every run: 4 KiB random writes QD32 and 1 MiB sequential writes QD16
/// that allocate clusters as they go). An image can be open in one server
/// at a time (each takes QEMU's write lock), so every run starts its
/// server afresh, alternating ours and qemu-nbd.
fn qcow2_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let img = shm_path(dir, "bench.qcow2");
    let img_s = img.to_str().unwrap_or_default().to_string();
    let create = || {
        let _ = std::fs::remove_file(&img);
        let o = run_timeout(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &img_s, "1G"],
            Duration::from_secs(60),
        );
        assert!(o.status.success(), "qemu-img create failed");
    };
    let start = |ours: bool| -> (Peer, String) {
        let sock = dir.socket_path(if ours { "ours-qcow2" } else { "qemu-qcow2" });
        let sock_s = sock.to_str().unwrap_or_default().to_string();
        let peer = if ours {
            Peer::start(
                dir,
                &our_bin("nbd-serve"),
                &["--socket", &sock_s, &img_s],
                Endpoint::Unix(sock.clone()),
            )
        } else {
            Peer::start(
                dir,
                "qemu-nbd",
                &["--socket", &sock_s, "--persistent", "--shared=8", "-f", "qcow2", &img_s],
                Endpoint::Unix(sock.clone()),
            )
        };
        (peer, unix_uri(&sock))
    };
    create();
    {
        let (mut q, uri) = start(false);
        prefill(&uri, dir);
        stop_gracefully(&mut q);
    }
    let workloads: [(&str, &str, &str, u32, bool); 4] = [
        (
            "allocated clusters, 4 KiB random reads, QD32",
            "randread",
            "4k",
            32,
            false,
        ),
        (
            "allocated clusters, 4 KiB random writes, QD32",
            "randwrite",
            "4k",
            32,
            false,
        ),
        ("fresh clusters, 4 KiB random writes, QD32", "randwrite", "4k", 32, true),
        ("fresh clusters, 1 MiB sequential writes, QD16", "write", "1M", 16, true),
    ];
    for (name, rw, bs, depth, fresh) in workloads {
        let (mut a, mut b, mut a_cpu, mut b_cpu, mut a_bytes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            for ours in [true, false] {
                if fresh {
                    create();
                }
                let (mut peer, uri) = start(ours);
                let c0 = cpu_seconds(peer.pid());
                let r = fio(&uri, rw, bs, depth, cfg, dir);
                let c1 = cpu_seconds(peer.pid());
                stop_gracefully(&mut peer);
                let (vals, cpus) = if ours {
                    a_bytes.push(r.bytes_per_sec);
                    (&mut a, &mut a_cpu)
                } else {
                    (&mut b, &mut b_cpu)
                };
                vals.push(if bs == "1M" { r.bytes_per_sec / 1e6 } else { r.iops });
                if r.ios > 0.0 {
                    cpus.push((c1 - c0) * 1e6 / r.ios);
                }
            }
        }
        let (unit, what) = if bs == "1M" {
            ("MB/s", "throughput")
        } else {
            ("IOPS", "IOPS")
        };
        rows.push(Row {
            what: format!("nbd-serve IMG.qcow2 (tmpfs), {name}: {what}"),
            peer: "qemu-nbd -f qcow2".to_string(),
            ours: median(a),
            theirs: median(b),
            unit,
            better: Better::Higher,
            target: 1.2,
            bytes_per_sec: Some(median(a_bytes)),
        });
        rows.push(Row {
            what: format!("nbd-serve IMG.qcow2 (tmpfs), {name}: server CPU per request"),
            peer: "qemu-nbd -f qcow2".to_string(),
            ours: median(a_cpu),
            theirs: median(b_cpu),
            unit: "us",
            better: Better::Lower,
            target: 1.0,
            bytes_per_sec: None,
        });
    }
    let _ = std::fs::remove_file(&img);
}

/// Seconds `cmd args...` took, or `None` when it ran past `deadline`
/// (then it was killed). Panics when it fails.
fn time_cmd_within(cmd: &str, args: &[&str], deadline: Duration) -> Option<f64> {
    let t = Instant::now();
    let o = nbd_tests::run_within(cmd, args, deadline).ok()?;
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(t.elapsed().as_secs_f64())
}

fn time_cmd(cmd: &str, args: &[&str]) -> f64 {
    time_cmd_within(cmd, args, Duration::from_secs(600))
        .unwrap_or_else(|| panic!("{cmd} {args:?} ran longer than 600 s and was killed"))
}

fn copy_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let ours = our_bin("nbd-copy");
    let serve = our_bin("nbd-serve");
    // 1. Random data from nbdkit memory to null:.
    let size = cfg.copy_size;
    let sock = dir.socket_path("kit");
    let kit = Peer::start(
        dir,
        "nbdkit",
        &[
            "-f",
            "-U",
            sock.to_str().unwrap_or_default(),
            "memory",
            &size.to_string(),
        ],
        Endpoint::Unix(sock.clone()),
    );
    let src = shm_path(dir, "random.img");
    // Random data, so that no side can skip zeroes.
    {
        let f = std::fs::File::create(&src).expect("create random image");
        write_random(&f, 0, size, 0x9e37_79b9_7f4a_7c15);
    }
    let kit_uri = unix_uri(&sock);
    // Two memory exports of nbd-serve: a source holding the same random
    // data, and a destination.
    let serve_src_sock = dir.socket_path("copy-src");
    let serve_dst_sock = dir.socket_path("copy-dst");
    let size_arg = size.to_string();
    let serve_src = Peer::start(
        dir,
        &serve,
        &[
            "--socket",
            serve_src_sock.to_str().unwrap_or_default(),
            "--memory",
            &size_arg,
        ],
        Endpoint::Unix(serve_src_sock.clone()),
    );
    let serve_dst = Peer::start(
        dir,
        &serve,
        &[
            "--socket",
            serve_dst_sock.to_str().unwrap_or_default(),
            "--memory",
            &size_arg,
        ],
        Endpoint::Unix(serve_dst_sock.clone()),
    );
    let (src_uri, dst_uri) = (unix_uri(&serve_src_sock), unix_uri(&serve_dst_sock));
    let src_file = src.to_str().unwrap_or_default().to_string();
    time_cmd("nbdcopy", &[&src_file, &kit_uri]);
    time_cmd("nbdcopy", &[&src_file, &src_uri]);
    let cases: [(&str, &str, &str); 4] = [
        ("nbdkit memory to null:", &kit_uri, "null:"),
        ("nbd-serve memory to null:", &src_uri, "null:"),
        ("nbd-serve memory to nbd-serve memory", &src_uri, &dst_uri),
        ("a file on tmpfs to nbd-serve memory", &src_file, &dst_uri),
    ];
    for (what, from, to) in cases {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            a.push(size as f64 / time_cmd(&ours, &[from, to]));
            b.push(size as f64 / time_cmd("nbdcopy", &[from, to]));
        }
        let (a, b) = (median(a), median(b));
        rows.push(Row {
            what: format!("copy {} MiB of random data, {what}", size >> 20),
            peer: "nbdcopy".into(),
            ours: a / 1e6,
            theirs: b / 1e6,
            unit: "MB/s",
            better: Better::Higher,
            target: 1.25,
            bytes_per_sec: Some(a),
        });
    }
    let _ = std::fs::remove_file(&src);
    drop(kit);
    drop(serve_src);
    drop(serve_dst);

    // 2. A sparse 4 GiB image served by nbd-serve, copied to a file.
    let img = shm_path(dir, "sparse.img");
    {
        let f = std::fs::File::create(&img).expect("create sparse image");
        f.set_len(4 << 30).expect("size sparse image");
        use std::os::unix::fs::FileExt;
        let chunk = vec![0x5au8; 4 << 20];
        // 16 data extents of 4 MiB spread over the image: 64 MiB of data.
        for i in 0..16u64 {
            f.write_all_at(&chunk, i * (256 << 20) + (8 << 20))
                .expect("write data extent");
        }
    }
    let sock = dir.socket_path("serve");
    let srv = Peer::start(
        dir,
        &serve,
        &[
            "--socket",
            sock.to_str().unwrap_or_default(),
            "-r",
            img.to_str().unwrap_or_default(),
        ],
        Endpoint::Unix(sock.clone()),
    );
    let uri = unix_uri(&sock);
    let out = shm_path(dir, "out.img");
    let out_s = out.to_str().unwrap_or_default().to_string();
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        let _ = std::fs::remove_file(&out);
        a.push(time_cmd(&ours, &[&uri, &out_s]));
        let _ = std::fs::remove_file(&out);
        std::fs::File::create(&out)
            .and_then(|f| f.set_len(4 << 30))
            .expect("target for nbdcopy");
        b.push(time_cmd("nbdcopy", &[&uri, &out_s]));
        let _ = std::fs::remove_file(&out);
        c.push(time_cmd(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &uri, &out_s],
        ));
    }
    let _ = std::fs::remove_file(&out);
    drop(srv);
    let _ = std::fs::remove_file(&img);
    let mbs = |v: Vec<f64>| (4u64 << 30) as f64 / 1e6 / median(v);
    let (a, b, c) = (mbs(a), mbs(b), mbs(c));
    for (peer, theirs) in [("nbdcopy", b), ("qemu-img convert", c)] {
        rows.push(Row {
            what: "copy a sparse 4 GiB image (64 MiB data), nbd-serve to a file".into(),
            peer: peer.into(),
            ours: a,
            theirs,
            unit: "MB/s",
            better: Better::Higher,
            target: 1.25,
            bytes_per_sec: None,
        });
    }
}

/// A path on tmpfs when there is one (copies then measure the protocol,
/// not the disk), else in the temporary directory.
fn shm_path(dir: &TempDir, name: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join(format!("nbd-bench-{}-{name}", std::process::id()))
    } else {
        dir.join(name)
    }
}

/// Writes `size` bytes of pseudo-random data ([`write_random`], the copy
/// rows' data) to a new file at `path`, so that no side of a copy can skip
/// zeroes.
fn write_random_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create random image");
    write_random(&f, 0, size, 0x9e37_79b9_7f4a_7c15);
}

/// Whether two files hold the same bytes.
fn same_contents(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(fa), Ok(fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (mut fa, mut fb) = (std::io::BufReader::new(fa), std::io::BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap_or(0);
        if n == 0 {
            return fb.read(&mut bb[..1]).unwrap_or(1) == 0;
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// `PROGRAM --socket SOCKET ARGS...` (nbd-serve, or a build of it) on a new
/// Unix socket of `dir` named after `name`, started and answering; with
/// the URI of its default export.
fn serve_on_socket(dir: &TempDir, program: &str, name: &str, args: &[&str]) -> (Peer, String) {
    let sock = dir.socket_path(name);
    let mut full = vec!["--socket", sock.to_str().unwrap_or_default()];
    full.extend_from_slice(args);
    let peer = Peer::start(dir, program, &full, Endpoint::Unix(sock.clone()));
    (peer, unix_uri(&sock))
}

/// Runs `cmd args` to completion (stdout discarded, stderr to `log`) and
/// returns its peak resident memory in KiB: its `VmHWM`, read every 2 ms
/// while it runs (not wait4's `ru_maxrss`, which also counts the memory
/// of the process that spawned it, this one, from before its exec).
/// Panics when it fails or runs longer than `timeout`.
fn run_peak_rss(cmd: &str, args: &[&str], log: &Path, timeout: Duration) -> f64 {
    use std::process::Stdio;
    let err = std::fs::File::create(log).expect("create log");
    let mut child = nbd_tests::command(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let deadline = Instant::now() + timeout;
    let mut peak: f64 = 0.0;
    loop {
        // Before the check for its exit: what is read while it is alive.
        peak = peak.max(peak_rss_kib(child.id()));
        if let Some(status) = child.try_wait().expect("wait for the child") {
            assert!(
                status.success(),
                "{cmd} {args:?} failed ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return peak;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd} {args:?} timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// nbdcopy's arguments to copy `url` to `dst` through nbdkit's curl
/// plugin with the readahead and retry filters, started by nbdcopy
/// itself (the pipeline of KubeVirt CDI's importer).
fn nbdkit_curl_copy_args(url: &str, dst: &str) -> Vec<String> {
    [
        "--",
        "[",
        "nbdkit",
        "-r",
        "--filter=readahead",
        "--filter=retry",
        "curl",
        &format!("url={url}"),
        "]",
        dst,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// HTTP rows (`--http-only`): nginx on 127.0.0.1 serving files on tmpfs,
/// read by our nbd-copy and nbd-serve (the HTTP source, no server
/// between) and by the peers: nbdcopy over nbdkit's curl plugin with the
/// readahead and retry filters (what KubeVirt CDI runs), and qemu-img's
/// curl driver for a qcow2 image. Throughput straight from nginx and with
/// 10 ms added to every request (the fault proxy, both sides through it),
/// and the peak memory of reading a 4 GiB file. A missing peer or driver
/// leaves its rows out with a note.
fn http_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    if !present("HTTP", missing_programs(&["nginx"])) {
        return;
    }
    guarded("HTTP", rows, |rows| http_rows_inner(cfg, dir, rows));
}

/// The programs of `names` that are not on the PATH.
fn missing_programs<'a>(names: &[&'a str]) -> Vec<&'a str> {
    names.iter().copied().filter(|c| find_program(c).is_none()).collect()
}

/// Whether nothing the `group` rows need is `missing`; otherwise prints
/// a note naming it, and the rows are left out.
fn present(group: &str, missing: Vec<&str>) -> bool {
    if !missing.is_empty() {
        eprintln!(
            "nbd-bench: note: the {group} rows are left out: {} missing (scripts/install-peers.sh)",
            missing.join(", ")
        );
    }
    missing.is_empty()
}

/// Files removed when dropped (a panic included).
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn http_rows_inner(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let curl_plugin = run_timeout("nbdkit", &["curl", "--dump-plugin"], Duration::from_secs(60))
        .status
        .success();
    let web = nbd_tests::nginx(dir);
    let size = cfg.copy_size;
    let mut shm_files = RemoveOnDrop(Vec::new());
    // A file on tmpfs, linked into nginx's root as `/NAME`.
    let mut publish = |name: &str, make: &dyn Fn(&Path)| {
        let path = shm_path(dir, &format!("http-{name}"));
        shm_files.0.push(path.clone());
        make(&path);
        std::os::unix::fs::symlink(&path, web.root.join(name)).expect("link into the web root");
        web.url(&format!("/{name}"))
    };
    let url = publish("disk.img", &|p: &Path| write_random_file(p, size));
    // At 10 ms per request a quarter of the size (at least 16 MiB) keeps
    // the peer's run short.
    let slow_size = (size / 4).max(16 << 20);
    let slow_path = format!("/slow{}.img", slow_size >> 20);
    publish(&slow_path[1..], &|p: &Path| write_random_file(p, slow_size));
    let big_size = 4 * size;
    let big_url = publish("big.img", &|p: &Path| {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(big_size))
            .expect("create sparse image")
    });
    let src = shm_path(dir, "http-disk.img");
    let qcow2_url = publish("disk.qcow2", &|p: &Path| {
        let o = run_timeout(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                src.to_str().unwrap_or_default(),
                p.to_str().unwrap_or_default(),
            ],
            Duration::from_secs(300),
        );
        assert!(o.status.success(), "qemu-img convert to qcow2 failed");
    });
    let ours = our_bin("nbd-copy");
    let mb = |bytes: u64, secs: f64| bytes as f64 / secs;

    if curl_plugin {
        // 1. Straight from nginx.
        guarded("HTTP copy", rows, |rows| {
            let kit = nbdkit_curl_copy_args(&url, "null:");
            let kit: Vec<&str> = kit.iter().map(String::as_str).collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..cfg.reps {
                a.push(mb(size, time_cmd(&ours, &[&url, "null:"])));
                b.push(mb(size, time_cmd("nbdcopy", &kit)));
            }
            let a = median(a);
            rows.push(Row {
                what: format!("HTTP: copy {} MiB of random data from nginx to null:", size >> 20),
                peer: "nbdcopy+nbdkit curl".into(),
                ours: a / 1e6,
                theirs: median(b) / 1e6,
                unit: "MB/s",
                better: Better::Higher,
                target: 1.5,
                bytes_per_sec: Some(a),
            });
        });
        // 2. 10 ms added to every request, both sides through one proxy.
        guarded("HTTP latency", rows, |rows| {
            use nbd_tests::fault_proxy::{Fault, FaultProxy, Rule};
            let upstream = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, web.port));
            let proxy = FaultProxy::start(upstream).expect("start the fault proxy");
            proxy.set(Fault::Latency(Duration::from_millis(10)), Rule::Always);
            let url = proxy.url(&slow_path);
            let kit = nbdkit_curl_copy_args(&url, "null:");
            let kit: Vec<&str> = kit.iter().map(String::as_str).collect();
            let (mut a, mut b, mut a_req, mut b_req) = (Vec::new(), Vec::new(), 0, 0);
            for _ in 0..cfg.reps {
                let r0 = proxy.requests();
                a.push(mb(slow_size, time_cmd(&ours, &[&url, "null:"])));
                let r1 = proxy.requests();
                b.push(mb(slow_size, time_cmd("nbdcopy", &kit)));
                a_req = r1 - r0;
                b_req = proxy.requests() - r1;
            }
            eprintln!(
                "nbd-bench: note: HTTP requests per copy of {} MiB: nbd-copy {a_req}, nbdkit curl {b_req}",
                slow_size >> 20
            );
            let a = median(a);
            rows.push(Row {
                what: format!(
                    "HTTP, 10 ms per request: copy {} MiB of random data to null:",
                    slow_size >> 20
                ),
                peer: "nbdcopy+nbdkit curl".into(),
                ours: a / 1e6,
                theirs: median(b) / 1e6,
                unit: "MB/s",
                better: Better::Higher,
                target: 4.0,
                bytes_per_sec: None,
            });
        });
    } else {
        eprintln!("nbd-bench: note: the HTTP rows against nbdkit are left out: nbdkit has no curl plugin");
    }

    // 3. A qcow2 image over HTTP, to a raw file on tmpfs.
    let qemu_curl = run_timeout("qemu-img", &["info", &qcow2_url], Duration::from_secs(60))
        .status
        .success();
    if qemu_curl {
        guarded("HTTP qcow2", rows, |rows| {
            let out = shm_path(dir, "http-out.img");
            let out_s = out.to_str().unwrap_or_default();
            let (mut a, mut b, mut hung) = (Vec::new(), Vec::new(), 0);
            // QEMU's curl driver sometimes stops polling its sockets near
            // the end of a copy and waits forever (seen with qemu-img 10.0
            // and libcurl 7.88): such a run is killed after a deadline and
            // run again, and the hangs are counted in a note.
            let deadline = Duration::from_secs(120);
            for _ in 0..cfg.reps {
                for _ in 0..3 {
                    let _ = std::fs::remove_file(&out);
                    let args = ["convert", "-f", "qcow2", "-O", "raw", &qcow2_url, out_s];
                    match time_cmd_within("qemu-img", &args, deadline) {
                        Some(secs) => {
                            b.push(mb(size, secs));
                            break;
                        }
                        None => hung += 1,
                    }
                }
                let _ = std::fs::remove_file(&out);
                a.push(mb(size, time_cmd(&ours, &[&qcow2_url, out_s])));
                let same = same_contents(&out, &src);
                let _ = std::fs::remove_file(&out);
                if !same {
                    eprintln!(
                        "nbd-bench: note: the HTTP qcow2 row is left out: what nbd-copy wrote is not the guest disk (a build that reads qcow2 over HTTP is needed)"
                    );
                    return;
                }
            }
            if hung > 0 {
                eprintln!(
                    "nbd-bench: note: qemu-img convert over HTTP hung {hung} times (killed after {}s, not counted)",
                    deadline.as_secs()
                );
            }
            if b.is_empty() {
                eprintln!("nbd-bench: note: the HTTP qcow2 row is left out: every qemu-img convert run hung");
                return;
            }
            let a = median(a);
            rows.push(Row {
                what: format!(
                    "HTTP: copy a qcow2 image ({} MiB of random data) to a raw file on tmpfs",
                    size >> 20
                ),
                peer: "qemu-img convert".into(),
                ours: a / 1e6,
                theirs: median(b) / 1e6,
                unit: "MB/s",
                better: Better::Higher,
                target: 1.5,
                bytes_per_sec: Some(a),
            });
        });
    } else {
        eprintln!(
            "nbd-bench: note: the HTTP qcow2 row is left out: qemu-img has no curl driver (qemu-block-extra of qemu-utils' version: scripts/install-peers.sh --bench)"
        );
    }

    // 4. Peak memory reading a big file over HTTP (one run each: it
    // hardly varies).
    if curl_plugin {
        guarded("HTTP memory", rows, |rows| {
            let log = dir.join("peak.log");
            let timeout = Duration::from_secs(900);
            let gib = if big_size.is_multiple_of(1 << 30) {
                format!("{} GiB", big_size >> 30)
            } else {
                format!("{} MiB", big_size >> 20)
            };
            let ours_copy = run_peak_rss(&ours, &[&big_url, "null:"], &log, timeout);
            // nbdkit as a server of its own, so that its peak is read
            // apart from nbdcopy's.
            let sock = dir.socket_path("kit-curl");
            let url_arg = format!("url={big_url}");
            let kit = Peer::start(
                dir,
                "nbdkit",
                &[
                    "-f",
                    "-r",
                    "-U",
                    sock.to_str().unwrap_or_default(),
                    "--filter=readahead",
                    "--filter=retry",
                    "curl",
                    &url_arg,
                ],
                Endpoint::Unix(sock.clone()),
            );
            let nbdcopy_rss = run_peak_rss("nbdcopy", &[&unix_uri(&sock), "null:"], &log, timeout);
            let kit_rss = peak_rss_kib(kit.pid());
            drop(kit);
            rows.push(Row {
                what: format!("HTTP: peak memory of copier and source, a sparse {gib} file to null:"),
                peer: "nbdcopy+nbdkit curl".into(),
                ours: ours_copy,
                theirs: nbdcopy_rss + kit_rss,
                unit: "KiB",
                better: Better::Lower,
                target: 1.0,
                bytes_per_sec: None,
            });
            let (serve, uri) = serve_on_socket(dir, &our_bin("nbd-serve"), "serve-http", &["-r", &big_url]);
            run_peak_rss("nbdcopy", &[&uri, "null:"], &log, timeout);
            let serve_rss = peak_rss_kib(serve.pid());
            drop(serve);
            rows.push(Row {
                what: format!("HTTP: server peak memory, a sparse {gib} file read by nbdcopy to null:"),
                peer: "nbdkit curl".into(),
                ours: serve_rss,
                theirs: kit_rss,
                unit: "KiB",
                better: Better::Lower,
                target: 1.0,
                bytes_per_sec: None,
            });
        });
    }
    drop(web);
    drop(shm_files);
}

fn idle_memory_rows(dir: &TempDir, rows: &mut Vec<Row>) {
    let serve = our_bin("nbd-serve");
    let n = 100;
    let mut per_conn = Vec::new();
    for (program, args) in [
        (serve.as_str(), vec!["--memory", "1G", "--max-connections", "1000"]),
        ("nbdkit", vec!["-f", "memory", "1G"]),
    ] {
        let sock = dir.socket_path("idle");
        let mut full: Vec<&str> = Vec::new();
        if program == "nbdkit" {
            full.extend_from_slice(&args);
            full.splice(1..1, ["-U", sock.to_str().unwrap_or_default()]);
        } else {
            full.extend_from_slice(&["--socket", sock.to_str().unwrap_or_default()]);
            full.extend_from_slice(&args);
        }
        let peer = Peer::start(dir, program, &full, Endpoint::Unix(sock.clone()));
        std::thread::sleep(Duration::from_millis(200));
        let before = rss_kib(peer.pid());
        let uri = unix_uri(&sock);
        let clients: Vec<_> = (0..n)
            .filter_map(|_| nbd_blocking::Client::connect(&uri).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_kib(peer.pid());
        per_conn.push((after - before) / clients.len().max(1) as f64);
        drop(clients);
    }
    rows.push(Row {
        what: format!("server memory per idle connection ({n} connections)"),
        peer: "nbdkit memory".into(),
        ours: per_conn[0],
        theirs: per_conn[1],
        unit: "KiB",
        better: Better::Lower,
        target: 1.0,
        bytes_per_sec: None,
    });
}

/// TLS rows: nbd-serve against nbdkit, both with `--tls=require`, under
/// fio (libnbd over GnuTLS); and our nbd-copy (rustls) against nbdcopy
/// (GnuTLS) reading from nbdkit over TLS. A failure here prints a note and
/// leaves the other rows alone.
fn tls_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    guarded("TLS", rows, |rows| tls_rows_inner(cfg, dir, rows));
}

fn tls_rows_inner(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let pki = nbd_tests::tls::make_certificates(&dir.join("pki")).expect("test certificates");
    let certs = format!("--tls-certificates={}", pki.dir_str());
    let tls_uri = |sock: &Path| {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            sock.display(),
            pki.dir_str()
        )
    };
    // fio's libnbd does not allow tls-certificates (local file access) in
    // URIs; over a Unix socket libnbd checks no certificate anyway, so it
    // gets by with the system's CA list.
    let fio_uri = |sock: &Path| format!("nbds+unix:///?socket={}", sock.display());
    let s1 = dir.socket_path("ours-tls");
    let s2 = dir.socket_path("kit-tls");
    let ours = Peer::start(
        dir,
        &our_bin("nbd-serve"),
        &[
            "--socket",
            s1.to_str().unwrap_or_default(),
            "--tls=require",
            &certs,
            "--memory",
            "1G",
        ],
        Endpoint::Unix(s1.clone()),
    );
    let kit = Peer::start(
        dir,
        "nbdkit",
        &[
            "-f",
            "-U",
            s2.to_str().unwrap_or_default(),
            "--tls=require",
            &certs,
            "memory",
            "1G",
        ],
        Endpoint::Unix(s2.clone()),
    );
    server_rows(
        "TLS: nbd-serve --memory",
        "nbdkit memory, TLS",
        (&ours, fio_uri(&s1)),
        (&kit, fio_uri(&s2)),
        true,
        cfg,
        dir,
        rows,
    );
    drop(ours);

    // Copy out of nbdkit over TLS: the 256 MiB fio wrote, and holes that
    // both copiers skip.
    let uri = tls_uri(&s2);
    let size: u64 = 1 << 30;
    let nbd_copy = our_bin("nbd-copy");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        a.push(size as f64 / 1e6 / time_cmd(&nbd_copy, &[&uri, "null:"]));
        b.push(size as f64 / 1e6 / time_cmd("nbdcopy", &[&uri, "null:"]));
    }
    rows.push(Row {
        what: "TLS: copy nbdkit memory (1 GiB, 256 MiB data) to null:".into(),
        peer: "nbdcopy".into(),
        ours: median(a),
        theirs: median(b),
        unit: "MB/s",
        better: Better::Higher,
        target: 1.0,
        bytes_per_sec: None,
    });
}

/// RBD rows: nbd-serve (feature rbd) against qemu-nbd's rbd driver, each
/// serving its own 1 GiB image of one throwaway cluster
/// (scripts/ceph-cluster.sh), 4 KiB random reads and writes at QD32. A
/// failure prints a note and leaves the other rows alone.
fn rbd_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    if !present("RBD", missing_programs(&["ceph-mon", "ceph-osd", "rbd"])) {
        return;
    }
    guarded("RBD", rows, |rows| rbd_rows_inner(cfg, dir, rows));
}

/// A throwaway cluster, stopped on drop.
struct Ceph {
    dir: PathBuf,
    script: PathBuf,
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let (script, dir) = (
            self.script.to_str().unwrap_or_default(),
            self.dir.to_str().unwrap_or_default(),
        );
        let _ = run_timeout("bash", &[script, "stop", dir], Duration::from_secs(60));
    }
}

fn rbd_rows_inner(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh");
    let ceph = Ceph {
        dir: dir.join("ceph"),
        script: script.clone(),
    };
    let pid = std::process::id().to_string();
    let o = run_timeout(
        "bash",
        &[
            script.to_str().unwrap_or_default(),
            "start",
            ceph.dir.to_str().unwrap_or_default(),
            "--watch",
            &pid,
        ],
        Duration::from_secs(180),
    );
    assert!(
        o.status.success(),
        "cannot start the Ceph cluster: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let conf = ceph.dir.join("ceph.conf");
    let conf = conf.to_str().unwrap_or_default();
    for image in ["ours", "qemu"] {
        let o = run_timeout(
            "rbd",
            &["-c", conf, "create", "--size", "1G", &format!("rbd/{image}")],
            Duration::from_secs(60),
        );
        assert!(o.status.success(), "rbd create: {}", String::from_utf8_lossy(&o.stderr));
    }
    let s1 = dir.socket_path("ours-rbd");
    let s2 = dir.socket_path("qemu-rbd");
    let ours = Peer::start(
        dir,
        &our_bin_with_features("nbd-serve", &["nbd-tools/rbd"]),
        &[
            "--socket",
            s1.to_str().unwrap_or_default(),
            &format!("rbd:rbd/ours:conf={conf}"),
        ],
        Endpoint::Unix(s1.clone()),
    );
    let qemu = Peer::try_start(
        dir,
        "qemu-nbd",
        &[
            "--socket",
            s2.to_str().unwrap_or_default(),
            "--persistent",
            "--shared=8",
            "-f",
            "raw",
            &format!("rbd:rbd/qemu:conf={conf}"),
        ],
        Endpoint::Unix(s2.clone()),
    )
    .unwrap_or_else(|e| {
        panic!("qemu-nbd cannot serve rbd: (qemu-block-extra of qemu-utils' version: scripts/install-peers.sh --bench): {e}")
    });
    let (u1, u2) = (unix_uri(&s1), unix_uri(&s2));
    prefill(&u1, dir);
    prefill(&u2, dir);
    let mut our_writes = Vec::new();
    for (name, rw) in [
        ("4 KiB random reads, iodepth 32", "randread"),
        ("4 KiB random writes, iodepth 32", "randwrite"),
    ] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            a.push(fio(&u1, rw, "4k", 32, cfg, dir).iops);
            b.push(fio(&u2, rw, "4k", 32, cfg, dir).iops);
        }
        if rw == "randwrite" {
            our_writes = a.clone();
        }
        rows.push(Row {
            what: format!("Ceph RBD (1 GiB image, one memstore OSD), fio {name}: IOPS"),
            peer: "qemu-nbd rbd:".into(),
            ours: median(a),
            theirs: median(b),
            unit: "IOPS",
            better: Better::Higher,
            target: 1.2,
            bytes_per_sec: None,
        });
    }
    drop(ours);
    drop(qemu);
    // What the cluster takes without NBD: `rbd bench` (librbd alone) with
    // 32 random 4 KiB writes in flight over 256 MiB of written objects,
    // the region fio writes.
    let rbd = |args: &[&str]| {
        let mut full = vec!["-c", conf];
        full.extend_from_slice(args);
        let o = run_timeout("rbd", &full, Duration::from_secs(300));
        assert!(
            o.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    rbd(&["create", "--size", "256M", "rbd/alone"]);
    rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-pattern",
        "seq",
        "--io-size",
        "1M",
        "--io-threads",
        "8",
        "--io-total",
        "256M",
        "rbd/alone",
    ]);
    let total = format!("{}", 4096 * 3000 * u64::from(cfg.runtime));
    let mut alone = Vec::new();
    for _ in 0..cfg.reps {
        let out = rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-pattern",
            "rand",
            "--io-size",
            "4K",
            "--io-threads",
            "32",
            "--io-total",
            &total,
            "rbd/alone",
        ]);
        // The summary line: "elapsed: N  ops: N  ops/sec: X  bytes/sec: ...".
        let ops = out
            .lines()
            .rev()
            .find_map(|l| l.split("ops/sec:").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        alone.push(ops);
    }
    rows.push(Row {
        what: "Ceph RBD, 4 KiB random writes at 32 in flight: nbd-serve under fio vs librbd alone".into(),
        peer: "rbd bench".into(),
        ours: median(our_writes),
        theirs: median(alone),
        unit: "IOPS",
        better: Better::Higher,
        target: 0.9,
        bytes_per_sec: None,
    });
    drop(ceph);
}

fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut cfg = if quick {
        Config {
            reps: 1,
            runtime: 2,
            copy_size: 256 << 20,
            groups: Vec::new(),
            baseline: None,
            rws: Vec::new(),
            fuse_ioengine: "psync".into(),
        }
    } else {
        Config {
            reps: 3,
            runtime: 4,
            copy_size: 1 << 30,
            groups: Vec::new(),
            baseline: None,
            rws: Vec::new(),
            fuse_ioengine: "psync".into(),
        }
    };
    if let Some(n) = arg_value("--reps").and_then(|v| v.parse().ok()) {
        cfg.reps = n;
    }
    if let Some(n) = arg_value("--runtime").and_then(|v| v.parse().ok()) {
        cfg.runtime = n;
    }
    if let Some(n) = arg_value("--copy-size").and_then(|v| v.parse::<u64>().ok()) {
        cfg.copy_size = n.max(1) << 20;
    }
    // The HTTP rows read from 127.0.0.1: never through a proxy of the
    // environment (libcurl and our HTTP source both honour `no_proxy`).
    let no_proxy = match std::env::var("no_proxy") {
        Ok(v) if !v.is_empty() => format!("{v},127.0.0.1"),
        _ => "127.0.0.1".to_string(),
    };
    // SAFETY: no other thread runs yet.
    unsafe { std::env::set_var("no_proxy", no_proxy) };
    cfg.baseline = arg_value("--baseline");
    if let Some(engine) = arg_value("--fuse-ioengine") {
        cfg.fuse_ioengine = engine;
    }
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        if w[0] == "--group" {
            cfg.groups.push(w[1].clone());
        }
        if w[0] == "--rw" {
            cfg.rws.push(w[1].clone());
        }
    }
    if !require_peers(&["nbdkit", "qemu-nbd", "qemu-img", "nbdcopy", "fio"]) {
        eprintln!("nbd-bench: peers missing; run scripts/install-peers.sh");
        std::process::exit(1);
    }
    let dir = TempDir::new();
    let mut rows = Vec::new();
    // The ceiling: the median of three measurements.
    let ceiling = median((0..3).map(|_| socket_ceiling(1.0)).collect());
    let flag = |f: &str| std::env::args().any(|a| a == f);
    // The groups run alone, each by its flag.
    type Group = fn(&Config, &TempDir, &mut Vec<Row>);
    let alone: [(&str, &[Group]); 8] = [
        ("--qcow2-only", &[qcow2_rows]),
        ("--tls-only", &[tls_rows]),
        ("--flush-only", &[flushing_writer_rows]),
        ("--copy-only", &[copy_rows, tls_rows]),
        ("--http-only", &[http_rows]),
        ("--rbd-only", &[rbd_rows]),
        ("--blkhash-only", &[blkhash_rows]),
        ("--fuse-only", &[fuse_rows]),
    ];
    if let Some((_, groups)) = alone.iter().find(|(f, _)| flag(f)) {
        for group in groups.iter() {
            group(&cfg, &dir, &mut rows);
        }
        print_rows(&rows, ceiling);
        return;
    }
    let server_only = flag("--server-only") || !cfg.groups.is_empty();

    // Memory: nbd-serve --memory against nbdkit's memory plugin.
    if cfg.wants("memory") {
        let serve = our_bin("nbd-serve");
        let s1 = dir.socket_path("ours");
        let s2 = dir.socket_path("kit");
        let ours = Peer::start(
            &dir,
            &serve,
            &["--socket", s1.to_str().unwrap_or_default(), "--memory", "1G"],
            Endpoint::Unix(s1.clone()),
        );
        let kit = match &cfg.baseline {
            Some(base) => Peer::start(
                &dir,
                base,
                &["--socket", s2.to_str().unwrap_or_default(), "--memory", "1G"],
                Endpoint::Unix(s2.clone()),
            ),
            None => Peer::start(
                &dir,
                "nbdkit",
                &["-f", "-U", s2.to_str().unwrap_or_default(), "memory", "1G"],
                Endpoint::Unix(s2.clone()),
            ),
        };
        server_rows(
            "nbd-serve --memory",
            if cfg.baseline.is_some() {
                "baseline"
            } else {
                "nbdkit memory"
            },
            (&ours, unix_uri(&s1)),
            (&kit, unix_uri(&s2)),
            true,
            &cfg,
            &dir,
            &mut rows,
        );
    }
    // Files: nbd-serve FILE against qemu-nbd on the same kind of file.
    for (group, kind, fallocated) in [
        ("tmpfs", FileKind::Tmpfs, false),
        ("tmpfs-fallocated", FileKind::Tmpfs, true),
        ("disk", FileKind::Disk, false),
        ("disk-fallocated", FileKind::Disk, true),
    ] {
        if cfg.wants(group) {
            file_rows(kind, fallocated, &cfg, &dir, &mut rows);
        }
    }
    if cfg.wants("flush") {
        flushing_writer_rows(&cfg, &dir, &mut rows);
    }
    if cfg.wants("qcow2") {
        qcow2_rows(&cfg, &dir, &mut rows);
    }
    if !server_only {
        copy_rows(&cfg, &dir, &mut rows);
        idle_memory_rows(&dir, &mut rows);
        tls_rows(&cfg, &dir, &mut rows);
        blkhash_rows(&cfg, &dir, &mut rows);
        fuse_rows(&cfg, &dir, &mut rows);
        http_rows(&cfg, &dir, &mut rows);
        rbd_rows(&cfg, &dir, &mut rows);
    }
    print_rows(&rows, ceiling);
}

fn print_rows(rows: &[Row], ceiling: f64) {
    println!();
    println!(
        "ceiling: one Unix socket moves {:.1} MB/s on this machine (1 MiB writes, two threads)",
        ceiling / 1e6
    );
    println!(
        "{:<74} {:<18} {:>12} {:>12} {:>8} {:>8}  {:<3} {:>8}",
        "what", "peer", "ours", "peer", "ratio", "target", "met", "ceiling"
    );
    for r in rows {
        let target = match r.better {
            Better::Higher => format!(">={:.2}", r.target),
            Better::Lower => format!("<={:.2}", r.target),
        };
        let fraction = r
            .bytes_per_sec
            .map(|b| format!("{:.3}", b / ceiling))
            .unwrap_or_default();
        println!(
            "{:<74} {:<18} {:>9.1} {:<2} {:>9.1} {:<2} {:>8.3} {:>8}  {:<3} {:>8}",
            r.what,
            r.peer,
            r.ours,
            short_unit(r.unit),
            r.theirs,
            short_unit(r.unit),
            r.ratio(),
            target,
            if r.met() { "yes" } else { "NO" },
            fraction
        );
    }
    println!(
        "\nunits: IOPS = I/O per second, MB/s = 10^6 bytes per second, us = CPU microseconds per request, KiB = resident memory; ceiling = our bytes per second as a fraction of the socket ceiling"
    );
}

fn short_unit(u: &str) -> &str {
    match u {
        "IOPS" => "io",
        "MB/s" => "MB",
        "us" => "us",
        "KiB" => "Ki",
        _ => "",
    }
}

/// Runs a group of rows that may fail on its own (a missing or broken
/// peer): a panic inside `f` prints a note naming `what` and leaves the
/// rows of the other groups alone.
fn guarded(what: &str, rows: &mut Vec<Row>, f: impl FnOnce(&mut Vec<Row>)) {
    let run = std::panic::AssertUnwindSafe(|| {
        let mut new = Vec::new();
        f(&mut new);
        new
    });
    match std::panic::catch_unwind(run) {
        Ok(new) => rows.extend(new),
        Err(e) => {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            eprintln!("nbd-bench: note: the {what} rows failed and are left out: {why}");
        }
    }
}

/// Fills `len` bytes of `f` at `offset` with pseudo-random data (xorshift
/// from `seed`), so that no reader can skip zeroes.
fn write_random(f: &std::fs::File, offset: u64, len: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let mut x: u64 = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let n = (len - done).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], offset + done).expect("write random data");
        done += n as u64;
    }
}

/// The blksum program: `--blksum PATH`, else `NBD_BENCH_BLKSUM`, else
/// `blksum` on `PATH`.
fn blksum_program() -> Option<PathBuf> {
    let named = arg_value("--blksum").or_else(|| std::env::var("NBD_BENCH_BLKSUM").ok().filter(|v| !v.is_empty()));
    match named {
        Some(p) => {
            let found = find_program(&p);
            if found.is_none() {
                eprintln!("nbd-bench: note: blksum {p} is not an executable file");
            }
            found
        }
        None => find_program("blksum"),
    }
}

/// The blkhash row: `nbd-copy --blkhash URI null:` against blkhash's
/// `blksum URI` (sha256 of 64 KiB blocks, both defaults) on one read-only
/// nbd-serve export of a sparse file on tmpfs, half random data (in
/// 64 MiB extents) and half holes. Both digests are printed and must be
/// equal before any timing; a mismatch fails the row. Without blksum the
/// row is left out with a note.
fn blkhash_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let Some(blksum) = blksum_program() else {
        eprintln!(
            "nbd-bench: note: the blkhash row is left out: blksum not found; build it with \
             scripts/build-blksum.sh DESTDIR and pass --blksum DESTDIR/bin/blksum \
             (or set NBD_BENCH_BLKSUM)"
        );
        return;
    };
    let blksum = blksum.to_str().unwrap_or_default().to_string();
    guarded("blkhash", rows, |rows| blkhash_rows_inner(&blksum, cfg, dir, rows));
}

fn blkhash_rows_inner(blksum: &str, cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let size = cfg.copy_size;
    let extent: u64 = (64 << 20).min(size / 2);
    let img = shm_path(dir, "blkhash.img");
    {
        let f = std::fs::File::create(&img).expect("create the blkhash image");
        f.set_len(size).expect("size the blkhash image");
        // Data in every other extent: half data, half holes.
        let mut at = 0;
        while at < size {
            write_random(&f, at, extent.min(size - at), 0x2545_f491_4f6c_dd1d ^ at);
            at += 2 * extent;
        }
    }
    let (srv, uri) = serve_on_socket(
        dir,
        &our_bin("nbd-serve"),
        "blkhash",
        &["-r", img.to_str().unwrap_or_default()],
    );
    let nbd_copy = our_bin("nbd-copy");
    let first_word = |out: &str| out.split_whitespace().next().unwrap_or_default().to_string();
    // The digests first: a mismatch is a failure, not a figure.
    let ours = first_word(&timed_output(&nbd_copy, &["--blkhash", &uri, "null:"]).1);
    let theirs = first_word(&timed_output(blksum, &[&uri]).1);
    println!("blkhash of the {} MiB export: nbd-copy {ours}", size >> 20);
    println!("blkhash of the {} MiB export: blksum   {theirs}", size >> 20);
    assert!(
        !ours.is_empty() && ours == theirs,
        "the digests differ: nbd-copy --blkhash {ours:?}, blksum {theirs:?}"
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        a.push(size as f64 / 1e6 / timed_output(&nbd_copy, &["--blkhash", &uri, "null:"]).0);
        b.push(size as f64 / 1e6 / timed_output(blksum, &[&uri]).0);
    }
    rows.push(Row {
        what: format!(
            "blkhash sha256 of nbd-serve FILE ({} MiB, half data, half holes)",
            size >> 20
        ),
        peer: "blksum".into(),
        ours: median(a),
        theirs: median(b),
        unit: "MB/s",
        better: Better::Higher,
        target: 1.5,
        bytes_per_sec: None,
    });
    drop(srv);
    let _ = std::fs::remove_file(&img);
}

/// Runs `cmd args...`, which must succeed; its wall time in seconds and
/// its stdout.
fn timed_output(cmd: &str, args: &[&str]) -> (f64, String) {
    let t = Instant::now();
    let o = run_timeout(cmd, args, Duration::from_secs(600));
    let secs = t.elapsed().as_secs_f64();
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (secs, String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Whether `path` is a mount point now (from /proc/self/mountinfo).
fn is_mounted(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let want = path.to_str().unwrap_or_default();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want))
}

/// The program that unmounts FUSE filesystems: `fusermount`, else
/// `fusermount3`.
fn fusermount() -> Option<PathBuf> {
    find_program("fusermount").or_else(|| find_program("fusermount3"))
}

/// A FUSE mount of an export as one file (`nbd-fuse` or `nbdfuse`, in the
/// foreground as our child), unmounted when dropped.
struct FuseMount {
    child: Option<std::process::Child>,
    mountpoint: PathBuf,
    file: PathBuf,
    log: PathBuf,
}

impl FuseMount {
    /// `program ARGS MOUNTPOINT URI` on `mountpoint` (created if needed);
    /// waits until the file `MOUNTPOINT/nbd` is there.
    fn start(program: &str, args: &[&str], mountpoint: &Path, uri: &str, log: &Path) -> FuseMount {
        std::fs::create_dir_all(mountpoint).expect("create the mount point");
        let out = std::fs::File::create(log).expect("create the FUSE log");
        let child = std::process::Command::new(program)
            .args(args)
            .arg(mountpoint)
            .arg(uri)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().expect("the FUSE log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let mut m = FuseMount {
            child: Some(child),
            mountpoint: mountpoint.to_owned(),
            file: mountpoint.join("nbd"),
            log: log.to_owned(),
        };
        let start = Instant::now();
        while !(is_mounted(&m.mountpoint) && m.file.exists()) {
            if let Some(Ok(Some(st))) = m.child.as_mut().map(|c| c.try_wait()) {
                m.child = None;
                panic!("{program} exited with {st} before mounting: {}", m.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{program} did not mount in 30 s: {}",
                m.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts (`fusermount -u`, not lazily: nothing may still use the
    /// file) and waits for the program to exit.
    fn unmount(mut self) {
        let um = fusermount().expect("fusermount");
        let o = run_timeout(
            um.to_str().unwrap_or_default(),
            &["-u", self.mountpoint.to_str().unwrap_or_default()],
            Duration::from_secs(30),
        );
        assert!(
            o.status.success(),
            "cannot unmount {}: {}",
            self.mountpoint.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let start = Instant::now();
        if let Some(mut c) = self.child.take() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if start.elapsed() > Duration::from_secs(30) => {
                        let _ = c.kill();
                        let _ = c.wait();
                        panic!("the FUSE program did not exit after unmounting: {}", self.log());
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint)
            && let Some(um) = fusermount()
        {
            let _ = std::process::Command::new(um)
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .stderr(std::process::Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The fio workloads of the FUSE rows: name, fio `rw`, block size.
/// Sixteen requests in flight for each, from sixteen `psync` jobs (each
/// reading its own slice of the file) with `O_DIRECT`, so that the page
/// cache answers nothing and neither side depends on the kernel's
/// asynchronous direct I/O (FUSE_ASYNC_DIO) for its concurrency;
/// `--fuse-ioengine libaio` runs one job at queue depth 16 instead.
const FUSE_WORKLOADS: [(&str, &str, &str); 2] = [
    ("1 MiB sequential reads x16", "read", "1M"),
    ("4 KiB random reads x16", "randread", "4k"),
];

/// fio on a file of `size` bytes (a FUSE mount): one FUSE workload.
fn fio_file(file: &Path, size: u64, rw: &str, bs: &str, cfg: &Config, dir: &TempDir) -> FioResult {
    let out = dir.join("fio-fuse.json");
    let jobs: u64 = 16;
    let mut args = vec![
        "--name=fuse".to_string(),
        format!("--filename={}", file.display()),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        "--direct=1".to_string(),
        "--readonly".to_string(),
        format!("--runtime={}", cfg.runtime),
        "--time_based".to_string(),
        "--group_reporting".to_string(),
        "--output-format=json".to_string(),
        format!("--output={}", out.display()),
    ];
    if cfg.fuse_ioengine == "libaio" {
        args.extend([
            "--ioengine=libaio".to_string(),
            "--iodepth=16".to_string(),
            format!("--size={size}"),
        ]);
    } else {
        let slice = size / jobs;
        args.extend([
            format!("--ioengine={}", cfg.fuse_ioengine),
            format!("--numjobs={jobs}"),
            format!("--size={slice}"),
            format!("--offset_increment={slice}"),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_timeout("fio", &args, Duration::from_secs(cfg.runtime as u64 + 60));
    assert!(o.status.success(), "fio failed: {}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).expect("fio output")).expect("fio json");
    let read = &j["jobs"][0]["read"];
    FioResult {
        iops: read["iops"].as_f64().unwrap_or(0.0),
        bytes_per_sec: read["bw_bytes"].as_f64().unwrap_or(0.0),
        ios: read["total_ios"].as_f64().unwrap_or(0.0),
    }
}

/// FUSE rows: our `nbd-fuse` against libnbd's `nbdfuse`, each mounting
/// the same nbd-serve memory export (random data) in turn, read by fio
/// through the mounted file (see [`FUSE_WORKLOADS`]). Every run mounts
/// afresh and unmounts after, so no run reads what an earlier one left
/// in the kernel's caches. Without FUSE, `fusermount` or `nbdfuse` the
/// rows are left out with a note.
fn fuse_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let mut missing = missing_programs(&["nbdfuse"]);
    if fusermount().is_none() {
        missing.push("fusermount");
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse");
    }
    if !present("FUSE", missing) {
        return;
    }
    guarded("FUSE", rows, |rows| fuse_rows_inner(cfg, dir, rows));
}

fn fuse_rows_inner(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let size = cfg.copy_size;
    let (srv, uri) = serve_on_socket(dir, &our_bin("nbd-serve"), "fuse", &["--memory", &size.to_string()]);
    {
        let src = shm_path(dir, "fuse-random.img");
        let f = std::fs::File::create(&src).expect("create the random image");
        write_random(&f, 0, size, 0x9e37_79b9_7f4a_7c15);
        drop(f);
        timed_output("nbdcopy", &[src.to_str().unwrap_or_default(), &uri]);
        let _ = std::fs::remove_file(&src);
    }
    let nbd_fuse = our_bin("nbd-fuse");
    let nbdfuse = find_program("nbdfuse").expect("nbdfuse");
    let nbdfuse = nbdfuse.to_str().unwrap_or_default();
    let mountpoint = dir.join("fuse-mnt");
    let log = dir.join("fuse.log");
    for (name, rw, bs) in FUSE_WORKLOADS {
        let (mut a, mut b, mut a_bytes) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            for (ours, program) in [(true, nbd_fuse.as_str()), (false, nbdfuse)] {
                // Read-only on both sides: fio only reads.
                let m = FuseMount::start(program, &["-r"], &mountpoint, &uri, &log);
                let r = fio_file(&m.file, size, rw, bs, cfg, dir);
                m.unmount();
                let v = if bs == "1M" { r.bytes_per_sec / 1e6 } else { r.iops };
                if r.ios == 0.0 {
                    panic!("fio through {program} did no I/O");
                }
                if ours {
                    a.push(v);
                    a_bytes.push(r.bytes_per_sec);
                } else {
                    b.push(v);
                }
            }
        }
        let (unit, what) = if bs == "1M" {
            ("MB/s", "throughput")
        } else {
            ("IOPS", "IOPS")
        };
        rows.push(Row {
            what: format!("FUSE, fio {name}, {} ({} MiB): {what}", cfg.fuse_ioengine, size >> 20),
            peer: "nbdfuse".into(),
            ours: median(a),
            theirs: median(b),
            unit,
            better: Better::Higher,
            target: 1.5,
            bytes_per_sec: Some(median(a_bytes)),
        });
    }
    drop(srv);
}
