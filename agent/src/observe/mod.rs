//! What corral shows: the Prometheus metrics struct and its HTTP endpoint,
//! and the status, explain and top views as `render(&T) -> String`. Reads
//! the loop's snapshots; changes nothing.

pub mod metrics;
pub mod top;
pub mod views;
