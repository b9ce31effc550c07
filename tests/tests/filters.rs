//! `nbd-serve --filter`: each filter against nbdkit's filter of the same
//! name with the same parameters, observed through qemu-io and nbdcopy:
//! the same data, the same errors, at least the same delays, and `cow`
//! leaving the file below unchanged.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nbd_tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Starts `nbd-serve --socket SOCKET ARGS...`.
fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbd-serve");
    let mut full = vec!["--socket", s(&socket)];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket.clone()))
}

/// Runs qemu-io commands on `uri`: (success, stdout and stderr).
fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(uri);
    let out = run_timeout("qemu-io", &args, Duration::from_secs(60));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io exits 0 even when a command failed: its output says.
    let ok = out.status.success() && !text.contains("failed:");
    (ok, text)
}

/// The ways the two servers are started with the same filter stack:
/// (ours, nbdkit's) arguments for `filters` over `file`.
fn both(dir: &TempDir, ours: &[&str], theirs: &[&str], file: &Path) -> [(String, Peer); 2] {
    let mut a: Vec<&str> = ours.to_vec();
    a.push(s(file));
    let us = serve(dir, &a);
    let mut b: Vec<&str> = theirs.to_vec();
    let file_arg = format!("file={}", s(file));
    b.insert(
        b.iter().position(|x| !x.starts_with("--filter")).unwrap_or(b.len()),
        "file",
    );
    b.insert(b.iter().position(|x| *x == "file").unwrap() + 1, &file_arg);
    let them = nbdkit(dir, &b);
    [("nbd-serve".into(), us), ("nbdkit".into(), them)]
}

#[test]
fn cow_writes_stay_in_the_overlay() {
    if !require_peers(&["qemu-io", "nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.join("disk.img");
    let original = pattern(4 << 20, 7);
    fs::write(&file, &original).unwrap();
    let mut expected = original.clone();
    expected[65536..65536 + 4096].fill(0xab);
    expected[1 << 20..(1 << 20) + 100_000].fill(0);
    for (who, peer) in both(&dir, &["--filter=cow"], &["--filter=cow"], &file) {
        let uri = peer.uri("");
        let (ok, out) = qemu_io(
            &uri,
            &[
                "write -P 0xab 64k 4k",
                "write -z 1M 100000",
                "read -P 0xab 64k 4k",
                "flush",
            ],
        );
        assert!(ok, "{who}: {out}");
        let copy = dir.join(format!("{who}.raw"));
        run_ok("nbdcopy", &[&uri, s(&copy)]);
        assert!(
            fs::read(&copy).unwrap() == expected,
            "{who}: the export reads back its writes"
        );
        assert!(
            fs::read(&file).unwrap() == original,
            "{who}: the file below is unchanged"
        );
    }
}

#[test]
fn error_fails_what_it_is_told_to() {
    if !require_peers(&["qemu-io", "nbdkit"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.sparse_file("disk.img", 1 << 20);
    let trigger = dir.join("inject");
    // nbdkit's example: writes fail with ENOSPC, reads work; reads fail
    // with EIO only while the trigger file exists.
    let ours = format!(
        "--filter=error:error=ENOSPC,error-pwrite-rate=100%,error-pread-rate=100%,error-pread=EIO,error-pread-file={}",
        s(&trigger)
    );
    let pread_file = format!("error-pread-file={}", s(&trigger));
    let theirs = [
        "--filter=error",
        "error=ENOSPC",
        "error-pwrite-rate=100%",
        "error-pread-rate=100%",
        "error-pread=EIO",
        &pread_file,
    ];
    for (who, peer) in both(&dir, &[&ours], &theirs, &file) {
        let uri = peer.uri("");
        let (ok, out) = qemu_io(&uri, &["write -P 1 0 4k"]);
        assert!(!ok && out.contains("No space left on device"), "{who}: {out}");
        let (ok, out) = qemu_io(&uri, &["read 0 4k"]);
        assert!(ok, "{who}: reads work without the trigger file: {out}");
        fs::write(&trigger, b"").unwrap();
        let (ok, out) = qemu_io(&uri, &["read 0 4k"]);
        assert!(!ok && out.contains("Input/output error"), "{who}: {out}");
        fs::remove_file(&trigger).unwrap();
        let (ok, out) = qemu_io(&uri, &["read 0 4k", "flush"]);
        assert!(ok, "{who}: {out}");
    }
}

#[test]
fn delay_makes_reads_wait() {
    if !require_peers(&["qemu-io", "nbdkit"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.sparse_file("disk.img", 1 << 20);
    for (who, peer) in both(
        &dir,
        &["--filter=delay:rdelay=300ms"],
        &["--filter=delay", "rdelay=300ms"],
        &file,
    ) {
        let uri = peer.uri("");
        let t = Instant::now();
        let (ok, out) = qemu_io(&uri, &["read 0 4k"]);
        assert!(ok, "{who}: {out}");
        assert!(t.elapsed() >= Duration::from_millis(300), "{who}: {:?}", t.elapsed());
    }
}

#[test]
fn retry_rides_out_a_failing_storage() {
    if !require_peers(&["qemu-io", "nbdkit"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.join("disk.img");
    fs::write(&file, pattern(1 << 20, 3)).unwrap();
    let trigger = dir.join("failing");
    let ours = format!("--filter=error:error-rate=100%,error-file={}", s(&trigger));
    let theirs_file = format!("error-file={}", s(&trigger));
    for (who, peer) in both(
        &dir,
        &["--filter=retry:retries=5,retry-delay=1,retry-exponential=no", &ours],
        &[
            "--filter=retry",
            "--filter=error",
            "retries=5",
            "retry-delay=1",
            "retry-exponential=no",
            "error-rate=100%",
            &theirs_file,
        ],
        &file,
    ) {
        let uri = peer.uri("");
        // The storage fails until the trigger goes, 500 ms into the read.
        fs::write(&trigger, b"").unwrap();
        let remover = {
            let trigger = trigger.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                fs::remove_file(trigger).unwrap();
            })
        };
        let t = Instant::now();
        let (ok, out) = qemu_io(&uri, &["read 0 4k"]);
        remover.join().unwrap();
        assert!(ok, "{who}: the retried read succeeds: {out}");
        assert!(t.elapsed() >= Duration::from_millis(500), "{who}: {:?}", t.elapsed());
    }
}

#[test]
fn bad_filters_are_refused() {
    let dir = TempDir::new();
    let file = dir.sparse_file("disk.img", 1 << 20);
    for (filter, says) in [
        ("--filter=bogus", "unknown filter \"bogus\""),
        ("--filter=delay:rdelay=soon", "rdelay"),
        ("--filter=error:colour=red", "colour: unknown parameter"),
        ("--filter=delay:rdelay", "expected NAME[:KEY=VALUE"),
        (
            "--filter=cache:cache=sometimes",
            "expected writeback, writethrough or unsafe",
        ),
        ("--filter=cache:cache-min-block-size=1000", "power of two"),
        ("--filter=readahead:window=1M", "window: unknown parameter"),
    ] {
        let socket = dir.socket_path("refused");
        let out = run(&our_bin("nbd-serve"), &["--socket", s(&socket), filter, s(&file)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{filter}: {err}");
        assert!(err.contains(says), "{filter}: {err}");
    }
}

#[test]
fn cache_and_readahead_read_back_the_file_and_write_back_on_flush() {
    if !require_peers(&["qemu-io", "nbdkit", "nbdcopy", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.join("disk.img");
    let original = pattern(8 << 20, 11);
    fs::write(&file, &original).unwrap();
    let mut expected = original.clone();
    expected[(1 << 20) + 100..(1 << 20) + 100 + 65536].fill(0xcd);
    for (who, peer) in both(
        &dir,
        &["--filter=cache", "--filter=readahead"],
        &["--filter=cache", "--filter=readahead"],
        &file,
    ) {
        fs::write(&file, &original).unwrap();
        let uri = peer.uri("");
        let copy = dir.join(format!("{who}.raw"));
        run_ok("nbdcopy", &[&uri, s(&copy)]);
        assert!(
            fs::read(&copy).unwrap() == original,
            "{who}: nbdcopy reads the file back"
        );
        run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", s(&file), &uri]);
        // A write stays in the cache (writeback) until the flush.
        let (ok, out) = qemu_io(
            &uri,
            &["write -P 0xcd 1048676 64k", "read -P 0xcd 1048676 64k", "flush"],
        );
        assert!(ok, "{who}: {out}");
        assert!(
            fs::read(&file).unwrap() == expected,
            "{who}: the flush wrote the cache back"
        );
        run_ok("nbdcopy", &[&uri, s(&copy)]);
        assert!(
            fs::read(&copy).unwrap() == expected,
            "{who}: the export reads its write back"
        );
    }
}

/// The cache's proof: an `error` filter below the cache fails every read
/// once its trigger file exists; after a first full read, a second one
/// still succeeds with `cache-on-read=true` (every block comes from the
/// cache) and fails without it, with nbd-serve as with nbdkit.
#[test]
fn cache_on_read_serves_what_the_storage_below_no_longer_can() {
    if !require_peers(&["nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.join("disk.img");
    let original = pattern(4 << 20, 5);
    fs::write(&file, &original).unwrap();
    let trigger = dir.join("failing");
    let error_params = format!("error-pread=EIO,error-pread-rate=100%,error-pread-file={}", s(&trigger));
    let nbdkit_error: Vec<String> = error_params.split(',').map(str::to_string).collect();
    for cache_on_read in [true, false] {
        let ours_cache = format!("--filter=cache:cache-on-read={cache_on_read}");
        let ours_error = format!("--filter=error:{error_params}");
        let theirs_cache = format!("cache-on-read={cache_on_read}");
        let mut theirs: Vec<&str> = vec!["--filter=cache", "--filter=error", &theirs_cache];
        theirs.extend(nbdkit_error.iter().map(String::as_str));
        for (who, peer) in both(&dir, &[&ours_cache, &ours_error], &theirs, &file) {
            let uri = peer.uri("");
            let copy = dir.join(format!("{who}-{cache_on_read}.raw"));
            run_ok("nbdcopy", &[&uri, s(&copy)]);
            assert!(fs::read(&copy).unwrap() == original, "{who}: the first read");
            fs::write(&trigger, b"").unwrap();
            fs::remove_file(&copy).unwrap();
            let out = run("nbdcopy", &[&uri, s(&copy)]);
            fs::remove_file(&trigger).unwrap();
            if cache_on_read {
                assert!(
                    out.status.success(),
                    "{who}: the second read comes from the cache: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(fs::read(&copy).unwrap() == original, "{who}: the second read");
            } else {
                assert!(
                    !out.status.success(),
                    "{who}: without cache-on-read the second read reaches the failing storage"
                );
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("Input/output error"), "{who}: {err}");
            }
        }
    }
}
