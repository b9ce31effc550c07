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
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
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
