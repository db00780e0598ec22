//! The agent's state and its decisions: what each [`Event`] changes in the
//! process table, which class each process belongs to, where it goes, and
//! what the runner ([`super::daemon::run`]) must do next ([`Effect`]).
//! Placement goes through the [`Placer`] port, /proc through [`ProcSource`],
//! so the unit tests in `agent_tests.rs` drive it with a recording backend.
//!
//! Length: the loop's decisions only; GPU coordination, read models and tests are in agent_gpu.rs, agent_views.rs and agent_tests.rs.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use corral_common::{EventKind, ProcEvent};
use tracing::{debug, error, info, warn};

use super::{
    agent_desktop::DesktopState,
    agent_gamemode::GameModeState,
    agent_gpu::{GpuState, halve},
    daemon::monotonic_ns,
    gamemode_bus,
};
use crate::{
    actuate::{
        Placer, Target,
        cgroup::MoveError,
        power::{PowerRequest, PowerStatus},
    },
    gpu::{nvml::GpuEvent, thermal::ThermalGuard},
    kernel::bpf::{KernelCounters, Tracer},
    model::{
        ananicy::AnanicyRules,
        classify,
        coresets::Resolved,
        cpus::CpuList,
        modes::{self, Mode, ModeSwitch},
        policy::{Policy, PolicySource},
        procs::{
            Ask, Facts, Proc, ProcInfo, ProcRead, ProcSource, ReadError, StatFacts, Table,
            comm_of_record, start_ticks_of_boottime_ns,
        },
        topology::Topology,
    },
    observe::{
        escape::esc,
        metrics::{Histogram, ReloadCounts},
    },
    service::{
        control::{self, EventCounts, Peer, ReloadStatus, Request, Response},
        desktop_notify::Notification,
    },
};

/// Everything the loop reacts to.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "kernel events are handled at once, never queued; boxing would allocate on the exec path"
)]
pub enum Event {
    /// Read every process from /proc and place what the policy manages
    /// (start-up).
    Seed,
    Kernel(ProcEvent),
    /// The ring buffer was drained: apply what the batch changed.
    KernelBatchDone,
    Control(control::Incoming),
    /// A policy file changed or SIGHUP arrived (`corral reload` comes as a
    /// control request); all three take the same path.
    Reload(ReloadCause),
    /// The dynamic mode's deadline passed.
    ModeTimer,
    /// From the NVML poller thread.
    Gpu(GpuEvent),
    /// The slow /proc sweep timer.
    SweepTick,
    /// Once a second: read the kernel counters (a full sweep when records
    /// were dropped) and refresh the metrics.
    CountersTick,
    /// Time to tell systemd's watchdog the loop is alive.
    WatchdogTick,
    /// What the power carrier holds now, after a request.
    Power(PowerStatus),
    /// From the GameMode side of the users' session buses.
    GameMode(gamemode_bus::Incoming),
    /// SIGTERM or SIGINT.
    Stop,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadCause {
    FileChanged,
    Signal,
    Request,
}

/// What the runner carries out for the loop, after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Tell systemd (sd_notify).
    Notify(Notice),
    /// Hold or release `performance` (power-profiles-daemon, else sysfs).
    Power(PowerRequest),
    /// A desktop notification on user `uid`'s session bus.
    Desktop {
        uid: u32,
        notification: Notification,
    },
    /// Emit GameMode's `GameRegistered`/`GameUnregistered` on a user's bus.
    GameMode(gamemode_bus::Signal),
    /// Leave the loop.
    Exit,
}

/// The sd_notify messages the loop sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready { status: String },
    Reloading,
    Watchdog,
    Stopping,
}

/// How many placements are kept for `corral placements` (the newest; the
/// benchmark's 10,000 execs fit). About 100 bytes each: a longer log is
/// memory that grows for the first hours of every agent's life.
const PLACEMENT_LOG: usize = 16_384;

/// One entry of the placement log as kept: what `corral placements`
/// answers with, less the backend's join time (asked for when answering),
/// with the class name shared.
#[derive(Debug, Clone)]
pub(super) struct LoggedPlacement {
    pub pid: u32,
    pub class: Arc<str>,
    pub exec_ns: u64,
    pub handled_ns: u64,
    pub placed_ns: u64,
}

/// The state the loop owns.
pub struct Agent {
    pub(super) source: PolicySource,
    pub(super) sysfs_root: PathBuf,
    pub(super) policy: Policy,
    pub(super) ananicy: Option<AnanicyRules>,
    pub(super) env_keys: BTreeSet<String>,
    pub(super) table: Table,
    /// Where placement is carried out (cgroupfs, systemd, a recording).
    pub(super) placer: Box<dyn Placer>,
    /// Where processes are read from (/proc, or a script in tests).
    pub(super) procs: Box<dyn ProcSource>,
    pub(super) modes: ModeSwitch,
    pub(super) epoch: Instant,
    /// Time since start, as the mode machine, the arbiter and the thermal
    /// guard see it; tests drive it by hand.
    pub(super) clock: Clock,
    pub(super) counts: EventCounts,
    pub(super) placements_by_class: BTreeMap<String, u64>,
    pub(super) placements: VecDeque<LoggedPlacement>,
    /// The class names the placement log shares.
    class_names: Vec<Arc<str>>,
    pub(super) kernel: KernelCounters,
    pub(super) last_reload: Option<ReloadStatus>,
    pub(super) own_pid: u32,
    /// The kernel side; None in tests that drive the agent without eBPF.
    pub(super) tracer: Option<Tracer>,
    /// Telemetry slot of each managed class (slot 0: everything else).
    pub(super) slots: BTreeMap<String, u32>,
    /// Kernel exec timestamp -> cgroup write, for every exec placement.
    pub(super) placement_latency: Histogram,
    pub(super) reloads: ReloadCounts,
    /// The metrics endpoint's address once bound.
    pub(super) metrics_bound: Option<std::net::SocketAddr>,
    pub(super) gpu: GpuState,
    /// The dropped-records count the last full sweep covered.
    pub(super) dropped_swept: u64,
    /// Power requests, desktop notifications, coexisting tools.
    pub(super) desktop: DesktopState,
    pub(super) gamemode: GameModeState,
}

/// Loads the ananicy-cpp rules when the policy enables them; failures
/// turn the source off with a warning.
pub fn load_ananicy(policy: &Policy) -> Option<AnanicyRules> {
    if !policy.ananicy.enabled {
        return None;
    }
    match AnanicyRules::load(&policy.ananicy.dirs, &policy.ananicy.types) {
        Ok((rules, warnings)) => {
            for w in warnings.iter().take(20) {
                warn!("ananicy rules: {w}");
            }
            info!(rules = rules.len(), "ananicy-cpp rules loaded");
            Some(rules)
        }
        Err(e) => {
            warn!("ananicy-cpp rules not used: {e}");
            None
        }
    }
}

/// Reads the topology and resolves the policy's core sets on it.
pub fn core_sets_here(
    policy: &Policy,
    sysfs_root: &Path,
) -> anyhow::Result<(Vec<Resolved>, CpuList)> {
    let topology = Topology::read(sysfs_root)?;
    let resolved = policy.resolve_cpus(&topology)?;
    Ok((resolved, topology.online().clone()))
}

/// The agent's sense of time since it started.
#[derive(Debug, Clone)]
pub enum Clock {
    Real(Instant),
    /// Milliseconds, set by a test.
    Manual(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    pub fn now(&self) -> Duration {
        match self {
            Clock::Real(start) => start.elapsed(),
            Clock::Manual(ms) => {
                Duration::from_millis(ms.load(std::sync::atomic::Ordering::Relaxed))
            }
        }
    }
}

impl Agent {
    /// Time since start (see [`Clock`]).
    pub(super) fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn new(
        source: PolicySource,
        sysfs_root: PathBuf,
        policy: Policy,
        placer: Box<dyn Placer>,
        procs: Box<dyn ProcSource>,
        tracer: Option<Tracer>,
    ) -> Self {
        let env_keys = policy.env_keys();
        let ananicy = load_ananicy(&policy);
        let modes = ModeSwitch::new(policy.modes, Duration::ZERO);
        let gpu = GpuState::new(&policy);
        let desktop = DesktopState::new(policy.power.enabled);
        Agent {
            source,
            sysfs_root,
            policy,
            ananicy,
            env_keys,
            table: Table::default(),
            placer,
            procs,
            modes,
            epoch: Instant::now(),
            clock: Clock::Real(Instant::now()),
            counts: EventCounts::default(),
            placements_by_class: BTreeMap::new(),
            placements: VecDeque::new(),
            class_names: Vec::new(),
            kernel: KernelCounters::default(),
            last_reload: None,
            own_pid: std::process::id(),
            tracer,
            slots: BTreeMap::new(),
            placement_latency: Histogram::placement_latency(),
            reloads: ReloadCounts::default(),
            metrics_bound: None,
            gpu,
            dropped_swept: 0,
            desktop,
            gamemode: GameModeState::default(),
        }
    }

    /// The class the dynamic mode and the GPU arbiter protect.
    pub(super) fn protected(&self) -> &str {
        self.policy.protected_class()
    }

    /// How many launches of the protected class run: the roots of its
    /// process trees (a game and the 30 processes it forks are one).
    pub(super) fn protected_running(&self) -> usize {
        self.table.roots_of(self.protected())
    }

    /// Whether any process of the protected class runs (then at least one
    /// launch does: a tree has a root).
    pub(super) fn protected_active(&self) -> bool {
        self.table.count(self.protected()) > 0
    }

    /// The game count the mode decides from. Counting launches walks the
    /// protected class's members, which an exec storm of games makes long,
    /// so they are counted only when games may start (none were seen); the
    /// class emptying is seen at once. While games run the last count
    /// stands, and views count afresh ([`ModeSwitch::why_counting`]).
    fn games_for_mode(&self) -> usize {
        match (self.protected_active(), self.modes.games_seen()) {
            (false, _) => 0,
            (true, 0) => self.protected_running(),
            (true, seen) => seen,
        }
    }

    /// Attaches or detaches scheduling telemetry as the policy says, and
    /// tells the kernel which cgroups are which class.
    pub fn sync_telemetry(&mut self) {
        self.slots = self
            .placer
            .layout()
            .iter()
            .zip(1..)
            .map(|(g, slot)| (g.class.clone(), slot))
            .collect();
        let Some(tracer) = self.tracer.as_mut() else {
            return;
        };
        let ids: Vec<(u64, u32)> = self
            .placer
            .layout()
            .iter()
            .filter_map(|g| self.slots.get(&g.class).map(|slot| (g.id, *slot)))
            .collect();
        if let Err(e) = tracer.set_class_cgroups(&ids) {
            warn!("telemetry: could not map class cgroups: {e:#}");
        }
        if let Err(e) = tracer.set_telemetry(self.policy.telemetry.enabled) {
            warn!("could not detach telemetry: {e:#}");
        }
    }

    /// Reads the kernel counters.
    pub fn read_kernel_counters(&mut self) {
        if let Some(tracer) = &self.tracer {
            self.kernel = tracer.counters();
        }
    }

    /// Whether records were dropped since the last full sweep (then one is
    /// due); remembers that it said so.
    pub(super) fn dropped_since_sweep(&mut self) -> bool {
        if self.kernel.dropped > self.dropped_swept {
            warn!(
                dropped = self.kernel.dropped - self.dropped_swept,
                "the kernel dropped process events (ring buffer full); sweeping /proc"
            );
            self.dropped_swept = self.kernel.dropped;
            return true;
        }
        false
    }

    /// Reads every process from /proc, classifies parents before children
    /// and places what the policy manages. A process already in its class's
    /// group (an agent restart) is adopted, not moved.
    pub(super) fn seed(&mut self) {
        self.table = Table::read_all(self.procs.as_ref(), &self.env_keys);
        // The same walk as `corral policy test`.
        classify::classify_table(&self.policy, self.ananicy.as_ref(), &mut self.table);
        for pid in self.table.parents_first() {
            self.adopt_if_placed(pid);
            self.place(pid, None);
        }
        self.update_mode();
        info!(
            processes = self.table.len(),
            "process table seeded from /proc"
        );
    }

    pub(super) fn adopt_if_placed(&mut self, pid: u32) {
        let Some(p) = self.table.get(pid) else { return };
        if self.placer.holds_cgroup(&p.decision.class, &p.info.cgroup) {
            let class = p.decision.class.clone();
            if let Some(p) = self.table.get_mut(pid) {
                p.placed_class = Some(class);
            }
        }
    }

    /// Decides what one event changes. Placement is carried out through the
    /// placer at once (the exec path cannot wait); everything else the
    /// runner must do comes back as effects.
    pub fn handle(&mut self, event: Event) -> Vec<Effect> {
        let mut effects = self.on_event(event);
        effects.splice(0..0, self.desktop_effects());
        effects
    }

    fn on_event(&mut self, event: Event) -> Vec<Effect> {
        match event {
            Event::Seed => {
                self.seed();
                // From the table the seed just filled.
                self.check_coexistence();
                // The core sets of the mode the agent starts in.
                self.apply_layout();
                self.sync_telemetry();
                self.apply_dmem();
                vec![
                    Effect::Notify(Notice::Ready {
                        status: self.one_line_status(),
                    }),
                    Effect::Notify(Notice::Watchdog),
                ]
            }
            Event::Kernel(e) => {
                let mut effects = Vec::new();
                match EventKind::from_u32(e.kind) {
                    Some(EventKind::Exec) => self.on_exec(&e),
                    Some(EventKind::Fork) => self.on_fork(&e),
                    Some(EventKind::Exit) => {
                        // A registered game's exit ends its registration.
                        effects = self.gamemode_exited(e.tgid);
                        self.on_exit(&e);
                    }
                    None => warn!(kind = e.kind, "unknown event kind from the kernel"),
                }
                effects
            }
            Event::KernelBatchDone | Event::ModeTimer => {
                self.update_mode();
                Vec::new()
            }
            Event::Control((request, peer, reply)) => {
                let mut effects = Vec::new();
                let response = match self.refusal(&request, &peer) {
                    Some(message) => {
                        warn!(?request, uid = ?peer.uid, "refused: {}", esc(&message));
                        Response::Error { message }
                    }
                    None => match request {
                        Request::Reload => {
                            let (status, notices) = self.reload_notified();
                            effects = notices;
                            Response::Reloaded(status)
                        }
                        Request::Enter { class } => self.enter(&class, &peer),
                        other => {
                            self.read_kernel_counters();
                            self.answer(other)
                        }
                    },
                };
                let _ = reply.send(response);
                effects
            }
            Event::Reload(cause) => {
                debug!(?cause, "reload");
                self.reload_notified().1
            }
            Event::Gpu(event) => {
                self.on_gpu(event);
                Vec::new()
            }
            Event::SweepTick => {
                self.sweep(false);
                self.check_coexistence();
                self.gamemode_sweep()
            }
            Event::Power(status) => {
                self.on_power(status);
                Vec::new()
            }
            Event::CountersTick => {
                self.read_kernel_counters();
                if self.dropped_since_sweep() {
                    self.sweep(true);
                }
                Vec::new()
            }
            Event::WatchdogTick => vec![Effect::Notify(Notice::Watchdog)],
            Event::GameMode(incoming) => self.on_gamemode(incoming),
            Event::Stop => {
                info!("stopping: thawing and widening every managed group to all CPUs");
                self.placer.release_all();
                self.desktop.stopping = true;
                vec![Effect::Notify(Notice::Stopping), Effect::Exit]
            }
        }
    }

    /// One reload, whatever asked for it, between RELOADING=1 and READY=1.
    pub(super) fn reload_notified(&mut self) -> (ReloadStatus, Vec<Effect>) {
        let status = self.reload();
        let effects = vec![
            Effect::Notify(Notice::Reloading),
            Effect::Notify(Notice::Ready {
                status: self.one_line_status(),
            }),
        ];
        (status, effects)
    }

    pub(super) fn on_exec(&mut self, e: &ProcEvent) {
        let handled_ns = monotonic_ns();
        self.counts.exec += 1;
        let pid = e.tgid;
        // Only what the policy can use for this process is read.
        let (policy, ananicy) = (&self.policy, self.ananicy.is_some());
        let wanted = |known: &ProcInfo, held: Facts| {
            let facts = classify::facts_needed(policy, known, held);
            // ananicy rules look at argv[0].
            facts.union(Facts {
                argv: ananicy,
                ..Facts::NONE
            })
        };
        // The parent at fork (from the fork record) is the better ancestor
        // for classification: a reparented daemon still descends from what
        // launched it. /proc's parent is for processes forked before the
        // agent started.
        let fork_ppid = self.table.get(pid).map(|p| p.ppid).filter(|p| *p != 0);
        // With that parent and the record's start time, /proc/PID/stat has
        // nothing to add (the record's comm is the one stat would give).
        let stat = fork_ppid
            .zip(Some(e.start_boottime_ns).filter(|ns| *ns != 0))
            .map(|(ppid, ns)| StatFacts {
                comm: comm_of_record(&e.comm),
                ppid,
                start_ticks: start_ticks_of_boottime_ns(ns),
            });
        let (
            ProcRead {
                info,
                ppid: proc_ppid,
                start_ticks,
            },
            facts,
        ) = match self.procs.read_wanted(
            pid,
            &Ask {
                env_keys: &self.env_keys,
                wanted: &wanted,
                cgroup_id: Some(e.cgroup_id).filter(|id| *id != 0),
                stat,
            },
        ) {
            Ok(read) => read,
            Err(err) => {
                self.forget(pid, &err);
                return;
            }
        };
        let previous = self.table.get(pid);
        let ppid = fork_ppid.unwrap_or(proc_ppid);
        let mut process = Proc::new(info, ppid, start_ticks);
        process.facts = facts;
        if let Some(previous) = previous {
            process.placed_class = previous.placed_class.clone();
            process.origin_cgroup = previous.origin_cgroup.clone();
            if previous.pinned {
                // `corral run --class`: the class holds across exec.
                process.pinned = true;
                process.decision = previous.decision.clone();
                self.table.insert(pid, process);
                return;
            }
        }
        self.table.insert(pid, process);
        self.decide(pid);
        self.place(pid, Some((e.ktime_ns, handled_ns)));
    }

    pub(super) fn on_fork(&mut self, e: &ProcEvent) {
        self.counts.fork += 1;
        let child = e.pid;
        let Some(parent) = self.table.get(e.ppid) else {
            // A parent we never saw: learn the child from /proc.
            match self.procs.read(child, &self.env_keys) {
                Ok(read) => {
                    self.table.insert(child, read.into_proc());
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
        let mut process = Proc::new(info, e.ppid, 0);
        process.facts = parent.facts;
        process.decision = parent.decision.clone();
        process.origin_cgroup = parent.origin_cgroup.clone();
        process.pinned = parent.pinned;
        let placed_class = parent.placed_class.clone();
        self.table.insert(child, process);
        if let Some(class) = placed_class {
            if self.placer.holds_cgroup_id(&class, e.cgroup_id) {
                if let Some(p) = self.table.get_mut(child) {
                    p.placed_class = Some(class);
                }
            } else {
                // Forked between the parent's exec and its move: follow it.
                self.place(child, None);
            }
        }
    }

    pub(super) fn on_exit(&mut self, e: &ProcEvent) {
        self.counts.exit += 1;
        self.forget_pid(e.tgid);
    }

    pub(super) fn forget(&mut self, pid: u32, err: &ReadError) {
        match err {
            ReadError::Gone(_) => self.counts.vanished += 1,
            ReadError::Other { .. } => debug!("{err}"),
        }
        self.forget_pid(pid);
    }

    /// Drops a process that is gone (or whose pid was reused) from the
    /// table and from the placement backend.
    pub(super) fn forget_pid(&mut self, pid: u32) {
        self.table.remove(pid);
        self.placer.forget(pid);
    }

    /// One shared copy of a class name for the placement log.
    fn shared_class_name(&mut self, class: &str) -> Arc<str> {
        if let Some(name) = self.class_names.iter().find(|n| &***n == class) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(class);
        self.class_names.push(name.clone());
        name
    }

    /// Classifies `pid` from its table entry and its ancestors' decisions.
    /// Returns whether the class changed.
    pub(super) fn decide(&mut self, pid: u32) -> bool {
        self.read_ancestor_facts(pid);
        classify::classify_in_table(&self.policy, self.ananicy.as_ref(), &self.table, pid)
            .is_some_and(|decision| self.table.set_decision(pid, decision))
    }

    /// Reads the ancestors of `pid` whole when a rule `pid` passes on its
    /// own facts looks at its ancestors' facts and some ancestor's entry
    /// does not hold them (the exec path read it only for its own rules).
    /// The table holds live processes only, so /proc still has them.
    fn read_ancestor_facts(&mut self, pid: u32) {
        let Some(process) = self.table.get(pid) else {
            return;
        };
        let wanted = classify::ancestor_facts_needed(&self.policy, &process.info);
        if wanted == Facts::NONE {
            return;
        }
        for ancestor in self.table.ancestors(pid) {
            if !self
                .table
                .get(ancestor)
                .is_some_and(|a| a.facts.lacking(wanted))
            {
                continue;
            }
            if let Err(err) = self.read_whole(ancestor) {
                debug!("ancestor {ancestor} of {pid}: {err}");
            }
        }
    }

    /// Reads `pid` from /proc again and fills in the optional facts (exe,
    /// argv, cwd, environment) its table entry holds: all of them after.
    fn read_whole(&mut self, pid: u32) -> Result<(), ReadError> {
        let read = self.procs.read(pid, &self.env_keys)?;
        if let Some(p) = self.table.get_mut(pid) {
            p.info.exe = read.info.exe;
            p.info.argv = read.info.argv;
            p.info.cwd = read.info.cwd;
            p.info.env = read.info.env;
            p.facts = Facts::ALL;
        }
        Ok(())
    }

    /// Moves `pid` into its class's group unless it is there already or
    /// its class is left alone. `exec` holds the kernel's exec timestamp and
    /// when the agent began handling it, for the placement log. Returns
    /// whether it moved.
    pub(super) fn place(&mut self, pid: u32, exec: Option<(u64, u64)>) -> bool {
        if pid == self.own_pid || pid <= 2 {
            return false;
        }
        let Some(process) = self.table.get(pid) else {
            return false;
        };
        let class = process.decision.class.clone();
        if self.placer.layout().group(&class).is_none() {
            return false;
        }
        if process.placed_class.as_deref() == Some(&class) {
            // Said again for an exec: the "moved" line may name the
            // program before this one (a record's comm read with a later
            // exe, for a process that exec'd twice in a row).
            if exec.is_some() {
                debug!(pid, comm = %esc(&process.info.comm), class, rule = %esc(&process.decision.rule), "exec'd in place");
            }
            return false;
        }
        let target = Target {
            pid,
            start_ticks: process.start_ticks,
            cgroup: &process.info.cgroup,
            comm: &process.info.comm,
            parent: Some(process.ppid).filter(|p| *p != 0),
        };
        match self.placer.place(&class, target) {
            Ok(()) => {
                let placed_ns = monotonic_ns();
                if self.placer.layout().dry_run {
                    info!(pid, comm = %esc(&process.info.comm), class, rule = %esc(&process.decision.rule), "dry run: would move");
                } else {
                    debug!(pid, comm = %esc(&process.info.comm), class, rule = %esc(&process.decision.rule), "moved");
                }
                match self.placements_by_class.get_mut(&class) {
                    Some(n) => *n += 1,
                    None => {
                        self.placements_by_class.insert(class.clone(), 1);
                    }
                }
                if let Some((exec_ns, handled_ns)) = exec {
                    self.placement_latency
                        .observe(placed_ns.saturating_sub(exec_ns) as f64 / 1e9);
                    if self.placements.len() == PLACEMENT_LOG {
                        self.placements.pop_front();
                    }
                    let class = self.shared_class_name(&class);
                    self.placements.push_back(LoggedPlacement {
                        pid,
                        class,
                        exec_ns,
                        handled_ns,
                        placed_ns,
                    });
                }
                if let Some(p) = self.table.get_mut(pid) {
                    if p.origin_cgroup.is_none() {
                        p.origin_cgroup = Some(p.info.cgroup.clone());
                    }
                    p.placed_class = Some(class);
                }
                true
            }
            Err(MoveError::Gone(_)) => {
                self.counts.vanished += 1;
                self.forget_pid(pid);
                false
            }
            Err(err) => {
                self.counts.move_errors += 1;
                warn!("{err}");
                false
            }
        }
    }

    /// Places `pid` in its class's group, or, when the policy leaves its
    /// class alone, moves it back where it came from. Returns whether it
    /// moved.
    pub(super) fn place_or_release(&mut self, pid: u32) -> bool {
        let managed = self
            .table
            .get(pid)
            .is_some_and(|p| self.placer.layout().group(&p.decision.class).is_some());
        if managed {
            self.place(pid, None)
        } else {
            self.release(pid)
        }
    }

    /// Moves a process the policy no longer manages back where it came
    /// from. Returns whether it moved.
    pub(super) fn release(&mut self, pid: u32) -> bool {
        let Some(p) = self.table.get(pid) else {
            return false;
        };
        if p.placed_class.is_none() {
            return false;
        }
        let moved = match p.origin_cgroup.clone() {
            Some(origin) => match self.placer.unplace(&origin, pid) {
                Ok(()) => true,
                Err(e) => {
                    warn!("could not return {pid} to {}: {}", esc(&origin), esc(&e));
                    false
                }
            },
            None => false,
        };
        if let Some(p) = self.table.get_mut(pid) {
            p.placed_class = None;
        }
        moved
    }

    /// Re-reads the policy. A bad policy is refused and the last good one
    /// stays in force; a good one re-classifies every tracked process and
    /// re-places those whose class or core set changed.
    pub fn reload(&mut self) -> ReloadStatus {
        let started = Instant::now();
        let loaded = self
            .source
            .load()
            .map_err(anyhow::Error::from)
            .and_then(|policy| {
                core_sets_here(&policy, &self.sysfs_root).map(|(resolved, _)| (policy, resolved))
            });
        let (policy, resolved) = match loaded {
            Ok(ok) => ok,
            Err(e) => return self.refused(started, format!("{e:#}")),
        };
        if let Err(e) = self.placer.reconfigure(&policy, &resolved) {
            return self.refused(started, format!("{e:#}"));
        }
        for w in &policy.warnings {
            warn!("{w}");
        }
        let message = policy.warnings.join("\n");
        self.ananicy = load_ananicy(&policy);
        // The new rules may look at environment variables the table did
        // not keep, or at facts the exec path did not read for the old
        // rules: read those again.
        let new_keys = policy.env_keys();
        let keys_changed = new_keys != self.env_keys;
        self.env_keys = new_keys;
        let pids: Vec<u32> = self
            .table
            .iter()
            .filter(|(_, p)| keys_changed || !p.facts.is_all())
            .map(|(pid, _)| *pid)
            .collect();
        for pid in pids {
            let _ = self.read_whole(pid);
        }
        let mode_config_changed = policy.modes != self.modes.config();
        if policy.gpu.arbiter != self.policy.gpu.arbiter {
            let now = self.now();
            let actions = self
                .gpu
                .arbiter
                .reconfigure(policy.gpu.arbiter.clone(), now);
            self.execute(actions);
        }
        if policy.gpu.thermal != self.policy.gpu.thermal {
            self.gpu.thermal = ThermalGuard::new(policy.gpu.thermal.clone());
        }
        self.policy = policy;
        if mode_config_changed {
            let now = self.now();
            self.modes = ModeSwitch::new(self.policy.modes, now);
        }
        let (mut reclassified, mut moves) = (0, 0);
        for pid in self.table.parents_first() {
            if self.table.get(pid).is_some_and(|p| p.pinned) {
                continue;
            }
            if self.decide(pid) {
                reclassified += 1;
            }
            if !self.same_process(pid) {
                // The pid now belongs to another process: forget the old one.
                self.forget_pid(pid);
                continue;
            }
            moves += usize::from(self.place_or_release(pid));
        }
        self.apply_layout();
        self.update_mode();
        self.sync_telemetry();
        self.apply_dmem();
        self.reloads.ok += 1;
        let status = ReloadStatus {
            ok: true,
            message,
            finished_ns: monotonic_ns(),
            duration_us: started.elapsed().as_micros() as u64,
            reclassified,
            moves,
        };
        info!(
            files = %self.policy.describe_files(),
            reclassified,
            moves,
            duration_us = status.duration_us,
            "policy reloaded"
        );
        self.last_reload = Some(status.clone());
        status
    }

    pub(super) fn refused(&mut self, started: Instant, message: String) -> ReloadStatus {
        error!("policy reload refused, keeping the last good policy: {message}");
        self.reloads.refused += 1;
        let status = ReloadStatus {
            ok: false,
            message,
            finished_ns: monotonic_ns(),
            duration_us: started.elapsed().as_micros() as u64,
            reclassified: 0,
            moves: 0,
        };
        self.last_reload = Some(status.clone());
        status
    }

    /// Feeds the game count to the dynamic mode and applies a switch.
    pub(super) fn update_mode(&mut self) {
        let now = self.now();
        if let Some(mode) = self.modes.observe(now, self.games_for_mode()) {
            let why = self.modes.why_counting(self.protected_running());
            info!(%mode, %why, "dynamic mode changed");
            self.apply_layout();
        }
    }

    /// Writes every group's core set for the current mode.
    pub(super) fn apply_layout(&mut self) {
        let base: BTreeMap<String, CpuList> = self
            .placer
            .layout()
            .iter()
            .map(|g| (g.class.clone(), g.base.clone()))
            .collect();
        let protected = self.protected().to_owned();
        for (class, (cpus, note)) in modes::layout(self.modes.mode(), &base, &protected) {
            let (cpus, note) = match &self.gpu.cooling {
                Some(why) if self.policy.cooled_classes().contains(&class) => {
                    (halve(&cpus), Some(format!("thermal guard: {why}")))
                }
                _ => (cpus, note),
            };
            if let Err(e) = self.placer.set_cpus(&class, cpus, note) {
                warn!(class, "could not set the core set: {e:#}");
            }
        }
        // While protected, everything corral does not place leaves the
        // protected class's CPUs too (where the backend can say so).
        let others = match (self.modes.mode(), base.get(&protected)) {
            (Mode::Protected, Some(fenced)) => {
                let rest: CpuList = self
                    .placer
                    .layout()
                    .online
                    .iter()
                    .filter(|c| !fenced.iter().any(|f| f == *c))
                    .collect();
                (!rest.is_empty()).then_some(rest)
            }
            _ => None,
        };
        self.placer.set_others(others);
    }

    /// Why `peer` may not make `request`, if it may not. Reading is open to
    /// every local user (explain only for their own processes); changing
    /// anything is for root, except `corral run --class` into classes the
    /// policy opens to users (`user_run = true`).
    pub(super) fn refusal(&self, request: &Request, peer: &Peer) -> Option<String> {
        let Some(uid) = peer.uid else {
            // Fail closed: a peer whose credentials could not be read is no
            // one, and may read nothing and change nothing.
            return Some("cannot tell who is asking (no SO_PEERCRED); refused".into());
        };
        if uid == 0 {
            return None;
        }
        match request {
            Request::Status | Request::Placements => None,
            Request::Explain { pid, .. } => match self.procs.owner(*pid) {
                Some(owner) if owner == uid => None,
                Some(_) => Some(format!(
                    "process {pid} belongs to another user; only root can explain it"
                )),
                None => None,
            },
            Request::Reload => {
                Some("only root can reload the policy (try `sudo corral reload`)".into())
            }
            Request::Enter { class } => match self.policy.class(class) {
                Some(c) if c.user_run => None,
                Some(_) => Some(format!(
                    "class `{class}` is not open to users; root can allow it with `user_run = true` under [classes.{class}]"
                )),
                None => None,
            },
        }
    }

    /// `corral run --class CLASS`: moves the asking process into the class's
    /// group before it execs the program, so there is no exec race, and
    /// pins the class across that exec.
    pub(super) fn enter(&mut self, class: &str, peer: &Peer) -> Response {
        let Some(pid) = peer.pid else {
            return Response::Error {
                message: "cannot tell which process is asking (no SO_PEERCRED)".into(),
            };
        };
        // The asking process itself, not whoever has its pid by now.
        let gone = || Response::Error {
            message: format!(
                "process {pid} exited before it could be moved; nothing was moved (its pid may \
                 belong to another process by now)"
            ),
        };
        let still_there = || peer.process.as_ref().is_some_and(|p| p.is_same());
        if !still_there() {
            return gone();
        }
        let Some(group) = self.placer.layout().group(class) else {
            let managed: Vec<String> = self
                .placer
                .layout()
                .iter()
                .map(|g| g.class.clone())
                .collect();
            return Response::Error {
                message: format!(
                    "class `{class}` has no group; `corral run --class` takes one of: {}",
                    managed.join(", ")
                ),
            };
        };
        let group_path = group.path.display().to_string();
        let info = match self.procs.read(pid, &self.env_keys) {
            Ok(read) => read.into_proc(),
            Err(e) => {
                return Response::Error {
                    message: e.to_string(),
                };
            }
        };
        self.table.insert(pid, info);
        self.table.set_decision(
            pid,
            classify::Decision {
                class: class.to_owned(),
                rule: format!("corral run --class {class}"),
                source: None,
                inherited_from: None,
                passes_down: true,
            },
        );
        if let Some(p) = self.table.get_mut(pid) {
            p.pinned = true;
        }
        if !still_there() {
            self.forget_pid(pid);
            return gone();
        }
        if !self.place(pid, None)
            && self.table.get(pid).and_then(|p| p.placed_class.as_deref()) != Some(class)
        {
            return Response::Error {
                message: format!("could not move process {pid} into {group_path}"),
            };
        }
        if !still_there() {
            // It exited while being moved: whoever reuses the pid next
            // starts from its own parent's cgroup, not ours.
            warn!(
                pid,
                class, "corral run --class: the asking process exited during the move"
            );
            return gone();
        }
        info!(pid, class, uid = ?peer.uid, "corral run --class");
        let env = self
            .policy
            .class(class)
            .map(|c| c.env.clone())
            .unwrap_or_default();
        Response::Entered {
            group: group_path,
            env,
        }
    }

    /// Reconciles the table with /proc: learns processes whose events were
    /// lost (a full ring buffer, a missed exec), places them, and forgets
    /// processes that are gone. Runs on a slow timer and at once when the
    /// kernel reports dropped events. Returns how many were newly placed.
    ///
    /// `full`: after dropped events, also re-read every known process,
    /// since a lost exec leaves a process known only by its parent's fork.
    pub fn sweep(&mut self, full: bool) -> usize {
        let live: HashSet<u32> = self.procs.pids().into_iter().collect();
        if live.is_empty() {
            return 0;
        }
        let mut stale = Vec::new();
        if full {
            let known: Vec<u32> = self
                .table
                .iter()
                .map(|(pid, _)| *pid)
                .filter(|pid| live.contains(pid))
                .collect();
            for pid in known {
                let Ok(ProcRead {
                    info,
                    start_ticks: start,
                    ..
                }) = self.procs.read(pid, &self.env_keys)
                else {
                    continue;
                };
                if let Some(p) = self.table.get_mut(pid)
                    && !p.pinned
                    && (p.info != info || p.start_ticks != start)
                {
                    p.info = info;
                    p.start_ticks = start;
                    stale.push(pid);
                }
            }
        }
        let gone: Vec<u32> = self
            .table
            .iter()
            .map(|(pid, _)| *pid)
            .filter(|pid| !live.contains(pid))
            .collect();
        for pid in gone {
            self.forget_pid(pid);
        }
        let mut fresh = std::collections::HashSet::new();
        for pid in live {
            if self.table.get(pid).is_none()
                && let Ok(read) = self.procs.read(pid, &self.env_keys)
            {
                self.table.insert(pid, read.into_proc());
                fresh.insert(pid);
            }
        }
        let mut placed = 0;
        fresh.extend(stale);
        let order: Vec<u32> = self
            .table
            .parents_first()
            .into_iter()
            .filter(|p| fresh.contains(p))
            .collect();
        for pid in order {
            self.decide(pid);
            self.adopt_if_placed(pid);
            placed += usize::from(self.place(pid, None));
        }
        if placed > 0 {
            info!(placed, "sweep placed processes whose events were missed");
            self.update_mode();
        }
        placed
    }

    /// Whether `pid` is still the process the table knows (not a reused
    /// pid): its start time matches. Unknown start times pass.
    pub(super) fn same_process(&self, pid: u32) -> bool {
        let Some(known) = self
            .table
            .get(pid)
            .map(|p| p.start_ticks)
            .filter(|t| *t != 0)
        else {
            return true;
        };
        self.procs.start_ticks(pid) == Some(known)
    }

    /// When the loop must wake for the dynamic mode even without events.
    pub fn mode_deadline(&self) -> Option<Instant> {
        self.modes.next_deadline().map(|d| self.epoch + d)
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
