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
use std::io::{self, IsTerminal, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

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
/// The spinner nbdcopy turns at the head of its bar; the last one is
/// shown when the copy has finished.
const SPINNER: [&str; 9] = ["▝", "▐", "▗", "▃", "▖", "▍", "▘", "▀", "█"];

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

/// The bar: indicatif, styled as nbdcopy's bar (`▐  42% [****----]`),
/// its position the whole percentage.
fn bar(target: ProgressDrawTarget) -> ProgressBar {
    let template = format!("{{spinner}} {{pos:>3}}% [{{bar:{BAR}}}]");
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .tick_strings(&SPINNER)
        .progress_chars("*--");
    ProgressBar::with_draw_target(Some(100), target).with_style(style)
}

/// indicatif's draw target for a stderr that is not a terminal (a log
/// file, a pipe): every drawing of the bar becomes one line of its own,
/// with no cursor movement and no padding, so that it reads back in order.
struct Lines {
    /// The drawing under way, written out as a line on `flush`.
    line: Mutex<String>,
    /// Where the lines go (stderr).
    sink: Mutex<Box<dyn Write + Send>>,
}

impl Lines {
    fn new(sink: Box<dyn Write + Send>) -> Lines {
        Lines {
            line: Mutex::new(String::new()),
            sink: Mutex::new(sink),
        }
    }
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines").finish_non_exhaustive()
    }
}

impl TermLike for Lines {
    fn width(&self) -> u16 {
        80
    }
    fn move_cursor_up(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        self.write_str(s)?;
        self.flush()
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        lock(&self.line).push_str(s.trim_start_matches('\r'));
        Ok(())
    }
    fn clear_line(&self) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let line = std::mem::take(&mut *lock(&self.line));
        let line = line.trim_end();
        if line.is_empty() {
            return Ok(());
        }
        let mut sink = lock(&self.sink);
        sink.write_all(format!("{line}\n").as_bytes())?;
        sink.flush()
    }
}

/// A running report: a thread that looks at the counters ten times a
/// second. [`Reporter::finish`] writes the last line.
#[derive(Debug)]
pub struct Reporter {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
    out: Arc<Mutex<Out>>,
}

/// Where a [`Reporter`] writes.
#[derive(Debug)]
enum Out {
    /// indicatif's bar on stderr; the spinner turns (on a terminal) when
    /// the percentage stays.
    Bar { bar: ProgressBar, spin: bool },
    /// `N/100` lines on a descriptor.
    Fd {
        file: ManuallyDrop<File>,
        last: Option<u32>,
        /// Writing failed (the reader went away): report no more.
        broken: bool,
    },
}

impl Out {
    fn show(&mut self, p: u32) {
        match self {
            Out::Bar { bar, spin } => {
                if bar.position() != u64::from(p) {
                    bar.set_position(u64::from(p));
                } else if *spin {
                    bar.tick();
                }
            }
            Out::Fd { file, last, broken } => {
                if *broken || *last == Some(p) {
                    return;
                }
                *last = Some(p);
                if file.write_all(fd_line(p).as_bytes()).is_err() {
                    *broken = true;
                }
            }
        }
    }
}

impl Reporter {
    /// Starts reporting `progress` to `target`; reports 0% at once. A
    /// descriptor that is not open for writing is an error.
    ///
    /// On stderr, the bar is indicatif's, redrawn in place ten times a
    /// second on a terminal; anywhere else it is written as a line each
    /// time the percentage changes, at most once a second.
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
        let mut out = match target {
            Target::Stderr if io::stderr().is_terminal() => Out::Bar {
                bar: bar(ProgressDrawTarget::stderr_with_hz(10)),
                spin: true,
            },
            Target::Stderr => {
                let lines = Lines::new(Box::new(io::stderr()));
                Out::Bar {
                    bar: bar(ProgressDrawTarget::term_like_with_hz(Box::new(lines), 1)),
                    spin: false,
                }
            }
            Target::Fd(fd) => Out::Fd {
                // SAFETY: the descriptor is open (checked above);
                // ManuallyDrop keeps it from being closed, it stays the
                // process's own.
                file: ManuallyDrop::new(unsafe { File::from_raw_fd(fd) }),
                last: None,
                broken: false,
            },
        };
        match &mut out {
            Out::Bar { bar, .. } => bar.tick(),
            fd => fd.show(0),
        }
        let out = Arc::new(Mutex::new(out));
        let (stop, stopped) = mpsc::channel();
        let thread = {
            let out = out.clone();
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
                    lock(&out).show(p);
                }
            })
        };
        Ok(Reporter {
            stop,
            thread: Some(thread),
            out,
        })
    }

    /// Stops reporting: 100% if the copy `succeeded`; otherwise the bar is
    /// left where it stopped and the cursor moved past it, so that the
    /// error message starts a line of its own.
    pub fn finish(mut self, succeeded: bool) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut out = lock(&self.out);
        match &mut *out {
            Out::Bar { bar, .. } if succeeded => bar.finish(),
            Out::Bar { bar, .. } => bar.abandon(),
            fd if succeeded => fd.show(100),
            Out::Fd { .. } => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    }

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Off a terminal the bar is nbdcopy's, a line per drawing, and the
    /// last one full.
    #[test]
    fn bar_lines_look_like_nbdcopys() {
        let sink = Shared::default();
        let target = ProgressDrawTarget::term_like(Box::new(Lines::new(Box::new(sink.clone()))));
        let b = bar(target);
        b.tick();
        b.set_position(50);
        b.tick();
        b.finish();
        let text = String::from_utf8(lock(&sink.0).clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(text.ends_with('\n'), "{text:?}");
        assert!(lines.len() >= 3, "{text:?}");
        assert!(lines[0].ends_with(&format!("  0% [{}]", "-".repeat(BAR))), "{text:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with(&format!(" 50% [{}{}]", "*".repeat(20), "-".repeat(20)))),
            "{text:?}"
        );
        assert_eq!(*lines.last().unwrap(), format!("█ 100% [{}]", "*".repeat(BAR)));
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
