//! Carrying placement out: the cgroupfs backend (every cgroupfs file corral
//! writes) and the placement seam the loop talks to. The only folder that
//! writes cgroup files or moves processes.

pub mod cgroup;
