//! QEMU's image locks: while `nbd-serve` has an image open writable,
//! qemu-io cannot open it for writing; while qemu-io or qemu-nbd holds an
//! image, `nbd-serve` refuses it (clear error, non-zero exit). Raw and
//! qcow2 alike, and the backing files of a qcow2 image.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbd-serve");
    let mut full = vec!["--socket", s(&socket)];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket.clone()))
}

/// Runs nbd-serve expecting it to refuse the image; returns its stderr.
fn serve_refused(dir: &TempDir, args: &[&str]) -> String {
    let socket = dir.socket_path("refused");
    let mut full = vec!["--socket", s(&socket)];
    full.extend_from_slice(args);
    let out = run(&our_bin("nbd-serve"), &full);
    assert!(
        !out.status.success(),
        "nbd-serve {args:?} started:\n{}",
        describe_output(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("lock") && err.contains("using the image"), "{err}");
    err
}

/// Tries a write with qemu-io straight into the image.
fn qemu_io_write(fmt: &str, img: &Path) -> std::process::Output {
    run("qemu-io", &["-f", fmt, s(img), "-c", "write -P 0x5a 0 4k"])
}

fn images(dir: &TempDir) -> [(&'static str, std::path::PathBuf); 2] {
    let raw = dir.join("disk.raw");
    run_ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "4M"]);
    let q = dir.join("disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&q), "4M"]);
    [("raw", raw), ("qcow2", q)]
}

/// Whether some process holds an OFD lock on `path` (from /proc/locks).
fn locked(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = fs::metadata(path).unwrap().ino();
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    locks
        .lines()
        .any(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
}

fn wait_locked(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !locked(path) {
        assert!(child.try_wait().unwrap().is_none(), "holder exited early");
        assert!(Instant::now() < deadline, "{} never got locked", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn qemu_io_cannot_write_what_nbd_serve_has_open() {
    if !require_peers(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    for (fmt, img) in images(&dir) {
        let mut ours = serve(&dir, &[s(&img)]);
        let out = qemu_io_write(fmt, &img);
        assert!(
            !out.status.success(),
            "{fmt}: qemu-io wrote:\n{}",
            describe_output(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Failed to get \"write\" lock"), "{fmt}: {err}");
        // Neither can a second nbd-serve.
        serve_refused(&dir, &[s(&img)]);
        ours.kill();
        // Gone: the locks went with it.
        let out = qemu_io_write(fmt, &img);
        assert!(out.status.success(), "{fmt}: {}", describe_output(&out));
    }
}

#[test]
fn nbd_serve_refuses_images_qemu_holds() {
    if !require_peers(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = TempDir::new();
    for (fmt, img) in images(&dir) {
        // qemu-nbd serving it writable.
        {
            let _q = qemu_nbd(&dir, &["-f", fmt, s(&img)]);
            let err = serve_refused(&dir, &[s(&img)]);
            assert!(err.contains(s(&img)), "{err}");
            if fmt == "qcow2" {
                // A read-only qcow2 reader forbids writers, so it cannot
                // come in under a writer either.
                serve_refused(&dir, &["-r", s(&img)]);
            } else {
                // As with QEMU, a raw reader shares writes.
                let _r = serve(&dir, &["-r", s(&img)]);
            }
        }
        // qemu-io with the image open for writing.
        let mut holder = Command::new("qemu-io")
            .args(["-f", fmt, s(&img), "-c", "sleep 60000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_locked(&img, &mut holder);
        serve_refused(&dir, &[s(&img)]);
        if fmt == "qcow2" {
            // Snapshot mode only reads the image, but a qcow2 reader still
            // forbids writers (its metadata could change underneath).
            serve_refused(&dir, &["-s", s(&img)]);
        }
        let _ = holder.kill();
        let _ = holder.wait();
        // Free again.
        let _ours = serve(&dir, &[s(&img)]);
    }
}

#[test]
fn readers_share_and_backing_files_are_protected() {
    if !require_peers(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = TempDir::new();
    let base = dir.join("base.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    let top = dir.join("top.qcow2");
    create_qcow2_overlay(&top, "base.qcow2", "qcow2");
    // Two read-only servers of one image, ours and QEMU's, at once.
    {
        let _a = serve(&dir, &["-r", s(&base)]);
        let _b = qemu_nbd(&dir, &["-r", "-f", "qcow2", s(&base)]);
        let _c = serve(&dir, &["-r", s(&base)]);
    }
    // Serving the top writable: its backing file is read-only and
    // nobody may write it underneath.
    let _ours = serve(&dir, &[s(&top)]);
    let out = qemu_io_write("qcow2", &base);
    assert!(!out.status.success(), "qemu-io wrote the backing file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock"));
    // Readers that share may still look (qemu-img info -U never locks).
    let out = run("qemu-io", &["-r", "-U", "-f", "qcow2", s(&base), "-c", "read 0 4k"]);
    assert!(out.status.success(), "{}", describe_output(&out));
}

/// Reads a whole export into bytes with nbdcopy.
fn nbdcopy_bytes(dir: &TempDir, uri: &str, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    run_ok("nbdcopy", &[uri, s(&out)]);
    fs::read(&out).unwrap()
}

/// Writes `len` bytes of `byte` at `offset` of an export with qemu-io.
fn qemu_io_write_uri(uri: &str, byte: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {byte:#x} {offset} {len}");
    run_ok("qemu-io", &["-f", "raw", uri, "-c", &cmd]);
}

/// The image's guest-visible contents, read without taking locks.
fn image_bytes(dir: &TempDir, fmt: &str, img: &Path) -> Vec<u8> {
    let out = dir.join("image-contents.raw");
    run_ok("qemu-img", &["convert", "-U", "-f", fmt, "-O", "raw", s(img), s(&out)]);
    fs::read(&out).unwrap()
}

/// One file under several export names of one server, as nbd-server's
/// `cfgmulti` test (a copy-on-write export and a read-only export of one
/// file) and qemu-storage-daemon's several exports of one node: the file
/// is opened and locked once; the read-only export sees the writable
/// one's writes; a snapshot export's writes stay its own. A second server
/// on the file is still refused.
#[test]
fn one_file_under_several_exports() {
    if !require_peers(&["qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "nbd-server"]) {
        return;
    }
    let dir = TempDir::new();
    for (fmt, img) in images(&dir) {
        run_ok("qemu-io", &["-f", fmt, s(&img), "-c", "write -P 0x5a 0 4M"]);
        let original = image_bytes(&dir, fmt, &img);
        assert_eq!(original, vec![0x5a; 4 << 20]);

        // cfgmulti: a copy-on-write export and a read-only export.
        {
            let cow = format!("cow=snapshot:{}", s(&img));
            let ro = format!("ro=ro:{}", s(&img));
            let ours = serve(&dir, &["--export", &cow, "--export", &ro]);
            let info = run_ok("nbdinfo", &["--json", &ours.uri("ro")]);
            assert!(info.contains("\"is_read_only\": true"), "{fmt}: {info}");
            let info = run_ok("nbdinfo", &["--json", &ours.uri("cow")]);
            assert!(info.contains("\"is_read_only\": false"), "{fmt}: {info}");
            qemu_io_write_uri(&ours.uri("cow"), 0x11, 65536, 65536);
            let ro_write = run("qemu-io", &["-f", "raw", &ours.uri("ro"), "-c", "write 0 4k"]);
            assert!(!ro_write.status.success(), "{fmt}: wrote to the read-only export");
            let cow_bytes = nbdcopy_bytes(&dir, &ours.uri("cow"), "cow.raw");
            let mut want = original.clone();
            want[65536..131072].fill(0x11);
            assert!(cow_bytes == want, "{fmt}: the copy-on-write export lost its write");
            assert!(
                nbdcopy_bytes(&dir, &ours.uri("ro"), "ro.raw") == original,
                "{fmt}: the read-only export sees the copy-on-write export's write"
            );
        }
        assert!(image_bytes(&dir, fmt, &img) == original, "{fmt}: the image was written");

        // A writable export, a read-only one and a snapshot of one file.
        {
            let ro = format!("ro=ro:{}", s(&img));
            let snap = format!("snap=snapshot:{}", s(&img));
            let ours = serve(&dir, &[s(&img), "--export", &ro, "--export", &snap]);
            // Locked once, for the writer: qemu-io and another server are
            // refused as before.
            let out = qemu_io_write(fmt, &img);
            assert!(!out.status.success(), "{fmt}: qemu-io wrote under nbd-serve");
            serve_refused(&dir, &[s(&img)]);
            qemu_io_write_uri(&ours.uri(""), 0x22, 0, 65536);
            qemu_io_write_uri(&ours.uri("snap"), 0x33, 1 << 20, 65536);
            let mut want = original.clone();
            want[..65536].fill(0x22);
            assert!(
                nbdcopy_bytes(&dir, &ours.uri("ro"), "ro2.raw") == want,
                "{fmt}: the read-only export does not see the writable export's write"
            );
            let mut snap_want = want.clone();
            snap_want[1 << 20..(1 << 20) + 65536].fill(0x33);
            assert!(
                nbdcopy_bytes(&dir, &ours.uri("snap"), "snap.raw") == snap_want,
                "{fmt}: the snapshot export does not show its own write over the image's"
            );
        }
        let mut want = original.clone();
        want[..65536].fill(0x22);
        assert!(
            image_bytes(&dir, fmt, &img) == want,
            "{fmt}: the writable export's write is not in the image"
        );
    }

    // nbd-server serves the same shape with the same results.
    let img = dir.join("peer.raw");
    fs::write(&img, vec![0x5a; 1 << 20]).unwrap();
    let exports = format!(
        "[cow]\nexportname = {0}\ncopyonwrite = true\n[ro]\nexportname = {0}\nreadonly = true\n",
        s(&img)
    );
    let peer = nbd_server_config(&dir, "", &exports);
    qemu_io_write_uri(&peer.uri("cow"), 0x11, 0, 4096);
    assert!(nbdcopy_bytes(&dir, &peer.uri("ro"), "peer-ro.raw") == vec![0x5a; 1 << 20]);
}
