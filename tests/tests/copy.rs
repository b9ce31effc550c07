//! `nbd-copy` end to end: files, NBD exports (ours and nbdkit), null:,
//! sparseness, and failures that must not pass for success.

use std::os::unix::fs::{FileExt, MetadataExt};

use nbd_tests::*;

fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let sock = dir.socket_path("serve");
    let mut full = vec!["--socket", sock.to_str().unwrap()];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(sock.clone()))
}

/// A sparse file: `size` bytes, with data blocks of 1 MiB at `at` (MiB).
fn sparse_file(dir: &TempDir, name: &str, size: u64, at: &[u64]) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut image = vec![0u8; size as usize];
    for (i, &mib) in at.iter().enumerate() {
        let data = pattern(1 << 20, i as u64 + 1);
        f.write_all_at(&data, mib << 20).unwrap();
        image[(mib << 20) as usize..((mib + 1) << 20) as usize].copy_from_slice(&data);
    }
    (path, image)
}

#[test]
fn file_to_nbd_to_file_keeps_data_and_holes() {
    let dir = TempDir::new();
    let copy = our_bin("nbd-copy");
    let (src, image) = sparse_file(&dir, "src.img", 64 << 20, &[1, 7, 30, 63]);
    let peer = serve(&dir, &["--memory", "64M"]);
    let uri = peer.uri("");
    run_ok(&copy, &[src.to_str().unwrap(), &uri]);
    let out = dir.join("out.img");
    run_ok(&copy, &["--progress", &uri, out.to_str().unwrap()]);
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), image.len());
    assert!(back == image, "copied image differs");
    // Holes stayed holes: only about the 4 MiB of data is allocated.
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated <= 8 << 20,
        "destination not sparse: {allocated} bytes allocated"
    );
    // The server's map shows the holes too (zeroes were never written).
    let map = run_ok("nbdinfo", &["--map", &uri]);
    assert!(map.contains("hole,zero"), "{map}");
}

#[test]
fn nbd_to_nbd_between_nbdkit_and_ours_with_multi_conn() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let copy = our_bin("nbd-copy");
    let kit_sock = dir.socket_path("kit");
    let kit = Peer::start(
        &dir,
        "nbdkit",
        &["-f", "-U", kit_sock.to_str().unwrap(), "memory", "32M"],
        Endpoint::Unix(kit_sock.clone()),
    );
    let data = pattern(32 << 20, 42);
    let src = dir.join("src.img");
    std::fs::write(&src, &data).unwrap();
    run_ok(&copy, &["-C", "4", "-R", "16", src.to_str().unwrap(), &kit.uri("")]);
    let ours = serve(&dir, &["--memory", "32M"]);
    run_ok(
        &copy,
        &[
            "-C",
            "4",
            "--request-size",
            "1M",
            &kit.uri(""),
            &ours.uri(""),
            "--flush",
        ],
    );
    let out = dir.join("out.img");
    run_ok("nbdcopy", &[&ours.uri(""), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data, "nbd to nbd copy differs");
    // null: reads everything and writes nothing.
    run_ok(&copy, &[&ours.uri(""), "null:"]);
}

#[test]
fn failures_exit_non_zero_with_one_clear_line() {
    let dir = TempDir::new();
    let copy = our_bin("nbd-copy");
    let (src, _) = sparse_file(&dir, "src.img", 8 << 20, &[2]);
    let small = serve(&dir, &["--memory", "4M"]);
    let missing = format!("nbd+unix:///?socket={}", dir.join("none.sock").display());
    let ro = serve(&dir, &["--memory", "8M", "-r"]);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![src.display().to_string(), small.uri("")],
            "smaller than the source",
        ),
        (vec![src.display().to_string(), missing.clone()], "No such file"),
        (vec![src.display().to_string(), ro.uri("")], "read-only"),
        (vec!["null:".into(), src.display().to_string()], "destination"),
        (
            vec![dir.join("absent.img").display().to_string(), "null:".into()],
            "No such file",
        ),
        (vec![src.display().to_string(), "nbd://[::1".into()], "invalid"),
    ];
    for (args, expect) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&copy, &a);
        assert!(!out.status.success(), "{a:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("nbd-copy: "), "{a:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{a:?}: one line: {err}");
        assert!(
            err.to_lowercase().contains(&expect.to_lowercase()),
            "{a:?}: expected {expect:?} in {err}"
        );
    }
    // A source that fails half way: never a partial copy reported as success
    // (a quarter of its 64 reads fail: all succeed once in 10^8 runs).
    if require_peer("nbdkit") {
        let sock = dir.socket_path("err");
        let bad = Peer::start(
            &dir,
            "nbdkit",
            &[
                "-f",
                "-U",
                sock.to_str().unwrap(),
                "--filter=error",
                "pattern",
                "16M",
                "error-pread=EIO",
                "error-pread-rate=25%",
            ],
            Endpoint::Unix(sock.clone()),
        );
        let out = run(&copy, &[&bad.uri(""), dir.join("partial.img").to_str().unwrap()]);
        assert!(!out.status.success(), "a failing source must fail the copy");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Input/output error") || err.contains("NBD_EIO"), "{err}");
    }
}
