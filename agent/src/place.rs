//! The cgroup v2 groups corral manages, one per managed class under a
//! configurable root, and moving processes into them.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use tracing::{info, warn};

use crate::{cpus::CpuList, policy::Policy, topology::Resolved};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where corral puts its groups unless told otherwise: `corral/` at the top
/// of the cgroup2 hierarchy, beside systemd's slices. On hybrid systems the
/// cgroup2 hierarchy is mounted at /sys/fs/cgroup/unified.
pub fn default_root() -> PathBuf {
    cgroup2_mount()
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
        .join("corral")
}

/// The cgroup2 mount: /sys/fs/cgroup on unified systems,
/// /sys/fs/cgroup/unified on hybrid ones; None if neither is cgroup2.
pub fn cgroup2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_cgroup2(p))
}

pub fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a valid C string.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// One class's group.
#[derive(Debug, Clone)]
pub struct Group {
    pub class: String,
    pub path: PathBuf,
    /// The cgroup id (directory inode), as `bpf_get_current_cgroup_id` sees it.
    pub id: u64,
    /// The class's own CPUs on this machine, from the policy.
    pub base: CpuList,
    /// The CPUs the group has now (the base, adjusted by the dynamic mode).
    pub cpus: CpuList,
    pub cpu_weight: u32,
    /// How the policy's request became `base`.
    pub why: String,
    /// Why `cpus` differs from `base`, if it does.
    pub note: Option<String>,
}

/// Why a move did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("process {0} exited before it could be moved")]
    Gone(u32),
    #[error("class `{0}` has no group (it is not managed)")]
    Unmanaged(String),
    #[error("moving {pid} into {path}: {source}")]
    Io {
        pid: u32,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// All managed groups.
#[derive(Debug)]
pub struct Groups {
    pub root: PathBuf,
    /// Whether the cpuset controller is enabled, so core sets are enforced.
    pub cpuset: bool,
    /// Whether the cpu controller is enabled, so weights apply.
    pub cpu: bool,
    pub online: CpuList,
    pub dry_run: bool,
    groups: BTreeMap<String, Group>,
}

impl Groups {
    /// Creates (or adopts) the root and one group per managed class, and
    /// writes their core sets and weights. In a dry run nothing is written.
    pub fn setup(
        root: &Path,
        policy: &Policy,
        resolved: &[Resolved],
        online: CpuList,
        dry_run: bool,
    ) -> anyhow::Result<Self> {
        let parent = root
            .parent()
            .ok_or_else(|| anyhow!("cgroup root {} has no parent", root.display()))?;
        if !is_cgroup2(parent) {
            return Err(anyhow!(
                "{} is not on a cgroup v2 filesystem; pass --cgroup-root with a directory inside the cgroup2 mount (see `mount -t cgroup2`)",
                parent.display()
            ));
        }
        let mut groups = Groups {
            root: root.to_owned(),
            cpuset: false,
            cpu: false,
            online,
            dry_run,
            groups: BTreeMap::new(),
        };
        if !dry_run {
            std::fs::create_dir_all(root)
                .with_context(|| format!("creating cgroup root {}", root.display()))?;
            groups.cpuset = enable_controller(root, "cpuset");
            groups.cpu = enable_controller(root, "cpu");
            if !groups.cpuset {
                warn!(
                    root = %root.display(),
                    "the cpuset controller is not available on this cgroup v2 hierarchy: processes are grouped, but core sets are not enforced"
                );
            }
        }
        groups.reconfigure(policy, resolved)?;
        Ok(groups)
    }

    /// Brings the groups in line with a (new) policy: creates groups for new
    /// classes, rewrites core sets and weights that changed, and removes
    /// groups of classes that are gone once they are empty.
    pub fn reconfigure(&mut self, policy: &Policy, resolved: &[Resolved]) -> anyhow::Result<()> {
        for r in resolved {
            let Some(class) = policy.class(&r.class) else {
                continue;
            };
            let previous = self.groups.get(&r.class).cloned();
            let mut group = Group {
                class: r.class.clone(),
                path: self.root.join(&r.class),
                id: previous.as_ref().map_or(0, |g| g.id),
                base: r.cpus.clone(),
                cpus: r.cpus.clone(),
                cpu_weight: class.cpu_weight,
                why: r.why.clone(),
                note: None,
            };
            info!(class = %r.class, cpus = %r.cpus, "{}", r.why);
            if !self.dry_run {
                let unchanged = previous
                    .as_ref()
                    .is_some_and(|p| p.cpus == group.cpus && p.cpu_weight == group.cpu_weight);
                if !unchanged {
                    self.write_group(&mut group)?;
                }
            }
            self.groups.insert(r.class.clone(), group);
        }
        let wanted: Vec<&str> = resolved.iter().map(|r| r.class.as_str()).collect();
        let gone: Vec<String> = self
            .groups
            .keys()
            .filter(|c| !wanted.contains(&c.as_str()))
            .cloned()
            .collect();
        for class in gone {
            if let Some(group) = self.groups.remove(&class)
                && !self.dry_run
            {
                // Fails while processes remain; they are moved out by the
                // reload's re-placement, and the empty group goes next time.
                let _ = std::fs::remove_dir(&group.path);
            }
        }
        Ok(())
    }

    /// Sets a group's current CPUs (the dynamic mode's layout). Writes only
    /// when they change.
    pub fn set_cpus(
        &mut self,
        class: &str,
        cpus: CpuList,
        note: Option<String>,
    ) -> anyhow::Result<bool> {
        let cpuset = self.cpuset && !self.dry_run;
        let Some(group) = self.groups.get_mut(class) else {
            return Ok(false);
        };
        group.note = note;
        if group.cpus == cpus {
            return Ok(false);
        }
        if cpuset {
            write_file(&group.path.join("cpuset.cpus"), &cpus.to_string())?;
        }
        group.cpus = cpus;
        Ok(true)
    }

    fn write_group(&self, group: &mut Group) -> anyhow::Result<()> {
        std::fs::create_dir_all(&group.path)
            .with_context(|| format!("creating {}", group.path.display()))?;
        group.id = std::fs::metadata(&group.path)?.ino();
        if self.cpuset && !group.path.join("cpuset.cpus").exists() {
            warn!(group = %group.path.display(), "no cpuset.cpus in the group: core sets are not enforced");
        }
        if self.cpuset {
            write_file(&group.path.join("cpuset.cpus"), &group.cpus.to_string())?;
        }
        if self.cpu {
            write_file(
                &group.path.join("cpu.weight"),
                &group.cpu_weight.to_string(),
            )?;
        }
        Ok(())
    }

    /// `path` as /proc/PID/cgroup writes it: relative to the cgroup2 mount.
    pub fn relative(&self, path: &Path) -> Option<String> {
        let mount = cgroup2_mount_of(&self.root);
        path.strip_prefix(&mount)
            .ok()
            .map(|rel| format!("/{}", rel.display()))
    }

    pub fn group(&self, class: &str) -> Option<&Group> {
        self.groups.get(class)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// Moves the whole thread group `pid` into `class`'s group.
    pub fn move_process(&self, class: &str, pid: u32) -> Result<(), MoveError> {
        let group = self
            .groups
            .get(class)
            .ok_or_else(|| MoveError::Unmanaged(class.to_owned()))?;
        self.move_to(&group.path, pid)
    }

    /// Moves `pid` back to the cgroup it came from, given as a path
    /// relative to the cgroup2 mount ("/user.slice/...").
    pub fn return_process(&self, origin: &str, pid: u32) -> Result<(), MoveError> {
        let mount = cgroup2_mount_of(&self.root);
        self.move_to(&mount.join(origin.trim_start_matches('/')), pid)
    }

    fn move_to(&self, dir: &Path, pid: u32) -> Result<(), MoveError> {
        if self.dry_run {
            return Ok(());
        }
        let path = dir.join("cgroup.procs");
        let result = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{pid}\n").as_bytes()));
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(MoveError::Gone(pid)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(MoveError::Gone(pid)),
            Err(source) => Err(MoveError::Io { pid, path, source }),
        }
    }

    /// Fail-safe on stop: every managed group gets every online CPU, so no
    /// process stays confined to a small core set once corral is gone.
    pub fn widen_all(&self) {
        if self.dry_run || !self.cpuset {
            return;
        }
        for group in self.groups.values() {
            if let Err(e) = write_file(&group.path.join("cpuset.cpus"), &self.online.to_string()) {
                warn!(group = %group.path.display(), "could not widen core set on stop: {e:#}");
            }
        }
    }
}

/// The mount point of the cgroup2 hierarchy `dir` lives in.
pub fn cgroup2_mount_of(dir: &Path) -> PathBuf {
    let mut mount = dir.to_owned();
    let mut current = dir.parent();
    while let Some(d) = current {
        if !is_cgroup2(d) {
            break;
        }
        mount = d.to_owned();
        current = d.parent();
    }
    mount
}

fn write_file(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing `{value}` to {}", path.display()))
}

/// Enables `controller` for the children of `root`, and on every ancestor
/// between the cgroup2 mount and `root` that lacks it. False when the
/// hierarchy does not offer it.
fn enable_controller(root: &Path, controller: &str) -> bool {
    let mut chain = vec![root.to_owned()];
    let mut dir = root.parent();
    while let Some(d) = dir {
        if !is_cgroup2(d) {
            break;
        }
        chain.push(d.to_owned());
        dir = d.parent();
    }
    chain.reverse();
    for dir in &chain {
        let offered = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        if !offered.split_whitespace().any(|c| c == controller) {
            return false;
        }
        let enabled =
            std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        if enabled.split_whitespace().any(|c| c == controller) {
            continue;
        }
        if let Err(e) = write_file(
            &dir.join("cgroup.subtree_control"),
            &format!("+{controller}"),
        ) {
            warn!("cannot enable the {controller} controller: {e:#}");
            return false;
        }
    }
    true
}
