//! The process table: what corral knows about each live process, seeded
//! from /proc at start-up and kept current by the kernel's event stream.
//!
//! Length: the table and the /proc reader it is filled from (live and
//! scripted) belong together; the last 90 lines are tests.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::model::classify::Decision;

/// The facts classification looks at. Also the element of an offline
/// classifier chain (`corral classify --procs`), hence the serde defaults.
///
/// The strings are as the process set them, control bytes included: views
/// and log lines show them through `observe::escape`. Bytes that are not
/// UTF-8 were replaced by U+FFFD when read ([`read_proc`]): rules match
/// text, `--json` stays valid, and the views show the replacement
/// character (printable, so harmless) where the byte was.
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

/// Which of a process's optional facts a read fetched. The pid, comm,
/// parent, start time and cgroup are always known (from the kernel's
/// record where it carries them); the exe, argv, cwd and the environment
/// are read only when a rule that can still match this process or the
/// ananicy rules look at them (the exec path reads no more than the policy
/// can use). An ancestor matcher's facts are read from the ancestor when a
/// descendant's rule gets that far ([`Facts::lacking`]). Fields not read
/// are empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub exe: bool,
    pub argv: bool,
    pub cwd: bool,
    pub env: bool,
}

impl Facts {
    pub const ALL: Facts = Facts {
        exe: true,
        argv: true,
        cwd: true,
        env: true,
    };
    pub const NONE: Facts = Facts {
        exe: false,
        argv: false,
        cwd: false,
        env: false,
    };

    pub fn union(self, other: Facts) -> Facts {
        Facts {
            exe: self.exe || other.exe,
            argv: self.argv || other.argv,
            cwd: self.cwd || other.cwd,
            env: self.env || other.env,
        }
    }

    pub fn is_all(self) -> bool {
        self == Facts::ALL
    }

    /// Whether some fact `wanted` holds is one `self` does not.
    pub fn lacking(self, wanted: Facts) -> bool {
        self.union(wanted) != self
    }

    /// Empties the fields `self` does not hold.
    pub fn blank(self, info: &mut ProcInfo) {
        if !self.exe {
            info.exe.clear();
        }
        if !self.argv {
            info.argv.clear();
        }
        if !self.cwd {
            info.cwd.clear();
        }
        if !self.env {
            info.env.clear();
        }
    }
}

/// One live process.
#[derive(Debug, Clone)]
pub struct Proc {
    pub info: ProcInfo,
    /// Which optional facts `info` holds ([`Facts::ALL`] unless read on
    /// the exec path).
    pub facts: Facts,
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
            facts: Facts::ALL,
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

/// One read of a process from /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcRead {
    pub info: ProcInfo,
    pub ppid: u32,
    /// Start time in clock ticks since boot.
    pub start_ticks: u64,
}

impl ProcRead {
    /// A table entry, not yet classified or placed.
    pub fn into_proc(self) -> Proc {
        Proc::new(self.info, self.ppid, self.start_ticks)
    }
}

/// Where the loop reads processes from: /proc ([`LiveProcs`]) or, in the
/// loop's unit tests, a scripted set ([`ScriptedProcs`]).
pub trait ProcSource {
    /// Reads `pid`: the facts always known (pid, comm, parent, start time,
    /// cgroup), then the optional ones `ask` wants given those (the exe
    /// first, then the others given the exe). Returns what it read and
    /// which optional facts it holds.
    fn read_wanted(&self, pid: u32, ask: &Ask<'_>) -> Result<(ProcRead, Facts), ReadError>;
    /// Every live pid (thread group ids).
    fn pids(&self) -> Vec<u32>;
    /// The real uid of a process.
    fn owner(&self, pid: u32) -> Option<u32>;
    /// Reads every fact of `pid`.
    fn read(&self, pid: u32, env_keys: &BTreeSet<String>) -> Result<ProcRead, ReadError> {
        self.read_wanted(pid, &Ask::everything(env_keys))
            .map(|(read, _)| read)
    }
    /// Its start time, for pid-reuse checks (a full read by default).
    fn start_ticks(&self, pid: u32) -> Option<u64> {
        self.read(pid, &BTreeSet::new()).ok().map(|r| r.start_ticks)
    }
}

/// What one read of a process asks for beyond the facts always read.
pub struct Ask<'a> {
    /// The environment variables to keep.
    pub env_keys: &'a BTreeSet<String>,
    /// The optional facts wanted, given what the process's facts are so
    /// far and which optional ones among them were read: asked first with
    /// none read, and again once the exe is read if it was wanted.
    pub wanted: &'a dyn Fn(&ProcInfo, Facts) -> Facts,
    /// The cgroup the kernel's record put the process in, if it came with
    /// one: a cgroup already seen need not be read from /proc again.
    pub cgroup_id: Option<u64>,
    /// What /proc/PID/stat would say, when the kernel's record and the
    /// table know it all already: then stat is not read.
    pub stat: Option<StatFacts>,
}

/// The facts read from /proc/PID/stat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFacts {
    pub comm: String,
    pub ppid: u32,
    /// Clock ticks since boot.
    pub start_ticks: u64,
}

/// /proc/PID/stat's start time (clock ticks, USER_HZ 100) of a start time
/// in ns since boot (task_struct.start_boottime), as the kernel converts it.
pub fn start_ticks_of_boottime_ns(ns: u64) -> u64 {
    ns / 10_000_000
}

/// A comm as the kernel's records carry it (NUL-padded bytes), as
/// /proc/PID/stat would give it.
pub fn comm_of_record(comm: &[u8]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

impl<'a> Ask<'a> {
    /// Every fact.
    pub fn everything(env_keys: &'a BTreeSet<String>) -> Self {
        Ask {
            env_keys,
            wanted: &|_, _| Facts::ALL,
            cgroup_id: None,
            stat: None,
        }
    }
}

/// The machine's /proc.
#[derive(Debug, Default)]
pub struct LiveProcs {
    /// The cgroup2 mount, where cgroup paths are checked against ids.
    cgroup2: Option<PathBuf>,
    /// Cgroup id -> path (as /proc/PID/cgroup writes it), for the ids the
    /// kernel's records carry: an exec storm's processes share a handful of
    /// cgroups, and each saved read is an open, a read and a close.
    cgroup_paths: std::sync::Mutex<HashMap<u64, String>>,
}

/// How many cgroup paths [`LiveProcs`] keeps before it starts over.
const CGROUP_PATHS_KEPT: usize = 4096;

impl LiveProcs {
    /// /proc, with cgroup paths checked against the cgroup2 mount `cgroup2`
    /// (None: every cgroup is read from /proc).
    pub fn new(cgroup2: Option<PathBuf>) -> Self {
        LiveProcs {
            cgroup2,
            cgroup_paths: Default::default(),
        }
    }

    /// Keeps `path` as cgroup `id` if the directory there is that cgroup
    /// now (its inode is the id). A process moved between its record and
    /// the read was read in another cgroup, and that is not kept.
    fn learn_cgroup(&self, id: u64, path: &str) {
        use std::os::unix::fs::MetadataExt as _;
        let Some(mount) = &self.cgroup2 else {
            return;
        };
        let dir = mount.join(path.trim_start_matches('/'));
        if std::fs::metadata(dir).is_ok_and(|m| m.ino() == id)
            && let Ok(mut paths) = self.cgroup_paths.lock()
        {
            if paths.len() >= CGROUP_PATHS_KEPT {
                paths.clear();
            }
            paths.insert(id, path.to_owned());
        }
    }
}

impl ProcSource for LiveProcs {
    fn read_wanted(&self, pid: u32, ask: &Ask<'_>) -> Result<(ProcRead, Facts), ReadError> {
        let known = ask
            .cgroup_id
            .and_then(|id| self.cgroup_paths.lock().ok()?.get(&id).cloned());
        let learn = known.is_none();
        let read = read_proc_in(pid, ask, known)?;
        if let (true, Some(id)) = (learn, ask.cgroup_id) {
            self.learn_cgroup(id, &read.0.info.cgroup);
        }
        Ok(read)
    }

    fn pids(&self) -> Vec<u32> {
        procfs::process::all_processes()
            .map(|all| all.filter_map(|p| p.ok()).map(|p| p.pid as u32).collect())
            .unwrap_or_default()
    }

    fn owner(&self, pid: u32) -> Option<u32> {
        owner(pid)
    }

    fn start_ticks(&self, pid: u32) -> Option<u64> {
        start_ticks(pid)
    }
}

/// A scripted process set for tests: processes appear, change and vanish
/// when the test says so. Clones share the same set.
#[derive(Debug, Default, Clone)]
pub struct ScriptedProcs {
    procs: std::sync::Arc<std::sync::Mutex<BTreeMap<u32, (ProcRead, u32)>>>,
}

impl ScriptedProcs {
    /// Adds or replaces process `pid`, owned by `uid`.
    pub fn set(&self, read: ProcRead, uid: u32) {
        let mut procs = self.procs.lock().expect("scripted procs lock");
        procs.insert(read.info.pid, (read, uid));
    }

    pub fn remove(&self, pid: u32) {
        self.procs.lock().expect("scripted procs lock").remove(&pid);
    }
}

impl ProcSource for ScriptedProcs {
    fn read_wanted(&self, pid: u32, ask: &Ask<'_>) -> Result<(ProcRead, Facts), ReadError> {
        let procs = self.procs.lock().expect("scripted procs lock");
        let (read, _) = procs.get(&pid).ok_or(ReadError::Gone(pid))?;
        let mut read = read.clone();
        // As from /proc: what the record said stands in for stat.
        if let Some(stat) = &ask.stat {
            read.info.comm = stat.comm.clone();
            read.ppid = stat.ppid;
            read.start_ticks = stat.start_ticks;
        }
        read.info
            .env
            .retain(|k, _| ask.env_keys.contains(k) || ENV_ALWAYS.contains(&k.as_str()));
        let exe = read.info.exe.clone();
        let facts = read_in_stages(&mut read.info, ask.wanted, |info| info.exe = exe);
        facts.blank(&mut read.info);
        Ok((read, facts))
    }

    fn pids(&self) -> Vec<u32> {
        self.procs
            .lock()
            .expect("scripted procs lock")
            .keys()
            .copied()
            .collect()
    }

    fn owner(&self, pid: u32) -> Option<u32> {
        self.procs
            .lock()
            .expect("scripted procs lock")
            .get(&pid)
            .map(|(_, uid)| *uid)
    }
}

/// Reads a process's facts from /proc, keeping the environment variables in
/// `env_keys`.
pub fn read_proc(pid: u32, env_keys: &BTreeSet<String>) -> Result<ProcRead, ReadError> {
    read_proc_wanted(pid, &Ask::everything(env_keys)).map(|(read, _)| read)
}

/// Reads a process's stat and cgroup from /proc (unless `ask` knows them),
/// then the optional facts `ask` wants given those.
///
/// This is on the exec path, so it reads the files directly (open, read
/// until the end, close: no size query, which /proc files cannot answer)
/// instead of through a general /proc library.
pub fn read_proc_wanted(pid: u32, ask: &Ask<'_>) -> Result<(ProcRead, Facts), ReadError> {
    read_proc_in(pid, ask, None)
}

/// [`read_proc_wanted`], with the cgroup known already when `cgroup` says.
fn read_proc_in(
    pid: u32,
    ask: &Ask<'_>,
    cgroup: Option<String>,
) -> Result<(ProcRead, Facts), ReadError> {
    let Ask {
        env_keys,
        wanted,
        ref stat,
        ..
    } = *ask;
    let dir = format!("/proc/{pid}");
    let gone = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => ReadError::Gone(pid),
        _ if e.raw_os_error() == Some(libc::ESRCH) => ReadError::Gone(pid),
        _ => ReadError::Other {
            pid,
            source: procfs::ProcError::Io(e, Some(PathBuf::from(&dir))),
        },
    };
    let mut buf = Vec::with_capacity(1024);
    let StatFacts {
        comm,
        ppid,
        start_ticks,
    } = match stat {
        Some(known) => known.clone(),
        None => {
            read_file(&format!("{dir}/stat"), &mut buf).map_err(gone)?;
            parse_stat(&buf).ok_or_else(|| ReadError::Other {
                pid,
                source: procfs::ProcError::Incomplete(Some(PathBuf::from(format!("{dir}/stat")))),
            })?
        }
    };
    // Kernel threads have no exe and no argv; an unreadable exe of a user
    // process (permissions, a zombie) leaves it empty.
    let link = |name: &str| {
        std::fs::read_link(format!("{dir}/{name}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let cgroup = match cgroup {
        Some(known) => known,
        None => match read_file(&format!("{dir}/cgroup"), &mut buf) {
            Ok(()) => cgroup_line(&buf).unwrap_or_default(),
            Err(_) => String::new(),
        },
    };
    let mut info = ProcInfo {
        pid,
        exe: String::new(),
        comm,
        argv: Vec::new(),
        cwd: String::new(),
        cgroup,
        env: BTreeMap::new(),
    };
    let facts = read_in_stages(&mut info, wanted, |info| info.exe = link("exe"));
    if facts.cwd {
        info.cwd = link("cwd");
    }
    if facts.argv && read_file(&format!("{dir}/cmdline"), &mut buf).is_ok() {
        info.argv = buf
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
    }
    if facts.env && read_file(&format!("{dir}/environ"), &mut buf).is_ok() {
        info.env = buf
            .split(|b| *b == 0)
            .filter_map(|var| {
                let eq = var.iter().position(|b| *b == b'=')?;
                let key = std::str::from_utf8(&var[..eq]).ok()?;
                (env_keys.contains(key) || ENV_ALWAYS.contains(&key)).then(|| {
                    (
                        key.to_owned(),
                        String::from_utf8_lossy(&var[eq + 1..]).into_owned(),
                    )
                })
            })
            .collect();
    }
    // A process that exited while we read has left most fields empty:
    // report it gone rather than classify a husk. (Nothing read from /proc
    // but what the record told: a gone process fails its move instead.)
    if (facts.exe || facts.argv)
        && info.exe.is_empty()
        && info.argv.is_empty()
        && !Path::new(&dir).exists()
    {
        return Err(ReadError::Gone(pid));
    }
    Ok((
        ProcRead {
            info,
            ppid,
            start_ticks,
        },
        facts,
    ))
}

/// Which optional facts to read for `info`, whose always-known facts are
/// filled: the exe first if `wanted` asks for it (read by `read_exe`),
/// then the rest as `wanted` decides given the exe.
fn read_in_stages(
    info: &mut ProcInfo,
    wanted: &dyn Fn(&ProcInfo, Facts) -> Facts,
    read_exe: impl FnOnce(&mut ProcInfo),
) -> Facts {
    info.exe.clear();
    let first = wanted(info, Facts::NONE);
    if !first.exe {
        return first;
    }
    read_exe(info);
    let exe_read = Facts {
        exe: true,
        ..Facts::NONE
    };
    wanted(info, exe_read).union(exe_read)
}

/// The whole of a /proc file into `buf` (cleared first): open and read(2)
/// until the end. /proc files report no size, so `std::fs::read`'s size
/// query and probe read are syscalls for nothing here.
fn read_file(path: &str, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read as _;
    buf.clear();
    let mut file = std::fs::File::open(path)?;
    let mut chunk = [0u8; 4096];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The cgroup v2 path in /proc/PID/cgroup's text (the `0::` line).
fn cgroup_line(text: &[u8]) -> Option<String> {
    text.split(|b| *b == b'\n')
        .find_map(|l| l.strip_prefix(b"0::"))
        .map(|path| String::from_utf8_lossy(path).into_owned())
}

/// comm, ppid and start time (clock ticks) from /proc/PID/stat. The comm
/// sits in parentheses and may itself contain ") ".
fn parse_stat(stat: &[u8]) -> Option<StatFacts> {
    let open = stat.iter().position(|b| *b == b'(')?;
    let close = stat.iter().rposition(|b| *b == b')')?;
    let comm = String::from_utf8_lossy(stat.get(open + 1..close)?).into_owned();
    let rest = std::str::from_utf8(stat.get(close + 2..)?).ok()?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, starttime field 22.
    let ppid = fields.get(1)?.parse().ok()?;
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some(StatFacts {
        comm,
        ppid,
        start_ticks,
    })
}

/// A process's start time (clock ticks since boot) from /proc/PID/stat
/// alone: with the pid, who it is, for pid-reuse checks.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let mut stat = Vec::with_capacity(512);
    read_file(&format!("/proc/{pid}/stat"), &mut stat).ok()?;
    parse_stat(&stat).map(|stat| stat.start_ticks)
}

/// A process's cgroup (relative to the cgroup2 mount) from /proc/PID/cgroup
/// alone.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    read_file(&format!("/proc/{pid}/cgroup"), &mut buf).ok()?;
    cgroup_line(&buf)
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
    /// Pids per class, kept with every insert, remove and decision.
    members: HashMap<String, HashSet<u32>>,
}

/// Adds `pid` to `class`'s members.
fn join(members: &mut HashMap<String, HashSet<u32>>, class: &str, pid: u32) {
    match members.get_mut(class) {
        Some(pids) => {
            pids.insert(pid);
        }
        None => {
            members.insert(class.to_owned(), HashSet::from([pid]));
        }
    }
}

/// Takes `pid` out of `class`'s members; a class with none left goes.
fn leave(members: &mut HashMap<String, HashSet<u32>>, class: &str, pid: u32) {
    if let Some(pids) = members.get_mut(class) {
        pids.remove(&pid);
        if pids.is_empty() {
            members.remove(class);
        }
    }
}

/// How far `ancestors` walks before giving up (guards against loops from
/// stale parent links).
const MAX_DEPTH: usize = 64;

impl Table {
    /// Every process /proc shows now.
    pub fn snapshot(env_keys: &BTreeSet<String>) -> Self {
        Self::read_all(&LiveProcs::default(), env_keys)
    }

    /// Every process `source` shows now.
    pub fn read_all(source: &dyn ProcSource, env_keys: &BTreeSet<String>) -> Self {
        let mut table = Table::default();
        for pid in source.pids() {
            if let Ok(read) = source.read(pid, env_keys) {
                table.insert(pid, read.into_proc());
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

    /// A process to change in place. Its decision changes only through
    /// [`Table::set_decision`], which keeps the per-class counts.
    pub fn get_mut(&mut self, pid: u32) -> Option<&mut Proc> {
        self.procs.get_mut(&pid)
    }

    pub fn insert(&mut self, pid: u32, proc: Proc) {
        if let Some(old) = self.procs.insert(pid, proc) {
            leave(&mut self.members, &old.decision.class, pid);
        }
        join(&mut self.members, &self.procs[&pid].decision.class, pid);
    }

    pub fn remove(&mut self, pid: u32) -> Option<Proc> {
        let old = self.procs.remove(&pid)?;
        leave(&mut self.members, &old.decision.class, pid);
        Some(old)
    }

    /// Sets a process's decision; returns whether its class changed.
    pub fn set_decision(&mut self, pid: u32, decision: Decision) -> bool {
        let Some(p) = self.procs.get_mut(&pid) else {
            return false;
        };
        let old = std::mem::replace(&mut p.decision, decision);
        if old.class == p.decision.class {
            return false;
        }
        leave(&mut self.members, &old.class, pid);
        join(&mut self.members, &p.decision.class, pid);
        true
    }

    /// How many tracked processes are in `class`.
    pub fn count(&self, class: &str) -> usize {
        self.members.get(class).map_or(0, HashSet::len)
    }

    /// Roots of `class`'s trees: processes of the class whose parent is
    /// not of it (one per game launch, however many processes it forks).
    pub fn roots_of(&self, class: &str) -> usize {
        let Some(members) = self.members.get(class) else {
            return 0;
        };
        members
            .iter()
            .filter(|pid| {
                self.procs
                    .get(pid)
                    .is_none_or(|p| !members.contains(&p.ppid))
            })
            .count()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's cgroup2 path, the mount it is under and its id.
    fn own_cgroup() -> Option<(PathBuf, String, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let text = std::fs::read(format!("/proc/{}/cgroup", std::process::id())).ok()?;
        let path = cgroup_line(&text)?;
        ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find_map(|mount| {
                let dir = mount.join(path.trim_start_matches('/'));
                let id = std::fs::metadata(&dir).ok()?.ino();
                dir.join("cgroup.procs")
                    .exists()
                    .then(|| (mount, path.clone(), id))
            })
    }

    #[test]
    fn a_cgroup_read_once_by_its_id_is_not_read_again_and_a_wrong_id_is_not_kept() {
        let Some((mount, path, id)) = own_cgroup() else {
            eprintln!("skipped: no cgroup2 mount here");
            return;
        };
        let me = std::process::id();
        let keys = BTreeSet::new();
        let ask = |cgroup_id| Ask {
            env_keys: &keys,
            wanted: &|_, _| Facts::NONE,
            cgroup_id,
            stat: None,
        };
        let procs = LiveProcs::new(Some(mount));
        let kept = |procs: &LiveProcs| procs.cgroup_paths.lock().unwrap().clone();

        // A record whose id is not where the process is (it moved since):
        // read from /proc, not kept.
        let (read, _) = procs.read_wanted(me, &ask(Some(id + 1_000_003))).unwrap();
        assert_eq!(read.info.cgroup, path);
        assert!(kept(&procs).is_empty());

        // The right id: read, checked against the directory's inode, kept.
        let (read, _) = procs.read_wanted(me, &ask(Some(id))).unwrap();
        assert_eq!(read.info.cgroup, path);
        assert_eq!(kept(&procs), HashMap::from([(id, path.clone())]));

        // Kept means not read again: a path only the cache holds comes back.
        procs
            .cgroup_paths
            .lock()
            .unwrap()
            .insert(id, "/kept-path".into());
        let (read, _) = procs.read_wanted(me, &ask(Some(id))).unwrap();
        assert_eq!(read.info.cgroup, "/kept-path");
        // Without an id the cache is not asked.
        let (read, _) = procs.read_wanted(me, &ask(None)).unwrap();
        assert_eq!(read.info.cgroup, path);
    }

    #[test]
    fn the_exe_is_read_only_when_wanted_and_the_rest_is_asked_for_given_it() {
        let me = std::process::id();
        let keys = BTreeSet::new();
        let exe = std::env::current_exe()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let asked = std::sync::Mutex::new(Vec::new());
        let ask = |wanted: &dyn Fn(&ProcInfo, Facts) -> Facts| {
            LiveProcs::new(None)
                .read_wanted(
                    me,
                    &Ask {
                        env_keys: &keys,
                        wanted,
                        cgroup_id: None,
                        stat: None,
                    },
                )
                .unwrap()
        };
        // Not wanted: not read, and asked once.
        let (read, facts) = ask(&|info, held| {
            asked.lock().unwrap().push((info.exe.clone(), held));
            Facts::NONE
        });
        assert_eq!((read.info.exe.as_str(), facts), ("", Facts::NONE));
        assert!(read.info.argv.is_empty());
        assert_eq!(asked.lock().unwrap().len(), 1);
        // Wanted: read, then asked again with it, and what that answer
        // wants is read.
        asked.lock().unwrap().clear();
        let (read, facts) = ask(&|info, held| {
            asked.lock().unwrap().push((info.exe.clone(), held));
            Facts {
                exe: true,
                argv: held.exe,
                ..Facts::NONE
            }
        });
        assert_eq!(read.info.exe, exe);
        assert!(
            facts.exe && facts.argv && !facts.cwd && !facts.env,
            "{facts:?}"
        );
        assert!(!read.info.argv.is_empty() && read.info.cwd.is_empty());
        let exe_read = Facts {
            exe: true,
            ..Facts::NONE
        };
        assert_eq!(
            *asked.lock().unwrap(),
            [(String::new(), Facts::NONE), (exe.clone(), exe_read)]
        );
    }

    #[test]
    fn stat_with_parentheses_in_comm() {
        let stat =
            b"4242 (we) ird) S 17 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0";
        assert_eq!(
            parse_stat(stat),
            Some(StatFacts {
                comm: "we) ird".to_owned(),
                ppid: 17,
                start_ticks: 987654
            })
        );
        assert_eq!(parse_stat(b"garbage"), None);
    }

    #[test]
    fn reads_this_process_and_reports_a_missing_one_gone() {
        let keys = BTreeSet::from(["PATH".to_owned()]);
        let ProcRead {
            info,
            ppid,
            start_ticks: start,
        } = read_proc(std::process::id(), &keys).unwrap();
        assert_eq!(info.exe, std::env::current_exe().unwrap().to_string_lossy());
        assert_eq!(
            info.argv.first().map(String::as_str),
            std::env::args().next().as_deref()
        );
        assert!(info.env.contains_key("PATH"));
        assert!(ppid > 0 && start > 0);
        assert!(matches!(
            read_proc(u32::MAX - 7, &keys),
            Err(ReadError::Gone(_))
        ));
    }
}
