//! The client side of the protocol: the handshake and transmission.

pub mod handshake;
pub mod transmission;

pub use handshake::{
    ClientConfig, ClientHandshake, ExportEntry, ExportInfo, HandshakeError, HandshakeStep, HandshakeViolation,
    MetaContext, Mode, Negotiated, OptionOutcome, ServerOptionError, TlsMode,
};
pub use transmission::{
    ClientTransmission, Cookie, EncodedHeader, Extent, Extents, ReceiveNext, ReplyEvent, ReplyViolation, Request,
    RequestError, ServerError,
};
