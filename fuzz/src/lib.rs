//! The driving code of the fuzz targets, shared with
//! `nbd-proto/tests/fuzz_corpus.rs` (which includes `drive.rs` by path and
//! replays `fuzz/seeds/*/`), so it must not depend on libFuzzer.

pub mod drive;
