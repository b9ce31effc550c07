//! Behaviour of the sparse in-memory backend.

use std::sync::Arc;

use nbd_storage::{AllocationFlags, Extent, MemoryStorage, Storage, ZeroFlags};

const P: u64 = MemoryStorage::PAGE_SIZE as u64;
const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed | 1).collect()
}

fn read(s: &dyn Storage, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xee; len];
    s.read_at(&mut buf, offset).unwrap();
    buf
}

fn status(s: &dyn Storage, offset: u64, length: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    s.block_status(offset, length, &mut out).unwrap();
    out
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.unwrap_err().raw_os_error().expect("error carries an errno")
}

/// Checks the invariants every block_status answer must satisfy and returns
/// the number of bytes covered.
fn check_extents(extents: &[Extent], offset: u64, length: u64, size: u64) -> u64 {
    assert!(!extents.is_empty());
    let total: u64 = extents.iter().map(|e| e.length).sum();
    assert!(total >= 1 && total <= length && offset + total <= size, "{extents:?}");
    for w in extents.windows(2) {
        assert_ne!(w[0].flags, w[1].flags, "unmerged extents {extents:?}");
    }
    assert!(extents.iter().all(|e| e.length > 0));
    total
}

#[test]
fn fresh_export_is_zero_and_unallocated() {
    let m = MemoryStorage::new(1 << 62);
    assert_eq!(m.size(), 1 << 62);
    assert_eq!(m.allocated_bytes(), 0);
    assert!(read(&m, 0, 100_000).iter().all(|&b| b == 0));
    assert!(read(&m, (1 << 62) - 4096, 4096).iter().all(|&b| b == 0));
    assert_eq!(m.allocated_bytes(), 0);
    assert_eq!(status(&m, 0, 1 << 40), vec![Extent::hole(1 << 40)]);
    assert_eq!(status(&m, 12345, u64::MAX), vec![Extent::hole((1 << 62) - 12345)]);
    assert_eq!(Extent::hole(1).flags, AllocationFlags::HOLE | AllocationFlags::ZERO);
    let caps = m.capabilities();
    assert!(!caps.read_only && caps.can_flush && caps.can_fua && caps.can_trim && caps.can_zero);
    assert!(caps.can_fast_zero && caps.can_cache && caps.can_multi_conn && !caps.rotational);
    assert_eq!(caps.block_size, None);
    m.flush().unwrap();
    m.cache(0, 1 << 62).unwrap();
}

#[test]
fn round_trip_across_pages() {
    let m = MemoryStorage::new(64 * P);
    let data = pattern(100_000, 7);
    let offset = P - 123;
    m.write_at(&data, offset, false).unwrap();
    assert_eq!(read(&m, offset, data.len()), data);
    // Touches pages 0..=4.
    assert_eq!((offset + data.len() as u64 - 1) / P, 4);
    assert_eq!(m.allocated_bytes(), 5 * P);
    // Bytes around the write are still zero.
    let around = read(&m, 0, 6 * P as usize);
    assert!(around[..offset as usize].iter().all(|&b| b == 0));
    assert_eq!(&around[offset as usize..offset as usize + data.len()], &data[..]);
    assert!(around[offset as usize + data.len()..].iter().all(|&b| b == 0));
    // Unaligned overwrite inside, then read at odd offsets.
    m.write_at(&[9; 10], 2 * P - 5, true).unwrap();
    let mut expect = around.clone();
    expect[2 * P as usize - 5..2 * P as usize + 5].fill(9);
    assert_eq!(read(&m, 0, 6 * P as usize), expect);
    assert_eq!(read(&m, 3, 17), expect[3..20].to_vec());
    // The whole export, including the last byte.
    m.write_at(&[1], 64 * P - 1, false).unwrap();
    assert_eq!(read(&m, 64 * P - 2, 2), vec![0, 1]);
    m.read_at(&mut [], 64 * P).unwrap();
    m.write_at(&[], 64 * P, false).unwrap();
}

#[test]
fn trim_and_zero_free_pages() {
    let m = MemoryStorage::new(16 * P);
    m.write_at(&pattern(8 * P as usize, 1), 0, false).unwrap();
    assert_eq!(m.allocated_bytes(), 8 * P);

    // Trim pages 1 and 2 entirely plus half of page 3.
    m.trim(P, 2 * P + P / 2, false).unwrap();
    assert_eq!(m.allocated_bytes(), 6 * P);
    let back = read(&m, 0, 8 * P as usize);
    assert!(back[P as usize..(3 * P + P / 2) as usize].iter().all(|&b| b == 0));
    assert_eq!(
        &back[(3 * P + P / 2) as usize..],
        &pattern(8 * P as usize, 1)[(3 * P + P / 2) as usize..]
    );
    assert_eq!(&back[..P as usize], &pattern(8 * P as usize, 1)[..P as usize]);

    // Zeroing the rest of page 3 leaves it all zero: it is freed.
    m.write_zeroes(3 * P + P / 2, P / 2, ZeroFlags::default()).unwrap();
    assert_eq!(m.allocated_bytes(), 5 * P);

    // A range inside one page zeroes without freeing.
    m.write_zeroes(10, 20, ZeroFlags::default()).unwrap();
    assert_eq!(m.allocated_bytes(), 5 * P);
    assert!(read(&m, 10, 20).iter().all(|&b| b == 0));
    assert_ne!(read(&m, 30, 1), vec![0]);

    // WRITE_ZEROES over everything returns all memory.
    m.write_zeroes(
        0,
        16 * P,
        ZeroFlags {
            fua: true,
            ..ZeroFlags::default()
        },
    )
    .unwrap();
    assert_eq!(m.allocated_bytes(), 0);
    assert!(read(&m, 0, 16 * P as usize).iter().all(|&b| b == 0));
    assert_eq!(status(&m, 0, 16 * P), vec![Extent::hole(16 * P)]);
}

#[test]
fn trim_of_a_huge_range_is_quick() {
    let m = MemoryStorage::new(1 << 62);
    for i in 0..100u64 {
        m.write_at(&[1; 10], i * (1 << 55) + 7, false).unwrap();
    }
    assert_eq!(m.allocated_bytes(), 100 * P);
    m.trim(0, 1 << 62, false).unwrap();
    assert_eq!(m.allocated_bytes(), 0);
    assert_eq!(status(&m, 0, 1 << 62), vec![Extent::hole(1 << 62)]);
}

#[test]
fn zero_writes_do_not_allocate() {
    let m = MemoryStorage::new(8 * P);
    m.write_at(&vec![0; 3 * P as usize], 100, false).unwrap();
    assert_eq!(m.allocated_bytes(), 0);
    m.write_at(&[5; 10], P + 3, false).unwrap();
    assert_eq!(m.allocated_bytes(), P);
    // Overwriting the only non-zero bytes with zeroes frees the page.
    m.write_at(&[0; 10], P + 3, false).unwrap();
    assert_eq!(m.allocated_bytes(), 0);
    assert!(read(&m, 0, 8 * P as usize).iter().all(|&b| b == 0));
}

#[test]
fn no_hole_keeps_pages() {
    let m = MemoryStorage::new(8 * P);
    m.write_at(&pattern(2 * P as usize, 3), 2 * P, false).unwrap();
    let flags = ZeroFlags {
        no_hole: true,
        ..ZeroFlags::default()
    };
    m.write_zeroes(0, 8 * P, flags).unwrap();
    assert!(read(&m, 0, 8 * P as usize).iter().all(|&b| b == 0));
    assert_eq!(m.allocated_bytes(), 2 * P);
    let ext = status(&m, 0, 8 * P);
    assert_eq!(ext, vec![Extent::hole(2 * P), Extent::data(2 * P), Extent::hole(4 * P)]);
}

#[test]
fn fast_zero_always_succeeds() {
    let m = MemoryStorage::new(8 * P);
    m.write_at(&pattern(8 * P as usize, 4), 0, false).unwrap();
    for (offset, len) in [(5, 10), (P - 1, 2 * P + 2), (4 * P, 4 * P)] {
        let flags = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        m.write_zeroes(offset, len, flags).unwrap();
        assert!(read(&m, offset, len as usize).iter().all(|&b| b == 0));
    }
    assert_eq!(read(&m, 4, 1), vec![pattern(8 * P as usize, 4)[4]]);
    // Pages 1, 2 and 4..8 were covered entirely and freed; 0 and 3 remain.
    assert_eq!(m.allocated_bytes(), 2 * P);
}

#[test]
fn block_status_reports_and_merges() {
    let size = 10 * P + 1000;
    let m = MemoryStorage::new(size);
    for page in [2, 3, 7, 10] {
        m.write_at(&[1], page * P + 5, false).unwrap();
    }
    let expect = vec![
        Extent::hole(2 * P),
        Extent::data(2 * P),
        Extent::hole(3 * P),
        Extent::data(P),
        Extent::hole(2 * P),
        Extent::data(1000),
    ];
    assert_eq!(status(&m, 0, size), expect);
    assert_eq!(status(&m, 0, u64::MAX), expect);
    // Starting mid-hole and ending mid-data.
    assert_eq!(status(&m, P + 1, 2 * P), vec![Extent::hole(P - 1), Extent::data(P + 1)]);
    // Starting mid-data.
    assert_eq!(status(&m, 3 * P + 9, 1), vec![Extent::data(1)]);
    assert_eq!(status(&m, 3 * P + 9, P), vec![Extent::data(P - 9), Extent::hole(9)]);
    // The partial last page.
    assert_eq!(status(&m, size - 1, 100), vec![Extent::data(1)]);
    // `out` is appended to, and not merged with what was there.
    let mut out = vec![Extent::hole(1)];
    m.block_status(0, P, &mut out).unwrap();
    assert_eq!(out, vec![Extent::hole(1), Extent::hole(P)]);
    for (offset, length) in [(0, size), (17, 3 * P), (size - 5, 5), (4 * P, 1)] {
        check_extents(&status(&m, offset, length), offset, length, size);
    }
}

#[test]
fn block_status_of_fully_allocated_export() {
    let size = 200 * MIB;
    let m = MemoryStorage::new(size);
    let data = vec![0x55; MIB as usize];
    for i in 0..200 {
        m.write_at(&data, i * MIB, false).unwrap();
    }
    let mut covered = 0;
    while covered < size {
        let ext = status(&m, covered, size - covered);
        let n = check_extents(&ext, covered, size - covered, size);
        assert!(ext.iter().all(|e| e.flags.is_empty()));
        covered += n;
    }
    assert_eq!(covered, size);
}

#[test]
fn read_only_refuses_writes() {
    let m = MemoryStorage::with_options(4 * P, true);
    let caps = m.capabilities();
    assert!(caps.read_only && !caps.can_trim && !caps.can_zero && caps.can_multi_conn);
    assert_eq!(errno(m.write_at(&[1], 0, false)), libc::EPERM);
    assert_eq!(errno(m.trim(0, P, false)), libc::EPERM);
    assert_eq!(errno(m.write_zeroes(0, P, ZeroFlags::default())), libc::EPERM);
    let fast = ZeroFlags {
        fast: true,
        no_hole: true,
        fua: true,
    };
    assert_eq!(errno(m.write_zeroes(0, P, fast)), libc::EPERM);
    assert!(read(&m, 0, 4 * P as usize).iter().all(|&b| b == 0));
    assert_eq!(status(&m, 0, 4 * P), vec![Extent::hole(4 * P)]);
    m.flush().unwrap();
    assert_eq!(m.allocated_bytes(), 0);
}

#[test]
fn out_of_range_is_an_error() {
    let size = 3 * P + 1;
    let m = MemoryStorage::new(size);
    let mut buf = [0u8; 2];
    let z = ZeroFlags::default();
    assert_eq!(errno(m.read_at(&mut buf, size - 1)), libc::EINVAL);
    assert_eq!(errno(m.read_at(&mut buf, u64::MAX)), libc::EINVAL);
    assert_eq!(errno(m.write_at(&buf, size - 1, false)), libc::EINVAL);
    assert_eq!(errno(m.write_at(&buf, u64::MAX - 1, false)), libc::EINVAL);
    assert_eq!(errno(m.trim(1, size, false)), libc::EINVAL);
    assert_eq!(errno(m.trim(u64::MAX, 2, false)), libc::EINVAL);
    assert_eq!(errno(m.write_zeroes(size, 1, z)), libc::EINVAL);
    assert_eq!(errno(m.write_zeroes(2, u64::MAX, z)), libc::EINVAL);
    assert_eq!(errno(m.cache(size, 1)), libc::EINVAL);
    let mut out = Vec::new();
    assert_eq!(errno(m.block_status(size, 1, &mut out)), libc::EINVAL);
    assert_eq!(errno(m.block_status(u64::MAX, u64::MAX, &mut out)), libc::EINVAL);
    assert_eq!(errno(m.block_status(0, 0, &mut out)), libc::EINVAL);
    assert!(out.is_empty());
    assert_eq!(m.allocated_bytes(), 0);

    // An export as large as the address space works at its very end.
    let m = MemoryStorage::new(u64::MAX);
    m.write_at(&[7; 100], u64::MAX - 100, false).unwrap();
    assert_eq!(read(&m, u64::MAX - 100, 100), vec![7; 100]);
    assert_eq!(status(&m, u64::MAX - 1, 10), vec![Extent::data(1)]);
    assert_eq!(
        status(&m, 0, u64::MAX).first().map(|e| e.flags),
        Some(Extent::hole(1).flags)
    );
    m.write_zeroes(u64::MAX - 100, 100, z).unwrap();
    assert_eq!(m.allocated_bytes(), 0);
    let zero = MemoryStorage::new(0);
    assert_eq!(errno(zero.block_status(0, 1, &mut out)), libc::EINVAL);
    zero.read_at(&mut [], 0).unwrap();
}

#[test]
fn concurrent_readers_and_writers() {
    const THREADS: u64 = 8;
    const REGION: u64 = 4 * MIB;
    let m: Arc<dyn Storage> = Arc::new(MemoryStorage::new(THREADS * REGION));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                // Each thread owns one region and keeps a shadow copy of it.
                let mut shadow = vec![0u8; REGION as usize];
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut buf = [0u8; 4096];
                for i in 0..4000 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let off = (rng % (REGION - 4096)) & !511;
                    let at = t * REGION + off;
                    match i % 4 {
                        0 | 1 => {
                            buf.fill((rng >> 56) as u8 | 1);
                            m.write_at(&buf, at, false).unwrap();
                            shadow[off as usize..off as usize + 4096].copy_from_slice(&buf);
                        }
                        2 => {
                            m.read_at(&mut buf, at).unwrap();
                            assert_eq!(&buf[..], &shadow[off as usize..off as usize + 4096]);
                        }
                        _ => {
                            let len = 1 + (rng >> 40) % 70_000;
                            let len = len.min(REGION - off);
                            m.write_zeroes(at, len, ZeroFlags::default()).unwrap();
                            shadow[off as usize..(off + len) as usize].fill(0);
                        }
                    }
                    // Reads of a neighbour's region must never fail.
                    let other = ((t + 1) % THREADS) * REGION + off;
                    m.read_at(&mut buf, other).unwrap();
                }
                let mut all = vec![0u8; REGION as usize];
                m.read_at(&mut all, t * REGION).unwrap();
                assert!(all == shadow, "thread {t} region corrupted");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
