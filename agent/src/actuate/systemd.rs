//! The systemd backend: on a systemd host the cgroup tree is systemd's, so
//! corral places processes through the managers (systemd.io
//! CGROUP_DELEGATION) and never writes a cgroup file.
//!
//! - **Where**: a process stays in the manager it belongs to (its user's
//!   manager when its cgroup is under `user@UID.service`, else the system
//!   manager), moved into a new transient scope named like the XDG app scope
//!   it came from (`app-<launcher>-<appid>-corral<pid>.scope`), in the
//!   class's slice `corral-<class>.slice`, whose `AllowedCPUs=` and
//!   `CPUWeight=` are the class's core set and weight. Logout, `systemctl
//!   --user stop` and app tracking keep working.
//! - **Fast path**: at exec the process's threads get the class's CPUs with
//!   `sched_setaffinity` (microseconds); the move into the unit follows on
//!   the worker thread. Once it is in the unit and the unit has the cpuset
//!   controller, corral resets the affinity it set (only threads that still
//!   have exactly that mask, as runc/crun do), so the slice is the only
//!   fence and a widened class reaches it.
//! - **Delegated units** (containers: `Delegate=yes`, `libpod-*`, nested
//!   cgroups): never lifted out; the class goes on the unit as runtime
//!   properties instead.
//! - **Dynamic modes**: the class slices' `AllowedCPUs=`, and for everyone
//!   else `system.slice` and `init.scope` (system) and `session.slice`,
//!   `app.slice` and `background.slice` of each user (never `user.slice`).
//! - **Restore**: every property corral changes on a unit it did not create,
//!   and every affinity-only fence, is written to a restore log in /run
//!   before the change; stop, `corral recover` and the next start put them
//!   back. All changes are runtime ones: nothing survives a reboot.
//!
//! Each user's manager is reached by the root agent itself on that user's
//! session bus (`/run/user/UID/bus`, connected with the user's credentials:
//! see [`ManagerClient::user_bus_as`]), so no per-user agent is needed;
//! without one (no user session) the affinity fence stays, and status and
//! explain say so.
//!
//! Length: the backend and its manager thread belong together (the thread is the backend's only way to act); about 100 lines are tests.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    actuate::{
        Placer, Target,
        cgroup::{Groups, MoveError},
        systemd_bus::{CgroupProps, ManagerClient, Setting, UnitInfo, xdg_scope_name},
    },
    model::{coresets::Resolved, cpus::CpuList, policy::Policy},
    observe::escape::esc,
};

/// Where the restore log lives (tmpfs: gone at reboot, like the runtime
/// properties it undoes).
pub const RESTORE_LOG: &str = "/run/corral/systemd-restore.json";

/// The slice of `class` in every manager.
pub fn class_slice(class: &str) -> String {
    crate::actuate::systemd_bus::class_slice_name(class)
}

/// Which manager a process belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Manager {
    System,
    User(u32),
}

impl Manager {
    /// The manager of a process whose cgroup (relative to the cgroup2
    /// mount) is `cgroup`: `.../user@UID.service/...` is that user's.
    pub fn of_cgroup(cgroup: &str) -> Manager {
        cgroup
            .split('/')
            .find_map(|c| {
                c.strip_prefix("user@")?
                    .strip_suffix(".service")?
                    .parse()
                    .ok()
            })
            .map_or(Manager::System, Manager::User)
    }

    /// The slices everyone else lives in, that dynamic modes narrow.
    fn other_slices(self) -> &'static [&'static str] {
        match self {
            Manager::System => &["system.slice", "init.scope"],
            Manager::User(_) => &["session.slice", "app.slice", "background.slice"],
        }
    }

    fn describe(self) -> String {
        match self {
            Manager::System => "the system manager".to_owned(),
            Manager::User(uid) => format!("user {uid}'s manager"),
        }
    }
}

/// The unit a process's cgroup names, and whether it is a delegated subtree
/// seen from the path alone: a cgroup below a unit (`.../x.scope/payload`)
/// or a container runtime's scope.
pub fn unit_of_cgroup(cgroup: &str) -> Option<(String, bool)> {
    let parts: Vec<&str> = cgroup.split('/').filter(|p| !p.is_empty()).collect();
    let last_unit = parts
        .iter()
        .rposition(|p| p.ends_with(".scope") || p.ends_with(".service"))?;
    let unit = parts[last_unit].to_owned();
    let nested = last_unit + 1 < parts.len();
    let container = ["libpod-", "docker-", "crio-", "containerd-"]
        .iter()
        .any(|p| unit.starts_with(p));
    // user@UID.service is delegated to the user's manager, but that is the
    // manager we place through, not a subtree to keep out of.
    let is_user_manager = unit.starts_with("user@") && !nested;
    Some((unit, (nested || container) && !is_user_manager))
}

/// How a placed process is fenced now, for explain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub manager: Manager,
    /// The unit it is in (or was asked into).
    pub unit: Option<String>,
    pub slice: Option<String>,
    /// What keeps it on its class's CPUs, in words.
    pub fenced_by: String,
    /// When it was in its unit (CLOCK_MONOTONIC ns); None while fenced by
    /// affinity alone.
    #[serde(default)]
    pub joined_ns: Option<u64>,
}

/// What the worker learned, shared with the loop.
#[derive(Debug, Default)]
struct Shared {
    fences: HashMap<u32, Fence>,
    /// cgroup ids of the scopes corral started, by class: a child forked
    /// inside one is already placed.
    class_ids: HashMap<u64, String>,
    /// Managers that could not be reached, and why.
    unreachable: BTreeMap<Manager, String>,
}

/// The restore log: what to put back on stop, crash recovery and restart.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RestoreLog {
    /// Original properties of units corral changed but does not own.
    pub units: Vec<(Manager, String, CgroupProps)>,
    /// Processes fenced by affinity alone: (pid, start ticks).
    pub affinity: Vec<(u32, u64)>,
    /// Managers where corral made class slices.
    pub slices: Vec<(Manager, String)>,
}

impl RestoreLog {
    pub fn read(path: &Path) -> RestoreLog {
        fs::read(path)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default()
    }

    fn write(&self, path: &Path) {
        let result = serde_json::to_vec(self)
            .map_err(io::Error::other)
            .and_then(|raw| {
                let tmp = path.with_extension("tmp");
                fs::write(&tmp, raw)?;
                fs::rename(&tmp, path)
            });
        if let Err(e) = result {
            warn!(
                "could not write the restore log {}: {e}; a crash now would leave runtime properties for `corral recover` to miss",
                path.display()
            );
        }
    }
}

/// Work for the manager thread.
#[derive(Debug)]
enum Job {
    Place {
        pid: u32,
        start_ticks: u64,
        class: String,
        manager: Manager,
        scope: String,
        /// The scope the parent was put in, for a child forked between the
        /// parent's exec and its move.
        join: Option<String>,
        cpus: Vec<u32>,
    },
    Class {
        class: String,
        props: CgroupProps,
    },
    Others {
        cpus: Option<Vec<u32>>,
    },
    Unit {
        manager: Manager,
        unit: String,
        action: UnitAction,
    },
    Release(std_mpsc::Sender<()>),
}

#[derive(Debug, Clone, Copy)]
enum UnitAction {
    Freeze,
    Thaw,
    Kill,
}

/// The systemd placement backend.
pub struct SystemdPlacer {
    layout: Groups,
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    shared: Arc<Mutex<Shared>>,
    /// Scopes asked for, by pid: a child joins its parent's.
    scopes: HashMap<u32, (Manager, String)>,
    /// Managers that have processes of a class (for freeze and kill).
    used: HashSet<Manager>,
}

impl SystemdPlacer {
    /// Starts the manager thread; restores what a crashed run left first.
    pub fn start(
        policy: &Policy,
        resolved: &[Resolved],
        online: CpuList,
        restore_log: PathBuf,
    ) -> anyhow::Result<Self> {
        let layout = planned(policy, resolved, online.clone());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (jobs, rx) = tokio::sync::mpsc::unbounded_channel();
        let worker = Worker {
            shared: shared.clone(),
            online: online.iter().collect(),
            clients: HashMap::new(),
            restore_path: restore_log,
            restore: RestoreLog::default(),
            class_props: BTreeMap::new(),
            others: None,
        };
        std::thread::Builder::new()
            .name("corral-systemd".into())
            .spawn(move || worker.run(rx))?;
        let mut placer = SystemdPlacer {
            layout,
            jobs,
            shared,
            scopes: HashMap::new(),
            used: HashSet::from([Manager::System]),
        };
        placer.send_class_props();
        Ok(placer)
    }

    fn send(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            warn!("the systemd manager thread is gone; placement is affinity-only");
        }
    }

    fn send_class_props(&mut self) {
        for g in self.layout.iter() {
            let props = CgroupProps {
                allowed_cpus: Setting::Set(g.cpus.iter().collect()),
                cpu_weight: Setting::Set(u64::from(g.cpu_weight)),
            };
            self.send(Job::Class {
                class: g.class.clone(),
                props,
            });
        }
    }

    /// How `pid` is fenced, for explain.
    pub fn fence_of(&self, pid: u32) -> Option<Fence> {
        self.shared.lock().ok()?.fences.get(&pid).cloned()
    }
}

/// The class layout: core sets and weights, each class living in its slice.
fn planned(policy: &Policy, resolved: &[Resolved], online: CpuList) -> Groups {
    let mut layout = Groups::planned(Path::new("/"), policy, resolved, online, |_| 0);
    layout.relabel(|class| PathBuf::from(class_slice(class)));
    // Planned means "writes no cgroup file", not a dry run: the managers
    // carry it out.
    layout.dry_run = false;
    layout
}

/// Sets the CPU affinity of every thread of `pid`; returns how many.
pub fn set_affinity(pid: u32, cpus: &[u32]) -> io::Result<usize> {
    let done = threads(pid)?
        .into_iter()
        .filter(|tid| set_affinity_one(*tid, cpus).is_ok())
        .count();
    if done == 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(done)
}

/// The affinity of thread `tid`.
fn affinity(tid: u32) -> Option<Vec<u32>> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid, writable cpu_set_t of the size given.
    let rc = unsafe {
        libc::sched_getaffinity(tid as i32, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
    };
    (rc == 0).then(|| {
        (0..libc::CPU_SETSIZE as u32)
            // SAFETY: reading bits of an initialised set.
            .filter(|c| unsafe { libc::CPU_ISSET(*c as usize, &set) })
            .collect()
    })
}

fn threads(pid: u32) -> io::Result<Vec<u32>> {
    Ok(fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

impl Placer for SystemdPlacer {
    fn backend(&self) -> &'static str {
        "systemd"
    }

    fn layout(&self) -> &Groups {
        &self.layout
    }

    fn layout_mut(&mut self) -> &mut Groups {
        &mut self.layout
    }

    fn reconfigure(&mut self, policy: &Policy, resolved: &[Resolved]) -> anyhow::Result<()> {
        self.layout = planned(policy, resolved, self.layout.online.clone());
        self.send_class_props();
        Ok(())
    }

    fn cpus_changed(&mut self, class: &str, cpus: &CpuList) {
        self.send(Job::Class {
            class: class.to_owned(),
            props: CgroupProps {
                allowed_cpus: Setting::Set(cpus.iter().collect()),
                cpu_weight: Setting::Keep,
            },
        });
    }

    fn set_others(&mut self, cpus: Option<CpuList>) {
        self.send(Job::Others {
            cpus: cpus.map(|c| c.iter().collect()),
        });
    }

    fn place(&mut self, class: &str, target: Target<'_>) -> Result<(), MoveError> {
        let group = self
            .layout
            .group(class)
            .ok_or_else(|| MoveError::Unmanaged(class.to_owned()))?;
        let cpus: Vec<u32> = group.cpus.iter().collect();
        // The fast fence, before anything asks a manager. It can fail for a
        // live process: while a game runs, app.slice may not have the game's
        // CPUs, so a game launched from it cannot be given them until it is
        // in its slice. Then the unit alone fences it, a moment later.
        if let Err(e) = set_affinity(target.pid, &cpus) {
            if !Path::new(&format!("/proc/{}", target.pid)).exists() {
                return Err(MoveError::Gone(target.pid));
            }
            debug!(
                pid = target.pid,
                "affinity fence refused ({e}); the unit fences it"
            );
        }
        let manager = Manager::of_cgroup(target.cgroup);
        self.used.insert(manager);
        let current = unit_of_cgroup(target.cgroup).map(|(u, _)| u);
        let join = target
            .parent
            .and_then(|ppid| self.scopes.get(&ppid))
            .filter(|(m, _)| *m == manager)
            .map(|(_, scope)| scope.clone());
        let scope = join
            .clone()
            .unwrap_or_else(|| xdg_scope_name(current.as_deref(), target.comm, target.pid));
        self.scopes.insert(target.pid, (manager, scope.clone()));
        self.send(Job::Place {
            pid: target.pid,
            start_ticks: target.start_ticks,
            class: class.to_owned(),
            manager,
            scope,
            join,
            cpus,
        });
        Ok(())
    }

    fn unplace(&mut self, origin: &str, pid: u32) -> Result<(), MoveError> {
        // The scope it came from may be gone; a fresh app scope in app.slice
        // (or the system's default) is the honest way back.
        let manager = Manager::of_cgroup(origin);
        self.scopes.remove(&pid);
        let _ = set_affinity(pid, &self.layout.online.iter().collect::<Vec<_>>());
        let (scope, _) = unit_of_cgroup(origin).unwrap_or_default();
        self.send(Job::Unit {
            manager,
            unit: scope,
            action: UnitAction::Thaw,
        });
        debug!(pid, origin, "released to its manager");
        Ok(())
    }

    fn holds_cgroup_id(&self, class: &str, cgroup_id: u64) -> bool {
        self.shared
            .lock()
            .is_ok_and(|s| s.class_ids.get(&cgroup_id).is_some_and(|c| c == class))
    }

    fn holds_cgroup(&self, class: &str, cgroup: &str) -> bool {
        cgroup.contains(&format!("/{}/", class_slice(class)))
    }

    fn forget(&mut self, pid: u32) {
        self.scopes.remove(&pid);
        if let Ok(mut s) = self.shared.lock() {
            s.fences.remove(&pid);
        }
    }

    fn set_frozen(&mut self, class: &str, frozen: bool) -> io::Result<()> {
        for manager in self.used.clone() {
            self.send(Job::Unit {
                manager,
                unit: class_slice(class),
                action: if frozen {
                    UnitAction::Freeze
                } else {
                    UnitAction::Thaw
                },
            });
        }
        Ok(())
    }

    fn kill(&mut self, class: &str) -> io::Result<usize> {
        for manager in self.used.clone() {
            self.send(Job::Unit {
                manager,
                unit: class_slice(class),
                action: UnitAction::Kill,
            });
        }
        Ok(0)
    }

    fn release_all(&mut self) {
        let (tx, rx) = std_mpsc::channel();
        self.send(Job::Release(tx));
        if rx.recv_timeout(Duration::from_secs(4)).is_err() {
            warn!("restoring unit properties did not finish in 4 s; `corral recover` finishes it");
        }
    }

    fn joined_ns(&self, pid: u32) -> Option<u64> {
        self.fence_of(pid)?.joined_ns
    }

    fn describe(&self, pid: u32) -> Option<String> {
        let fence = self.fence_of(pid)?;
        Some(format!(
            "{} in {} ({}); fenced by {}",
            fence.unit.as_deref().unwrap_or("(no unit)"),
            fence.slice.as_deref().unwrap_or("(no slice)"),
            fence.manager.describe(),
            fence.fenced_by
        ))
    }

    fn notes(&self) -> Vec<String> {
        self.shared
            .lock()
            .map(|s| {
                s.unreachable
                    .iter()
                    .map(|(m, why)| {
                        format!("{} unreachable ({why}): affinity fence only", m.describe())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The manager thread: owns the D-Bus connections and the restore log.
struct Worker {
    shared: Arc<Mutex<Shared>>,
    online: Vec<u32>,
    clients: HashMap<Manager, ManagerClient>,
    restore_path: PathBuf,
    restore: RestoreLog,
    /// The class slices' properties now, to apply on managers met later.
    class_props: BTreeMap<String, CgroupProps>,
    others: Option<Vec<u32>>,
}

impl Worker {
    fn run(mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Job>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                warn!("systemd manager thread: no runtime ({e}); placement is affinity-only");
                return;
            }
        };
        runtime.block_on(async move {
            // What a crashed run left behind goes back first.
            let leftover = RestoreLog::read(&self.restore_path);
            restore(&leftover, &self.online).await;
            self.restore = RestoreLog::default();
            self.restore.write(&self.restore_path);
            // The system manager always: system.slice and init.scope follow
            // the dynamic mode even when no system process is placed.
            let _ = self.client(Manager::System).await;
            while let Some(job) = rx.recv().await {
                self.handle(job).await;
            }
        });
    }

    async fn client(&mut self, manager: Manager) -> Option<ManagerClient> {
        if let Some(c) = self.clients.get(&manager) {
            return Some(c.clone());
        }
        let connected = match manager {
            Manager::System => ManagerClient::system().await,
            Manager::User(uid) => ManagerClient::user_bus_as(uid).await,
        };
        match connected {
            Ok(client) => {
                info!("connected to {}", manager.describe());
                if let Ok(mut s) = self.shared.lock() {
                    s.unreachable.remove(&manager);
                }
                self.clients.insert(manager, client.clone());
                // A manager met for the first time gets the class slices and,
                // in protected mode, the narrowed other slices.
                for (class, props) in self.class_props.clone() {
                    self.ensure_class_slice(&client, manager, &class, &props)
                        .await;
                }
                if let Some(cpus) = self.others.clone() {
                    self.narrow_others(&client, manager, &cpus).await;
                }
                Some(client)
            }
            Err(e) => {
                let why = e.to_string();
                let mut s = self.shared.lock().ok()?;
                if s.unreachable.get(&manager) != Some(&why) {
                    warn!(
                        "{} unreachable: {why}; its processes keep the affinity fence",
                        manager.describe()
                    );
                }
                s.unreachable.insert(manager, why);
                None
            }
        }
    }

    async fn ensure_class_slice(
        &mut self,
        client: &ManagerClient,
        manager: Manager,
        class: &str,
        props: &CgroupProps,
    ) {
        let slice = class_slice(class);
        match client.ensure_slice(&slice, props).await {
            Ok(()) => {
                if !self.restore.slices.contains(&(manager, slice.clone())) {
                    self.restore.slices.push((manager, slice));
                    self.restore.write(&self.restore_path);
                }
            }
            Err(e) if e.dbus_name().is_none() => {
                // A manager that went away (logout): forget the connection;
                // the next placement for it reconnects and re-creates the
                // slices.
                debug!("{}: {e}; dropping the connection", manager.describe());
                self.clients.remove(&manager);
            }
            Err(e) => warn!("{}: class slice {slice}: {e}", manager.describe()),
        }
    }

    /// Remembers `unit`'s properties before the first change.
    async fn remember(&mut self, client: &ManagerClient, manager: Manager, unit: &str) {
        if self
            .restore
            .units
            .iter()
            .any(|(m, u, _)| *m == manager && u == unit)
        {
            return;
        }
        match client.get_cgroup_props(unit).await {
            Ok(original) => {
                self.restore
                    .units
                    .push((manager, unit.to_owned(), original));
                self.restore.write(&self.restore_path);
            }
            Err(e) => debug!(
                "{}: properties not read ({}); it will be reset on restore",
                esc(unit),
                esc(&e)
            ),
        }
    }

    async fn narrow_others(&mut self, client: &ManagerClient, manager: Manager, cpus: &[u32]) {
        for unit in manager.other_slices() {
            self.remember(client, manager, unit).await;
            let props = CgroupProps {
                allowed_cpus: Setting::Set(cpus.to_vec()),
                cpu_weight: Setting::Keep,
            };
            if let Err(e) = client.set_properties(unit, &props, true).await {
                debug!("{}: {unit}: {e}", manager.describe());
            }
        }
    }

    fn fence(&self, pid: u32, fence: Fence) {
        if let Ok(mut s) = self.shared.lock() {
            s.fences.insert(pid, fence);
        }
    }

    async fn handle(&mut self, job: Job) {
        match job {
            Job::Place {
                pid,
                start_ticks,
                class,
                manager,
                scope,
                join,
                cpus,
            } => {
                self.place(pid, start_ticks, &class, manager, &scope, join, &cpus)
                    .await
            }
            Job::Class { class, props } => {
                let merged = merge(self.class_props.get(&class), &props);
                self.class_props.insert(class.clone(), merged.clone());
                for (manager, client) in self.clients.clone() {
                    self.ensure_class_slice(&client, manager, &class, &merged)
                        .await;
                }
                // Affinity-fenced processes of the class follow by hand.
                if let Setting::Set(cpus) = &props.allowed_cpus {
                    let fenced: Vec<u32> = self
                        .shared
                        .lock()
                        .map(|s| {
                            s.fences
                                .iter()
                                .filter(|(_, f)| f.fenced_by.starts_with("affinity"))
                                .filter(|(_, f)| f.slice.as_deref() == Some(&class_slice(&class)))
                                .map(|(pid, _)| *pid)
                                .collect()
                        })
                        .unwrap_or_default();
                    for pid in fenced {
                        let _ = set_affinity(pid, cpus);
                    }
                }
            }
            Job::Others { cpus } => {
                self.others = cpus.clone();
                for (manager, client) in self.clients.clone() {
                    match &cpus {
                        Some(cpus) => self.narrow_others(&client, manager, cpus).await,
                        None => self.restore_others(&client, manager).await,
                    }
                }
            }
            Job::Unit {
                manager,
                unit,
                action,
            } => {
                let Some(client) = self.client(manager).await else {
                    return;
                };
                let result = match action {
                    UnitAction::Freeze => client.freeze_unit(&unit).await,
                    UnitAction::Thaw => client.thaw_unit(&unit).await,
                    UnitAction::Kill => client.kill_unit(&unit, libc::SIGKILL).await,
                };
                if let Err(e) = result {
                    debug!(
                        "{}: {action:?} {}: {}",
                        manager.describe(),
                        esc(&unit),
                        esc(&e)
                    );
                }
            }
            Job::Release(done) => {
                let log = self.restore.clone();
                restore(&log, &self.online).await;
                self.restore = RestoreLog::default();
                self.restore.write(&self.restore_path);
                let _ = done.send(());
            }
        }
    }

    async fn restore_others(&mut self, client: &ManagerClient, manager: Manager) {
        let mut keep = Vec::new();
        for (m, unit, original) in std::mem::take(&mut self.restore.units) {
            if m == manager && manager.other_slices().contains(&unit.as_str()) {
                if let Err(e) = client.set_properties(&unit, &original, true).await {
                    debug!("{}: restoring {unit}: {e}", manager.describe());
                }
            } else {
                keep.push((m, unit, original));
            }
        }
        self.restore.units = keep;
        self.restore.write(&self.restore_path);
    }

    #[allow(clippy::too_many_arguments, reason = "one job's fields, unpacked once")]
    async fn place(
        &mut self,
        pid: u32,
        start_ticks: u64,
        class: &str,
        manager: Manager,
        scope: &str,
        join: Option<String>,
        cpus: &[u32],
    ) {
        let slice = class_slice(class);
        let affinity_only = |why: String| Fence {
            manager,
            unit: None,
            slice: Some(slice.clone()),
            fenced_by: format!("affinity ({why})"),
            joined_ns: None,
        };
        let Some(client) = self.client(manager).await else {
            let why = format!("{} is not reachable", manager.describe());
            self.fence(pid, affinity_only(why));
            self.restore.affinity.push((pid, start_ticks));
            self.restore.write(&self.restore_path);
            return;
        };
        let (client, info) = match client.unit_of_pid(pid).await {
            Ok(info) => (client, info),
            // A manager that restarted (logout and login, daemon-reexec)
            // left a dead connection: reconnect once.
            Err(e) if e.dbus_name().is_none() => {
                debug!("{}: {e}; reconnecting", manager.describe());
                self.clients.remove(&manager);
                let Some(client) = self.client(manager).await else {
                    return;
                };
                match client.unit_of_pid(pid).await {
                    Ok(info) => (client, info),
                    Err(e) => {
                        debug!(pid, "unit not found ({}); gone?", esc(&e));
                        return;
                    }
                }
            }
            Err(e) => {
                debug!(pid, "unit not found ({}); gone?", esc(&e));
                return;
            }
        };
        let delegated =
            info.delegate || unit_of_cgroup(&info.control_group).is_some_and(|(_, d)| d);
        let unit = if delegated {
            // A container's (or any delegated) unit keeps its processes: the
            // class goes on the unit instead.
            self.remember(&client, manager, &info.unit).await;
            let props = self.class_props.get(class).cloned().unwrap_or_default();
            if let Err(e) = client.set_properties(&info.unit, &props, true).await {
                warn!(
                    "{}: class {class} on delegated {}: {}",
                    manager.describe(),
                    esc(&info.unit),
                    esc(&e)
                );
            }
            info.unit.clone()
        } else if info.slice == slice {
            // Already there (re-adopted after a restart).
            info.unit.clone()
        } else {
            let joined = match &join {
                Some(parent_scope) => client
                    .attach_processes(parent_scope, "", &[pid])
                    .await
                    .map(|()| parent_scope.clone())
                    .map_err(|e| {
                        debug!(
                            pid,
                            "joining {}: {}; a scope of its own",
                            esc(parent_scope),
                            esc(&e)
                        )
                    })
                    .ok(),
                None => None,
            };
            match joined {
                Some(unit) => unit,
                None => {
                    let name = if join.is_some() {
                        xdg_scope_name(Some(&info.unit), "child", pid)
                    } else {
                        scope.to_owned()
                    };
                    // Children forked before the move are still beside it
                    // in the old unit: they go into the new scope with it
                    // (systemd's AttachProcessesToUnit takes only delegated
                    // units). If one exits meanwhile systemd refuses the
                    // whole list: then the process alone.
                    let mut pids = vec![pid];
                    pids.extend(descendants_in(pid, &info.control_group));
                    let mut started = client
                        .start_scope(&name, &slice, &pids, &CgroupProps::default())
                        .await;
                    if started.is_err() && pids.len() > 1 {
                        started = client
                            .start_scope(&name, &slice, &[pid], &CgroupProps::default())
                            .await;
                    }
                    match started {
                        Ok(unit) => unit,
                        Err(e) => {
                            if crate::model::procs::start_ticks(pid).is_some() {
                                warn!(
                                    pid,
                                    "{}: starting {}: {}; affinity fence only",
                                    manager.describe(),
                                    esc(&name),
                                    esc(&e)
                                );
                                self.fence(
                                    pid,
                                    affinity_only(format!("starting {name} failed: {e}")),
                                );
                                self.restore.affinity.push((pid, start_ticks));
                                self.restore.write(&self.restore_path);
                            }
                            return;
                        }
                    }
                }
            }
        };
        self.after_join(pid, start_ticks, manager, &unit, &info, delegated, cpus)
            .await;
    }

    /// The process is in its unit: record the unit's cgroup id and, where
    /// the unit has the cpuset controller, hand the fence to it.
    #[allow(clippy::too_many_arguments, reason = "the join's facts, once")]
    async fn after_join(
        &mut self,
        pid: u32,
        start_ticks: u64,
        manager: Manager,
        unit: &str,
        before: &UnitInfo,
        delegated: bool,
        cpus: &[u32],
    ) {
        let joined_ns = crate::service::daemon::monotonic_ns();
        if start_ticks != 0 && crate::model::procs::start_ticks(pid) != Some(start_ticks) {
            return; // exited, and maybe a new process has the pid: hands off
        }
        let cgroup = crate::model::procs::cgroup_of(pid).unwrap_or_default();
        let Some(mount) = crate::actuate::cgroup::cgroup2_mount() else {
            return;
        };
        let dir = mount.join(cgroup.trim_start_matches('/'));
        let class = self
            .class_props
            .keys()
            .find(|c| cgroup.contains(&format!("/{}/", class_slice(c))))
            .cloned();
        if let (Ok(meta), Some(class)) = (fs::metadata(&dir), class)
            && let Ok(mut s) = self.shared.lock()
        {
            s.class_ids.insert(meta.ino(), class);
        }
        let slice = if delegated {
            before.slice.clone()
        } else {
            cgroup
                .split('/')
                .rev()
                .find(|p| p.ends_with(".slice"))
                .unwrap_or_default()
                .to_owned()
        };
        let has_cpuset = dir.join("cpuset.cpus.effective").exists();
        let fenced_by = if has_cpuset {
            let reset = reset_affinity(&dir, cpus, &self.online);
            debug!(pid, unit = %esc(unit), reset, "affinity handed to the unit");
            format!(
                "{}'s AllowedCPUs= (cpuset)",
                if delegated { unit } else { &slice }
            )
        } else {
            self.restore.affinity.push((pid, start_ticks));
            self.restore.write(&self.restore_path);
            let hint = match manager {
                Manager::User(uid) => format!(
                    "user@{uid}.service has no cpuset controller: the package's Delegate= drop-in takes effect at the user's next login"
                ),
                Manager::System => "the cgroup has no cpuset controller".to_owned(),
            };
            format!("affinity ({hint})")
        };
        self.fence(
            pid,
            Fence {
                manager,
                unit: Some(unit.to_owned()),
                slice: Some(slice),
                fenced_by,
                joined_ns: Some(joined_ns),
            },
        );
    }
}

/// Descendants of `pid` still in the cgroup `control_group` (relative to the
/// manager's root, as systemd's ControlGroup property says; compared by
/// suffix with /proc/PID/cgroup).
fn descendants_in(pid: u32, control_group: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if found.len() >= 1024 || found.contains(&child) {
                    continue;
                }
                if crate::model::procs::cgroup_of(child).is_some_and(|c| c.ends_with(control_group))
                {
                    found.push(child);
                    queue.push(child);
                }
            }
        }
    }
    found
}

/// Resets to all online CPUs the threads in cgroup `dir` whose affinity is
/// still exactly the fence corral set (`fence`): a mask the program set
/// itself is left alone. Returns how many were reset.
fn reset_affinity(dir: &Path, fence: &[u32], online: &[u32]) -> usize {
    let Ok(text) = fs::read_to_string(dir.join("cgroup.threads")) else {
        return 0;
    };
    let mut fence = fence.to_vec();
    fence.sort_unstable();
    let mut reset = 0;
    for tid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        if affinity(tid).is_some_and(|a| a == fence) && set_affinity_one(tid, online).is_ok() {
            reset += 1;
        }
    }
    reset
}

fn set_affinity_one(tid: u32, cpus: &[u32]) -> io::Result<()> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        if (*cpu as usize) < libc::CPU_SETSIZE as usize {
            // SAFETY: CPU_SET within the set's size.
            unsafe { libc::CPU_SET(*cpu as usize, &mut set) };
        }
    }
    // SAFETY: a valid cpu_set_t of the size given.
    let rc = unsafe {
        libc::sched_setaffinity(tid as i32, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A later change on top of the class slice's properties so far.
fn merge(old: Option<&CgroupProps>, new: &CgroupProps) -> CgroupProps {
    let mut merged = old.cloned().unwrap_or_default();
    if !new.allowed_cpus.is_keep() {
        merged.allowed_cpus = new.allowed_cpus.clone();
    }
    if !new.cpu_weight.is_keep() {
        merged.cpu_weight = new.cpu_weight.clone();
    }
    merged
}

/// Puts back everything in `log`: original unit properties, class slices
/// widened to every online CPU, affinity-only fences lifted. Used on stop,
/// at start after a crash, and by `corral recover`. Returns what it did.
pub async fn restore(log: &RestoreLog, online: &[u32]) -> Vec<String> {
    let mut done = Vec::new();
    let mut clients: HashMap<Manager, ManagerClient> = HashMap::new();
    let mut managers: Vec<Manager> = log
        .units
        .iter()
        .map(|(m, _, _)| *m)
        .chain(log.slices.iter().map(|(m, _)| *m))
        .collect();
    managers.sort();
    managers.dedup();
    for m in managers {
        let client = match m {
            Manager::System => ManagerClient::system().await,
            Manager::User(uid) => ManagerClient::user_bus_as(uid).await,
        };
        match client {
            Ok(c) => {
                clients.insert(m, c);
            }
            // A user who logged out took the properties with their manager.
            Err(e) => debug!("{}: {e}", m.describe()),
        }
    }
    for (m, unit, original) in &log.units {
        if let Some(c) = clients.get(m) {
            match c.set_properties(unit, original, true).await {
                Ok(()) => done.push(format!("{}: {} restored", m.describe(), esc(unit))),
                Err(e) => debug!("{}: restoring {}: {}", m.describe(), esc(unit), esc(&e)),
            }
        }
    }
    let widen = CgroupProps {
        allowed_cpus: Setting::Unset,
        cpu_weight: Setting::Keep,
    };
    for (m, slice) in &log.slices {
        if let Some(c) = clients.get(m) {
            let _ = c.thaw_unit(slice).await;
            match c.set_properties(slice, &widen, true).await {
                Ok(()) => done.push(format!("{}: {slice} widened", m.describe())),
                Err(e) => debug!("{}: widening {slice}: {e}", m.describe()),
            }
        }
    }
    for (pid, ticks) in &log.affinity {
        if crate::model::procs::start_ticks(*pid) == Some(*ticks)
            && set_affinity(*pid, online).is_ok()
        {
            done.push(format!("process {pid}: affinity widened"));
        }
    }
    done
}

/// Whether this host runs systemd as its service manager (sd_booted).
pub fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manager_comes_from_the_user_at_service_in_the_path() {
        assert_eq!(
            Manager::of_cgroup(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-steam-1234.scope"
            ),
            Manager::User(1000)
        );
        assert_eq!(
            Manager::of_cgroup("/system.slice/sshd.service"),
            Manager::System
        );
        assert_eq!(
            Manager::of_cgroup("/user.slice/user-1000.slice/session-2.scope"),
            Manager::System
        );
    }

    #[test]
    fn nested_cgroups_and_container_scopes_are_delegated() {
        let app = "/user.slice/user-1000.slice/user@1000.service/app.slice/app-steam-1234.scope";
        assert_eq!(
            unit_of_cgroup(app),
            Some(("app-steam-1234.scope".to_owned(), false))
        );
        let pod =
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-abc.scope/container";
        assert_eq!(
            unit_of_cgroup(pod),
            Some(("libpod-abc.scope".to_owned(), true))
        );
        let docker = "/system.slice/docker-0123.scope";
        assert_eq!(
            unit_of_cgroup(docker),
            Some(("docker-0123.scope".to_owned(), true))
        );
        let manager = "/user.slice/user-1000.slice/user@1000.service";
        assert_eq!(
            unit_of_cgroup(manager),
            Some(("user@1000.service".to_owned(), false))
        );
        assert_eq!(unit_of_cgroup("/"), None);
    }

    #[test]
    fn later_class_changes_keep_earlier_properties() {
        let first = CgroupProps {
            allowed_cpus: Setting::Set(vec![0, 1]),
            cpu_weight: Setting::Set(1000),
        };
        let narrowed = CgroupProps {
            allowed_cpus: Setting::Set(vec![1]),
            cpu_weight: Setting::Keep,
        };
        let merged = merge(Some(&first), &narrowed);
        assert_eq!(merged.allowed_cpus, Setting::Set(vec![1]));
        assert_eq!(merged.cpu_weight, Setting::Set(1000));
    }

    #[test]
    fn the_restore_log_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("corral-restore-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.json");
        let log = RestoreLog {
            units: vec![(
                Manager::User(1000),
                "app.slice".to_owned(),
                CgroupProps {
                    allowed_cpus: Setting::Unset,
                    cpu_weight: Setting::Set(100),
                },
            )],
            affinity: vec![(42, 4242)],
            slices: vec![(Manager::System, "corral-game.slice".to_owned())],
        };
        log.write(&path);
        assert_eq!(RestoreLog::read(&path), log);
        assert_eq!(
            RestoreLog::read(&dir.join("missing.json")),
            RestoreLog::default()
        );
    }

    #[test]
    fn children_still_beside_a_process_go_with_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let cgroup = fs::read_to_string(format!("/proc/{me}/cgroup")).unwrap();
        let mine = cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_owned();
        let found = descendants_in(me, &mine);
        let elsewhere = descendants_in(me, "/no/such/unit.scope");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found.contains(&child.id()), "{found:?}");
        assert!(!elsewhere.contains(&child.id()));
    }

    #[test]
    fn affinity_fences_this_process_and_reads_back() {
        let me = std::process::id();
        let before = affinity(me).unwrap();
        let first = before[0];
        set_affinity(me, &[first]).unwrap();
        assert_eq!(affinity(me).unwrap(), vec![first]);
        set_affinity(me, &before).unwrap();
        assert_eq!(affinity(me).unwrap(), before);
    }
}
