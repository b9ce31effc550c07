//! A sans-IO implementation of the Network Block Device (NBD) protocol.
//!
//! This crate holds the whole protocol: the wire format ([`wire`]) and the
//! client and server state machines for the handshake (option haggling) and
//! for transmission. It performs no I/O, reads no clock and spawns nothing:
//! bytes go in, events and bytes come out. Drivers (`nbd-blocking`,
//! `nbd-smol`, or your own event loop) own the sockets and the buffers.
//!
//! Payloads are never copied by this crate: a READ reply's data or a WRITE
//! request's data is announced as "the next N bytes belong to cookie C",
//! and the driver moves them between the socket and the caller's buffer.
//!
//! # Where to start
//!
//! [`ClientSession`] and [`ServerSession`] each own one connection's whole
//! life (handshake, TLS upgrade, transmission) and are what a driver pumps:
//! input with `need`/`feed` (or, for payloads, by moving the bytes itself
//! and reporting the count), output with `poll_transmit`, events returned
//! by the input methods. Their module docs give the loop a driver runs.
//! Underneath them, the four machines ([`client::ClientHandshake`],
//! [`client::ClientTransmission`], [`server::ServerHandshake`],
//! [`server::ServerTransmission`]) stay public for drivers that want one
//! phase only; [`wire`] has every constant and header of the spec, [`uri`]
//! parses NBD URIs, [`time`] is how a driver tells a session the time, and
//! [`common`] holds what both sides share.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod wire;

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod client;
pub mod common;
pub mod driver;
pub mod server;
pub mod time;
pub mod uri;

pub use client::ClientSession;
pub use server::ServerSession;
