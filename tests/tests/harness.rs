//! Checks of the test harness itself against the real peers: each starter
//! brings up a server that `nbdinfo` can talk to, and dropping the `Peer`
//! stops it.

use std::path::Path;
use std::time::{Duration, Instant};

use nbd_tests::{
    Endpoint, Peer, TempDir, nbd_server, nbdkit, nbdkit_tcp, our_bin, qemu_nbd, require_peer, require_peers, run,
    run_ok,
};

/// Whether `/proc/PID` shows a live (non-zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with(|c| c != 'Z')))
        .unwrap_or(false)
}

/// Waits a little for `pid` to be gone.
fn gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn assert_size(json: &str, size: u64) {
    let needle = format!("\"export-size\": {size}");
    assert!(json.contains(&needle), "{needle} not in nbdinfo output:\n{json}");
}

#[test]
fn nbdkit_memory() {
    if !require_peers(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["memory", "64M"]);
    assert!(peer.socket().starts_with(dir.path()));
    assert!(peer.uri("").starts_with("nbd+unix:///?socket=/"));
    assert_size(&run_ok("nbdinfo", &["--json", &peer.uri("")]), 64 << 20);
    // The peer keeps serving after a client disconnected.
    assert_eq!(run_ok("nbdinfo", &["--size", &peer.uri("")]).trim(), "67108864");

    let pid = peer.pid();
    assert!(alive(pid));
    drop(peer);
    assert!(gone(pid), "nbdkit (pid {pid}) still running after drop");
}

#[test]
fn nbdkit_export_names_are_percent_encoded() {
    if !require_peers(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let names = ["a b", "x?y#z&w=%", "/lead", "é"];
    let mut args = vec!["--filter=exportname", "memory", "1M", "exportname-strict=true"];
    let params: Vec<String> = names.iter().map(|n| format!("exportname={n}")).collect();
    args.extend(params.iter().map(String::as_str));
    let peer = nbdkit(&dir, &args);
    for name in names {
        let uri = peer.uri(name);
        assert_eq!(run_ok("nbdinfo", &["--size", &uri]).trim(), "1048576", "{uri}");
    }
    // An unknown name is refused, proving the name got through intact.
    let out = run("nbdinfo", &["--size", &peer.uri("nope")]);
    assert!(!out.status.success());
}

#[test]
fn nbdkit_oldstyle_and_tcp() {
    if !require_peers(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let old = nbdkit(&dir, &["--oldstyle", "memory", "1M"]);
    let json = run_ok("nbdinfo", &["--json", &old.uri("")]);
    assert!(json.contains("\"protocol\": \"oldstyle\""), "{json}");
    assert_size(&json, 1 << 20);

    let tcp = nbdkit_tcp(&dir, &["-r", "memory", "2M"]);
    assert!(matches!(tcp.endpoint(), Endpoint::Tcp(_)));
    assert!(tcp.uri("").starts_with("nbd://127.0.0.1:"));
    let json = run_ok("nbdinfo", &["--json", &tcp.uri("")]);
    assert_size(&json, 2 << 20);
    assert!(json.contains("\"is_read_only\": true"), "{json}");
}

#[test]
fn qemu_nbd_raw_image() {
    if !require_peers(&["qemu-img", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let img = dir.join("disk.raw");
    let img = img.to_str().unwrap();
    run_ok("qemu-img", &["create", "-f", "raw", img, "3M"]);

    let peer = qemu_nbd(&dir, &["-f", "raw", img]);
    assert_size(&run_ok("nbdinfo", &["--json", &peer.uri("")]), 3 << 20);
    // --persistent: still serving after the first client went away.
    assert_size(&run_ok("nbdinfo", &["--json", &peer.uri("")]), 3 << 20);

    let named = qemu_nbd(&dir, &["-r", "-x", "disk", "-f", "raw", img]);
    let json = run_ok("nbdinfo", &["--json", &named.uri("disk")]);
    assert_size(&json, 3 << 20);
    assert!(json.contains("\"is_read_only\": true"), "{json}");

    let pid = peer.pid();
    drop(peer);
    assert!(gone(pid), "qemu-nbd (pid {pid}) still running after drop");
}

#[test]
fn nbd_server_two_exports() {
    if !require_peers(&["nbd-server", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let a = dir.sparse_file("a.img", 1 << 20);
    let b = dir.sparse_file("b.img", 2 << 20);
    let peer = nbd_server(&dir, &[("a", &a, false), ("b", &b, true)]);

    // nbd-server 3.24 answers NBD_OPT_INFO with export size 0 (it opens the
    // file only on NBD_OPT_GO), and `nbdinfo --json`/`--list` report that
    // size; so the list proves names and flags, `nbdinfo --size` the sizes.
    let list = run_ok("nbdinfo", &["--list", "--json", &peer.uri("")]);
    for (name, readonly) in [("a", false), ("b", true)] {
        let entry = format!("\"export-name\": \"{name}\"");
        let start = list.find(&entry).unwrap_or_else(|| panic!("{entry} not in\n{list}"));
        let rest = &list[start..];
        let rest = &rest[..rest.find('}').unwrap_or(rest.len())];
        assert!(rest.contains(&format!("\"is_read_only\": {readonly}")), "{list}");
    }

    // Several sessions in a row: nbd-server must keep serving.
    for _ in 0..2 {
        assert_eq!(run_ok("nbdinfo", &["--size", &peer.uri("a")]).trim(), "1048576");
        assert_eq!(run_ok("nbdinfo", &["--size", &peer.uri("b")]).trim(), "2097152");
    }

    let pid = peer.pid();
    assert!(alive(pid));
    drop(peer);
    assert!(gone(pid), "nbd-server (pid {pid}) still running after drop");
}

#[test]
fn nbdsh_runs() {
    if !require_peers(&["nbdkit", "nbdsh"]) {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["memory", "1M"]);
    let out = run_ok("nbdsh", &["-u", &peer.uri(""), "-c", "print(h.get_size())"]);
    assert_eq!(out.trim(), "1048576");
}

#[test]
fn failed_start_reports_stderr() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let started = Instant::now();
    let err = std::panic::catch_unwind(|| nbdkit(&dir, &["no-such-plugin-xyz"])).unwrap_err();
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains("failed to start"), "{msg}");
    assert!(msg.contains("no-such-plugin-xyz"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn generic_start_of_any_server() {
    if !require_peers(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let socket = dir.socket_path("custom");
    let peer = Peer::start(
        &dir,
        "nbdkit",
        &["-f", "-U", socket.to_str().unwrap(), "null", "4096"],
        Endpoint::Unix(socket.clone()),
    );
    assert_eq!(peer.socket(), Path::new(&socket));
    assert_size(&run_ok("nbdinfo", &["--json", &peer.uri("")]), 4096);
}

#[test]
fn kill_stops_a_peer_at_once() {
    if !require_peers(&["nbdkit", "nbd-server", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let img = dir.sparse_file("a.img", 1 << 20);
    for mut peer in [nbdkit(&dir, &["memory", "1M"]), nbd_server(&dir, &[("a", &img, false)])] {
        assert!(peer.is_running());
        peer.kill();
        assert!(!peer.is_running());
        assert!(!alive(peer.pid()));
        peer.kill(); // again: nothing happens
        let out = run("nbdinfo", &["--size", &peer.uri("a")]);
        assert!(!out.status.success(), "a killed peer still answers");
    }
}

#[test]
fn our_binaries_are_built_on_demand() {
    let bin = our_bin("nbd-info");
    assert!(Path::new(&bin).is_file(), "{bin}");
    assert_eq!(our_bin("nbd-info"), bin);
    run_ok(&bin, &["--version"]);
}

#[test]
fn missing_peer_skips_or_fails() {
    let result = std::panic::catch_unwind(|| require_peer("no-such-peer-nbd-tests"));
    if nbd_tests::peers_required() {
        let err = result.unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("peer no-such-peer-nbd-tests is missing"), "{msg}");
        assert!(msg.contains("scripts/install-peers.sh"), "{msg}");
    } else {
        assert!(!result.unwrap());
    }
}
