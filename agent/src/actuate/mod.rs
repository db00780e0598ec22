//! Carrying placement out. The loop decides *that* a process belongs to a
//! class; a [`Placer`] backend puts it there and fences it: the cgroupfs
//! backend ([`cgroup`]) on hosts where corral owns its own cgroup subtree,
//! and [`recording::RecordingPlacer`] for unit tests of the loop. This is
//! the only folder that writes cgroup files or moves processes. [`power`]
//! is the other actuator: power-profiles-daemon holds and cpufreq files.

pub mod cgroup;
pub mod power;
pub mod recording;
pub mod systemd;
pub mod systemd_bus;

use std::io;

use crate::{
    actuate::cgroup::{Groups, MoveError},
    model::{coresets::Resolved, cpus::CpuList, policy::Policy},
};

/// What a backend needs to know about the process it places.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub pid: u32,
    /// Start time (clock ticks since boot); 0 when unknown.
    pub start_ticks: u64,
    /// The process's cgroup now, relative to the cgroup2 mount.
    pub cgroup: &'a str,
    pub comm: &'a str,
    /// Its parent, when the table knows it (a child forked between its
    /// parent's exec and move joins the parent's unit).
    pub parent: Option<u32>,
}

/// The seam between the loop's decisions and the machine. A backend keeps
/// the class layout (each class's core set, weight and where it lives) and
/// carries out moves, core-set changes and the freezer. Every method is
/// called from the loop; none may block for long.
pub trait Placer {
    /// Which backend this is, for status and explain.
    fn backend(&self) -> &'static str;
    /// The classes this backend places, their core sets and weights now.
    fn layout(&self) -> &Groups;
    fn layout_mut(&mut self) -> &mut Groups;
    /// Brings the layout in line with a (new) policy.
    fn reconfigure(&mut self, policy: &Policy, resolved: &[Resolved]) -> anyhow::Result<()>;
    /// Sets a class's current CPUs (the dynamic mode, the thermal guard).
    /// Returns whether anything changed.
    fn set_cpus(
        &mut self,
        class: &str,
        cpus: CpuList,
        note: Option<String>,
    ) -> anyhow::Result<bool> {
        let changed = self.layout_mut().set_cpus(class, cpus.clone(), note)?;
        if changed {
            self.cpus_changed(class, &cpus);
        }
        Ok(changed)
    }
    /// A class's CPUs changed in the layout: carry it out where the layout
    /// itself does not (a manager's unit property, a test's record).
    fn cpus_changed(&mut self, _class: &str, _cpus: &CpuList) {}
    /// Puts the whole process (all threads) into `class`.
    fn place(&mut self, class: &str, target: Target<'_>) -> Result<(), MoveError>;
    /// Sends a process the policy no longer manages back to `origin` (a
    /// cgroup relative to the cgroup2 mount).
    fn unplace(&mut self, origin: &str, pid: u32) -> Result<(), MoveError>;
    /// Whether a process whose cgroup is `cgroup_id` already sits where
    /// `class` puts it (a child forked after its parent was placed).
    fn holds_cgroup_id(&self, class: &str, cgroup_id: u64) -> bool {
        self.layout()
            .group(class)
            .is_some_and(|g| g.id == cgroup_id)
    }
    /// Whether a process whose cgroup is `cgroup` (relative to the cgroup2
    /// mount) already sits where `class` puts it (adopted on restart).
    fn holds_cgroup(&self, class: &str, cgroup: &str) -> bool {
        let layout = self.layout();
        layout
            .group(class)
            .and_then(|g| layout.relative(&g.path))
            .is_some_and(|rel| rel == cgroup)
    }
    /// Freezes or thaws every process of `class`.
    fn set_frozen(&mut self, class: &str, frozen: bool) -> io::Result<()>;
    /// Kills every process of `class`; returns how many.
    fn kill(&mut self, class: &str) -> io::Result<usize>;
    /// The fail-safe on stop: nothing stays frozen or confined to a small
    /// core set once the agent is gone.
    fn release_all(&mut self);
    /// The CPUs everything corral does not place may use: `Some` while a
    /// dynamic mode narrows them, `None` to give back what they had. The
    /// cgroupfs backend leaves other cgroups alone.
    fn set_others(&mut self, _cpus: Option<CpuList>) {}
    /// The process is gone; drop what the backend kept about it.
    fn forget(&mut self, _pid: u32) {}
    /// Where `pid` is and what fences it, in words, for explain.
    fn describe(&self, _pid: u32) -> Option<String> {
        None
    }
    /// When `pid` was in its unit (CLOCK_MONOTONIC ns), for backends that
    /// place asynchronously.
    fn joined_ns(&self, _pid: u32) -> Option<u64> {
        None
    }
    /// What the backend cannot do now and why, for status.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}
