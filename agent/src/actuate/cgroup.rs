//! Every cgroupfs file operation corral does: the class groups under its own
//! root (create, core sets, weights, moving processes in and back), freezing,
//! thawing and killing a group, and dmem (device memory) limits.
//!
//! Length: every cgroupfs file operation lives here on purpose (one module for them); the tests are the last 50 lines.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, ErrorKind, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use tracing::{debug, info, warn};

use crate::{
    model::coresets::Resolved, model::cpus::CpuList, model::pidref::PidRef, model::policy::Policy,
};

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
    /// The group's `cgroup.procs`, opened at the first move and kept: a
    /// move on the exec path is then one write(2).
    procs: std::sync::Arc<std::sync::OnceLock<fs::File>>,
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
    /// Whether this layout is carried out by writing cgroup files (false for
    /// a plan another backend carries out, or a dry run).
    writes_files: bool,
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
            writes_files: !dry_run,
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
                // The same directory keeps its descriptor.
                procs: previous
                    .as_ref()
                    .map(|p| p.procs.clone())
                    .unwrap_or_default(),
            };
            info!(class = %r.class, cpus = %r.cpus, "{}", r.why);
            if self.writes_files {
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
                && self.writes_files
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
        let cpuset = self.cpuset && self.writes_files;
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
        if !self.writes_files {
            return Ok(());
        }
        if group.procs.get().is_none()
            && let Ok(file) = fs::OpenOptions::new()
                .write(true)
                .open(group.path.join("cgroup.procs"))
        {
            let _ = group.procs.set(file);
        }
        if let Some(mut file) = group.procs.get() {
            let mut line = [0u8; 12];
            let len = {
                let mut cursor = io::Cursor::new(&mut line[..]);
                let _ = writeln!(cursor, "{pid}");
                cursor.position() as usize
            };
            match file.write(&line[..len]) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    return Err(MoveError::Gone(pid));
                }
                // Anything else (the group was removed behind corral's
                // back): the path, opened afresh, tells.
                Err(_) => {}
            }
        }
        self.move_to(&group.path, pid)
    }

    /// Moves `pid` back to the cgroup it came from, given as a path
    /// relative to the cgroup2 mount ("/user.slice/...").
    pub fn return_process(&self, origin: &str, pid: u32) -> Result<(), MoveError> {
        let mount = cgroup2_mount_of(&self.root);
        self.move_to(&mount.join(origin.trim_start_matches('/')), pid)
    }

    fn move_to(&self, dir: &Path, pid: u32) -> Result<(), MoveError> {
        if !self.writes_files {
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
}

impl Groups {
    /// A layout that writes nothing: every group is planned, none created.
    /// For dry runs of other backends and for the loop's unit tests; group
    /// ids are given by `id_of`.
    pub fn planned(
        root: &Path,
        policy: &Policy,
        resolved: &[Resolved],
        online: CpuList,
        id_of: impl Fn(&str) -> u64,
    ) -> Self {
        let mut groups = Groups {
            root: root.to_owned(),
            cpuset: true,
            cpu: true,
            online,
            dry_run: true,
            writes_files: false,
            groups: BTreeMap::new(),
        };
        // A dry run writes nothing, so this cannot fail.
        let _ = groups.reconfigure(policy, resolved);
        for group in groups.groups.values_mut() {
            group.id = id_of(&group.class);
        }
        groups
    }
}

impl Groups {
    /// Names where each class lives for status (a slice, for backends
    /// that do not use corral's own subtree).
    pub fn relabel(&mut self, path_of: impl Fn(&str) -> PathBuf) {
        for group in self.groups.values_mut() {
            group.path = path_of(&group.class);
        }
    }
}

/// The cgroupfs backend: corral's own subtree (`corral/<class>`) on hosts
/// where no service manager owns the cgroup tree.
impl crate::actuate::Placer for Groups {
    fn backend(&self) -> &'static str {
        "cgroupfs"
    }

    fn layout(&self) -> &Groups {
        self
    }

    fn layout_mut(&mut self) -> &mut Groups {
        self
    }

    fn reconfigure(&mut self, policy: &Policy, resolved: &[Resolved]) -> anyhow::Result<()> {
        Groups::reconfigure(self, policy, resolved)
    }

    fn place(&mut self, class: &str, target: crate::actuate::Target<'_>) -> Result<(), MoveError> {
        self.move_process(class, target.pid)
    }

    fn unplace(&mut self, origin: &str, pid: u32) -> Result<(), MoveError> {
        self.return_process(origin, pid)
    }

    fn set_frozen(&mut self, class: &str, frozen: bool) -> io::Result<()> {
        let group = self.groups.get(class).ok_or_else(|| {
            io::Error::new(ErrorKind::NotFound, format!("class `{class}` has no group"))
        })?;
        set_frozen(&group.path, frozen)
    }

    fn kill(&mut self, class: &str) -> io::Result<usize> {
        let group = self.groups.get(class).ok_or_else(|| {
            io::Error::new(ErrorKind::NotFound, format!("class `{class}` has no group"))
        })?;
        kill_group(&group.path)
    }

    /// The same release as `corral recover`: thaw, then widen.
    fn release_all(&mut self) {
        if !self.writes_files {
            return;
        }
        let report = release_all(&self.root, &self.online);
        info!(
            thawed = report.thawed,
            widened = report.widened,
            "released every group"
        );
        for e in &report.errors {
            warn!("could not release every group: {e}");
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

// ---------------------------------------------------------------------------
// cgroup v2: freeze, thaw, kill
// ---------------------------------------------------------------------------

/// Adds the file (and what was being done) to an I/O error, keeping its kind.
fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Write `contents` to an existing control file (never creates one, so a
/// missing group or controller shows as NotFound).
fn write_control(path: &Path, contents: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|e| with_path(e, &format!("writing {contents:?} to"), path))
}

fn read_control(path: &Path) -> io::Result<String> {
    fs::read_to_string(path).map_err(|e| with_path(e, "reading", path))
}

/// Freeze (`true`) or thaw (`false`) every process in `group` by writing its
/// `cgroup.freeze`. Freezing completes asynchronously; see [`wait_frozen`].
pub fn set_frozen(group: &Path, frozen: bool) -> io::Result<()> {
    write_control(&group.join("cgroup.freeze"), if frozen { "1" } else { "0" })
}

/// Whether `group` is frozen now, from the `frozen` key of its
/// `cgroup.events` (true also when an ancestor froze it).
pub fn is_frozen(group: &Path) -> io::Result<bool> {
    let path = group.join("cgroup.events");
    let events = read_control(&path)?;
    events_frozen(&events).ok_or_else(|| {
        io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "{} has no \"frozen\" key; the kernel has no cgroup v2 freezer (Linux 5.2+ needed)",
                path.display()
            ),
        )
    })
}

fn events_frozen(events: &str) -> Option<bool> {
    events.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == "frozen").then(|| value.trim() != "0")
    })
}

/// Wait, polling, until [`is_frozen`] says `frozen` or `timeout` passes.
/// Returns whether the state was reached. Blocks the calling thread; from
/// async code use `spawn_blocking`.
pub fn wait_frozen(group: &Path, frozen: bool, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if is_frozen(group)? == frozen {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// SIGKILL every process in `group`: through `cgroup.kill` when the kernel
/// has it (5.14+), which also catches processes forking meanwhile, else one
/// signal per pid in `cgroup.procs`, each through a pidfd taken and checked
/// to be in `group` first, so a pid reused after the listing is never hit.
/// Returns how many processes were listed in `cgroup.procs` before the kill.
pub fn kill_group(group: &Path) -> io::Result<usize> {
    let procs_path = group.join("cgroup.procs");
    let pids = parse_pids(&read_control(&procs_path)?, &procs_path)?;
    let kill_file = group.join("cgroup.kill");
    if kill_file.exists() {
        write_control(&kill_file, "1")?;
    } else {
        let mount = cgroup2_mount_of(group);
        let relative = Path::new("/").join(group.strip_prefix(&mount).unwrap_or(group));
        for &pid in &pids {
            let Ok(process) = PidRef::open(pid as u32) else {
                continue;
            };
            // With the pidfd held the pid cannot change hands: check that it
            // is still ours, then signal that very process.
            if crate::model::procs::cgroup_of(pid as u32).as_deref()
                != Some(&*relative.to_string_lossy())
            {
                continue;
            }
            if let Err(e) = signal(&process, libc::SIGKILL)
                && e.raw_os_error() != Some(libc::ESRCH)
            {
                return Err(io::Error::new(
                    e.kind(),
                    format!("sending SIGKILL to pid {pid} of {}: {e}", group.display()),
                ));
            }
        }
    }
    debug!(group = %group.display(), count = pids.len(), "killed group");
    Ok(pids.len())
}

/// Sends `signal` to the very process `process` was taken for (never to a
/// newcomer with its pid); `ESRCH` when it is gone.
pub fn signal(process: &PidRef, signal: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let result = match process.fd() {
        // SAFETY: pidfd_send_signal with a null siginfo acts as kill(2).
        Some(fd) => unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        },
        // SAFETY: kill(2) takes plain integers; without pidfds (< 5.3) the
        // start-time check just made is the best there is.
        None if process.is_same() => unsafe {
            libc::c_long::from(libc::kill(process.pid() as libc::pid_t, signal))
        },
        None => return Err(io::Error::from_raw_os_error(libc::ESRCH)),
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn parse_pids(text: &str, path: &Path) -> io::Result<Vec<libc::pid_t>> {
    text.split_whitespace()
        .map(|s| {
            s.parse().map_err(|_| {
                io::Error::new(
                    ErrorKind::InvalidData,
                    format!("{} lists {s:?}, which is not a pid", path.display()),
                )
            })
        })
        .collect()
}

/// The fail-safe run at start-up and on stop: thaw every group at or below
/// `root` that is frozen, parents before children. A group counts as frozen
/// when its `cgroup.events` says `frozen 1` or its own `cgroup.freeze` is 1
/// (a freeze still in progress does not show in `cgroup.events` yet).
/// Returns how many groups were written to. A missing `root` is 0.
///
/// Every group is tried; if some could not be thawed, the first such error
/// is returned after the walk (each one is also logged).
pub fn thaw_all_under(root: &Path) -> io::Result<usize> {
    let mut thawed = 0;
    let mut first_error: Option<io::Error> = None;
    let mut pending: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(group) = pending.pop() {
        match thaw_one(&group) {
            Ok(true) => thawed += 1,
            Ok(false) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                warn!("could not thaw {}: {e}", group.display());
                first_error.get_or_insert(e);
            }
        }
        let entries = match fs::read_dir(&group) {
            Ok(entries) => entries,
            // The group went away while we walked: nothing to thaw there.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                let e = with_path(e, "listing", &group);
                warn!("{e}");
                first_error.get_or_insert(e);
                continue;
            }
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(thawed),
    }
}

/// Thaw one group if it is frozen; `Ok(true)` if it was written to.
fn thaw_one(group: &Path) -> io::Result<bool> {
    let freeze = group.join("cgroup.freeze");
    if !freeze.exists() {
        // The hierarchy root or a non-cgroup directory: nothing to thaw.
        return Ok(false);
    }
    let own = read_control(&freeze)?.trim() == "1";
    let events = match read_control(&group.join("cgroup.events")) {
        Ok(events) => events_frozen(&events).unwrap_or(false),
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if !(own || events) {
        return Ok(false);
    }
    set_frozen(group, false)?;
    debug!(group = %group.display(), "thawed");
    Ok(true)
}

// ---------------------------------------------------------------------------
// dmem: device memory limits
// ---------------------------------------------------------------------------

/// Whether this kernel's cgroup v2 can limit device (VRAM) memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmemSupport {
    /// No dmem; `reason` says why, for the one warning at start-up.
    Absent { reason: String },
    /// The regions the GPU drivers registered, with their capacity in bytes,
    /// as listed in `dmem.capacity` (e.g. `drm/0000:01:00.0/vram0`).
    Present { regions: Vec<(String, u64)> },
}

/// Find out whether the cgroup2 hierarchy mounted at `cgroup_mount` has the
/// dmem controller and which regions it manages.
pub fn dmem_support(cgroup_mount: &Path) -> DmemSupport {
    let absent = |reason: String| DmemSupport::Absent { reason };
    let controllers_path = cgroup_mount.join("cgroup.controllers");
    let controllers = match read_control(&controllers_path) {
        Ok(c) => c,
        Err(e) => {
            return absent(format!(
                "{e}; is {} a cgroup2 mount?",
                cgroup_mount.display()
            ));
        }
    };
    if !controllers.split_whitespace().any(|c| c == "dmem") {
        return absent(format!(
            "{} does not list dmem; the kernel needs CONFIG_CGROUP_DMEM (Linux 6.14+)",
            controllers_path.display()
        ));
    }
    let capacity_path = cgroup_mount.join("dmem.capacity");
    let capacity = match read_control(&capacity_path) {
        Ok(c) => c,
        Err(e) => return absent(e.to_string()),
    };
    match parse_dmem_capacity(&capacity) {
        Err(why) => absent(format!("{}: {why}", capacity_path.display())),
        Ok(regions) if regions.is_empty() => absent(format!(
            "{} lists no regions; no GPU driver here registers VRAM with dmem \
             (amdgpu, xe and i915 do; nvidia does not)",
            capacity_path.display()
        )),
        Ok(regions) => DmemSupport::Present { regions },
    }
}

/// `REGION BYTES` lines; blank lines are skipped.
fn parse_dmem_capacity(text: &str) -> Result<Vec<(String, u64)>, String> {
    let mut regions = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let Some(region) = words.next() else { continue };
        let bytes = words
            .next()
            .and_then(|b| b.parse::<u64>().ok())
            .filter(|_| words.next().is_none())
            .ok_or_else(|| format!("line {} {line:?} is not \"REGION BYTES\"", n + 1))?;
        regions.push((region.to_owned(), bytes));
    }
    Ok(regions)
}

/// Set one dmem limit of `group` for `region`: `file` is `dmem.min`,
/// `dmem.low` or `dmem.max`. `u64::MAX` writes `max` (no limit).
pub fn set_dmem(group: &Path, file: &str, region: &str, bytes: u64) -> io::Result<()> {
    if !matches!(file, "dmem.min" | "dmem.low" | "dmem.max") {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("{file:?} is not a dmem limit; use dmem.min, dmem.low or dmem.max"),
        ));
    }
    if region.is_empty() || region.contains(char::is_whitespace) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("{region:?} is not a dmem region; see dmem.capacity in the cgroup2 root"),
        ));
    }
    let value = if bytes == u64::MAX {
        "max".to_owned()
    } else {
        bytes.to_string()
    };
    write_control(&group.join(file), &format!("{region} {value}"))
}

/// What [`release_all`] did.
#[derive(Debug, Default)]
pub struct ReleaseReport {
    /// Groups that were frozen and got thawed.
    pub thawed: usize,
    /// Groups whose core set became every online CPU.
    pub widened: usize,
    /// What could not be done, each naming its file; the rest was done.
    pub errors: Vec<io::Error>,
}

/// The fail-safe for stop and for `corral recover` after a crash: thaws
/// every frozen group at or below `root`, then gives every group directly
/// under it (the class groups, the only ones whose core sets corral
/// writes) all of `online`. Moves nothing and goes on past every failure.
/// A missing `root` is an empty report. Thawing is one walk
/// ([`thaw_all_under`]): if it fails, `thawed` is 0 and the first error is
/// in `errors` (every one is logged).
pub fn release_all(root: &Path, online: &CpuList) -> ReleaseReport {
    let mut report = ReleaseReport::default();
    match thaw_all_under(root) {
        Ok(n) => report.thawed = n,
        Err(e) => report.errors.push(e),
    }
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return report,
        Err(e) => {
            report.errors.push(with_path(e, "listing", root));
            return report;
        }
    };
    let cpus = online.to_string();
    for entry in entries.flatten() {
        let file = entry.path().join("cpuset.cpus");
        if !entry.file_type().is_ok_and(|t| t.is_dir()) || !file.exists() {
            continue;
        }
        match write_control(&file, &cpus) {
            Ok(()) => report.widened += 1,
            // The group went away meanwhile: nothing left to widen.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                // The error names the file.
                warn!("could not widen a group: {e}");
                report.errors.push(e);
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_frozen_key() {
        assert_eq!(events_frozen("populated 1\nfrozen 1\n"), Some(true));
        assert_eq!(events_frozen("populated 1\nfrozen 0\n"), Some(false));
        assert_eq!(events_frozen("populated 1\n"), None);
    }

    #[test]
    fn dmem_capacity_lines() {
        let text = "drm/0000:01:00.0/vram0 12884901888\n\ndrm/0000:01:00.0/stolen 0\n";
        assert_eq!(
            parse_dmem_capacity(text).unwrap(),
            [
                ("drm/0000:01:00.0/vram0".to_owned(), 12_884_901_888),
                ("drm/0000:01:00.0/stolen".to_owned(), 0)
            ]
        );
        assert!(parse_dmem_capacity("drm/x\n").is_err());
        assert!(parse_dmem_capacity("drm/x 12 13\n").is_err());
        assert!(parse_dmem_capacity("drm/x lots\n").is_err());
    }

    /// The kill path's guarantee: a handle taken before the pid could
    /// change hands signals that process or nobody, never a newcomer.
    #[test]
    fn a_signal_through_the_handle_of_a_reaped_process_reaches_nobody() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let handle = PidRef::open(child.id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let e = signal(&handle, libc::SIGKILL).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "{e}");
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        signal(&PidRef::open(live.id()).unwrap(), libc::SIGKILL).unwrap();
        assert!(!live.wait().unwrap().success(), "the live one was killed");
    }
}
