//! The command-line tools of the NBD stack, and the engines behind them:
//!
//! - `nbd-serve`: serve files, block devices or memory (like qemu-nbd and
//!   nbdkit), on the async server of `nbd-smol`;
//! - `nbd-info`: describe an export (like libnbd's nbdinfo), on the
//!   blocking client of `nbd-blocking`; [`info`] formats its reports;
//! - `nbd-copy`: copy between NBD exports, files, block devices and
//!   `null:`, stdin and stdout (like libnbd's nbdcopy); [`copy`] is the
//!   copying engine, [`progress`] its progress reports.
//!
//! `nbd-info` and `nbd-copy` also run a server as a subprocess, as
//! `nbdinfo -- [ CMD ARGS ... ]` does ([`captive`]); [`cli`] holds what
//! the three command lines share.
//!
//! The libraries (`nbd-proto`, `nbd-blocking`, `nbd-smol`) do not depend
//! on this crate, so their users never compile clap or signal-hook.
#![warn(missing_docs)]

pub mod captive;
pub mod cli;
pub mod copy;
pub mod info;
pub mod progress;
