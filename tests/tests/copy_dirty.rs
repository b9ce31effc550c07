//! `nbd-copy --dirty-bitmap=NAME`: incremental backup copies of what a
//! qcow2 persistent dirty bitmap (served as `qemu:dirty-bitmap:NAME` by
//! `qemu-nbd -B` and `nbd-serve -B`) marks dirty, onto the previous full
//! copy; nothing outside the dirty extents is written, and failures
//! leave the destination as it was.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nbd_tests::*;

const MIB: u64 = 1 << 20;
/// The region of the destination altered after the full copy, outside
/// every dirty extent: an incremental copy must leave it alone.
const ALTERED: u64 = 32 * MIB;
const ALTERED_LEN: usize = 4096;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn peers() -> bool {
    require_peers(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"])
}

/// Starts `nbd-serve --socket SOCKET ARGS...`.
fn serve(dir: &TempDir, name: &str, args: &[&str]) -> Peer {
    let socket = dir.socket_path(name);
    let mut full = vec!["--socket", s(&socket)];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket.clone()))
}

/// src.qcow2 (64 MiB, 8 MiB of data) and dst.raw, its full copy made with
/// nbd-copy; then the bitmap b0 is added and guest-style writes (data,
/// zeroes, a discard, an unaligned write at the end) recorded in it, and
/// the destination altered at [`ALTERED`], which is not dirty.
fn prepare(dir: &TempDir) -> (PathBuf, PathBuf) {
    let src = dir.join("src.qcow2");
    let dst = dir.join("dst.raw");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&src), "64M"]);
    run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 8M", s(&src)]);
    {
        let q = qemu_nbd(dir, &["-r", "-f", "qcow2", s(&src)]);
        run_ok(&our_bin("nbd-copy"), &[&q.uri(""), s(&dst)]);
    }
    run_ok("qemu-img", &["bitmap", "--add", s(&src), "b0"]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -z 20M 1M",
            "-c",
            "discard 4M 64k",
            "-c",
            "write -P 3 63M 100k",
            s(&src),
        ],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
    f.write_all_at(&[0xee; ALTERED_LEN], ALTERED).unwrap();
    (src, dst)
}

/// The source's contents, through qemu-img.
fn source_image(dir: &TempDir, src: &Path) -> Vec<u8> {
    let raw = dir.join("src-contents.raw");
    run_ok("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", s(src), s(&raw)]);
    std::fs::read(&raw).unwrap()
}

/// The dirty extents of b0 as `nbdinfo --map` reports them at `uri`.
fn dirty_extents(uri: &str) -> Vec<(u64, u64)> {
    let map = run_ok("nbdinfo", &["--map=qemu:dirty-bitmap:b0", uri]);
    map.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (off, len, flags) = (
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse::<u64>().ok()?,
            );
            (flags & 1 != 0).then_some((off, len))
        })
        .collect()
}

/// The destination equals the source everywhere but at [`ALTERED`], still
/// 0xee; every dirty extent among it. Then, that region restored,
/// `qemu-img compare` finds them identical.
fn check(dir: &TempDir, src: &Path, dst: &Path, dirty: &[(u64, u64)]) {
    let want = source_image(dir, src);
    let got = std::fs::read(dst).unwrap();
    assert_eq!(got.len(), want.len(), "the destination was resized");
    for &(off, len) in dirty {
        let r = off as usize..(off + len) as usize;
        assert!(got[r.clone()] == want[r], "dirty extent {off}+{len} differs");
    }
    let a = ALTERED as usize..ALTERED as usize + ALTERED_LEN;
    assert!(
        got[a.clone()].iter().all(|&b| b == 0xee),
        "the non-dirty region at {ALTERED} was written"
    );
    let mut restored = got.clone();
    restored[a.clone()].copy_from_slice(&want[a.clone()]);
    if let Some(i) = restored.iter().zip(&want).position(|(x, y)| x != y) {
        panic!("the destination differs from the source at {i}");
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(dst)
        .unwrap()
        .write_all_at(&want[a], ALTERED)
        .unwrap();
    let out = run_ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", s(src), s(dst)]);
    assert!(out.contains("identical"), "{out}");
}

#[test]
fn from_qemu_nbd_onto_the_previous_full_copy() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let (src, dst) = prepare(&dir);
    let q = qemu_nbd(&dir, &["-r", "-f", "qcow2", "-B", "b0", s(&src)]);
    let dirty = dirty_extents(&q.uri(""));
    assert!(dirty.len() >= 4, "{dirty:?}");
    run_ok(
        &our_bin("nbd-copy"),
        &[
            "--dirty-bitmap=b0",
            "-C",
            "2",
            "-R",
            "4",
            "--request-size",
            "64K",
            "--flush",
            &q.uri(""),
            s(&dst),
        ],
    );
    drop(q);
    check(&dir, &src, &dst, &dirty);
}

#[test]
fn from_nbd_serve_onto_files_and_nbd_exports() {
    if !peers() {
        return;
    }
    let copy = our_bin("nbd-copy");
    // nbd-serve as the source, a file as the destination; the full
    // context name as NAME.
    {
        let dir = TempDir::new();
        let (src, dst) = prepare(&dir);
        let ours = serve(&dir, "src", &["-r", "-B", "b0", s(&src)]);
        let dirty = dirty_extents(&ours.uri(""));
        run_ok(&copy, &["--dirty-bitmap=qemu:dirty-bitmap:b0", &ours.uri(""), s(&dst)]);
        drop(ours);
        check(&dir, &src, &dst, &dirty);
    }
    // nbd-serve as the source, nbd-serve serving the file as the
    // destination.
    {
        let dir = TempDir::new();
        let (src, dst) = prepare(&dir);
        let ours = serve(&dir, "src", &["-r", "-B", "b0", s(&src)]);
        let dirty = dirty_extents(&ours.uri(""));
        let target = serve(&dir, "dst", &["-f", "raw", s(&dst)]);
        run_ok(&copy, &["--dirty-bitmap=b0", "--flush", &ours.uri(""), &target.uri("")]);
        drop(target);
        drop(ours);
        check(&dir, &src, &dst, &dirty);
    }
    // qemu-nbd run as [ CMD ARGS ... ], without the allocation map.
    {
        let dir = TempDir::new();
        let (src, dst) = prepare(&dir);
        let dirty = {
            let q = qemu_nbd(&dir, &["-r", "-f", "qcow2", "-B", "b0", s(&src)]);
            dirty_extents(&q.uri(""))
        };
        run_ok(
            &copy,
            &[
                "--dirty-bitmap=b0",
                "--no-extents",
                "--",
                "[",
                "qemu-nbd",
                "-r",
                "-f",
                "qcow2",
                "-B",
                "b0",
                s(&src),
                "]",
                s(&dst),
            ],
        );
        check(&dir, &src, &dst, &dirty);
    }
}

#[test]
fn progress_counts_the_dirty_bytes() {
    if !peers() || !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let (src, _) = prepare(&dir);
    let q = qemu_nbd(&dir, &["-r", "-f", "qcow2", "-B", "b0", s(&src)]);
    let dirty = dirty_extents(&q.uri(""));
    let total: u64 = dirty.iter().map(|e| e.1).sum();
    assert!(total > 0 && total < 4 * MIB, "{dirty:?}");
    // A slow destination, one request at a time: every step is seen.
    let slow = nbdkit(&dir, &["--filter=delay", "memory", "64M", "wdelay=250ms"]);
    let out = run_ok(
        &our_bin("nbd-copy"),
        &[
            "--dirty-bitmap=b0",
            "--synchronous",
            "--request-size=64K",
            "--progress=1",
            &q.uri(""),
            &slow.uri(""),
        ],
    );
    let seen: Vec<u64> = out
        .lines()
        .map(|l| {
            l.strip_suffix("/100")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{out}"))
        })
        .collect();
    assert_eq!(seen.first(), Some(&0), "{out}");
    assert_eq!(seen.last(), Some(&100), "{out}");
    // Each step ends a piece: 64 KiB multiples (the bitmap's granularity)
    // of the dirty bytes; against the whole 64 MiB it would never pass 2%.
    let steps: Vec<u64> = (0..=total / 65536).map(|k| k * 65536 * 100 / total).collect();
    let middle: Vec<u64> = seen.iter().copied().filter(|&p| p != 0 && p != 100).collect();
    assert!(middle.iter().any(|&p| p >= 5), "{out}");
    for p in &middle {
        assert!(steps.contains(p), "{p}% is no step of {total} dirty bytes: {out}");
    }
    // The bar on stderr ends at 100% too.
    let out = run(
        &our_bin("nbd-copy"),
        &["--dirty-bitmap=b0", "--progress", &q.uri(""), &slow.uri("")],
    );
    assert!(out.status.success(), "{}", describe_output(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.trim_end().lines().last().unwrap_or("").contains("100%"), "{err}");
}

#[test]
fn failures_leave_the_destination_alone() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let (src, dst) = prepare(&dir);
    let copy = our_bin("nbd-copy");
    let q = qemu_nbd(&dir, &["-r", "-f", "qcow2", "-B", "b0", s(&src)]);
    let before = std::fs::read(&dst).unwrap();
    let small = dir.join("small.raw");
    std::fs::write(&small, vec![7u8; 32 << 20]).unwrap();
    let small_before = std::fs::read(&small).unwrap();
    let absent = dir.join("absent.raw");
    let small_nbd = serve(&dir, "small", &["--memory", "32M"]);
    let uri = q.uri("");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--dirty-bitmap=nope".into(), uri.clone(), s(&dst).into()],
            "no dirty bitmap \"nope\"",
        ),
        (
            vec!["--dirty-bitmap=b0".into(), uri.clone(), s(&small).into()],
            "smaller than the source",
        ),
        (
            vec!["--dirty-bitmap=b0".into(), uri.clone(), small_nbd.uri("")],
            "smaller than the source",
        ),
        (
            vec!["--dirty-bitmap=b0".into(), uri.clone(), s(&absent).into()],
            "does not exist",
        ),
        (vec!["--dirty-bitmap=b0".into(), uri.clone(), "-".into()], "not -"),
        (
            vec![
                "--dirty-bitmap=b0".into(),
                "--destination-is-zero".into(),
                uri.clone(),
                s(&dst).into(),
            ],
            "--destination-is-zero",
        ),
        (
            vec!["--dirty-bitmap=b0".into(), s(&small).into(), s(&dst).into()],
            "must be an NBD export",
        ),
    ];
    for (args, expect) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&copy, &a);
        assert_eq!(out.status.code(), Some(1), "{a:?}: {}", describe_output(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("nbd-copy: "), "{a:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{a:?}: one line: {err}");
        assert!(err.contains(expect), "{a:?}: expected {expect:?} in {err}");
        assert!(out.stdout.is_empty(), "{a:?}: wrote to stdout");
        assert!(std::fs::read(&dst).unwrap() == before, "{a:?}: the destination changed");
        assert!(
            std::fs::read(&small).unwrap() == small_before,
            "{a:?}: small.raw changed"
        );
        assert!(!absent.exists(), "{a:?}: a missing destination was created");
    }
    // The unknown bitmap is named with the export.
    let out = run(&copy, &["--dirty-bitmap=nope", &uri, s(&dst)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("export") && err.contains("qemu:dirty-bitmap:nope"),
        "{err}"
    );
}
