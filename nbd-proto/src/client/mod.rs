//! The client side of the protocol: the handshake and transmission.

pub mod handshake;
pub mod session;
pub mod transmission;

pub use handshake::{
    ClientConfig, ClientHandshake, DEFAULT_MAX_IN_FLIGHT, ExportEntry, ExportInfo, HandshakeError, HandshakeStep,
    HandshakeViolation, MetaContext, Mode, Negotiated, OptionOutcome, ServerOptionError, TlsMode,
};
pub use session::{ClientEvent, ClientNeed, ClientSession, ClientSessionError, ClientStartTls, PayloadOut, Transmit};
pub use transmission::{
    ClientTransmission, Cookie, EncodedHeader, Extent, Extents, ReceiveNext, ReplyEvent, ReplyViolation, Request,
    RequestError, ServerError,
};
