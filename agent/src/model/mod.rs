//! What corral knows and decides, as pure logic: the process table, the
//! policy, classification, CPU lists, topology, core sets, the dynamic
//! modes. Reads files it is pointed at (/proc, sysfs, policy files); writes
//! nothing.

pub mod ananicy;
pub mod classify;
pub mod coexist;
pub mod coresets;
pub mod cpus;
pub mod gamemode;
pub mod modes;
pub mod pidref;
pub mod policy;
pub mod procs;
pub mod topology;
