//! `nbd-serve` at qemu-nbd's and nbdkit's habits: qemu-nbd command lines
//! used unchanged (the manual's examples, compared with qemu-nbd's
//! answers), nbdkit's `--run`, `--print-uri` and `--single`, and the
//! lifecycle: a socket in use left alone, a stale one replaced, SIGHUP and
//! SIGTERM (with a client stuck in a WRITE payload) ending cleanly with
//! socket and pid file removed, the last client's departure with
//! `--no-persistent`, and a socket-activation descriptor that does not
//! listen.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nbd_tests::*;

/// How long a server that was told to stop may take before the test
/// calls it hung (far above any deadline the tests set).
const HANG: Duration = Duration::from_secs(60);

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

fn unix_uri_export(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Waits for `child` to exit, at most [`HANG`].
fn wait(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + HANG;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}: did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Starts `nbd-serve ARGS` and waits until `socket` accepts.
fn start(args: &[&str], socket: &Path) -> Child {
    let mut child = command(&our_bin("nbd-serve"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(socket, &mut child, Duration::from_secs(30)).unwrap();
    child
}

/// nbdinfo's JSON for `uri`, without the keys that name the server.
fn describe(uri: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(&run_ok("nbdinfo", &["--json", uri])).unwrap();
    v.as_object_mut().unwrap().remove("uri");
    let export = &mut v["exports"][0];
    let e = export.as_object_mut().unwrap();
    // Servers may differ in what they can do beyond what is compared (and
    // nbd-serve reports a rotational disk under a file; qemu-nbd never).
    for k in [
        "is_rotational",
        "can_cache",
        "can_fua",
        "can_fast_zero",
        "can_df",
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_flush",
        "block_size_minimum",
        "block_size_preferred",
        "block_size_maximum",
        "contexts",
        "content",
        "protocol",
        "uri",
    ] {
        e.remove(k);
    }
    v.as_object_mut().unwrap().remove("protocol");
    v
}

#[test]
fn qemu_nbd_manual_command_lines_work_unchanged() {
    if !require_peers(&["qemu-nbd", "qemu-img", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let serve = our_bin("nbd-serve");
    let qcow2 = dir.join("file.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&qcow2), "2M"]);
    // "Serve a read-only copy of a guest image over a Unix socket with as
    // many as 5 simultaneous readers, with a persistent process forked as
    // a daemon" (qemu-nbd(8)), plus --pid-file.
    let mut descriptions = Vec::new();
    for (program, tag) in [("qemu-nbd", "q"), (serve.as_str(), "o")] {
        let sock = dir.join(format!("{tag}.sock"));
        let pid = dir.join(format!("{tag}.pid"));
        let socket_arg = format!("--socket={}", p(&sock));
        let pid_arg = format!("--pid-file={}", p(&pid));
        run_ok(
            program,
            &[
                "--fork",
                "--persistent",
                "--shared=5",
                &socket_arg,
                "--read-only",
                "--format=qcow2",
                p(&qcow2),
                &pid_arg,
            ],
        );
        // --fork returns once it serves; persistent: several clients.
        let uri = unix_uri(&sock);
        descriptions.push(describe(&uri));
        assert_eq!(describe(&uri), descriptions[descriptions.len() - 1]);
        let pid: i32 = std::fs::read_to_string(&pid).unwrap().trim().parse().unwrap();
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + HANG;
        while sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!sock.exists(), "{program}: socket left behind");
    }
    assert_eq!(descriptions[0], descriptions[1]);
    assert!(!dir.join("o.pid").exists(), "nbd-serve left its pid file behind");

    // qemu-nbd's short letters: -t -k -x -D -r -f and -e; the same
    // description as qemu-nbd gives.
    let raw = dir.sparse_file("disk.raw", 3 << 20);
    let mut descriptions = Vec::new();
    for (program, tag) in [("qemu-nbd", "q2"), (serve.as_str(), "o2")] {
        let sock = dir.join(format!("{tag}.sock"));
        let mut child = command(program)
            .args([
                "-t",
                "-k",
                p(&sock),
                "-x",
                "disk",
                "-D",
                "a test disk",
                "-r",
                "-f",
                "raw",
                "-e",
                "2",
            ])
            .arg(&raw)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_socket(&sock, &mut child, Duration::from_secs(30)).unwrap();
        descriptions.push(describe(&unix_uri_export(&sock, "disk")));
        signal(&child, libc::SIGTERM);
        wait(&mut child, program);
    }
    assert_eq!(descriptions[0], descriptions[1]);
    assert_eq!(descriptions[1]["exports"][0]["description"], "a test disk");

    // -b and -p (TCP), and -s: writes go to a throwaway overlay.
    let port = free_tcp_port().to_string();
    let mut child = command(&serve)
        .args(["-b", "127.0.0.1", "-p", &port, "-s", "-f", "raw"])
        .arg(&raw)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let endpoint = Endpoint::Tcp(format!("127.0.0.1:{port}").parse().unwrap());
    wait_for_endpoint(&endpoint, &mut child, Duration::from_secs(30)).unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/");
    let data = dir.join("data");
    std::fs::write(&data, pattern(1 << 20, 3)).unwrap();
    run_ok("nbdcopy", &[p(&data), &uri]);
    let back = run("nbdcopy", &[&uri, "-"]).stdout;
    assert!(
        back[..1 << 20] == pattern(1 << 20, 3)[..],
        "the snapshot did not take the write"
    );
    signal(&child, libc::SIGTERM);
    assert!(wait(&mut child, "nbd-serve -s").success());
    assert!(
        std::fs::read(&raw).unwrap().iter().all(|&b| b == 0),
        "-s wrote to the image"
    );
}

#[test]
fn nbdkit_captive_habits_run_print_uri_single() {
    if !require_peers(&["nbdinfo", "nbdsh"]) {
        return;
    }
    let serve = our_bin("nbd-serve");
    // --run: the command gets $uri and $unixsocket; its exit code is ours.
    let out = run(
        &serve,
        &[
            "--memory",
            "1M",
            "--run",
            "nbdinfo --size \"$uri\" && nbdinfo --size \"nbd+unix:///?socket=$unixsocket\" && exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe_output(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1048576\n1048576\n");
    // --print-uri: the URI on stdout, usable as printed.
    let dir = TempDir::new();
    let sock = dir.join("u.sock");
    let mut child = command(&serve)
        .args(["--memory", "2M", "--print-uri", "-k", p(&sock)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = Vec::new();
    let mut stdout = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    while stdout.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let uri = String::from_utf8(line).unwrap();
    assert!(uri.starts_with("nbd+unix://"), "{uri}");
    assert_eq!(run_ok("nbdinfo", &["--size", &uri]), "2097152\n");
    signal(&child, libc::SIGTERM);
    assert!(wait(&mut child, "--print-uri").success());
    // --single: one client on stdin/stdout, as libnbd's connect_command
    // runs nbdkit -s.
    let script = format!(
        "h.connect_command([{serve:?}, '--single', '--memory', '3M'])\n\
         h.pwrite(b'x' * 512, 4096)\n\
         assert h.pread(512, 4096) == b'x' * 512\n\
         print(h.get_size())\n"
    );
    let out = run("nbdsh", &["-c", &script]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3145728\n");
}

#[test]
fn lifecycle_sockets_signals_and_pid_files() {
    if !require_peer("nbdinfo") {
        return;
    }
    let dir = TempDir::new();
    // A live socket is "address in use" and left alone.
    let sock = dir.join("live.sock");
    let pid = dir.join("live.pid");
    let mut first = start(&["-k", p(&sock), "--memory", "1M", "--pid-file", p(&pid)], &sock);
    let second = run(&our_bin("nbd-serve"), &["-k", p(&sock), "--memory", "2M"]);
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"));
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&sock)]), "1048576\n");
    assert_eq!(std::fs::read_to_string(&pid).unwrap().trim(), first.id().to_string());
    // SIGHUP stops it as SIGTERM does: exit 0, socket and pid file gone.
    signal(&first, libc::SIGHUP);
    let status = wait(&mut first, "SIGHUP");
    assert!(status.success(), "{status}");
    assert!(!sock.exists() && !pid.exists());

    // A stale socket (nobody listens) is replaced.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut s = start(&["-k", p(&stale), "--memory", "1M"], &stale);
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&stale)]), "1048576\n");
    signal(&s, libc::SIGINT);
    assert!(wait(&mut s, "SIGINT").success());
    assert!(!stale.exists());

    // --no-persistent: gone after its last client, as qemu-nbd without -t
    // (forked, so that no probe connection counts as that client).
    let once = dir.join("once.sock");
    let once_pid = dir.join("once.pid");
    run_ok(
        &our_bin("nbd-serve"),
        &[
            "--fork",
            "--no-persistent",
            "-k",
            p(&once),
            "--pid-file",
            p(&once_pid),
            "--memory",
            "1M",
        ],
    );
    assert!(once.exists() && once_pid.exists());
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&once)]), "1048576\n");
    let deadline = Instant::now() + HANG;
    while (once.exists() || once_pid.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !once.exists() && !once_pid.exists(),
        "still serving after its last client"
    );
}

/// Connects to `socket`, negotiates the default export with
/// NBD_OPT_EXPORT_NAME and sends a WRITE of 64 KiB with only 100 bytes of
/// its payload: a client stuck in the middle of a request.
fn stalled_writer(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // FIXED_NEWSTYLE | NO_ZEROES.
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap(); // NBD_OPT_EXPORT_NAME
    s.write_all(&0u32.to_be_bytes()).unwrap(); // "" (the default)
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&65536u32.to_be_bytes());
    req.extend_from_slice(&[0xaa; 100]);
    s.write_all(&req).unwrap();
    s
}

#[test]
fn sigterm_does_not_wait_forever_for_a_stalled_client() {
    let dir = TempDir::new();
    let sock = dir.join("stall.sock");
    let pid = dir.join("stall.pid");
    let mut s = start(
        &[
            "-k",
            p(&sock),
            "--memory",
            "1M",
            "--shutdown-timeout",
            "1",
            "--pid-file",
            p(&pid),
        ],
        &sock,
    );
    let client = stalled_writer(&sock);
    signal(&s, libc::SIGTERM);
    let status = wait(&mut s, "SIGTERM with a stalled client");
    assert!(status.code().is_some(), "killed: {status}");
    assert!(!sock.exists() && !pid.exists());
    // The stalled write was never acknowledged (nothing was lost that was
    // acknowledged): the connection was closed.
    let mut rest = Vec::new();
    let mut client = client;
    client.set_read_timeout(Some(HANG)).unwrap();
    let _ = client.read_to_end(&mut rest);
    // Nothing, or (when the signal came first) ESHUTDOWN for it: a simple
    // reply with error 108, never a success.
    if !rest.is_empty() {
        assert!(rest.len() >= 16, "a partial reply: {rest:?}");
        assert_eq!(&rest[..4], &0x6744_6698u32.to_be_bytes(), "{rest:?}");
        let error = u32::from_be_bytes(rest[4..8].try_into().unwrap());
        assert_eq!(error, 108, "an incomplete write answered with {error}: {rest:?}");
    }
}

#[test]
fn socket_activation_with_a_socket_that_does_not_listen_is_one_error() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let fd = ours.as_raw_fd();
    let mut cmd = command("sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"",
        "sh",
        &our_bin("nbd-serve"),
        "--memory",
        "1M",
    ])
    .env("LISTEN_FDS", "1")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let status = wait(&mut child, "socket activation with a connected socket");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "{status}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("listen"), "{err}");
}

#[test]
fn socket_activation_without_the_descriptor_is_one_error() {
    // LISTEN_FDS=1 but no descriptor 3 (nothing is inherited without
    // being asked for): an error before anything takes that number.
    let mut child = command(&our_bin("nbd-serve"))
        .args(["--memory", "1M"])
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait(&mut child, "socket activation without descriptor 3");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("descriptor 3 is not open"), "{err}");
}
