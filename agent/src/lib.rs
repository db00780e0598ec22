//! corral: classify every process and keep each class on its own cores.
//!
//! One module per concern: `bpf` loads and reads the kernel side, `procs`
//! keeps the process table, `classify` decides classes from the `policy`,
//! `place` moves processes between cgroups, `control` is the socket the CLI
//! talks to, and `daemon` is the one loop that owns the state.

pub mod actions;
/// Placement backends (until actuate/mod.rs exists): systemd's manager over D-Bus.
pub mod actuate {
    pub mod manager_ops;
    pub mod systemd_bus;
}
pub mod ananicy;
pub mod arbiter;
pub mod bpf;
pub mod classify;
pub mod control;
pub mod cpus;
pub mod daemon;
pub mod gpu;
pub mod metrics;
pub mod modes;
pub mod notify;
pub mod place;
pub mod policy;
pub mod procs;
/// Long-running parts (until service/mod.rs exists): the per-user agent.
pub mod service {
    pub mod user_agent;
}
pub mod top;
pub mod topology;
