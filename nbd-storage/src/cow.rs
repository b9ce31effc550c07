//! Copy-on-write over any storage, as nbdkit's `cow` filter: writes go to a
//! temporary local overlay, the storage below is only ever read.
//!
//! The overlay is an anonymous temporary file (sparse, the size of the
//! export) plus a bitmap of the blocks it holds. A block that is written
//! for the first time by less than a whole block is first copied up from
//! the storage below (read, modified, written to the overlay), under a
//! lock of its own, so that two writes to different parts of one block
//! never lose each other. Reads take each block from the overlay where it
//! holds the block and from below elsewhere, so writes made below by
//! someone else (another export of the same image) show through wherever
//! the overlay has not written: one image under two names, as QEMU's
//! snapshot overlay on a node shared by several exports.
//!
//! The overlay disappears with the storage (or the process): nothing
//! written through it is ever durable, so FLUSH has nothing to do.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{
    Capabilities, Extent, FileStorage, Storage, ZeroFlags, check_range, clamp_status_range, errno_error,
    fast_zero_unsupported, push_extent,
};

/// The overlay's block size unless asked otherwise (nbdkit's `cow` filter
/// uses the same, 64 KiB).
pub const COW_BLOCK_SIZE: u64 = 64 * 1024;

/// Largest bitmap of overlay blocks (in bits) a [`CowStorage`] keeps in
/// memory: 2^30 blocks, 128 MiB of bitmap, 64 TiB at the default block
/// size. Larger exports need a larger block size.
const MAX_BLOCKS: u64 = 1 << 30;

/// Locks that serialise copy-up of blocks (block number modulo this).
const STRIPES: usize = 64;

/// Most extents one [`Storage::block_status`] call appends.
const MAX_STATUS_EXTENTS: usize = 1024;

/// Copy-on-write storage: reads come from `base` until a block is written,
/// writes go to a temporary overlay (see the [module](self) documentation).
pub struct CowStorage {
    base: Arc<dyn Storage>,
    overlay: FileStorage,
    size: u64,
    block: u64,
    /// One bit per block: set once the overlay holds the block.
    allocated: Box<[AtomicU64]>,
    stripes: Box<[Mutex<()>]>,
}

impl std::fmt::Debug for CowStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowStorage")
            .field("size", &self.size)
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

impl CowStorage {
    /// A copy-on-write layer on `base` with an overlay in `temp_dir`
    /// (`None`: `$TMPDIR`, else `/var/tmp`), in blocks of
    /// [`COW_BLOCK_SIZE`].
    pub fn new(base: Arc<dyn Storage>, temp_dir: Option<&Path>) -> io::Result<CowStorage> {
        CowStorage::with_block_size(base, temp_dir, COW_BLOCK_SIZE)
    }

    /// Like [`CowStorage::new`] with blocks of `block_size` bytes (a power
    /// of two from 4 KiB to 64 MiB, as nbdkit's `cow-block-size`).
    pub fn with_block_size(base: Arc<dyn Storage>, temp_dir: Option<&Path>, block_size: u64) -> io::Result<CowStorage> {
        if !block_size.is_power_of_two() || !(4096..=64 << 20).contains(&block_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("copy-on-write block size {block_size}: must be a power of two from 4096 to 64M"),
            ));
        }
        let size = base.size();
        let blocks = size.div_ceil(block_size);
        if blocks > MAX_BLOCKS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "an export of {size} bytes has too many blocks of {block_size} bytes for a copy-on-write \
                     overlay (at most {MAX_BLOCKS}); use a larger block size"
                ),
            ));
        }
        let dir = temp_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(crate::image::default_temp_dir);
        let file: File = crate::image::anonymous_temp_file(&dir)?;
        file.set_len(size).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: cannot make a copy-on-write overlay of {size} bytes: {e}",
                    dir.display()
                ),
            )
        })?;
        let overlay = FileStorage::from_file(file, false)?;
        Ok(CowStorage {
            base,
            overlay,
            size,
            block: block_size,
            allocated: (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// The storage below the overlay.
    pub fn base(&self) -> &Arc<dyn Storage> {
        &self.base
    }

    fn is_allocated(&self, block: u64) -> bool {
        self.allocated[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    fn set_allocated(&self, block: u64) {
        self.allocated[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::Release);
    }

    fn lock(&self, block: u64) -> std::sync::MutexGuard<'_, ()> {
        // A poisoned stripe only means another writer panicked; the bitmap
        // is set only after the overlay holds the block, so it is sound.
        self.stripes[(block % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The byte range of `block`.
    fn block_range(&self, block: u64) -> (u64, u64) {
        let start = block * self.block;
        (start, (start + self.block).min(self.size))
    }

    /// The end of the run of blocks from `offset` (at most `end`) whose
    /// allocation state is `allocated`.
    fn run_end(&self, offset: u64, end: u64, allocated: bool) -> u64 {
        let mut pos = offset;
        while pos < end {
            let block = pos / self.block;
            if self.is_allocated(block) != allocated {
                break;
            }
            pos = self.block_range(block).1.min(end);
        }
        pos
    }

    /// Writes `piece` at `offset`, all inside `block`, copying the block
    /// up first if the overlay does not hold it yet.
    fn write_in_block(&self, block: u64, piece: &[u8], offset: u64, scratch: &mut Vec<u8>) -> io::Result<()> {
        let (start, end) = self.block_range(block);
        let _guard = self.lock(block);
        if !self.is_allocated(block) && (offset != start || offset + piece.len() as u64 != end) {
            let len = (end - start) as usize;
            scratch.resize(len, 0);
            self.base.read_at(&mut scratch[..len], start)?;
            let at = (offset - start) as usize;
            scratch[at..at + piece.len()].copy_from_slice(piece);
            self.overlay.write_at(&scratch[..len], start, false)?;
        } else {
            self.overlay.write_at(piece, offset, false)?;
        }
        self.set_allocated(block);
        Ok(())
    }

    /// Makes whole blocks `first..=last` read as zeroes in the overlay.
    fn zero_blocks(&self, first: u64, last: u64) -> io::Result<()> {
        for block in first..=last {
            let (start, end) = self.block_range(block);
            let _guard = self.lock(block);
            self.overlay.write_zeroes(start, end - start, ZeroFlags::default())?;
            self.set_allocated(block);
        }
        Ok(())
    }

    /// The whole blocks inside `offset..offset + length`, as a block range.
    fn whole_blocks(&self, offset: u64, length: u64) -> Option<(u64, u64)> {
        let end = offset + length;
        let first = offset.div_ceil(self.block);
        // The export's last block counts as whole when the range reaches
        // the end of the export.
        let last_end = if end == self.size {
            self.size.div_ceil(self.block)
        } else {
            end / self.block
        };
        (first < last_end).then(|| (first, last_end - 1))
    }

    fn check_write(&self, offset: u64, length: u64) -> io::Result<()> {
        check_range(self.size, offset, length)
    }
}

impl Storage for CowStorage {
    fn size(&self) -> u64 {
        self.size
    }

    /// Writable whatever the storage below is, with TRIM and WRITE_ZEROES
    /// (on whole blocks in the overlay); several connections share one
    /// overlay, so multi-conn holds.
    fn capabilities(&self) -> Capabilities {
        let base = self.base.capabilities();
        Capabilities {
            read_only: false,
            can_flush: true,
            can_fua: false,
            can_trim: true,
            can_zero: true,
            can_fast_zero: false,
            can_cache: base.can_cache,
            can_multi_conn: true,
            rotational: base.rotational,
            block_size: base.block_size,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let allocated = self.is_allocated(pos / self.block);
            let run = self.run_end(pos, end, allocated);
            let part = &mut buf[(pos - offset) as usize..(run - offset) as usize];
            if allocated {
                self.overlay.read_at(part, pos)?;
            } else {
                self.base.read_at(part, pos)?;
            }
            pos = run;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut scratch = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / self.block;
            if self.is_allocated(block) {
                // Blocks the overlay holds take the data in one write.
                let run = self.run_end(pos, end, true);
                self.overlay
                    .write_at(&buf[(pos - offset) as usize..(run - offset) as usize], pos, false)?;
                pos = run;
                continue;
            }
            let piece_end = self.block_range(block).1.min(end);
            let piece = &buf[(pos - offset) as usize..(piece_end - offset) as usize];
            self.write_in_block(block, piece, pos, &mut scratch)?;
            pos = piece_end;
        }
        Ok(())
    }

    /// Nothing to do: the overlay is temporary, and the storage below is
    /// never written.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Whole blocks of the range read as zeroes afterwards (their overlay
    /// space is released); the rest is left as it is, as TRIM allows.
    fn trim(&self, offset: u64, length: u64, _fua: bool) -> io::Result<()> {
        self.check_write(offset, length)?;
        match self.whole_blocks(offset, length) {
            Some((first, last)) => self.zero_blocks(first, last),
            None => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_write(offset, length)?;
        if flags.fast {
            return Err(fast_zero_unsupported());
        }
        if length == 0 {
            return Ok(());
        }
        let end = offset + length;
        let (head_end, tail_start) = match self.whole_blocks(offset, length) {
            Some((first, last)) => {
                self.zero_blocks(first, last)?;
                (first * self.block, self.block_range(last).1)
            }
            None => (end, end),
        };
        let zeroes = vec![0u8; (head_end - offset).max(end - tail_start) as usize];
        if head_end > offset {
            self.write_at(&zeroes[..(head_end - offset) as usize], offset, false)?;
        }
        if tail_start < end && tail_start >= head_end {
            self.write_at(&zeroes[..(end - tail_start) as usize], tail_start, false)?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        check_range(self.size, offset, length)?;
        self.base.cache(offset, length)
    }

    /// Blocks the overlay holds are data; elsewhere the storage below
    /// answers.
    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let length = clamp_status_range(self.size, offset, length)?;
        let end = offset + length;
        let first = out.len();
        let mut below = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() - first < MAX_STATUS_EXTENTS {
            let allocated = self.is_allocated(pos / self.block);
            let run = self.run_end(pos, end, allocated);
            if allocated {
                push_extent(out, first, Extent::data(run - pos));
                pos = run;
                continue;
            }
            below.clear();
            self.base.block_status(pos, run - pos, &mut below)?;
            let mut covered = 0u64;
            for e in &below {
                let len = e.length.min(run - pos - covered);
                push_extent(
                    out,
                    first,
                    Extent {
                        length: len,
                        flags: e.flags,
                    },
                );
                covered += len;
                if covered == run - pos {
                    break;
                }
            }
            if covered == 0 {
                return Err(errno_error(libc::EIO));
            }
            pos += covered;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;

    fn base_with(pattern: u8, size: u64) -> Arc<dyn Storage> {
        let m = MemoryStorage::with_options(size, false);
        m.write_at(&vec![pattern; size as usize], 0, false).unwrap();
        Arc::new(m)
    }

    fn read(s: &dyn Storage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        s.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn writes_go_to_the_overlay_and_the_base_shows_through() {
        let size = 10 * 4096 + 100;
        let base = base_with(0xaa, size);
        let cow = CowStorage::with_block_size(base.clone(), None, 4096).unwrap();
        // A partial write in one block, another in the same block.
        cow.write_at(&[1; 10], 5, false).unwrap();
        cow.write_at(&[2; 10], 100, false).unwrap();
        // Across blocks, and the short last block.
        cow.write_at(&[3; 5000], 3 * 4096 - 100, false).unwrap();
        cow.write_at(&[4; 50], size - 50, false).unwrap();
        let got = read(&cow, 0, size as usize);
        let mut want = vec![0xaa; size as usize];
        want[5..15].fill(1);
        want[100..110].fill(2);
        want[3 * 4096 - 100..3 * 4096 - 100 + 5000].fill(3);
        want[size as usize - 50..].fill(4);
        assert_eq!(got, want);
        // The base is untouched...
        assert_eq!(read(&*base, 0, size as usize), vec![0xaa; size as usize]);
        // ... and its later writes show where the overlay has not written.
        base.write_at(&[9; 4096], 6 * 4096, false).unwrap();
        base.write_at(&[9; 4096], 0, false).unwrap();
        assert_eq!(read(&cow, 6 * 4096, 4096), vec![9; 4096]);
        assert_eq!(read(&cow, 5, 10), vec![1; 10]);
    }

    #[test]
    fn zeroes_trim_and_status() {
        let size = 8 * 4096;
        let base = base_with(0x55, size);
        let cow = CowStorage::with_block_size(base, None, 4096).unwrap();
        cow.write_zeroes(100, 3 * 4096, ZeroFlags::default()).unwrap();
        let got = read(&cow, 0, size as usize);
        assert!(got[..100].iter().all(|&b| b == 0x55));
        assert!(got[100..100 + 3 * 4096].iter().all(|&b| b == 0));
        assert!(got[100 + 3 * 4096..].iter().all(|&b| b == 0x55));
        assert!(
            cow.write_zeroes(
                0,
                10,
                ZeroFlags {
                    fast: true,
                    ..ZeroFlags::default()
                }
            )
            .is_err()
        );
        // TRIM of whole blocks zeroes them; the partial head is left alone.
        cow.trim(7 * 4096 - 1, 4097, false).unwrap();
        assert_eq!(read(&cow, 7 * 4096 - 1, 1), vec![0x55]);
        assert_eq!(read(&cow, 7 * 4096, 4096), vec![0; 4096]);
        let mut out = Vec::new();
        cow.block_status(0, size, &mut out).unwrap();
        assert_eq!(out.iter().map(|e| e.length).sum::<u64>(), size);
        assert!(cow.write_at(&[0], size, false).is_err());
        assert!(cow.read_at(&mut [0; 2], size - 1).is_err());
    }

    #[test]
    fn concurrent_partial_writes_to_one_block_keep_each_other() {
        let base = base_with(0, 4096);
        let cow = Arc::new(CowStorage::with_block_size(base, None, 4096).unwrap());
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let cow = cow.clone();
                std::thread::spawn(move || cow.write_at(&[i + 1; 512], u64::from(i) * 512, false).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let got = read(&*cow, 0, 4096);
        for i in 0..8u8 {
            assert!(
                got[i as usize * 512..(i as usize + 1) * 512]
                    .iter()
                    .all(|&b| b == i + 1)
            );
        }
    }

    #[test]
    fn refuses_bad_block_sizes_and_huge_exports() {
        let base: Arc<dyn Storage> = Arc::new(MemoryStorage::with_options(1 << 62, false));
        assert!(CowStorage::with_block_size(base.clone(), None, 1000).is_err());
        let e = CowStorage::new(base, None).unwrap_err();
        assert!(e.to_string().contains("too many blocks"), "{e}");
    }
}
