//! Drives nbd-proto's sessions ([`ClientSession`], [`ServerSession`]) from
//! fuzz input exactly as a user's driver does, checking invariants as it
//! goes. Shared by the fuzz targets (`fuzz/fuzz_targets/`) and by
//! the workspace's `tests/tests/fuzz_corpus.rs` (in the `nbd-tests` crate),
//! which includes this file as a module by path (its submodules are found
//! next to it) and replays
//! `fuzz/seeds/*/` under `cargo test`; so nothing here may depend on
//! libFuzzer.
//!
//! - `client_session`: a client configuration, then a script of driver
//!   actions interleaved with the bytes the server sends (see
//!   [`client_session`] for the layout): feeds of any size, exact counts,
//!   READ data moved by the driver, option-mode calls, requests, misuse
//!   probes, the loss of the connection.
//! - `server_session`: the same for a server, its configuration and its
//!   exports ([`ExportLookup`]) first, then the client's bytes.
//! - `conversation`: an `arbitrary` [`Scenario`]: a client session talks to
//!   a server session (both configured by the fuzzer) over an in-memory
//!   connection, with requests, option-mode calls, cuts, reconnections and
//!   injected storage errors; reads must return what a model of the disk
//!   says.
//! - `uri`: NBD URIs parse, format and parse back to the same value.
//!
//! Submodules: `input` (the input and the choices its bytes stand for),
//! `config` (configurations, option-mode calls, exports), `checks` (what
//! each side sends, and the checks of what the sessions report), `encoder`
//! (the reply encoder), `source` (where a driver reads from), `client` and
//! `server` (the drivers and their targets), `conversation` and `model`
//! (the `conversation` target and its disk), `uri`.

use std::collections::{BTreeMap, HashMap, HashSet};

use arbitrary::{Arbitrary, Unstructured};
use nbd_proto::client::{
    ClientConfig, ClientEvent, ClientNeed, ClientSession, ClientSessionError, Cookie, Negotiated, OptionOutcome,
    Request, RequestError, ServerError, TlsMode, Transmit,
};
use nbd_proto::common::Mode;
use nbd_proto::server::{
    ContextSelection, ExportDetails, ExportListing, ExportLookup, ReplyEncoder, ServerConfig, ServerEvent, ServerNeed,
    ServerNegotiated, ServerRequest, ServerSession, ServerSessionError, TlsPolicy,
};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::*;
use zerocopy::FromBytes;

/// The fuzz targets, by name (the directories of `fuzz/seeds/`).
pub const TARGETS: &[&str] = &["client_session", "server_session", "conversation", "uri"];

/// Runs the target called `name` on `data`; false for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "client_session" => {
            client_session(data);
        }
        "server_session" => {
            server_session(data);
        }
        "conversation" => {
            conversation(data);
        }
        "uri" => uri(data),
        _ => return false,
    }
    true
}

/// Calls a loop may make without running out of input: more means a
/// session is going round in circles (a hang).
const MAX_STEPS: usize = 1 << 16;

mod checks;
mod client;
mod config;
mod conversation;
mod encoder;
mod input;
mod model;
mod server;
mod source;
mod uri;

use checks::*;
pub use client::*;
pub use config::*;
pub use conversation::*;
pub use encoder::*;
pub use input::*;
pub use model::*;
pub use server::*;
pub use source::*;
pub use uri::*;
