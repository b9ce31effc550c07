//! qcow2 images on a web server (`nbd_storage::image::remote` over
//! `nbd_storage::http::HttpStorage`), against nginx: `nbd-copy URL` and
//! `nbd-serve URL` give the guest disk of a qcow2 chain whose backing file
//! is named relative to the overlay, as `qemu-img convert` of the same
//! chain on disk does; the served map shows the holes and zero clusters
//! as a local image's does; `-f raw` gives the file's own bytes; broken
//! backing names and formats that cannot be read are clear errors.

use std::fs;
use std::path::Path;

use nbd_tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Virtual size of the chain: 5 MiB and 4 KiB, not a multiple of the
/// 64 KiB cluster.
const SIZE: &str = "5246976";

/// A chain in the web root: `base.qcow2` (data at 0 and 3 MiB) under
/// `overlay.qcow2` (backing name `base.qcow2`, relative; data over part
/// of the base, a zero cluster over base data, data in the last partial
/// cluster; 2 MiB to 3 MiB unallocated everywhere). Returns the guest
/// disk as `qemu-img convert` reads it from the files.
fn chain(dir: &TempDir, root: &Path) -> Vec<u8> {
    let base = root.join("base.qcow2");
    let overlay = root.join("overlay.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), SIZE]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 3M 512k",
            s(&base),
        ],
    );
    create_qcow2_overlay(&overlay, "base.qcow2", "qcow2");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 512k 1M",
            "-c",
            "write -z 3M 128k",
            "-c",
            "write -P 0x44 5M 4096",
            s(&overlay),
        ],
    );
    let reference = dir.join("reference.raw");
    run_ok("qemu-img", &["convert", "-O", "raw", s(&overlay), s(&reference)]);
    let disk = fs::read(&reference).unwrap();
    assert_eq!(disk.len().to_string(), SIZE, "qemu-img convert: the guest disk's size");
    assert!(disk[..(1 << 20)].iter().any(|&b| b != 0), "the chain holds no data");
    disk
}

/// Starts `nbd-serve --socket SOCKET ARGS...` on the socket `name`.
fn serve(dir: &TempDir, name: &str, args: &[&str]) -> Peer {
    let socket = dir.socket_path(name);
    let mut full = vec!["--socket", s(&socket)];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket.clone()))
}

/// `nbdinfo --map=CONTEXT URI`, as merged (offset, length, type) runs.
fn map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok("nbdinfo", &[&format!("--map={context}"), uri]);
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let run = (
            f[0].parse::<u64>().unwrap(),
            f[1].parse::<u64>().unwrap(),
            f[2].parse::<u64>().unwrap(),
        );
        match runs.last_mut() {
            Some(last) if last.2 == run.2 && last.0 + last.1 == run.0 => last.1 += run.1,
            _ => runs.push(run),
        }
    }
    assert!(!runs.is_empty(), "nbdinfo --map {uri} printed nothing:\n{out}");
    runs
}

#[test]
fn nbd_copy_reads_a_qcow2_chain_over_http() {
    if !require_peers(&["nginx", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let w = nginx(&dir);
    let disk = chain(&dir, &w.root);
    let url = w.url("/overlay.qcow2");
    let out = dir.join("out.raw");
    let r = run(&our_bin("nbd-copy"), &[&url, s(&out)]);
    assert!(r.status.success(), "{}\n{}", describe_output(&r), w.error_log());
    assert!(
        fs::read(&out).unwrap() == disk,
        "nbd-copy read another disk than qemu-img convert"
    );
    let r = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            s(&out),
            s(&w.root.join("overlay.qcow2")),
        ],
    );
    assert!(r.status.success(), "qemu-img compare: {}", describe_output(&r));
    // -f raw copies the image file's own bytes.
    let bytes = dir.join("bytes.raw");
    let r = run(&our_bin("nbd-copy"), &["-f", "raw", &url, s(&bytes)]);
    assert!(r.status.success(), "{}", describe_output(&r));
    assert!(
        fs::read(&bytes).unwrap() == fs::read(w.root.join("overlay.qcow2")).unwrap(),
        "nbd-copy -f raw did not copy the file's bytes"
    );
}

#[test]
fn nbd_serve_serves_a_qcow2_chain_over_http() {
    if !require_peers(&["nginx", "qemu-img", "qemu-io", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let w = nginx(&dir);
    let disk = chain(&dir, &w.root);
    let url = w.url("/overlay.qcow2");
    let remote = serve(&dir, "remote", &["-A", &url]);
    let uri = remote.uri("");
    let out = dir.join("nbdcopy.raw");
    let r = run("nbdcopy", &[&uri, s(&out)]);
    assert!(r.status.success(), "{}\n{}", describe_output(&r), remote.stderr());
    assert!(
        fs::read(&out).unwrap() == disk,
        "nbdcopy read another disk than qemu-img convert"
    );
    let reference = dir.join("reference.raw");
    let r = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s(&reference), &uri]);
    assert!(r.status.success(), "qemu-img compare: {}", describe_output(&r));
    // The map is the one nbd-serve gives for the same chain on disk, and
    // it has holes (the unallocated middle, the zero cluster).
    let local = serve(&dir, "local", &["-r", "-A", s(&w.root.join("overlay.qcow2"))]);
    let remote_map = map(&uri, "base:allocation");
    assert_eq!(
        remote_map,
        map(&local.uri(""), "base:allocation"),
        "nbdinfo --map: over HTTP and on disk"
    );
    let depth = map(&uri, "qemu:allocation-depth");
    assert_eq!(
        depth,
        map(&local.uri(""), "qemu:allocation-depth"),
        "nbdinfo --map=qemu:allocation-depth: over HTTP and on disk"
    );
    assert!(
        depth.iter().any(|r| r.2 == 2),
        "no run from the backing file in {depth:?}"
    );
    let holes: Vec<_> = remote_map.iter().filter(|r| r.2 == 3).collect();
    assert!(
        holes.iter().any(|r| r.0 <= 2 << 20 && r.0 + r.1 >= 3 << 20),
        "no hole over 2M..3M in {remote_map:?}"
    );
    assert!(
        holes
            .iter()
            .any(|r| r.0 <= 3 << 20 && r.0 + r.1 >= (3 << 20) + (128 << 10)),
        "the zero cluster at 3M is no hole in {remote_map:?}"
    );
    // Read-only: nbdcopy cannot write to it.
    let r = run("nbdcopy", &[s(&reference), &uri]);
    assert!(
        !r.status.success(),
        "nbdcopy wrote to a read-only export: {}",
        describe_output(&r)
    );
    drop(remote);
    // Snapshot mode: writes go to a temporary overlay, and read back.
    let snapshot = serve(&dir, "snapshot", &["-s", &url]);
    let r = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x55 2M 64k",
            "-c",
            "read -P 0x55 2M 64k",
            "-c",
            "read -P 0x11 0 512k",
            &snapshot.uri(""),
        ],
    );
    let t = describe_output(&r);
    assert!(
        r.status.success() && !t.contains("fail") && !t.contains("Pattern verification"),
        "qemu-io -s: {t}"
    );
    drop(snapshot);
    // -f raw serves the file's own bytes.
    let raw = serve(&dir, "raw", &["-f", "raw", &url]);
    let out = dir.join("bytes.raw");
    let r = run("nbdcopy", &[&raw.uri(""), s(&out)]);
    assert!(r.status.success(), "{}\n{}", describe_output(&r), raw.stderr());
    assert!(
        fs::read(&out).unwrap() == fs::read(w.root.join("overlay.qcow2")).unwrap(),
        "nbd-serve -f raw did not serve the file's bytes"
    );
}

#[test]
fn broken_backing_names_and_unreadable_formats_are_clear_errors() {
    if !require_peers(&["nginx", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new();
    let w = nginx(&dir);
    let create = |name: &str, backing: &str| {
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                backing,
                "-F",
                "qcow2",
                s(&w.root.join(name)),
                "1M",
            ],
        );
    };
    create("missing.qcow2", "gone.qcow2");
    create("absolute.qcow2", "/nowhere/base.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", s(&w.root.join("disk.vmdk")), "1M"],
    );
    let cases = [
        ("/missing.qcow2", "gone.qcow2"),
        ("/absolute.qcow2", "a local absolute path"),
        ("/disk.vmdk", "looks like vmdk"),
    ];
    for (path, expected) in cases {
        let url = w.url(path);
        let r = run(&our_bin("nbd-copy"), &[&url, s(&dir.join("out.raw"))]);
        let t = describe_output(&r);
        assert_eq!(r.status.code(), Some(1), "nbd-copy {path}: {t}");
        assert!(t.contains(&url) && t.contains(expected), "nbd-copy {path}: {t}");
        let socket = dir.socket_path("refused");
        let r = run(&our_bin("nbd-serve"), &["--socket", s(&socket), &url]);
        let t = describe_output(&r);
        assert_eq!(r.status.code(), Some(1), "nbd-serve {path}: {t}");
        assert!(t.contains(&url) && t.contains(expected), "nbd-serve {path}: {t}");
    }
    // -f raw reads what cannot be read as an image: its bytes.
    let out = dir.join("vmdk.raw");
    let r = run(&our_bin("nbd-copy"), &["-f", "raw", &w.url("/disk.vmdk"), s(&out)]);
    assert!(r.status.success(), "{}", describe_output(&r));
    assert!(fs::read(&out).unwrap() == fs::read(w.root.join("disk.vmdk")).unwrap());
}
