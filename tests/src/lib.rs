//! Harness for the workspace's integration tests against real NBD peers.
//!
//! The integration tests in `tests/tests/*.rs` start real NBD servers
//! (`nbdkit`, `qemu-nbd`, `nbd-server`) listening on Unix sockets inside a
//! [`TempDir`], talk to them with the crates of this workspace or with real
//! clients (`nbdinfo`, `nbdcopy`, `nbdsh`, `qemu-io`, ...) run through
//! [`run`] / [`run_ok`], and stop them again when the [`Peer`] is dropped.
//!
//! A test that needs a peer first asks whether it is installed:
//!
//! ```no_run
//! use nbd_tests::{TempDir, nbdkit, require_peer, run_ok};
//!
//! if !require_peer("nbdkit") || !require_peer("nbdinfo") {
//!     return;
//! }
//! let dir = TempDir::new();
//! let peer = nbdkit(&dir, &["memory", "64M"]);
//! let json = run_ok("nbdinfo", &["--json", &peer.uri("")]);
//! assert!(json.contains("\"export-size\": 67108864"));
//! ```
//!
//! Without the peers the tests are skipped (with a note on stderr), unless
//! the environment variable [`REQUIRE_PEERS_ENV`] (`NBD_TESTS_REQUIRE_PEERS`)
//! is set, as it is in CI: then a missing peer fails the test.  Install the
//! peers with `scripts/install-peers.sh`.

#![warn(missing_docs)]

pub mod blkhash_images;
pub mod fault_proxy;
pub mod stall;
pub mod tls;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Environment variable that turns a missing peer from a skipped test into a
/// failed one (set in CI).  Any value other than empty or `0` counts as set.
pub const REQUIRE_PEERS_ENV: &str = "NBD_TESTS_REQUIRE_PEERS";

/// How long a starter waits for a peer to accept connections.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`run`] and [`run_ok`] let a command run before killing it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest path that fits in `sockaddr_un.sun_path` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How often the harness polls a starting peer or a running command.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Directory holding the Python interpreter that has Debian's libnbd
/// bindings; see [`command`].
const SYSTEM_PYTHON_DIR: &str = "/usr/bin";

// ---------------------------------------------------------------------------
// Peer discovery
// ---------------------------------------------------------------------------

/// Whether [`REQUIRE_PEERS_ENV`] is set, i.e. missing peers must fail tests.
pub fn peers_required() -> bool {
    std::env::var_os(REQUIRE_PEERS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Finds an executable named `cmd` on `PATH`, then in `/usr/sbin` and
/// `/sbin` (where Debian puts daemons such as nginx, out of a user's
/// `PATH`), or checks `cmd` itself if it contains a `/`; returns its path.
pub fn find_program(cmd: &str) -> Option<PathBuf> {
    fn is_executable(path: &Path) -> bool {
        fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    if cmd.contains('/') {
        let path = PathBuf::from(cmd);
        return is_executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(cmd))
        .find(|p| is_executable(p))
}

/// Returns `true` if the peer program `cmd` is installed (on `PATH`).
///
/// If it is missing and [`peers_required`], this panics ("peer X is missing;
/// run scripts/install-peers.sh"); otherwise it prints "skipping: X not
/// installed" to stderr and returns `false`.  Use it as
/// `if !require_peer("nbdkit") { return; }`.
///
/// For `nbdsh` it also checks that the program works, i.e. that Python can
/// import libnbd's bindings (see [`command`]).
pub fn require_peer(cmd: &str) -> bool {
    let problem = match find_program(cmd) {
        None => Some("not installed".to_owned()),
        Some(_) if cmd == "nbdsh" => nbdsh_problem(),
        Some(_) => None,
    };
    let Some(problem) = problem else {
        return true;
    };
    if peers_required() {
        panic!("peer {cmd} is missing ({problem}); run scripts/install-peers.sh ({REQUIRE_PEERS_ENV} is set)");
    }
    eprintln!("skipping: {cmd} {problem}");
    false
}

/// [`require_peer`] for each of `cmds`; `true` only if all are installed.
/// Every missing one is reported, not just the first.
pub fn require_peers(cmds: &[&str]) -> bool {
    let mut all = true;
    for cmd in cmds {
        all &= require_peer(cmd);
    }
    all
}

/// Returns `true` if `python3` (the first on `PATH`, the one
/// `scripts/install-peers.sh` installs Python packages for) can import
/// `module`, e.g. `ovirt_imageio._internal.blkhash`; otherwise, as
/// [`require_peer`], panics if [`peers_required`] and else prints
/// "skipping: ..." and returns `false`.
pub fn require_python_module(module: &str) -> bool {
    let problem = if find_program("python3").is_none() {
        "python3 is not installed".to_owned()
    } else {
        match command("python3")
            .args(["-c", &format!("import {module}")])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => return true,
            // The traceback's last line says why ("No module named ...").
            Ok(out) => format!(
                "python3 cannot import it: {}",
                String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("")
            ),
            Err(e) => format!("python3 cannot be run: {e}"),
        }
    };
    if peers_required() {
        panic!(
            "Python module {module} is missing ({problem}); run scripts/install-peers.sh ({REQUIRE_PEERS_ENV} is set)"
        );
    }
    eprintln!("skipping: Python module {module}: {problem}");
    false
}

/// Why `nbdsh` cannot run, if it cannot.
fn nbdsh_problem() -> Option<String> {
    let output = command("nbdsh").arg("--version").stdin(Stdio::null()).output();
    match output {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "does not work ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot be run: {e}")),
    }
}

/// A [`Command`] for `program`, with the environment fixed up for peers.
///
/// `nbdsh` is a shell script running `python3 -m nbd`; when another Python
/// (pyenv, a virtualenv) comes first on `PATH` it lacks Debian's libnbd
/// bindings and `nbdsh` fails with "No module named nbd".  For `nbdsh` this
/// therefore puts `/usr/bin` first on `PATH`.  Other programs are unchanged.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    if Path::new(program).file_name() == Some(OsStr::new("nbdsh"))
        && Path::new(SYSTEM_PYTHON_DIR).join("python3").exists()
    {
        let mut dirs = vec![PathBuf::from(SYSTEM_PYTHON_DIR)];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        if let Ok(path) = std::env::join_paths(dirs) {
            cmd.env("PATH", path);
        }
    }
    cmd
}

/// How long [`our_bin`] lets `cargo build` run.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The path (as a `String`, ready for [`run`]) of the binary `name` of this
/// workspace, e.g. `our_bin("nbd-info")` for nbd-blocking's `nbd-info`.
///
/// Cargo builds the binaries of a dependency only when that package itself
/// is tested, so the first call per name in a test process runs
/// `cargo build --bin NAME` (quietly, a no-op when up to date) for the
/// profile and target directory the running test was built in; the binary
/// is then `TARGET_DIR/PROFILE/NAME`.  Panics with cargo's output if the
/// build fails.
pub fn our_bin(name: &str) -> String {
    build_target(name, &["--bin", name], "")
}

/// Like [`our_bin`], for a binary built with cargo features of the
/// workspace's packages, e.g.
/// `our_bin_with_features("nbd-serve", &["nbd-tools/rbd"])`.
///
/// The binary is copied to `PROFILE/NAME+FEATURES` (features joined with
/// `+`, `/` replaced by `-`), so that a later [`our_bin`] of the same name,
/// which rebuilds `PROFILE/NAME` without the features, leaves it alone.
pub fn our_bin_with_features(name: &str, features: &[&str]) -> String {
    if features.is_empty() {
        return our_bin(name);
    }
    let list = features.join(",");
    let key = format!("{name}+{}", features.join("+").replace('/', "-"));
    static COPIED: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut copied = COPIED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = copied.iter().find(|(k, _)| *k == key) {
        return path.clone();
    }
    let built = build_target(&key, &["--bin", name, "--features", &list], "");
    let copy = Path::new(&built).with_file_name(&key);
    fs::copy(&built, &copy).unwrap_or_else(|e| panic!("cannot copy {built} to {}: {e}", copy.display()));
    let copy = path_arg(&copy);
    copied.push((key, copy.clone()));
    copy
}

/// The path of example `name` of package `package` of this workspace (built
/// the way [`our_bin`] builds binaries), e.g.
/// `our_example("nbd-proto", "server")`.
pub fn our_example(package: &str, name: &str) -> String {
    build_target(
        &format!("{package}/{name}"),
        &["-p", package, "--example", name],
        "examples",
    )
}

/// Builds a target of the workspace once per process (`cargo build
/// WHAT...` for the profile and target directory the running test was
/// built in) and returns the path of `PROFILE/SUBDIR/NAME`.
fn build_target(key: &str, what: &[&str], subdir: &str) -> String {
    static BUILT: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    // Holding the lock while building serializes the builds of one process.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(n, _)| n == key) {
        return path.clone();
    }

    // A test executable lives in TARGET_DIR/PROFILE/deps/, a binary of
    // this crate (the benchmark) in TARGET_DIR/PROFILE/.
    let exe = std::env::current_exe().expect("path of the running test executable");
    let parent = exe.parent().expect("directory of the running executable");
    let profile_dir = if parent.file_name() == Some(OsStr::new("deps")) {
        parent
            .parent()
            .unwrap_or_else(|| panic!("{} has no TARGET/PROFILE", exe.display()))
    } else {
        parent
    };
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .expect("profile directory name");
    let profile = match profile {
        "debug" => "dev",
        other => other,
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let (manifest, target_dir) = (path_arg(&manifest), path_arg(target_dir));
    let mut args = vec![
        "build",
        "--quiet",
        "--manifest-path",
        &manifest,
        "--target-dir",
        &target_dir,
        "--profile",
        profile,
    ];
    args.extend_from_slice(what);
    let output = run_timeout(&cargo, &args, BUILD_TIMEOUT);
    if !output.status.success() {
        panic!(
            "cannot build {key}: `{}` failed\n{}",
            command_line(&cargo, &args),
            describe_output(&output)
        );
    }
    let name = key.rsplit('/').next().unwrap_or(key);
    let name = name.split('+').next().unwrap_or(name);
    let bin = profile_dir.join(subdir).join(name);
    assert!(bin.is_file(), "cargo built {key} but {} does not exist", bin.display());
    let bin = path_arg(&bin);
    built.push((key.to_owned(), bin.clone()));
    bin
}

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

/// A uniquely named temporary directory, removed (recursively) on drop.
///
/// It is created under [`std::env::temp_dir`], or under `/tmp` if that path
/// is so long that Unix socket paths inside it might not fit in
/// `sockaddr_un`.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new, empty, uniquely named directory.
    ///
    /// The name combines the process id, a per-process counter and the
    /// current time.  Panics if no directory can be created.
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let pid = std::process::id();
        let mut last_error = None;
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let path = base.join(format!("nbdt-{pid}-{n}-{nanos:x}"));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(e) => panic!("cannot create temporary directory {}: {e}", path.display()),
            }
        }
        panic!(
            "cannot create a unique temporary directory under {}: {last_error:?}",
            base.display()
        );
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory (nothing is created).
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// A fresh, not yet existing path for a Unix socket in the directory,
    /// named after `prefix` (`PREFIX-N.sock`).  Panics if the path is too
    /// long for `sockaddr_un`.
    pub fn socket_path(&self, prefix: &str) -> PathBuf {
        let path = self.unique_path(prefix, "sock");
        assert!(
            path.as_os_str().len() <= MAX_SOCKET_PATH,
            "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter TMPDIR",
            path.display()
        );
        path
    }

    /// Creates (or truncates) the file `name` in the directory as a sparse
    /// file of `len` bytes of zeroes, returning its path.
    pub fn sparse_file(&self, name: &str, len: u64) -> PathBuf {
        let path = self.join(name);
        let file = File::create(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        file.set_len(len)
            .unwrap_or_else(|e| panic!("cannot resize {} to {len}: {e}", path.display()));
        path
    }

    /// `PREFIX-N.EXT` in the directory, with `N` unique in this process.
    fn unique_path(&self, prefix: &str, ext: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.join(format!("{prefix}-{n}.{ext}"))
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// URIs
// ---------------------------------------------------------------------------

/// Percent-encodes `s` for the path or query of an NBD URI.
///
/// Every byte of the UTF-8 encoding is written as `%XX` (upper-case hex)
/// except the RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) and
/// `/`, which RFC 3986 allows literally in both paths and queries (so socket
/// paths stay readable: `socket=/tmp/x.sock`).  libnbd decodes either form.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Where a [`Peer`] listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP socket at this address.
    Tcp(SocketAddr),
}

impl Endpoint {
    /// The NBD URI of export `export` at this endpoint:
    /// `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`, with the
    /// export name and socket path [`percent_encode`]d.
    ///
    /// Panics if the socket path is not UTF-8.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Endpoint::Unix(path) => {
                let path = path
                    .to_str()
                    .unwrap_or_else(|| panic!("socket path {} is not UTF-8", path.display()));
                format!("nbd+unix:///{}?socket={}", percent_encode(export), percent_encode(path))
            }
            Endpoint::Tcp(addr) => format!("nbd://{addr}/{}", percent_encode(export)),
        }
    }
}

/// A free TCP port on 127.0.0.1 (found by binding port 0 and closing the
/// listener again; another process could take it before it is used).
pub fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr of a bound listener").port()
}

// ---------------------------------------------------------------------------
// Waiting for peers
// ---------------------------------------------------------------------------

/// Polls until the Unix socket at `path` accepts a connection, or fails.
///
/// Fails if `child` exits first (the error names its exit status; the
/// starters add the child's stderr) or after `timeout` (use
/// [`STARTUP_TIMEOUT`]), so a peer that failed to start gives an error
/// rather than a hang.  The probe connection is closed at once.
pub fn wait_for_socket(path: &Path, child: &mut Child, timeout: Duration) -> io::Result<()> {
    wait_for_endpoint(&Endpoint::Unix(path.to_owned()), child, timeout)
}

/// Like [`wait_for_socket`] for any [`Endpoint`], including TCP.
pub fn wait_for_endpoint(endpoint: &Endpoint, child: &mut Child, timeout: Duration) -> io::Result<()> {
    wait_until_listening(endpoint, timeout, || {
        Ok(child.try_wait()?.map(|status| format!("exited ({status})")))
    })
}

/// Polls `endpoint` until it accepts a connection; `dead` says whether (and
/// how) the serving process ended.
fn wait_until_listening(
    endpoint: &Endpoint,
    timeout: Duration,
    mut dead: impl FnMut() -> io::Result<Option<String>>,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(how) = dead()? {
            return Err(io::Error::other(format!(
                "peer {how} before accepting connections on {endpoint:?}"
            )));
        }
        let attempt = match endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path).map(drop),
            Endpoint::Tcp(addr) => TcpStream::connect_timeout(addr, Duration::from_millis(500)).map(drop),
        };
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("peer did not accept connections on {endpoint:?} within {timeout:?}: {e}"),
                ));
            }
            Err(_) => thread::sleep(POLL_INTERVAL),
        }
    }
}

// ---------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------

/// How a [`Peer`]'s process is owned.
#[derive(Debug)]
enum Process {
    /// Our child, running in the foreground.
    Child(Child),
    /// A daemon (not our child) that leads its own process group.
    Daemon(u32),
}

/// A running NBD server, stopped when dropped.
///
/// A foreground peer (nbdkit, qemu-nbd) is our child: on drop it is killed
/// with SIGKILL and reaped.  nbd-server can only serve more than one
/// connection as a daemon; on drop its whole process group (the daemon and
/// its per-client children) is killed with SIGKILL.
///
/// The peer's stdout and stderr go to a file in the [`TempDir`]; see
/// [`Peer::stderr`].
#[derive(Debug)]
pub struct Peer {
    program: String,
    process: Process,
    endpoint: Endpoint,
    log: PathBuf,
}

impl Peer {
    /// Starts `program args` in the foreground and waits until it accepts
    /// connections on `endpoint`, which `args` must tell it to listen on.
    ///
    /// Its stdout and stderr go to a log file in `dir`.  Panics with the
    /// command line and the log if it cannot be started, exits, or does not
    /// listen within [`STARTUP_TIMEOUT`].  This is what the other starters
    /// use; use it to start a server they do not cover.
    pub fn start(dir: &TempDir, program: &str, args: &[&str], endpoint: Endpoint) -> Peer {
        Peer::try_start(dir, program, args, endpoint).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Peer::start`], returning an error (with the command line and
    /// the peer's log) instead of panicking.
    pub fn try_start(dir: &TempDir, program: &str, args: &[&str], endpoint: Endpoint) -> io::Result<Peer> {
        let cmdline = command_line(program, args);
        let log = dir.unique_path(program_name(program), "log");
        let stdout = File::create(&log)?;
        let stderr = stdout.try_clone()?;
        let mut child = command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run `{cmdline}`: {e}")))?;
        if let Err(e) = wait_for_endpoint(&endpoint, &mut child, STARTUP_TIMEOUT) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(startup_error(&cmdline, &e, &log));
        }
        Ok(Peer {
            program: program.to_owned(),
            process: Process::Child(child),
            endpoint,
            log,
        })
    }

    /// The Unix socket the peer listens on.  Panics for a TCP peer.
    pub fn socket(&self) -> &Path {
        match &self.endpoint {
            Endpoint::Unix(path) => path,
            Endpoint::Tcp(addr) => panic!("{} listens on TCP {addr}, not on a Unix socket", self.program),
        }
    }

    /// Where the peer listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The NBD URI of the peer's export `export` (`""` for the default
    /// export): `nbd+unix:///EXPORT?socket=PATH`, or `nbd://HOST:PORT/EXPORT`
    /// for a TCP peer.  See [`Endpoint::uri`].
    pub fn uri(&self, export: &str) -> String {
        self.endpoint.uri(export)
    }

    /// The process id of the peer (for nbd-server, of the daemon).
    pub fn pid(&self) -> u32 {
        match &self.process {
            Process::Child(child) => child.id(),
            Process::Daemon(pid) => *pid,
        }
    }

    /// Everything the peer wrote to stdout and stderr so far.  (nbd-server
    /// logs to syslog once it has daemonized, so for it this only holds its
    /// start-up messages.)
    pub fn stderr(&self) -> String {
        fs::read(&self.log).map_or_else(
            |e| format!("<cannot read {}: {e}>", self.log.display()),
            |b| String::from_utf8_lossy(&b).into_owned(),
        )
    }

    /// The file the peer's stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Kills the peer now with SIGKILL (as dropping it would) and waits
    /// until it is gone, e.g. to test how a client copes with a server that
    /// dies.  Killing a dead peer again does nothing.
    pub fn kill(&mut self) {
        match &mut self.process {
            Process::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Process::Daemon(pid) => kill_daemon(*pid),
        }
    }

    /// Whether the peer's process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.process {
            Process::Child(child) => matches!(child.try_wait(), Ok(None)),
            Process::Daemon(pid) => process_alive(*pid),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `nbdkit -f -U SOCKET ARGS...` and waits until it listens.
///
/// `args` are further options, the plugin and its parameters, e.g.
/// `["memory", "64M"]`, `["-r", "--filter=exportname", "memory", "1M",
/// "exportname=a", "exportname=b"]` or `["--oldstyle", "memory", "1M"]`.
/// Panics (with nbdkit's stderr) if it does not start.
pub fn nbdkit(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbdkit");
    let socket_arg = path_arg(&socket);
    let mut full = vec!["-f", "-U", &socket_arg];
    full.extend_from_slice(args);
    Peer::start(dir, "nbdkit", &full, Endpoint::Unix(socket))
}

/// Starts `nbdkit -f -i 127.0.0.1 -p PORT ARGS...` on a free TCP port and
/// waits until it listens.  Like [`nbdkit`], but over TCP.
pub fn nbdkit_tcp(dir: &TempDir, args: &[&str]) -> Peer {
    start_on_free_port(|port| {
        let port_arg = port.to_string();
        let mut full = vec!["-f", "-i", "127.0.0.1", "-p", &port_arg];
        full.extend_from_slice(args);
        Peer::try_start(dir, "nbdkit", &full, Endpoint::Tcp((Ipv4Addr::LOCALHOST, port).into()))
    })
}

/// Starts `qemu-nbd --socket=SOCKET --persistent --shared=16 ARGS...` and
/// waits until it listens.
///
/// `args` are further options and the image, e.g. `["-f", "raw", IMG]` or
/// `["-f", "qcow2", "-x", "disk", "-r", IMG]`.  `--persistent` keeps it
/// serving after a client disconnects (including the harness's probe) and
/// `--shared=16` allows 16 simultaneous clients.  Panics (with qemu-nbd's
/// stderr) if it does not start.
pub fn qemu_nbd(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("qemu-nbd");
    let socket_arg = format!("--socket={}", path_arg(&socket));
    let mut full = vec![socket_arg.as_str(), "--persistent", "--shared=16"];
    full.extend_from_slice(args);
    Peer::start(dir, "qemu-nbd", &full, Endpoint::Unix(socket))
}

/// Starts nbd-server on a Unix socket with one export per
/// `(name, file, readonly)` and waits until it listens.
///
/// The generated configuration has `allowlist = true` (so clients can list
/// the exports) and, per export, a section `[name]` with `exportname = FILE`
/// (made absolute) and `readonly = true|false`.  The files must exist:
/// nbd-server opens them only when a client selects the export.  See
/// [`nbd_server_config`] for the command line.
pub fn nbd_server(dir: &TempDir, exports: &[(&str, &Path, bool)]) -> Peer {
    let mut sections = String::new();
    for &(name, file, readonly) in exports {
        let file = std::path::absolute(file).unwrap_or_else(|e| panic!("bad path {}: {e}", file.display()));
        let file = file
            .to_str()
            .unwrap_or_else(|| panic!("export file {} is not UTF-8", file.display()));
        let _ = write!(
            sections,
            "[{}]\nexportname = {}\nreadonly = {readonly}\n",
            config_section_name(name),
            config_value(file)
        );
    }
    nbd_server_config(dir, "", &sections)
}

/// Starts nbd-server with a configuration of your own and waits until it
/// listens.
///
/// The harness writes `[generic]` with `unixsock = SOCKET` and
/// `allowlist = true`, then the lines of `generic` (further `[generic]`
/// options, may be empty), then `exports` verbatim (the export sections,
/// e.g. `"[disk]\nexportname = /path\nflush = true\n"`).
///
/// It runs `nbd-server -C CONFIG -p PIDFILE`.  nbd-server's `-d` ("do not
/// fork") mode serves only one client session and then exits, so instead it
/// is left to daemonize: the harness waits for the launcher to exit, reads
/// the daemon's pid from `PIDFILE` and polls the socket while the daemon is
/// alive.  Panics if it does not start.
pub fn nbd_server_config(dir: &TempDir, generic: &str, exports: &str) -> Peer {
    try_nbd_server_config(dir, generic, exports).unwrap_or_else(|e| panic!("{e}"))
}

fn try_nbd_server_config(dir: &TempDir, generic: &str, exports: &str) -> io::Result<Peer> {
    const PROGRAM: &str = "nbd-server";
    let socket = dir.socket_path(PROGRAM);
    let config_path = dir.unique_path(PROGRAM, "conf");
    let pidfile = dir.unique_path(PROGRAM, "pid");
    let log = dir.unique_path(PROGRAM, "log");

    let mut config = format!(
        "[generic]\nunixsock = {}\nallowlist = true\n",
        config_value(&path_arg(&socket))
    );
    for line in generic.lines() {
        config.push_str(line);
        config.push('\n');
    }
    config.push_str(exports);
    fs::write(&config_path, &config)?;

    let config_arg = path_arg(&config_path);
    let pid_arg = path_arg(&pidfile);
    let args = ["-C", config_arg.as_str(), "-p", pid_arg.as_str()];
    let cmdline = command_line(PROGRAM, &args);
    let with_config = |e: io::Error| {
        let e = startup_error(&cmdline, &e, &log);
        io::Error::new(e.kind(), format!("{e}\nconfiguration:\n{config}"))
    };

    let stdout = File::create(&log)?;
    let stderr = stdout.try_clone()?;
    let mut launcher = command(PROGRAM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run `{cmdline}`: {e}")))?;

    // The launcher exits as soon as it has daemonized.
    let status = match wait_timeout(&mut launcher, STARTUP_TIMEOUT)? {
        Some(status) => status,
        None => {
            let _ = launcher.kill();
            let _ = launcher.wait();
            return Err(with_config(io::Error::new(
                io::ErrorKind::TimedOut,
                "nbd-server did not daemonize",
            )));
        }
    };
    if !status.success() {
        return Err(with_config(io::Error::other(format!("nbd-server exited ({status})"))));
    }

    // The daemon writes its pid file right after forking.
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let pid = loop {
        if let Some(pid) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            break pid;
        }
        if Instant::now() >= deadline {
            return Err(with_config(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nbd-server wrote no pid to {}", pidfile.display()),
            )));
        }
        thread::sleep(POLL_INTERVAL);
    };

    let endpoint = Endpoint::Unix(socket);
    let waited = wait_until_listening(&endpoint, STARTUP_TIMEOUT, || {
        Ok((!process_alive(pid)).then(|| format!("daemon (pid {pid}) exited (it logs to syslog)")))
    });
    if let Err(e) = waited {
        kill_daemon(pid);
        return Err(with_config(e));
    }
    Ok(Peer {
        program: PROGRAM.to_owned(),
        process: Process::Daemon(pid),
        endpoint,
        log,
    })
}

/// Runs `start(port)` with free TCP ports until it does not fail because the
/// port was taken meanwhile; panics with the last error.
fn start_on_free_port(mut start: impl FnMut(u16) -> io::Result<Peer>) -> Peer {
    let mut last = None;
    for _ in 0..5 {
        match start(free_tcp_port()) {
            Ok(peer) => return peer,
            Err(e) if e.to_string().contains("in use") => last = Some(e),
            Err(e) => panic!("{e}"),
        }
    }
    panic!("{}", last.expect("at least one attempt"));
}

/// An nbd-server section name for export `name`; panics if it cannot be one.
fn config_section_name(name: &str) -> &str {
    assert!(
        !name.is_empty() && name != "generic" && !name.contains(['[', ']']) && !name.chars().any(char::is_control),
        "{name:?} cannot be an nbd-server export (section) name"
    );
    name
}

/// An nbd-server (GKeyFile) value for `s`: backslashes escaped.
fn config_value(s: &str) -> String {
    assert!(
        !s.chars().any(char::is_control),
        "{s:?} cannot be an nbd-server config value"
    );
    s.replace('\\', "\\\\")
}

/// Whether process `pid` exists and is not a zombie.  (Orphaned daemons
/// may stay zombies when PID 1 does not reap them.)
fn process_alive(pid: u32) -> bool {
    process_stat(pid).is_some_and(|stat| stat.state != 'Z')
}

/// Selected fields of `/proc/PID/stat`.
struct ProcStat {
    comm: String,
    state: char,
    pgrp: u32,
}

fn process_stat(pid: u32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID PGRP ..."; COMM may contain spaces and ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some(ProcStat { comm, state, pgrp })
}

/// Kills an nbd-server daemon and the per-client children in its process
/// group with SIGKILL, and waits (briefly) until it is gone.
fn kill_daemon(pid: u32) {
    let Some(stat) = process_stat(pid) else { return };
    if !stat.comm.starts_with("nbd-server") || stat.state == 'Z' {
        return; // exited already (and perhaps the pid was reused)
    }
    let Ok(ipid) = libc::pid_t::try_from(pid) else { return };
    let target = if stat.pgrp == pid { -ipid } else { ipid };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(target, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        thread::sleep(POLL_INTERVAL);
    }
}

/// The error for a peer that failed to start, with its log.
fn startup_error(cmdline: &str, error: &io::Error, log: &Path) -> io::Error {
    let output = fs::read(log).map_or_else(
        |e| format!("<cannot read log: {e}>"),
        |b| String::from_utf8_lossy(&b).into_owned(),
    );
    io::Error::new(
        error.kind(),
        format!("peer `{cmdline}` failed to start: {error}\n--- peer stdout+stderr ---\n{output}\n---"),
    )
}

/// `program` without its directory, for file names.
fn program_name(program: &str) -> &str {
    program.rsplit('/').next().unwrap_or(program)
}

/// `path` as a `&str` argument; panics if it is not UTF-8.
fn path_arg(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("path {} is not UTF-8", path.display()))
        .to_owned()
}

/// `program args...` for messages (arguments quoted where needed).
fn command_line(program: &str, args: &[&str]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        if !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
        {
            line.push_str(arg);
        } else {
            let _ = write!(line, "'{}'", arg.replace('\'', r"'\''"));
        }
    }
    line
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------
// A web server
// ---------------------------------------------------------------------------

/// nginx serving a directory on 127.0.0.1, started by [`nginx`]; it is
/// killed (one process: `master_process off`) when dropped.
#[derive(Debug)]
pub struct WebServer {
    /// The nginx process.
    pub peer: Peer,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// The directory it serves at `/` (`DIR/www`).
    pub root: PathBuf,
    /// Its TLS port on 127.0.0.1, when started by [`nginx_tls`].
    pub tls_port: Option<u16>,
}

impl WebServer {
    /// `http://127.0.0.1:PORT/PATH` (`path` starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `https://127.0.0.1:TLS_PORT/PATH` (`path` starts with `/`); panics
    /// when the server was not started by [`nginx_tls`].
    pub fn https_url(&self, path: &str) -> String {
        let port = self
            .tls_port
            .expect("this nginx has no TLS port (start it with nginx_tls)");
        format!("https://127.0.0.1:{port}{path}")
    }

    /// nginx's error log.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.root.with_file_name("nginx-error.log")).unwrap_or_default()
    }
}

/// Starts nginx as the current user on a free port of 127.0.0.1, with a
/// configuration of its own in `dir` (pid file, logs and temporary paths
/// there too), serving `DIR/www` (created empty: put files in
/// [`WebServer::root`]) with:
///
/// * every file at its path, with range requests;
/// * `/moved.img`: a 302 redirect to `/disk.img`;
/// * `/norange/NAME`: the same files with range requests ignored
///   (`max_ranges 0`: a Range request gets 200 and the whole file).
///
/// Check `require_peer("nginx")` first.
pub fn nginx(dir: &TempDir) -> WebServer {
    start_nginx(dir, None)
}

/// [`nginx`], also listening with TLS on [`WebServer::tls_port`] (the
/// same locations) with the server certificate and key of `certs`
/// (valid for `127.0.0.1` and `localhost`, signed by `ca-cert.pem`).
pub fn nginx_tls(dir: &TempDir, certs: &tls::Certificates) -> WebServer {
    start_nginx(dir, Some(certs))
}

fn start_nginx(dir: &TempDir, certs: Option<&tls::Certificates>) -> WebServer {
    let program = find_program("nginx").expect("nginx is not installed (check require_peer(\"nginx\") first)");
    let root = dir.join("www");
    fs::create_dir_all(&root).expect("create the web root");
    let d = dir.path().display();
    let port = free_tcp_port();
    let tls_port = certs.map(|_| free_tcp_port());
    let tls_listen = match (certs, tls_port) {
        (Some(c), Some(p)) => format!(
            "\x20   listen 127.0.0.1:{p} ssl;\n\
             \x20   ssl_certificate {};\n\
             \x20   ssl_certificate_key {};\n",
            c.file("server-cert.pem").display(),
            c.file("server-key.pem").display()
        ),
        _ => String::new(),
    };
    let conf = dir.join("nginx.conf");
    // One process (no master, no workers running as another user), which
    // the harness kills like any foreground peer.
    let text = format!(
        "master_process off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log info;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
         \x20 access_log {d}/nginx-access.log;\n\
         \x20 client_body_temp_path {d}/nginx-client-body;\n\
         \x20 proxy_temp_path {d}/nginx-proxy;\n\
         \x20 fastcgi_temp_path {d}/nginx-fastcgi;\n\
         \x20 uwsgi_temp_path {d}/nginx-uwsgi;\n\
         \x20 scgi_temp_path {d}/nginx-scgi;\n\
         \x20 default_type application/octet-stream;\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         {tls_listen}\
         \x20   root {d}/www;\n\
         \x20   location = /moved.img {{ return 302 http://127.0.0.1:{port}/disk.img; }}\n\
         \x20   location /norange/ {{ alias {d}/www/; max_ranges 0; }}\n\
         \x20 }}\n\
         }}\n"
    );
    fs::write(&conf, text).expect("write nginx.conf");
    let error_log = format!("{d}/nginx-error.log");
    let peer = Peer::start(
        dir,
        program.to_str().expect("UTF-8 path"),
        &[
            "-e",
            &error_log,
            "-c",
            conf.to_str().expect("UTF-8 path"),
            "-p",
            dir.path().to_str().expect("UTF-8 path"),
            "-g",
            "daemon off;",
        ],
        Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
    );
    // nginx binds every listener before it serves any: the TLS port is
    // open once the plain one is.
    WebServer {
        peer,
        port,
        root,
        tls_port,
    }
}

/// Runs `cmd args...` to completion (stdin empty) and returns its status,
/// stdout and stderr.  Kills it and panics (with what it wrote) if it runs
/// longer than [`RUN_TIMEOUT`]; panics if it cannot be started.  A failing
/// status is *not* a panic here; see [`run_ok`].
pub fn run(cmd: &str, args: &[&str]) -> Output {
    run_timeout(cmd, args, RUN_TIMEOUT)
}

/// [`run`] with a timeout of your choice.
pub fn run_timeout(cmd: &str, args: &[&str], timeout: Duration) -> Output {
    match run_within(cmd, args, timeout) {
        Ok(output) => output,
        Err(output) => panic!(
            "`{}` timed out after {timeout:?} and was killed\n{}",
            command_line(cmd, args),
            describe_output(&output)
        ),
    }
}

/// Runs `cmd args...` to completion (stdin empty) like [`run`], or kills
/// it when it runs longer than `timeout`: `Err` with what it wrote by
/// then. Panics only if it cannot be started.
pub fn run_within(cmd: &str, args: &[&str], timeout: Duration) -> Result<Output, Output> {
    let cmdline = command_line(cmd, args);
    let mut child = command(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{cmdline}`: {e}"));

    // Read both pipes in threads so a chatty child cannot block on a full
    // pipe.  Results come back over a channel so that a grandchild keeping
    // a pipe open (a daemon) cannot make us hang.
    let (tx, rx) = mpsc::channel();
    let readers = [
        (0, child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
        (1, child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
    ];
    for (which, pipe) in readers {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            let _ = tx.send((which, buf));
        });
    }
    drop(tx);

    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|e| panic!("waiting for `{cmdline}`: {e}"));
    let timed_out = status.is_none();
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait().unwrap_or_else(|e| panic!("waiting for `{cmdline}`: {e}"));

    let mut outputs = [Vec::new(), Vec::new()];
    let grace = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        let left = grace.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((which, buf)) => outputs[which] = buf,
            Err(_) => break,
        }
    }
    let [stdout, stderr] = outputs;
    let output = Output { status, stdout, stderr };
    if timed_out { Err(output) } else { Ok(output) }
}

/// Creates the qcow2 image `path` over the backing file `backing` (its
/// name as the image records it, relative to the image's directory or
/// absolute) of format `backing_format`, with `qemu-img create`; panics
/// if that fails.
pub fn create_qcow2_overlay(path: &Path, backing: &str, backing_format: &str) {
    let path = path.to_str().expect("a UTF-8 path");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, path],
    );
}

/// Runs `cmd args...` like [`run`] and returns its stdout (lossily
/// decoded); panics with the status, stdout and stderr if the status is not
/// success.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let output = run(cmd, args);
    if !output.status.success() {
        panic!("`{}` failed\n{}", command_line(cmd, args), describe_output(&output));
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The status, stdout and stderr of `output`, for messages.
pub fn describe_output(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Deterministic pseudo-random test data (xorshift64 from `seed`): `len`
/// bytes that differ for every seed, so misplaced data is caught.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode(""), "");
        assert_eq!(percent_encode("AZaz09-._~/"), "AZaz09-._~/");
        assert_eq!(percent_encode("a b?#&=%"), "a%20b%3F%23%26%3D%25");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn uris() {
        let unix = Endpoint::Unix(PathBuf::from("/tmp/x y/s.sock"));
        assert_eq!(unix.uri(""), "nbd+unix:///?socket=/tmp/x%20y/s.sock");
        assert_eq!(unix.uri("a/b c"), "nbd+unix:///a/b%20c?socket=/tmp/x%20y/s.sock");
        let tcp = Endpoint::Tcp((Ipv4Addr::LOCALHOST, 10809).into());
        assert_eq!(tcp.uri("disk"), "nbd://127.0.0.1:10809/disk");
        assert_eq!(tcp.uri(""), "nbd://127.0.0.1:10809/");
    }

    #[test]
    fn temp_dirs() {
        let a = TempDir::new();
        let b = TempDir::new();
        assert_ne!(a.path(), b.path());
        assert!(a.path().is_dir());
        let file = a.sparse_file("img", 1 << 20);
        assert_eq!(fs::metadata(&file).unwrap().len(), 1 << 20);
        let socket = a.socket_path("x");
        assert_ne!(socket, a.socket_path("x"));
        assert!(socket.starts_with(a.path()));
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn command_lines() {
        assert_eq!(command_line("nbdkit", &["-f", "memory", "1M"]), "nbdkit -f memory 1M");
        assert_eq!(command_line("echo", &["a b", "", "it's"]), r"echo 'a b' '' 'it'\''s'");
    }

    #[test]
    fn run_captures_output() {
        let out = run("sh", &["-c", "echo out; echo err >&2; exit 3"]);
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(run_ok("echo", &["hi"]), "hi\n");
    }

    #[test]
    #[should_panic(expected = "timed out")]
    fn run_times_out() {
        run_timeout("sleep", &["10"], Duration::from_millis(100));
    }

    #[test]
    #[should_panic(expected = "failed")]
    fn run_ok_panics_on_failure() {
        run_ok("false", &[]);
    }

    #[test]
    fn finds_programs() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/bin/sh").is_some());
        assert!(find_program("no-such-program-nbd-tests").is_none());
    }

    #[test]
    fn free_ports_are_bindable() {
        let port = free_tcp_port();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
