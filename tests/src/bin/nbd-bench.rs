//! `nbd-bench`: our server and copier against the reference peers, measured
//! side by side in the same run on Unix sockets, printing each figure of
//! ours, of the peer, and their ratio.
//!
//! Run with `cargo run --release -p nbd-tests --bin nbd-bench` (add
//! `-- --quick` for a shorter run, `-- --tls-only` for the TLS rows
//! alone, `-- --flush-only` for the reader-next-to-a-flushing-writer rows
//! alone, `-- --qcow2-only` for the qcow2 rows alone, `-- --copy-only` for
//! the copy rows and the TLS rows (the ones that measure the client),
//! `-- --rbd-only` for the Ceph RBD rows alone. The RBD rows need Ceph and
//! qemu-nbd's rbd driver (`scripts/install-peers.sh --bench`); without them
//! they are left out with a note. The machines are shared and noisy: each
//! figure is the median of several alternating runs (ours, peer, ours,
//! peer, ...), and only ratios measured in the same run mean anything.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbd_tests::{Endpoint, Peer, TempDir, find_program, our_bin, our_bin_with_features, require_peers, run_timeout};

struct Config {
    reps: usize,
    runtime: u32,
    copy_size: u64,
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
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

/// Runs the four fio workloads against two servers, alternating.
fn server_rows(
    label: &str,
    peer_name: &str,
    ours: (&Peer, String),
    theirs: (&Peer, String),
    cfg: &Config,
    dir: &TempDir,
    rows: &mut Vec<Row>,
) {
    prefill(&ours.1, dir);
    prefill(&theirs.1, dir);
    let workloads: [(&str, &str, &str, u32); 3] = [
        ("4 KiB random reads, iodepth 64", "randread", "4k", 64),
        ("4 KiB random writes, iodepth 64", "randwrite", "4k", 64),
        ("1 MiB sequential reads, iodepth 16", "read", "1M", 16),
    ];
    for (name, rw, bs, depth) in workloads {
        let (mut a, mut b, mut a_cpu, mut b_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            for (peer, uri, vals, cpus) in [
                (ours.0, &ours.1, &mut a, &mut a_cpu),
                (theirs.0, &theirs.1, &mut b, &mut b_cpu),
            ] {
                let c0 = cpu_seconds(peer.pid());
                let r = fio(uri, rw, bs, depth, cfg, dir);
                let c1 = cpu_seconds(peer.pid());
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
            what: format!("{label}, fio {name}: {what}"),
            peer: peer_name.to_string(),
            ours: median(a),
            theirs: median(b),
            unit,
            better: Better::Higher,
            target: 1.25,
        });
        if rw == "randread" {
            rows.push(Row {
                what: format!("{label}, fio {name}: server CPU per request"),
                peer: peer_name.to_string(),
                ours: median(a_cpu),
                theirs: median(b_cpu),
                unit: "us",
                better: Better::Lower,
                target: 0.6,
            });
        }
    }
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

/// nbd-serve and qemu-nbd (`--aio=threads`, its default) each on a file on
/// the machine's disk (not tmpfs: `fdatasync` must reach a device), a reader
/// beside a writer that flushes after every write.
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
    let (mut a, mut b, mut a99, mut b99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        let (iops, p99) = reader_next_to_flushing_writer(&unix_uri(&s1), cfg, dir);
        a.push(iops);
        a99.push(p99);
        let (iops, p99) = reader_next_to_flushing_writer(&unix_uri(&s2), cfg, dir);
        b.push(iops);
        b99.push(p99);
    }
    let what = "file on disk, 4 KiB reads QD1 next to 64 KiB writes with fsync";
    rows.push(Row {
        what: format!("{what}: reader IOPS"),
        peer: "qemu-nbd".to_string(),
        ours: median(a),
        theirs: median(b),
        unit: "IOPS",
        better: Better::Higher,
        target: 1.0,
    });
    rows.push(Row {
        what: format!("{what}: reader p99 latency"),
        peer: "qemu-nbd".to_string(),
        ours: median(a99),
        theirs: median(b99),
        unit: "us",
        better: Better::Lower,
        target: 1.0,
    });
    drop(ours);
    drop(qemu);
    let _ = std::fs::remove_file(&f1);
    let _ = std::fs::remove_file(&f2);
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
/// image (on tmpfs, 256 MiB of it allocated first), 4 KiB random reads and
/// writes at queue depth 32. The image can be open in one server at a time
/// (each takes QEMU's write lock), so every run starts its server afresh,
/// alternating ours and qemu-nbd.
fn qcow2_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let img = shm_path(dir, "bench.qcow2");
    let img_s = img.to_str().unwrap_or_default().to_string();
    let o = run_timeout(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img_s, "1G"],
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "qemu-img create failed");
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
    {
        let (mut q, uri) = start(false);
        prefill(&uri, dir);
        stop_gracefully(&mut q);
    }
    for (name, rw) in [
        ("4 KiB random reads, iodepth 32", "randread"),
        ("4 KiB random writes, iodepth 32", "randwrite"),
    ] {
        let (mut a, mut b, mut a_cpu, mut b_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            for ours in [true, false] {
                let (mut peer, uri) = start(ours);
                let c0 = cpu_seconds(peer.pid());
                let r = fio(&uri, rw, "4k", 32, cfg, dir);
                let c1 = cpu_seconds(peer.pid());
                stop_gracefully(&mut peer);
                let (vals, cpus) = if ours {
                    (&mut a, &mut a_cpu)
                } else {
                    (&mut b, &mut b_cpu)
                };
                vals.push(r.iops);
                if r.ios > 0.0 {
                    cpus.push((c1 - c0) * 1e6 / r.ios);
                }
            }
        }
        rows.push(Row {
            what: format!("nbd-serve IMG.qcow2 (tmpfs), fio {name}: IOPS"),
            peer: "qemu-nbd -f qcow2".to_string(),
            ours: median(a),
            theirs: median(b),
            unit: "IOPS",
            better: Better::Higher,
            target: 1.0,
        });
        rows.push(Row {
            what: format!("nbd-serve IMG.qcow2 (tmpfs), fio {name}: server CPU per request"),
            peer: "qemu-nbd -f qcow2".to_string(),
            ours: median(a_cpu),
            theirs: median(b_cpu),
            unit: "us",
            better: Better::Lower,
            target: 1.0,
        });
    }
    let _ = std::fs::remove_file(&img);
}

fn time_cmd(cmd: &str, args: &[&str]) -> f64 {
    let t = Instant::now();
    let o = run_timeout(cmd, args, Duration::from_secs(600));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.elapsed().as_secs_f64()
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
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&src).expect("create random image");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..(size >> 20) {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).expect("write random image");
        }
    }
    let kit_uri = unix_uri(&sock);
    time_cmd("nbdcopy", &[src.to_str().unwrap_or_default(), &kit_uri]);
    let _ = std::fs::remove_file(&src);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        a.push(size as f64 / 1e6 / time_cmd(&ours, &[&kit_uri, "null:"]));
        b.push(size as f64 / 1e6 / time_cmd("nbdcopy", &[&kit_uri, "null:"]));
    }
    rows.push(Row {
        what: format!("copy {} MiB of random data, nbdkit memory to null:", size >> 20),
        peer: "nbdcopy".into(),
        ours: median(a),
        theirs: median(b),
        unit: "MB/s",
        better: Better::Higher,
        target: 1.25,
    });
    drop(kit);

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
    });
}

/// TLS rows: nbd-serve against nbdkit, both with `--tls=require`, under
/// fio (libnbd over GnuTLS); and our nbd-copy (rustls) against nbdcopy
/// (GnuTLS) reading from nbdkit over TLS. A failure here prints a note and
/// leaves the other rows alone.
fn tls_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let run = std::panic::AssertUnwindSafe(|| {
        let mut new = Vec::new();
        tls_rows_inner(cfg, dir, &mut new);
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
            eprintln!("nbd-bench: note: the TLS rows failed and are left out: {why}");
        }
    }
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
    });
}

/// RBD rows: nbd-serve (feature rbd) against qemu-nbd's rbd driver, each
/// serving its own 1 GiB image of one throwaway cluster
/// (scripts/ceph-cluster.sh), 4 KiB random reads and writes at QD32. A
/// failure prints a note and leaves the other rows alone.
fn rbd_rows(cfg: &Config, dir: &TempDir, rows: &mut Vec<Row>) {
    let missing: Vec<&str> = ["ceph-mon", "ceph-osd", "rbd"]
        .into_iter()
        .filter(|c| find_program(c).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "nbd-bench: note: the RBD rows are left out: {} missing (scripts/install-peers.sh)",
            missing.join(", ")
        );
        return;
    }
    let run = std::panic::AssertUnwindSafe(|| {
        let mut new = Vec::new();
        rbd_rows_inner(cfg, dir, &mut new);
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
            eprintln!("nbd-bench: note: the RBD rows failed and are left out: {why}");
        }
    }
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
    });
    drop(ceph);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Config {
            reps: 1,
            runtime: 2,
            copy_size: 256 << 20,
        }
    } else {
        Config {
            reps: 3,
            runtime: 4,
            copy_size: 1 << 30,
        }
    };
    if !require_peers(&["nbdkit", "qemu-nbd", "qemu-img", "nbdcopy", "fio"]) {
        eprintln!("nbd-bench: peers missing; run scripts/install-peers.sh");
        std::process::exit(1);
    }
    let dir = TempDir::new();
    let serve = our_bin("nbd-serve");
    let mut rows = Vec::new();
    if std::env::args().any(|a| a == "--qcow2-only") {
        qcow2_rows(&cfg, &dir, &mut rows);
        print_rows(&rows);
        return;
    }
    if std::env::args().any(|a| a == "--tls-only") {
        tls_rows(&cfg, &dir, &mut rows);
        print_rows(&rows);
        return;
    }
    if std::env::args().any(|a| a == "--flush-only") {
        flushing_writer_rows(&cfg, &dir, &mut rows);
        print_rows(&rows);
        return;
    }
    if std::env::args().any(|a| a == "--copy-only") {
        copy_rows(&cfg, &dir, &mut rows);
        tls_rows(&cfg, &dir, &mut rows);
        print_rows(&rows);
        return;
    }
    if std::env::args().any(|a| a == "--rbd-only") {
        rbd_rows(&cfg, &dir, &mut rows);
        print_rows(&rows);
        return;
    }

    // Memory: nbd-serve --memory against nbdkit's memory plugin.
    {
        let s1 = dir.socket_path("ours");
        let s2 = dir.socket_path("kit");
        let ours = Peer::start(
            &dir,
            &serve,
            &["--socket", s1.to_str().unwrap_or_default(), "--memory", "1G"],
            Endpoint::Unix(s1.clone()),
        );
        let kit = Peer::start(
            &dir,
            "nbdkit",
            &["-f", "-U", s2.to_str().unwrap_or_default(), "memory", "1G"],
            Endpoint::Unix(s2.clone()),
        );
        server_rows(
            "nbd-serve --memory",
            "nbdkit memory",
            (&ours, unix_uri(&s1)),
            (&kit, unix_uri(&s2)),
            &cfg,
            &dir,
            &mut rows,
        );
    }
    // Files on tmpfs: nbd-serve FILE against qemu-nbd on the same kind of file.
    {
        let f1 = shm_path(&dir, "ours.img");
        let f2 = shm_path(&dir, "qemu.img");
        for f in [&f1, &f2] {
            std::fs::File::create(f)
                .and_then(|h| h.set_len(1 << 30))
                .expect("create image");
        }
        let s1 = dir.socket_path("ours");
        let s2 = dir.socket_path("qemu");
        let ours = Peer::start(
            &dir,
            &serve,
            &[
                "--socket",
                s1.to_str().unwrap_or_default(),
                f1.to_str().unwrap_or_default(),
            ],
            Endpoint::Unix(s1.clone()),
        );
        let qemu = Peer::start(
            &dir,
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
        );
        server_rows(
            "nbd-serve FILE (tmpfs)",
            "qemu-nbd",
            (&ours, unix_uri(&s1)),
            (&qemu, unix_uri(&s2)),
            &cfg,
            &dir,
            &mut rows,
        );
        drop(ours);
        drop(qemu);
        let _ = std::fs::remove_file(&f1);
        let _ = std::fs::remove_file(&f2);
    }
    flushing_writer_rows(&cfg, &dir, &mut rows);
    qcow2_rows(&cfg, &dir, &mut rows);
    copy_rows(&cfg, &dir, &mut rows);
    idle_memory_rows(&dir, &mut rows);
    tls_rows(&cfg, &dir, &mut rows);
    rbd_rows(&cfg, &dir, &mut rows);
    print_rows(&rows);
}

fn print_rows(rows: &[Row]) {
    println!();
    println!(
        "{:<72} {:<18} {:>12} {:>12} {:>8} {:>8}  met",
        "what", "peer", "ours", "peer", "ratio", "target"
    );
    for r in rows {
        let target = match r.better {
            Better::Higher => format!(">={:.2}", r.target),
            Better::Lower => format!("<={:.2}", r.target),
        };
        println!(
            "{:<72} {:<18} {:>9.1} {:<2} {:>9.1} {:<2} {:>8.3} {:>8}  {}",
            r.what,
            r.peer,
            r.ours,
            short_unit(r.unit),
            r.theirs,
            short_unit(r.unit),
            r.ratio(),
            target,
            if r.met() { "yes" } else { "NO" }
        );
    }
    println!(
        "\nunits: IOPS = I/O per second, MB/s = 10^6 bytes per second, us = CPU microseconds per request, KiB = resident memory"
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
