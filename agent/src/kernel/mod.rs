//! The kernel side: loading and attaching the eBPF programs, reading their
//! ring buffer and maps. Touches BPF, tracefs, the kernel's BTF and the BPF
//! maps, and the proc connector that rings when a process starts; decides
//! nothing.

pub mod bpf;
pub mod btf;
pub mod doorbell;
