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

use crate::{cpus::CpuList, policy::Policy};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where corral puts its groups unless told otherwise: `corral/` at the top
/// of the cgroup2 hierarchy, beside systemd's slices. On hybrid systems the
/// cgroup2 hierarchy is mounted at /sys/fs/cgroup/unified.
pub fn default_root() -> PathBuf {
    for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if is_cgroup2(Path::new(mount)) {
            return Path::new(mount).join("corral");
        }
    }
    PathBuf::from("/sys/fs/cgroup/corral")
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
    pub cpus: CpuList,
    pub cpu_weight: u32,
    /// Why the CPUs differ from what the policy asked, if they do.
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
    pub fn setup(root: &Path, policy: &Policy, online: CpuList, dry_run: bool) -> anyhow::Result<Self> {
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
        for class in policy.classes.values().filter(|c| c.is_managed()) {
            let requested = class.cpus.clone().unwrap_or_default();
            let (cpus, note) = CpuList::resolve(&requested, &groups.online);
            if let Some(note) = &note {
                info!(class = %class.name, "{note}");
            }
            let path = root.join(&class.name);
            let mut group = Group {
                class: class.name.clone(),
                path,
                id: 0,
                cpus,
                cpu_weight: class.cpu_weight,
                note,
            };
            if !dry_run {
                groups.write_group(&mut group)?;
            }
            groups.groups.insert(class.name.clone(), group);
        }
        Ok(groups)
    }

    fn write_group(&self, group: &mut Group) -> anyhow::Result<()> {
        std::fs::create_dir_all(&group.path)
            .with_context(|| format!("creating {}", group.path.display()))?;
        group.id = std::fs::metadata(&group.path)?.ino();
        if self.cpuset {
            write_file(&group.path.join("cpuset.cpus"), &group.cpus.to_string())?;
        }
        if self.cpu {
            write_file(&group.path.join("cpu.weight"), &group.cpu_weight.to_string())?;
        }
        Ok(())
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
        if self.dry_run {
            return Ok(());
        }
        let path = group.path.join("cgroup.procs");
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
        let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        if enabled.split_whitespace().any(|c| c == controller) {
            continue;
        }
        if let Err(e) = write_file(&dir.join("cgroup.subtree_control"), &format!("+{controller}")) {
            warn!("cannot enable the {controller} controller: {e:#}");
            return false;
        }
    }
    true
}
