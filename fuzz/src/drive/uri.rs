//! The `uri` target.

use super::*;

// ---------------------------------------------------------------------------
// URIs
// ---------------------------------------------------------------------------

/// The `uri` target: a parsed URI formats back to a string that parses to
/// the same value.
pub fn uri(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let Ok(parsed) = NbdUri::parse(&s) else {
        return;
    };
    let again = parsed.to_uri_string();
    let back = NbdUri::parse(&again).unwrap_or_else(|e| panic!("{s:?} formats as {again:?}, which fails: {e}"));
    assert_eq!(back, parsed, "{s:?} formats as {again:?}");
}
