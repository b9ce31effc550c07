//! `nbd-serve` serving disk images (raw and qcow2, through imago) next to
//! `qemu-nbd -f qcow2` on the same images: the contents (read with nbdcopy,
//! qemu-io and our client), the metadata contexts (`base:allocation`,
//! `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`, read with nbdinfo),
//! writes (checked with `qemu-img check` and `qemu-img compare`), snapshot
//! mode and format probing. The images are made by qemu-img and filled by
//! qemu-io.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbd_blocking::client::Client;
use nbd_tests::*;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Starts `nbd-serve --socket SOCKET ARGS...`.
fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbd-serve");
    let mut full = vec!["--socket".to_string(), s(&socket).to_string()];
    full.extend(args.iter().map(|a| a.to_string()));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket))
}

/// Stops `nbd-serve` as a user would (SIGTERM) and waits for it to exit,
/// so that it flushes its images.
fn stop(peer: &mut Peer) {
    // SAFETY: kill(2) with a pid we started and a valid signal number.
    unsafe { libc::kill(peer.pid() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while peer.is_running() {
        assert!(
            Instant::now() < deadline,
            "nbd-serve did not exit on SIGTERM:\n{}",
            peer.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_img(args: &[&str]) -> String {
    run_ok("qemu-img", args)
}

/// Runs qemu-io commands on an image (`-f FORMAT`) or an NBD URI.
fn qemu_io(target: &[&str], cmds: &[&str]) -> String {
    let mut args: Vec<&str> = target.to_vec();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run_ok("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {args:?}:\n{out}"
    );
    out
}

fn peers() -> bool {
    require_peers(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"])
}

/// The image variants of the read tests, made in `dir`: (name, path).
fn make_images(dir: &TempDir) -> Vec<(&'static str, PathBuf)> {
    let mut v = Vec::new();
    // v3, no backing file: data, a zero cluster, unaligned writes.
    let v3 = dir.join("v3.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&v3), "8M"]);
    qemu_io(
        &["-f", "qcow2", s(&v3)],
        &[
            "write -P 0x11 0 192k",
            "write -P 0x22 1000 3000",
            "write -z 1M 128k",
            "write -P 0x33 3M 4k",
            "write -P 0x44 8380416 8192",
        ],
    );
    v.push(("v3", v3));
    // v2 (compat=0.10).
    let v2 = dir.join("v2.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", s(&v2), "4M"]);
    qemu_io(
        &["-f", "qcow2", s(&v2)],
        &["write -P 0x55 0 100k", "write -P 0x66 2M 64k", "write -z 3M 64k"],
    );
    v.push(("v2", v2));
    // A backing chain: raw base <- qcow2 middle <- qcow2 top (larger).
    let base = dir.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]);
    // Sparse: its last MiB is a hole.
    qemu_io(&["-f", "raw", s(&base)], &["write -P 0x01 0 3M"]);
    let mid = dir.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
        "4M",
    ]);
    qemu_io(
        &["-f", "qcow2", s(&mid)],
        &["write -P 0x02 64k 256k", "write -z 1M 64k", "write -P 0x03 2M 10k"],
    );
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "6M",
    ]);
    qemu_io(
        &["-f", "qcow2", s(&top)],
        &[
            "write -P 0x04 128k 64k",
            "write -P 0x05 1100k 8k",
            "write -z 2M 4k",
            "write -P 0x06 5M 64k",
        ],
    );
    v.push(("backing chain", top));
    // Compressed clusters (qemu-img convert -c).
    let src = dir.join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&src), "2M"]);
    qemu_io(
        &["-f", "raw", s(&src)],
        &[
            "write -P 0x77 0 512k",
            "write -P 0x78 700k 300k",
            "write -P 0x79 1536k 64k",
        ],
    );
    let comp = dir.join("compressed.qcow2");
    qemu_img(&["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", s(&src), s(&comp)]);
    let check = qemu_img(&["check", s(&comp)]);
    assert!(!check.contains(" 0.00% compressed"), "no compressed clusters:\n{check}");
    v.push(("compressed", comp));
    v
}

/// Copies the whole export at `uri` to a file with nbdcopy and returns it.
fn nbdcopy_bytes(dir: &TempDir, uri: &str, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    run_ok("nbdcopy", &[uri, s(&out)]);
    fs::read(&out).unwrap()
}

/// `nbdinfo --map=CONTEXT`, as merged (offset, length, status) runs.
fn map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let text = run_ok("nbdinfo", &[&format!("--map={context}"), uri]);
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (o, l, t) = (
            f[0].parse::<u64>().unwrap(),
            f[1].parse::<u64>().unwrap(),
            f[2].parse::<u64>().unwrap(),
        );
        match runs.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => runs.push((o, l, t)),
        }
    }
    assert!(
        !runs.is_empty(),
        "nbdinfo --map={context} {uri} printed nothing:\n{text}"
    );
    runs
}

fn read_all(uri: &str) -> Vec<u8> {
    let mut c = Client::connect(uri).unwrap();
    let size = c.size() as usize;
    let mut buf = vec![0u8; size];
    for (i, chunk) in buf.chunks_mut(MIB as usize).enumerate() {
        c.read(chunk, i as u64 * MIB).unwrap();
    }
    c.disconnect().unwrap();
    buf
}

#[test]
fn qcow2_images_read_like_qemu_nbd() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    for (name, img) in make_images(&dir) {
        // Both read-only at once: QEMU's locks let readers share.
        let ours = serve(&dir, &["-r", "-A", s(&img)]);
        let qemu = qemu_nbd(&dir, &["-r", "-A", "-f", "qcow2", s(&img)]);
        let (ou, qu) = (ours.uri(""), qemu.uri(""));
        let expect = nbdcopy_bytes(&dir, &qu, "qemu.out");
        let got = nbdcopy_bytes(&dir, &ou, "ours.out");
        assert_eq!(got.len(), expect.len(), "{name}: size");
        assert!(got == expect, "{name}: nbdcopy from nbd-serve differs from qemu-nbd");
        assert!(read_all(&ou) == expect, "{name}: our client read differs from qemu-nbd");
        // qemu-io over NBD sees the same bytes as qemu-io on the image.
        let direct = dir.join("direct.raw");
        qemu_img(&["convert", "-q", "-O", "raw", s(&img), s(&direct)]);
        assert!(fs::read(&direct).unwrap() == expect, "{name}: qemu-img convert differs");
        qemu_io(&["-r", "-f", "raw", &ou], &[&format!("read -v 0 {}", 4096)]);
        for ctx in ["base:allocation", "qemu:allocation-depth"] {
            assert_eq!(map(&ou, ctx), map(&qu, ctx), "{name}: nbdinfo --map={ctx}");
        }
    }
}

#[test]
fn qemu_io_patterns_through_nbd() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let imgs = make_images(&dir);
    let (_, top) = imgs.iter().find(|(n, _)| *n == "backing chain").unwrap();
    let ours = serve(&dir, &["-r", s(top)]);
    let u = ours.uri("");
    qemu_io(
        &["-r", "-f", "raw", &u],
        &[
            "read -P 0x01 0 64k",
            "read -P 0x02 64k 64k",
            "read -P 0x04 128k 64k",
            "read -P 0x02 192k 128k",
            "read -P 0x01 320k 704k",
            "read -P 0x00 1M 64k",
            "read -P 0x05 1100k 8k",
            "read -P 0x00 2M 4k",
            "read -P 0x03 2052k 6k",
            "read -P 0x01 2058k 100k",
            "read -P 0x00 3M 1M",
            "read -P 0x00 4M 1M",
            "read -P 0x06 5M 64k",
        ],
    );
}

/// The same writes, through NBD to nbd-serve and by qemu-io straight into
/// a copy: the images compare equal and both check clean.
#[test]
fn writes_through_nbd_leave_a_clean_equal_image() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let imgs = make_images(&dir);
    let writes = [
        "write -P 0xa1 0 4k",
        "write -P 0xa2 130k 70k",
        "write -P 0xa3 1023k 2k",
        "write -z 1100k 128k",
        "write -P 0xa4 1900k 1k",
        // Trimmed contents are unspecified: overwrite them.
        "discard 1600k 128k",
        "write -P 0xa5 1600k 128k",
    ];
    for name in ["v3", "v2", "backing chain", "compressed"] {
        let img = &imgs.iter().find(|(n, _)| *n == name).unwrap().1;
        let expected = dir.join(format!("expected-{}.qcow2", name.replace(' ', "-")));
        fs::copy(img, &expected).unwrap();
        qemu_io(&["-f", "qcow2", s(&expected)], &writes);
        let mut ours = serve(&dir, &[s(img)]);
        qemu_io(&["-f", "raw", &ours.uri("")], &writes);
        // Our client too: a write spanning clusters, then read it back.
        let mut c = Client::connect(&ours.uri("")).unwrap();
        let data = pattern(200_000, 7);
        c.write(&data, 1_500_000).unwrap();
        c.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        c.read(&mut back, 1_500_000).unwrap();
        assert!(back == data, "{name}: read-back differs");
        c.disconnect().unwrap();
        // The same bytes into the expected image, by our client through
        // qemu-nbd (qemu-io cannot write arbitrary data).
        let mut qemu = qemu_nbd(&dir, &["-f", "qcow2", s(&expected)]);
        let mut q = Client::connect(&qemu.uri("")).unwrap();
        q.write(&data, 1_500_000).unwrap();
        q.flush().unwrap();
        q.disconnect().unwrap();
        stop(&mut qemu);
        stop(&mut ours);
        let check = run("qemu-img", &["check", s(img)]);
        assert!(
            check.status.success(),
            "{name}: qemu-img check:\n{}",
            describe_output(&check)
        );
        let cmp = run("qemu-img", &["compare", s(img), s(&expected)]);
        assert!(
            cmp.status.success(),
            "{name}: qemu-img compare:\n{}",
            describe_output(&cmp)
        );
    }
}

/// A persistent bitmap: made by `qemu-img bitmap`, filled by later writes.
fn bitmap_image(dir: &TempDir) -> PathBuf {
    let img = dir.join("bitmaps.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    qemu_io(&["-f", "qcow2", s(&img)], &["write -P 1 0 2M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    qemu_io(
        &["-f", "qcow2", s(&img)],
        &["write -P 2 512k 64k", "write -P 3 5M 4k", "write -P 4 15M 1M"],
    );
    qemu_img(&["bitmap", "--add", "-g", "512", s(&img), "fine"]);
    qemu_img(&["bitmap", "--disable", s(&img), "b0"]);
    qemu_io(&["-f", "qcow2", s(&img)], &["write -P 5 7M 1536", "write -P 6 9M 100k"]);
    img
}

#[test]
fn dirty_bitmaps_and_depth_match_qemu_nbd() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let img = bitmap_image(&dir);
    let ours = serve(&dir, &["-r", "-A", "-B", "b0", "-B", "fine", s(&img)]);
    let qemu = qemu_nbd(&dir, &["-r", "-A", "-B", "b0", "-B", "fine", "-f", "qcow2", s(&img)]);
    for ctx in [
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
        "qemu:dirty-bitmap:fine",
    ] {
        let (a, b) = (map(&ours.uri(""), ctx), map(&qemu.uri(""), ctx));
        assert_eq!(a, b, "nbdinfo --map={ctx}");
        if ctx.contains("dirty") {
            assert!(a.iter().any(|r| r.2 == 1), "{ctx}: nothing dirty: {a:?}");
        }
    }
    let list = run_ok("nbdinfo", &["--list", &ours.uri("")]);
    assert!(
        list.contains("qemu:dirty-bitmap:b0") && list.contains("qemu:allocation-depth"),
        "{list}"
    );
    // Without -A/-B only base:allocation is offered.
    let plain = serve(&dir, &["-r", s(&img)]);
    let list = run_ok("nbdinfo", &["--list", &plain.uri("")]);
    assert!(!list.contains("qemu:"), "{list}");
}

#[test]
fn bitmaps_are_never_dropped_silently() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let img = bitmap_image(&dir);
    let before = fs::read(&img).unwrap();
    // Writable serving would invalidate them: refused, image untouched.
    let out = run(&our_bin("nbd-serve"), &["--socket", s(&dir.join("x.sock")), s(&img)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("persistent dirty bitmaps") && err.contains("b0"), "{err}");
    assert!(fs::read(&img).unwrap() == before, "refused open changed the image");
    // -B of a missing bitmap, and of a raw file: clear errors.
    let out = run(
        &our_bin("nbd-serve"),
        &["-r", "-B", "nope", "--socket", s(&dir.join("y.sock")), s(&img)],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no persistent bitmap named \"nope\""));
    // Snapshot mode serves them and leaves them alone.
    let mut ours = serve(&dir, &["-s", "-B", "b0", s(&img)]);
    qemu_io(&["-f", "raw", &ours.uri("")], &["write -P 9 0 1M"]);
    assert!(map(&ours.uri(""), "qemu:dirty-bitmap:b0").iter().any(|r| r.2 == 1));
    stop(&mut ours);
    assert!(fs::read(&img).unwrap() == before, "snapshot mode changed the image");
    let info = qemu_img(&["info", s(&img)]);
    assert!(info.contains("name: b0") && info.contains("name: fine"), "{info}");
    let check = run("qemu-img", &["check", s(&img)]);
    assert!(check.status.success(), "{}", describe_output(&check));
}

#[test]
fn snapshot_mode_leaves_the_image_unchanged() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let imgs = make_images(&dir);
    let raw = dir.join("plain.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "3M"]);
    qemu_io(&["-f", "raw", s(&raw)], &["write -P 0x42 0 3M"]);
    let temp_before = snapshot_temp_files();
    for (name, img) in [("raw", raw.clone()), ("qcow2", imgs[2].1.clone())] {
        let before = fs::read(&img).unwrap();
        let mut ours = serve(&dir, &["-s", s(&img)]);
        let u = ours.uri("");
        qemu_io(
            &["-f", "raw", &u],
            &["write -P 0xee 1000 100k", "write -z 2M 64k", "discard 0 512"],
        );
        qemu_io(
            &["-r", "-f", "raw", &u],
            &["read -P 0xee 1000 100k", "read -P 0 2M 64k"],
        );
        // Writes are visible to every client while it runs.
        let mut c = Client::connect(&u).unwrap();
        let mut b = vec![0u8; 512];
        c.read(&mut b, 2000).unwrap();
        assert!(b.iter().all(|&x| x == 0xee), "{name}");
        c.disconnect().unwrap();
        stop(&mut ours);
        assert!(fs::read(&img).unwrap() == before, "{name}: -s changed the image");
    }
    assert_eq!(snapshot_temp_files(), temp_before, "a snapshot overlay was left behind");
}

/// Files a snapshot overlay could leave in the default temporary directory.
fn snapshot_temp_files() -> Vec<String> {
    let dir = std::env::var_os("TMPDIR")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".nbd-snapshot"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn formats_are_probed_never_guessed_into_raw() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let q = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "64M"]);
    qemu_io(&["-f", "qcow2", s(&q)], &["write -P 7 0 64k"]);
    let file_len = fs::metadata(&q).unwrap().len();
    // Without -f: qcow2, its virtual size and contents.
    {
        let ours = serve(&dir, &["-r", s(&q)]);
        let c = Client::connect(&ours.uri("")).unwrap();
        assert_eq!(c.size(), 64 * MIB);
        qemu_io(&["-r", "-f", "raw", &ours.uri("")], &["read -P 7 0 64k"]);
    }
    // -f raw: the container bytes, because it was asked for.
    {
        let ours = serve(&dir, &["-r", "-f", "raw", s(&q)]);
        let mut c = Client::connect(&ours.uri("")).unwrap();
        assert_eq!(c.size(), file_len);
        let mut magic = [0u8; 4];
        c.read(&mut magic, 0).unwrap();
        assert_eq!(&magic, b"QFI\xfb");
    }
    // A format we do not serve is refused without -f, served with -f raw.
    let vmdk = dir.join("disk.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&vmdk), "8M"]);
    let out = run(&our_bin("nbd-serve"), &["--socket", s(&dir.join("v.sock")), s(&vmdk)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmdk") && err.contains("-f raw"), "{err}");
    let out = run(
        &our_bin("nbd-serve"),
        &["-f", "vmdk", "--socket", s(&dir.join("w.sock")), s(&vmdk)],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported image format"));
    let ours = serve(&dir, &["-r", "-f", "raw", s(&vmdk)]);
    let c = Client::connect(&ours.uri("")).unwrap();
    assert_eq!(c.size(), fs::metadata(&vmdk).unwrap().len());
    // Raw files probe as raw; --export takes -f/-r too.
    let raw = dir.sparse_file("disk.raw", 4 * MIB);
    let export = format!("q={}", s(&q));
    let ours = serve(&dir, &["-r", "--export", &export, s(&raw)]);
    assert_eq!(Client::connect(&ours.uri("")).unwrap().size(), 4 * MIB);
    assert_eq!(Client::connect(&ours.uri("q")).unwrap().size(), 64 * MIB);
}

#[test]
fn raw_images_map_like_qemu_nbd() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let raw = dir.sparse_file("sparse.raw", 4 * MIB);
    qemu_io(&["-f", "raw", s(&raw)], &["write -P 1 64k 64k", "write -P 2 1M 4k"]);
    // Served in place, and in snapshot mode (under a qcow2 overlay).
    for mode in ["-r", "-s"] {
        let ours = serve(&dir, &[mode, "-A", s(&raw)]);
        let qemu = qemu_nbd(&dir, &[mode, "-A", "-f", "raw", s(&raw)]);
        for ctx in ["base:allocation", "qemu:allocation-depth"] {
            assert_eq!(
                map(&ours.uri(""), ctx),
                map(&qemu.uri(""), ctx),
                "{mode}: nbdinfo --map={ctx}"
            );
        }
        assert!(nbdcopy_bytes(&dir, &ours.uri(""), "a") == nbdcopy_bytes(&dir, &qemu.uri(""), "b"));
    }
}

/// Overwrites `bytes` at `offset` of the file at `path`.
fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// `nbd-serve ARGS... IMAGE` refuses to start, naming `field` and the
/// file at `culprit`; and `qemu-img info QEMU_ARGS... IMAGE` refuses it
/// too.
fn refused_like_qemu(dir: &TempDir, args: &[&str], image: &Path, culprit: &Path, field: &str, qemu_args: &[&str]) {
    let before = fs::read(image).unwrap();
    let socket = dir.join("refused.sock");
    let mut full = vec!["--socket", s(&socket)];
    full.extend_from_slice(args);
    full.push(s(image));
    let out = run_timeout(&our_bin("nbd-serve"), &full, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nbd-serve served {}: {err}", image.display());
    assert!(
        err.contains(s(culprit)) && err.contains(&format!("invalid qcow2 header: {field}:")),
        "{}: expected a refusal of {field} naming {}:\n{err}",
        image.display(),
        culprit.display()
    );
    assert!(!err.contains("bitmap"), "{err}");
    assert!(fs::read(image).unwrap() == before, "refused open changed the image");
    let mut info = vec!["info"];
    info.extend_from_slice(qemu_args);
    info.push(s(image));
    let q = run("qemu-img", &info);
    assert!(
        !q.status.success(),
        "qemu-img opens what nbd-serve refused ({field}):\n{}",
        describe_output(&q)
    );
}

#[test]
fn corrupt_headers_are_refused_as_qemu_refuses_them() {
    if !peers() {
        return;
    }
    let dir = TempDir::new();
    let fresh = |name: &str| {
        let p = dir.join(name);
        qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
        p
    };
    // Header fields (docs/interop/qcow2.txt): cluster_bits at 20, size at
    // 24, l1_size at 36, l1_table_offset at 40; backing_file_offset at 8,
    // backing_file_size at 16.
    let big = fresh("big.qcow2");
    patch(&big, 24, &(1u64 << 62).to_be_bytes());
    let cb8 = fresh("cb8.qcow2");
    patch(&cb8, 20, &8u32.to_be_bytes());
    let cb30 = fresh("cb30.qcow2");
    patch(&cb30, 20, &30u32.to_be_bytes());
    let l1off = fresh("l1off.qcow2");
    patch(&l1off, 40, &0x30200u64.to_be_bytes());
    let l1small = fresh("l1small.qcow2");
    patch(&l1small, 36, &0u32.to_be_bytes());
    for (img, field) in [
        (&big, "size"),
        (&cb8, "cluster_bits"),
        (&cb30, "cluster_bits"),
        (&l1off, "l1_table_offset"),
        (&l1small, "l1_size"),
    ] {
        refused_like_qemu(&dir, &[], img, img, field, &[]);
        refused_like_qemu(&dir, &["-r"], img, img, field, &[]);
    }
    // The backing file name: longer than 1023 bytes, or past the first
    // cluster.
    let base = fresh("base.qcow2");
    for (name, offset, len) in [("long.qcow2", None, 2000u32), ("past.qcow2", Some(0xfff0u64), 100)] {
        let over = dir.join(name);
        create_qcow2_overlay(&over, s(&base), "qcow2");
        if let Some(offset) = offset {
            patch(&over, 8, &offset.to_be_bytes());
        }
        patch(&over, 16, &len.to_be_bytes());
        refused_like_qemu(&dir, &["-r"], &over, &over, "backing_file_size", &[]);
    }
    // A corrupt backing file is refused too, naming the backing file.
    let low = fresh("low.qcow2");
    let top = dir.join("top.qcow2");
    create_qcow2_overlay(&top, s(&low), "qcow2");
    patch(&low, 20, &30u32.to_be_bytes());
    refused_like_qemu(&dir, &["-r"], &top, &low, "cluster_bits", &["--backing-chain"]);
    refused_like_qemu(&dir, &["-s"], &top, &low, "cluster_bits", &["--backing-chain"]);
}
