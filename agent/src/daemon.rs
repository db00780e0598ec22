//! The agent: one loop that owns the process table and turns every source
//! (kernel events, the /proc seed, control requests, signals) into
//! decisions and moves.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    path::PathBuf,
};

use anyhow::Context as _;
use corral_common::{EventKind, ProcEvent};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    bpf::{self, KernelCounters, Tracer},
    classify::{self, Decision},
    control::{self, AncestorLine, ClassStatus, EventCounts, Explanation, Placement, Request, Response, Status},
    cpus::CpuList,
    place::{Groups, MoveError},
    policy::Policy,
    procs::{self, Proc, ProcInfo, ReadError, Table},
};

/// Everything the loop reacts to.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "kernel events are handled at once, never queued; boxing would allocate on the exec path"
)]
pub enum Event {
    Kernel(ProcEvent),
    Control(control::Incoming),
}

/// How many placements are kept for `corral placements`.
const PLACEMENT_LOG: usize = 100_000;

pub struct Options {
    pub policy: Policy,
    pub cgroup_root: PathBuf,
    pub socket: PathBuf,
    pub dry_run: bool,
    pub ring_bytes: u32,
}

/// The state the loop owns.
pub struct Agent {
    policy: Policy,
    env_keys: BTreeSet<String>,
    table: Table,
    groups: Groups,
    counts: EventCounts,
    placements_by_class: BTreeMap<String, u64>,
    placements: VecDeque<Placement>,
    kernel: KernelCounters,
    own_pid: u32,
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Agent {
    pub fn new(policy: Policy, groups: Groups) -> Self {
        let env_keys = policy.env_keys();
        Agent {
            policy,
            env_keys,
            table: Table::default(),
            groups,
            counts: EventCounts::default(),
            placements_by_class: BTreeMap::new(),
            placements: VecDeque::new(),
            kernel: KernelCounters::default(),
            own_pid: std::process::id(),
        }
    }

    /// Reads every process from /proc, classifies parents before children
    /// and places what the policy manages.
    pub fn seed(&mut self) {
        let pids: Vec<u32> = procfs::process::all_processes()
            .map(|all| all.filter_map(|p| p.ok()).map(|p| p.pid as u32).collect())
            .unwrap_or_default();
        for pid in &pids {
            if let Ok((info, ppid, start_ticks)) = procs::read_proc(*pid, &self.env_keys) {
                self.table.insert(*pid, Proc {
                    info,
                    ppid,
                    start_ticks,
                    decision: Decision::default_system(),
                    placed_class: None,
                });
            }
        }
        // Parents first: sort by depth in the tree.
        let mut ordered: Vec<(usize, u32)> = pids
            .iter()
            .filter(|p| self.table.get(**p).is_some())
            .map(|p| (self.table.ancestors(*p).len(), *p))
            .collect();
        ordered.sort_unstable();
        for (_, pid) in ordered {
            self.decide(pid);
            self.place(pid, None);
        }
        info!(processes = self.table.len(), "process table seeded from /proc");
    }

    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Kernel(e) => match EventKind::from_u32(e.kind) {
                Some(EventKind::Exec) => self.on_exec(&e),
                Some(EventKind::Fork) => self.on_fork(&e),
                Some(EventKind::Exit) => self.on_exit(&e),
                None => warn!(kind = e.kind, "unknown event kind from the kernel"),
            },
            Event::Control((request, reply)) => {
                let _ = reply.send(self.answer(request));
            }
        }
    }

    fn on_exec(&mut self, e: &ProcEvent) {
        let handled_ns = monotonic_ns();
        self.counts.exec += 1;
        let pid = e.tgid;
        let (info, proc_ppid, start_ticks) = match procs::read_proc(pid, &self.env_keys) {
            Ok(read) => read,
            Err(err) => {
                self.forget(pid, &err);
                return;
            }
        };
        // The parent at fork is the better ancestor for classification: a
        // reparented daemon still descends from what launched it.
        let ppid = self
            .table
            .get(pid)
            .map(|p| p.ppid)
            .filter(|p| *p != 0)
            .or((e.ppid != 0).then_some(e.ppid))
            .unwrap_or(proc_ppid);
        let placed_class = self.table.get(pid).and_then(|p| p.placed_class.clone());
        self.table.insert(pid, Proc {
            info,
            ppid,
            start_ticks,
            decision: Decision::default_system(),
            placed_class,
        });
        self.decide(pid);
        self.place(pid, Some((e.ktime_ns, handled_ns)));
    }

    fn on_fork(&mut self, e: &ProcEvent) {
        self.counts.fork += 1;
        let child = e.pid;
        let Some(parent) = self.table.get(e.ppid).cloned() else {
            // A parent we never saw: learn the child from /proc.
            match procs::read_proc(child, &self.env_keys) {
                Ok((info, ppid, start_ticks)) => {
                    self.table.insert(child, Proc {
                        info,
                        ppid,
                        start_ticks,
                        decision: Decision::default_system(),
                        placed_class: None,
                    });
                    self.decide(child);
                    self.place(child, None);
                }
                Err(err) => self.forget(child, &err),
            }
            return;
        };
        // The child runs the parent's program with the parent's decision,
        // and starts in the cgroup the parent was in when it forked.
        let mut info = parent.info.clone();
        info.pid = child;
        self.table.insert(child, Proc {
            info,
            ppid: e.ppid,
            start_ticks: 0,
            decision: parent.decision.clone(),
            placed_class: None,
        });
        if let Some(class) = parent.placed_class {
            let in_group = self.groups.group(&class).is_some_and(|g| g.id == e.cgroup_id);
            if in_group {
                if let Some(p) = self.table.get_mut(child) {
                    p.placed_class = Some(class);
                }
            } else {
                // Forked between the parent's exec and its move: follow it.
                self.place(child, None);
            }
        }
    }

    fn on_exit(&mut self, e: &ProcEvent) {
        self.counts.exit += 1;
        self.table.remove(e.tgid);
    }

    fn forget(&mut self, pid: u32, err: &ReadError) {
        match err {
            ReadError::Gone(_) => self.counts.vanished += 1,
            ReadError::Other { .. } => debug!("{err}"),
        }
        self.table.remove(pid);
    }

    /// Classifies `pid` from its table entry and its ancestors' decisions.
    fn decide(&mut self, pid: u32) {
        let ancestors = self.table.ancestors(pid);
        let Some(process) = self.table.get(pid) else { return };
        let infos: Vec<&ProcInfo> = ancestors
            .iter()
            .filter_map(|a| self.table.get(*a).map(|p| &p.info))
            .collect();
        let parent_decision = ancestors.last().and_then(|a| self.table.get(*a)).map(|p| &p.decision);
        let decision = classify::classify_one(&self.policy, &process.info, &infos, parent_decision);
        if let Some(p) = self.table.get_mut(pid) {
            p.decision = decision;
        }
    }

    /// Moves `pid` into its class's group unless it is there already or
    /// its class is left alone. `exec` holds the kernel's exec timestamp and
    /// when the agent began handling it, for the placement log.
    fn place(&mut self, pid: u32, exec: Option<(u64, u64)>) {
        if pid == self.own_pid || pid <= 2 {
            return;
        }
        let Some(process) = self.table.get(pid) else { return };
        let class = process.decision.class.clone();
        if self.groups.group(&class).is_none() || process.placed_class.as_deref() == Some(&class) {
            return;
        }
        match self.groups.move_process(&class, pid) {
            Ok(()) => {
                let placed_ns = monotonic_ns();
                if self.groups.dry_run {
                    info!(pid, comm = %process.info.comm, class, rule = %process.decision.rule, "dry run: would move");
                } else {
                    debug!(pid, comm = %process.info.comm, class, rule = %process.decision.rule, "moved");
                }
                *self.placements_by_class.entry(class.clone()).or_default() += 1;
                if let Some((exec_ns, handled_ns)) = exec {
                    if self.placements.len() == PLACEMENT_LOG {
                        self.placements.pop_front();
                    }
                    self.placements.push_back(Placement {
                        pid,
                        class: class.clone(),
                        exec_ns,
                        handled_ns,
                        placed_ns,
                    });
                }
                if let Some(p) = self.table.get_mut(pid) {
                    p.placed_class = Some(class);
                }
            }
            Err(MoveError::Gone(_)) => {
                self.counts.vanished += 1;
                self.table.remove(pid);
            }
            Err(err) => {
                self.counts.move_errors += 1;
                warn!("{err}");
            }
        }
    }

    pub fn set_kernel_counters(&mut self, counters: KernelCounters) {
        self.kernel = counters;
    }

    pub fn answer(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(self.status()),
            Request::Explain { pid } => match self.explain(pid) {
                Some(e) => Response::Explain(Box::new(e)),
                None => Response::Error {
                    message: format!("process {pid} is not tracked (it may have exited)"),
                },
            },
            Request::Placements => Response::Placements {
                placements: self.placements.iter().cloned().collect(),
            },
        }
    }

    fn status(&self) -> Status {
        let mut processes: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, p) in self.table.iter() {
            *processes.entry(p.decision.class.as_str()).or_default() += 1;
        }
        let classes = self
            .policy
            .classes
            .values()
            .map(|class| {
                let group = self.groups.group(&class.name);
                ClassStatus {
                    class: class.name.clone(),
                    processes: processes.get(class.name.as_str()).copied().unwrap_or(0),
                    cgroup: group.map(|g| g.path.display().to_string()),
                    cpus: group.map(|g| g.cpus.to_string()),
                    cpu_weight: group.map(|g| g.cpu_weight),
                    placements: self.placements_by_class.get(&class.name).copied().unwrap_or(0),
                    note: group.and_then(|g| g.note.clone()),
                }
            })
            .collect();
        Status {
            policy: self.policy.path.display().to_string(),
            cgroup_root: self.groups.root.display().to_string(),
            cpuset_enforced: self.groups.cpuset,
            dry_run: self.groups.dry_run,
            tracked: self.table.len(),
            classes,
            events: self.counts.clone(),
            kernel: self.kernel,
        }
    }

    fn explain(&self, pid: u32) -> Option<Explanation> {
        let process = self.table.get(pid)?;
        let group = self.groups.group(&process.decision.class);
        let ancestry = self
            .table
            .ancestors(pid)
            .iter()
            .filter_map(|a| self.table.get(*a).map(|p| (a, p)))
            .map(|(a, p)| AncestorLine {
                pid: *a,
                comm: p.info.comm.clone(),
                class: p.decision.class.clone(),
                rule: p.decision.rule.clone(),
            })
            .collect();
        let cgroup_now = procs::read_proc(pid, &BTreeSet::new())
            .map(|(info, _, _)| info.cgroup)
            .unwrap_or_default();
        Some(Explanation {
            pid,
            comm: process.info.comm.clone(),
            exe: process.info.exe.clone(),
            argv: process.info.argv.clone(),
            decision: process.decision.clone(),
            group: group.map(|g| g.path.display().to_string()),
            class_cpus: group.map(|g| g.cpus.to_string()),
            cgroup_now,
            cpus_allowed: cpus_allowed(pid).unwrap_or_default(),
            ancestry,
        })
    }

    pub fn groups(&self) -> &Groups {
        &self.groups
    }
}

/// `Cpus_allowed_list` of a process.
pub fn cpus_allowed(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let online = CpuList::online(std::path::Path::new("/sys")).context("reading online CPUs")?;
    let groups = Groups::setup(&options.cgroup_root, &options.policy, online, options.dry_run)?;
    // Attach before seeding, so nothing started in between is missed.
    let tracer = Tracer::load(options.ring_bytes)?;
    let mut agent = Agent::new(options.policy, groups);
    agent.seed();

    let (control_tx, mut control_rx) = mpsc::channel(64);
    let server = control::serve(&options.socket, control_tx)?;
    let Tracer { ebpf: _attached, events, counters: counter_reader } = tracer;
    // SAFETY: the ring buffer owns its fd and outlives the registration
    // (both live until this function returns).
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let mut counters = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    info!(
        socket = %options.socket.display(),
        root = %agent.groups().root.display(),
        dry_run = options.dry_run,
        "corral is running"
    );
    let read_counters = |agent: &mut Agent| agent.set_kernel_counters(Tracer::sum(&counter_reader));
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(event) = bpf::decode(&item) {
                        drop(item);
                        agent.handle(Event::Kernel(event));
                    }
                }
                guard.clear_ready();
            }
            Some(incoming) = control_rx.recv() => {
                read_counters(&mut agent);
                agent.handle(Event::Control(incoming));
            }
            _ = counters.tick() => read_counters(&mut agent),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping: widening every managed group to all CPUs");
    agent.groups().widen_all();
    server.abort();
    let _ = std::fs::remove_file(&options.socket);
    Ok(())
}
