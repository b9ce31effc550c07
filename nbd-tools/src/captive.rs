//! NBD servers run as subprocesses with systemd socket activation, as
//! libnbd's `nbd_connect_systemd_socket_activation` runs them, for the
//! `[ CMD ARGS ... ]` form of `nbdinfo` and `nbdcopy`:
//!
//! ```text
//! nbd-info -- [ qemu-nbd -r -f qcow2 disk.qcow2 ]
//! nbd-copy -- [ qemu-nbd -f qcow2 disk.qcow2 ] - | gzip > disk.raw.gz
//! ```
//!
//! The listening socket is made first, in a private directory, and passed
//! to the command as descriptor 3 with `LISTEN_FDS=1` and `LISTEN_PID` set
//! to the command's process id; the client then connects to that socket.
//! qemu-nbd, nbdkit and nbd-serve all take it. When the [`CaptiveServer`]
//! is dropped the command gets SIGTERM and is waited for, and the
//! directory is removed.
//!
//! The command's stdin is `/dev/null` and its stdout goes to the caller's
//! stderr, so that it can never read from or write into a stream the
//! caller copies through its own stdin or stdout.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nbd_proto::common::TlsMode;
use nbd_proto::uri::{NbdUri, Transport};

use crate::cli::PrivateDir;

/// The descriptor systemd socket activation passes the first socket as.
const FIRST_SOCKET_ACTIVATION_FD: i32 = 3;

/// How long a captive server has to exit after SIGTERM before it gets
/// SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long [`CaptiveServer::explain`] waits for a server to finish
/// exiting, to say how it ended.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// A command-line argument that stands for the `N`th `[ CMD ARGS ... ]`
/// group taken out by [`extract_commands`]. Arguments cannot contain NUL
/// bytes, so no real argument looks like one.
const PLACEHOLDER: &str = "\0[ command ";

/// Takes every `[ CMD ARGS ... ]` group out of a command line (`[` and
/// `]` are separate arguments, as nbdcopy and nbdinfo want them) and puts
/// a placeholder in its place, so that the rest can be parsed as usual:
/// the flags of the command are never taken for the tool's own. Returns
/// the new command line and the commands; [`command_index`] tells which
/// command a placeholder stands for.
pub fn extract_commands(args: impl IntoIterator<Item = String>) -> Result<(Vec<String>, Vec<Vec<String>>), String> {
    let mut out = Vec::new();
    let mut commands = Vec::new();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        if a != "[" {
            out.push(a);
            continue;
        }
        let mut cmd = Vec::new();
        loop {
            match args.next() {
                Some(b) if b == "]" => break,
                Some(b) => cmd.push(b),
                None => return Err("\"[\" without a matching \"]\": write [ CMD ARGS ... ]".into()),
            }
        }
        if cmd.is_empty() {
            return Err("\"[ ]\" holds no command: write [ CMD ARGS ... ]".into());
        }
        out.push(format!("{PLACEHOLDER}{}", commands.len()));
        commands.push(cmd);
    }
    Ok((out, commands))
}

/// Which command (an index into [`extract_commands`]' list) `arg` stands
/// for, if it is a placeholder.
pub fn command_index(arg: &str) -> Option<usize> {
    arg.strip_prefix(PLACEHOLDER)?.parse().ok()
}

/// `[ CMD ARGS ... ]` as the user wrote it, for messages.
pub fn describe_command(argv: &[String]) -> String {
    format!("[ {} ]", argv.join(" "))
}

/// An NBD server running as a subprocess, reached over a private Unix
/// socket (see the [module docs](self)).
#[derive(Debug)]
pub struct CaptiveServer {
    argv: Vec<String>,
    child: Option<Child>,
    uri: NbdUri,
    // Dropped last: the socket lives in it.
    dir: PrivateDir,
}

impl CaptiveServer {
    /// Makes the listening socket, then starts `argv` with it. The
    /// command is looked for on `PATH` first, so that a missing one is a
    /// clear error here rather than a connection that is reset later.
    pub fn start(argv: &[String]) -> io::Result<CaptiveServer> {
        let what = describe_command(argv);
        let Some(program) = argv.first() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
        };
        let path = find_program(program)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{program}: command not found")))?;
        let dir = PrivateDir::new("nbd-captive-")?;
        let socket = dir.join("sock");
        let listener =
            UnixListener::bind(&socket).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", socket.display())))?;
        let fd = listener.as_raw_fd();
        // The shell stands in for the command only long enough to learn
        // its own process id (which `exec` keeps) for LISTEN_PID.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
            .arg(program)
            .arg(&path)
            .args(&argv[1..])
            .env("LISTEN_FDS", "1")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::from(io::stderr().as_fd().try_clone_to_owned()?));
        // SAFETY: the closure runs between fork and exec and calls only
        // dup2 and fcntl, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if fd == FIRST_SOCKET_ACTIVATION_FD {
                    // Already in place: only clear close-on-exec.
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags == -1 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, FIRST_SOCKET_ACTIVATION_FD) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
        // The command has the socket now; once it exits, connecting
        // fails rather than waiting in a queue nobody accepts from.
        drop(listener);
        let uri = NbdUri {
            transport: Transport::Unix {
                socket: socket.to_string_lossy().into_owned(),
            },
            export: String::new(),
            tls: TlsMode::Off,
            tls_certificates: None,
            tls_hostname: None,
            tls_verify_peer: true,
            tls_type: None,
            user: None,
        };
        Ok(CaptiveServer {
            argv: argv.to_vec(),
            child: Some(child),
            uri,
            dir,
        })
    }

    /// The URI to connect to (a Unix socket, the default export).
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// The command, as `[ CMD ARGS ... ]`.
    pub fn describe(&self) -> String {
        describe_command(&self.argv)
    }

    /// The process id of the command.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error of the connection to this server, with how the server
    /// ended if it did (a server that fails to start shows up as a
    /// connection that is refused or reset).
    pub fn explain(&mut self, e: impl std::fmt::Display) -> String {
        // A server that failed is often still exiting when its client
        // sees the connection go: give it a moment.
        let deadline = Instant::now() + EXIT_GRACE;
        let mut exited = None;
        while let Some(c) = self.child.as_mut() {
            exited = c.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match exited {
            Some(status) => format!("{}: {e} (the server {})", self.describe(), describe_status(status)),
            None => format!("{}: {e}", self.describe()),
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL if it is still there after
    /// a while; waits for it and removes the socket. Returns how it ended.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) has no memory-safety preconditions; the
            // child is not reaped yet, so the pid is still its own.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }

    /// The private directory the socket is in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for CaptiveServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// "exited with status N" or "was killed by signal N".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => format!("ended ({status})"),
    }
}

/// `program` if it names a file (it has a `/`), else the first executable
/// of that name on `PATH`.
fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn commands_are_taken_out() {
        let (args, cmds) = extract_commands(strings(&[
            "nbd-copy", "--", "[", "qemu-nbd", "-f", "raw", "x", "]", "-", "--flush",
        ]))
        .unwrap();
        assert_eq!(cmds, vec![strings(&["qemu-nbd", "-f", "raw", "x"])]);
        assert_eq!(args.len(), 5);
        assert_eq!(command_index(&args[2]), Some(0));
        assert_eq!(&args[3..], &strings(&["-", "--flush"])[..]);
        let (args, cmds) = extract_commands(strings(&["x", "[", "a", "]", "[", "b", "c", "]"])).unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(command_index(&args[2]), Some(1));
        assert_eq!(command_index("[ a ]"), None);
        assert!(extract_commands(strings(&["x", "[", "a"])).is_err());
        assert!(extract_commands(strings(&["x", "[", "]"])).is_err());
    }

    #[test]
    fn missing_command_is_a_clear_error() {
        let e = CaptiveServer::start(&strings(&["no-such-nbd-server-here"])).unwrap_err();
        assert!(e.to_string().contains("command not found"), "{e}");
    }

    #[test]
    fn the_command_gets_the_listening_socket_as_fd_3() {
        // A shell that reports what socket activation gave it.
        let out = PrivateDir::new("nbd-captive-test-").unwrap();
        let report = out.join("report");
        let script = "if test \"$LISTEN_PID\" = \"$$\" && test \"$LISTEN_FDS\" = 1 && test -S /dev/fd/3; \
                      then echo ok > \"$0\"; else echo bad > \"$0\"; fi; exec sleep 30";
        let report_arg = report.to_str().unwrap().to_string();
        let mut s = CaptiveServer::start(&[String::from("sh"), "-c".into(), script.into(), report_arg]).unwrap();
        let Transport::Unix { socket } = &s.uri().transport else {
            panic!("not a Unix URI");
        };
        // Connecting succeeds at once: the socket listens (in the child).
        std::os::unix::net::UnixStream::connect(socket).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::read_to_string(&report).map_or(true, |r| !r.ends_with('\n')) {
            assert!(Instant::now() < deadline, "the command did not run");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&report).unwrap(), "ok\n");
        let dir = s.dir().to_owned();
        let status = s.stop().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        drop(s);
        assert!(!dir.exists());
    }
}
