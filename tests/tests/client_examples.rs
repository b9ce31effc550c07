//! Every client example runs against nbdkit and against qemu-nbd and
//! must print what a tool nobody here wrote says of the data the peer
//! serves: the SHA-256 `sha256sum` computes of the file, and its size.
//!
//! The examples: the custom event loop driving `ClientSession` over `mio`
//! (nbd-proto), the checksum tool (nbd-blocking), and concurrent reads
//! under smol and under tokio (nbd-smol). The image has data, a hole and
//! data again, at lengths that do not fall on request boundaries, so the
//! examples meet data and hole chunks and short last requests.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbd_tests::{
    TempDir, describe_output, nbdkit, nbdkit_tcp, our_example, pattern, qemu_nbd, require_peer, run_ok, run_timeout,
};

const SIZE: u64 = (8 << 20) + 4096 + 512;

/// `(package, example, extra arguments)`.
const EXAMPLES: &[(&str, &str, &[&str])] = &[
    ("nbd-proto", "custom_loop", &["48"]),
    ("nbd-blocking", "checksum", &[]),
    ("nbd-smol", "smol_reads", &["12"]),
    ("nbd-smol", "tokio_reads", &["12"]),
];

fn image(dir: &TempDir) -> PathBuf {
    let path = dir.sparse_file("disk.img", SIZE);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&pattern((3 << 20) + 777, 1), 0).unwrap();
    f.write_all_at(&pattern((1 << 20) + 4096, 2), 6 << 20).unwrap();
    f.write_all_at(&pattern(512, 3), SIZE - 512).unwrap();
    path
}

/// `sha256sum`'s hash of the file.
fn sha256sum(path: &Path) -> String {
    let out = run_ok("sha256sum", &[path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_owned()
}

fn run_examples(peer_name: &str, uri: &str, want: &str) {
    for (package, example, args) in EXAMPLES {
        let exe = our_example(package, example);
        let mut full = vec![uri];
        full.extend_from_slice(args);
        let out = run_timeout(&exe, &full, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "{example} against {peer_name} failed:\n{}",
            describe_output(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut words = stdout.split_whitespace();
        assert_eq!(
            (words.next(), words.next()),
            (Some(want), Some(SIZE.to_string().as_str())),
            "{example} against {peer_name} printed {stdout:?}"
        );
        eprintln!("{example} against {peer_name}: {}", stdout.trim());
    }
}

#[test]
fn client_examples_against_nbdkit() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let img = image(&dir);
    let want = sha256sum(&img);
    let file = format!("file={}", img.display());
    let peer = nbdkit(&dir, &["file", &file]);
    run_examples("nbdkit file (Unix socket)", &peer.uri(""), &want);
    // And over TCP.
    let peer = nbdkit_tcp(&dir, &["file", &file]);
    run_examples("nbdkit file (TCP)", &peer.uri(""), &want);
}

#[test]
fn client_examples_against_qemu_nbd() {
    if !require_peer("qemu-nbd") {
        return;
    }
    let dir = TempDir::new();
    let img = image(&dir);
    let want = sha256sum(&img);
    let peer = qemu_nbd(&dir, &["-f", "raw", img.to_str().unwrap()]);
    run_examples("qemu-nbd", &peer.uri(""), &want);
}
