//! `nbd-copy`'s progress reports, in nbdcopy's two forms:
//!
//! - a bar on stderr (`--progress`): `▐  42% [****************-------…]`,
//!   redrawn in place (`\r`) on a terminal; anywhere else (a log file, a
//!   pipe) one line per change of the percentage, at most one a second,
//!   so that it can be read after the fact. The last one says 100% and
//!   ends the line.
//! - machine-readable lines on a descriptor (`--progress=FD`): `N/100\n`
//!   with `N` from 0 to 100, as nbdcopy writes them for wrappers such as
//!   virt-v2v: `0/100` when the copy starts, a line each time the whole
//!   percentage changes, `100/100` when it has succeeded.
//!
//! A copy whose size is not known up front (a stream source) stays at 0%
//! until it ends.

use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::copy::Progress;

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A bar on stderr.
    Stderr,
    /// `N/100` lines on this descriptor (which stays open).
    Fd(i32),
}

/// The width of the bar in characters, as nbdcopy's.
const BAR: usize = 40;
/// The spinner nbdcopy turns at the head of its bar.
const SPINNER: [&str; 8] = ["▝", "▐", "▗", "▃", "▖", "▍", "▘", "▀"];

/// The whole percentage of `done` out of `total` (0 while the total is
/// unknown), never 100 before the end.
pub fn percent(done: u64, total: u64) -> u32 {
    if total == 0 {
        return 0;
    }
    let p = (u128::from(done.min(total)) * 100 / u128::from(total)) as u32;
    p.min(99)
}

/// nbdcopy's machine-readable line for `percent`.
pub fn fd_line(percent: u32) -> String {
    format!("{percent}/100\n")
}

/// The bar for `percent` (without the line's end), `spin` turning the
/// spinner.
pub fn bar_line(percent: u32, spin: usize) -> String {
    let stars = (percent as usize * BAR).div_ceil(100).min(BAR);
    let head = if percent >= 100 {
        "█"
    } else {
        SPINNER[spin % SPINNER.len()]
    };
    format!(
        "{head} {percent:>3}% [{}{}]",
        "*".repeat(stars),
        "-".repeat(BAR - stars)
    )
}

/// A running report: a thread that looks at the counters ten times a
/// second. [`Reporter::finish`] writes the last line.
#[derive(Debug)]
pub struct Reporter {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    out: ManuallyDrop<File>,
    target: Target,
    terminal: bool,
    last: Option<u32>,
    last_at: Instant,
    spin: usize,
    /// A bar is drawn on the terminal without its line's end yet.
    open_line: bool,
    /// Writing failed (the reader went away): report no more.
    broken: bool,
}

impl State {
    fn show(&mut self, p: u32, end: bool) {
        if self.broken {
            return;
        }
        let text = match self.target {
            Target::Fd(_) => {
                if self.last == Some(p) {
                    return;
                }
                fd_line(p)
            }
            Target::Stderr if self.terminal => {
                self.spin += 1;
                self.open_line = !end;
                format!("{}{}", bar_line(p, self.spin), if end { "\n" } else { "\r" })
            }
            Target::Stderr => {
                let due = self.last_at.elapsed() >= Duration::from_secs(1);
                if !end && (self.last == Some(p) || (self.last.is_some() && !due)) {
                    return;
                }
                format!("{}\n", bar_line(p, 1))
            }
        };
        self.last = Some(p);
        self.last_at = Instant::now();
        if self.out.write_all(text.as_bytes()).is_err() {
            self.broken = true;
        }
    }
}

impl Reporter {
    /// Starts reporting `progress` to `target`; writes the 0% line at
    /// once. A descriptor that is not open for writing is an error.
    pub fn start(target: Target, progress: Arc<Progress>) -> io::Result<Reporter> {
        let fd = match target {
            Target::Stderr => io::stderr().as_raw_fd(),
            Target::Fd(fd) => fd,
        };
        // SAFETY: F_GETFL only queries the descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags == -1 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not open for writing"));
        }
        // SAFETY: isatty only queries the descriptor.
        let terminal = unsafe { libc::isatty(fd) } == 1;
        // SAFETY: the descriptor is open (checked above); ManuallyDrop
        // keeps it from being closed, it stays the process's own.
        let out = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        let state = Arc::new(Mutex::new(State {
            out,
            target,
            terminal,
            last: None,
            last_at: Instant::now(),
            spin: 0,
            open_line: false,
            broken: false,
        }));
        lock(&state).show(0, false);
        let (stop, stopped) = mpsc::channel();
        let thread = {
            let state = state.clone();
            std::thread::spawn(move || {
                loop {
                    match stopped.recv_timeout(Duration::from_millis(100)) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let p = percent(
                        progress.done.load(Ordering::Relaxed),
                        progress.total.load(Ordering::Relaxed),
                    );
                    lock(&state).show(p, false);
                }
            })
        };
        Ok(Reporter {
            stop,
            thread: Some(thread),
            state,
        })
    }

    /// Stops reporting: 100% if the copy `succeeded`; otherwise a bar left
    /// open on the terminal gets its line's end, so that the error message
    /// starts a line of its own.
    pub fn finish(mut self, succeeded: bool) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut s = lock(&self.state);
        if succeeded {
            s.show(100, true);
        } else if s.open_line && !s.broken {
            let _ = s.out.write_all(b"\n");
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(5, 0), 0);
        assert_eq!(percent(50, 100), 50);
        assert_eq!(percent(100, 100), 99);
        assert_eq!(percent(u64::MAX, u64::MAX), 99);
        assert_eq!(percent(1, 3), 33);
    }

    #[test]
    fn lines() {
        assert_eq!(fd_line(0), "0/100\n");
        assert_eq!(fd_line(100), "100/100\n");
        let b = bar_line(50, 1);
        assert!(b.starts_with("▐  50% [********************-"), "{b}");
        assert!(b.ends_with("-]"));
        let full = bar_line(100, 3);
        assert_eq!(full, format!("█ 100% [{}]", "*".repeat(BAR)));
    }

    #[test]
    fn fd_reports_start_and_end() {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just made and are owned here.
        let (mut r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let progress = Arc::new(Progress::default());
        progress.total.store(1000, Ordering::Relaxed);
        let rep = Reporter::start(Target::Fd(w.as_raw_fd()), progress.clone()).unwrap();
        progress.done.store(1000, Ordering::Relaxed);
        rep.finish(true);
        drop(w);
        let mut s = String::new();
        io::Read::read_to_string(&mut r, &mut s).unwrap();
        assert!(s.starts_with("0/100\n") && s.ends_with("100/100\n"), "{s:?}");
        for l in s.lines() {
            let n: u32 = l.strip_suffix("/100").unwrap().parse().unwrap();
            assert!(n <= 100);
        }
    }

    #[test]
    fn closed_fd_is_an_error() {
        assert!(Reporter::start(Target::Fd(987), Arc::new(Progress::default())).is_err());
    }
}
