//! A [`Placer`] that records what it is asked to do and touches nothing:
//! the unit tests of the loop feed events and read the calls back.

use std::{
    collections::{BTreeMap, HashSet},
    io,
    path::Path,
    sync::{Arc, Mutex},
};

use crate::{
    actuate::{
        Placer, Target,
        cgroup::{Groups, MoveError},
    },
    model::{coresets::Resolved, cpus::CpuList, policy::Policy},
};

/// One call the loop made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Place { class: String, pid: u32 },
    Unplace { origin: String, pid: u32 },
    SetCpus { class: String, cpus: String },
    Frozen { class: String, frozen: bool },
    Kill { class: String },
    ReleaseAll,
}

/// What the test sees: the calls so far, and pids whose moves fail as if
/// the process had exited.
#[derive(Debug, Default)]
pub struct Record {
    pub calls: Vec<Call>,
    pub gone: HashSet<u32>,
}

impl Record {
    /// The pids placed into `class`, in order.
    pub fn placed(&self, class: &str) -> Vec<u32> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Place { class: c, pid } if c == class => Some(*pid),
                _ => None,
            })
            .collect()
    }

    /// Every class `pid` was placed into, in order.
    pub fn classes_of(&self, pid: u32) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Place { class, pid: p } if *p == pid => Some(class.clone()),
                _ => None,
            })
            .collect()
    }

    /// The last core set written for `class`.
    pub fn cpus_of(&self, class: &str) -> Option<String> {
        self.calls.iter().rev().find_map(|c| match c {
            Call::SetCpus { class: c, cpus } if c == class => Some(cpus.clone()),
            _ => None,
        })
    }
}

/// The recording backend; clone `record` before handing it to the agent.
pub struct RecordingPlacer {
    layout: Groups,
    pub record: Arc<Mutex<Record>>,
}

/// The group id the recording backend gives `class`: stable and distinct,
/// so tests can make fork records "already in the group".
pub fn group_id(class: &str) -> u64 {
    1000 + class.bytes().map(u64::from).sum::<u64>()
}

impl RecordingPlacer {
    pub fn new(policy: &Policy, resolved: &[Resolved], online: CpuList) -> Self {
        RecordingPlacer {
            layout: Groups::planned(
                Path::new("/sys/fs/cgroup/corral"),
                policy,
                resolved,
                online,
                group_id,
            ),
            record: Arc::default(),
        }
    }

    fn log(&self, call: Call) {
        self.record.lock().expect("record lock").calls.push(call);
    }
}

impl Placer for RecordingPlacer {
    fn backend(&self) -> &'static str {
        "recording"
    }

    fn layout(&self) -> &Groups {
        &self.layout
    }

    fn layout_mut(&mut self) -> &mut Groups {
        &mut self.layout
    }

    fn reconfigure(&mut self, policy: &Policy, resolved: &[Resolved]) -> anyhow::Result<()> {
        self.layout = Groups::planned(
            &self.layout.root,
            policy,
            resolved,
            self.layout.online.clone(),
            group_id,
        );
        Ok(())
    }

    fn cpus_changed(&mut self, class: &str, cpus: &CpuList) {
        self.log(Call::SetCpus {
            class: class.to_owned(),
            cpus: cpus.to_string(),
        });
    }

    fn place(&mut self, class: &str, target: Target<'_>) -> Result<(), MoveError> {
        if self.layout.group(class).is_none() {
            return Err(MoveError::Unmanaged(class.to_owned()));
        }
        if self
            .record
            .lock()
            .expect("record lock")
            .gone
            .contains(&target.pid)
        {
            return Err(MoveError::Gone(target.pid));
        }
        self.log(Call::Place {
            class: class.to_owned(),
            pid: target.pid,
        });
        Ok(())
    }

    /// The recording layout lives at `/corral/<class>` of the cgroup2 mount.
    fn holds_cgroup(&self, class: &str, cgroup: &str) -> bool {
        self.layout.group(class).is_some() && cgroup == format!("/corral/{class}")
    }

    fn unplace(&mut self, origin: &str, pid: u32) -> Result<(), MoveError> {
        self.log(Call::Unplace {
            origin: origin.to_owned(),
            pid,
        });
        Ok(())
    }

    fn set_frozen(&mut self, class: &str, frozen: bool) -> io::Result<()> {
        self.log(Call::Frozen {
            class: class.to_owned(),
            frozen,
        });
        Ok(())
    }

    fn kill(&mut self, class: &str) -> io::Result<usize> {
        self.log(Call::Kill {
            class: class.to_owned(),
        });
        Ok(0)
    }

    fn release_all(&mut self) {
        self.log(Call::ReleaseAll);
    }
}

/// Classes and their current CPUs, for assertions.
pub fn cpus_by_class(layout: &Groups) -> BTreeMap<String, String> {
    layout
        .iter()
        .map(|g| (g.class.clone(), g.cpus.to_string()))
        .collect()
}
