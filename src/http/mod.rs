//! HTTP: the tenant API (`api`) and the probes every long-running process
//! serves (`probes`).

pub mod api;
pub mod probes;
