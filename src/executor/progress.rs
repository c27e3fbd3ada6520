//! Progress reports of a running task program (README, "Task programs"):
//! lines `{"progress": <any JSON>}` on stdout, picked out as they arrive
//! ([`LineScanner`], fed by the stdout reader) and handed to a
//! [`ProgressSink`] (the worker's: a `progress` job event) by a small task
//! of the attempt's own ([`Forwarder`]), so a slow sink never holds up the
//! reading of the pipe.
//!
//! Bounds, per attempt: a report over [`PROGRESS_MAX`] bytes is dropped;
//! at most one report per [`PROGRESS_INTERVAL`] reaches the sink, and in
//! between only the latest is kept (a newer report replaces a pending one:
//! coalesced, never queued). When the process has ended, a report still
//! pending is sent at once (one more than the interval allows, at most),
//! and [`Forwarder::finish`] waits for it, up to [`FLUSH_TIMEOUT`]: the
//! worker records the completion only after, so the job's events read
//! progress... then its end. A report the flush cannot send in time is
//! dropped with the forwarder; Redis fences it anyway (a report after the
//! attempt's end changes nothing).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::protocol::progress_report;

/// A report whose JSON text (compacted) is longer than this is dropped:
/// cutting it would make it invalid JSON, and a job event is no place for
/// bulk data (that belongs in the result).
pub const PROGRESS_MAX: usize = 4 << 10;

/// At most one report per this interval reaches the sink, per attempt: a
/// task printing progress in a tight loop costs Redis a few writes a
/// second, not one per line.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// A stdout line longer than this is never parsed for progress: it is kept
/// only up to this length while it arrives, so a task writing one endless
/// line cannot grow the scanner. One that starts like a progress line is
/// counted as an oversized report (its report cannot fit [`PROGRESS_MAX`]
/// unless padded with whitespace by the kilobyte).
pub const LINE_MAX: usize = 4 * PROGRESS_MAX;

/// How long the end of an attempt waits for its last report to be sent.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The future a [`ProgressSink`] returns.
pub type ProgressFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where an attempt's reports go: called with the report's JSON text, one
/// call at a time. Its errors are its own to log; they never fail the
/// attempt.
pub type ProgressSink = Arc<dyn Fn(String) -> ProgressFuture + Send + Sync>;

/// What became of an attempt's progress lines.
#[derive(Default)]
struct Counts {
    /// Handed to the sink.
    sent: AtomicU64,
    /// Replaced by a newer report before they were sent.
    coalesced: AtomicU64,
    /// Over [`PROGRESS_MAX`] (or a progress-looking line over [`LINE_MAX`]).
    dropped_size: AtomicU64,
}

/// The one-report slot between the stdout reader and the forwarder task.
struct Shared {
    latest: Mutex<Option<String>>,
    ready: Notify,
    /// The process ended and its stdout was read: send what is pending, stop.
    closed: CancellationToken,
    counts: Counts,
    /// `<job id>/<attempt>`, for the logs.
    label: String,
}

impl Shared {
    /// Keep `report` as the one to send next, replacing a pending one.
    fn offer(&self, report: String) {
        if report.len() > PROGRESS_MAX {
            self.dropped(report.len());
            return;
        }
        let replaced = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(report);
        if replaced.is_some() {
            self.counts.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        self.ready.notify_one();
    }

    /// Count an oversized report; say so once per attempt (a task may
    /// print thousands).
    fn dropped(&self, len: usize) {
        if self.counts.dropped_size.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::debug!(attempt = %self.label, bytes = len, max = PROGRESS_MAX,
                "progress report over the size bound dropped (further ones are counted, not logged)");
        }
    }

    fn take(&self) -> Option<String> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Splits stdout into lines as it arrives and offers each progress line's
/// report. Holds at most [`LINE_MAX`] bytes of the current line.
pub(crate) struct LineScanner {
    shared: Arc<Shared>,
    line: Vec<u8>,
    /// The current line went past [`LINE_MAX`]; only its start is kept.
    overlong: bool,
}

impl LineScanner {
    /// Scan the next bytes of stdout.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(at) = bytes.iter().position(|&b| b == b'\n') {
            self.push(&bytes[..at]);
            self.end_line();
            bytes = &bytes[at + 1..];
        }
        self.push(bytes);
    }

    /// Stdout ended: an unterminated last line counts too.
    pub(crate) fn finish(&mut self) {
        if !self.line.is_empty() {
            self.end_line();
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = LINE_MAX - self.line.len();
        if bytes.len() > room {
            self.overlong = true;
        }
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn end_line(&mut self) {
        if self.overlong {
            if looks_like_progress(&self.line) {
                self.shared.dropped(self.line.len());
            }
        } else if let Some(report) = progress_report(&self.line) {
            self.shared.offer(report);
        }
        self.line.clear();
        self.overlong = false;
    }
}

/// Whether the start of a line is `{"progress"` (whitespace allowed), for
/// lines too long to parse.
fn looks_like_progress(start: &[u8]) -> bool {
    let mut rest = start.trim_ascii_start().strip_prefix(b"{");
    rest = rest.map(<[u8]>::trim_ascii_start);
    rest.is_some_and(|r| r.starts_with(b"\"progress\""))
}

/// The attempt's forwarder task: sends the reports the scanner offers to
/// the sink, at most one per [`PROGRESS_INTERVAL`]. Aborted if dropped.
pub(crate) struct Forwarder {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Forwarder {
    /// Start forwarding to `sink`; `label` (`<job id>/<attempt>`) names the
    /// attempt in logs. The scanner feeds it.
    pub(crate) fn start(sink: ProgressSink, label: String) -> (Forwarder, LineScanner) {
        let shared = Arc::new(Shared {
            latest: Mutex::new(None),
            ready: Notify::new(),
            closed: CancellationToken::new(),
            counts: Counts::default(),
            label,
        });
        let task = tokio::spawn(forward(shared.clone(), sink));
        let scanner = LineScanner {
            shared: shared.clone(),
            line: Vec::new(),
            overlong: false,
        };
        let forwarder = Forwarder {
            shared,
            task: Some(task),
        };
        (forwarder, scanner)
    }

    /// Call once stdout has been read to its end: send the pending report
    /// (waiting up to [`FLUSH_TIMEOUT`]), then stop.
    pub(crate) async fn finish(mut self) {
        self.shared.closed.cancel();
        if let Some(task) = self.task.as_mut()
            && tokio::time::timeout(FLUSH_TIMEOUT, task).await.is_err()
        {
            tracing::debug!(attempt = %self.shared.label,
                "the last progress report was not sent in time: dropped");
        }
        let c = &self.shared.counts;
        let (sent, coalesced, dropped_size) = (
            c.sent.load(Ordering::Relaxed),
            c.coalesced.load(Ordering::Relaxed),
            c.dropped_size.load(Ordering::Relaxed),
        );
        crate::metrics::progress_reports(sent, coalesced, dropped_size);
        tracing::debug!(attempt = %self.shared.label, sent, coalesced, dropped_size,
            "progress reports");
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The forwarder's loop: send the latest report, then wait out the
/// interval (cut short once the process ended: the final report goes at
/// once, so the completion is not held up).
async fn forward(shared: Arc<Shared>, sink: ProgressSink) {
    loop {
        if let Some(report) = shared.take() {
            sink(report).await;
            shared.counts.sent.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(PROGRESS_INTERVAL) => {}
                _ = shared.closed.cancelled() => {}
            }
            continue;
        }
        if shared.closed.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = shared.ready.notified() => {}
            _ = shared.closed.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recording() -> (ProgressSink, Arc<Mutex<Vec<String>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let to = got.clone();
        let sink: ProgressSink = Arc::new(move |r| {
            to.lock().unwrap().push(r);
            Box::pin(async {})
        });
        (sink, got)
    }

    #[tokio::test]
    async fn lines_split_across_chunks_and_bounds_hold() {
        let (sink, got) = recording();
        let (fwd, mut scan) = Forwarder::start(sink, "j/1".into());
        scan.feed(b"log\n{\"progr");
        scan.feed(b"ess\": {\"n\": 1}}\n\xff\xfe{\"progress\":2}\n");
        // Let the forwarder send the first; the next ones wait out its interval.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        scan.feed(b"{\"progress\":\"a\"}\n{\"progress\":\"b\"}\n");
        let big = format!("{{\"progress\":\"{}\"}}\n", "x".repeat(PROGRESS_MAX));
        scan.feed(big.as_bytes());
        let huge = format!("{{ \"progress\":\"{}\"}}\n", "y".repeat(3 * LINE_MAX));
        scan.feed(huge.as_bytes());
        scan.feed(b"{\"progress\":3}");
        scan.finish();
        fwd.finish().await;
        let got = got.lock().unwrap().clone();
        // The first is sent at once, the last at the end: "a" and "b" were
        // replaced while the forwarder waited out its interval.
        assert_eq!(got, ["{\"n\":1}", "3"]);
        assert!(scan.line.capacity() <= 2 * LINE_MAX);
        assert_eq!(scan.shared.counts.dropped_size.load(Ordering::Relaxed), 2);
        assert_eq!(scan.shared.counts.coalesced.load(Ordering::Relaxed), 2);
        assert_eq!(scan.shared.counts.sent.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn long_lines_are_recognised_by_their_start() {
        assert!(looks_like_progress(b" { \"progress\": [1,"));
        assert!(!looks_like_progress(b"{\"output\": 1"));
        assert!(!looks_like_progress(b"progress"));
    }
}
