//! What corral shows: the Prometheus metrics struct and its HTTP endpoint,
//! and the status, explain and top views as `render(&T) -> String`, and the
//! escaping of process strings every view and log line uses. Reads
//! the loop's snapshots; changes nothing.

pub mod escape;
pub mod metrics;
pub mod top;
pub mod views;
