//! Client and server configurations, option-mode calls and exports, from input bytes.

use super::*;

// ---------------------------------------------------------------------------
// Client configuration and option-mode calls
// ---------------------------------------------------------------------------

/// Four bytes: the client's configuration. Byte 0: bits 0-1 TLS (off,
/// allow, require, require), 2 option mode, 3 structured replies, 4
/// extended headers, 5 ask for block sizes, 6 strict, 7 manual release.
/// Byte 1: the export name ([`name`]). Byte 2: requests in flight (1 to 8).
/// Byte 3: the metadata contexts asked for ([`QUERIES`] by bit).
pub fn client_config(b: [u8; 4]) -> (ClientConfig, bool) {
    let config = ClientConfig::default()
        .export_name(name(b[1]))
        .tls(match b[0] & 3 {
            0 => TlsMode::Off,
            1 => TlsMode::Allow,
            _ => TlsMode::Require,
        })
        .opt_mode(b[0] & 4 != 0)
        .structured_replies(b[0] & 8 != 0)
        .extended_headers(b[0] & 16 != 0)
        .request_block_size(b[0] & 32 != 0)
        .strict(b[0] & 64 != 0)
        .meta_contexts(queries(b[3]).into_iter().map(String::from).collect())
        .max_in_flight(b[2] as usize % 8 + 1);
    (config, b[0] & 128 != 0)
}

/// An option-mode call, from three bytes: which, a name ([`name`]), the
/// queries of the meta-context options ([`QUERIES`] by bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptCall {
    /// `opt_list`
    List,
    /// `opt_info`
    Info(u8),
    /// `opt_go` with the configured export
    Go,
    /// `opt_go` with this one
    GoNamed(u8),
    /// `opt_list_meta_context`
    ListMeta(u8, u8),
    /// `opt_set_meta_context`
    SetMeta(u8, u8),
    /// `opt_structured_reply`
    Structured,
    /// `opt_extended_headers`
    Extended,
    /// `opt_abort`
    Abort,
}

impl OptCall {
    /// The call three bytes stand for.
    pub fn decode(which: u8, n: u8, q: u8) -> OptCall {
        match which % 9 {
            0 => OptCall::List,
            1 => OptCall::Info(n),
            2 => OptCall::Go,
            3 => OptCall::GoNamed(n),
            4 => OptCall::ListMeta(n, q),
            5 => OptCall::SetMeta(n, q),
            6 => OptCall::Structured,
            7 => OptCall::Extended,
            _ => OptCall::Abort,
        }
    }

    /// Makes the call on `s`.
    pub fn call(self, s: &mut ClientSession) -> Result<(), ClientSessionError> {
        match self {
            OptCall::List => s.opt_list(),
            OptCall::Info(n) => s.opt_info(&name(n)),
            OptCall::Go => s.opt_go(None),
            OptCall::GoNamed(n) => s.opt_go(Some(&name(n))),
            OptCall::ListMeta(n, q) => s.opt_list_meta_context(&name(n), &queries(q)),
            OptCall::SetMeta(n, q) => s.opt_set_meta_context(&name(n), &queries(q)),
            OptCall::Structured => s.opt_structured_reply(),
            OptCall::Extended => s.opt_extended_headers(),
            OptCall::Abort => s.opt_abort(),
        }
    }
}

// ---------------------------------------------------------------------------
// Server configuration and exports
// ---------------------------------------------------------------------------

/// Three bytes: the server's configuration. Byte 0: bit 0 oldstyle, bits
/// 1-2 TLS (none, forced, selective, selective), 3 allow `NBD_OPT_LIST`, 4
/// no zeroes, 5 `NBD_OPT_GO`, 6 structured replies, 7 extended headers.
/// Byte 1: most options (below 16, else the default). Byte 2: bit 0 a
/// small payload limit for clients that negotiated no block sizes.
pub fn server_config(b: [u8; 3]) -> ServerConfig {
    ServerConfig::default()
        .oldstyle(b[0] & 1 != 0)
        .tls(match (b[0] >> 1) & 3 {
            0 => TlsPolicy::NoTls,
            1 => TlsPolicy::ForcedTls,
            _ => TlsPolicy::SelectiveTls,
        })
        .allow_list(b[0] & 8 != 0)
        .no_zeroes(b[0] & 16 != 0)
        .support_go(b[0] & 32 != 0)
        .structured_replies(b[0] & 64 != 0)
        .extended_headers(b[0] & 128 != 0)
        .max_options(if b[1] < 16 {
            b[1] as u32
        } else {
            ServerConfig::default().max_options
        })
        .unnegotiated_max_payload(if b[2] & 1 != 0 {
            65536
        } else {
            ServerConfig::default().unnegotiated_max_payload
        })
}

/// An export, from seven bytes: name ([`name`]), description ([`name`], 7
/// for none), size (a table), flags (2 bytes), block sizes ([`block_size`],
/// 255 for invalid ones, which the session must refuse), then bits 0-4 the
/// contexts offered, 5 block sizes required, 6 TLS only, 7 the default.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// The name clients use.
    pub name: String,
    /// The details the handshake gives.
    pub details: ExportDetails,
    /// The export a client gets when it names none.
    pub default: bool,
}

pub(super) const EXPORT_CONTEXTS: [&str; 5] = [
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    "qemu:dirty-bitmap:b0",
    "x-vendor:wide",
    "nonamespace",
];

impl ExportSpec {
    /// The export seven bytes stand for.
    pub fn decode(b: [u8; 7]) -> ExportSpec {
        let name = name(b[0]);
        let size = match b[2] % 8 {
            0 => 0,
            1 => 1 << 20,
            2 => (1 << 20) + 1,
            3 => 512,
            4 => 1 << 40,
            5 => u64::MAX,
            6 => 255 * 4096,
            _ => i64::MAX as u64,
        };
        let mut details = ExportDetails::new(name.clone(), size);
        details.description = if b[1] % 8 == 7 { String::new() } else { self::name(b[1]) };
        details.flags = TransmissionFlags::from_bits_retain(u16::from_be_bytes([b[3], b[4]]));
        details.block_size = if b[5] == u8::MAX {
            Some(BlockSizeConstraints {
                minimum: 3,
                preferred: 4096,
                maximum: 4096,
            })
        } else {
            block_size(b[5])
        };
        details.meta_contexts = EXPORT_CONTEXTS
            .iter()
            .enumerate()
            .filter(|(i, _)| b[6] & (1 << i) != 0)
            .map(|(_, c)| (*c).to_owned())
            .collect();
        details.block_size_required = b[6] & 32 != 0;
        details.tls_only = b[6] & 64 != 0;
        ExportSpec {
            name,
            details,
            default: b[6] & 128 != 0,
        }
    }
}

/// The exports of the `server_session` target; an export is known by its
/// index.
#[derive(Debug, Clone, Default)]
pub struct Exports(pub Vec<ExportSpec>);

impl Exports {
    /// The export the session must choose for `name`.
    pub fn resolve(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|e| e.name == name).or_else(|| {
            if name.is_empty() {
                self.0.iter().position(|e| e.default)
            } else {
                None
            }
        })
    }
}

impl ExportLookup for Exports {
    type Export = usize;
    fn lookup(&self, name: &str) -> Option<(ExportDetails, usize)> {
        let i = self.0.iter().position(|e| e.name == name)?;
        Some((self.0[i].details.clone(), i))
    }
    fn default_export(&self) -> Option<(ExportDetails, usize)> {
        let i = self.0.iter().position(|e| e.default)?;
        Some((self.0[i].details.clone(), i))
    }
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        for e in &self.0 {
            each(ExportListing {
                name: &e.name,
                description: &e.details.description,
                tls_only: e.details.tls_only,
            });
        }
    }
}
