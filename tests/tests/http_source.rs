//! HTTP sources (`nbd_storage::http::HttpStorage`) against nginx:
//! `nbd-copy http://...` and `nbd-serve http://...` read by libnbd's
//! nbdcopy and by qemu-img, a redirect, a server that ignores ranges and
//! a missing file.

use std::fs;
use std::path::Path;
use std::time::Duration;

use nbd_tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Several MiB of data, a size that is not a multiple of 512, with a run
/// of zeroes in the middle (read, then written as a hole).
fn image() -> Vec<u8> {
    let mut data = pattern((5 << 20) + 1234, 23);
    data[(2 << 20)..(3 << 20)].fill(0);
    data
}

/// nginx serving `image()` at /disk.img (and /norange/disk.img).
fn web(dir: &TempDir) -> (WebServer, Vec<u8>) {
    let w = nginx(dir);
    let data = image();
    fs::write(w.root.join("disk.img"), &data).unwrap();
    (w, data)
}

/// Starts `nbd-serve --socket SOCKET ARGS...`.
fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbd-serve");
    let mut full = vec!["--socket", s(&socket)];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket.clone()))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn nbd_copy_reads_a_url() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, data) = web(&dir);
    let out = dir.join("out.raw");
    let r = run(&our_bin("nbd-copy"), &[&w.url("/disk.img"), s(&out)]);
    assert!(r.status.success(), "{}\n{}", text(&r), w.error_log());
    assert!(fs::read(&out).unwrap() == data, "the copy differs from the file");
    // Several requests in parallel, small ones: many ranges.
    let out2 = dir.join("out2.raw");
    let r = run(
        &our_bin("nbd-copy"),
        &["--request-size=64K", "-R", "8", &w.url("/disk.img"), s(&out2)],
    );
    assert!(r.status.success(), "{}", text(&r));
    assert!(fs::read(&out2).unwrap() == data, "the copy differs from the file");
}

#[test]
fn nbd_copy_follows_a_redirect() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, data) = web(&dir);
    let out = dir.join("out.raw");
    let r = run(&our_bin("nbd-copy"), &[&w.url("/moved.img"), s(&out)]);
    assert!(r.status.success(), "{}", text(&r));
    assert!(fs::read(&out).unwrap() == data, "the copy differs from the file");
    // followlocation=false refuses it.
    let r = run(
        &our_bin("nbd-copy"),
        &["--http", "followlocation=false", &w.url("/moved.img"), s(&out)],
    );
    assert_eq!(r.status.code(), Some(1), "{}", text(&r));
    assert!(text(&r).contains("followlocation=false"), "{}", text(&r));
}

#[test]
fn a_server_without_ranges_is_a_clear_error() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, _) = web(&dir);
    let url = w.url("/norange/disk.img");
    let out = dir.join("out.raw");
    let r = run(&our_bin("nbd-copy"), &[&url, s(&out)]);
    let t = text(&r);
    assert_eq!(r.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&url) && t.contains("the server does not support range requests"),
        "{t}"
    );
    // nbd-serve refuses to start on it.
    let socket = dir.socket_path("refused");
    let r = run_timeout(
        &our_bin("nbd-serve"),
        &["--socket", s(&socket), &url],
        Duration::from_secs(30),
    );
    let t = text(&r);
    assert_eq!(r.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&url) && t.contains("the server does not support range requests"),
        "{t}"
    );
}

#[test]
fn a_missing_file_is_a_clear_error() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, _) = web(&dir);
    let url = w.url("/missing.img");
    let r = run(&our_bin("nbd-copy"), &[&url, s(&dir.join("out.raw"))]);
    let t = text(&r);
    assert_eq!(r.status.code(), Some(1), "{t}");
    assert!(t.contains(&url) && t.contains("404 Not Found"), "{t}");
    // An HTTP destination is refused.
    let r = run(
        &our_bin("nbd-copy"),
        &[s(&w.root.join("disk.img")), &w.url("/disk.img")],
    );
    let t = text(&r);
    assert_eq!(r.status.code(), Some(1), "{t}");
    assert!(t.contains("cannot be a destination"), "{t}");
}

#[test]
fn nbd_serve_serves_a_url_read_only() {
    if !require_peers(&["nginx", "nbdcopy", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, data) = web(&dir);
    let file = w.root.join("disk.img");
    for path in ["/disk.img", "/moved.img"] {
        let server = serve(&dir, &[&w.url(path)]);
        let uri = server.uri("");
        let out = dir.join("nbdcopy.raw");
        let _ = fs::remove_file(&out);
        let r = run("nbdcopy", &[&uri, s(&out)]);
        assert!(r.status.success(), "{}\n{}", text(&r), server.stderr());
        assert!(
            fs::read(&out).unwrap() == data,
            "nbdcopy read other data through {path}"
        );
        let r = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s(&file), &uri]);
        assert!(r.status.success(), "qemu-img compare: {}", text(&r));
        // Read-only: nbdcopy cannot write to it.
        let r = run("nbdcopy", &[s(&file), &uri]);
        assert!(!r.status.success(), "nbdcopy wrote to a read-only export: {}", text(&r));
        let r = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &uri]);
        let t = text(&r);
        assert!(
            !r.status.success() || t.contains("failed") || t.contains("read-only") || t.contains("read only"),
            "qemu-io wrote to a read-only export: {t}"
        );
    }
    assert!(fs::read(&file).unwrap() == data, "the served file changed");
}

#[test]
fn writes_go_to_an_overlay() {
    if !require_peers(&["nginx", "qemu-io", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, data) = web(&dir);
    let file = w.root.join("disk.img");
    let mut expected = data.clone();
    expected[4096..8192].fill(0xcd);
    for args in [vec!["--filter=cow", "--filter=retry"], vec!["-s"]] {
        let mut a = args.clone();
        let url = w.url("/disk.img");
        a.push(&url);
        let server = serve(&dir, &a);
        let uri = server.uri("");
        let r = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xcd 4k 4k",
                "-c",
                "read -P 0xcd 4k 4k",
                &uri,
            ],
        );
        let t = text(&r);
        assert!(r.status.success() && !t.contains("failed"), "{args:?}: {t}");
        let out = dir.join("overlay.raw");
        let _ = fs::remove_file(&out);
        let r = run("nbdcopy", &[&uri, s(&out)]);
        assert!(r.status.success(), "{}", text(&r));
        assert!(
            fs::read(&out).unwrap() == expected,
            "{args:?}: the overlay reads other data"
        );
    }
    assert!(fs::read(&file).unwrap() == data, "the served file changed");
}

/// nginx with TLS serving `image()`, and the certificates (the CA in
/// `ca-cert.pem`).
fn web_tls(dir: &TempDir) -> (WebServer, Vec<u8>, tls::Certificates) {
    let certs = tls::make_certificates(&dir.join("pki")).unwrap();
    let w = nginx_tls(dir, &certs);
    let data = image();
    fs::write(w.root.join("disk.img"), &data).unwrap();
    (w, data, certs)
}

#[test]
fn nbd_copy_reads_an_https_url_with_the_ca() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, data, certs) = web_tls(&dir);
    let url = w.https_url("/disk.img");
    let cainfo = format!("cainfo={}", s(&certs.file("ca-cert.pem")));
    let out = dir.join("out.raw");
    let r = run(&our_bin("nbd-copy"), &["--http", &cainfo, &url, s(&out)]);
    assert!(r.status.success(), "{}\n{}", text(&r), w.error_log());
    assert!(fs::read(&out).unwrap() == data, "the copy differs from the file");
    // capath= with the directory trusts it too.
    let out2 = dir.join("out2.raw");
    let capath = format!("capath={}", certs.dir_str());
    let r = run(&our_bin("nbd-copy"), &["--http", &capath, &url, s(&out2)]);
    assert!(r.status.success(), "{}", text(&r));
    assert!(fs::read(&out2).unwrap() == data, "the copy differs from the file");
}

#[test]
fn an_untrusted_certificate_is_a_clear_error() {
    if !require_peers(&["nginx"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, _, _) = web_tls(&dir);
    let url = w.https_url("/disk.img");
    let out = dir.join("out.raw");
    // The system's CAs do not know the test CA; nor does another test CA.
    let other = tls::make_certificates(&dir.join("other-pki")).unwrap();
    let other_ca = format!("cainfo={}", s(&other.file("ca-cert.pem")));
    for extra in [vec![], vec!["--http", other_ca.as_str()]] {
        let mut args = extra.clone();
        args.extend([url.as_str(), s(&out)]);
        let r = run(&our_bin("nbd-copy"), &args);
        let t = text(&r);
        assert_eq!(r.status.code(), Some(1), "{extra:?}: {t}");
        assert!(
            t.contains(&url) && t.contains("certificate is not trusted") && t.contains("cainfo="),
            "{extra:?}: {t}"
        );
        // Not worth another attempt: it fails at the first.
        assert!(!t.contains("attempts"), "{extra:?}: {t}");
    }
}

#[test]
fn nbd_serve_serves_an_https_url() {
    if !require_peers(&["nginx", "nbdcopy", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new();
    let (w, data, certs) = web_tls(&dir);
    let cainfo = format!("cainfo={}", s(&certs.file("ca-cert.pem")));
    let server = serve(&dir, &["--http", &cainfo, &w.https_url("/disk.img")]);
    let uri = server.uri("");
    let out = dir.join("nbdcopy.raw");
    let r = run("nbdcopy", &[&uri, s(&out)]);
    assert!(r.status.success(), "{}\n{}", text(&r), server.stderr());
    assert!(fs::read(&out).unwrap() == data, "nbdcopy read other data");
    let file = w.root.join("disk.img");
    let r = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s(&file), &uri]);
    assert!(r.status.success(), "qemu-img compare: {}", text(&r));
}
