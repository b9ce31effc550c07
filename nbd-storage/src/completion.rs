//! How an [`AsyncStorage`](crate::AsyncStorage) reports that an operation
//! finished, without knowing who asked: a [`Completion`] is a token of the
//! server's and the [`CompletionSink`] the server gave with it.
//!
//! A server implements [`CompletionSink`] once per connection and keeps,
//! under each token, what it needs to answer the request; making a
//! completion and completing it allocate nothing.

use std::io;
use std::sync::Arc;

use crate::Extent;

/// How an operation of an [`AsyncStorage`](crate::AsyncStorage) ended, as
/// its [`Completion`] reports it to the [`CompletionSink`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Done<'a> {
    /// [`Completion::complete`]: FLUSH, TRIM, WRITE_ZEROES, CACHE (or any
    /// operation that failed without giving its buffer back).
    Finished(io::Result<()>),
    /// [`Completion::complete_read`]: the read's buffer, filled.
    Read(Vec<u8>, io::Result<()>),
    /// [`Completion::complete_write`]: the write's buffer, for reuse.
    Written(Vec<u8>, io::Result<()>),
    /// [`Completion::complete_status`]: `base:allocation` from the
    /// request's offset on.
    Status(&'a [Extent], io::Result<()>),
    /// The storage dropped the completion without completing it: the
    /// request fails rather than waiting forever.
    Dropped,
}

/// Who hears of the completions: the server's side of a [`Completion`].
pub trait CompletionSink: Send + Sync {
    /// The operation the server registered as `token` ended as `done`.
    /// Called exactly once per token, from any thread.
    fn finished(&self, token: u64, done: Done<'_>);
}

/// How an [`AsyncStorage`](crate::AsyncStorage) reports that an operation
/// finished: each operation gets one, and calls the `complete*` method
/// that matches it exactly once, from any thread. A completion dropped
/// without being called answers its request with an error (it never
/// hangs).
pub struct Completion {
    inner: Option<(Arc<dyn CompletionSink>, u64)>,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("token", &self.inner.as_ref().map(|(_, t)| *t))
            .finish_non_exhaustive()
    }
}

impl Completion {
    /// A completion that reports to `sink` under `token` (for servers, and
    /// for tests of a storage).
    pub fn new(sink: Arc<dyn CompletionSink>, token: u64) -> Completion {
        Completion {
            inner: Some((sink, token)),
        }
    }

    fn report(mut self, done: Done<'_>) {
        if let Some((sink, token)) = self.inner.take() {
            sink.finished(token, done);
        }
    }

    /// The operation finished (FLUSH, TRIM, WRITE_ZEROES, CACHE).
    pub fn complete(self, result: io::Result<()>) {
        self.report(Done::Finished(result));
    }

    /// A read finished: `buf` is the buffer given to
    /// [`AsyncStorage::read`](crate::AsyncStorage::read), filled.
    pub fn complete_read(self, buf: Vec<u8>, result: io::Result<()>) {
        self.report(Done::Read(buf, result));
    }

    /// A write finished: `buf` is the buffer given to
    /// [`AsyncStorage::write`](crate::AsyncStorage::write), given back for
    /// reuse.
    pub fn complete_write(self, buf: Vec<u8>, result: io::Result<()>) {
        self.report(Done::Written(buf, result));
    }

    /// Block status finished: `extents` describe `base:allocation` from the
    /// request's offset on (other selected contexts get "no information").
    pub fn complete_status(self, extents: &[Extent], result: io::Result<()>) {
        self.report(Done::Status(extents, result));
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some((sink, token)) = self.inner.take() {
            sink.finished(token, Done::Dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, String)>>);

    impl CompletionSink for Log {
        fn finished(&self, token: u64, done: Done<'_>) {
            self.0.lock().unwrap().push((token, format!("{done:?}")));
        }
    }

    #[test]
    fn each_completion_reports_once() {
        let log = Arc::new(Log::default());
        Completion::new(log.clone(), 1).complete(Ok(()));
        Completion::new(log.clone(), 2).complete_read(vec![1, 2], Ok(()));
        drop(Completion::new(log.clone(), 3));
        let got = log.0.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (1, "Finished(Ok(()))".to_string()));
        assert!(got[1].1.starts_with("Read([1, 2]"), "{got:?}");
        assert_eq!(got[2], (3, "Dropped".to_string()));
    }
}
