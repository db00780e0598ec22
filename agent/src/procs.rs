//! The process table: what corral knows about each live process, seeded
//! from /proc at start-up and kept current by the kernel's event stream.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::classify::Decision;

/// The facts classification looks at. Also the element of an offline
/// classifier chain (`corral classify --procs`), hence the serde defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub exe: String,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    /// cgroup v2 path, e.g. `/user.slice/user-1000.slice/app.slice/...`.
    #[serde(default)]
    pub cgroup: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Environment variables always kept, whatever the policy names: they are
/// what `corral explain` shows about packaging.
pub const ENV_ALWAYS: &[&str] = &[
    "SteamGameId",
    "SteamAppId",
    "STEAM_COMPAT_APP_ID",
    "FLATPAK_ID",
    "container",
    "APPIMAGE",
    "SNAP_NAME",
];

/// One live process.
#[derive(Debug, Clone)]
pub struct Proc {
    pub info: ProcInfo,
    pub ppid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): with
    /// the pid, identifies the process across pid reuse.
    pub start_ticks: u64,
    pub decision: Decision,
    /// The class whose group the agent last moved this process into.
    pub placed_class: Option<String>,
    /// The cgroup the process was in before corral first moved it (or its
    /// ancestor), relative to the cgroup2 mount: where it goes back when
    /// the policy stops managing it.
    pub origin_cgroup: Option<String>,
    /// Put in its class by `corral run --class`: rules do not move it, and
    /// its children keep the class.
    pub pinned: bool,
}

impl Proc {
    /// A process not yet classified or placed.
    pub fn new(info: ProcInfo, ppid: u32, start_ticks: u64) -> Self {
        Proc {
            info,
            ppid,
            start_ticks,
            decision: Decision::default_system(),
            placed_class: None,
            origin_cgroup: None,
            pinned: false,
        }
    }
}

/// Why a process could not be read. Vanished processes are normal (short
/// lives, races with exit) and are not reported as errors.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("process {0} is gone")]
    Gone(u32),
    #[error("process {pid}: {source}")]
    Other { pid: u32, source: procfs::ProcError },
}

/// Reads a process's facts from /proc, keeping the environment variables in
/// `env_keys`. Returns the info, the parent pid and the start time.
pub fn read_proc(pid: u32, env_keys: &BTreeSet<String>) -> Result<(ProcInfo, u32, u64), ReadError> {
    let wrap = |source: procfs::ProcError| match source {
        procfs::ProcError::NotFound(_) => ReadError::Gone(pid),
        source => ReadError::Other { pid, source },
    };
    let process = procfs::process::Process::new(pid as i32).map_err(wrap)?;
    let stat = process.stat().map_err(wrap)?;
    // Kernel threads have no exe and no argv; an unreadable exe of a user
    // process (permissions, a zombie) leaves it empty.
    let exe = process
        .exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let argv = process.cmdline().unwrap_or_default();
    let cwd = process
        .cwd()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cgroup = process
        .cgroups()
        .ok()
        .and_then(|groups| {
            groups
                .0
                .into_iter()
                .find(|g| g.hierarchy == 0)
                .map(|g| g.pathname)
        })
        .unwrap_or_default();
    let env = process
        .environ()
        .map(|vars| {
            vars.into_iter()
                .filter_map(|(k, v)| {
                    let k = k.to_string_lossy().into_owned();
                    (env_keys.contains(&k) || ENV_ALWAYS.contains(&k.as_str()))
                        .then(|| (k, v.to_string_lossy().into_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    let info = ProcInfo {
        pid,
        exe,
        comm: stat.comm.clone(),
        argv,
        cwd,
        cgroup,
        env,
    };
    // A process that is gone by now has left most fields empty: report it
    // gone rather than classify a husk.
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(ReadError::Gone(pid));
    }
    Ok((info, stat.ppid as u32, stat.starttime))
}

/// The real uid of a process, from /proc/PID/status.
pub fn owner(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// All processes, by tgid.
#[derive(Debug, Default)]
pub struct Table {
    procs: HashMap<u32, Proc>,
}

/// How far `ancestors` walks before giving up (guards against loops from
/// stale parent links).
const MAX_DEPTH: usize = 64;

impl Table {
    /// Every process /proc shows now.
    pub fn snapshot(env_keys: &BTreeSet<String>) -> Self {
        let mut table = Table::default();
        let pids: Vec<u32> = procfs::process::all_processes()
            .map(|all| all.filter_map(|p| p.ok()).map(|p| p.pid as u32).collect())
            .unwrap_or_default();
        for pid in pids {
            if let Ok((info, ppid, start_ticks)) = read_proc(pid, env_keys) {
                table.insert(pid, Proc::new(info, ppid, start_ticks));
            }
        }
        table
    }

    /// Tracked pids, parents before their children.
    pub fn parents_first(&self) -> Vec<u32> {
        let mut ordered: Vec<(usize, u32)> = self
            .procs
            .keys()
            .map(|pid| (self.ancestors(*pid).len(), *pid))
            .collect();
        ordered.sort_unstable();
        ordered.into_iter().map(|(_, pid)| pid).collect()
    }

    pub fn get(&self, pid: u32) -> Option<&Proc> {
        self.procs.get(&pid)
    }

    pub fn get_mut(&mut self, pid: u32) -> Option<&mut Proc> {
        self.procs.get_mut(&pid)
    }

    pub fn insert(&mut self, pid: u32, proc: Proc) {
        self.procs.insert(pid, proc);
    }

    pub fn remove(&mut self, pid: u32) -> Option<Proc> {
        self.procs.remove(&pid)
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &Proc)> {
        self.procs.iter()
    }

    /// Pids of the known ancestors of `pid`, outermost first.
    pub fn ancestors(&self, pid: u32) -> Vec<u32> {
        let mut chain = Vec::new();
        let mut current = self.procs.get(&pid).map(|p| p.ppid);
        while let Some(ppid) = current {
            if ppid == 0 || ppid == pid || chain.contains(&ppid) || chain.len() >= MAX_DEPTH {
                break;
            }
            match self.procs.get(&ppid) {
                Some(parent) => {
                    chain.push(ppid);
                    current = Some(parent.ppid);
                }
                None => break,
            }
        }
        chain.reverse();
        chain
    }
}
