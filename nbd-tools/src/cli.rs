//! What the three tools share on their command lines: how usage errors
//! exit, private temporary directories for sockets, shell quoting.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Parses the command line with clap, but exits as libnbd's and QEMU's
/// tools do: `--help` and `--version` print to stdout and exit 0; a usage
/// error prints clap's message to stderr and exits 1 (clap's own 2 means
/// "false" to a script that calls `nbdinfo --can`).
pub fn parse_args<T: clap::Parser>(args: impl IntoIterator<Item = String>) -> Result<T, ExitCode> {
    match T::try_parse_from(args) {
        Ok(a) => Ok(a),
        Err(e) => {
            let _ = e.print();
            Err(if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// A directory only this process can use (mode 0700, made by
/// `mkdtemp(3)`), for private Unix sockets; removed with what is left in
/// it when dropped. It is made under `TMPDIR` unless that path is so long
/// that a socket path in it might not fit in `sockaddr_un` (108 bytes),
/// then under `/tmp`.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Makes a new directory named `PREFIX` followed by six random
    /// characters.
    pub fn new(prefix: &str) -> io::Result<PrivateDir> {
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 64 {
            base = PathBuf::from("/tmp");
        }
        let mut template = base.join(format!("{prefix}XXXXXX")).into_os_string().into_vec();
        template.push(0);
        // SAFETY: `template` is a NUL-terminated buffer that mkdtemp
        // rewrites in place (the six X's), without changing its length.
        let r = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if r.is_null() {
            return Err(io::Error::last_os_error());
        }
        template.pop();
        Ok(PrivateDir {
            path: PathBuf::from(OsString::from_vec(template)),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` in the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `s` quoted for `sh`: in single quotes, each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// `s` as a C string (an error for a NUL inside).
pub fn c_string(s: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote("$x `y` 'z' \\ \"w\"")))
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"$x `y` 'z' \\ \"w\"");
    }

    #[test]
    fn private_dirs() {
        let d = PrivateDir::new("nbd-test").unwrap();
        let p = d.path().to_owned();
        assert!(p.is_dir());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::write(d.join("f"), b"x").unwrap();
        drop(d);
        assert!(!p.exists());
    }
}
