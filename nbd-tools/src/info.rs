//! What `nbd-info` reports about a server and its exports, gathered with
//! the blocking client (kept apart from the rendering so tests can use it).

use nbd_proto::client::{Mode, Negotiated};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{BlockSizeConstraints, TransmissionFlags};

use nbd_blocking::client::{Error, Negotiation};

/// Formats a size as libnbd's `human_size` does: the largest binary
/// suffix (K, M, G, T, P, E) that divides it exactly, else plain bytes.
pub fn human_size(bytes: u64) -> String {
    const EXT: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    let mut b = bytes;
    let mut i = 0;
    if b != 0 {
        while b & 1023 == 0 && i < 6 {
            b >>= 10;
            i += 1;
        }
    }
    format!("{b}{}", EXT[i])
}

/// Server-wide facts.
#[derive(Debug, Clone)]
pub struct ProtocolReport {
    /// `oldstyle`, `newstyle` or `newstyle-fixed`.
    pub protocol: &'static str,
    /// Whether TLS is in use.
    pub tls: bool,
    /// Whether structured replies (or extended headers) were negotiated.
    pub structured: bool,
    /// Whether extended headers were negotiated.
    pub extended: bool,
}

impl ProtocolReport {
    /// From a connection in option mode.
    pub fn from_negotiation(n: &Negotiation) -> Self {
        ProtocolReport {
            protocol: n.session().protocol_name(),
            tls: n.session().tls(),
            structured: n.session().structured_replies(),
            extended: n.session().extended_headers(),
        }
    }
}

/// Everything reported about one export.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// Protocol name of the connection that gathered this.
    pub protocol: &'static str,
    /// Export name.
    pub name: String,
    /// Description, if the server sent one.
    pub description: Option<String>,
    /// URI of the export.
    pub uri: String,
    /// Metadata contexts the server offers (None without structured replies).
    pub contexts: Option<Vec<String>>,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Size in bytes.
    pub size: u64,
    /// Block-size constraints, if advertised.
    pub block_size: Option<BlockSizeConstraints>,
}

impl ExportReport {
    fn uri_for(uri: &NbdUri, name: &str) -> String {
        let mut u = uri.clone();
        u.export = name.to_string();
        u.to_uri_string()
    }

    /// Gathers an export's facts in option mode (`NBD_OPT_INFO` and
    /// `NBD_OPT_LIST_META_CONTEXT`), leaving the connection in option mode.
    pub fn from_option_mode(neg: &mut Negotiation, uri: &NbdUri, name: &str) -> Result<ExportReport, Error> {
        let info = neg.info(name)?;
        let contexts = if neg.session().structured_replies() {
            Some(neg.list_meta_contexts(name, &[])?.into_iter().map(|c| c.name).collect())
        } else {
            None
        };
        Ok(ExportReport {
            protocol: neg.session().protocol_name(),
            name: name.to_string(),
            description: info.description,
            uri: Self::uri_for(uri, name),
            contexts,
            flags: info.flags.unwrap_or(TransmissionFlags::HAS_FLAGS),
            size: info.size,
            block_size: info.block_size,
        })
    }

    /// Gathers the facts of the URI's export by entering transmission
    /// (`NBD_OPT_GO`), then disconnects politely.
    pub fn single(mut neg: Negotiation, uri: &NbdUri) -> Result<ExportReport, Error> {
        let protocol = neg.session().protocol_name();
        let contexts = if !neg.is_done() && neg.session().structured_replies() {
            Some(
                neg.list_meta_contexts(&uri.export, &[])?
                    .into_iter()
                    .map(|c| c.name)
                    .collect(),
            )
        } else {
            None
        };
        let client = neg.go(&uri.export)?;
        let n: Negotiated = client.negotiated().clone();
        let _ = client.disconnect();
        Ok(ExportReport {
            protocol: if n.mode == Mode::Oldstyle { "oldstyle" } else { protocol },
            name: uri.export.clone(),
            description: n.description,
            uri: Self::uri_for(uri, &uri.export),
            contexts,
            flags: n.flags,
            size: n.size,
            block_size: n.block_size,
        })
    }

    /// The boolean facts, in the order and with the names nbdinfo uses.
    pub fn bools(&self) -> [(&'static str, bool); 11] {
        let f = self.flags;
        [
            ("is_rotational", f.contains(TransmissionFlags::ROTATIONAL)),
            ("is_read_only", f.contains(TransmissionFlags::READ_ONLY)),
            ("can_cache", f.contains(TransmissionFlags::SEND_CACHE)),
            ("can_df", f.contains(TransmissionFlags::SEND_DF)),
            ("can_fast_zero", f.contains(TransmissionFlags::SEND_FAST_ZERO)),
            ("can_flush", f.contains(TransmissionFlags::SEND_FLUSH)),
            ("can_fua", f.contains(TransmissionFlags::SEND_FUA)),
            ("can_multi_conn", f.contains(TransmissionFlags::CAN_MULTI_CONN)),
            ("can_trim", f.contains(TransmissionFlags::SEND_TRIM)),
            ("can_zero", f.contains(TransmissionFlags::SEND_WRITE_ZEROES)),
            (
                "can_block_status_payload",
                f.contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD),
            ),
        ]
    }
}
