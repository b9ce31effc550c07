//! The server-side examples run, and real peers accept them:
//!
//! - `nbd-proto/examples/server.rs` (a server written on `ServerSession`
//!   alone) under nbdinfo, qemu-io (writes, reads back, zeroes) and nbdcopy;
//! - `nbd-smol/examples/custom_backend.rs` (nbdkit's `pattern` plugin as a
//!   user-written `Storage`, served by nbd-smol's server): its bytes equal
//!   nbdkit's own pattern plugin's, and writes are refused.

use nbd_tests::*;

fn start(dir: &TempDir, program: &str, name: &str, args: &[&str]) -> Peer {
    let socket = dir.socket_path(name);
    let socket_arg = socket.to_str().expect("UTF-8 path").to_owned();
    let mut full = vec![socket_arg.as_str()];
    full.extend_from_slice(args);
    Peer::start(dir, program, &full, Endpoint::Unix(socket))
}

#[test]
fn session_server_example_under_nbdinfo_qemu_io_and_nbdcopy() {
    if !require_peers(&["nbdinfo", "qemu-io", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let server = start(&dir, &our_example("nbd-proto", "server"), "example", &["16M"]);
    let uri = server.uri("");
    let info = run_ok("nbdinfo", &[&uri]);
    assert!(info.contains("export-size: 16777216"), "{info}");
    assert!(info.contains("an example disk in memory"), "{info}");

    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 2M",
            "-c",
            "write -z 2M 64k",
            "-c",
            "read -P 0x5a 1M 1M",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "read -P 0x5a 2112k 960k",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "flush",
            &uri,
        ],
    );

    // The whole disk through nbdcopy equals what was written.
    let copy = dir.join("copy.img");
    run_ok("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    let data = std::fs::read(&copy).unwrap();
    assert_eq!(data.len(), 16 << 20);
    let mut expected = vec![0u8; 16 << 20];
    expected[1 << 20..3 << 20].fill(0x5a);
    expected[2 << 20..(2 << 20) + (64 << 10)].fill(0);
    assert!(data == expected, "nbdcopy read other bytes than were written");
}

#[test]
fn custom_backend_example_serves_what_nbdkit_pattern_serves() {
    if !require_peers(&["nbdkit", "nbdsh", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let ours = start(&dir, &our_example("nbd-smol", "custom_backend"), "pattern", &["1G"]);
    let theirs = nbdkit(&dir, &["pattern", "size=1G"]);
    // A few regions, byte for byte: the start, an unaligned middle, the end.
    for (offset, len) in [(0u64, 1u64 << 20), (123_456_789, 65536), ((1 << 30) - 4096, 4096)] {
        let a = dir.join(format!("ours-{offset}"));
        let b = dir.join(format!("theirs-{offset}"));
        for (uri, out) in [(ours.uri(""), &a), (theirs.uri(""), &b)] {
            let code = format!(
                "open({:?}, 'wb').write(h.pread({len}, {offset}))",
                out.to_str().unwrap()
            );
            run_ok("nbdsh", &["-u", &uri, "-c", &code]);
        }
        let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(x.len() as u64, len);
        assert!(x == y, "the pattern at {offset} differs from nbdkit's");
    }
    // Read-only: qemu-io's write fails.
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &ours.uri("")]);
    let text = describe_output(&out);
    assert!(
        !out.status.success() || text.contains("Operation not permitted") || text.contains("read-only"),
        "a write to the read-only pattern was not refused:\n{text}"
    );
}
