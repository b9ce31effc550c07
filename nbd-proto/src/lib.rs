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
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod wire;

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod client;
pub mod server;
pub mod uri;
