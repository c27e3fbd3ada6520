//! A task's pipes: the job goes in on stdin from its own task (a program
//! that never reads stdin cannot block the worker); stdout and stderr are
//! read concurrently into bounded tail buffers, for a bounded time after the
//! group is killed (a descendant that escaped the group may hold them open).
//! Stdout is also scanned for progress lines as it arrives
//! ([`LineScanner`], bounded too).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::executor::progress::LineScanner;

/// At most this much of stdout is kept (the tail); the result is its last
/// non-empty line.
pub const STDOUT_KEEP: usize = 1 << 20;

/// At most this much of stderr is kept (the tail).
pub const STDERR_KEEP: usize = 4 << 10;

/// How long to keep reading stdout/stderr after the process group was
/// killed. Only matters when a descendant escaped the group (setsid) and
/// still holds the pipes open.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The end of `bytes` (task output) as trimmed, clean text of at most `max`
/// bytes: invalid UTF-8 and control characters (but newline and tab) become
/// U+FFFD (see [`crate::model::text::clean_tail`]).
pub(super) fn tail_text(bytes: &[u8], max: usize) -> String {
    crate::model::text::clean_tail(bytes, max)
        .trim()
        .to_string()
}

/// Reads `r` to the end (or until `stop`), keeping only the last `keep`
/// bytes, and shows every byte read to `scanner` (progress lines).
pub(super) async fn read_tail<R: AsyncRead + Unpin>(
    mut r: R,
    keep: usize,
    stop: CancellationToken,
    mut scanner: Option<LineScanner>,
) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            res = r.read(&mut chunk) => match res {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            },
        };
        if let Some(s) = scanner.as_mut() {
            s.feed(&chunk[..n]);
        }
        buf.extend_from_slice(&chunk[..n]);
        // Amortized trimming: let the buffer grow to 2x before cutting.
        if buf.len() > keep * 2 {
            buf.drain(..buf.len() - keep);
        }
    }
    if let Some(s) = scanner.as_mut() {
        s.finish();
    }
    if buf.len() > keep {
        buf.drain(..buf.len() - keep);
    }
    buf
}

/// Aborts a spawned task when dropped.
pub(super) struct AbortOnDrop(pub(super) Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// A started task's pipes: the job being written to stdin, and stdout and
/// stderr being read into bounded tails.
pub(super) struct Pipes {
    stdin: AbortOnDrop,
    stdout: Option<tokio::task::JoinHandle<Vec<u8>>>,
    stderr: Option<tokio::task::JoinHandle<Vec<u8>>>,
    /// Ends the readers early (drain timeout).
    readers_stop: CancellationToken,
    /// Ends them if the attempt is dropped midway.
    _stop_on_drop: tokio_util::sync::DropGuard,
}

/// What a task wrote (the kept tails).
pub(super) struct Output {
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
}

impl Pipes {
    /// Take the child's pipes: write `job` to stdin from a task of its own
    /// (a program that never reads stdin cannot block the worker), read
    /// stdout (through `progress`, if any) and stderr concurrently.
    pub(super) fn attach(
        child: &mut std::process::Child,
        job: Vec<u8>,
        progress: Option<LineScanner>,
    ) -> Pipes {
        let readers_stop = CancellationToken::new();
        let stdin = AbortOnDrop(child.stdin.take().map(|s| {
            tokio::spawn(async move {
                if let Ok(mut s) = tokio::process::ChildStdin::from_std(s) {
                    // BrokenPipe (the program closed stdin or exited) is fine.
                    let _ = s.write_all(&job).await;
                    let _ = s.shutdown().await;
                }
            })
        }));
        let stdout = child
            .stdout
            .take()
            .and_then(|s| tokio::process::ChildStdout::from_std(s).ok())
            .map(|s| tokio::spawn(read_tail(s, STDOUT_KEEP, readers_stop.clone(), progress)));
        let stderr = child
            .stderr
            .take()
            .and_then(|s| tokio::process::ChildStderr::from_std(s).ok())
            .map(|s| tokio::spawn(read_tail(s, STDERR_KEEP, readers_stop.clone(), None)));
        Pipes {
            stdin,
            stdout,
            stderr,
            _stop_on_drop: readers_stop.clone().drop_guard(),
            readers_stop,
        }
    }

    /// The tails, read for at most [`DRAIN_TIMEOUT`] once the process group
    /// is dead (a descendant that escaped it may hold the pipes open).
    pub(super) async fn collect(self) -> Output {
        let stopper = AbortOnDrop(Some({
            let stop = self.readers_stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(DRAIN_TIMEOUT).await;
                stop.cancel();
            })
        }));
        let read = |t: Option<tokio::task::JoinHandle<Vec<u8>>>| async move {
            match t {
                Some(t) => t.await.unwrap_or_default(),
                None => Vec::new(),
            }
        };
        let stdout = read(self.stdout).await;
        let stderr = read(self.stderr).await;
        drop(stopper);
        drop(self.stdin);
        Output { stdout, stderr }
    }
}

#[cfg(test)]
mod tests {
    use super::super::classify::ERROR_TAIL;
    use super::*;

    #[test]
    fn tails_are_bounded() {
        let t = tail_text(&[b'a'; 10_000], ERROR_TAIL);
        assert_eq!(t.len(), ERROR_TAIL);
    }

    #[tokio::test]
    async fn read_tail_keeps_the_end() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let out = read_tail(&data[..], STDOUT_KEEP, CancellationToken::new(), None).await;
        assert_eq!(out.len(), STDOUT_KEEP);
        assert_eq!(&out[..], &data[data.len() - STDOUT_KEEP..]);
    }
}
