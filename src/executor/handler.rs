//! In-process Rust handlers for library users.
//!
//! A [`Handler`] runs inside the worker process on the tokio runtime. The
//! runtime enforces the timeout (the handler's task is aborted at the
//! deadline, so handlers must yield at `.await` points to be stoppable),
//! catches panics, and measures wall time.
//!
//! **No memory cap** is applied to in-process handlers, and CPU time and
//! peak RSS are not measured (they are reported as 0): the handler shares
//! the worker's address space. Use task programs (`workers/<kind>/`) for
//! untrusted or memory-hungry work.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use super::stop::Stop;
use super::{Caps, INTERRUPTED, Outcome, Report, TaskInput, TaskUsage};
use crate::model::units::format_duration;

/// The boxed future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<HandlerOutput, HandlerError>> + Send>>;

/// An in-process task implementation (see the module docs: no memory cap).
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    fn run(&self, input: TaskInput) -> HandlerFuture;
}

/// What a successful handler returns.
#[derive(Default, Clone, Debug)]
pub struct HandlerOutput {
    /// Stored as the job's output.
    pub output: Option<serde_json::Value>,
    /// Usage the handler reports (API calls, tokens).
    pub usage: TaskUsage,
}

impl HandlerOutput {
    /// An output value with no reported usage.
    pub fn new(output: serde_json::Value) -> HandlerOutput {
        HandlerOutput {
            output: Some(output),
            usage: TaskUsage::default(),
        }
    }
}

/// A handler failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    /// What went wrong (stored as the attempt's error).
    pub message: String,
    /// True: never retry this job.
    pub permanent: bool,
}

impl HandlerError {
    /// A failure that is retried while attempts remain.
    pub fn retryable(message: impl Into<String>) -> HandlerError {
        HandlerError {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure that is never retried.
    pub fn permanent(message: impl Into<String>) -> HandlerError {
        HandlerError {
            message: message.into(),
            permanent: true,
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

struct FnHandler<F>(F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(TaskInput) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HandlerOutput, HandlerError>> + Send + 'static,
{
    fn run(&self, input: TaskInput) -> HandlerFuture {
        Box::pin((self.0)(input))
    }
}

/// Wraps an async function or closure as a [`Handler`].
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn Handler>
where
    F: Fn(TaskInput) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HandlerOutput, HandlerError>> + Send + 'static,
{
    Arc::new(FnHandler(f))
}

/// Runs one attempt of an in-process handler on its own tokio task.
///
/// - Timeout: at `limits.timeout` the task is aborted and the outcome is
///   [`Outcome::TimedOut`] (`limits.memory` and `limits.kill_grace` are not
///   used).
/// - A stop (worker shutdown, or the lease is gone; handlers have no
///   process to kill, so both abort the task): retryable failure
///   `"interrupted: worker shutting down"`, [`Report::stopped`] set.
/// - Panic: retryable failure `"handler panicked: <message>"`.
pub async fn run_handler(
    h: &dyn Handler,
    input: TaskInput,
    limits: &Caps,
    stop: impl Into<Stop>,
) -> Report {
    let stop: Stop = stop.into();
    let stopped = |wall_ms| {
        let mut r = Report::failed(INTERRUPTED, false);
        r.wall_ms = wall_ms;
        r.stopped = true;
        r
    };
    if stop.graceful.is_cancelled() || stop.now.is_cancelled() {
        return stopped(0);
    }
    let start = Instant::now();
    // Calling `run` itself may panic (before returning a future).
    let fut = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.run(input))) {
        Ok(f) => f,
        Err(p) => {
            return Report::failed(format!("handler panicked: {}", panic_message(&*p)), false);
        }
    };
    let mut task = tokio::spawn(fut);
    let result = tokio::select! {
        r = &mut task => Some(r),
        _ = tokio::time::sleep(limits.timeout) => None,
        _ = stop.graceful.cancelled() => {
            task.abort();
            return stopped(elapsed_ms(start));
        }
        _ = stop.now.cancelled() => {
            task.abort();
            return stopped(elapsed_ms(start));
        }
    };
    let wall_ms = elapsed_ms(start);
    let mut report = match result {
        None => {
            task.abort();
            let mut r = Report::failed(
                format!("timed out after {}", format_duration(limits.timeout)),
                false,
            );
            r.outcome = Outcome::TimedOut;
            r
        }
        Some(Ok(Ok(out))) => {
            let mut r = Report::failed("", false);
            r.outcome = Outcome::Succeeded;
            r.error = None;
            r.output = out.output;
            r.usage = out.usage;
            r
        }
        Some(Ok(Err(e))) => Report::failed(e.message, e.permanent),
        Some(Err(e)) if e.is_panic() => {
            let p = e.into_panic();
            Report::failed(format!("handler panicked: {}", panic_message(&*p)), false)
        }
        Some(Err(e)) => Report::failed(format!("handler task failed: {e}"), false),
    };
    report.wall_ms = wall_ms;
    report
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// In-process handlers by kind.
#[derive(Clone, Default)]
pub struct Handlers {
    map: HashMap<String, Arc<dyn Handler>>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<_> = self.kinds().collect();
        kinds.sort_unstable();
        f.debug_struct("Handlers").field("kinds", &kinds).finish()
    }
}

impl Handlers {
    /// No handlers.
    pub fn new() -> Handlers {
        Handlers::default()
    }

    /// The built-in handlers: `noop` (returns immediately, output `None`).
    pub fn with_builtins() -> Handlers {
        let mut h = Handlers::new();
        h.register(
            "noop",
            handler_fn(|_input| async { Ok(HandlerOutput::default()) }),
        );
        h
    }

    /// Registers (or replaces) the handler for `kind`.
    pub fn register(
        &mut self,
        kind: impl Into<String>,
        handler: Arc<dyn Handler>,
    ) -> &mut Handlers {
        self.map.insert(kind.into(), handler);
        self
    }

    /// The handler for `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.map.get(kind).cloned()
    }

    /// Registered kind names (unordered).
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// True when `kind` has a handler.
    pub fn contains(&self, kind: &str) -> bool {
        self.map.contains_key(kind)
    }
}
