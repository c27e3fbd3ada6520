//! Shared test support: a private namespace on the real Redis per test,
//! worker processes, and polling with generous deadlines (never timing).
//!
//! Every `agentq` process started here dies with the test: it is spawned
//! with [`die_with_test`] (SIGKILL when the spawning thread exits, even if
//! the test process is aborted), and tests hold it in a [`Proc`] (SIGKILL
//! and reap when dropped, also while a failing test unwinds).
//!
//! By concern:
//! - [`queue`]: a test's own namespace ([`TestQueue`]), in-process workers,
//!   polling ([`eventually`]) and what the queue holds;
//! - [`claims`]: the claim and completion scripts driven directly;
//! - [`db`]: a test's own PostgreSQL schema ([`TestDb`]) and ledger rows;
//! - [`procs`]: `agentq` processes ([`Proc`], [`WorkerProc`]), signals,
//!   their logs ([`LogTail`]) and their lease guards;
//! - [`faults`]: what the fault suites check after killing things: leftover
//!   working directories ([`WorkerTmp`]), one record per attempt, caps;
//! - [`http`]: plain HTTP requests to `agentq serve` ([`http::req`]; not
//!   re-exported: named `common::http::X`);
//! - [`sse`]: Server-Sent Events read from `agentq serve` ([`sse::open`];
//!   named `common::sse::X`);
//! - [`ops`]: the operations-asset tests' files, YAML, metrics and runbook
//!   (not re-exported: named `common::ops::X`).
//!
//! Everything is re-exported here, so tests name it `common::X`.
// Each test binary uses part of this module: what it leaves unused is fine.
#![allow(dead_code, unused_imports)]

pub mod claims;
pub mod db;
pub mod faults;
pub mod http;
pub mod ops;
pub mod procs;
pub mod queue;
pub mod sse;

pub use claims::*;
pub use db::*;
pub use faults::*;
pub use procs::*;
pub use queue::*;
