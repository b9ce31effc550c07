//! The driving code of the fuzz targets, shared with the workspace's
//! `tests/tests/fuzz_corpus.rs` (in the `nbd-tests` crate, which includes
//! `drive/mod.rs`, `serve.rs` and `pump.rs` as modules by path and replays
//! `fuzz/seeds/*/`), so it must not depend on libFuzzer.

pub mod drive;
pub mod pump;
pub mod serve;
