//! What stands for the credentials in a build without TLS (the cargo
//! feature `tls` off): the same names, so that code using them compiles
//! either way, and any attempt to use TLS is the error
//! [`TlsError::NotBuilt`]. A URI that requires TLS (`nbds://`) then fails
//! to connect with that error; one that only allows it goes on without.

use super::{ClientTlsOptions, TlsError};

/// A client's TLS setup. Without the `tls` feature there is none: this
/// type has no values, and [`ClientTlsOptions::build`] refuses.
#[derive(Debug, Clone)]
pub enum ClientTls {}

impl ClientTlsOptions {
    /// Without the `tls` feature: always [`TlsError::NotBuilt`].
    pub fn build(&self) -> Result<ClientTls, TlsError> {
        Err(TlsError::NotBuilt)
    }
}

#[cfg(test)]
mod tests {
    use super::super::LazyClientTls;
    use super::*;
    use nbd_proto::uri::NbdUri;

    #[test]
    fn tls_is_refused_clearly() {
        let uri = NbdUri::parse("nbds+unix:///?socket=/s").unwrap();
        let lazy = LazyClientTls::from_uri(&uri).unwrap();
        let e = lazy.get().unwrap_err();
        assert!(matches!(e, TlsError::NotBuilt));
        assert!(e.to_string().contains("built without"), "{e}");
    }
}
