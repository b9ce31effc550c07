//! Behaviour of the file backend, on every scratch filesystem available:
//! `/dev/shm` (tmpfs: holes, no `ZERO_RANGE`) and the temporary directory
//! (often ext4 or xfs: holes and `ZERO_RANGE`; maybe overlayfs).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nbd_storage::{Extent, FileStorage, Storage, ZeroFlags};

const MIB: u64 = 1 << 20;

/// A scratch file removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path, name: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Scratch(dir.join(format!("nbd-storage-test-{}-{n}-{name}", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        dirs.push(shm.to_path_buf());
    }
    let tmp = std::env::temp_dir();
    if tmp != shm {
        dirs.push(tmp);
    }
    dirs
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8 ^ seed | 1).collect()
}

fn read(s: &dyn Storage, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0xee; len as usize];
    s.read_at(&mut buf, offset).unwrap();
    buf
}

fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.unwrap_err().raw_os_error().expect("error carries an errno")
}

/// Block status of `offset..offset + length`, asking again where the
/// backend stops early, checked for the invariants, as `(start, extent)`.
fn status(s: &dyn Storage, offset: u64, length: u64) -> Vec<(u64, Extent)> {
    let mut all = Vec::new();
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < offset + length {
        out.clear();
        s.block_status(pos, offset + length - pos, &mut out).unwrap();
        assert!(!out.is_empty());
        for w in out.windows(2) {
            assert_ne!(w[0].flags, w[1].flags, "unmerged extents {out:?}");
        }
        for e in &out {
            assert!(e.length > 0);
            all.push((pos, *e));
            pos += e.length;
        }
        assert!(pos <= offset + length && pos <= s.size());
    }
    all
}

/// The flags of the extent holding `at`.
fn flags_at(extents: &[(u64, Extent)], at: u64) -> nbd_storage::AllocationFlags {
    extents
        .iter()
        .find(|(start, e)| (*start..start + e.length).contains(&at))
        .unwrap()
        .1
        .flags
}

/// Whether the whole of `range` is reported as data.
fn is_data(extents: &[(u64, Extent)], range: std::ops::Range<u64>) -> bool {
    extents
        .iter()
        .filter(|(s, e)| *s < range.end && s + e.length > range.start)
        .all(|(_, e)| e.flags.is_empty())
}

/// Whether the whole of `range` is reported as a hole.
fn is_hole(extents: &[(u64, Extent)], range: std::ops::Range<u64>) -> bool {
    extents
        .iter()
        .filter(|(s, e)| *s < range.end && s + e.length > range.start)
        .all(|(_, e)| e.flags == Extent::hole(1).flags)
}

#[test]
fn sparse_file_block_status() {
    for dir in dirs() {
        let scratch = Scratch::new(&dir, "status");
        let size = 8 * MIB + 4096;
        let f = FileStorage::create(&scratch.0, size).unwrap();
        assert_eq!(f.size(), size);
        assert!(!f.is_block_device());
        let fresh = status(&f, 0, size);
        // A filesystem that can report holes reports the new file as one.
        let holes = fresh == vec![(0, Extent::hole(size))];
        if !holes {
            assert_eq!(fresh, vec![(0, Extent::data(size))], "{dir:?}");
            eprintln!("{dir:?} does not report holes; checking data placement only");
        }
        assert!(is_zero(&read(&f, 0, size)));

        f.write_at(&pattern(MIB as usize, 1), 2 * MIB, false).unwrap();
        f.write_at(&pattern(2 * MIB as usize, 2), 5 * MIB, false).unwrap();
        f.write_at(&[3; 4096], 8 * MIB, false).unwrap();
        let ext = status(&f, 0, size);
        assert!(is_data(&ext, 2 * MIB..3 * MIB), "{dir:?} {ext:?}");
        assert!(is_data(&ext, 5 * MIB..7 * MIB), "{dir:?} {ext:?}");
        assert!(is_data(&ext, 8 * MIB..size), "{dir:?} {ext:?}");
        if holes {
            assert!(is_hole(&ext, 0..2 * MIB), "{dir:?} {ext:?}");
            assert!(is_hole(&ext, 3 * MIB..5 * MIB), "{dir:?} {ext:?}");
            assert!(is_hole(&ext, 7 * MIB..8 * MIB), "{dir:?} {ext:?}");
            assert_eq!(ext.len(), 6, "{dir:?} {ext:?}");
        }
        // Sub-ranges starting inside extents, clamped at the end.
        let mut out = Vec::new();
        f.block_status(2 * MIB + 100, 10, &mut out).unwrap();
        assert_eq!(out, vec![Extent::data(10)]);
        out.clear();
        f.block_status(size - 1, u64::MAX, &mut out).unwrap();
        assert_eq!(out, vec![Extent::data(1)]);
        if holes {
            out.clear();
            f.block_status(MIB, MIB + 1, &mut out).unwrap();
            assert_eq!(out, vec![Extent::hole(MIB), Extent::data(1)]);
        }
        assert_eq!(read(&f, 2 * MIB, MIB), pattern(MIB as usize, 1));
        assert_eq!(read(&f, 5 * MIB, 2 * MIB), pattern(2 * MIB as usize, 2));
    }
}

#[test]
fn trim_punches_holes() {
    for dir in dirs() {
        let scratch = Scratch::new(&dir, "trim");
        let f = FileStorage::create(&scratch.0, 6 * MIB).unwrap();
        let holes = status(&f, 0, 6 * MIB) == vec![(0, Extent::hole(6 * MIB))];
        f.write_at(&pattern(4 * MIB as usize, 5), MIB, false).unwrap();
        f.flush().unwrap();
        let blocks_before = std::fs::metadata(&scratch.0).unwrap().blocks();
        f.trim(2 * MIB, MIB, true).unwrap();
        let back = read(&f, 0, 6 * MIB);
        assert_eq!(
            &back[MIB as usize..2 * MIB as usize],
            &pattern(4 * MIB as usize, 5)[..MIB as usize]
        );
        assert_eq!(
            &back[3 * MIB as usize..5 * MIB as usize],
            &pattern(4 * MIB as usize, 5)[2 * MIB as usize..]
        );
        if holes {
            let ext = status(&f, 0, 6 * MIB);
            assert!(is_hole(&ext, 2 * MIB..3 * MIB), "{dir:?} {ext:?}");
            assert!(
                is_data(&ext, MIB..2 * MIB) && is_data(&ext, 3 * MIB..5 * MIB),
                "{dir:?} {ext:?}"
            );
            assert!(is_zero(&back[2 * MIB as usize..3 * MIB as usize]));
            let blocks_after = std::fs::metadata(&scratch.0).unwrap().blocks();
            assert!(
                blocks_after < blocks_before,
                "{dir:?}: {blocks_before} -> {blocks_after}"
            );
        }
        f.trim(0, 0, false).unwrap();
    }
}

#[test]
fn write_zeroes_reads_back_zero() {
    let variants = [
        ZeroFlags::default(),
        ZeroFlags {
            no_hole: true,
            ..ZeroFlags::default()
        },
        ZeroFlags {
            fua: true,
            ..ZeroFlags::default()
        },
        ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        },
        ZeroFlags {
            fast: true,
            no_hole: true,
            fua: true,
        },
    ];
    for dir in dirs() {
        for flags in variants {
            let scratch = Scratch::new(&dir, "zero");
            let f = FileStorage::create(&scratch.0, 4 * MIB).unwrap();
            let data = pattern(4 * MIB as usize, 9);
            f.write_at(&data, 0, true).unwrap();
            // An unaligned range, then an aligned one.
            for (offset, len) in [(MIB - 100, 1000), (2 * MIB, MIB)] {
                let blocks_before = std::fs::metadata(&scratch.0).unwrap().blocks();
                match f.write_zeroes(offset, len, flags) {
                    Ok(()) => assert!(is_zero(&read(&f, offset, len)), "{dir:?} {flags:?}"),
                    Err(e) => {
                        // Only a fast zero may fail, and then nothing changed.
                        assert!(
                            flags.fast && e.raw_os_error() == Some(libc::EOPNOTSUPP),
                            "{dir:?} {flags:?} {e}"
                        );
                        assert_eq!(read(&f, offset, len), &data[offset as usize..(offset + len) as usize]);
                        continue;
                    }
                }
                if flags.no_hole {
                    f.flush().unwrap();
                    let blocks_after = std::fs::metadata(&scratch.0).unwrap().blocks();
                    assert!(
                        blocks_after >= blocks_before,
                        "{dir:?} {flags:?}: {blocks_before} -> {blocks_after}"
                    );
                }
            }
            let back = read(&f, 0, 4 * MIB);
            assert_eq!(&back[..(MIB - 100) as usize], &data[..(MIB - 100) as usize]);
            assert_eq!(
                &back[(MIB + 900) as usize..2 * MIB as usize],
                &data[(MIB + 900) as usize..2 * MIB as usize]
            );
            assert_eq!(&back[3 * MIB as usize..], &data[3 * MIB as usize..]);
        }
    }
}

#[test]
fn write_zeroes_may_punch_holes() {
    for dir in dirs() {
        let scratch = Scratch::new(&dir, "zero-hole");
        let f = FileStorage::create(&scratch.0, 4 * MIB).unwrap();
        let holes = status(&f, 0, 4 * MIB) == vec![(0, Extent::hole(4 * MIB))];
        f.write_at(&pattern(4 * MIB as usize, 3), 0, false).unwrap();
        f.write_zeroes(MIB, 2 * MIB, ZeroFlags::default()).unwrap();
        let ext = status(&f, 0, 4 * MIB);
        assert!(
            is_data(&ext, 0..MIB) && is_data(&ext, 3 * MIB..4 * MIB),
            "{dir:?} {ext:?}"
        );
        if holes {
            // Filesystems that report holes can punch them too.
            assert!(is_hole(&ext, MIB..3 * MIB), "{dir:?} {ext:?}");
            assert_eq!(flags_at(&ext, MIB), Extent::hole(1).flags);
        }
        assert!(is_zero(&read(&f, MIB, 2 * MIB)));
    }
}

#[test]
fn read_only_refuses_writes() {
    for dir in dirs() {
        let scratch = Scratch::new(&dir, "ro");
        let w = FileStorage::create(&scratch.0, 2 * MIB).unwrap();
        w.write_at(&[7; 100], 1000, false).unwrap();
        let caps = w.capabilities();
        assert!(!caps.read_only && caps.can_flush && caps.can_fua && caps.can_trim && caps.can_zero);
        assert!(caps.can_fast_zero && caps.can_cache && caps.can_multi_conn && caps.block_size.is_none());
        drop(w);

        let f = FileStorage::open(&scratch.0, true).unwrap();
        let caps = f.capabilities();
        assert!(caps.read_only && !caps.can_trim && !caps.can_zero && caps.can_multi_conn);
        assert_eq!(f.size(), 2 * MIB);
        assert_eq!(read(&f, 1000, 100), vec![7; 100]);
        assert_eq!(errno(f.write_at(&[1], 0, false)), libc::EPERM);
        assert_eq!(errno(f.trim(0, MIB, false)), libc::EPERM);
        assert_eq!(errno(f.write_zeroes(0, MIB, ZeroFlags::default())), libc::EPERM);
        f.cache(0, 2 * MIB).unwrap();
        assert_eq!(read(&f, 1000, 100), vec![7; 100]);
        // A read-only export served from a writable descriptor still refuses.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&scratch.0)
            .unwrap();
        let f = FileStorage::from_file(file, true).unwrap();
        assert_eq!(errno(f.write_at(&[1], 0, false)), libc::EPERM);
    }
}

#[test]
fn flush_fua_and_reopen() {
    for dir in dirs() {
        let scratch = Scratch::new(&dir, "flush");
        let f = FileStorage::create(&scratch.0, 3 * MIB + 17).unwrap();
        f.write_at(&pattern(MIB as usize, 4), MIB + 3, true).unwrap();
        f.write_at(&[9; 17], 3 * MIB, false).unwrap();
        f.flush().unwrap();
        f.cache(0, f.size()).unwrap();
        drop(f);
        let f = FileStorage::open(&scratch.0, false).unwrap();
        assert_eq!(f.size(), 3 * MIB + 17);
        assert_eq!(read(&f, MIB + 3, MIB), pattern(MIB as usize, 4));
        assert_eq!(read(&f, 3 * MIB, 17), vec![9; 17]);
        assert!(is_zero(&read(&f, 0, MIB + 3)));
    }
}

#[test]
fn out_of_range_is_an_error() {
    let dir = dirs().remove(0);
    let scratch = Scratch::new(&dir, "range");
    let size = MIB + 1;
    let f = FileStorage::create(&scratch.0, size).unwrap();
    let z = ZeroFlags::default();
    let mut buf = [0u8; 2];
    assert_eq!(errno(f.read_at(&mut buf, size - 1)), libc::EINVAL);
    assert_eq!(errno(f.read_at(&mut buf, u64::MAX)), libc::EINVAL);
    assert_eq!(errno(f.write_at(&buf, size - 1, false)), libc::EINVAL);
    assert_eq!(errno(f.write_at(&buf, u64::MAX, true)), libc::EINVAL);
    assert_eq!(errno(f.trim(1, size, false)), libc::EINVAL);
    assert_eq!(errno(f.write_zeroes(u64::MAX, 2, z)), libc::EINVAL);
    assert_eq!(errno(f.cache(size, 1)), libc::EINVAL);
    let mut out = Vec::new();
    assert_eq!(errno(f.block_status(size, 1, &mut out)), libc::EINVAL);
    assert_eq!(errno(f.block_status(0, 0, &mut out)), libc::EINVAL);
    assert!(out.is_empty());
    // The file was not grown by any of that.
    assert_eq!(std::fs::metadata(&scratch.0).unwrap().len(), size);

    // A file that shrank behind the export's back: an error, not a panic.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&scratch.0)
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(errno(f.read_at(&mut buf, 100)), libc::EIO);
    out.clear();
    f.block_status(100, 10, &mut out).unwrap();
    assert_eq!(out.iter().map(|e| e.length).sum::<u64>(), 10);
}

#[test]
fn refuses_other_file_types() {
    assert_eq!(errno(FileStorage::open(std::env::temp_dir(), true)), libc::EISDIR);
    if Path::new("/dev/null").exists() {
        assert_eq!(errno(FileStorage::open("/dev/null", true)), libc::EINVAL);
    }
    assert_eq!(errno(FileStorage::open("/nonexistent/nbd-storage", true)), libc::ENOENT);
}

/// Runs against a real block device when `NBD_STORAGE_TEST_BLOCK_DEVICE`
/// names one. THE DEVICE'S CONTENTS ARE DESTROYED. For example, as root:
/// `truncate -s 64M /tmp/d && losetup -f --show /tmp/d`.
#[test]
fn block_device() {
    let Some(path) = std::env::var_os("NBD_STORAGE_TEST_BLOCK_DEVICE") else {
        return;
    };
    let f = FileStorage::open(&path, false).unwrap();
    assert!(f.is_block_device());
    let size = f.size();
    assert!(size >= 4 * MIB, "need a device of at least 4 MiB");
    f.write_at(&pattern(4 * MIB as usize, 6), 0, true).unwrap();
    assert_eq!(read(&f, 0, 4 * MIB), pattern(4 * MIB as usize, 6));
    assert_eq!(status(&f, 0, size), vec![(0, Extent::data(size))]);
    f.write_zeroes(MIB, MIB, ZeroFlags::default()).unwrap();
    assert!(is_zero(&read(&f, MIB, MIB)));
    f.write_zeroes(
        2 * MIB + 1,
        1000,
        ZeroFlags {
            no_hole: true,
            ..ZeroFlags::default()
        },
    )
    .unwrap();
    assert!(is_zero(&read(&f, 2 * MIB + 1, 1000)));
    assert_eq!(
        read(&f, 2 * MIB, 1),
        pattern(4 * MIB as usize, 6)[2 * MIB as usize..2 * MIB as usize + 1]
    );
    match f.write_zeroes(
        3 * MIB,
        MIB,
        ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        },
    ) {
        Ok(()) => assert!(is_zero(&read(&f, 3 * MIB, MIB))),
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
            assert_eq!(read(&f, 3 * MIB, MIB), pattern(4 * MIB as usize, 6)[3 * MIB as usize..]);
        }
    }
    f.trim(0, MIB, true).unwrap();
    f.trim(1, 100, false).unwrap();
    f.flush().unwrap();
    f.cache(0, size).unwrap();
    assert_eq!(errno(f.read_at(&mut [0; 2], size - 1)), libc::EINVAL);
}
