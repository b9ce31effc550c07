//! The qcow2 header: read once, checked as QEMU's qcow2 driver checks it
//! when it opens an image, before anything else (the bitmap parser,
//! `imago`) looks at the file.
//!
//! The layout is QEMU's `docs/interop/qcow2.txt`. The limits are those of
//! QEMU's qcow2 driver (`block/qcow2.c`, `block/qcow2.h`): an image QEMU
//! refuses to open is refused here too, with an error naming the header
//! field at fault. Every computation is checked: no header bytes make this
//! panic.

use std::fmt;
use std::io;

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest cluster size, as a power of two (QEMU's `MIN_CLUSTER_BITS`).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size, as a power of two (QEMU's `MAX_CLUSTER_BITS`).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest active L1 table, in bytes (QEMU's `QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table, in bytes (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots (QEMU's `QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u64 = 65536;
/// Longest backing file name, in bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest refcount_order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Size of the fixed part of a snapshot table entry.
const SNAPSHOT_HEADER_BYTES: u64 = 40;
/// Size of a version 2 header.
const V2_LEN: usize = 72;
/// Size of the version 3 fixed header (without `compression_type`).
const V3_LEN: usize = 104;
/// What is read: the version 3 header and its `compression_type` byte.
const READ_LEN: usize = V3_LEN + 8;

/// Incompatible feature bit 0: refcounts may be inconsistent.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: `compression_type` is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible feature bit the format defines.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Positional reads from an image file (or a byte slice, for tests and
/// fuzzing).
pub trait ReadAt {
    /// Fills `buf` from `offset`; short files are an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The file's length in bytes.
    fn file_len(&self) -> io::Result<u64>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        buf.copy_from_slice(self.get(start..end).ok_or_else(eof)?);
        Ok(())
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the image file")
}

/// The version 2 header, as stored (big-endian).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawV2 {
    magic: [u8; 4],
    version: U32,
    backing_file_offset: U64,
    backing_file_size: U32,
    cluster_bits: U32,
    size: U64,
    crypt_method: U32,
    l1_size: U32,
    l1_table_offset: U64,
    refcount_table_offset: U64,
    refcount_table_clusters: U32,
    nb_snapshots: U32,
    snapshots_offset: U64,
}

/// The fields version 3 adds, as stored (big-endian), and the optional
/// `compression_type` byte.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawV3 {
    incompatible_features: U64,
    compatible_features: U64,
    autoclear_features: U64,
    refcount_order: U32,
    header_length: U32,
    compression_type: u8,
}

/// What is wrong with a qcow2 header.
#[derive(Debug)]
pub enum HeaderError {
    /// Reading the file failed.
    Io(io::Error),
    /// A header field breaks the format's rules or QEMU's limits.
    Invalid {
        /// The field's name, as `docs/interop/qcow2.txt` spells it.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl HeaderError {
    /// The name of the offending field, if a field is at fault.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            HeaderError::Io(_) => None,
            HeaderError::Invalid { field, .. } => Some(field),
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Io(e) => write!(f, "reading the qcow2 header: {e}"),
            HeaderError::Invalid { field, detail } => write!(f, "invalid qcow2 header: {field}: {detail}"),
        }
    }
}

impl std::error::Error for HeaderError {}

impl From<io::Error> for HeaderError {
    fn from(e: io::Error) -> Self {
        HeaderError::Io(e)
    }
}

impl From<HeaderError> for io::Error {
    fn from(e: HeaderError) -> Self {
        match e {
            HeaderError::Io(e) => e,
            HeaderError::Invalid { .. } => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        }
    }
}

fn bad<T>(field: &'static str, detail: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Invalid {
        field,
        detail: detail.into(),
    })
}

/// A qcow2 header whose fields passed QEMU's open-time checks. Version 2
/// headers carry the version 3 fields' implied values (no features,
/// 16-bit refcounts, a 72-byte header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// Format version, 2 or 3.
    pub version: u32,
    /// Where the backing file name is (0: no backing file).
    pub backing_file_offset: u64,
    /// Length of the backing file name, in bytes.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method (always 0 here: encrypted images are refused).
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Where the active L1 table is.
    pub l1_table_offset: u64,
    /// Where the refcount table is.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table is.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (only ones the format defines).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes; header extensions follow it.
    pub header_length: u32,
    /// Compression type: 0 zlib, 1 zstd.
    pub compression_type: u8,
}

/// A metadata table the header points at, and its limits.
struct Table {
    offset_field: &'static str,
    size_field: &'static str,
    what: &'static str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
}

/// QEMU's check of a metadata table's location (`qcow2_validate_table`):
/// at most `max_bytes` long, cluster-aligned, and ending below 2^63.
fn check_table(t: Table, cluster_size: u64) -> Result<(), HeaderError> {
    let Table {
        offset_field,
        size_field,
        what,
        offset,
        entries,
        entry_len,
        max_bytes,
    } = t;
    if entries > max_bytes / entry_len {
        return bad(
            size_field,
            format!("{entries}: the {what} would exceed {max_bytes} bytes (too large)"),
        );
    }
    // Cannot overflow: bounded by max_bytes above.
    let bytes = entries * entry_len;
    if !offset.is_multiple_of(cluster_size) {
        return bad(
            offset_field,
            format!("{offset:#x}: the {what} is not aligned to the {cluster_size}-byte cluster size"),
        );
    }
    if offset > i64::MAX as u64 - bytes {
        return bad(
            offset_field,
            format!("{offset:#x}: the {what} ({bytes} bytes) would end past 2^63"),
        );
    }
    Ok(())
}

impl Qcow2Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Reads the header of the image in `file` and checks it (see
    /// [`Qcow2Header::parse`]).
    pub fn read<R: ReadAt + ?Sized>(file: &R) -> Result<Qcow2Header, HeaderError> {
        let len = file.file_len()?;
        let mut buf = [0u8; READ_LEN];
        let n = usize::try_from(len).map_or(READ_LEN, |l| l.min(READ_LEN));
        file.read_exact_at(&mut buf[..n], 0)?;
        Qcow2Header::parse(&buf[..n])
    }

    /// Decodes and checks a header from the first bytes of an image (at
    /// least 72, or 104 for version 3; more is ignored), refusing what
    /// QEMU refuses when it opens an image, plus what this crate does not
    /// serve (encryption, unknown incompatible features). The checks and
    /// their order follow QEMU's qcow2 driver; the error names the field.
    pub fn parse(bytes: &[u8]) -> Result<Qcow2Header, HeaderError> {
        let Ok((v2, rest)) = RawV2::ref_from_prefix(bytes) else {
            if bytes.len() >= 4 && bytes[..4] != QCOW2_MAGIC {
                return bad("magic", "not a qcow2 image (bad magic)");
            }
            return bad(
                "header",
                format!("the file is {} bytes, too short for a qcow2 header", bytes.len()),
            );
        };
        if v2.magic != QCOW2_MAGIC {
            return bad("magic", "not a qcow2 image (bad magic)");
        }
        let version = v2.version.get();
        if !(2..=3).contains(&version) {
            return bad("version", format!("{version}: only versions 2 and 3 exist"));
        }
        let cluster_bits = v2.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return bad(
                "cluster_bits",
                format!(
                    "{cluster_bits}: unsupported cluster size (2^{MIN_CLUSTER_BITS} to 2^{MAX_CLUSTER_BITS} bytes allowed)"
                ),
            );
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Qcow2Header {
            version,
            backing_file_offset: v2.backing_file_offset.get(),
            backing_file_size: v2.backing_file_size.get(),
            cluster_bits,
            size: v2.size.get(),
            crypt_method: v2.crypt_method.get(),
            l1_size: v2.l1_size.get(),
            l1_table_offset: v2.l1_table_offset.get(),
            refcount_table_offset: v2.refcount_table_offset.get(),
            refcount_table_clusters: v2.refcount_table_clusters.get(),
            nb_snapshots: v2.nb_snapshots.get(),
            snapshots_offset: v2.snapshots_offset.get(),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_LEN as u32,
            compression_type: 0,
        };
        if version == 3 {
            // A short compression_type byte reads as zero (zlib), as QEMU
            // reads past the end of a file.
            let mut v3 = [0u8; READ_LEN - V2_LEN];
            let have = rest.len().min(v3.len());
            if have < V3_LEN - V2_LEN {
                return bad(
                    "header_length",
                    format!("the file is {} bytes, too short for a version 3 header", bytes.len()),
                );
            }
            v3[..have].copy_from_slice(&rest[..have]);
            let Ok(v3) = RawV3::ref_from_prefix(&v3[..]).map(|(v3, _)| v3) else {
                return bad("header_length", "version 3 header unreadable");
            };
            h.incompatible_features = v3.incompatible_features.get();
            h.compatible_features = v3.compatible_features.get();
            h.autoclear_features = v3.autoclear_features.get();
            h.refcount_order = v3.refcount_order.get();
            h.header_length = v3.header_length.get();
            if (h.header_length as usize) < V3_LEN {
                return bad(
                    "header_length",
                    format!("{}: a version 3 header is at least {V3_LEN} bytes", h.header_length),
                );
            }
            if !h.header_length.is_multiple_of(8) {
                return bad("header_length", format!("{}: not a multiple of 8", h.header_length));
            }
            if h.header_length as usize > V3_LEN {
                h.compression_type = v3.compression_type;
            }
        }
        if u64::from(h.header_length) > cluster_size {
            return bad(
                "header_length",
                format!(
                    "{}: the header exceeds the {cluster_size}-byte cluster",
                    h.header_length
                ),
            );
        }
        if h.backing_file_offset > cluster_size {
            return bad(
                "backing_file_offset",
                format!(
                    "{:#x}: the backing file name must be in the first cluster ({cluster_size} bytes)",
                    h.backing_file_offset
                ),
            );
        }
        match h.compression_type {
            0 if h.incompatible_features & INCOMPAT_COMPRESSION != 0 => {
                return bad(
                    "compression_type",
                    "0 (zlib), but the compression type incompatible feature bit is set",
                );
            }
            1 if h.incompatible_features & INCOMPAT_COMPRESSION == 0 => {
                return bad(
                    "compression_type",
                    "1 (zstd), but the compression type incompatible feature bit is clear",
                );
            }
            0 | 1 => {}
            t => return bad("compression_type", format!("{t}: unknown compression type")),
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| b.to_string())
                .collect();
            return bad(
                "incompatible_features",
                format!("unknown incompatible feature bit(s) {}", bits.join(", ")),
            );
        }
        if h.refcount_order > MAX_REFCOUNT_ORDER {
            return bad(
                "refcount_order",
                format!(
                    "{}: refcounts wider than 64 bits (refcount_order at most {MAX_REFCOUNT_ORDER})",
                    h.refcount_order
                ),
            );
        }
        match h.crypt_method {
            0 => {}
            m @ (1 | 2) => {
                return bad(
                    "crypt_method",
                    format!(
                        "{m} ({}): encrypted qcow2 images are not supported",
                        if m == 1 { "AES" } else { "LUKS" }
                    ),
                );
            }
            m => return bad("crypt_method", format!("{m}: unknown encryption method")),
        }
        let extl2 = h.incompatible_features & INCOMPAT_EXTL2 != 0;
        if extl2 && cluster_bits < 14 {
            return bad(
                "cluster_bits",
                format!("{cluster_bits}: extended L2 entries need clusters of at least 16384 bytes"),
            );
        }
        if h.refcount_table_clusters == 0 {
            return bad("refcount_table_clusters", "0: the image has no refcount table");
        }
        check_table(
            Table {
                offset_field: "refcount_table_offset",
                size_field: "refcount_table_clusters",
                what: "refcount table",
                offset: h.refcount_table_offset,
                entries: u64::from(h.refcount_table_clusters),
                entry_len: cluster_size,
                max_bytes: MAX_REFTABLE_BYTES,
            },
            cluster_size,
        )?;
        check_table(
            Table {
                offset_field: "snapshots_offset",
                size_field: "nb_snapshots",
                what: "snapshot table",
                offset: h.snapshots_offset,
                entries: u64::from(h.nb_snapshots),
                entry_len: SNAPSHOT_HEADER_BYTES,
                max_bytes: SNAPSHOT_HEADER_BYTES * MAX_SNAPSHOTS,
            },
            cluster_size,
        )?;
        check_table(
            Table {
                offset_field: "l1_table_offset",
                size_field: "l1_size",
                what: "L1 table",
                offset: h.l1_table_offset,
                entries: u64::from(h.l1_size),
                entry_len: 8,
                max_bytes: MAX_L1_BYTES,
            },
            cluster_size,
        )?;
        // One L2 table (a cluster of 8- or 16-byte entries) maps
        // 2^(cluster_bits + l2_bits) bytes; the L1 table must reach the
        // whole disk, in at most INT_MAX entries.
        let l2_bits = cluster_bits - if extl2 { 4 } else { 3 };
        let l1_needed = h.size.div_ceil(1u64 << (cluster_bits + l2_bits));
        if h.size > i64::MAX as u64 || l1_needed > i32::MAX as u64 {
            return bad(
                "size",
                format!(
                    "{}: the image is too big (it would need {l1_needed} L1 entries)",
                    h.size
                ),
            );
        }
        if u64::from(h.l1_size) < l1_needed {
            return bad(
                "l1_size",
                format!(
                    "{}: the L1 table is too small for the {}-byte disk ({l1_needed} entries needed)",
                    h.l1_size, h.size
                ),
            );
        }
        if h.backing_file_offset != 0 {
            let room = (cluster_size - h.backing_file_offset).min(u64::from(MAX_BACKING_NAME));
            if u64::from(h.backing_file_size) > room {
                return bad(
                    "backing_file_size",
                    format!(
                        "{}: the backing file name must fit in the first cluster and be at most \
                         {MAX_BACKING_NAME} bytes",
                        h.backing_file_size
                    ),
                );
            }
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put32(h: &mut [u8], at: usize, v: u32) {
        h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(h: &mut [u8], at: usize, v: u64) {
        h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// The header `qemu-img create -f qcow2 x 64M` writes: v3, 64 KiB
    /// clusters, L1 at 0x30000 (1 entry), refcount table at 0x10000.
    fn good_v3() -> Vec<u8> {
        let mut h = vec![0u8; READ_LEN];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        put32(&mut h, 4, 3);
        put32(&mut h, 20, 16);
        put64(&mut h, 24, 64 << 20);
        put32(&mut h, 36, 1);
        put64(&mut h, 40, 0x30000);
        put64(&mut h, 48, 0x10000);
        put32(&mut h, 56, 1);
        put32(&mut h, 96, 4);
        put32(&mut h, 100, 112);
        h
    }

    fn refused(h: &[u8], field: &str) {
        match Qcow2Header::parse(h) {
            Err(e) => {
                assert_eq!(e.field(), Some(field), "{e}");
                assert!(e.to_string().contains(field), "{e}");
            }
            Ok(h) => panic!("accepted, expected a refusal of {field}: {h:?}"),
        }
    }

    #[test]
    fn accepts_qemu_headers() {
        let h = Qcow2Header::parse(&good_v3()).unwrap();
        assert_eq!((h.version, h.cluster_size(), h.size), (3, 65536, 64 << 20));
        // Version 2: 72 bytes, v3 fields implied.
        let mut v2 = good_v3();
        put32(&mut v2, 4, 2);
        let h = Qcow2Header::parse(&v2[..72]).unwrap();
        assert_eq!((h.header_length, h.refcount_order), (72, 4));
        // A backing file name right after the header.
        let mut b = good_v3();
        put64(&mut b, 8, 0x200);
        put32(&mut b, 16, 1023);
        assert!(Qcow2Header::parse(&b).is_ok());
        // The largest disk 64 KiB clusters and the largest L1 table reach.
        let mut l = good_v3();
        put32(&mut l, 36, (MAX_L1_BYTES / 8) as u32);
        put64(&mut l, 24, (MAX_L1_BYTES / 8) << 29);
        assert!(Qcow2Header::parse(&l).is_ok());
    }

    #[test]
    fn refuses_each_field() {
        let g = good_v3();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut h = g.clone();
            f(&mut h);
            h
        };
        refused(&with(&|h| h[0] = b'X'), "magic");
        refused(&g[..50], "header");
        refused(&with(&|h| put32(h, 4, 4)), "version");
        refused(&with(&|h| put32(h, 4, 1)), "version");
        for bits in [0, 8, 22, 30, 64, u32::MAX] {
            refused(&with(&|h| put32(h, 20, bits)), "cluster_bits");
        }
        refused(&g[..100], "header_length");
        refused(&with(&|h| put32(h, 100, 72)), "header_length");
        refused(&with(&|h| put32(h, 100, 108)), "header_length");
        refused(&with(&|h| put32(h, 100, 0x10008)), "header_length");
        refused(&with(&|h| put32(h, 100, u32::MAX)), "header_length");
        refused(&with(&|h| put64(h, 8, 0x10001)), "backing_file_offset");
        refused(&with(&|h| h[104] = 2), "compression_type");
        refused(&with(&|h| h[104] = 1), "compression_type");
        refused(&with(&|h| put64(h, 72, INCOMPAT_COMPRESSION)), "compression_type");
        refused(&with(&|h| put64(h, 72, 1 << 5)), "incompatible_features");
        refused(&with(&|h| put64(h, 72, 1 << 63)), "incompatible_features");
        refused(&with(&|h| put32(h, 96, 7)), "refcount_order");
        refused(&with(&|h| put32(h, 96, u32::MAX)), "refcount_order");
        refused(&with(&|h| put32(h, 32, 1)), "crypt_method");
        refused(&with(&|h| put32(h, 32, 2)), "crypt_method");
        refused(&with(&|h| put32(h, 32, 3)), "crypt_method");
        refused(
            &with(&|h| {
                put32(h, 20, 12);
                put64(h, 72, INCOMPAT_EXTL2);
            }),
            "cluster_bits",
        );
        refused(&with(&|h| put32(h, 56, 0)), "refcount_table_clusters");
        refused(&with(&|h| put32(h, 56, 129)), "refcount_table_clusters");
        refused(&with(&|h| put64(h, 48, 0x10200)), "refcount_table_offset");
        refused(&with(&|h| put64(h, 48, u64::MAX - 0xffff)), "refcount_table_offset");
        refused(&with(&|h| put32(h, 60, 65537)), "nb_snapshots");
        refused(&with(&|h| put64(h, 64, 0x123)), "snapshots_offset");
        refused(
            &with(&|h| {
                put32(h, 60, 1);
                put64(h, 64, 1 << 63);
            }),
            "snapshots_offset",
        );
        refused(&with(&|h| put32(h, 36, (MAX_L1_BYTES / 8) as u32 + 1)), "l1_size");
        refused(&with(&|h| put32(h, 36, u32::MAX)), "l1_size");
        refused(&with(&|h| put64(h, 40, 0x30200)), "l1_table_offset");
        refused(&with(&|h| put64(h, 40, 1 << 63)), "l1_table_offset");
        refused(&with(&|h| put64(h, 24, 1 << 62)), "size");
        refused(&with(&|h| put64(h, 24, u64::MAX)), "size");
        refused(&with(&|h| put64(h, 24, (64 << 20) + 1 + (512 << 20))), "l1_size");
        refused(&with(&|h| put32(h, 36, 0)), "l1_size");
        // 2 MiB clusters reach 2^62 bytes only with 2^23 L1 entries: more
        // than the L1 table may hold.
        refused(
            &with(&|h| {
                put32(h, 20, 21);
                put64(h, 40, 2 << 20);
                put64(h, 48, 4 << 20);
                put32(h, 36, (MAX_L1_BYTES / 8) as u32);
                put64(h, 24, 1 << 62);
            }),
            "l1_size",
        );
        refused(
            &with(&|h| {
                put64(h, 8, 0x200);
                put32(h, 16, 1024);
            }),
            "backing_file_size",
        );
        refused(
            &with(&|h| {
                put64(h, 8, 0xff00);
                put32(h, 16, 0x101);
            }),
            "backing_file_size",
        );
        refused(
            &with(&|h| {
                put64(h, 8, 0x200);
                put32(h, 16, u32::MAX);
            }),
            "backing_file_size",
        );
    }

    #[test]
    fn never_panics() {
        // Every truncation and every single-byte change of a good header,
        // and headers of all-ones and random-ish fields.
        let g = good_v3();
        for n in 0..g.len() {
            let _ = Qcow2Header::parse(&g[..n]);
        }
        for at in 0..g.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut h = g.clone();
                h[at] = v;
                let _ = Qcow2Header::parse(&h);
            }
        }
        let mut h = vec![0xffu8; READ_LEN];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        let _ = Qcow2Header::parse(&h);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            for b in h[4..].iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            h[4..8].copy_from_slice(&[0, 0, 0, 2 + (x as u8 & 1)]);
            h[20..24].copy_from_slice(&[0, 0, 0, 9 + (x >> 8) as u8 % 13]);
            let _ = Qcow2Header::parse(&h);
        }
    }

    #[test]
    fn reads_from_files_of_any_length() {
        let g = good_v3();
        assert!(Qcow2Header::read(&g[..]).is_ok());
        assert!(Qcow2Header::read(&g[..104]).is_ok());
        assert_eq!(Qcow2Header::read(&g[..10]).unwrap_err().field(), Some("header"));
        let mut big = g.clone();
        big.resize(1 << 20, 0);
        assert!(Qcow2Header::read(&big[..]).is_ok());
    }
}
