//! The ground floor: plain types and pure functions every layer uses.
//!
//! Nothing here talks to Redis, PostgreSQL, processes or a clock, and
//! nothing here imports another agentq module: every other module may
//! import this one. Each file states the property it keeps; the parsers are
//! property-tested and fuzzed (`fuzz/`).

pub mod attempt;
pub mod backoff;
pub mod events;
pub mod job_event;
pub mod json;
pub mod limits;
pub mod names;
pub mod payload;
pub mod record;
pub mod redact;
pub mod text;
pub mod units;
