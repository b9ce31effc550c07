//! Replays the fuzz seeds (`fuzz/seeds/TARGET/*`: the conversations
//! `fuzz/examples/gen_seeds.rs` writes and minimised corpora of the
//! cargo-fuzz targets) through the targets' own driving code
//! (`fuzz/src/drive/`, `fuzz/src/serve.rs` and `fuzz/src/pump.rs`,
//! included here by path), which drives `ClientSession`, `ServerSession`,
//! nbd-server's `ServeConnection` and nbd-net's client pump as a user's
//! driver does, so that every crash the
//! fuzzers found stays fixed and the invariants they check keep holding.
//! Needs no libFuzzer: plain `cargo test`.

#[allow(dead_code)]
#[path = "../../fuzz/src/drive/mod.rs"]
mod drive;

#[allow(dead_code)]
#[path = "../../fuzz/src/serve.rs"]
mod serve;

#[allow(dead_code)]
#[path = "../../fuzz/src/pump.rs"]
mod pump;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Runs every seed of `target` through drive; fails naming each seed
/// that panics.
fn replay(target: &str) {
    replay_with(target, |data| assert!(drive::run(target, data)));
}

/// Runs every seed of `target` through `run`; fails naming each seed that
/// panics.
fn replay_with(target: &str, run: impl Fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target);
    let mut seeds: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    let failed: Vec<String> = seeds
        .iter()
        .filter(|path| {
            let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            catch_unwind(AssertUnwindSafe(|| run(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: seeds that fail: {failed:#?}");
}

#[test]
fn every_target_has_seeds() {
    for target in drive::TARGETS.iter().chain(&["serve_connection", "client_pump"]) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target);
        assert!(dir.is_dir(), "missing {}", dir.display());
    }
}

#[test]
fn client_session() {
    replay("client_session");
}

#[test]
fn server_session() {
    replay("server_session");
}

#[test]
fn conversation() {
    replay("conversation");
}

#[test]
fn uri() {
    replay("uri");
}

#[test]
fn serve_connection() {
    replay_with("serve_connection", |data| {
        serve::serve_connection(data);
    });
}

#[test]
fn client_pump() {
    replay_with("client_pump", |data| {
        pump::client_pump(data);
    });
}
