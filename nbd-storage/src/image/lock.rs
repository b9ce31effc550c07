//! QEMU's image locks: open-file-description (OFD) byte-range locks on the
//! image file, so that QEMU (a VM, `qemu-io`, `qemu-img`, `qemu-nbd`) and
//! we see each other's use of an image.
//!
//! The scheme is QEMU's (its `file` protocol driver; the byte numbers and
//! permission bits are a de-facto interface that libvirt and other tools
//! also rely on). Each block-layer permission `i` has two bytes:
//!
//! * byte `100 + i` is read-locked by every user that *holds* permission `i`;
//! * byte `200 + i` is read-locked by every user that does *not share*
//!   permission `i` with others.
//!
//! A user taking permission `i` first takes its own locks, then tests (with
//! `F_OFD_GETLK` for a write lock, which any other read lock conflicts with)
//! that nobody else locked byte `200 + i`; and for each permission it does
//! not share, that nobody else locked byte `100 + i`. Locks are held for as
//! long as the file description is open, and vanish with it, also when the
//! process dies.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `BLK_PERM_CONSISTENT_READ`: reads see consistent data.
pub const PERM_CONSISTENT_READ: u32 = 1 << 0;
/// `BLK_PERM_WRITE`: the guest-visible contents may change.
pub const PERM_WRITE: u32 = 1 << 1;
/// `BLK_PERM_WRITE_UNCHANGED`: writes that leave the contents as they are.
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
/// `BLK_PERM_RESIZE`: the image may be resized.
pub const PERM_RESIZE: u32 = 1 << 3;
/// Every permission bit QEMU defines (since it dropped `GRAPH_MOD`).
pub const PERM_ALL: u32 = 0x0f;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// What one user of an image takes and what it lets others take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockPerms {
    /// Permissions held (`PERM_*` bits).
    pub perm: u32,
    /// Permissions others may hold at the same time.
    pub shared: u32,
}

impl LockPerms {
    /// What QEMU takes on a qcow2 image file it opens writable: read,
    /// write and resize, sharing only reads and unchanged writes (nobody may
    /// write or resize the file under the format's metadata).
    pub const QCOW2_WRITABLE: LockPerms = LockPerms {
        perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// What QEMU takes on a qcow2 image file it opens read-only (also a
    /// backing file): read, and nobody may write or resize it meanwhile.
    pub const QCOW2_READ_ONLY: LockPerms = LockPerms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// A raw image served writable: read and write, nobody else may write
    /// or resize it, as a VM's disk (`share-rw=off`) does. (`qemu-nbd` only
    /// refuses resizers here; we refuse other writers too, so that a write
    /// from elsewhere cannot race the NBD clients' writes unseen.)
    pub const RAW_WRITABLE: LockPerms = LockPerms {
        perm: PERM_CONSISTENT_READ | PERM_WRITE,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// A raw image served read-only, as `qemu-nbd -r` takes it: read, and
    /// nobody may resize it.
    pub const RAW_READ_ONLY: LockPerms = LockPerms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL & !PERM_RESIZE,
    };
    /// A raw backing file, as QEMU takes it: read, everything shared.
    pub const RAW_BACKING: LockPerms = LockPerms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL,
    };
}

/// Names of permission bits, as QEMU prints them.
fn perm_name(bit: u32) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        PERM_RESIZE => "resize",
        _ => "unknown",
    }
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero
    // is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: `fl` is a valid, exclusively borrowed flock structure and
        // the descriptor is owned by `file`, which outlives the call.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
        if r != -1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether another file description holds a lock on `byte` of `file`.
fn byte_locked_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU's locks for `perms` on `file` (opened by the caller; the
/// locks live as long as its file description), then checks that nobody
/// else holds a conflicting one. On a conflict every lock this call took
/// is released and the error says which permission was refused, as QEMU
/// says it, naming `what` (usually the path).
///
/// Filesystems without OFD locks (`EINVAL`/`ENOLCK`/`EOPNOTSUPP` on the
/// first lock) are served without locks, as QEMU does with `locking=auto`.
pub fn lock_image(file: &File, perms: LockPerms, what: &str) -> io::Result<()> {
    let mut bytes = Vec::new();
    for i in 0..4 {
        let bit = 1u32 << i;
        if perms.perm & bit != 0 {
            bytes.push(PERM_BASE + i);
        }
        if perms.shared & bit == 0 {
            bytes.push(SHARED_BASE + i);
        }
    }
    for (n, &byte) in bytes.iter().enumerate() {
        let mut fl = flock(libc::F_RDLCK as libc::c_short, byte);
        if let Err(e) = fcntl_lock(file, libc::F_OFD_SETLK, &mut fl) {
            if n == 0 && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP)) {
                return Ok(());
            }
            unlock(file, &bytes[..n]);
            return Err(conflict(
                what,
                &format!("failed to lock byte {byte}: {e}"),
                e.raw_os_error(),
            ));
        }
    }
    for i in 0..4 {
        let bit = 1u32 << i;
        let check = if perms.perm & bit != 0 && byte_locked_by_others(file, SHARED_BASE + i)? {
            Some(format!("Failed to get \"{}\" lock", perm_name(bit)))
        } else if perms.shared & bit == 0 && byte_locked_by_others(file, PERM_BASE + i)? {
            Some(format!("Failed to get shared \"{}\" lock", perm_name(bit)))
        } else {
            None
        };
        if let Some(msg) = check {
            unlock(file, &bytes);
            return Err(conflict(what, &msg, Some(libc::EAGAIN)));
        }
    }
    Ok(())
}

fn unlock(file: &File, bytes: &[i64]) {
    for &byte in bytes {
        let mut fl = flock(libc::F_UNLCK as libc::c_short, byte);
        let _ = fcntl_lock(file, libc::F_OFD_SETLK, &mut fl);
    }
}

fn conflict(what: &str, msg: &str, errno: Option<i32>) -> io::Error {
    let kind = match errno {
        Some(libc::EAGAIN) | Some(libc::EACCES) => io::ErrorKind::WouldBlock,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        format!("{what}: {msg}; is another process (a VM, qemu-io, qemu-nbd) using the image?"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap()
    }

    #[test]
    fn writers_exclude_each_other_readers_share() {
        let dir = std::env::temp_dir().join(format!("nbd-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let a = open(&path);
        lock_image(&a, LockPerms::QCOW2_WRITABLE, "img").unwrap();
        // Same process, other file description: OFD locks still conflict.
        let b = open(&path);
        let e = lock_image(&b, LockPerms::QCOW2_WRITABLE, "img").unwrap_err();
        assert!(e.to_string().contains("\"write\" lock"), "{e}");
        let c = open(&path);
        assert!(lock_image(&c, LockPerms::QCOW2_READ_ONLY, "img").is_err());
        drop(a);
        // The holder is gone: readers share, a writer is refused by them.
        lock_image(&b, LockPerms::QCOW2_READ_ONLY, "img").unwrap();
        lock_image(&c, LockPerms::QCOW2_READ_ONLY, "img").unwrap();
        let d = open(&path);
        let e = lock_image(&d, LockPerms::RAW_WRITABLE, "img").unwrap_err();
        assert!(e.to_string().contains("Failed to get \"write\" lock"), "{e}");
        drop((b, c));
        // A writer that shares everything (qemu-io on a raw file) still
        // keeps out a writer that shares no writes.
        let w = open(&path);
        let all = LockPerms {
            perm: PERM_CONSISTENT_READ | PERM_WRITE,
            shared: PERM_ALL,
        };
        lock_image(&w, all, "img").unwrap();
        let e = lock_image(&d, LockPerms::RAW_WRITABLE, "img").unwrap_err();
        assert!(e.to_string().contains("shared \"write\" lock"), "{e}");
        drop(w);
        lock_image(&d, LockPerms::RAW_WRITABLE, "img").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
