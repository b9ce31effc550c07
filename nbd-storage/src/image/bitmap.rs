//! Persistent dirty bitmaps of qcow2 images, read-only.
//!
//! The layout is QEMU's `docs/interop/qcow2.txt`: a header extension of
//! type `0x23852875` points at the bitmap directory; each directory entry
//! names a bitmap and points at its bitmap table, whose entries point at
//! clusters of bitmap data (bit `k`, least significant bit first, covers
//! guest bytes `k * granularity .. (k + 1) * granularity`). Bitmaps are
//! valid only while the header's autoclear bit 0 is set: whoever opens the
//! image writable without knowing bitmaps clears it, and QEMU then ignores
//! them.
//!
//! Everything read from the file is validated before it is used: every
//! offset and length is checked against the file size and the format's
//! limits before a buffer is sized from it, so a hostile image yields an
//! error, never a panic or a huge allocation. [`Qcow2Bitmaps::parse`] is the
//! fuzz target's entry point.

use std::fmt;
use std::io;

use super::header::{HeaderError, Qcow2Header};
pub use super::header::{QCOW2_MAGIC, ReadAt};

/// Header extension type of the bitmaps extension.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear feature bit: the bitmaps extension is consistent.
const AUTOCLEAR_BITMAPS: u64 = 1;
/// Most bitmaps an image may have (QEMU's `QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest bitmap name.
const MAX_NAME: usize = 1023;
/// Largest bitmap table accepted, in entries (QEMU's
/// `BME_MAX_TABLE_SIZE`): 2^27 entries of 8 bytes.
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Granularity limits (QEMU's `BME_MIN/MAX_GRANULARITY_BITS`).
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;

/// Bitmap directory entry flag: the bitmap was open writable and not
/// stored back; its contents are meaningless.
const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap directory entry flag: the bitmap is enabled (tracks writes).
const FLAG_AUTO: u32 = 1 << 1;
/// Bitmap directory entry flag: unknown extra data may be ignored.
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;

/// What is wrong with an image's bitmaps.
#[derive(Debug)]
pub enum BitmapError {
    /// Reading the file failed.
    Io(io::Error),
    /// The image's header is invalid (not a bitmap problem: the header
    /// check refuses the image whether it has bitmaps or not).
    Header(HeaderError),
    /// A field breaks the format's rules; the text says which.
    Invalid(String),
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapError::Io(e) => write!(f, "reading the qcow2 bitmaps: {e}"),
            BitmapError::Header(e) => e.fmt(f),
            BitmapError::Invalid(s) => write!(f, "invalid qcow2 bitmap metadata: {s}"),
        }
    }
}

impl std::error::Error for BitmapError {}

impl From<io::Error> for BitmapError {
    fn from(e: io::Error) -> Self {
        BitmapError::Io(e)
    }
}

impl From<HeaderError> for BitmapError {
    fn from(e: HeaderError) -> Self {
        BitmapError::Header(e)
    }
}

impl From<BitmapError> for io::Error {
    fn from(e: BitmapError) -> Self {
        match e {
            BitmapError::Io(e) => e,
            BitmapError::Header(e) => e.into(),
            BitmapError::Invalid(_) => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        }
    }
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, BitmapError> {
    Err(BitmapError::Invalid(msg.into()))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// One persistent bitmap, as its directory entry describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// The bitmap was open writable and never stored back: its contents
    /// cannot be trusted.
    pub in_use: bool,
    /// The bitmap is enabled (records new writes).
    pub enabled: bool,
    table_offset: u64,
    table_entries: u32,
}

/// The persistent bitmaps of a qcow2 image, and what is needed to read
/// their contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Bitmaps {
    /// The bitmaps, in directory order; empty when the image has none (or
    /// its bitmaps were invalidated by a writer that cleared the autoclear
    /// bit).
    pub bitmaps: Vec<BitmapInfo>,
    /// Whether the image has a bitmaps extension at all (even one that was
    /// invalidated).
    pub has_extension: bool,
    /// The image's virtual size.
    pub disk_size: u64,
    cluster_size: u64,
}

impl Qcow2Bitmaps {
    /// Reads and checks the header (as [`Qcow2Header::read`] does; its
    /// errors are [`BitmapError::Header`]), then parses the bitmaps as
    /// [`Qcow2Bitmaps::from_header`] does.
    pub fn parse<R: ReadAt + ?Sized>(file: &R) -> Result<Qcow2Bitmaps, BitmapError> {
        let header = Qcow2Header::read(file)?;
        Qcow2Bitmaps::from_header(file, &header)
    }

    /// Reads and validates the bitmaps extension and the bitmap directory
    /// of the qcow2 image in `file`, whose checked header is `header`, and
    /// every bitmap's table location. Any field out of its bounds is an
    /// error.
    pub fn from_header<R: ReadAt + ?Sized>(file: &R, header: &Qcow2Header) -> Result<Qcow2Bitmaps, BitmapError> {
        let file_len = file.file_len()?;
        let version = header.version;
        let cluster_size = header.cluster_size();
        let disk_size = header.size;
        let (autoclear, ext_start) = (header.autoclear_features, u64::from(header.header_length));
        let mut out = Qcow2Bitmaps {
            bitmaps: Vec::new(),
            has_extension: false,
            disk_size,
            cluster_size,
        };
        // Header extensions live in the first cluster, after the header.
        let ext_end = cluster_size.min(file_len);
        let mut at = ext_start;
        let mut bitmaps_ext = None;
        loop {
            if at.checked_add(8).is_none_or(|e| e > ext_end) {
                // No end marker inside the first cluster.
                return invalid("header extensions run past the first cluster");
            }
            let mut eh = [0u8; 8];
            file.read_exact_at(&mut eh, at)?;
            let (ty, len) = (be32(&eh, 0), be32(&eh, 4) as u64);
            if ty == 0 {
                break;
            }
            let data = at + 8;
            let padded = len.div_ceil(8) * 8;
            if data + padded > ext_end {
                return invalid(format!("header extension {ty:#x} runs past the first cluster"));
            }
            if ty == EXT_BITMAPS {
                if bitmaps_ext.is_some() {
                    return invalid("two bitmaps extensions");
                }
                if len != 24 {
                    return invalid(format!("bitmaps extension length {len}, expected 24"));
                }
                let mut d = [0u8; 24];
                file.read_exact_at(&mut d, data)?;
                bitmaps_ext = Some(d);
            }
            at = data + padded;
        }
        let Some(d) = bitmaps_ext else {
            return Ok(out);
        };
        out.has_extension = true;
        if version < 3 {
            return invalid("bitmaps extension in a version 2 image");
        }
        if autoclear & AUTOCLEAR_BITMAPS == 0 {
            // Invalidated by a writer that did not know bitmaps: QEMU
            // ignores them too.
            return Ok(out);
        }
        let nb = be32(&d, 0);
        let reserved = be32(&d, 4);
        let dir_size = be64(&d, 8);
        let dir_offset = be64(&d, 16);
        if reserved != 0 {
            return invalid("bitmaps extension reserved field is not zero");
        }
        if nb == 0 || nb > MAX_BITMAPS {
            return invalid(format!("{nb} bitmaps (1..={MAX_BITMAPS} allowed)"));
        }
        if dir_size == 0 || dir_size > MAX_DIRECTORY_SIZE {
            return invalid(format!("bitmap directory size {dir_size} out of range"));
        }
        if !dir_offset.is_multiple_of(cluster_size) {
            return invalid("bitmap directory offset not cluster-aligned");
        }
        if dir_offset.checked_add(dir_size).is_none_or(|e| e > file_len) {
            return invalid("bitmap directory past the end of the file");
        }
        // Bounded by MAX_DIRECTORY_SIZE and by the file's size.
        let mut dir = vec![0u8; dir_size as usize];
        file.read_exact_at(&mut dir, dir_offset)?;
        let mut pos = 0usize;
        for _ in 0..nb {
            if dir.len() - pos < 24 {
                return invalid("bitmap directory entry truncated");
            }
            let e = &dir[pos..];
            let table_offset = be64(e, 0);
            let table_entries = be32(e, 8);
            let flags = be32(e, 12);
            let ty = e[16];
            let gran_bits = e[17];
            let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra = be32(e, 20) as usize;
            if ty != 1 {
                return invalid(format!("bitmap type {ty} (only 1, dirty tracking, exists)"));
            }
            if flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
                return invalid(format!("reserved bitmap flags set: {flags:#x}"));
            }
            if extra != 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
                return invalid("bitmap has extra data that is not marked compatible");
            }
            if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&gran_bits) {
                return invalid(format!("bitmap granularity_bits {gran_bits} out of range"));
            }
            if name_size == 0 || name_size > MAX_NAME {
                return invalid(format!("bitmap name length {name_size} out of range"));
            }
            let entry_len = (24 + extra)
                .checked_add(name_size)
                .map(|l| l.div_ceil(8) * 8)
                .filter(|&l| l <= dir.len() - pos)
                .ok_or_else(|| BitmapError::Invalid("bitmap directory entry past the directory".into()))?;
            let name = std::str::from_utf8(&e[24 + extra..24 + extra + name_size])
                .map_err(|_| BitmapError::Invalid("bitmap name is not UTF-8".into()))?
                .to_string();
            let granularity = 1u64 << gran_bits;
            let bits = disk_size.div_ceil(granularity);
            let expect = bits.div_ceil(cluster_size * 8);
            if table_entries as u64 != expect || expect > MAX_TABLE_ENTRIES {
                return invalid(format!(
                    "bitmap {name:?}: table has {table_entries} entries, the disk needs {expect}"
                ));
            }
            if !table_offset.is_multiple_of(cluster_size) {
                return invalid(format!("bitmap {name:?}: table offset not cluster-aligned"));
            }
            if table_offset
                .checked_add(table_entries as u64 * 8)
                .is_none_or(|e| e > file_len)
            {
                return invalid(format!("bitmap {name:?}: table past the end of the file"));
            }
            if out.bitmaps.iter().any(|b| b.name == name) {
                return invalid(format!("two bitmaps named {name:?}"));
            }
            out.bitmaps.push(BitmapInfo {
                name,
                granularity,
                in_use: flags & FLAG_IN_USE != 0,
                enabled: flags & FLAG_AUTO != 0,
                table_offset,
                table_entries,
            });
            pos += entry_len;
        }
        Ok(out)
    }

    /// The bitmap named `name`.
    pub fn get(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    /// Loads the contents of `bitmap` (one of [`Qcow2Bitmaps::bitmaps`]):
    /// its table, validated entry by entry. The data clusters are read on
    /// demand by [`DirtyBitmap::status`].
    pub fn load<R: ReadAt + ?Sized>(&self, file: &R, bitmap: &BitmapInfo) -> Result<DirtyBitmap, BitmapError> {
        if bitmap.in_use {
            return invalid(format!(
                "bitmap {:?} is inconsistent (in use: it was not stored back after a write) and cannot be used",
                bitmap.name
            ));
        }
        let file_len = file.file_len()?;
        // Bounded by MAX_TABLE_ENTRIES and by the file size (checked in parse).
        let mut raw = vec![0u8; bitmap.table_entries as usize * 8];
        file.read_exact_at(&mut raw, bitmap.table_offset)?;
        let mut table = Vec::with_capacity(bitmap.table_entries as usize);
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let e = be64(c, 0);
            let offset = e & 0x00ff_ffff_ffff_fe00;
            if e & !(0x00ff_ffff_ffff_fe00 | 1) != 0 {
                return invalid(format!(
                    "bitmap {:?}: reserved bits set in table entry {i}",
                    bitmap.name
                ));
            }
            let entry = if offset == 0 {
                if e & 1 != 0 {
                    TableEntry::AllOnes
                } else {
                    TableEntry::AllZeroes
                }
            } else {
                if e & 1 != 0 {
                    return invalid(format!(
                        "bitmap {:?}: table entry {i} has both data and bit 0",
                        bitmap.name
                    ));
                }
                if !offset.is_multiple_of(self.cluster_size)
                    || offset.checked_add(self.cluster_size).is_none_or(|e| e > file_len)
                {
                    return invalid(format!(
                        "bitmap {:?}: table entry {i} points outside the file",
                        bitmap.name
                    ));
                }
                TableEntry::Data(offset)
            };
            table.push(entry);
        }
        Ok(DirtyBitmap {
            name: bitmap.name.clone(),
            granularity: bitmap.granularity,
            disk_size: self.disk_size,
            cluster_size: self.cluster_size,
            table,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableEntry {
    AllZeroes,
    AllOnes,
    Data(u64),
}

/// A loaded persistent bitmap, answering `qemu:dirty-bitmap:NAME` block
/// status from the image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The bitmap's name.
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    disk_size: u64,
    cluster_size: u64,
    table: Vec<TableEntry>,
}

impl DirtyBitmap {
    /// Appends to `out` runs `(length, dirty)` covering `offset..offset +
    /// length` (clamped to the disk; at most `max_runs` runs, the last one
    /// possibly short), adjacent runs differing. `offset` must be inside
    /// the disk.
    pub fn status<R: ReadAt + ?Sized>(
        &self,
        file: &R,
        offset: u64,
        length: u64,
        max_runs: usize,
        out: &mut Vec<(u64, bool)>,
    ) -> io::Result<()> {
        if offset >= self.disk_size || length == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let end = offset.saturating_add(length).min(self.disk_size);
        let bits_per_cluster = self.cluster_size * 8;
        let mut cluster_buf: Vec<u8> = Vec::new();
        let mut loaded: Option<usize> = None;
        let first = out.len();
        let mut pos = offset;
        while pos < end {
            let bit = pos / self.granularity;
            let idx = (bit / bits_per_cluster) as usize;
            let entry = *self
                .table
                .get(idx)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bitmap table too short"))?;
            // The guest range this table entry covers.
            let entry_end = ((idx as u64 + 1) * bits_per_cluster)
                .saturating_mul(self.granularity)
                .min(end);
            let (run_end, dirty) = match entry {
                TableEntry::AllZeroes => (entry_end, false),
                TableEntry::AllOnes => (entry_end, true),
                TableEntry::Data(host) => {
                    if loaded != Some(idx) {
                        cluster_buf.resize(self.cluster_size as usize, 0);
                        file.read_exact_at(&mut cluster_buf, host)?;
                        loaded = Some(idx);
                    }
                    let get = |b: u64| {
                        let k = (b % bits_per_cluster) as usize;
                        cluster_buf[k / 8] & (1 << (k % 8)) != 0
                    };
                    let dirty = get(bit);
                    let mut b = bit + 1;
                    while b * self.granularity < entry_end && get(b) == dirty {
                        b += 1;
                    }
                    ((b * self.granularity).min(entry_end), dirty)
                }
            };
            let len = run_end - pos;
            let n = out.len();
            match out.last_mut() {
                Some(last) if n > first && last.1 == dirty => last.0 += len,
                _ => {
                    if n - first >= max_runs {
                        break;
                    }
                    out.push((len, dirty));
                }
            }
            pos = run_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 image of `clusters` 512-byte clusters with one bitmap whose
    /// table is at cluster 2 and directory at cluster 1.
    fn image(disk_size: u64, table: &[u64], name: &str, flags: u32) -> Vec<u8> {
        let cs = 512usize;
        let mut f = vec![0u8; cs * 8];
        f[..4].copy_from_slice(&QCOW2_MAGIC);
        f[4..8].copy_from_slice(&3u32.to_be_bytes());
        f[20..24].copy_from_slice(&9u32.to_be_bytes());
        f[24..32].copy_from_slice(&disk_size.to_be_bytes());
        // An L1 table covering the disk (an L2 table of 64 entries maps
        // 32 KiB) and a refcount table, both at offset 0: the header
        // check only wants them aligned.
        let l1 = disk_size.div_ceil(32 << 10) as u32;
        f[36..40].copy_from_slice(&l1.to_be_bytes());
        f[56..60].copy_from_slice(&1u32.to_be_bytes());
        f[88..96].copy_from_slice(&1u64.to_be_bytes());
        f[96..100].copy_from_slice(&4u32.to_be_bytes());
        f[100..104].copy_from_slice(&104u32.to_be_bytes());
        // Extension at 104.
        f[104..108].copy_from_slice(&EXT_BITMAPS.to_be_bytes());
        f[108..112].copy_from_slice(&24u32.to_be_bytes());
        f[112..116].copy_from_slice(&1u32.to_be_bytes());
        let entry_len = (24 + name.len()).div_ceil(8) * 8;
        f[120..128].copy_from_slice(&(entry_len as u64).to_be_bytes());
        f[128..136].copy_from_slice(&(cs as u64).to_be_bytes());
        // Directory at cluster 1.
        let d = cs;
        f[d..d + 8].copy_from_slice(&(2 * cs as u64).to_be_bytes());
        f[d + 8..d + 12].copy_from_slice(&(table.len() as u32).to_be_bytes());
        f[d + 12..d + 16].copy_from_slice(&flags.to_be_bytes());
        f[d + 16] = 1;
        f[d + 17] = 9;
        f[d + 18..d + 20].copy_from_slice(&(name.len() as u16).to_be_bytes());
        f[d + 24..d + 24 + name.len()].copy_from_slice(name.as_bytes());
        for (i, e) in table.iter().enumerate() {
            f[2 * cs + 8 * i..2 * cs + 8 * i + 8].copy_from_slice(&e.to_be_bytes());
        }
        f
    }

    #[test]
    fn reads_runs() {
        // 512-byte granularity, 512-byte clusters: one cluster covers 4096
        // bits = 2 MiB. Two entries: data at cluster 3, then all ones.
        let size = 3 << 20;
        let mut f = image(size, &[3 * 512, 1], "b0", FLAG_AUTO);
        f[3 * 512] = 0b0000_0110; // granules 1 and 2 dirty
        let bm = Qcow2Bitmaps::parse(&f[..]).unwrap();
        assert_eq!(bm.bitmaps.len(), 1);
        assert!(bm.bitmaps[0].enabled);
        let d = bm.load(&f[..], bm.get("b0").unwrap()).unwrap();
        let mut out = Vec::new();
        d.status(&f[..], 0, size, 100, &mut out).unwrap();
        assert_eq!(
            out,
            vec![(512, false), (1024, true), ((2 << 20) - 1536, false), (1 << 20, true)]
        );
        out.clear();
        d.status(&f[..], 700, 100, 100, &mut out).unwrap();
        assert_eq!(out, vec![(100, true)]);
        out.clear();
        d.status(&f[..], 0, size, 2, &mut out).unwrap();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn rejects_bad_fields() {
        let good = image(1 << 20, &[0], "x", 0);
        assert!(Qcow2Bitmaps::parse(&good[..]).is_ok());
        let mut f = good.clone();
        f[512 + 16] = 2; // type
        assert!(Qcow2Bitmaps::parse(&f[..]).is_err());
        let mut f = good.clone();
        f[512 + 8..512 + 12].copy_from_slice(&5u32.to_be_bytes()); // table size
        assert!(Qcow2Bitmaps::parse(&f[..]).is_err());
        let mut f = good.clone();
        f[128..136].copy_from_slice(&u64::MAX.to_be_bytes()); // directory offset
        assert!(Qcow2Bitmaps::parse(&f[..]).is_err());
        let mut f = good.clone();
        f[120..128].copy_from_slice(&(1u64 << 40).to_be_bytes()); // directory size
        assert!(Qcow2Bitmaps::parse(&f[..]).is_err());
        let f = image(1 << 20, &[8 << 9], "x", 0); // data past EOF
        let bm = Qcow2Bitmaps::parse(&f[..]).unwrap();
        assert!(bm.load(&f[..], &bm.bitmaps[0]).is_err());
        let f = image(1 << 20, &[0], "x", FLAG_IN_USE);
        let bm = Qcow2Bitmaps::parse(&f[..]).unwrap();
        assert!(bm.load(&f[..], &bm.bitmaps[0]).is_err());
        // Autoclear bit clear: the bitmaps do not count.
        let mut f = good.clone();
        f[88..96].copy_from_slice(&0u64.to_be_bytes());
        let bm = Qcow2Bitmaps::parse(&f[..]).unwrap();
        assert!(bm.has_extension && bm.bitmaps.is_empty());
        // Header errors are reported as such, not as bitmap errors.
        let mut f = good.clone();
        f[20..24].copy_from_slice(&8u32.to_be_bytes());
        let e = Qcow2Bitmaps::parse(&f[..]).unwrap_err();
        assert!(matches!(e, BitmapError::Header(_)), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("cluster_bits") && !msg.contains("bitmap"), "{msg}");
        // Every truncation is an error or a clean parse, never a panic.
        for n in 0..good.len() {
            let _ = Qcow2Bitmaps::parse(&good[..n]);
        }
    }
}
