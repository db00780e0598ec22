//! corral: classify every process and keep each class on its own cores.
//!
//! One folder per layer; each says what it may touch:
//! - `kernel/`: load, attach and read the eBPF side (BPF, tracefs, BTF).
//! - `model/`: the process table, policy, classification, topology, core
//!   sets, modes; pure, reads files it is given, writes nothing.
//! - `actuate/`: placement backends behind one seam, and the power hold;
//!   the only writer of cgroup and cpufreq files and the only mover of
//!   processes.
//! - `gpu/`: NVML poller, VRAM arbiter, thermal guard, VRAM askers.
//! - `observe/`: metrics and the status/explain/top views; read-only.
//! - `service/`: the loop, control socket, sd_notify, watchers.

pub mod actuate;
pub mod gpu;
pub mod kernel;
pub mod model;
pub mod observe;
pub mod service;
